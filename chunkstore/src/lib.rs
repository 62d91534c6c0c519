//! Chunk storage: io_uring chunk files, the chunk file pool, per-page checksums, snapshots and clones. (Not yet written.)
