//! Errors of the chunk store. Every errno the kernel returns maps to a variant.

use std::io;
use std::path::PathBuf;

use crate::ChunkKey;

/// An errno from an IO, typed by what the caller can do about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IoErrno {
    /// ENOSPC or EDQUOT: the filesystem is full.
    #[error("no space left on the device")]
    NoSpace,
    /// EFBIG: the file would exceed a size limit (RLIMIT_FSIZE or the filesystem's).
    #[error("file size limit exceeded")]
    FileTooLarge,
    /// EIO: the device failed the IO.
    #[error("device IO error")]
    Device,
    /// EINVAL on O_DIRECT: misaligned buffer, offset or length (a bug of ours).
    #[error("invalid argument (O_DIRECT alignment?)")]
    Invalid,
    /// ECANCELED: the ring cancelled the operation.
    #[error("cancelled")]
    Cancelled,
    /// EROFS: the filesystem went read-only.
    #[error("read-only filesystem")]
    ReadOnly,
    /// Any other errno.
    #[error("errno {0}")]
    Other(i32),
}

impl IoErrno {
    pub fn from_errno(errno: i32) -> IoErrno {
        match errno {
            libc::ENOSPC | libc::EDQUOT => IoErrno::NoSpace,
            libc::EFBIG => IoErrno::FileTooLarge,
            libc::EIO => IoErrno::Device,
            libc::EINVAL => IoErrno::Invalid,
            libc::ECANCELED => IoErrno::Cancelled,
            libc::EROFS => IoErrno::ReadOnly,
            other => IoErrno::Other(other),
        }
    }

    pub fn from_io(e: &io::Error) -> IoErrno {
        e.raw_os_error()
            .map_or(IoErrno::Other(0), IoErrno::from_errno)
    }
}

/// Errors of chunk store operations.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The kernel lacks something the store needs; the message says what and how to fix it.
    #[error("kernel support missing: {0}")]
    Unsupported(String),
    /// Offset or length not a multiple of 4 KiB.
    #[error("unaligned IO: offset {offset}, length {len} (must be multiples of 4096)")]
    Unaligned { offset: u64, len: usize },
    /// The range leaves the chunk.
    #[error("IO of {len} bytes at {offset} is outside the {size}-byte chunk")]
    OutOfRange { offset: u64, len: usize, size: u64 },
    #[error("chunk {0} does not exist")]
    NoSuchChunk(ChunkKey),
    #[error("chunk {0} already exists")]
    ChunkExists(ChunkKey),
    #[error("chunk {0} has no snapshot")]
    NoSnapshot(ChunkKey),
    /// A write carried a sequence number older than the chunk's.
    #[error("chunk {chunk}: write sequence {got} is older than the chunk's {current}")]
    StaleSequence {
        chunk: ChunkKey,
        got: u64,
        current: u64,
    },
    /// A new snapshot was needed while one is still kept (one per chunk).
    #[error("chunk {chunk}: snapshot at sequence {kept} must be deleted before sequence {wanted} writes")]
    SnapshotExists {
        chunk: ChunkKey,
        kept: u64,
        wanted: u64,
    },
    /// A page failed its checksum; the replica layer repairs it.
    #[error("chunk {chunk}: page {page} failed its checksum")]
    Corrupt { chunk: ChunkKey, page: u32 },
    /// The chunk file pool has no formatted file left.
    #[error("chunk file pool exhausted ({formatted} formatted files all in use); format more or delete chunks")]
    PoolExhausted { formatted: usize },
    /// A buffer the IO needs could not be had from the arena.
    #[error("no arena buffer: {0}")]
    NoBuffer(String),
    /// A buffer not from the arena registered with the ring.
    #[error("buffer is not registered with io_uring (not from the store's arena)")]
    Unregistered,
    /// A metadata page failed validation.
    #[error("{path}: bad metadata page: {reason}")]
    BadMeta { path: PathBuf, reason: String },
    /// An IO failed.
    #[error("{op} {path}: {errno}")]
    Io {
        op: &'static str,
        path: PathBuf,
        errno: IoErrno,
    },
    /// Too many operations in flight (the store's op table is full).
    #[error("too many operations in flight ({0})")]
    Busy(usize),
    /// Every registered file slot holds an open chunk or snapshot file.
    #[error("too many open chunk and snapshot files: all {0} file slots are in use (raise open_files_max)")]
    TooManyFiles(u32),
    /// The chunk is a clone whose source is gone.
    #[error("clone source of {0} is missing")]
    MissingSource(ChunkKey),
}

impl StoreError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, e: &io::Error) -> StoreError {
        StoreError::Io {
            op,
            path: path.into(),
            errno: IoErrno::from_io(e),
        }
    }
}
