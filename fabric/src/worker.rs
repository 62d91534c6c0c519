//! The progress engine: one [`Worker`] owns its endpoints, drives their protocol
//! state machines over TCP, runs active-message handlers, and polls adaptively.
//!
//! Like a UCX worker it is progressed by the thread that owns it (`progress`,
//! `wait_*`, `run`); nothing inside spawns threads. Polling policy: after any
//! work the worker keeps polling without sleeping for `spin` (a loopback round
//! trip fits inside it, so a busy connection never pays a wake-up); after that
//! it sleeps in `epoll_wait` until a socket, a timer or a [`WorkerWaker`] wakes it,
//! so an idle worker costs no CPU.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Read, Write};
use std::net::SocketAddr;
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
/// A spinning worker with at most this many endpoints polls their sockets directly.
const DIRECT_POLL_ENDPOINTS_MAX: usize = 4;
/// ...and still runs epoll once in this many rounds.
const DIRECT_POLLS_PER_EPOLL: u64 = 16;
/// How soon a worker whose reads wait for arena buffers looks again.
const MEMORY_RETRY: Duration = Duration::from_millis(1);
/// Error code sent back for an RPC to an AM id with no handler.
pub const NO_HANDLER: u32 = 0xffff_0001;

/// Settings of a worker.
#[derive(Debug, Clone, Copy)]
pub struct WorkerConfig {
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

struct Endpoint {
    conn: Connection,
    sock: TcpStream,
    peer: SocketAddr,
    /// Edge-triggered readiness not yet drained.
    readable: bool,
    writable: bool,
    /// The transport is gone; remove once events are drained.
    dead: bool,
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
    /// Progress rounds so far.
    polls: u64,
    /// A read found no arena buffer in the last round (retry on a timer).
    memory_blocked: bool,
    stats: WorkerStats,
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
        Ok(Worker {
            arena,
            config,
            poll,
            events: Events::with_capacity(POLL_EVENTS_MAX),
            waker: Arc::new(waker),
            endpoints: Slab::with_capacity(16),
            live: Vec::with_capacity(16),
            listeners: Vec::new(),
            handlers: (0..config.am_ids_max).map(|_| None).collect(),
            completions: VecDeque::with_capacity(1024),
            last_work: Instant::now(),
            polls: 0,
            memory_blocked: false,
            stats: WorkerStats::default(),
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
        let key = self.endpoints.insert(Endpoint {
            conn,
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
            self.endpoints.remove(key);
            return Err(e);
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
        self.progress_once(Some(Duration::ZERO))
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
            let timeout = if now.duration_since(self.last_work) < self.config.spin {
                self.stats.spins += 1;
                Some(Duration::ZERO)
            } else {
                self.stats.sleeps += 1;
                self.sleep_timeout(now, deadline)
            };
            if self.progress_once(timeout) > 0 {
                self.last_work = Instant::now();
            }
        }
    }

    /// Serves until `stop` returns true; wake the worker after setting it.
    pub fn run(&mut self, mut stop: impl FnMut() -> bool) {
        self.progress_until(None, |w| {
            // Completions of a server nobody reads would pile up.
            w.completions.clear();
            stop()
        });
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

    fn progress_once(&mut self, timeout: Option<Duration>) -> usize {
        let mut work = 0;
        self.memory_blocked = false;
        self.polls = self.polls.wrapping_add(1);
        let spinning = timeout == Some(Duration::ZERO);
        if spinning
            && self.live.len() <= DIRECT_POLL_ENDPOINTS_MAX
            && !self.polls.is_multiple_of(DIRECT_POLLS_PER_EPOLL)
        {
            // With few endpoints, a spinning worker tries their sockets directly:
            // one recv that says EAGAIN is cheaper than an epoll_wait, and this
            // is the hot loop of a latency-bound connection. Every few rounds
            // epoll still runs, for listeners, the waker and writability.
            for &key in &self.live {
                if let Some(e) = self.endpoints.get_mut(key) {
                    e.readable = true;
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
        let now = Instant::now();
        for i in 0..self.live.len() {
            let key = self.live[i];
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

    /// Reads what the socket has, feeding the connection. Returns reads done.
    fn read(&mut self, key: u64, now: Instant) -> usize {
        let Some(e) = self.endpoints.get_mut(key) else {
            return 0;
        };
        if !e.readable || e.dead {
            return 0;
        }
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
                    e.dead = true;
                    let reason = if e.conn.is_closed() {
                        "closed"
                    } else {
                        "peer closed the connection"
                    };
                    e.conn
                        .handle_disconnect(CloseReason::Transport(reason.into()));
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
                    e.dead = true;
                    e.conn
                        .handle_disconnect(CloseReason::Transport(err.to_string()));
                    break;
                }
            }
        }
        reads
    }

    /// Writes what the connection has queued, as far as the socket takes it.
    fn flush(&mut self, key: u64) {
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
                    e.dead = true;
                    e.conn
                        .handle_disconnect(CloseReason::Transport(err.to_string()));
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
                Event::ReadRequest { slot, .. } => {
                    // TCP connections never enable remote read; fail it cleanly.
                    tracing::error!(slot, "remote-read request on a TCP endpoint");
                    if let Some(e) = self.endpoints.get_mut(key) {
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
    fn reap(&mut self) {
        let endpoints = &mut self.endpoints;
        let registry = self.poll.registry();
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
            let _ = registry.deregister(&mut e.sock);
            endpoints.remove(key);
            false
        });
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
