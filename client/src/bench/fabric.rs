//! Quiver's contender in `quiver bench fabric`, and `quiver fabric serve`.
//!
//! Both sides are fabric workers; the server runs the fabric's echo service.
//! Requests are RPCs on the echo AM id carrying one shared arena buffer, so the
//! client side sends without copying (eager sizes are copied inline next to the
//! frame header, as the protocol does for every small payload).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use quiver_fabric::arena::{Arena, ArenaConfig, SizeClass};
use quiver_fabric::echo::{echo_handler, ACK, ECHO, ECHO_AM_ID};
use quiver_fabric::wire::{AM_HEADER_BYTES_MAX, HEADER_BYTES};
use quiver_fabric::{Completion, ConnConfig, Payload, Worker, WorkerConfig, WorkerWaker};

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

/// The transport a run uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chosen {
    Tcp,
    /// The fabric protocol over RC queue pairs on this device and port.
    Verbs {
        device: String,
        port: u8,
        gid_index: u8,
    },
}

impl Chosen {
    pub fn name(&self) -> &'static str {
        match self {
            Chosen::Tcp => "tcp",
            Chosen::Verbs { .. } => "verbs",
        }
    }

    fn describe(&self) -> String {
        match self {
            Chosen::Tcp => "tcp".into(),
            Chosen::Verbs {
                device,
                port,
                gid_index,
            } => format!("{device} port {port} gid index {gid_index}"),
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
    /// The transport that will carry traffic to `connect` (None: a server in
    /// this process), or why none can. Verbs needs a server in this process
    /// for now: the out-of-band setup over TCP with a remote peer is not built.
    pub fn resolve_transport(&self, connect: Option<SocketAddr>) -> anyhow::Result<Chosen> {
        let verbs = || -> Result<Chosen, String> {
            if connect.is_some() {
                return Err("verbs with --connect needs the out-of-band setup (issue 4)".into());
            }
            let (device, port) = quiver_fabric::verbs::usable_port().map_err(|e| e.to_string())?;
            let gid_index = port
                .preferred_gid_index()
                .ok_or("the active port has no GID")?;
            Ok(Chosen::Verbs {
                device,
                port: port.port,
                gid_index: gid_index as u8,
            })
        };
        match self.transport {
            Transport::Tcp => Ok(Chosen::Tcp),
            Transport::Auto => match verbs() {
                Ok(chosen) => {
                    eprintln!("transport auto: verbs ({})", chosen.describe());
                    Ok(chosen)
                }
                Err(why) => {
                    tracing::info!(%why, "transport auto: using TCP");
                    eprintln!("transport auto: TCP ({why})");
                    Ok(Chosen::Tcp)
                }
            },
            Transport::Verbs => verbs().map_err(|why| anyhow::anyhow!("--transport verbs: {why}")),
        }
    }

    /// Worker settings that carry messages of up to `message_bytes` bytes.
    fn worker_config(&self, message_bytes: usize) -> WorkerConfig {
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
            SizeClass {
                buf_bytes: 64 << 10,
                count: 256,
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
    let chosen = opts.resolve_transport(connect)?;
    if let Chosen::Verbs {
        device,
        port,
        gid_index,
    } = &chosen
    {
        return run_verbs(w, opts, device, *port, *gid_index);
    }
    let transport = chosen.name();
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
        let mut sent_at = HashMap::with_capacity(window);
        loop {
            while sent_at.len() < window && deadline.issue() {
                // The clock starts before the send, as it does for the baselines.
                let sent = Instant::now();
                let id = call(&mut worker)?;
                sent_at.insert(id, sent);
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
                        let sent = sent_at.remove(&id).context("a response nobody asked for")?;
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

/// Runs the workload over two `verbs::link`s on one device: the server on a
/// thread of this process, the client here.
fn run_verbs(
    w: &Workload,
    opts: &FabricOptions,
    device: &str,
    port: u8,
    gid_index: u8,
) -> anyhow::Result<RunStats> {
    use quiver_fabric::proto::{AmData, Event};
    use quiver_fabric::verbs::link::{recvs_posted, VerbsLink};
    use quiver_fabric::verbs::rc::RcDevice;

    let window = w.in_flight();
    let config = opts.worker_config(w.size).conn;
    let large = w
        .size
        .next_power_of_two()
        .max(config.rx_chunk_bytes)
        .max(1 << 20);
    let arena = Arena::new(&ArenaConfig {
        classes: vec![
            SizeClass {
                buf_bytes: 4 << 10,
                count: 256,
            },
            // Link staging buffers and posted receives, both links.
            SizeClass {
                buf_bytes: 64 << 10,
                count: 2 * (recvs_posted(&config) + 16) + 8,
            },
            SizeClass {
                buf_bytes: config.rx_chunk_bytes,
                count: 64,
            },
            SizeClass {
                buf_bytes: 2 * large,
                count: 2 * window + 8,
            },
        ],
        huge_pages: true,
    })
    .context("mapping the arena")?;
    let span = arena.region_span();
    // SAFETY: the arena outlives the device (dropped after it, at the end).
    let dev = unsafe { RcDevice::open(device, port, gid_index, span.addr, span.bytes) }
        .with_context(|| format!("opening {device}"))?;
    let (lkey, rkey) = dev.keys();
    arena.set_rdma_keys(lkey, rkey);
    let mut client = VerbsLink::new(&dev, &arena, config, 1).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut server = VerbsLink::new(&dev, &arena, config, 2).map_err(|e| anyhow::anyhow!("{e}"))?;
    let (ci, si) = (client.info(dev.gid()), server.info(dev.gid()));
    client.connect(si).map_err(|e| anyhow::anyhow!("{e}"))?;
    server.connect(ci).map_err(|e| anyhow::anyhow!("{e}"))?;

    let stop = Arc::new(AtomicBool::new(false));
    let stop_server = Arc::clone(&stop);
    let server_arena = arena.clone();
    let server = std::thread::Builder::new()
        .name("fabric-server".into())
        .spawn(move || -> anyhow::Result<VerbsLink> {
            while !stop_server.load(Ordering::Relaxed) {
                server
                    .progress(Instant::now())
                    .map_err(|e| anyhow::anyhow!("server: {e}"))?;
                while let Some(event) = server.poll_event() {
                    let Event::Am(m) = event else { continue };
                    let payload = match m.data {
                        AmData::Eager(p) | AmData::Pulled(p) => p,
                        AmData::Rendezvous(desc) => {
                            match server_arena.alloc(desc.len()) {
                                Ok(target) => server.conn().pull(desc, target)?,
                                Err(_) => server.conn().reject(desc),
                            }
                            continue;
                        }
                        AmData::Aborted => continue,
                    };
                    let Some(reply_to) = m.reply_to else { continue };
                    let (header, body) = quiver_fabric::echo::response(&m.header, payload);
                    server.conn().reply(m.am_id, reply_to, header, body)?;
                }
            }
            Ok(server)
        })
        .context("spawning the server thread")?;

    let mut request = arena.alloc(w.size)?;
    for (i, byte) in request.iter_mut().enumerate() {
        *byte = i as u8;
    }
    let request = request.freeze();
    let header = [match w.mode {
        Mode::Pingpong => ECHO,
        Mode::Stream => ACK,
    }];
    let expect = w.response_bytes();
    let mut stats = RunStats::new("quiver", "verbs");
    let result = (|| -> anyhow::Result<()> {
        for (limit, record) in [(Limit::Iters(w.warmup), false), (w.limit, true)] {
            let mut deadline = Deadline::start(limit);
            let mut sent_at = HashMap::with_capacity(window);
            loop {
                while sent_at.len() < window && deadline.issue() {
                    let sent = Instant::now();
                    let id = client.conn().rpc_call(
                        sent,
                        ECHO_AM_ID,
                        &header,
                        Payload::Buf(request.clone()),
                        RPC_TIMEOUT,
                    )?;
                    sent_at.insert(id, sent);
                }
                if sent_at.is_empty() {
                    break;
                }
                client
                    .progress(Instant::now())
                    .map_err(|e| anyhow::anyhow!("client: {e}"))?;
                while let Some(event) = client.poll_event() {
                    if let Event::RpcDone { id, result } = event {
                        let reply = result.context("echo RPC failed")?;
                        let now = Instant::now();
                        let sent = sent_at.remove(&id).context("a response nobody asked for")?;
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
                }
            }
            stats.elapsed = deadline.elapsed();
        }
        Ok(())
    })();
    stop.store(true, Ordering::Relaxed);
    let server = server
        .join()
        .map_err(|_| anyhow::anyhow!("the server thread panicked"))?;
    result?;
    drop((client, server?));
    drop(dev);
    Ok(stats)
}
