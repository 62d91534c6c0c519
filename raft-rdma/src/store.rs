//! openraft's log storage on the shared log engine: one [`LogStore`] per
//! copyset, all writing to their disk's [`LogEngine`].
//!
//! openraft is pinned to 0.9.25 (storage-v2): its `append` takes a callback
//! for durability, which the engine's group commit serves (a batch of appends
//! from many copysets shares one fdatasync). 0.10.0-alpha.37 was measured
//! against it and not taken: ARCHITECTURE.md says why.
//!
//! Entry payloads on disk: one tag byte, then the request's bytes (`1`), the
//! membership as JSON (`2`, rare), or nothing for a blank entry (`0`).

use std::fmt::Debug;
use std::io::Cursor;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{
    BasicNode, Entry, EntryPayload, ErrorSubject, ErrorVerb, LeaderId, OptionalSend, RaftLogReader,
    StorageError, StorageIOError, Vote,
};
use serde::{Deserialize, Serialize};

use crate::log::{self, LogEngine, LogError};

/// A client request as Raft carries it: opaque bytes the state machine decodes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request(#[serde(with = "serde_bytes")] pub Vec<u8>);

/// What applying a request answered.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Response(#[serde(with = "serde_bytes")] pub Vec<u8>);

openraft::declare_raft_types!(
    /// Raft types of a copyset.
    pub TypeConfig:
        D = Request,
        R = Response,
        NodeId = u64,
        Node = BasicNode,
        Entry = Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

type LogIdOf = openraft::LogId<u64>;
type Error = StorageError<u64>;

fn to_ours(id: &LogIdOf) -> log::LogId {
    log::LogId {
        term: id.leader_id.term,
        node: id.leader_id.node_id,
        index: id.index,
    }
}

fn to_raft(id: log::LogId) -> LogIdOf {
    openraft::LogId::new(LeaderId::new(id.term, id.node), id.index)
}

fn encode(entry: &Entry<TypeConfig>) -> Vec<u8> {
    match &entry.payload {
        EntryPayload::Blank => vec![0],
        EntryPayload::Normal(Request(bytes)) => {
            let mut out = Vec::with_capacity(1 + bytes.len());
            out.push(1);
            out.extend_from_slice(bytes);
            out
        }
        EntryPayload::Membership(m) => {
            let mut out = vec![2];
            serde_json::to_writer(&mut out, m).expect("a membership serializes");
            out
        }
    }
}

// openraft's own error type, which its reader trait returns anyway.
#[allow(clippy::result_large_err)]
fn decode(entry: &log::Entry) -> Result<Entry<TypeConfig>, Error> {
    let bad = |what: String| {
        StorageIOError::<u64>::new(
            ErrorSubject::Log(to_raft(entry.id)),
            ErrorVerb::Read,
            openraft::AnyError::error(what),
        )
    };
    let payload = match entry.payload.split_first() {
        Some((0, [])) => EntryPayload::Blank,
        Some((1, bytes)) => EntryPayload::Normal(Request(bytes.to_vec())),
        Some((2, json)) => EntryPayload::Membership(
            serde_json::from_slice(json).map_err(|e| bad(format!("membership: {e}")))?,
        ),
        _ => return Err(bad("unknown entry payload tag".into()).into()),
    };
    Ok(Entry {
        log_id: to_raft(entry.id),
        payload,
    })
}

fn write_error(e: LogError) -> Error {
    StorageIOError::write_logs(openraft::AnyError::error(e)).into()
}

/// Waits for a durable request without blocking the async runtime's thread.
async fn durable(f: impl FnOnce(log::Durable) -> Result<(), LogError>) -> Result<(), LogError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    f(Box::new(move |r| {
        let _ = tx.send(r);
    }))?;
    rx.await
        .unwrap_or_else(|_| Err(LogError::Failed("the log writer has stopped".into())))
}

/// One copyset's Raft log, kept in its disk's shared engine.
#[derive(Clone)]
pub struct LogStore {
    engine: Arc<LogEngine>,
    group: u64,
    pressure: Option<Arc<LogPressure>>,
}

/// Raised when a copyset's log holds more than `limit` bytes in memory:
/// whoever waits on it snapshots and purges (openraft's own policy counts
/// entries, whatever their size).
pub struct LogPressure {
    pub limit: u64,
    pub raised: tokio::sync::Notify,
}

impl LogStore {
    pub fn new(engine: Arc<LogEngine>, group: u64) -> LogStore {
        LogStore {
            engine,
            group,
            pressure: None,
        }
    }

    /// The same, raising `pressure` when the log outgrows its limit.
    pub fn with_pressure(
        engine: Arc<LogEngine>,
        group: u64,
        pressure: Arc<LogPressure>,
    ) -> LogStore {
        LogStore {
            engine,
            group,
            pressure: Some(pressure),
        }
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, Error> {
        let from = match range.start_bound() {
            Bound::Included(&i) => i,
            Bound::Excluded(&i) => i + 1,
            Bound::Unbounded => 0,
        };
        let to = match range.end_bound() {
            Bound::Included(&i) => i.saturating_add(1),
            Bound::Excluded(&i) => i,
            Bound::Unbounded => u64::MAX,
        };
        self.engine
            .entries(self.group, from, to)
            .iter()
            .map(decode)
            .collect()
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, Error> {
        let state = self.engine.state(self.group);
        Ok(LogState {
            last_purged_log_id: state.purged.map(to_raft),
            last_log_id: state.last.map(to_raft),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> Result<(), Error> {
        let ours = log::Vote {
            term: vote.leader_id.term,
            node: vote.leader_id.node_id,
            committed: vote.committed,
        };
        durable(|done| self.engine.save_vote(self.group, ours, done))
            .await
            .map_err(|e| StorageIOError::write_vote(openraft::AnyError::error(e)).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<u64>>, Error> {
        Ok(self.engine.vote(self.group).map(|v| {
            if v.committed {
                Vote::new_committed(v.term, v.node)
            } else {
                Vote::new(v.term, v.node)
            }
        }))
    }

    async fn save_committed(&mut self, committed: Option<LogIdOf>) -> Result<(), Error> {
        let Some(id) = committed else {
            return Ok(());
        };
        // Written with the next batch, not waited for: see `note_committed`.
        self.engine
            .note_committed(self.group, to_ours(&id))
            .map_err(write_error)
    }

    async fn read_committed(&mut self) -> Result<Option<LogIdOf>, Error> {
        Ok(self.engine.committed(self.group).map(to_raft))
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), Error>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<log::Entry> = entries
            .into_iter()
            .map(|e| log::Entry {
                id: to_ours(&e.log_id),
                payload: encode(&e).into(),
            })
            .collect();
        self.engine
            .append(
                self.group,
                entries,
                Box::new(move |r| callback.log_io_completed(r.map_err(std::io::Error::other))),
            )
            .map_err(write_error)?;
        if let Some(p) = &self.pressure {
            if self.engine.bytes(self.group) > p.limit {
                p.raised.notify_one();
            }
        }
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogIdOf) -> Result<(), Error> {
        durable(|done| self.engine.truncate(self.group, log_id.index, done))
            .await
            .map_err(write_error)
    }

    async fn purge(&mut self, log_id: LogIdOf) -> Result<(), Error> {
        durable(|done| self.engine.purge(self.group, to_ours(&log_id), done))
            .await
            .map_err(write_error)
    }
}
