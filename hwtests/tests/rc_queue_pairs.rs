//! Two RC queue pairs on the configured device, connected to each other,
//! through our dlopen'ed verbs: SEND/RECV, RDMA READ and RDMA WRITE of arena
//! buffers registered once. Skips without a device.

use std::time::{Duration, Instant};

use quiver_fabric::arena::{Arena, ArenaConfig, SizeClass};
use quiver_fabric::verbs::rc::{
    Completion, Cq, QpInfo, RcDevice, WR_RDMA_READ, WR_RDMA_WRITE, WR_SEND,
};

/// A completion that takes longer than this means the QP is broken (never hang).
const COMPLETION_TIMEOUT: Duration = Duration::from_secs(10);

fn wait(cq: &Cq, n: usize) -> Vec<Completion> {
    let mut got = Vec::new();
    let started = Instant::now();
    while got.len() < n {
        let want = n - got.len();
        cq.poll(&mut got, want).unwrap();
        assert!(
            started.elapsed() < COMPLETION_TIMEOUT,
            "only {} of {n} completions: {got:?}",
            got.len()
        );
        std::hint::spin_loop();
    }
    assert!(
        got.iter().all(|c| c.status == 0),
        "a work request failed: {got:?}"
    );
    got
}

#[test]
fn send_recv_read_and_write_between_two_queue_pairs() {
    let Some((device, gid_index)) = quiver_hwtests::configured_device() else {
        quiver_hwtests::skip(
            "rc queue pairs",
            "QUIVER_RDMA_DEVICE not set (run under soft-roce/run-in-qemu.sh)",
        );
        return;
    };
    let arena = Arena::new(&ArenaConfig {
        classes: vec![SizeClass {
            buf_bytes: 64 << 10,
            count: 8,
        }],
        huge_pages: false,
    })
    .unwrap();
    let span = arena.region_span();
    // SAFETY: the arena outlives the device (dropped after it, below).
    let dev =
        unsafe { RcDevice::open(&device, 1, gid_index as u8, span.addr, span.bytes) }.unwrap();
    let (lkey, rkey) = dev.keys();
    arena.set_rdma_keys(lkey, rkey);
    let cq = dev.create_cq(64).unwrap();
    let a = dev.create_qp(&cq, 16).unwrap();
    let b = dev.create_qp(&cq, 16).unwrap();
    a.connect(
        100,
        QpInfo {
            qpn: b.qpn(),
            psn: 200,
            gid: dev.gid(),
        },
    )
    .unwrap();
    b.connect(
        200,
        QpInfo {
            qpn: a.qpn(),
            psn: 100,
            gid: dev.gid(),
        },
    )
    .unwrap();

    let fill = |seed: u8| {
        let mut buf = arena.alloc(64 << 10).unwrap();
        for (i, byte) in buf.iter_mut().enumerate() {
            *byte = (i as u8).wrapping_mul(13).wrapping_add(seed);
        }
        buf
    };
    let addr = |buf: &[u8]| buf.as_ptr() as u64;

    // SEND / RECV of 64 bytes.
    let message = fill(1);
    let mut inbox = arena.alloc(64 << 10).unwrap();
    inbox.fill(0);
    b.post_recv(1, addr(&inbox), 4096, lkey).unwrap();
    a.post_send(2, WR_SEND, addr(&message), 64, lkey, None)
        .unwrap();
    let done = wait(&cq, 2);
    let recv = done.iter().find(|c| c.wr_id == 1).unwrap();
    assert_eq!((recv.byte_len, recv.qp_num), (64, b.qpn()));
    assert_eq!(&inbox[..64], &message[..64]);

    // RDMA READ: A pulls 64 KiB of B's memory (the rendezvous the fabric will use).
    let remote = fill(2);
    let mut pulled = arena.alloc(64 << 10).unwrap();
    pulled.fill(0);
    a.post_send(
        3,
        WR_RDMA_READ,
        addr(&pulled),
        64 << 10,
        lkey,
        Some((addr(&remote), rkey)),
    )
    .unwrap();
    wait(&cq, 1);
    assert!(pulled[..] == remote[..], "RDMA READ brought other bytes");

    // RDMA WRITE: A pushes into B's memory.
    let pushed = fill(3);
    let mut landing = arena.alloc(64 << 10).unwrap();
    landing.fill(0);
    a.post_send(
        4,
        WR_RDMA_WRITE,
        addr(&pushed),
        64 << 10,
        lkey,
        Some((addr(&landing), rkey)),
    )
    .unwrap();
    wait(&cq, 1);
    assert!(landing[..] == pushed[..], "RDMA WRITE left other bytes");
    println!(
        "{device}: RC SEND/RECV 64 B, RDMA READ 64 KiB, RDMA WRITE 64 KiB between QPs {} and {}",
        a.qpn(),
        b.qpn()
    );
    drop((a, b, cq, dev));
}
