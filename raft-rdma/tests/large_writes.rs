//! Many large writes in flight at once on one copyset. Their bodies arrive
//! by rendezvous, each in one of the fabric's 64 large buffers, and stay
//! in it until applied: this must not starve the node of buffers (found by
//! review: with every body kept, 80 concurrent writes wedged the copyset).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{create_copyset, tcp_worker_config, three_chunkservers};
use quiver_raft::chunk_client::ChunkClient;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_and_twenty_eight_large_writes_at_once_all_land() {
    let root = tempfile::tempdir().unwrap();
    let (servers, addrs) = three_chunkservers(root.path()).await;
    let admin = ChunkClient::start(tcp_worker_config()).unwrap();
    create_copyset(&admin, 1, &addrs).await;
    admin
        .write(&addrs, 1, 100, 0, 0, &[1u8; 4096])
        .await
        .unwrap();

    const BIG: usize = 256 << 10;
    let (clients, per) = (4usize, 32usize);
    let place = |i: usize| ((i % 8) as u64, ((i / 8) * BIG) as u64);
    let data = |i: usize| vec![(i % 251) as u8; BIG];
    let mut tasks = Vec::new();
    for c in 0..clients {
        let client = Arc::new(ChunkClient::start(tcp_worker_config()).unwrap());
        for j in 0..per {
            let (client, addrs) = (Arc::clone(&client), addrs.clone());
            let i = c * per + j;
            tasks.push(tokio::spawn(async move {
                let (chunk, offset) = place(i);
                let r = client.write(&addrs, 1, chunk, offset, 0, &data(i)).await;
                (i, r.map_err(|e| e.to_string()))
            }));
        }
    }
    let mut failed = Vec::new();
    for t in tasks {
        if let (i, Err(e)) = t.await.unwrap() {
            failed.push((i, e));
        }
    }
    assert!(
        failed.is_empty(),
        "{} writes failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(3)]
    );
    tokio::time::timeout(
        Duration::from_secs(10),
        admin.write(&addrs, 1, 100, 0, 0, &[2u8; 4096]),
    )
    .await
    .expect("a small write after them in time")
    .unwrap();
    for i in 0..clients * per {
        let (chunk, offset) = place(i);
        let got = admin
            .read(&addrs, 1, chunk, offset, BIG as u64)
            .await
            .unwrap();
        assert!(got == data(i), "write {i} reads back different");
    }
    for s in servers {
        s.shutdown().await;
    }
}
