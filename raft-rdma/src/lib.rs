//! Raft for copysets, and the chunkserver that hosts them.
//!
//! - [`log`]: the log engine, one per disk and shared by every copyset on it,
//!   with group commit; [`store`]: openraft's log storage on it.
//! - [`net`]: openraft's network (and the chunk service) over the fabric;
//!   [`append`]: AppendEntries on it, entry data kept where they are ([`data`]).
//! - [`machine`]: a copyset's state machine on the chunk store.
//! - [`service`]: the chunk service's messages (sans-IO);
//!   [`chunk_client`]: its client, following leaders.
//! - [`chunkserver`]: the process that hosts many copysets on one disk.

pub mod append;
pub mod chunk_client;
pub mod chunkserver;
pub mod data;
pub mod log;
pub mod machine;
pub mod net;
pub mod service;
pub mod store;
