//! Quiver's contender in `quiver bench chunkstore`: the chunk store driven the
//! way fio drives a file, `iodepth` operations in flight on one thread.
//!
//! The working set of `size` bytes is cut into `bs`-byte blocks laid out over
//! 16 MiB chunks of one copyset (`CHUNK_BYTES / bs` blocks per chunk). A random
//! pattern picks blocks uniformly (fio's `norandommap`), seqwrite walks them in
//! order and wraps. Each operation's latency runs from just before its submit
//! to the `poll` that returns it. Buffers come from the arena the store
//! registered with io_uring: one per slot of the queue, reused, so the measured
//! loop allocates nothing.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{ensure, Context};
use quiver_chunkstore::{ChunkKey, ChunkStore, StoreConfig, CHUNK_BYTES, PAGE_BYTES};
use quiver_fabric::arena::{Arena, ArenaConfig, Buf, BufMut, SizeClass};

use super::{format_size, Deadline, Limit, Progress, RunStats};

/// The copyset the bench's chunks belong to.
const COPYSET: u32 = 1;
/// Sequence number of every write (no snapshots are involved).
const SN: u64 = 1;
/// Bytes per write when laying out the working set before a randread run.
const LAYOUT_BYTES: usize = 256 << 10;
/// Layout writes in flight.
const LAYOUT_DEPTH: usize = 16;
/// Largest --iodepth accepted.
pub const IODEPTH_MAX: usize = 4096;
/// Largest --bs accepted: one chunk.
const BS_MAX: u64 = CHUNK_BYTES;
/// Free formatted files kept beyond the chunks the bench uses.
const POOL_SPARE: usize = 2;
/// 4 KiB buffers beyond the IO slots: the store's scratch page and slack.
const SMALL_BUFFERS: usize = 32;
/// Buffers beyond the computed need in each class.
const SLACK: usize = 8;

/// What the measured operations do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Pattern {
    /// Writes at uniformly random blocks.
    Randwrite,
    /// Reads at uniformly random blocks (the working set is written first).
    Randread,
    /// Writes at consecutive blocks, wrapping at the end of the working set.
    Seqwrite,
}

impl Pattern {
    pub fn name(self) -> &'static str {
        match self {
            Pattern::Randwrite => "randwrite",
            Pattern::Randread => "randread",
            Pattern::Seqwrite => "seqwrite",
        }
    }

    pub fn is_write(self) -> bool {
        !matches!(self, Pattern::Randread)
    }
}

/// Whether writes are durable when they complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SyncPolicy {
    /// Every write is followed by an fdatasync before it completes (fio's fdatasync=1).
    Always,
    /// Writes complete when the device has the data (O_DIRECT), without fdatasync.
    Never,
}

impl SyncPolicy {
    pub fn name(self) -> &'static str {
        match self {
            SyncPolicy::Always => "always",
            SyncPolicy::Never => "never",
        }
    }
}

/// The workload both contenders run.
#[derive(Debug, Clone, Copy)]
pub struct Workload {
    pub pattern: Pattern,
    /// Bytes per operation.
    pub bs: u64,
    /// Operations in flight.
    pub iodepth: usize,
    /// Bytes the offsets range over (fio's file size).
    pub size: u64,
    pub sync: SyncPolicy,
    pub limit: Limit,
    /// Untimed operations before each measured run (ours only).
    pub warmup: u64,
    /// Ours: sync writes flush the device cache once where the filesystem
    /// allows (the store's default) rather than fdatasync each chunk file.
    pub device_flush: bool,
}

impl Workload {
    /// Checks what the command line cannot, with messages naming the flags.
    pub fn validate(&self) -> anyhow::Result<()> {
        ensure!(
            self.bs >= PAGE_BYTES as u64 && self.bs.is_multiple_of(PAGE_BYTES as u64),
            "--bs {} must be a multiple of 4 KiB (the store's page)",
            self.bs
        );
        ensure!(
            self.bs <= BS_MAX,
            "--bs {} is larger than a chunk ({})",
            format_size(self.bs),
            format_size(BS_MAX)
        );
        ensure!(
            (1..=IODEPTH_MAX).contains(&self.iodepth),
            "--iodepth must be between 1 and {IODEPTH_MAX}"
        );
        ensure!(
            self.size >= self.bs,
            "--size {} is smaller than --bs {}",
            format_size(self.size),
            format_size(self.bs)
        );
        let chunks = self.chunks();
        ensure!(
            chunks <= u32::MAX as u64 / 2,
            "--size {} needs {chunks} chunks, too many",
            format_size(self.size)
        );
        if let Limit::Iters(n) = self.limit {
            ensure!(n >= 1, "--iters must be at least 1");
        }
        Ok(())
    }

    /// Blocks in the working set.
    pub fn blocks(&self) -> u64 {
        self.size / self.bs
    }

    fn blocks_per_chunk(&self) -> u64 {
        CHUNK_BYTES / self.bs
    }

    /// Chunks the working set occupies.
    pub fn chunks(&self) -> u64 {
        self.blocks().div_ceil(self.blocks_per_chunk())
    }

    /// The chunk and offset of block `block`.
    fn locate(&self, block: u64) -> (ChunkKey, u64) {
        let per_chunk = self.blocks_per_chunk();
        (key(block / per_chunk), (block % per_chunk) * self.bs)
    }
}

fn key(chunk: u64) -> ChunkKey {
    ChunkKey {
        copyset: COPYSET,
        chunk,
    }
}

/// splitmix64: a fast, allocation-free generator for offsets and payloads.
struct Rng(u64);

impl Rng {
    fn seeded() -> Rng {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Rng(nanos ^ u64::from(std::process::id()).rotate_left(32))
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0), by multiply-shift.
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next()) * u128::from(n)) >> 64) as u64
    }

    fn fill(&mut self, bytes: &mut [u8]) {
        for word in bytes.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            word.copy_from_slice(&v[..word.len()]);
        }
    }
}

/// The chunk store set up for a workload: chunks created, the working set
/// laid out for reads, and one buffer per queue slot. Every run of one
/// invocation reuses it.
pub struct StoreBench {
    w: Workload,
    store: ChunkStore,
    /// Write payloads, one per slot; a clone goes to the store per write.
    sources: Vec<Buf>,
    /// Read targets, one per slot; `None` while the slot's read is in flight.
    targets: Vec<Option<BufMut>>,
    /// When each slot's operation was submitted.
    sent: Vec<Instant>,
    /// Slots without an operation in flight.
    free: Vec<usize>,
    rng: Rng,
    /// seqwrite: the next block.
    cursor: u64,
}

impl StoreBench {
    /// How the store makes sync writes durable (see `ChunkStore::sync_method`).
    pub fn sync_method(&self) -> String {
        self.store.sync_method()
    }

    /// Opens (formatting on first use) a store in `dir`, creates the chunks
    /// the working set needs, and for randread writes every block once.
    pub fn open(dir: &Path, w: &Workload) -> anyhow::Result<StoreBench> {
        w.validate()?;
        let chunks = usize::try_from(w.chunks()).context("too many chunks")?;
        // A store left by `--keep` may hold some of our chunks already: learn
        // which, so the pool formats only what is missing.
        let (existing, files_on_disk) = existing_chunks(dir, w)?;
        let missing = (0..w.chunks())
            .filter(|c| !existing.contains(&key(*c)))
            .count();
        // Every file there is opened, ours or not.
        let open = chunks.max(files_on_disk);
        let arena = bench_arena(w, open + 1)?;
        let mut config = StoreConfig::new(dir);
        config.pool_files = missing + POOL_SPARE;
        config.pool_low_water = 1;
        config.open_files_max = open_files(open)?;
        config.ops_max = w.iodepth.max(LAYOUT_DEPTH) + SLACK;
        config.device_flush = w.device_flush;
        let mut formatting: Option<Progress> = None;
        let mut store = ChunkStore::open_with_progress(config, arena, |done, total| {
            let p = formatting.get_or_insert_with(|| {
                Progress::start(format!(
                    "formatting {total} chunk files ({}) in {}",
                    format_size(total as u64 * CHUNK_BYTES),
                    dir.display()
                ))
            });
            p.update(done as u64, total as u64);
        })
        .with_context(|| format!("opening the chunk store in {}", dir.display()))?;
        if let Some(p) = formatting {
            p.finish();
        }
        for chunk in 0..w.chunks() {
            if !existing.contains(&key(chunk)) {
                store
                    .create(key(chunk), SN)
                    .with_context(|| format!("creating chunk {}", key(chunk)))?;
            }
        }

        let mut rng = Rng::seeded();
        let bs = w.bs as usize;
        let mut sources = Vec::new();
        let mut targets = Vec::new();
        for _ in 0..w.iodepth {
            let mut buf = store.arena().alloc(bs).context("arena buffer for a slot")?;
            if w.pattern.is_write() {
                rng.fill(&mut buf);
                sources.push(buf.freeze());
            } else {
                targets.push(Some(buf));
            }
        }
        let mut bench = StoreBench {
            w: *w,
            store,
            sources,
            targets,
            sent: vec![Instant::now(); w.iodepth],
            free: (0..w.iodepth).rev().collect(),
            rng,
            cursor: 0,
        };
        if w.pattern == Pattern::Randread {
            bench.lay_out()?;
        }
        Ok(bench)
    }

    /// Writes every page of every chunk not yet fully written, so reads find
    /// data (fio likewise writes its file out before a read job). Untimed.
    fn lay_out(&mut self) -> anyhow::Result<()> {
        let mut todo = Vec::new();
        for chunk in 0..self.w.chunks() {
            let stat = self.store.stat(key(chunk))?;
            if stat.pages_written < CHUNK_BYTES as usize / PAGE_BYTES {
                todo.push(key(chunk));
            }
        }
        if todo.is_empty() {
            return Ok(());
        }
        let per_chunk = CHUNK_BYTES / LAYOUT_BYTES as u64;
        let total = todo.len() as u64 * per_chunk;
        let mut progress = Progress::start(format!(
            "writing {} for randread",
            format_size(todo.len() as u64 * CHUNK_BYTES)
        ));
        let mut data = self
            .store
            .arena()
            .alloc(LAYOUT_BYTES)
            .context("arena buffer for laying out")?;
        self.rng.fill(&mut data);
        let data = data.freeze();
        let (mut issued, mut done) = (0u64, 0u64);
        while done < total {
            while issued < total && issued - done < LAYOUT_DEPTH as u64 {
                let k = todo[(issued / per_chunk) as usize];
                let offset = (issued % per_chunk) * LAYOUT_BYTES as u64;
                self.store
                    .submit_write(k, SN, offset, data.clone(), false, issued)
                    .with_context(|| format!("laying out chunk {k} at {offset}"))?;
                issued += 1;
            }
            let d = self
                .store
                .poll(true)
                .context("polling the chunk store")?
                .context("the chunk store finished nothing with writes in flight")?;
            d.result
                .with_context(|| format!("laying out: write {} failed", d.token))?;
            done += 1;
            progress.update(done, total);
        }
        progress.finish();
        Ok(())
    }

    /// One run: an untimed warm-up, then the measured part.
    pub fn run(&mut self) -> anyhow::Result<RunStats> {
        let mut warmup = RunStats::new("quiver", "io_uring");
        self.drive(Limit::Iters(self.w.warmup), &mut warmup)?;
        let mut stats = RunStats::new("quiver", "io_uring");
        self.drive(self.w.limit, &mut stats)?;
        Ok(stats)
    }

    /// Keeps `iodepth` operations in flight until `limit`, then drains.
    fn drive(&mut self, limit: Limit, stats: &mut RunStats) -> anyhow::Result<()> {
        let mut deadline = Deadline::start(limit);
        let mut in_flight = 0;
        // Bounded: each pass submits at least one operation or completes one,
        // and submitting stops at the limit.
        loop {
            while in_flight < self.w.iodepth && deadline.issue() {
                let slot = self.free.pop().context("no free slot under the iodepth")?;
                self.submit(slot)?;
                in_flight += 1;
            }
            if in_flight == 0 {
                break;
            }
            let done = self
                .store
                .poll(true)
                .context("polling the chunk store")?
                .context("the chunk store finished nothing with operations in flight")?;
            let now = Instant::now();
            let slot = usize::try_from(done.token)
                .ok()
                .filter(|&s| s < self.w.iodepth)
                .with_context(|| format!("a completion for unknown token {}", done.token))?;
            in_flight -= 1;
            let pattern = self.w.pattern.name();
            let data = done
                .result
                .with_context(|| format!("a {pattern} operation of the chunk store failed"))?;
            if let Some(buf) = data {
                self.targets[slot] = Some(self.reclaim(buf)?);
            }
            stats.record(self.sent[slot], now, self.w.bs as usize);
            self.free.push(slot);
        }
        stats.elapsed = deadline.elapsed();
        Ok(())
    }

    fn next_block(&mut self) -> u64 {
        let blocks = self.w.blocks();
        match self.w.pattern {
            Pattern::Randwrite | Pattern::Randread => self.rng.below(blocks),
            Pattern::Seqwrite => {
                let block = self.cursor;
                self.cursor = (self.cursor + 1) % blocks;
                block
            }
        }
    }

    fn submit(&mut self, slot: usize) -> anyhow::Result<()> {
        let block = self.next_block();
        let (k, offset) = self.w.locate(block);
        let token = slot as u64;
        // The clock starts before the submit, so the store's own work counts.
        self.sent[slot] = Instant::now();
        let submitted = if self.w.pattern.is_write() {
            let data = self.sources[slot].clone();
            let sync = self.w.sync == SyncPolicy::Always;
            self.store.submit_write(k, SN, offset, data, sync, token)
        } else {
            let target = self.targets[slot]
                .take()
                .context("a read target still in flight")?;
            self.store.submit_read(k, offset, target, token)
        };
        submitted.with_context(|| {
            format!(
                "submitting a {} of {} bytes to chunk {k} at {offset}",
                self.w.pattern.name(),
                self.w.bs
            )
        })
    }

    /// A read's buffer back as a writable target for the next read.
    fn reclaim(&self, buf: Buf) -> anyhow::Result<BufMut> {
        match buf.try_into_mut() {
            Ok(target) => Ok(target),
            // Shared (not expected): leave it and take a fresh arena buffer.
            Err(_) => self
                .store
                .arena()
                .alloc(self.w.bs as usize)
                .context("arena buffer for a read"),
        }
    }
}

/// Our chunks a store in `dir` already holds (from a `--keep` run), found by
/// opening it without formatting, and how many chunk and snapshot files it
/// holds in all. Nothing to find when `dir` has no store.
fn existing_chunks(dir: &Path, w: &Workload) -> anyhow::Result<(Vec<ChunkKey>, usize)> {
    let chunks_dir = dir.join("chunks");
    if !chunks_dir.exists() {
        return Ok((Vec::new(), 0));
    }
    // Every open chunk file holds a checksum buffer: size the arena by the
    // files there, whatever they are.
    let files = count_files(&chunks_dir, 3)?;
    let probe = Workload {
        iodepth: 1,
        pattern: Pattern::Randwrite,
        ..*w
    };
    let mut config = StoreConfig::new(dir);
    config.pool_files = 0;
    config.pool_low_water = 0;
    config.open_files_max = open_files(files)?;
    let store = ChunkStore::open(config, bench_arena(&probe, files + 1)?)
        .with_context(|| format!("opening the existing chunk store in {}", dir.display()))?;
    let ours = (0..w.chunks()).map(key).collect::<Vec<_>>();
    let mine = store
        .list()
        .into_iter()
        .filter(|k| ours.binary_search(k).is_ok())
        .collect();
    Ok((mine, files))
}

/// Regular files under `dir`, at most `depth` levels down.
fn count_files(dir: &Path, depth: usize) -> anyhow::Result<usize> {
    let mut n = 0;
    for entry in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
        let kind = entry.file_type()?;
        if kind.is_file() {
            n += 1;
        } else if kind.is_dir() && depth > 1 {
            n += count_files(&entry.path(), depth - 1)?;
        }
    }
    Ok(n)
}

/// Registered file slots for `files` open chunk files, with room to spare.
fn open_files(files: usize) -> anyhow::Result<u32> {
    u32::try_from(files + SLACK).context("too many chunk files")
}

/// An arena for the store: 4 KiB pages (its scratch page), one 16 KiB
/// checksum table per open chunk file, one `bs` buffer per slot, and the
/// layout writes of randread.
fn bench_arena(w: &Workload, open_files: usize) -> anyhow::Result<Arena> {
    let mut classes: BTreeMap<usize, usize> = BTreeMap::new();
    *classes.entry(PAGE_BYTES).or_default() += SMALL_BUFFERS;
    let crc_bytes = quiver_chunkstore::format::CRC_BYTES;
    *classes.entry(crc_bytes).or_default() += open_files + SLACK;
    *classes.entry(w.bs as usize).or_default() += w.iodepth + SLACK;
    if w.pattern == Pattern::Randread {
        *classes.entry(LAYOUT_BYTES).or_default() += 2;
    }
    let classes = classes
        .into_iter()
        .map(|(buf_bytes, count)| SizeClass { buf_bytes, count })
        .collect();
    Arena::new(&ArenaConfig {
        classes,
        huge_pages: true,
    })
    .context("mapping the bench's arena")
}

/// Removes what the bench put in its directory when dropped (unless kept):
/// the store's `chunks/` and `pool/`, the fio file, and the directory itself
/// when that leaves it empty. Drop the store first.
pub struct Cleanup {
    dir: PathBuf,
    fio_file: PathBuf,
    pub keep: bool,
}

impl Cleanup {
    pub fn new(dir: &Path, fio_file: &Path, keep: bool) -> Cleanup {
        Cleanup {
            dir: dir.to_path_buf(),
            fio_file: fio_file.to_path_buf(),
            keep,
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        for sub in ["chunks", "pool"] {
            let path = self.dir.join(sub);
            if path.exists() {
                if let Err(e) = fs::remove_dir_all(&path) {
                    tracing::warn!(path = %path.display(), error = %e, "could not remove");
                }
            }
        }
        if self.fio_file.exists() {
            if let Err(e) = fs::remove_file(&self.fio_file) {
                tracing::warn!(path = %self.fio_file.display(), error = %e, "could not remove");
            }
        }
        // Only if empty: anything else there is not ours.
        let _ = fs::remove_dir(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(pattern: Pattern, iodepth: usize, sync: SyncPolicy) -> Workload {
        Workload {
            pattern,
            bs: 4096,
            iodepth,
            size: 64 << 20,
            sync,
            limit: Limit::Iters(200),
            warmup: 20,
            device_flush: true,
        }
    }

    #[test]
    fn blocks_map_inside_one_chunk() {
        let mut w = workload(Pattern::Randwrite, 1, SyncPolicy::Never);
        assert_eq!((w.blocks(), w.chunks()), (16384, 4));
        assert_eq!(w.locate(4095), (key(0), CHUNK_BYTES - 4096));
        assert_eq!(w.locate(4096), (key(1), 0));
        // 3 MiB blocks: 5 per chunk, the chunk's last 1 MiB unused.
        w.bs = 3 << 20;
        w.size = 30 << 20;
        assert_eq!((w.blocks(), w.chunks()), (10, 2));
        assert_eq!(w.locate(5), (key(1), 0));
        assert_eq!(w.locate(4), (key(0), 12 << 20));
        w.bs = 1000;
        assert!(w.validate().is_err());
        w.bs = 32 << 20;
        assert!(w.validate().is_err());
    }

    #[test]
    fn random_blocks_stay_in_range() {
        let mut rng = Rng(7);
        for n in [1, 2, 3, 16384, u64::MAX] {
            for _ in 0..1000 {
                assert!(rng.below(n) < n);
            }
        }
    }

    #[test]
    fn every_pattern_runs_against_a_small_store_and_reopens() {
        let dir = tempfile::tempdir().unwrap();
        for (pattern, iodepth, sync) in [
            (Pattern::Randwrite, 1, SyncPolicy::Always),
            (Pattern::Seqwrite, 4, SyncPolicy::Never),
            (Pattern::Randread, 8, SyncPolicy::Never),
        ] {
            let w = workload(pattern, iodepth, sync);
            // Each pattern reopens the store the previous one left.
            let mut bench = StoreBench::open(dir.path(), &w).unwrap();
            if pattern == Pattern::Randread {
                // Laid out: reads find written pages everywhere.
                for chunk in 0..w.chunks() {
                    let stat = bench.store.stat(key(chunk)).unwrap();
                    assert_eq!(stat.pages_written, CHUNK_BYTES as usize / PAGE_BYTES);
                }
            }
            let stats = bench.run().unwrap();
            assert_eq!(stats.ops, 200, "{pattern:?}");
            assert_eq!(stats.bytes, 200 * 4096);
            assert_eq!(stats.latency_ns.len(), 200);
            assert!(stats.elapsed > std::time::Duration::ZERO);
        }
        // Reopened, the store formatted nothing more than the first open did.
        let pool = fs::read_dir(dir.path().join("pool")).unwrap().count();
        assert_eq!(pool, POOL_SPARE);
    }
}
