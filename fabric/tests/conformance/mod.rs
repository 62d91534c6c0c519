//! The fabric conformance suite: the worker over real sockets on loopback,
//! with endpoints on the transport the including test file names
//! (`super::TRANSPORT`): TCP in `fabric/tests/tcp.rs`, verbs in
//! `hwtests/tests/verbs_conformance.rs` (soft-RoCE in CI). Echo at eager and
//! rendezvous sizes, many outstanding RPCs, timeouts, garbage and broken peers,
//! a dying server, idle CPU, typed RPC, a receiver out of buffers.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use quiver_fabric::arena::{Arena, ArenaConfig, SizeClass};
use quiver_fabric::echo::{echo_handler, ACK, ACK_BYTES, ECHO, ECHO_AM_ID};
use quiver_fabric::proto::CloseReason;
use quiver_fabric::transport::Offer;
use quiver_fabric::wire::{FrameHeader, FrameKind, Hello, HEADER_BYTES, HELLO_BYTES};
use quiver_fabric::{
    Completion, EndpointTransport, Payload, RpcError, TransportChoice, Worker, WorkerConfig,
};

use super::TRANSPORT;

const SILENT_AM_ID: u16 = 2;
const TIMEOUT: Duration = Duration::from_secs(10);

/// Whether the suite can run on this machine; says why not.
fn unavailable() -> bool {
    if TRANSPORT != TransportChoice::Verbs {
        return false;
    }
    match quiver_fabric::verbs::usable_port() {
        Ok(_) => false,
        Err(e) => {
            println!("SKIP verbs conformance: {e}");
            true
        }
    }
}

fn config() -> WorkerConfig {
    // Logs for whoever sets RUST_LOG (captured per test, shown on failure).
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    WorkerConfig {
        transport: TRANSPORT,
        ..WorkerConfig::default()
    }
}

/// 64 KiB buffers a worker needs beyond its messages: over verbs, the shared
/// receives and each endpoint's staging buffers.
fn transport_buffers() -> usize {
    if TRANSPORT == TransportChoice::Verbs {
        512
    } else {
        0
    }
}

fn arena() -> Arena {
    Arena::new(&ArenaConfig {
        classes: vec![
            SizeClass {
                buf_bytes: 4 << 10,
                count: 256,
            },
            SizeClass {
                buf_bytes: 64 << 10,
                count: 64 + transport_buffers(),
            },
            SizeClass {
                buf_bytes: 1 << 20,
                count: 40,
            },
        ],
        huge_pages: false,
    })
    .unwrap()
}

/// A server worker on its own thread; stops and joins on drop.
struct Server {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    waker: quiver_fabric::WorkerWaker,
    thread: Option<JoinHandle<(quiver_fabric::worker::WorkerStats, Duration)>>,
}

impl Server {
    fn start() -> Server {
        let (tx, rx) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let stop_thread = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut worker = Worker::new(arena(), config()).unwrap();
            worker.set_am_handler(ECHO_AM_ID, echo_handler());
            // Never answers: for timeouts.
            worker.set_am_handler(SILENT_AM_ID, Box::new(|_, _| {}));
            let addr = worker.listen("127.0.0.1:0".parse().unwrap()).unwrap();
            tx.send((addr, worker.waker())).unwrap();
            let cpu_start = thread_cpu_time();
            worker.run(|| stop_thread.load(Ordering::Acquire));
            (worker.stats(), thread_cpu_time() - cpu_start)
        });
        let (addr, waker) = rx.recv().unwrap();
        Server {
            addr,
            stop,
            waker,
            thread: Some(thread),
        }
    }

    /// Stops the server; returns its stats and the CPU time its thread used.
    fn stop(mut self) -> (quiver_fabric::worker::WorkerStats, Duration) {
        self.stop.store(true, Ordering::Release);
        self.waker.wake();
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.stop.store(true, Ordering::Release);
            self.waker.wake();
            let _ = t.join();
        }
    }
}

fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn client() -> Worker {
    Worker::new(arena(), config()).unwrap()
}

/// Connects and checks the endpoint runs on the suite's transport.
fn connect(worker: &mut Worker, addr: SocketAddr) -> quiver_fabric::EndpointId {
    let ep = worker.connect_wait(addr, TIMEOUT).unwrap();
    let want = match TRANSPORT {
        TransportChoice::Verbs => EndpointTransport::Verbs,
        _ => EndpointTransport::Tcp,
    };
    assert_eq!(worker.endpoint_transport(ep), Some(want));
    ep
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + 3) as u8).collect()
}

#[test]
fn echo_round_trips_at_eager_and_rendezvous_sizes() {
    if unavailable() {
        return;
    }
    let server = Server::start();
    let mut worker = client();
    let ep = connect(&mut worker, server.addr);
    for size in [0, 1, 64, 4096, 8000, 8192, 8193, 65536, 300_000, 1 << 20] {
        let data = pattern(size);
        let reply = worker
            .rpc_call_wait(ep, ECHO_AM_ID, &[ECHO], Payload::Bytes(&data), TIMEOUT)
            .unwrap_or_else(|e| panic!("size {size}: {e}"));
        assert_eq!(&*reply.header, &[ECHO]);
        assert!(*reply.payload == data[..], "size {size}: payload differs");
        let ack = worker
            .rpc_call_wait(ep, ECHO_AM_ID, &[ACK], Payload::Bytes(&data), TIMEOUT)
            .unwrap();
        assert_eq!(ack.payload.len(), ACK_BYTES);
    }
    let stats = worker.endpoint_stats(ep).unwrap();
    assert!(
        stats.eager_sent > 0 && stats.rendezvous_sent > 0,
        "{stats:?}"
    );
}

#[test]
fn many_outstanding_rpcs_all_complete() {
    if unavailable() {
        return;
    }
    let server = Server::start();
    let mut worker = client();
    let ep = connect(&mut worker, server.addr);
    let data = pattern(100_000);
    let mut outstanding = std::collections::HashSet::new();
    for _ in 0..200 {
        // More than the 64 credits at once: the rest park and re-drive.
        let id = worker
            .rpc_call(
                ep,
                ECHO_AM_ID,
                &[ACK],
                Payload::Bytes(&data[..1000]),
                TIMEOUT,
            )
            .unwrap();
        outstanding.insert(id);
    }
    for _ in 0..8 {
        let id = worker
            .rpc_call(ep, ECHO_AM_ID, &[ECHO], Payload::Bytes(&data), TIMEOUT)
            .unwrap();
        outstanding.insert(id);
    }
    let deadline = Instant::now() + TIMEOUT;
    while !outstanding.is_empty() && Instant::now() < deadline {
        worker.progress_until(Some(deadline), |w| w.has_completions());
        while let Some(c) = worker.poll_completion() {
            if let Completion::Rpc { id, result, .. } = c {
                let reply = result.unwrap();
                assert!(reply.payload.len() == ACK_BYTES || *reply.payload == data[..]);
                assert!(outstanding.remove(&id));
            }
        }
    }
    assert!(
        outstanding.is_empty(),
        "{} RPCs never completed",
        outstanding.len()
    );
    assert!(worker.endpoint_stats(ep).unwrap().parked > 0);
}

/// Eight endpoints of one client worker to one server, each with eager and
/// rendezvous echoes in flight at once; every payload comes back intact, and
/// closing some endpoints leaves the others working.
#[test]
fn many_endpoints_share_a_worker() {
    if unavailable() {
        return;
    }
    const ENDPOINTS: usize = 8;
    let server = Server::start();
    let mut worker = client();
    let eps: Vec<_> = (0..ENDPOINTS)
        .map(|_| connect(&mut worker, server.addr))
        .collect();
    let payloads: Vec<Vec<u8>> = (0..ENDPOINTS)
        .map(|i| pattern(if i % 2 == 0 { 3000 + i } else { 150_000 + i }))
        .collect();
    let mut outstanding = std::collections::HashMap::new();
    for round in 0..4 {
        for (i, &ep) in eps.iter().enumerate() {
            let id = worker
                .rpc_call(
                    ep,
                    ECHO_AM_ID,
                    &[ECHO],
                    Payload::Bytes(&payloads[i]),
                    TIMEOUT,
                )
                .unwrap();
            // RPC ids are per endpoint.
            outstanding.insert((ep, id), (i, round));
        }
    }
    let deadline = Instant::now() + TIMEOUT;
    while !outstanding.is_empty() && Instant::now() < deadline {
        worker.progress_until(Some(deadline), |w| w.has_completions());
        while let Some(c) = worker.poll_completion() {
            if let Completion::Rpc { ep, id, result } = c {
                let (i, _) = outstanding.remove(&(ep, id)).expect("a known RPC");
                assert!(*result.unwrap().payload == payloads[i][..], "endpoint {i}");
            }
        }
    }
    assert!(
        outstanding.is_empty(),
        "{} RPCs never completed",
        outstanding.len()
    );
    for &ep in &eps[..ENDPOINTS / 2] {
        worker.close(ep, "test done with it");
    }
    for (i, &ep) in eps.iter().enumerate().skip(ENDPOINTS / 2) {
        let reply = worker
            .rpc_call_wait(
                ep,
                ECHO_AM_ID,
                &[ECHO],
                Payload::Bytes(&payloads[i]),
                TIMEOUT,
            )
            .unwrap();
        assert!(*reply.payload == payloads[i][..]);
    }
}

#[test]
fn unanswered_rpcs_time_out() {
    if unavailable() {
        return;
    }
    let server = Server::start();
    let mut worker = client();
    let ep = connect(&mut worker, server.addr);
    let result = worker.rpc_call_wait(
        ep,
        SILENT_AM_ID,
        &[],
        Payload::None,
        Duration::from_millis(50),
    );
    assert_eq!(result.unwrap_err(), RpcError::Timeout);
    // The connection is still good.
    worker
        .rpc_call_wait(ep, ECHO_AM_ID, &[ECHO], Payload::Bytes(b"ok"), TIMEOUT)
        .unwrap();
    // An AM id without a handler is a typed remote error.
    let err = worker
        .rpc_call_wait(ep, 77, &[], Payload::None, TIMEOUT)
        .unwrap_err();
    assert!(matches!(err, RpcError::Remote(e) if e.code == quiver_fabric::worker::NO_HANDLER));
}

/// What a peer without RDMA sends first: its transport offer, then its hello.
fn opening_bytes() -> Vec<u8> {
    let mut h = FrameHeader::new(FrameKind::Hello);
    h.header_len = HELLO_BYTES as u32;
    let mut head = [0u8; HEADER_BYTES];
    h.encode(&mut head);
    let mut body = [0u8; HELLO_BYTES];
    Hello {
        credits: 8,
        eager_bytes_max: 8192,
        message_bytes_max: 1 << 20,
    }
    .encode(&mut body);
    let offer = Offer { verbs: None }.encode();
    [&offer[..], &head[..], &body[..]].concat()
}

#[test]
fn garbage_and_broken_peers_close_only_their_own_connection() {
    if unavailable() {
        return;
    }
    let server = Server::start();
    let mut worker = client();
    let good = connect(&mut worker, server.addr);

    // 1. Pure garbage: the server closes the connection (we read EOF).
    let mut raw = TcpStream::connect(server.addr).unwrap();
    raw.set_read_timeout(Some(TIMEOUT)).unwrap();
    raw.write_all(&[0xAB; 100]).unwrap();
    let mut sink = Vec::new();
    let _ = raw.read_to_end(&mut sink); // EOF (or reset) once the server gives up

    // 2. A valid opening, then an oversized frame header. A verbs-only server
    // refuses the opening itself: it sends its offer and closes.
    let mut raw = TcpStream::connect(server.addr).unwrap();
    raw.set_read_timeout(Some(TIMEOUT)).unwrap();
    raw.write_all(&opening_bytes()).unwrap();
    let mut h = FrameHeader::new(FrameKind::Eager);
    h.payload_len = u32::MAX;
    let mut head = [0u8; HEADER_BYTES];
    h.encode(&mut head);
    raw.write_all(&head).unwrap();
    let mut sink = Vec::new();
    let _ = raw.read_to_end(&mut sink);
    let reason = b"exceeds the limit";
    if TRANSPORT == TransportChoice::Verbs {
        assert_eq!(sink.len(), quiver_fabric::transport::OFFER_BYTES);
    } else {
        assert!(
            sink.windows(reason.len()).any(|w| w == reason),
            "the server says why in its Close frame: {:?}",
            String::from_utf8_lossy(&sink)
        );
    }

    // 3. A valid hello, then half a message, then the peer vanishes.
    let mut raw = TcpStream::connect(server.addr).unwrap();
    raw.write_all(&opening_bytes()).unwrap();
    let mut h = FrameHeader::new(FrameKind::Eager);
    h.am_id = ECHO_AM_ID;
    h.payload_len = 4000;
    h.encode(&mut head);
    raw.write_all(&head).unwrap();
    raw.write_all(&[1; 1000]).unwrap();
    drop(raw);

    // 4. Truncated header, then close.
    let mut raw = TcpStream::connect(server.addr).unwrap();
    raw.write_all(&opening_bytes()[..10]).unwrap();
    drop(raw);

    // The well-behaved connection never noticed.
    for _ in 0..10 {
        let reply = worker
            .rpc_call_wait(
                good,
                ECHO_AM_ID,
                &[ECHO],
                Payload::Bytes(b"still here"),
                TIMEOUT,
            )
            .unwrap();
        assert_eq!(&*reply.payload, b"still here");
    }
    let (stats, _) = server.stop();
    let bad = if TRANSPORT == TransportChoice::Verbs {
        1 // the garbage offer; the others were refused as peers without RDMA
    } else {
        2
    };
    assert!(stats.closed_bad_frames >= bad, "{stats:?}");
}

#[test]
fn a_server_that_dies_fails_outstanding_rpcs_with_disconnected() {
    if unavailable() {
        return;
    }
    let server = Server::start();
    let mut worker = client();
    let ep = connect(&mut worker, server.addr);
    let id = worker
        .rpc_call(ep, SILENT_AM_ID, &[], Payload::None, TIMEOUT)
        .unwrap();
    worker.progress();
    server.stop();
    let started = Instant::now();
    assert_eq!(worker.wait_rpc(ep, id).unwrap_err(), RpcError::Disconnected);
    assert!(
        started.elapsed() < TIMEOUT,
        "failed by the disconnect, not the deadline"
    );
    let closed = std::iter::from_fn(|| worker.poll_completion()).any(|c| {
        matches!(
            c,
            Completion::Closed {
                reason: CloseReason::Transport(_),
                ..
            }
        )
    });
    assert!(closed);
}

#[test]
fn an_idle_server_sleeps() {
    if unavailable() {
        return;
    }
    let server = Server::start();
    let mut worker = client();
    let ep = connect(&mut worker, server.addr);
    worker
        .rpc_call_wait(ep, ECHO_AM_ID, &[ECHO], Payload::Bytes(b"hi"), TIMEOUT)
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let (stats, cpu) = server.stop();
    eprintln!("idle server: {cpu:?} CPU in 0.5 s; {stats:?}");
    // Generous bound (10% of the idle half second): this catches a spinning
    // loop, not a slow machine. The figure itself is in BENCHMARKS.md.
    assert!(
        cpu < Duration::from_millis(50),
        "idle server used {cpu:?} of CPU; {stats:?}"
    );
}

mod typed {
    use super::*;
    use quiver_fabric::rpc::{self, Method, Reply, BAD_REQUEST};

    #[derive(rkyv::Archive, rkyv::Serialize, Debug)]
    pub struct LookupRequest {
        pub key: u64,
        pub tag: String,
    }

    #[derive(rkyv::Archive, rkyv::Serialize, Debug)]
    pub struct LookupResponse {
        pub value: u64,
        pub tag_len: u32,
    }

    pub struct Lookup;
    impl Method for Lookup {
        const AM_ID: u16 = 3;
        type Request = LookupRequest;
        type Response = LookupResponse;
    }

    /// Pointed at the echo service, which returns the 12-byte request header:
    /// too short for the response type.
    struct Confused;
    impl Method for Confused {
        const AM_ID: u16 = ECHO_AM_ID;
        type Request = LookupResponse;
        type Response = LookupRequest;
    }

    #[test]
    fn typed_methods_validate_both_ways() {
        if unavailable() {
            return;
        }
        let (tx, rx) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let stop_thread = Arc::clone(&stop);
        let server = std::thread::spawn(move || {
            let mut worker = Worker::new(arena(), config()).unwrap();
            worker.set_am_handler(ECHO_AM_ID, echo_handler());
            worker.set_am_handler(
                Lookup::AM_ID,
                rpc::serve::<Lookup, _>(|_, req, payload| {
                    let key = req.key.to_native();
                    if key == 0 {
                        return Reply::Err(7, "key zero".into());
                    }
                    let response = LookupResponse {
                        value: key * 2,
                        tag_len: req.tag.len() as u32,
                    };
                    Reply::Ok(response, payload)
                }),
            );
            let addr = worker.listen("127.0.0.1:0".parse().unwrap()).unwrap();
            tx.send((addr, worker.waker())).unwrap();
            worker.run(|| stop_thread.load(Ordering::Acquire));
        });
        let (addr, waker) = rx.recv().unwrap();
        let mut worker = client();
        let ep = connect(&mut worker, addr);

        let request = LookupRequest {
            key: 21,
            tag: "copyset-7".into(),
        };
        let data = pattern(100_000);
        let id =
            rpc::call::<Lookup>(&mut worker, ep, &request, Payload::Bytes(&data), TIMEOUT).unwrap();
        let reply = worker.wait_rpc(ep, id).unwrap();
        let response = rpc::response::<Lookup>(&reply).unwrap();
        assert_eq!(
            (response.value.to_native(), response.tag_len.to_native()),
            (42, 9)
        );
        assert!(
            *reply.payload == data[..],
            "the rendezvous payload came back"
        );

        let zero = LookupRequest {
            key: 0,
            tag: String::new(),
        };
        let id = rpc::call::<Lookup>(&mut worker, ep, &zero, Payload::None, TIMEOUT).unwrap();
        let err = worker.wait_rpc(ep, id).unwrap_err();
        assert!(matches!(err, RpcError::Remote(e) if e.code == 7 && e.message == "key zero"));

        // A request header that does not validate is refused by the server.
        let err = worker
            .rpc_call_wait(ep, Lookup::AM_ID, &[0xff; 3], Payload::None, TIMEOUT)
            .unwrap_err();
        assert!(
            matches!(&err, RpcError::Remote(e) if e.code == BAD_REQUEST),
            "{err:?}"
        );

        // A response that does not validate is a typed error at the caller.
        let odd = LookupResponse {
            value: u64::MAX,
            tag_len: u32::MAX,
        };
        let id = rpc::call::<Confused>(&mut worker, ep, &odd, Payload::None, TIMEOUT).unwrap();
        let reply = worker.wait_rpc(ep, id).unwrap();
        assert!(matches!(
            rpc::response::<Confused>(&reply),
            Err(RpcError::BadMessage(_))
        ));

        stop.store(true, Ordering::Release);
        waker.wake();
        server.join().unwrap();
    }
}

/// A server whose handlers hold every receive buffer stops reading (the
/// sender is pushed back by TCP), and resumes by itself once buffers return,
/// with no new traffic to wake it.
#[test]
fn a_receiver_out_of_buffers_pauses_and_resumes() {
    if unavailable() {
        return;
    }
    use quiver_fabric::arena::Buf;
    use quiver_fabric::AmData;
    use std::sync::Mutex;

    let held: Arc<Mutex<Vec<Buf>>> = Arc::new(Mutex::new(Vec::new()));
    let held_server = Arc::clone(&held);
    let (tx, rx) = mpsc::channel();
    let stop = Arc::new(AtomicBool::new(false));
    let stop_thread = Arc::clone(&stop);
    let server = std::thread::spawn(move || {
        // Three receive buffers only.
        let arena = Arena::new(&ArenaConfig {
            classes: vec![
                SizeClass {
                    buf_bytes: 4 << 10,
                    count: 64,
                },
                SizeClass {
                    buf_bytes: 64 << 10,
                    count: transport_buffers().max(1),
                },
                SizeClass {
                    buf_bytes: 256 << 10,
                    count: 3,
                },
            ],
            huge_pages: false,
        })
        .unwrap();
        let mut worker = Worker::new(arena, config()).unwrap();
        worker.set_am_handler(
            ECHO_AM_ID,
            Box::new(move |ctx, m| {
                if let (AmData::Eager(payload), Some(reply_to)) = (m.data, m.reply_to) {
                    held_server.lock().unwrap().push(payload); // keep the receive buffer
                    ctx.reply(ECHO_AM_ID, reply_to, &[], Payload::Bytes(&[1; ACK_BYTES]))
                        .unwrap();
                }
            }),
        );
        let addr = worker.listen("127.0.0.1:0".parse().unwrap()).unwrap();
        tx.send((addr, worker.waker())).unwrap();
        worker.run(|| stop_thread.load(Ordering::Acquire));
    });
    let (addr, waker) = rx.recv().unwrap();
    let mut worker = client();
    let ep = connect(&mut worker, addr);
    let data = pattern(32 << 10);
    const MESSAGES: usize = 40;
    for _ in 0..MESSAGES {
        worker
            .rpc_call(ep, ECHO_AM_ID, &[ACK], Payload::Bytes(&data), TIMEOUT)
            .unwrap();
    }
    let mut answered = 0;
    let deadline = Instant::now() + Duration::from_millis(300);
    while Instant::now() < deadline {
        worker.progress_until(Some(deadline), |w| w.has_completions());
        while let Some(c) = worker.poll_completion() {
            if let Completion::Rpc { result, .. } = c {
                result.unwrap();
                answered += 1;
            }
        }
    }
    assert!(
        answered < MESSAGES,
        "the server never ran out of buffers ({answered} answered)"
    );
    // Give the buffers back; nothing else happens on the wire.
    held.lock().unwrap().clear();
    let deadline = Instant::now() + TIMEOUT;
    while answered < MESSAGES && Instant::now() < deadline {
        worker.progress_until(Some(deadline), |w| w.has_completions());
        while let Some(c) = worker.poll_completion() {
            if let Completion::Rpc { result, .. } = c {
                result.unwrap();
                answered += 1;
                held.lock().unwrap().clear();
            }
        }
    }
    assert_eq!(answered, MESSAGES);
    stop.store(true, Ordering::Release);
    waker.wake();
    server.join().unwrap();
}
