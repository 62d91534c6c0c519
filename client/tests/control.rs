//! The control plane with real processes on loopback: `quiver control` and
//! `quiver chunkserver`s reporting to it; etcd (started here) for the HA
//! test.

mod common;

#[path = "../../control/tests/support/etcd.rs"]
mod etcd;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{eventually, page_of, start_server, start_servers, Control, Tuning};
use quiver_control::config::StoreConfig;
use quiver_control::proto;
use quiver_control::store::EtcdConfig;
use quiver_control::ControlClient;
use quiver_raft::chunk_client::ClientError;
use quiver_raft::service::ChunkError;
use tonic::Code;

const TOKEN: &str = "test-token-0123";
const GIB: u64 = 1 << 30;
const PAGE: usize = 4096;

fn control_client(addrs: &[SocketAddr]) -> ControlClient {
    let endpoints: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
    ControlClient::new(&endpoints, TOKEN).unwrap()
}

async fn status(c: &ControlClient) -> Option<proto::ClusterStatus> {
    c.call(
        "status",
        |mut c| async move { c.status(proto::Empty {}).await },
    )
    .await
    .ok()
}

async fn copysets(c: &ControlClient) -> Vec<proto::CopysetInfo> {
    c.call("copysets", |mut c| async move {
        c.get_copysets(proto::GetCopysetsRequest { copysets: vec![] })
            .await
    })
    .await
    .unwrap()
    .copysets
}

async fn create(c: &ControlClient, name: &str, size: u64) -> Result<proto::Volume, Code> {
    let r = proto::CreateVolumeRequest {
        name: name.into(),
        size,
        owner: "tests".into(),
        pool: String::new(),
    };
    c.call("create", |mut c| {
        let r = r.clone();
        async move { c.create_volume(r).await }
    })
    .await
    .map_err(|e| e.code())
}

async fn open(c: &ControlClient, name: &str, client: &str, force: bool) -> Result<u64, Code> {
    let r = proto::OpenVolumeRequest {
        name: name.into(),
        write: true,
        client: client.into(),
        force,
    };
    c.call("open", |mut c| {
        let r = r.clone();
        async move { c.open_volume(r).await }
    })
    .await
    .map(|o| o.epoch)
    .map_err(|e| e.code())
}

async fn segment(
    c: &ControlClient,
    name: &str,
    index: u64,
    epoch: u64,
) -> Result<proto::Segment, Code> {
    let r = proto::GetSegmentRequest {
        volume: name.into(),
        index,
        allocate: true,
        epoch,
    };
    c.call("segment", |mut c| {
        let r = r.clone();
        async move { c.get_segment(r).await }
    })
    .await
    .map_err(|e| e.code())
}

/// The fabric addresses of a copyset's members.
fn members(copysets: &[proto::CopysetInfo], id: u32) -> Vec<SocketAddr> {
    let c = copysets.iter().find(|c| c.id == id).unwrap();
    c.peers.iter().map(|p| p.addr.parse().unwrap()).collect()
}

/// Control + three chunkservers (each its own zone): copysets are placed
/// and become healthy; data is written to a volume's chunks; a chunkserver
/// is killed and a fourth joins: the dead one's replicas move to it,
/// status returns to HEALTH_OK, and every byte written reads back. On the
/// way, a writer whose lease was taken over is fenced by the chunkservers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_chunkservers_replicas_move_to_a_new_one_and_no_data_is_lost() {
    let root = tempfile::tempdir().unwrap();
    // Deleted volumes are purged at once.
    let control = Control::start(root.path(), "control-1", TOKEN, |c| {
        c.cluster.recycle_retention_s = 0;
    });
    let tuning = Tuning {
        control: vec![control.addr.to_string()],
        token: Some(TOKEN.into()),
        ..Tuning::default()
    };
    let mut servers = start_servers(root.path(), 3, &tuning);
    let ctl = control_client(&[control.addr]);
    eventually("six healthy copysets", Duration::from_secs(60), || async {
        status(&ctl)
            .await
            .filter(|s| s.health == "HEALTH_OK" && s.copysets_healthy == 6)
    })
    .await;

    create(&ctl, "data", GIB).await.unwrap();
    let epoch = open(&ctl, "data", "writer-a", false).await.unwrap();
    assert_eq!(epoch, 1);
    let seg = segment(&ctl, "data", 0, epoch).await.unwrap();
    assert_eq!(seg.chunks.len(), 64);
    let map = copysets(&ctl).await;
    let chunk = common::client();
    // Twelve chunks: every copyset gets two.
    for (i, loc) in seg.chunks.iter().take(12).enumerate() {
        let peers = members(&map, loc.copyset);
        chunk
            .write(
                &peers,
                loc.copyset,
                loc.chunk,
                0,
                epoch,
                &page_of(i as u64, PAGE),
            )
            .await
            .unwrap_or_else(|e| panic!("write {i} to {loc:?}: {e}"));
    }

    // Another client takes the volume over: the old writer is fenced.
    assert_eq!(
        open(&ctl, "data", "writer-b", false).await,
        Err(Code::FailedPrecondition)
    );
    let epoch2 = open(&ctl, "data", "writer-b", true).await.unwrap();
    assert_eq!(epoch2, 2);
    let first = &seg.chunks[0];
    let peers0 = members(&map, first.copyset);
    chunk
        .write(
            &peers0,
            first.copyset,
            first.chunk,
            PAGE as u64,
            epoch2,
            &page_of(100, PAGE),
        )
        .await
        .unwrap();
    match chunk
        .write(
            &peers0,
            first.copyset,
            first.chunk,
            PAGE as u64,
            epoch,
            &page_of(101, PAGE),
        )
        .await
    {
        Err(ClientError::Refused {
            error:
                ChunkError::StaleEpoch {
                    epoch: 1,
                    current: 2,
                    ..
                },
            ..
        }) => {}
        other => panic!("a write with the old epoch: {other:?}"),
    }

    // Kill node 1; node 4 joins.
    servers[0].kill();
    let fourth = start_server(root.path(), 4, &tuning);
    let healed = Instant::now();
    let s = eventually(
        "HEALTH_OK with node 1 in no copyset",
        Duration::from_secs(120),
        || async {
            let s = status(&ctl).await?;
            let map = copysets(&ctl).await;
            let gone = map.iter().all(|c| c.peers.iter().all(|p| p.id != 1));
            (s.health == "HEALTH_OK" && s.copysets_healthy == 6 && gone).then_some(s)
        },
    )
    .await;
    eprintln!("re-replicated and healthy after {:?}", healed.elapsed());
    let node4 = s.chunkservers.iter().find(|c| c.id == 4).unwrap();
    assert!(node4.online && node4.copysets > 0, "{node4:?}");
    assert!(s.chunkservers.iter().any(|c| c.id == 1 && !c.online));

    // `quiver status --json` says the same.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_quiver"))
        .args(["status", "--json", "--control", &control.addr.to_string()])
        .env("QUIVER_TOKEN", TOKEN)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["health"], "HEALTH_OK", "{json}");
    assert_eq!(json["copysets"]["healthy"], 6);

    // Every page written reads back from the copysets' new members.
    let map = copysets(&ctl).await;
    for (i, loc) in seg.chunks.iter().take(12).enumerate() {
        let peers = members(&map, loc.copyset);
        let data = chunk
            .read(&peers, loc.copyset, loc.chunk, 0, PAGE as u64)
            .await
            .unwrap_or_else(|e| panic!("read {i} from {loc:?}: {e}"));
        assert_eq!(data, page_of(i as u64, PAGE), "chunk {i}");
    }
    let data = chunk
        .read(
            &members(&map, first.copyset),
            first.copyset,
            first.chunk,
            PAGE as u64,
            PAGE as u64,
        )
        .await
        .unwrap();
    assert_eq!(data, page_of(100, PAGE), "the fenced write left no trace");

    // Delete (the writer closes first): the volume is purged and its
    // chunks are deleted on their copysets.
    let close = proto::LeaseRequest {
        name: "data".into(),
        epoch: epoch2,
    };
    ctl.call("close", |mut c| {
        let r = close.clone();
        async move { c.close_volume(r).await }
    })
    .await
    .unwrap();
    ctl.call("delete", |mut c| async move {
        c.delete_volume(proto::VolumeRef {
            name: "data".into(),
        })
        .await
    })
    .await
    .unwrap();
    eventually(
        "the volume purged and its chunks deleted",
        Duration::from_secs(30),
        || async {
            let s = status(&ctl).await?;
            let list = ctl
                .call("list", |mut c| async move {
                    c.list_volumes(proto::ListVolumesRequest { recycled: true })
                        .await
                })
                .await
                .ok()?;
            (list.volumes.is_empty() && s.garbage_chunks == 0).then_some(())
        },
    )
    .await;
    let map = copysets(&ctl).await;
    match chunk
        .read(
            &members(&map, first.copyset),
            first.copyset,
            first.chunk,
            0,
            PAGE as u64,
        )
        .await
    {
        Err(ClientError::Refused {
            error: ChunkError::NoSuchChunk { .. },
            ..
        }) => {}
        other => panic!("a purged chunk reads: {other:?}"),
    }
    drop(fourth);
}

/// Bad requests get clear errors, and the control node keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_refused_clearly() {
    let root = tempfile::tempdir().unwrap();
    let control = Control::start(root.path(), "control-1", TOKEN, |_| {});
    let ctl = control_client(&[control.addr]);
    eventually("the control node answers", Duration::from_secs(20), || {
        status(&ctl)
    })
    .await;

    // Token missing or wrong.
    for token in ["", "wrong"] {
        let c = ControlClient::new(&[control.addr.to_string()], token).unwrap();
        let e = c
            .call(
                "status",
                |mut c| async move { c.status(proto::Empty {}).await },
            )
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{e}");
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_quiver"))
        .args([
            "volume",
            "list",
            "--control",
            &control.addr.to_string(),
            "--token",
            "nope",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("wrong token"));

    // Sizes, names, duplicates, unknown volumes.
    assert_eq!(
        create(&ctl, "v", GIB + 4096).await.unwrap_err(),
        Code::InvalidArgument
    );
    assert_eq!(
        create(&ctl, "v", 0).await.unwrap_err(),
        Code::InvalidArgument
    );
    assert_eq!(
        create(&ctl, "bad/name", GIB).await.unwrap_err(),
        Code::InvalidArgument
    );
    create(&ctl, "v", 2 * GIB).await.unwrap();
    assert_eq!(
        create(&ctl, "v", GIB).await.unwrap_err(),
        Code::AlreadyExists
    );
    let e = ctl
        .call("stat", |mut c| async move {
            c.stat_volume(proto::VolumeRef {
                name: "nope".into(),
            })
            .await
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert!(e.to_string().contains("\"nope\" does not exist"), "{e}");
    assert_eq!(
        open(&ctl, "nope", "a", false).await.unwrap_err(),
        Code::NotFound
    );

    // Leases and epochs.
    let epoch = open(&ctl, "v", "a", false).await.unwrap();
    assert_eq!(
        open(&ctl, "v", "b", false).await.unwrap_err(),
        Code::FailedPrecondition
    );
    assert_eq!(
        segment(&ctl, "v", 0, epoch + 1).await.unwrap_err(),
        Code::FailedPrecondition,
        "allocation with a wrong epoch"
    );
    assert_eq!(
        segment(&ctl, "v", 2, epoch).await.unwrap_err(),
        Code::InvalidArgument,
        "past the end"
    );
    // No copysets (no chunkservers): allocation says why.
    let e = segment(&ctl, "v", 0, epoch).await.unwrap_err();
    assert_eq!(e, Code::FailedPrecondition);

    // Still serving.
    let list = ctl
        .call("list", |mut c| async move {
            c.list_volumes(proto::ListVolumesRequest { recycled: true })
                .await
        })
        .await
        .unwrap();
    assert_eq!(list.volumes.len(), 1);
}

/// Two control nodes on a real etcd: one leads, the other refuses and
/// names it; kill -9 the leader and the other leads within a few seconds,
/// with the metadata intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_control_node_takes_over_on_etcd() {
    let Some(etcd) = etcd::Etcd::start() else {
        return;
    };
    let root = tempfile::tempdir().unwrap();
    let store = |c: &mut quiver_control::ControlConfig| {
        c.store = StoreConfig::Etcd(EtcdConfig {
            endpoints: vec![format!("http://127.0.0.1:{}", etcd.client_port)],
            prefix: "/quiver-ha/".into(),
            lease_ttl_s: 2,
        });
    };
    let mut nodes = [
        Control::start(root.path(), "control-a", TOKEN, store),
        Control::start(root.path(), "control-b", TOKEN, store),
    ];
    let both = control_client(&[nodes[0].addr, nodes[1].addr]);
    let first = eventually("a leader", Duration::from_secs(20), || status(&both)).await;
    assert_eq!(first.store, "etcd");
    create(&both, "kept", 3 * GIB).await.unwrap();
    let epoch = open(&both, "kept", "w", false).await.unwrap();

    let leader = nodes
        .iter()
        .position(|n| n.name == first.leader_name)
        .unwrap();
    let other = 1 - leader;
    // Asked directly, the follower sends the client to the leader.
    let via_follower = control_client(&[nodes[other].addr]);
    let s = status(&via_follower).await.unwrap();
    assert_eq!(s.leader_name, first.leader_name);

    nodes[leader].kill();
    let killed = Instant::now();
    let only_other = control_client(&[nodes[other].addr]);
    let s = eventually("the other node leads", Duration::from_secs(15), || async {
        status(&only_other)
            .await
            .filter(|s| s.leader_name == nodes[other].name)
    })
    .await;
    let took = killed.elapsed();
    eprintln!("control failover took {took:?}");
    assert!(took < Duration::from_secs(8), "failover took {took:?}");
    assert_eq!(s.volumes, 1);
    let v = only_other
        .call("stat", |mut c| async move {
            c.stat_volume(proto::VolumeRef {
                name: "kept".into(),
            })
            .await
        })
        .await
        .unwrap();
    assert_eq!((v.size, v.epoch, v.writer.as_str()), (3 * GIB, epoch, "w"));
    // The new leader honours the old lease.
    assert_eq!(
        open(&only_other, "kept", "x", false).await.unwrap_err(),
        Code::FailedPrecondition
    );
}

/// TLS: a control node with a certificate serves clients that trust its
/// CA; a plain-TCP client gets a clear error, not a hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_plane_speaks_tls() {
    let root = tempfile::tempdir().unwrap();
    let cert =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
    let (cert_file, key_file) = (root.path().join("cert.pem"), root.path().join("key.pem"));
    std::fs::write(&cert_file, cert.cert.pem()).unwrap();
    std::fs::write(&key_file, cert.signing_key.serialize_pem()).unwrap();
    let control = Control::start(root.path(), "control-1", TOKEN, |c| {
        c.tls = Some(quiver_control::config::TlsConfig {
            cert_file: cert_file.clone(),
            key_file: key_file.clone(),
        });
    });
    let endpoints = [control.addr.to_string()];
    let tls = ControlClient::connect(&endpoints, TOKEN, Some(cert.cert.pem().as_bytes())).unwrap();
    let s = eventually("a status over TLS", Duration::from_secs(20), || {
        status(&tls)
    })
    .await;
    assert_eq!(s.leader_name, "control-1");
    create(&tls, "over-tls", GIB).await.unwrap();
    let plain = control_client(&[control.addr]).retry_for(Duration::from_secs(1));
    let e = plain
        .call(
            "status",
            |mut c| async move { c.status(proto::Empty {}).await },
        )
        .await
        .unwrap_err();
    // The TLS server drops the plain-text HTTP/2 connection: an error
    // (its code varies with the moment: cancelled, unavailable, internal).
    assert_ne!(e.code(), Code::Ok, "{e}");
    // The CLI with --ca.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_quiver"))
        .args([
            "volume",
            "list",
            "--control",
            &control.addr.to_string(),
            "--ca",
        ])
        .arg(&cert_file)
        .env("QUIVER_TOKEN", TOKEN)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("over-tls"));
}
