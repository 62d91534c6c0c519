//! The chunk service's messages: what clients (and followers fetching a
//! snapshot) ask a chunkserver, and its answers. Pure encoding, no IO.
//!
//! A request travels as a fabric RPC of [`crate::net::Service::Chunk`]: the
//! 9-byte header is the request kind and the copyset id, the body is the
//! request's fields in little endian (then the data, for a write). A write or
//! delete goes into the copyset's Raft log as it came: kind byte, then body.
//! An answer's header is one status byte: [`STATUS_OK`] with the result in
//! the body (read data, or JSON for the others), or [`STATUS_ERR`] with a
//! [`ChunkError`] as JSON.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use quiver_chunkstore::{CHUNK_BYTES, PAGE_BYTES};

pub const KIND_WRITE: u8 = 1;
pub const KIND_READ: u8 = 2;
pub const KIND_DELETE: u8 = 3;
pub const KIND_LEADER: u8 = 4;
pub const KIND_CREATE_COPYSET: u8 = 5;
pub const KIND_STATUS: u8 = 6;
pub const KIND_TRANSFER_LEADER: u8 = 7;
pub const KIND_CAMPAIGN: u8 = 8;
pub const KIND_CHANGE_PEERS: u8 = 9;

pub const STATUS_OK: u8 = 0;
pub const STATUS_ERR: u8 = 1;

/// The largest read or write one request carries.
pub const IO_BYTES_MAX: usize = 1 << 20;
/// The largest write that fits one fabric message (1 MiB of payload) with
/// its 32-byte prefix: a page less than [`IO_BYTES_MAX`].
pub const WRITE_BYTES_MAX: usize = IO_BYTES_MAX - PAGE_BYTES;

/// Why a chunk request failed. Sent to the caller as is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum ChunkError {
    #[error("copyset {0} is not hosted here")]
    NoSuchCopyset(u32),
    #[error("copyset {copyset}: not the leader (leader: {})", leader_addr.as_deref().unwrap_or("unknown"))]
    NotLeader {
        copyset: u32,
        leader: Option<u64>,
        leader_addr: Option<String>,
    },
    #[error("chunk {copyset}/{chunk} does not exist")]
    NoSuchChunk { copyset: u32, chunk: u64 },
    #[error("IO at offset {offset}, length {len}: not {PAGE_BYTES}-byte aligned")]
    Unaligned { offset: u64, len: u64 },
    #[error("IO at offset {offset}, length {len}: outside the chunk of {CHUNK_BYTES} bytes or over {IO_BYTES_MAX} bytes")]
    OutOfRange { offset: u64, len: u64 },
    #[error("copyset {0} exists already")]
    CopysetExists(u32),
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("storage: {0}")]
    Storage(String),
    #[error("raft: {0}")]
    Raft(String),
    /// A volume writer that lost its lease: a newer writer has written.
    #[error("chunk {copyset}/{chunk}: write epoch {epoch} is stale (epoch {current} has written)")]
    StaleEpoch {
        copyset: u32,
        chunk: u64,
        epoch: u64,
        current: u64,
    },
    /// The server has this many requests in service already: retry later.
    #[error("busy: {0} requests in service")]
    Busy(usize),
}

/// A chunk operation that goes through the Raft log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mutation<'a> {
    Write {
        chunk: u64,
        offset: u64,
        sn: u64,
        /// The writer's fencing epoch: a chunk refuses writes older than
        /// the newest it applied (0: not fenced).
        epoch: u64,
        data: &'a [u8],
    },
    Delete {
        chunk: u64,
    },
}

/// A decoded request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request<'a> {
    Mutate(Mutation<'a>),
    /// A read; `any_replica` lets a follower answer from its own state (a
    /// snapshot fetch), otherwise only the leader answers.
    Read {
        chunk: u64,
        offset: u64,
        len: u64,
        any_replica: bool,
    },
    Leader,
    CreateCopyset(CopysetSpec),
    Status,
    /// To the leader: hand leadership to member `to`.
    TransferLeader {
        to: u64,
    },
    /// From a leader handing over: stand for election now.
    Campaign,
    /// To the leader: add a member, remove one, or both (a replacement).
    ChangePeers(PeerChange),
}

/// A membership change of a copyset. An added member gets the copyset
/// created, catches up as a learner, and only then becomes a voter; the
/// removal (if any) happens in the same joint-consensus change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerChange {
    pub add: Option<(u64, String)>,
    pub remove: Option<u64>,
}

/// A copyset to create on a chunkserver: its members by Raft node id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopysetSpec {
    pub peers: BTreeMap<u64, String>,
    /// Whether this member initializes the group (exactly one does).
    pub bootstrap: bool,
}

/// The member that initializes copyset `copyset`: they take turns by
/// copyset id, so first leaders (the initializer usually wins the first
/// election) spread over the servers.
pub fn bootstrap_member(copyset: u32, peers: &BTreeMap<u64, String>) -> Option<u64> {
    let n = peers.len();
    (n > 0).then(|| *peers.keys().nth(copyset as usize % n).expect("in range"))
}

/// Where a copyset's leader is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderInfo {
    pub leader: Option<u64>,
    pub leader_addr: Option<String>,
    pub term: u64,
}

/// A chunkserver's view of one copyset it hosts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopysetStatus {
    pub copyset: u32,
    pub leader: Option<u64>,
    pub term: u64,
    pub last_applied: Option<u64>,
    pub last_log: Option<u64>,
    pub snapshot: Option<u64>,
    pub voters: Vec<u64>,
    /// Members still catching up (not voting yet).
    #[serde(default)]
    pub learners: Vec<u64>,
    /// The membership in force: its log index + 1 (0: none yet).
    #[serde(default)]
    pub epoch: u64,
    pub chunks: usize,
    /// Payload bytes of the log entries this member holds (until purged;
    /// bounded by `log_mem_mib`).
    #[serde(default)]
    pub log_bytes: u64,
    /// Bytes of those entries' data held in memory: entries not yet applied
    /// (or not yet written); the rest are read from disk when wanted.
    #[serde(default)]
    pub log_held_bytes: u64,
}

/// What `status` answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerStatus {
    pub node: u64,
    pub addr: String,
    pub transport: String,
    pub copysets: Vec<CopysetStatus>,
    /// Formatted chunk files ready, and how many the pool keeps.
    #[serde(default)]
    pub pool_free: usize,
    #[serde(default)]
    pub pool_files: usize,
}

fn u64_at(body: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(body.get(at..at + 8)?.try_into().ok()?))
}

/// Checks an IO's range against a chunk: aligned, non-empty, inside, bounded.
pub fn check_io(offset: u64, len: u64) -> Result<(), ChunkError> {
    let page = PAGE_BYTES as u64;
    if !offset.is_multiple_of(page) || !len.is_multiple_of(page) {
        return Err(ChunkError::Unaligned { offset, len });
    }
    let inside = offset
        .checked_add(len)
        .is_some_and(|end| end <= CHUNK_BYTES);
    if len == 0 || len > IO_BYTES_MAX as u64 || !inside {
        return Err(ChunkError::OutOfRange { offset, len });
    }
    Ok(())
}

/// Bytes in front of a write's data: chunk, offset, sequence, epoch.
const WRITE_PREFIX: usize = 32;

/// Encodes a write's body (the header carries the kind and copyset).
/// `epoch` is the volume writer's fencing epoch (0: a raw chunk write, not
/// fenced).
pub fn write_body(chunk: u64, offset: u64, sn: u64, epoch: u64, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(WRITE_PREFIX + data.len());
    out.extend_from_slice(&chunk.to_le_bytes());
    out.extend_from_slice(&offset.to_le_bytes());
    out.extend_from_slice(&sn.to_le_bytes());
    out.extend_from_slice(&epoch.to_le_bytes());
    out.extend_from_slice(data);
    out
}

pub fn read_body(chunk: u64, offset: u64, len: u64, any_replica: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(25);
    out.extend_from_slice(&chunk.to_le_bytes());
    out.extend_from_slice(&offset.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    out.push(u8::from(any_replica));
    out
}

pub fn delete_body(chunk: u64) -> Vec<u8> {
    chunk.to_le_bytes().to_vec()
}

/// A mutation as a request: its kind and its body.
pub fn encode_mutation(m: &Mutation<'_>) -> (u8, Vec<u8>) {
    match *m {
        Mutation::Write {
            chunk,
            offset,
            sn,
            epoch,
            data,
        } => (KIND_WRITE, write_body(chunk, offset, sn, epoch, data)),
        Mutation::Delete { chunk } => (KIND_DELETE, delete_body(chunk)),
    }
}

/// Decodes a request of `kind` from its body, checking IO ranges.
pub fn decode_request(kind: u8, body: &[u8]) -> Result<Request<'_>, ChunkError> {
    let short = || ChunkError::BadRequest(format!("request kind {kind}: body too short"));
    match kind {
        KIND_WRITE | KIND_DELETE => match decode_mutation(kind, body)? {
            // Chunk sequence numbers start copy-on-write snapshots, which a
            // copyset's Raft snapshot does not carry yet: refused until it does.
            Mutation::Write { sn, .. } if sn != 0 => Err(ChunkError::BadRequest(format!(
                "write sequence number {sn}: chunk snapshots are not replicated yet"
            ))),
            m => Ok(Request::Mutate(m)),
        },
        KIND_READ => {
            if body.len() != 25 {
                return Err(short());
            }
            let (chunk, offset, len) = (
                u64_at(body, 0).ok_or_else(short)?,
                u64_at(body, 8).ok_or_else(short)?,
                u64_at(body, 16).ok_or_else(short)?,
            );
            check_io(offset, len)?;
            Ok(Request::Read {
                chunk,
                offset,
                len,
                any_replica: body[24] != 0,
            })
        }
        KIND_LEADER => Ok(Request::Leader),
        KIND_STATUS => Ok(Request::Status),
        KIND_CAMPAIGN => Ok(Request::Campaign),
        KIND_CHANGE_PEERS => serde_json::from_slice(body)
            .map(Request::ChangePeers)
            .map_err(|e| ChunkError::BadRequest(format!("peer change: {e}"))),
        KIND_TRANSFER_LEADER => match <[u8; 8]>::try_from(body) {
            Ok(to) => Ok(Request::TransferLeader {
                to: u64::from_le_bytes(to),
            }),
            Err(_) => Err(short()),
        },
        KIND_CREATE_COPYSET => serde_json::from_slice(body)
            .map(Request::CreateCopyset)
            .map_err(|e| ChunkError::BadRequest(format!("copyset spec: {e}"))),
        other => Err(ChunkError::BadRequest(format!(
            "unknown request kind {other}"
        ))),
    }
}

/// Decodes a mutation (from a request, or from a Raft log entry).
pub fn decode_mutation(kind: u8, body: &[u8]) -> Result<Mutation<'_>, ChunkError> {
    let short = || ChunkError::BadRequest(format!("request kind {kind}: body too short"));
    match kind {
        KIND_WRITE => {
            let (chunk, offset, sn, epoch) = (
                u64_at(body, 0).ok_or_else(short)?,
                u64_at(body, 8).ok_or_else(short)?,
                u64_at(body, 16).ok_or_else(short)?,
                u64_at(body, 24).ok_or_else(short)?,
            );
            let data = &body[WRITE_PREFIX..];
            check_io(offset, data.len() as u64)?;
            Ok(Mutation::Write {
                chunk,
                offset,
                sn,
                epoch,
                data,
            })
        }
        KIND_DELETE => {
            if body.len() != 8 {
                return Err(short());
            }
            Ok(Mutation::Delete {
                chunk: u64_at(body, 0).ok_or_else(short)?,
            })
        }
        other => Err(ChunkError::BadRequest(format!(
            "request kind {other} is not a mutation"
        ))),
    }
}

/// Encodes an error answer's body (its header is [`STATUS_ERR`]).
pub fn error_body(e: &ChunkError) -> Vec<u8> {
    serde_json::to_vec(e).expect("a ChunkError serializes")
}

/// Decodes an answer: its status byte and body.
pub fn decode_answer(header: &[u8], body: &[u8]) -> Result<(), ChunkError> {
    match header {
        [STATUS_OK] => Ok(()),
        [STATUS_ERR] => Err(serde_json::from_slice(body)
            .unwrap_or_else(|e| ChunkError::BadRequest(format!("undecodable error answer: {e}")))),
        other => Err(ChunkError::BadRequest(format!(
            "answer with a bad status header {other:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_round_trips_and_keeps_its_data_in_place() {
        let data = vec![7u8; 8192];
        let body = write_body(9, 4096, 0, 7, &data);
        let Request::Mutate(Mutation::Write {
            chunk,
            offset,
            sn,
            epoch,
            data: d,
        }) = decode_request(KIND_WRITE, &body).unwrap()
        else {
            panic!("not a write")
        };
        assert_eq!((chunk, offset, sn, epoch, d), (9, 4096, 0, 7, &data[..]));
        // In the log, a sequence number decodes; from a client it is refused
        // until chunk snapshots replicate.
        let body = write_body(9, 4096, 2, 0, &data);
        assert!(matches!(
            decode_mutation(KIND_WRITE, &body),
            Ok(Mutation::Write { sn: 2, .. })
        ));
        assert!(matches!(
            decode_request(KIND_WRITE, &body),
            Err(ChunkError::BadRequest(_))
        ));
    }

    #[test]
    fn bad_ranges_and_short_bodies_are_typed_errors() {
        let unaligned = write_body(1, 100, 0, 0, &[0; 4096]);
        assert_eq!(
            decode_request(KIND_WRITE, &unaligned),
            Err(ChunkError::Unaligned {
                offset: 100,
                len: 4096
            })
        );
        let outside = write_body(1, CHUNK_BYTES - 4096, 0, 0, &[0; 8192]);
        assert!(matches!(
            decode_request(KIND_WRITE, &outside),
            Err(ChunkError::OutOfRange { .. })
        ));
        let empty = write_body(1, 0, 0, 0, &[]);
        assert!(matches!(
            decode_request(KIND_WRITE, &empty),
            Err(ChunkError::OutOfRange { .. })
        ));
        let huge = read_body(1, 0, 2 << 20, false);
        assert!(matches!(
            decode_request(KIND_READ, &huge),
            Err(ChunkError::OutOfRange { .. })
        ));
        let overflow = read_body(1, u64::MAX - 4095, 4096, false);
        assert!(matches!(
            decode_request(KIND_READ, &overflow),
            Err(ChunkError::OutOfRange { .. })
        ));
        for kind in [KIND_WRITE, KIND_READ, KIND_DELETE] {
            assert!(matches!(
                decode_request(kind, &[1, 2, 3]),
                Err(ChunkError::BadRequest(_))
            ));
        }
        assert!(matches!(
            decode_request(99, &[]),
            Err(ChunkError::BadRequest(_))
        ));
        assert!(matches!(
            decode_request(KIND_CREATE_COPYSET, b"{"),
            Err(ChunkError::BadRequest(_))
        ));
    }

    #[test]
    fn answers_carry_typed_errors() {
        let e = ChunkError::NotLeader {
            copyset: 3,
            leader: Some(2),
            leader_addr: Some("127.0.0.1:9".into()),
        };
        assert_eq!(decode_answer(&[STATUS_ERR], &error_body(&e)), Err(e));
        assert_eq!(decode_answer(&[STATUS_OK], b"x"), Ok(()));
        assert!(decode_answer(&[], b"").is_err());
        assert!(decode_answer(&[STATUS_ERR], b"garbage").is_err());
    }
}
