//! The C ABI (`libquiver_client.so`, header `include/quiver.h`, generated
//! by cbindgen): connect, open, read, write, flush, close, and asynchronous
//! reads and writes with a completion callback, for databases and HPC codes.
//!
//! Errors are negative errno values (`-EINVAL` out of range, `-EPERM`
//! read-only or fenced, `-EIO` otherwise); `quiver_last_error` gives the
//! calling thread's last message. A cluster handle owns a small runtime
//! (two threads) that runs every volume's IO; completion callbacks run on
//! those threads and must not call the blocking functions.

use std::cell::RefCell;
use std::ffi::{c_char, c_int, c_void, CStr, CString};

use crate::volume::{Cluster, OpenMode, Volume, VolumeError};

/// Open for reading only.
pub const QUIVER_RDONLY: c_int = 0;
/// Open as the volume's exclusive writer.
pub const QUIVER_RDWR: c_int = 1;
/// With `QUIVER_RDWR`: take the volume from another writer (it is fenced).
pub const QUIVER_FORCE: c_int = 2;

/// A connection to a cluster (opaque).
pub struct QuiverCluster {
    runtime: tokio::runtime::Runtime,
    cluster: Cluster,
}

/// An open volume (opaque).
pub struct QuiverVolume {
    runtime: tokio::runtime::Handle,
    volume: Volume,
}

/// Called once when an asynchronous IO finishes: `result` is 0 or a
/// negative errno.
pub type QuiverCallback = Option<unsafe extern "C" fn(arg: *mut c_void, result: i64)>;

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_error(message: impl std::fmt::Display) {
    let text = CString::new(message.to_string().replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = text);
}

fn errno(e: &VolumeError) -> i64 {
    -i64::from(match e {
        VolumeError::OutOfRange { .. } => libc::EINVAL,
        VolumeError::ReadOnly(_) | VolumeError::Fenced { .. } => libc::EPERM,
        _ => libc::EIO,
    })
}

fn fail(e: VolumeError) -> i64 {
    let code = errno(&e);
    set_error(e);
    code
}

/// # Safety
/// `s` is null or a NUL-terminated string.
unsafe fn string(s: *const c_char, what: &str) -> Option<String> {
    if s.is_null() {
        set_error(format!("{what} is null"));
        return None;
    }
    // SAFETY: the caller passes a NUL-terminated string.
    match unsafe { CStr::from_ptr(s) }.to_str() {
        Ok(s) => Some(s.to_owned()),
        Err(_) => {
            set_error(format!("{what} is not UTF-8"));
            None
        }
    }
}

/// The calling thread's last error message (valid until its next call).
#[no_mangle]
pub extern "C" fn quiver_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// Connects to the control nodes `endpoints` (comma separated `host:port`)
/// with the cluster's `token`. Null on failure (see `quiver_last_error`).
///
/// # Safety
/// Both arguments are NUL-terminated strings.
#[no_mangle]
pub unsafe extern "C" fn quiver_connect(
    endpoints: *const c_char,
    token: *const c_char,
) -> *mut QuiverCluster {
    // SAFETY: forwarded caller contract.
    let (Some(endpoints), Some(token)) = (unsafe { string(endpoints, "endpoints") }, unsafe {
        string(token, "token")
    }) else {
        return std::ptr::null_mut();
    };
    let endpoints: Vec<String> = endpoints.split(',').map(|e| e.trim().to_owned()).collect();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("quiver-io")
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            set_error(format!("starting the IO runtime: {e}"));
            return std::ptr::null_mut();
        }
    };
    match runtime.block_on(Cluster::connect(&endpoints, &token)) {
        Ok(cluster) => Box::into_raw(Box::new(QuiverCluster { runtime, cluster })),
        Err(e) => {
            set_error(e);
            std::ptr::null_mut()
        }
    }
}

/// Disconnects. Volumes opened from it must be closed first.
///
/// # Safety
/// `cluster` came from `quiver_connect` and is not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn quiver_disconnect(cluster: *mut QuiverCluster) {
    if !cluster.is_null() {
        // SAFETY: the caller hands back what quiver_connect returned.
        drop(unsafe { Box::from_raw(cluster) });
    }
}

/// Opens volume `name` with `QUIVER_RDONLY`, or `QUIVER_RDWR` (optionally
/// `| QUIVER_FORCE`). Null on failure.
///
/// # Safety
/// `cluster` is live; `name` is a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn quiver_open(
    cluster: *mut QuiverCluster,
    name: *const c_char,
    flags: c_int,
) -> *mut QuiverVolume {
    // SAFETY: forwarded caller contract.
    let (Some(c), Some(name)) = (unsafe { cluster.as_ref() }, unsafe { string(name, "name") })
    else {
        if cluster.is_null() {
            set_error("cluster is null");
        }
        return std::ptr::null_mut();
    };
    let mode = if flags & QUIVER_RDWR != 0 {
        OpenMode::ReadWrite {
            force: flags & QUIVER_FORCE != 0,
        }
    } else {
        OpenMode::ReadOnly
    };
    match c.runtime.block_on(c.cluster.open(&name, mode)) {
        Ok(volume) => Box::into_raw(Box::new(QuiverVolume {
            runtime: c.runtime.handle().clone(),
            volume,
        })),
        Err(e) => {
            set_error(e);
            std::ptr::null_mut()
        }
    }
}

/// Closes a volume (a writer gives its lease back). 0 or a negative errno;
/// the handle is freed either way.
///
/// # Safety
/// `volume` came from `quiver_open`, has no IO in flight, and is not used
/// afterwards.
#[no_mangle]
pub unsafe extern "C" fn quiver_close(volume: *mut QuiverVolume) -> c_int {
    if volume.is_null() {
        return 0;
    }
    // SAFETY: the caller hands back what quiver_open returned.
    let v = unsafe { Box::from_raw(volume) };
    match v.runtime.block_on(v.volume.clone().close()) {
        Ok(()) => 0,
        Err(e) => fail(e) as c_int,
    }
}

/// The volume's size in bytes.
///
/// # Safety
/// `volume` is live.
#[no_mangle]
pub unsafe extern "C" fn quiver_size(volume: *const QuiverVolume) -> u64 {
    // SAFETY: the caller passes a live handle.
    unsafe { volume.as_ref() }.map_or(0, |v| v.volume.size())
}

/// Reads `len` bytes at `offset` into `buf`: 0 or a negative errno.
///
/// # Safety
/// `volume` is live; `buf` has room for `len` bytes.
#[no_mangle]
pub unsafe extern "C" fn quiver_pread(
    volume: *mut QuiverVolume,
    buf: *mut c_void,
    len: usize,
    offset: u64,
) -> i64 {
    // SAFETY: the caller passes a live handle.
    let Some(v) = (unsafe { volume.as_ref() }) else {
        return -i64::from(libc::EINVAL);
    };
    // SAFETY: the caller guarantees `len` writable bytes at `buf`.
    let out = unsafe { std::slice::from_raw_parts_mut(buf.cast::<u8>(), len) };
    match v.runtime.block_on(v.volume.read_at(offset, out)) {
        Ok(()) => 0,
        Err(e) => fail(e),
    }
}

/// Writes `len` bytes from `buf` at `offset`, durable on return: 0 or a
/// negative errno.
///
/// # Safety
/// `volume` is live; `buf` holds `len` bytes.
#[no_mangle]
pub unsafe extern "C" fn quiver_pwrite(
    volume: *mut QuiverVolume,
    buf: *const c_void,
    len: usize,
    offset: u64,
) -> i64 {
    // SAFETY: the caller passes a live handle.
    let Some(v) = (unsafe { volume.as_ref() }) else {
        return -i64::from(libc::EINVAL);
    };
    // SAFETY: the caller guarantees `len` readable bytes at `buf`.
    let data = unsafe { std::slice::from_raw_parts(buf.cast::<u8>(), len) };
    match v.runtime.block_on(v.volume.write_at(offset, data)) {
        Ok(()) => 0,
        Err(e) => fail(e),
    }
}

/// Makes completed writes durable (they are already): 0 or a negative
/// errno (`-EPERM` once another writer took the volume over).
///
/// # Safety
/// `volume` is live.
#[no_mangle]
pub unsafe extern "C" fn quiver_flush(volume: *mut QuiverVolume) -> c_int {
    // SAFETY: the caller passes a live handle.
    let Some(v) = (unsafe { volume.as_ref() }) else {
        return -libc::EINVAL;
    };
    match v.runtime.block_on(v.volume.flush()) {
        Ok(()) => 0,
        Err(e) => fail(e) as c_int,
    }
}

/// A pointer the caller promises stays valid until its callback runs.
struct Raw(*mut c_void);
// SAFETY: the caller's contract makes the buffer and argument usable from
// the runtime's threads until the callback.
unsafe impl Send for Raw {}

fn submit<F>(volume: *mut QuiverVolume, callback: QuiverCallback, arg: *mut c_void, io: F) -> c_int
where
    F: FnOnce(Volume) -> std::pin::Pin<Box<dyn std::future::Future<Output = i64> + Send>>,
{
    // SAFETY: the caller passes a live handle.
    let Some(v) = (unsafe { volume.as_ref() }) else {
        return -libc::EINVAL;
    };
    let Some(callback) = callback else {
        set_error("callback is null");
        return -libc::EINVAL;
    };
    let arg = Raw(arg);
    let run = io(v.volume.clone());
    v.runtime.spawn(async move {
        let result = run.await;
        let arg = arg;
        // SAFETY: the caller's callback, with its own argument.
        unsafe { callback(arg.0, result) };
    });
    0
}

/// Starts a read of `len` bytes at `offset` into `buf`; `callback(arg,
/// result)` runs when it finishes. Returns 0 once submitted, or a negative
/// errno. Many may be in flight.
///
/// # Safety
/// `volume` stays live and `buf` valid for `len` bytes until the callback.
#[no_mangle]
pub unsafe extern "C" fn quiver_aio_read(
    volume: *mut QuiverVolume,
    buf: *mut c_void,
    len: usize,
    offset: u64,
    callback: QuiverCallback,
    arg: *mut c_void,
) -> c_int {
    let buf = Raw(buf);
    submit(volume, callback, arg, move |v| {
        Box::pin(async move {
            let buf = buf;
            // SAFETY: valid for `len` bytes until the callback (contract).
            let out = unsafe { std::slice::from_raw_parts_mut(buf.0.cast::<u8>(), len) };
            match v.read_at(offset, out).await {
                Ok(()) => 0,
                Err(e) => errno(&e),
            }
        })
    })
}

/// Starts a write of `len` bytes from `buf` at `offset`; as
/// `quiver_aio_read`.
///
/// # Safety
/// `volume` stays live and `buf` valid for `len` bytes until the callback.
#[no_mangle]
pub unsafe extern "C" fn quiver_aio_write(
    volume: *mut QuiverVolume,
    buf: *const c_void,
    len: usize,
    offset: u64,
    callback: QuiverCallback,
    arg: *mut c_void,
) -> c_int {
    let buf = Raw(buf.cast_mut());
    submit(volume, callback, arg, move |v| {
        Box::pin(async move {
            let buf = buf;
            // SAFETY: valid for `len` bytes until the callback (contract).
            let data = unsafe { std::slice::from_raw_parts(buf.0.cast::<u8>(), len) };
            match v.write_at(offset, data).await {
                Ok(()) => 0,
                Err(e) => errno(&e),
            }
        })
    })
}
