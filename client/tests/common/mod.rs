//! Chunkserver processes on loopback for tests: `quiver chunkserver` started
//! from this build, killed with SIGKILL, restarted on the same data.
//!
//! `QUIVER_TEST_TRANSPORT` (tcp, the default; auto; verbs) picks the fabric
//! transport of servers and client, and `QUIVER_BIN` the binary (the
//! soft-RoCE guest sets both: there the binary lives elsewhere).

#![allow(dead_code)] // each test file uses a different part

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use quiver_raft::chunk_client::ChunkClient;
use quiver_raft::chunkserver::{ChunkserverConfig, RaftTuning};
use quiver_raft::service::ServerStatus;

pub const ELECTION_TIMEOUT_MAX_MS: u64 = 600;
/// How long a follower of openraft 0.9 waits without heartbeats before it
/// stands for election, at most: the leader lease it granted (openraft sets
/// it to the maximum election timeout) plus a random election timeout.
pub const FOLLOWER_WAIT_MAX_MS: u64 = 2 * ELECTION_TIMEOUT_MAX_MS;

pub struct Server {
    pub node: u64,
    pub addr: SocketAddr,
    pub dir: PathBuf,
    config: PathBuf,
    child: Option<Child>,
}

impl Server {
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// SIGKILL: no chance to flush or close anything.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    pub fn start(&mut self) {
        assert!(self.child.is_none(), "node {} runs already", self.node);
        let bin = std::env::var("QUIVER_BIN")
            .unwrap_or_else(|_| env!("CARGO_BIN_EXE_quiver").to_string());
        let child = Command::new(bin)
            .args(["chunkserver", "--config"])
            .arg(&self.config)
            .env(
                "RUST_LOG",
                // Peers being down is the point of these tests: openraft's
                // errors about it would drown the output.
                std::env::var("RUST_LOG").unwrap_or_else(|_| "error,openraft=off".into()),
            )
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

pub struct Tuning {
    pub snapshot_every: u64,
    pub log_keep: u64,
    pub log_mem_mib: u64,
    pub pool_files: usize,
    /// Control plane endpoints and token (none: no control plane).
    pub control: Vec<String>,
    pub token: Option<String>,
}

impl Default for Tuning {
    fn default() -> Tuning {
        Tuning {
            log_mem_mib: 64,
            snapshot_every: 20_000,
            log_keep: 1_000,
            pool_files: 4,
            control: Vec::new(),
            token: None,
        }
    }
}

/// The transport under test, as a chunkserver configuration names it.
pub fn transport() -> String {
    std::env::var("QUIVER_TEST_TRANSPORT").unwrap_or_else(|_| "tcp".into())
}

/// `count` consecutive free loopback ports, below the kernel's ephemeral
/// range (which starts at 32768 by default). A port the kernel handed out
/// and we closed could go to any connection's source port before the server
/// binds it; these never do. Each test process takes its own block of them
/// (by its PID), and hands each port out once, so a killed server's port
/// is still its own when it restarts.
pub fn free_ports(count: u16) -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    const FIRST: u16 = 16_000;
    const BLOCK: u16 = 128;
    const BLOCKS: u32 = (32_768 - FIRST as u32) / BLOCK as u32;
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let block = FIRST + (std::process::id() % BLOCKS) as u16 * BLOCK;
    loop {
        let offset = NEXT.fetch_add(count, Ordering::Relaxed);
        assert!(
            offset + count <= BLOCK,
            "this test process used all {BLOCK} of its ports"
        );
        let base = block + offset;
        if (0..count).all(|i| TcpListener::bind(("127.0.0.1", base + i)).is_ok()) {
            return base;
        }
    }
}

fn free_port() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_ports(1)))
}

/// Writes each server's configuration and starts it.
pub fn start_servers(root: &Path, count: u64, tuning: &Tuning) -> Vec<Server> {
    (1..=count)
        .map(|node| start_server(root, node, tuning))
        .collect()
}

/// Writes chunkserver `node`'s configuration and starts it.
pub fn start_server(root: &Path, node: u64, tuning: &Tuning) -> Server {
    let addr = free_port();
    let dir = root.join(format!("node{node}"));
    let config = root.join(format!("node{node}.toml"));
    let mut cs = ChunkserverConfig::new(node, addr, dir.clone());
    cs.transport = transport();
    cs.pool_files = tuning.pool_files;
    cs.log_segment_mib = 8;
    cs.arena_mib = 16;
    cs.raft = RaftTuning {
        heartbeat_ms: 100,
        election_timeout_min_ms: ELECTION_TIMEOUT_MAX_MS / 2,
        election_timeout_max_ms: ELECTION_TIMEOUT_MAX_MS,
        snapshot_every: tuning.snapshot_every,
        log_keep: tuning.log_keep,
        log_mem_mib: tuning.log_mem_mib,
    };
    cs.control = tuning.control.clone();
    cs.token = tuning.token.clone();
    cs.heartbeat_ms = 200;
    std::fs::write(&config, cs.to_toml()).unwrap();
    let mut s = Server {
        node,
        addr,
        dir,
        config,
        child: None,
    };
    s.start();
    s
}

/// A `quiver control` process.
pub struct Control {
    pub addr: SocketAddr,
    pub name: String,
    config: PathBuf,
    child: Option<Child>,
}

impl Control {
    /// Starts a control node in `dir` with `token`; `tune` adjusts its
    /// configuration (defaults are quick: 2 s offline, 200 ms scheduling).
    pub fn start(
        dir: &Path,
        name: &str,
        token: &str,
        tune: impl FnOnce(&mut quiver_control::ControlConfig),
    ) -> Control {
        let addr = free_port();
        let mut config = quiver_control::ControlConfig::new(addr, dir.join(name), token);
        config.name = name.to_owned();
        config.cluster.offline_after_ms = 2_000;
        config.cluster.schedule_interval_ms = 200;
        config.pools[0].copysets = 6;
        tune(&mut config);
        let path = dir.join(format!("{name}.toml"));
        std::fs::write(&path, config.to_toml()).unwrap();
        let mut c = Control {
            addr,
            name: name.to_owned(),
            config: path,
            child: None,
        };
        c.start_again();
        c
    }

    pub fn start_again(&mut self) {
        let bin = std::env::var("QUIVER_BIN")
            .unwrap_or_else(|_| env!("CARGO_BIN_EXE_quiver").to_string());
        self.child = Some(
            Command::new(bin)
                .args(["control", "--config"])
                .arg(&self.config)
                .env(
                    "RUST_LOG",
                    std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
                )
                .stdout(Stdio::null())
                .spawn()
                .unwrap(),
        );
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Polls `probe` until it returns Some, or panics naming `what` after `within`.
pub async fn eventually<T, F, Fut>(what: &str, within: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(Instant::now() < deadline, "not within {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub fn peers(servers: &[Server]) -> BTreeMap<u64, String> {
    servers
        .iter()
        .map(|s| (s.node, s.addr.to_string()))
        .collect()
}

/// Waits until `server` answers a status call.
pub async fn status_within(
    client: &ChunkClient,
    server: SocketAddr,
    within: Duration,
) -> ServerStatus {
    client
        .status_within(server, within)
        .await
        .unwrap_or_else(|e| panic!("{server} did not answer: {e}"))
}

/// The leader of `copyset` among `servers` (by their own claims), once one claims it.
pub async fn leader_of(
    client: &ChunkClient,
    servers: &[&Server],
    copyset: u32,
    within: Duration,
) -> u64 {
    let deadline = Instant::now() + within;
    loop {
        for s in servers {
            if let Ok(st) = client.status(s.addr).await {
                if st
                    .copysets
                    .iter()
                    .any(|c| c.copyset == copyset && c.leader == Some(s.node))
                {
                    return s.node;
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "no leader of copyset {copyset} within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A page whose bytes say which write made it (checked on read).
pub fn page_of(write: u64, page_bytes: usize) -> Vec<u8> {
    let mut page = vec![0u8; page_bytes];
    for (i, word) in page.chunks_exact_mut(8).enumerate() {
        word.copy_from_slice(&(write.wrapping_mul(1_000_003) ^ i as u64).to_le_bytes());
    }
    page
}

/// The client a test uses: TCP, short calls, long retries.
pub fn client() -> ChunkClient {
    let transport = match transport().as_str() {
        "verbs" => quiver_fabric::TransportChoice::Verbs,
        "auto" => quiver_fabric::TransportChoice::Auto,
        _ => quiver_fabric::TransportChoice::Tcp,
    };
    let mut c = ChunkClient::start(quiver_fabric::WorkerConfig {
        transport,
        ..Default::default()
    })
    .unwrap();
    c.call_timeout = Duration::from_millis(500);
    c.deadline = Duration::from_secs(20);
    c
}
