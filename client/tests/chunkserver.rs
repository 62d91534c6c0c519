//! Three `quiver chunkserver` processes on loopback serving one copyset:
//! a writer stream survives `kill -9` of the leader, the killed server
//! catches up after a restart, a follower with a wiped disk comes back
//! through a snapshot, and bad requests get typed errors.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{
    client, leader_of, page_of, peers, start_servers, status_within, Server, Tuning,
    FOLLOWER_WAIT_MAX_MS,
};
use quiver_raft::chunk_client::{ChunkClient, ClientError};
use quiver_raft::log::KEPT_APPLIED_BYTES;
use quiver_raft::service::{self, ChunkError, KIND_READ};

const PAGE: usize = 4096;
const COPYSET: u32 = 1;

/// Where write `i` of the stream goes: (chunk, offset).
fn location(i: u64) -> (u64, u64) {
    (i % 3, ((i * 7) % 64) * PAGE as u64)
}

/// Writes `count` pages from `first`, recording each acknowledged one.
async fn write_stream(
    client: Arc<ChunkClient>,
    addrs: Vec<SocketAddr>,
    first: u64,
    count: u64,
    acked: Arc<Mutex<BTreeMap<(u64, u64), u64>>>,
    progress: Arc<AtomicU64>,
) {
    for i in first..first + count {
        let (chunk, offset) = location(i);
        client
            .write(&addrs, COPYSET, chunk, offset, 0, &page_of(i, PAGE))
            .await
            .unwrap_or_else(|e| panic!("write {i}: {e}"));
        acked.lock().unwrap().insert((chunk, offset), i);
        progress.fetch_add(1, Ordering::Relaxed);
    }
}

/// A `write_stream` of `count` pages in the background.
struct Stream {
    writer: tokio::task::JoinHandle<()>,
    acked: Arc<Mutex<BTreeMap<(u64, u64), u64>>>,
    progress: Arc<AtomicU64>,
}

/// Starts a `write_stream` of `count` pages and returns once `started` of
/// them are acknowledged.
async fn stream_under_way(
    client: &Arc<ChunkClient>,
    addrs: &[SocketAddr],
    count: u64,
    started: u64,
) -> Stream {
    let acked = Arc::new(Mutex::new(BTreeMap::new()));
    let progress = Arc::new(AtomicU64::new(0));
    let writer = tokio::spawn(write_stream(
        Arc::clone(client),
        addrs.to_vec(),
        0,
        count,
        Arc::clone(&acked),
        Arc::clone(&progress),
    ));
    while progress.load(Ordering::Relaxed) < started {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Stream {
        writer,
        acked,
        progress,
    }
}

/// Reads every acknowledged location back: from the leader, or from
/// `replica` itself (a snapshot-fetch read) when given.
async fn verify(
    client: &ChunkClient,
    addrs: &[SocketAddr],
    replica: Option<SocketAddr>,
    acked: &BTreeMap<(u64, u64), u64>,
) {
    for (&(chunk, offset), &i) in acked {
        let data = match replica {
            None => {
                client
                    .read(addrs, COPYSET, chunk, offset, PAGE as u64)
                    .await
            }
            Some(server) => {
                let body = service::read_body(chunk, offset, PAGE as u64, true);
                client.call(server, COPYSET, KIND_READ, body).await
            }
        }
        .unwrap_or_else(|e| panic!("read {chunk}/{offset}: {e}"));
        assert!(
            data == page_of(i, PAGE),
            "chunk {chunk} offset {offset}: not write {i}'s data (replica {replica:?})"
        );
    }
}

/// Waits until `server` has applied as far as the leader has.
async fn caught_up(client: &ChunkClient, leader: SocketAddr, server: SocketAddr) -> Duration {
    let started = Instant::now();
    let target = status_within(client, leader, Duration::from_secs(5))
        .await
        .copysets[0]
        .last_applied;
    loop {
        let st = status_within(client, server, Duration::from_secs(10)).await;
        if st
            .copysets
            .first()
            .is_some_and(|c| c.last_applied >= target)
        {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{server} did not catch up to {target:?}: {st:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn addrs(servers: &[Server]) -> Vec<SocketAddr> {
    servers.iter().map(|s| s.addr).collect()
}

async fn cluster(root: &std::path::Path, tuning: &Tuning) -> (Vec<Server>, Arc<ChunkClient>) {
    let servers = start_servers(root, 3, tuning);
    let client = Arc::new(client());
    for s in &servers {
        status_within(&client, s.addr, Duration::from_secs(30)).await;
    }
    client
        .create_copyset(COPYSET, &peers(&servers))
        .await
        .unwrap();
    let all: Vec<&Server> = servers.iter().collect();
    leader_of(&client, &all, COPYSET, Duration::from_secs(10)).await;
    (servers, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_survives_kill_9_of_the_leader_and_the_leader_catches_up() {
    let root = tempfile::tempdir().unwrap();
    let (mut servers, client) = cluster(root.path(), &Tuning::default()).await;
    let addrs = addrs(&servers);
    let Stream {
        writer,
        acked,
        progress,
    } = stream_under_way(&client, &addrs, 400, 100).await;
    let all: Vec<&Server> = servers.iter().collect();
    let old = leader_of(&client, &all, COPYSET, Duration::from_secs(5)).await;
    let killed = servers.iter().position(|s| s.node == old).unwrap();
    servers[killed].kill();
    let at_kill = progress.load(Ordering::Relaxed);
    let killed_at = Instant::now();
    let others: Vec<&Server> = servers.iter().filter(|s| s.node != old).collect();
    let new = leader_of(&client, &others, COPYSET, Duration::from_secs(5)).await;
    let elected = killed_at.elapsed();
    eprintln!("leader {old} killed after {at_kill} writes; node {new} leads after {elected:?}");
    // Twice the longest a follower waits before it stands (lease + timeout).
    assert!(
        elected <= Duration::from_millis(2 * FOLLOWER_WAIT_MAX_MS),
        "new leader after {elected:?}"
    );
    writer.await.unwrap();
    let acked = acked.lock().unwrap().clone();
    verify(&client, &addrs, None, &acked).await;

    servers[killed].start();
    let leader_addr = servers.iter().find(|s| s.node == new).unwrap().addr;
    let took = caught_up(&client, leader_addr, servers[killed].addr).await;
    eprintln!("restarted node {old} caught up in {took:?}");
    verify(&client, &addrs, Some(servers[killed].addr), &acked).await;
}

/// A leader killed mid-stream and restarted at once, before anyone else
/// stands: it must not resume its old term (it acknowledged its own
/// appends before their flush, so its log may have lost ids it sent), and
/// every acknowledged write reads back from all three replicas.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_restarted_at_once_wins_a_new_term_before_it_leads() {
    let root = tempfile::tempdir().unwrap();
    let (mut servers, client) = cluster(root.path(), &Tuning::default()).await;
    let addrs = addrs(&servers);
    let Stream { writer, acked, .. } = stream_under_way(&client, &addrs, 300, 100).await;
    let all: Vec<&Server> = servers.iter().collect();
    let old = leader_of(&client, &all, COPYSET, Duration::from_secs(5)).await;
    let old_addr = servers.iter().find(|s| s.node == old).unwrap().addr;
    let old_term = status_within(&client, old_addr, Duration::from_secs(5))
        .await
        .copysets[0]
        .term;
    let killed = servers.iter().position(|s| s.node == old).unwrap();
    servers[killed].kill();
    servers[killed].start();
    // Until a new term, nobody may lead: not the restarted node in its old
    // term, nor the others (their leader is the one that died).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let st = status_within(&client, old_addr, Duration::from_secs(10)).await;
        let c = &st.copysets[0];
        assert!(
            !(c.leader == Some(old) && c.term == old_term),
            "node {old} came back as leader of its old term {old_term}"
        );
        if c.term > old_term && c.leader.is_some() {
            break;
        }
        assert!(Instant::now() < deadline, "no new term: {c:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    writer.await.unwrap();
    let acked = acked.lock().unwrap().clone();
    verify(&client, &addrs, None, &acked).await;
    let all: Vec<&Server> = servers.iter().collect();
    let new = leader_of(&client, &all, COPYSET, Duration::from_secs(5)).await;
    let leader_addr = servers.iter().find(|s| s.node == new).unwrap().addr;
    for s in &servers {
        caught_up(&client, leader_addr, s.addr).await;
        verify(&client, &addrs, Some(s.addr), &acked).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_with_a_wiped_disk_rejoins_through_a_snapshot() {
    let root = tempfile::tempdir().unwrap();
    let tuning = Tuning {
        snapshot_every: 50,
        log_keep: 10,
        ..Tuning::default()
    };
    let (mut servers, client) = cluster(root.path(), &tuning).await;
    let addrs = addrs(&servers);
    let acked = Arc::new(Mutex::new(BTreeMap::new()));
    let progress = Arc::new(AtomicU64::new(0));
    write_stream(
        Arc::clone(&client),
        addrs.clone(),
        0,
        200,
        Arc::clone(&acked),
        Arc::clone(&progress),
    )
    .await;
    let all: Vec<&Server> = servers.iter().collect();
    let leader = leader_of(&client, &all, COPYSET, Duration::from_secs(5)).await;
    let wiped = servers.iter().position(|s| s.node != leader).unwrap();
    servers[wiped].kill();
    std::fs::remove_dir_all(&servers[wiped].dir).unwrap();
    // More writes while it is away: the log it missed is purged behind a snapshot.
    write_stream(
        Arc::clone(&client),
        addrs.clone(),
        200,
        150,
        Arc::clone(&acked),
        Arc::clone(&progress),
    )
    .await;
    let leader_addr = servers.iter().find(|s| s.node == leader).unwrap().addr;
    let st = client.status(leader_addr).await.unwrap();
    assert!(
        st.copysets[0].snapshot.is_some(),
        "the leader has no snapshot: {st:?}"
    );
    servers[wiped].start();
    let server = servers[wiped].addr;
    status_within(&client, server, Duration::from_secs(30)).await;
    // An empty server must not vote as the member it was (it would grant
    // votes knowing nothing of the log it had acknowledged): it leaves the
    // copyset and joins again, as a learner first, which brings it the
    // snapshot; then it votes again.
    let node = servers[wiped].node;
    client
        .change_peers(
            &addrs,
            COPYSET,
            &service::PeerChange {
                add: None,
                remove: Some(node),
            },
        )
        .await
        .unwrap();
    client
        .change_peers(
            &addrs,
            COPYSET,
            &service::PeerChange {
                add: Some((node, server.to_string())),
                remove: None,
            },
        )
        .await
        .unwrap();
    let took = caught_up(&client, leader_addr, server).await;
    let st = client.status(server).await.unwrap();
    eprintln!("wiped node caught up in {took:?}: {:?}", st.copysets[0]);
    assert!(
        st.copysets[0].snapshot.is_some(),
        "the wiped node caught up without a snapshot"
    );
    let acked = acked.lock().unwrap().clone();
    verify(&client, &addrs, Some(server), &acked).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_typed_errors() {
    let root = tempfile::tempdir().unwrap();
    let (servers, client) = cluster(root.path(), &Tuning::default()).await;
    let addrs = addrs(&servers);
    let refused = |r: Result<Vec<u8>, ClientError>| match r {
        Err(ClientError::Refused { error, .. }) => error,
        other => panic!("expected a refusal, got {other:?}"),
    };
    let unit = |r: Result<(), ClientError>| r.map(|()| Vec::new());

    let e = refused(client.read(&addrs, COPYSET, 5, 0, PAGE as u64).await);
    assert_eq!(
        e,
        ChunkError::NoSuchChunk {
            copyset: COPYSET,
            chunk: 5
        }
    );
    let e = refused(unit(
        client.write(&addrs, COPYSET, 1, 100, 0, &[1; PAGE]).await,
    ));
    assert!(
        matches!(e, ChunkError::Unaligned { offset: 100, .. }),
        "{e}"
    );
    let e = refused(unit(
        client
            .write(&addrs, COPYSET, 1, 16 << 20, 0, &[1; PAGE])
            .await,
    ));
    assert!(matches!(e, ChunkError::OutOfRange { .. }), "{e}");
    let e = refused(client.read(&addrs, COPYSET, 1, 0, 4 << 20).await);
    assert!(matches!(e, ChunkError::OutOfRange { .. }), "{e}");
    let e = refused(
        client
            .call(addrs[0], 77, service::KIND_LEADER, Vec::new())
            .await,
    );
    assert_eq!(e, ChunkError::NoSuchCopyset(77));
    let e = refused(client.call(addrs[0], COPYSET, 99, Vec::new()).await);
    assert!(matches!(e, ChunkError::BadRequest(_)), "{e}");
    let e = refused(
        client
            .call(addrs[0], COPYSET, service::KIND_WRITE, vec![1, 2])
            .await,
    );
    assert!(matches!(e, ChunkError::BadRequest(_)), "{e}");

    // A follower names the leader.
    let all: Vec<&Server> = servers.iter().collect();
    let leader = leader_of(&client, &all, COPYSET, Duration::from_secs(5)).await;
    let follower = servers.iter().find(|s| s.node != leader).unwrap();
    let leader_addr = servers.iter().find(|s| s.node == leader).unwrap().addr;
    let body = service::write_body(1, 0, 0, 0, &[1; PAGE]);
    let e = refused(
        client
            .call(follower.addr, COPYSET, service::KIND_WRITE, body)
            .await,
    );
    assert_eq!(
        e,
        ChunkError::NotLeader {
            copyset: COPYSET,
            leader: Some(leader),
            leader_addr: Some(leader_addr.to_string())
        }
    );
    // Bootstrapping it again with other members is refused; a join with
    // other members (a retried membership change: the leader's log decides)
    // and the same spec are no-ops.
    let mut other = peers(&servers);
    other.insert(9, "127.0.0.1:1".into());
    let spec = service::CopysetSpec {
        peers: other.clone(),
        bootstrap: true,
    };
    let e = refused(
        client
            .call(
                addrs[0],
                COPYSET,
                service::KIND_CREATE_COPYSET,
                serde_json::to_vec(&spec).unwrap(),
            )
            .await,
    );
    assert_eq!(e, ChunkError::CopysetExists(COPYSET));
    let join = service::CopysetSpec {
        peers: other,
        bootstrap: false,
    };
    client
        .call(
            addrs[0],
            COPYSET,
            service::KIND_CREATE_COPYSET,
            serde_json::to_vec(&join).unwrap(),
        )
        .await
        .unwrap();
    client
        .create_copyset(COPYSET, &peers(&servers))
        .await
        .unwrap();
    // After all that, the servers still serve.
    client
        .write(&addrs, COPYSET, 1, 0, 0, &page_of(1, PAGE))
        .await
        .unwrap();
    let data = client
        .read(&addrs, COPYSET, 1, 0, PAGE as u64)
        .await
        .unwrap();
    assert_eq!(data, page_of(1, PAGE));
    client.delete(&addrs, COPYSET, 1).await.unwrap();
    let e = refused(client.read(&addrs, COPYSET, 1, 0, PAGE as u64).await);
    assert!(matches!(e, ChunkError::NoSuchChunk { .. }), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leadership_moves_to_the_member_asked_for() {
    let root = tempfile::tempdir().unwrap();
    let (servers, client) = cluster(root.path(), &Tuning::default()).await;
    let addrs = addrs(&servers);
    let acked = Arc::new(Mutex::new(BTreeMap::new()));
    let progress = Arc::new(AtomicU64::new(0));
    let mut next = 0;
    for round in 0..3 {
        write_stream(
            Arc::clone(&client),
            addrs.clone(),
            next,
            20,
            Arc::clone(&acked),
            Arc::clone(&progress),
        )
        .await;
        next += 20;
        let all: Vec<&Server> = servers.iter().collect();
        let old = leader_of(&client, &all, COPYSET, Duration::from_secs(5)).await;
        let to = servers[(old as usize) % servers.len()].node; // the next node
        let started = Instant::now();
        client.transfer_leader(&addrs, COPYSET, to).await.unwrap();
        let took = started.elapsed();
        let now = leader_of(&client, &all, COPYSET, Duration::from_secs(5)).await;
        eprintln!("round {round}: leadership {old} -> {to} in {took:?}");
        assert_eq!(now, to);
    }
    // A member that does not exist is refused; writes go on after all that.
    let err = client
        .transfer_leader(&addrs, COPYSET, 42)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::Refused {
                error: ChunkError::BadRequest(_),
                ..
            }
        ),
        "{err}"
    );
    let acked = acked.lock().unwrap().clone();
    verify(&client, &addrs, None, &acked).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fourth_server_replaces_a_member() {
    let root = tempfile::tempdir().unwrap();
    let mut servers = start_servers(root.path(), 4, &Tuning::default());
    let client = Arc::new(client());
    for s in &servers {
        status_within(&client, s.addr, Duration::from_secs(30)).await;
    }
    let fourth = servers.pop().unwrap();
    client
        .create_copyset(COPYSET, &peers(&servers))
        .await
        .unwrap();
    let all: Vec<&Server> = servers.iter().collect();
    leader_of(&client, &all, COPYSET, Duration::from_secs(10)).await;
    let addrs = addrs(&servers);
    let acked = Arc::new(Mutex::new(BTreeMap::new()));
    let progress = Arc::new(AtomicU64::new(0));
    write_stream(
        Arc::clone(&client),
        addrs.clone(),
        0,
        100,
        Arc::clone(&acked),
        Arc::clone(&progress),
    )
    .await;
    // Node 3 out, node 4 in, in one change.
    let change = service::PeerChange {
        add: Some((fourth.node, fourth.addr.to_string())),
        remove: Some(3),
    };
    let started = Instant::now();
    client.change_peers(&addrs, COPYSET, &change).await.unwrap();
    eprintln!("node 4 replaced node 3 in {:?}", started.elapsed());
    let now: Vec<SocketAddr> = vec![addrs[0], addrs[1], fourth.addr];
    write_stream(
        Arc::clone(&client),
        now.clone(),
        100,
        50,
        Arc::clone(&acked),
        Arc::clone(&progress),
    )
    .await;
    let leader = leader_of(
        &client,
        &[&servers[0], &servers[1], &fourth],
        COPYSET,
        Duration::from_secs(5),
    )
    .await;
    let leader_addr = [&servers[0], &servers[1], &fourth]
        .iter()
        .find(|s| s.node == leader)
        .unwrap()
        .addr;
    caught_up(&client, leader_addr, fourth.addr).await;
    let st = client.status(fourth.addr).await.unwrap();
    assert_eq!(st.copysets[0].voters, vec![1, 2, 4], "{st:?}");
    let acked = acked.lock().unwrap().clone();
    verify(&client, &now, Some(fourth.addr), &acked).await;
    verify(&client, &now, None, &acked).await;
    // Removing a node that is not a member is refused.
    let err = client
        .change_peers(
            &now,
            COPYSET,
            &service::PeerChange {
                add: None,
                remove: Some(3),
            },
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::Refused {
                error: ChunkError::BadRequest(_),
                ..
            }
        ),
        "{err}"
    );
}

/// Entries stay in memory until purged, and openraft's snapshot policy
/// counts entries whatever their size: a copyset whose log outgrows
/// `log_mem_mib` snapshots and purges on every member, and the data stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_over_its_memory_limit_is_snapshotted_and_purged() {
    let root = tempfile::tempdir().unwrap();
    let tuning = Tuning {
        log_mem_mib: 1,
        ..Tuning::default()
    };
    let (servers, client) = cluster(root.path(), &tuning).await;
    let addrs = addrs(&servers);
    const BIG: usize = 64 << 10;
    let writes = 48u64; // 3 MiB: three times the limit
    for i in 0..writes {
        let data: Vec<u8> = (0..BIG).map(|b| (b as u64 ^ i) as u8).collect();
        client
            .write(&addrs, COPYSET, i % 4, (i / 4) * BIG as u64, 0, &data)
            .await
            .unwrap_or_else(|e| panic!("write {i}: {e}"));
    }
    let limit = 1u64 << 20;
    let deadline = Instant::now() + Duration::from_secs(30);
    for s in &servers {
        loop {
            let st = client.status(s.addr).await.unwrap();
            let c = &st.copysets[0];
            if c.snapshot.is_some() && c.log_bytes <= limit + BIG as u64 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "node {} holds {} bytes of log (limit {limit}): {c:?}",
                s.node,
                c.log_bytes
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    for i in 0..writes {
        let want: Vec<u8> = (0..BIG).map(|b| (b as u64 ^ i) as u8).collect();
        let got = client
            .read(&addrs, COPYSET, i % 4, (i / 4) * BIG as u64, BIG as u64)
            .await
            .unwrap_or_else(|e| panic!("read {i}: {e}"));
        assert!(got[..] == want[..], "write {i} reads back different");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn applied_entries_leave_every_replicas_memory_and_large_writes_do_not_pin_the_fabric() {
    let root = tempfile::tempdir().unwrap();
    let (servers, client) = cluster(root.path(), &Tuning::default()).await;
    let addrs = addrs(&servers);
    // 256 KiB writes arrive by rendezvous, each in a 1 MiB fabric buffer
    // (64 per server): held until purged, the 80 here would stall the
    // fabric. Interleaved with small (eager) ones.
    const BIG: usize = 256 << 10;
    let writes = 160u64;
    let data = |i: u64, len: usize| -> Vec<u8> { (0..len).map(|b| (b as u64 ^ i) as u8).collect() };
    for i in 0..writes {
        let len = if i % 2 == 0 { BIG } else { PAGE };
        client
            .write(
                &addrs,
                COPYSET,
                i % 4,
                (i / 4) * BIG as u64,
                0,
                &data(i, len),
            )
            .await
            .unwrap_or_else(|e| panic!("write {i}: {e}"));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    for s in &servers {
        loop {
            let st = client.status(s.addr).await.unwrap();
            let c = &st.copysets[0];
            // The newest applied entries stay, within their cap, for a
            // follower a round behind.
            if c.log_held_bytes <= KEPT_APPLIED_BYTES && c.last_applied >= Some(writes) {
                assert!(c.log_bytes > 80 * BIG as u64, "the log keeps them: {c:?}");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "node {} holds {} bytes of applied entries in memory: {c:?}",
                s.node,
                c.log_held_bytes
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    for i in 0..writes {
        let len = if i % 2 == 0 { BIG } else { PAGE };
        let got = client
            .read(&addrs, COPYSET, i % 4, (i / 4) * BIG as u64, len as u64)
            .await
            .unwrap_or_else(|e| panic!("read {i}: {e}"));
        assert!(
            got[..] == data(i, len)[..],
            "write {i} reads back different"
        );
    }
}
