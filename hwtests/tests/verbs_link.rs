//! The fabric protocol over RC queue pairs: two links on the configured
//! device, driven from one thread. Eager RPCs travel in SENDs; a 1 MiB
//! message and a 1 MiB RPC response travel by RDMA READ into buffers the
//! receiver chose. Skips without a device.

use std::time::{Duration, Instant};

use quiver_fabric::arena::{Arena, ArenaConfig, SizeClass};
use quiver_fabric::proto::{AmData, ConnConfig, Event, Payload};
use quiver_fabric::verbs::link::{recvs_posted, VerbsLink};
use quiver_fabric::verbs::rc::RcDevice;

const ECHO: u16 = 1;
const DEADLINE: Duration = Duration::from_secs(20);

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 + 7) as u8).collect()
}

#[test]
fn rpcs_and_remote_read_rendezvous_over_rc_queue_pairs() {
    let Some((device, gid_index)) = quiver_hwtests::configured_device() else {
        quiver_hwtests::skip(
            "verbs link",
            "QUIVER_RDMA_DEVICE not set (run under soft-roce/run-in-qemu.sh)",
        );
        return;
    };
    let arena = Arena::new(&ArenaConfig {
        classes: vec![
            SizeClass {
                buf_bytes: 64 << 10,
                // Each link: its posted receives and 16 staging buffers.
                count: 2 * (recvs_posted(&ConnConfig::default()) + 16) + 8,
            },
            SizeClass {
                buf_bytes: 256 << 10,
                count: 16,
            },
            SizeClass {
                buf_bytes: 1 << 20,
                count: 8,
            },
        ],
        huge_pages: false,
    })
    .unwrap();
    let span = arena.region_span();
    // SAFETY: the arena outlives the device.
    let dev =
        unsafe { RcDevice::open(&device, 1, gid_index as u8, span.addr, span.bytes) }.unwrap();
    let (lkey, rkey) = dev.keys();
    arena.set_rdma_keys(lkey, rkey);
    let config = ConnConfig::default();
    let mut client = VerbsLink::new(&dev, &arena, config, 1).unwrap();
    let mut server = VerbsLink::new(&dev, &arena, config, 2).unwrap();
    let (ci, si) = (client.info(dev.gid()), server.info(dev.gid()));
    client.connect(si).unwrap();
    server.connect(ci).unwrap();

    let small = pattern(64);
    let big = pattern(1 << 20);
    let started = Instant::now();
    let mut sent_big = None;
    let mut results = Vec::new();
    let mut big_delivered = false;
    while started.elapsed() < DEADLINE
        && (results.len() < 2 || !big_delivered || sent_big.is_some())
    {
        let now = Instant::now();
        client.progress(now).unwrap();
        server.progress(now).unwrap();
        // Start the traffic once both hellos are through.
        if client.conn().is_established()
            && results.is_empty()
            && sent_big.is_none()
            && !big_delivered
        {
            let timeout = Duration::from_secs(10);
            client
                .conn()
                .rpc_call(now, ECHO, b"s", Payload::Bytes(&small), timeout)
                .unwrap();
            client
                .conn()
                .rpc_call(now, ECHO, b"b", Payload::Bytes(&big), timeout)
                .unwrap();
            let mut buf = arena.alloc(big.len()).unwrap();
            buf.copy_from_slice(&big);
            sent_big = Some(
                client
                    .conn()
                    .am_send(2, b"one-way", Payload::Buf(buf.freeze()))
                    .unwrap(),
            );
        }
        while let Some(event) = server.poll_event() {
            if let Event::Am(m) = event {
                match m.data {
                    AmData::Rendezvous(desc) => {
                        let target = arena.alloc(desc.len()).unwrap();
                        server.conn().pull(desc, target).unwrap();
                    }
                    AmData::Eager(p) | AmData::Pulled(p) => {
                        if let Some(reply_to) = m.reply_to {
                            server
                                .conn()
                                .reply(m.am_id, reply_to, &m.header, Payload::Buf(p))
                                .unwrap();
                        } else {
                            assert_eq!(&*m.header, b"one-way");
                            assert!(p[..] == big[..], "the one-way rendezvous arrived intact");
                            big_delivered = true;
                        }
                    }
                    AmData::Aborted => panic!("a pull aborted"),
                }
            }
        }
        while let Some(event) = client.poll_event() {
            match event {
                Event::RpcDone { result, .. } => results.push(result.unwrap()),
                Event::SendDone { id, result } => {
                    result.unwrap();
                    assert_eq!(
                        Some(id),
                        sent_big,
                        "the one-way send completes after the Fin"
                    );
                    sent_big = None;
                }
                _ => {}
            }
        }
    }
    assert_eq!(results.len(), 2, "RPCs answered within {DEADLINE:?}");
    results.sort_by_key(|r| r.payload.len());
    assert_eq!(
        (&*results[0].header, &results[0].payload[..]),
        (&b"s"[..], &small[..])
    );
    assert_eq!(&*results[1].header, b"b");
    assert!(
        results[1].payload[..] == big[..],
        "the 1 MiB echo came back intact by RDMA READ"
    );
    assert!(big_delivered && sent_big.is_none());
    let stats = client.conn().stats();
    assert!(stats.rendezvous_sent >= 2, "{stats:?}");
    println!(
        "{device}: eager RPC, 1 MiB RPC both ways and a 1 MiB one-way message over RC QPs in {:?} ({stats:?})",
        started.elapsed()
    );
    drop((client, server, dev));
}
