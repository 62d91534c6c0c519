//! `ControlClient`: the control plane as clients and chunkservers call it.
//! It carries the token, tries each control endpoint, follows a refusing
//! follower to the leader, and retries an unavailable control plane with
//! backoff until a deadline.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Request, Status};

use crate::proto::control_client::ControlClient as Stub;
use crate::service::LEADER_METADATA;

/// A gRPC stub with the token attached.
pub type Rpc = Stub<InterceptedService<Channel, TokenInterceptor>>;

#[derive(Debug, thiserror::Error)]
pub enum ControlClientError {
    #[error("{what}: {}", status.message())]
    Refused { what: String, status: Status },
    #[error("{what}: no control node answered within {waited:?} (tried {endpoints}): {last}")]
    Unavailable {
        what: String,
        endpoints: String,
        waited: Duration,
        last: String,
    },
    #[error("bad control endpoint {0:?}: {1}")]
    BadEndpoint(String, String),
}

impl ControlClientError {
    /// The gRPC code: NotFound, AlreadyExists, InvalidArgument,
    /// FailedPrecondition (busy volume, stale epoch), Unauthenticated...
    pub fn code(&self) -> Code {
        match self {
            ControlClientError::Refused { status, .. } => status.code(),
            ControlClientError::Unavailable { .. } => Code::Unavailable,
            ControlClientError::BadEndpoint(..) => Code::InvalidArgument,
        }
    }
}

#[derive(Clone)]
pub struct TokenInterceptor(MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for TokenInterceptor {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

struct Endpoints {
    /// (address, stub) per known control node.
    nodes: Vec<(String, Rpc)>,
    /// The one that answered last.
    current: usize,
}

#[derive(Clone)]
pub struct ControlClient {
    endpoints: Arc<Mutex<Endpoints>>,
    token: TokenInterceptor,
    /// The CA that signed the control nodes' certificates, for TLS.
    ca: Option<Certificate>,
    retry_for: Duration,
}

fn stub(
    addr: &str,
    token: &TokenInterceptor,
    ca: Option<&Certificate>,
) -> Result<Rpc, ControlClientError> {
    let bad =
        |e: &dyn std::fmt::Display| ControlClientError::BadEndpoint(addr.to_owned(), e.to_string());
    let scheme = if ca.is_some() { "https" } else { "http" };
    let uri = if addr.contains("://") {
        addr.to_owned()
    } else {
        format!("{scheme}://{addr}")
    };
    let mut endpoint = Endpoint::from_shared(uri)
        .map_err(|e| bad(&e))?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(10))
        .tcp_nodelay(true);
    if let Some(ca) = ca {
        endpoint = endpoint
            .tls_config(ClientTlsConfig::new().ca_certificate(ca.clone()))
            .map_err(|e| bad(&e))?;
    }
    Ok(Stub::with_interceptor(
        endpoint.connect_lazy(),
        token.clone(),
    ))
}

impl ControlClient {
    /// A client of the control nodes at `endpoints` (`host:port`, any of
    /// them; the leader is found). Connects lazily.
    pub fn new(endpoints: &[String], token: &str) -> Result<ControlClient, ControlClientError> {
        ControlClient::connect(endpoints, token, None)
    }

    /// A client over TLS: `ca_pem` is the certificate (PEM) that signed the
    /// control nodes' certificates, or `None` for plain TCP.
    pub fn connect(
        endpoints: &[String],
        token: &str,
        ca_pem: Option<&[u8]>,
    ) -> Result<ControlClient, ControlClientError> {
        let ca = ca_pem.map(Certificate::from_pem);
        if endpoints.is_empty() {
            return Err(ControlClientError::BadEndpoint(
                String::new(),
                "no control endpoint given".into(),
            ));
        }
        let value = format!("Bearer {token}").parse().map_err(|_| {
            ControlClientError::BadEndpoint(
                String::new(),
                "the token must be printable ASCII".into(),
            )
        })?;
        let token = TokenInterceptor(value);
        let nodes = endpoints
            .iter()
            .map(|e| Ok((e.clone(), stub(e, &token, ca.as_ref())?)))
            .collect::<Result<_, ControlClientError>>()?;
        Ok(ControlClient {
            endpoints: Arc::new(Mutex::new(Endpoints { nodes, current: 0 })),
            token,
            ca,
            retry_for: Duration::from_secs(15),
        })
    }

    /// How long an unavailable control plane is retried (default 15 s).
    pub fn retry_for(mut self, d: Duration) -> ControlClient {
        self.retry_for = d;
        self
    }

    fn current(&self) -> (usize, Rpc) {
        let e = self.endpoints.lock().expect("endpoints lock");
        (e.current, e.nodes[e.current].1.clone())
    }

    /// After a refusal from node `failed`: go to the leader it named, or to
    /// the next node.
    fn move_on(&self, failed: usize, hint: Option<String>) {
        let mut e = self.endpoints.lock().expect("endpoints lock");
        if e.current != failed {
            return; // another call moved on already
        }
        if let Some(addr) = hint {
            if let Some(i) = e.nodes.iter().position(|(a, _)| *a == addr) {
                e.current = i;
                return;
            }
            if let Ok(s) = stub(&addr, &self.token, self.ca.as_ref()) {
                e.nodes.push((addr, s));
                e.current = e.nodes.len() - 1;
                return;
            }
        }
        e.current = (e.current + 1) % e.nodes.len();
    }

    /// Calls `f` on the leader: `what` names the call in errors.
    pub async fn call<T, F, Fut>(&self, what: &str, f: F) -> Result<T, ControlClientError>
    where
        F: Fn(Rpc) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let start = Instant::now();
        let mut backoff = Duration::from_millis(20);
        loop {
            let (index, rpc) = self.current();
            let status = match f(rpc).await {
                Ok(r) => return Ok(r.into_inner()),
                Err(s) => s,
            };
            if status.code() != Code::Unavailable {
                return Err(ControlClientError::Refused {
                    what: what.to_owned(),
                    status,
                });
            }
            let hint = status
                .metadata()
                .get(LEADER_METADATA)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let followed = hint.is_some();
            self.move_on(index, hint);
            if start.elapsed() >= self.retry_for {
                let endpoints = self
                    .endpoints
                    .lock()
                    .expect("endpoints lock")
                    .nodes
                    .iter()
                    .map(|(a, _)| a.as_str())
                    .collect::<Vec<_>>()
                    .join(", ");
                return Err(ControlClientError::Unavailable {
                    what: what.to_owned(),
                    endpoints,
                    waited: start.elapsed(),
                    last: status.message().to_owned(),
                });
            }
            if !followed {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_millis(500));
            }
        }
    }
}
