//! The chunk store: chunks by `(copyset, chunk)`, their snapshots and clones,
//! over io_uring with O_DIRECT and fixed buffers.
//!
//! One thread owns a store and drives it (`submit_*`, then `poll`). The hot
//! path, a read or write of a plain chunk (or of a clone's already-local
//! pages) with no snapshot to preserve, is asynchronous on the ring: a write is
//! its data pages and the checksum-table pages covering them, written in
//! parallel from arena buffers, then an fdatasync when asked. Rare paths that
//! change metadata (the first write after a snapshot, a clone's first write to
//! a page) first wait for the chunk's in-flight operations, then run
//! synchronously with positional IO, so their ordering is plain to see.
//!
//! Ordering: an operation waits while an earlier in-flight operation on the
//! same chunk overlaps its pages (a write overlaps anything, a read overlaps
//! writes; two writes also overlap when they share a checksum page, which
//! each rewrites whole); waiting operations start in arrival order. Operations on
//! different chunks, or on disjoint pages, run in parallel.
//!
//! To ensure correctness, a caller must:
//! - treat a write as durable only when it was submitted with `sync` and its
//!   completion is Ok;
//! - pass buffers from the arena the store was opened with (they are what the
//!   ring registered);
//! - expect `Corrupt` after a crash for pages whose write was in flight (not
//!   acknowledged): the page's data and checksum are separate writes. The
//!   replica layer repairs it (Raft replays its log).

use std::collections::{HashMap, VecDeque};
use std::fs::{self, File};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use quiver_arena::{Arena, Buf, BufMut};

use crate::error::{IoErrno, StoreError};
use crate::flush::DeviceFlush;
use crate::format::{
    bit, page_crc, set_bit, CloneSource, FileKind, MetaPage, CHUNK_BYTES, CRC_BYTES, CRC_OFFSET,
    DATA_OFFSET, FILE_BYTES, META_OFFSET, PAGES, PAGES_PER_CRC_PAGE, PAGE_BYTES,
};
use crate::pool::{sync_dir, Pool, UnformattedFile};
use crate::uring::{Cqe, Ring, RING_ENTRIES};
use crate::ChunkKey;

/// How a store is set up.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub dir: PathBuf,
    /// Formatted files the pool keeps ready (formatted at open if missing).
    pub pool_files: usize,
    /// Below this many free files the pool warns (and `replenish` has work).
    pub pool_low_water: usize,
    /// Chunk and snapshot files open at once (registered io_uring file slots).
    pub open_files_max: u32,
    /// Operations in flight at once.
    pub ops_max: usize,
    /// Make sync writes durable with one device cache flush where that is
    /// enough (see [`crate::flush`]) instead of an fdatasync of each file.
    pub device_flush: bool,
}

impl StoreConfig {
    pub fn new(dir: impl Into<PathBuf>) -> StoreConfig {
        StoreConfig {
            dir: dir.into(),
            pool_files: 16,
            pool_low_water: 4,
            open_files_max: 4096,
            ops_max: 1024,
            device_flush: true,
        }
    }
}

/// What `stat` tells about a chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkStat {
    pub key: ChunkKey,
    pub size: u64,
    pub sn: u64,
    /// Sequence number preserved by the chunk's snapshot, if it has one.
    pub snapshot_sn: Option<u64>,
    pub clone_source: Option<CloneSource>,
    /// Pages written since the chunk was created.
    pub pages_written: usize,
}

/// A finished operation.
#[derive(Debug)]
pub struct Done {
    pub token: u64,
    /// A read's data (its target buffer, frozen), or nothing for a write.
    pub result: Result<Option<Buf>, StoreError>,
}

/// An open chunk or snapshot file.
struct OpenFile {
    path: PathBuf,
    file: File,
    slot: u32,
    /// A completed write is made durable by the store's device flush alone.
    flushed_by_device: bool,
    meta: MetaPage,
    /// The checksum table, in registered memory (written from here).
    crc: BufMut,
    /// Checksum pages (one bit each) changed by writes without sync and not
    /// written since: they go to disk at the next sync of the chunk, with
    /// the data they cover. Until then a crash can leave those pages
    /// reading as corrupt; a caller writing without sync replays its own
    /// log over them (the Raft state machine does).
    crc_unwritten: u64,
}

impl OpenFile {
    fn crc_entry(&self, page: usize) -> u32 {
        u32::from_le_bytes(
            self.crc[page * 4..page * 4 + 4]
                .try_into()
                .expect("4 bytes"),
        )
    }

    fn set_crc_entry(&mut self, page: usize, crc: u32) {
        self.crc[page * 4..page * 4 + 4].copy_from_slice(&crc.to_le_bytes());
    }

    /// Writes whole pages from `first` with positional IO (the slow paths) and
    /// records their checksums in the table; the caller writes the table and
    /// syncs. `data` must be O_DIRECT-aligned (an arena buffer).
    fn write_pages(
        &mut self,
        first: usize,
        data: &[u8],
        op: &'static str,
    ) -> Result<(), StoreError> {
        self.file
            .write_all_at(data, DATA_OFFSET + (first * PAGE_BYTES) as u64)
            .map_err(|e| StoreError::io(op, &self.path, &e))?;
        for (i, page) in data.chunks_exact(PAGE_BYTES).enumerate() {
            self.set_crc_entry(first + i, page_crc(page));
        }
        Ok(())
    }
}

// `OpenFile::crc_unwritten` has a bit per checksum page.
const _: () = assert!(crate::format::CRC_PAGES <= 64);

/// An operation in flight on a chunk, for ordering the next ones.
struct InFlight {
    pages: Range<usize>,
    is_write: bool,
    /// It writes checksum pages too (a sync write).
    writes_crc: bool,
    op: usize,
}

struct Chunk {
    file: OpenFile,
    snapshot: Option<OpenFile>,
    /// Operations in flight on this chunk.
    in_flight: Vec<InFlight>,
    /// Operations waiting for an overlapping one to finish, in arrival order.
    waiting: VecDeque<usize>,
}

impl Chunk {
    /// Whether some of `pages` are a clone's unwritten pages (read from its source).
    fn has_clone_gap(&self, pages: &Range<usize>) -> bool {
        self.file.meta.clone_source.is_some()
            && pages.clone().any(|p| !bit(&self.file.meta.bitmap, p))
    }
}

#[derive(Debug)]
enum OpKind {
    Write { data: Buf, sync: bool },
    Read { target: BufMut },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Waiting,
    /// Data (and checksum pages, for writes) in flight.
    Transfer,
    /// A sync write's fdatasync in flight.
    Sync,
}

struct Op {
    token: u64,
    key: ChunkKey,
    pages: Range<usize>,
    kind: OpKind,
    stage: Stage,
    /// Completions still expected for the current stage.
    pending: u32,
    error: Option<StoreError>,
}

/// Sub-operation tags in a ring token: `op index << 2 | tag`.
const TAG_DATA: u64 = 0;
const TAG_CRC: u64 = 1;
const TAG_SYNC: u64 = 2;
/// The device flush (no operation index: it covers a batch).
const TAG_FLUSH: u64 = 3;

/// Sync writes waiting for the device flush, group-committed: a flush covers
/// every write completed before it was issued, so the writes that complete
/// while one flush is in flight share the next.
#[derive(Default)]
struct FlushQueue {
    /// Writes completed, waiting for a flush to be issued.
    waiting: Vec<usize>,
    /// Writes the flush in flight covers; empty when none is in flight.
    covered: Vec<usize>,
}

pub struct ChunkStore {
    config: StoreConfig,
    arena: Arena,
    pool: Pool,
    chunks: HashMap<ChunkKey, Chunk>,
    /// Chunks written without sync since their last fdatasync.
    dirty: std::collections::HashSet<ChunkKey>,
    free_slots: Vec<u32>,
    ops: Vec<Option<Op>>,
    free_ops: Vec<usize>,
    done: VecDeque<Done>,
    cqes: Vec<Cqe>,
    /// One 4 KiB arena buffer for synchronous metadata and copy-on-write IO.
    scratch: BufMut,
    /// The device flush, where the filesystem allows it, and its ring slot.
    device_flush: Option<(DeviceFlush, u32)>,
    flushes: FlushQueue,
    // Dropped last: the ring's registrations point into the arena.
    ring: Ring,
}

/// Syncs owed for chunks whose writes are drained and checksum tables
/// written (see [`ChunkStore::begin_sync`]).
pub struct OwedSync {
    keys: Vec<ChunkKey>,
    /// Of them, those the store still holds.
    synced: usize,
    /// Files synced one by one (no device flush for them).
    files: Vec<(File, PathBuf)>,
    device_flush: Option<DeviceFlush>,
}

impl OwedSync {
    /// Makes the chunks durable; returns how many. On an error, hand the
    /// keys back to [`ChunkStore::still_dirty`].
    pub fn complete(&self) -> Result<usize, StoreError> {
        for (file, path) in &self.files {
            file.sync_data()
                .map_err(|e| StoreError::io("fdatasync", path, &e))?;
        }
        if let Some(flush) = &self.device_flush {
            flush.flush()?;
        }
        Ok(self.synced)
    }

    /// The chunks it covers.
    pub fn into_keys(self) -> Vec<ChunkKey> {
        self.keys
    }
}

impl ChunkStore {
    /// Opens (or creates) a store in `config.dir`: checks the kernel, registers
    /// the arena, recovers after a crash, and formats the pool up to size.
    pub fn open(config: StoreConfig, arena: Arena) -> Result<ChunkStore, StoreError> {
        Self::open_with_progress(config, arena, |_, _| {})
    }

    /// As [`ChunkStore::open`], reporting pool formatting as `(done, total)`.
    pub fn open_with_progress(
        config: StoreConfig,
        arena: Arena,
        progress: impl FnMut(usize, usize),
    ) -> Result<ChunkStore, StoreError> {
        // One slot more than files: the device flush's anchor.
        let mut ring = Ring::new(RING_ENTRIES, config.open_files_max + 1)?;
        ring.register_arena(&arena)?;
        let chunks_dir = config.dir.join("chunks");
        fs::create_dir_all(&chunks_dir).map_err(|e| StoreError::io("create", &chunks_dir, &e))?;
        let device_flush = match config.device_flush {
            true => DeviceFlush::for_dir(&config.dir)?,
            false => None,
        };
        if let Some(flush) = &device_flush {
            use std::os::fd::AsRawFd;
            ring.set_file(config.open_files_max, flush.anchor().as_raw_fd())
                .map_err(|e| StoreError::io("register file", &config.dir, &e))?;
        }
        let device_flush = device_flush.map(|flush| (flush, config.open_files_max));
        let pool = Pool::open(&config.dir, config.pool_low_water)?;
        let scratch = arena
            .alloc(PAGE_BYTES)
            .map_err(|e| StoreError::NoBuffer(e.to_string()))?;
        let mut store = ChunkStore {
            free_slots: (0..config.open_files_max).rev().collect(),
            ops: (0..config.ops_max).map(|_| None).collect(),
            free_ops: (0..config.ops_max).rev().collect(),
            done: VecDeque::with_capacity(config.ops_max),
            cqes: Vec::with_capacity(2 * RING_ENTRIES as usize),
            chunks: HashMap::new(),
            dirty: Default::default(),
            config,
            arena,
            pool,
            scratch,
            device_flush,
            flushes: FlushQueue::default(),
            ring,
        };
        store.recover()?;
        let target = store.config.pool_files;
        store.pool.fill(target, progress)?;
        Ok(store)
    }

    fn chunk_path(&self, key: ChunkKey, snapshot: bool) -> PathBuf {
        let ext = if snapshot { "snap" } else { "chunk" };
        self.config
            .dir
            .join("chunks")
            .join(key.copyset.to_string())
            .join(format!("{}.{ext}", key.chunk))
    }

    /// Loads every chunk and snapshot file; files a crash left half-created or
    /// half-deleted (Free metadata outside the pool) go back to the pool.
    fn recover(&mut self) -> Result<(), StoreError> {
        let root = self.config.dir.join("chunks");
        let mut snapshots = Vec::new();
        for copyset_dir in read_dir(&root)? {
            for path in read_dir(&copyset_dir)? {
                let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
                if ext != "chunk" && ext != "snap" {
                    tracing::warn!(path = %path.display(), "unexpected file among chunks; ignored");
                    continue;
                }
                let file = self.open_file(&path)?;
                match file.meta.kind {
                    FileKind::Free => {
                        tracing::info!(path = %path.display(), "returning an unfinished chunk file to the pool");
                        self.close_file(file);
                        self.pool.give_back(&path)?;
                    }
                    FileKind::Chunk if ext == "chunk" => {
                        let key = file.meta.key;
                        self.chunks.insert(
                            key,
                            Chunk {
                                file,
                                snapshot: None,
                                in_flight: Vec::new(),
                                waiting: VecDeque::new(),
                            },
                        );
                    }
                    FileKind::Snapshot if ext == "snap" => snapshots.push(file),
                    _ => {
                        return Err(StoreError::BadMeta {
                            path: path.clone(),
                            reason: format!(
                                "a {:?} metadata page in a .{ext} file",
                                file.meta.kind
                            ),
                        })
                    }
                }
            }
        }
        for snap in snapshots {
            let key = snap.meta.key;
            match self.chunks.get_mut(&key) {
                Some(chunk) => chunk.snapshot = Some(snap),
                None => {
                    // The chunk was deleted and the crash came before its snapshot went.
                    let path = snap.path.clone();
                    self.free_file(snap)?;
                    tracing::info!(path = %path.display(), "returned an orphaned snapshot to the pool");
                }
            }
        }
        let by_device = self
            .chunks
            .values()
            .filter(|c| c.file.flushed_by_device)
            .count();
        tracing::info!(
            chunks = self.chunks.len(),
            pool = self.pool.len(),
            sync = %self.sync_method(),
            chunks_by_device_flush = by_device,
            "chunk store open"
        );
        Ok(())
    }

    fn open_file(&mut self, path: &Path) -> Result<OpenFile, StoreError> {
        let file = crate::uring::open_direct(path, false, "the chunk store")
            .map_err(|e| StoreError::io("open", path, &e))?;
        let len = file
            .metadata()
            .map_err(|e| StoreError::io("stat", path, &e))?
            .len();
        if len != FILE_BYTES {
            return Err(StoreError::BadMeta {
                path: path.into(),
                reason: format!("file of {len} bytes, not {FILE_BYTES}"),
            });
        }
        file.read_exact_at(
            &mut self.scratch.spare_capacity()[..PAGE_BYTES],
            META_OFFSET,
        )
        .map_err(|e| StoreError::io("read metadata", path, &e))?;
        let meta =
            MetaPage::decode(&self.scratch.spare_capacity()[..PAGE_BYTES]).map_err(|reason| {
                StoreError::BadMeta {
                    path: path.into(),
                    reason,
                }
            })?;
        let mut crc = self
            .arena
            .alloc(CRC_BYTES)
            .map_err(|e| StoreError::NoBuffer(e.to_string()))?;
        file.read_exact_at(&mut crc, CRC_OFFSET)
            .map_err(|e| StoreError::io("read checksums", path, &e))?;
        let slot = self
            .free_slots
            .pop()
            .ok_or(StoreError::TooManyFiles(self.config.open_files_max))?;
        use std::os::fd::AsRawFd;
        if let Err(e) = self.ring.set_file(slot, file.as_raw_fd()) {
            self.free_slots.push(slot);
            return Err(StoreError::io("register file", path, &e));
        }
        let flushed_by_device = self
            .device_flush
            .as_ref()
            .is_some_and(|(flush, _)| flush.covers(&file, FILE_BYTES));
        Ok(OpenFile {
            path: path.into(),
            file,
            slot,
            flushed_by_device,
            meta,
            crc,
            crc_unwritten: 0,
        })
    }

    fn close_file(&mut self, file: OpenFile) {
        if let Err(e) = self.ring.set_file(file.slot, -1) {
            tracing::warn!(error = %e, "unregistering a file slot failed");
        }
        self.free_slots.push(file.slot);
    }

    /// Writes `meta` as the file's metadata page and syncs it.
    fn write_meta(
        scratch: &mut BufMut,
        file: &OpenFile,
        meta: &MetaPage,
    ) -> Result<(), StoreError> {
        scratch.set_len(PAGE_BYTES);
        meta.encode(scratch);
        file.file
            .write_all_at(scratch, META_OFFSET)
            .and_then(|()| file.file.sync_data())
            .map_err(|e| StoreError::io("write metadata", &file.path, &e))
    }

    /// Writes the whole checksum table of `file` (synchronously).
    fn write_crc_table(file: &OpenFile) -> Result<(), StoreError> {
        file.file
            .write_all_at(&file.crc, CRC_OFFSET)
            .map_err(|e| StoreError::io("write checksums", &file.path, &e))
    }

    /// Takes a pool file, renames it to `path`, and gives it `meta` and an
    /// empty checksum table (so stale data from its last life reads as zeros).
    fn allocate_file(&mut self, path: &Path, meta: &MetaPage) -> Result<OpenFile, StoreError> {
        let from = self.pool.take()?;
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(|e| StoreError::io("create", parent, &e))?;
        }
        if let Err(e) = fs::rename(&from, path) {
            self.pool.untake(from);
            return Err(StoreError::io("rename", path, &e));
        }
        let mut file = self.open_file(path)?;
        let mut meta = meta.clone();
        meta.generation = file.meta.generation + 1;
        file.crc.fill(0);
        Self::write_crc_table(&file)?;
        Self::write_meta(&mut self.scratch, &file, &meta)?;
        file.meta = meta;
        if let Some(parent) = path.parent() {
            sync_dir(parent)?;
        }
        Ok(file)
    }

    /// Marks a file Free and returns it to the pool.
    fn free_file(&mut self, file: OpenFile) -> Result<(), StoreError> {
        let free = MetaPage::free(file.meta.generation);
        Self::write_meta(&mut self.scratch, &file, &free)?;
        let path = file.path.clone();
        self.close_file(file);
        self.pool.give_back(&path)
    }

    // ------------------------------------------------------------ lifecycle

    /// Creates an empty chunk (reads as zeros) at sequence number `sn`.
    pub fn create(&mut self, key: ChunkKey, sn: u64) -> Result<(), StoreError> {
        self.create_with(key, sn, None)
    }

    /// Creates a clone: pages it has not written read from `source`.
    pub fn create_clone(
        &mut self,
        key: ChunkKey,
        sn: u64,
        source: CloneSource,
    ) -> Result<(), StoreError> {
        match source {
            CloneSource::Chunk(s) if !self.chunks.contains_key(&s) => {
                return Err(StoreError::NoSuchChunk(s))
            }
            CloneSource::Snapshot(s) => match self.chunks.get(&s) {
                None => return Err(StoreError::NoSuchChunk(s)),
                Some(c) if c.snapshot.is_none() => return Err(StoreError::NoSnapshot(s)),
                _ => {}
            },
            _ => {}
        }
        self.create_with(key, sn, Some(source))
    }

    fn create_with(
        &mut self,
        key: ChunkKey,
        sn: u64,
        clone_source: Option<CloneSource>,
    ) -> Result<(), StoreError> {
        if self.chunks.contains_key(&key) {
            return Err(StoreError::ChunkExists(key));
        }
        let mut meta = MetaPage::free(0);
        meta.kind = FileKind::Chunk;
        meta.key = key;
        meta.sn = sn;
        meta.clone_source = clone_source;
        let path = self.chunk_path(key, false);
        let file = self.allocate_file(&path, &meta)?;
        self.chunks.insert(
            key,
            Chunk {
                file,
                snapshot: None,
                in_flight: Vec::new(),
                waiting: VecDeque::new(),
            },
        );
        Ok(())
    }

    /// Deletes a chunk (and its snapshot); its files return to the pool.
    pub fn delete(&mut self, key: ChunkKey) -> Result<(), StoreError> {
        self.drain_chunk(key)?;
        let chunk = self
            .chunks
            .remove(&key)
            .ok_or(StoreError::NoSuchChunk(key))?;
        if let Some(snap) = chunk.snapshot {
            self.free_file(snap)?;
        }
        self.free_file(chunk.file)
    }

    /// Deletes a chunk's snapshot.
    pub fn delete_snapshot(&mut self, key: ChunkKey) -> Result<(), StoreError> {
        self.drain_chunk(key)?;
        let chunk = self
            .chunks
            .get_mut(&key)
            .ok_or(StoreError::NoSuchChunk(key))?;
        let snap = chunk.snapshot.take().ok_or(StoreError::NoSnapshot(key))?;
        self.free_file(snap)
    }

    /// How sync writes become durable: "device flush (ext4)" where the
    /// filesystem allows it (files that do not qualify still get their own
    /// fdatasync), else "fdatasync".
    pub fn sync_method(&self) -> String {
        match &self.device_flush {
            Some((flush, _)) => format!("device flush ({})", flush.filesystem()),
            None => "fdatasync".into(),
        }
    }

    /// Whether the chunk exists (cheap, unlike `stat`, which counts pages).
    pub fn contains(&self, key: ChunkKey) -> bool {
        self.chunks.contains_key(&key)
    }

    pub fn stat(&self, key: ChunkKey) -> Result<ChunkStat, StoreError> {
        let chunk = self.chunks.get(&key).ok_or(StoreError::NoSuchChunk(key))?;
        let pages_written = (0..PAGES).filter(|&p| chunk.file.crc_entry(p) != 0).count();
        Ok(ChunkStat {
            key,
            size: CHUNK_BYTES,
            sn: chunk.file.meta.sn,
            snapshot_sn: chunk.snapshot.as_ref().map(|s| s.meta.sn),
            clone_source: chunk.file.meta.clone_source,
            pages_written,
        })
    }

    /// Makes every write done without sync durable: waits for the chunks
    /// written that way and fdatasyncs their files (or flushes the device
    /// once for those it covers). Returns how many files it made durable.
    /// (A replicated store writes without sync, its log being durable, and
    /// calls this before it may forget that log.)
    pub fn sync_dirty(&mut self) -> Result<usize, StoreError> {
        let owed = self.begin_sync()?;
        match owed.complete() {
            Ok(synced) => Ok(synced),
            Err(e) => {
                self.still_dirty(owed.into_keys());
                Err(e)
            }
        }
    }

    /// The first half of [`ChunkStore::sync_dirty`]: drains the dirty
    /// chunks' writes and writes their checksum tables, and returns the
    /// syncs still owed, to be done without holding the store
    /// ([`OwedSync::complete`]): an fdatasync or a device flush takes
    /// milliseconds its other users need not wait for. A chunk written
    /// meanwhile is dirty again and goes with the next sync.
    pub fn begin_sync(&mut self) -> Result<OwedSync, StoreError> {
        let dirty: Vec<ChunkKey> = self.dirty.drain().collect();
        let mut owed = OwedSync {
            keys: Vec::new(),
            synced: 0,
            files: Vec::new(),
            device_flush: None,
        };
        if let Err(e) = self.drain_for_sync(&dirty, &mut owed) {
            // Still dirty: a later call must sync them again.
            self.dirty.extend(dirty);
            return Err(e);
        }
        owed.keys = dirty;
        Ok(owed)
    }

    /// Marks `keys` dirty again (their owed sync failed).
    pub fn still_dirty(&mut self, keys: Vec<ChunkKey>) {
        self.dirty.extend(keys);
    }

    fn drain_for_sync(
        &mut self,
        dirty: &[ChunkKey],
        owed: &mut OwedSync,
    ) -> Result<(), StoreError> {
        let mut device_flush_needed = false;
        for &key in dirty {
            self.drain_chunk(key)?;
            let Some(chunk) = self.chunks.get_mut(&key) else {
                continue; // deleted since: its file went back to the pool
            };
            let file = &mut chunk.file;
            // Checksum pages that writes without sync left for now.
            if file.crc_unwritten != 0 {
                Self::write_crc_table(file)?;
                file.crc_unwritten = 0;
            }
            owed.synced += 1;
            // Set only where the store has a device flush.
            if file.flushed_by_device {
                device_flush_needed = true;
                continue;
            }
            let dup = file
                .file
                .try_clone()
                .map_err(|e| StoreError::io("dup", &file.path, &e))?;
            owed.files.push((dup, file.path.clone()));
        }
        if let Some((flush, _)) = self.device_flush.as_ref().filter(|_| device_flush_needed) {
            owed.device_flush = Some(flush.try_clone()?);
        }
        Ok(())
    }

    /// Every chunk the store holds.
    pub fn list(&self) -> Vec<ChunkKey> {
        let mut keys: Vec<_> = self.chunks.keys().copied().collect();
        keys.sort();
        keys
    }

    /// Free files in the pool.
    pub fn pool_free(&self) -> usize {
        self.pool.len()
    }

    /// Formats one pool file if the pool is below its configured size;
    /// returns whether it did. Holds the store for the whole formatting: a
    /// background task uses [`ChunkStore::pool_file_wanted`] instead.
    pub fn replenish_one(&mut self) -> Result<bool, StoreError> {
        match self.pool_file_wanted() {
            None => Ok(false),
            Some(file) => {
                file.format()?;
                self.pool_file_formatted(file);
                Ok(true)
            }
        }
    }

    /// A pool file to format without holding the store, when the pool is
    /// below its configured size: format it, then hand it in with
    /// [`ChunkStore::pool_file_formatted`]. One at a time: the pool counts
    /// only files handed in.
    pub fn pool_file_wanted(&mut self) -> Option<UnformattedFile> {
        (self.pool.len() < self.config.pool_files).then(|| self.pool.reserve())
    }

    pub fn pool_file_formatted(&mut self, file: UnformattedFile) {
        self.pool.add(file);
    }

    /// Formats pool files back up to the configured size.
    pub fn replenish(&mut self) -> Result<(), StoreError> {
        let target = self.config.pool_files;
        self.pool.fill(target, |_, _| {})
    }

    pub fn arena(&self) -> &Arena {
        &self.arena
    }

    // ------------------------------------------------------------- data path

    fn check_range(offset: u64, len: usize) -> Result<Range<usize>, StoreError> {
        if !offset.is_multiple_of(PAGE_BYTES as u64) || !len.is_multiple_of(PAGE_BYTES) {
            return Err(StoreError::Unaligned { offset, len });
        }
        if len == 0
            || offset
                .checked_add(len as u64)
                .is_none_or(|end| end > CHUNK_BYTES)
        {
            return Err(StoreError::OutOfRange {
                offset,
                len,
                size: CHUNK_BYTES,
            });
        }
        let first = (offset / PAGE_BYTES as u64) as usize;
        Ok(first..first + len / PAGE_BYTES)
    }

    /// Starts a write of `data` at `offset`, as of sequence number `sn`. With
    /// `sync`, the completion means durable. `token` names the completion.
    pub fn submit_write(
        &mut self,
        key: ChunkKey,
        sn: u64,
        offset: u64,
        data: Buf,
        sync: bool,
        token: u64,
    ) -> Result<(), StoreError> {
        let pages = Self::check_range(offset, data.len())?;
        let chunk = self.chunks.get(&key).ok_or(StoreError::NoSuchChunk(key))?;
        let current = chunk.file.meta.sn;
        if sn < current {
            return Err(StoreError::StaleSequence {
                chunk: key,
                got: sn,
                current,
            });
        }
        let needs_snapshot = sn > current;
        let clone_gap = chunk.has_clone_gap(&pages);
        let copy_on_write = chunk
            .snapshot
            .as_ref()
            .is_some_and(|snap| pages.clone().any(|p| !bit(&snap.meta.bitmap, p)));
        if needs_snapshot || clone_gap || copy_on_write {
            // Metadata changes: the slow, synchronous path.
            let result = self.write_slow(key, sn, pages, &data);
            self.done.push_back(Done {
                token,
                result: result.map(|()| None),
            });
            return Ok(());
        }
        if data.placement().fixed_index.is_none() {
            return Err(StoreError::Unregistered);
        }
        if !sync {
            self.dirty.insert(key);
        }
        self.start_op(token, key, pages, OpKind::Write { data, sync })
    }

    /// Starts a read into `target` (its length is the read's) from `offset`.
    pub fn submit_read(
        &mut self,
        key: ChunkKey,
        offset: u64,
        target: BufMut,
        token: u64,
    ) -> Result<(), StoreError> {
        let pages = Self::check_range(offset, target.len())?;
        let chunk = self.chunks.get(&key).ok_or(StoreError::NoSuchChunk(key))?;
        let clone_gap = chunk.has_clone_gap(&pages);
        if clone_gap {
            let mut target = target;
            self.drain_chunk(key)?;
            let result = self
                .read_sync(key, false, pages, &mut target)
                .map(|()| Some(target.freeze()));
            self.done.push_back(Done { token, result });
            return Ok(());
        }
        if target.placement().fixed_index.is_none() {
            return Err(StoreError::Unregistered);
        }
        self.start_op(token, key, pages, OpKind::Read { target })
    }

    fn start_op(
        &mut self,
        token: u64,
        key: ChunkKey,
        pages: Range<usize>,
        kind: OpKind,
    ) -> Result<(), StoreError> {
        let op = Op {
            token,
            key,
            pages,
            kind,
            stage: Stage::Waiting,
            pending: 0,
            error: None,
        };
        // A full op table holds operations in flight: wait for one to
        // finish (its completion stays queued for `poll`) rather than fail
        // a caller that submits faster than the disk completes.
        let index = loop {
            if let Some(index) = self.free_ops.pop() {
                break index;
            }
            if self.ring.in_flight() == 0 {
                return Err(StoreError::Busy(self.config.ops_max));
            }
            self.ring.submit_and_wait(1)?;
            self.handle_cqes();
        };
        self.ops[index] = Some(op);
        let chunk = self.chunks.get_mut(&key).expect("checked by the caller");
        chunk.waiting.push_back(index);
        self.start_waiting(key);
        Ok(())
    }

    /// Starts waiting operations of `key`, in order, while none overlaps an
    /// in-flight one.
    fn start_waiting(&mut self, key: ChunkKey) {
        loop {
            let Some(chunk) = self.chunks.get_mut(&key) else {
                return;
            };
            let Some(&index) = chunk.waiting.front() else {
                return;
            };
            let op = self.ops[index].as_ref().expect("waiting op is live");
            let is_write = matches!(op.kind, OpKind::Write { .. });
            let writes_crc = matches!(op.kind, OpKind::Write { sync: true, .. });
            // The checksum pages a sync write rewrites (whole, from the table
            // in memory): two sharing one must land in order too, or the
            // older table page could be the one left on disk.
            let crc_pages = |r: &Range<usize>| {
                r.start / PAGES_PER_CRC_PAGE..(r.end - 1) / PAGES_PER_CRC_PAGE + 1
            };
            let overlap = |a: &Range<usize>, b: &Range<usize>| a.start < b.end && b.start < a.end;
            let blocked = chunk.in_flight.iter().any(|other| {
                ((is_write || other.is_write) && overlap(&other.pages, &op.pages))
                    || (writes_crc
                        && other.writes_crc
                        && overlap(&crc_pages(&other.pages), &crc_pages(&op.pages)))
            });
            if blocked {
                return;
            }
            chunk.waiting.pop_front();
            chunk.in_flight.push(InFlight {
                pages: op.pages.clone(),
                is_write,
                writes_crc,
                op: index,
            });
            if let Err(e) = self.issue_transfer(index) {
                self.fail_op(index, e);
            }
        }
    }

    /// Queues the data (and checksum) IO of an operation on the ring.
    fn issue_transfer(&mut self, index: usize) -> Result<(), StoreError> {
        let op = self.ops[index].as_mut().expect("live op");
        let chunk = self.chunks.get_mut(&op.key).expect("op's chunk is open");
        let file = &mut chunk.file;
        let offset = DATA_OFFSET + (op.pages.start * PAGE_BYTES) as u64;
        op.stage = Stage::Transfer;
        let token = (index as u64) << 2;
        match &mut op.kind {
            OpKind::Read { target } => {
                op.pending = 1;
                self.ring
                    .read_fixed(file.slot, offset, target, token | TAG_DATA)
            }
            OpKind::Write { data, sync } => {
                // Verify-before-write: the checksum is computed from the very
                // bytes the kernel will read.
                for (i, page) in data.chunks_exact(PAGE_BYTES).enumerate() {
                    file.set_crc_entry(op.pages.start + i, page_crc(page));
                }
                let first = op.pages.start / PAGES_PER_CRC_PAGE;
                let last = (op.pages.end - 1) / PAGES_PER_CRC_PAGE;
                let crc_bits = (u64::MAX >> (63 - (last - first))) << first;
                if !*sync {
                    // One IO, not two: the checksum pages wait for the next
                    // sync of the chunk (`begin_sync`).
                    file.crc_unwritten |= crc_bits;
                    op.pending = 1;
                    return self
                        .ring
                        .write_fixed(file.slot, offset, data, token | TAG_DATA);
                }
                // Pending bits stay set even though this write carries their
                // pages: if it fails, the next sync must still write them.
                let crc_bytes = &file.crc[first * PAGE_BYTES..(last + 1) * PAGE_BYTES];
                let crc_index = file
                    .crc
                    .placement()
                    .fixed_index
                    .ok_or(StoreError::Unregistered)?;
                op.pending = 2;
                self.ring
                    .write_fixed(file.slot, offset, data, token | TAG_DATA)?;
                self.ring.write_fixed_bytes(
                    file.slot,
                    CRC_OFFSET + (first * PAGE_BYTES) as u64,
                    crc_bytes,
                    crc_index,
                    token | TAG_CRC,
                )?;
                // A sync write's fdatasync follows once both are done (handle_cqes).
                Ok(())
            }
        }
    }

    fn fail_op(&mut self, index: usize, e: StoreError) {
        let op = self.ops[index].as_mut().expect("live op");
        op.error.get_or_insert(e);
        if op.pending == 0 {
            self.finish_op(index);
        }
    }

    /// Removes a finished operation, reports it, and lets waiters go.
    fn finish_op(&mut self, index: usize) {
        let op = self.ops[index].take().expect("live op");
        self.free_ops.push(index);
        let key = op.key;
        if let Some(chunk) = self.chunks.get_mut(&key) {
            chunk.in_flight.retain(|f| f.op != index);
        }
        let result = match (op.error, op.kind) {
            (Some(e), _) => Err(e),
            (None, OpKind::Write { .. }) => Ok(None),
            (None, OpKind::Read { mut target }) => self
                .verify_read(key, op.pages.clone(), &mut target)
                .map(|()| Some(target.freeze())),
        };
        self.done.push_back(Done {
            token: op.token,
            result,
        });
        self.start_waiting(key);
    }

    /// Checks each page read against its checksum; unwritten pages become zeros.
    fn verify_read(
        &self,
        key: ChunkKey,
        pages: Range<usize>,
        target: &mut BufMut,
    ) -> Result<(), StoreError> {
        let chunk = self.chunks.get(&key).ok_or(StoreError::NoSuchChunk(key))?;
        verify_pages(&chunk.file, key, pages, target)
    }

    /// Handles ring completions: advances operations, finishes them.
    fn handle_cqes(&mut self) {
        let mut cqes = std::mem::take(&mut self.cqes);
        self.ring.reap(&mut cqes);
        for cqe in &cqes {
            if cqe.token & 3 == TAG_FLUSH {
                let result = cqe.result.map(drop);
                self.finish_flush(result);
                continue;
            }
            let index = (cqe.token >> 2) as usize;
            let Some(op) = self.ops[index].as_mut() else {
                tracing::error!(token = cqe.token, "completion for no operation");
                continue;
            };
            op.pending -= 1;
            match cqe.result {
                Err(errno) => {
                    let path = self
                        .chunks
                        .get(&op.key)
                        .map(|c| c.file.path.clone())
                        .unwrap_or_default();
                    let what = match cqe.token & 3 {
                        TAG_CRC => "checksum write",
                        TAG_SYNC => "fdatasync",
                        _ => "data IO",
                    };
                    op.error.get_or_insert(StoreError::Io {
                        op: what,
                        path,
                        errno,
                    });
                }
                Ok(n) => {
                    let expected = match (cqe.token & 3, &op.kind) {
                        (TAG_DATA, _) => Some(op.pages.len() * PAGE_BYTES),
                        _ => None,
                    };
                    if let Some(want) = expected.filter(|&want| n as usize != want) {
                        // O_DIRECT on a regular file does not return short counts
                        // unless the file shrank under us.
                        let path = self
                            .chunks
                            .get(&op.key)
                            .map(|c| c.file.path.clone())
                            .unwrap_or_default();
                        op.error.get_or_insert(StoreError::BadMeta {
                            path,
                            reason: format!("short IO: {n} of {want} bytes"),
                        });
                    }
                }
            }
            if op.pending > 0 {
                continue;
            }
            let sync_next = op.error.is_none()
                && op.stage == Stage::Transfer
                && matches!(op.kind, OpKind::Write { sync: true, .. });
            if sync_next {
                op.stage = Stage::Sync;
                op.pending = 1;
                let file = &self
                    .chunks
                    .get(&op.key)
                    .expect("an op's chunk stays open")
                    .file;
                if file.flushed_by_device {
                    self.flushes.waiting.push(index);
                    continue;
                }
                if let Err(e) = self
                    .ring
                    .fdatasync(file.slot, ((index as u64) << 2) | TAG_SYNC)
                {
                    let op = self.ops[index].as_mut().expect("live op");
                    op.pending = 0;
                    op.error = Some(e);
                    self.finish_op(index);
                }
                continue;
            }
            self.finish_op(index);
        }
        self.cqes = cqes;
        self.start_flush();
    }

    /// Issues the device flush for the writes waiting on it, unless one is in
    /// flight already (they wait for the next). With nothing else in the
    /// kernel the flush runs here, blocking: io_uring would hand it to an
    /// io-wq thread (fsync always blocks), a wake-up there and back.
    fn start_flush(&mut self) {
        let Some((flush, anchor)) = &self.device_flush else {
            return;
        };
        if self.flushes.waiting.is_empty() || !self.flushes.covered.is_empty() {
            return;
        }
        std::mem::swap(&mut self.flushes.waiting, &mut self.flushes.covered);
        if self.ring.in_flight() == 0 {
            let result = flush.flush();
            self.finish_flush_with(result);
        } else if let Err(e) = self.ring.fdatasync(*anchor, TAG_FLUSH) {
            self.finish_flush_with(Err(e));
        }
    }

    /// The flush in flight completed (`Err` holds its errno).
    fn finish_flush(&mut self, result: Result<(), IoErrno>) {
        let result = result.map_err(|errno| StoreError::Io {
            op: "device flush",
            path: self
                .device_flush
                .as_ref()
                .map(|(flush, _)| flush.anchor_path().to_path_buf())
                .unwrap_or_default(),
            errno,
        });
        self.finish_flush_with(result);
    }

    /// Ends the writes the flush covered with its result, then issues the
    /// next flush for writes that completed meanwhile.
    fn finish_flush_with(&mut self, result: Result<(), StoreError>) {
        let covered = std::mem::take(&mut self.flushes.covered);
        for &index in &covered {
            let op = self.ops[index].as_mut().expect("a covered write is live");
            op.pending = 0;
            if let Err(e) = &result {
                op.error.get_or_insert(e.clone());
            }
            self.finish_op(index);
        }
        // Keep the allocation for the next batch.
        self.flushes.covered = covered;
        self.flushes.covered.clear();
        self.start_flush();
    }

    /// A finished operation, if one is waiting already (the synchronous
    /// paths finish at once), without submitting or reaping anything.
    pub fn finished(&mut self) -> Option<Done> {
        self.done.pop_front()
    }

    /// Submits queued IO and returns a finished operation, if any. With `wait`,
    /// blocks until one finishes (or nothing is in flight).
    pub fn poll(&mut self, wait: bool) -> Result<Option<Done>, StoreError> {
        loop {
            if let Some(done) = self.done.pop_front() {
                // Operations queued since the last submit go to the kernel now,
                // not when the finished ones run out: the queue stays deep.
                if self.ring.has_unsubmitted() {
                    self.ring.submit_and_wait(0)?;
                }
                return Ok(Some(done));
            }
            // With one operation live (queue depth 1), wait for all of its
            // completions at once (a write's data and checksum): one wake-up.
            let live = self.config.ops_max - self.free_ops.len();
            let want = match (wait, live) {
                (false, _) => 0,
                (true, 1) => self.ring.in_flight().min(2),
                (true, _) => usize::from(self.ring.in_flight() > 0),
            };
            self.ring.submit_and_wait(want)?;
            self.handle_cqes();
            if self.done.is_empty() && (!wait || self.ring.in_flight() == 0) {
                return Ok(self.done.pop_front());
            }
        }
    }

    /// An eventfd signalled whenever an operation finishes in the kernel:
    /// an owner that does not call `poll` often (applied writes are
    /// submitted and left) waits on it to keep operations moving, since
    /// queued operations start only when `poll` sees earlier ones finish.
    pub fn completion_eventfd(&mut self) -> std::io::Result<std::os::fd::OwnedFd> {
        self.ring.completion_eventfd()
    }

    /// Operations submitted and not yet returned by `poll`.
    pub fn in_flight(&self) -> usize {
        self.config.ops_max - self.free_ops.len() + self.done.len()
    }

    /// Waits until no operation of `key` is in flight or waiting; finished ones
    /// stay queued for `poll`.
    fn drain_chunk(&mut self, key: ChunkKey) -> Result<(), StoreError> {
        loop {
            let busy = self
                .chunks
                .get(&key)
                .is_some_and(|c| !c.in_flight.is_empty() || !c.waiting.is_empty());
            if !busy {
                return Ok(());
            }
            self.ring.submit_and_wait(1)?;
            self.handle_cqes();
        }
    }

    // ------------------------------------------------------ synchronous paths

    /// Writes and waits (a convenience over `submit_write` + `poll`).
    pub fn write(
        &mut self,
        key: ChunkKey,
        sn: u64,
        offset: u64,
        data: &[u8],
        sync: bool,
    ) -> Result<(), StoreError> {
        let mut buf = self
            .arena
            .alloc(data.len())
            .map_err(|e| StoreError::NoBuffer(e.to_string()))?;
        buf.copy_from_slice(data);
        let token = u64::MAX;
        self.submit_write(key, sn, offset, buf.freeze(), sync, token)?;
        self.wait_token(token).map(|_| ())
    }

    /// Reads and waits.
    pub fn read(&mut self, key: ChunkKey, offset: u64, len: usize) -> Result<Buf, StoreError> {
        let target = self
            .arena
            .alloc(len)
            .map_err(|e| StoreError::NoBuffer(e.to_string()))?;
        let token = u64::MAX - 1;
        self.submit_read(key, offset, target, token)?;
        Ok(self.wait_token(token)?.expect("a read returns its data"))
    }

    fn wait_token(&mut self, token: u64) -> Result<Option<Buf>, StoreError> {
        let mut others = Vec::new();
        let result = loop {
            match self.poll(true)? {
                Some(d) if d.token == token => break d.result,
                Some(d) => others.push(d),
                None => unreachable!("the awaited operation is in flight"),
            }
        };
        // Completions of other operations stay for the caller's poll, in order.
        for d in others.into_iter().rev() {
            self.done.push_front(d);
        }
        result
    }

    /// Reads a chunk's snapshot: copied pages from the snapshot file, the
    /// chunk's own pages elsewhere.
    pub fn read_snapshot(
        &mut self,
        key: ChunkKey,
        offset: u64,
        len: usize,
    ) -> Result<Buf, StoreError> {
        let pages = Self::check_range(offset, len)?;
        let chunk = self.chunks.get(&key).ok_or(StoreError::NoSuchChunk(key))?;
        if chunk.snapshot.is_none() {
            return Err(StoreError::NoSnapshot(key));
        }
        self.drain_chunk(key)?;
        let mut target = self
            .arena
            .alloc(len)
            .map_err(|e| StoreError::NoBuffer(e.to_string()))?;
        self.read_sync(key, true, pages, &mut target)?;
        Ok(target.freeze())
    }

    /// Reads pages synchronously, following snapshots and clone sources.
    fn read_sync(
        &mut self,
        key: ChunkKey,
        snapshot: bool,
        pages: Range<usize>,
        target: &mut BufMut,
    ) -> Result<(), StoreError> {
        for (i, page) in pages.enumerate() {
            let out = &mut target[i * PAGE_BYTES..(i + 1) * PAGE_BYTES];
            self.read_page(key, snapshot, page, out, 0)?;
        }
        Ok(())
    }

    /// One page of `key` (or of its snapshot), wherever it lives. `depth`
    /// bounds clone chains (a clone of a clone of ...).
    fn read_page(
        &mut self,
        key: ChunkKey,
        snapshot: bool,
        page: usize,
        out: &mut [u8],
        depth: usize,
    ) -> Result<(), StoreError> {
        const CLONE_DEPTH_MAX: usize = 16;
        let chunk = self.chunks.get(&key).ok_or(StoreError::NoSuchChunk(key))?;
        let file = match (&chunk.snapshot, snapshot) {
            (Some(snap), true) if bit(&snap.meta.bitmap, page) => snap,
            (None, true) => return Err(StoreError::NoSnapshot(key)),
            _ => &chunk.file,
        };
        let is_clone_gap = std::ptr::eq(file, &chunk.file)
            && chunk.file.meta.clone_source.is_some()
            && !bit(&chunk.file.meta.bitmap, page);
        if is_clone_gap {
            if depth >= CLONE_DEPTH_MAX {
                return Err(StoreError::MissingSource(key));
            }
            let (source, from_snapshot) = match chunk.file.meta.clone_source.expect("checked") {
                CloneSource::Chunk(s) => (s, false),
                CloneSource::Snapshot(s) => (s, true),
            };
            if !self.chunks.contains_key(&source) {
                return Err(StoreError::MissingSource(key));
            }
            return self.read_page(source, from_snapshot, page, out, depth + 1);
        }
        let entry = file.crc_entry(page);
        if entry == 0 {
            out.fill(0);
            return Ok(());
        }
        let scratch = &mut self.scratch;
        scratch.set_len(PAGE_BYTES);
        file.file
            .read_exact_at(scratch, DATA_OFFSET + (page * PAGE_BYTES) as u64)
            .map_err(|e| StoreError::io("read", &file.path, &e))?;
        if page_crc(scratch) != entry {
            return Err(StoreError::Corrupt {
                chunk: key,
                page: page as u32,
            });
        }
        out.copy_from_slice(scratch);
        Ok(())
    }

    /// Makes a clone independent of its source: copies every page it has not
    /// written from the source, then forgets the source. Durable on return.
    /// Synchronous: an administrative operation (Curve runs it in the
    /// background after a clone from a snapshot).
    pub fn flatten(&mut self, key: ChunkKey) -> Result<(), StoreError> {
        self.drain_chunk(key)?;
        let chunk = self.chunks.get(&key).ok_or(StoreError::NoSuchChunk(key))?;
        if chunk.file.meta.clone_source.is_none() {
            return Ok(());
        }
        let gaps: Vec<usize> = (0..PAGES)
            .filter(|&p| !bit(&chunk.file.meta.bitmap, p))
            .collect();
        let mut page = self
            .arena
            .alloc(PAGE_BYTES)
            .map_err(|e| StoreError::NoBuffer(e.to_string()))?;
        for &p in &gaps {
            // Through the clone itself: it reads the gap from its source.
            self.read_page(key, false, p, &mut page, 0)?;
            let chunk = self.chunks.get_mut(&key).expect("checked");
            let file = &mut chunk.file;
            if page.iter().any(|&b| b != 0) {
                file.write_pages(p, &page, "flatten")?;
            }
            // A zero page stays unwritten: it reads as zeros already.
        }
        let chunk = self.chunks.get_mut(&key).expect("checked");
        let file = &mut chunk.file;
        Self::write_crc_table(file)?;
        file.file
            .sync_data()
            .map_err(|e| StoreError::io("fdatasync", &file.path, &e))?;
        // Only now may reads stop following the source.
        file.meta.clone_source = None;
        file.meta.bitmap = [0; crate::format::BITMAP_BYTES];
        let meta = file.meta.clone();
        Self::write_meta(&mut self.scratch, file, &meta)?;
        Ok(())
    }

    /// A write that changes metadata: a new snapshot epoch (copy the old
    /// pages first) or a clone's first write to pages. Synchronous, durable.
    fn write_slow(
        &mut self,
        key: ChunkKey,
        sn: u64,
        pages: Range<usize>,
        data: &[u8],
    ) -> Result<(), StoreError> {
        self.drain_chunk(key)?;
        let chunk = self.chunks.get(&key).ok_or(StoreError::NoSuchChunk(key))?;
        let current = chunk.file.meta.sn;
        if sn > current {
            if let Some(snap) = &chunk.snapshot {
                return Err(StoreError::SnapshotExists {
                    chunk: key,
                    kept: snap.meta.sn,
                    wanted: sn,
                });
            }
            // A new epoch: the snapshot file preserves sequence `current`.
            let mut meta = MetaPage::free(0);
            meta.kind = FileKind::Snapshot;
            meta.key = key;
            meta.sn = current;
            let path = self.chunk_path(key, true);
            let snap = self.allocate_file(&path, &meta)?;
            let chunk = self.chunks.get_mut(&key).expect("checked");
            chunk.snapshot = Some(snap);
            chunk.file.meta.sn = sn;
            let meta = chunk.file.meta.clone();
            Self::write_meta(&mut self.scratch, &chunk.file, &meta)?;
        }
        // Copy-on-write: pages about to change that the snapshot lacks.
        let needs_copy: Vec<usize> = {
            let chunk = self.chunks.get(&key).expect("checked");
            match &chunk.snapshot {
                Some(snap) => pages
                    .clone()
                    .filter(|&p| !bit(&snap.meta.bitmap, p))
                    .collect(),
                None => Vec::new(),
            }
        };
        if !needs_copy.is_empty() {
            let mut page_buf = self
                .arena
                .alloc(PAGE_BYTES)
                .map_err(|e| StoreError::NoBuffer(e.to_string()))?;
            for &page in &needs_copy {
                // The snapshot preserves the chunk as it was, clone gaps included.
                self.read_page(key, false, page, &mut page_buf, 0)?;
                let chunk = self.chunks.get_mut(&key).expect("checked");
                let snap = chunk.snapshot.as_mut().expect("checked");
                snap.write_pages(page, &page_buf, "copy-on-write")?;
                set_bit(&mut snap.meta.bitmap, page);
            }
            let chunk = self.chunks.get_mut(&key).expect("checked");
            let snap = chunk.snapshot.as_ref().expect("checked");
            Self::write_crc_table(snap)?;
            let meta = snap.meta.clone();
            // Data and checksums first, then the bitmap that points at them.
            snap.file
                .sync_data()
                .map_err(|e| StoreError::io("fdatasync", &snap.path, &e))?;
            Self::write_meta(&mut self.scratch, snap, &meta)?;
        }
        // The write itself, then (for a clone) the bitmap of local pages.
        let chunk = self.chunks.get_mut(&key).expect("checked");
        let file = &mut chunk.file;
        // Arena buffers go straight to the disk; a sub-slice that lost the
        // O_DIRECT alignment goes through a fresh arena buffer.
        if (data.as_ptr() as usize).is_multiple_of(PAGE_BYTES) {
            file.write_pages(pages.start, data, "write")?;
        } else {
            let mut staged = self
                .arena
                .alloc(data.len())
                .map_err(|e| StoreError::NoBuffer(e.to_string()))?;
            staged.copy_from_slice(data);
            file.write_pages(pages.start, &staged, "write")?;
        }
        Self::write_crc_table(file)?;
        file.file
            .sync_data()
            .map_err(|e| StoreError::io("fdatasync", &file.path, &e))?;
        if file.meta.clone_source.is_some() {
            for page in pages {
                set_bit(&mut file.meta.bitmap, page);
            }
            let meta = file.meta.clone();
            Self::write_meta(&mut self.scratch, file, &meta)?;
        }
        Ok(())
    }
}

/// Verifies pages read into `target` against `file`'s checksums.
fn verify_pages(
    file: &OpenFile,
    key: ChunkKey,
    pages: Range<usize>,
    target: &mut BufMut,
) -> Result<(), StoreError> {
    for (i, page) in pages.enumerate() {
        let entry = file.crc_entry(page);
        let bytes = &mut target[i * PAGE_BYTES..(i + 1) * PAGE_BYTES];
        if entry == 0 {
            // Never written in this life of the file: stale bytes read as zeros.
            bytes.fill(0);
        } else if page_crc(bytes) != entry {
            return Err(StoreError::Corrupt {
                chunk: key,
                page: page as u32,
            });
        }
    }
    Ok(())
}

fn read_dir(dir: &Path) -> Result<Vec<PathBuf>, StoreError> {
    let mut paths = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| StoreError::io("list", dir, &e))? {
        paths.push(entry.map_err(|e| StoreError::io("list", dir, &e))?.path());
    }
    paths.sort();
    Ok(paths)
}
