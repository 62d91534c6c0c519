//! The progress engine: one [`Worker`] owns its endpoints, drives their protocol
//! state machines over TCP, runs active-message handlers, and polls adaptively.
//!
//! Like a UCX worker it is progressed by the thread that owns it (`progress`,
//! `wait_*`, `run`); nothing inside spawns threads. Polling policy: after any
//! work the worker keeps polling without sleeping for `spin` (a loopback round
//! trip fits inside it, so a busy connection never pays a wake-up); after that
//! it arms its completion queue (with verbs) and sleeps in `epoll_wait` until a
//! socket, a completion, a timer or a [`WorkerWaker`] wakes it, so an idle
//! worker costs no CPU.
//!
//! Transports: every endpoint starts as a TCP connection whose first bytes
//! choose its transport ([`crate::transport`]): verbs RDMA when both sides
//! have a device (the worker's [`VerbsPort`]: one registration of the arena,
//! one CQ, one shared receive queue), TCP otherwise, decided per endpoint.

use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasherDefault;
use std::io::{self, IoSlice, Read, Write};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use quiver_arena::{Arena, BufMut};

use crate::proto::{
    AmData, AmMessage, CloseReason, ConnConfig, ConnStats, Connection, Event, Payload, RndvDesc,
    RpcError, RpcId, RpcReply, SendError, SendId,
};
use crate::slab::Slab;
use crate::transport::{Negotiation, Outcome, Step, TransportChoice};
use crate::verbs::port::{self, QpPath, VerbsConfig, VerbsPort};
use crate::verbs::rc::Completion as WorkCompletion;

/// iovecs gathered per writev: enough for 32 frames with bodies.
const IOVECS_PER_WRITE_MAX: usize = 64;
/// Reads per endpoint per progress call, so one busy peer cannot starve others.
const READS_PER_PROGRESS_MAX: usize = 16;
/// Writes per endpoint per progress call, for the same reason.
const WRITES_PER_PROGRESS_MAX: usize = 16;
/// epoll events taken per poll.
const POLL_EVENTS_MAX: usize = 256;
/// Connections accepted per listener per progress call.
const ACCEPTS_PER_PROGRESS_MAX: usize = 64;
/// Token of the cross-thread waker.
const WAKER_TOKEN: Token = Token(usize::MAX);
/// Listener tokens count down from here; endpoint tokens are slab keys, far below.
const LISTENER_TOKEN_BASE: usize = usize::MAX - 1;
/// Token of the verbs completion channel (below the listeners' range).
const VERBS_TOKEN: Token = Token(LISTENER_TOKEN_BASE - 64);
/// The spin grows to at most this many times its configured length.
const SPIN_GROWTH_MAX: u32 = 16;
/// CQ polls per progress round, so receives cannot starve sockets.
const CQ_POLLS_PER_PROGRESS_MAX: usize = 8;
/// A spinning worker with at most this many endpoints polls their sockets directly.
const DIRECT_POLL_ENDPOINTS_MAX: usize = 4;
/// ...and still runs epoll once in this many rounds.
const DIRECT_POLLS_PER_EPOLL: u64 = 16;
/// How soon a worker whose reads wait for arena buffers looks again.
const MEMORY_RETRY: Duration = Duration::from_millis(1);
/// Error code sent back for an RPC to an AM id with no handler.
pub const NO_HANDLER: u32 = 0xffff_0001;

/// Settings of a worker.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Which transport endpoints use (see [`crate::transport`]).
    pub transport: TransportChoice,
    /// The verbs port, when the transport allows verbs.
    pub verbs: VerbsConfig,
    pub conn: ConnConfig,
    /// How long to keep polling without sleeping after the last work done.
    pub spin: Duration,
    /// Handler table size: AM ids are below this.
    pub am_ids_max: u16,
    /// Timeout of a TCP connect.
    pub connect_timeout: Duration,
    /// SO_SNDBUF for endpoints (None: the kernel's autotuning). The default
    /// 16 KiB start of autotuning splits every large message into several
    /// partial writes, each a syscall and a wait for writability.
    pub send_buffer_bytes: Option<usize>,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            transport: TransportChoice::Auto,
            verbs: VerbsConfig::default(),
            conn: ConnConfig::default(),
            spin: Duration::from_micros(200),
            am_ids_max: 256,
            connect_timeout: Duration::from_secs(5),
            send_buffer_bytes: Some(1 << 20),
        }
    }
}

/// Names one endpoint of a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EndpointId(u64);

/// What a worker reports to its owner.
#[derive(Debug)]
pub enum Completion {
    /// The hello exchange finished (connected or accepted).
    Established {
        ep: EndpointId,
    },
    Send {
        ep: EndpointId,
        id: SendId,
        result: Result<(), SendError>,
    },
    Rpc {
        ep: EndpointId,
        id: RpcId,
        result: Result<RpcReply, RpcError>,
    },
    Closed {
        ep: EndpointId,
        reason: CloseReason,
    },
}

/// Errors of the worker's own operations.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("{op} {addr}: {source}")]
    Io {
        op: &'static str,
        addr: SocketAddr,
        source: io::Error,
    },
    #[error("no such endpoint")]
    NoEndpoint,
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    #[error("endpoint closed: {0:?}")]
    Closed(CloseReason),
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("transport verbs: {0}")]
    Verbs(crate::verbs::VerbsUnavailable),
    #[error(transparent)]
    Send(#[from] SendError),
}

/// An active-message handler. It may keep the message's buffers; a rendezvous
/// it neither pulls nor rejects before returning is rejected for it.
pub type AmHandler = Box<dyn FnMut(&mut AmContext<'_>, AmMessage) + Send>;

/// What a handler can do while it runs.
pub struct AmContext<'a> {
    ep: EndpointId,
    endpoints: &'a mut Slab<Endpoint>,
    arena: &'a Arena,
    now: Instant,
    /// Set when the handler pulled or rejected the rendezvous it was given.
    answered: bool,
}

impl AmContext<'_> {
    /// The endpoint the message came on.
    pub fn endpoint(&self) -> EndpointId {
        self.ep
    }

    pub fn arena(&self) -> &Arena {
        self.arena
    }

    pub fn now(&self) -> Instant {
        self.now
    }

    fn conn(&mut self, ep: EndpointId) -> Result<&mut Connection, SendError> {
        self.endpoints
            .get_mut(ep.0)
            .map(|e| &mut e.conn)
            .ok_or(SendError::Disconnected)
    }

    /// Pulls a rendezvous payload into `target`; the handler runs again with
    /// [`AmData::Pulled`] when it has landed.
    pub fn pull(&mut self, desc: RndvDesc, target: BufMut) -> Result<(), SendError> {
        self.answered = true;
        let ep = self.ep;
        self.conn(ep)?.pull(desc, target)
    }

    /// Pulls a rendezvous payload into a fresh arena buffer of its size; with
    /// none free, declines it (the sender sees `Rejected`) and says so.
    pub fn pull_into_arena(&mut self, desc: RndvDesc) -> Result<(), SendError> {
        match self.arena.alloc(desc.len()) {
            Ok(target) => self.pull(desc, target),
            Err(e) => {
                self.reject(desc);
                Err(SendError::NoMemory(e.to_string()))
            }
        }
    }

    /// Declines a rendezvous payload.
    pub fn reject(&mut self, desc: RndvDesc) {
        self.answered = true;
        let ep = self.ep;
        if let Ok(conn) = self.conn(ep) {
            conn.reject(desc);
        }
    }

    /// Answers the RPC request `reply_to` on this endpoint.
    pub fn reply(
        &mut self,
        am_id: u16,
        reply_to: u64,
        header: &[u8],
        payload: Payload<'_>,
    ) -> Result<(), SendError> {
        let ep = self.ep;
        self.conn(ep)?.reply(am_id, reply_to, header, payload)
    }

    /// Answers the RPC request `reply_to` with an error.
    pub fn reply_error(
        &mut self,
        am_id: u16,
        reply_to: u64,
        code: u32,
        message: &str,
    ) -> Result<(), SendError> {
        let ep = self.ep;
        self.conn(ep)?.reply_error(am_id, reply_to, code, message)
    }

    /// Sends an active message on any endpoint of this worker.
    pub fn am_send(
        &mut self,
        ep: EndpointId,
        am_id: u16,
        header: &[u8],
        payload: Payload<'_>,
    ) -> Result<SendId, SendError> {
        self.conn(ep)?.am_send(am_id, header, payload)
    }
}

/// How an endpoint's frames travel.
enum Path {
    /// The transport exchange is running on the socket; `qp` is this side's
    /// queue pair when it offered verbs.
    Negotiating {
        exchange: Box<Negotiation>,
        qp: Option<QpPath>,
    },
    Tcp,
    /// Frames over the queue pair; the socket stays open, silent, to notice
    /// the peer's end.
    Verbs(QpPath),
}

/// The transport an endpoint runs over, as reported to users.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndpointTransport {
    Negotiating,
    Tcp,
    Verbs,
}

struct Endpoint {
    conn: Connection,
    path: Path,
    sock: TcpStream,
    peer: SocketAddr,
    /// Edge-triggered readiness not yet drained.
    readable: bool,
    writable: bool,
    /// The transport is gone; remove once events are drained.
    dead: bool,
}

impl Endpoint {
    /// The transport failed: the endpoint is dead, for this reason.
    fn fail(&mut self, reason: String) {
        self.dead = true;
        self.conn.handle_disconnect(CloseReason::Transport(reason));
    }

    /// The peer ended the connection (after our close, or on its own).
    fn peer_closed(&mut self) {
        let reason = if self.conn.is_closed() {
            "closed"
        } else {
            "peer closed the connection"
        };
        self.fail(reason.into());
    }
}

/// Wakes a worker sleeping in `progress` from another thread.
#[derive(Clone)]
pub struct WorkerWaker(Arc<mio::Waker>);

impl WorkerWaker {
    pub fn wake(&self) {
        if let Err(e) = self.0.wake() {
            tracing::warn!(error = %e, "waking the worker failed");
        }
    }
}

/// Counters of a worker, for metrics.
#[derive(Debug, Default, Clone, Copy)]
pub struct WorkerStats {
    /// Polls that did not sleep.
    pub spins: u64,
    /// Polls that slept.
    pub sleeps: u64,
    pub accepted: u64,
    pub closed_bad_frames: u64,
}

/// One progress engine and the endpoints it owns.
pub struct Worker {
    arena: Arena,
    config: WorkerConfig,
    poll: Poll,
    events: Events,
    waker: Arc<mio::Waker>,
    endpoints: Slab<Endpoint>,
    /// Keys of live endpoints, for iteration.
    live: Vec<u64>,
    listeners: Vec<TcpListener>,
    handlers: Vec<Option<AmHandler>>,
    completions: VecDeque<Completion>,
    last_work: Instant,
    /// How long to spin after work now (see `adapt_spin`).
    spin: Duration,
    /// Progress rounds so far.
    polls: u64,
    /// A read found no arena buffer in the last round (retry on a timer).
    memory_blocked: bool,
    stats: WorkerStats,
    /// Endpoint of each live queue pair number.
    qpns: HashMap<u32, u64, BuildHasherDefault<QpnHasher>>,
    work_completions: Vec<WorkCompletion>,
    /// Why this worker offers no verbs, when it does not.
    no_verbs_reason: String,
    /// Last, so every endpoint's queue pair is dropped before it.
    verbs: Option<VerbsPort>,
}

impl Worker {
    pub fn new(arena: Arena, config: WorkerConfig) -> Result<Worker, WorkerError> {
        config.conn.validate().map_err(WorkerError::Config)?;
        if arena.max_buf_bytes() < config.conn.rx_chunk_bytes {
            return Err(WorkerError::Config(format!(
                "the arena's largest buffer ({} bytes) is smaller than rx_chunk_bytes ({})",
                arena.max_buf_bytes(),
                config.conn.rx_chunk_bytes
            )));
        }
        let poll = Poll::new().map_err(|e| WorkerError::Config(format!("epoll: {e}")))?;
        let waker = mio::Waker::new(poll.registry(), WAKER_TOKEN)
            .map_err(|e| WorkerError::Config(format!("eventfd: {e}")))?;
        let (verbs, no_verbs_reason) = match config.transport {
            TransportChoice::Tcp => (None, "this side's transport is tcp".to_string()),
            choice => match VerbsPort::open(&arena, config.conn, &config.verbs) {
                Ok(port) => {
                    let fd = port.fd();
                    poll.registry()
                        .register(
                            &mut mio::unix::SourceFd(&fd),
                            VERBS_TOKEN,
                            Interest::READABLE,
                        )
                        .map_err(|e| {
                            WorkerError::Config(format!("epoll add of the CQ channel: {e}"))
                        })?;
                    (Some(port), String::new())
                }
                Err(e) if choice == TransportChoice::Verbs => return Err(WorkerError::Verbs(e)),
                Err(e) => {
                    tracing::info!(reason = %e, "no RDMA on this side; endpoints use TCP");
                    (None, format!("no RDMA on this side: {e}"))
                }
            },
        };
        Ok(Worker {
            arena,
            handlers: (0..config.am_ids_max).map(|_| None).collect(),
            spin: config.spin,
            config,
            poll,
            events: Events::with_capacity(POLL_EVENTS_MAX),
            waker: Arc::new(waker),
            endpoints: Slab::with_capacity(16),
            live: Vec::with_capacity(16),
            listeners: Vec::new(),
            completions: VecDeque::with_capacity(1024),
            last_work: Instant::now(),
            polls: 0,
            memory_blocked: false,
            stats: WorkerStats::default(),
            qpns: HashMap::default(),
            work_completions: Vec::with_capacity(32),
            no_verbs_reason,
            verbs,
        })
    }

    /// The RDMA device endpoints may use, or why there is none.
    pub fn verbs_device(&self) -> Result<&str, &str> {
        match &self.verbs {
            Some(port) => Ok(port.device_name()),
            None => Err(&self.no_verbs_reason),
        }
    }

    /// Which transport an endpoint runs over.
    pub fn endpoint_transport(&self, ep: EndpointId) -> Option<EndpointTransport> {
        self.endpoints.get(ep.0).map(|e| match e.path {
            Path::Negotiating { .. } => EndpointTransport::Negotiating,
            Path::Tcp => EndpointTransport::Tcp,
            Path::Verbs(_) => EndpointTransport::Verbs,
        })
    }

    pub fn arena(&self) -> &Arena {
        &self.arena
    }

    pub fn stats(&self) -> WorkerStats {
        self.stats
    }

    /// Protocol counters of an endpoint.
    pub fn endpoint_stats(&mut self, ep: EndpointId) -> Option<ConnStats> {
        self.endpoints.get_mut(ep.0).map(|e| e.conn.stats())
    }

    /// A handle other threads use to wake this worker.
    pub fn waker(&self) -> WorkerWaker {
        WorkerWaker(Arc::clone(&self.waker))
    }

    /// Installs the handler of `am_id`, replacing any earlier one.
    pub fn set_am_handler(&mut self, am_id: u16, handler: AmHandler) {
        assert!(
            am_id < self.config.am_ids_max,
            "AM id {am_id} beyond am_ids_max"
        );
        self.handlers[am_id as usize] = Some(handler);
    }

    /// Listens on `addr`; returns the bound address (port 0 picks one).
    pub fn listen(&mut self, addr: SocketAddr) -> Result<SocketAddr, WorkerError> {
        let io = |source| WorkerError::Io {
            op: "listen on",
            addr,
            source,
        };
        let mut listener = TcpListener::bind(addr).map_err(io)?;
        let token = Token(LISTENER_TOKEN_BASE - self.listeners.len());
        self.poll
            .registry()
            .register(&mut listener, token, Interest::READABLE)
            .map_err(io)?;
        let local = listener.local_addr().map_err(io)?;
        self.listeners.push(listener);
        tracing::info!(%local, "fabric listening");
        Ok(local)
    }

    /// Connects to `addr`; the endpoint is usable once [`Completion::Established`]
    /// arrives (or use [`Worker::connect_wait`]).
    pub fn connect(&mut self, addr: SocketAddr) -> Result<EndpointId, WorkerError> {
        let io = |source| WorkerError::Io {
            op: "connect to",
            addr,
            source,
        };
        let std_sock =
            std::net::TcpStream::connect_timeout(&addr, self.config.connect_timeout).map_err(io)?;
        std_sock.set_nonblocking(true).map_err(io)?;
        self.add_endpoint(TcpStream::from_std(std_sock), addr)
            .map_err(io)
    }

    /// Connects and waits for the hello exchange.
    pub fn connect_wait(
        &mut self,
        addr: SocketAddr,
        timeout: Duration,
    ) -> Result<EndpointId, WorkerError> {
        let ep = self.connect(addr)?;
        let deadline = Instant::now() + timeout;
        let mut outcome = None;
        self.progress_until(Some(deadline), |w| {
            outcome = w.take_completion(|c| match c {
                Completion::Established { ep: e } | Completion::Closed { ep: e, .. } => *e == ep,
                _ => false,
            });
            outcome.is_some()
        });
        match outcome {
            Some(Completion::Established { .. }) => Ok(ep),
            Some(Completion::Closed { reason, .. }) => Err(WorkerError::Closed(reason)),
            _ => Err(WorkerError::Timeout("the hello exchange")),
        }
    }

    fn add_endpoint(&mut self, sock: TcpStream, peer: SocketAddr) -> io::Result<EndpointId> {
        // Small frames must leave at once: latency over packet count.
        sock.set_nodelay(true)?;
        if let Some(bytes) = self.config.send_buffer_bytes {
            set_send_buffer(&sock, bytes)?;
        }
        let conn = Connection::new(self.arena.clone(), self.config.conn);
        let (local, qp) = match self.verbs.as_mut() {
            None => (Err(self.no_verbs_reason.clone()), None),
            Some(port) => match port.new_qp() {
                Ok((qp, offer)) => (Ok(offer), Some(qp)),
                Err(e) => {
                    tracing::warn!(%peer, error = %e, "no queue pair for this endpoint");
                    (
                        Err(format!("this side could not create a queue pair ({e})")),
                        None,
                    )
                }
            },
        };
        let exchange = Box::new(Negotiation::new(self.config.transport, local));
        let qpn = qp.as_ref().map(QpPath::qpn);
        let key = self.endpoints.insert(Endpoint {
            conn,
            path: Path::Negotiating { exchange, qp },
            sock,
            peer,
            readable: true,
            writable: true,
            dead: false,
        });
        let ep = self.endpoints.get_mut(key).expect("just inserted");
        let interest = Interest::READABLE | Interest::WRITABLE;
        if let Err(e) = self
            .poll
            .registry()
            .register(&mut ep.sock, Token(key as usize), interest)
        {
            if let Some(Endpoint {
                path: Path::Negotiating { qp: Some(qp), .. },
                ..
            }) = self.endpoints.remove(key).as_mut()
            {
                retire_qp(self.verbs.as_mut(), qp);
            }
            return Err(e);
        }
        if let Some(qpn) = qpn {
            // Known from the start: the peer may send on it before this side
            // has read the peer's ready byte.
            self.qpns.insert(qpn, key);
        }
        self.live.push(key);
        self.flush(key);
        Ok(EndpointId(key))
    }

    /// Closes an endpoint in order: a Close frame, then the socket.
    pub fn close(&mut self, ep: EndpointId, reason: &str) {
        if let Some(e) = self.endpoints.get_mut(ep.0) {
            e.conn.close(reason);
        }
        self.flush(ep.0);
        self.dispatch(ep.0);
    }

    /// Sends an active message; a [`Completion::Send`] follows.
    pub fn am_send(
        &mut self,
        ep: EndpointId,
        am_id: u16,
        header: &[u8],
        payload: Payload<'_>,
    ) -> Result<SendId, SendError> {
        let e = self
            .endpoints
            .get_mut(ep.0)
            .ok_or(SendError::Disconnected)?;
        let id = e.conn.am_send(am_id, header, payload)?;
        self.flush(ep.0);
        Ok(id)
    }

    /// Answers RPC request `reply_to` that arrived on `ep` after its handler
    /// returned (a reply computed elsewhere, e.g. on an async runtime).
    pub fn reply(
        &mut self,
        ep: EndpointId,
        am_id: u16,
        reply_to: u64,
        header: &[u8],
        payload: Payload<'_>,
    ) -> Result<(), SendError> {
        self.on_endpoint(ep, |conn| conn.reply(am_id, reply_to, header, payload))
    }

    /// Answers RPC request `reply_to` that arrived on `ep` with an error,
    /// after its handler returned.
    pub fn reply_error(
        &mut self,
        ep: EndpointId,
        am_id: u16,
        reply_to: u64,
        code: u32,
        message: &str,
    ) -> Result<(), SendError> {
        self.on_endpoint(ep, |conn| conn.reply_error(am_id, reply_to, code, message))
    }

    /// Queues something on `ep`'s connection and writes it out.
    fn on_endpoint(
        &mut self,
        ep: EndpointId,
        queue: impl FnOnce(&mut Connection) -> Result<(), SendError>,
    ) -> Result<(), SendError> {
        let e = self
            .endpoints
            .get_mut(ep.0)
            .ok_or(SendError::Disconnected)?;
        queue(&mut e.conn)?;
        self.flush(ep.0);
        Ok(())
    }

    /// Calls a remote handler; a [`Completion::Rpc`] follows.
    pub fn rpc_call(
        &mut self,
        ep: EndpointId,
        am_id: u16,
        header: &[u8],
        payload: Payload<'_>,
        timeout: Duration,
    ) -> Result<RpcId, SendError> {
        let now = Instant::now();
        let e = self
            .endpoints
            .get_mut(ep.0)
            .ok_or(SendError::Disconnected)?;
        let id = e.conn.rpc_call(now, am_id, header, payload, timeout)?;
        self.flush(ep.0);
        Ok(id)
    }

    /// Calls and waits for the response.
    pub fn rpc_call_wait(
        &mut self,
        ep: EndpointId,
        am_id: u16,
        header: &[u8],
        payload: Payload<'_>,
        timeout: Duration,
    ) -> Result<RpcReply, RpcError> {
        let id = self.rpc_call(ep, am_id, header, payload, timeout)?;
        self.wait_rpc(ep, id)
    }

    /// Progresses until RPC `id` completes (its own deadline bounds the wait).
    pub fn wait_rpc(&mut self, ep: EndpointId, id: RpcId) -> Result<RpcReply, RpcError> {
        let mut outcome = None;
        self.progress_until(None, |w| {
            outcome = w.take_completion(|c| match c {
                Completion::Rpc { ep: e, id: i, .. } => *e == ep && *i == id,
                Completion::Closed { ep: e, .. } => *e == ep,
                _ => false,
            });
            outcome.is_some()
        });
        match outcome {
            Some(Completion::Rpc { result, .. }) => result,
            _ => Err(RpcError::Disconnected),
        }
    }

    /// The oldest completion, if any.
    pub fn poll_completion(&mut self) -> Option<Completion> {
        self.completions.pop_front()
    }

    /// Whether completions are waiting.
    pub fn has_completions(&self) -> bool {
        !self.completions.is_empty()
    }

    /// Removes and returns the first completion matching `pred`.
    fn take_completion(&mut self, pred: impl Fn(&Completion) -> bool) -> Option<Completion> {
        let index = self.completions.iter().position(pred)?;
        self.completions.remove(index)
    }

    /// Does all work that is ready, without sleeping; returns how much was done.
    pub fn progress(&mut self) -> usize {
        self.progress_once(Some(Duration::ZERO), Instant::now(), true)
    }

    /// The epoll descriptor every source of the worker's work is registered
    /// in (sockets, listeners, the completion channel, the waker): readable
    /// when one has an event, so an async runtime can wait on it in place of
    /// the worker's own sleep (see [`Worker::progress_or_sleep`]).
    ///
    /// This is a duplicate of the descriptor (the same epoll instance), the
    /// caller's to own: it stays valid however long the caller keeps it.
    pub fn poll_fd(&self) -> io::Result<OwnedFd> {
        // SAFETY: the Poll owns the descriptor and outlives this borrow.
        let fd = unsafe { BorrowedFd::borrow_raw(self.poll.as_raw_fd()) };
        fd.try_clone_to_owned()
    }

    /// One round for a caller that waits on [`Worker::poll_fd`] itself, as
    /// [`Worker::progress_until`] would do it, and whether to wait next and
    /// for how long (the earliest RPC deadline or memory retry). While the
    /// spin since the last work lasts, a spinning round and not yet; after
    /// it, one full round that takes every pending epoll event (one left
    /// behind would not wake the caller again), then the completion queue is
    /// armed and polled once more, and a wait unless any of it found work.
    pub fn progress_or_sleep(&mut self) -> Sleep {
        let now = Instant::now();
        if now.duration_since(self.last_work) < self.spin {
            self.stats.spins += 1;
            if self.progress_once(Some(Duration::ZERO), now, true) > 0 {
                self.last_work = now;
            }
            return Sleep::NotYet;
        }
        // The round first: it clears `memory_blocked`, which a failed arming sets.
        let mut work = self.progress_once(Some(Duration::ZERO), now, false);
        // A full event list may have left events behind: take them first.
        let events_left = self.events.iter().count() >= POLL_EVENTS_MAX;
        work += self.arm_verbs(now);
        if work > 0 || events_left {
            self.last_work = now;
            return Sleep::NotYet;
        }
        self.stats.sleeps += 1;
        Sleep::For(self.sleep_timeout(now, None))
    }

    /// For the same caller: its wait on [`Worker::poll_fd`] ended with an
    /// event. The spin adapts to the gap since the last work, as after the
    /// worker's own sleep (see `adapt_spin`).
    pub fn woke(&mut self) {
        let now = Instant::now();
        self.adapt_spin(now.duration_since(self.last_work));
        self.last_work = now;
    }

    /// Progresses until `done` says so or `deadline` passes, spinning while
    /// there is work and sleeping when there is none. Returns whether `done`.
    pub fn progress_until(
        &mut self,
        deadline: Option<Instant>,
        mut done: impl FnMut(&mut Worker) -> bool,
    ) -> bool {
        loop {
            if done(self) {
                return true;
            }
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                return false;
            }
            let spinning = now.duration_since(self.last_work) < self.spin;
            let timeout = if spinning {
                self.stats.spins += 1;
                Some(Duration::ZERO)
            } else {
                self.stats.sleeps += 1;
                self.sleep_timeout(now, deadline)
            };
            // One clock read per spinning round: under emulation each read
            // can be a microsecond-long syscall.
            if self.progress_once(timeout, now, true) > 0 {
                if spinning {
                    self.last_work = now;
                } else {
                    let woke = Instant::now();
                    self.adapt_spin(woke.duration_since(self.last_work));
                    self.last_work = woke;
                }
            }
        }
    }

    /// After sleeping, work came `gap` after the last: if a little more
    /// spinning would have caught it (the peer answers just slower than the
    /// spin, e.g. because it slept too and paid a wake-up), spin that long
    /// from now on, up to [`SPIN_GROWTH_MAX`] times the configured spin; a
    /// longer gap means idleness, and the spin returns to its configured
    /// length. Without this, two peers whose wake-up costs more than the spin
    /// lock each other into sleeping on every message.
    fn adapt_spin(&mut self, gap: Duration) {
        self.spin = next_spin(self.config.spin, gap);
    }

    /// Serves until `stop` returns true; wake the worker after setting it.
    pub fn run(&mut self, mut stop: impl FnMut() -> bool) {
        self.progress_until(None, |w| {
            // Completions of a server nobody reads would pile up.
            w.completions.clear();
            stop()
        });
    }

    /// About to sleep: arms the completion queue, then polls it once more, as
    /// a completion between the last poll and the arming raises no event.
    /// Returns the work that poll found.
    fn arm_verbs(&mut self, now: Instant) -> usize {
        let Some(port) = self.verbs.as_mut() else {
            return 0;
        };
        if let Err(e) = port.arm() {
            tracing::error!(error = %e, "arming the completion queue failed");
            // Retry on the memory timer rather than sleep unarmed for good.
            self.memory_blocked = true;
        }
        self.poll_verbs(now)
    }

    /// How long the next poll may sleep: until the caller's deadline or the
    /// earliest RPC deadline, whichever is first.
    fn sleep_timeout(&mut self, now: Instant, deadline: Option<Instant>) -> Option<Duration> {
        let mut earliest = deadline;
        if self.memory_blocked {
            let retry = now + MEMORY_RETRY;
            earliest = Some(earliest.map_or(retry, |d| d.min(retry)));
        }
        for &key in &self.live {
            if let Some(t) = self
                .endpoints
                .get_mut(key)
                .and_then(|e| e.conn.poll_timeout())
            {
                earliest = Some(earliest.map_or(t, |d| d.min(t)));
            }
        }
        earliest.map(|t| t.saturating_duration_since(now))
    }

    /// One round; `now` is the caller's clock reading, taken again only after
    /// a sleep.
    /// `direct`: a spinning round may try the sockets of a few endpoints
    /// directly instead of asking epoll.
    fn progress_once(
        &mut self,
        mut timeout: Option<Duration>,
        mut now: Instant,
        direct: bool,
    ) -> usize {
        let mut work = 0;
        self.memory_blocked = false;
        self.polls = self.polls.wrapping_add(1);
        if timeout != Some(Duration::ZERO) && self.verbs.is_some() {
            let found = self.arm_verbs(now);
            if found > 0 {
                work += found;
                timeout = Some(Duration::ZERO);
            } else if self.memory_blocked {
                timeout = Some(MEMORY_RETRY);
            }
        }
        let spinning = timeout == Some(Duration::ZERO);
        if spinning
            && direct
            && self.live.len() <= DIRECT_POLL_ENDPOINTS_MAX
            && !self.polls.is_multiple_of(DIRECT_POLLS_PER_EPOLL)
        {
            // With few endpoints, a spinning worker tries their sockets directly:
            // one recv that says EAGAIN is cheaper than an epoll_wait, and this
            // is the hot loop of a latency-bound connection. Every few rounds
            // epoll still runs, for listeners, the waker and writability.
            for &key in &self.live {
                if let Some(e) = self.endpoints.get_mut(key) {
                    // A verbs endpoint's socket only ever reports its end:
                    // epoll's turn notices that; its frames come from the CQ.
                    e.readable |= !matches!(e.path, Path::Verbs(_));
                    // Same for a blocked writer: try instead of waiting for the edge.
                    e.writable |= e.conn.wants_transmit();
                }
            }
            self.events.clear();
        } else if let Err(e) = self.poll.poll(&mut self.events, timeout) {
            if e.kind() != io::ErrorKind::Interrupted {
                tracing::error!(error = %e, "epoll_wait failed");
            }
        }
        let mut accept_from = 0u64;
        for event in self.events.iter() {
            let token = event.token();
            if token == WAKER_TOKEN {
                work += 1;
            } else if token == VERBS_TOKEN {
                if let Some(port) = self.verbs.as_mut() {
                    port.take_event();
                }
            } else if token.0 > LISTENER_TOKEN_BASE - 64 {
                accept_from |= 1 << (LISTENER_TOKEN_BASE - token.0);
            } else if let Some(e) = self.endpoints.get_mut(token.0 as u64) {
                e.readable |= event.is_readable() || event.is_read_closed() || event.is_error();
                e.writable |= event.is_writable() || event.is_error();
            }
        }
        for index in 0..self.listeners.len().min(64) {
            if accept_from & (1 << index) != 0 {
                work += self.accept(index);
            }
        }
        if !spinning {
            now = Instant::now();
        }
        work += self.poll_verbs(now);
        for i in 0..self.live.len() {
            let key = self.live[i];
            if let Some(Endpoint {
                path: Path::Verbs(qp),
                ..
            }) = self.endpoints.get_mut(key)
            {
                if !qp.pending.is_empty() {
                    // Receives held back while the arena was exhausted.
                    self.deliver_verbs(key, now);
                }
            }
            work += self.read(key, now);
            if let Some(e) = self.endpoints.get_mut(key) {
                if e.conn.poll_timeout().is_some_and(|t| t <= now) {
                    e.conn.handle_timeout(now);
                }
            }
            work += self.dispatch(key);
            self.flush(key);
        }
        self.reap();
        work
    }

    fn accept(&mut self, index: usize) -> usize {
        let mut accepted = 0;
        for _ in 0..ACCEPTS_PER_PROGRESS_MAX {
            match self.listeners[index].accept() {
                Ok((sock, peer)) => {
                    if let Err(e) = self.add_endpoint(sock, peer) {
                        tracing::warn!(%peer, error = %e, "dropping an accepted connection");
                        continue;
                    }
                    tracing::debug!(%peer, "accepted");
                    self.stats.accepted += 1;
                    accepted += 1;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    break;
                }
            }
        }
        accepted
    }

    /// Reads what the socket has: the transport exchange's bytes, then the
    /// frame stream (TCP) or, on a verbs endpoint, only the socket's end.
    /// Returns reads done.
    fn read(&mut self, key: u64, now: Instant) -> usize {
        let mut reads = 0;
        let Some(e) = self.endpoints.get_mut(key) else {
            return 0;
        };
        if matches!(e.path, Path::Negotiating { .. }) {
            reads += self.read_exchange(key);
        }
        let Some(e) = self.endpoints.get_mut(key) else {
            return reads;
        };
        if !e.readable || e.dead {
            return reads;
        }
        match e.path {
            Path::Negotiating { .. } => reads,
            Path::Verbs(_) => reads + read_verbs_socket(e),
            Path::Tcp => reads + self.read_stream(key, now),
        }
    }

    /// Reads the peer's side of the transport exchange, never past it.
    fn read_exchange(&mut self, key: u64) -> usize {
        let mut reads = 0;
        if let Some(e) = self.endpoints.get_mut(key) {
            while e.readable && !e.dead {
                let Path::Negotiating { exchange, .. } = &mut e.path else {
                    break;
                };
                let space = exchange.recv_space();
                if space.is_empty() {
                    break;
                }
                match e.sock.read(space) {
                    Ok(0) => {
                        e.fail(
                            "the peer closed the connection during the transport exchange".into(),
                        );
                    }
                    Ok(n) => {
                        reads += 1;
                        if let Err(err) = exchange.handle_recv(n) {
                            tracing::warn!(peer = %e.peer, error = %err, "closing a connection that broke the transport exchange");
                            self.stats.closed_bad_frames += 1;
                            e.fail(err.to_string());
                        }
                    }
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => e.readable = false,
                    Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                    Err(err) => {
                        e.fail(err.to_string());
                    }
                }
            }
        }
        self.advance_exchange(key);
        reads
    }

    /// Writes the exchange's bytes and acts on its steps until it waits or ends.
    fn advance_exchange(&mut self, key: u64) {
        loop {
            let Some(e) = self.endpoints.get_mut(key) else {
                return;
            };
            let Path::Negotiating { exchange, qp } = &mut e.path else {
                return;
            };
            while e.writable && !e.dead && !exchange.to_send().is_empty() {
                match e.sock.write(exchange.to_send()) {
                    Ok(n) => exchange.handle_sent(n),
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => e.writable = false,
                    Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                    Err(err) => {
                        e.dead = true;
                        e.conn
                            .handle_disconnect(CloseReason::Transport(err.to_string()));
                    }
                }
            }
            if e.dead {
                return;
            }
            match exchange.poll() {
                Step::Wait => return,
                Step::ConnectQp(peer) => {
                    let port = self.verbs.as_ref().expect("a queue pair implies a port");
                    let qp = qp.as_mut().expect("a verbs offer implies a queue pair");
                    let ok = match qp.connect(port.mtu(), &peer) {
                        Ok(()) => true,
                        Err(err) => {
                            tracing::warn!(peer = %e.peer, error = %err, "connecting the queue pair failed");
                            false
                        }
                    };
                    exchange.qp_connected(ok);
                }
                Step::Done(outcome) => {
                    let Path::Negotiating { qp, .. } = std::mem::replace(&mut e.path, Path::Tcp)
                    else {
                        unreachable!("matched above");
                    };
                    match outcome {
                        Outcome::Verbs(peer) => {
                            let qp = qp.expect("a verbs outcome implies a queue pair");
                            let port = self.verbs.as_ref().expect("and a port");
                            e.conn.enable_remote_read(port.rkey());
                            tracing::info!(peer = %e.peer, device = port.device_name(), qpn = qp.qpn(), peer_qpn = peer.qpn, "endpoint over verbs");
                            e.path = Path::Verbs(qp);
                        }
                        Outcome::Tcp(reason) => {
                            if let Some(mut qp) = qp {
                                self.qpns.remove(&qp.qpn());
                                retire_qp(self.verbs.as_mut(), &mut qp);
                            }
                            tracing::info!(peer = %e.peer, %reason, "endpoint over TCP");
                        }
                        Outcome::Refused(reason) => {
                            if let Some(mut qp) = qp {
                                self.qpns.remove(&qp.qpn());
                                retire_qp(self.verbs.as_mut(), &mut qp);
                            }
                            tracing::warn!(peer = %e.peer, %reason, "endpoint refused");
                            e.fail(reason);
                        }
                    }
                    return;
                }
            }
        }
    }

    /// Reads the frame stream of a TCP endpoint, feeding the connection.
    fn read_stream(&mut self, key: u64, now: Instant) -> usize {
        let Some(e) = self.endpoints.get_mut(key) else {
            return 0;
        };
        let mut reads = 0;
        for _ in 0..READS_PER_PROGRESS_MAX {
            let Some(space) = e.conn.recv_space() else {
                // No arena buffer: leave the bytes in the kernel (TCP pushes
                // back). Epoll will not report these bytes again, so the worker
                // retries on a short timer until buffers come back.
                tracing::debug!(peer = %e.peer, "arena exhausted; receive paused");
                self.memory_blocked = true;
                break;
            };
            let offered = space.len();
            match e.sock.read(space) {
                Ok(0) => {
                    e.peer_closed();
                    break;
                }
                Ok(n) => {
                    reads += 1;
                    if let Err(err) = e.conn.handle_recv(now, n) {
                        tracing::warn!(peer = %e.peer, error = %err, "closing a connection that broke the protocol");
                        self.stats.closed_bad_frames += 1;
                        break;
                    }
                    if n < offered {
                        // A short read drained the socket; epoll (edge-triggered)
                        // reports the next arrival. Saves a read that would only
                        // say EAGAIN, on every message (as tokio does).
                        e.readable = false;
                        break;
                    }
                }
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                    e.readable = false;
                    break;
                }
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => {
                    e.fail(err.to_string());
                    break;
                }
            }
        }
        reads
    }

    /// Sends what the endpoint has queued, on whichever path it has.
    fn flush(&mut self, key: u64) {
        let Some(e) = self.endpoints.get_mut(key) else {
            return;
        };
        match &mut e.path {
            Path::Negotiating { .. } => self.advance_exchange(key),
            Path::Tcp => self.flush_stream(key),
            Path::Verbs(qp) => {
                if e.dead {
                    return;
                }
                let lkey = self
                    .verbs
                    .as_ref()
                    .expect("a verbs endpoint implies a port")
                    .lkey();
                if let Err(err) = qp.transmit(&mut e.conn, lkey) {
                    e.dead = true;
                    e.conn.handle_disconnect(CloseReason::Transport(format!(
                        "posting a SEND failed: {err}"
                    )));
                } else if e.conn.is_closed() && !e.conn.wants_transmit() && qp.quiet() {
                    // The Close frame has landed at the peer: now end the socket.
                    let _ = e.sock.shutdown(std::net::Shutdown::Write);
                }
            }
        }
    }

    /// Writes what a TCP connection has queued, as far as the socket takes it.
    fn flush_stream(&mut self, key: u64) {
        let Some(e) = self.endpoints.get_mut(key) else {
            return;
        };
        for _ in 0..WRITES_PER_PROGRESS_MAX {
            if e.dead || !e.writable || !e.conn.wants_transmit() {
                break;
            }
            let mut iov = [IoSlice::new(&[]); IOVECS_PER_WRITE_MAX];
            let n = e.conn.transmit_iovecs(&mut iov);
            match e.sock.write_vectored(&iov[..n]) {
                Ok(written) => {
                    let offered: usize = iov[..n].iter().map(|v| v.len()).sum();
                    e.conn.handle_transmitted(written);
                    if written < offered {
                        // The socket buffer is full; epoll reports when it drains.
                        e.writable = false;
                    }
                }
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => e.writable = false,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => {
                    e.fail(err.to_string());
                }
            }
        }
        if e.conn.is_closed() && !e.conn.wants_transmit() && !e.dead {
            // Orderly close finished: the Close frame is out.
            let _ = e.sock.shutdown(std::net::Shutdown::Write);
        }
    }

    /// Runs handlers and records completions for an endpoint's events.
    fn dispatch(&mut self, key: u64) -> usize {
        let ep = EndpointId(key);
        let mut handled = 0;
        while let Some(event) = self
            .endpoints
            .get_mut(key)
            .and_then(|e| e.conn.poll_event())
        {
            handled += 1;
            match event {
                Event::Established => self.completions.push_back(Completion::Established { ep }),
                Event::SendDone { id, result } => {
                    self.completions
                        .push_back(Completion::Send { ep, id, result })
                }
                Event::RpcDone { id, result } => {
                    self.completions
                        .push_back(Completion::Rpc { ep, id, result })
                }
                Event::Closed(reason) => {
                    let e = self
                        .endpoints
                        .get_mut(key)
                        .expect("its event was just taken");
                    tracing::debug!(peer = %e.peer, ?reason, "endpoint closed");
                    // Local and protocol closes still flush their Close frame.
                    if matches!(reason, CloseReason::Peer(_) | CloseReason::Transport(_)) {
                        e.dead = true;
                    }
                    self.completions
                        .push_back(Completion::Closed { ep, reason });
                }
                Event::Am(message) => self.run_handler(ep, message),
                Event::ReadRequest {
                    slot,
                    remote_addr,
                    rkey,
                    len,
                } => {
                    let Some(e) = self.endpoints.get_mut(key) else {
                        continue;
                    };
                    let Path::Verbs(qp) = &mut e.path else {
                        // Only verbs endpoints enable remote read; fail it cleanly.
                        tracing::error!(slot, "remote-read request on a TCP endpoint");
                        e.conn.handle_read_done(slot, false);
                        continue;
                    };
                    let lkey = self
                        .verbs
                        .as_ref()
                        .expect("a verbs endpoint implies a port")
                        .lkey();
                    if let Err(err) =
                        qp.post_read(&mut e.conn, slot, (remote_addr, rkey, len), lkey)
                    {
                        tracing::warn!(peer = %e.peer, error = %err, "posting an RDMA READ failed");
                        e.conn.handle_read_done(slot, false);
                    }
                }
            }
        }
        handled
    }

    fn run_handler(&mut self, ep: EndpointId, message: AmMessage) {
        let am_id = message.am_id;
        let rendezvous = match &message.data {
            AmData::Rendezvous(desc) => Some(desc.seq()),
            _ => None,
        };
        let Some(mut handler) = self.handlers.get_mut(am_id as usize).and_then(Option::take) else {
            let conn = &mut self
                .endpoints
                .get_mut(ep.0)
                .expect("dispatching endpoint")
                .conn;
            tracing::warn!(am_id, "no handler for active message");
            if let Some(reply_to) = message.reply_to {
                let _ = conn.reply_error(am_id, reply_to, NO_HANDLER, "no handler for this AM id");
            }
            if let Some(seq) = rendezvous {
                conn.reject_seq(seq);
            }
            return;
        };
        let mut ctx = AmContext {
            ep,
            endpoints: &mut self.endpoints,
            arena: &self.arena,
            now: Instant::now(),
            answered: false,
        };
        handler(&mut ctx, message);
        let answered = ctx.answered;
        self.handlers[am_id as usize] = Some(handler);
        if let (Some(seq), false) = (rendezvous, answered) {
            if let Some(e) = self.endpoints.get_mut(ep.0) {
                e.conn.reject_seq(seq);
            }
        }
    }

    /// Drops endpoints whose transport is gone and whose events are drained.
    /// A queue pair goes only once nothing of it is outstanding (a dead one is
    /// moved to the error state first, which flushes its work requests), so no
    /// completion arrives for a queue pair number that may be reused.
    fn reap(&mut self) {
        let endpoints = &mut self.endpoints;
        let registry = self.poll.registry();
        let qpns = &mut self.qpns;
        let mut verbs = self.verbs.as_mut();
        self.live.retain(|&key| {
            let Some(e) = endpoints.get_mut(key) else {
                return false;
            };
            let finished = e.dead || (e.conn.is_closed() && !e.conn.wants_transmit());
            if !finished {
                return true;
            }
            if e.conn.has_events() {
                return true;
            }
            if let Path::Verbs(qp) = &mut e.path {
                if !qp.quiet() {
                    // A dead QP's requests are flushed; so are a closed
                    // connection's unsignaled SENDs, which would otherwise
                    // wait for a signaled one that never comes.
                    if e.dead || (e.conn.is_closed() && qp.stalled()) {
                        qp.flush_outstanding();
                    }
                    return true;
                }
            }
            if let Path::Verbs(qp) | Path::Negotiating { qp: Some(qp), .. } = &mut e.path {
                qpns.remove(&qp.qpn());
                retire_qp(verbs.as_deref_mut(), qp);
            }
            let _ = registry.deregister(&mut e.sock);
            endpoints.remove(key);
            false
        });
    }

    /// Takes the completion queue's work: receives into their connections,
    /// finished SENDs and READs, failures as disconnects. Returns completions.
    fn poll_verbs(&mut self, now: Instant) -> usize {
        let mut work = 0;
        let mut wcs = std::mem::take(&mut self.work_completions);
        for _ in 0..CQ_POLLS_PER_PROGRESS_MAX {
            let Some(port) = self.verbs.as_mut() else {
                break;
            };
            match port.poll(&mut wcs) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => {
                    tracing::error!(error = %e, "polling the completion queue failed");
                    break;
                }
            }
            for wc in &wcs {
                work += 1;
                self.complete(*wc, now);
            }
        }
        self.work_completions = wcs;
        work
    }

    fn complete(&mut self, wc: WorkCompletion, now: Instant) {
        let (kind, index) = port::split_wr_id(wc.wr_id);
        let key = self.qpns.get(&wc.qp_num).copied();
        let what = match kind {
            port::KIND_RECV => {
                let index = index as usize;
                // A receive for an endpoint still in its exchange waits there
                // until the endpoint runs over verbs.
                let queued = match (key, wc.status) {
                    (Some(key), 0) => match self.endpoints.get_mut(key) {
                        Some(Endpoint {
                            path: Path::Verbs(qp) | Path::Negotiating { qp: Some(qp), .. },
                            dead: false,
                            ..
                        }) => {
                            qp.pending.push_back((index, 0, wc.byte_len as usize));
                            true
                        }
                        _ => false,
                    },
                    _ => false,
                };
                if queued {
                    self.deliver_verbs(key.expect("queued"), now);
                } else if let Some(port) = self.verbs.as_mut() {
                    if let Err(err) = port.post_recv(index) {
                        tracing::error!(error = %err, "re-posting a shared receive failed");
                    }
                }
                "receive"
            }
            port::KIND_SEND | port::KIND_READ => {
                if let Some(Endpoint {
                    path: Path::Verbs(qp),
                    conn,
                    ..
                }) = key.and_then(|k| self.endpoints.get_mut(k))
                {
                    if kind == port::KIND_SEND {
                        qp.send_done(index as usize);
                    } else {
                        qp.read_done();
                        conn.handle_read_done(index, wc.status == 0);
                    }
                }
                if kind == port::KIND_SEND {
                    "SEND"
                } else {
                    "RDMA READ"
                }
            }
            other => {
                tracing::error!(
                    kind = other,
                    wr_id = wc.wr_id,
                    "completion of an unknown work request"
                );
                return;
            }
        };
        if wc.status != 0 {
            if let Some(e) = key.and_then(|k| self.endpoints.get_mut(k)) {
                if !e.dead {
                    let status = port::wc_status_name(wc.status);
                    tracing::warn!(peer = %e.peer, status, what, "RDMA work request failed; closing the endpoint");
                    e.fail(format!("RDMA {what} failed: {status}"));
                }
            }
        }
    }

    /// Feeds an endpoint's received SENDs to its connection, in order; stops
    /// (keeping them) while the arena has no receive buffer, like a TCP
    /// endpoint leaving bytes in the kernel.
    fn deliver_verbs(&mut self, key: u64, now: Instant) {
        let Some(e) = self.endpoints.get_mut(key) else {
            return;
        };
        let Path::Verbs(qp) = &mut e.path else {
            return;
        };
        let port = self
            .verbs
            .as_mut()
            .expect("a verbs endpoint implies a port");
        while let Some(&(index, offset, len)) = qp.pending.front() {
            let mut offset = offset;
            while offset < len && !e.dead && !e.conn.is_closed() {
                let Some(space) = e.conn.recv_space() else {
                    tracing::debug!(peer = %e.peer, "arena exhausted; receive paused");
                    self.memory_blocked = true;
                    qp.pending[0].1 = offset;
                    return;
                };
                let n = space.len().min(len - offset);
                space[..n].copy_from_slice(&port.received(index, len)[offset..offset + n]);
                offset += n;
                if let Err(err) = e.conn.handle_recv(now, n) {
                    tracing::warn!(peer = %e.peer, error = %err, "closing a connection that broke the protocol");
                    self.stats.closed_bad_frames += 1;
                    break;
                }
            }
            qp.pending.pop_front();
            if let Err(err) = port.post_recv(index) {
                tracing::error!(error = %err, "re-posting a shared receive failed");
            }
        }
    }
}

/// Hashes queue pair numbers with one multiply: the map is looked up on every
/// completion, where SipHash would cost more than the rest of the lookup.
#[derive(Default)]
struct QpnHasher(u64);

impl std::hash::Hasher for QpnHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }

    fn write_u32(&mut self, n: u32) {
        self.0 = u64::from(n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// Gives a queue pair's resources back to the port: its completion-queue
/// share and the shared receives it had not delivered.
fn retire_qp(port: Option<&mut VerbsPort>, qp: &mut QpPath) {
    let Some(port) = port else {
        return;
    };
    port.release_qp(qp);
    for (index, _, _) in qp.pending.drain(..) {
        if let Err(err) = port.post_recv(index) {
            tracing::error!(error = %err, "re-posting a shared receive failed");
        }
    }
}

/// A verbs endpoint's socket carries nothing after the exchange: read only to
/// notice its end (or a peer breaking that rule).
fn read_verbs_socket(e: &mut Endpoint) -> usize {
    let mut scratch = [0u8; 64];
    loop {
        match e.sock.read(&mut scratch) {
            Ok(0) => {
                e.peer_closed();
                return 1;
            }
            Ok(_) => {
                e.fail("bytes on the TCP socket of a verbs endpoint".into());
                return 1;
            }
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                e.readable = false;
                return 0;
            }
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => {
                e.fail(err.to_string());
                return 1;
            }
        }
    }
}

fn set_send_buffer(sock: &TcpStream, bytes: usize) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: a valid socket and a c_int option value of the right size.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// What [`Worker::progress_or_sleep`] says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sleep {
    /// There is work (or the spin lasts): progress again first.
    NotYet,
    /// Wait for the poll descriptor, at most this long (`None`: no limit).
    For(Option<Duration>),
}

/// The spin after a sleep that ended with work `gap` after the last work.
fn next_spin(configured: Duration, gap: Duration) -> Duration {
    let max = configured * SPIN_GROWTH_MAX;
    if gap <= max {
        (gap + gap / 2).clamp(configured, max)
    } else {
        configured
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_spin_grows_to_cover_short_gaps_and_resets_when_idle() {
        let us = Duration::from_micros;
        // A peer answering just after we gave up: spin past its gap next time.
        assert_eq!(next_spin(us(200), us(300)), us(450));
        // Short gaps never shrink it below the configured spin.
        assert_eq!(next_spin(us(200), us(50)), us(200));
        // Bounded, so an idle worker soon sleeps.
        assert_eq!(next_spin(us(200), us(3000)), us(3200));
        // A real idle period: back to the configured spin.
        assert_eq!(next_spin(us(200), Duration::from_millis(50)), us(200));
    }
}
