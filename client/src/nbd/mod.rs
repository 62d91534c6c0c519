//! The NBD server: exports a [`BlockDevice`](crate::device::BlockDevice) to
//! qemu, nbdinfo, fio, the kernel's nbd client and the like, over TCP or a
//! Unix socket. [`proto`] is the protocol without IO; `server` the tokio
//! side.

pub mod proto;
mod server;

pub use server::{serve, Bound, NbdListener};
