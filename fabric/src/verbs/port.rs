//! A worker's verbs resources, and one endpoint's queue pair: how the fabric
//! protocol ([`crate::proto::Connection`]) runs over RDMA inside a worker.
//!
//! Per worker ([`VerbsPort`]): the device, the arena registered once
//! (`ibv_reg_mr` over the whole region), one completion queue for every
//! queue pair's sends, reads and receives, its completion channel (a file
//! descriptor in the worker's epoll set, for sleeping), and one shared receive
//! queue of pre-posted arena buffers. Per endpoint ([`QpPath`]): an RC queue
//! pair and a few registered staging buffers for SENDs.
//!
//! The connection's frame stream travels in SENDs of at most [`SEND_BYTES`]
//! (frames copied into staging: small frames are cheaper copied than
//! described; up to the device's inline limit they go inline). Rendezvous
//! payloads do not travel in the stream: endpoints run with remote read, so a
//! receiver that takes a message reads it straight from the sender's arena
//! with RDMA READ into the buffer its handler chose (no clear-to-send round
//! trip, no copy), and a Fin frame releases the sender's buffer. The
//! alternative, WRITE_WITH_IMM after a clear-to-send, takes as many one-way
//! trips (Rts, Cts, write against Rts, read request, read response); remote
//! read was chosen because the sender's CPU does nothing until the Fin and
//! no target address has to travel back (reasoned, not measured: only
//! remote read is built).
//!
//! Receives: a connection's credits bound the Eager and Rts frames in flight,
//! every other frame answers one of those, and a frame touches at most three
//! SENDs, so one connection needs at most [`recvs_needed`] receives. The
//! shared queue holds that many for the first endpoint plus
//! [`SRQ_RECVS_PER_ENDPOINT`] for each further one, up to
//! [`VerbsConfig::srq_recvs_max`]; RNR retries stay enabled as a backstop for
//! many endpoints bursting at once, never as the flow control. Never a
//! zero-byte SEND: every SEND carries at least a frame header.

use std::collections::VecDeque;
use std::os::fd::RawFd;

use quiver_arena::{Arena, BufMut};

use super::rc::{CompChannel, Completion, Cq, QpInfo, RcDevice, RcQp, Srq, WR_RDMA_READ, WR_SEND};
use super::{Gid, VerbsUnavailable};
use crate::proto::{ConnConfig, Connection};
use crate::transport::VerbsOffer;

/// Bytes of stream one SEND carries at most (and each posted receive holds).
pub const SEND_BYTES: usize = 64 << 10;
/// Staging buffers (SENDs in flight) per endpoint.
pub const STAGING_SLOTS: usize = 16;
/// Receives added to the shared queue per endpoint after the first.
pub const SRQ_RECVS_PER_ENDPOINT: usize = 32;
/// Completions taken per CQ poll.
const CQ_BATCH: usize = 32;
/// At most this many SENDs in a row go unsignaled: a completion per SEND is
/// CQ work on the hot path, and a signaled SEND's completion frees the
/// staging buffers of the unsignaled ones before it (a QP's sends complete in
/// order).
const SENDS_PER_SIGNAL_MAX: usize = 8;

/// What a work request was, in the top byte of its wr_id.
pub const KIND_SEND: u64 = 1;
pub const KIND_RECV: u64 = 2;
pub const KIND_READ: u64 = 3;

fn wr_id(kind: u64, index: u64) -> u64 {
    (kind << 56) | index
}

/// Splits a wr_id into (kind, index).
pub fn split_wr_id(wr_id: u64) -> (u64, u64) {
    (wr_id >> 56, wr_id & ((1 << 56) - 1))
}

/// Receives one connection with `config` can need at once (see the module docs).
pub fn recvs_needed(config: &ConnConfig) -> usize {
    3 * config.credits as usize + 32
}

/// Settings of a worker's verbs port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerbsConfig {
    /// Device name (None: the first with an active port).
    pub device: Option<String>,
    /// GID index (None: the first IPv4-mapped entry, RoCE v2).
    pub gid_index: Option<u8>,
    /// Receives the shared queue holds at most.
    pub srq_recvs_max: usize,
    /// Completion queue entries: bounds the endpoints one worker runs over verbs.
    pub cq_entries: usize,
}

impl Default for VerbsConfig {
    /// Device and GID index from `QUIVER_RDMA_DEVICE` and
    /// `QUIVER_RDMA_GID_INDEX` when set, chosen automatically otherwise.
    fn default() -> Self {
        VerbsConfig {
            device: std::env::var("QUIVER_RDMA_DEVICE")
                .ok()
                .filter(|d| !d.is_empty()),
            gid_index: std::env::var("QUIVER_RDMA_GID_INDEX")
                .ok()
                .and_then(|g| g.parse().ok()),
            srq_recvs_max: 1024,
            cq_entries: 16384,
        }
    }
}

/// Send-queue depth of a QP: staging SENDs plus one READ per credit and slack.
fn send_depth(config: &ConnConfig) -> usize {
    STAGING_SLOTS + config.credits as usize + 16
}

/// A worker's device, completion queue, channel and shared receive queue.
/// Field order is drop order: the receive queue and CQ before the channel and
/// the device (every QP is dropped by the worker before the port).
pub struct VerbsPort {
    srq: Srq,
    cq: Cq,
    channel: CompChannel,
    dev: RcDevice,
    device_name: String,
    mtu: u32,
    lkey: u32,
    rkey: u32,
    arena: Arena,
    conn_config: ConnConfig,
    recvs: Vec<BufMut>,
    recvs_target: usize,
    srq_recvs_max: usize,
    cq_entries: usize,
    /// CQ entries reserved by live QPs' send queues.
    cq_reserved: usize,
    armed: bool,
    next_psn: u32,
}

impl VerbsPort {
    /// Opens the device and registers `arena`'s whole region with it.
    pub fn open(
        arena: &Arena,
        conn_config: ConnConfig,
        config: &VerbsConfig,
    ) -> Result<VerbsPort, VerbsUnavailable> {
        let (name, port) = match &config.device {
            None => super::usable_port()?,
            Some(want) => super::devices()?
                .into_iter()
                .filter(|d| &d.name == want)
                .find_map(|d| {
                    let name = d.name;
                    d.ports
                        .into_iter()
                        .find(|p| p.state == super::PortState::Active)
                        .map(|p| (name, p))
                })
                .ok_or(VerbsUnavailable::NoDevice)?,
        };
        let gid_index = match config.gid_index {
            Some(i) => i,
            None => port
                .preferred_gid_index()
                .and_then(|i| u8::try_from(i).ok())
                .ok_or_else(|| VerbsUnavailable::Call {
                    device: name.clone(),
                    call: "choosing a GID",
                    error: "the port has no GID".into(),
                })?,
        };
        let span = arena.region_span();
        // SAFETY: the port keeps a clone of the arena, so the region outlives
        // the registration (the device is dropped before `arena`).
        let dev = unsafe { RcDevice::open(&name, port.port, gid_index, span.addr, span.bytes) }?;
        let (lkey, rkey) = dev.keys();
        let channel = dev.create_channel()?;
        set_nonblocking(channel.fd()).map_err(|e| VerbsUnavailable::Call {
            device: name.clone(),
            call: "fcntl(O_NONBLOCK) on the completion channel",
            error: e.to_string(),
        })?;
        let cq_entries = config.cq_entries.max(config.srq_recvs_max + 256);
        let cq = dev.create_cq(cq_entries as i32, Some(&channel))?;
        let srq = dev.create_srq(config.srq_recvs_max as u32)?;
        tracing::info!(device = %name, port = port.port, gid_index, mtu = port.active_mtu, "verbs port open");
        Ok(VerbsPort {
            srq,
            cq,
            channel,
            dev,
            device_name: name,
            mtu: port.active_mtu.clamp(256, 4096),
            lkey,
            rkey,
            arena: arena.clone(),
            conn_config,
            recvs: Vec::new(),
            recvs_target: 0,
            srq_recvs_max: config.srq_recvs_max,
            cq_entries,
            cq_reserved: config.srq_recvs_max,
            armed: false,
            next_psn: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.subsec_nanos()),
        })
    }

    pub fn device_name(&self) -> &str {
        &self.device_name
    }

    pub fn gid(&self) -> Gid {
        self.dev.gid()
    }

    /// The remote key of the registered arena: rendezvous offers carry it.
    pub fn rkey(&self) -> u32 {
        self.rkey
    }

    /// The completion channel's descriptor, for epoll.
    pub fn fd(&self) -> RawFd {
        self.channel.fd()
    }

    /// A queue pair for a new endpoint, and the offer that describes it.
    /// Grows the shared receive queue for it.
    pub fn new_qp(&mut self) -> Result<(QpPath, VerbsOffer), VerbsUnavailable> {
        let depth = send_depth(&self.conn_config);
        if self.cq_reserved + depth > self.cq_entries {
            return Err(VerbsUnavailable::Call {
                device: self.device_name.clone(),
                call: "admitting an endpoint",
                error: format!(
                    "the completion queue ({} entries) is fully reserved; raise cq_entries",
                    self.cq_entries
                ),
            });
        }
        let qp = self
            .dev
            .create_qp(&self.cq, Some(&self.srq), depth as u32)?;
        let alloc_error = |e: quiver_arena::ArenaError| VerbsUnavailable::Call {
            device: self.device_name.clone(),
            call: "allocating staging buffers",
            error: e.to_string(),
        };
        let staging = (0..STAGING_SLOTS)
            .map(|_| self.arena.alloc(SEND_BYTES))
            .collect::<Result<Vec<_>, _>>()
            .map_err(alloc_error)?;
        let more = if self.recvs_target == 0 {
            recvs_needed(&self.conn_config)
        } else {
            SRQ_RECVS_PER_ENDPOINT
        };
        self.recvs_target = (self.recvs_target + more).min(self.srq_recvs_max);
        self.fill_srq()?;
        self.cq_reserved += depth;
        self.next_psn = self
            .next_psn
            .wrapping_mul(1_103_515_245)
            .wrapping_add(12_345);
        let psn = self.next_psn & 0x00ff_ffff;
        let offer = VerbsOffer {
            qpn: qp.qpn(),
            psn,
            gid: self.gid().0,
            mtu: self.mtu,
            rkey: self.rkey,
        };
        Ok((
            QpPath {
                qp,
                psn,
                staging,
                staging_free: (0..STAGING_SLOTS).rev().collect(),
                reads_in_flight: 0,
                pending: VecDeque::new(),
                posted: VecDeque::with_capacity(STAGING_SLOTS),
                unsignaled: 0,
                depth,
                flushing: false,
            },
            offer,
        ))
    }

    /// Gives back a removed endpoint's share of the completion queue.
    pub fn release_qp(&mut self, path: &QpPath) {
        self.cq_reserved -= path.depth;
    }

    /// Allocates and posts receives up to the target (as far as the arena allows).
    fn fill_srq(&mut self) -> Result<(), VerbsUnavailable> {
        while self.recvs.len() < self.recvs_target {
            let Ok(buf) = self.arena.alloc(SEND_BYTES) else {
                tracing::warn!(
                    posted = self.recvs.len(),
                    wanted = self.recvs_target,
                    "arena exhausted: fewer shared receives than planned"
                );
                break;
            };
            self.recvs.push(buf);
            self.post_recv(self.recvs.len() - 1)?;
        }
        Ok(())
    }

    /// Posts receive buffer `index` (again) on the shared queue.
    pub fn post_recv(&mut self, index: usize) -> Result<(), VerbsUnavailable> {
        let addr = self.recvs[index].spare_capacity().as_ptr() as u64;
        self.srq.post_recv(
            wr_id(KIND_RECV, index as u64),
            addr,
            SEND_BYTES as u32,
            self.lkey,
        )
    }

    /// The bytes a completed receive holds.
    pub fn received(&mut self, index: usize, len: usize) -> &[u8] {
        &self.recvs[index].spare_capacity()[..len]
    }

    /// Takes ready completions into `out` (cleared first).
    pub fn poll(&mut self, out: &mut Vec<Completion>) -> Result<usize, VerbsUnavailable> {
        out.clear();
        self.cq.poll(out, CQ_BATCH)
    }

    /// Before sleeping: asks for an event at the next completion. The caller
    /// polls once more afterwards (a completion may have slipped in between).
    pub fn arm(&mut self) -> Result<(), VerbsUnavailable> {
        if !self.armed {
            self.cq.arm()?;
            self.armed = true;
        }
        Ok(())
    }

    /// After the channel's descriptor was readable: acknowledges the event.
    pub fn take_event(&mut self) {
        if self.armed {
            match self.channel.take_event(&self.cq) {
                Ok(()) => self.armed = false,
                // EAGAIN: a wake-up for an event already taken.
                Err(e) => tracing::trace!(error = %e, "no completion event to take"),
            }
        }
    }

    pub fn lkey(&self) -> u32 {
        self.lkey
    }

    /// The port's active MTU in bytes.
    pub fn mtu(&self) -> u32 {
        self.mtu
    }
}

/// One endpoint's queue pair, staging buffers and undelivered receives.
pub struct QpPath {
    qp: RcQp,
    psn: u32,
    staging: Vec<BufMut>,
    staging_free: Vec<usize>,
    reads_in_flight: usize,
    /// Shared-queue receives (index, bytes delivered, length) waiting for the
    /// connection to take them: in arrival order, behind a receiver out of
    /// arena buffers.
    pub pending: VecDeque<(usize, usize, usize)>,
    /// Staging slots of posted SENDs, in posting order.
    posted: VecDeque<usize>,
    /// SENDs posted unsignaled since the last signaled one.
    unsignaled: usize,
    depth: usize,
    flushing: bool,
}

impl QpPath {
    pub fn qpn(&self) -> u32 {
        self.qp.qpn()
    }

    /// Connects to the peer's queue pair (RESET to RTS).
    pub fn connect(&mut self, local_mtu: u32, peer: &VerbsOffer) -> Result<(), VerbsUnavailable> {
        self.qp.connect(
            self.psn,
            QpInfo {
                qpn: peer.qpn,
                psn: peer.psn,
                gid: Gid(peer.gid),
                mtu: local_mtu.min(peer.mtu),
            },
        )
    }

    /// Whether no SEND or READ of this QP is outstanding.
    pub fn quiet(&self) -> bool {
        self.staging_free.len() == self.staging.len() && self.reads_in_flight == 0
    }

    /// Whether what is outstanding will never complete by itself: unsignaled
    /// SENDs only, with no signaled request behind them.
    pub fn stalled(&self) -> bool {
        !self.quiet() && self.reads_in_flight == 0 && self.posted.len() == self.unsignaled
    }

    /// A SEND completed (signaled, or any SEND with an error): its staging
    /// buffer and those of the SENDs before it are free again.
    pub fn send_done(&mut self, slot: usize) {
        if !self.posted.contains(&slot) {
            tracing::error!(slot, "completion of a SEND that is not outstanding");
            return;
        }
        while let Some(done) = self.posted.pop_front() {
            self.staging_free.push(done);
            if done == slot {
                break;
            }
        }
    }

    /// Moves the queue pair to the error state (once), so its outstanding
    /// work requests complete with flush errors instead of waiting out retries.
    pub fn flush_outstanding(&mut self) {
        if !self.flushing {
            self.flushing = true;
            if let Err(e) = self.qp.move_to_error() {
                tracing::warn!(error = %e, "moving a queue pair to the error state failed");
            }
        }
    }

    pub fn read_done(&mut self) {
        self.reads_in_flight -= 1;
    }

    /// Copies queued frames into free staging buffers and SENDs them.
    pub fn transmit(
        &mut self,
        conn: &mut Connection,
        lkey: u32,
    ) -> Result<usize, VerbsUnavailable> {
        let mut sends = 0;
        while conn.wants_transmit() {
            let Some(slot) = self.staging_free.pop() else {
                break;
            };
            let space = self.staging[slot].spare_capacity();
            let mut filled = 0;
            {
                let mut iov = [std::io::IoSlice::new(&[]); 64];
                let n = conn.transmit_iovecs(&mut iov);
                for slice in &iov[..n] {
                    let take = slice.len().min(SEND_BYTES - filled);
                    space[filled..filled + take].copy_from_slice(&slice[..take]);
                    filled += take;
                    if filled == SEND_BYTES {
                        break;
                    }
                }
            }
            assert!(
                filled > 0,
                "a connection that wants to transmit offered no bytes"
            );
            conn.handle_transmitted(filled);
            let addr = space.as_ptr() as u64;
            // Signal the last SEND before the staging runs out, every few
            // SENDs, and a closing connection's (its end waits for quiet).
            let signaled = self.staging_free.is_empty()
                || self.unsignaled + 1 >= SENDS_PER_SIGNAL_MAX
                || conn.is_closed();
            if let Err(e) = self.qp.post_send_signaled(
                wr_id(KIND_SEND, slot as u64),
                WR_SEND,
                (addr, filled as u32, lkey),
                None,
                signaled,
            ) {
                self.staging_free.push(slot);
                return Err(e);
            }
            self.posted.push_back(slot);
            self.unsignaled = if signaled { 0 } else { self.unsignaled + 1 };
            sends += 1;
        }
        Ok(sends)
    }

    /// Reads `len` bytes at the peer's `remote_addr` under `rkey` into the
    /// connection's target for `slot`.
    pub fn post_read(
        &mut self,
        conn: &mut Connection,
        slot: u64,
        (remote_addr, rkey, len): (u64, u32, usize),
        lkey: u32,
    ) -> Result<(), VerbsUnavailable> {
        let Some(target) = conn.read_target(slot) else {
            return Ok(());
        };
        let addr = target.as_mut_ptr() as u64;
        self.qp.post_send(
            wr_id(KIND_READ, slot),
            WR_RDMA_READ,
            addr,
            len as u32,
            lkey,
            Some((remote_addr, rkey)),
        )?;
        self.reads_in_flight += 1;
        Ok(())
    }
}

fn set_nonblocking(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: fcntl on a descriptor we own, with integer arguments.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Names of `ibv_wc_status` values, for disconnect reasons.
pub fn wc_status_name(status: u32) -> &'static str {
    match status {
        0 => "IBV_WC_SUCCESS",
        1 => "IBV_WC_LOC_LEN_ERR",
        2 => "IBV_WC_LOC_QP_OP_ERR",
        4 => "IBV_WC_LOC_PROT_ERR",
        5 => "IBV_WC_WR_FLUSH_ERR",
        9 => "IBV_WC_REM_INV_REQ_ERR",
        10 => "IBV_WC_REM_ACCESS_ERR",
        11 => "IBV_WC_REM_OP_ERR",
        12 => "IBV_WC_RETRY_EXC_ERR",
        13 => "IBV_WC_RNR_RETRY_EXC_ERR",
        _ => "IBV_WC error",
    }
}
