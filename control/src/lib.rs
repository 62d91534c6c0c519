//! The Quiver control plane (Curve's MDS): what exists and where it lives.
//! Off the IO path: clients ask it where a volume's segments are and cache
//! the answer; chunkservers report to it and carry out its decisions.
//!
//! - [`meta`]: the persistent model and the volume operations on it (pure)
//! - [`placement`], [`scheduler`]: where replicas go and what to move (pure)
//! - [`store`]: the metadata store trait, embedded (redb) and etcd
//! - [`service`]: the gRPC service, leadership and the scheduler loop
//! - [`client`]: the client every other part uses

pub mod client;
pub mod config;
pub mod meta;
pub mod placement;
pub mod scheduler;
pub mod service;
pub mod store;

pub use client::{ControlClient, ControlClientError};
pub use config::{ControlConfig, DEFAULT_CONTROL_ADDR};
pub use service::ControlNode;

/// Generated gRPC code.
pub mod proto {
    tonic::include_proto!("quiver.control");
}
