//! `quiver control --config FILE` (TOML).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::meta::{CHUNK_BYTES, DEFAULT_SEGMENT_BYTES};
use crate::store::EtcdConfig;

/// The default control address: every CLI command uses it unless told
/// otherwise (`--control`, or `QUIVER_CONTROL`).
pub const DEFAULT_CONTROL_ADDR: &str = "127.0.0.1:7700";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlConfig {
    /// This control node's name (unique among control nodes).
    #[serde(default = "default_name")]
    pub name: String,
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// The address clients are sent to when this node leads (default:
    /// `listen`).
    #[serde(default)]
    pub advertise: Option<String>,
    /// Where the embedded store keeps its file.
    pub data_dir: PathBuf,
    /// The shared secret every RPC must carry. Either this or `token_file`.
    #[serde(default)]
    pub token: Option<String>,
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// Serve gRPC over TLS (rustls) with this certificate and key.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    #[serde(default)]
    pub store: StoreConfig,
    #[serde(default)]
    pub cluster: ClusterTuning,
    /// Logical pools (default: one pool `default` of 32 copysets on the
    /// physical pool `default`).
    #[serde(default = "default_pools")]
    pub pools: Vec<PoolConfig>,
}

/// PEM files of the control node's TLS identity.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum StoreConfig {
    /// redb in `data_dir`: one control node.
    #[default]
    Embedded,
    /// etcd: several control nodes, one leader elected through etcd.
    Etcd(EtcdConfig),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterTuning {
    /// Bytes per segment (the unit of allocation): a multiple of 16 MiB.
    pub segment_bytes: u64,
    /// A chunkserver silent this long is offline and its copysets are
    /// re-replicated.
    pub offline_after_ms: u64,
    pub schedule_interval_ms: u64,
    /// Scheduler operations started per interval, at most.
    pub max_ops_per_tick: usize,
    /// How long a write lease lasts unless refreshed.
    pub write_lease_ms: u64,
    /// How long a deleted volume stays in the recycle bin.
    pub recycle_retention_s: u64,
}

impl Default for ClusterTuning {
    fn default() -> ClusterTuning {
        ClusterTuning {
            segment_bytes: DEFAULT_SEGMENT_BYTES,
            offline_after_ms: 10_000,
            schedule_interval_ms: 1_000,
            max_ops_per_tick: 4,
            write_lease_ms: 10_000,
            recycle_retention_s: 24 * 3600,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    pub name: String,
    /// Chunkservers registered with this pool name hold its copysets.
    #[serde(default = "default_pool")]
    pub physical_pool: String,
    pub copysets: u32,
    /// Copysets are placed once this many chunkservers (in three zones at
    /// least) are online.
    #[serde(default = "default_min_chunkservers")]
    pub min_chunkservers: usize,
}

fn default_name() -> String {
    "control-1".into()
}
fn default_listen() -> SocketAddr {
    DEFAULT_CONTROL_ADDR.parse().expect("a socket address")
}
fn default_pool() -> String {
    "default".into()
}
fn default_min_chunkservers() -> usize {
    3
}
fn default_pools() -> Vec<PoolConfig> {
    vec![PoolConfig {
        name: default_pool(),
        physical_pool: default_pool(),
        copysets: 32,
        min_chunkservers: default_min_chunkservers(),
    }]
}

impl ControlConfig {
    /// A configuration with every optional key at its default.
    pub fn new(listen: SocketAddr, data_dir: PathBuf, token: &str) -> ControlConfig {
        ControlConfig {
            name: default_name(),
            listen,
            advertise: None,
            data_dir,
            token: Some(token.to_owned()),
            token_file: None,
            tls: None,
            store: StoreConfig::default(),
            cluster: ClusterTuning::default(),
            pools: default_pools(),
        }
    }

    pub fn load(path: &Path) -> anyhow::Result<ControlConfig> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let config: ControlConfig =
            toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        config.check()?;
        Ok(config)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a control configuration serializes")
    }

    pub fn check(&self) -> anyhow::Result<()> {
        let seg = self.cluster.segment_bytes;
        anyhow::ensure!(
            seg > 0 && seg.is_multiple_of(CHUNK_BYTES),
            "cluster.segment_bytes = {seg}: must be a positive multiple of {CHUNK_BYTES}"
        );
        anyhow::ensure!(!self.pools.is_empty(), "at least one [[pools]] is needed");
        for p in &self.pools {
            anyhow::ensure!(p.copysets > 0, "pool {}: copysets must be positive", p.name);
        }
        self.token()?;
        Ok(())
    }

    /// The shared secret, from `token` or `token_file`.
    pub fn token(&self) -> anyhow::Result<String> {
        let token = match (&self.token, &self.token_file) {
            (Some(t), None) => t.clone(),
            (None, Some(path)) => std::fs::read_to_string(path)
                .with_context(|| format!("reading token_file {}", path.display()))?
                .trim()
                .to_owned(),
            _ => anyhow::bail!("set exactly one of token and token_file"),
        };
        anyhow::ensure!(!token.is_empty(), "the token is empty");
        Ok(token)
    }

    pub fn advertised(&self) -> String {
        self.advertise
            .clone()
            .unwrap_or_else(|| self.listen.to_string())
    }
}
