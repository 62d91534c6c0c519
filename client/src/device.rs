//! A block device as the NBD server (and anything else that exports a
//! volume) sees it: a size and byte-addressed async IO. `Volume` is the real
//! one; `MemoryDevice` backs tests of the protocol.

use std::future::Future;
use std::io;
use std::sync::Mutex;

/// A block device. Offsets and lengths are bytes; callers keep IO inside
/// `size()` (implementations still check and answer `InvalidInput`).
pub trait BlockDevice: Send + Sync + 'static {
    fn size(&self) -> u64;
    /// Whether writes are refused (the device was opened read-only).
    fn read_only(&self) -> bool;
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> impl Future<Output = io::Result<()>> + Send;
    fn write_at(&self, offset: u64, data: &[u8]) -> impl Future<Output = io::Result<()>> + Send;
    /// Makes every completed write durable.
    fn flush(&self) -> impl Future<Output = io::Result<()>> + Send;
    /// The range's contents are no longer needed (they may read as zeros).
    fn trim(&self, offset: u64, len: u64) -> impl Future<Output = io::Result<()>> + Send;
    /// The range reads as zeros afterwards.
    fn write_zeroes(&self, offset: u64, len: u64) -> impl Future<Output = io::Result<()>> + Send;
}

/// Checks that `[offset, offset + len)` lies inside a device of `size`.
pub fn check_range(offset: u64, len: u64, size: u64) -> io::Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("IO at {offset}+{len} is outside the device of {size} bytes"),
        )),
    }
}

/// A device in memory, for tests.
pub struct MemoryDevice {
    data: Mutex<Vec<u8>>,
    read_only: bool,
}

impl MemoryDevice {
    pub fn new(size: usize) -> MemoryDevice {
        MemoryDevice {
            data: Mutex::new(vec![0; size]),
            read_only: false,
        }
    }

    pub fn read_only(size: usize) -> MemoryDevice {
        MemoryDevice {
            read_only: true,
            ..MemoryDevice::new(size)
        }
    }

    /// A copy of the contents.
    pub fn contents(&self) -> Vec<u8> {
        self.data.lock().expect("memory device lock").clone()
    }

    fn range(&self, offset: u64, len: usize) -> io::Result<std::ops::Range<usize>> {
        check_range(offset, len as u64, self.size())?;
        Ok(offset as usize..offset as usize + len)
    }

    fn writable(&self) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "the device is read-only",
            ));
        }
        Ok(())
    }
}

impl BlockDevice for MemoryDevice {
    fn size(&self) -> u64 {
        self.data.lock().expect("memory device lock").len() as u64
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let range = self.range(offset, buf.len())?;
        buf.copy_from_slice(&self.data.lock().expect("memory device lock")[range]);
        Ok(())
    }

    async fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.writable()?;
        let range = self.range(offset, data.len())?;
        self.data.lock().expect("memory device lock")[range].copy_from_slice(data);
        Ok(())
    }

    async fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    async fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        self.write_zeroes(offset, len).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.writable()?;
        let range = self.range(offset, len as usize)?;
        self.data.lock().expect("memory device lock")[range].fill(0);
        Ok(())
    }
}
