//! The chunkserver's side of the control plane: register at start, report
//! every `heartbeat_ms` (copysets with leader, term, applied index and
//! membership epoch; disk capacity and use), and carry out the actions the
//! answer carries (create a copyset, change its members, hand over its
//! leadership).

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use quiver_control::proto::{self, action::Kind};
use quiver_control::ControlClient;
use tonic::Code;

use super::{Chunkserver, Inner};
use crate::service::{self, ChunkError, CopysetSpec, Mutation, PeerChange};

/// The longest a control plane action may run (a new member's catch-up of
/// a full copyset included).
const ACTION_TIMEOUT: Duration = Duration::from_secs(300);

pub(super) struct Reporter {
    client: ControlClient,
    register: proto::RegisterRequest,
    interval: Duration,
    /// Copysets with an action under way: one at a time each.
    busy: Arc<Mutex<HashSet<u32>>>,
    /// Garbage chunks deleted, to report in the next heartbeat.
    deleted: Arc<Mutex<Vec<proto::ChunkLocation>>>,
}

/// The file system holding `path`: (capacity, used) bytes and its id.
fn disk_usage(path: &std::path::Path) -> (u64, u64, u64) {
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return (0, 0, 0);
    };
    // SAFETY: statvfs fills the struct we own from a NUL-terminated path.
    unsafe {
        let mut s: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c_path.as_ptr(), &mut s) != 0 {
            return (0, 0, 0);
        }
        let unit = s.f_frsize;
        let total = s.f_blocks * unit;
        // Used as df counts it: blocks not free.
        (total, total - s.f_bfree.min(s.f_blocks) * unit, s.f_fsid)
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "localhost".into())
}

impl Reporter {
    pub(super) fn new(server: &Chunkserver) -> anyhow::Result<Reporter> {
        let config = &server.0.config;
        let token = config.token.clone().unwrap_or_default();
        anyhow::ensure!(
            !token.is_empty(),
            "`control` is set: the control plane's `token` is needed too"
        );
        let ca = match &config.control_ca {
            Some(path) => Some(
                std::fs::read(path)
                    .map_err(|e| anyhow::anyhow!("control_ca {}: {e}", path.display()))?,
            ),
            None => None,
        };
        let client = ControlClient::connect(&config.control, &token, ca.as_deref())?
            .retry_for(Duration::from_secs(3));
        Ok(Reporter {
            client,
            register: proto::RegisterRequest {
                chunkserver: config.node_id,
                addr: server.0.addr.to_string(),
                zone: config
                    .zone
                    .clone()
                    .unwrap_or_else(|| format!("zone-{}", config.node_id)),
                server: config.server.clone().unwrap_or_else(hostname),
                pool: config.pool.clone(),
                capacity_bytes: disk_usage(&config.data_dir).0,
            },
            interval: Duration::from_millis(config.heartbeat_ms.max(50)),
            busy: Arc::default(),
            deleted: Arc::default(),
        })
    }

    pub(super) async fn run(self, server: Weak<Inner>) {
        let mut registered = false;
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(inner) = server.upgrade() else {
                return;
            };
            let server = Chunkserver(inner);
            if server.0.fabric.is_shut_down() {
                return;
            }
            if !registered {
                let request = self.register.clone();
                match self
                    .client
                    .call("registering with the control plane", |mut c| {
                        let request = request.clone();
                        async move { c.register(request).await }
                    })
                    .await
                {
                    Ok(_) => {
                        tracing::info!(zone = %self.register.zone, "registered with the control plane");
                        registered = true;
                    }
                    Err(e) => {
                        tracing::warn!("{e}");
                        continue;
                    }
                }
            }
            let report = self.report(&server);
            match self
                .client
                .call("heartbeat", |mut c| {
                    let report = report.clone();
                    async move { c.heartbeat(report).await }
                })
                .await
            {
                Ok(answer) => {
                    for action in answer.actions {
                        if let Some(kind) = action.kind {
                            self.carry_out(&server, kind);
                        }
                    }
                }
                // The control plane lost our registration (a new store).
                Err(e) if e.code() == Code::FailedPrecondition => {
                    tracing::warn!("{e}: registering again");
                    registered = false;
                }
                Err(e) => tracing::debug!("{e}"),
            }
        }
    }

    fn report(&self, server: &Chunkserver) -> proto::HeartbeatRequest {
        let status = server.status();
        let (capacity_bytes, used_bytes, fsid) = disk_usage(&server.0.config.data_dir);
        proto::HeartbeatRequest {
            // Lost if this heartbeat fails: the control plane then sends the
            // chunks again, and deleting a deleted chunk succeeds.
            deleted: std::mem::take(&mut *self.deleted.lock().expect("deleted lock")),
            chunkserver: server.0.config.node_id,
            addr: self.register.addr.clone(),
            capacity_bytes,
            used_bytes,
            filesystem: format!("{}/{fsid:x}", self.register.server),
            copysets: status
                .copysets
                .iter()
                .map(|c| proto::CopysetReport {
                    copyset: c.copyset,
                    voters: c.voters.clone(),
                    learners: c.learners.clone(),
                    leader: c.leader.unwrap_or(0),
                    term: c.term,
                    applied: c.last_applied.unwrap_or(0),
                    epoch: c.epoch,
                })
                .collect(),
        }
    }

    /// Starts an action in the background (a membership change takes as
    /// long as the new member's catch-up); a copyset with one under way
    /// skips the repeat.
    fn carry_out(&self, server: &Chunkserver, kind: Kind) {
        let copyset = match &kind {
            Kind::Create(c) => c.copyset,
            Kind::Change(c) => c.copyset,
            Kind::Transfer(t) => t.copyset,
            Kind::Remove(r) => r.copyset,
            Kind::DeleteChunks(d) => d.copyset,
        };
        if !self.busy.lock().expect("busy lock").insert(copyset) {
            return;
        }
        let busy = self.busy.clone();
        let server = server.clone();
        let deleted = self.deleted.clone();
        tokio::spawn(async move {
            let what = match &kind {
                Kind::DeleteChunks(d) => format!("delete {} chunks", d.chunks.len()),
                other => format!("{other:?}"),
            };
            // Bounded: a stuck action must not keep the copyset busy for
            // good (the control plane sends it again).
            match tokio::time::timeout(ACTION_TIMEOUT, server.act(kind, &deleted)).await {
                Ok(Ok(())) => tracing::info!(copyset, "control plane action done: {what}"),
                Ok(Err(e)) => {
                    tracing::warn!(copyset, error = %e, "control plane action failed: {what}")
                }
                Err(_) => tracing::warn!(
                    copyset,
                    "control plane action unfinished after {ACTION_TIMEOUT:?}, abandoned: {what}"
                ),
            }
            busy.lock().expect("busy lock").remove(&copyset);
        });
    }
}

impl Chunkserver {
    async fn act(
        &self,
        kind: Kind,
        deleted: &Mutex<Vec<proto::ChunkLocation>>,
    ) -> Result<(), ChunkError> {
        match kind {
            Kind::Create(c) => {
                let peers: BTreeMap<u64, String> =
                    c.peers.into_iter().map(|p| (p.id, p.addr)).collect();
                let bootstrap =
                    service::bootstrap_member(c.copyset, &peers) == Some(self.0.config.node_id);
                match self
                    .create_copyset(c.copyset, CopysetSpec { peers, bootstrap })
                    .await
                {
                    Ok(()) | Err(ChunkError::CopysetExists(_)) => Ok(()),
                    Err(e) => Err(e),
                }
            }
            Kind::Change(c) => {
                let copyset = self.copyset(c.copyset)?;
                let change = PeerChange {
                    add: c.add.map(|p| (p.id, p.addr)),
                    remove: (c.remove != 0).then_some(c.remove),
                };
                self.change_peers(c.copyset, &copyset, change).await
            }
            Kind::Transfer(t) => {
                let copyset = self.copyset(t.copyset)?;
                self.transfer_leader(t.copyset, &copyset, t.to).await
            }
            Kind::Remove(r) => self.remove_copyset(r.copyset).await,
            Kind::DeleteChunks(d) => {
                for chunk in d.chunks {
                    self.propose(d.copyset, Mutation::Delete { chunk }).await?;
                    deleted
                        .lock()
                        .expect("deleted lock")
                        .push(proto::ChunkLocation {
                            copyset: d.copyset,
                            chunk,
                        });
                }
                Ok(())
            }
        }
    }
}
