//! The Quiver client side: the volume library, the NBD server, and what the
//! `quiver` CLI shares with them.

pub mod capi;
pub mod device;
pub mod nbd;
pub mod volume;

pub use device::{BlockDevice, MemoryDevice};
pub use volume::{Cluster, ClusterOptions, OpenMode, Volume, VolumeError};
