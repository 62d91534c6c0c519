//! The etcd backend: several control nodes share one etcd cluster and elect
//! a leader through it, as Curve's MDS does.
//!
//! Every key lives under `EtcdConfig::prefix`. The leader is whoever holds
//! `{prefix}control/leader`, a key attached to that node's lease: it goes
//! away when the node resigns or stops renewing. Every write is one etcd
//! transaction guarded by "the leader key is attached to my lease", so a
//! deposed leader (lease expired, paused, partitioned) can never write,
//! whatever it still believes.
//!
//! We speak etcd's gRPC API through our own stubs (`proto/etcd.proto`); see
//! there why not the `etcd-client` crate.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};
use tracing::{info, warn};

use super::{Batch, LeaderRecord, MetaStore, StoreError};

/// etcd's v3 API, generated from `proto/etcd.proto` (client and server code;
/// we use the client only).
#[allow(dead_code, clippy::all, clippy::pedantic)]
mod pb {
    tonic::include_proto!("etcdserverpb");
}

use pb::compare::{CompareResult, CompareTarget, TargetUnion};
use pb::kv_client::KvClient;
use pb::lease_client::LeaseClient;
use pb::request_op::Request as Op;
use pb::response_op::Response as OpResponse;

/// The most operations etcd accepts in one transaction (its default
/// `--max-txn-ops`). A batch must stay atomic, so a bigger one is refused
/// rather than split: callers keep their batches small.
pub const MAX_TXN_OPS: usize = 128;

/// The leader key, under the prefix. Reserved: batches may not touch it and
/// `load` never returns it.
const LEADER_KEY: &str = "control/leader";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a waiting candidate looks whether the leader key is gone: one
/// small read, so a successor takes over at most this long after the lease
/// expires.
const CAMPAIGN_POLL: Duration = Duration::from_millis(300);
/// Pause between attempts to renew a lease after a failed one.
const RENEW_RETRY: Duration = Duration::from_millis(200);
/// Keys per read when loading: pages keep each response small.
const LOAD_PAGE_KEYS: i64 = 512;
/// A page of values may be large (tonic refuses responses over 4 MiB by
/// default); etcd itself bounds each value by its request size limit.
const MAX_RESPONSE_BYTES: usize = 64 << 20;

/// Where the etcd cluster is and how this node uses it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct EtcdConfig {
    /// Client URLs (`http://10.0.0.1:2379`; a bare `host:port` means http),
    /// tried in order when one fails.
    pub endpoints: Vec<String>,
    /// Every key is stored under this prefix, e.g. `/quiver/`.
    pub prefix: String,
    /// The leader's lease: a failed leader is replaced after at most this
    /// long. etcd raises TTLs below its minimum (2 s by default).
    pub lease_ttl_s: i64,
}

impl Default for EtcdConfig {
    fn default() -> EtcdConfig {
        EtcdConfig {
            endpoints: vec!["http://127.0.0.1:2379".to_owned()],
            prefix: "/quiver/".to_owned(),
            lease_ttl_s: 10,
        }
    }
}

pub struct EtcdStore {
    shared: Arc<Shared>,
    /// Renews the lease of the current term; aborted on resign and drop.
    keepalive: Mutex<Option<JoinHandle<()>>>,
}

/// What the store and its keepalive task share.
struct Shared {
    etcd: Connection,
    prefix: Vec<u8>,
    leader_key: Vec<u8>,
    me: LeaderRecord,
    lease_ttl_s: i64,
    /// The lease of our term while we lead.
    term_lease: Mutex<Option<i64>>,
    leading: watch::Sender<bool>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded values are plain data that no panic leaves half-updated.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl EtcdStore {
    /// Connects to the first reachable endpoint. Fails with `Unreachable`
    /// if none answers.
    pub async fn connect(config: EtcdConfig, me: LeaderRecord) -> Result<EtcdStore, StoreError> {
        if config.endpoints.is_empty() {
            return Err(StoreError::Backend("no etcd endpoints configured".into()));
        }
        if config.lease_ttl_s < 1 {
            return Err(StoreError::Backend(format!(
                "etcd lease TTL must be at least 1 s, not {}",
                config.lease_ttl_s
            )));
        }
        let prefix = config.prefix.into_bytes();
        let mut leader_key = prefix.clone();
        leader_key.extend_from_slice(LEADER_KEY.as_bytes());
        let shared = Shared {
            etcd: Connection::new(&config.endpoints),
            prefix,
            leader_key,
            me,
            lease_ttl_s: config.lease_ttl_s,
            term_lease: Mutex::new(None),
            leading: watch::channel(false).0,
        };
        // Reading the leader key proves the cluster answers.
        shared.leader_kv().await?;
        Ok(EtcdStore {
            shared: Arc::new(shared),
            keepalive: Mutex::new(None),
        })
    }

    /// Grants a lease and tries once to create the leader key with it.
    /// Returns the term (lease, TTL, grant time) if we won.
    async fn try_take_leadership(&self) -> Result<Option<Term>, StoreError> {
        let shared = &self.shared;
        let granted_at = Instant::now();
        let grant = pb::LeaseGrantRequest {
            ttl: shared.lease_ttl_s,
            id: 0,
        };
        let grant = shared
            .etcd
            .call("lease grant", Resend::IfNeverSent, |channel| async move {
                Ok(lease_client(channel).lease_grant(grant).await?.into_inner())
            })
            .await?;
        if !grant.error.is_empty() {
            return Err(StoreError::Backend(format!(
                "etcd lease grant: {}",
                grant.error
            )));
        }
        let lease = grant.id;
        let record = serde_json::to_vec(&shared.me)
            .map_err(|e| StoreError::Backend(format!("encoding the leader record: {e}")))?;
        let txn = pb::TxnRequest {
            // Create revision 0: the key does not exist.
            compare: vec![pb::Compare {
                result: CompareResult::Equal.into(),
                target: CompareTarget::Create.into(),
                key: shared.leader_key.clone(),
                target_union: Some(TargetUnion::CreateRevision(0)),
                range_end: Vec::new(),
            }],
            success: vec![op(Op::RequestPut(pb::PutRequest {
                key: shared.leader_key.clone(),
                value: record,
                lease,
                ..Default::default()
            }))],
            // Read who holds it: should it be our own lease after all (an
            // earlier attempt of this very request), we won.
            failure: vec![op(Op::RequestRange(pb::RangeRequest {
                key: shared.leader_key.clone(),
                ..Default::default()
            }))],
        };
        let outcome = shared.txn("campaign", txn).await;
        let won = match &outcome {
            Ok(response) if response.succeeded => true,
            Ok(response) => holder_lease(response) == Some(lease),
            Err(_) => false,
        };
        if won {
            return Ok(Some(Term {
                lease,
                ttl_s: grant.ttl,
                granted_at,
            }));
        }
        // Lost the race (or failed): the lease is of no use.
        shared.revoke(lease).await.ok();
        outcome.map(|_| None)
    }

    /// Leads with `term`: publishes it and starts renewing its lease.
    fn start_term(&self, term: Term) {
        let shared = &self.shared;
        *lock(&shared.term_lease) = Some(term.lease);
        shared.leading.send_replace(true);
        info!(
            node = %shared.me.name,
            lease = %format_args!("{:x}", term.lease),
            "won control leadership (etcd)"
        );
        let task = tokio::spawn(keep_leading(shared.clone(), term));
        if let Some(previous) = lock(&self.keepalive).replace(task) {
            previous.abort();
        }
    }
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        // Without renewals the lease expires and another node takes over.
        if let Some(task) = lock(&self.keepalive).take() {
            task.abort();
        }
    }
}

impl MetaStore for EtcdStore {
    fn kind(&self) -> &'static str {
        "etcd"
    }

    async fn load(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let shared = &self.shared;
        let mut start = shared.full_key(prefix);
        let end = prefix_end(&start);
        if start.is_empty() {
            // etcd refuses an empty key; "\0" is the smallest key there is.
            start.push(0);
        }
        let mut entries = Vec::new();
        // Later pages read at the first page's revision: one consistent
        // snapshot however many pages it takes.
        let mut revision = 0;
        loop {
            let request = pb::RangeRequest {
                key: start.clone(),
                range_end: end.clone(),
                limit: LOAD_PAGE_KEYS,
                revision,
                ..Default::default()
            };
            let page = shared.range("load", request).await?;
            if revision == 0 {
                revision = page.header.as_ref().map_or(0, |header| header.revision);
            }
            let Some(last) = page.kvs.last() else { break };
            // The next page starts just after the last key of this one.
            start = last.key.clone();
            start.push(0);
            for kv in page.kvs {
                if kv.key == shared.leader_key {
                    continue;
                }
                let Some(key) = kv.key.strip_prefix(shared.prefix.as_slice()) else {
                    continue;
                };
                let key = String::from_utf8(key.to_vec()).map_err(|_| {
                    StoreError::Backend(format!(
                        "etcd key {:?} is not UTF-8",
                        String::from_utf8_lossy(&kv.key)
                    ))
                })?;
                entries.push((key, kv.value));
            }
            if !page.more {
                break;
            }
        }
        Ok(entries)
    }

    async fn apply(&self, batch: Batch) -> Result<(), StoreError> {
        let shared = &self.shared;
        let ops = shared.batch_ops(&batch)?;
        let lease = shared.current_lease().ok_or(StoreError::NotLeader)?;
        let txn = pb::TxnRequest {
            // The fence: a lease ID is never reused, and the leader key goes
            // with our lease, so this holds only while our term lasts.
            compare: vec![pb::Compare {
                result: CompareResult::Equal.into(),
                target: CompareTarget::Lease.into(),
                key: shared.leader_key.clone(),
                target_union: Some(TargetUnion::Lease(lease)),
                range_end: Vec::new(),
            }],
            success: ops,
            failure: Vec::new(),
        };
        if shared.txn("apply", txn).await?.succeeded {
            Ok(())
        } else {
            shared.lose(lease, "the leader key no longer holds our lease");
            Err(StoreError::NotLeader)
        }
    }

    async fn campaign(&self) -> Result<(), StoreError> {
        if self.shared.current_lease().is_some() {
            return Ok(());
        }
        let mut unreachable_streak = false;
        loop {
            // Only a vacant seat is worth a lease grant and a transaction.
            let attempt = match self.shared.leader_kv().await {
                Ok(Some(_)) => Ok(None),
                Ok(None) => self.try_take_leadership().await,
                Err(error) => Err(error),
            };
            match attempt {
                Ok(Some(term)) => {
                    self.start_term(term);
                    return Ok(());
                }
                Ok(None) => unreachable_streak = false,
                // A candidate outlasts etcd outages: it keeps waiting.
                Err(StoreError::Unreachable(why)) => {
                    if !unreachable_streak {
                        warn!(node = %self.shared.me.name, "campaign: {why}; retrying");
                    }
                    unreachable_streak = true;
                }
                Err(error) => return Err(error),
            }
            tokio::time::sleep(CAMPAIGN_POLL).await;
        }
    }

    fn leadership(&self) -> watch::Receiver<bool> {
        self.shared.leading.subscribe()
    }

    async fn leader(&self) -> Result<Option<LeaderRecord>, StoreError> {
        let Some(kv) = self.shared.leader_kv().await? else {
            return Ok(None);
        };
        serde_json::from_slice(&kv.value)
            .map(Some)
            .map_err(|e| StoreError::Backend(format!("the etcd leader record: {e}")))
    }

    async fn resign(&self) -> Result<(), StoreError> {
        let shared = &self.shared;
        if let Some(task) = lock(&self.keepalive).take() {
            task.abort();
        }
        let Some(lease) = lock(&shared.term_lease).take() else {
            return Ok(());
        };
        shared.leading.send_replace(false);
        info!(node = %shared.me.name, "resigned control leadership (etcd)");
        // Revoking deletes the leader key at once: a successor need not wait
        // for the lease to expire.
        shared.revoke(lease).await
    }
}

/// One leadership term: the lease that holds the leader key.
#[derive(Debug, Clone, Copy)]
struct Term {
    lease: i64,
    /// As granted (etcd may raise what we asked for).
    ttl_s: i64,
    /// Taken before asking, so the lease surely lasts until `granted_at + ttl`.
    granted_at: Instant,
}

/// Renews the lease of `term` every third of its TTL, and ends the term
/// (leadership false) when the lease is gone, cannot be renewed before it
/// would expire, or no longer holds the leader key.
async fn keep_leading(shared: Arc<Shared>, term: Term) {
    let lease = term.lease;
    let period = Duration::from_millis(u64::try_from(term.ttl_s * 1000 / 3).unwrap_or(0))
        .max(Duration::from_millis(100));
    let mut expires_at = term.granted_at + ttl(term.ttl_s);
    let mut stream = None;
    loop {
        tokio::time::sleep(period).await;
        if shared.current_lease() != Some(lease) {
            return;
        }
        match renew(&shared, lease, &mut stream, expires_at).await {
            Ok(renewed_until) => expires_at = renewed_until,
            Err(why) => {
                shared.lose(lease, &why);
                return;
            }
        }
        // Someone may have deleted the key (an operator, a bug): the lease
        // alone does not make us leader.
        match tokio::time::timeout_at(expires_at, shared.leader_kv()).await {
            Ok(Ok(Some(kv))) if kv.lease == lease => {}
            Ok(Ok(_)) => {
                shared.lose(lease, "the leader key no longer holds our lease");
                return;
            }
            // Unreachable: the next renewal decides.
            Ok(Err(_)) | Err(_) => {}
        }
    }
}

/// The lease keepalive stream: one response per request.
struct KeepAliveStream {
    requests: mpsc::Sender<pb::LeaseKeepAliveRequest>,
    responses: tonic::Streaming<pb::LeaseKeepAliveResponse>,
}

/// Renews `lease`, retrying (reopening the stream, on another endpoint if
/// need be) until it would expire. Returns until when it now lasts.
async fn renew(
    shared: &Shared,
    lease: i64,
    stream: &mut Option<KeepAliveStream>,
    expires_at: Instant,
) -> Result<Instant, String> {
    let mut last_error = String::from("no attempt");
    loop {
        let sent_at = Instant::now();
        if sent_at >= expires_at {
            return Err(format!(
                "the lease expired before a renewal got through ({last_error})"
            ));
        }
        let deadline = expires_at.min(sent_at + CALL_TIMEOUT);
        match tokio::time::timeout_at(deadline, renew_once(shared, lease, stream)).await {
            Ok(Ok(ttl_s)) if ttl_s > 0 => return Ok(sent_at + ttl(ttl_s)),
            Ok(Ok(_)) => return Err("etcd says our lease expired".to_owned()),
            Ok(Err(error)) => last_error = error.to_string(),
            Err(_) => last_error = "a renewal timed out".to_owned(),
        }
        *stream = None;
        tokio::time::sleep_until(expires_at.min(Instant::now() + RENEW_RETRY)).await;
    }
}

/// Sends one keepalive (opening the stream if there is none) and returns the
/// TTL etcd answers, <= 0 if the lease is gone.
async fn renew_once(
    shared: &Shared,
    lease: i64,
    stream: &mut Option<KeepAliveStream>,
) -> Result<i64, StoreError> {
    let request = pb::LeaseKeepAliveRequest { id: lease };
    let stream = match stream {
        Some(open) => {
            open.requests
                .send(request)
                .await
                .map_err(|_| StoreError::Backend("the keepalive stream closed".into()))?;
            open
        }
        None => stream.insert(shared.open_keepalive(request).await?),
    };
    match stream.responses.message().await {
        Ok(Some(response)) => Ok(response.ttl),
        Ok(None) => Err(StoreError::Backend(
            "etcd closed the keepalive stream".into(),
        )),
        Err(status) => Err(StoreError::Unreachable(format!(
            "lease keepalive: {}",
            describe(&status)
        ))),
    }
}

impl Shared {
    fn full_key(&self, key: &str) -> Vec<u8> {
        let mut full = self.prefix.clone();
        full.extend_from_slice(key.as_bytes());
        full
    }

    fn current_lease(&self) -> Option<i64> {
        *lock(&self.term_lease)
    }

    /// Ends the term of `lease`, if it is still the current one.
    fn lose(&self, lease: i64, why: &str) {
        let mut term_lease = lock(&self.term_lease);
        if *term_lease != Some(lease) {
            return;
        }
        *term_lease = None;
        drop(term_lease);
        self.leading.send_replace(false);
        info!(node = %self.me.name, "lost control leadership (etcd): {why}");
    }

    /// The batch as transaction operations, with the embedded store's
    /// meaning: deletes first, then puts, the last put of a key winning
    /// (etcd refuses a transaction that names a key twice).
    fn batch_ops(&self, batch: &Batch) -> Result<Vec<pb::RequestOp>, StoreError> {
        let mut last_word: BTreeMap<&str, Option<&[u8]>> = BTreeMap::new();
        for key in &batch.deletes {
            last_word.insert(key, None);
        }
        for (key, value) in &batch.puts {
            last_word.insert(key, Some(value));
        }
        if last_word.contains_key(LEADER_KEY) {
            return Err(StoreError::Backend(format!(
                "the key {LEADER_KEY} is reserved for leader election"
            )));
        }
        if last_word.len() > MAX_TXN_OPS {
            return Err(StoreError::Backend(format!(
                "a batch of {} keys exceeds etcd's limit of {MAX_TXN_OPS} operations per \
                 transaction; batches must stay smaller",
                last_word.len()
            )));
        }
        Ok(last_word
            .into_iter()
            .map(|(key, value)| match value {
                Some(value) => op(Op::RequestPut(pb::PutRequest {
                    key: self.full_key(key),
                    value: value.to_vec(),
                    ..Default::default()
                })),
                None => op(Op::RequestDeleteRange(pb::DeleteRangeRequest {
                    key: self.full_key(key),
                    ..Default::default()
                })),
            })
            .collect())
    }

    async fn leader_kv(&self) -> Result<Option<pb::KeyValue>, StoreError> {
        let request = pb::RangeRequest {
            key: self.leader_key.clone(),
            ..Default::default()
        };
        Ok(self.range("leader", request).await?.kvs.into_iter().next())
    }

    async fn range(
        &self,
        what: &'static str,
        request: pb::RangeRequest,
    ) -> Result<pb::RangeResponse, StoreError> {
        self.etcd
            .call(what, Resend::Always, |channel| {
                let request = request.clone();
                async move { Ok(kv_client(channel).range(request).await?.into_inner()) }
            })
            .await
    }

    async fn txn(
        &self,
        what: &'static str,
        request: pb::TxnRequest,
    ) -> Result<pb::TxnResponse, StoreError> {
        self.etcd
            .call(what, Resend::IfNeverSent, |channel| {
                let request = request.clone();
                async move { Ok(kv_client(channel).txn(request).await?.into_inner()) }
            })
            .await
    }

    /// Revokes `lease`; one already gone is fine.
    async fn revoke(&self, lease: i64) -> Result<(), StoreError> {
        let revoked = self
            .etcd
            .call("lease revoke", Resend::Always, |channel| async move {
                match lease_client(channel)
                    .lease_revoke(pb::LeaseRevokeRequest { id: lease })
                    .await
                {
                    Err(status) if status.code() == Code::NotFound => Ok(()),
                    other => other.map(drop),
                }
            })
            .await;
        if let Err(error) = &revoked {
            warn!(node = %self.me.name, "revoking etcd lease {lease:x}: {error}");
        }
        revoked
    }

    /// Opens a keepalive stream with `first` already queued: etcd answers
    /// the call only once a request arrives.
    async fn open_keepalive(
        &self,
        first: pb::LeaseKeepAliveRequest,
    ) -> Result<KeepAliveStream, StoreError> {
        self.etcd
            .call("lease keepalive", Resend::Always, |channel| async move {
                let (requests, queued) = mpsc::channel(4);
                requests
                    .send(first)
                    .await
                    .map_err(|_| Status::internal("keepalive queue closed"))?;
                let responses = lease_client(channel)
                    .lease_keep_alive(ReceiverStream::new(queued))
                    .await?
                    .into_inner();
                Ok(KeepAliveStream {
                    requests,
                    responses,
                })
            })
            .await
    }
}

fn kv_client(channel: Channel) -> KvClient<Channel> {
    KvClient::new(channel).max_decoding_message_size(MAX_RESPONSE_BYTES)
}

fn lease_client(channel: Channel) -> LeaseClient<Channel> {
    LeaseClient::new(channel)
}

fn op(request: Op) -> pb::RequestOp {
    pb::RequestOp {
        request: Some(request),
    }
}

/// The lease on the leader key, from a campaign's failure branch.
fn holder_lease(response: &pb::TxnResponse) -> Option<i64> {
    match response.responses.first()?.response.as_ref()? {
        OpResponse::ResponseRange(range) => range.kvs.first().map(|kv| kv.lease),
        _ => None,
    }
}

fn ttl(seconds: i64) -> Duration {
    Duration::from_secs(u64::try_from(seconds).unwrap_or(0))
}

/// The end of the range of keys starting with `prefix`: the prefix with its
/// last byte below 0xff incremented and what follows dropped. "\0" (every
/// key from the start on) when there is no such byte.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    match prefix.iter().rposition(|&byte| byte < 0xff) {
        Some(last) => {
            let mut end = prefix[..=last].to_vec();
            end[last] += 1;
            end
        }
        None => vec![0],
    }
}

/// A call that failed to connect: nothing reached etcd.
fn never_sent(status: &Status) -> bool {
    let mut cause = std::error::Error::source(status);
    while let Some(error) = cause {
        if error.is::<tonic::ConnectError>() {
            return true;
        }
        cause = error.source();
    }
    false
}

/// Transport errors and etcd's own "try elsewhere" answers (no leader,
/// timeouts): the next endpoint may do better.
fn is_unreachable(status: &Status) -> bool {
    // A status tonic made up from a local failure carries its cause; one
    // etcd sent does not.
    matches!(status.code(), Code::Unavailable | Code::DeadlineExceeded)
        || std::error::Error::source(status).is_some()
}

/// An error with its causes: a transport error alone says only
/// "transport error".
fn describe(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = match error.downcast_ref::<Status>() {
        Some(status) => format!("{:?}: {}", status.code(), status.message()),
        None => error.to_string(),
    };
    let mut cause = error.source();
    while let Some(error) = cause {
        let more = error.to_string();
        if !text.contains(&more) {
            text = format!("{text}: {more}");
        }
        cause = error.source();
    }
    text
}

/// Whether a failed call may be sent again, to another endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resend {
    /// Reads, renewals, revokes: running twice does no harm.
    Always,
    /// Writes: only when the first attempt surely never left (no
    /// connection). An attempt that timed out may still commit later, and
    /// a resent copy could then be overtaken by it after newer writes.
    IfNeverSent,
}

/// Channels to the etcd endpoints: one in use at a time; when it fails,
/// the next one in order becomes the preferred.
struct Connection {
    endpoints: Vec<String>,
    current: Mutex<Current>,
}

struct Current {
    preferred: usize,
    /// Connected to the preferred endpoint.
    channel: Option<Channel>,
}

impl Connection {
    fn new(endpoints: &[String]) -> Connection {
        let endpoints = endpoints
            .iter()
            .map(|endpoint| {
                if endpoint.contains("://") {
                    endpoint.clone()
                } else {
                    format!("http://{endpoint}")
                }
            })
            .collect();
        Connection {
            endpoints,
            current: Mutex::new(Current {
                preferred: 0,
                channel: None,
            }),
        }
    }

    /// Runs `call` on the preferred endpoint, each attempt within
    /// `CALL_TIMEOUT`, and then (as `resend` allows) on each other in turn
    /// while they are unreachable.
    async fn call<T, F, Fut>(
        &self,
        what: &'static str,
        resend: Resend,
        call: F,
    ) -> Result<T, StoreError>
    where
        F: Fn(Channel) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let first = lock(&self.current).preferred;
        let mut failures = Vec::new();
        for attempt in 0..self.endpoints.len() {
            let index = (first + attempt) % self.endpoints.len();
            let endpoint = &self.endpoints[index];
            let channel = match self.channel(index).await {
                Ok(channel) => channel,
                Err(why) => {
                    failures.push(format!("{endpoint}: {why}"));
                    self.forget(index);
                    continue;
                }
            };
            let sent = match tokio::time::timeout(CALL_TIMEOUT, call(channel)).await {
                Ok(Ok(answer)) => return Ok(answer),
                Ok(Err(status)) if !is_unreachable(&status) => {
                    return Err(StoreError::Backend(format!(
                        "etcd {what} at {endpoint}: {}",
                        status.message()
                    )));
                }
                Ok(Err(status)) => {
                    failures.push(format!("{endpoint}: {}", describe(&status)));
                    !never_sent(&status)
                }
                Err(_) => {
                    failures.push(format!(
                        "{endpoint}: no answer within {} s",
                        CALL_TIMEOUT.as_secs()
                    ));
                    true
                }
            };
            self.forget(index);
            if sent && resend == Resend::IfNeverSent {
                break;
            }
        }
        Err(StoreError::Unreachable(format!(
            "etcd {what}: {}",
            failures.join("; ")
        )))
    }

    /// The channel to endpoint `index`, connecting if there is none.
    async fn channel(&self, index: usize) -> Result<Channel, String> {
        {
            let current = lock(&self.current);
            if current.preferred == index {
                if let Some(channel) = &current.channel {
                    return Ok(channel.clone());
                }
            }
        }
        let endpoint = Endpoint::from_shared(self.endpoints[index].clone())
            .map_err(|e| format!("bad endpoint URL: {e}"))?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true);
        let channel = match tokio::time::timeout(CONNECT_TIMEOUT, endpoint.connect()).await {
            Ok(Ok(channel)) => channel,
            Ok(Err(e)) => return Err(format!("connecting: {}", describe(&e))),
            Err(_) => {
                return Err(format!(
                    "no connection within {} s",
                    CONNECT_TIMEOUT.as_secs()
                ))
            }
        };
        *lock(&self.current) = Current {
            preferred: index,
            channel: Some(channel.clone()),
        };
        Ok(channel)
    }

    /// Endpoint `index` failed: drop its channel, prefer the next one.
    fn forget(&self, index: usize) {
        let mut current = lock(&self.current);
        if current.preferred == index {
            current.preferred = (index + 1) % self.endpoints.len();
            current.channel = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::prefix_end;

    #[test]
    fn prefix_end_increments_the_last_byte_below_ff() {
        assert_eq!(prefix_end(b"/quiver/volume/"), b"/quiver/volume0".to_vec());
        assert_eq!(prefix_end(b"a\xff\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff"), vec![0]);
        assert_eq!(prefix_end(b""), vec![0]);
    }
}
