//! Raft nodes in one process, each with its own log engine and fabric worker
//! on loopback: three elect a leader, replicate writes to every state
//! machine, and after the leader's fabric and Raft stop, the other two elect
//! a new leader and go on; a fourth joins and replaces a follower by a
//! membership change. (The multi-process tests with kill -9 come with the
//! chunkserver process.)

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::RecordingMachine;
use openraft::{BasicNode, Config, Raft};
use quiver_fabric::WorkerConfig;
use quiver_raft::log::{LogConfig, LogEngine};
use quiver_raft::net::{serve_raft, FabricNode, Groups, Network};
use quiver_raft::store::{LogStore, Request, TypeConfig};

const ELECTION_TIMEOUT_MAX_MS: u64 = 400;

struct Node {
    id: u64,
    engine: Arc<LogEngine>,
    raft: Raft<TypeConfig>,
    fabric: Arc<FabricNode>,
    machine: RecordingMachine,
    server: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

async fn start(id: u64, config: Arc<Config>) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let log_config = LogConfig {
        segment_bytes: 4 << 20,
        ..LogConfig::new(dir.path())
    };
    let engine = Arc::new(LogEngine::open(log_config).unwrap());
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let fabric = Arc::new(
        FabricNode::start("127.0.0.1:0".parse().unwrap(), WorkerConfig::default(), tx).unwrap(),
    );
    // As the chunkserver runs it: the leader's own appends are acknowledged
    // before their flush, applying and followers' commits wait for it.
    let log_store = LogStore::new(Arc::clone(&engine), 1).ack_own_appends_early(id);
    let machine = RecordingMachine::gated(log_store.durable_mark());
    let raft = Raft::new(
        id,
        config,
        Network::new(Arc::clone(&fabric), 1).with_durable_mark(log_store.durable_mark()),
        log_store,
        machine.clone(),
    )
    .await
    .unwrap();
    let groups = Groups::default();
    groups.write().unwrap().insert(1, raft.clone());
    let server = tokio::spawn(serve_raft(id, groups, rx));
    Node {
        id,
        engine,
        raft,
        fabric,
        machine,
        server,
        _dir: dir,
    }
}

/// Heartbeats every 50 ms, elections after 200-400 ms of silence.
fn raft_config() -> Arc<Config> {
    Arc::new(
        Config {
            heartbeat_interval: 50,
            election_timeout_min: ELECTION_TIMEOUT_MAX_MS / 2,
            election_timeout_max: ELECTION_TIMEOUT_MAX_MS,
            ..Config::default()
        }
        .validate()
        .unwrap(),
    )
}

/// Three nodes, initialized as one group; and its first leader.
async fn three_nodes() -> (Vec<Node>, u64) {
    let config = raft_config();
    let mut nodes = Vec::new();
    for id in 1..=3 {
        nodes.push(start(id, Arc::clone(&config)).await);
    }
    let members: BTreeMap<u64, BasicNode> = nodes
        .iter()
        .map(|n| (n.id, BasicNode::new(n.fabric.addr.to_string())))
        .collect();
    nodes[0].raft.initialize(members).await.unwrap();
    let all: Vec<&Node> = nodes.iter().collect();
    let first = leader(&all, Duration::from_secs(5)).await;
    (nodes, first)
}

async fn leader(nodes: &[&Node], within: Duration) -> u64 {
    let deadline = Instant::now() + within;
    loop {
        for n in nodes {
            let m = n.raft.metrics().borrow().clone();
            if m.current_leader == Some(n.id) {
                return n.id;
            }
        }
        assert!(Instant::now() < deadline, "no leader within {within:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn all_applied(nodes: &[&Node], count: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while nodes.iter().any(|n| n.machine.applied().len() < count) {
        assert!(
            Instant::now() < deadline,
            "applied: {:?}",
            nodes
                .iter()
                .map(|n| n.machine.applied().len())
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let first = nodes[0].machine.applied();
    for n in nodes {
        assert_eq!(
            n.machine.applied(),
            first,
            "node {} applied a different log",
            n.id
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_elect_replicate_and_survive_losing_the_leader() {
    // Logs say which transport each endpoint chose (RUST_LOG=quiver_fabric=info).
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let (nodes, first) = three_nodes().await;
    let all: Vec<&Node> = nodes.iter().collect();
    let by_id = |id: u64| nodes.iter().find(|n| n.id == id).unwrap();
    for i in 0..50 {
        by_id(first)
            .raft
            .client_write(Request::new(1, format!("write {i}").into_bytes()))
            .await
            .unwrap();
    }
    all_applied(&all, 50).await;

    // The leader goes away: its fabric closes (peers see the connections
    // end) and its Raft stops.
    let old = by_id(first);
    old.fabric.shutdown().await;
    old.raft.shutdown().await.unwrap();
    old.server.abort();
    let stopped = Instant::now();
    let rest: Vec<&Node> = nodes.iter().filter(|n| n.id != first).collect();
    let second = leader(&rest, Duration::from_secs(5)).await;
    let took = stopped.elapsed();
    eprintln!(
        "new leader {second} after {took:?} (election timeout max {ELECTION_TIMEOUT_MAX_MS} ms)"
    );
    assert_ne!(second, first);
    assert!(
        took < Duration::from_millis(2 * ELECTION_TIMEOUT_MAX_MS + 500),
        "re-election took {took:?}"
    );
    for i in 50..70 {
        by_id(second)
            .raft
            .client_write(Request::new(1, format!("write {i}").into_bytes()))
            .await
            .unwrap();
    }
    all_applied(&rest, 70).await;
    for n in &nodes {
        if n.id != first {
            n.raft.shutdown().await.unwrap();
        }
    }
}

/// Three nodes with one write applied everywhere, then the leader's log
/// writer held (it runs a request's callback on its own thread, so one that
/// blocks keeps every later batch from finishing) and a write in flight on
/// the leader that has reached both followers' logs: the write's task, and
/// the sender that lets the writer go on.
struct HeldLeader {
    nodes: Vec<Node>,
    leader_id: u64,
    write: tokio::task::JoinHandle<Result<(), String>>,
    release: std::sync::mpsc::Sender<()>,
}

async fn hold_the_leaders_log_writer() -> HeldLeader {
    let (nodes, leader_id) = three_nodes().await;
    let all: Vec<&Node> = nodes.iter().collect();
    let leader = nodes.iter().find(|n| n.id == leader_id).unwrap();
    leader
        .raft
        .client_write(Request::new(1, b"before".to_vec()))
        .await
        .unwrap();
    all_applied(&all, 1).await;

    let (held_tx, held_rx) = std::sync::mpsc::channel();
    let (release, release_rx) = std::sync::mpsc::channel::<()>();
    let vote = quiver_raft::log::Vote {
        term: 1,
        node: 1,
        committed: false,
    };
    leader
        .engine
        .save_vote(
            999,
            vote,
            Box::new(move |_| {
                held_tx.send(()).unwrap();
                let _ = release_rx.recv();
            }),
        )
        .unwrap();
    held_rx.recv_timeout(Duration::from_secs(5)).unwrap();
    let index = leader.engine.state(1).last.unwrap().index + 1;
    let raft = leader.raft.clone();
    let write = tokio::spawn(async move {
        raft.client_write(Request::new(1, b"held".to_vec()))
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    });

    let deadline = Instant::now() + Duration::from_secs(5);
    for f in nodes.iter().filter(|n| n.id != leader_id) {
        let holds_it = || {
            f.engine
                .entries(1, index, index + 1)
                .unwrap()
                .first()
                .is_some_and(|e| e.id.node == leader_id && e.data.ends_with(b"held"))
        };
        while !holds_it() {
            assert!(
                Instant::now() < deadline,
                "node {} never got the entry the leader was still writing",
                f.id
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    // Several heartbeats (50 ms): each carries the leader's commit point.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for n in &nodes {
        assert_eq!(
            n.machine.applied(),
            vec![b"before".to_vec()],
            "node {} applied an entry its leader had not made durable",
            n.id
        );
    }
    assert!(
        !write.is_finished(),
        "a write was answered before its leader's flush"
    );
    HeldLeader {
        nodes,
        leader_id,
        write,
        release,
    }
}

/// The leader's flush runs beside replication, and nothing acts on a commit
/// before it: while the leader's log writer is held, its entry reaches both
/// followers' logs, yet no node applies it and the client has no answer;
/// once the writer goes on, all three apply it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_replicates_while_it_flushes_and_applies_only_once_durable() {
    let held = hold_the_leaders_log_writer().await;
    held.release.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), held.write)
        .await
        .expect("the write is answered once the leader's flush is done")
        .unwrap()
        .unwrap();
    let all: Vec<&Node> = held.nodes.iter().collect();
    all_applied(&all, 2).await;
    for n in &held.nodes {
        n.raft.shutdown().await.unwrap();
    }
}

/// A leader that stops before its flush (its entry is on both followers,
/// applied nowhere): the followers elect one of themselves, which commits
/// the entry, and both apply the same log; the write the old leader never
/// answered was not lost either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_followers_go_on_when_a_leader_stops_before_its_flush() {
    let held = hold_the_leaders_log_writer().await;
    let old = held.nodes.iter().find(|n| n.id == held.leader_id).unwrap();
    old.fabric.shutdown().await;
    old.raft.shutdown().await.unwrap();
    old.server.abort();
    let rest: Vec<&Node> = held
        .nodes
        .iter()
        .filter(|n| n.id != held.leader_id)
        .collect();
    let new = leader(&rest, Duration::from_secs(5)).await;
    assert_ne!(new, held.leader_id);
    all_applied(&rest, 2).await;
    assert_eq!(rest[0].machine.applied()[1], b"held".to_vec());
    // The old leader's writer may go on now; its Raft is gone.
    held.release.send(()).unwrap();
    for n in &rest {
        n.raft.shutdown().await.unwrap();
    }
}

/// Joint consensus over the fabric: a fourth node joins as a learner, catches
/// up from the log, replaces a follower as a voter, and gets every write; the
/// removed node is out of the configuration.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_joins_and_another_leaves_by_membership_change() {
    let config = raft_config();
    let mut nodes = Vec::new();
    for id in 1..=4 {
        nodes.push(start(id, Arc::clone(&config)).await);
    }
    let node = |id: u64| BasicNode::new(nodes[id as usize - 1].fabric.addr.to_string());
    let members: BTreeMap<u64, BasicNode> = (1..=3).map(|id| (id, node(id))).collect();
    nodes[0].raft.initialize(members).await.unwrap();
    let voters: Vec<&Node> = nodes[..3].iter().collect();
    let leader_id = leader(&voters, Duration::from_secs(5)).await;
    let leader_raft = nodes[leader_id as usize - 1].raft.clone();
    for i in 0..20 {
        leader_raft
            .client_write(Request::new(1, format!("before {i}").into_bytes()))
            .await
            .unwrap();
    }
    // Node 4 joins as a learner (blocking: until it has caught up).
    leader_raft.add_learner(4, node(4), true).await.unwrap();
    // ... and replaces a follower as a voter.
    let leaving = (1..=3).find(|&id| id != leader_id).unwrap();
    let new_voters: std::collections::BTreeSet<u64> = (1..=4).filter(|&id| id != leaving).collect();
    leader_raft
        .change_membership(new_voters.clone(), false)
        .await
        .unwrap();
    for i in 0..20 {
        leader_raft
            .client_write(Request::new(1, format!("after {i}").into_bytes()))
            .await
            .unwrap();
    }
    let staying: Vec<&Node> = nodes.iter().filter(|n| n.id != leaving).collect();
    all_applied(&staying, 40).await;
    let membership = leader_raft.metrics().borrow().membership_config.clone();
    let now: std::collections::BTreeSet<u64> = membership.membership().voter_ids().collect();
    assert_eq!(now, new_voters, "{membership:?}");
    assert!(
        membership.membership().get_node(&leaving).is_none(),
        "node {leaving} is still in {membership:?}"
    );
    for n in &nodes {
        n.raft.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_raft_rpc_gets_an_error_answer_and_changes_nothing() {
    use quiver_fabric::RpcError;
    use quiver_raft::net::{CallError, Service};
    let (nodes, leader_id) = three_nodes().await;
    let leader = nodes.iter().find(|n| n.id == leader_id).unwrap();
    let other = nodes.iter().find(|n| n.id != leader_id).unwrap();
    // Kinds 1 (AppendEntries, without its header fields) and 2 (vote,
    // garbage), for group 1 which the node hosts.
    for kind in [1u8, 2] {
        let started = Instant::now();
        let answer = leader
            .fabric
            .call(
                other.fabric.addr,
                Service::Raft,
                (kind, 1),
                vec![0xff; 10],
                Duration::from_secs(5),
            )
            .await;
        assert!(
            matches!(answer, Err(CallError::Rpc(RpcError::Remote(_)))),
            "kind {kind}: {:?}",
            answer.map(|r| r.payload.len())
        );
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "answered at once"
        );
    }
    leader
        .raft
        .client_write(Request::new(1, b"after".to_vec()))
        .await
        .unwrap();
    let all: Vec<&Node> = nodes.iter().collect();
    all_applied(&all, 1).await;
}

/// A Raft RPC that reaches a node it was not meant for (its address changed
/// hands) is refused, not handed to that node's Raft: here a vote request
/// for node 2 sent to node 1's address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raft_rpc_for_another_node_is_refused() {
    use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
    let config = raft_config();
    let node = start(1, Arc::clone(&config)).await;
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    let sender = Arc::new(
        FabricNode::start("127.0.0.1:0".parse().unwrap(), WorkerConfig::default(), tx).unwrap(),
    );
    let mut network = Network::new(sender, 1);
    let mut wrong = network
        .new_client(2, &BasicNode::new(node.fabric.addr.to_string()))
        .await;
    let vote = openraft::raft::VoteRequest::new(openraft::Vote::new(99, 2), None);
    let option = RPCOption::new(Duration::from_secs(2));
    let answer = wrong.vote(vote, option).await;
    assert!(
        answer.is_err(),
        "node 1 answered a vote meant for node 2: {answer:?}"
    );
    let m = node.raft.metrics().borrow().clone();
    assert_ne!(m.vote.leader_id().term, 99, "node 1 took the vote: {m:?}");
}
