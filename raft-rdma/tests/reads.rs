//! Reads are served without holding the chunkserver's thread: many are in
//! flight on the disk at once, interleaved with writes to the same pages,
//! and a bad one is answered with its own error while the rest go on.

mod common;

use std::sync::Arc;

use common::{create_copyset, tcp_worker_config, three_chunkservers};
use quiver_raft::chunk_client::{ChunkClient, ClientError};
use quiver_raft::service::ChunkError;

/// Page `p` of the test's chunk 7 after `round` rewrites.
fn page(p: u64, round: u8) -> Vec<u8> {
    let mut data = vec![round; 4096];
    data[..8].copy_from_slice(&p.to_le_bytes());
    data
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_reads_at_once_come_back_right_beside_writes_and_bad_reads() {
    const PAGES: u64 = 64;
    let root = tempfile::tempdir().unwrap();
    let (servers, addrs) = three_chunkservers(root.path()).await;
    let client = Arc::new(ChunkClient::start(tcp_worker_config()).unwrap());
    create_copyset(&client, 1, &addrs).await;
    for p in 0..PAGES {
        client
            .write(&addrs, 1, 7, p * 4096, 0, &page(p, 1))
            .await
            .unwrap();
    }

    // Every page read at once, half of them rewritten at the same time: a
    // read sees the page whole, before or after its rewrite, never torn.
    let mut reads = Vec::new();
    for p in 0..PAGES {
        let (client, addrs) = (Arc::clone(&client), addrs.clone());
        reads.push(tokio::spawn(async move {
            (p, client.read(&addrs, 1, 7, p * 4096, 4096).await)
        }));
    }
    let mut writes = Vec::new();
    for p in (0..PAGES).step_by(2) {
        let (client, addrs) = (Arc::clone(&client), addrs.clone());
        writes.push(tokio::spawn(async move {
            client.write(&addrs, 1, 7, p * 4096, 0, &page(p, 2)).await
        }));
    }
    // Bad reads among them: each gets its own typed error.
    let missing = client.read(&addrs, 1, 99, 0, 4096).await;
    assert!(
        matches!(
            missing,
            Err(ClientError::Refused {
                error: ChunkError::NoSuchChunk { chunk: 99, .. },
                ..
            })
        ),
        "a read of a missing chunk: {missing:?}"
    );
    let outside = client.read(&addrs, 1, 7, 16 << 20, 4096).await;
    assert!(
        matches!(
            outside,
            Err(ClientError::Refused {
                error: ChunkError::OutOfRange { .. },
                ..
            })
        ),
        "a read past the chunk's end: {outside:?}"
    );
    for r in reads {
        let (p, got) = r.await.unwrap();
        let got = got.unwrap();
        assert!(
            got == page(p, 1) || (p % 2 == 0 && got == page(p, 2)),
            "page {p} read back as neither of its writes"
        );
    }
    for w in writes {
        w.await.unwrap().unwrap();
    }
    // Once acknowledged, every rewrite reads back, and the disk still works.
    for p in 0..PAGES {
        let want = page(p, if p % 2 == 0 { 2 } else { 1 });
        let got = client.read(&addrs, 1, 7, p * 4096, 4096).await.unwrap();
        assert!(got == want, "page {p} after the rewrites");
    }
    for s in servers {
        s.shutdown().await;
    }
}
