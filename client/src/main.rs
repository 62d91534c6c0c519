//! `quiver`: the one command-line tool of Quiver.

mod bench;
mod cluster_cli;
mod playground;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};

use bench::chunkstore::{Cleanup, Pattern, StoreBench, SyncPolicy};
use bench::fabric::{EchoServer, FabricOptions, Transport};
use bench::report::{ChunkstoreRun, Figures, Report};
use bench::{Limit, Mode, Workload};

#[derive(Parser)]
#[command(
    name = "quiver",
    version,
    about = "Quiver: an RDMA-first distributed block store"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Benchmarks, compared side by side with baselines in the same run.
    Bench {
        #[command(subcommand)]
        what: BenchCommand,
    },
    /// The transport on its own.
    Fabric {
        #[command(subcommand)]
        what: FabricCommand,
    },
    /// Run a chunkserver: copysets replicated with Raft, on one data directory.
    Chunkserver {
        /// TOML configuration (node_id, listen, data_dir, ...; see ARCHITECTURE.md).
        #[arg(long)]
        config: PathBuf,
    },
    /// Run a control node (the MDS): topology, volumes, scheduling.
    Control {
        /// TOML configuration (listen, data_dir, token, store, pools; see ARCHITECTURE.md).
        #[arg(long)]
        config: PathBuf,
    },
    /// Export a volume over NBD (qemu, nbdinfo, fio, the kernel's nbd client).
    Nbd(cluster_cli::NbdArgs),
    /// A whole cluster on this machine: control, three chunkservers, a
    /// volume `demo` served over NBD. Ctrl-C stops it; a second run reuses it.
    Playground(playground::PlaygroundArgs),
    /// Cluster health, like `ceph -s`.
    Status {
        #[command(flatten)]
        control: cluster_cli::ControlArgs,
        #[arg(long)]
        json: bool,
    },
    /// Volumes: create, list, stat, extend, rename, delete.
    Volume {
        #[command(flatten)]
        control: cluster_cli::ControlArgs,
        #[command(subcommand)]
        what: cluster_cli::VolumeCommand,
    },
    /// Operate chunkservers directly, without the control plane.
    Admin {
        #[command(subcommand)]
        what: AdminCommand,
    },
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Create a copyset on its three (or more) chunkservers.
    CreateCopyset {
        /// Copyset id.
        #[arg(long)]
        copyset: u32,
        /// Members as NODE=ADDR, comma separated: 1=127.0.0.1:7801,2=...
        #[arg(long, value_delimiter = ',', value_parser = parse_peer)]
        peers: Vec<(u64, String)>,
    },
    /// Hand a copyset's leadership to one of its members.
    TransferLeader {
        #[arg(long)]
        copyset: u32,
        /// The member (node id) to lead.
        #[arg(long)]
        to: u64,
        /// Fabric addresses of the copyset's members (any of them will do).
        #[arg(long, value_delimiter = ',', required = true)]
        servers: Vec<SocketAddr>,
    },
    /// Add a member to a copyset, remove one, or both at once (a replacement).
    ChangePeers {
        #[arg(long)]
        copyset: u32,
        /// The member to add, as NODE=ADDR (it catches up before it votes).
        #[arg(long, value_parser = parse_peer)]
        add: Option<(u64, String)>,
        /// The member (node id) to remove.
        #[arg(long)]
        remove: Option<u64>,
        /// Fabric addresses of the copyset's members (any of them will do).
        #[arg(long, value_delimiter = ',', required = true)]
        servers: Vec<SocketAddr>,
    },
    /// Print a chunkserver's copysets: leader, term, applied index, chunks.
    Status {
        /// The chunkserver's fabric address.
        #[arg(long)]
        server: SocketAddr,
        #[arg(long)]
        json: bool,
    },
}

fn parse_peer(s: &str) -> Result<(u64, String), String> {
    let (id, addr) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected NODE=ADDR"))?;
    let id = id.parse().map_err(|e| format!("node id {id:?}: {e}"))?;
    addr.parse::<SocketAddr>()
        .map_err(|e| format!("address {addr:?}: {e}"))?;
    Ok((id, addr.to_string()))
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Active-message RPC latency and throughput of the fabric.
    Fabric(BenchFabric),
    /// Latency and IOPS of the chunk store on local disk, against fio.
    Chunkstore(BenchChunkstore),
    /// Durable appends of the shared Raft log engine from many groups, against fio.
    Raftlog(BenchRaftlog),
    /// 3-replica writes through chunkserver processes, beside one node's
    /// durable write and a fabric round trip measured in the same run.
    Replication(BenchReplication),
    /// Random IO on a volume through the client library.
    Volume(cluster_cli::BenchVolumeArgs),
}

#[derive(Args)]
struct BenchReplication {
    /// Chunkserver processes to start on loopback (ignored with --connect).
    #[arg(long, default_value_t = 3)]
    chunkservers: usize,
    /// Copysets the writes spread over (created if missing).
    #[arg(long, default_value_t = 1)]
    copysets: u32,
    /// Bytes per write.
    #[arg(long, default_value = "4k", value_parser = bench::parse_size)]
    bs: u64,
    /// Writes in flight (one writer each, on its own chunk).
    #[arg(long, default_value_t = 1)]
    iodepth: usize,
    /// Seconds per run.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Untimed writes per writer before each run.
    #[arg(long, default_value_t = 50)]
    warmup: u64,
    /// Runs per contender, interleaved; figures are per-field medians.
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// Running chunkservers (their fabric addresses, comma separated) instead
    /// of starting them.
    #[arg(long, value_delimiter = ',')]
    connect: Vec<SocketAddr>,
    /// Directory for the chunkservers' data and the chunkstore baseline
    /// [default: ./quiver-bench-data].
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Transport: tcp, verbs, or auto (verbs where a device answers).
    #[arg(long, value_enum, default_value_t = Transport::Auto)]
    transport: Transport,
    /// Microseconds every fabric worker (servers' and ours) polls after work
    /// before it sleeps. Four processes share the machine here: spinning
    /// threads take the cores the others need, so the default is not to.
    #[arg(long, default_value_t = 0)]
    spin_us: u64,
    /// fdatasync each file written (Raft log segments, chunk files) instead
    /// of one device cache flush where the filesystem allows it (for
    /// comparing the two).
    #[arg(long)]
    per_file_fdatasync: bool,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct BenchRaftlog {
    /// Raft groups appending at once, one thread each (queue depth 1 per group).
    #[arg(long, default_value_t = 1)]
    groups: u64,
    /// Bytes per entry.
    #[arg(long, default_value = "4k", value_parser = bench::parse_size)]
    bs: u64,
    /// Seconds per run.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Runs (medians are reported).
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// Directory for the log and fio's file [default: ./quiver-bench-data].
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Also run fio: one stream writing bs and fdatasyncing each, queue depth 1.
    #[arg(long, value_enum)]
    baseline: Option<StoreBaselineKind>,
}

#[derive(Subcommand)]
enum FabricCommand {
    /// Run an echo server for `quiver bench fabric --connect` on another host.
    Serve {
        /// Address to listen on.
        #[arg(long, default_value = "0.0.0.0:7470")]
        listen: SocketAddr,
        /// Largest message to accept, in bytes.
        #[arg(long, default_value_t = 4 << 20)]
        max_size: usize,
        /// Messages of --max-size the server can hold at once (sizes its arena).
        #[arg(long, default_value_t = 16)]
        window: usize,
        #[command(flatten)]
        fabric: FabricArgs,
    },
    /// List RDMA devices, their ports, states and GIDs (or say why there are none).
    Devices,
}

#[derive(Args, Clone, Copy)]
struct FabricArgs {
    /// Transport: tcp, verbs, or auto (verbs where a device answers).
    #[arg(long, value_enum, default_value_t = Transport::Auto)]
    transport: Transport,
    /// Largest user header + payload sent eagerly; larger goes rendezvous.
    #[arg(long, default_value_t = quiver_fabric::proto::EAGER_BYTES_MAX_DEFAULT)]
    eager_max: usize,
    /// Microseconds a worker keeps polling after work before it sleeps.
    #[arg(long, default_value_t = 200)]
    spin_us: u64,
}

impl FabricArgs {
    fn options(&self) -> FabricOptions {
        FabricOptions {
            transport: self.transport,
            eager_bytes_max: self.eager_max,
            spin: Duration::from_micros(self.spin_us),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum BaselineKind {
    /// Plain blocking TCP sockets over loopback.
    RawTcp,
    /// The same with both ends busy-polling non-blocking sockets.
    RawTcpSpin,
    /// tonic unary echo over loopback.
    Grpc,
}

#[derive(Args)]
struct BenchFabric {
    /// Server to run against; without it a server runs in this process on loopback.
    #[arg(long)]
    connect: Option<SocketAddr>,
    /// pingpong: one request in flight (latency); stream: --window in flight (throughput).
    #[arg(long, value_enum, default_value_t = Mode::Pingpong)]
    mode: Mode,
    /// Request size in bytes.
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Requests per run [default: 20000 in pingpong; stream runs 2 s].
    #[arg(long, conflicts_with = "duration")]
    iters: Option<u64>,
    /// Seconds per run, instead of --iters.
    #[arg(long)]
    duration: Option<f64>,
    /// Requests in flight in stream mode.
    #[arg(long, default_value_t = 16)]
    window: usize,
    /// Untimed requests before each run.
    #[arg(long, default_value_t = 1000)]
    warmup: u64,
    /// Runs per contender, interleaved; figures are per-field medians.
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// Also run a baseline (repeatable): raw-tcp, raw-tcp-spin, grpc.
    #[arg(long, value_enum)]
    baseline: Vec<BaselineKind>,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    fabric: FabricArgs,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum StoreBaselineKind {
    /// fio with the io_uring engine and O_DIRECT on a file in the same directory.
    Fio,
}

#[derive(Args)]
struct BenchChunkstore {
    /// IO pattern.
    #[arg(long, value_enum, default_value_t = Pattern::Randwrite)]
    pattern: Pattern,
    /// Bytes per operation (4k, 64k, ...; a multiple of 4 KiB).
    #[arg(long, default_value = "4k", value_parser = bench::parse_size)]
    bs: u64,
    /// Operations in flight.
    #[arg(long, default_value_t = 1)]
    iodepth: usize,
    /// Bytes the offsets range over; the store gets size / 16 MiB chunks (1G, 512M, ...).
    #[arg(long, default_value = "1G", value_parser = bench::parse_size)]
    size: u64,
    /// always: every write is durable when it completes (fdatasync); never: no fdatasync.
    #[arg(long, value_enum, default_value_t = SyncPolicy::Always)]
    sync: SyncPolicy,
    /// Directory for the chunk store and fio's file [default: ./quiver-bench-data].
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Leave the chunk store and fio's file in --dir (a later run reuses them).
    #[arg(long)]
    keep: bool,
    /// Operations per run.
    #[arg(long, conflicts_with = "duration")]
    iters: Option<u64>,
    /// Seconds per run, instead of --iters [default: 5].
    #[arg(long)]
    duration: Option<f64>,
    /// Untimed operations before each run of ours.
    #[arg(long, default_value_t = 256)]
    warmup: u64,
    /// Ours: fdatasync each chunk file written, instead of one device cache
    /// flush where the filesystem allows it (for comparing the two).
    #[arg(long)]
    per_file_fdatasync: bool,
    /// Runs per contender, interleaved; figures are per-field medians.
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// Also run a baseline: fio.
    #[arg(long, value_enum)]
    baseline: Option<StoreBaselineKind>,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Bench {
            what: BenchCommand::Fabric(args),
        } => bench_fabric(args),
        Command::Bench {
            what: BenchCommand::Chunkstore(args),
        } => bench_chunkstore(args),
        Command::Bench {
            what: BenchCommand::Raftlog(args),
        } => bench_raftlog(args),
        Command::Bench {
            what: BenchCommand::Replication(args),
        } => bench_replication(args),
        Command::Fabric {
            what:
                FabricCommand::Serve {
                    listen,
                    max_size,
                    window,
                    fabric,
                },
        } => {
            let opts = fabric.options();
            let server = EchoServer::start(&opts, listen, max_size, window)?;
            eprintln!("quiver fabric: echo server listening on {}", server.addr);
            server.wait();
            Ok(())
        }
        Command::Fabric {
            what: FabricCommand::Devices,
        } => fabric_devices(),
        Command::Chunkserver { config } => chunkserver(&config),
        Command::Admin { what } => admin(what),
        Command::Control { config } => cluster_cli::run_control(&config),
        Command::Nbd(args) => cluster_cli::nbd(args),
        Command::Playground(args) => playground::run(args),
        Command::Bench {
            what: BenchCommand::Volume(args),
        } => cluster_cli::bench_volume(args),
        Command::Status { control, json } => cluster_cli::status(&control, json),
        Command::Volume { control, what } => cluster_cli::volume(&control, what),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// The runtime of a process whose work is Raft and the fabric: one thread
/// runs every copyset's tasks and the fabric task, so a message handed
/// between them is a task switch, not a thread's wake-up. With two workers,
/// each hand-off woke the other worker to steal the task: a traced write
/// bounced between them four times on the leader alone, about 30 µs each
/// on this machine's two vCPUs. What blocks for long (snapshot syncs, log
/// reads from disk) runs on the blocking pool; what still blocks the thread
/// is listed in ARCHITECTURE.md (raft-rdma: threads).
fn raft_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn chunkserver(path: &std::path::Path) -> anyhow::Result<()> {
    use quiver_raft::chunkserver::{Chunkserver, ChunkserverConfig};
    let config = ChunkserverConfig::load(path)?;
    raft_runtime()?.block_on(async move {
        let server = Chunkserver::start(config).await?;
        eprintln!("{}{}", bench::replication::SERVING, server.addr());
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        eprintln!("quiver chunkserver: stopping");
        server.shutdown().await;
        Ok(())
    })
}

fn admin(what: AdminCommand) -> anyhow::Result<()> {
    use quiver_raft::chunk_client::ChunkClient;
    // Output piped into `head` and the like: stop quietly when it closes, as
    // shell tools do. (Only here: servers must never die of a closed socket.)
    // SAFETY: restoring a signal's default disposition, before any thread.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    runtime()?.block_on(async move {
        let client = ChunkClient::start(quiver_fabric::WorkerConfig::default())?;
        match what {
            AdminCommand::CreateCopyset { copyset, peers } => {
                anyhow::ensure!(!peers.is_empty(), "--peers names no member");
                let peers: std::collections::BTreeMap<u64, String> = peers.into_iter().collect();
                client.create_copyset(copyset, &peers).await?;
                println!("copyset {copyset} created on {} servers", peers.len());
            }
            AdminCommand::TransferLeader {
                copyset,
                to,
                servers,
            } => {
                let started = std::time::Instant::now();
                client.transfer_leader(&servers, copyset, to).await?;
                println!(
                    "copyset {copyset}: node {to} leads (took {:?})",
                    started.elapsed()
                );
            }
            AdminCommand::ChangePeers {
                copyset,
                add,
                remove,
                servers,
            } => {
                anyhow::ensure!(
                    add.is_some() || remove.is_some(),
                    "nothing to change: give --add, --remove or both"
                );
                let change = quiver_raft::service::PeerChange { add, remove };
                client.change_peers(&servers, copyset, &change).await?;
                println!("copyset {copyset}: membership changed");
            }
            AdminCommand::Status { server, json } => {
                let status = client.status(server).await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&status)?);
                } else {
                    println!(
                        "node {} at {} ({}), {} copysets",
                        status.node,
                        status.addr,
                        status.transport,
                        status.copysets.len()
                    );
                    println!(
                        "copyset  leader  term  applied  last-log  snapshot  chunks  log KiB  in memory KiB  voters"
                    );
                    for c in status.copysets {
                        let opt = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
                        println!(
                            "{:>7}  {:>6}  {:>4}  {:>7}  {:>8}  {:>8}  {:>6}  {:>7}  {:>13}  {:?}",
                            c.copyset,
                            opt(c.leader),
                            c.term,
                            opt(c.last_applied),
                            opt(c.last_log),
                            opt(c.snapshot),
                            c.chunks,
                            c.log_bytes >> 10,
                            c.log_held_bytes >> 10,
                            c.voters
                        );
                    }
                }
            }
        }
        Ok(())
    })
}

fn fabric_devices() -> anyhow::Result<()> {
    let devices = match quiver_fabric::verbs::devices() {
        Ok(devices) => devices,
        Err(why) => {
            println!("no RDMA devices: {why}");
            println!("quiver uses TCP here (--transport auto); soft-roce/ has a soft-RoCE setup");
            return Ok(());
        }
    };
    for dev in devices {
        println!(
            "{}  firmware {}  max_qp {}  max_mr_size {}",
            dev.name, dev.firmware, dev.max_qp, dev.max_mr_size
        );
        for port in &dev.ports {
            let link = match port.link_layer {
                1 => "InfiniBand",
                2 => "Ethernet (RoCE)",
                _ => "unknown link",
            };
            println!(
                "  port {}: {:?}, mtu {}, {link}, preferred gid index {:?}",
                port.port,
                port.state,
                port.active_mtu,
                port.preferred_gid_index()
            );
            for (index, gid) in &port.gids {
                let v4 = gid
                    .ipv4()
                    .map(|a| format!("  (RoCE v2, {a})"))
                    .unwrap_or_default();
                println!("    gid[{index}] {gid}{v4}");
            }
        }
    }
    Ok(())
}

fn bench_fabric(args: BenchFabric) -> anyhow::Result<()> {
    anyhow::ensure!(args.runs >= 1, "--runs must be at least 1");
    anyhow::ensure!(args.window >= 1, "--window must be at least 1");
    let limit = match (args.iters, args.duration, args.mode) {
        (Some(n), _, _) => Limit::Iters(n),
        (None, Some(s), _) => Limit::Duration(
            Duration::try_from_secs_f64(s).context("--duration must be a positive number")?,
        ),
        (None, None, Mode::Pingpong) => Limit::Iters(20_000),
        (None, None, Mode::Stream) => Limit::Duration(Duration::from_secs(2)),
    };
    let workload = Workload {
        mode: args.mode,
        size: args.size,
        limit,
        window: args.window,
        warmup: args.warmup,
    };
    let opts = args.fabric.options();
    let mut ours = Vec::with_capacity(args.runs);
    let mut theirs: Vec<Vec<Figures>> = vec![Vec::with_capacity(args.runs); args.baseline.len()];
    // Interleave contenders run by run, so a noisy moment hurts all alike.
    for run in 0..args.runs {
        if !args.json {
            eprintln!("run {}/{}: quiver", run + 1, args.runs);
        }
        ours.push(Figures::of(&bench::fabric::run(
            &workload,
            &opts,
            args.connect,
        )?));
        for (i, kind) in args.baseline.iter().enumerate() {
            let stats = match kind {
                BaselineKind::RawTcp => bench::baseline::raw_tcp(&workload),
                BaselineKind::RawTcpSpin => bench::baseline::raw_tcp_spin(&workload),
                BaselineKind::Grpc => bench::baseline::grpc(&workload),
            }?;
            if !args.json {
                eprintln!("run {}/{}: {}", run + 1, args.runs, stats.name);
            }
            theirs[i].push(Figures::of(&stats));
        }
    }
    let report = Report::new(
        args.mode,
        args.size,
        workload.in_flight(),
        args.runs,
        Figures::median(&ours),
        theirs.iter().map(|runs| Figures::median(runs)).collect(),
    );
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.table());
    }
    Ok(())
}

fn bench_replication(args: BenchReplication) -> anyhow::Result<()> {
    use bench::replication::{self, Cluster, Setup};
    anyhow::ensure!(args.runs >= 1, "--runs must be at least 1");
    anyhow::ensure!(args.iodepth >= 1, "--iodepth must be at least 1");
    anyhow::ensure!(args.copysets >= 1, "--copysets must be at least 1");
    anyhow::ensure!(
        args.chunkservers >= 3 || !args.connect.is_empty(),
        "--chunkservers must be at least 3 (three replicas)"
    );
    let duration = Duration::try_from_secs_f64(args.duration)
        .ok()
        .filter(|d| !d.is_zero())
        .context("--duration must be a positive number of seconds")?;
    let dir = match args.dir {
        Some(dir) => dir,
        None => std::env::current_dir()?.join("quiver-bench-data"),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = dir.canonicalize()?;
    let setup = Setup {
        chunkservers: if args.connect.is_empty() {
            args.chunkservers
        } else {
            args.connect.len()
        },
        copysets: args.copysets,
        bs: usize::try_from(args.bs).context("--bs too large")?,
        iodepth: args.iodepth,
        duration,
        warmup: args.warmup,
        fabric: FabricArgs {
            transport: args.transport,
            eager_max: quiver_fabric::proto::EAGER_BYTES_MAX_DEFAULT,
            spin_us: args.spin_us,
        }
        .options(),
        connect: args.connect,
        dir: dir.join("replication"),
        device_flush: !args.per_file_fdatasync,
    };
    let store_workload = replication::chunkstore_workload(&setup);
    store_workload.validate()?;
    let store_dir = dir.join("replication-baseline");
    let _cleanup = Cleanup::new(&store_dir, &store_dir.join("none"), false);
    let mut store = StoreBench::open(&store_dir, &store_workload)?;
    // The client's side of the fabric on one thread too, as the servers'.
    let runtime = raft_runtime()?;
    let cluster = runtime.block_on(Cluster::start(&setup))?;
    let (mut ours, mut disk, mut net, mut floor) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for run in 0..args.runs {
        let say = |what: &str| {
            if !args.json {
                eprintln!("run {}/{}: {what}", run + 1, args.runs);
            }
        };
        say("quiver, 3 replicas");
        ours.push(Figures::of(&runtime.block_on(cluster.run(&setup))?));
        say("chunkstore (one node, fdatasync)");
        disk.push(Figures::of(&replication::chunkstore_baseline(&mut store)?));
        say("fabric round trip");
        net.push(Figures::of(&replication::fabric_baseline(&setup)?));
        if setup.iodepth == 1 {
            say("pipeline (the replicated write as bare threads)");
            floor.push(Figures::of(&bench::pipeline::run(
                &dir.join("replication-pipeline"),
                setup.bs,
                Limit::Duration(setup.duration),
                setup.warmup.max(16),
                setup.device_flush,
            )?));
        }
    }
    drop(cluster);
    drop(store);
    let report = Report::replication(
        &setup,
        args.runs,
        Figures::median(&ours),
        Figures::median(&disk),
        Figures::median(&net),
        (!floor.is_empty()).then(|| Figures::median(&floor)),
    );
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.table());
    }
    Ok(())
}

fn bench_raftlog(args: BenchRaftlog) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.runs >= 1 && args.groups >= 1,
        "--runs and --groups must be at least 1"
    );
    let duration = Duration::try_from_secs_f64(args.duration)
        .ok()
        .filter(|d| !d.is_zero())
        .context("--duration must be a positive number of seconds")?;
    let dir = args
        .dir
        .unwrap_or_else(|| PathBuf::from("quiver-bench-data"));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let fio = args.baseline == Some(StoreBaselineKind::Fio);
    let fio_file = dir.join("fio.dat");
    let fio_workload = bench::chunkstore::Workload {
        pattern: Pattern::Randwrite,
        bs: args.bs,
        iodepth: 1,
        size: 256 << 20,
        sync: SyncPolicy::Always,
        limit: Limit::Duration(duration),
        warmup: 0,
        device_flush: true,
    };
    if fio {
        bench::fio::check_installed()?;
    }
    let (mut ours, mut theirs, mut syncs) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..args.runs {
        eprintln!(
            "run {}/{}: quiver raft log, {} groups",
            run + 1,
            args.runs,
            args.groups
        );
        let r = bench::raftlog::run(
            &dir.join("raftlog"),
            args.groups,
            args.bs as usize,
            duration,
        )?;
        syncs.push(r.log.syncs as f64 / r.log.requests.max(1) as f64);
        ours.push(Figures::of(&r.stats));
        if fio {
            eprintln!("run {}/{}: fio", run + 1, args.runs);
            theirs.push(bench::fio::run(&fio_workload, &fio_file)?.figures);
        }
    }
    let _ = std::fs::remove_file(&fio_file);
    let ours = Figures::median(&ours);
    println!(
        "bench raftlog: {} groups appending {}-byte entries, each waiting for durability",
        args.groups, args.bs
    );
    println!("contender    p50 us    p99 us   appends/s   fdatasyncs per append");
    println!(
        "quiver     {:>8.1}  {:>8.1}  {:>10.0}   {:.3}",
        ours.p50_us,
        ours.p99_us,
        ours.ops_per_s,
        bench::report::median_of(&mut syncs).unwrap_or(0.0)
    );
    if fio {
        let fio = Figures::median(&theirs);
        println!(
            "fio        {:>8.1}  {:>8.1}  {:>10.0}   1 (write + fdatasync per block, QD1)",
            fio.p50_us, fio.p99_us, fio.ops_per_s
        );
        println!(
            "quiver / fio: p50 {:.2}x, appends/s {:.2}x",
            ours.p50_us / fio.p50_us,
            ours.ops_per_s / fio.ops_per_s
        );
    }
    Ok(())
}

fn bench_chunkstore(args: BenchChunkstore) -> anyhow::Result<()> {
    anyhow::ensure!(args.runs >= 1, "--runs must be at least 1");
    let limit = match (args.iters, args.duration) {
        (Some(n), _) => Limit::Iters(n),
        (None, Some(s)) => Limit::Duration(
            Duration::try_from_secs_f64(s)
                .ok()
                .filter(|d| !d.is_zero())
                .context("--duration must be a positive number of seconds")?,
        ),
        (None, None) => Limit::Duration(Duration::from_secs(5)),
    };
    let workload = bench::chunkstore::Workload {
        pattern: args.pattern,
        bs: args.bs,
        iodepth: args.iodepth,
        size: args.size,
        sync: args.sync,
        limit,
        warmup: args.warmup,
        device_flush: !args.per_file_fdatasync,
    };
    workload.validate()?;
    let fio = args.baseline == Some(StoreBaselineKind::Fio);
    if fio {
        let version = bench::fio::check_installed()?;
        tracing::info!(%version, "fio found");
    }
    let dir = match args.dir {
        Some(dir) => dir,
        None => std::env::current_dir()
            .context("finding the current directory")?
            .join("quiver-bench-data"),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = dir
        .canonicalize()
        .with_context(|| format!("resolving {}", dir.display()))?;
    let fio_file = dir.join("fio.dat");
    // Declared before the store, so dropped after it: files go once closed.
    let _cleanup = Cleanup::new(&dir, &fio_file, args.keep);
    let mut store = StoreBench::open(&dir, &workload)?;
    let mut ours = Vec::with_capacity(args.runs);
    let mut theirs = Vec::with_capacity(args.runs);
    let mut gaps = Vec::new();
    // Interleave contenders run by run, so a noisy moment hurts both alike.
    for run in 0..args.runs {
        if !args.json {
            eprintln!("run {}/{}: quiver", run + 1, args.runs);
        }
        ours.push(Figures::of(&store.run()?));
        if fio {
            if !args.json {
                eprintln!("run {}/{}: fio", run + 1, args.runs);
            }
            let run = bench::fio::run(&workload, &fio_file)?;
            gaps.extend(run.unaccounted_us);
            theirs.push(run.figures);
        }
    }
    let sync_method = store.sync_method();
    drop(store);
    let mut notes = Vec::new();
    if workload.pattern.is_write() && workload.sync == SyncPolicy::Always {
        notes.push(format!("quiver's sync writes: {sync_method}"));
    }
    if fio {
        notes.push(bench::fio::LAT_NOTE.to_string());
        if workload.pattern.is_write() && workload.sync == SyncPolicy::Always {
            notes.push(bench::fio::SYNC_NOTE.to_string());
        }
    }
    let baselines = if fio {
        vec![Figures::median(&theirs)]
    } else {
        Vec::new()
    };
    let ours = Figures::median(&ours);
    if let (Some(gap), Some(theirs)) = (bench::report::median_of(&mut gaps), baselines.first()) {
        notes.push(format!(
            "fio's fdatasync latency (io_uring) starts only once fio is back from the io-wq \
             worker running the fsync: each op took {:.1} us (runtime / ops) of which its write \
             and fdatasync latencies account for {:.1}; with the {gap:.1} us left out added \
             to fio's p50, quiver / fio p50 = {:.2}x",
            1e6 / theirs.ops_per_s,
            1e6 / theirs.ops_per_s - gap,
            ours.p50_us / (theirs.p50_us + gap)
        ));
    }
    let run = ChunkstoreRun {
        pattern: workload.pattern.name().to_string(),
        bs: usize::try_from(workload.bs).context("--bs too large")?,
        iodepth: workload.iodepth,
        sync: workload
            .pattern
            .is_write()
            .then(|| workload.sync.name().to_string()),
        working_set_bytes: workload.size,
        runs: args.runs,
    };
    let report = Report::chunkstore(&run, ours, baselines, notes);
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.table());
    }
    Ok(())
}
