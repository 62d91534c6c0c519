//! A client of the chunk service: finds each copyset's leader, follows
//! redirects, and retries through leader changes until a deadline.
//!
//! Retrying a write whose answer was lost may apply it twice; writes are
//! positional, so the second changes nothing.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use quiver_fabric::WorkerConfig;

use crate::net::{CallError, FabricNode, Service};
use crate::service::{
    self, ChunkError, CopysetSpec, LeaderInfo, ServerStatus, KIND_CREATE_COPYSET, KIND_DELETE,
    KIND_LEADER, KIND_READ, KIND_STATUS, KIND_TRANSFER_LEADER, KIND_WRITE,
};

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with an error that retrying does not fix.
    #[error("{server}: {error}")]
    Refused {
        server: SocketAddr,
        error: ChunkError,
    },
    /// No member answered as leader before the deadline.
    #[error("copyset {copyset}: no leader answered within {waited:?} (last: {last})")]
    Deadline {
        copyset: u32,
        waited: Duration,
        last: String,
    },
    #[error("{server}: {error}")]
    Call {
        server: SocketAddr,
        error: CallError,
    },
}

/// One chunk-service call from `node` to `server`, its answer decoded: how
/// clients call, and servers call each other (snapshot fetch, campaign,
/// copyset creation).
pub async fn call_chunk_service(
    node: &FabricNode,
    server: SocketAddr,
    copyset: u32,
    kind: u8,
    body: Vec<u8>,
    timeout: Duration,
) -> Result<Vec<u8>, ClientError> {
    let reply = node
        .call(
            server,
            Service::Chunk,
            (kind, u64::from(copyset)),
            body,
            timeout,
        )
        .await
        .map_err(|error| ClientError::Call { server, error })?;
    service::decode_answer(&reply.header, &reply.payload)
        .map_err(|error| ClientError::Refused { server, error })?;
    Ok(reply.payload.to_vec())
}

impl ClientError {
    /// The error as a chunk service reports it onwards.
    pub fn into_chunk_error(self) -> ChunkError {
        match self {
            ClientError::Refused { error, .. } => error,
            other => ChunkError::Raft(other.to_string()),
        }
    }
}

/// A chunk-service client with its own fabric node.
pub struct ChunkClient {
    node: Arc<FabricNode>,
    /// The last known leader of each copyset.
    leaders: Mutex<HashMap<u32, SocketAddr>>,
    /// One call's timeout.
    pub call_timeout: Duration,
    /// How long an operation retries through leader changes.
    pub deadline: Duration,
}

impl ChunkClient {
    /// Starts a client (its fabric worker a task of the runtime). Call inside
    /// a runtime.
    pub fn start(config: WorkerConfig) -> anyhow::Result<ChunkClient> {
        // Nothing calls a client; its inbound side stays empty.
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        let node = FabricNode::start(SocketAddr::from(([127, 0, 0, 1], 0)), config, tx)?;
        Ok(ChunkClient {
            node: Arc::new(node),
            leaders: Mutex::new(HashMap::new()),
            call_timeout: Duration::from_secs(2),
            deadline: Duration::from_secs(15),
        })
    }

    /// One call to one server, its answer decoded.
    pub async fn call(
        &self,
        server: SocketAddr,
        copyset: u32,
        kind: u8,
        body: Vec<u8>,
    ) -> Result<Vec<u8>, ClientError> {
        self.call_within(server, copyset, kind, body, self.call_timeout)
            .await
    }

    async fn call_within(
        &self,
        server: SocketAddr,
        copyset: u32,
        kind: u8,
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<u8>, ClientError> {
        call_chunk_service(&self.node, server, copyset, kind, body, timeout).await
    }

    /// Sends a leader-only request of `copyset` (members `peers`), following
    /// redirects and retrying until the deadline.
    async fn to_leader(
        &self,
        peers: &[SocketAddr],
        copyset: u32,
        kind: u8,
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<u8>, ClientError> {
        let started = Instant::now();
        let mut next = 0usize;
        let mut target = self
            .leaders
            .lock()
            .expect("leaders lock")
            .get(&copyset)
            .copied();
        let mut last = String::from("nothing tried");
        let mut pause = Duration::from_millis(5);
        while started.elapsed() < self.deadline {
            let server = target.take().unwrap_or_else(|| {
                next += 1;
                peers[next % peers.len()]
            });
            match self
                .call_within(server, copyset, kind, body.clone(), timeout)
                .await
            {
                Ok(answer) => {
                    self.leaders
                        .lock()
                        .expect("leaders lock")
                        .insert(copyset, server);
                    return Ok(answer);
                }
                Err(ClientError::Refused {
                    error: ChunkError::NotLeader { leader_addr, .. },
                    ..
                }) => {
                    last = format!("{server}: not the leader");
                    target = leader_addr
                        .and_then(|a| a.parse().ok())
                        .filter(|&a| a != server);
                    if target.is_none() {
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_millis(200));
                    }
                }
                Err(ClientError::Refused {
                    server,
                    error: error @ (ChunkError::Raft(_) | ChunkError::Busy(_)),
                }) => {
                    last = format!("{server}: {error}");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(200));
                }
                Err(e @ ClientError::Refused { .. }) => return Err(e),
                Err(e) => {
                    last = e.to_string();
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(200));
                }
            }
        }
        Err(ClientError::Deadline {
            copyset,
            waited: started.elapsed(),
            last,
        })
    }

    pub async fn write(
        &self,
        peers: &[SocketAddr],
        copyset: u32,
        chunk: u64,
        offset: u64,
        epoch: u64,
        data: &[u8],
    ) -> Result<(), ClientError> {
        let body = service::write_body(chunk, offset, 0, epoch, data);
        self.to_leader(peers, copyset, KIND_WRITE, body, self.call_timeout)
            .await
            .map(|_| ())
    }

    pub async fn read(
        &self,
        peers: &[SocketAddr],
        copyset: u32,
        chunk: u64,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>, ClientError> {
        let body = service::read_body(chunk, offset, len, false);
        self.to_leader(peers, copyset, KIND_READ, body, self.call_timeout)
            .await
    }

    pub async fn delete(
        &self,
        peers: &[SocketAddr],
        copyset: u32,
        chunk: u64,
    ) -> Result<(), ClientError> {
        let body = service::delete_body(chunk);
        self.to_leader(peers, copyset, KIND_DELETE, body, self.call_timeout)
            .await
            .map(|_| ())
    }

    /// Hands leadership of `copyset` (members at `peers`) to node `to`.
    pub async fn transfer_leader(
        &self,
        peers: &[SocketAddr],
        copyset: u32,
        to: u64,
    ) -> Result<(), ClientError> {
        let body = to.to_le_bytes().to_vec();
        // A transfer waits for the target to catch up and win an election.
        let timeout = self.call_timeout.max(Duration::from_secs(10));
        self.to_leader(peers, copyset, KIND_TRANSFER_LEADER, body, timeout)
            .await
            .map(|_| ())
    }

    /// Adds and/or removes a member of `copyset` (members at `peers`).
    pub async fn change_peers(
        &self,
        peers: &[SocketAddr],
        copyset: u32,
        change: &service::PeerChange,
    ) -> Result<(), ClientError> {
        let body = serde_json::to_vec(change).expect("serializes");
        // The new member catches up first: give it time.
        let timeout = self.call_timeout.max(Duration::from_secs(60));
        self.to_leader(peers, copyset, service::KIND_CHANGE_PEERS, body, timeout)
            .await
            .map(|_| ())
    }

    /// Who `server` thinks leads `copyset`.
    pub async fn leader(
        &self,
        server: SocketAddr,
        copyset: u32,
    ) -> Result<LeaderInfo, ClientError> {
        let answer = self.call(server, copyset, KIND_LEADER, Vec::new()).await?;
        serde_json::from_slice(&answer).map_err(|e| ClientError::Refused {
            server,
            error: ChunkError::BadRequest(format!("leader answer: {e}")),
        })
    }

    pub async fn status(&self, server: SocketAddr) -> Result<ServerStatus, ClientError> {
        let answer = self.call(server, 0, KIND_STATUS, Vec::new()).await?;
        serde_json::from_slice(&answer).map_err(|e| ClientError::Refused {
            server,
            error: ChunkError::BadRequest(format!("status answer: {e}")),
        })
    }

    /// `server`'s status, once it answers (a server starting up), or the
    /// last error after `within`.
    pub async fn status_within(
        &self,
        server: SocketAddr,
        within: Duration,
    ) -> Result<ServerStatus, ClientError> {
        let deadline = Instant::now() + within;
        loop {
            match self.status(server).await {
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!(%server, error = %e, "waiting for a chunkserver");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                answer => return answer,
            }
        }
    }

    /// Creates `copyset` on every member of `peers` (node id → address); one
    /// member ([`service::bootstrap_member`]) initializes the group.
    pub async fn create_copyset(
        &self,
        copyset: u32,
        peers: &std::collections::BTreeMap<u64, String>,
    ) -> Result<(), ClientError> {
        let bootstrap = service::bootstrap_member(copyset, peers);
        for (&node, addr) in peers {
            let server: SocketAddr = addr.parse().map_err(|e| ClientError::Refused {
                server: SocketAddr::from(([0, 0, 0, 0], 0)),
                error: ChunkError::BadRequest(format!("peer address {addr:?}: {e}")),
            })?;
            let spec = CopysetSpec {
                peers: peers.clone(),
                bootstrap: Some(node) == bootstrap,
            };
            let body = serde_json::to_vec(&spec).expect("serializes");
            // Creation syncs files and starts Raft: slow on a slow disk or
            // under emulation, and safe to wait for (it is idempotent).
            let timeout = self.call_timeout.max(Duration::from_secs(30));
            self.call_within(server, copyset, KIND_CREATE_COPYSET, body, timeout)
                .await?;
        }
        Ok(())
    }

    /// The client's fabric node (to share with other users).
    pub fn node(&self) -> &Arc<FabricNode> {
        &self.node
    }
}
