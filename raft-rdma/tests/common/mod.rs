//! A state machine for tests of the Raft layer: it records the requests it
//! applied, in memory (the chunk-store state machine is the real one).

#![allow(dead_code)] // each test file uses a different part

use std::io::Cursor;
use std::sync::{Arc, Mutex};

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    Entry, EntryPayload, LogId, RaftSnapshotBuilder, SnapshotMeta, StorageError, StoredMembership,
};
use quiver_raft::store::{DurableMark, Response, TypeConfig};

#[derive(Default)]
struct State {
    last_applied: Option<LogId<u64>>,
    membership: StoredMembership<u64, openraft::BasicNode>,
    applied: Vec<Vec<u8>>,
    snapshot: Option<(SnapshotMeta<u64, openraft::BasicNode>, Vec<u8>)>,
}

#[derive(Clone, Default)]
pub struct RecordingMachine {
    state: Arc<Mutex<State>>,
    /// Applies an entry only once the log holds it durably (as the chunk
    /// machine does), when set.
    log_durable: Option<DurableMark>,
}

impl RaftSnapshotBuilder<TypeConfig> for RecordingMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<u64>> {
        let mut s = self.state.lock().unwrap();
        let data = serde_json::to_vec(&s.applied).unwrap();
        let meta = SnapshotMeta {
            last_log_id: s.last_applied,
            last_membership: s.membership.clone(),
            snapshot_id: format!("{:?}", s.last_applied.map(|l| l.index)),
        };
        s.snapshot = Some((meta.clone(), data.clone()));
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for RecordingMachine {
    type SnapshotBuilder = RecordingMachine;

    async fn applied_state(
        &mut self,
    ) -> Result<
        (
            Option<LogId<u64>>,
            StoredMembership<u64, openraft::BasicNode>,
        ),
        StorageError<u64>,
    > {
        let s = self.state.lock().unwrap();
        Ok((s.last_applied, s.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError<u64>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + openraft::OptionalSend,
        I::IntoIter: openraft::OptionalSend,
    {
        let entries: Vec<_> = entries.into_iter().collect();
        if let (Some(mark), Some(last)) = (&self.log_durable, entries.last()) {
            mark.wait_for(last.log_id.index).await?;
        }
        let mut s = self.state.lock().unwrap();
        let mut out = Vec::new();
        for entry in entries {
            s.last_applied = Some(entry.log_id);
            match entry.payload {
                EntryPayload::Blank => {}
                EntryPayload::Normal(request) => s.applied.push(request.body.to_vec()),
                EntryPayload::Membership(m) => {
                    s.membership = StoredMembership::new(Some(entry.log_id), m);
                }
            }
            out.push(Response::default());
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<Cursor<Vec<u8>>>, StorageError<u64>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, openraft::BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<u64>> {
        let data = snapshot.into_inner();
        let mut s = self.state.lock().unwrap();
        s.applied = serde_json::from_slice(&data).unwrap();
        s.last_applied = meta.last_log_id;
        s.membership = meta.last_membership.clone();
        s.snapshot = Some((meta.clone(), data));
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<u64>> {
        let s = self.state.lock().unwrap();
        Ok(s.snapshot.clone().map(|(meta, data)| Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        }))
    }
}

impl RecordingMachine {
    /// A machine that applies only what `mark` says is durable.
    pub fn gated(mark: DurableMark) -> RecordingMachine {
        RecordingMachine {
            state: Arc::default(),
            log_durable: Some(mark),
        }
    }

    /// The requests applied so far, in order.
    pub fn applied(&self) -> Vec<Vec<u8>> {
        self.state.lock().unwrap().applied.clone()
    }
}

/// The fabric on TCP, for a test's clients.
pub fn tcp_worker_config() -> quiver_fabric::WorkerConfig {
    quiver_fabric::WorkerConfig {
        transport: quiver_fabric::TransportChoice::Tcp,
        ..Default::default()
    }
}

/// Three chunkservers in this process on loopback TCP, small and quick to
/// start, with their addresses.
pub async fn three_chunkservers(
    root: &std::path::Path,
) -> (
    Vec<quiver_raft::chunkserver::Chunkserver>,
    Vec<std::net::SocketAddr>,
) {
    use quiver_raft::chunkserver::{Chunkserver, ChunkserverConfig, RaftTuning};
    let mut servers = Vec::new();
    for node in 1..=3u64 {
        let mut config = ChunkserverConfig::new(
            node,
            "127.0.0.1:0".parse().unwrap(),
            root.join(format!("n{node}")),
        );
        config.transport = "tcp".into();
        config.pool_files = 8;
        config.log_segment_mib = 16;
        config.arena_mib = 16;
        config.device_flush = false;
        config.raft = RaftTuning {
            election_timeout_min_ms: 1000,
            election_timeout_max_ms: 2000,
            ..RaftTuning::default()
        };
        servers.push(Chunkserver::start(config).await.unwrap());
    }
    let addrs = servers.iter().map(|s| s.addr()).collect();
    (servers, addrs)
}

/// Creates copyset `id` with `addrs` as its members, nodes 1, 2, ... in order.
pub async fn create_copyset(
    client: &quiver_raft::chunk_client::ChunkClient,
    id: u32,
    addrs: &[std::net::SocketAddr],
) {
    let peers: std::collections::BTreeMap<u64, String> = addrs
        .iter()
        .enumerate()
        .map(|(i, a)| (i as u64 + 1, a.to_string()))
        .collect();
    client.create_copyset(id, &peers).await.unwrap();
}
