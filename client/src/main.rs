//! `quiver`: the one command-line tool of Quiver.

mod bench;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};

use bench::fabric::{EchoServer, FabricOptions, Transport};
use bench::report::{Figures, Report};
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
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Active-message RPC latency and throughput of the fabric.
    Fabric(BenchFabric),
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
            opts.resolve_transport()?;
            let server = EchoServer::start(&opts, listen, max_size, window)?;
            eprintln!("quiver fabric: echo server listening on {}", server.addr);
            server.wait();
            Ok(())
        }
    }
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
