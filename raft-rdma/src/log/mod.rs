//! The Raft log engine: one per disk, shared by every copyset (Raft group) on
//! it, so many groups cost few fsyncs.
//!
//! Records ([`record`]) go to segment files (`log-<seq>.seg`, preallocated)
//! written by one writer through io_uring with O_DIRECT: it takes every
//! request queued since its last write, writes them as one batch (padded to
//! 4 KiB) with `RWF_DSYNC`, so the one write completes once durable, and only
//! then reports each request durable (group commit). The writer is an async
//! task ([`LogConfig::runtime`]): it waits for its ring's completions on an
//! eventfd, so it shares the thread Raft runs on without blocking it. Appends are visible to readers at once (Raft reads entries
//! back to replicate them before they are durable); their durability is
//! reported through the callback. An entry's data stay in memory as given
//! (a fabric buffer, on the write path) until the Raft layer has applied it
//! ([`LogEngine::applied`]: but for the newest few, kept as a copy) and it is
//! written; then only where its record lies is kept, and a read takes it
//! from disk.
//!
//! Recovery reads the segments in order and replays them; it stops at the
//! first record that fails its checksum in the last segment (a torn batch:
//! never acknowledged), cuts the file there and goes on appending; a bad
//! record in an earlier segment (before its seal) is corruption and refuses
//! to open. Each new segment starts with every group's vote, committed id and
//! purge point, so an old segment can go once every group has purged past
//! its entries. It is then kept for reuse (`log-<seq>.free`, at most
//! [`FREE_SEGMENTS_MAX`]) rather than deleted: a new segment must be written
//! through once before appends to it are cheap (see `create_segment`), and a
//! reused file already is, so a roll costs a rename instead of a segment of
//! zeros. Records carry their segment's sequence number in their checksum,
//! so an old life's records read as the end of the data.

pub mod record;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex, MutexGuard, RwLock};
use std::thread::JoinHandle;

use tokio::io::unix::AsyncFd;

use quiver_chunkstore::flush::DeviceFlush;
use quiver_chunkstore::uring::Ring;
use quiver_chunkstore::StoreError;
use quiver_fabric::arena::{Arena, ArenaConfig, SizeClass};

use crate::data::Data;
pub use record::{LogId, Vote};
use record::{Next, Record, PAGE_BYTES};

/// A group's newest applied entries keep their data in memory, this many at
/// most: a follower whose answers come a round late (at queue depth 1, the
/// slower of two while the faster makes the quorum) is sent each entry after
/// it was applied, and reading it back from disk put a blocking thread's
/// wake-up and a read on every such send.
pub const KEPT_APPLIED_ENTRIES: u64 = 32;
/// ...and at most these many bytes of them (a copy of each, on the heap).
pub const KEPT_APPLIED_BYTES: u64 = 256 << 10;

/// Retired segment files kept for reuse; more are deleted.
pub const FREE_SEGMENTS_MAX: usize = 2;

/// Settings of a log engine.
#[derive(Debug, Clone)]
pub struct LogConfig {
    pub dir: PathBuf,
    /// Bytes per segment file.
    pub segment_bytes: u64,
    /// Bytes one write carries at most (a batch larger than this is split).
    pub write_bytes_max: usize,
    /// The runtime the writer runs on, as a task: the chunkserver's, so a
    /// request, its write's submission and its durability are task wake-ups
    /// on the thread Raft runs on, with no thread of the log's own to wake
    /// (on two vCPUs shared by three servers, that wake-up waited for a CPU).
    /// None: the writer runs a runtime on a thread of its own.
    pub runtime: Option<tokio::runtime::Handle>,
    /// Make a batch with nothing to write (a sync only) durable with one
    /// device cache flush where a segment's block map is fixed (see
    /// `quiver_chunkstore::flush`), not an fdatasync of the segment: an
    /// append updates the segment's timestamps, which on ext4 without a
    /// journal makes fdatasync write the inode too. Batches with records
    /// are written with `RWF_DSYNC` either way (measured 143-153 µs per
    /// append against 212-267 µs for a write linked to the anchor's
    /// fdatasync, which went through an io-wq thread and one more wake-up;
    /// on ext4 without a journal that sync may write the inode too).
    pub device_flush: bool,
}

impl LogConfig {
    pub fn new(dir: impl Into<PathBuf>) -> LogConfig {
        LogConfig {
            dir: dir.into(),
            segment_bytes: 64 << 20,
            write_bytes_max: 4 << 20,
            runtime: None,
            device_flush: true,
        }
    }
}

/// Errors of the log engine.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LogError {
    #[error("{op} {path}: {error}")]
    Io {
        op: &'static str,
        path: PathBuf,
        error: String,
    },
    #[error("log segment {path} is corrupt at byte {offset}: {what}")]
    Corrupt {
        path: PathBuf,
        offset: usize,
        what: String,
    },
    #[error("group {group}: entry {index} does not follow the log's last index {last}")]
    NotContiguous { group: u64, index: u64, last: u64 },
    #[error("group {group}: entry {index} of {len} bytes is over the record limit of {max}")]
    TooLarge {
        group: u64,
        index: u64,
        len: usize,
        max: usize,
    },
    #[error("the log engine stopped after a write failed: {0}")]
    Failed(String),
    #[error("io_uring: {0}")]
    Ring(String),
}

impl From<StoreError> for LogError {
    fn from(e: StoreError) -> LogError {
        LogError::Ring(e.to_string())
    }
}

fn io_error<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> LogError + 'a {
    move |e| LogError::Io {
        op,
        path: path.to_path_buf(),
        error: e.to_string(),
    }
}

/// One log entry: its id, the Raft layer's tag byte (what kind of entry)
/// and its data. On disk the record's payload is the tag, then the data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub id: LogId,
    pub tag: u8,
    /// Held as given (a fabric buffer stays one) until applied and
    /// written; from disk after that.
    pub data: Data,
}

/// What a group's log holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LogState {
    /// The last purged id (entries up to it are gone).
    pub purged: Option<LogId>,
    /// The last id in the log (or the purged one when the log is empty).
    pub last: Option<LogId>,
}

/// Called once a request is durable (or failed).
pub type Durable = Box<dyn FnOnce(Result<(), LogError>) + Send>;

/// Where a record lies: its segment's sequence number and its offset there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct At {
    seq: u64,
    offset: u64,
}

/// An entry as the log keeps it: its data in memory until the Raft layer
/// is done with them ([`LogEngine::applied`]) and they are written; from
/// then on only where to read them.
struct Stored {
    id: LogId,
    tag: u8,
    len: u32,
    data: Option<Data>,
    at: Option<At>,
}

impl Stored {
    fn payload_len(&self) -> u64 {
        1 + u64::from(self.len)
    }
}

#[derive(Default)]
struct Group {
    entries: VecDeque<Stored>,
    /// Payload bytes of `entries` (in memory or on disk).
    bytes: u64,
    /// Data bytes of `entries` held in memory.
    held_bytes: u64,
    /// Entries up to here need not stay in memory once written.
    released: u64,
    purged: Option<LogId>,
    vote: Option<Vote>,
    committed: Option<LogId>,
}

impl Group {
    fn last(&self) -> Option<LogId> {
        self.entries.back().map(|e| e.id).or(self.purged)
    }

    /// The entries with indexes in `[from, to)`.
    fn range(&self, from: u64, to: u64) -> std::collections::vec_deque::Iter<'_, Stored> {
        self.entries.range(self.positions(from, to))
    }

    /// Where the entries with indexes in `[from, to)` are in `entries`.
    fn positions(&self, from: u64, to: u64) -> std::ops::Range<usize> {
        let first = self.entries.front().map_or(0, |e| e.id.index);
        let start = from.saturating_sub(first) as usize;
        let end = to.saturating_sub(first).min(self.entries.len() as u64) as usize;
        start.min(end)..end
    }

    fn get_mut(&mut self, index: u64) -> Option<&mut Stored> {
        let first = self.entries.front()?.id.index;
        let i = usize::try_from(index.checked_sub(first)?).ok()?;
        self.entries.get_mut(i)
    }

    /// Drops the entry's data if it is written and released.
    fn maybe_drop_data(&mut self, index: u64) {
        let released = self.released;
        let Some(e) = self.get_mut(index) else {
            return;
        };
        if index <= released && e.at.is_some() {
            if let Some(d) = e.data.take() {
                let n = d.len() as u64;
                self.held_bytes -= n;
            }
        }
    }

    /// Notes that the record of entry `id` lies at `at`.
    fn written(&mut self, id: LogId, at: At) {
        let Some(e) = self.get_mut(id.index).filter(|e| e.id == id) else {
            return; // truncated or purged meanwhile
        };
        e.at = Some(at);
        self.maybe_drop_data(id.index);
    }

    /// Where to release up to once `applied` is applied: all but the newest
    /// [`KEPT_APPLIED_ENTRIES`] entries, fewer when they hold more than
    /// [`KEPT_APPLIED_BYTES`].
    /// `None`: release nothing yet.
    fn release_point(&self, applied: u64) -> Option<u64> {
        let from = applied.saturating_sub(KEPT_APPLIED_ENTRIES - 1);
        let (mut kept_from, mut bytes) = (applied.saturating_add(1), 0);
        for e in self.range(from, applied.saturating_add(1)).rev() {
            bytes += e.payload_len();
            if bytes > KEPT_APPLIED_BYTES {
                break;
            }
            kept_from = e.id.index;
        }
        kept_from.checked_sub(1)
    }

    /// Copies the data of the entries in `[from, to)` that are held in
    /// fabric buffers to the heap, so the buffers go back to the fabric.
    fn unpin(&mut self, from: u64, to: u64) {
        let positions = self.positions(from, to);
        for e in self.entries.range_mut(positions) {
            if let Some(data @ Data::Fabric(_)) = &mut e.data {
                *data = Data::from(&data[..]);
            }
        }
    }

    fn release(&mut self, upto: u64) {
        let Some(first) = self.entries.front().map(|e| e.id.index) else {
            self.released = self.released.max(upto);
            return;
        };
        let from = (self.released + 1).max(first);
        self.released = self.released.max(upto);
        let last = self.entries.back().map_or(0, |e| e.id.index);
        for index in from..=upto.min(last) {
            self.maybe_drop_data(index);
        }
    }

    /// Replays `record`, read at `at`: entries are read back from there
    /// when wanted.
    fn apply(&mut self, record: &Record<'_>, at: At) {
        match *record {
            Record::Entry { id, payload, .. } => {
                // Replay after a crash may meet an entry the log had already
                // passed only through a truncate it holds: treat as overwrite.
                self.truncate(id.index);
                // (Every entry is written with a tag; an empty payload reads
                // as a blank entry's tag 0.)
                let tag = payload.first().copied().unwrap_or(0);
                self.push(Stored {
                    id,
                    tag,
                    len: payload.len().saturating_sub(1) as u32,
                    data: None,
                    at: Some(at),
                });
            }
            Record::Truncate { from, .. } => self.truncate(from),
            Record::Purge { upto, .. } => self.purge(upto),
            Record::Vote { vote, .. } => self.vote = Some(vote),
            Record::Committed { id, .. } => self.committed = Some(id),
            Record::Seal => {}
        }
    }

    fn push(&mut self, entry: Stored) {
        self.bytes += entry.payload_len();
        self.held_bytes += entry.data.as_ref().map_or(0, |d| d.len() as u64);
        self.entries.push_back(entry);
    }

    fn forget(&mut self, gone: &Stored) {
        self.bytes -= gone.payload_len();
        self.held_bytes -= gone.data.as_ref().map_or(0, |d| d.len() as u64);
    }

    fn truncate(&mut self, from: u64) {
        while self.entries.back().is_some_and(|e| e.id.index >= from) {
            let gone = self.entries.pop_back().expect("checked");
            self.forget(&gone);
        }
        // Entries appended again from `from` on are new: not yet released.
        self.released = self.released.min(from.saturating_sub(1));
    }

    fn purge(&mut self, upto: LogId) {
        while self
            .entries
            .front()
            .is_some_and(|e| e.id.index <= upto.index)
        {
            let gone = self.entries.pop_front().expect("checked");
            self.forget(&gone);
        }
        if self.purged.is_none_or(|p| p.index < upto.index) {
            self.purged = Some(upto);
        }
    }
}

/// A record owned for the writer.
enum Owned {
    Entry { group: u64, entry: Entry },
    Truncate { group: u64, from: u64 },
    Purge { group: u64, upto: LogId },
    Vote { group: u64, vote: Vote },
    Committed { group: u64, id: LogId },
}

impl Owned {
    fn record(&self) -> Record<'_> {
        match self {
            Owned::Entry { group, entry } => Record::Entry {
                group: *group,
                id: entry.id,
                head: std::slice::from_ref(&entry.tag),
                payload: &entry.data,
            },
            &Owned::Truncate { group, from } => Record::Truncate { group, from },
            &Owned::Purge { group, upto } => Record::Purge { group, upto },
            &Owned::Vote { group, vote } => Record::Vote { group, vote },
            &Owned::Committed { group, id } => Record::Committed { group, id },
        }
    }
}

enum Op {
    Write { records: Vec<Owned>, done: Durable },
    Stop,
}

/// One segment file on disk.
struct Segment {
    seq: u64,
    path: PathBuf,
    /// Highest entry index per group in this segment.
    max_index: HashMap<u64, u64>,
    /// Whether the file may be reused once retired: written through, at the
    /// configured size, and holding only records that carry their segment's
    /// number (format version 2).
    reusable: bool,
}

/// Counters of a log engine, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LogStats {
    /// Requests made durable.
    pub requests: u64,
    /// fdatasyncs issued for them (group commit: fewer than requests).
    pub syncs: u64,
    pub bytes_written: u64,
    pub segments_deleted: u64,
    /// Retired segments kept as files for later segments.
    pub segments_recycled: u64,
    /// New segments made from a retired one (no zero fill).
    pub segments_reused: u64,
}

struct Shared {
    groups: HashMap<u64, Group>,
    stats: LogStats,
    /// Set after a failed write: the engine refuses everything from then on.
    failed: Option<String>,
    /// Groups whose committed id changed since it was last written (see
    /// [`LogEngine::note_committed`]).
    committed_unwritten: Vec<u64>,
}

/// The log engine of one disk.
pub struct LogEngine {
    dir: PathBuf,
    shared: Arc<Mutex<Shared>>,
    /// Held for reading while entries are read back from segments, for
    /// writing while the writer retires one: a segment named in an entry's
    /// place stays until the read is done.
    segments_in_use: Arc<RwLock<()>>,
    tx: tokio::sync::mpsc::UnboundedSender<Op>,
    /// The writer's own thread, where it has one.
    writer: Option<JoinHandle<()>>,
    /// The writer's task, where it runs on the caller's runtime
    /// ([`LogConfig::runtime`]): [`LogEngine::stop`] waits for it.
    writer_task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl LogEngine {
    /// Opens (recovering) or creates the log in `config.dir`.
    pub fn open(config: LogConfig) -> Result<LogEngine, LogError> {
        std::fs::create_dir_all(&config.dir).map_err(io_error("creating", &config.dir))?;
        let mut groups: HashMap<u64, Group> = HashMap::new();
        let mut segments = Vec::new();
        let mut listed: BTreeMap<u64, PathBuf> = BTreeMap::new();
        let mut free = Vec::new();
        for dirent in std::fs::read_dir(&config.dir).map_err(io_error("listing", &config.dir))? {
            let path = dirent.map_err(io_error("listing", &config.dir))?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.starts_with("log-") && name.ends_with(".seg.tmp") {
                // A spare segment being prepared when the process stopped.
                std::fs::remove_file(&path).map_err(io_error("removing", &path))?;
                continue;
            }
            if name.starts_with("log-") && name.ends_with(".free") {
                let len = std::fs::metadata(&path)
                    .map_err(io_error("reading the size of", &path))?
                    .len();
                if len == config.segment_bytes && free.len() < FREE_SEGMENTS_MAX {
                    free.push(path);
                } else {
                    std::fs::remove_file(&path).map_err(io_error("removing", &path))?;
                }
                continue;
            }
            if let Some(seq) = name
                .strip_prefix("log-")
                .and_then(|n| n.strip_suffix(".seg"))
                .and_then(|n| n.parse::<u64>().ok())
            {
                listed.insert(seq, path);
            }
        }
        let count = listed.len();
        let mut tail = None;
        let mut sealed = false;
        for (i, (seq, path)) in listed.into_iter().enumerate() {
            let bytes = std::fs::read(&path).map_err(io_error("reading", &path))?;
            let mut segment = Segment {
                seq,
                path: path.clone(),
                max_index: HashMap::new(),
                reusable: record::version_at_start(&bytes) == Some(record::VERSION)
                    && bytes.len() as u64 == config.segment_bytes,
            };
            let mut offset = 0;
            sealed = false;
            let end = loop {
                match record::next(&bytes, offset, seq) {
                    Ok(Next::Record(Record::Seal, next)) => {
                        sealed = true;
                        break next;
                    }
                    Ok(Next::Record(r, next)) => {
                        if let Record::Entry { group, id, .. } = r {
                            segment.max_index.insert(group, id.index);
                        }
                        let at = At {
                            seq,
                            offset: offset as u64,
                        };
                        groups.entry(r.group()).or_default().apply(&r, at);
                        offset = next;
                    }
                    Ok(Next::Skip(to)) => offset = to,
                    Ok(Next::End) => break offset,
                    Err(e) if i + 1 == count => {
                        // A torn batch, or (in a reused file) an earlier
                        // life's records: either way the data ends here.
                        tracing::info!(path = %path.display(), error = %e, "log: the last segment's data ends here");
                        // Zero everything after it now, the rest of its page
                        // too: once a later segment exists, this one is read
                        // to its seal or its zeros, and a torn record left
                        // in the page would read as corruption.
                        cut_after(&path, offset as u64, bytes.len() as u64)?;
                        // Cut and re-extended, the file has a hole: not worth
                        // reusing (not written through).
                        segment.reusable = false;
                        break offset;
                    }
                    Err(record::RecordError::Bad { offset, what }) => {
                        return Err(LogError::Corrupt { path, offset, what });
                    }
                }
            };
            if i + 1 == count {
                tail = Some(end.next_multiple_of(PAGE_BYTES) as u64);
            }
            segments.push(segment);
        }
        if sealed {
            // Sealed, and the next segment never started: append in a new one.
            tail = None;
        }
        let shared = Arc::new(Mutex::new(Shared {
            groups,
            stats: LogStats::default(),
            failed: None,
            committed_unwritten: Vec::new(),
        }));
        let segments_in_use = Arc::new(RwLock::new(()));
        let dir = config.dir.clone();
        let runtime = config.runtime.clone();
        let writer = Writer::start(
            config,
            segments,
            tail,
            free,
            Arc::clone(&shared),
            Arc::clone(&segments_in_use),
        )?;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let mut task = None;
        let thread = match runtime {
            Some(runtime) => {
                task = Some(runtime.spawn(writer.run(rx)));
                None
            }
            None => {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| LogError::Ring(format!("the log writer's runtime: {e}")))?;
                let thread = std::thread::Builder::new()
                    .name("raft-log".into())
                    .spawn(move || runtime.block_on(writer.run(rx)))
                    .map_err(|e| LogError::Ring(format!("spawning the log writer: {e}")))?;
                Some(thread)
            }
        };
        Ok(LogEngine {
            dir,
            shared,
            segments_in_use,
            tx,
            writer: thread,
            writer_task: Mutex::new(task),
        })
    }

    /// Stops the writer once the requests queued before this call are
    /// written and durable (their callbacks called), and, where the writer
    /// is a task on the caller's runtime, waits until it has ended and let
    /// go of its files: a log reopened after this has no writer but its
    /// own. (Dropping the engine stops the writer too, but a task cannot be
    /// waited for in a drop.) Appends after this fail.
    pub async fn stop(&self) {
        let _ = self.tx.send(Op::Stop);
        let task = self.writer_task.lock().expect("writer task lock").take();
        if let Some(task) = task {
            if let Err(e) = task.await {
                tracing::warn!(error = %e, "the log writer's task ended abnormally");
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().expect("log state lock poisoned")
    }

    fn send(&self, records: Vec<Owned>, done: Durable) {
        if let Err(tokio::sync::mpsc::error::SendError(Op::Write { done, .. })) =
            self.tx.send(Op::Write { records, done })
        {
            done(Err(LogError::Failed("the log writer has stopped".into())));
        }
    }

    fn check(&self, shared: &Shared) -> Result<(), LogError> {
        match &shared.failed {
            Some(why) => Err(LogError::Failed(why.clone())),
            None => Ok(()),
        }
    }

    /// Appends entries (contiguous among themselves); they are readable when
    /// this returns, durable when `done` is called. Entries at or below the
    /// purge point are already covered by a snapshot and are skipped; an
    /// append that starts at or before the last index replaces the entries
    /// from there on (as a truncate would); one that leaves a hole is refused.
    pub fn append(
        &self,
        group: u64,
        mut entries: Vec<Entry>,
        done: Durable,
    ) -> Result<(), LogError> {
        // The record is the tag byte, then the data.
        if let Some(e) = entries
            .iter()
            .find(|e| 1 + e.data.len() > record::PAYLOAD_BYTES_MAX)
        {
            return Err(LogError::TooLarge {
                group,
                index: e.id.index,
                len: 1 + e.data.len(),
                max: record::PAYLOAD_BYTES_MAX,
            });
        }
        let mut shared = self.lock();
        self.check(&shared)?;
        let g = shared.groups.entry(group).or_default();
        if let Some(purged) = g.purged {
            entries.retain(|e| e.id.index > purged.index);
        }
        for pair in entries.windows(2) {
            if pair[1].id.index != pair[0].id.index + 1 {
                return Err(LogError::NotContiguous {
                    group,
                    index: pair[1].id.index,
                    last: pair[0].id.index,
                });
            }
        }
        let mut records = Vec::with_capacity(entries.len() + 1);
        if let (Some(first), Some(last)) = (entries.first(), g.last()) {
            if first.id.index > last.index + 1 {
                return Err(LogError::NotContiguous {
                    group,
                    index: first.id.index,
                    last: last.index,
                });
            }
            if first.id.index <= last.index {
                g.truncate(first.id.index);
                records.push(Owned::Truncate {
                    group,
                    from: first.id.index,
                });
            }
        }
        for e in &entries {
            g.push(Stored {
                id: e.id,
                tag: e.tag,
                len: e.data.len() as u32, // under PAYLOAD_BYTES_MAX, checked above
                data: Some(e.data.clone()),
                at: None,
            });
        }
        drop(shared);
        records.extend(
            entries
                .into_iter()
                .map(|entry| Owned::Entry { group, entry }),
        );
        self.send(records, done);
        Ok(())
    }

    /// Removes entries from `from` on (a conflict with the leader's log).
    pub fn truncate(&self, group: u64, from: u64, done: Durable) -> Result<(), LogError> {
        let mut shared = self.lock();
        self.check(&shared)?;
        shared.groups.entry(group).or_default().truncate(from);
        drop(shared);
        self.send(vec![Owned::Truncate { group, from }], done);
        Ok(())
    }

    /// Removes entries up to and including `upto` (a snapshot covers them).
    pub fn purge(&self, group: u64, upto: LogId, done: Durable) -> Result<(), LogError> {
        let mut shared = self.lock();
        self.check(&shared)?;
        shared.groups.entry(group).or_default().purge(upto);
        drop(shared);
        self.send(vec![Owned::Purge { group, upto }], done);
        Ok(())
    }

    pub fn save_vote(&self, group: u64, vote: Vote, done: Durable) -> Result<(), LogError> {
        let mut shared = self.lock();
        self.check(&shared)?;
        shared.groups.entry(group).or_default().vote = Some(vote);
        drop(shared);
        self.send(vec![Owned::Vote { group, vote }], done);
        Ok(())
    }

    pub fn save_committed(&self, group: u64, id: LogId, done: Durable) -> Result<(), LogError> {
        let mut shared = self.lock();
        self.check(&shared)?;
        shared.groups.entry(group).or_default().committed = Some(id);
        drop(shared);
        self.send(vec![Owned::Committed { group, id }], done);
        Ok(())
    }

    /// Records `group`'s committed id without a write of its own: it goes to
    /// disk with the next batch written for another reason. Raft needs the
    /// committed id only as a hint after a restart (the leader tells it
    /// again), so an fdatasync per commit, on the path of every write, would
    /// buy nothing.
    pub fn note_committed(&self, group: u64, id: LogId) -> Result<(), LogError> {
        let mut shared = self.lock();
        self.check(&shared)?;
        shared.groups.entry(group).or_default().committed = Some(id);
        if !shared.committed_unwritten.contains(&group) {
            shared.committed_unwritten.push(group);
        }
        Ok(())
    }

    pub fn state(&self, group: u64) -> LogState {
        let shared = self.lock();
        shared
            .groups
            .get(&group)
            .map_or(LogState::default(), |g| LogState {
                purged: g.purged,
                last: g.last(),
            })
    }

    /// Payload bytes of the entries `group`'s log holds (until purged).
    pub fn bytes(&self, group: u64) -> u64 {
        self.lock().groups.get(&group).map_or(0, |g| g.bytes)
    }

    /// Data bytes of `group`'s entries held in memory (not yet released,
    /// or not yet written).
    pub fn held_bytes(&self, group: u64) -> u64 {
        self.lock().groups.get(&group).map_or(0, |g| g.held_bytes)
    }

    /// `group`'s entries up to `index` are applied: their data leave memory
    /// once written, except the newest few (see [`KEPT_APPLIED_ENTRIES`]).
    ///
    /// Those kept are copied out of fabric buffers: a follower may never ask
    /// for them (an idle copyset keeps its last ones until a snapshot), and
    /// a fabric buffer held for it is not returned (an eager body's is its
    /// connection's whole receive buffer).
    pub fn applied(&self, group: u64, index: u64) {
        if let Some(g) = self.lock().groups.get_mut(&group) {
            let upto = g.release_point(index);
            if let Some(upto) = upto {
                g.release(upto);
            }
            g.unpin(upto.map_or(0, |u| u + 1), index.saturating_add(1));
        }
    }

    /// The Raft layer is done with `group`'s entries up to `upto` (applied):
    /// once written, their data leave memory and are read back from disk
    /// when wanted. Data held in fabric buffers go back to the fabric.
    pub fn release(&self, group: u64, upto: u64) {
        if let Some(g) = self.lock().groups.get_mut(&group) {
            g.release(upto);
        }
    }

    pub fn vote(&self, group: u64) -> Option<Vote> {
        self.lock().groups.get(&group).and_then(|g| g.vote)
    }

    pub fn committed(&self, group: u64) -> Option<LogId> {
        self.lock().groups.get(&group).and_then(|g| g.committed)
    }

    /// Entries with indexes in `[from, to)` that the log holds, if all of
    /// them are in memory (the common case: no disk, no segments lock).
    pub fn entries_in_memory(&self, group: u64, from: u64, to: u64) -> Option<Vec<Entry>> {
        let shared = self.lock();
        let Some(g) = shared.groups.get(&group) else {
            return Some(Vec::new());
        };
        g.range(from, to)
            .map(|e| {
                Some(Entry {
                    id: e.id,
                    tag: e.tag,
                    data: e.data.clone()?,
                })
            })
            .collect()
    }

    /// Entries with indexes in `[from, to)` that the log holds: from memory,
    /// or read back from their segments.
    pub fn entries(&self, group: u64, from: u64, to: u64) -> Result<Vec<Entry>, LogError> {
        if let Some(entries) = self.entries_in_memory(group, from, to) {
            return Ok(entries);
        }
        // A read from disk holds off the retiring of the segments it names.
        let _in_use = self.segments_in_use.read().expect("segments lock");
        // Each entry's data, or where to read them (and how many bytes).
        type Wanted = (LogId, u8, Result<Data, (At, u32)>);
        let wanted: Vec<Wanted> = {
            let shared = self.lock();
            let Some(g) = shared.groups.get(&group) else {
                return Ok(Vec::new());
            };
            g.range(from, to)
                .map(|e| {
                    let data = match (&e.data, e.at) {
                        (Some(d), _) => Ok(d.clone()),
                        (None, Some(at)) => Err((at, e.len)),
                        (None, None) => unreachable!("an entry neither held nor written"),
                    };
                    (e.id, e.tag, data)
                })
                .collect()
        };
        let mut files: HashMap<u64, File> = HashMap::new();
        wanted
            .into_iter()
            .map(|(id, tag, data)| {
                let data = match data {
                    Ok(d) => d,
                    Err((at, len)) => self.read_entry(&mut files, group, id, at, len)?,
                };
                Ok(Entry { id, tag, data })
            })
            .collect()
    }

    /// Reads the data of entry `id` back from its record at `at`.
    fn read_entry(
        &self,
        files: &mut HashMap<u64, File>,
        group: u64,
        id: LogId,
        at: At,
        len: u32,
    ) -> Result<Data, LogError> {
        use std::os::unix::fs::FileExt;
        let path = segment_path(&self.dir, at.seq);
        let file = match files.entry(at.seq) {
            std::collections::hash_map::Entry::Occupied(f) => f.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(File::open(&path).map_err(io_error("opening", &path))?)
            }
        };
        let mut bytes = vec![0u8; record::HEADER_BYTES + 1 + len as usize];
        file.read_exact_at(&mut bytes, at.offset)
            .map_err(io_error("reading an entry from", &path))?;
        let corrupt = |what: String| LogError::Corrupt {
            path: path.clone(),
            offset: at.offset as usize,
            what,
        };
        match record::next(&bytes, 0, at.seq) {
            Ok(Next::Record(
                Record::Entry {
                    group: g, id: i, ..
                },
                _,
            )) if g == group && i == id => {}
            Ok(other) => {
                return Err(corrupt(format!(
                    "not entry {id:?} of group {group}: {other:?}"
                )))
            }
            Err(e) => return Err(corrupt(e.to_string())),
        }
        let start = record::HEADER_BYTES + 1;
        Ok(Data::Heap(bytes::Bytes::from(bytes).slice(start..)))
    }

    pub fn stats(&self) -> LogStats {
        self.lock().stats
    }
}

impl Drop for LogEngine {
    /// Stops the writer after the requests queued before; waits for it where
    /// it has a thread (a task on the caller's runtime cannot be waited for
    /// here, and stops on its own: [`LogEngine::stop`] waits for it).
    fn drop(&mut self) {
        let _ = self.tx.send(Op::Stop);
        if let Some(t) = self.writer.take() {
            let _ = t.join();
        }
    }
}

/// Calls `f` with a callback and waits until it is called.
pub fn wait_durable(f: impl FnOnce(Durable) -> Result<(), LogError>) -> Result<(), LogError> {
    let (tx, rx) = mpsc::channel();
    f(Box::new(move |r| {
        let _ = tx.send(r);
    }))?;
    rx.recv()
        .unwrap_or_else(|_| Err(LogError::Failed("the log writer has stopped".into())))
}

/// The writer's ring slots: the open segment, and the device flush's anchor.
const SEGMENT_SLOT: u32 = 0;
const ANCHOR_SLOT: u32 = 1;
/// Tokens of the writer's ring operations (one batch in flight at a time).
const WRITE_TOKEN: u64 = 0;
const SYNC_TOKEN: u64 = 1;

/// The writer's state: the open segment and the ring.
struct Writer {
    config: LogConfig,
    shared: Arc<Mutex<Shared>>,
    segments: Vec<Segment>,
    file: File,
    /// The device flush, where the filesystem allows it.
    device_flush: Option<DeviceFlush>,
    /// The open segment is made durable by `device_flush` alone.
    file_flushed_by_device: bool,
    tail: u64,
    ring: Ring,
    arena: Arena,
    encoded: Vec<u8>,
    /// (group, id, offset in `encoded`) of the entries in `encoded`: for the
    /// segment they land in, and where each lies.
    encoded_entries: Vec<(u64, LogId, usize)>,
    /// See [`LogEngine`]'s field of the same name.
    segments_in_use: Arc<RwLock<()>>,
    /// Batches since retiring a segment first found readers in the way.
    retire_misses: u32,
    /// Purge points already durable: only these may retire a segment.
    durable_purged: HashMap<u64, u64>,
    /// The next segment, being written with zeros on another thread.
    spare: Option<JoinHandle<Result<PathBuf, LogError>>>,
    /// Retired segment files ready for reuse (`log-<seq>.free`).
    free: Vec<PathBuf>,
    /// Completions taken from the ring (kept, so waiting allocates nothing).
    cqes: Vec<quiver_chunkstore::uring::Cqe>,
    reaped: Vec<quiver_chunkstore::uring::Cqe>,
    /// The ring's completion eventfd, once the task runs (an `AsyncFd` is
    /// registered with the runtime it runs on).
    completions: Option<AsyncFd<OwnedFd>>,
}

impl Writer {
    fn start(
        config: LogConfig,
        mut segments: Vec<Segment>,
        tail: Option<u64>,
        free: Vec<PathBuf>,
        shared: Arc<Mutex<Shared>>,
        segments_in_use: Arc<RwLock<()>>,
    ) -> Result<Writer, LogError> {
        let class = config.write_bytes_max.next_power_of_two().max(1 << 20);
        let arena = Arena::new(&ArenaConfig {
            classes: vec![SizeClass {
                buf_bytes: class,
                count: 2,
            }],
            huge_pages: false,
        })
        .map_err(|e| LogError::Ring(format!("log write buffers: {e}")))?;
        let mut ring = Ring::new(8, 2)?;
        ring.register_arena(&arena)?;
        let (file, tail) = match (segments.last(), tail) {
            (Some(last), Some(tail)) if tail + 2 * (PAGE_BYTES as u64) <= config.segment_bytes => {
                let file = open_segment(&last.path, false)?;
                // Anything after the last good batch goes, so a later
                // recovery cannot meet a stale record past the new tail (a
                // torn record inside the tail's page was zeroed at open).
                file.set_len(tail)
                    .map_err(io_error("cutting", &last.path))?;
                file.set_len(config.segment_bytes)
                    .map_err(io_error("extending", &last.path))?;
                file.sync_all().map_err(io_error("syncing", &last.path))?;
                // The cut leaves a hole after the tail: not worth reusing.
                segments.last_mut().expect("the last segment").reusable = false;
                (file, tail)
            }
            _ => {
                let seq = segments.last().map_or(1, |s| s.seq + 1);
                let path = segment_path(&config.dir, seq);
                let file = create_segment(&path, config.segment_bytes, &config.dir)?;
                segments.push(Segment {
                    seq,
                    path,
                    max_index: HashMap::new(),
                    reusable: true,
                });
                (file, 0)
            }
        };
        ring.set_file(SEGMENT_SLOT, file.as_raw_fd())
            .map_err(io_error("registering", &config.dir))?;
        let device_flush = match config.device_flush {
            true => DeviceFlush::for_dir(&config.dir)?,
            false => None,
        };
        if let Some(flush) = &device_flush {
            ring.set_file(ANCHOR_SLOT, flush.anchor().as_raw_fd())
                .map_err(io_error("registering", flush.anchor_path()))?;
        }
        let file_flushed_by_device = device_flush
            .as_ref()
            .is_some_and(|f| f.covers(&file, config.segment_bytes));
        tracing::info!(
            dir = %config.dir.display(),
            device_flush = device_flush.as_ref().map(|f| f.filesystem()),
            file_flushed_by_device,
            "Raft log writer started"
        );
        let durable_purged = shared
            .lock()
            .expect("log state lock")
            .groups
            .iter()
            .filter_map(|(&group, g)| g.purged.map(|p| (group, p.index)))
            .collect();
        let mut writer = Writer {
            spare: None,
            free,
            cqes: Vec::with_capacity(2),
            reaped: Vec::with_capacity(2),
            completions: None,
            encoded_entries: Vec::new(),
            segments_in_use,
            retire_misses: 0,
            durable_purged,
            config,
            shared,
            segments,
            file,
            device_flush,
            file_flushed_by_device,
            tail,
            ring,
            arena,
            encoded: Vec::with_capacity(class),
        };
        if writer.free.is_empty() {
            writer.prepare_spare();
        }
        Ok(writer)
    }

    /// What the writer must do before its first request: wait on its ring
    /// from the runtime it runs on, and start a new segment with metadata.
    async fn begin(&mut self) -> Result<(), LogError> {
        let eventfd = self.ring.completion_eventfd().map_err(io_error(
            "making the completion eventfd of",
            &self.config.dir,
        ))?;
        // SAFETY: the AsyncFd owns the descriptor, so it stays open and the
        // same for the AsyncFd's whole life.
        let completions =
            unsafe { AsyncFd::register_with_interest(eventfd, tokio::io::Interest::READABLE) }
                .map_err(|e| LogError::Ring(format!("waiting on the log's ring: {e}")))?;
        self.completions = Some(completions);
        if self.tail == 0 {
            self.write_metadata().await?;
        }
        Ok(())
    }

    async fn run(mut self, mut rx: tokio::sync::mpsc::UnboundedReceiver<Op>) {
        if let Err(e) = self.begin().await {
            tracing::error!(error = %e, "the log writer could not start; the log engine stops");
            self.shared.lock().expect("log state lock").failed = Some(e.to_string());
            return;
        }
        let mut stop = false;
        while !stop {
            let Some(first) = rx.recv().await else {
                break;
            };
            // Records and their callbacks apart: the callbacks (not `Sync`)
            // must not be borrowed across the write's awaits.
            let mut batch = Vec::new();
            let mut dones: Vec<Durable> = Vec::new();
            let mut bytes = 0;
            for op in std::iter::once(first).chain(std::iter::from_fn(|| rx.try_recv().ok())) {
                match op {
                    Op::Stop => {
                        stop = true;
                        break;
                    }
                    Op::Write { records, done } => {
                        bytes += records
                            .iter()
                            .map(|r| r.record().encoded_len())
                            .sum::<usize>();
                        batch.push(records);
                        dones.push(done);
                        if bytes >= self.config.write_bytes_max {
                            break;
                        }
                    }
                }
            }
            if batch.is_empty() {
                continue;
            }
            let noted: Vec<Owned> = {
                let mut shared = self.shared.lock().expect("log state lock");
                let groups = std::mem::take(&mut shared.committed_unwritten);
                groups
                    .into_iter()
                    .filter_map(|group| {
                        let id = shared.groups.get(&group)?.committed?;
                        Some(Owned::Committed { group, id })
                    })
                    .collect()
            };
            if !noted.is_empty() {
                batch.push(noted);
            }
            let result = self.write_batch(&batch).await;
            {
                let mut shared = self.shared.lock().expect("log state lock");
                match &result {
                    Err(e) => {
                        tracing::error!(error = %e, "log write failed; the log engine stops");
                        shared.failed = Some(e.to_string());
                    }
                    Ok(()) => {
                        shared.stats.requests += dones.len() as u64;
                        shared.stats.syncs += 1;
                    }
                }
            }
            // Records first: their data may be the last hold on a buffer.
            drop(batch);
            for done in dones {
                done(result.clone());
            }
            if result.is_err() {
                break;
            }
            if let Err(e) = self.delete_obsolete() {
                tracing::warn!(error = %e, "deleting old log segments failed");
            }
        }
        if let Some(spare) = self.spare.take() {
            let _ = spare.join();
        }
    }

    /// The sequence number of the segment being written.
    fn seq(&self) -> u64 {
        self.segments.last().expect("an open segment").seq
    }

    /// Writes a batch of requests' records and syncs once.
    async fn write_batch(&mut self, batch: &[Vec<Owned>]) -> Result<(), LogError> {
        self.encoded.clear();
        for records in batch {
            for r in records {
                let record = r.record();
                let len = record.encoded_len();
                if self.encoded.len() + len > self.config.write_bytes_max
                    && !self.encoded.is_empty()
                {
                    self.write_encoded(false).await?;
                    self.encoded.clear();
                }
                if !self.fits(self.encoded.len() + len) {
                    // Records carry their segment's number: what is encoded
                    // goes to this segment, the record to the next.
                    self.write_encoded(false).await?;
                    self.encoded.clear();
                    self.roll().await?;
                }
                if let Record::Entry { group, id, .. } = record {
                    self.encoded_entries.push((group, id, self.encoded.len()));
                }
                let seq = self.seq();
                record.encode(&mut self.encoded, seq);
            }
        }
        self.write_encoded(true).await?;
        for records in batch {
            for r in records {
                if let Owned::Purge { group, upto } = r {
                    let p = self.durable_purged.entry(*group).or_default();
                    *p = (*p).max(upto.index);
                }
            }
        }
        Ok(())
    }

    /// Whether `bytes` more fit in the open segment, leaving its last page
    /// for the seal. A fresh segment takes anything (it grows for a record
    /// larger than a segment).
    fn fits(&self, bytes: usize) -> bool {
        self.tail == 0
            || self.tail + (bytes.next_multiple_of(PAGE_BYTES) + PAGE_BYTES) as u64
                <= self.config.segment_bytes
    }

    /// Appends the encoded bytes, padded to a page, at the tail; with
    /// `then_sync`, makes them (and every write before) durable too: the
    /// write is `RWF_DSYNC`, and its sync flushes the device cache, which
    /// covers this log's earlier completed writes as well.
    async fn write_encoded(&mut self, then_sync: bool) -> Result<(), LogError> {
        if self.encoded.is_empty() {
            if then_sync {
                self.queue_sync(self.tail)?;
                self.complete(1).await?;
                self.result_of(SYNC_TOKEN, "fdatasync")?;
            }
            return Ok(());
        }
        let padded = self.encoded.len().next_multiple_of(PAGE_BYTES);
        let mut buf = self
            .arena
            .alloc(padded)
            .map_err(|e| LogError::Ring(format!("log write buffer: {e}")))?;
        buf[..self.encoded.len()].copy_from_slice(&self.encoded);
        buf[self.encoded.len()..].fill(0);
        let buf = buf.freeze();
        if then_sync {
            self.ring
                .write_fixed_durable(SEGMENT_SLOT, self.tail, &buf, WRITE_TOKEN)?;
        } else {
            self.ring
                .write_fixed(SEGMENT_SLOT, self.tail, &buf, WRITE_TOKEN)?;
        }
        self.complete(1).await?;
        let written = self.result_of(WRITE_TOKEN, "writing")?;
        if written as usize != padded {
            return Err(LogError::Io {
                op: "writing",
                path: self.segments.last().expect("open").path.clone(),
                error: format!("short write: {written} of {padded} bytes"),
            });
        }
        let start = self.tail;
        self.tail += padded as u64;
        let segment = self.segments.last_mut().expect("an open segment");
        let mut shared = self.shared.lock().expect("log state lock");
        shared.stats.bytes_written += padded as u64;
        for (group, id, offset) in self.encoded_entries.drain(..) {
            segment.max_index.insert(group, id.index);
            let at = At {
                seq: segment.seq,
                offset: start + offset as u64,
            };
            if let Some(g) = shared.groups.get_mut(&group) {
                g.written(id, at);
            }
        }
        Ok(())
    }

    /// Queues what makes every completed write durable, once the segment
    /// ends at `end`. The fdatasync runs on an io_uring worker thread of the
    /// kernel's (it blocks), which this writer does not wait for.
    ///
    /// Where the segment qualifies, the fdatasync is of the device flush's
    /// anchor instead: the same cache flush without the inode write.
    fn queue_sync(&mut self, end: u64) -> Result<(), LogError> {
        // A batch may run past the segment's checked length (a record larger
        // than a segment): that write grew the file, which only its own
        // fdatasync makes durable.
        let by_device = self.device_flush.is_some()
            && self.file_flushed_by_device
            && end <= self.config.segment_bytes;
        let slot = if by_device { ANCHOR_SLOT } else { SEGMENT_SLOT };
        Ok(self.ring.fdatasync(slot, SYNC_TOKEN)?)
    }

    /// Submits what is queued and waits until `n` completions are in
    /// (`cqes`), without blocking the thread the writer runs on.
    async fn complete(&mut self, n: usize) -> Result<(), LogError> {
        self.cqes.clear();
        self.ring.submit_and_wait(0)?;
        let completions = self.completions.as_ref().expect("the writer has begun");
        loop {
            self.ring.reap(&mut self.reaped);
            self.cqes.extend_from_slice(&self.reaped);
            if self.cqes.len() >= n {
                return Ok(());
            }
            // The eventfd is never read: the runtime's epoll is edge
            // triggered, and each completion posted signals it again.
            let mut ready = completions
                .readable()
                .await
                .map_err(|e| LogError::Ring(format!("waiting on the log's ring: {e}")))?;
            ready.clear_ready();
        }
    }

    /// The result of the completed operation `token`, among `cqes`.
    fn result_of(&self, token: u64, what: &'static str) -> Result<u32, LogError> {
        let cqe = self
            .cqes
            .iter()
            .find(|c| c.token == token)
            .ok_or_else(|| LogError::Ring(format!("no completion for the log's {what}")))?;
        cqe.result.map_err(|e| LogError::Io {
            op: what,
            path: self.segments.last().expect("open").path.clone(),
            error: e.to_string(),
        })
    }

    /// Seals the open segment (synced) and starts a new one, beginning with
    /// every group's metadata (written, not yet synced). `encoded` must be
    /// empty, and is again after.
    async fn roll(&mut self) -> Result<(), LogError> {
        debug_assert!(self.encoded.is_empty());
        let seq = self.seq();
        Record::Seal.encode(&mut self.encoded, seq);
        self.write_encoded(true).await?;
        self.encoded.clear();
        let seq = seq + 1;
        let path = segment_path(&self.config.dir, seq);
        let sync_dir = |path: &Path| {
            File::open(&self.config.dir)
                .and_then(|d| d.sync_all())
                .map_err(io_error("syncing the directory of", path))
        };
        self.file = if let Some(free) = self.free.pop() {
            // A retired segment: written through already, and its old
            // records fail their checksums under the new number.
            std::fs::rename(&free, &path).map_err(io_error("renaming", &free))?;
            sync_dir(&path)?;
            self.shared
                .lock()
                .expect("log state lock")
                .stats
                .segments_reused += 1;
            open_segment(&path, false)?
        } else {
            let spare = self.spare.take();
            // Waited for without blocking the runtime's thread: the spare
            // may still be filling with zeros when appends come fast.
            while spare.as_ref().is_some_and(|h| !h.is_finished()) {
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
            match spare.map(|h| h.join()) {
                Some(Ok(Ok(spare))) => {
                    std::fs::rename(&spare, &path).map_err(io_error("renaming", &spare))?;
                    sync_dir(&path)?;
                    open_segment(&path, false)?
                }
                other => {
                    if let Some(Ok(Err(e))) = other {
                        tracing::warn!(error = %e, "preparing a spare log segment failed; creating it now");
                    }
                    create_segment(&path, self.config.segment_bytes, &self.config.dir)?
                }
            }
        };
        if self.free.is_empty() && self.spare.is_none() {
            self.prepare_spare();
        }
        self.ring
            .set_file(SEGMENT_SLOT, self.file.as_raw_fd())
            .map_err(io_error("registering", &path))?;
        self.file_flushed_by_device = self
            .device_flush
            .as_ref()
            .is_some_and(|f| f.covers(&self.file, self.config.segment_bytes));
        self.segments.push(Segment {
            seq,
            path,
            max_index: HashMap::new(),
            reusable: true,
        });
        self.tail = 0;
        self.write_metadata().await
    }

    /// Starts writing the segment after the open one, so a roll does not
    /// wait for 64 MiB of zeros.
    fn prepare_spare(&mut self) {
        let seq = self.segments.last().map_or(1, |s| s.seq + 1);
        let tmp = self.config.dir.join(format!("log-{seq:016}.seg.tmp"));
        let (bytes, dir) = (self.config.segment_bytes, self.config.dir.clone());
        self.spare = std::thread::Builder::new()
            .name("raft-log-spare".into())
            .spawn(move || create_segment(&tmp, bytes, &dir).map(|_| tmp))
            .ok();
    }

    /// Starts a fresh segment with every group's vote, committed id and
    /// purge point (written, not yet synced).
    async fn write_metadata(&mut self) -> Result<(), LogError> {
        self.encoded.clear();
        self.encode_metadata();
        self.write_encoded(false).await?;
        self.encoded.clear();
        Ok(())
    }

    fn encode_metadata(&mut self) {
        let seq = self.seq();
        let shared = self.shared.lock().expect("log state lock");
        for (&group, g) in &shared.groups {
            if let Some(vote) = g.vote {
                Record::Vote { group, vote }.encode(&mut self.encoded, seq);
            }
            if let Some(id) = g.committed {
                Record::Committed { group, id }.encode(&mut self.encoded, seq);
            }
            if let Some(upto) = g.purged {
                Record::Purge { group, upto }.encode(&mut self.encoded, seq);
            }
        }
    }

    /// Deletes the oldest segments whose entries every group has purged.
    fn delete_obsolete(&mut self) -> Result<(), LogError> {
        while self.segments.len() > 1 {
            let oldest = &self.segments[0];
            let obsolete = oldest
                .max_index
                .iter()
                .all(|(group, &max)| self.durable_purged.get(group).is_some_and(|&p| p >= max));
            if !obsolete {
                break;
            }
            // Not while an entry is being read back from a segment: the
            // writer would stall every copyset's appends behind the read.
            // Retiring waits for a later batch instead, up to a point: after
            // that many tries it waits for the readers, so a long catch-up
            // cannot keep old segments (and the disk they take) forever.
            const RETIRE_TRIES: u32 = 64;
            let retiring = match self.segments_in_use.try_write() {
                Ok(guard) => guard,
                Err(_) if self.retire_misses < RETIRE_TRIES => {
                    self.retire_misses += 1;
                    break;
                }
                Err(_) => self.segments_in_use.write().expect("segments lock"),
            };
            self.retire_misses = 0;
            let _retiring = retiring;
            if oldest.reusable && self.free.len() < FREE_SEGMENTS_MAX {
                let free = oldest.path.with_extension("free");
                std::fs::rename(&oldest.path, &free).map_err(io_error("retiring", &oldest.path))?;
                tracing::debug!(path = %free.display(), "log segment kept for reuse");
                self.free.push(free);
                self.shared
                    .lock()
                    .expect("log state lock")
                    .stats
                    .segments_recycled += 1;
            } else {
                std::fs::remove_file(&oldest.path).map_err(io_error("deleting", &oldest.path))?;
                tracing::debug!(path = %oldest.path.display(), "log segment deleted");
                self.shared
                    .lock()
                    .expect("log state lock")
                    .stats
                    .segments_deleted += 1;
            }
            self.segments.remove(0);
        }
        Ok(())
    }
}

/// Cuts the segment at `path` right after `end` (zeroing the rest of its
/// page) and extends it back to `len`, synced.
fn cut_after(path: &Path, end: u64, len: u64) -> Result<(), LogError> {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io_error("opening", path))?;
    file.set_len(end).map_err(io_error("cutting", path))?;
    file.set_len(len).map_err(io_error("extending", path))?;
    file.sync_all().map_err(io_error("syncing", path))
}

fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("log-{seq:016}.seg"))
}

/// Opens a segment with O_DIRECT where the filesystem has it.
fn open_segment(path: &Path, create: bool) -> Result<File, LogError> {
    quiver_chunkstore::uring::open_direct(path, create, "the Raft log")
        .map_err(io_error("opening", path))
}

/// Creates a segment of `bytes` bytes (allocated up front) and makes its
/// name durable.
fn create_segment(path: &Path, bytes: u64, dir: &Path) -> Result<File, LogError> {
    let file = open_segment(path, true)?;
    // SAFETY: fallocate on a descriptor we own, with plain integer arguments.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, bytes as libc::off_t) };
    if rc != 0 {
        // Filesystems without fallocate: a sparse file of the right size.
        file.set_len(bytes).map_err(io_error("sizing", path))?;
    }
    // Written, not only allocated: an append into allocated-but-unwritten
    // blocks turns them into written ones, a metadata change that makes every
    // fdatasync commit the filesystem journal too (the chunk pool preformats
    // for the same reason).
    zero_fill(&file, path, bytes)?;
    file.sync_all().map_err(io_error("syncing", path))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error("syncing the directory of", path))?;
    Ok(file)
}

/// Writes zeros over the first `bytes` of `file` (opened with O_DIRECT
/// where the filesystem has it), one 256 KiB write at a time. A spare
/// segment is filled while the log is in use: written through the page
/// cache and synced at the end, its 64 MiB reached the disk in one burst
/// that held up the log's own flushes for tens of milliseconds (the p999
/// of a fresh server); one modest write at a time, a flush waits behind at
/// most one of them.
fn zero_fill(file: &File, path: &Path, bytes: u64) -> Result<(), LogError> {
    use std::os::unix::fs::FileExt;
    const PIECE: usize = 256 << 10;
    let arena = Arena::new(&ArenaConfig {
        classes: vec![SizeClass {
            buf_bytes: PIECE,
            count: 1,
        }],
        huge_pages: false,
    })
    .map_err(|e| LogError::Ring(format!("zero-fill buffer: {e}")))?;
    let mut zeros = arena
        .alloc(PIECE)
        .map_err(|e| LogError::Ring(format!("zero-fill buffer: {e}")))?;
    zeros.fill(0);
    let mut at = 0u64;
    while at < bytes {
        let n = (bytes - at).min(PIECE as u64) as usize;
        file.write_all_at(&zeros[..n], at)
            .map_err(io_error("zero-filling", path))?;
        at += n as u64;
    }
    file.sync_data().map_err(io_error("syncing", path))?;
    Ok(())
}
