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
    let cq = dev.create_cq(64, None).unwrap();
    let a = dev.create_qp(&cq, None, 16).unwrap();
    let b = dev.create_qp(&cq, None, 16).unwrap();
    a.connect(
        100,
        QpInfo {
            qpn: b.qpn(),
            psn: 200,
            gid: dev.gid(),
            mtu: 1024,
        },
    )
    .unwrap();
    b.connect(
        200,
        QpInfo {
            qpn: a.qpn(),
            psn: 100,
            gid: dev.gid(),
            mtu: 1024,
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

/// A shared receive queue feeds two queue pairs, and an idle receiver sleeps
/// on the completion channel until a message wakes it (no spinning).
#[test]
fn a_shared_receive_queue_and_a_sleeping_completion_channel() {
    let Some((device, gid_index)) = quiver_hwtests::configured_device() else {
        quiver_hwtests::skip(
            "srq and channel",
            "QUIVER_RDMA_DEVICE not set (run under soft-roce/run-in-qemu.sh)",
        );
        return;
    };
    let arena = Arena::new(&ArenaConfig {
        classes: vec![SizeClass {
            buf_bytes: 4 << 10,
            count: 32,
        }],
        huge_pages: false,
    })
    .unwrap();
    let span = arena.region_span();
    // SAFETY: the arena outlives the device.
    let dev =
        unsafe { RcDevice::open(&device, 1, gid_index as u8, span.addr, span.bytes) }.unwrap();
    let (lkey, _) = dev.keys();
    let channel = dev.create_channel().unwrap();
    let send_cq = dev.create_cq(64, None).unwrap();
    let recv_cq = dev.create_cq(64, Some(&channel)).unwrap();
    let srq = dev.create_srq(16).unwrap();
    // Two senders on send_cq; two receivers sharing the SRQ, completing on recv_cq.
    let s1 = dev.create_qp(&send_cq, None, 16).unwrap();
    let s2 = dev.create_qp(&send_cq, None, 16).unwrap();
    let r1 = dev.create_qp(&recv_cq, Some(&srq), 16).unwrap();
    let r2 = dev.create_qp(&recv_cq, Some(&srq), 16).unwrap();
    let gid = dev.gid();
    for (s, r) in [(&s1, &r1), (&s2, &r2)] {
        s.connect(
            10,
            QpInfo {
                qpn: r.qpn(),
                psn: 20,
                gid,
                mtu: 1024,
            },
        )
        .unwrap();
        r.connect(
            20,
            QpInfo {
                qpn: s.qpn(),
                psn: 10,
                gid,
                mtu: 1024,
            },
        )
        .unwrap();
    }
    let inboxes: Vec<_> = (0..4).map(|_| arena.alloc(4096).unwrap()).collect();
    for (i, inbox) in inboxes.iter().enumerate() {
        srq.post_recv(100 + i as u64, inbox.as_ptr() as u64, 4096, lkey)
            .unwrap();
    }
    let mut message = arena.alloc(4096).unwrap();
    message.fill(0x5a);

    // Arm, check nothing is pending, then sleep on the channel's fd while a
    // second thread sends after a pause.
    recv_cq.arm().unwrap();
    let mut got = Vec::new();
    assert_eq!(recv_cq.poll(&mut got, 4).unwrap(), 0);
    let started = Instant::now();
    let message_addr = message.as_ptr() as u64;
    let (s1, s2) = std::thread::scope(|scope| {
        let sender = scope.spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            s1.post_send(1, WR_SEND, message_addr, 100, lkey, None)
                .unwrap();
            s2.post_send(2, WR_SEND, message_addr, 200, lkey, None)
                .unwrap();
            (s1, s2)
        });
        let mut pfd = libc::pollfd {
            fd: channel.fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let ready = unsafe { libc::poll(&mut pfd, 1, COMPLETION_TIMEOUT.as_millis() as i32) };
        assert_eq!(ready, 1, "the channel never woke the sleeper");
        sender.join().unwrap()
    });
    let slept = started.elapsed();
    channel.take_event(&recv_cq).unwrap();
    let received = wait(&recv_cq, 2);
    wait(&send_cq, 2);
    let mut lens: Vec<_> = received.iter().map(|c| (c.qp_num, c.byte_len)).collect();
    lens.sort();
    let mut expected = vec![(r1.qpn(), 100), (r2.qpn(), 200)];
    expected.sort();
    assert_eq!(
        lens, expected,
        "each receiver got its sender's message from the shared queue"
    );
    assert!(
        slept >= Duration::from_millis(150),
        "woke before anything was sent ({slept:?})"
    );
    println!("{device}: SRQ fed 2 QPs; the receiver slept {slept:?} on the completion channel");
    drop((s1, s2, r1, r2, srq, send_cq, recv_cq, channel, dev));
}
