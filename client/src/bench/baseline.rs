//! The baselines `quiver bench fabric` is compared with: the same [`Workload`]
//! carried by plain TCP sockets and by gRPC, both over loopback.
//!
//! Both follow the contract every contender shares, so their numbers can sit
//! beside Quiver's: `warmup` untimed requests first, then a measured part
//! bounded by a [`Deadline`], `deadline.issue()` before each new request, one
//! latency sample per completed request (counting `size` request bytes), and
//! `elapsed` read once the last response is in. Each baseline starts its own
//! server, and stops and joins it before returning, on success or failure.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, ensure, Context};
use prost::bytes::Bytes;
use tokio::sync::oneshot;
use tokio::task::JoinSet;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Endpoint, Server};
use tonic::{Request, Response, Status};

use super::{Deadline, Limit, Mode, RunStats, Workload, STREAM_ACK_BYTES};

/// Plain blocking std::net TCP over loopback: what a user would write by hand.
///
/// One connection, `TCP_NODELAY` on both ends, frames of a 4-byte
/// little-endian length then the payload. The server is a std thread; the
/// client runs on the calling thread. In stream mode the client keeps
/// `w.in_flight()` requests outstanding from that one thread: the server's
/// acks are tiny, so it never blocks writing them while the client is busy
/// writing requests, and the two cannot deadlock.
pub fn raw_tcp(w: &Workload) -> anyhow::Result<RunStats> {
    raw_tcp_with(w, false)
}

/// The raw-TCP baseline with both ends busy-polling non-blocking sockets
/// instead of sleeping in `read`: what a latency-minded user hand-writes, and
/// the honest floor for a transport that spins (this machine's idle-vCPU
/// wake-up costs tens of microseconds per blocking round trip; see FLOOR.md).
pub fn raw_tcp_spin(w: &Workload) -> anyhow::Result<RunStats> {
    raw_tcp_with(w, true)
}

/// A connected pair of loopback TCP sockets (client end, server end), Nagle
/// off. Connected before accepted (the kernel completes the handshake into
/// the backlog), so a thread given the server end only ever gets a connected
/// socket and cannot be left blocked in accept() should the client side fail.
pub fn loopback_pair() -> anyhow::Result<(TcpStream, TcpStream)> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding a loopback listener")?;
    let client = TcpStream::connect(listener.local_addr()?).context("connecting on loopback")?;
    let (server, _) = listener.accept().context("accepting on loopback")?;
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    Ok((client, server))
}

fn raw_tcp_with(w: &Workload, spin: bool) -> anyhow::Result<RunStats> {
    let name = if spin { "raw-tcp-spin" } else { "raw-tcp" };
    ensure!(
        u32::try_from(w.size).is_ok(),
        "request size {} does not fit a u32 length",
        w.size
    );
    let (client, server_sock) = loopback_pair()?;
    client.set_nonblocking(spin)?;
    server_sock.set_nonblocking(spin)?;

    let workload = *w;
    let server = thread::Builder::new()
        .name("raw-tcp-server".into())
        .spawn(move || {
            if spin {
                raw_serve(Spinning(&server_sock), &workload)
            } else {
                raw_serve(&server_sock, &workload)
            }
        })
        .context("spawning the raw-tcp server")?;

    let result = if spin {
        raw_client(Spinning(&client), w, name)
    } else {
        raw_client(&client, w, name)
    };
    // Closing our end is what stops the server: it reads end-of-file at a
    // frame boundary (or, if we quit mid-exchange, fails its next read or
    // write) and returns, so the join below cannot hang.
    let _ = client.shutdown(Shutdown::Both);
    drop(client);
    let served = server
        .join()
        .map_err(|_| anyhow!("the raw-tcp server thread panicked"))?;
    // A client error explains a server one (we hung up on it), so it wins.
    let stats = result?;
    served.context("raw-tcp server")?;
    Ok(stats)
}

/// tonic unary echo over loopback (HTTP/2).
///
/// Service `Bench` from `proto/bench.proto`: `Echo` returns the request's
/// payload (ping-pong), `Ack` returns 8 bytes (stream). In stream mode
/// `w.in_flight()` tasks share one channel (one HTTP/2 connection, as a gRPC
/// user would have) and each issues calls back to back while the shared
/// deadline allows. Must not be called from inside an async runtime: it
/// builds and blocks on its own.
pub fn grpc(w: &Workload) -> anyhow::Result<RunStats> {
    // One runtime with 2 workers for both the server and the client, not one
    // each: the machine has 2 cores and the raw-TCP baseline uses 2 threads,
    // so this gives gRPC the same CPUs without oversubscribing them, and lets
    // tokio move whichever side is busy onto an idle core.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("grpc-bench")
        .enable_all()
        .build()
        .context("building the gRPC benchmark runtime")?;
    let workload = *w;
    // Spawned, not run by block_on itself, so the client also runs on the
    // two workers rather than on a third thread (the caller's).
    let result = runtime.block_on(async move { tokio::spawn(grpc_run(workload)).await? });
    // Joins the worker threads; the bound only matters if a task misbehaves.
    runtime.shutdown_timeout(SHUTDOWN_GRACE);
    result
}

/// Length prefix of a raw-TCP frame.
const LEN_PREFIX: usize = 4;

/// A raw-TCP stream-mode acknowledgement frame: prefix plus ack payload.
const ACK_FRAME: usize = LEN_PREFIX + STREAM_ACK_BYTES;

/// gRPC message size limit, raised from tonic's 4 MiB decode default so
/// large requests are benchmarked rather than rejected.
const MAX_GRPC_MESSAGE: usize = 32 << 20;

/// How long a server may take to stop once asked.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Byte the request payloads are filled with (anything but zeros, so nothing
/// on the way can treat them specially).
const FILL: u8 = 0xa5;

/// The raw-TCP server: answers each request frame until the client closes.
fn raw_serve(mut sock: impl Read + Write, w: &Workload) -> io::Result<()> {
    // One buffer, sized for the largest request, for every message. The echo
    // of a request frame is that same frame, so ping-pong sends the buffer
    // straight back: a single write and no copy.
    let mut frame = vec![0u8; LEN_PREFIX + w.size];
    let ack = ack_frame();
    loop {
        if !read_or_eof(&mut sock, &mut frame[..LEN_PREFIX])? {
            return Ok(());
        }
        let len = u32::from_le_bytes([frame[0], frame[1], frame[2], frame[3]]) as usize;
        if len > w.size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("request of {len} bytes exceeds the workload's {}", w.size),
            ));
        }
        let end = LEN_PREFIX + len;
        sock.read_exact(&mut frame[LEN_PREFIX..end])?;
        match w.mode {
            Mode::Pingpong => sock.write_all(&frame[..end])?,
            Mode::Stream => sock.write_all(&ack)?,
        }
    }
}

/// The raw-TCP client: warm-up, then the measured part.
fn raw_client<S: Read + Write>(mut sock: S, w: &Workload, name: &str) -> anyhow::Result<RunStats> {
    // Every buffer is made here, once. The request is prefix and payload
    // together so each send is a single write_all.
    let mut request = vec![FILL; LEN_PREFIX + w.size];
    request[..LEN_PREFIX].copy_from_slice(&(w.size as u32).to_le_bytes());
    let mut response = vec![0u8; LEN_PREFIX + w.response_bytes()];
    let mut sent = vec![Instant::now(); w.in_flight()];
    let mut phase = |deadline: &mut Deadline, stats: &mut RunStats| match w.mode {
        Mode::Pingpong => raw_pingpong(&mut sock, &request, &mut response, deadline, stats),
        Mode::Stream => raw_stream(&mut sock, &request, &mut sent, deadline, stats),
    };

    let mut warmup = RunStats::new(name, "tcp");
    phase(&mut Deadline::start(Limit::Iters(w.warmup)), &mut warmup).context("raw-tcp warm-up")?;

    let mut stats = RunStats::new(name, "tcp");
    let mut deadline = Deadline::start(w.limit);
    phase(&mut deadline, &mut stats).context("raw-tcp run")?;
    stats.elapsed = deadline.elapsed();
    Ok(stats)
}

/// One request outstanding: send, wait for the echo, repeat.
fn raw_pingpong(
    sock: &mut impl ReadWrite,
    request: &[u8],
    response: &mut [u8],
    deadline: &mut Deadline,
    stats: &mut RunStats,
) -> anyhow::Result<()> {
    let size = request.len() - LEN_PREFIX;
    while deadline.issue() {
        let sent = Instant::now();
        sock.write_all(request)?;
        // The response's size is known, so read the whole frame in one go
        // and check its prefix, rather than paying a second read for it.
        sock.read_exact(response)?;
        let now = Instant::now();
        check_prefix(response, size)?;
        stats.record(sent, now, size);
    }
    Ok(())
}

/// `sent.len()` requests outstanding: prime the window, then send one more
/// per ack while the deadline allows. `sent` is a ring of send times: the
/// single server answers in order, so the oldest send is the one acked.
fn raw_stream(
    sock: &mut impl ReadWrite,
    request: &[u8],
    sent: &mut [Instant],
    deadline: &mut Deadline,
    stats: &mut RunStats,
) -> anyhow::Result<()> {
    let size = request.len() - LEN_PREFIX;
    let window = sent.len();
    let mut ack = [0u8; ACK_FRAME];
    let (mut oldest, mut outstanding) = (0, 0);
    while outstanding < window && deadline.issue() {
        sent[outstanding] = Instant::now();
        sock.write_all(request)?;
        outstanding += 1;
    }
    // Each pass retires one request and adds at most one, and only while
    // the deadline allows, so this ends once the deadline says stop.
    while outstanding > 0 {
        sock.read_exact(&mut ack)?;
        let now = Instant::now();
        check_prefix(&ack, STREAM_ACK_BYTES)?;
        stats.record(sent[oldest], now, size);
        oldest = (oldest + 1) % window;
        outstanding -= 1;
        if deadline.issue() {
            sent[(oldest + outstanding) % window] = Instant::now();
            sock.write_all(request)?;
            outstanding += 1;
        }
    }
    Ok(())
}

/// A socket both ways.
trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

/// A busy-wait spinning on a socket gives up after this long (a dead peer).
const SPIN_LIMIT: Duration = Duration::from_secs(10);

/// A non-blocking socket whose reads and writes spin instead of returning
/// `WouldBlock`, so `read_exact`/`write_all` work on it unchanged.
struct Spinning<'a>(&'a TcpStream);

impl Spinning<'_> {
    fn retry<T>(mut op: impl FnMut() -> io::Result<T>) -> io::Result<T> {
        let started = Instant::now();
        loop {
            match op() {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if started.elapsed() > SPIN_LIMIT {
                        return Err(io::Error::new(io::ErrorKind::TimedOut, "peer silent"));
                    }
                    std::hint::spin_loop();
                }
                other => return other,
            }
        }
    }
}

impl Read for Spinning<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut sock = self.0;
        Self::retry(|| sock.read(buf))
    }
}

impl Write for Spinning<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut sock = self.0;
        Self::retry(|| sock.write(buf))
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Checks that a response frame announces the expected payload length.
fn check_prefix(frame: &[u8], expected: usize) -> anyhow::Result<()> {
    let len = u32::from_le_bytes([frame[0], frame[1], frame[2], frame[3]]) as usize;
    ensure!(
        len == expected,
        "response of {len} bytes, expected {expected}"
    );
    Ok(())
}

/// The prebuilt stream-mode acknowledgement frame.
fn ack_frame() -> [u8; ACK_FRAME] {
    let mut frame = [0u8; ACK_FRAME];
    frame[..LEN_PREFIX].copy_from_slice(&(STREAM_ACK_BYTES as u32).to_le_bytes());
    frame
}

/// Fills `buf` from `sock`; `Ok(false)` if the peer closed cleanly before
/// the first byte (the client is done), an error if it closed part-way.
fn read_or_eof(sock: &mut impl Read, buf: &mut [u8]) -> io::Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        match sock.read(&mut buf[got..]) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Code generated from `proto/bench.proto` by build.rs.
mod pb {
    #![allow(clippy::all, clippy::pedantic)]
    tonic::include_proto!("quiver.bench");
}

use pb::bench_client::BenchClient;
use pb::bench_server::{Bench, BenchServer};
use pb::{EchoReply, EchoRequest};

/// The payload of every stream-mode reply, shared so replying allocates
/// nothing.
static ACK_PAYLOAD: [u8; STREAM_ACK_BYTES] = [0; STREAM_ACK_BYTES];

/// The gRPC server: stateless.
struct BenchService;

#[tonic::async_trait]
impl Bench for BenchService {
    async fn echo(&self, request: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        // Hands the request's buffer back: no copy, like the raw server.
        Ok(Response::new(EchoReply {
            payload: request.into_inner().payload,
        }))
    }

    async fn ack(&self, _request: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        Ok(Response::new(EchoReply {
            payload: Bytes::from_static(&ACK_PAYLOAD),
        }))
    }
}

/// Runs server and client, then stops the server whatever the client did.
async fn grpc_run(w: Workload) -> anyhow::Result<RunStats> {
    let max_message = MAX_GRPC_MESSAGE.max(w.size.saturating_add(1024));
    let incoming = TcpIncoming::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .context("binding the gRPC listener")?
        // Serving from our own listener bypasses the builder's TCP options,
        // so no-delay is set here.
        .with_nodelay(Some(true));
    let addr = incoming.local_addr()?;
    let service = BenchServer::new(BenchService)
        .max_decoding_message_size(max_message)
        .max_encoding_message_size(max_message);
    let (stop, stopped) = oneshot::channel::<()>();
    let mut server = tokio::spawn(
        Server::builder()
            .add_service(service)
            .serve_with_incoming_shutdown(incoming, async {
                // A dropped sender also means stop.
                let _ = stopped.await;
            }),
    );

    // The client's channel is dropped when this returns, so the graceful
    // shutdown below has no open connection to wait for.
    let result = grpc_client(&w, addr, max_message).await;
    let _ = stop.send(());
    let served = match tokio::time::timeout(SHUTDOWN_GRACE, &mut server).await {
        Ok(joined) => joined.context("gRPC server task")?.context("gRPC server"),
        Err(_) => {
            server.abort();
            Err(anyhow!(
                "the gRPC server did not stop within {SHUTDOWN_GRACE:?}"
            ))
        }
    };
    let stats = result?;
    served?;
    Ok(stats)
}

/// Connects, warms up, then runs the measured part.
async fn grpc_client(
    w: &Workload,
    addr: SocketAddr,
    max_message: usize,
) -> anyhow::Result<RunStats> {
    let channel = Endpoint::from_shared(format!("http://{addr}"))?
        .tcp_nodelay(true)
        .connect()
        .await
        .context("connecting to the gRPC server")?;
    let client = BenchClient::new(channel)
        .max_decoding_message_size(max_message)
        .max_encoding_message_size(max_message);
    // Made once; each request takes a reference-counted handle to it.
    let payload = Bytes::from(vec![FILL; w.size]);

    let warmup = Arc::new(Mutex::new(Deadline::start(Limit::Iters(w.warmup))));
    grpc_phase(&client, &payload, w, warmup)
        .await
        .context("gRPC warm-up")?;

    let deadline = Arc::new(Mutex::new(Deadline::start(w.limit)));
    let mut stats = grpc_phase(&client, &payload, w, deadline.clone())
        .await
        .context("gRPC run")?;
    stats.elapsed = deadline
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .elapsed();
    Ok(stats)
}

/// Runs `w.in_flight()` callers (one in ping-pong) against one shared
/// deadline until it says stop, and merges what they measured.
async fn grpc_phase(
    client: &BenchClient<Channel>,
    payload: &Bytes,
    w: &Workload,
    deadline: Arc<Mutex<Deadline>>,
) -> anyhow::Result<RunStats> {
    let mut callers = JoinSet::new();
    for _ in 0..w.in_flight() {
        callers.spawn(grpc_caller(
            client.clone(),
            payload.clone(),
            w.mode,
            deadline.clone(),
        ));
    }
    let mut stats = RunStats::new("grpc", "tcp");
    // Returning early on an error drops the set, which aborts the others.
    while let Some(joined) = callers.join_next().await {
        let part = joined.context("gRPC caller task")??;
        stats
            .latency_ns
            .add(&part.latency_ns)
            .map_err(|e| anyhow!("merging latencies: {e:?}"))?;
        stats.ops += part.ops;
        stats.bytes += part.bytes;
    }
    Ok(stats)
}

/// One caller: a request at a time while the shared deadline allows.
async fn grpc_caller(
    mut client: BenchClient<Channel>,
    payload: Bytes,
    mode: Mode,
    deadline: Arc<Mutex<Deadline>>,
) -> anyhow::Result<RunStats> {
    let expected = match mode {
        Mode::Pingpong => payload.len(),
        Mode::Stream => STREAM_ACK_BYTES,
    };
    let mut stats = RunStats::new("grpc", "tcp");
    while issue(&deadline) {
        let request = EchoRequest {
            payload: payload.clone(),
        };
        let sent = Instant::now();
        let reply = match mode {
            Mode::Pingpong => client.echo(request).await,
            Mode::Stream => client.ack(request).await,
        }?
        .into_inner();
        let now = Instant::now();
        ensure!(
            reply.payload.len() == expected,
            "reply of {} bytes, expected {expected}",
            reply.payload.len()
        );
        stats.record(sent, now, payload.len());
    }
    Ok(stats)
}

/// Counts one request against the shared deadline. A plain function so the
/// lock is visibly released before the caller awaits anything.
fn issue(deadline: &Mutex<Deadline>) -> bool {
    deadline
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .issue()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ITERS: u64 = 50;
    const SIZES: [usize; 2] = [64, 1 << 20];

    fn workload(mode: Mode, size: usize, limit: Limit) -> Workload {
        Workload {
            mode,
            size,
            limit,
            window: 4,
            warmup: 3,
        }
    }

    /// Runs `baseline` at every size with `Limit::Iters` and checks the counts.
    fn check_iters(baseline: fn(&Workload) -> anyhow::Result<RunStats>, mode: Mode) {
        for size in SIZES {
            let stats = baseline(&workload(mode, size, Limit::Iters(ITERS)))
                .unwrap_or_else(|e| panic!("{mode:?} size {size}: {e:#}"));
            assert_eq!(stats.ops, ITERS, "{mode:?} size {size}");
            assert_eq!(stats.bytes, ITERS * size as u64, "{mode:?} size {size}");
            assert_eq!(stats.latency_ns.len(), ITERS, "{mode:?} size {size}");
        }
    }

    /// A duration-limited run stops by itself and counts consistently. The
    /// first request is always issued, so at least one completes.
    fn check_duration(baseline: fn(&Workload) -> anyhow::Result<RunStats>, mode: Mode) {
        let size = 4096;
        let limit = Limit::Duration(Duration::from_millis(30));
        let stats = baseline(&workload(mode, size, limit)).expect("duration run");
        assert!(stats.ops >= 1);
        assert_eq!(stats.bytes, stats.ops * size as u64);
        assert_eq!(stats.latency_ns.len(), stats.ops);
    }

    #[test]
    fn raw_tcp_pingpong() {
        check_iters(raw_tcp, Mode::Pingpong);
    }

    #[test]
    fn raw_tcp_stream() {
        check_iters(raw_tcp, Mode::Stream);
    }

    #[test]
    fn grpc_pingpong() {
        check_iters(grpc, Mode::Pingpong);
    }

    #[test]
    fn grpc_stream() {
        check_iters(grpc, Mode::Stream);
    }

    #[test]
    fn raw_tcp_duration_limited() {
        check_duration(raw_tcp, Mode::Pingpong);
        check_duration(raw_tcp, Mode::Stream);
    }

    #[test]
    fn grpc_duration_limited() {
        check_duration(grpc, Mode::Pingpong);
        check_duration(grpc, Mode::Stream);
    }

    #[test]
    fn stats_are_named() {
        let w = workload(Mode::Pingpong, 8, Limit::Iters(1));
        let raw = raw_tcp(&w).expect("raw-tcp");
        assert_eq!(
            (raw.name.as_str(), raw.transport.as_str()),
            ("raw-tcp", "tcp")
        );
        let grpc = grpc(&w).expect("grpc");
        assert_eq!(
            (grpc.name.as_str(), grpc.transport.as_str()),
            ("grpc", "tcp")
        );
    }
}
