//! Raft for copysets. Today: the log engine ([`log`]), one per disk and shared
//! by every copyset on it, with group commit; openraft's log storage on it
//! ([`store`]); openraft's network over the fabric ([`net`]). The state
//! machine on the chunk store and the chunkserver process are issue 5's
//! remaining work.

pub mod log;
pub mod net;
pub mod store;
