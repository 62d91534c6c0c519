//! `quiver bench replication`: writes replicated three ways by copysets of
//! chunkserver processes, beside the two costs they are made of, measured in
//! the same run: one node's chunk store writing with fdatasync (`chunkstore`)
//! and a fabric round trip of the same size (`fabric`); at iodepth 1 also
//! the replicated write as bare threads (`pipeline`, see its module).
//!
//! A replicated write costs at best one durable write (the leader's log
//! append and the followers' run in parallel) plus two network hops (client
//! to leader, leader to followers and back) — hence the target the issue
//! sets: p50 at most 1.5 x (chunkstore p50 + 2 x fabric p50).
//!
//! `iodepth` writers run at once, writer k on copyset k mod N, each on its
//! own chunk at random block-aligned offsets, one write at a time.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use quiver_raft::chunk_client::ChunkClient;
use quiver_raft::chunkserver::ChunkserverConfig;

use super::chunkstore::{Pattern, StoreBench, SyncPolicy};
use super::fabric::FabricOptions;
use super::{Limit, Mode, RunStats};

/// What to run.
#[derive(Debug, Clone)]
pub struct Setup {
    pub chunkservers: usize,
    pub copysets: u32,
    pub bs: usize,
    pub iodepth: usize,
    pub duration: Duration,
    /// Untimed writes per writer before each run (the first creates its chunk).
    pub warmup: u64,
    pub fabric: FabricOptions,
    /// Running chunkservers to use instead of starting our own.
    pub connect: Vec<SocketAddr>,
    pub dir: PathBuf,
    /// Servers and the chunk store baseline flush the device, not each file.
    pub device_flush: bool,
}

/// Chunkserver processes this bench started; killed when dropped.
pub struct Servers {
    children: Vec<Child>,
    pub addrs: Vec<SocketAddr>,
    /// node id → address, as the copysets name their members.
    pub nodes: BTreeMap<u64, SocketAddr>,
    dir: Option<PathBuf>,
}

impl Drop for Servers {
    fn drop(&mut self) {
        for c in &mut self.children {
            // SIGTERM first: a clean stop; SIGKILL if it lingers.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        }
        for c in &mut self.children {
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// What a chunkserver prints once it serves (`quiver chunkserver`).
pub const SERVING: &str = "quiver chunkserver: serving on ";

/// Passes a started chunkserver's stderr on to ours and sends the address
/// it says it serves on: each binds a port of its own choosing, so no two
/// processes race for one picked in advance.
fn forward_stderr(child: &mut Child, serving: std::sync::mpsc::Sender<SocketAddr>) {
    use std::io::BufRead;
    let Some(stderr) = child.stderr.take() else {
        return;
    };
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { return };
            if let Some(addr) = line
                .strip_prefix(SERVING)
                .and_then(|a| a.trim().parse().ok())
            {
                let _ = serving.send(addr);
            }
            eprintln!("{line}");
        }
    });
}

/// Starts `count` chunkservers of this binary on loopback, data under `dir`.
fn start_servers(s: &Setup, dir: &Path) -> anyhow::Result<Servers> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let exe = std::env::current_exe().context("finding the quiver binary")?;
    // Every writer's chunk is on every server (three servers) or on three of
    // them: format that many files ahead, and a few more.
    let pool_files = s.iodepth.max(s.copysets as usize) + 2;
    let transport = s.fabric.transport.config_name();
    let mut servers = Servers {
        children: Vec::new(),
        addrs: Vec::new(),
        nodes: BTreeMap::new(),
        dir: Some(dir.to_owned()),
    };
    for node in 1..=s.chunkservers as u64 {
        let data = dir.join(format!("node{node}"));
        let config = dir.join(format!("node{node}.toml"));
        let any_port = SocketAddr::from(([127, 0, 0, 1], 0));
        let mut cs = ChunkserverConfig::new(node, any_port, data);
        cs.transport = transport.to_string();
        cs.pool_files = pool_files;
        cs.spin_us = s.fabric.spin.as_micros() as u64;
        cs.device_flush = s.device_flush;
        std::fs::write(&config, cs.to_toml())?;
        let mut child = Command::new(&exe)
            .args(["chunkserver", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting a chunkserver")?;
        let (tx, rx) = std::sync::mpsc::channel();
        forward_stderr(&mut child, tx);
        servers.children.push(child);
        let addr = rx
            .recv_timeout(Duration::from_secs(60))
            .with_context(|| format!("chunkserver {node} did not say where it serves"))?;
        servers.addrs.push(addr);
        servers.nodes.insert(node, addr);
    }
    Ok(servers)
}

/// Waits until every server's chunk file pool is back at its size (servers
/// that do not report one are not waited for).
async fn wait_for_full_pools(client: &ChunkClient, addrs: &[SocketAddr]) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    for &addr in addrs {
        loop {
            let st = client
                .status(addr)
                .await
                .with_context(|| format!("chunkserver {addr} status"))?;
            if st.pool_free >= st.pool_files {
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "chunkserver {addr}: its chunk file pool stayed at {} of {} files",
                st.pool_free,
                st.pool_files
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(())
}

/// The members of copyset `c` (1-based): three servers in turn.
fn members(nodes: &BTreeMap<u64, SocketAddr>, c: u32) -> BTreeMap<u64, SocketAddr> {
    let all: Vec<(u64, SocketAddr)> = nodes.iter().map(|(&n, &a)| (n, a)).collect();
    (0..3.min(all.len()))
        .map(|i| all[(c as usize + i) % all.len()])
        .collect()
}

/// Where a writer writes: its copyset and chunk, and the servers to ask.
struct Target {
    copyset: u32,
    chunk: u64,
    peers: Vec<SocketAddr>,
}

/// A cluster ready to measure: servers up (ours or theirs), copysets led.
pub struct Cluster {
    /// Kept for its drop: our chunkservers stop with the cluster.
    _servers: Servers,
    client: Arc<ChunkClient>,
    targets: Vec<Arc<Target>>,
    pub transport: String,
}

impl Cluster {
    pub async fn start(s: &Setup) -> anyhow::Result<Cluster> {
        let mut servers = if s.connect.is_empty() {
            start_servers(s, &s.dir)?
        } else {
            Servers {
                children: Vec::new(),
                addrs: s.connect.clone(),
                nodes: BTreeMap::new(),
                dir: None,
            }
        };
        let client = Arc::new(ChunkClient::start(s.fabric.worker_config(s.bs + 64))?);
        let mut transports = Vec::new();
        for &addr in &servers.addrs.clone() {
            let st = client
                .status_within(addr, Duration::from_secs(60))
                .await
                .with_context(|| format!("chunkserver {addr} did not answer"))?;
            servers.nodes.insert(st.node, addr);
            transports.push(st.transport);
        }
        anyhow::ensure!(
            servers.nodes.len() >= 3,
            "replication needs three chunkservers, got {}",
            servers.nodes.len()
        );
        for c in 1..=s.copysets {
            client
                .create_copyset(
                    c,
                    &members(&servers.nodes, c)
                        .into_iter()
                        .map(|(n, a)| (n, a.to_string()))
                        .collect(),
                )
                .await
                .with_context(|| format!("creating copyset {c}"))?;
        }
        let targets: Vec<Arc<Target>> = (0..s.iodepth)
            .map(|k| {
                let copyset = 1 + (k as u32 % s.copysets);
                let peers = members(&servers.nodes, copyset).into_values().collect();
                Arc::new(Target {
                    copyset,
                    chunk: 1 + (k as u64 / u64::from(s.copysets)),
                    peers,
                })
            })
            .collect();
        // Every writer's chunk now, and then full chunk file pools: a pool
        // refills in the background after chunks are made, writing 16 MiB
        // per file, and that is setup, not the steady state measured.
        for t in &targets {
            client
                .write(&t.peers, t.copyset, t.chunk, 0, 0, &vec![0; s.bs])
                .await
                .with_context(|| format!("creating chunk {} of copyset {}", t.chunk, t.copyset))?;
        }
        wait_for_full_pools(&client, &servers.addrs).await?;
        let transport = match client.node().transport_to(servers.addrs[0]).await {
            Some(quiver_fabric::EndpointTransport::Verbs) => "verbs".to_string(),
            Some(_) => "tcp".to_string(),
            None => format!("{} (configured)", transports[0]),
        };
        Ok(Cluster {
            _servers: servers,
            client,
            targets,
            transport,
        })
    }

    /// One run: `iodepth` writers for `duration` after `warmup` writes each.
    pub async fn run(&self, s: &Setup) -> anyhow::Result<RunStats> {
        let blocks = (quiver_chunkstore::CHUNK_BYTES / s.bs as u64).max(1);
        let mut tasks = Vec::new();
        for (k, target) in self.targets.iter().enumerate() {
            let client = Arc::clone(&self.client);
            let target = Arc::clone(target);
            let (bs, warmup, duration) = (s.bs, s.warmup, s.duration);
            tasks.push(tokio::spawn(async move {
                let mut rng = k as u64 * 0x9e37_79b9_7f4a_7c15 + 1;
                let data = vec![k as u8 ^ 0x5a; bs];
                let mut times = Vec::new();
                let next_offset = |rng: &mut u64| {
                    // xorshift: cheap, and each writer has its own sequence.
                    *rng ^= *rng << 13;
                    *rng ^= *rng >> 7;
                    *rng ^= *rng << 17;
                    (*rng % blocks) * bs as u64
                };
                for _ in 0..warmup {
                    let offset = next_offset(&mut rng);
                    client
                        .write(
                            &target.peers,
                            target.copyset,
                            target.chunk,
                            offset,
                            0,
                            &data,
                        )
                        .await?;
                }
                let end = Instant::now() + duration;
                while Instant::now() < end {
                    let offset = next_offset(&mut rng);
                    let sent = Instant::now();
                    client
                        .write(
                            &target.peers,
                            target.copyset,
                            target.chunk,
                            offset,
                            0,
                            &data,
                        )
                        .await?;
                    times.push((sent, Instant::now()));
                }
                anyhow::Ok(times)
            }));
        }
        let mut stats = RunStats::new("quiver", &self.transport);
        for t in tasks {
            for (sent, done) in t.await.context("a writer panicked")?? {
                stats.record(sent, done, s.bs);
            }
        }
        // Each writer measured for `duration` after its own warm-up.
        stats.elapsed = s.duration;
        Ok(stats)
    }
}

/// The `chunkstore` baseline: the same writes (block size, queue depth) on
/// one local chunk store, each made durable (the store's device flush, or
/// fdatasync with `--per-file-fdatasync`).
pub fn chunkstore_baseline(store: &mut StoreBench) -> anyhow::Result<RunStats> {
    let mut stats = store.run()?;
    stats.name = "chunkstore".into();
    Ok(stats)
}

pub fn chunkstore_workload(s: &Setup) -> super::chunkstore::Workload {
    super::chunkstore::Workload {
        pattern: Pattern::Randwrite,
        bs: s.bs as u64,
        iodepth: s.iodepth,
        size: quiver_chunkstore::CHUNK_BYTES * s.iodepth as u64,
        sync: SyncPolicy::Always,
        limit: Limit::Duration(s.duration),
        warmup: s.warmup.max(16),
        device_flush: s.device_flush,
    }
}

/// The `fabric` baseline: a round trip of the same size (ping-pong at queue
/// depth 1, `iodepth` in flight otherwise).
pub fn fabric_baseline(s: &Setup) -> anyhow::Result<RunStats> {
    let workload = super::Workload {
        mode: if s.iodepth == 1 {
            Mode::Pingpong
        } else {
            Mode::Stream
        },
        size: s.bs,
        limit: Limit::Duration(s.duration),
        window: s.iodepth,
        warmup: 200,
    };
    let mut stats = super::fabric::run(&workload, &s.fabric, None)?;
    stats.name = "fabric".into();
    Ok(stats)
}
