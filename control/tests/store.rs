//! One suite of metadata store behaviour, run against both backends: the
//! embedded redb store, and the etcd store against a real `etcd` that each
//! test starts on its own loopback ports. Plus what only etcd has: two
//! control nodes electing a leader, handing over, and fencing a deposed one.
//!
//! Without an `etcd` binary on PATH the etcd tests say so and pass, except
//! under CI=true, where they fail: CI installs it (`.ci/setup`).

#[path = "support/etcd.rs"]
mod etcd;

use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd::{free_port, Etcd, PREFIX};
use quiver_control::store::{
    Batch, EmbeddedStore, EtcdConfig, EtcdStore, LeaderRecord, MetaStore, StoreError,
};
use tempfile::TempDir;

/// The lease TTL of the etcd tests: etcd's minimum, so takeovers are quick.
const TTL_S: i64 = 2;
/// How long any step of a test may take before it counts as hung.
const STEP: Duration = Duration::from_secs(10);
/// A successor must lead within this long after the leader resigns or dies.
const TAKEOVER: Duration = Duration::from_secs(TTL_S as u64 + 2);

fn record(name: &str) -> LeaderRecord {
    LeaderRecord {
        name: name.to_owned(),
        addr: format!("{name}.example:7000"),
    }
}

fn batch(puts: &[(&str, &[u8])], deletes: &[&str]) -> Batch {
    Batch {
        puts: puts
            .iter()
            .map(|(key, value)| (key.to_string(), value.to_vec()))
            .collect(),
        deletes: deletes.iter().map(|key| key.to_string()).collect(),
    }
}

fn entries(pairs: &[(&str, &[u8])]) -> Vec<(String, Vec<u8>)> {
    pairs
        .iter()
        .map(|(key, value)| (key.to_string(), value.to_vec()))
        .collect()
}

/// What every backend must do. `store` must be able to lead.
async fn suite(store: &impl MetaStore, me: &LeaderRecord) {
    tokio::time::timeout(STEP, store.campaign())
        .await
        .expect("campaign hung")
        .expect("campaign");
    assert!(*store.leadership().borrow(), "leads after campaign");
    assert_eq!(store.leader().await.unwrap(), Some(me.clone()));

    assert!(
        store.load("volume/").await.unwrap().is_empty(),
        "empty load"
    );
    store.apply(Batch::default()).await.expect("empty batch");

    // Prefix isolation: "volume/" must not pick up "volumes2/" nor "volume".
    store
        .apply(batch(
            &[
                ("volume/b", b"B"),
                ("volume/a", b"A"),
                ("volumes2/x", b"X"),
                ("volume", b"bare"),
            ],
            &[],
        ))
        .await
        .unwrap();
    assert_eq!(
        store.load("volume/").await.unwrap(),
        entries(&[("volume/a", b"A"), ("volume/b", b"B")]),
        "in key order, only under the prefix"
    );
    assert_eq!(
        store.load("volumes2/").await.unwrap(),
        entries(&[("volumes2/x", b"X")])
    );

    // Overwrite.
    store
        .apply(batch(&[("volume/a", b"A2")], &[]))
        .await
        .unwrap();
    assert_eq!(
        store.load("volume/a").await.unwrap(),
        entries(&[("volume/a", b"A2")])
    );

    // Puts and deletes together, a missing key's delete included; a key
    // both deleted and put in one batch ends up put.
    store
        .apply(batch(
            &[("volume/c", b"C"), ("volumes2/x", b"X2")],
            &["volume/b", "volume/never-was", "volumes2/x"],
        ))
        .await
        .unwrap();
    assert_eq!(
        store.load("volume/").await.unwrap(),
        entries(&[("volume/a", b"A2"), ("volume/c", b"C")])
    );
    assert_eq!(
        store.load("volumes2/").await.unwrap(),
        entries(&[("volumes2/x", b"X2")])
    );
    store
        .apply(batch(&[], &["missing/key"]))
        .await
        .expect("deleting a missing key");

    // Values are bytes: every byte value, NULs, an empty value.
    let every_byte: Vec<u8> = (0..=255u8).rev().collect();
    store
        .apply(batch(
            &[
                ("blob/all", &every_byte),
                ("blob/empty", b""),
                ("blob/nul", b"\0\0"),
            ],
            &[],
        ))
        .await
        .unwrap();
    assert_eq!(
        store.load("blob/").await.unwrap(),
        entries(&[
            ("blob/all", &every_byte),
            ("blob/empty", b""),
            ("blob/nul", b"\0\0")
        ])
    );

    // Everything at once, in key order.
    let all: Vec<String> = store
        .load("")
        .await
        .unwrap()
        .into_iter()
        .map(|(key, _)| key)
        .collect();
    assert_eq!(
        all,
        [
            "blob/all",
            "blob/empty",
            "blob/nul",
            "volume",
            "volume/a",
            "volume/c",
            "volumes2/x"
        ]
    );
    assert!(*store.leadership().borrow(), "still leads");
}

#[tokio::test]
async fn embedded_store_passes_the_suite_and_keeps_data_across_reopen() {
    let dir = TempDir::new().unwrap();
    let me = record("solo");
    let store = EmbeddedStore::open(dir.path(), me.clone()).unwrap();
    assert_eq!(store.kind(), "embedded");
    suite(&store, &me).await;
    let before = store.load("").await.unwrap();
    drop(store);

    let store = EmbeddedStore::open(dir.path(), me).unwrap();
    assert_eq!(store.load("").await.unwrap(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_store_passes_the_suite() {
    let Some(etcd) = Etcd::start() else { return };
    let me = record("node-a");
    let store = etcd.store(&me, TTL_S).await;
    assert_eq!(store.kind(), "etcd");
    suite(&store, &me).await;

    // Reopening (another store on the same etcd) sees the same data.
    let before = store.load("").await.unwrap();
    let other = etcd.store(&record("node-b"), TTL_S).await;
    assert_eq!(other.load("").await.unwrap(), before);
    assert_eq!(other.leader().await.unwrap(), Some(me.clone()));

    // A batch over etcd's transaction limit is refused whole, not split.
    let keys: Vec<String> = (0..129).map(|i| format!("big/{i:03}")).collect();
    let too_big = Batch {
        puts: keys.iter().map(|key| (key.clone(), vec![1])).collect(),
        deletes: Vec::new(),
    };
    match store.apply(too_big).await {
        Err(StoreError::Backend(why)) => assert!(why.contains("128"), "{why}"),
        other => panic!("a 129-key batch: {other:?}"),
    }
    assert!(
        store.load("big/").await.unwrap().is_empty(),
        "nothing applied"
    );
    let just_fits = Batch {
        puts: keys[..128]
            .iter()
            .map(|key| (key.clone(), vec![1]))
            .collect(),
        deletes: Vec::new(),
    };
    store.apply(just_fits).await.expect("a 128-key batch");
    assert_eq!(store.load("big/").await.unwrap().len(), 128);

    // The leader key is the store's own.
    assert!(matches!(
        store.apply(batch(&[("control/leader", b"me")], &[])).await,
        Err(StoreError::Backend(_))
    ));
    assert_eq!(store.leader().await.unwrap(), Some(me));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_second_node_waits_and_a_deposed_leader_is_fenced() {
    let Some(etcd) = Etcd::start() else { return };
    // The first node renews its lease only every 10 s, so below it still
    // believes it leads after losing its lease: only etcd can stop its write.
    let first = etcd.store(&record("first"), 30).await;
    let second = Arc::new(etcd.store(&record("second"), TTL_S).await);
    campaign_within(&first, STEP).await;

    let mut second_campaign = spawn_campaign(&second);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(!second_campaign.is_finished(), "second won a taken seat");
    assert!(!*second.leadership().borrow());
    assert_eq!(second.leader().await.unwrap(), Some(record("first")));

    first
        .apply(batch(&[("volume/v1", b"by first")], &[]))
        .await
        .expect("leader writes");
    assert!(matches!(
        second
            .apply(batch(&[("volume/v1", b"by second")], &[]))
            .await,
        Err(StoreError::NotLeader)
    ));

    // The first's lease vanishes behind its back (as if it expired while
    // the node was paused): the second takes over.
    etcd.revoke_leader_lease();
    let started = Instant::now();
    tokio::time::timeout(TAKEOVER, &mut second_campaign)
        .await
        .expect("second did not take over")
        .unwrap()
        .unwrap();
    println!("second took over {:?} after the revoke", started.elapsed());
    assert!(*second.leadership().borrow());
    assert_eq!(second.leader().await.unwrap(), Some(record("second")));

    assert!(*first.leadership().borrow(), "first has not noticed yet");
    assert!(matches!(
        first.apply(batch(&[("volume/v1", b"stale")], &[])).await,
        Err(StoreError::NotLeader)
    ));
    assert!(
        !*first.leadership().borrow(),
        "a fenced write ends the term"
    );

    second
        .apply(batch(&[("volume/v2", b"by second")], &[]))
        .await
        .expect("new leader writes");
    assert_eq!(
        second.load("volume/").await.unwrap(),
        entries(&[("volume/v1", b"by first"), ("volume/v2", b"by second")])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_successor_takes_over_on_resign_on_lost_lease_and_on_crash() {
    let Some(etcd) = Etcd::start() else { return };
    let first = Arc::new(etcd.store(&record("first"), TTL_S).await);
    let second = Arc::new(etcd.store(&record("second"), TTL_S).await);
    campaign_within(&first, STEP).await;

    // Resign: the successor need not wait for the lease.
    let mut second_campaign = spawn_campaign(&second);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let resigned = Instant::now();
    first.resign().await.expect("resign");
    assert!(!*first.leadership().borrow());
    tokio::time::timeout(TAKEOVER, &mut second_campaign)
        .await
        .expect("no takeover after resign")
        .unwrap()
        .unwrap();
    println!("takeover {:?} after resign", resigned.elapsed());
    assert!(matches!(
        first.apply(batch(&[("k", b"v")], &[])).await,
        Err(StoreError::NotLeader)
    ));
    second.apply(batch(&[("k", b"v")], &[])).await.unwrap();

    // The leader's lease is lost with no write to tell it: its keepalive
    // notices and turns leadership off.
    let mut first_campaign = spawn_campaign(&first);
    let mut second_leads = second.leadership();
    etcd.revoke_leader_lease();
    tokio::time::timeout(
        Duration::from_secs(TTL_S as u64 + 1),
        second_leads.wait_for(|leads| !leads),
    )
    .await
    .expect("keepalive did not notice the lost lease")
    .unwrap();
    tokio::time::timeout(TAKEOVER, &mut first_campaign)
        .await
        .expect("no takeover after a lost lease")
        .unwrap()
        .unwrap();
    assert_eq!(first.leader().await.unwrap(), Some(record("first")));

    // Crash: the leader just stops renewing; its lease expires.
    let third = Arc::new(etcd.store(&record("third"), TTL_S).await);
    let mut third_campaign = spawn_campaign(&third);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!third_campaign.is_finished());
    let crashed = Instant::now();
    drop(Arc::into_inner(first).expect("no other holder of first"));
    tokio::time::timeout(TAKEOVER, &mut third_campaign)
        .await
        .expect("no takeover after a crash")
        .unwrap()
        .unwrap();
    println!("takeover {:?} after the crash", crashed.elapsed());
    assert_eq!(third.leader().await.unwrap(), Some(record("third")));
    assert!(matches!(
        second.apply(batch(&[("k", b"v2")], &[])).await,
        Err(StoreError::NotLeader)
    ));
    third.apply(batch(&[("k", b"v3")], &[])).await.unwrap();
    assert_eq!(third.load("k").await.unwrap(), entries(&[("k", b"v3")]));
}

#[tokio::test]
async fn etcd_store_names_the_endpoint_it_cannot_reach() {
    // Nothing listens there: the connection is refused at once.
    let dead = format!("127.0.0.1:{}", free_port());
    let config = EtcdConfig {
        endpoints: vec![dead.clone()],
        prefix: PREFIX.to_owned(),
        lease_ttl_s: TTL_S,
    };
    match EtcdStore::connect(config, record("lonely")).await {
        Err(StoreError::Unreachable(why)) => {
            println!("{why}");
            assert!(why.contains(&dead), "{why}");
        }
        Err(other) => panic!("expected Unreachable, got {other:?}"),
        Ok(_) => panic!("connected to nothing"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_store_fails_over_past_a_dead_endpoint() {
    let Some(etcd) = Etcd::start() else { return };
    let config = EtcdConfig {
        endpoints: vec![
            format!("http://127.0.0.1:{}", free_port()),
            format!("127.0.0.1:{}", etcd.client_port),
        ],
        prefix: PREFIX.to_owned(),
        lease_ttl_s: TTL_S,
    };
    let store = EtcdStore::connect(config, record("failover"))
        .await
        .unwrap();
    campaign_within(&store, STEP).await;
    store.apply(batch(&[("k", b"v")], &[])).await.unwrap();
    assert_eq!(store.load("").await.unwrap(), entries(&[("k", b"v")]));
}

async fn campaign_within(store: &EtcdStore, limit: Duration) {
    tokio::time::timeout(limit, store.campaign())
        .await
        .expect("campaign hung")
        .expect("campaign");
    assert!(*store.leadership().borrow());
}

fn spawn_campaign(store: &Arc<EtcdStore>) -> tokio::task::JoinHandle<Result<(), StoreError>> {
    let store = store.clone();
    tokio::spawn(async move { store.campaign().await })
}
