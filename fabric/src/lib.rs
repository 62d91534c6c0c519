//! Quiver's transport: active messages and RPC between workers, over verbs RDMA
//! or TCP, on buffers from one registered memory arena.
//!
//! Layers, bottom up:
//! - [`arena`] (its own crate): the memory every payload lives in.
//! - [`wire`]: the frame format, rkyv-archived and validated on receipt.
//! - [`proto`]: one connection's protocol (framing, credits, eager/rendezvous,
//!   RPC matching) as a sans-IO state machine.
//! - [`rpc`]: typed request/response methods over those RPCs.
//! - [`verbs`]: RDMA over libibverbs loaded at run time: discovery, RC queue
//!   pairs, and the worker's port (registration, CQ, shared receive queue).
//! - [`transport`]: the per-endpoint choice between verbs and TCP.
//! - [`worker`]: the progress engine that drives connections over verbs or
//!   TCP, runs handlers, and polls adaptively.
//!
//! The fabric knows nothing of Raft, chunks or volumes: it moves messages.

pub use quiver_arena as arena;

pub mod echo;
pub mod proto;
pub mod rpc;
mod slab;
pub mod transport;
pub mod verbs;
pub mod wire;
pub mod worker;

pub use proto::{
    AmData, AmMessage, ConnConfig, Payload, RpcError, RpcId, RpcReply, SendError, SendId,
};
pub use transport::TransportChoice;
pub use worker::{
    AmContext, AmHandler, Completion, EndpointId, EndpointTransport, Sleep, Worker, WorkerConfig,
    WorkerError, WorkerWaker,
};
