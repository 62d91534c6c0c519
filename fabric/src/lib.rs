//! Quiver's transport: active messages and RPC between workers, over verbs RDMA
//! or TCP, on buffers from one registered memory arena.
//!
//! Layers, bottom up:
//! - [`arena`] (its own crate): the memory every payload lives in.
//! - [`wire`]: the frame format, rkyv-archived and validated on receipt.
//! - [`proto`]: one connection's protocol (framing, credits, eager/rendezvous,
//!   RPC matching) as a sans-IO state machine.
//! - [`rpc`]: typed request/response methods over those RPCs.
//! - [`verbs`]: RDMA device discovery (libibverbs loaded at run time).
//! - [`worker`]: the progress engine that drives connections over a transport
//!   backend (TCP today), runs handlers, and polls adaptively.
//!
//! The fabric knows nothing of Raft, chunks or volumes: it moves messages.

pub use quiver_arena as arena;

pub mod echo;
pub mod proto;
pub mod rpc;
mod slab;
pub mod verbs;
pub mod wire;
pub mod worker;

pub use proto::{
    AmData, AmMessage, ConnConfig, Payload, RpcError, RpcId, RpcReply, SendError, SendId,
};
pub use worker::{
    AmContext, AmHandler, Completion, EndpointId, Worker, WorkerConfig, WorkerError, WorkerWaker,
};
