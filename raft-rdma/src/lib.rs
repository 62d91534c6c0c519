//! Raft for copysets: openraft over the fabric, a shared io_uring log engine per disk, the copyset host. (Not yet written.)
