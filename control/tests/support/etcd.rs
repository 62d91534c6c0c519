//! A real `etcd` for tests, on its own loopback ports and data directory,
//! killed on drop. Shared by the control crate's store tests and the
//! client crate's control plane tests (included by `#[path]`).
//!
//! Without an `etcd` binary on PATH, `Etcd::start` says so and returns None,
//! except under CI=true, where it panics: CI installs it (`.ci/setup`).

#![allow(dead_code)] // each test file uses a different part

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use quiver_control::store::{EtcdConfig, EtcdStore, LeaderRecord};
use tempfile::TempDir;

/// How long etcd may take to become healthy.
const STEP: Duration = Duration::from_secs(10);

/// The prefix of every etcd test: a leading slash and a nested path, as a
/// deployment would use.
pub const PREFIX: &str = "/quiver-test/";

/// An etcd server of our own, killed on drop.
pub struct Etcd {
    process: Child,
    pub client_port: u16,
    dir: TempDir,
}

impl Etcd {
    /// Starts etcd, or returns None (after saying why) when it is not
    /// installed, outside CI.
    pub fn start() -> Option<Etcd> {
        let Some(binary) = find_on_path("etcd") else {
            if std::env::var("CI").is_ok_and(|ci| ci == "true") {
                panic!("etcd not installed, and CI=true requires the etcd tests (.ci/setup installs Debian package etcd-server)");
            }
            // Straight to stderr: the test harness would swallow eprintln!.
            writeln!(
                std::io::stderr(),
                "skipping: etcd not installed (Debian package etcd-server; .ci/setup installs it)"
            )
            .ok();
            return None;
        };
        // A port picked free may be taken before etcd binds it: try anew.
        let mut last_failure = String::new();
        for _ in 0..3 {
            match Etcd::try_start(&binary) {
                Ok(etcd) => return Some(etcd),
                Err(failure) => last_failure = failure,
            }
        }
        panic!("etcd did not start: {last_failure}");
    }

    fn try_start(binary: &PathBuf) -> Result<Etcd, String> {
        let dir = TempDir::new().unwrap();
        let (client_port, peer_port) = (free_port(), free_port());
        let client = format!("http://127.0.0.1:{client_port}");
        let peer = format!("http://127.0.0.1:{peer_port}");
        let log = std::fs::File::create(dir.path().join("etcd.log")).unwrap();
        let mut command = Command::new(binary);
        command
            .arg("--name=default")
            .arg(format!("--data-dir={}", dir.path().join("data").display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=default={peer}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        // An ETCD_* variable in our environment would reconfigure it.
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("ETCD_") {
                command.env_remove(name);
            }
        }
        let process = command.spawn().map_err(|e| format!("spawning etcd: {e}"))?;
        let mut etcd = Etcd {
            process,
            client_port,
            dir,
        };
        let deadline = Instant::now() + STEP;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = etcd.process.try_wait() {
                return Err(format!("etcd exited ({status}): {}", etcd.log()));
            }
            if etcd
                .http("GET", "/health", "")
                .is_ok_and(|body| body.contains(r#""health":"true""#))
            {
                return Ok(etcd);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(format!("etcd not healthy within {STEP:?}: {}", etcd.log()))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default()
    }

    pub async fn store(&self, me: &LeaderRecord, lease_ttl_s: i64) -> EtcdStore {
        let config = EtcdConfig {
            endpoints: vec![format!("http://127.0.0.1:{}", self.client_port)],
            prefix: PREFIX.to_owned(),
            lease_ttl_s,
        };
        EtcdStore::connect(config, me.clone())
            .await
            .expect("connect to etcd")
    }

    /// Revokes the lease holding the leader key through etcd's HTTP gateway,
    /// behind the leader's back (the store keeps its lease ID to itself).
    pub fn revoke_leader_lease(&self) {
        let key = base64(format!("{PREFIX}control/leader").as_bytes());
        let range = self
            .http("POST", "/v3/kv/range", &format!(r#"{{"key":"{key}"}}"#))
            .unwrap();
        let range: serde_json::Value = serde_json::from_str(&range).unwrap();
        let lease = range["kvs"][0]["lease"]
            .as_str()
            .unwrap_or_else(|| panic!("no leased leader key: {range}"))
            .to_owned();
        let revoked = self
            .http(
                "POST",
                "/v3/lease/revoke",
                &format!(r#"{{"ID":"{lease}"}}"#),
            )
            .unwrap();
        assert!(!revoked.contains("error"), "revoke: {revoked}");
    }

    /// One HTTP/1.0 exchange with etcd's client port: the body of the answer.
    fn http(&self, method: &str, path: &str, body: &str) -> std::io::Result<String> {
        let mut socket = TcpStream::connect(("127.0.0.1", self.client_port))?;
        socket.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(
            socket,
            "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        )?;
        let mut answer = String::new();
        socket.read_to_string(&mut answer)?;
        Ok(answer
            .split_once("\r\n\r\n")
            .map_or(String::new(), |(_, body)| body.to_owned()))
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.process.kill().ok();
        self.process.wait().ok();
    }
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|path| path.is_file())
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Standard base64 with padding, as etcd's gateway wants keys.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let word = chunk.iter().enumerate().fold(0u32, |word, (i, byte)| {
            word | u32::from(*byte) << (16 - 8 * i)
        });
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(word >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}
