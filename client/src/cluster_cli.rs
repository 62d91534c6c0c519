//! The control plane from the command line: `quiver control`, `quiver
//! status`, `quiver volume ...`.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Subcommand};
use quiver_control::proto;
use quiver_control::{ControlClient, ControlConfig, DEFAULT_CONTROL_ADDR};

/// Where the control plane is and how to prove we may talk to it.
#[derive(Args, Clone)]
pub struct ControlArgs {
    /// Control node addresses, comma separated (any of them will do).
    #[arg(long, env = "QUIVER_CONTROL", value_delimiter = ',', default_value = DEFAULT_CONTROL_ADDR, global = true)]
    pub control: Vec<String>,
    /// The cluster's token (else --token-file, else ./playground-data/token).
    #[arg(long, env = "QUIVER_TOKEN", global = true, hide_env_values = true)]
    pub token: Option<String>,
    #[arg(long, env = "QUIVER_TOKEN_FILE", global = true)]
    pub token_file: Option<PathBuf>,
    /// Talk TLS, trusting the control nodes' certificates signed by this CA (PEM).
    #[arg(long, env = "QUIVER_CA", global = true)]
    pub ca: Option<PathBuf>,
}

/// Where the playground keeps its token: commands run beside it find it.
pub const PLAYGROUND_TOKEN: &str = "playground-data/token";

impl ControlArgs {
    pub fn token(&self) -> anyhow::Result<String> {
        if let Some(t) = &self.token {
            return Ok(t.clone());
        }
        let path = self
            .token_file
            .clone()
            .unwrap_or_else(|| PathBuf::from(PLAYGROUND_TOKEN));
        let token = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "no token: pass --token or QUIVER_TOKEN, or --token-file ({} not readable)",
                path.display()
            )
        })?;
        Ok(token.trim().to_owned())
    }

    /// The CA certificate (PEM) for a control plane serving TLS.
    pub fn ca(&self) -> anyhow::Result<Option<Vec<u8>>> {
        self.ca
            .as_ref()
            .map(|path| std::fs::read(path).with_context(|| format!("reading {}", path.display())))
            .transpose()
    }

    /// A client (inside a runtime: it connects lazily).
    pub fn client(&self) -> anyhow::Result<ControlClient> {
        let ca = self.ca()?;
        Ok(ControlClient::connect(
            &self.control,
            &self.token()?,
            ca.as_deref(),
        )?)
    }
}

#[derive(Subcommand)]
pub enum VolumeCommand {
    /// Create a volume (its size a multiple of the segment size, 1 GiB).
    Create {
        name: String,
        /// Bytes, or with a unit: 10G, 512M, 1T.
        #[arg(long, value_parser = crate::bench::parse_size)]
        size: u64,
        #[arg(long, default_value = "")]
        owner: String,
        /// Logical pool (default: the first).
        #[arg(long, default_value = "")]
        pool: String,
        #[arg(long)]
        json: bool,
    },
    /// List volumes.
    List {
        /// Include the recycle bin.
        #[arg(long)]
        recycled: bool,
        #[arg(long)]
        json: bool,
    },
    /// Show one volume.
    Stat {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Grow a volume.
    Extend {
        name: String,
        #[arg(long, value_parser = crate::bench::parse_size)]
        size: u64,
        #[arg(long)]
        json: bool,
    },
    Rename {
        name: String,
        new_name: String,
        #[arg(long)]
        json: bool,
    },
    /// Move a volume into the recycle bin (purged after the retention time).
    Delete {
        name: String,
        #[arg(long)]
        json: bool,
    },
}

/// `quiver control --config FILE`.
pub fn run_control(path: &Path) -> anyhow::Result<()> {
    use quiver_control::config::StoreConfig;
    use quiver_control::store::{EmbeddedStore, EtcdStore, LeaderRecord};
    let config = ControlConfig::load(path)?;
    crate::runtime()?.block_on(async move {
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("listening on {}", config.listen))?;
        let me = LeaderRecord {
            name: config.name.clone(),
            addr: config.advertised(),
        };
        eprintln!(
            "quiver control: {} serving on {} ({} store)",
            config.name,
            config.listen,
            match &config.store {
                StoreConfig::Embedded => "embedded",
                StoreConfig::Etcd(_) => "etcd",
            }
        );
        let stop = async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("a SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        };
        match config.store.clone() {
            StoreConfig::Embedded => {
                let store = EmbeddedStore::open(&config.data_dir, me)?;
                quiver_control::ControlNode::new(config, store)
                    .run(listener, stop)
                    .await
            }
            StoreConfig::Etcd(etcd) => {
                let store = EtcdStore::connect(etcd, me).await?;
                quiver_control::ControlNode::new(config, store)
                    .run(listener, stop)
                    .await
            }
        }
    })
}

/// `quiver status`.
pub fn status(control: &ControlArgs, json: bool) -> anyhow::Result<()> {
    let s = crate::runtime()?.block_on(async {
        let client = control.client()?;
        anyhow::Ok(
            client
                .call(
                    "status",
                    |mut c| async move { c.status(proto::Empty {}).await },
                )
                .await?,
        )
    })?;
    if json {
        println!("{}", serde_json::to_string_pretty(&status_json(&s))?);
        return Ok(());
    }
    let up = s.chunkservers.iter().filter(|c| c.online).count();
    let zones: std::collections::BTreeSet<&str> =
        s.chunkservers.iter().map(|c| c.zone.as_str()).collect();
    println!("  cluster:");
    println!("    health:  {}", s.health);
    for note in &s.notes {
        println!("             {note}");
    }
    println!(
        "    control: {} at {} ({} store)",
        s.leader_name, s.leader_addr, s.store
    );
    println!(
        "    chunkservers: {up} up, {} down, in {} zones",
        s.chunkservers.len() - up,
        zones.len()
    );
    println!(
        "    copysets: {} healthy, {} degraded, {} unavailable",
        s.copysets_healthy, s.copysets_degraded, s.copysets_unavailable
    );
    println!(
        "    volumes:  {}, {} allocated",
        s.volumes,
        crate::bench::format_size(s.allocated_bytes)
    );
    println!(
        "    disks:    {} used of {}",
        crate::bench::format_size(s.used_bytes),
        crate::bench::format_size(s.capacity_bytes)
    );
    if s.garbage_chunks > 0 {
        println!(
            "    garbage:  {} chunks of purged volumes to delete",
            s.garbage_chunks
        );
    }
    if !s.operations.is_empty() {
        println!("  operations:");
        for op in &s.operations {
            println!("    {op}");
        }
    }
    println!("  chunkservers:");
    println!(
        "    {:>4}  {:<21}  {:<10}  {:<5}  {:>8}  {:>7}  {:>10}",
        "id", "address", "zone", "state", "copysets", "leaders", "last seen"
    );
    for c in &s.chunkservers {
        let seen = if c.last_seen_ms == u64::MAX {
            "never".to_string()
        } else {
            format!("{:.1} s ago", c.last_seen_ms as f64 / 1000.0)
        };
        println!(
            "    {:>4}  {:<21}  {:<10}  {:<5}  {:>8}  {:>7}  {:>10}",
            c.id,
            c.addr,
            c.zone,
            if c.online { "up" } else { "down" },
            c.copysets,
            c.leaders,
            seen
        );
    }
    Ok(())
}

fn status_json(s: &proto::ClusterStatus) -> serde_json::Value {
    serde_json::json!({
        "health": s.health,
        "notes": s.notes,
        "control": {"leader": s.leader_name, "addr": s.leader_addr, "store": s.store},
        "chunkservers": s.chunkservers.iter().map(|c| serde_json::json!({
            "id": c.id, "addr": c.addr, "zone": c.zone, "server": c.server, "pool": c.pool,
            "online": c.online, "capacity_bytes": c.capacity_bytes, "used_bytes": c.used_bytes,
            "copysets": c.copysets, "leaders": c.leaders,
            "last_seen_ms": (c.last_seen_ms != u64::MAX).then_some(c.last_seen_ms),
        })).collect::<Vec<_>>(),
        "copysets": {"healthy": s.copysets_healthy, "degraded": s.copysets_degraded, "unavailable": s.copysets_unavailable},
        "volumes": s.volumes,
        "capacity_bytes": s.capacity_bytes,
        "used_bytes": s.used_bytes,
        "allocated_bytes": s.allocated_bytes,
        "garbage_chunks": s.garbage_chunks,
        "operations": s.operations,
    })
}

fn volume_json(v: &proto::Volume) -> serde_json::Value {
    serde_json::json!({
        "id": v.id, "name": v.name, "size": v.size, "owner": v.owner, "pool": v.pool,
        "segment_size": v.segment_size, "chunk_size": v.chunk_size,
        "created_unix_ms": v.created_unix_ms, "epoch": v.epoch,
        "writer": (!v.writer.is_empty()).then_some(&v.writer),
        "lease_ms_left": v.lease_ms_left, "segments_allocated": v.segments_allocated,
        "deleted_unix_ms": (v.deleted_unix_ms != 0).then_some(v.deleted_unix_ms),
    })
}

fn print_volume(v: &proto::Volume, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(&volume_json(v))?);
        return Ok(());
    }
    println!("name:      {}", v.name);
    println!("id:        {}", v.id);
    println!(
        "size:      {} ({} bytes)",
        crate::bench::format_size(v.size),
        v.size
    );
    println!("owner:     {}", v.owner);
    println!("pool:      {}", v.pool);
    println!(
        "allocated: {} of {} segments ({} each)",
        v.segments_allocated,
        v.size / v.segment_size.max(1),
        crate::bench::format_size(v.segment_size)
    );
    if v.writer.is_empty() {
        println!("writer:    none (epoch {})", v.epoch);
    } else {
        println!(
            "writer:    {} (epoch {}, lease {} ms more)",
            v.writer, v.epoch, v.lease_ms_left
        );
    }
    if v.deleted_unix_ms != 0 {
        println!("deleted:   in the recycle bin");
    }
    Ok(())
}

/// `quiver volume ...`.
pub fn volume(control: &ControlArgs, what: VolumeCommand) -> anyhow::Result<()> {
    crate::runtime()?.block_on(async move {
        let client = control.client()?;
        match what {
            VolumeCommand::Create {
                name,
                size,
                owner,
                pool,
                json,
            } => {
                let request = proto::CreateVolumeRequest {
                    name,
                    size,
                    owner,
                    pool,
                };
                let v = client
                    .call("creating the volume", |mut c| {
                        let r = request.clone();
                        async move { c.create_volume(r).await }
                    })
                    .await?;
                print_volume(&v, json)
            }
            VolumeCommand::List { recycled, json } => {
                let list = client
                    .call("listing volumes", |mut c| async move {
                        c.list_volumes(proto::ListVolumesRequest { recycled }).await
                    })
                    .await?;
                if json {
                    let all: Vec<_> = list.volumes.iter().map(volume_json).collect();
                    println!("{}", serde_json::to_string_pretty(&all)?);
                } else {
                    println!(
                        "{:<24}  {:>10}  {:>9}  {:<12}  state",
                        "name", "size", "allocated", "owner"
                    );
                    for v in &list.volumes {
                        let state = if v.deleted_unix_ms != 0 {
                            "recycled".to_string()
                        } else if v.writer.is_empty() {
                            "closed".to_string()
                        } else {
                            format!("open by {}", v.writer)
                        };
                        println!(
                            "{:<24}  {:>10}  {:>9}  {:<12}  {state}",
                            v.name,
                            crate::bench::format_size(v.size),
                            crate::bench::format_size(v.segments_allocated * v.segment_size),
                            v.owner
                        );
                    }
                }
                Ok(())
            }
            VolumeCommand::Stat { name, json } => {
                let v = client
                    .call("stat", |mut c| {
                        let name = name.clone();
                        async move { c.stat_volume(proto::VolumeRef { name }).await }
                    })
                    .await?;
                print_volume(&v, json)
            }
            VolumeCommand::Extend { name, size, json } => {
                let v = client
                    .call("extending the volume", |mut c| {
                        let name = name.clone();
                        async move {
                            c.extend_volume(proto::ExtendVolumeRequest {
                                name,
                                new_size: size,
                            })
                            .await
                        }
                    })
                    .await?;
                print_volume(&v, json)
            }
            VolumeCommand::Rename {
                name,
                new_name,
                json,
            } => {
                let v = client
                    .call("renaming the volume", |mut c| {
                        let r = proto::RenameVolumeRequest {
                            name: name.clone(),
                            new_name: new_name.clone(),
                        };
                        async move { c.rename_volume(r).await }
                    })
                    .await?;
                print_volume(&v, json)
            }
            VolumeCommand::Delete { name, json } => {
                let v = client
                    .call("deleting the volume", |mut c| {
                        let name = name.clone();
                        async move { c.delete_volume(proto::VolumeRef { name }).await }
                    })
                    .await?;
                if json {
                    print_volume(&v, true)
                } else {
                    println!("volume {} moved to the recycle bin", v.name);
                    Ok(())
                }
            }
        }
    })
}

#[derive(Args)]
pub struct NbdArgs {
    #[command(flatten)]
    pub control: ControlArgs,
    /// The volume to export (also the export's name).
    #[arg(long)]
    pub volume: String,
    /// TCP address to serve on (default 127.0.0.1:10809 unless --socket).
    #[arg(long, conflicts_with = "socket")]
    pub listen: Option<std::net::SocketAddr>,
    /// Unix socket to serve on.
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// Export read-only (no write lease is taken).
    #[arg(long)]
    pub read_only: bool,
    /// Take the write lease even if another client holds it (it is fenced).
    #[arg(long)]
    pub force: bool,
}

/// The default NBD address (NBD's own port).
pub const DEFAULT_NBD_ADDR: &str = "127.0.0.1:10809";

/// Resolves when the process is asked to stop (Ctrl-C or SIGTERM).
pub async fn stop_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// The cluster as the CLI connects to it.
pub async fn connect(control: &ControlArgs) -> anyhow::Result<quiver_client::Cluster> {
    let options = quiver_client::ClusterOptions {
        ca: control.ca()?,
        ..Default::default()
    };
    Ok(quiver_client::Cluster::connect_with(&control.control, &control.token()?, options).await?)
}

/// `quiver nbd`.
pub fn nbd(args: NbdArgs) -> anyhow::Result<()> {
    use quiver_client::nbd::NbdListener;
    use quiver_client::OpenMode;
    crate::runtime()?.block_on(async move {
        let cluster = connect(&args.control).await?;
        let mode = if args.read_only {
            OpenMode::ReadOnly
        } else {
            OpenMode::ReadWrite { force: args.force }
        };
        let volume = cluster.open(&args.volume, mode).await?;
        let listener = match (&args.socket, args.listen) {
            (Some(path), _) => NbdListener::bind_unix(path)
                .with_context(|| format!("binding {}", path.display()))?,
            (None, listen) => {
                let addr = listen.unwrap_or_else(|| DEFAULT_NBD_ADDR.parse().expect("an address"));
                NbdListener::bind_tcp(addr)
                    .await
                    .with_context(|| format!("listening on {addr}"))?
            }
        };
        let bound = listener.bound()?;
        eprintln!(
            "quiver nbd: volume {} ({}, {}) at {}",
            args.volume,
            crate::bench::format_size(volume.size()),
            if args.read_only {
                "read-only"
            } else {
                "read-write"
            },
            bound.uri(&args.volume)
        );
        let device = std::sync::Arc::new(volume.clone());
        quiver_client::nbd::serve(device, args.volume.clone(), listener, stop_signal()).await;
        eprintln!("quiver nbd: stopping");
        volume.close().await?;
        Ok(())
    })
}

#[derive(Args)]
pub struct BenchVolumeArgs {
    #[command(flatten)]
    pub control: ControlArgs,
    #[arg(long)]
    pub volume: String,
    #[arg(long, value_enum, default_value_t = crate::bench::volume::VolumePattern::Randwrite)]
    pub pattern: crate::bench::volume::VolumePattern,
    #[arg(long, default_value = "4k", value_parser = crate::bench::parse_size)]
    pub bs: u64,
    #[arg(long, default_value_t = 1)]
    pub iodepth: usize,
    /// Seconds.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Bytes of the volume the offsets range over (reads lay it out first).
    #[arg(long, default_value = "64M", value_parser = crate::bench::parse_size)]
    pub size: u64,
    /// Self-describing blocks; every read checked.
    #[arg(long)]
    pub verify: bool,
    /// Take the write lease from another client.
    #[arg(long)]
    pub force: bool,
    #[arg(long)]
    pub json: bool,
}

/// `quiver bench volume`.
pub fn bench_volume(args: BenchVolumeArgs) -> anyhow::Result<()> {
    use crate::bench::volume::{self, VolumeWorkload};
    let duration = std::time::Duration::try_from_secs_f64(args.duration)
        .ok()
        .filter(|d| !d.is_zero())
        .context("--duration must be a positive number of seconds")?;
    let workload = VolumeWorkload {
        pattern: args.pattern,
        bs: usize::try_from(args.bs).context("--bs too large")?,
        iodepth: args.iodepth,
        duration,
        working_set: args.size,
        verify: args.verify,
    };
    crate::runtime()?.block_on(async move {
        let cluster = connect(&args.control).await?;
        let v = cluster
            .open(
                &args.volume,
                quiver_client::OpenMode::ReadWrite { force: args.force },
            )
            .await?;
        let run = volume::run(v.clone(), workload.clone()).await?;
        let figures = crate::bench::report::Figures::of(&run.stats);
        let report = crate::bench::report::Report::volume(
            &args.volume,
            &VolumeWorkload {
                working_set: workload.working_set.min(v.size()),
                ..workload
            },
            figures,
            run.verified_reads,
        );
        v.close().await?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            print!("{}", report.table());
        }
        Ok(())
    })
}
