//! Quiver's contender in `quiver bench fabric`, and `quiver fabric serve`.
//!
//! Both sides are fabric workers; the server runs the fabric's echo service.
//! Requests are RPCs on the echo AM id carrying one shared arena buffer, so the
//! client side sends without copying (eager sizes are copied inline next to the
//! frame header, as the protocol does for every small payload).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use quiver_fabric::arena::{Arena, ArenaConfig, SizeClass};
use quiver_fabric::echo::{echo_handler, ACK, ECHO, ECHO_AM_ID};
use quiver_fabric::wire::{AM_HEADER_BYTES_MAX, HEADER_BYTES};
use quiver_fabric::{
    Completion, ConnConfig, EndpointTransport, Payload, TransportChoice, Worker, WorkerConfig,
    WorkerWaker,
};

use super::{Deadline, Limit, Mode, RunStats, Workload};

/// A request that takes longer than this is reported as an error, not waited on.
const RPC_TIMEOUT: Duration = Duration::from_secs(10);

/// Which transport the fabric should use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Transport {
    Tcp,
    Verbs,
    /// Verbs where a device answers, TCP otherwise.
    Auto,
}

impl Transport {
    /// The name a chunkserver's configuration file uses.
    pub fn config_name(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Verbs => "verbs",
            Transport::Auto => "auto",
        }
    }

    fn choice(self) -> TransportChoice {
        match self {
            Transport::Tcp => TransportChoice::Tcp,
            Transport::Verbs => TransportChoice::Verbs,
            Transport::Auto => TransportChoice::Auto,
        }
    }
}

/// Fabric knobs a latency user may turn.
#[derive(Debug, Clone, Copy)]
pub struct FabricOptions {
    pub transport: Transport,
    /// Largest user header + payload sent eagerly.
    pub eager_bytes_max: usize,
    /// How long a worker keeps polling after work before it sleeps.
    pub spin: Duration,
}

impl FabricOptions {
    /// Worker settings that carry messages of up to `message_bytes` bytes.
    pub(crate) fn worker_config(&self, message_bytes: usize) -> WorkerConfig {
        let conn = ConnConfig {
            eager_bytes_max: self.eager_bytes_max,
            message_bytes_max: message_bytes.max(1 << 20),
            // Room for the largest eager frame, rounded to a buffer class.
            rx_chunk_bytes: (self.eager_bytes_max + AM_HEADER_BYTES_MAX + HEADER_BYTES)
                .next_power_of_two()
                .max(ConnConfig::default().rx_chunk_bytes),
            ..ConnConfig::default()
        };
        WorkerConfig {
            transport: self.transport.choice(),
            conn,
            spin: self.spin,
            ..WorkerConfig::default()
        }
    }

    /// An arena for `window` messages of `message_bytes` in flight each way.
    fn arena(&self, message_bytes: usize, window: usize) -> anyhow::Result<Arena> {
        let rx_chunk = self.worker_config(message_bytes).conn.rx_chunk_bytes;
        let large = message_bytes
            .next_power_of_two()
            .max(2 * rx_chunk)
            .max(1 << 20);
        let mut classes = vec![
            SizeClass {
                buf_bytes: 4 << 10,
                count: 1024,
            },
            // Eager payloads, and with verbs the shared receives and the
            // endpoints' staging buffers.
            SizeClass {
                buf_bytes: 64 << 10,
                count: 512,
            },
        ];
        if rx_chunk > 64 << 10 {
            classes.push(SizeClass {
                buf_bytes: rx_chunk,
                count: 64,
            });
        }
        // Requests pulled by the server and echoes pulled by the client.
        classes.push(SizeClass {
            buf_bytes: large,
            count: 2 * window + 8,
        });
        Arena::new(&ArenaConfig {
            classes,
            huge_pages: true,
        })
        .context("mapping the arena")
    }
}

/// A fabric echo server on its own thread; stopped and joined on drop.
pub struct EchoServer {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    waker: WorkerWaker,
    thread: Option<JoinHandle<()>>,
}

impl EchoServer {
    /// Starts a server on `listen` able to take `window` messages of `message_bytes`.
    pub fn start(
        opts: &FabricOptions,
        listen: SocketAddr,
        message_bytes: usize,
        window: usize,
    ) -> anyhow::Result<EchoServer> {
        let mut worker = Worker::new(
            opts.arena(message_bytes, window)?,
            opts.worker_config(message_bytes),
        )?;
        worker.set_am_handler(ECHO_AM_ID, echo_handler());
        let addr = worker.listen(listen)?;
        let stop = Arc::new(AtomicBool::new(false));
        let waker = worker.waker();
        let (ready_tx, ready_rx) = mpsc::channel();
        let stop_thread = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("fabric-server".into())
            .spawn(move || {
                let _ = ready_tx.send(());
                worker.run(|| stop_thread.load(Ordering::Acquire));
            })
            .context("spawning the server thread")?;
        ready_rx.recv().context("server thread died at start")?;
        Ok(EchoServer {
            addr,
            stop,
            waker,
            thread: Some(thread),
        })
    }

    /// Serves until the process is interrupted (for `quiver fabric serve`).
    pub fn wait(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.stop.store(true, Ordering::Release);
            self.waker.wake();
            let _ = t.join();
        }
    }
}

/// Runs the workload over the fabric against `connect`, or against a server
/// started in this process on loopback when `connect` is `None`.
pub fn run(
    w: &Workload,
    opts: &FabricOptions,
    connect: Option<SocketAddr>,
) -> anyhow::Result<RunStats> {
    let window = w.in_flight();
    let _server;
    let addr = match connect {
        Some(addr) => addr,
        None => {
            _server = EchoServer::start(opts, "127.0.0.1:0".parse()?, w.size, window)?;
            _server.addr
        }
    };
    let arena = opts.arena(w.size, window)?;
    let mut request = arena.alloc(w.size)?;
    for (i, byte) in request.iter_mut().enumerate() {
        *byte = i as u8;
    }
    let request = request.freeze();
    let mut worker = Worker::new(arena, opts.worker_config(w.size))?;
    let ep = worker
        .connect_wait(addr, Duration::from_secs(5))
        .with_context(|| format!("connecting to the fabric server at {addr}"))?;
    let transport = match worker.endpoint_transport(ep) {
        Some(EndpointTransport::Verbs) => "verbs",
        _ => "tcp",
    };
    if opts.transport == Transport::Auto {
        match worker.verbs_device() {
            Ok(device) if transport == "verbs" => eprintln!("transport auto: verbs on {device}"),
            Ok(device) => {
                eprintln!("transport auto: TCP (this side has {device}; the server offers no RDMA)")
            }
            Err(why) => eprintln!("transport auto: TCP ({why})"),
        }
    }
    let header = [match w.mode {
        Mode::Pingpong => ECHO,
        Mode::Stream => ACK,
    }];
    let mut stats = RunStats::new("quiver", transport);
    let expect = w.response_bytes();
    let call = |worker: &mut Worker| {
        worker.rpc_call(
            ep,
            ECHO_AM_ID,
            &header,
            Payload::Buf(request.clone()),
            RPC_TIMEOUT,
        )
    };

    // Warm-up, then the measured part: the same loop, recording only the latter.
    for (limit, record) in [(Limit::Iters(w.warmup), false), (w.limit, true)] {
        let mut deadline = Deadline::start(limit);
        let mut sent_at = InFlight::with_capacity(window);
        loop {
            while sent_at.len() < window && deadline.issue() {
                // The clock starts before the send, as it does for the baselines.
                let sent = Instant::now();
                let id = call(&mut worker)?;
                sent_at.push(id, sent);
            }
            if sent_at.is_empty() {
                break;
            }
            worker.progress_until(None, |w| w.has_completions());
            while let Some(completion) = worker.poll_completion() {
                match completion {
                    Completion::Rpc { id, result, .. } => {
                        let reply = result.context("echo RPC failed")?;
                        let now = Instant::now();
                        let sent = sent_at.remove(id).context("a response nobody asked for")?;
                        if reply.payload.len() != expect {
                            bail!(
                                "echo returned {} bytes, expected {expect}",
                                reply.payload.len()
                            );
                        }
                        if record {
                            stats.record(sent, now, w.size);
                        }
                    }
                    Completion::Closed { reason, .. } => bail!("the connection closed: {reason:?}"),
                    Completion::Send { .. } | Completion::Established { .. } => {}
                }
            }
        }
        stats.elapsed = deadline.elapsed();
    }
    if let Some(conn) = worker.endpoint_stats(ep) {
        tracing::info!(?conn, worker = ?worker.stats(), "client connection counters");
    }
    worker.close(ep, "benchmark done");
    Ok(stats)
}

/// Send times of the RPCs in flight: a window is small, so a scan beats
/// hashing (which, under emulation, shows in the figures).
struct InFlight(Vec<(quiver_fabric::RpcId, Instant)>);

impl InFlight {
    fn with_capacity(window: usize) -> InFlight {
        InFlight(Vec::with_capacity(window))
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn push(&mut self, id: quiver_fabric::RpcId, sent: Instant) {
        self.0.push((id, sent));
    }

    fn remove(&mut self, id: quiver_fabric::RpcId) -> Option<Instant> {
        let index = self.0.iter().position(|(i, _)| *i == id)?;
        Some(self.0.swap_remove(index).1)
    }
}
