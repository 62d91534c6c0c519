//! A copyset's Raft state machine on the chunk store: committed writes and
//! deletes are applied to the chunkserver's [`ChunkStore`], shared by every
//! copyset of the disk ([`Disk`]).
//!
//! Writes are applied *without* a sync: the Raft log already made them
//! durable (Curve measured twice the write IOPS from this). The price is that
//! the applied point kept on disk ([`STATE_FILE`]) only moves when the dirty
//! chunks are synced, which happens before a snapshot (and so before the log
//! is purged up to it). After a restart openraft applies every committed
//! entry after that point again, so applying must be idempotent: a write is
//! positional (the same bytes land on the same pages), a write to a missing
//! chunk creates it, a delete of a missing chunk succeeds.
//!
//! A snapshot is the copyset's chunk list with sequence numbers and the
//! address of the server that built it. A follower installing one fetches the
//! chunks' data from that server in pieces of [`IO_BYTES_MAX`], deleting the
//! chunks it holds that the list lacks. The data it fetches may be newer than
//! the snapshot's point; the log entries after that point, applied next,
//! bring it to the same state as the leader's (writes are positional, and
//! each page ends up with the last write to it).

// openraft's error type is large; its traits return it anyway.
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;
use std::io::Cursor;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    BasicNode, Entry, EntryPayload, LogId, OptionalSend, RaftSnapshotBuilder, SnapshotMeta,
    StorageError, StorageIOError, StoredMembership,
};
use quiver_chunkstore::{ChunkKey, ChunkStore, StoreError, CHUNK_BYTES};
use serde::{Deserialize, Serialize};

use crate::chunk_client::{call_chunk_service, ClientError};
use crate::net::FabricNode;
use crate::service::{self, ChunkError, Mutation, IO_BYTES_MAX, KIND_READ};
use crate::store::{AppliedMark, DurableMark, Response, TypeConfig};

/// The file in a copyset's directory that keeps its synced applied point,
/// membership and last snapshot (JSON, replaced atomically).
pub const STATE_FILE: &str = "state.json";

/// A chunkserver's chunk store, shared by the copysets on its disk.
pub struct Disk {
    store: Mutex<ChunkStore>,
    /// The first applied write that failed after it was submitted: the disk
    /// is broken, and every copyset on it stops applying.
    failed: Mutex<Option<StoreError>>,
    /// Tokens of applied writes (to find a write's own completion).
    next_token: std::sync::atomic::AtomicU64,
    /// The store's completion eventfd, written on drop to end the driver task.
    wake_driver: Option<std::os::fd::OwnedFd>,
    /// A deferred submission of applied writes is scheduled ([`Disk::submit_soon`]).
    submit_scheduled: std::sync::atomic::AtomicBool,
    /// Applied writes queued since the last submission, about.
    queued: std::sync::atomic::AtomicUsize,
    /// Reads in flight ([`Disk::read`]), by token: each completion goes to
    /// its reader, whoever collects it.
    reads: Mutex<std::collections::HashMap<u64, ReadDone>>,
}

/// Where a read's data or error goes.
type ReadDone = tokio::sync::oneshot::Sender<Result<quiver_fabric::arena::Buf, StoreError>>;

/// Tokens of reads have this bit; applied writes count up from 0 below it.
const READ_TOKEN: u64 = 1 << 62;

/// How long an applied write may wait in the store's queue for others to
/// share its submission ([`Disk::submit_soon`]).
pub const APPLY_SUBMIT_DELAY: std::time::Duration = std::time::Duration::from_millis(1);
/// Applied writes that are submitted at once rather than wait longer.
pub const APPLY_QUEUE_MAX: usize = 16;

impl Drop for Disk {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd;
        if let Some(fd) = self.wake_driver.take() {
            let one = 1u64.to_ne_bytes();
            // SAFETY: writing 8 bytes to our eventfd wakes the driver, which
            // then finds the disk gone and returns.
            unsafe { libc::write(fd.as_raw_fd(), one.as_ptr().cast(), one.len()) };
        }
    }
}

impl Disk {
    /// A disk whose store is kept moving by a driver task on the caller's
    /// runtime: applied writes are submitted and left, and operations
    /// queued behind them (writes sharing a checksum page) start only when
    /// the store sees earlier ones finish. The task waits on the ring's
    /// completion eventfd, so an idle disk costs nothing; on the runtime's
    /// thread (which submitted the writes, and so is woken for their
    /// completions anyway), it costs no thread a wake-up of its own.
    pub fn new(mut store: ChunkStore) -> std::io::Result<Arc<Disk>> {
        let eventfd = store.completion_eventfd()?;
        let wake = eventfd.try_clone()?;
        let disk = Arc::new(Disk {
            store: Mutex::new(store),
            failed: Mutex::new(None),
            next_token: std::sync::atomic::AtomicU64::new(0),
            wake_driver: Some(wake),
            submit_scheduled: std::sync::atomic::AtomicBool::new(false),
            queued: std::sync::atomic::AtomicUsize::new(0),
            reads: Mutex::new(std::collections::HashMap::new()),
        });
        // SAFETY: the AsyncFd owns the descriptor, so it stays open and the
        // same for the AsyncFd's whole life.
        let completions = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(eventfd, tokio::io::Interest::READABLE)
        }?;
        let weak = Arc::downgrade(&disk);
        tokio::spawn(async move {
            loop {
                // The eventfd is never read: the runtime's epoll is edge
                // triggered, and each completion posted signals it again.
                match completions.readable().await {
                    Ok(mut ready) => ready.clear_ready(),
                    Err(e) => {
                        tracing::error!(error = %e, "waiting on the chunk store failed: its driver stops");
                        return;
                    }
                }
                let Some(disk) = weak.upgrade() else { return };
                let mut store = disk.store();
                // Errors fail the disk inside reap; nothing else to do here.
                let _ = disk.reap(&mut store, None);
            }
        });
        Ok(disk)
    }

    /// The store, for one synchronous operation. Holding it blocks every
    /// copyset of the disk: keep it for one IO.
    pub fn store(&self) -> MutexGuard<'_, ChunkStore> {
        self.store.lock().expect("chunk store lock")
    }

    /// Reads `len` bytes of a chunk without holding the runtime's thread
    /// while the disk works: the read is submitted (after any applied
    /// writes queued before it, which it is ordered behind), and its
    /// completion reaches this future through whoever collects the store's
    /// completions next, usually the driver task. Many reads can be in
    /// flight at once; before, each one blocked every copyset of the disk
    /// for its whole O_DIRECT read.
    pub async fn read(
        &self,
        key: ChunkKey,
        offset: u64,
        len: usize,
    ) -> Result<quiver_fabric::arena::Buf, StoreError> {
        let token = self
            .next_token
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            | READ_TOKEN;
        let (tx, rx) = tokio::sync::oneshot::channel();
        {
            let mut store = self.store();
            let target = store
                .arena()
                .alloc(len)
                .map_err(|e| StoreError::NoBuffer(e.to_string()))?;
            self.reads.lock().expect("disk lock").insert(token, tx);
            let submitted = store
                .submit_read(key, offset, target, token)
                .and_then(|()| self.reap(&mut store, None));
            if let Err(e) = submitted {
                self.reads.lock().expect("disk lock").remove(&token);
                return Err(e);
            }
        }
        rx.await.unwrap_or_else(|_| {
            Err(StoreError::Io {
                op: "reading",
                path: PathBuf::from("(the chunk store closed with the read in flight)"),
                errno: quiver_chunkstore::IoErrno::Cancelled,
            })
        })
    }

    /// A finished operation: a read's goes to its reader (and `None` comes
    /// back), anything else is the caller's.
    fn route(&self, done: quiver_chunkstore::Done) -> Option<quiver_chunkstore::Done> {
        if done.token & READ_TOKEN == 0 {
            return Some(done);
        }
        let reader = self.reads.lock().expect("disk lock").remove(&done.token);
        if let Some(reader) = reader {
            // The reader may have gone (its request dropped): the buffer
            // then returns to the arena here.
            let _ = reader.send(
                done.result
                    .map(|data| data.expect("a read returns its data")),
            );
        }
        None
    }

    /// Collects finished applied writes without waiting. A failed one fails
    /// the disk (its write was answered already: only stopping is left). The
    /// error of the write `token`, if it finished, is returned instead.
    pub fn reap(&self, store: &mut ChunkStore, token: Option<u64>) -> Result<(), StoreError> {
        self.collect(store, token, true)
    }

    /// As [`Disk::reap`], but only what finished already (a write on the
    /// store's synchronous path): queued writes stay unsubmitted.
    fn settle(&self, store: &mut ChunkStore, token: Option<u64>) -> Result<(), StoreError> {
        self.collect(store, token, false)
    }

    fn collect(
        &self,
        store: &mut ChunkStore,
        token: Option<u64>,
        submit: bool,
    ) -> Result<(), StoreError> {
        let mut own = Ok(());
        loop {
            let next = match submit {
                true => store.poll(false),
                false => Ok(store.finished()),
            };
            let done = match next {
                Ok(Some(done)) => match self.route(done) {
                    Some(done) => done,
                    None => continue,
                },
                Ok(None) => break,
                Err(e) => {
                    self.fail(e.clone());
                    return Err(e);
                }
            };
            match done.result {
                Ok(_) => {}
                Err(e) if Some(done.token) == token => own = Err(e),
                Err(e) => self.fail(e),
            }
        }
        match self.failed.lock().expect("disk lock").clone() {
            Some(e) => Err(e),
            None => own,
        }
    }

    /// Submits the applied writes queued so far within [`APPLY_SUBMIT_DELAY`],
    /// or at once when [`APPLY_QUEUE_MAX`] wait. Never before this thread
    /// has run every other task that is ready, among them the answer to the
    /// client whose write was just applied: on a leader the answer leaves
    /// before the submission (a virtio doorbell here, about 14 us of CPU),
    /// and on a follower the log's append before the apply's. Submitted
    /// together, the writes share one doorbell and their completions one
    /// wake-up of this thread. The log holds the writes durably meanwhile,
    /// and the store orders reads after them (a read submits what is
    /// queued; so do a snapshot's syncs).
    fn submit_soon(self: &Arc<Self>, store: &mut ChunkStore) {
        use std::sync::atomic::Ordering;
        if self.queued.fetch_add(1, Ordering::AcqRel) + 1 >= APPLY_QUEUE_MAX {
            self.queued.store(0, Ordering::Release);
            // Errors fail the disk inside reap; the caller's write is in.
            let _ = self.reap(store, None);
            return;
        }
        if self.submit_scheduled.swap(true, Ordering::AcqRel) {
            return;
        }
        let disk = Arc::clone(self);
        tokio::spawn(async move {
            tokio::time::sleep(APPLY_SUBMIT_DELAY).await;
            disk.submit_scheduled.store(false, Ordering::Release);
            disk.queued.store(0, Ordering::Release);
            let mut store = disk.store();
            // A failure fails the disk inside reap; nothing else to do here.
            let _ = disk.reap(&mut store, None);
        });
    }

    fn fail(&self, e: StoreError) {
        tracing::error!(error = %e, "an applied chunk write failed: this disk stops applying");
        self.failed.lock().expect("disk lock").get_or_insert(e);
    }
}

/// A chunk store error as the chunk service reports it.
pub fn chunk_error(e: StoreError) -> ChunkError {
    match e {
        StoreError::NoSuchChunk(k) => ChunkError::NoSuchChunk {
            copyset: k.copyset,
            chunk: k.chunk,
        },
        StoreError::Unaligned { offset, len } => ChunkError::Unaligned {
            offset,
            len: len as u64,
        },
        StoreError::OutOfRange { offset, len, .. } => ChunkError::OutOfRange {
            offset,
            len: len as u64,
        },
        other => ChunkError::Storage(other.to_string()),
    }
}

/// What a snapshot's data says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotData {
    /// The chunk service of the server that built it: where to fetch data.
    pub source: String,
    /// (chunk id, sequence number) of every chunk of the copyset.
    pub chunks: Vec<(u64, u64)>,
    /// Chunk id → the newest writer epoch applied to it (fencing).
    #[serde(default)]
    pub epochs: BTreeMap<u64, u64>,
}

#[derive(Clone, Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<u64, BasicNode>,
    data: Vec<u8>,
}

/// What [`STATE_FILE`] holds.
#[derive(Clone, Default, Serialize, Deserialize)]
struct State {
    last_applied: Option<LogId<u64>>,
    membership: StoredMembership<u64, BasicNode>,
    snapshot: Option<StoredSnapshot>,
    /// Chunk id → newest writer epoch applied, as of `last_applied`: kept
    /// with it under one lock, so a snapshot's epochs match its index and
    /// replay after a restart decides every write as the first time.
    #[serde(default)]
    epochs: BTreeMap<u64, u64>,
}

struct Shared {
    copyset: u32,
    disk: Arc<Disk>,
    dir: PathBuf,
    /// Where this server's chunk service listens (a snapshot's source).
    self_addr: String,
    fabric: Arc<FabricNode>,
    /// How far the copyset's log is durable: an entry is applied only once
    /// it is (the leader acknowledges its own appends to openraft early).
    log_durable: DurableMark,
    /// Where the log learns what is applied.
    log_applied: AppliedMark,
    /// The live state (its applied point runs ahead of the file's).
    state: Mutex<State>,
    /// Building and installing a snapshot both write the state file: one
    /// at a time (openraft 0.9 builds on a task of its own). True once the
    /// copyset is removed from this server ([`ChunkMachine::retire`]): a
    /// build still running must not write into a later incarnation's
    /// directory.
    snapshotting: Arc<tokio::sync::Mutex<bool>>,
}

/// One copyset's state machine.
#[derive(Clone)]
pub struct ChunkMachine(Arc<Shared>);

type Error = StorageError<u64>;

/// Held while a snapshot is built or installed (`Shared::snapshotting`).
type Snapshotting = tokio::sync::OwnedMutexGuard<bool>;

fn storage_error(verb: &str, e: impl std::fmt::Display) -> Error {
    StorageIOError::<u64>::write_state_machine(openraft::AnyError::error(format!("{verb}: {e}")))
        .into()
}

impl ChunkMachine {
    /// Opens copyset `copyset`'s machine, its state kept in `dir`.
    pub fn open(
        copyset: u32,
        disk: Arc<Disk>,
        dir: &Path,
        self_addr: String,
        fabric: Arc<FabricNode>,
        (log_durable, log_applied): (DurableMark, AppliedMark),
    ) -> anyhow::Result<ChunkMachine> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(STATE_FILE);
        let state = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => State::default(),
            Err(e) => return Err(anyhow::anyhow!("{}: {e}", path.display())),
        };
        Ok(ChunkMachine(Arc::new(Shared {
            copyset,
            disk,
            dir: dir.to_owned(),
            self_addr,
            fabric,
            log_durable,
            log_applied,
            state: Mutex::new(state),
            snapshotting: Arc::new(tokio::sync::Mutex::new(false)),
        })))
    }

    pub fn copyset(&self) -> u32 {
        self.0.copyset
    }

    /// The chunks of this copyset on the disk.
    pub fn chunks(&self) -> Vec<ChunkKey> {
        let copyset = self.0.copyset;
        let store = self.0.disk.store();
        store
            .list()
            .into_iter()
            .filter(|k| k.copyset == copyset)
            .collect()
    }

    /// The index of the last snapshot, if any.
    pub fn snapshot_index(&self) -> Option<u64> {
        let state = self.0.state.lock().expect("machine lock");
        state
            .snapshot
            .as_ref()
            .and_then(|s| s.meta.last_log_id)
            .map(|l| l.index)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.0.state.lock().expect("machine lock")
    }

    /// Takes `snapshotting`, unless the copyset was retired.
    async fn one_at_a_time(&self) -> Result<Snapshotting, Error> {
        let held = Arc::clone(&self.0.snapshotting).lock_owned().await;
        if *held {
            return Err(storage_error(
                "snapshot",
                "the copyset was removed from this server",
            ));
        }
        Ok(held)
    }

    /// Writes the state file: into a temporary file, synced, renamed over
    /// (on a blocking thread: two syncs). The write holds `snapshotting`
    /// (handed back after) even if the caller goes away meanwhile.
    async fn persist(&self, state: &State, held: Snapshotting) -> Result<Snapshotting, Error> {
        let bytes = serde_json::to_vec(state).expect("the state serializes");
        let dir = self.0.dir.clone();
        let (held, written) = tokio::task::spawn_blocking(move || {
            let written = write_atomically(&dir, STATE_FILE, &bytes);
            (held, written)
        })
        .await
        .map_err(|e| storage_error("saving the copyset state", e))?;
        written.map_err(|e| storage_error("saving the copyset state", e))?;
        Ok(held)
    }

    /// The copyset leaves this server: waits for a snapshot being built or
    /// installed, and refuses any later one (openraft's build task may
    /// outlive the copyset's Raft).
    pub async fn retire(&self) {
        *self.0.snapshotting.lock().await = true;
    }

    /// Fencing: refuses a write whose epoch is older than the newest the
    /// chunk applied; otherwise says how the chunk's epoch changes if the
    /// mutation succeeds. Decided from replicated state only, so every
    /// replica (and a replay) decides alike.
    fn check_epoch(&self, m: &Mutation<'_>) -> Result<Option<(u64, Option<u64>)>, ChunkError> {
        match *m {
            Mutation::Write { chunk, epoch, .. } => {
                let current = self.state().epochs.get(&chunk).copied().unwrap_or(0);
                if epoch == 0 {
                    Ok(None)
                } else if epoch < current {
                    Err(ChunkError::StaleEpoch {
                        copyset: self.0.copyset,
                        chunk,
                        epoch,
                        current,
                    })
                } else {
                    Ok((epoch > current).then_some((chunk, Some(epoch))))
                }
            }
            Mutation::Delete { chunk } => Ok(Some((chunk, None))),
        }
    }

    /// Applies one mutation. The outer error is the disk failing (fatal for
    /// this copyset on this server); the inner one is the request's answer.
    fn apply_mutation(
        &self,
        store: &mut ChunkStore,
        mutation: Mutation<'_>,
    ) -> Result<Result<(), ChunkError>, StoreError> {
        let copyset = self.0.copyset;
        match mutation {
            Mutation::Write {
                chunk,
                offset,
                sn,
                data,
                ..
            } => {
                let key = ChunkKey { copyset, chunk };
                if !store.contains(key) {
                    create(store, key, sn)?;
                }
                // Queued (submitted with others soon: `Disk::submit_soon`),
                // not waited for: the log holds the write durably, and the
                // store orders a later read of these pages after it.
                let disk = &self.0.disk;
                let token = disk
                    .next_token
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let mut buf = loop {
                    match store.arena().alloc(data.len()) {
                        Ok(buf) => break buf,
                        // Buffers of writes in flight: wait for one to finish.
                        Err(_) if store.in_flight() > 0 => {
                            if let Some(done) = store.poll(true)?.and_then(|d| disk.route(d)) {
                                if let Err(e) = done.result {
                                    disk.fail(e.clone());
                                    return Err(e);
                                }
                            }
                        }
                        Err(e) => return Err(StoreError::NoBuffer(e.to_string())),
                    }
                };
                buf.copy_from_slice(data);
                let submitted = store
                    .submit_write(key, sn, offset, buf.freeze(), false, token)
                    .and_then(|()| disk.settle(store, Some(token)));
                disk.submit_soon(store);
                match submitted {
                    Ok(()) => Ok(Ok(())),
                    // Deterministic on every replica: an answer, not a failure.
                    Err(e @ StoreError::StaleSequence { .. })
                    | Err(e @ StoreError::SnapshotExists { .. }) => Ok(Err(chunk_error(e))),
                    Err(e) => Err(e),
                }
            }
            Mutation::Delete { chunk } => {
                let key = ChunkKey { copyset, chunk };
                match store.delete(key) {
                    Ok(()) | Err(StoreError::NoSuchChunk(_)) => Ok(Ok(())),
                    Err(e) => Err(e),
                }
            }
        }
    }

    /// Fetches `chunk`'s data from `source` into the local store, in pieces.
    async fn fetch_chunk(&self, source: SocketAddr, chunk: u64, sn: u64) -> Result<(), Error> {
        let copyset = self.0.copyset;
        let key = ChunkKey { copyset, chunk };
        let fresh = {
            let mut store = self.0.disk.store();
            if !store.contains(key) {
                create(&mut store, key, sn).map_err(|e| storage_error("creating a chunk", e))?;
                true
            } else {
                false
            }
        };
        let mut offset = 0;
        while offset < CHUNK_BYTES {
            let body = service::read_body(chunk, offset, IO_BYTES_MAX as u64, true);
            let data = match self.fetch_piece(source, body).await? {
                Some(data) => data,
                // Deleted at the source since its snapshot: the log entries
                // after the snapshot delete it here too.
                None => return Ok(()),
            };
            let zeros = data.iter().all(|&b| b == 0);
            if !(fresh && zeros) {
                let mut store = self.0.disk.store();
                store
                    .write(key, sn, offset, &data, false)
                    .map_err(|e| storage_error("writing a fetched piece", e))?;
            }
            offset += IO_BYTES_MAX as u64;
        }
        Ok(())
    }

    /// One piece of a chunk from `source`, retried a few times; `None` if the
    /// chunk is gone there.
    async fn fetch_piece(
        &self,
        source: SocketAddr,
        body: Vec<u8>,
    ) -> Result<Option<Vec<u8>>, Error> {
        // A source restarting or busy: retry for about half a minute before
        // giving up (which stops this copyset's Raft on this server).
        const ATTEMPTS: u32 = 12;
        let copyset = self.0.copyset;
        let mut last = String::new();
        for attempt in 0..ATTEMPTS {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis((100u64 << attempt).min(4000))).await;
            }
            let answer = call_chunk_service(
                &self.0.fabric,
                source,
                copyset,
                KIND_READ,
                body.clone(),
                Duration::from_secs(5),
            )
            .await;
            match answer {
                Ok(data) => return Ok(Some(data)),
                Err(ClientError::Refused {
                    error: ChunkError::NoSuchChunk { .. },
                    ..
                }) => return Ok(None),
                Err(e) => last = e.to_string(),
            }
        }
        Err(storage_error(
            "fetching snapshot data",
            format!("from {source}: {last}"),
        ))
    }
}

/// Replaces `dir/name` with `bytes` so that a crash leaves the old file or
/// the new one: written to a temporary file, synced, renamed over, and the
/// directory synced.
pub fn write_atomically(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    std::fs::write(&tmp, bytes)?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, dir.join(name))?;
    std::fs::File::open(dir)?.sync_all()
}

/// Creates a chunk, formatting a pool file first if the pool ran dry.
fn create(store: &mut ChunkStore, key: ChunkKey, sn: u64) -> Result<(), StoreError> {
    match store.create(key, sn) {
        Err(StoreError::PoolExhausted { .. }) => {
            tracing::warn!(%key, "chunk file pool empty on create: formatting more in line");
            store.replenish()?;
            store.create(key, sn)
        }
        other => other,
    }
}

impl RaftSnapshotBuilder<TypeConfig> for ChunkMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, Error> {
        let held = self.one_at_a_time().await?;
        let (last_applied, membership, epochs) = {
            let state = self.state();
            (
                state.last_applied,
                state.membership.clone(),
                state.epochs.clone(),
            )
        };
        // Everything applied up to `last_applied` (and maybe more) is made
        // durable before the log that holds it may go; a write that failed
        // on the way fails the snapshot (and the log stays).
        // On a blocking thread: the syncs take milliseconds, and the runtime
        // carries the node's fabric and every other copyset.
        let (disk, copyset) = (Arc::clone(&self.0.disk), self.0.copyset);
        let chunks = tokio::task::spawn_blocking(move || {
            // The store only while the writes drain; its other users (the
            // applies of every copyset) do not wait out the flush.
            let (owed, chunks) = {
                let mut store = disk.store();
                let owed = store
                    .begin_sync()
                    .map_err(|e| storage_error("syncing chunks", e))?;
                if let Err(e) = disk.reap(&mut store, None) {
                    store.still_dirty(owed.into_keys());
                    return Err(storage_error("an applied write failed", e));
                }
                let chunks: Vec<(u64, u64)> = store
                    .list()
                    .into_iter()
                    .filter(|k| k.copyset == copyset)
                    .map(|k| (k.chunk, store.stat(k).map(|s| s.sn).unwrap_or(0)))
                    .collect();
                (owed, chunks)
            };
            if let Err(e) = owed.complete() {
                disk.store().still_dirty(owed.into_keys());
                return Err(storage_error("syncing chunks", e));
            }
            Ok::<_, Error>(chunks)
        })
        .await
        .map_err(|e| storage_error("syncing chunks", e))??;
        let data = serde_json::to_vec(&SnapshotData {
            source: self.0.self_addr.clone(),
            chunks,
            epochs: epochs.clone(),
        })
        .expect("snapshot data serializes");
        let meta = SnapshotMeta {
            last_log_id: last_applied,
            last_membership: membership.clone(),
            snapshot_id: format!("{}-{}", self.0.copyset, last_applied.map_or(0, |l| l.index)),
        };
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data: data.clone(),
        };
        // An install since we read `last_applied` moved the state past it:
        // keep that, and hand out what we built without recording it.
        let newer_installed = {
            let state = self.state();
            state.snapshot.as_ref().and_then(|s| s.meta.last_log_id) > last_applied
        };
        if !newer_installed {
            let to_save = State {
                last_applied,
                membership,
                snapshot: Some(stored.clone()),
                epochs,
            };
            let _held = self.persist(&to_save, held).await?;
            self.state().snapshot = Some(stored);
        }
        tracing::debug!(copyset = self.0.copyset, index = ?last_applied.map(|l| l.index), "snapshot built");
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for ChunkMachine {
    type SnapshotBuilder = ChunkMachine;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<u64>>, StoredMembership<u64, BasicNode>), Error> {
        let state = self.state();
        Ok((state.last_applied, state.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, Error>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<_> = entries.into_iter().collect();
        let Some(last) = entries.last().map(|e| e.log_id.index) else {
            return Ok(Vec::new());
        };
        self.0.log_durable.wait_for(last).await?;
        let mut answers = Vec::new();
        let mut store = self.0.disk.store();
        for entry in entries {
            // (chunk, its new epoch or None once deleted), when this entry
            // changes it.
            let mut epoch_update: Option<(u64, Option<u64>)> = None;
            let answer = match &entry.payload {
                EntryPayload::Blank => Ok(()),
                EntryPayload::Membership(m) => {
                    self.state().membership = StoredMembership::new(Some(entry.log_id), m.clone());
                    Ok(())
                }
                EntryPayload::Normal(request) => {
                    match service::decode_mutation(request.kind, &request.body) {
                        Ok(m) => match self.check_epoch(&m) {
                            Err(stale) => Err(stale),
                            Ok(raised) => {
                                let answer = self
                                    .apply_mutation(&mut store, m)
                                    .map_err(|e| storage_error("applying a write", e))?;
                                if answer.is_ok() {
                                    epoch_update = raised;
                                }
                                answer
                            }
                        },
                        Err(e) => Err(e),
                    }
                }
            };
            let mut state = self.state();
            state.last_applied = Some(entry.log_id);
            match epoch_update.take() {
                Some((chunk, Some(epoch))) => {
                    state.epochs.insert(chunk, epoch);
                }
                Some((chunk, None)) => {
                    state.epochs.remove(&chunk);
                }
                None => {}
            }
            drop(state);
            answers.push(Response(match answer {
                Ok(()) => vec![service::STATUS_OK],
                Err(e) => {
                    let mut out = vec![service::STATUS_ERR];
                    out.extend_from_slice(&service::error_body(&e));
                    out
                }
            }));
        }
        // (The store copied the data into its own buffers.)
        self.0.log_applied.applied(last);
        Ok(answers)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, Error> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), Error> {
        let held = self.one_at_a_time().await?;
        let data = snapshot.into_inner();
        let parsed: SnapshotData = serde_json::from_slice(&data)
            .map_err(|e| storage_error("reading a received snapshot", e))?;
        if parsed.source == self.0.self_addr {
            // Our own data is what the snapshot must replace.
            return Err(storage_error(
                "installing a snapshot",
                "its source is this server",
            ));
        }
        let source: SocketAddr = parsed
            .source
            .parse()
            .map_err(|e| storage_error("a snapshot's source address", e))?;
        let wanted: BTreeMap<u64, u64> = parsed.chunks.iter().copied().collect();
        tracing::info!(
            copyset = self.0.copyset,
            chunks = wanted.len(),
            %source,
            index = ?meta.last_log_id.map(|l| l.index),
            "installing a snapshot"
        );
        for key in self.chunks() {
            let sn = self.0.disk.store().stat(key).map(|s| s.sn).ok();
            // Missing from the list, or another life of the chunk (its
            // sequence differs): gone here; a fetch makes it again.
            if wanted.get(&key.chunk).copied() != sn {
                self.0
                    .disk
                    .store()
                    .delete(key)
                    .map_err(|e| storage_error("deleting a chunk", e))?;
            }
        }
        for (&chunk, &sn) in &wanted {
            self.fetch_chunk(source, chunk, sn).await?;
        }
        let disk = Arc::clone(&self.0.disk);
        tokio::task::spawn_blocking(move || disk.store().sync_dirty())
            .await
            .map_err(|e| storage_error("syncing fetched chunks", e))?
            .map_err(|e| storage_error("syncing fetched chunks", e))?;
        // Recorded as ours, with us as its source: sent on from here later,
        // it must not send its receiver back to a server that may be gone
        // (or be the receiver itself).
        let data = serde_json::to_vec(&SnapshotData {
            source: self.0.self_addr.clone(),
            chunks: parsed.chunks,
            epochs: parsed.epochs.clone(),
        })
        .expect("snapshot data serializes");
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data,
        };
        let state = State {
            last_applied: meta.last_log_id,
            membership: meta.last_membership.clone(),
            snapshot: Some(stored),
            epochs: parsed.epochs,
        };
        let _held = self.persist(&state, held).await?;
        *self.state() = state;
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, Error> {
        let state = self.state();
        Ok(state.snapshot.clone().map(|s| Snapshot {
            meta: s.meta,
            snapshot: Box::new(Cursor::new(s.data)),
        }))
    }
}
