//! The volume library: a volume as bytes, over the control plane (where
//! things are) and the chunk service (the data).
//!
//! An IO is split at chunk boundaries (16 MiB) and into pieces of at most
//! 1 MiB; the pieces run in parallel. Segment maps (which copyset and chunk
//! hold each 16 MiB) come from the control plane on first use and are
//! cached; a writer allocates segments on its first write. Copyset members
//! are cached too, and refreshed when a copyset moved (its old members no
//! longer host it, or none answers). Writes carry the volume's fencing
//! epoch: once another writer took the volume over, ours fail with
//! `Fenced`. IO that is not 4 KiB aligned is done as read-modify-write of
//! its edge pages.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use futures::future::try_join_all;
use quiver_control::{proto, ControlClient, ControlClientError};
use quiver_fabric::{TransportChoice, WorkerConfig};
use quiver_raft::chunk_client::{ChunkClient, ClientError};
use quiver_raft::service::{ChunkError, IO_BYTES_MAX, WRITE_BYTES_MAX};

use crate::device::BlockDevice;

/// Bytes per chunk.
pub const CHUNK_BYTES: u64 = quiver_control::meta::CHUNK_BYTES;
const _: () = assert!(CHUNK_BYTES == quiver_chunkstore::CHUNK_BYTES);
/// The unit of chunk IO: smaller or unaligned IO is read-modify-write.
pub const PAGE_BYTES: u64 = 4096;
/// The largest piece one chunk read carries.
const READ_PIECE_BYTES: u64 = IO_BYTES_MAX as u64;
/// The largest piece one chunk write carries.
const WRITE_PIECE_BYTES: u64 = WRITE_BYTES_MAX as u64;
/// Stripes of the locks that keep read-modify-writes of one page apart.
const PAGE_LOCKS: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("volume {volume}: IO at {offset}+{len} is outside its {size} bytes")]
    OutOfRange {
        volume: String,
        offset: u64,
        len: u64,
        size: u64,
    },
    #[error("volume {0} is open read-only")]
    ReadOnly(String),
    /// The write lease ran out before the control plane renewed it (it is
    /// unreachable): writes wait for it, so a writer cut off from the
    /// control plane stops before another may be given the volume.
    #[error("volume {0}: the write lease expired (the control plane has not renewed it); writes resume once it does")]
    LeaseExpired(String),
    #[error("volume {volume}: fenced: another writer opened it after us (our epoch {epoch})")]
    Fenced { volume: String, epoch: u64 },
    #[error("volume {volume}: {source}")]
    Control {
        volume: String,
        source: ControlClientError,
    },
    #[error("volume {volume}: chunk {copyset}/{chunk} (volume bytes {offset}+{len}): {source}")]
    Chunk {
        volume: String,
        copyset: u32,
        chunk: u64,
        offset: u64,
        len: u64,
        source: Box<ClientError>,
    },
    #[error("volume {volume}: the control plane names copyset {copyset}, which it does not list")]
    UnknownCopyset { volume: String, copyset: u32 },
    #[error("volume {volume}: the control plane gave segments of {segment_size} bytes, not a positive multiple of the chunk size")]
    BadSegmentSize { volume: String, segment_size: u64 },
    #[error("volume {volume}: segment {index} came with {chunks} chunks, not {expected}")]
    BadSegment {
        volume: String,
        index: u64,
        chunks: usize,
        expected: u64,
    },
    #[error("starting the fabric client: {0}")]
    Fabric(String),
}

impl From<VolumeError> for io::Error {
    fn from(e: VolumeError) -> io::Error {
        let kind = match &e {
            VolumeError::OutOfRange { .. } => io::ErrorKind::InvalidInput,
            VolumeError::ReadOnly(_) | VolumeError::Fenced { .. } => {
                io::ErrorKind::PermissionDenied
            }
            _ => io::ErrorKind::Other,
        };
        io::Error::new(kind, e)
    }
}

/// How to reach the cluster.
#[derive(Clone)]
pub struct ClusterOptions {
    /// Fabric transport to the chunkservers (auto: verbs where a device
    /// answers, TCP otherwise).
    pub transport: TransportChoice,
    /// CA (PEM) of a control plane serving TLS.
    pub ca: Option<Vec<u8>>,
    /// How long one piece of IO retries through elections and moves.
    pub io_deadline: Duration,
    /// Who we are, as a volume's write lease names us.
    pub client_name: String,
    /// How long the fabric worker polls after work before it sleeps. 0 by
    /// default, as for chunkservers: on a machine with fewer cores than
    /// busy threads a spin costs more than it buys; give it cores first.
    pub spin: Duration,
}

impl Default for ClusterOptions {
    fn default() -> ClusterOptions {
        ClusterOptions {
            transport: TransportChoice::Auto,
            ca: None,
            io_deadline: Duration::from_secs(30),
            client_name: format!(
                "{}:{}",
                std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .map(|h| h.trim().to_owned())
                    .unwrap_or_else(|_| "localhost".into()),
                std::process::id()
            ),
            spin: Duration::ZERO,
        }
    }
}

struct ClusterInner {
    control: ControlClient,
    chunks: ChunkClient,
    /// Copyset → members' fabric addresses.
    copysets: Mutex<HashMap<u32, Arc<[SocketAddr]>>>,
    options: ClusterOptions,
}

/// A connection to a cluster. Cheap to clone.
#[derive(Clone)]
pub struct Cluster(Arc<ClusterInner>);

/// How a volume is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenMode {
    ReadOnly,
    /// Exclusive writer; `force` takes the volume from another writer (who
    /// is fenced from then on).
    ReadWrite {
        force: bool,
    },
}

impl Cluster {
    /// Connects to the control nodes at `endpoints` (any of them). Call
    /// inside a tokio runtime.
    pub async fn connect(endpoints: &[String], token: &str) -> Result<Cluster, VolumeError> {
        Cluster::connect_with(endpoints, token, ClusterOptions::default()).await
    }

    pub async fn connect_with(
        endpoints: &[String],
        token: &str,
        options: ClusterOptions,
    ) -> Result<Cluster, VolumeError> {
        let control =
            ControlClient::connect(endpoints, token, options.ca.as_deref()).map_err(|source| {
                VolumeError::Control {
                    volume: String::new(),
                    source,
                }
            })?;
        let mut chunks = ChunkClient::start(WorkerConfig {
            transport: options.transport,
            spin: options.spin,
            ..WorkerConfig::default()
        })
        .map_err(|e| VolumeError::Fabric(format!("{e:#}")))?;
        chunks.deadline = options.io_deadline;
        Ok(Cluster(Arc::new(ClusterInner {
            control,
            chunks,
            copysets: Mutex::new(HashMap::new()),
            options,
        })))
    }

    pub fn control(&self) -> &ControlClient {
        &self.0.control
    }

    /// Opens volume `name`.
    pub async fn open(&self, name: &str, mode: OpenMode) -> Result<Volume, VolumeError> {
        let control_error = |source| VolumeError::Control {
            volume: name.to_owned(),
            source,
        };
        let request = proto::OpenVolumeRequest {
            name: name.to_owned(),
            write: mode != OpenMode::ReadOnly,
            client: self.0.options.client_name.clone(),
            force: mode == OpenMode::ReadWrite { force: true },
        };
        let asked = Instant::now();
        let opened = self
            .0
            .control
            .call("opening", |mut c| {
                let r = request.clone();
                async move { c.open_volume(r).await }
            })
            .await
            .map_err(control_error)?;
        let v = opened.volume.unwrap_or_default();
        if v.segment_size == 0 || !v.segment_size.is_multiple_of(CHUNK_BYTES) {
            return Err(VolumeError::BadSegmentSize {
                volume: name.to_owned(),
                segment_size: v.segment_size,
            });
        }
        self.refresh_copysets(name).await?;
        let inner = Arc::new(VolumeInner {
            cluster: self.clone(),
            name: v.name.clone(),
            size: v.size,
            segment_size: v.segment_size,
            epoch: opened.epoch,
            writable: mode != OpenMode::ReadOnly,
            segments: Mutex::new(HashMap::new()),
            absent: Mutex::new(HashMap::new()),
            fenced: AtomicBool::new(false),
            page_locks: (0..PAGE_LOCKS)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
            lease: Mutex::new(None),
            lease_until: Mutex::new(lease_end(asked, opened.lease_ms)),
        });
        if inner.writable {
            let every = Duration::from_millis((opened.lease_ms / 3).max(100));
            let task = tokio::spawn(keep_lease(Arc::downgrade(&inner), every));
            *inner.lease.lock().expect("lease lock") = Some(task);
        }
        Ok(Volume(inner))
    }

    async fn refresh_copysets(&self, volume: &str) -> Result<(), VolumeError> {
        let all = self
            .0
            .control
            .call("listing copysets", |mut c| async move {
                c.get_copysets(proto::GetCopysetsRequest { copysets: vec![] })
                    .await
            })
            .await
            .map_err(|source| VolumeError::Control {
                volume: volume.to_owned(),
                source,
            })?;
        let map = all
            .copysets
            .into_iter()
            .map(|c| {
                let peers: Vec<SocketAddr> =
                    c.peers.iter().filter_map(|p| p.addr.parse().ok()).collect();
                (c.id, Arc::from(peers))
            })
            .collect();
        *self.0.copysets.lock().expect("copysets lock") = map;
        Ok(())
    }

    fn peers(&self, copyset: u32) -> Option<Arc<[SocketAddr]>> {
        self.0
            .copysets
            .lock()
            .expect("copysets lock")
            .get(&copyset)
            .cloned()
    }
}

type SegmentMap = Arc<Vec<(u32, u64)>>;

struct VolumeInner {
    cluster: Cluster,
    name: String,
    size: u64,
    segment_size: u64,
    /// The write epoch (0 for a reader).
    epoch: u64,
    writable: bool,
    /// Allocated segments we know of.
    segments: Mutex<HashMap<u64, SegmentMap>>,
    /// A reader's memory of segments found unallocated, and when.
    absent: Mutex<HashMap<u64, Instant>>,
    fenced: AtomicBool,
    page_locks: Vec<tokio::sync::Mutex<()>>,
    lease: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Until when our write lease surely runs, by our clock.
    lease_until: Mutex<Instant>,
}

/// The end of a lease of `lease_ms` asked for at `asked`: counted from the
/// asking (the control plane counts from later) and cut by a tenth for
/// clocks that run at different rates.
fn lease_end(asked: Instant, lease_ms: u64) -> Instant {
    asked + Duration::from_millis(lease_ms - lease_ms / 10)
}

/// An open volume. Cheap to clone; IO from many tasks at once is fine.
#[derive(Clone)]
pub struct Volume(Arc<VolumeInner>);

/// One chunk request's worth of an IO.
#[derive(Debug, Clone, Copy)]
struct Piece {
    /// Byte offset in the volume.
    offset: u64,
    len: u64,
}

/// `[offset, offset + len)` cut at chunk boundaries and into pieces of at
/// most `max` bytes.
fn pieces(offset: u64, len: u64, max: u64) -> Vec<Piece> {
    let mut out = Vec::new();
    let mut at = offset;
    let end = offset + len;
    while at < end {
        let chunk_end = (at / CHUNK_BYTES + 1) * CHUNK_BYTES;
        let piece_end = end.min(chunk_end).min(at + max);
        out.push(Piece {
            offset: at,
            len: piece_end - at,
        });
        at = piece_end;
    }
    out
}

fn aligned(offset: u64, len: u64) -> bool {
    offset.is_multiple_of(PAGE_BYTES) && len.is_multiple_of(PAGE_BYTES)
}

/// How long a reader trusts that a segment is unallocated.
const ABSENT_TTL: Duration = Duration::from_secs(1);

/// Refreshes the write lease until the volume goes; a lease refused for a
/// stale epoch means another writer took over: the volume is fenced.
async fn keep_lease(volume: Weak<VolumeInner>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        let Some(v) = volume.upgrade() else { return };
        let request = proto::LeaseRequest {
            name: v.name.clone(),
            epoch: v.epoch,
        };
        let asked = Instant::now();
        // Retried no longer than until the next round: an answer after a
        // long outage would date from too long ago to extend anything.
        let refreshed = v
            .cluster
            .0
            .control
            .clone()
            .retry_for(every)
            .call("refreshing the write lease", |mut c| {
                let r = request.clone();
                async move { c.refresh_lease(r).await }
            })
            .await;
        match refreshed {
            Ok(answer) => {
                *v.lease_until.lock().expect("lease lock") = lease_end(asked, answer.lease_ms);
            }
            Err(e) if e.code() == tonic::Code::FailedPrecondition => {
                tracing::warn!(volume = %v.name, "{e}: this writer is fenced");
                v.fenced.store(true, Ordering::Release);
                return;
            }
            Err(e) => tracing::warn!(volume = %v.name, "{e}"),
        }
    }
}

impl Volume {
    pub fn name(&self) -> &str {
        &self.0.name
    }

    pub fn size(&self) -> u64 {
        self.0.size
    }

    pub fn writable(&self) -> bool {
        self.0.writable
    }

    /// The fencing epoch our writes carry (0 for a reader).
    pub fn epoch(&self) -> u64 {
        self.0.epoch
    }

    fn check(&self, offset: u64, len: u64, write: bool) -> Result<(), VolumeError> {
        let v = &self.0;
        if offset.checked_add(len).is_none_or(|end| end > v.size) {
            return Err(VolumeError::OutOfRange {
                volume: v.name.clone(),
                offset,
                len,
                size: v.size,
            });
        }
        if write && !v.writable {
            return Err(VolumeError::ReadOnly(v.name.clone()));
        }
        if write && v.fenced.load(Ordering::Acquire) {
            return Err(self.fenced());
        }
        if write && Instant::now() >= *v.lease_until.lock().expect("lease lock") {
            return Err(VolumeError::LeaseExpired(v.name.clone()));
        }
        Ok(())
    }

    fn fenced(&self) -> VolumeError {
        VolumeError::Fenced {
            volume: self.0.name.clone(),
            epoch: self.0.epoch,
        }
    }

    /// The chunks of segment `index`: allocated on a writer's request.
    async fn segment(&self, index: u64, allocate: bool) -> Result<Option<SegmentMap>, VolumeError> {
        let v = &self.0;
        if let Some(s) = v.segments.lock().expect("segments lock").get(&index) {
            return Ok(Some(s.clone()));
        }
        if !allocate {
            let absent = v.absent.lock().expect("absent lock");
            // A writer's own view of absence is the truth (nobody else
            // writes); a reader asks again after a while.
            if absent
                .get(&index)
                .is_some_and(|at| v.writable || at.elapsed() < ABSENT_TTL)
            {
                return Ok(None);
            }
        }
        let request = proto::GetSegmentRequest {
            volume: v.name.clone(),
            index,
            allocate,
            epoch: v.epoch,
        };
        let seg = v
            .cluster
            .0
            .control
            .call("segment lookup", |mut c| {
                let r = request.clone();
                async move { c.get_segment(r).await }
            })
            .await
            .map_err(|source| {
                if allocate && source.code() == tonic::Code::FailedPrecondition {
                    v.fenced.store(true, Ordering::Release);
                }
                VolumeError::Control {
                    volume: v.name.clone(),
                    source,
                }
            })?;
        if !seg.allocated {
            v.absent
                .lock()
                .expect("absent lock")
                .insert(index, Instant::now());
            return Ok(None);
        }
        // The control plane's answer is checked where it enters: a segment
        // has one chunk per 16 MiB, so every offset in it finds its chunk.
        let expected = v.segment_size / CHUNK_BYTES;
        if seg.chunks.len() as u64 != expected {
            return Err(VolumeError::BadSegment {
                volume: v.name.clone(),
                index,
                chunks: seg.chunks.len(),
                expected,
            });
        }
        let map: SegmentMap = Arc::new(seg.chunks.iter().map(|c| (c.copyset, c.chunk)).collect());
        v.segments
            .lock()
            .expect("segments lock")
            .insert(index, map.clone());
        v.absent.lock().expect("absent lock").remove(&index);
        Ok(Some(map))
    }

    /// The (copyset, chunk) holding volume byte `offset`, if allocated.
    async fn locate(&self, offset: u64, allocate: bool) -> Result<Option<(u32, u64)>, VolumeError> {
        let v = &self.0;
        let segment = offset / v.segment_size;
        let Some(map) = self.segment(segment, allocate).await? else {
            return Ok(None);
        };
        let index = ((offset % v.segment_size) / CHUNK_BYTES) as usize;
        Ok(Some(map[index]))
    }

    /// Runs one chunk request, refreshing the copyset map and retrying
    /// when the copyset moved.
    async fn on_chunk<T, F, Fut>(
        &self,
        piece: Piece,
        copyset: u32,
        chunk: u64,
        mut request: F,
    ) -> Result<T, VolumeError>
    where
        F: FnMut(Arc<[SocketAddr]>) -> Fut,
        Fut: std::future::Future<Output = Result<T, ClientError>>,
    {
        let v = &self.0;
        let cluster = &v.cluster;
        let started = Instant::now();
        loop {
            let Some(peers) = cluster.peers(copyset) else {
                cluster.refresh_copysets(&v.name).await?;
                if cluster.peers(copyset).is_none() {
                    return Err(VolumeError::UnknownCopyset {
                        volume: v.name.clone(),
                        copyset,
                    });
                }
                continue;
            };
            let error = match request(peers).await {
                Ok(t) => return Ok(t),
                Err(e) => e,
            };
            let moved = matches!(
                error,
                ClientError::Refused {
                    error: ChunkError::NoSuchCopyset(_),
                    ..
                } | ClientError::Deadline { .. }
            );
            if let ClientError::Refused {
                error: ChunkError::StaleEpoch { .. },
                ..
            } = error
            {
                v.fenced.store(true, Ordering::Release);
                return Err(self.fenced());
            }
            if !moved || started.elapsed() >= cluster.0.options.io_deadline {
                return Err(VolumeError::Chunk {
                    volume: v.name.clone(),
                    copyset,
                    chunk,
                    offset: piece.offset,
                    len: piece.len,
                    source: Box::new(error),
                });
            }
            tracing::debug!(copyset, "{error}: refreshing the copyset map");
            tokio::time::sleep(Duration::from_millis(50)).await;
            cluster.refresh_copysets(&v.name).await?;
        }
    }

    async fn read_piece(&self, piece: Piece, out: &mut [u8]) -> Result<(), VolumeError> {
        let Some((copyset, chunk)) = self.locate(piece.offset, false).await? else {
            out.fill(0);
            return Ok(());
        };
        let chunks = &self.0.cluster.0.chunks;
        let at = piece.offset % CHUNK_BYTES;
        let read = self
            .on_chunk(piece, copyset, chunk, |peers| async move {
                match chunks.read(&peers, copyset, chunk, at, piece.len).await {
                    Err(ClientError::Refused {
                        error: ChunkError::NoSuchChunk { .. },
                        ..
                    }) => Ok(None),
                    other => other.map(Some),
                }
            })
            .await?;
        match read {
            Some(data) => out.copy_from_slice(&data),
            // Never written: zeros.
            None => out.fill(0),
        }
        Ok(())
    }

    async fn write_piece(&self, piece: Piece, data: &[u8]) -> Result<(), VolumeError> {
        let Some((copyset, chunk)) = self.locate(piece.offset, true).await? else {
            // The control plane answered an allocation with "not allocated".
            return Err(VolumeError::BadSegment {
                volume: self.0.name.clone(),
                index: piece.offset / self.0.segment_size,
                chunks: 0,
                expected: self.0.segment_size / CHUNK_BYTES,
            });
        };
        let chunks = &self.0.cluster.0.chunks;
        let at = piece.offset % CHUNK_BYTES;
        let epoch = self.0.epoch;
        self.on_chunk(piece, copyset, chunk, |peers| async move {
            chunks.write(&peers, copyset, chunk, at, epoch, data).await
        })
        .await
    }

    /// Page-aligned read: every piece at once.
    async fn read_aligned(&self, offset: u64, buf: &mut [u8]) -> Result<(), VolumeError> {
        let mut rest = buf;
        let mut reads = Vec::new();
        for piece in pieces(offset, rest.len() as u64, READ_PIECE_BYTES) {
            let (head, tail) = std::mem::take(&mut rest).split_at_mut(piece.len as usize);
            rest = tail;
            reads.push(self.read_piece(piece, head));
        }
        try_join_all(reads).await?;
        Ok(())
    }

    async fn write_aligned(&self, offset: u64, data: &[u8]) -> Result<(), VolumeError> {
        let mut at = 0usize;
        let writes = pieces(offset, data.len() as u64, WRITE_PIECE_BYTES)
            .into_iter()
            .map(|piece| {
                let part = &data[at..at + piece.len as usize];
                at += piece.len as usize;
                self.write_piece(piece, part)
            });
        try_join_all(writes).await?;
        Ok(())
    }

    /// Reads `buf.len()` bytes at `offset`. Never-written ranges read as
    /// zeros.
    pub async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), VolumeError> {
        let len = buf.len() as u64;
        self.check(offset, len, false)?;
        if len == 0 {
            return Ok(());
        }
        if aligned(offset, len) {
            return self.read_aligned(offset, buf).await;
        }
        let start = offset / PAGE_BYTES * PAGE_BYTES;
        let end = (offset + len).div_ceil(PAGE_BYTES) * PAGE_BYTES;
        let mut whole = vec![0u8; (end - start) as usize];
        self.read_aligned(start, &mut whole).await?;
        let from = (offset - start) as usize;
        buf.copy_from_slice(&whole[from..from + buf.len()]);
        Ok(())
    }

    /// Writes `data` at `offset`; durable on all replicas' logs (a quorum)
    /// when it returns.
    pub async fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), VolumeError> {
        let len = data.len() as u64;
        self.check(offset, len, true)?;
        if len == 0 {
            return Ok(());
        }
        if aligned(offset, len) {
            return self.write_aligned(offset, data).await;
        }
        // Read-modify-write of the edge pages, each page's lock held so two
        // small writes sharing a page do not undo each other.
        let start = offset / PAGE_BYTES * PAGE_BYTES;
        let end = (offset + len).div_ceil(PAGE_BYTES) * PAGE_BYTES;
        let head_page = start / PAGE_BYTES;
        let tail_page = end / PAGE_BYTES - 1;
        let mut stripes = vec![
            head_page as usize % PAGE_LOCKS,
            tail_page as usize % PAGE_LOCKS,
        ];
        stripes.sort_unstable();
        stripes.dedup();
        let mut guards = Vec::new();
        for s in stripes {
            guards.push(self.0.page_locks[s].lock().await);
        }
        let mut whole = vec![0u8; (end - start) as usize];
        let page = PAGE_BYTES as usize;
        let last = whole.len() - page;
        if offset != start {
            self.read_aligned(start, &mut whole[..page]).await?;
        }
        if (offset + len) != end && (last != 0 || offset == start) {
            self.read_aligned(end - PAGE_BYTES, &mut whole[last..])
                .await?;
        }
        let from = (offset - start) as usize;
        whole[from..from + data.len()].copy_from_slice(data);
        self.write_aligned(start, &whole).await?;
        drop(guards);
        Ok(())
    }

    /// Makes completed writes durable: they already are (a write returns
    /// once a quorum's logs hold it), so this only checks we still may write.
    pub async fn flush(&self) -> Result<(), VolumeError> {
        if self.0.writable && self.0.fenced.load(Ordering::Acquire) {
            return Err(self.fenced());
        }
        Ok(())
    }

    /// The range reads as zeros afterwards. Unallocated segments are left
    /// alone (they read as zeros already).
    pub async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), VolumeError> {
        self.check(offset, len, true)?;
        let end = offset + len;
        let start_aligned = offset.div_ceil(PAGE_BYTES) * PAGE_BYTES;
        let end_aligned = end / PAGE_BYTES * PAGE_BYTES;
        if start_aligned >= end_aligned {
            return self.write_at(offset, &vec![0; len as usize]).await;
        }
        if offset < start_aligned {
            let head = (start_aligned - offset) as usize;
            self.write_at(offset, &vec![0; head]).await?;
        }
        if end_aligned < end {
            let tail = (end - end_aligned) as usize;
            self.write_at(end_aligned, &vec![0; tail]).await?;
        }
        static ZEROS: [u8; WRITE_PIECE_BYTES as usize] = [0; WRITE_PIECE_BYTES as usize];
        // Bounded parallelism: a whole-volume zeroing is many pieces.
        let all = pieces(
            start_aligned,
            end_aligned - start_aligned,
            WRITE_PIECE_BYTES,
        );
        for batch in all.chunks(64) {
            let writes = batch.iter().map(|piece| async move {
                if self.locate(piece.offset, false).await?.is_none() {
                    return Ok(());
                }
                self.write_piece(*piece, &ZEROS[..piece.len as usize]).await
            });
            try_join_all(writes).await?;
        }
        Ok(())
    }

    /// The range's contents are no longer needed: zeroed here.
    pub async fn discard(&self, offset: u64, len: u64) -> Result<(), VolumeError> {
        self.write_zeroes(offset, len).await
    }

    /// Gives the write lease back (a reader: nothing to do).
    pub async fn close(self) -> Result<(), VolumeError> {
        let v = &self.0;
        if let Some(task) = v.lease.lock().expect("lease lock").take() {
            task.abort();
        }
        if !v.writable || v.fenced.load(Ordering::Acquire) {
            return Ok(());
        }
        let request = proto::LeaseRequest {
            name: v.name.clone(),
            epoch: v.epoch,
        };
        v.cluster
            .0
            .control
            .call("closing", |mut c| {
                let r = request.clone();
                async move { c.close_volume(r).await }
            })
            .await
            .map_err(|source| VolumeError::Control {
                volume: v.name.clone(),
                source,
            })?;
        Ok(())
    }
}

impl Drop for VolumeInner {
    fn drop(&mut self) {
        if let Some(task) = self.lease.lock().expect("lease lock").take() {
            task.abort();
        }
    }
}

impl BlockDevice for Volume {
    fn size(&self) -> u64 {
        Volume::size(self)
    }

    fn read_only(&self) -> bool {
        !self.0.writable
    }

    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        Ok(Volume::read_at(self, offset, buf).await?)
    }

    async fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        Ok(Volume::write_at(self, offset, data).await?)
    }

    async fn flush(&self) -> io::Result<()> {
        Ok(Volume::flush(self).await?)
    }

    async fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        Ok(self.discard(offset, len).await?)
    }

    async fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        Ok(Volume::write_zeroes(self, offset, len).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_cut_at_chunks_and_megabytes() {
        let mib = 1 << 20;
        let p = pieces(CHUNK_BYTES - 4096, 8192, mib);
        assert_eq!(p.len(), 2);
        assert_eq!((p[0].offset, p[0].len), (CHUNK_BYTES - 4096, 4096));
        assert_eq!((p[1].offset, p[1].len), (CHUNK_BYTES, 4096));
        let p = pieces(0, 3 * mib + 4096, mib);
        assert_eq!(
            p.iter().map(|p| p.len).collect::<Vec<_>>(),
            [mib, mib, mib, 4096]
        );
        let p = pieces(mib / 2, CHUNK_BYTES, WRITE_PIECE_BYTES);
        assert!(p.iter().all(|p| p.len <= WRITE_PIECE_BYTES));
        assert_eq!(p.iter().map(|p| p.len).sum::<u64>(), CHUNK_BYTES);
        // No piece crosses a chunk boundary.
        assert!(p
            .iter()
            .all(|p| p.offset / CHUNK_BYTES == (p.offset + p.len - 1) / CHUNK_BYTES));
        assert!(pieces(5, 0, mib).is_empty());
    }
}
