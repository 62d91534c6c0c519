//! The storage engine of a chunkserver: chunks of 16 MiB in preallocated
//! files, overwritten in place with io_uring, O_DIRECT and fixed buffers from
//! the fabric's arena, a checksum per 4 KiB page, snapshots and clones.
//!
//! Curve's lesson (its ChunkServer talk): preallocated chunk files written in
//! place keep the filesystem's metadata work off the write path. Files come
//! formatted from a pool ([`pool`]); their format is in [`format`]; the engine
//! is [`ChunkStore`].
//!
//! Not here: replication, the network, the Raft log. A corrupt page is
//! reported ([`StoreError::Corrupt`]); repairing it is the replica layer's job.

pub mod error;
pub mod flush;
pub mod format;
pub mod pool;
pub mod store;
pub mod uring;

pub use error::{IoErrno, StoreError};
pub use format::{CloneSource, CHUNK_BYTES, PAGE_BYTES};
pub use store::{ChunkStat, ChunkStore, Done, OwedSync, StoreConfig};

/// Names a chunk: the copyset it belongs to and its id there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkKey {
    pub copyset: u32,
    pub chunk: u64,
}

impl std::fmt::Display for ChunkKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.copyset, self.chunk)
    }
}
