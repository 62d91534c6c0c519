//! One connection's protocol over an RC queue pair: the first verbs driver of
//! [`crate::proto::Connection`].
//!
//! The connection's frame stream travels in SENDs of at most [`SEND_BYTES`]
//! (copied into registered staging buffers: small frames are cheaper copied
//! than described), received into buffers posted on the QP and fed to the
//! stream parser. Rendezvous payloads do not travel in the stream: the
//! connection runs with `remote_read`, so a receiver that pulls a message
//! reads it straight from the sender's arena with RDMA READ into the buffer it
//! chose, and a Fin frame releases the sender's buffer.
//!
//! No receiver runs dry: the connection's credits bound the Eager and Rts
//! frames in flight, every other frame answers one of those, and a frame (at
//! most the eager limit plus headers, under 70 KiB) touches at most three
//! SENDs, so [`recvs_posted`] receives (three per credit, plus slack for the
//! answering frames) cover the worst case. RNR retries stay enabled as a
//! backstop, never as the flow control.
//!
//! Not yet here: a shared receive queue across links, sleeping on the CQ's
//! channel inside the worker's epoll, and out-of-band setup over TCP. This
//! driver is progressed by its owner, like a worker.

use std::time::Instant;

use quiver_arena::{Arena, BufMut};

use super::rc::{Completion, Cq, QpInfo, RcDevice, RcQp, WR_RDMA_READ, WR_SEND};
use super::VerbsUnavailable;
use crate::proto::{ConnConfig, Connection, Event, ProtocolError};

/// Bytes of stream one SEND carries at most (and each posted receive holds).
pub const SEND_BYTES: usize = 64 << 10;
/// Staging buffers for SENDs in flight.
const STAGING_SLOTS: usize = 16;
/// Receives kept posted beyond three per credit, for frames that answer others.
const RECVS_SLACK: usize = 32;

/// Receives a link keeps posted for `config` (see the module docs).
pub fn recvs_posted(config: &ConnConfig) -> usize {
    3 * config.credits as usize + RECVS_SLACK
}
/// Completions taken per CQ poll.
const CQ_BATCH: usize = 32;

/// What a work request was, in its wr_id: `kind << 56 | index`.
const KIND_SEND: u64 = 1;
const KIND_RECV: u64 = 2;
const KIND_READ: u64 = 3;

fn wr_id(kind: u64, index: u64) -> u64 {
    (kind << 56) | index
}

/// Why a link stopped.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error(transparent)]
    Verbs(#[from] VerbsUnavailable),
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("work request {wr_id:#x} failed with ibv_wc_status {status}")]
    WorkRequest { wr_id: u64, status: u32 },
    #[error("no arena buffer: {0}")]
    NoBuffer(String),
}

/// A connection driven over an RC queue pair.
pub struct VerbsLink {
    conn: Connection,
    qp: RcQp,
    cq: Cq,
    lkey: u32,
    staging: Vec<BufMut>,
    staging_free: Vec<usize>,
    recvs: Vec<BufMut>,
    completions: Vec<Completion>,
    /// Events for the owner (messages, RPC results, send completions).
    events: std::collections::VecDeque<Event>,
    psn: u32,
}

impl VerbsLink {
    /// A link on `dev` whose buffers come from `arena` (registered with `dev`).
    pub fn new(
        dev: &RcDevice,
        arena: &Arena,
        config: ConnConfig,
        psn: u32,
    ) -> Result<VerbsLink, LinkError> {
        let config = ConnConfig {
            remote_read: true,
            ..config
        };
        let recvs = recvs_posted(&config);
        let cq = dev.create_cq((recvs + STAGING_SLOTS + 64) as i32, None)?;
        let qp = dev.create_qp(&cq, None, recvs as u32)?;
        let (lkey, _) = dev.keys();
        let alloc = |n: usize| -> Result<Vec<BufMut>, LinkError> {
            (0..n)
                .map(|_| {
                    arena
                        .alloc(SEND_BYTES)
                        .map_err(|e| LinkError::NoBuffer(e.to_string()))
                })
                .collect()
        };
        Ok(VerbsLink {
            conn: Connection::new(arena.clone(), config),
            qp,
            cq,
            lkey,
            staging: alloc(STAGING_SLOTS)?,
            staging_free: (0..STAGING_SLOTS).rev().collect(),
            recvs: alloc(recvs)?,
            completions: Vec::with_capacity(CQ_BATCH),
            events: std::collections::VecDeque::with_capacity(64),
            psn,
        })
    }

    /// What the peer needs to connect (sent out of band).
    pub fn info(&self, gid: super::Gid) -> QpInfo {
        QpInfo {
            qpn: self.qp.qpn(),
            psn: self.psn,
            gid,
        }
    }

    /// Connects to the peer and posts the receives.
    pub fn connect(&mut self, peer: QpInfo) -> Result<(), LinkError> {
        self.qp.connect(self.psn, peer)?;
        for i in 0..self.recvs.len() {
            self.post_recv(i)?;
        }
        Ok(())
    }

    fn post_recv(&mut self, index: usize) -> Result<(), LinkError> {
        let buf = &mut self.recvs[index];
        let addr = buf.spare_capacity().as_ptr() as u64;
        self.qp.post_recv(
            wr_id(KIND_RECV, index as u64),
            addr,
            SEND_BYTES as u32,
            self.lkey,
        )?;
        Ok(())
    }

    /// The protocol state, to send, call, reply and pull through.
    pub fn conn(&mut self) -> &mut Connection {
        &mut self.conn
    }

    /// The next event for the owner.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Does the work that is ready: completions, the protocol's events (reads
    /// it asks for are posted here), and the frames it wants sent. Returns
    /// how much happened.
    pub fn progress(&mut self, now: Instant) -> Result<usize, LinkError> {
        let mut work = 0;
        self.completions.clear();
        let mut completions = std::mem::take(&mut self.completions);
        self.cq.poll(&mut completions, CQ_BATCH)?;
        for &c in &completions {
            work += 1;
            if c.status != 0 {
                self.completions = completions;
                return Err(LinkError::WorkRequest {
                    wr_id: c.wr_id,
                    status: c.status,
                });
            }
            let index = (c.wr_id & ((1 << 56) - 1)) as usize;
            match c.wr_id >> 56 {
                KIND_SEND => self.staging_free.push(index),
                KIND_RECV => {
                    self.deliver(now, index, c.byte_len as usize)?;
                    self.post_recv(index)?;
                }
                KIND_READ => self.conn.handle_read_done(index as u64, true),
                other => tracing::error!(kind = other, "completion of an unknown work request"),
            }
        }
        self.completions = completions;
        work += self.pump_events()?;
        work += self.transmit()?;
        self.conn.handle_timeout(now);
        Ok(work)
    }

    /// Feeds a received SEND's bytes to the stream parser.
    fn deliver(&mut self, now: Instant, index: usize, len: usize) -> Result<(), LinkError> {
        let mut offset = 0;
        while offset < len {
            let space = self
                .conn
                .recv_space()
                .ok_or_else(|| LinkError::NoBuffer("no receive buffer for the stream".into()))?;
            let n = space.len().min(len - offset);
            space[..n].copy_from_slice(&self.recvs[index].spare_capacity()[offset..offset + n]);
            offset += n;
            self.conn.handle_recv(now, n)?;
        }
        Ok(())
    }

    /// Takes the connection's events: posts the reads it asks for, keeps the
    /// rest for the owner.
    fn pump_events(&mut self) -> Result<usize, LinkError> {
        let mut work = 0;
        while let Some(event) = self.conn.poll_event() {
            work += 1;
            match event {
                Event::ReadRequest {
                    slot,
                    remote_addr,
                    rkey,
                    len,
                } => {
                    let Some(target) = self.conn.read_target(slot) else {
                        continue;
                    };
                    let addr = target.as_mut_ptr() as u64;
                    let posted = self.qp.post_send(
                        wr_id(KIND_READ, slot),
                        WR_RDMA_READ,
                        addr,
                        len as u32,
                        self.lkey,
                        Some((remote_addr, rkey)),
                    );
                    if let Err(e) = posted {
                        tracing::warn!(error = %e, "posting an RDMA READ failed");
                        self.conn.handle_read_done(slot, false);
                    }
                }
                other => self.events.push_back(other),
            }
        }
        Ok(work)
    }

    /// Copies queued frames into staging buffers and SENDs them.
    fn transmit(&mut self) -> Result<usize, LinkError> {
        let mut sends = 0;
        while self.conn.wants_transmit() {
            let Some(slot) = self.staging_free.pop() else {
                break;
            };
            let stage = &mut self.staging[slot];
            let space = stage.spare_capacity();
            let mut filled = 0;
            {
                let mut iov = [std::io::IoSlice::new(&[]); 64];
                let n = self.conn.transmit_iovecs(&mut iov);
                for slice in &iov[..n] {
                    let take = slice.len().min(SEND_BYTES - filled);
                    space[filled..filled + take].copy_from_slice(&slice[..take]);
                    filled += take;
                    if filled == SEND_BYTES {
                        break;
                    }
                }
            }
            self.conn.handle_transmitted(filled);
            let addr = self.staging[slot].spare_capacity().as_ptr() as u64;
            self.qp.post_send(
                wr_id(KIND_SEND, slot as u64),
                WR_SEND,
                addr,
                filled as u32,
                self.lkey,
                None,
            )?;
            sends += 1;
        }
        Ok(sends)
    }
}
