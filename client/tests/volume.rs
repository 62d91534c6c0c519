//! The volume library against real processes: a control node and three
//! chunkservers on loopback.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{eventually, page_of, start_servers, Control, Server, Tuning};
use quiver_client::volume::{CHUNK_BYTES, PAGE_BYTES};
use quiver_client::{Cluster, ClusterOptions, OpenMode, VolumeError};
use quiver_control::proto;

const TOKEN: &str = "volume-test-token";
const GIB: u64 = 1 << 30;

struct Setup {
    _root: tempfile::TempDir,
    control: Control,
    servers: Vec<Server>,
    cluster: Cluster,
}

/// Control + three chunkservers, healthy, and a volume `name` of `size`.
async fn setup(name: &str, size: u64) -> Setup {
    setup_with(name, size, |_| {}).await
}

async fn setup_with(
    name: &str,
    size: u64,
    tune: impl FnOnce(&mut quiver_control::ControlConfig),
) -> Setup {
    let root = tempfile::tempdir().unwrap();
    let control = Control::start(root.path(), "control-1", TOKEN, |c| {
        c.pools[0].copysets = 4;
        tune(c);
    });
    let tuning = Tuning {
        control: vec![control.addr.to_string()],
        token: Some(TOKEN.into()),
        ..Tuning::default()
    };
    let servers = start_servers(root.path(), 3, &tuning);
    let cluster = Cluster::connect(&[control.addr.to_string()], TOKEN)
        .await
        .unwrap();
    eventually("a healthy cluster", Duration::from_secs(60), || async {
        let s = cluster
            .control()
            .call(
                "status",
                |mut c| async move { c.status(proto::Empty {}).await },
            )
            .await
            .ok()?;
        (s.health == "HEALTH_OK" && s.copysets_healthy == 4).then_some(())
    })
    .await;
    let request = proto::CreateVolumeRequest {
        name: name.into(),
        size,
        owner: "tests".into(),
        pool: String::new(),
    };
    cluster
        .control()
        .call("create", |mut c| {
            let r = request.clone();
            async move { c.create_volume(r).await }
        })
        .await
        .unwrap();
    Setup {
        _root: root,
        control,
        servers,
        cluster,
    }
}

/// Byte patterns that say where they were written.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (seed.wrapping_mul(31).wrapping_add(i as u64 * 7) % 251) as u8)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_and_writes_of_any_shape_come_back() {
    let s = setup("shapes", 2 * GIB).await;
    let v = s
        .cluster
        .open("shapes", OpenMode::ReadWrite { force: false })
        .await
        .unwrap();
    assert_eq!(v.size(), 2 * GIB);
    assert_eq!(v.epoch(), 1);

    // Never written: zeros (no segment allocated yet).
    let mut buf = vec![1u8; 8192];
    v.read_at(GIB + 4096, &mut buf).await.unwrap();
    assert!(buf.iter().all(|b| *b == 0));

    // Aligned, across a chunk boundary, across the segment boundary, 3 MiB
    // (pieces of 1 MiB in parallel), and unaligned (read-modify-write).
    let cases: &[(u64, usize)] = &[
        (0, 4096),
        (CHUNK_BYTES - 8192, 16384),
        (GIB - 4096, 8192),
        (5 * CHUNK_BYTES + 12288, 3 << 20),
        (20 * 4096 + 100, 1000),
        (3 * CHUNK_BYTES - 10, 20),
        (7 * 4096 + 5, 3 * 4096),
        (2 * GIB - 512, 512),
    ];
    for (i, (offset, len)) in cases.iter().enumerate() {
        v.write_at(*offset, &pattern(i as u64, *len)).await.unwrap();
    }
    for (i, (offset, len)) in cases.iter().enumerate() {
        let mut got = vec![0u8; *len];
        v.read_at(*offset, &mut got).await.unwrap();
        assert!(got == pattern(i as u64, *len), "case {i}: {offset}+{len}");
    }
    // The bytes around an unaligned write kept their zeros.
    let mut around = vec![9u8; 4096];
    v.read_at(20 * 4096, &mut around).await.unwrap();
    assert!(around[..100].iter().all(|b| *b == 0));
    assert!(around[100..1100] == pattern(4, 1000)[..]);
    assert!(around[1100..].iter().all(|b| *b == 0));

    // Concurrent small writes sharing pages do not undo each other.
    let base = 40 * CHUNK_BYTES;
    let writes = (0..64u64).map(|i| {
        let v = v.clone();
        async move { v.write_at(base + i * 64, &[i as u8 + 1; 64]).await }
    });
    futures::future::try_join_all(writes).await.unwrap();
    let mut got = vec![0u8; 4096];
    v.read_at(base, &mut got).await.unwrap();
    for i in 0..64usize {
        assert!(
            got[i * 64..(i + 1) * 64].iter().all(|b| *b == i as u8 + 1),
            "slot {i}"
        );
    }

    // Zeroing, unaligned at both ends.
    v.write_zeroes(CHUNK_BYTES - 8000, 12000).await.unwrap();
    let mut got = vec![1u8; 12000];
    v.read_at(CHUNK_BYTES - 8000, &mut got).await.unwrap();
    assert!(got.iter().all(|b| *b == 0));

    // Out of range and zero-length.
    assert!(matches!(
        v.write_at(2 * GIB - 4096, &[0; 8192]).await,
        Err(VolumeError::OutOfRange { .. })
    ));
    assert!(matches!(
        v.read_at(u64::MAX - 10, &mut [0; 100]).await,
        Err(VolumeError::OutOfRange { .. })
    ));
    v.write_at(0, &[]).await.unwrap();

    // A reader sees it all; it may not write.
    let reader = s.cluster.open("shapes", OpenMode::ReadOnly).await.unwrap();
    let mut got = vec![0u8; 3 << 20];
    reader
        .read_at(5 * CHUNK_BYTES + 12288, &mut got)
        .await
        .unwrap();
    assert!(got == pattern(3, 3 << 20));
    assert!(matches!(
        reader.write_at(0, &[0; 4096]).await,
        Err(VolumeError::ReadOnly(_))
    ));

    // A second writer is refused; one that forces takes over and the first
    // is fenced, by the chunkservers (stale epoch) if not by its lease.
    let other = Cluster::connect_with(
        &[s.control.addr.to_string()],
        TOKEN,
        ClusterOptions {
            client_name: "another-client".into(),
            ..ClusterOptions::default()
        },
    )
    .await
    .unwrap();
    assert!(other
        .open("shapes", OpenMode::ReadWrite { force: false })
        .await
        .is_err());
    let taker = other
        .open("shapes", OpenMode::ReadWrite { force: true })
        .await
        .unwrap();
    taker.write_at(0, &[7; 4096]).await.unwrap();
    match v.write_at(0, &[8; 4096]).await {
        Err(VolumeError::Fenced { epoch: 1, .. }) => {}
        other => panic!("the old writer wrote: {other:?}"),
    }
    let mut got = vec![0u8; 4096];
    taker.read_at(0, &mut got).await.unwrap();
    assert!(got.iter().all(|b| *b == 7));
    taker.close().await.unwrap();
}

/// A writer stream keeps going while leaders move and while a chunkserver
/// is killed: every acknowledged write reads back afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn io_continues_through_leader_changes_and_a_killed_chunkserver() {
    let mut s = setup("busy", GIB).await;
    let v = s
        .cluster
        .open("busy", OpenMode::ReadWrite { force: false })
        .await
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    // Four writers, each over its own pages spread over all chunks of the
    // first 256 MiB (every copyset), each page written once.
    let writers: Vec<_> = (0..4u64)
        .map(|w| {
            let (v, stop, acked) = (v.clone(), stop.clone(), acked.clone());
            tokio::spawn(async move {
                let mut written = Vec::new();
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) && i < 2000 {
                    let page = (i * 4 + w) * 16 + (i % 16) * (CHUNK_BYTES / PAGE_BYTES);
                    let offset = (page * PAGE_BYTES) % (256 << 20);
                    v.write_at(offset, &page_of(offset, PAGE_BYTES as usize))
                        .await
                        .unwrap_or_else(|e| panic!("write at {offset}: {e}"));
                    acked.fetch_add(1, Ordering::Relaxed);
                    written.push(offset);
                    i += 1;
                }
                written
            })
        })
        .collect();
    let chunks = common::client();
    let wait_for = |n: u64| {
        let acked = acked.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            while acked.load(Ordering::Relaxed) < n {
                assert!(
                    Instant::now() < deadline,
                    "writes stalled at {}",
                    acked.load(Ordering::Relaxed)
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    wait_for(100).await;
    // Move every copyset's leadership once (the client follows redirects).
    let copysets = s
        .cluster
        .control()
        .call("copysets", |mut c| async move {
            c.get_copysets(proto::GetCopysetsRequest { copysets: vec![] })
                .await
        })
        .await
        .unwrap()
        .copysets;
    for c in &copysets {
        let peers: Vec<std::net::SocketAddr> =
            c.peers.iter().map(|p| p.addr.parse().unwrap()).collect();
        let to = c
            .peers
            .iter()
            .map(|p| p.id)
            .find(|id| *id != c.leader)
            .unwrap();
        chunks.transfer_leader(&peers, c.id, to).await.unwrap();
    }
    let before_kill = acked.load(Ordering::Relaxed);
    wait_for(before_kill + 100).await;
    // Kill a chunkserver (it leads some copysets now).
    let killed_at = acked.load(Ordering::Relaxed);
    s.servers[1].kill();
    wait_for(killed_at + 200).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for w in writers {
        all.extend(w.await.unwrap());
    }
    eprintln!(
        "{} writes acknowledged; {} after the transfers, {} after the kill",
        all.len(),
        all.len() as u64 - before_kill,
        all.len() as u64 - killed_at
    );
    for offset in all {
        let mut got = vec![0u8; PAGE_BYTES as usize];
        v.read_at(offset, &mut got).await.unwrap();
        assert!(
            got == page_of(offset, PAGE_BYTES as usize),
            "page at {offset}"
        );
    }
}

/// A writer cut off from the control plane stops writing once its lease
/// runs out (another client could be given the volume then), and goes on
/// when the control plane is back and renews it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_stops_when_its_lease_cannot_be_renewed() {
    let mut s = setup_with("leased", GIB, |c| c.cluster.write_lease_ms = 1500).await;
    let v = s
        .cluster
        .open("leased", OpenMode::ReadWrite { force: false })
        .await
        .unwrap();
    v.write_at(0, &[1; 4096]).await.unwrap();
    s.control.kill();
    let killed = Instant::now();
    let stopped = eventually("writes refused", Duration::from_secs(10), || async {
        match v.write_at(4096, &[2; 4096]).await {
            Err(VolumeError::LeaseExpired(_)) => Some(killed.elapsed()),
            _ => None,
        }
    })
    .await;
    eprintln!("writes stopped {stopped:?} after the control plane went");
    assert!(stopped <= Duration::from_millis(1500), "{stopped:?}");
    // Reads go on: they need no lease.
    let mut got = vec![0u8; 4096];
    v.read_at(0, &mut got).await.unwrap();
    assert!(got.iter().all(|b| *b == 1));
    s.control.start_again();
    eventually("writes resume", Duration::from_secs(30), || async {
        v.write_at(8192, &[3; 4096]).await.ok()
    })
    .await;
}
