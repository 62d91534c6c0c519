//! A hundred copysets (Raft groups) on three nodes in one process: each node
//! has one log engine and one fabric worker shared by all its groups, as a
//! chunkserver will. Every group elects a leader, and once they have, the
//! whole process stays cheap at rest (heartbeats only).

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::RecordingMachine;
use openraft::{BasicNode, Config, Raft};
use quiver_fabric::WorkerConfig;
use quiver_raft::log::{LogConfig, LogEngine};
use quiver_raft::net::{serve_raft, FabricNode, Groups, Network};
use quiver_raft::store::{LogStore, TypeConfig};

const GROUPS: u64 = 100;
const NODES: u64 = 3;

fn process_cpu() -> Duration {
    // SAFETY: rusage is plain integers; all zeros is a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid out-pointer.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

struct Node {
    id: u64,
    fabric: Arc<FabricNode>,
    groups: Groups,
    _dir: tempfile::TempDir,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_copysets_elect_leaders_and_idle_cheaply() {
    let config = Arc::new(
        Config {
            heartbeat_interval: 500,
            election_timeout_min: 1500,
            election_timeout_max: 3000,
            ..Config::default()
        }
        .validate()
        .unwrap(),
    );
    let mut nodes = Vec::new();
    for id in 1..=NODES {
        let dir = tempfile::tempdir().unwrap();
        let engine = Arc::new(
            LogEngine::open(LogConfig {
                segment_bytes: 4 << 20,
                ..LogConfig::new(dir.path())
            })
            .unwrap(),
        );
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let fabric = Arc::new(
            FabricNode::start("127.0.0.1:0".parse().unwrap(), WorkerConfig::default(), tx).unwrap(),
        );
        let groups = Groups::default();
        for group in 1..=GROUPS {
            let raft = Raft::new(
                id,
                Arc::clone(&config),
                Network::new(Arc::clone(&fabric), group),
                LogStore::new(Arc::clone(&engine), group),
                RecordingMachine::default(),
            )
            .await
            .unwrap();
            groups.write().unwrap().insert(group, raft);
        }
        tokio::spawn(serve_raft(id, groups.clone(), rx));
        nodes.push(Node {
            id,
            fabric,
            groups,
            _dir: dir,
        });
    }
    let members: BTreeMap<u64, BasicNode> = nodes
        .iter()
        .map(|n| (n.id, BasicNode::new(n.fabric.addr.to_string())))
        .collect();
    let raft = |node: usize, group: u64| -> Raft<TypeConfig> {
        nodes[node].groups.read().unwrap()[&group].clone()
    };
    let started = Instant::now();
    for group in 1..=GROUPS {
        raft((group % NODES) as usize, group)
            .initialize(members.clone())
            .await
            .unwrap();
    }
    // Every group has a leader that knows it is one.
    let mut leaders: HashMap<u64, u64> = HashMap::new();
    while (leaders.len() as u64) < GROUPS {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{} of {GROUPS} groups have a leader",
            leaders.len()
        );
        for (i, n) in nodes.iter().enumerate() {
            for group in 1..=GROUPS {
                if raft(i, group).metrics().borrow().current_leader == Some(n.id) {
                    leaders.insert(group, n.id);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let per_node: BTreeMap<u64, usize> = nodes
        .iter()
        .map(|n| (n.id, leaders.values().filter(|&&l| l == n.id).count()))
        .collect();
    eprintln!(
        "{GROUPS} groups have leaders after {:?}; leaders per node {per_node:?}",
        started.elapsed()
    );

    // At rest: only heartbeats (every 500 ms per group and follower).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (cpu0, t0) = (process_cpu(), Instant::now());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let cpu = process_cpu() - cpu0;
    let share = cpu.as_secs_f64() / t0.elapsed().as_secs_f64();
    eprintln!(
        "idle: {cpu:?} of CPU in {:?} for {} Raft instances ({:.1}% of one core)",
        t0.elapsed(),
        GROUPS * NODES,
        share * 100.0
    );
    // Generous (half a core for 300 instances): catches spinning, not a slow machine.
    assert!(
        share < 0.5,
        "idle cluster used {:.0}% of a core",
        share * 100.0
    );

    for n in &nodes {
        let rafts: Vec<_> = n.groups.read().unwrap().values().cloned().collect();
        for r in rafts {
            r.shutdown().await.unwrap();
        }
    }
}
