//! The chunkserver: many copysets on one disk and one fabric node, sharing
//! the log engine, the chunk store and the async runtime's threads and
//! timers.
//!
//! On disk, under `data_dir`: `log/` (the shared Raft log engine), `chunks/`
//! (the chunk store and its pool) and `copysets/<id>/` per copyset, holding
//! `spec.json` (its members, written before its Raft starts) and the state
//! machine's [`crate::machine::STATE_FILE`]. A restart opens every copyset
//! found there.
//!
//! The chunk service ([`crate::service`]) is served on the same fabric node
//! as Raft: writes and deletes go through the copyset's Raft log; reads are
//! served by the leader from its store, without a log round while its lease
//! holds (a quorum answered it within the lease), through openraft's
//! linearizable read otherwise.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use openraft::error::{ClientWriteError, RaftError};
use openraft::{BasicNode, Config, Raft, SnapshotPolicy};
use quiver_chunkstore::{ChunkKey, ChunkStore, StoreConfig};
use quiver_fabric::arena::{Arena, ArenaConfig, SizeClass};
use quiver_fabric::{TransportChoice, WorkerConfig};
use serde::{Deserialize, Serialize};

mod heartbeat;

use crate::chunk_client::{call_chunk_service, ClientError};
use crate::data::Data;
use crate::log::{LogConfig, LogEngine};
use crate::machine::{chunk_error, write_atomically, ChunkMachine, Disk};
use crate::net::{handle_raft, FabricNode, Groups, Incoming, Network, Service};
use crate::service::{
    self, ChunkError, CopysetSpec, CopysetStatus, LeaderInfo, Mutation, Request, ServerStatus,
};
use crate::store::{self as raft_store, LogStore, TypeConfig};

/// Raft timing of every copyset of a server.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RaftTuning {
    pub heartbeat_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// A snapshot (and log purge) after this many applied entries.
    pub snapshot_every: u64,
    /// Entries kept in the log behind a snapshot (for slow followers).
    pub log_keep: u64,
    /// A snapshot and a purge of everything it covers, too, once a
    /// copyset's log holds this many MiB of entries (on disk; in memory only
    /// until applied): `snapshot_every` counts entries whatever their size
    /// (20 000 writes of 256 KiB would be 5 GiB). The name is from when
    /// entries stayed in memory until purged.
    pub log_mem_mib: u64,
}

impl Default for RaftTuning {
    fn default() -> RaftTuning {
        RaftTuning {
            heartbeat_ms: 100,
            election_timeout_min_ms: 500,
            election_timeout_max_ms: 1000,
            snapshot_every: 20_000,
            log_keep: 1_000,
            log_mem_mib: 64,
        }
    }
}

impl RaftTuning {
    fn config(&self) -> anyhow::Result<Config> {
        Config {
            cluster_name: "quiver".into(),
            heartbeat_interval: self.heartbeat_ms,
            election_timeout_min: self.election_timeout_min_ms,
            election_timeout_max: self.election_timeout_max_ms,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(self.snapshot_every),
            max_in_snapshot_log_to_keep: self.log_keep,
            // At most 256 KiB of 4 KiB writes per AppendEntries: a follower
            // catching up gets batches it stores within a heartbeat's time.
            max_payload_entries: 64,
            // Snapshot data (a chunk list) goes in pieces that fit a fabric
            // message.
            snapshot_max_chunk_size: 512 << 10,
            ..Config::default()
        }
        .validate()
        .context("raft timing")
    }

    /// How long a leader may serve reads on its own after a quorum answered
    /// it: followers wait at least the minimum election timeout before they
    /// elect another; a margin covers clock-rate differences.
    fn lease_ms(&self) -> u64 {
        self.election_timeout_min_ms * 3 / 4
    }
}

/// `quiver chunkserver --config FILE` (TOML).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChunkserverConfig {
    /// This server's Raft node id, unique in the cluster.
    pub node_id: u64,
    /// Where the fabric listens (Raft between servers, and clients).
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// `auto` (verbs where both sides have RDMA), `tcp` or `verbs`.
    #[serde(default = "default_transport")]
    pub transport: String,
    /// Chunk files formatted ahead of time.
    #[serde(default = "default_pool_files")]
    pub pool_files: usize,
    /// MiB per Raft log segment file (two exist at least: the open one and
    /// the next, prepared ahead).
    #[serde(default = "default_log_segment_mib")]
    pub log_segment_mib: u64,
    /// MiB of registered memory for chunk IO (applied writes in flight,
    /// reads): a quarter in 4 KiB buffers, a quarter in 64 KiB, half in 1 MiB.
    #[serde(default = "default_arena_mib")]
    pub arena_mib: usize,
    /// Microseconds the fabric task (it adapts up to 16x this) polls after
    /// work before it sleeps. Spinning buys latency
    /// with a core: on a machine with fewer cores than busy threads it costs
    /// more than it buys (measured: 4 processes on 2 cores, a 200 us fabric
    /// spin made 3-replica writes 5x slower), so the default is 0; give it
    /// cores before a spin.
    #[serde(default)]
    pub spin_us: u64,
    /// Make the Raft log and the chunk store durable with one device cache
    /// flush where the filesystem allows it (ext4, XFS; files whose block
    /// map never changes), rather than an fdatasync of each file written.
    #[serde(default = "default_true")]
    pub device_flush: bool,
    #[serde(default)]
    pub raft: RaftTuning,
    /// Control plane endpoints (`host:port`, any of the control nodes).
    /// Empty: no control plane; copysets come from this file or `quiver
    /// admin`.
    #[serde(default)]
    pub control: Vec<String>,
    /// The control plane's shared token.
    #[serde(default)]
    pub token: Option<String>,
    /// Talk TLS to the control plane, trusting this CA (PEM file).
    #[serde(default)]
    pub control_ca: Option<PathBuf>,
    /// Failure domain (default `zone-NODE_ID`: every server its own zone).
    #[serde(default)]
    pub zone: Option<String>,
    /// The machine, as the control plane shows it (default: the hostname).
    #[serde(default)]
    pub server: Option<String>,
    /// Physical pool.
    #[serde(default = "default_pool")]
    pub pool: String,
    /// Milliseconds between heartbeats to the control plane.
    #[serde(default = "default_heartbeat_ms")]
    pub heartbeat_ms: u64,
    /// Copysets to host from the start (created if missing).
    #[serde(default)]
    pub copysets: Vec<StaticCopyset>,
}

fn default_transport() -> String {
    "auto".into()
}

fn default_pool() -> String {
    "default".into()
}

fn default_heartbeat_ms() -> u64 {
    2000
}

fn default_pool_files() -> usize {
    32
}

fn default_log_segment_mib() -> u64 {
    64
}

fn default_arena_mib() -> usize {
    64
}

fn default_true() -> bool {
    true
}

/// A copyset named in the configuration file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticCopyset {
    pub id: u32,
    /// Members: node id → fabric address.
    pub peers: BTreeMap<u64, String>,
}

impl ChunkserverConfig {
    /// A configuration with every optional key at its default.
    pub fn new(node_id: u64, listen: SocketAddr, data_dir: PathBuf) -> ChunkserverConfig {
        ChunkserverConfig {
            node_id,
            listen,
            data_dir,
            transport: default_transport(),
            pool_files: default_pool_files(),
            log_segment_mib: default_log_segment_mib(),
            arena_mib: default_arena_mib(),
            spin_us: 0,
            device_flush: true,
            raft: RaftTuning::default(),
            control: Vec::new(),
            token: None,
            control_ca: None,
            zone: None,
            server: None,
            pool: default_pool(),
            heartbeat_ms: default_heartbeat_ms(),
            copysets: Vec::new(),
        }
    }

    /// The configuration as `quiver chunkserver --config` reads it.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a chunkserver configuration serializes")
    }

    pub fn load(path: &Path) -> anyhow::Result<ChunkserverConfig> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }

    fn transport(&self) -> anyhow::Result<TransportChoice> {
        Ok(match self.transport.as_str() {
            "auto" => TransportChoice::Auto,
            "tcp" => TransportChoice::Tcp,
            "verbs" => TransportChoice::Verbs,
            other => anyhow::bail!("transport {other:?}: expected auto, tcp or verbs"),
        })
    }
}

/// Which life of a copyset on this server (a file in its directory).
const INCARNATION_FILE: &str = "incarnation";

/// The log engine's group of a copyset's life here: the copyset id, and
/// above it the incarnation (Raft between servers uses the copyset id).
fn log_group(copyset: u32, incarnation: u32) -> u64 {
    u64::from(copyset) | (u64::from(incarnation) << 32)
}

struct Copyset {
    raft: Raft<TypeConfig>,
    machine: ChunkMachine,
    spec: CopysetSpec,
    /// While leadership is being handed to this member, client requests are
    /// sent to it (they would keep the old leader's term alive).
    handing_to: Mutex<Option<u64>>,
    /// Until when (and in which term) this leader may serve reads on its
    /// own: set from the moment it asked a quorum that then confirmed it.
    lease: Mutex<Option<(u64, std::time::Instant)>>,
    /// Its log's group in the disk's log engine.
    log: u64,
    /// Snapshots and purges the log when it holds too much (stops with the copyset).
    _log_pressure: AbortOnDrop,
}

/// A task that stops when its owner goes.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Waits for the copyset's log to outgrow its limit, then snapshots and
/// purges everything the snapshot covers. Slow followers then catch up by
/// snapshot rather than by log: bounded memory comes first.
async fn relieve_log_pressure(
    copyset: u32,
    raft: Raft<TypeConfig>,
    engine: Arc<LogEngine>,
    group: u64,
    pressure: Arc<crate::store::LogPressure>,
) {
    // While the log stays over its limit, look again every second as well:
    // the append that raised the pressure may have come while the last
    // round was busy, and none may follow (seen in CI: a follower stuck
    // at 2 MiB of a 1 MiB limit after the writes ended).
    const RECHECK: std::time::Duration = std::time::Duration::from_secs(1);
    const SNAPSHOT_WAIT: std::time::Duration = std::time::Duration::from_secs(10);
    let mut over = false;
    let mut purged = None;
    loop {
        if over {
            let _ = tokio::time::timeout(RECHECK, pressure.raised.notified()).await;
        } else {
            pressure.raised.notified().await;
        }
        let held = engine.bytes(group);
        over = held > pressure.limit;
        if !over {
            continue;
        }
        let mut metrics = raft.metrics();
        let (applied, before) = {
            let m = metrics.borrow();
            (m.last_applied.map(|l| l.index), m.snapshot.map(|s| s.index))
        };
        if applied <= before {
            // Nothing applied since the last snapshot: what it covers can go
            // (again, harmlessly); the rest waits for commits.
            if let Some(upto) = before.filter(|&b| Some(b) != purged) {
                if raft.trigger().purge_log(upto).await.is_err() {
                    return;
                }
                purged = Some(upto);
            }
            continue;
        }
        tracing::info!(
            copyset,
            held,
            limit = pressure.limit,
            "log over its memory limit: snapshot and purge"
        );
        if raft.trigger().snapshot().await.is_err() {
            return;
        }
        let built = tokio::time::timeout(SNAPSHOT_WAIT, async {
            metrics
                .wait_for(|m| m.snapshot.map(|s| s.index) != before)
                .await
                .ok()
                .and_then(|m| m.snapshot.map(|s| s.index))
        })
        .await;
        let Ok(Some(upto)) = built else {
            tracing::warn!(
                copyset,
                "no snapshot within 10 s to relieve the log; trying again"
            );
            continue;
        };
        if raft.trigger().purge_log(upto).await.is_err() {
            return;
        }
        purged = Some(upto);
    }
}

/// A running chunkserver.
#[derive(Clone)]
pub struct Chunkserver(Arc<Inner>);

struct Inner {
    config: ChunkserverConfig,
    addr: SocketAddr,
    fabric: Arc<FabricNode>,
    engine: Arc<LogEngine>,
    disk: Arc<Disk>,
    groups: Groups,
    copysets: Mutex<HashMap<u32, Arc<Copyset>>>,
    /// Serializes copyset creation (spec file, then Raft).
    creating: tokio::sync::Mutex<()>,
    raft_config: Arc<Config>,
}

/// Raises the soft limit on open files to the hard one, as servers do (the
/// chunk store registers thousands of file slots); returns the limit.
fn raise_open_files_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 1024;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
    }
    limit.rlim_cur
}

/// The chunk store's registered memory: `mib` for IO, plus one checksum
/// table (16 KiB) per file the store may hold open.
fn chunk_arena(mib: usize, open_files: usize) -> anyhow::Result<Arena> {
    anyhow::ensure!(mib >= 4, "arena_mib must be at least 4");
    Ok(Arena::new(&ArenaConfig {
        classes: vec![
            SizeClass {
                buf_bytes: 4 << 10,
                count: mib * 64,
            },
            SizeClass {
                buf_bytes: quiver_chunkstore::format::CRC_BYTES,
                count: open_files,
            },
            SizeClass {
                buf_bytes: 64 << 10,
                count: mib * 4,
            },
            SizeClass {
                buf_bytes: 1 << 20,
                count: mib / 2,
            },
        ],
        huge_pages: false,
    })?)
}

impl Chunkserver {
    /// Opens the server's disk, starts its fabric node and every copyset it
    /// hosts, and serves until the runtime stops. Call inside a runtime.
    pub async fn start(config: ChunkserverConfig) -> anyhow::Result<Chunkserver> {
        let dir = &config.data_dir;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        anyhow::ensure!(
            config.log_segment_mib >= 1,
            "log_segment_mib must be at least 1"
        );
        let log_config = LogConfig {
            segment_bytes: config.log_segment_mib << 20,
            runtime: Some(tokio::runtime::Handle::current()),
            device_flush: config.device_flush,
            ..LogConfig::new(dir.join("log"))
        };
        let engine = Arc::new(LogEngine::open(log_config).context("opening the Raft log")?);
        let files = raise_open_files_limit();
        let defaults = StoreConfig::new(dir.join("chunks"));
        let store_config = StoreConfig {
            pool_files: config.pool_files,
            pool_low_water: config.pool_files / 4,
            // Registered file slots count against the descriptor limit; leave
            // half of it for sockets, the log and the rest.
            open_files_max: defaults.open_files_max.min((files / 2) as u32).max(64),
            device_flush: config.device_flush,
            ..defaults
        };
        let arena = chunk_arena(config.arena_mib, store_config.open_files_max as usize)?;
        let store = ChunkStore::open(store_config, arena).context("opening the chunk store")?;
        let disk = Disk::new(store).context("starting the chunk store's driver")?;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let worker_config = WorkerConfig {
            transport: config.transport()?,
            spin: std::time::Duration::from_micros(config.spin_us),
            ..WorkerConfig::default()
        };
        let fabric = Arc::new(FabricNode::start(config.listen, worker_config, tx)?);
        let raft_config = Arc::new(config.raft.config()?);
        let server = Chunkserver(Arc::new(Inner {
            addr: fabric.addr,
            config: config.clone(),
            fabric,
            engine,
            disk,
            groups: Groups::default(),
            copysets: Mutex::new(HashMap::new()),
            creating: tokio::sync::Mutex::new(()),
            raft_config,
        }));
        // Copysets from an earlier life, then those of the configuration.
        let copysets_dir = dir.join("copysets");
        std::fs::create_dir_all(&copysets_dir)?;
        let mut found = Vec::new();
        for dirent in std::fs::read_dir(&copysets_dir)? {
            let path = dirent?.path();
            let Some(id) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let Ok(bytes) = std::fs::read(path.join("spec.json")) else {
                continue; // created no further than its directory
            };
            let spec: CopysetSpec = serde_json::from_slice(&bytes)
                .with_context(|| format!("{}/spec.json", path.display()))?;
            found.push((id, spec));
        }
        for (id, spec) in found {
            server.open_copyset(id, spec).await?;
        }
        for c in &config.copysets {
            let bootstrap = service::bootstrap_member(c.id, &c.peers) == Some(config.node_id);
            let spec = CopysetSpec {
                peers: c.peers.clone(),
                bootstrap,
            };
            match server.create_copyset(c.id, spec).await {
                Ok(()) | Err(ChunkError::CopysetExists(_)) => {}
                Err(e) => return Err(e).context(format!("copyset {}", c.id)),
            }
        }
        let serving = server.clone();
        tokio::spawn(async move { serving.serve(rx).await });
        tokio::spawn(keep_pool_filled(Arc::downgrade(&server.0)));
        if !config.control.is_empty() {
            let reporter = heartbeat::Reporter::new(&server)?;
            tokio::spawn(reporter.run(Arc::downgrade(&server.0)));
        }
        tracing::info!(
            node = config.node_id,
            addr = %server.0.addr,
            copysets = server.0.copysets.lock().expect("copysets lock").len(),
            "chunkserver serving"
        );
        Ok(server)
    }

    pub fn addr(&self) -> SocketAddr {
        self.0.addr
    }

    /// Stops Raft of every copyset and the fabric node.
    pub async fn shutdown(&self) {
        let copysets: Vec<_> = self
            .0
            .copysets
            .lock()
            .expect("copysets lock")
            .drain()
            .collect();
        for (_, c) in copysets {
            let _ = c.raft.shutdown().await;
        }
        // Every Raft is down, so nothing appends: the writer finishes what
        // is queued and lets go of the segments before this returns (a
        // restart in the same process then opens a log no one else writes).
        self.0.engine.stop().await;
        // Applied writes left their checksum pages for the next sync: write
        // them now, so a clean restart reads every page at once (a crash
        // relies on Raft's replay instead).
        let disk = Arc::clone(&self.0.disk);
        let synced = tokio::task::spawn_blocking(move || disk.store().sync_dirty()).await;
        if let Ok(Err(e)) = synced {
            tracing::warn!(error = %e, "syncing chunks at shutdown failed");
        }
        self.0.fabric.shutdown().await;
    }

    async fn serve(self, mut inbound: tokio::sync::mpsc::UnboundedReceiver<Incoming>) {
        // Client requests in service at once: past this, answer Busy (the
        // client backs off) rather than queue bodies of up to 1 MiB each.
        const CHUNK_REQUESTS_MAX: usize = 1024;
        let admitted = Arc::new(tokio::sync::Semaphore::new(CHUNK_REQUESTS_MAX));
        while let Some(rpc) = inbound.recv().await {
            match rpc.service {
                Service::Raft => handle_raft(self.0.config.node_id, &self.0.groups, rpc),
                Service::Chunk => match Arc::clone(&admitted).try_acquire_owned() {
                    Ok(permit) => {
                        let server = self.clone();
                        tokio::spawn(async move {
                            server.handle_chunk(rpc).await;
                            drop(permit);
                        });
                    }
                    Err(_) => rpc.reply.send_with_header(
                        vec![service::STATUS_ERR],
                        service::error_body(&ChunkError::Busy(CHUNK_REQUESTS_MAX)),
                    ),
                },
            }
        }
    }

    async fn handle_chunk(&self, rpc: Incoming) {
        let Incoming {
            kind,
            group,
            body,
            reply,
            ..
        } = rpc;
        let copyset = group as u32;
        // Only a mutation's body is kept as it came (into the log); other
        // requests are small and some are served for long (a peer change):
        // not in a fabric buffer all that time.
        let body = if matches!(kind, service::KIND_WRITE | service::KIND_DELETE) {
            body
        } else {
            Data::from(&body[..])
        };
        let answer = match service::decode_request(kind, &body) {
            Ok(Request::Mutate(_)) => {
                // The body goes into the log as it came off the fabric (it
                // was checked); nothing else here keeps it.
                let entry = raft_store::Request::new(kind, body);
                self.propose_entry(copyset, entry)
                    .await
                    .map(|()| Vec::new())
            }
            Ok(request) => self.answer(copyset, request).await,
            Err(e) => Err(e),
        };
        match answer {
            Ok(body) => reply.send_with_header(vec![service::STATUS_OK], body),
            Err(e) => {
                tracing::debug!(copyset, error = %e, "chunk request refused");
                reply.send_with_header(vec![service::STATUS_ERR], service::error_body(&e));
            }
        }
    }

    fn copyset(&self, id: u32) -> Result<Arc<Copyset>, ChunkError> {
        let copysets = self.0.copysets.lock().expect("copysets lock");
        copysets
            .get(&id)
            .cloned()
            .ok_or(ChunkError::NoSuchCopyset(id))
    }

    /// Answers a request other than a mutation (those go to the log).
    async fn answer(&self, copyset: u32, request: Request<'_>) -> Result<Vec<u8>, ChunkError> {
        match request {
            Request::Mutate(_) => Err(ChunkError::BadRequest(
                "a mutation reached the answer path; handle_chunk proposes them".into(),
            )),
            Request::Read {
                chunk,
                offset,
                len,
                any_replica,
            } => {
                let c = self.copyset(copyset)?;
                if !any_replica {
                    handing_over(copyset, &c)?;
                    self.ensure_leader_reads(copyset, &c).await?;
                }
                let key = ChunkKey { copyset, chunk };
                let data = self
                    .0
                    .disk
                    .read(key, offset, len as usize)
                    .await
                    .map_err(chunk_error)?;
                Ok(data.to_vec())
            }
            Request::Leader => {
                let c = self.copyset(copyset)?;
                let info = leader_info(&c.raft);
                Ok(serde_json::to_vec(&info).expect("serializes"))
            }
            Request::CreateCopyset(spec) => {
                self.create_copyset(copyset, spec).await?;
                Ok(Vec::new())
            }
            Request::Status => Ok(serde_json::to_vec(&self.status()).expect("serializes")),
            Request::TransferLeader { to } => {
                let c = self.copyset(copyset)?;
                self.transfer_leader(copyset, &c, to).await?;
                Ok(Vec::new())
            }
            Request::ChangePeers(change) => {
                let c = self.copyset(copyset)?;
                self.change_peers(copyset, &c, change).await?;
                Ok(Vec::new())
            }
            Request::Campaign => {
                let c = self.copyset(copyset)?;
                c.raft
                    .trigger()
                    .elect()
                    .await
                    .map_err(|e| ChunkError::Raft(e.to_string()))?;
                Ok(Vec::new())
            }
        }
    }

    /// Proposes a log entry on `copyset`'s leader and waits for its applied
    /// answer.
    async fn propose_entry(
        &self,
        copyset: u32,
        entry: raft_store::Request,
    ) -> Result<(), ChunkError> {
        let c = self.copyset(copyset)?;
        handing_over(copyset, &c)?;
        let response = c
            .raft
            .client_write(entry)
            .await
            .map_err(|e| self.write_error(copyset, e))?;
        service::decode_answer(&response.data.0[..1], &response.data.0[1..])
    }

    /// Proposes a mutation of this server's own making (garbage deletion).
    async fn propose(&self, copyset: u32, m: Mutation<'_>) -> Result<(), ChunkError> {
        let (kind, body) = service::encode_mutation(&m);
        self.propose_entry(copyset, raft_store::Request::new(kind, body))
            .await
    }

    /// Adds and/or removes a member of `copyset` (on its leader). A new
    /// member gets the copyset created (not bootstrapping), catches up as a
    /// learner, then the voters change in one joint-consensus step.
    async fn change_peers(
        &self,
        copyset: u32,
        c: &Copyset,
        change: service::PeerChange,
    ) -> Result<(), ChunkError> {
        use openraft::ChangeMembers;
        use std::collections::BTreeSet;
        let m = c.raft.metrics().borrow().clone();
        if m.current_leader != Some(self.0.config.node_id) {
            return Err(not_leader(copyset, &c.raft));
        }
        let membership = m.membership_config.membership().clone();
        let mut voters: BTreeSet<u64> = membership.voter_ids().collect();
        // Made already (a retried request whose answer was lost): done.
        let add_done = change
            .add
            .as_ref()
            .is_some_and(|(id, _)| voters.contains(id));
        let remove_done = change.remove.is_some_and(|id| !voters.contains(&id));
        match (&change.add, change.remove) {
            (Some(_), None) if add_done => return Ok(()),
            (Some(_), Some(_)) if add_done && remove_done => return Ok(()),
            _ => {}
        }
        let raft_error =
            |e: RaftError<u64, ClientWriteError<u64, BasicNode>>| self.write_error(copyset, e);
        if let Some((id, addr)) = &change.add {
            let server: SocketAddr = addr.parse().map_err(|e| {
                ChunkError::BadRequest(format!("new member's address {addr:?}: {e}"))
            })?;
            let mut peers: BTreeMap<u64, String> = membership
                .nodes()
                .map(|(n, node)| (*n, node.addr.clone()))
                .collect();
            peers.insert(*id, addr.clone());
            let spec = CopysetSpec {
                peers,
                bootstrap: false,
            };
            call_chunk_service(
                &self.0.fabric,
                server,
                copyset,
                service::KIND_CREATE_COPYSET,
                serde_json::to_vec(&spec).expect("serializes"),
                std::time::Duration::from_secs(10),
            )
            .await
            .map_err(ClientError::into_chunk_error)?;
            // Returns once the learner holds the log (or a snapshot).
            c.raft
                .add_learner(*id, BasicNode::new(addr), true)
                .await
                .map_err(raft_error)?;
            voters.insert(*id);
        }
        // The voters now: a learner's catch-up can take long.
        voters = c
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .collect();
        if let Some((id, _)) = &change.add {
            voters.insert(*id);
        }
        if let Some(id) = change.remove {
            if !voters.remove(&id) {
                return Err(ChunkError::BadRequest(format!(
                    "copyset {copyset}: node {id} is not a voter"
                )));
            }
        }
        if voters.is_empty() {
            return Err(ChunkError::BadRequest("a copyset needs a voter".into()));
        }
        c.raft
            .change_membership(ChangeMembers::ReplaceAllVoters(voters.clone()), false)
            .await
            .map_err(raft_error)?;
        tracing::info!(copyset, ?change, ?voters, "membership changed");
        Ok(())
    }

    /// Hands leadership of `copyset` to member `to`. openraft 0.9 has no
    /// transfer: the leader stops taking requests (they go to `to`), waits
    /// until `to` holds its whole log, and asks it to stand for election. A
    /// leader grants a vote to an up-to-date candidate of a higher term
    /// (openraft's lease protects followers, not the leader), so `to` wins
    /// with the old leader's vote and the old leader steps down.
    async fn transfer_leader(&self, copyset: u32, c: &Copyset, to: u64) -> Result<(), ChunkError> {
        use std::time::{Duration, Instant};
        let me = self.0.config.node_id;
        let metrics = c.raft.metrics().borrow().clone();
        if metrics.current_leader != Some(me) {
            return Err(not_leader(copyset, &c.raft));
        }
        if to == me {
            return Ok(());
        }
        let Some(target) = metrics
            .membership_config
            .membership()
            .get_node(&to)
            .cloned()
        else {
            return Err(ChunkError::BadRequest(format!(
                "copyset {copyset}: node {to} is not a member"
            )));
        };
        if !metrics
            .membership_config
            .membership()
            .voter_ids()
            .any(|v| v == to)
        {
            return Err(ChunkError::BadRequest(format!(
                "copyset {copyset}: node {to} is a learner, not a voter"
            )));
        }
        let target_addr: SocketAddr = target
            .addr
            .parse()
            .map_err(|e| ChunkError::BadRequest(format!("node {to}'s address: {e}")))?;
        let started = Instant::now();
        // The target may lose its first election to the followers' leases
        // and win its next: allow a few election timeouts.
        let patience = Duration::from_millis(4 * self.0.config.raft.election_timeout_max_ms);
        let wait_for_target = || async move {
            let deadline = Instant::now() + patience;
            loop {
                if c.raft.metrics().borrow().current_leader == Some(to) {
                    return Ok(());
                }
                if Instant::now() > deadline {
                    return Err(ChunkError::Raft(format!(
                        "node {to} did not take over within {patience:?}"
                    )));
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        };
        let under_way = {
            let mut handing = c.handing_to.lock().expect("copyset lock");
            let was = *handing;
            if was.is_none() {
                *handing = Some(to);
            }
            was
        };
        // This leader will vote for the target: its reads need a new proof.
        *c.lease.lock().expect("copyset lock") = None;
        match under_way {
            // A retry of the request under way: its outcome is ours.
            Some(t) if t == to => return wait_for_target().await,
            Some(t) => {
                return Err(ChunkError::BadRequest(format!(
                    "copyset {copyset}: a transfer to node {t} is under way"
                )))
            }
            None => {}
        }
        let result = async {
            // Wait until the target holds everything this leader has.
            let deadline = started + Duration::from_secs(5);
            loop {
                let m = c.raft.metrics().borrow().clone();
                let matched = m
                    .replication
                    .as_ref()
                    .and_then(|r| r.get(&to).cloned().flatten());
                if matched.is_some() && matched.map(|l| l.index) == m.last_log_index {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(ChunkError::Raft(format!(
                        "node {to} did not catch up within 5 s (at {matched:?}, log at {:?})",
                        m.last_log_index
                    )));
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            call_chunk_service(
                &self.0.fabric,
                target_addr,
                copyset,
                service::KIND_CAMPAIGN,
                Vec::new(),
                Duration::from_secs(2),
            )
            .await
            .map_err(ClientError::into_chunk_error)?;
            wait_for_target().await
        }
        .await;
        *c.handing_to.lock().expect("copyset lock") = None;
        match &result {
            Ok(()) => {
                tracing::info!(copyset, to, took = ?started.elapsed(), "leadership handed over")
            }
            Err(e) => tracing::warn!(copyset, to, error = %e, "leadership transfer failed"),
        }
        result
    }

    fn write_error(
        &self,
        copyset: u32,
        e: RaftError<u64, ClientWriteError<u64, BasicNode>>,
    ) -> ChunkError {
        match e {
            RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => forward(copyset, f),
            other => ChunkError::Raft(other.to_string()),
        }
    }

    /// Lets a read through only on the leader: at once while its lease holds,
    /// after a round of heartbeats otherwise. The lease is our own clock's:
    /// it starts when we asked the quorum that confirmed us (openraft's
    /// metrics are refreshed only between its own steps, so their age of the
    /// last quorum answer can be stale), and followers elect no one else for
    /// an election timeout after hearing from us.
    async fn ensure_leader_reads(&self, copyset: u32, c: &Copyset) -> Result<(), ChunkError> {
        let node = self.0.config.node_id;
        let (leader, current_term) = {
            let m = c.raft.metrics();
            let m = m.borrow();
            (m.current_leader, m.current_term)
        };
        let held = *c.lease.lock().expect("copyset lock");
        if let Some((term, until)) = held {
            if leader == Some(node) && current_term == term && std::time::Instant::now() < until {
                return Ok(());
            }
        }
        let asked = std::time::Instant::now();
        // Also waits until what was committed before is applied here.
        c.raft.ensure_linearizable().await.map_err(|e| match e {
            RaftError::APIError(openraft::error::CheckIsLeaderError::ForwardToLeader(f)) => {
                forward(copyset, f)
            }
            other => ChunkError::Raft(other.to_string()),
        })?;
        let term = c.raft.metrics().borrow().current_term;
        let lease = std::time::Duration::from_millis(self.0.config.raft.lease_ms());
        *c.lease.lock().expect("copyset lock") = Some((term, asked + lease));
        Ok(())
    }

    /// Creates a copyset here: its spec is written first (so a restart opens
    /// it), then its Raft starts; the bootstrapping member initializes the
    /// group. Creating one that exists with the same members succeeds.
    pub async fn create_copyset(&self, id: u32, spec: CopysetSpec) -> Result<(), ChunkError> {
        let _one_at_a_time = self.0.creating.lock().await;
        if let Ok(existing) = self.copyset(id) {
            // The same request again, or a join (not bootstrap) to a copyset
            // this server holds already: an earlier attempt made it, and the
            // leader's log, not the spec, says who its members are. (A join
            // retried after the leader's membership moved has other peers in
            // its spec; refusing it stalled re-replication for good.)
            return if existing.spec.peers == spec.peers || !spec.bootstrap {
                Ok(())
            } else {
                Err(ChunkError::CopysetExists(id))
            };
        }
        if !spec.peers.contains_key(&self.0.config.node_id) {
            return Err(ChunkError::BadRequest(format!(
                "copyset {id}: node {} is not among its peers {:?}",
                self.0.config.node_id, spec.peers
            )));
        }
        if spec
            .peers
            .values()
            .any(|a| a.parse::<SocketAddr>().is_err())
        {
            return Err(ChunkError::BadRequest(format!(
                "copyset {id}: a peer address is not IP:port: {:?}",
                spec.peers
            )));
        }
        let dir = self.copyset_dir(id);
        let bytes = serde_json::to_vec(&spec).expect("serializes");
        // A copyset hosted here before and removed: this life's log must
        // not meet that one's entries or votes.
        let removed = self.removed_dir(id);
        // On a blocking thread: four syncs, and the runtime carries the
        // fabric and every other copyset.
        let shown = dir.display().to_string();
        tokio::task::spawn_blocking(move || {
            let incarnation = std::fs::read_to_string(removed.join(INCARNATION_FILE))
                .ok()
                .and_then(|s| s.trim().parse::<u32>().ok())
                .map_or(0, |n| n + 1);
            std::fs::create_dir_all(&dir)
                .and_then(|()| {
                    write_atomically(&dir, INCARNATION_FILE, incarnation.to_string().as_bytes())
                })
                .and_then(|()| write_atomically(&dir, "spec.json", &bytes))
                .and_then(|()| match std::fs::remove_dir_all(&removed) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                    _ => Ok(()),
                })
        })
        .await
        .map_err(std::io::Error::other)
        .and_then(|r| r)
        .map_err(|e| ChunkError::Storage(format!("{shown}: {e}")))?;
        self.open_copyset(id, spec)
            .await
            .map_err(|e| ChunkError::Raft(format!("{e:#}")))
    }

    /// Stops hosting copyset `id` (this server is no longer a member): its
    /// Raft stops, its chunks go back to the pool, its log entries are
    /// purged, and its directory is kept aside only to number the next
    /// incarnation should it come back.
    pub async fn remove_copyset(&self, id: u32) -> Result<(), ChunkError> {
        let _one_at_a_time = self.0.creating.lock().await;
        let removed = self.0.copysets.lock().expect("copysets lock").remove(&id);
        let Some(c) = removed else {
            return Err(ChunkError::NoSuchCopyset(id));
        };
        self.0
            .groups
            .write()
            .expect("groups lock")
            .remove(&u64::from(id));
        if let Err(e) = c.raft.shutdown().await {
            tracing::warn!(copyset = id, error = %e, "stopping Raft");
        }
        c.machine.retire().await;
        let storage = |what: &str, e: &dyn std::fmt::Display| {
            ChunkError::Storage(format!("removing copyset {id}: {what}: {e}"))
        };
        for key in c.machine.chunks() {
            self.0
                .disk
                .store()
                .delete(key)
                .map_err(|e| storage("deleting a chunk", &e))?;
        }
        let group = log_group(id, self.incarnation(id));
        if let Some(last) = self.0.engine.state(group).last {
            crate::store::durable(|done| self.0.engine.purge(group, last, done))
                .await
                .map_err(|e| storage("purging its log", &e))?;
        }
        let removed = self.removed_dir(id);
        let _ = std::fs::remove_dir_all(&removed);
        std::fs::rename(self.copyset_dir(id), &removed)
            .map_err(|e| storage("moving its directory aside", &e))?;
        tracing::info!(copyset = id, "copyset removed from this server");
        Ok(())
    }

    fn copyset_dir(&self, id: u32) -> PathBuf {
        self.0.config.data_dir.join("copysets").join(id.to_string())
    }

    fn removed_dir(&self, id: u32) -> PathBuf {
        self.0
            .config
            .data_dir
            .join("copysets")
            .join(format!("removed-{id}"))
    }

    fn incarnation(&self, id: u32) -> u32 {
        std::fs::read_to_string(self.copyset_dir(id).join(INCARNATION_FILE))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    async fn open_copyset(&self, id: u32, spec: CopysetSpec) -> anyhow::Result<()> {
        let group = u64::from(id);
        let log = log_group(id, self.incarnation(id));
        let pressure = Arc::new(crate::store::LogPressure {
            limit: self.0.config.raft.log_mem_mib << 20,
            raised: tokio::sync::Notify::new(),
        });
        // The leader writes an entry while it replicates it: the machine
        // and the network wait on the log's durable mark instead.
        let log_store =
            LogStore::with_pressure(Arc::clone(&self.0.engine), log, Arc::clone(&pressure))
                .ack_own_appends_early(self.0.config.node_id);
        let log_durable = log_store.durable_mark();
        let machine = ChunkMachine::open(
            id,
            Arc::clone(&self.0.disk),
            &self.copyset_dir(id),
            self.0.addr.to_string(),
            Arc::clone(&self.0.fabric),
            (log_durable.clone(), log_store.applied_mark()),
        )?;
        let raft = Raft::new(
            self.0.config.node_id,
            Arc::clone(&self.0.raft_config),
            Network::new(Arc::clone(&self.0.fabric), group).with_durable_mark(log_durable),
            log_store,
            machine.clone(),
        )
        .await
        .with_context(|| format!("starting Raft of copyset {id}"))?;
        if spec.bootstrap {
            let members: BTreeMap<u64, BasicNode> = spec
                .peers
                .iter()
                .map(|(&n, a)| (n, BasicNode::new(a)))
                .collect();
            // Refused (harmlessly) once the group has a log: after a restart.
            if let Err(e) = raft.initialize(members).await {
                tracing::debug!(copyset = id, error = %e, "not initializing");
            }
        }
        self.0
            .groups
            .write()
            .expect("groups lock")
            .insert(group, raft.clone());
        let raft_for_pressure = raft.clone();
        self.0.copysets.lock().expect("copysets lock").insert(
            id,
            Arc::new(Copyset {
                raft,
                machine,
                spec,
                handing_to: Mutex::new(None),
                lease: Mutex::new(None),
                log,
                _log_pressure: AbortOnDrop(tokio::spawn(relieve_log_pressure(
                    id,
                    raft_for_pressure,
                    Arc::clone(&self.0.engine),
                    log,
                    pressure,
                ))),
            }),
        );
        Ok(())
    }

    /// This server's view of its copysets.
    pub fn status(&self) -> ServerStatus {
        let copysets: Vec<Arc<Copyset>> = self
            .0
            .copysets
            .lock()
            .expect("copysets lock")
            .values()
            .cloned()
            .collect();
        // One pass over the store's chunks, not one per copyset: this runs
        // on the runtime's thread at every heartbeat.
        let mut chunk_counts: HashMap<u32, usize> = HashMap::new();
        for key in self.0.disk.store().list() {
            *chunk_counts.entry(key.copyset).or_default() += 1;
        }
        let mut out: Vec<CopysetStatus> = copysets
            .iter()
            .map(|c| {
                let m = c.raft.metrics().borrow().clone();
                CopysetStatus {
                    copyset: c.machine.copyset(),
                    leader: m.current_leader,
                    term: m.current_term,
                    last_applied: m.last_applied.map(|l| l.index),
                    last_log: m.last_log_index,
                    snapshot: c.machine.snapshot_index(),
                    voters: m.membership_config.membership().voter_ids().collect(),
                    learners: m.membership_config.membership().learner_ids().collect(),
                    epoch: m.membership_config.log_id().map_or(0, |l| l.index + 1),
                    chunks: chunk_counts.get(&c.machine.copyset()).copied().unwrap_or(0),
                    log_bytes: self.0.engine.bytes(c.log),
                    log_held_bytes: self.0.engine.held_bytes(c.log),
                }
            })
            .collect();
        out.sort_by_key(|c| c.copyset);
        ServerStatus {
            node: self.0.config.node_id,
            addr: self.0.addr.to_string(),
            transport: self.0.config.transport.clone(),
            copysets: out,
            pool_free: self.0.disk.store().pool_free(),
            pool_files: self.0.config.pool_files,
        }
    }
}

/// Formats chunk files in the background whenever the pool is below its
/// size, without holding the store: formatting a file writes 16 MiB, tens
/// of milliseconds in which every copyset of the disk would wait (it showed
/// as one ~44 ms stall in every `bench replication` run). A chunk creation
/// finding the pool empty still formats in line.
async fn keep_pool_filled(server: std::sync::Weak<Inner>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(200));
    loop {
        tick.tick().await;
        let Some(inner) = server.upgrade() else {
            return;
        };
        let disk = Arc::clone(&inner.disk);
        drop(inner);
        loop {
            let disk = Arc::clone(&disk);
            let formatted = tokio::task::spawn_blocking(
                move || -> Result<bool, quiver_chunkstore::StoreError> {
                    let Some(file) = disk.store().pool_file_wanted() else {
                        return Ok(false);
                    };
                    file.format()?;
                    disk.store().pool_file_formatted(file);
                    Ok(true)
                },
            )
            .await;
            match formatted {
                Ok(Ok(true)) => continue,
                Ok(Ok(false)) => break,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "formatting chunk files failed");
                    break;
                }
                Err(_) => return,
            }
        }
    }
}

/// Refuses client requests while this leader hands over to another member.
fn handing_over(copyset: u32, c: &Copyset) -> Result<(), ChunkError> {
    let Some(to) = *c.handing_to.lock().expect("copyset lock") else {
        return Ok(());
    };
    let m = c.raft.metrics().borrow().clone();
    let leader_addr = m
        .membership_config
        .membership()
        .get_node(&to)
        .map(|n| n.addr.clone());
    Err(ChunkError::NotLeader {
        copyset,
        leader: Some(to),
        leader_addr,
    })
}

/// openraft's "ask the leader" as the chunk service says it.
fn forward(copyset: u32, f: openraft::error::ForwardToLeader<u64, BasicNode>) -> ChunkError {
    ChunkError::NotLeader {
        copyset,
        leader: f.leader_id,
        leader_addr: f.leader_node.map(|n| n.addr),
    }
}

fn not_leader(copyset: u32, raft: &Raft<TypeConfig>) -> ChunkError {
    let info = leader_info(raft);
    ChunkError::NotLeader {
        copyset,
        leader: info.leader,
        leader_addr: info.leader_addr,
    }
}

fn leader_info(raft: &Raft<TypeConfig>) -> LeaderInfo {
    let m = raft.metrics().borrow().clone();
    let leader_addr = m.current_leader.and_then(|l| {
        m.membership_config
            .membership()
            .get_node(&l)
            .map(|n| n.addr.clone())
    });
    LeaderInfo {
        leader: m.current_leader,
        leader_addr,
        term: m.current_term,
    }
}
