//! openraft's network over the fabric.
//!
//! A [`FabricNode`] runs one fabric worker as a task of the async runtime
//! Raft runs on (the task owns the worker and progresses it): outgoing Raft
//! RPCs are commands queued to that task, their answers come back through
//! oneshot channels; incoming Raft RPCs are handed to other tasks, which
//! answer through a [`Replier`]. Endpoints to peers are made on first use, on whichever
//! transport the fabric negotiates (verbs where both sides have RDMA).
//!
//! Messages: a 9-byte header names the RPC (append, vote, snapshot) and the
//! Raft group (copyset) it is for, so one fabric node carries every copyset
//! of a server. An AppendEntries goes as [`crate::append`] lays it out (its
//! fields in the header, the entries' data as the payload, a lone entry's
//! fabric buffer sent as it is); other requests and every answer are
//! bincode in the payload. The node carries a second service the same way,
//! the chunk service of [`crate::service`] (its own AM id): a chunkserver
//! has one fabric node for Raft between servers and for its clients.
//! Incoming payloads are handed on in the fabric buffer they arrived in. A fabric
//! failure to reach the peer (no connection, disconnect) is openraft's
//! `Unreachable` (it backs off); a timeout or a bad answer is `Network`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::io::unix::AsyncFd;

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{BasicNode, EntryPayload, Raft};
use quiver_fabric::arena::{Arena, ArenaConfig, Buf, SizeClass};
use quiver_fabric::{
    AmData, Completion, EndpointId, EndpointTransport, Payload, RpcError, RpcId, RpcReply,
    SendError, Sleep, Worker, WorkerConfig,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::append;
use crate::data::Data;
use crate::store::{DurableMark, TypeConfig};

/// Bytes of entry data one AppendEntries message carries at most: the
/// fabric's 1 MiB message.
const APPEND_BYTES_MAX: u64 = 1 << 20;

/// How many entries go in each message so none carries more than `max`
/// bytes of data (an entry larger than `max` travels alone) or more than
/// [`append::ENTRIES_MAX`] entries.
fn split_entries(sizes: impl IntoIterator<Item = u64>, max: u64) -> Vec<usize> {
    let mut parts = Vec::new();
    let (mut count, mut bytes) = (0usize, 0u64);
    for size in sizes {
        if count > 0 && (bytes + size > max || count == append::ENTRIES_MAX) {
            parts.push(count);
            (count, bytes) = (0, 0);
        }
        count += 1;
        bytes += size;
    }
    if count > 0 {
        parts.push(count);
    }
    parts
}

/// The services a [`FabricNode`] carries, each under its own AM id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    /// Raft RPCs between the servers of a copyset.
    Raft,
    /// The chunk service of [`crate::service`] (clients and snapshot fetch).
    Chunk,
}

impl Service {
    pub const ALL: [Service; 2] = [Service::Raft, Service::Chunk];

    pub fn am_id(self) -> u16 {
        match self {
            Service::Raft => 16,
            Service::Chunk => 17,
        }
    }
}

const KIND_APPEND: u8 = 1;
const KIND_VOTE: u8 = 2;
const KIND_SNAPSHOT: u8 = 3;
/// Header of an RPC of either service: kind, then group (u64 LE).
pub const HEADER_BYTES: usize = 9;

fn header(kind: u8, group: u64) -> [u8; HEADER_BYTES] {
    let mut h = [0u8; HEADER_BYTES];
    h[0] = kind;
    h[1..].copy_from_slice(&group.to_le_bytes());
    h
}

/// A Raft RPC's header: the service header, then the node it is for (u64
/// LE). A node answers an RPC for another node with an error: an address
/// can change hands (a server replaced, a port taken by another process
/// while its server restarts), and a Raft message must not reach a node
/// it was not meant for (a leader that gets its own vote back from a
/// leader elsewhere is a broken invariant in openraft).
fn raft_header(kind: u8, group: u64, target: u64) -> Vec<u8> {
    let mut h = header(kind, group).to_vec();
    h.extend_from_slice(&target.to_le_bytes());
    h
}

/// The Raft groups a node serves, by group id.
pub type Groups = Arc<std::sync::RwLock<HashMap<u64, Raft<TypeConfig>>>>;

/// Why a call to a peer failed, in fabric terms.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("cannot reach {addr}: {why}")]
    Unreachable { addr: SocketAddr, why: String },
    #[error("{0}")]
    Rpc(RpcError),
    #[error("the node's fabric task has stopped")]
    Stopped,
}

type Answer = tokio::sync::oneshot::Sender<Result<RpcReply, CallError>>;

/// An incoming payload as the runtime gets it: the fabric buffer itself,
/// unless its size class is more than half in use. A write's body is kept
/// until the entry it becomes is applied (and an eager body keeps its whole
/// receive buffer), so without this an unlucky mix (many large writes in
/// flight, a copyset that cannot commit) could hold every buffer of a class
/// and stop the node's receiving and sending; past half, bodies are copied
/// and their buffers return at once, as if there were no zero copy.
fn keep_or_copy(buf: Buf) -> Data {
    let class = buf.class_usage();
    if class.free * 2 < class.count {
        Data::from(&buf[..])
    } else {
        Data::Fabric(buf)
    }
}

/// A message's payload, as a task hands it to the fabric task.
enum Body {
    /// Copied by the fabric (inline when small, into its arena otherwise).
    Bytes(Vec<u8>),
    /// Sent from where it is.
    Buf(Buf),
    /// Sent from where they are, one after another (one payload).
    Gather(Vec<Buf>),
}

enum Cmd {
    Call {
        addr: SocketAddr,
        service: Service,
        header: Vec<u8>,
        body: Body,
        timeout: Duration,
        answer: Answer,
    },
    Transport {
        addr: SocketAddr,
        answer: tokio::sync::oneshot::Sender<Option<EndpointTransport>>,
    },
    Reply {
        ep: EndpointId,
        service: Service,
        reply_to: u64,
        header: Vec<u8>,
        body: Vec<u8>,
    },
    /// A request that could not be served at all (it did not decode).
    ReplyError {
        ep: EndpointId,
        service: Service,
        reply_to: u64,
        message: String,
    },
}

/// An incoming RPC for the runtime to serve.
pub struct Incoming {
    pub service: Service,
    pub kind: u8,
    pub group: u64,
    /// The header past kind and group (an AppendEntries' fields), copied.
    pub meta: Vec<u8>,
    /// The payload, in the fabric buffer it arrived in (see [`keep_or_copy`]).
    pub body: Data,
    pub reply: Replier,
}

/// Answers one incoming RPC from any thread.
pub struct Replier {
    ep: EndpointId,
    service: Service,
    reply_to: u64,
    link: Link,
}

impl Replier {
    pub fn send(self, body: Vec<u8>) {
        self.send_with_header(Vec::new(), body);
    }

    pub fn send_with_header(self, header: Vec<u8>, body: Vec<u8>) {
        self.link.push(Cmd::Reply {
            ep: self.ep,
            service: self.service,
            reply_to: self.reply_to,
            header,
            body,
        });
    }

    /// Answers that the request was malformed: the caller gets a remote
    /// error at once instead of waiting out its timeout.
    pub fn send_bad_request(self, message: String) {
        self.link.push(Cmd::ReplyError {
            ep: self.ep,
            service: self.service,
            reply_to: self.reply_to,
            message,
        });
    }
}

/// The way into a node's fabric task, from any thread.
#[derive(Clone)]
struct Link {
    cmds: tokio::sync::mpsc::UnboundedSender<Cmd>,
}

impl Link {
    fn push(&self, cmd: Cmd) -> bool {
        self.cmds.send(cmd).is_ok()
    }
}

/// One node's fabric worker, progressed by a task of the runtime that
/// started it: Raft, the chunk service and the fabric share the runtime's
/// threads, so handing a message between them is a task wake-up, not a
/// thread's (on a machine with few cores, every thread hop on a write's
/// path was a context switch and often a sleeping CPU's wake-up).
pub struct FabricNode {
    pub addr: SocketAddr,
    link: Link,
    stop: Arc<Stop>,
}

/// Tells the fabric task to end, and others that it has.
struct Stop {
    set: AtomicBool,
    notify: tokio::sync::Notify,
    /// True once the task has dropped the worker.
    ended: tokio::sync::watch::Sender<bool>,
}

impl Default for Stop {
    fn default() -> Stop {
        Stop {
            set: AtomicBool::new(false),
            notify: tokio::sync::Notify::new(),
            ended: tokio::sync::watch::Sender::new(false),
        }
    }
}

impl Stop {
    fn set(&self) {
        self.set.store(true, Ordering::Release);
        self.notify.notify_one();
    }

    fn is_set(&self) -> bool {
        self.set.load(Ordering::Acquire)
    }
}

impl FabricNode {
    /// Starts the worker listening on `listen`; incoming RPCs go to
    /// `inbound`. Call inside a Tokio runtime: the worker runs on it.
    pub fn start(
        listen: SocketAddr,
        config: WorkerConfig,
        inbound: tokio::sync::mpsc::UnboundedSender<Incoming>,
    ) -> anyhow::Result<FabricNode> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| anyhow::anyhow!("a fabric node starts inside a Tokio runtime"))?;
        let arena = Arena::new(&ArenaConfig {
            classes: vec![
                SizeClass {
                    buf_bytes: 4 << 10,
                    count: 512,
                },
                SizeClass {
                    buf_bytes: 64 << 10,
                    count: 512,
                },
                // Receive buffers (256 KiB by default), so that they do not
                // take the large class's slots. Every connection keeps one
                // and needs a second to roll over: with bodies kept in up to
                // half of them, this serves about 60 connections.
                SizeClass {
                    buf_bytes: 256 << 10,
                    count: 128,
                },
                SizeClass {
                    buf_bytes: 1 << 20,
                    count: 64,
                },
            ],
            huge_pages: false,
        })?;
        let mut worker = Worker::new(arena, config)?;
        let addr = worker.listen(listen)?;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let link = Link { cmds: tx };
        for service in Service::ALL {
            let handler_link = link.clone();
            let inbound = inbound.clone();
            worker.set_am_handler(
                service.am_id(),
                Box::new(move |ctx, m| {
                    let body = match m.data {
                        AmData::Eager(p) | AmData::Pulled(p) => keep_or_copy(p),
                        AmData::Rendezvous(desc) => {
                            if let Err(e) = ctx.pull_into_arena(desc) {
                                tracing::warn!(error = %e, ?service, "dropping an RPC");
                            }
                            return;
                        }
                        AmData::Aborted => return,
                    };
                    let (Some(h), Some(reply_to)) = (m.header.get(..HEADER_BYTES), m.reply_to)
                    else {
                        tracing::warn!(?service, "a message that is not an RPC of the service");
                        return;
                    };
                    let kind = h[0];
                    let group = u64::from_le_bytes(h[1..].try_into().expect("8 bytes"));
                    let meta = m.header[HEADER_BYTES..].to_vec();
                    let reply = Replier {
                        ep: ctx.endpoint(),
                        service,
                        reply_to,
                        link: handler_link.clone(),
                    };
                    let rpc = Incoming {
                        service,
                        kind,
                        group,
                        meta,
                        body,
                        reply,
                    };
                    if inbound.send(rpc).is_err() {
                        tracing::debug!("an RPC for a node that stopped");
                    }
                }),
            );
        }
        let fd = worker.poll_fd()?;
        let _entered = runtime.enter();
        // SAFETY: the AsyncFd owns the descriptor, so it stays open and the
        // same for the AsyncFd's whole life.
        let fd = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
            .map_err(std::io::Error::from)
            .context("waiting on the fabric worker from the runtime")?;
        let stop = Arc::new(Stop::default());
        let worker = TaskWorker {
            worker: Some(worker),
            stop: Arc::clone(&stop),
        };
        runtime.spawn(serve(worker, fd, rx, Arc::clone(&stop)));
        Ok(FabricNode { addr, link, stop })
    }

    /// Calls `kind` of `service` for `group` on the node at `addr` and waits
    /// for its answer.
    pub async fn call(
        &self,
        addr: SocketAddr,
        service: Service,
        (kind, group): (u8, u64),
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<RpcReply, CallError> {
        let header = header(kind, group).to_vec();
        self.call_with(addr, service, header, Body::Bytes(body), timeout)
            .await
    }

    /// [`FabricNode::call`] with a header (kind and group first) and a
    /// payload of the caller's making.
    async fn call_with(
        &self,
        addr: SocketAddr,
        service: Service,
        header: Vec<u8>,
        body: Body,
        timeout: Duration,
    ) -> Result<RpcReply, CallError> {
        let (answer, rx) = tokio::sync::oneshot::channel();
        if !self.link.push(Cmd::Call {
            addr,
            service,
            header,
            body,
            timeout,
            answer,
        }) {
            return Err(CallError::Stopped);
        }
        rx.await.unwrap_or(Err(CallError::Stopped))
    }
}

impl FabricNode {
    /// The transport of this node's endpoint to `addr`, if it has one.
    pub async fn transport_to(&self, addr: SocketAddr) -> Option<EndpointTransport> {
        let (answer, rx) = tokio::sync::oneshot::channel();
        if !self.link.push(Cmd::Transport { addr, answer }) {
            return None;
        }
        rx.await.ok().flatten()
    }

    /// Whether [`FabricNode::shutdown`] ran.
    pub fn is_shut_down(&self) -> bool {
        self.stop.is_set()
    }

    /// Stops the fabric task and waits for it: its connections are closed
    /// and its listener gone when this returns; calls fail from then on.
    pub async fn shutdown(&self) {
        self.stop.set();
        let mut ended = self.stop.ended.subscribe();
        // (The sender lives as long as `self`: this ends with the task.)
        let _ = ended.wait_for(|&ended| ended).await;
    }
}

impl Drop for FabricNode {
    fn drop(&mut self) {
        // The task ends at its next turn and closes the connections (await
        // `shutdown` to know they are closed).
        self.stop.set();
    }
}

/// Calls in flight and the endpoints to peers, kept by the fabric task.
#[derive(Default)]
struct Serving {
    peers: HashMap<SocketAddr, EndpointId>,
    calls: HashMap<(EndpointId, RpcId), Answer>,
}

impl Serving {
    /// Carries out one command from the runtime.
    fn carry_out(&mut self, worker: &mut Worker, cmd: Cmd) {
        match cmd {
            Cmd::Call {
                addr,
                service,
                header,
                body,
                timeout,
                answer,
            } => {
                let ep = match self.peers.get(&addr) {
                    Some(&ep) => ep,
                    None => match worker.connect(addr) {
                        Ok(ep) => {
                            self.peers.insert(addr, ep);
                            ep
                        }
                        Err(e) => {
                            let _ = answer.send(Err(CallError::Unreachable {
                                addr,
                                why: e.to_string(),
                            }));
                            return;
                        }
                    },
                };
                let bytes: Vec<u8>;
                let payload = match body {
                    Body::Bytes(b) => {
                        bytes = b;
                        Payload::Bytes(&bytes)
                    }
                    Body::Buf(b) => Payload::Buf(b),
                    Body::Gather(bufs) => Payload::Gather(bufs),
                };
                match worker.rpc_call(ep, service.am_id(), &header, payload, timeout) {
                    Ok(id) => {
                        self.calls.insert((ep, id), answer);
                    }
                    Err(e) => {
                        // A connection that is gone or broken goes; one
                        // that could not take this message stays.
                        if !matches!(
                            e,
                            SendError::NoMemory(_)
                                | SendError::TooLarge { .. }
                                | SendError::TooManyRpcs(_)
                        ) {
                            self.peers.remove(&addr);
                            worker.close(ep, "a send to it failed");
                        }
                        let _ = answer.send(Err(CallError::Unreachable {
                            addr,
                            why: e.to_string(),
                        }));
                    }
                }
            }
            Cmd::Transport { addr, answer } => {
                let t = self
                    .peers
                    .get(&addr)
                    .and_then(|&ep| worker.endpoint_transport(ep));
                let _ = answer.send(t);
            }
            Cmd::Reply {
                ep,
                service,
                reply_to,
                header,
                body,
            } => {
                let payload = Payload::Bytes(&body);
                match worker.reply(ep, service.am_id(), reply_to, &header, payload) {
                    Ok(()) => {}
                    // Tell the caller now rather than let it time out.
                    Err(e @ SendError::NoMemory(_)) => {
                        let code = quiver_fabric::rpc::NO_MEMORY;
                        let message = e.to_string();
                        let am_id = service.am_id();
                        if let Err(e) = worker.reply_error(ep, am_id, reply_to, code, &message) {
                            tracing::debug!(error = %e, "a reply to a peer that left");
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "a reply to a peer that left"),
                }
            }
            Cmd::ReplyError {
                ep,
                service,
                reply_to,
                message,
            } => {
                let code = quiver_fabric::rpc::BAD_REQUEST;
                if let Err(e) = worker.reply_error(ep, service.am_id(), reply_to, code, &message) {
                    tracing::debug!(error = %e, "a reply to a peer that left");
                }
            }
        }
    }

    /// Resolves answered calls and forgets closed endpoints.
    fn resolve(&mut self, worker: &mut Worker) {
        while let Some(c) = worker.poll_completion() {
            match c {
                Completion::Rpc { ep, id, result } => {
                    if let Some(answer) = self.calls.remove(&(ep, id)) {
                        let _ = answer.send(result.map_err(CallError::Rpc));
                    }
                }
                Completion::Closed { ep, reason } => {
                    tracing::debug!(?reason, "a Raft peer connection closed");
                    self.peers.retain(|_, e| *e != ep);
                }
                Completion::Send { .. } | Completion::Established { .. } => {}
            }
        }
    }
}

/// The fabric task: carries out commands, progresses the worker, resolves
/// answered calls, and when nothing is left waits on the worker's poll
/// descriptor (so an idle node costs nothing), a command, or the worker's
/// next deadline. After each round that did work it yields, so the tasks
/// its messages woke run before it polls again.
async fn serve(
    mut worker: TaskWorker,
    fd: AsyncFd<OwnedFd>,
    mut cmds: tokio::sync::mpsc::UnboundedReceiver<Cmd>,
    stop: Arc<Stop>,
) {
    let mut serving = Serving::default();
    while !stop.is_set() {
        while let Ok(cmd) = cmds.try_recv() {
            serving.carry_out(&mut worker, cmd);
        }
        let next = worker.progress_or_sleep();
        serving.resolve(&mut worker);
        let timeout = match next {
            Sleep::NotYet => {
                yield_to_others().await;
                continue;
            }
            Sleep::For(timeout) => timeout,
        };
        let deadline = async {
            match timeout {
                Some(t) => tokio::time::sleep(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            _ = stop.notify.notified() => {}
            cmd = cmds.recv() => match cmd {
                Some(cmd) => {
                    worker.woke();
                    serving.carry_out(&mut worker, cmd);
                }
                // Impossible while the node lives: it holds a sender.
                None => break,
            },
            ready = fd.readable() => match ready {
                // Cleared before the next round takes the events: one that
                // comes after this sets it again.
                Ok(mut guard) => {
                    guard.clear_ready();
                    worker.woke();
                }
                Err(e) => {
                    tracing::error!(error = %e, "waiting on the fabric's poll descriptor failed");
                    break;
                }
            },
            _ = deadline => {}
        }
    }
    // The worker goes with this task, closing the connections.
}

/// The fabric task's worker. Dropped (`serve` returned, or its runtime
/// dropped the task, polled or not), it drops the worker first, closing its
/// connections and listener, and then says the task has ended: calls fail
/// from then on, and the node says it is shut down.
struct TaskWorker {
    worker: Option<Worker>,
    stop: Arc<Stop>,
}

impl std::ops::Deref for TaskWorker {
    type Target = Worker;

    fn deref(&self) -> &Worker {
        self.worker.as_ref().expect("a worker until dropped")
    }
}

impl std::ops::DerefMut for TaskWorker {
    fn deref_mut(&mut self) -> &mut Worker {
        self.worker.as_mut().expect("a worker until dropped")
    }
}

impl Drop for TaskWorker {
    fn drop(&mut self) {
        drop(self.worker.take());
        self.stop.set();
        self.stop.ended.send_replace(true);
    }
}

/// Lets the runtime run the tasks this one woke, then goes on: the task
/// wakes itself, so it is queued behind them. tokio's `yield_now` instead
/// defers the wake until the worker parks: a zero-timeout turn of the IO
/// driver per yield, and on a multi-thread runtime a wake held by a worker
/// that a blocking task may then hold (queued, any worker can take it).
async fn yield_to_others() {
    let mut yielded = false;
    std::future::poll_fn(|cx| {
        if yielded {
            return std::task::Poll::Ready(());
        }
        yielded = true;
        cx.waker().wake_by_ref();
        std::task::Poll::Pending
    })
    .await
}

/// Serves incoming Raft RPCs with the node's `groups` until the fabric node
/// stops (a node that carries only Raft).
pub async fn serve_raft(
    node_id: u64,
    groups: Groups,
    mut inbound: tokio::sync::mpsc::UnboundedReceiver<Incoming>,
) {
    while let Some(rpc) = inbound.recv().await {
        handle_raft(node_id, &groups, rpc);
    }
}

/// Serves one incoming Raft RPC for node `node_id` on its own task. An RPC
/// for a group the node does not host goes unanswered (the caller times out
/// and retries, as for a node that is down); one for another node is
/// refused (see [`raft_header`]).
pub fn handle_raft(node_id: u64, groups: &Groups, rpc: Incoming) {
    let target = rpc
        .meta
        .get(..8)
        .map(|t| u64::from_le_bytes(t.try_into().expect("8 bytes")));
    if target != Some(node_id) {
        tracing::warn!(
            group = rpc.group,
            ?target,
            node_id,
            "a Raft RPC for another node: refused"
        );
        rpc.reply
            .send_bad_request(format!("this is node {node_id}, not node {target:?}"));
        return;
    }
    let raft = groups.read().expect("groups lock").get(&rpc.group).cloned();
    let Some(raft) = raft else {
        tracing::debug!(
            group = rpc.group,
            "a Raft RPC for a group this node does not host"
        );
        return;
    };
    tokio::spawn(async move {
        let Incoming {
            kind,
            meta,
            body,
            reply,
            ..
        } = rpc;
        let answered = match kind {
            // Past the target node, checked above.
            KIND_APPEND => match append::decode_request(&meta[8..], &body) {
                Ok(request) => {
                    // The entries hold what they need of the buffer.
                    drop(body);
                    let result = raft.append_entries(request).await;
                    bincode::serialize(&result).map_err(|e| e.to_string())
                }
                Err(e) => Err(e.to_string()),
            },
            KIND_VOTE => answer(&body, |r| raft.vote(r)).await,
            KIND_SNAPSHOT => {
                // An install runs for as long as its chunk data take to
                // fetch: not in a fabric buffer all that time.
                let body = body.to_vec();
                answer(&body, |r| raft.install_snapshot(r)).await
            }
            other => Err(format!("unknown Raft RPC kind {other}")),
        };
        match answered {
            Ok(answer) => reply.send(answer),
            Err(why) => {
                tracing::warn!(error = %why, "an undecodable Raft RPC");
                reply.send_bad_request(why);
            }
        }
    });
}

async fn answer<Req, Resp, E, F, Fut>(body: &[u8], f: F) -> Result<Vec<u8>, String>
where
    Req: DeserializeOwned,
    Resp: Serialize,
    E: Serialize,
    F: FnOnce(Req) -> Fut,
    Fut: std::future::Future<Output = Result<Resp, E>>,
{
    let request = bincode::deserialize(body).map_err(|e| e.to_string())?;
    let result = f(request).await;
    bincode::serialize(&result).map_err(|e| e.to_string())
}

/// Creates [`PeerClient`]s for openraft.
#[derive(Clone)]
pub struct Network {
    node: Arc<FabricNode>,
    group: u64,
    log_durable: Option<DurableMark>,
}

impl Network {
    /// The network of Raft group `group`, over `node`.
    pub fn new(node: Arc<FabricNode>, group: u64) -> Network {
        Network {
            node,
            group,
            log_durable: None,
        }
    }

    /// The same, never telling followers an entry is committed before it is
    /// durable in this node's log (see `LogStore::ack_own_appends_early`).
    pub fn with_durable_mark(mut self, mark: DurableMark) -> Network {
        self.log_durable = Some(mark);
        self
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: u64, node: &BasicNode) -> PeerClient {
        PeerClient {
            node: Arc::clone(&self.node),
            group: self.group,
            target,
            addr: node.addr.parse().ok(),
            addr_text: node.addr.clone(),
            log_durable: self.log_durable.clone(),
        }
    }
}

/// One peer, as openraft talks to it.
pub struct PeerClient {
    node: Arc<FabricNode>,
    group: u64,
    target: u64,
    addr: Option<SocketAddr>,
    addr_text: String,
    log_durable: Option<DurableMark>,
}

impl PeerClient {
    async fn call<Req, Resp, E>(
        &self,
        kind: u8,
        request: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<u64, BasicNode, RaftError<u64, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let body =
            bincode::serialize(request).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let header = raft_header(kind, self.group, self.target);
        self.call_with(header, Body::Bytes(body), option).await
    }

    /// Sends one AppendEntries: entries' data in fabric buffers are the
    /// payload as they are (the transport gathers several); data read back
    /// from disk (a follower catching up) or made here are copied into one.
    async fn call_append(
        &self,
        rpc: &AppendEntriesRequest<TypeConfig>,
        option: &RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        let encoded = append::encode_request(rpc);
        let mut header = raft_header(KIND_APPEND, self.group, self.target);
        header.extend_from_slice(&encoded.header);
        let all_fabric = encoded
            .data
            .iter()
            .all(|d| d.is_empty() || d.fabric_buf().is_some());
        let body = if all_fabric {
            let mut bufs: Vec<Buf> = encoded
                .data
                .into_iter()
                .filter_map(|d| match d {
                    Data::Fabric(b) if !b.is_empty() => Some(b),
                    _ => None,
                })
                .collect();
            match bufs.len() {
                0 => Body::Bytes(Vec::new()),
                1 => Body::Buf(bufs.swap_remove(0)),
                _ => Body::Gather(bufs),
            }
        } else {
            let mut gathered = Vec::with_capacity(encoded.data_len());
            for d in &encoded.data {
                gathered.extend_from_slice(d);
            }
            Body::Bytes(gathered)
        };
        self.call_with(header, body, option).await
    }

    async fn call_with<Resp, E>(
        &self,
        header: Vec<u8>,
        body: Body,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<u64, BasicNode, RaftError<u64, E>>>
    where
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let addr = self.addr.ok_or_else(|| {
            RPCError::Unreachable(Unreachable::new(&CallError::Unreachable {
                addr: SocketAddr::from(([0, 0, 0, 0], 0)),
                why: format!("bad node address {:?}", self.addr_text),
            }))
        })?;
        let answer = self
            .node
            .call_with(addr, Service::Raft, header, body, option.hard_ttl())
            .await
            .map_err(|e| match e {
                CallError::Rpc(RpcError::Timeout) | CallError::Rpc(RpcError::BadMessage(_)) => {
                    RPCError::Network(NetworkError::new(&e))
                }
                _ => RPCError::Unreachable(Unreachable::new(&e)),
            })?;
        let result: Result<Resp, RaftError<u64, E>> = bincode::deserialize(&answer.payload)
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        mut rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        if rpc.entries.is_empty() {
            // A heartbeat, or (on a leader's every commit) the news of the
            // commit for a follower: behind whatever else this thread has
            // ready, such as the reply to the client whose write just
            // committed (openraft hands both out at once, this first; on
            // two vCPUs each message sent costs tens of microseconds).
            tokio::task::yield_now().await;
        }
        if let Some(mark) = &self.log_durable {
            rpc.leader_commit = mark.clamp(rpc.leader_commit);
        }
        // A batch over one fabric message goes as consecutive appends, each
        // starting where the last ended: the follower treats them as the
        // one append (it commits only up to what it holds), and the first
        // answer other than success is the answer.
        let sizes = rpc.entries.iter().map(|e| match &e.payload {
            EntryPayload::Normal(r) => r.body.len() as u64,
            // Small, except a membership's JSON: a generous bound.
            _ => 64 << 10,
        });
        let parts = split_entries(sizes, APPEND_BYTES_MAX);
        if parts.len() <= 1 {
            return self.call_append(&rpc, &option).await;
        }
        let AppendEntriesRequest {
            vote,
            mut prev_log_id,
            leader_commit,
            entries,
        } = rpc;
        let mut entries = entries.into_iter();
        for count in parts {
            let part: Vec<_> = entries.by_ref().take(count).collect();
            let last = part.last().map(|e| e.log_id);
            let request: AppendEntriesRequest<TypeConfig> = AppendEntriesRequest {
                vote,
                prev_log_id,
                leader_commit,
                entries: part,
            };
            match self.call_append(&request, &option).await? {
                AppendEntriesResponse::Success => prev_log_id = last,
                other => return Ok(other),
            }
        }
        Ok(AppendEntriesResponse::Success)
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<u64>,
        RPCError<u64, BasicNode, RaftError<u64, InstallSnapshotError>>,
    > {
        self.call(KIND_SNAPSHOT, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        self.call(KIND_VOTE, &rpc, &option).await
    }
}

#[cfg(test)]
mod tests {
    use super::split_entries;
    use crate::append::ENTRIES_MAX;

    #[test]
    fn entries_split_into_messages_under_the_limit() {
        let sizes = [100, 500, 300, 900, 50, 2000, 10];
        assert_eq!(split_entries(sizes, 1000), [3, 2, 1, 1]);
        assert_eq!(split_entries(sizes, 1 << 20), [7]);
        assert!(split_entries([], 1000).is_empty());
        let many = std::iter::repeat_n(0, 200);
        assert_eq!(split_entries(many, 1000), [ENTRIES_MAX, 200 - ENTRIES_MAX]);
    }
}
