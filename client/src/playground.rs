//! `quiver playground`: a whole cluster on this machine, for trying Quiver
//! out. A control node (embedded store) and three chunkservers run as child
//! processes of this one, their data and logs under `--dir`; a short
//! verified benchmark runs on a scratch volume; the volume `demo` is served
//! over NBD until Ctrl-C. A second run finds everything where it was left.

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use quiver_client::nbd::NbdListener;
use quiver_client::{Cluster, ClusterOptions, OpenMode};
use quiver_control::{proto, ControlConfig, DEFAULT_CONTROL_ADDR};
use quiver_raft::chunkserver::ChunkserverConfig;

use crate::bench::format_size;
use crate::bench::volume::{VolumePattern, VolumeWorkload};
use crate::cluster_cli::{stop_signal, DEFAULT_NBD_ADDR};

#[derive(Args)]
pub struct PlaygroundArgs {
    /// Where the cluster keeps its data, configuration and logs.
    #[arg(long, default_value = "playground-data")]
    pub dir: PathBuf,
    /// Size of the volume `demo` (made on the first run).
    #[arg(long, default_value = "1G", value_parser = crate::bench::parse_size)]
    pub size: u64,
    /// Where the NBD server listens.
    #[arg(long, default_value = DEFAULT_NBD_ADDR)]
    pub nbd: SocketAddr,
    /// Where the control node listens; the chunkservers take the next
    /// three ports.
    #[arg(long, default_value = DEFAULT_CONTROL_ADDR)]
    pub control: SocketAddr,
    /// Fabric transport: auto (verbs where an RDMA device answers), tcp,
    /// verbs.
    #[arg(long, default_value = "auto")]
    pub transport: String,
    /// Seconds of the warm-up benchmark (0 skips it).
    #[arg(long, default_value_t = 3.0)]
    pub bench_seconds: f64,
}

const CHUNKSERVERS: u64 = 3;
const COPYSETS: u32 = 8;
const SCRATCH: &str = "playground-scratch";
const DEMO: &str = "demo";

/// The child processes; stopped (SIGTERM, then SIGKILL) in reverse order
/// of start when dropped.
struct Children {
    running: Vec<(String, Child)>,
    logs: PathBuf,
}

impl Children {
    fn spawn(&mut self, name: &str, args: &[&str]) -> anyhow::Result<()> {
        let exe = std::env::current_exe().context("finding the quiver binary")?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.logs.join(format!("{name}.log")))?;
        let mut command = Command::new(exe);
        command
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info,openraft=warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // Ctrl-C reaches only the playground, which stops the children
            // in order (the NBD clients' volume first, the control node last).
            .process_group(0);
        // SAFETY: prctl in the child before exec, async-signal-safe: the
        // children go when the playground dies, even by SIGKILL.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        self.running.push((name.to_owned(), child));
        Ok(())
    }

    /// The first child that exited, with the end of its log.
    fn exited(&mut self) -> Option<String> {
        for (name, child) in &mut self.running {
            if let Ok(Some(status)) = child.try_wait() {
                let log = std::fs::read_to_string(self.logs.join(format!("{name}.log")))
                    .unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                return Some(format!(
                    "{name} exited ({status}); the end of {}:\n{}",
                    self.logs.join(format!("{name}.log")).display(),
                    tail.join("\n")
                ));
            }
        }
        None
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        for (name, child) in self.running.iter_mut().rev() {
            // SAFETY: signalling our own child by pid.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match child.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    _ => {
                        eprintln!("playground: {name} did not stop in time: killing it");
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                }
            }
        }
    }
}

/// The cluster's token: made once, kept in `dir/token`.
fn token(dir: &Path) -> anyhow::Result<String> {
    let path = dir.join("token");
    if let Ok(t) = std::fs::read_to_string(&path) {
        if !t.trim().is_empty() {
            return Ok(t.trim().to_owned());
        }
    }
    let t: String = (0..32)
        .map(|_| format!("{:x}", rand::random::<u8>() & 0xf))
        .collect();
    std::fs::write(&path, &t).with_context(|| format!("writing {}", path.display()))?;
    Ok(t)
}

fn transport_note(choice: &str) -> String {
    match (choice, quiver_fabric::verbs::devices()) {
        ("tcp", _) => "transport: TCP (--transport tcp)".into(),
        (_, Ok(devices)) if !devices.is_empty() => format!(
            "transport: verbs RDMA where both ends have a device (found {})",
            devices
                .iter()
                .map(|d| d.name.clone())
                .collect::<Vec<_>>()
                .join(", ")
        ),
        (_, Ok(_)) => "transport: TCP (no RDMA device on this machine)".into(),
        (_, Err(why)) => format!("transport: TCP (no RDMA here: {why})"),
    }
}

pub fn run(args: PlaygroundArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("creating {}", args.dir.display()))?;
    let dir = args.dir.canonicalize()?;
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs)?;
    let token = token(&dir)?;
    let reused = dir.join("control").exists();
    println!(
        "playground: {} cluster in {}",
        if reused { "reusing the" } else { "a new" },
        dir.display()
    );
    println!("playground: {}", transport_note(&args.transport));

    // Configurations, written every run (so flags apply); data stays.
    let mut control = ControlConfig::new(args.control, dir.join("control"), &token);
    control.token = None;
    control.token_file = Some(dir.join("token"));
    control.pools[0].copysets = COPYSETS;
    let control_file = dir.join("control.toml");
    std::fs::write(&control_file, control.to_toml())?;
    let mut children = Children {
        running: Vec::new(),
        logs: logs.clone(),
    };
    children.spawn(
        "control",
        &["control", "--config", &control_file.to_string_lossy()],
    )?;
    for node in 1..=CHUNKSERVERS {
        let listen = SocketAddr::new(args.control.ip(), args.control.port() + node as u16);
        let mut cs = ChunkserverConfig::new(node, listen, dir.join(format!("chunkserver{node}")));
        cs.transport = args.transport.clone();
        cs.pool_files = 8;
        cs.control = vec![args.control.to_string()];
        cs.token = Some(token.clone());
        cs.zone = Some(format!("zone-{node}"));
        cs.heartbeat_ms = 1000;
        let file = dir.join(format!("chunkserver{node}.toml"));
        std::fs::write(&file, cs.to_toml())?;
        children.spawn(
            &format!("chunkserver{node}"),
            &["chunkserver", "--config", &file.to_string_lossy()],
        )?;
    }
    println!(
        "playground: control on {}, chunkservers on ports {}-{}, logs in {}",
        args.control,
        args.control.port() + 1,
        args.control.port() + CHUNKSERVERS as u16,
        logs.display()
    );

    crate::runtime()?.block_on(async move {
        let cluster = Cluster::connect_with(
            &[args.control.to_string()],
            &token,
            ClusterOptions {
                transport: match args.transport.as_str() {
                    "tcp" => quiver_fabric::TransportChoice::Tcp,
                    "verbs" => quiver_fabric::TransportChoice::Verbs,
                    _ => quiver_fabric::TransportChoice::Auto,
                },
                client_name: "playground".into(),
                ..ClusterOptions::default()
            },
        )
        .await?;
        wait_healthy(&cluster, &mut children).await?;
        if args.bench_seconds > 0.0 {
            warm_up_bench(&cluster, args.bench_seconds).await?;
        }
        let demo = demo_volume(&cluster, args.size).await?;
        let listener = NbdListener::bind_tcp(args.nbd)
            .await
            .with_context(|| format!("NBD: listening on {}", args.nbd))?;
        let uri = listener.bound()?.uri(DEMO);
        println!();
        println!("ready: {uri}");
        println!();
        println!("  try:   nbdinfo {uri}");
        println!("         qemu-io -f raw -c 'write -P 0xab 0 1M' -c 'read -P 0xab 0 1M' {uri}");
        println!("         qemu-img convert -n -f raw -O raw disk.img {uri}");
        println!(
            "         fio --name=t --ioengine=nbd --uri={uri} --rw=randwrite --bs=4k --iodepth=32 --runtime=20 --time_based"
        );
        println!("         quiver status; quiver volume list   (beside this directory's playground-data)");
        println!("  Ctrl-C stops the cluster; running again reuses it.");
        let device = Arc::new(demo.clone());
        quiver_client::nbd::serve(device, DEMO.into(), listener, async {
            tokio::select! {
                () = stop_signal() => {}
                () = watch_children(&mut children) => {}
            }
        })
        .await;
        println!("playground: stopping");
        if let Err(e) = demo.close().await {
            eprintln!("playground: closing {DEMO}: {e}");
        }
        drop(children);
        println!("playground: stopped");
        Ok(())
    })
}

/// Resolves (after saying why) if a child process dies.
async fn watch_children(children: &mut Children) {
    loop {
        if let Some(why) = children.exited() {
            eprintln!("playground: {why}");
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn wait_healthy(cluster: &Cluster, children: &mut Children) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut progress = crate::bench::Progress::start("playground: waiting for the cluster");
    loop {
        if let Some(why) = children.exited() {
            anyhow::bail!("{why}");
        }
        let status = cluster
            .control()
            .clone()
            .retry_for(Duration::from_millis(200))
            .call(
                "status",
                |mut c| async move { c.status(proto::Empty {}).await },
            )
            .await;
        let last = match status {
            Ok(s) if s.health == "HEALTH_OK" && s.copysets_healthy == COPYSETS => break,
            Ok(s) => {
                progress.update(u64::from(s.copysets_healthy), u64::from(COPYSETS));
                format!("{}: {}", s.health, s.notes.join("; "))
            }
            Err(e) => e.to_string(),
        };
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(90),
            "the cluster did not become healthy within 90 s (last: {last})"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    progress.finish();
    Ok(())
}

/// Creates `name` of `size` unless it exists.
async fn ensure_volume(cluster: &Cluster, name: &str, size: u64) -> anyhow::Result<()> {
    let request = proto::CreateVolumeRequest {
        name: name.into(),
        size,
        owner: "playground".into(),
        pool: String::new(),
    };
    match cluster
        .control()
        .call("creating a volume", |mut c| {
            let r = request.clone();
            async move { c.create_volume(r).await }
        })
        .await
    {
        Ok(_) => Ok(()),
        Err(e) if e.code() == tonic::Code::AlreadyExists => Ok(()),
        Err(e) => Err(e.into()),
    }
}

async fn warm_up_bench(cluster: &Cluster, seconds: f64) -> anyhow::Result<()> {
    ensure_volume(cluster, SCRATCH, 1 << 30).await?;
    let volume = cluster
        .open(SCRATCH, OpenMode::ReadWrite { force: true })
        .await?;
    let workload = VolumeWorkload {
        pattern: VolumePattern::Rw,
        bs: 4096,
        iodepth: 8,
        duration: Duration::from_secs_f64(seconds),
        working_set: 8 << 20,
        verify: true,
    };
    println!(
        "playground: benchmark on volume {SCRATCH}: 4 KiB random reads and writes, iodepth 8, {seconds} s, verified"
    );
    let run = crate::bench::volume::run(volume.clone(), workload).await?;
    let f = crate::bench::report::Figures::of(&run.stats);
    println!(
        "playground: {:.0} IOPS, latency p50 {:.0} us, p99 {:.0} us, max {:.0} us; {} reads verified, none wrong",
        f.ops_per_s, f.p50_us, f.p99_us, f.max_us, run.verified_reads
    );
    volume.close().await?;
    Ok(())
}

async fn demo_volume(cluster: &Cluster, size: u64) -> anyhow::Result<quiver_client::Volume> {
    ensure_volume(cluster, DEMO, size).await?;
    // Ours: a lease left by an earlier run that was killed is taken over.
    let v = cluster
        .open(DEMO, OpenMode::ReadWrite { force: true })
        .await?;
    if v.size() != size {
        println!(
            "playground: volume {DEMO} exists with {} (--size {} applies to a new one)",
            format_size(v.size()),
            format_size(size)
        );
    }
    Ok(v)
}
