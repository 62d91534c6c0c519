//! The control node: the gRPC service, leadership, and the scheduler loop.
//!
//! One node leads. It loads the whole model from the store when it wins,
//! answers every RPC from memory, and writes each change through to the
//! store before it takes effect. Liveness (heartbeat times, reported
//! leaders, operations under way) is soft state: a new leader starts with
//! every chunkserver counted as just seen.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use tokio::sync::Mutex;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::config::ControlConfig;
use crate::meta::{Changes, ChunkserverRecord, ControlError, CopysetRecord, Model, VolumeRecord};
use crate::placement::{place_copysets, Candidate};
use crate::proto::{self, control_server::ControlServer};
use crate::scheduler::{self, Health, Operation, Planned, View};
use crate::store::{Batch, LeaderRecord, MetaStore, StoreError};

/// The metadata key a refusing follower puts the leader's address under.
pub const LEADER_METADATA: &str = "quiver-control-leader";

/// How long an operation may take before the scheduler gives up on it.
const CHANGE_PEERS_TIMEOUT: Duration = Duration::from_secs(120);
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(15);
/// An operation not yet seen done is sent to the leader again after this
/// (a chunkserver busy with another action on that copyset skips it; one
/// already under way ignores the repeat).
const RESEND_AFTER: Duration = Duration::from_secs(2);

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl From<ControlError> for Status {
    fn from(e: ControlError) -> Status {
        let message = e.to_string();
        match e {
            ControlError::NoSuchVolume(_) | ControlError::NoSuchPool(_) => {
                Status::not_found(message)
            }
            ControlError::VolumeExists(_) => Status::already_exists(message),
            ControlError::BadName { .. }
            | ControlError::BadSize { .. }
            | ControlError::BadRequest(_)
            | ControlError::SegmentOutOfRange { .. } => Status::invalid_argument(message),
            ControlError::VolumeBusy { .. }
            | ControlError::StaleEpoch { .. }
            | ControlError::NoCopysets(_)
            | ControlError::UnknownChunkserver(_)
            | ControlError::AddressTaken { .. } => Status::failed_precondition(message),
            ControlError::Corrupt { .. } => Status::internal(message),
        }
    }
}

fn store_status(e: StoreError) -> Status {
    match e {
        StoreError::NotLeader | StoreError::Unreachable(_) => Status::unavailable(e.to_string()),
        StoreError::Backend(_) => Status::internal(e.to_string()),
    }
}

/// An operation the scheduler started.
struct Pending {
    planned: Planned,
    started: Instant,
    sent: Option<Instant>,
}

/// What only the leader holds.
struct LeaderState {
    model: Model,
    since: Instant,
    /// Chunkserver → last heartbeat.
    seen: HashMap<u64, Instant>,
    /// Chunkserver → (capacity, used) bytes and the file system they are of.
    usage: HashMap<u64, (u64, u64, String)>,
    /// Copyset → (leader, term), as reported.
    leaders: HashMap<u32, (u64, u64)>,
    /// Chunkserver → copysets it reported hosting.
    hosted: HashMap<u64, HashSet<u32>>,
    /// Copyset → every member (voters and learners) its leader last reported.
    members: HashMap<u32, HashSet<u64>>,
    pending: HashMap<u32, Pending>,
    /// Copyset → when its leader was last sent garbage to delete.
    garbage_sent: HashMap<u32, Instant>,
}

impl LeaderState {
    fn new(model: Model) -> LeaderState {
        LeaderState {
            model,
            since: Instant::now(),
            seen: HashMap::new(),
            usage: HashMap::new(),
            leaders: HashMap::new(),
            hosted: HashMap::new(),
            members: HashMap::new(),
            pending: HashMap::new(),
            garbage_sent: HashMap::new(),
        }
    }

    fn online(&self, offline_after: Duration) -> HashSet<u64> {
        let now = Instant::now();
        self.model
            .chunkservers
            .keys()
            .copied()
            .filter(|id| {
                let last = self
                    .seen
                    .get(id)
                    .copied()
                    .unwrap_or(self.since)
                    .max(self.since);
                now.duration_since(last) < offline_after
            })
            .collect()
    }

    fn leader_map(&self) -> HashMap<u32, u64> {
        self.leaders.iter().map(|(c, (l, _))| (*c, *l)).collect()
    }

    fn peer(&self, id: u64) -> proto::Peer {
        proto::Peer {
            id,
            addr: self
                .model
                .chunkservers
                .get(&id)
                .map(|c| c.addr.clone())
                .unwrap_or_default(),
        }
    }
}

struct Inner<S> {
    store: S,
    config: ControlConfig,
    me: LeaderRecord,
    state: Mutex<Option<LeaderState>>,
}

/// A control node. Cheap to clone.
pub struct ControlNode<S>(Arc<Inner<S>>);

impl<S> Clone for ControlNode<S> {
    fn clone(&self) -> Self {
        ControlNode(self.0.clone())
    }
}

impl<S: MetaStore> ControlNode<S> {
    pub fn new(config: ControlConfig, store: S) -> ControlNode<S> {
        let me = LeaderRecord {
            name: config.name.clone(),
            addr: config.advertised(),
        };
        ControlNode(Arc::new(Inner {
            store,
            config,
            me,
            state: Mutex::new(None),
        }))
    }

    /// Serves gRPC on `listener` and leads whenever the store lets it, until
    /// `shutdown` completes; then resigns leadership.
    pub async fn run(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let token: Arc<str> = self.0.config.token()?.into();
        let service = ControlServer::with_interceptor(self.clone(), move |req: Request<()>| {
            check_token(&token, req)
        });
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mut server_stop = stop_rx.clone();
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = &self.0.config.tls {
            let read = |p: &std::path::Path| {
                std::fs::read(p).with_context(|| format!("reading {}", p.display()))
            };
            let identity =
                tonic::transport::Identity::from_pem(read(&tls.cert_file)?, read(&tls.key_file)?);
            builder = builder
                .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
                .context("TLS configuration")?;
        }
        let server = tokio::spawn(builder.add_service(service).serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            async move {
                let _ = server_stop.wait_for(|s| *s).await;
            },
        ));
        let leading = tokio::spawn(self.clone().lead_forever(stop_rx));
        shutdown.await;
        info!("control node {} stopping", self.0.me.name);
        let _ = stop_tx.send(true);
        let _ = leading.await;
        if let Err(e) = self.0.store.resign().await {
            warn!("resigning leadership: {e}");
        }
        server.await?.context("gRPC server")?;
        Ok(())
    }

    async fn lead_forever(self, mut stop: tokio::sync::watch::Receiver<bool>) {
        loop {
            tokio::select! {
                won = self.0.store.campaign() => {
                    if let Err(e) = won {
                        warn!("campaign for control leadership: {e}");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                }
                _ = async { stop.wait_for(|s| *s).await.map(|_| ()) } => return,
            }
            match self
                .0
                .store
                .load("")
                .await
                .map_err(anyhow::Error::from)
                .and_then(|entries| Model::from_entries(&entries).map_err(anyhow::Error::from))
            {
                Ok(model) => {
                    info!(
                        "control node {} leads ({} store): {} chunkservers, {} copysets, {} volumes",
                        self.0.me.name,
                        self.0.store.kind(),
                        model.chunkservers.len(),
                        model.copysets.len(),
                        model.volumes.len()
                    );
                    *self.0.state.lock().await = Some(LeaderState::new(model));
                }
                Err(e) => {
                    warn!("loading the metadata: {e:#}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            }
            let mut leadership = self.0.store.leadership();
            let mut tick = tokio::time::interval(Duration::from_millis(
                self.0.config.cluster.schedule_interval_ms.max(10),
            ));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => self.schedule().await,
                    _ = async { leadership.wait_for(|l| !*l).await.map(|_| ()) } => {
                        warn!("control node {} lost leadership", self.0.me.name);
                        break;
                    }
                    _ = async { stop.wait_for(|s| *s).await.map(|_| ()) } => {
                        *self.0.state.lock().await = None;
                        return;
                    }
                }
            }
            *self.0.state.lock().await = None;
        }
    }

    /// Refuses a request on a node that does not lead, naming the leader.
    async fn not_leader(&self) -> Status {
        match self.0.store.leader().await {
            Ok(Some(l)) if l.name != self.0.me.name => {
                let mut s = Status::unavailable(format!(
                    "control node {} is not the leader; {} at {} is",
                    self.0.me.name, l.name, l.addr
                ));
                if let Ok(v) = l.addr.parse() {
                    s.metadata_mut().insert(LEADER_METADATA, v);
                }
                s
            }
            _ => Status::unavailable(format!(
                "control node {} is not the leader, and no leader is known yet",
                self.0.me.name
            )),
        }
    }

    /// Runs `f` on the leader's state; on a node that does not lead,
    /// refuses with the leader's address.
    async fn with_state<T>(
        &self,
        f: impl FnOnce(&mut LeaderState) -> Result<T, Status>,
    ) -> Result<T, Status> {
        let mut guard = self.0.state.lock().await;
        match guard.as_mut() {
            Some(state) => f(state),
            None => {
                drop(guard);
                Err(self.not_leader().await)
            }
        }
    }

    /// Computes changes from the model, stores them, then applies them to
    /// the model: all under the state lock, so changes are serialized.
    async fn change<T>(
        &self,
        f: impl FnOnce(&LeaderState) -> Result<(Batch, T), ControlError>,
    ) -> Result<T, Status> {
        let mut guard = self.0.state.lock().await;
        let Some(state) = guard.as_mut() else {
            drop(guard);
            return Err(self.not_leader().await);
        };
        let (batch, out) = f(state)?;
        self.commit(&mut guard, batch).await?;
        Ok(out)
    }

    async fn commit(
        &self,
        guard: &mut tokio::sync::MutexGuard<'_, Option<LeaderState>>,
        batch: Batch,
    ) -> Result<(), Status> {
        if batch.is_empty() {
            return Ok(());
        }
        match self.0.store.apply(batch.clone()).await {
            Ok(()) => {
                if let Some(state) = guard.as_mut() {
                    state.model.apply(&batch)?;
                }
                Ok(())
            }
            Err(e) => {
                if matches!(e, StoreError::NotLeader) {
                    warn!("the store refused a write: this node no longer leads");
                    **guard = None;
                }
                Err(store_status(e))
            }
        }
    }

    fn volume_proto(&self, v: &VolumeRecord, model: &Model) -> proto::Volume {
        let now = unix_ms();
        let live = v.live_writer(now);
        proto::Volume {
            id: v.id,
            name: v.name.clone(),
            size: v.size,
            owner: v.owner.clone(),
            pool: v.pool.clone(),
            segment_size: v.segment_size,
            chunk_size: crate::meta::CHUNK_BYTES,
            created_unix_ms: v.created_unix_ms,
            epoch: v.epoch,
            writer: live.map(|w| w.client.clone()).unwrap_or_default(),
            lease_ms_left: live.map_or(0, |w| w.until_unix_ms - now),
            segments_allocated: model.segments.keys().filter(|(id, _)| *id == v.id).count() as u64,
            deleted_unix_ms: v.deleted_unix_ms.unwrap_or(0),
        }
    }

    /// A volume as an RPC answers it, after a change.
    async fn volume_reply(&self, v: &VolumeRecord) -> Reply<proto::Volume> {
        self.with_state(|s| Ok(Response::new(self.volume_proto(v, &s.model))))
            .await
    }

    fn pool(&self, name: &str) -> Result<String, ControlError> {
        let pools = &self.0.config.pools;
        if name.is_empty() {
            return Ok(pools[0].name.clone());
        }
        pools
            .iter()
            .find(|p| p.name == name)
            .map(|p| p.name.clone())
            .ok_or_else(|| ControlError::NoSuchPool(name.to_owned()))
    }

    fn physical_pools(&self) -> HashMap<String, String> {
        self.0
            .config
            .pools
            .iter()
            .map(|p| (p.name.clone(), p.physical_pool.clone()))
            .collect()
    }

    /// One scheduler round: place missing copysets, retire finished or
    /// stuck operations, start new ones.
    async fn schedule(&self) {
        let mut guard = self.0.state.lock().await;
        let Some(state) = guard.as_mut() else { return };
        let cluster = &self.0.config.cluster;
        let offline_after = Duration::from_millis(cluster.offline_after_ms);
        let online = state.online(offline_after);

        // Copysets of pools not yet placed.
        let mut placement = Changes::default();
        let mut counters = state.model.counters.clone();
        for pool in &self.0.config.pools {
            let have = state.model.pool_copysets(&pool.name).len() as u32;
            if have >= pool.copysets {
                continue;
            }
            let candidates: Vec<Candidate> = state
                .model
                .chunkservers
                .values()
                .filter(|c| c.pool == pool.physical_pool && online.contains(&c.id))
                .map(|c| Candidate {
                    id: c.id,
                    zone: c.zone.clone(),
                })
                .collect();
            if candidates.len() < pool.min_chunkservers.max(3) {
                continue;
            }
            let load = state.model.copysets_per_chunkserver();
            let placed = match place_copysets((pool.copysets - have) as usize, &candidates, &load) {
                Ok(p) => p,
                Err(e) => {
                    warn!("pool {}: {e}", pool.name);
                    continue;
                }
            };
            for peers in placed {
                counters.next_copyset += 1;
                placement.copyset(&CopysetRecord {
                    id: counters.next_copyset,
                    pool: pool.name.clone(),
                    peers,
                    epoch: 0,
                });
            }
            info!(
                "pool {}: placed {} copysets over {} chunkservers",
                pool.name,
                pool.copysets - have,
                candidates.len()
            );
        }
        if !placement.0.is_empty() {
            placement.counters(&counters);
            // Placement is a handful of records per copyset: store in
            // batches etcd accepts (128 operations per transaction).
            let batch = placement.into_batch();
            let counters_put = batch.puts.last().cloned();
            let copysets = &batch.puts[..batch.puts.len() - 1];
            for part in copysets.chunks(100) {
                let mut b = Batch {
                    puts: part.to_vec(),
                    deletes: Vec::new(),
                };
                b.puts.extend(counters_put.clone());
                if let Err(e) = self.commit(&mut guard, b).await {
                    warn!("storing copyset placement: {}", e.message());
                    return;
                }
            }
        }
        // One step of purging the recycle bin per round.
        let Some(state) = guard.as_ref() else { return };
        let retention_ms = cluster.recycle_retention_s.saturating_mul(1000);
        if let Some((batch, what)) = state.model.purge_step(unix_ms(), retention_ms) {
            match self.commit(&mut guard, batch).await {
                Ok(()) => info!("recycle bin: {what}"),
                Err(e) => warn!("recycle bin: {what}: {}", e.message()),
            }
        }
        let Some(state) = guard.as_mut() else { return };

        // Retire operations that are done, or taking too long.
        let leaders = state.leader_map();
        let model = &state.model;
        state.pending.retain(|copyset, p| {
            let record = model.copysets.get(copyset);
            let (done, timeout, target) = match p.planned.operation {
                Operation::ChangePeers { add, remove, .. } => (
                    record.is_some_and(|r| r.peers.contains(&add) && !r.peers.contains(&remove)),
                    CHANGE_PEERS_TIMEOUT,
                    add,
                ),
                Operation::TransferLeader { to, .. } => {
                    (leaders.get(copyset) == Some(&to), TRANSFER_TIMEOUT, to)
                }
            };
            let target_lost = !online.contains(&target);
            if done {
                info!("scheduler: done: copyset {copyset}: {}", p.planned.reason);
            } else if target_lost {
                warn!(
                    "scheduler: gave up, chunkserver {target} went offline: copyset {copyset}: {}",
                    p.planned.reason
                );
            } else if p.started.elapsed() > timeout {
                warn!(
                    "scheduler: gave up after {:?}: copyset {copyset}: {}",
                    timeout, p.planned.reason
                );
            }
            !done && !target_lost && p.started.elapsed() <= timeout
        });

        // Start new operations. Nothing moves during the first offline
        // period after winning leadership: liveness is unknown until then.
        if state.since.elapsed() < offline_after.min(Duration::from_secs(30)) {
            return;
        }
        let busy: HashSet<u32> = state.pending.keys().copied().collect();
        let physical = self.physical_pools();
        let view = View {
            model: &state.model,
            online: &online,
            leaders: &leaders,
            busy: &busy,
            physical: &physical,
        };
        for planned in scheduler::plan(&view, cluster.max_ops_per_tick) {
            info!(
                "scheduler: start: copyset {}: {:?}: {}",
                planned.operation.copyset(),
                planned.operation,
                planned.reason
            );
            state.pending.insert(
                planned.operation.copyset(),
                Pending {
                    planned,
                    started: Instant::now(),
                    sent: None,
                },
            );
        }
    }

    fn cluster_status(&self, state: &LeaderState) -> proto::ClusterStatus {
        let offline_after = Duration::from_millis(self.0.config.cluster.offline_after_ms);
        let online = state.online(offline_after);
        let leaders = state.leader_map();
        let busy = HashSet::new();
        let physical = self.physical_pools();
        let view = View {
            model: &state.model,
            online: &online,
            leaders: &leaders,
            busy: &busy,
            physical: &physical,
        };
        let mut counts = [0u32; 3];
        let mut creating = 0;
        for c in state.model.copysets.values() {
            if c.epoch == 0 {
                creating += 1;
            }
            counts[match view.health(c.id) {
                Health::Healthy => 0,
                Health::Degraded => 1,
                Health::Unavailable => 2,
            }] += 1;
        }
        let load = state.model.copysets_per_chunkserver();
        let mut led: HashMap<u64, u32> = HashMap::new();
        for l in leaders.values() {
            *led.entry(*l).or_default() += 1;
        }
        let chunkservers: Vec<proto::ChunkserverInfo> = state
            .model
            .chunkservers
            .values()
            .map(|c| {
                let (capacity, used) = state
                    .usage
                    .get(&c.id)
                    .map_or((c.capacity_bytes, 0), |(c, u, _)| (*c, *u));
                proto::ChunkserverInfo {
                    id: c.id,
                    addr: c.addr.clone(),
                    zone: c.zone.clone(),
                    server: c.server.clone(),
                    pool: c.pool.clone(),
                    online: online.contains(&c.id),
                    capacity_bytes: capacity,
                    used_bytes: used,
                    copysets: load.get(&c.id).copied().unwrap_or(0) as u32,
                    leaders: led.get(&c.id).copied().unwrap_or(0),
                    last_seen_ms: state
                        .seen
                        .get(&c.id)
                        .map_or(u64::MAX, |t| t.elapsed().as_millis() as u64),
                }
            })
            .collect();
        let mut notes = Vec::new();
        for c in &chunkservers {
            if !c.online {
                notes.push(if c.copysets > 0 {
                    format!(
                        "chunkserver {} ({}) is offline, holding {} copysets",
                        c.id, c.addr, c.copysets
                    )
                } else {
                    format!(
                        "chunkserver {} ({}) is offline and holds no copysets",
                        c.id, c.addr
                    )
                });
            }
        }
        if creating > 0 {
            notes.push(format!("{creating} copysets are being created"));
        }
        let placed: u32 = self.0.config.pools.iter().map(|p| p.copysets).sum();
        if (state.model.copysets.len() as u32) < placed {
            notes.push(format!(
                "{} of {placed} copysets placed: waiting for chunkservers in three zones",
                state.model.copysets.len()
            ));
        }
        if counts[1] > 0 {
            notes.push(format!("{} copysets degraded", counts[1]));
        }
        if counts[2] > 0 {
            notes.push(format!("{} copysets unavailable", counts[2]));
        }
        let health = if counts[2] > 0 {
            "HEALTH_ERR"
        } else if counts[1] > 0
            || creating > 0
            || chunkservers.iter().any(|c| !c.online && c.copysets > 0)
            || (state.model.copysets.len() as u32) < placed
        {
            "HEALTH_WARN"
        } else {
            "HEALTH_OK"
        };
        let allocated: u64 = state
            .model
            .segments
            .keys()
            .filter_map(|(v, _)| {
                state
                    .model
                    .volumes
                    .values()
                    .chain(state.model.recycled.values())
                    .find(|r| r.id == *v)
                    .map(|r| r.segment_size)
            })
            .sum();
        // Capacity by file system: chunkservers sharing a disk count it once.
        let mut disks: HashMap<String, (u64, u64)> = HashMap::new();
        for c in chunkservers.iter().filter(|c| c.online) {
            let key = state
                .usage
                .get(&c.id)
                .map(|(_, _, fs)| fs.clone())
                .filter(|fs| !fs.is_empty())
                .unwrap_or_else(|| format!("chunkserver {}", c.id));
            disks.insert(key, (c.capacity_bytes, c.used_bytes));
        }
        proto::ClusterStatus {
            health: health.into(),
            notes,
            leader_name: self.0.me.name.clone(),
            leader_addr: self.0.me.addr.clone(),
            store: self.0.store.kind().into(),
            capacity_bytes: disks.values().map(|(c, _)| c).sum(),
            used_bytes: disks.values().map(|(_, u)| u).sum(),
            chunkservers,
            copysets_healthy: counts[0],
            copysets_degraded: counts[1],
            copysets_unavailable: counts[2],
            volumes: state.model.volumes.len() as u32,
            allocated_bytes: allocated,
            garbage_chunks: state.model.garbage.values().map(|s| s.len() as u64).sum(),
            operations: state
                .pending
                .iter()
                .map(|(c, p)| format!("copyset {c}: {}", p.planned.reason))
                .collect(),
        }
    }
}

fn check_token(expected: &str, req: Request<()>) -> Result<Request<()>, Status> {
    let Some(value) = req.metadata().get("authorization") else {
        return Err(Status::unauthenticated(
            "no token: pass the cluster's token (--token or QUIVER_TOKEN)",
        ));
    };
    let given = value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    // Compare every byte, so timing does not tell how much matched.
    let same = given.len() == expected.len()
        && given
            .bytes()
            .zip(expected.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
    if same {
        Ok(req)
    } else {
        Err(Status::unauthenticated("wrong token"))
    }
}

type Reply<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl<S: MetaStore> proto::control_server::Control for ControlNode<S> {
    async fn register(
        &self,
        req: Request<proto::RegisterRequest>,
    ) -> Reply<proto::RegisterResponse> {
        let r = req.into_inner();
        if r.chunkserver == 0 || r.addr.parse::<SocketAddr>().is_err() || r.zone.is_empty() {
            return Err(ControlError::BadRequest(
                "a chunkserver registers with a nonzero id, a socket address and a zone".into(),
            )
            .into());
        }
        let record = ChunkserverRecord {
            id: r.chunkserver,
            addr: r.addr,
            zone: r.zone,
            server: r.server,
            pool: if r.pool.is_empty() {
                "default".into()
            } else {
                r.pool
            },
            capacity_bytes: r.capacity_bytes,
        };
        let id = record.id;
        let changed = self
            .change(|state| {
                if let Some(old) = state.model.chunkservers.get(&id) {
                    if old.addr != record.addr {
                        // Another live process may own that id.
                        let last = state.seen.get(&id).copied();
                        let offline = Duration::from_millis(self.0.config.cluster.offline_after_ms);
                        if last.is_some_and(|t| t.elapsed() < offline) {
                            return Err(ControlError::AddressTaken {
                                id,
                                registered: old.addr.clone(),
                                claimed: record.addr.clone(),
                            });
                        }
                    }
                    if *old == record {
                        return Ok((Batch::default(), false));
                    }
                }
                let mut c = Changes::default();
                c.chunkserver(&record);
                Ok((c.into_batch(), true))
            })
            .await?;
        self.with_state(|state| {
            state.seen.insert(id, Instant::now());
            Ok(())
        })
        .await?;
        if changed {
            info!("chunkserver {id} registered: {:?}", record);
        }
        Ok(Response::new(proto::RegisterResponse {}))
    }

    async fn heartbeat(
        &self,
        req: Request<proto::HeartbeatRequest>,
    ) -> Reply<proto::HeartbeatResponse> {
        let hb = req.into_inner();
        let cs = hb.chunkserver;
        let mut guard = self.0.state.lock().await;
        let Some(state) = guard.as_mut() else {
            drop(guard);
            return Err(self.not_leader().await);
        };
        match state.model.chunkservers.get(&cs) {
            Some(r) if r.addr == hb.addr => {}
            _ => return Err(ControlError::UnknownChunkserver(cs).into()),
        }
        let now = Instant::now();
        state.seen.insert(cs, now);
        state.usage.insert(
            cs,
            (hb.capacity_bytes, hb.used_bytes, hb.filesystem.clone()),
        );
        state
            .hosted
            .insert(cs, hb.copysets.iter().map(|r| r.copyset).collect());

        // Learn leaders and memberships: a leader's own report is the
        // truth about its copyset's membership.
        let mut changes = Changes::default();
        for r in &hb.copysets {
            if r.leader != 0 {
                let known = state.leaders.get(&r.copyset).copied();
                if known.is_none_or(|(_, term)| r.term >= term) {
                    state.leaders.insert(r.copyset, (r.leader, r.term));
                }
            }
            if r.leader != cs || r.epoch == 0 {
                continue;
            }
            state.members.insert(
                r.copyset,
                r.voters.iter().chain(&r.learners).copied().collect(),
            );
            if let Some(record) = state.model.copysets.get(&r.copyset) {
                let mut voters = r.voters.clone();
                voters.sort_unstable();
                if r.epoch > record.epoch || (record.epoch == 0 && voters == record.peers) {
                    if voters != record.peers {
                        info!(
                            "copyset {}: members {:?} -> {:?} (epoch {})",
                            r.copyset, record.peers, voters, r.epoch
                        );
                    }
                    changes.copyset(&CopysetRecord {
                        peers: voters,
                        epoch: r.epoch,
                        ..record.clone()
                    });
                }
            }
        }
        // Garbage the chunkserver deleted.
        for loc in &hb.deleted {
            changes.remove_garbage(loc.copyset, loc.chunk);
        }
        let mut batch = changes.into_batch();
        if !batch.deletes.is_empty() {
            for part in batch.deletes.chunks(100) {
                self.commit(
                    &mut guard,
                    Batch {
                        puts: Vec::new(),
                        deletes: part.to_vec(),
                    },
                )
                .await?;
            }
            batch.deletes.clear();
        }
        if !batch.is_empty() {
            // etcd's 128 operations per transaction.
            for part in batch.puts.chunks(100) {
                self.commit(
                    &mut guard,
                    Batch {
                        puts: part.to_vec(),
                        deletes: Vec::new(),
                    },
                )
                .await?;
            }
        }
        let Some(state) = guard.as_mut() else {
            drop(guard);
            return Err(self.not_leader().await);
        };

        // What this chunkserver should do.
        let hosted = state.hosted.get(&cs).cloned().unwrap_or_default();
        let mut actions = Vec::new();
        for c in state.model.copysets.values() {
            if c.epoch == 0 && c.peers.contains(&cs) && !hosted.contains(&c.id) {
                actions.push(proto::Action {
                    kind: Some(proto::action::Kind::Create(proto::CreateCopyset {
                        copyset: c.id,
                        peers: c.peers.iter().map(|p| state.peer(*p)).collect(),
                    })),
                });
            }
        }
        // Copysets this server still hosts though it left them: a member
        // being added is a learner in its leader's report (or an operation
        // of ours is adding it), so it is never removed while catching up.
        for r in &hb.copysets {
            let Some(record) = state.model.copysets.get(&r.copyset) else {
                continue;
            };
            let adding = state.pending.get(&r.copyset).is_some_and(
                |p| matches!(p.planned.operation, Operation::ChangePeers { add, .. } if add == cs),
            );
            let left = record.epoch > 0
                && r.epoch <= record.epoch
                && !record.peers.contains(&cs)
                && state
                    .members
                    .get(&r.copyset)
                    .is_some_and(|m| !m.contains(&cs));
            if left && !adding {
                info!(
                    "chunkserver {cs}: copyset {} left it: removing its replica",
                    r.copyset
                );
                actions.push(proto::Action {
                    kind: Some(proto::action::Kind::Remove(proto::RemoveCopyset {
                        copyset: r.copyset,
                    })),
                });
            }
        }
        let leaders = state.leader_map();
        // Garbage of copysets this server leads.
        for (copyset, chunks) in &state.model.garbage {
            let sent = state.garbage_sent.get(copyset);
            if leaders.get(copyset) == Some(&cs) && sent.is_none_or(|t| t.elapsed() >= RESEND_AFTER)
            {
                actions.push(proto::Action {
                    kind: Some(proto::action::Kind::DeleteChunks(proto::DeleteChunks {
                        copyset: *copyset,
                        chunks: chunks.iter().take(256).copied().collect(),
                    })),
                });
                state.garbage_sent.insert(*copyset, now);
            }
        }
        let mut to_send = Vec::new();
        for (copyset, p) in &state.pending {
            if leaders.get(copyset) != Some(&cs)
                || p.sent.is_some_and(|t| t.elapsed() < RESEND_AFTER)
            {
                continue;
            }
            to_send.push(*copyset);
        }
        for copyset in to_send {
            let p = state.pending.get(&copyset).expect("listed above");
            let kind = match p.planned.operation {
                Operation::ChangePeers {
                    copyset,
                    add,
                    remove,
                } => proto::action::Kind::Change(proto::ChangePeers {
                    copyset,
                    add: Some(state.peer(add)),
                    remove,
                }),
                Operation::TransferLeader { copyset, to, .. } => {
                    proto::action::Kind::Transfer(proto::TransferLeader { copyset, to })
                }
            };
            actions.push(proto::Action { kind: Some(kind) });
            if let Some(p) = state.pending.get_mut(&copyset) {
                p.sent = Some(now);
            }
        }
        Ok(Response::new(proto::HeartbeatResponse { actions }))
    }

    async fn create_volume(
        &self,
        req: Request<proto::CreateVolumeRequest>,
    ) -> Reply<proto::Volume> {
        let r = req.into_inner();
        let pool = self.pool(&r.pool)?;
        let segment = self.0.config.cluster.segment_bytes;
        let volume = self
            .change(|s| {
                s.model
                    .create_volume(&r.name, r.size, &r.owner, &pool, segment, unix_ms())
            })
            .await?;
        info!(
            "volume {} created: {} bytes, owner {:?}",
            volume.name, volume.size, volume.owner
        );
        self.volume_reply(&volume).await
    }

    async fn stat_volume(&self, req: Request<proto::VolumeRef>) -> Reply<proto::Volume> {
        let name = req.into_inner().name;
        self.with_state(|s| {
            let v = s.model.volume(&name)?;
            Ok(Response::new(self.volume_proto(v, &s.model)))
        })
        .await
    }

    async fn list_volumes(
        &self,
        req: Request<proto::ListVolumesRequest>,
    ) -> Reply<proto::ListVolumesResponse> {
        let recycled = req.into_inner().recycled;
        self.with_state(|s| {
            let mut volumes: Vec<proto::Volume> = s
                .model
                .volumes
                .values()
                .map(|v| self.volume_proto(v, &s.model))
                .collect();
            if recycled {
                volumes.extend(
                    s.model
                        .recycled
                        .values()
                        .map(|v| self.volume_proto(v, &s.model)),
                );
            }
            Ok(Response::new(proto::ListVolumesResponse { volumes }))
        })
        .await
    }

    async fn extend_volume(
        &self,
        req: Request<proto::ExtendVolumeRequest>,
    ) -> Reply<proto::Volume> {
        let r = req.into_inner();
        let v = self
            .change(|s| s.model.extend_volume(&r.name, r.new_size))
            .await?;
        info!("volume {} extended to {} bytes", v.name, v.size);
        self.volume_reply(&v).await
    }

    async fn rename_volume(
        &self,
        req: Request<proto::RenameVolumeRequest>,
    ) -> Reply<proto::Volume> {
        let r = req.into_inner();
        let v = self
            .change(|s| s.model.rename_volume(&r.name, &r.new_name))
            .await?;
        info!("volume {} renamed to {}", r.name, v.name);
        self.volume_reply(&v).await
    }

    async fn delete_volume(&self, req: Request<proto::VolumeRef>) -> Reply<proto::Volume> {
        let name = req.into_inner().name;
        let v = self
            .change(|s| s.model.delete_volume(&name, unix_ms()))
            .await?;
        info!("volume {name} moved to the recycle bin");
        self.volume_reply(&v).await
    }

    async fn open_volume(
        &self,
        req: Request<proto::OpenVolumeRequest>,
    ) -> Reply<proto::OpenVolumeResponse> {
        let r = req.into_inner();
        let lease_ms = self.0.config.cluster.write_lease_ms;
        if !r.write {
            return self
                .with_state(|s| {
                    let v = s.model.volume(&r.name)?;
                    Ok(Response::new(proto::OpenVolumeResponse {
                        volume: Some(self.volume_proto(v, &s.model)),
                        epoch: 0,
                        lease_ms: 0,
                    }))
                })
                .await;
        }
        let client = if r.client.is_empty() {
            "unnamed".to_owned()
        } else {
            r.client
        };
        let v = self
            .change(|s| {
                s.model
                    .open_for_write(&r.name, &client, r.force, unix_ms(), lease_ms)
            })
            .await?;
        info!(
            "volume {} opened for writing by {client:?}: epoch {}",
            v.name, v.epoch
        );
        self.with_state(|s| {
            Ok(Response::new(proto::OpenVolumeResponse {
                volume: Some(self.volume_proto(&v, &s.model)),
                epoch: v.epoch,
                lease_ms,
            }))
        })
        .await
    }

    async fn refresh_lease(
        &self,
        req: Request<proto::LeaseRequest>,
    ) -> Reply<proto::OpenVolumeResponse> {
        let r = req.into_inner();
        let lease_ms = self.0.config.cluster.write_lease_ms;
        let v = self
            .change(|s| s.model.refresh_lease(&r.name, r.epoch, unix_ms(), lease_ms))
            .await?;
        self.with_state(|s| {
            Ok(Response::new(proto::OpenVolumeResponse {
                volume: Some(self.volume_proto(&v, &s.model)),
                epoch: v.epoch,
                lease_ms,
            }))
        })
        .await
    }

    async fn close_volume(&self, req: Request<proto::LeaseRequest>) -> Reply<proto::Empty> {
        let r = req.into_inner();
        self.change(|s| Ok((s.model.close_volume(&r.name, r.epoch)?, ())))
            .await?;
        info!("volume {} closed by its writer (epoch {})", r.name, r.epoch);
        Ok(Response::new(proto::Empty {}))
    }

    async fn get_segment(&self, req: Request<proto::GetSegmentRequest>) -> Reply<proto::Segment> {
        let r = req.into_inner();
        let found = self
            .with_state(|s| {
                let v = s.model.volume(&r.volume)?;
                if r.index >= v.segments() {
                    return Err(ControlError::SegmentOutOfRange {
                        name: r.volume.clone(),
                        index: r.index,
                    }
                    .into());
                }
                Ok(s.model.segments.get(&(v.id, r.index)).cloned())
            })
            .await?;
        let segment = match found {
            Some(seg) => Some(seg),
            None if r.allocate => Some(
                self.change(|s| {
                    let v = s.model.check_epoch(&r.volume, r.epoch)?;
                    // Another request may have allocated it meanwhile.
                    if let Some(seg) = s.model.segments.get(&(v.id, r.index)) {
                        return Ok((Batch::default(), seg.clone()));
                    }
                    s.model.allocate_segment(v, r.index)
                })
                .await?,
            ),
            None => None,
        };
        Ok(Response::new(proto::Segment {
            index: r.index,
            allocated: segment.is_some(),
            chunks: segment
                .map(|s| {
                    s.chunks
                        .iter()
                        .map(|(copyset, chunk)| proto::ChunkLocation {
                            copyset: *copyset,
                            chunk: *chunk,
                        })
                        .collect()
                })
                .unwrap_or_default(),
        }))
    }

    async fn get_copysets(
        &self,
        req: Request<proto::GetCopysetsRequest>,
    ) -> Reply<proto::GetCopysetsResponse> {
        let wanted = req.into_inner().copysets;
        let offline_after = Duration::from_millis(self.0.config.cluster.offline_after_ms);
        let physical = self.physical_pools();
        self.with_state(|s| {
            let online = s.online(offline_after);
            let leaders = s.leader_map();
            let busy = HashSet::new();
            let view = View {
                model: &s.model,
                online: &online,
                leaders: &leaders,
                busy: &busy,
                physical: &physical,
            };
            let copysets = s
                .model
                .copysets
                .values()
                .filter(|c| wanted.is_empty() || wanted.contains(&c.id))
                .map(|c| proto::CopysetInfo {
                    id: c.id,
                    pool: c.pool.clone(),
                    peers: c.peers.iter().map(|p| s.peer(*p)).collect(),
                    leader: leaders.get(&c.id).copied().unwrap_or(0),
                    health: view.health(c.id).as_str().into(),
                })
                .collect();
            Ok(Response::new(proto::GetCopysetsResponse { copysets }))
        })
        .await
    }

    async fn status(&self, _req: Request<proto::Empty>) -> Reply<proto::ClusterStatus> {
        self.with_state(|s| Ok(Response::new(self.cluster_status(s))))
            .await
    }
}
