//! The active-message protocol of one connection, as a sans-IO state machine.
//!
//! [`Connection`] owns framing, credits, the eager/rendezvous choice, and RPC
//! matching. It never touches a socket or a clock: a driver feeds it received
//! bytes ([`Connection::recv_space`] then [`Connection::handle_recv`]), asks it what
//! to write ([`Connection::transmit_iovecs`] then [`Connection::handle_transmitted`]),
//! tells it the time ([`Connection::handle_timeout`], [`Connection::poll_timeout`]),
//! and drains [`Event`]s. Tests drive two of them back to back on a virtual clock.
//!
//! Flow control: each side grants its peer `credits` (at hello). An Eager or Rts
//! frame costs one; the receiver returns credits as it delivers frames, piggybacked
//! on any frame it sends, or in an explicit Credit frame once half are owed. A
//! sender without credits parks the message and re-drives it when credits return;
//! a peer that sends beyond its credits is a protocol error. Cts, RndvData and
//! Credit frames need no credit: each answers something the peer asked for.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::io::IoSlice;
use std::time::{Duration, Instant};

use quiver_arena::{Arena, Buf, BufMut};

use crate::slab::Slab;
use crate::wire::{
    decode_header, flags, FrameHeader, FrameKind, Hello, RecvLimits, RemoteError, WireError,
    AM_HEADER_BYTES_MAX, CLOSE_REASON_BYTES_MAX, HEADER_BYTES, HELLO_BYTES,
};

/// Payloads up to this size are copied next to their frame header: one iovec
/// instead of two, and a memcpy of this size costs less than the extra entry.
const INLINE_PAYLOAD_BYTES_MAX: usize = 512;
/// Initial capacity of the transmit byte FIFO; it only grows if frames pile up.
const TX_FIFO_BYTES: usize = 64 << 10;
/// A receive buffer with less room than this is replaced before the next read,
/// so reads never shrink to a few bytes at the end of a buffer.
const RX_READ_BYTES_MIN: usize = 4096;

/// Default eager threshold: a 64 KiB payload plus up to 512 bytes of header.
pub const EAGER_BYTES_MAX_DEFAULT: usize = (64 << 10) + 512;

/// Settings of one connection, fixed at setup (as UCX fixes its protocol choice).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnConfig {
    /// Messages whose user header + payload fit go eager; larger go rendezvous.
    pub eager_bytes_max: usize,
    /// Eager/Rts frames the peer may send before it hears back from us.
    pub credits: u32,
    /// Largest rendezvous payload accepted.
    pub message_bytes_max: usize,
    /// Receive buffers taken from the arena; must hold the largest eager frame.
    pub rx_chunk_bytes: usize,
    /// RPCs that may be outstanding on this connection.
    pub rpcs_max: usize,
    /// Rendezvous by remote read: an Rts names the payload's address and
    /// remote key, the receiver reads it itself (the driver's RDMA READ, see
    /// [`Event::ReadRequest`]) and answers with Fin. For transports with RDMA;
    /// TCP uses Cts and RndvData.
    pub remote_read: bool,
}

impl Default for ConnConfig {
    fn default() -> Self {
        ConnConfig {
            // A 64 KiB payload and its header go eager: on TCP a rendezvous
            // costs a round trip more (measured: 64 KiB ping-pong 2.3x raw
            // spinning TCP as rendezvous, 1.25x eager).
            eager_bytes_max: EAGER_BYTES_MAX_DEFAULT,
            credits: 64,
            message_bytes_max: 1 << 20,
            rx_chunk_bytes: 256 << 10,
            rpcs_max: 1024,
            remote_read: false,
        }
    }
}

impl ConnConfig {
    /// Checks the settings fit together.
    pub fn validate(&self) -> Result<(), String> {
        let largest_frame = HEADER_BYTES + AM_HEADER_BYTES_MAX + self.eager_bytes_max;
        if self.rx_chunk_bytes < largest_frame {
            return Err(format!(
                "rx_chunk_bytes {} cannot hold the largest eager frame ({largest_frame} bytes)",
                self.rx_chunk_bytes
            ));
        }
        if self.credits < 2 {
            return Err("credits must be at least 2".into());
        }
        if self.message_bytes_max > u32::MAX as usize || self.eager_bytes_max > u32::MAX as usize {
            return Err("message sizes must fit 32 bits".into());
        }
        Ok(())
    }
}

/// Identifies an [`Connection::am_send`] until its [`Event::SendDone`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SendId(pub u64);

/// Identifies an [`Connection::rpc_call`] until its [`Event::RpcDone`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RpcId(pub u64);

/// What a message carries after its header.
#[derive(Debug)]
pub enum Payload<'a> {
    None,
    /// Copied (inline when small, into an arena buffer for rendezvous).
    Bytes(&'a [u8]),
    /// Sent without a copy; released when the send completes.
    Buf(Buf),
    /// Several buffers, one after another, arriving as one payload: sent
    /// eager without a copy (the transport gathers them); a rendezvous
    /// copies them into one buffer first.
    Gather(Vec<Buf>),
}

impl Payload<'_> {
    fn len(&self) -> usize {
        match self {
            Payload::None => 0,
            Payload::Bytes(b) => b.len(),
            Payload::Buf(b) => b.len(),
            Payload::Gather(bufs) => bufs.iter().map(|b| b.len()).sum(),
        }
    }
}

/// Why a send failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    #[error("connection closed")]
    Disconnected,
    #[error("the receiver declined the rendezvous")]
    Rejected,
    #[error("{what} of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        what: &'static str,
        len: usize,
        max: usize,
    },
    #[error("too many outstanding RPCs ({0})")]
    TooManyRpcs(usize),
    #[error("no arena buffer for the payload: {0}")]
    NoMemory(String),
}

/// Why an RPC failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RpcError {
    #[error("RPC timed out")]
    Timeout,
    #[error("connection closed before the response")]
    Disconnected,
    #[error("remote error {}: {}", .0.code, .0.message)]
    Remote(RemoteError),
    #[error("bad message: {0}")]
    BadMessage(String),
    #[error("RPC cancelled")]
    Cancelled,
    #[error("sending the request failed: {0}")]
    Send(#[from] SendError),
}

/// A protocol violation by the peer; the connection must close.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("{0:?} frame before hello")]
    BeforeHello(FrameKind),
    #[error("second hello")]
    DuplicateHello,
    #[error("peer sent a {0:?} frame without credit")]
    CreditOverrun(FrameKind),
    #[error("{kind:?} for unknown rendezvous {id:#x}")]
    UnknownRendezvous { kind: FrameKind, id: u64 },
    #[error("rendezvous data of {got} bytes for a {want}-byte message")]
    RendezvousLength { got: usize, want: usize },
    #[error("peer hello is unusable: {0}")]
    BadHello(String),
    #[error("{0:?} frame for remote-read rendezvous on a connection without it")]
    RemoteReadUnsupported(FrameKind),
}

/// Why a connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// This side asked for it.
    Local(String),
    /// The peer sent Close with this reason.
    Peer(String),
    /// The peer broke the protocol.
    Protocol(ProtocolError),
    /// The transport failed (reset, EOF mid-stream).
    Transport(String),
}

/// A rendezvous message offered to a handler: pull it with [`Connection::pull`] or
/// decline with [`Connection::reject`].
#[derive(Debug)]
pub struct RndvDesc {
    seq: u64,
    len: usize,
    am_id: u16,
    header: Buf,
    reply_to: Option<u64>,
    /// Remote read: the payload's (address, rkey) in the sender's memory.
    remote: Option<(u64, u32)>,
}

impl RndvDesc {
    /// Payload bytes the message carries.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The sender's id for this rendezvous.
    pub fn seq(&self) -> u64 {
        self.seq
    }
}

/// The data of an active message as a handler sees it.
#[derive(Debug)]
pub enum AmData {
    /// Eager payload, in place in the receive buffer; keep it as long as needed.
    Eager(Buf),
    /// A rendezvous offer.
    Rendezvous(RndvDesc),
    /// A pulled rendezvous payload, in the buffer the handler chose.
    Pulled(Buf),
    /// A pull that cannot finish (the connection closed).
    Aborted,
}

/// An incoming active message.
#[derive(Debug)]
pub struct AmMessage {
    pub am_id: u16,
    /// The user header, in place.
    pub header: Buf,
    pub data: AmData,
    /// Set when the message is an RPC request: pass it to `reply`.
    pub reply_to: Option<u64>,
}

/// A successful RPC response.
#[derive(Debug)]
pub struct RpcReply {
    pub header: Buf,
    pub payload: Buf,
}

/// What the connection reports to its driver.
#[derive(Debug)]
pub enum Event {
    /// The hello exchange finished; sends flow.
    Established,
    Am(AmMessage),
    SendDone {
        id: SendId,
        result: Result<(), SendError>,
    },
    RpcDone {
        id: RpcId,
        result: Result<RpcReply, RpcError>,
    },
    /// The connection is over; the driver closes the transport.
    Closed(CloseReason),
    /// Remote read: read `len` bytes at `remote_addr` under `rkey` into the
    /// target of `slot` ([`Connection::read_target`]), then call
    /// [`Connection::handle_read_done`] exactly once, even if the read fails
    /// or the connection closes (the target stays allocated until then).
    ReadRequest {
        slot: u64,
        remote_addr: u64,
        rkey: u32,
        len: usize,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    AwaitingHello,
    Open,
    /// Close queued; the driver closes after flushing.
    Closing,
    Closed,
}

/// A FIFO of bytes in one preallocated vector (no allocation in steady state).
struct ByteFifo {
    bytes: Vec<u8>,
    head: usize,
}

impl ByteFifo {
    fn with_capacity(capacity: usize) -> ByteFifo {
        ByteFifo {
            bytes: Vec::with_capacity(capacity),
            head: 0,
        }
    }

    fn push(&mut self, data: &[u8]) {
        if self.head > 0 && self.bytes.len() + data.len() > self.bytes.capacity() {
            self.bytes.drain(..self.head);
            self.head = 0;
        }
        self.bytes.extend_from_slice(data);
    }

    /// The `len` bytes `offset` bytes after the head.
    fn peek(&self, offset: usize, len: usize) -> &[u8] {
        &self.bytes[self.head + offset..self.head + offset + len]
    }

    fn pop(&mut self, len: usize) {
        self.head += len;
        debug_assert!(self.head <= self.bytes.len());
        if self.head == self.bytes.len() {
            self.bytes.clear();
            self.head = 0;
        }
    }
}

/// One frame queued for the wire: `inline_len` bytes in the FIFO, then `body`.
struct TxItem {
    inline_len: usize,
    body: TxBody,
    done: Option<SendId>,
}

/// What a frame sends from buffers after its inline bytes.
enum TxBody {
    None,
    One(Buf),
    Many(Vec<Buf>),
}

impl TxBody {
    fn bufs(&self) -> &[Buf] {
        match self {
            TxBody::None => &[],
            TxBody::One(b) => std::slice::from_ref(b),
            TxBody::Many(bufs) => bufs,
        }
    }

    fn len(&self) -> usize {
        self.bufs().iter().map(|b| b.len()).sum()
    }
}

/// A message waiting for a credit (or for hello).
struct Parked {
    am_id: u16,
    flags: u16,
    correlation: u64,
    header_len: usize,
    /// Payload bytes copied into the parked FIFO after the header.
    copied_len: usize,
    payload: Option<Buf>,
    done: Option<SendId>,
    /// An RPC request whose caller timed out before it left: skipped, its
    /// payload buffer already let go.
    cancelled: bool,
}

/// A rendezvous we sent an Rts for, waiting for Cts.
struct RndvOut {
    payload: Buf,
    done: Option<SendId>,
    rpc: Option<u64>,
}

/// A rendezvous we pulled, waiting for its data.
struct RndvIn {
    seq: u64,
    target: BufMut,
    am_id: u16,
    header: Buf,
    reply_to: Option<u64>,
    /// Set when this is an RPC response being pulled for the caller.
    rpc: Option<u64>,
    /// Remote read: the payload's (address, rkey); a read is (or will be) in flight.
    remote: Option<(u64, u32)>,
}

struct RpcPending {
    deadline: Instant,
}

/// Receiving a RndvData payload straight into its target buffer.
struct Direct {
    slot: u64,
    filled: usize,
}

/// Counters a user can scrape.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ConnStats {
    pub frames_sent: u64,
    pub frames_received: u64,
    pub eager_sent: u64,
    pub rendezvous_sent: u64,
    /// Messages that waited for a credit.
    pub parked: u64,
    pub credit_frames_sent: u64,
    /// Responses that arrived after their RPC timed out or was cancelled.
    pub late_responses: u64,
    /// Bytes of rendezvous payloads copied out of the receive buffer (read ahead).
    pub rndv_bytes_copied: u64,
}

/// One connection's protocol state.
pub struct Connection {
    arena: Arena,
    config: ConnConfig,
    state: State,
    limits: RecvLimits,
    /// What the peer accepts (known after its hello).
    peer: Option<Hello>,

    send_credits: u32,
    /// Credits we granted that the peer has not used (for overrun detection).
    granted: u32,
    /// Credits we owe the peer.
    owed: u32,
    /// Eager/Rts frames received whose events the driver has not taken yet.
    undelivered: u32,

    tx_fifo: ByteFifo,
    tx_items: VecDeque<TxItem>,
    /// Bytes of the front item already written.
    tx_written: usize,
    parked_fifo: ByteFifo,
    parked: VecDeque<Parked>,
    rndv_out: Slab<RndvOut>,

    rx: Option<BufMut>,
    /// Valid bytes at the start of `rx`.
    rx_filled: usize,
    /// Bytes the current partial frame needs in `rx`.
    rx_need: usize,
    direct: Option<Direct>,
    rndv_in: Slab<RndvIn>,
    /// Targets of remote reads still in flight when the connection closed:
    /// kept until the driver reports each read done.
    orphan_reads: Vec<(u64, BufMut)>,

    rpcs: Slab<RpcPending>,
    deadlines: BinaryHeap<Reverse<(Instant, u64)>>,

    next_send: u64,
    /// Events for the driver; `true` marks those whose frame costs a credit.
    events: VecDeque<(Event, bool)>,
    stats: ConnStats,
    /// Remote key rendezvous offers carry when remote read is on (None: the
    /// key the arena's placement records).
    read_rkey: Option<u32>,
}

impl Connection {
    /// A new connection; its hello is queued at once.
    pub fn new(arena: Arena, config: ConnConfig) -> Connection {
        config
            .validate()
            .expect("connection config validated by the caller");
        let limits = RecvLimits {
            eager_bytes_max: config.eager_bytes_max,
            message_bytes_max: config.message_bytes_max,
        };
        let credits = config.credits as usize;
        let mut conn = Connection {
            arena,
            config,
            state: State::AwaitingHello,
            limits,
            peer: None,
            send_credits: 0,
            granted: config.credits,
            owed: 0,
            undelivered: 0,
            tx_fifo: ByteFifo::with_capacity(TX_FIFO_BYTES),
            tx_items: VecDeque::with_capacity(2 * credits),
            tx_written: 0,
            parked_fifo: ByteFifo::with_capacity(TX_FIFO_BYTES / 4),
            parked: VecDeque::with_capacity(credits),
            rndv_out: Slab::with_capacity(credits),
            rx: None,
            rx_filled: 0,
            rx_need: HEADER_BYTES,
            direct: None,
            rndv_in: Slab::with_capacity(credits),
            orphan_reads: Vec::new(),
            rpcs: Slab::with_capacity(config.rpcs_max),
            deadlines: BinaryHeap::with_capacity(config.rpcs_max),
            next_send: 1,
            events: VecDeque::with_capacity(2 * credits),
            stats: ConnStats::default(),
            read_rkey: None,
        };
        let hello = Hello {
            credits: config.credits,
            eager_bytes_max: config.eager_bytes_max as u32,
            message_bytes_max: config.message_bytes_max as u32,
        };
        let mut body = [0u8; HELLO_BYTES];
        hello.encode(&mut body);
        let mut h = FrameHeader::new(FrameKind::Hello);
        h.header_len = HELLO_BYTES as u32;
        conn.queue_frame(h, &body, &[], TxBody::None, None);
        conn
    }

    pub fn config(&self) -> &ConnConfig {
        &self.config
    }

    /// Switches rendezvous to remote read, offering payloads under `rkey`:
    /// for a driver that learns its transport after the connection exists
    /// (the worker's transport exchange). Only before any frame arrived.
    pub fn enable_remote_read(&mut self, rkey: u32) {
        assert!(
            matches!(self.state, State::AwaitingHello),
            "remote read enabled after the hello"
        );
        self.config.remote_read = true;
        self.read_rkey = Some(rkey);
    }

    pub fn stats(&self) -> ConnStats {
        self.stats
    }

    /// Whether the hello exchange finished and the connection is usable.
    pub fn is_established(&self) -> bool {
        self.state == State::Open
    }

    /// Whether the connection is over (the driver should drop the transport
    /// once nothing is left to write).
    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed | State::Closing)
    }

    // ---------------------------------------------------------------- sending

    /// Sends an active message; [`Event::SendDone`] reports when the payload
    /// buffer is released (written to the transport, or failed).
    pub fn am_send(
        &mut self,
        am_id: u16,
        header: &[u8],
        payload: Payload<'_>,
    ) -> Result<SendId, SendError> {
        let id = SendId(self.next_send);
        self.next_send += 1;
        self.send(am_id, 0, 0, header, payload, Some(id))?;
        Ok(id)
    }

    /// Calls a remote handler; [`Event::RpcDone`] reports the response or the error.
    pub fn rpc_call(
        &mut self,
        now: Instant,
        am_id: u16,
        header: &[u8],
        payload: Payload<'_>,
        timeout: Duration,
    ) -> Result<RpcId, SendError> {
        if self.rpcs.len() >= self.config.rpcs_max {
            return Err(SendError::TooManyRpcs(self.config.rpcs_max));
        }
        let deadline = now + timeout;
        let correlation = self.rpcs.insert(RpcPending { deadline });
        if let Err(e) = self.send(
            am_id,
            flags::RPC_REQUEST,
            correlation,
            header,
            payload,
            None,
        ) {
            self.rpcs.remove(correlation);
            return Err(e);
        }
        self.deadlines.push(Reverse((deadline, correlation)));
        Ok(RpcId(correlation))
    }

    /// Answers the RPC request `reply_to` (from [`AmMessage::reply_to`]).
    pub fn reply(
        &mut self,
        am_id: u16,
        reply_to: u64,
        header: &[u8],
        payload: Payload<'_>,
    ) -> Result<(), SendError> {
        self.send(am_id, flags::RPC_RESPONSE, reply_to, header, payload, None)
    }

    /// Answers the RPC request `reply_to` with an error.
    pub fn reply_error(
        &mut self,
        am_id: u16,
        reply_to: u64,
        code: u32,
        message: &str,
    ) -> Result<(), SendError> {
        let mut record = [0u8; 4 + RemoteError::MESSAGE_BYTES_MAX];
        let n = RemoteError::encode(code, message, &mut record);
        let f = flags::RPC_RESPONSE | flags::RPC_ERROR;
        self.send(am_id, f, reply_to, &record[..n], Payload::None, None)
    }

    /// Gives up on an RPC; its response, if it comes, is dropped.
    pub fn cancel_rpc(&mut self, id: RpcId) {
        if self.rpcs.remove(id.0).is_some() {
            self.push_event(Event::RpcDone {
                id,
                result: Err(RpcError::Cancelled),
            });
        }
    }

    fn send(
        &mut self,
        am_id: u16,
        frame_flags: u16,
        correlation: u64,
        header: &[u8],
        payload: Payload<'_>,
        done: Option<SendId>,
    ) -> Result<(), SendError> {
        if self.is_closed() {
            return Err(SendError::Disconnected);
        }
        if header.len() > AM_HEADER_BYTES_MAX {
            return Err(SendError::TooLarge {
                what: "user header",
                len: header.len(),
                max: AM_HEADER_BYTES_MAX,
            });
        }
        let message_max = self.peer.map_or(self.config.message_bytes_max, |p| {
            (p.message_bytes_max as usize).min(self.config.message_bytes_max)
        });
        if payload.len() > message_max {
            return Err(SendError::TooLarge {
                what: "payload",
                len: payload.len(),
                max: message_max,
            });
        }
        let fast = self.parked.is_empty() && self.send_credits > 0 && self.peer.is_some();
        if fast {
            // The common case: straight to the wire, no parking copy.
            return self.emit(am_id, frame_flags, correlation, header, payload, done);
        }
        // Park: keep order behind earlier parked messages. Payloads that may go
        // eager are copied; others must be buffers (rendezvous needs one anyway).
        let (copied, buf) = match payload {
            Payload::None => (&[][..], None),
            Payload::Bytes(b) if b.len() <= self.config.eager_bytes_max => (b, None),
            Payload::Bytes(b) => (&[][..], Some(self.copy_to_arena(b)?)),
            Payload::Buf(b) => (&[][..], Some(b)),
            // Parking is the slow path: one buffer is simpler to keep.
            Payload::Gather(bufs) => (&[][..], Some(self.gather_to_arena(&bufs)?)),
        };
        self.parked_fifo.push(header);
        self.parked_fifo.push(copied);
        self.parked.push_back(Parked {
            am_id,
            flags: frame_flags,
            correlation,
            header_len: header.len(),
            copied_len: copied.len(),
            payload: buf,
            done,
            cancelled: false,
        });
        self.stats.parked += 1;
        Ok(())
    }

    fn gather_to_arena(&self, bufs: &[Buf]) -> Result<Buf, SendError> {
        self.copy_pieces_to_arena(bufs.iter().map(|b| &b[..]))
    }

    fn copy_to_arena(&self, bytes: &[u8]) -> Result<Buf, SendError> {
        self.copy_pieces_to_arena(std::iter::once(bytes))
    }

    /// One arena buffer holding `pieces` one after another.
    fn copy_pieces_to_arena<'p>(
        &self,
        pieces: impl Iterator<Item = &'p [u8]> + Clone,
    ) -> Result<Buf, SendError> {
        let len = pieces.clone().map(<[u8]>::len).sum();
        let mut buf = self
            .arena
            .alloc(len)
            .map_err(|e| SendError::NoMemory(e.to_string()))?;
        let mut at = 0;
        for piece in pieces {
            buf[at..at + piece.len()].copy_from_slice(piece);
            at += piece.len();
        }
        Ok(buf.freeze())
    }

    /// Puts a message on the wire as Eager or Rts; needs a credit and the peer's hello.
    fn emit(
        &mut self,
        am_id: u16,
        frame_flags: u16,
        correlation: u64,
        header: &[u8],
        payload: Payload<'_>,
        done: Option<SendId>,
    ) -> Result<(), SendError> {
        let peer = self.peer.expect("emit only after hello");
        debug_assert!(self.send_credits > 0);
        let eager_max = (peer.eager_bytes_max as usize).min(self.config.eager_bytes_max);
        let mut h = FrameHeader::new(FrameKind::Eager);
        h.am_id = am_id;
        h.flags = frame_flags;
        h.correlation = correlation;
        h.header_len = header.len() as u32;
        h.payload_len = payload.len() as u32;
        if header.len() + payload.len() <= eager_max {
            // A copy that finds no buffer fails the send before it takes a
            // credit: a credit taken for a frame never sent would not come
            // back, and the peer would be one message narrower for good.
            let payload = match payload {
                Payload::Bytes(b) if b.len() > INLINE_PAYLOAD_BYTES_MAX => {
                    Payload::Buf(self.copy_to_arena(b)?)
                }
                other => other,
            };
            self.send_credits -= 1;
            self.stats.eager_sent += 1;
            match payload {
                Payload::None => self.queue_frame(h, header, &[], TxBody::None, done),
                // (Only small ones are left: larger were copied above.)
                Payload::Bytes(b) => self.queue_frame(h, header, b, TxBody::None, done),
                Payload::Buf(b) if b.len() <= INLINE_PAYLOAD_BYTES_MAX => {
                    self.queue_frame(h, header, &b, TxBody::None, done)
                }
                Payload::Buf(b) => self.queue_frame(h, header, &[], TxBody::One(b), done),
                Payload::Gather(bufs) => self.queue_frame(h, header, &[], TxBody::Many(bufs), done),
            }
            return Ok(());
        }
        let buf = match payload {
            Payload::Buf(b) => b,
            Payload::Bytes(b) => self.copy_to_arena(b)?,
            // A rendezvous offers one region (a remote read needs it whole).
            Payload::Gather(bufs) => self.gather_to_arena(&bufs)?,
            Payload::None => unreachable!("an empty payload always fits eager"),
        };
        if self.config.remote_read {
            let Some(rkey) = self
                .read_rkey
                .or(buf.placement().rdma_keys.map(|(_, rkey)| rkey))
            else {
                return Err(SendError::NoMemory(
                    "a remote-read rendezvous payload must be in RDMA-registered memory".into(),
                ));
            };
            h.flags |= flags::RTS_REMOTE_READ;
            h.aux = buf.as_ptr() as u64;
            h.rkey = rkey;
        }
        self.send_credits -= 1;
        self.stats.rendezvous_sent += 1;
        let rpc = (frame_flags & flags::RPC_REQUEST != 0).then_some(correlation);
        h.kind = FrameKind::Rts;
        h.seq = self.rndv_out.insert(RndvOut {
            payload: buf,
            done,
            rpc,
        });
        self.queue_frame(h, header, &[], TxBody::None, None);
        Ok(())
    }

    /// Moves parked messages to the wire while credits last.
    fn drive_parked(&mut self) {
        while self.send_credits > 0 && self.peer.is_some() {
            let Some(p) = self.parked.pop_front() else {
                break;
            };
            let (header_len, total) = (p.header_len, p.header_len + p.copied_len);
            if p.cancelled {
                self.parked_fifo.pop(total);
                continue;
            }
            // `emit` needs `&mut self`, so the header (and a small copied payload)
            // leave the FIFO through a stack buffer.
            let mut scratch = [0u8; AM_HEADER_BYTES_MAX + INLINE_PAYLOAD_BYTES_MAX];
            let copied_inline = p.payload.is_none() && p.copied_len <= INLINE_PAYLOAD_BYTES_MAX;
            let copy_len = if copied_inline { total } else { header_len };
            scratch[..copy_len].copy_from_slice(self.parked_fifo.peek(0, copy_len));
            let payload = match p.payload {
                Some(b) => Ok(Payload::Buf(b)),
                None if copied_inline => Ok(Payload::Bytes(&scratch[header_len..total])),
                None => self
                    .copy_to_arena(self.parked_fifo.peek(header_len, p.copied_len))
                    .map(Payload::Buf),
            };
            self.parked_fifo.pop(total);
            let result = payload.and_then(|payload| {
                let header = &scratch[..header_len];
                self.emit(p.am_id, p.flags, p.correlation, header, payload, p.done)
            });
            if let Err(e) = result {
                self.fail_send(p.done, p.flags, p.correlation, e);
            }
        }
    }

    fn fail_send(
        &mut self,
        done: Option<SendId>,
        frame_flags: u16,
        correlation: u64,
        e: SendError,
    ) {
        if let Some(id) = done {
            self.push_event(Event::SendDone {
                id,
                result: Err(e.clone()),
            });
        }
        if frame_flags & flags::RPC_REQUEST != 0 && self.rpcs.remove(correlation).is_some() {
            self.push_event(Event::RpcDone {
                id: RpcId(correlation),
                result: Err(e.into()),
            });
        }
    }

    fn queue_frame(
        &mut self,
        mut h: FrameHeader,
        header: &[u8],
        inline_payload: &[u8],
        body: TxBody,
        done: Option<SendId>,
    ) {
        if h.kind != FrameKind::Hello {
            h.credits = std::mem::take(&mut self.owed);
        }
        debug_assert_eq!(h.header_len as usize, header.len());
        debug_assert!(
            body.len() + inline_payload.len() == h.body_len() - header.len()
                || h.kind == FrameKind::Rts
        );
        let mut encoded = [0u8; HEADER_BYTES];
        h.encode(&mut encoded);
        self.tx_fifo.push(&encoded);
        self.tx_fifo.push(header);
        self.tx_fifo.push(inline_payload);
        self.tx_items.push_back(TxItem {
            inline_len: HEADER_BYTES + header.len() + inline_payload.len(),
            body,
            done,
        });
        self.stats.frames_sent += 1;
    }

    /// Queues a Credit frame if enough credits are owed that the peer may stall.
    fn maybe_return_credits(&mut self) {
        if self.state == State::Open && self.owed >= self.config.credits.div_ceil(2) {
            self.queue_frame(
                FrameHeader::new(FrameKind::Credit),
                &[],
                &[],
                TxBody::None,
                None,
            );
            self.stats.credit_frames_sent += 1;
        }
    }

    /// Whether anything waits to be written.
    pub fn wants_transmit(&self) -> bool {
        !self.tx_items.is_empty()
    }

    /// Fills `out` with the bytes to write next, in order; returns how many entries.
    pub fn transmit_iovecs<'a>(&'a self, out: &mut [IoSlice<'a>]) -> usize {
        let mut n = 0;
        let mut skip = self.tx_written;
        let mut fifo_offset = 0;
        for item in &self.tx_items {
            if n == out.len() {
                break;
            }
            let inline = self.tx_fifo.peek(fifo_offset, item.inline_len);
            fifo_offset += item.inline_len;
            if skip < inline.len() {
                out[n] = IoSlice::new(&inline[skip..]);
                n += 1;
                skip = 0;
            } else {
                skip -= inline.len();
            }
            for body in item.body.bufs() {
                if n == out.len() {
                    break;
                }
                if skip < body.len() {
                    out[n] = IoSlice::new(&body[skip..]);
                    n += 1;
                    skip = 0;
                } else {
                    skip -= body.len();
                }
            }
        }
        n
    }

    /// Records that the driver wrote `n` bytes from [`Self::transmit_iovecs`].
    pub fn handle_transmitted(&mut self, mut n: usize) {
        while n > 0 {
            let item = self
                .tx_items
                .front()
                .expect("transmitted more than was queued");
            let total = item.inline_len + item.body.len();
            let left = total - self.tx_written;
            if n < left {
                self.tx_written += n;
                return;
            }
            n -= left;
            self.tx_written = 0;
            let item = self.tx_items.pop_front().expect("checked above");
            self.tx_fifo.pop(item.inline_len);
            if let Some(id) = item.done {
                self.push_event(Event::SendDone { id, result: Ok(()) });
            }
        }
        if self.tx_items.is_empty() && self.state == State::Closing {
            self.state = State::Closed;
        }
    }

    // -------------------------------------------------------------- receiving

    /// Where the driver should read into next, or `None` when no receive buffer
    /// can be had from the arena right now (stop reading; try again later).
    pub fn recv_space(&mut self) -> Option<&mut [u8]> {
        if let Some(d) = &self.direct {
            let slot = self.rndv_in.get_mut(d.slot).expect("direct slot is live");
            let filled = d.filled;
            let len = slot.target.len();
            return Some(&mut slot.target[filled..len]);
        }
        let fits = self.rx.as_ref().is_some_and(|rx| {
            rx.capacity() >= self.rx_need && rx.capacity() - self.rx_filled >= RX_READ_BYTES_MIN
        });
        if !fits {
            let size = self.config.rx_chunk_bytes.max(self.rx_need);
            let mut fresh = self.arena.alloc(size).ok()?;
            if let Some(old) = &self.rx {
                fresh.spare_capacity()[..self.rx_filled].copy_from_slice(&old[..self.rx_filled]);
            }
            fresh.set_len(self.rx_filled);
            self.rx = Some(fresh);
        }
        let filled = self.rx_filled;
        let rx = self.rx.as_mut().expect("ensured above");
        Some(&mut rx.spare_capacity()[filled..])
    }

    /// Processes `n` bytes the driver read into [`Self::recv_space`].
    pub fn handle_recv(&mut self, now: Instant, n: usize) -> Result<(), ProtocolError> {
        if self.state == State::Closed {
            return Ok(());
        }
        if let Some(d) = &mut self.direct {
            d.filled += n;
            let slot = d.slot;
            let filled = d.filled;
            if filled
                == self
                    .rndv_in
                    .get_mut(slot)
                    .expect("direct slot is live")
                    .target
                    .len()
            {
                self.direct = None;
                self.finish_rndv_in(slot);
            }
            return Ok(());
        }
        self.rx_filled += n;
        let result = self.parse(now);
        if let Err(e) = &result {
            self.close_with(CloseReason::Protocol(e.clone()));
        }
        result
    }

    fn parse(&mut self, now: Instant) -> Result<(), ProtocolError> {
        loop {
            if self.is_closed() {
                return Ok(());
            }
            if self.rx_filled < HEADER_BYTES {
                self.rx_need = HEADER_BYTES;
                return Ok(());
            }
            let rx = self.rx.as_mut().expect("bytes were read into it");
            rx.set_len(self.rx_filled);
            let h = decode_header(rx, &self.limits)?;
            if h.kind == FrameKind::RndvData {
                self.start_rndv_data(h)?;
                if self.direct.is_some() {
                    return Ok(());
                }
                continue;
            }
            let frame_len = HEADER_BYTES + h.body_len();
            if self.rx_filled < frame_len {
                self.rx_need = frame_len;
                return Ok(());
            }
            let frame = rx.split_frozen(frame_len);
            self.rx_filled -= frame_len;
            self.stats.frames_received += 1;
            self.handle_frame(now, h, frame)?;
        }
    }

    fn handle_frame(
        &mut self,
        _now: Instant,
        h: FrameHeader,
        frame: Buf,
    ) -> Result<(), ProtocolError> {
        if self.state == State::AwaitingHello && h.kind != FrameKind::Hello {
            return Err(ProtocolError::BeforeHello(h.kind));
        }
        self.send_credits = self.send_credits.saturating_add(h.credits);
        let header_end = HEADER_BYTES + h.header_len as usize;
        match h.kind {
            FrameKind::Hello => {
                if self.peer.is_some() {
                    return Err(ProtocolError::DuplicateHello);
                }
                let hello = Hello::decode(&frame[HEADER_BYTES..header_end])?;
                if hello.credits == 0 || hello.eager_bytes_max == 0 {
                    return Err(ProtocolError::BadHello(format!("{hello:?}")));
                }
                self.peer = Some(hello);
                self.send_credits = hello.credits;
                self.state = State::Open;
                self.push_event(Event::Established);
            }
            FrameKind::Eager | FrameKind::Rts => {
                if self.granted == 0 {
                    return Err(ProtocolError::CreditOverrun(h.kind));
                }
                self.granted -= 1;
                // The credit returns when the driver takes the message's event
                // (see `poll_event`): a receiver that stops handling stops the sender.
                self.undelivered += 1;
                if h.flags & flags::RTS_REMOTE_READ != 0 && !self.config.remote_read {
                    return Err(ProtocolError::RemoteReadUnsupported(h.kind));
                }
                let header = frame.slice(HEADER_BYTES..header_end);
                if h.kind == FrameKind::Eager {
                    let payload = frame.slice(header_end..frame.len());
                    self.deliver(h, header, payload);
                } else {
                    self.offer_rndv(h, header);
                }
            }
            FrameKind::Cts => {
                let out = self
                    .rndv_out
                    .remove(h.seq)
                    .ok_or(ProtocolError::UnknownRendezvous {
                        kind: h.kind,
                        id: h.seq,
                    })?;
                if h.flags & flags::CTS_DISCARD != 0 {
                    let correlation = out.rpc.unwrap_or(0);
                    let f = if out.rpc.is_some() {
                        flags::RPC_REQUEST
                    } else {
                        0
                    };
                    self.fail_send(out.done, f, correlation, SendError::Rejected);
                } else {
                    let mut d = FrameHeader::new(FrameKind::RndvData);
                    d.seq = h.seq;
                    d.aux = h.aux;
                    d.payload_len = out.payload.len() as u32;
                    self.queue_frame(d, &[], &[], TxBody::One(out.payload), out.done);
                }
            }
            FrameKind::Credit => {}
            FrameKind::Fin => {
                if !self.config.remote_read {
                    return Err(ProtocolError::RemoteReadUnsupported(h.kind));
                }
                let out = self
                    .rndv_out
                    .remove(h.seq)
                    .ok_or(ProtocolError::UnknownRendezvous {
                        kind: h.kind,
                        id: h.seq,
                    })?;
                if let Some(id) = out.done {
                    self.push_event(Event::SendDone { id, result: Ok(()) });
                }
            }
            FrameKind::Close => {
                let reason = String::from_utf8_lossy(&frame[HEADER_BYTES..header_end]).into_owned();
                self.handle_disconnect(CloseReason::Peer(reason));
            }
            FrameKind::RndvData => unreachable!("handled by start_rndv_data"),
        }
        self.drive_parked();
        Ok(())
    }

    fn deliver(&mut self, h: FrameHeader, header: Buf, payload: Buf) {
        if h.flags & flags::RPC_RESPONSE != 0 {
            let id = RpcId(h.correlation);
            if self.rpcs.remove(h.correlation).is_none() {
                self.stats.late_responses += 1;
                self.frame_handled();
                return;
            }
            let result = if h.flags & flags::RPC_ERROR != 0 {
                match RemoteError::decode(&header) {
                    Ok(e) => Err(RpcError::Remote(e)),
                    Err(e) => Err(RpcError::BadMessage(e.to_string())),
                }
            } else {
                Ok(RpcReply { header, payload })
            };
            self.push_frame_event(Event::RpcDone { id, result });
            return;
        }
        let reply_to = (h.flags & flags::RPC_REQUEST != 0).then_some(h.correlation);
        self.push_frame_event(Event::Am(AmMessage {
            am_id: h.am_id,
            header,
            data: AmData::Eager(payload),
            reply_to,
        }));
    }

    fn offer_rndv(&mut self, h: FrameHeader, header: Buf) {
        let len = h.payload_len as usize;
        let remote = (h.flags & flags::RTS_REMOTE_READ != 0).then_some((h.aux, h.rkey));
        if h.flags & flags::RPC_RESPONSE != 0 {
            // Responses are pulled for the caller into a buffer of the arena; no
            // handler holds the frame, so its credit is owed at once.
            self.frame_handled();
            if self.rpcs.get_mut(h.correlation).is_none() {
                self.stats.late_responses += 1;
                self.queue_cts(h.seq, 0, flags::CTS_DISCARD);
                return;
            }
            match self.arena.alloc(len) {
                Ok(target) => {
                    let slot = RndvIn {
                        seq: h.seq,
                        target,
                        am_id: h.am_id,
                        header,
                        reply_to: None,
                        rpc: Some(h.correlation),
                        remote,
                    };
                    self.start_pull(slot);
                }
                Err(e) => {
                    self.queue_cts(h.seq, 0, flags::CTS_DISCARD);
                    self.rpcs.remove(h.correlation);
                    self.push_event(Event::RpcDone {
                        id: RpcId(h.correlation),
                        result: Err(RpcError::Send(SendError::NoMemory(e.to_string()))),
                    });
                }
            }
            return;
        }
        let reply_to = (h.flags & flags::RPC_REQUEST != 0).then_some(h.correlation);
        self.push_frame_event(Event::Am(AmMessage {
            am_id: h.am_id,
            header: header.clone(),
            data: AmData::Rendezvous(RndvDesc {
                seq: h.seq,
                len,
                am_id: h.am_id,
                header,
                reply_to,
                remote,
            }),
            reply_to,
        }));
    }

    /// Pulls a rendezvous message into `target` (its length is set to the
    /// message's); the handler of the message later sees [`AmData::Pulled`].
    pub fn pull(&mut self, desc: RndvDesc, mut target: BufMut) -> Result<(), SendError> {
        if self.is_closed() {
            return Err(SendError::Disconnected);
        }
        if target.capacity() < desc.len {
            let max = target.capacity();
            let e = SendError::TooLarge {
                what: "rendezvous message",
                len: desc.len,
                max,
            };
            self.reject(desc);
            return Err(e);
        }
        target.set_len(desc.len);
        let slot = RndvIn {
            seq: desc.seq,
            target,
            am_id: desc.am_id,
            header: desc.header,
            reply_to: desc.reply_to,
            rpc: None,
            remote: desc.remote,
        };
        self.start_pull(slot);
        Ok(())
    }

    fn start_pull(&mut self, slot: RndvIn) {
        let seq = slot.seq;
        let remote = slot.remote;
        let len = slot.target.len();
        let key = self.rndv_in.insert(slot);
        match remote {
            // The driver reads the payload; Fin follows in handle_read_done.
            Some((remote_addr, rkey)) => self.push_event(Event::ReadRequest {
                slot: key,
                remote_addr,
                rkey,
                len,
            }),
            None => self.queue_cts(seq, key, 0),
        }
    }

    /// The buffer a [`Event::ReadRequest`] reads into.
    pub fn read_target(&mut self, slot: u64) -> Option<&mut BufMut> {
        match self.rndv_in.get_mut(slot) {
            Some(rin) if rin.remote.is_some() => Some(&mut rin.target),
            _ => self
                .orphan_reads
                .iter_mut()
                .find(|(k, _)| *k == slot)
                .map(|(_, t)| t),
        }
    }

    /// The driver finished (or failed) the read of a [`Event::ReadRequest`]:
    /// the message is delivered (or aborted) and the sender told with Fin.
    pub fn handle_read_done(&mut self, slot: u64, ok: bool) {
        if let Some(at) = self.orphan_reads.iter().position(|(k, _)| *k == slot) {
            // The connection closed while the read was in flight; its target
            // could be freed only now.
            self.orphan_reads.swap_remove(at);
            return;
        }
        let Some(rin) = self.rndv_in.get_mut(slot) else {
            tracing::error!(slot, "read completion for no rendezvous");
            return;
        };
        let seq = rin.seq;
        if ok {
            self.finish_rndv_in(slot);
        } else {
            let rin = self.rndv_in.remove(slot).expect("checked above");
            match rin.rpc {
                Some(correlation) => {
                    if self.rpcs.remove(correlation).is_some() {
                        self.push_event(Event::RpcDone {
                            id: RpcId(correlation),
                            result: Err(RpcError::Disconnected),
                        });
                    }
                }
                None => self.push_event(Event::Am(AmMessage {
                    am_id: rin.am_id,
                    header: rin.header,
                    data: AmData::Aborted,
                    reply_to: rin.reply_to,
                })),
            }
        }
        if !self.is_closed() {
            let mut h = FrameHeader::new(FrameKind::Fin);
            h.seq = seq;
            self.queue_frame(h, &[], &[], TxBody::None, None);
        }
    }

    /// Declines the rendezvous `seq` (from [`RndvDesc::seq`]) whose descriptor the
    /// handler dropped without pulling.
    pub fn reject_seq(&mut self, seq: u64) {
        if !self.is_closed() {
            self.queue_cts(seq, 0, flags::CTS_DISCARD);
        }
    }

    /// Declines a rendezvous message; its sender sees [`SendError::Rejected`].
    pub fn reject(&mut self, desc: RndvDesc) {
        if !self.is_closed() {
            self.queue_cts(desc.seq, 0, flags::CTS_DISCARD);
        }
    }

    fn queue_cts(&mut self, seq: u64, slot: u64, cts_flags: u16) {
        let mut h = FrameHeader::new(FrameKind::Cts);
        h.seq = seq;
        h.aux = slot;
        h.flags = cts_flags;
        self.queue_frame(h, &[], &[], TxBody::None, None);
    }

    /// A RndvData header arrived: move what was read ahead, then receive the
    /// rest straight into the target.
    fn start_rndv_data(&mut self, h: FrameHeader) -> Result<(), ProtocolError> {
        let unknown = ProtocolError::UnknownRendezvous {
            kind: h.kind,
            id: h.aux,
        };
        let slot = self.rndv_in.get_mut(h.aux).ok_or(unknown.clone())?;
        if slot.seq != h.seq {
            return Err(unknown);
        }
        let want = slot.target.len();
        if h.payload_len as usize != want {
            return Err(ProtocolError::RendezvousLength {
                got: h.payload_len as usize,
                want,
            });
        }
        self.stats.frames_received += 1;
        let rx = self.rx.as_mut().expect("header was read into it");
        rx.advance(HEADER_BYTES);
        self.rx_filled -= HEADER_BYTES;
        let ahead = self.rx_filled.min(want);
        slot.target[..ahead].copy_from_slice(&rx.spare_capacity()[..ahead]);
        rx.advance(ahead);
        self.rx_filled -= ahead;
        self.stats.rndv_bytes_copied += ahead as u64;
        if ahead == want {
            self.finish_rndv_in(h.aux);
            return Ok(());
        }
        // Nothing else can be in the buffer: the payload continues past it.
        debug_assert_eq!(self.rx_filled, 0);
        self.rx_need = HEADER_BYTES;
        self.direct = Some(Direct {
            slot: h.aux,
            filled: ahead,
        });
        Ok(())
    }

    fn finish_rndv_in(&mut self, slot: u64) {
        let done = self.rndv_in.remove(slot).expect("finished slot is live");
        let payload = done.target.freeze();
        match done.rpc {
            Some(correlation) => {
                if self.rpcs.remove(correlation).is_some() {
                    let reply = RpcReply {
                        header: done.header,
                        payload,
                    };
                    self.push_event(Event::RpcDone {
                        id: RpcId(correlation),
                        result: Ok(reply),
                    });
                } else {
                    self.stats.late_responses += 1;
                }
            }
            None => self.push_event(Event::Am(AmMessage {
                am_id: done.am_id,
                header: done.header,
                data: AmData::Pulled(payload),
                reply_to: done.reply_to,
            })),
        }
    }

    /// The next event for the driver. Taking it counts the frame behind it as
    /// handled, and returns its credit to the peer.
    pub fn poll_event(&mut self) -> Option<Event> {
        let (event, from_frame) = self.events.pop_front()?;
        if from_frame {
            self.frame_handled();
        }
        Some(event)
    }

    /// Whether events wait for the driver.
    pub fn has_events(&self) -> bool {
        !self.events.is_empty()
    }

    fn push_event(&mut self, event: Event) {
        self.events.push_back((event, false));
    }

    /// Queues the event of an Eager/Rts frame: its credit returns when taken.
    fn push_frame_event(&mut self, event: Event) {
        self.events.push_back((event, true));
    }

    /// An Eager/Rts frame is handled: its credit is owed back to the peer.
    fn frame_handled(&mut self) {
        debug_assert!(self.undelivered > 0);
        self.undelivered = self.undelivered.saturating_sub(1);
        self.owed += 1;
        self.granted += 1;
        self.maybe_return_credits();
    }

    // ------------------------------------------------------------------- time

    /// Fails RPCs whose deadline passed.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(Reverse((deadline, correlation))) = self.deadlines.peek().copied() {
            if deadline > now {
                break;
            }
            self.deadlines.pop();
            let expired = self
                .rpcs
                .get_mut(correlation)
                .is_some_and(|r| r.deadline == deadline);
            if expired {
                self.rpcs.remove(correlation);
                // A request still parked behind a peer that does not read
                // never leaves: let its buffer go now, not when the
                // connection closes (a caller retrying every timeout would
                // otherwise pile up a buffer per try).
                for p in self
                    .parked
                    .iter_mut()
                    .filter(|p| p.flags & flags::RPC_REQUEST != 0 && p.correlation == correlation)
                {
                    p.cancelled = true;
                    p.payload = None;
                }
                self.push_event(Event::RpcDone {
                    id: RpcId(correlation),
                    result: Err(RpcError::Timeout),
                });
            }
        }
    }

    /// The earliest RPC deadline (possibly of one already answered: waking early is harmless).
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.deadlines.peek().map(|Reverse((d, _))| *d)
    }

    // -------------------------------------------------------------- lifecycle

    /// Starts an orderly close: a Close frame is queued and later sends fail.
    pub fn close(&mut self, reason: &str) {
        if self.is_closed() {
            return;
        }
        let mut end = reason.len().min(CLOSE_REASON_BYTES_MAX);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        let mut h = FrameHeader::new(FrameKind::Close);
        h.header_len = end as u32;
        self.queue_frame(h, &reason.as_bytes()[..end], &[], TxBody::None, None);
        self.fail_pending(SendError::Disconnected, RpcError::Disconnected);
        self.state = State::Closing;
        self.push_event(Event::Closed(CloseReason::Local(reason.to_string())));
    }

    fn close_with(&mut self, reason: CloseReason) {
        if let CloseReason::Protocol(e) = &reason {
            // Tell the peer why, best effort; the driver flushes before closing.
            let text = e.to_string();
            self.close(&text);
            if let Some((Event::Closed(r), _)) = self.events.back_mut() {
                *r = reason;
            }
        }
    }

    /// The transport is gone: everything outstanding fails.
    pub fn handle_disconnect(&mut self, reason: CloseReason) {
        if self.state == State::Closed {
            return;
        }
        let announce = self.state != State::Closing;
        self.fail_pending(SendError::Disconnected, RpcError::Disconnected);
        while let Some(item) = self.tx_items.pop_front() {
            if let Some(id) = item.done {
                self.push_event(Event::SendDone {
                    id,
                    result: Err(SendError::Disconnected),
                });
            }
        }
        self.tx_fifo = ByteFifo::with_capacity(0);
        self.rx = None;
        self.tx_written = 0;
        self.state = State::Closed;
        if announce {
            self.push_event(Event::Closed(reason));
        }
    }

    fn fail_pending(&mut self, send_error: SendError, rpc_error: RpcError) {
        while let Some(p) = self.parked.pop_front() {
            self.fail_send(p.done, p.flags, p.correlation, send_error.clone());
        }
        self.parked_fifo = ByteFifo::with_capacity(0);
        let outs: Vec<_> = self.rndv_out.drain().map(|(_, o)| o).collect();
        for out in outs {
            if let Some(id) = out.done {
                self.push_event(Event::SendDone {
                    id,
                    result: Err(send_error.clone()),
                });
            }
        }
        let ins: Vec<_> = self.rndv_in.drain().collect();
        for (key, rin) in ins {
            if rin.remote.is_some() {
                // Its read may be in flight: the target must outlive it.
                self.orphan_reads.push((key, rin.target));
            }
            if rin.rpc.is_none() {
                self.push_event(Event::Am(AmMessage {
                    am_id: rin.am_id,
                    header: rin.header,
                    data: AmData::Aborted,
                    reply_to: rin.reply_to,
                }));
            }
        }
        self.direct = None;
        let rpcs: Vec<_> = self.rpcs.drain().map(|(k, _)| k).collect();
        for correlation in rpcs {
            self.push_event(Event::RpcDone {
                id: RpcId(correlation),
                result: Err(rpc_error.clone()),
            });
        }
        self.deadlines.clear();
    }
}

#[cfg(test)]
#[path = "proto_tests.rs"]
mod tests;
