//! The memory arena: one large page-aligned region, mapped once at start, carved
//! into size-class pools of buffers.
//!
//! Every byte Quiver moves on the data path lives here, so that one registration
//! (an RDMA memory region, an io_uring fixed buffer per class) covers all of it and
//! nothing is copied between the network and the disk. Buffers are refcounted
//! handles that return to their pool when the last handle drops; taking one is a
//! pop from a preallocated free stack, so nothing is allocated on the hot path.
//!
//! Two handle types split ownership the way `bytes` does:
//! - [`BufMut`] owns a byte range exclusively and may write it;
//! - [`Buf`] is a shared, read-only view that may be cloned and sliced freely.
//!
//! A `BufMut` can hand out frozen prefixes ([`BufMut::split_frozen`]) while it keeps
//! writing after them: a receive buffer fills from a socket and each frame's payload
//! leaves as a `Buf` without a copy.
//!
//! This crate is not an allocator for general use: sizes are fixed at start, and
//! running out is an error ([`ArenaError::Exhausted`]) the caller must handle
//! (back-pressure), never a hidden fallback to the heap.

use std::fmt;
use std::ops::{Deref, DerefMut, Range};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use std::sync::Mutex;

/// Bytes of a huge page on x86_64 and aarch64 (the default `hugetlbfs` size).
const HUGE_PAGE_BYTES: usize = 2 << 20;
/// Bytes of a base page; every class boundary is aligned to it so O_DIRECT works.
pub const PAGE_BYTES: usize = 4096;
/// Marks an unset fixed-buffer index or RDMA key.
const UNSET: u32 = u32::MAX;

/// Errors of the arena.
#[derive(Debug, thiserror::Error)]
pub enum ArenaError {
    /// Every buffer of the size class that fits the request is in use.
    #[error("arena exhausted: no free buffer of {class_bytes} bytes (all {count} in use)")]
    Exhausted { class_bytes: usize, count: usize },
    /// The request is larger than the largest size class.
    #[error("request of {requested} bytes exceeds the largest buffer class ({largest} bytes)")]
    TooLarge { requested: usize, largest: usize },
    /// The configuration cannot be laid out.
    #[error("invalid arena configuration: {0}")]
    BadConfig(String),
    /// mmap failed even without huge pages.
    #[error("mapping {bytes} bytes for the arena failed: {source}")]
    Map {
        bytes: usize,
        source: std::io::Error,
    },
}

/// One pool of equal-sized buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SizeClass {
    /// Size of each buffer; a multiple of [`PAGE_BYTES`].
    pub buf_bytes: usize,
    /// How many buffers of this size the arena holds.
    pub count: usize,
}

/// How the arena is laid out; fixed for the life of the process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArenaConfig {
    /// Size classes, smallest first.
    pub classes: Vec<SizeClass>,
    /// Try to back the region with huge pages (falls back to base pages).
    pub huge_pages: bool,
}

impl Default for ArenaConfig {
    /// 4 KiB x 2048, 64 KiB x 256, 256 KiB x 64, 1 MiB x 48: 8 + 16 + 16 + 48 = 88 MiB.
    fn default() -> Self {
        let class = |buf_bytes, count| SizeClass { buf_bytes, count };
        ArenaConfig {
            classes: vec![
                class(4 << 10, 2048),
                class(64 << 10, 256),
                class(256 << 10, 64),
                class(1 << 20, 48),
            ],
            huge_pages: true,
        }
    }
}

impl ArenaConfig {
    /// Total bytes the region maps.
    pub fn total_bytes(&self) -> usize {
        self.classes.iter().map(|c| c.buf_bytes * c.count).sum()
    }

    fn validate(&self) -> Result<(), ArenaError> {
        let bad = |m: String| Err(ArenaError::BadConfig(m));
        if self.classes.is_empty() {
            return bad("no size classes".into());
        }
        let mut previous = 0;
        for class in &self.classes {
            if class.buf_bytes == 0 || !class.buf_bytes.is_multiple_of(PAGE_BYTES) {
                return bad(format!(
                    "class size {} is not a multiple of 4 KiB",
                    class.buf_bytes
                ));
            }
            if class.buf_bytes <= previous {
                return bad("size classes must be strictly increasing".into());
            }
            if class.buf_bytes > u32::MAX as usize {
                return bad(format!("class size {} exceeds 4 GiB", class.buf_bytes));
            }
            if class.count == 0 {
                return bad(format!("class of {} bytes has no buffers", class.buf_bytes));
            }
            previous = class.buf_bytes;
        }
        let slots: usize = self.classes.iter().map(|c| c.count).sum();
        if slots >= u32::MAX as usize {
            return bad("too many buffers".into());
        }
        Ok(())
    }
}

/// A stack of free slot indexes. A mutex held for a push or pop only: the
/// common case is one thread, uncontended, about as cheap as a lock-free queue.
struct FreeStack(Mutex<Vec<u32>>);

impl FreeStack {
    fn with_capacity(capacity: usize) -> FreeStack {
        FreeStack(Mutex::new(Vec::with_capacity(capacity)))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u32>> {
        // A panic while holding this lock cannot leave the Vec inconsistent.
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Never grows past the capacity: every slot is pushed at most once.
    fn push(&self, slot: u32) {
        let mut free = self.lock();
        debug_assert!(free.len() < free.capacity());
        free.push(slot);
    }

    fn pop(&self) -> Option<u32> {
        self.lock().pop()
    }

    fn len(&self) -> usize {
        self.lock().len()
    }
}

/// The mapped region; unmapped when the last arena or buffer handle is gone.
struct Region {
    base: NonNull<u8>,
    bytes: usize,
    huge_pages: bool,
}

// SAFETY: the region is plain memory; access to its bytes is governed by the
// exclusive/shared split of `BufMut`/`Buf`.
unsafe impl Send for Region {}
unsafe impl Sync for Region {}

impl Region {
    fn map(bytes: usize, want_huge: bool) -> Result<Region, ArenaError> {
        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE;
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        if want_huge && bytes.is_multiple_of(HUGE_PAGE_BYTES) {
            // SAFETY: anonymous mapping with no address hint; checked for MAP_FAILED.
            let ptr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    bytes,
                    prot,
                    flags | libc::MAP_HUGETLB,
                    -1,
                    0,
                )
            };
            if ptr != libc::MAP_FAILED {
                return Ok(Region {
                    base: NonNull::new(ptr.cast()).expect("mmap returned null"),
                    bytes,
                    huge_pages: true,
                });
            }
            tracing::debug!(
                bytes,
                error = %std::io::Error::last_os_error(),
                "no huge pages for the arena; using 4 KiB pages"
            );
        }
        // Base pages, populated by hand below so transparent huge pages can
        // back them where the kernel allows (MAP_POPULATE would fault 4 KiB
        // pages in before the madvise could apply).
        let flags = flags & !libc::MAP_POPULATE;
        // SAFETY: as above.
        let ptr = unsafe { libc::mmap(std::ptr::null_mut(), bytes, prot, flags, -1, 0) };
        if ptr == libc::MAP_FAILED {
            return Err(ArenaError::Map {
                bytes,
                source: std::io::Error::last_os_error(),
            });
        }
        if want_huge {
            // SAFETY: the range was just mapped; advice only.
            unsafe { libc::madvise(ptr, bytes, libc::MADV_HUGEPAGE) };
        }
        for offset in (0..bytes).step_by(PAGE_BYTES) {
            // SAFETY: inside the fresh private mapping; faults the page in now
            // rather than on the data path.
            unsafe { ptr.cast::<u8>().add(offset).write_volatile(0) };
        }
        Ok(Region {
            base: NonNull::new(ptr.cast()).expect("mmap returned null"),
            bytes,
            huge_pages: false,
        })
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: base/bytes came from a successful mmap and no handle remains.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.bytes) };
    }
}

struct Class {
    buf_bytes: usize,
    count: usize,
    /// Offset of the class's first buffer in the region.
    region_offset: usize,
    /// Index of the class's first slot in `Inner::refs`.
    first_slot: u32,
    /// Free slots, used LIFO: the buffer freed last is the one most likely
    /// still in cache (a FIFO would hand out the coldest).
    free: FreeStack,
    /// io_uring fixed-buffer index registered for this class's span, or UNSET.
    fixed_index: AtomicU32,
}

struct Inner {
    id: u32,
    region: Region,
    classes: Vec<Class>,
    /// Per-slot reference counts; zero means the slot is free.
    refs: Vec<AtomicU32>,
    /// Class index of each slot.
    slot_class: Vec<u8>,
    lkey: AtomicU32,
    rkey: AtomicU32,
}

/// A handle to the arena; cheap to clone, shared by every thread.
#[derive(Clone)]
pub struct Arena {
    inner: Arc<Inner>,
}

impl fmt::Debug for Arena {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Arena")
            .field("id", &self.inner.id)
            .field("bytes", &self.inner.region.bytes)
            .field("huge_pages", &self.inner.region.huge_pages)
            .finish()
    }
}

/// Occupancy of one size class, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClassUsage {
    pub buf_bytes: usize,
    pub count: usize,
    pub free: usize,
}

/// A contiguous span of the region, as registration needs it.
#[derive(Debug, Clone, Copy)]
pub struct Span {
    pub addr: *mut u8,
    pub bytes: usize,
}

impl Arena {
    /// Maps the region and lays out the classes. The only allocation the arena makes.
    pub fn new(config: &ArenaConfig) -> Result<Arena, ArenaError> {
        static NEXT_ID: AtomicU32 = AtomicU32::new(1);
        config.validate()?;
        let total = config.total_bytes();
        let mapped = total.div_ceil(HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES;
        let region = Region::map(mapped, config.huge_pages)?;
        let mut classes = Vec::with_capacity(config.classes.len());
        let mut refs = Vec::new();
        let mut slot_class = Vec::new();
        let mut offset = 0usize;
        for (class_index, c) in config.classes.iter().enumerate() {
            let first_slot = refs.len() as u32;
            let free = FreeStack::with_capacity(c.count);
            for i in 0..c.count {
                free.push(first_slot + i as u32);
                refs.push(AtomicU32::new(0));
                slot_class.push(class_index as u8);
            }
            classes.push(Class {
                buf_bytes: c.buf_bytes,
                count: c.count,
                region_offset: offset,
                first_slot,
                free,
                fixed_index: AtomicU32::new(UNSET),
            });
            offset += c.buf_bytes * c.count;
        }
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            id,
            bytes = mapped,
            huge_pages = region.huge_pages,
            "arena mapped"
        );
        Ok(Arena {
            inner: Arc::new(Inner {
                id,
                region,
                classes,
                refs,
                slot_class,
                lkey: AtomicU32::new(UNSET),
                rkey: AtomicU32::new(UNSET),
            }),
        })
    }

    /// Takes a buffer of at least `len` bytes from the smallest class that fits;
    /// its length is `len`. Contents are whatever the last user left.
    pub fn alloc(&self, len: usize) -> Result<BufMut, ArenaError> {
        let inner = &*self.inner;
        let Some(class_index) = inner.classes.iter().position(|c| c.buf_bytes >= len) else {
            let largest = inner.classes.last().map_or(0, |c| c.buf_bytes);
            return Err(ArenaError::TooLarge {
                requested: len,
                largest,
            });
        };
        let class = &inner.classes[class_index];
        let slot = class.free.pop().ok_or(ArenaError::Exhausted {
            class_bytes: class.buf_bytes,
            count: class.count,
        })?;
        let previous = inner.refs[slot as usize].swap(1, Ordering::Acquire);
        assert_eq!(previous, 0, "arena slot {slot} handed out twice");
        // Each live slot keeps the arena alive, so buffers may outlive every `Arena`.
        let ptr = Arc::into_raw(Arc::clone(&self.inner));
        let start = class.region_offset + (slot - class.first_slot) as usize * class.buf_bytes;
        Ok(BufMut {
            view: View {
                inner: NonNull::new(ptr.cast_mut()).expect("Arc pointer is never null"),
                slot,
                start: start as u64,
                len: len as u32,
            },
            cap_end: (start + class.buf_bytes) as u64,
        })
    }

    /// Identifies this arena's region in buffer handles and registrations.
    pub fn region_id(&self) -> u32 {
        self.inner.id
    }

    /// Whether the region is backed by huge pages.
    pub fn huge_pages(&self) -> bool {
        self.inner.region.huge_pages
    }

    /// The whole region, for one RDMA memory registration.
    pub fn region_span(&self) -> Span {
        Span {
            addr: self.inner.region.base.as_ptr(),
            bytes: self.inner.region.bytes,
        }
    }

    /// One span per size class, for io_uring fixed-buffer registration (each under 1 GiB).
    pub fn class_spans(&self) -> Vec<Span> {
        let base = self.inner.region.base.as_ptr();
        self.inner
            .classes
            .iter()
            // SAFETY: the offset is inside the mapped region by construction.
            .map(|c| Span {
                addr: unsafe { base.add(c.region_offset) },
                bytes: c.buf_bytes * c.count,
            })
            .collect()
    }

    /// Records the RDMA keys of the region's memory registration.
    pub fn set_rdma_keys(&self, lkey: u32, rkey: u32) {
        self.inner.lkey.store(lkey, Ordering::Release);
        self.inner.rkey.store(rkey, Ordering::Release);
    }

    /// Records the io_uring fixed-buffer index registered for size class `class`.
    pub fn set_fixed_index(&self, class: usize, index: u16) {
        self.inner.classes[class]
            .fixed_index
            .store(u32::from(index), Ordering::Release);
    }

    /// Occupancy per class.
    pub fn usage(&self) -> Vec<ClassUsage> {
        self.inner
            .classes
            .iter()
            .map(|c| ClassUsage {
                buf_bytes: c.buf_bytes,
                count: c.count,
                free: c.free.len(),
            })
            .collect()
    }

    /// The largest buffer the arena can hand out.
    pub fn max_buf_bytes(&self) -> usize {
        self.inner.classes.last().map_or(0, |c| c.buf_bytes)
    }
}

/// Where a buffer's bytes sit, for registration-based IO.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    /// The arena's region id.
    pub region_id: u32,
    /// Offset of the first byte from the start of the region.
    pub region_offset: u64,
    /// RDMA keys of the region, once registered.
    pub rdma_keys: Option<(u32, u32)>,
    /// io_uring fixed-buffer index of the buffer's class, once registered.
    pub fixed_index: Option<u16>,
}

/// The part both handle types share: one reference on one slot, and a byte range.
struct View {
    inner: NonNull<Inner>,
    slot: u32,
    /// Byte range `[start, start + len)` within the region.
    start: u64,
    len: u32,
}

// SAFETY: the slot refcount is atomic; the bytes are either exclusively owned
// (BufMut) or read-only (Buf).
unsafe impl Send for View {}
unsafe impl Sync for View {}

impl View {
    fn inner(&self) -> &Inner {
        // SAFETY: the slot reference keeps the Arc alive (see `Arena::alloc`).
        unsafe { self.inner.as_ref() }
    }

    fn ptr(&self) -> *mut u8 {
        // SAFETY: start is inside the region by construction.
        unsafe { self.inner().region.base.as_ptr().add(self.start as usize) }
    }

    fn share(&self, start: u64, len: u32) -> View {
        let previous = self.inner().refs[self.slot as usize].fetch_add(1, Ordering::Relaxed);
        debug_assert!(previous > 0);
        View {
            inner: self.inner,
            slot: self.slot,
            start,
            len,
        }
    }

    fn placement(&self) -> Placement {
        let inner = self.inner();
        let class = &inner.classes[inner.slot_class[self.slot as usize] as usize];
        let lkey = inner.lkey.load(Ordering::Acquire);
        let rkey = inner.rkey.load(Ordering::Acquire);
        let fixed = class.fixed_index.load(Ordering::Acquire);
        Placement {
            region_id: inner.id,
            region_offset: self.start,
            rdma_keys: (lkey != UNSET).then_some((lkey, rkey)),
            fixed_index: (fixed != UNSET).then_some(fixed as u16),
        }
    }
}

impl Drop for View {
    fn drop(&mut self) {
        let inner = self.inner();
        if inner.refs[self.slot as usize].fetch_sub(1, Ordering::Release) != 1 {
            return;
        }
        std::sync::atomic::fence(Ordering::Acquire);
        let class = &inner.classes[inner.slot_class[self.slot as usize] as usize];
        class.free.push(self.slot);
        // SAFETY: balances the Arc::into_raw in `Arena::alloc`; nothing uses `inner` after.
        unsafe { Arc::from_raw(self.inner.as_ptr().cast_const()) };
    }
}

/// A shared, read-only view of arena bytes. Clone and slice freely.
pub struct Buf {
    view: View,
}

impl Buf {
    /// A view of `range` (relative to this view), sharing the same memory.
    pub fn slice(&self, range: Range<usize>) -> Buf {
        assert!(
            range.start <= range.end && range.end <= self.len(),
            "slice {range:?} out of a buffer of {} bytes",
            self.len()
        );
        Buf {
            view: self.view.share(
                self.view.start + range.start as u64,
                (range.end - range.start) as u32,
            ),
        }
    }

    /// Where these bytes sit in the arena.
    pub fn placement(&self) -> Placement {
        self.view.placement()
    }

    /// Occupancy of the size class this buffer's slot is in (whoever keeps
    /// a buffer long can see whether the class is running out).
    pub fn class_usage(&self) -> ClassUsage {
        let inner = self.view.inner();
        let class = &inner.classes[inner.slot_class[self.view.slot as usize] as usize];
        ClassUsage {
            buf_bytes: class.buf_bytes,
            count: class.count,
            free: class.free.len(),
        }
    }

    /// If this is the only handle on its slot, the writable buffer back.
    pub fn try_into_mut(self) -> Result<BufMut, Buf> {
        let inner = self.view.inner();
        if inner.refs[self.view.slot as usize].load(Ordering::Acquire) != 1 {
            return Err(self);
        }
        let class = &inner.classes[inner.slot_class[self.view.slot as usize] as usize];
        let slot_start = class.region_offset as u64
            + u64::from(self.view.slot - class.first_slot) * class.buf_bytes as u64;
        let cap_end = slot_start + class.buf_bytes as u64;
        Ok(BufMut {
            view: self.view,
            cap_end,
        })
    }
}

impl Clone for Buf {
    fn clone(&self) -> Buf {
        Buf {
            view: self.view.share(self.view.start, self.view.len),
        }
    }
}

impl Deref for Buf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: the range is inside the region and no BufMut covers it.
        unsafe { std::slice::from_raw_parts(self.view.ptr(), self.view.len as usize) }
    }
}

impl AsRef<[u8]> for Buf {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl fmt::Debug for Buf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Buf(slot {}, {} bytes at {})",
            self.view.slot, self.view.len, self.view.start
        )
    }
}

/// Exclusive, writable arena bytes. Its length may grow up to its capacity.
pub struct BufMut {
    view: View,
    /// End of the slot: the limit `len` may grow to.
    cap_end: u64,
}

impl BufMut {
    /// Bytes this buffer can hold from its start.
    pub fn capacity(&self) -> usize {
        (self.cap_end - self.view.start) as usize
    }

    /// Sets the length; the bytes between the old and the new length are stale.
    pub fn set_len(&mut self, len: usize) {
        assert!(
            len <= self.capacity(),
            "length {len} beyond capacity {}",
            self.capacity()
        );
        self.view.len = len as u32;
    }

    /// The whole capacity as a writable slice (for reads from a socket or a disk).
    pub fn spare_capacity(&mut self) -> &mut [u8] {
        let cap = self.capacity();
        // SAFETY: [start, cap_end) belongs to this BufMut alone.
        unsafe { std::slice::from_raw_parts_mut(self.view.ptr(), cap) }
    }

    /// Freezes the first `n` bytes into a shared `Buf`; this buffer then starts after them.
    pub fn split_frozen(&mut self, n: usize) -> Buf {
        assert!(
            n <= self.capacity(),
            "split of {n} beyond capacity {}",
            self.capacity()
        );
        let frozen = Buf {
            view: self.view.share(self.view.start, n as u32),
        };
        self.view.start += n as u64;
        self.view.len = self.view.len.saturating_sub(n as u32);
        frozen
    }

    /// Drops the first `n` bytes without handing them out; this buffer then starts after them.
    pub fn advance(&mut self, n: usize) {
        assert!(
            n <= self.capacity(),
            "advance of {n} beyond capacity {}",
            self.capacity()
        );
        self.view.start += n as u64;
        self.view.len = self.view.len.saturating_sub(n as u32);
    }

    /// Gives up write access.
    pub fn freeze(self) -> Buf {
        Buf { view: self.view }
    }

    /// Where these bytes sit in the arena.
    pub fn placement(&self) -> Placement {
        self.view.placement()
    }
}

impl Deref for BufMut {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: [start, start+len) belongs to this BufMut alone.
        unsafe { std::slice::from_raw_parts(self.view.ptr(), self.view.len as usize) }
    }
}

impl DerefMut for BufMut {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and we hold &mut self.
        unsafe { std::slice::from_raw_parts_mut(self.view.ptr(), self.view.len as usize) }
    }
}

impl fmt::Debug for BufMut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "BufMut(slot {}, {} of {} bytes)",
            self.view.slot,
            self.view.len,
            self.capacity()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> Arena {
        Arena::new(&ArenaConfig {
            classes: vec![
                SizeClass {
                    buf_bytes: 4096,
                    count: 4,
                },
                SizeClass {
                    buf_bytes: 65536,
                    count: 2,
                },
            ],
            huge_pages: false,
        })
        .unwrap()
    }

    #[test]
    fn buffers_come_from_the_smallest_fitting_class_and_return_on_drop() {
        let arena = small();
        let a = arena.alloc(100).unwrap();
        assert_eq!(a.len(), 100);
        assert_eq!(a.capacity(), 4096);
        let b = arena.alloc(5000).unwrap();
        assert_eq!(b.capacity(), 65536);
        assert_eq!(arena.usage()[0].free, 3);
        drop(a);
        assert_eq!(arena.usage()[0].free, 4);
        drop(b);
        assert_eq!(arena.usage()[1].free, 2);
    }

    #[test]
    fn exhaustion_and_oversize_are_errors() {
        let arena = small();
        let held: Vec<_> = (0..2).map(|_| arena.alloc(65536).unwrap()).collect();
        assert!(matches!(
            arena.alloc(65536),
            Err(ArenaError::Exhausted {
                class_bytes: 65536,
                count: 2
            })
        ));
        assert!(matches!(
            arena.alloc(1 << 20),
            Err(ArenaError::TooLarge { .. })
        ));
        drop(held);
        assert!(arena.alloc(65536).is_ok());
    }

    #[test]
    fn frozen_views_keep_the_slot_until_the_last_drops() {
        let arena = small();
        let mut rx = arena.alloc(0).unwrap();
        rx.spare_capacity()[..6].copy_from_slice(b"abcdef");
        let first = rx.split_frozen(3);
        let second = rx.split_frozen(3);
        assert_eq!(&*first, b"abc");
        assert_eq!(&*second.slice(1..3), b"ef");
        assert_eq!(rx.capacity(), 4096 - 6);
        drop(rx);
        let clone = first.clone();
        drop(first);
        drop(second);
        assert_eq!(arena.usage()[0].free, 3);
        assert_eq!(&*clone, b"abc");
        drop(clone);
        assert_eq!(arena.usage()[0].free, 4);
    }

    #[test]
    fn buffers_outlive_the_arena_handle_and_are_page_aligned() {
        let arena = small();
        let mut b = arena.alloc(4096).unwrap();
        b.fill(7);
        let placement = b.placement();
        assert_eq!(placement.region_offset % PAGE_BYTES as u64, 0);
        assert_eq!(placement.fixed_index, None);
        arena.set_fixed_index(0, 3);
        arena.set_rdma_keys(11, 12);
        assert_eq!(b.placement().fixed_index, Some(3));
        assert_eq!(b.placement().rdma_keys, Some((11, 12)));
        drop(arena);
        assert!(b.iter().all(|&x| x == 7));
    }

    #[test]
    fn unique_buffers_become_writable_again() {
        let arena = small();
        let b = arena.alloc(10).unwrap().freeze();
        let c = b.clone();
        let b = b.try_into_mut().unwrap_err();
        drop(c);
        let m = b.try_into_mut().unwrap();
        assert_eq!(m.capacity(), 4096);
    }

    #[test]
    fn bad_configs_are_rejected() {
        for classes in [
            vec![],
            vec![SizeClass {
                buf_bytes: 100,
                count: 1,
            }],
        ] {
            assert!(matches!(
                Arena::new(&ArenaConfig {
                    classes,
                    huge_pages: false
                }),
                Err(ArenaError::BadConfig(_))
            ));
        }
    }

    #[test]
    fn buffers_cross_threads() {
        let arena = small();
        let b = arena.alloc(4096).unwrap().freeze();
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let b = b.clone();
                std::thread::spawn(move || b.len())
            })
            .collect();
        for h in handles {
            assert_eq!(h.join().unwrap(), 4096);
        }
        drop(b);
        assert_eq!(arena.usage()[0].free, 4);
    }
}
