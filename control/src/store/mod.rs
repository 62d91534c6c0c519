//! The metadata store: one trait, two backends. The control leader keeps
//! the whole model in memory (as Curve's MDS does) and writes every change
//! through to the store before it takes effect, so the store is only ever
//! loaded in full (on winning leadership) and written in atomic batches.

mod embedded;
mod etcd;

use std::future::Future;

pub use embedded::EmbeddedStore;
pub use etcd::{EtcdConfig, EtcdStore};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// This node stopped leading: its writes are refused (fencing).
    #[error("this control node is no longer the leader")]
    NotLeader,
    #[error("metadata store unreachable: {0}")]
    Unreachable(String),
    #[error("metadata store: {0}")]
    Backend(String),
}

/// Puts and deletes applied all together or not at all.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Batch {
    pub puts: Vec<(String, Vec<u8>)>,
    pub deletes: Vec<String>,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.puts.is_empty() && self.deletes.is_empty()
    }
}

/// Who leads the control plane, as the store records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderRecord {
    pub name: String,
    /// The gRPC address clients should use.
    pub addr: String,
}

/// A metadata store. Keys are UTF-8 paths (`volume/NAME`, `copyset/17`);
/// values are opaque bytes.
pub trait MetaStore: Send + Sync + 'static {
    /// `embedded` or `etcd`, for `quiver status`.
    fn kind(&self) -> &'static str;

    /// Every key under `prefix` with its value, in key order.
    fn load(
        &self,
        prefix: &str,
    ) -> impl Future<Output = Result<Vec<(String, Vec<u8>)>, StoreError>> + Send;

    /// Applies `batch` atomically, only while this node leads.
    fn apply(&self, batch: Batch) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Waits until this node leads (at once for the embedded store).
    fn campaign(&self) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// True while this node leads; turns false when it loses leadership
    /// (its lease expired or the store became unreachable).
    fn leadership(&self) -> watch::Receiver<bool>;

    /// The current leader, if any.
    fn leader(&self) -> impl Future<Output = Result<Option<LeaderRecord>, StoreError>> + Send;

    /// Gives up leadership now (a clean shutdown), so another node need not
    /// wait for a lease to expire.
    fn resign(&self) -> impl Future<Output = Result<(), StoreError>> + Send;
}
