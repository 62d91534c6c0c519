//! Latency of the fabric protocol over RC queue pairs (`verbs::link`): 64-byte
//! RPC ping-pong between a client link and a server link on the configured
//! device, the server on its own thread. Run it in the soft-RoCE guest next to
//! perftest (`soft-roce/run-in-qemu.sh --perftest 64 .../link_pingpong`) and
//! compare with ib_send_lat from the same run. Under TCG emulation the
//! absolute figures mean little; the ratio is the figure.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use quiver_fabric::arena::{Arena, ArenaConfig, SizeClass};
use quiver_fabric::proto::{AmData, ConnConfig, Event, Payload};
use quiver_fabric::verbs::link::{recvs_posted, VerbsLink};
use quiver_fabric::verbs::rc::RcDevice;

const ECHO: u16 = 1;
/// Round trips measured (after WARMUP).
const ITERS: usize = 5000;
const WARMUP: usize = 500;
/// A round trip taking longer than this is a failure, not a sample.
const TIMEOUT: Duration = Duration::from_secs(5);

fn main() {
    let Some((device, gid_index)) = quiver_hwtests::configured_device() else {
        quiver_hwtests::skip(
            "link_pingpong",
            "QUIVER_RDMA_DEVICE not set (run under soft-roce/run-in-qemu.sh)",
        );
        return;
    };
    let size: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(64);
    let config = ConnConfig::default();
    let arena = Arena::new(&ArenaConfig {
        classes: vec![
            SizeClass {
                buf_bytes: 64 << 10,
                count: 2 * (recvs_posted(&config) + 16) + 8,
            },
            SizeClass {
                buf_bytes: 256 << 10,
                count: 16,
            },
        ],
        huge_pages: false,
    })
    .expect("arena");
    let span = arena.region_span();
    // SAFETY: the arena outlives the device.
    let dev = unsafe { RcDevice::open(&device, 1, gid_index as u8, span.addr, span.bytes) }
        .expect("device");
    let (lkey, rkey) = dev.keys();
    arena.set_rdma_keys(lkey, rkey);
    let mut client = VerbsLink::new(&dev, &arena, config, 1).expect("client link");
    let mut server = VerbsLink::new(&dev, &arena, config, 2).expect("server link");
    let (ci, si) = (client.info(dev.gid()), server.info(dev.gid()));
    client.connect(si).expect("connect");
    server.connect(ci).expect("connect");

    let stop = Arc::new(AtomicBool::new(false));
    let stop_server = Arc::clone(&stop);
    let server = std::thread::spawn(move || {
        while !stop_server.load(Ordering::Relaxed) {
            server.progress(Instant::now()).expect("server progress");
            while let Some(event) = server.poll_event() {
                if let Event::Am(m) = event {
                    if let (AmData::Eager(p), Some(reply_to)) = (m.data, m.reply_to) {
                        server
                            .conn()
                            .reply(m.am_id, reply_to, &[], Payload::Buf(p))
                            .expect("reply");
                    }
                }
            }
        }
        server
    });

    let payload = vec![7u8; size];
    let mut samples = Vec::with_capacity(ITERS);
    for i in 0..WARMUP + ITERS {
        let sent = Instant::now();
        client
            .conn()
            .rpc_call(sent, ECHO, &[], Payload::Bytes(&payload), TIMEOUT)
            .expect("call");
        'wait: loop {
            client.progress(Instant::now()).expect("client progress");
            while let Some(event) = client.poll_event() {
                if let Event::RpcDone { result, .. } = event {
                    assert_eq!(result.expect("echo").payload.len(), size);
                    break 'wait;
                }
            }
            assert!(sent.elapsed() < TIMEOUT, "round trip {i} timed out");
        }
        if i >= WARMUP {
            samples.push(sent.elapsed().as_nanos() as u64);
        }
    }
    stop.store(true, Ordering::Relaxed);
    let server = server.join().expect("server thread");
    samples.sort_unstable();
    let pct = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize] as f64 / 1000.0;
    println!(
        "LINK-PINGPONG size={size} iters={ITERS} p50_us={:.2} p99_us={:.2} max_us={:.2} (RPC round trip over RC QPs on {device})",
        pct(0.5),
        pct(0.99),
        pct(1.0)
    );
    drop((client, server, dev));
}
