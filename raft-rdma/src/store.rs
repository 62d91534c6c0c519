//! openraft's log storage on the shared log engine: one [`LogStore`] per
//! copyset, all writing to their disk's [`LogEngine`].
//!
//! openraft is pinned to 0.9.25 (storage-v2): its `append` takes a callback
//! for durability, which the engine's group commit serves (a batch of appends
//! from many copysets shares one fdatasync). A leader's own appends may be
//! acknowledged before their flush, with commits gated on the
//! [`DurableMark`] instead ([`LogStore::ack_own_appends_early`]). 0.10.0-alpha.37 was measured
//! against it and not taken: ARCHITECTURE.md says why.
//!
//! Entry payloads on disk: one tag byte, then the request's body (`0x80 |
//! kind`; `1` for a kind byte then the body, as logs written before bodies
//! were kept as they arrived), the membership as JSON (`2`, rare), or
//! nothing for a blank entry (`0`).

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

use crate::data::Data;
use crate::log::{self, LogEngine, LogError};

/// A client request as Raft carries it: a kind and a body the state
/// machine decodes, the body kept where it arrived (see [`Data`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub kind: u8,
    pub body: Data,
}

impl Request {
    pub fn new(kind: u8, body: impl Into<Data>) -> Request {
        Request {
            kind,
            body: body.into(),
        }
    }
}

// openraft's `serde` feature asks for these; the fabric carries entries in
// its own encoding (`crate::append`), so they only serve tools.
impl Serialize for Request {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        (self.kind, serde_bytes::Bytes::new(&self.body)).serialize(s)
    }
}

impl<'de> Deserialize<'de> for Request {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Request, D::Error> {
        let (kind, body) = <(u8, serde_bytes::ByteBuf)>::deserialize(d)?;
        Ok(Request::new(kind, body.into_vec()))
    }
}

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

pub(crate) fn to_ours(id: &LogIdOf) -> log::LogId {
    log::LogId {
        term: id.leader_id.term,
        node: id.leader_id.node_id,
        index: id.index,
    }
}

pub(crate) fn to_raft(id: log::LogId) -> LogIdOf {
    openraft::LogId::new(LeaderId::new(id.term, id.node), id.index)
}

const TAG_BLANK: u8 = 0;
/// A request whose data is its kind byte, then its body (every request
/// before bodies were kept as they arrived; now only kinds from 0x80 on).
const TAG_NORMAL: u8 = 1;
const TAG_MEMBERSHIP: u8 = 2;
/// A request of kind `k` (below 0x80) is tagged `TAG_REQUEST | k`, its data
/// the body alone: so the body is written from where it arrived, with no
/// copy to put the kind in front.
const TAG_REQUEST: u8 = 0x80;

/// The log's tag and data of an entry: a request's bytes are held as they
/// are, not copied.
pub(crate) fn encode(payload: &EntryPayload<TypeConfig>) -> (u8, Data) {
    match payload {
        EntryPayload::Blank => (TAG_BLANK, Data::default()),
        EntryPayload::Normal(r) if r.kind < TAG_REQUEST => (TAG_REQUEST | r.kind, r.body.clone()),
        EntryPayload::Normal(r) => {
            let mut data = Vec::with_capacity(1 + r.body.len());
            data.push(r.kind);
            data.extend_from_slice(&r.body);
            (TAG_NORMAL, data.into())
        }
        EntryPayload::Membership(m) => (
            TAG_MEMBERSHIP,
            serde_json::to_vec(m)
                .expect("a membership serializes")
                .into(),
        ),
    }
}

/// An entry's payload from its log tag and data.
pub(crate) fn decode_payload(tag: u8, data: &Data) -> Result<EntryPayload<TypeConfig>, String> {
    match tag {
        TAG_BLANK if data.is_empty() => Ok(EntryPayload::Blank),
        TAG_NORMAL => match data.first() {
            Some(&kind) => Ok(EntryPayload::Normal(Request::new(
                kind,
                data.slice(1..data.len()),
            ))),
            None => Err("a request without its kind".into()),
        },
        _ if tag & TAG_REQUEST != 0 => Ok(EntryPayload::Normal(Request::new(
            tag & !TAG_REQUEST,
            data.clone(),
        ))),
        TAG_MEMBERSHIP => serde_json::from_slice(data)
            .map(EntryPayload::Membership)
            .map_err(|e| format!("membership: {e}")),
        _ => Err(format!("unknown entry payload tag {tag}")),
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
    let payload = decode_payload(entry.tag, &entry.data).map_err(bad)?;
    Ok(Entry {
        log_id: to_raft(entry.id),
        payload,
    })
}

fn write_error(e: LogError) -> Error {
    StorageIOError::write_logs(openraft::AnyError::error(e)).into()
}

/// Waits for a durable request without blocking the async runtime's thread.
pub(crate) async fn durable(
    f: impl FnOnce(log::Durable) -> Result<(), LogError>,
) -> Result<(), LogError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    f(Box::new(move |r| {
        let _ = tx.send(r);
    }))?;
    rx.await
        .unwrap_or_else(|_| Err(LogError::Failed("the log writer has stopped".into())))
}

/// How far a copyset's log is durable: the last entry of its longest
/// flushed prefix, or `failed` once the log engine failed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct DurablePoint {
    last: Option<LogIdOf>,
    failed: bool,
}

/// Tells a copyset's log how far its state machine has applied: the data
/// of those entries leave memory (fabric buffers go back to the fabric) and
/// are read from disk if a follower still wants them.
#[derive(Clone)]
pub struct AppliedMark {
    engine: Arc<LogEngine>,
    group: u64,
}

impl AppliedMark {
    pub fn applied(&self, index: u64) {
        self.engine.applied(self.group, index);
    }
}

/// A copyset log's [`DurablePoint`], for what must not run ahead of it when
/// the leader's own appends are acknowledged before their flush (see
/// [`LogStore::ack_own_appends_early`]): applying an entry, and telling
/// followers it is committed.
#[derive(Clone)]
pub struct DurableMark(Arc<tokio::sync::watch::Sender<DurablePoint>>);

impl DurableMark {
    fn new(last: Option<LogIdOf>) -> DurableMark {
        DurableMark(Arc::new(tokio::sync::watch::Sender::new(DurablePoint {
            last,
            failed: false,
        })))
    }

    fn point(&self) -> DurablePoint {
        *self.0.borrow()
    }

    /// `committed`, or the durable point when that is lower: what may be
    /// called committed to others (a follower applies what it is told).
    pub fn clamp(&self, committed: Option<LogIdOf>) -> Option<LogIdOf> {
        let last = self.point().last;
        match (committed, last) {
            (Some(c), Some(l)) if c.index > l.index => Some(l),
            (Some(_), None) => None,
            (c, _) => c,
        }
    }

    /// Waits until the entry at `index` is durable.
    pub async fn wait_for(&self, index: u64) -> Result<(), Error> {
        let durable = |p: &DurablePoint| p.failed || p.last.is_some_and(|l| l.index >= index);
        if !durable(&self.point()) {
            let mut rx = self.0.subscribe();
            let _ = rx.wait_for(durable).await;
        }
        if self.point().failed {
            return Err(StorageIOError::write_logs(openraft::AnyError::error(
                "the log engine failed before this entry was durable",
            ))
            .into());
        }
        Ok(())
    }

    /// An append that ends at `last` is durable (and so is everything before
    /// it). Never lowers the mark: only a truncate does ([`DurableMark::cut`]),
    /// which openraft always makes before an append that overlaps.
    fn reached(&self, last: Option<LogIdOf>) {
        self.0.send_modify(|p| {
            if last.map(|l| l.index) > p.last.map(|l| l.index) {
                p.last = last;
            }
        });
    }

    /// The log was cut back to `last`.
    fn cut(&self, last: Option<LogIdOf>) {
        self.0.send_modify(|p| {
            if p.last.map(|l| l.index) > last.map(|l| l.index) {
                p.last = last;
            }
        });
    }

    fn fail(&self) {
        self.0.send_modify(|p| p.failed = true);
    }
}

/// One copyset's Raft log, kept in its disk's shared engine.
#[derive(Clone)]
pub struct LogStore {
    engine: Arc<LogEngine>,
    group: u64,
    pressure: Option<Arc<LogPressure>>,
    durable: DurableMark,
    /// This node's id, when its own appends as leader are acknowledged to
    /// openraft before they are flushed.
    early_ack_as: Option<u64>,
}

/// Raised when a copyset's log holds more than `limit` bytes of entries:
/// whoever waits on it snapshots and purges (openraft's own policy counts
/// entries, whatever their size).
pub struct LogPressure {
    pub limit: u64,
    pub raised: tokio::sync::Notify,
}

impl LogStore {
    pub fn new(engine: Arc<LogEngine>, group: u64) -> LogStore {
        let durable = DurableMark::new(engine.state(group).last.map(to_raft));
        LogStore {
            engine,
            group,
            pressure: None,
            durable,
            early_ack_as: None,
        }
    }

    /// The same, raising `pressure` when the log outgrows its limit.
    pub fn with_pressure(
        engine: Arc<LogEngine>,
        group: u64,
        pressure: Arc<LogPressure>,
    ) -> LogStore {
        LogStore {
            pressure: Some(pressure),
            ..LogStore::new(engine, group)
        }
    }

    /// How far this log is durable.
    pub fn durable_mark(&self) -> DurableMark {
        self.durable.clone()
    }

    /// For the state machine to say what it has applied.
    pub fn applied_mark(&self) -> AppliedMark {
        AppliedMark {
            engine: Arc::clone(&self.engine),
            group: self.group,
        }
    }

    /// Acknowledges the appends node `node` makes as leader before they are
    /// flushed, so that it replicates an entry while it writes it (openraft
    /// 0.9 replicates only once the leader's append is acknowledged: the
    /// flush, ~100 µs, then runs before the follower's instead of beside it).
    ///
    /// openraft then counts the leader in a commit quorum early. What keeps
    /// a commit true (the entry durable on a majority) is that nothing acts
    /// on it before the leader's flush: the caller must make the state
    /// machine wait on [`LogStore::durable_mark`] before applying (clients
    /// are answered after applying) and clamp the `leader_commit` it sends
    /// to followers with [`DurableMark::clamp`]; the committed id saved here
    /// is clamped already. A leader that crashes before its flush has told
    /// no one its entry is committed, so losing it loses nothing answered.
    pub fn ack_own_appends_early(mut self, node: u64) -> LogStore {
        self.early_ack_as = Some(node);
        self
    }

    /// Whether `entries` are this node's own, appended as the leader of the
    /// current vote: entries carry their leader's (term, node), and only a
    /// leader makes entries with its own in its term. A batch holding a
    /// membership change is not: openraft lets the next change start once
    /// the last one is committed in its view, and joint consensus needs that
    /// commit to be real (durable on a majority) before it.
    fn own_as_leader(&self, entries: &[log::Entry]) -> bool {
        let (Some(node), Some(vote)) = (self.early_ack_as, self.engine.vote(self.group)) else {
            return false;
        };
        vote.node == node
            && vote.committed
            && entries
                .iter()
                .all(|e| e.id.node == node && e.id.term == vote.term && e.tag != TAG_MEMBERSHIP)
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
        // Entries no longer in memory (a lagging follower's catch-up) are
        // read from disk on a blocking thread, not the runtime's.
        let entries = match self.engine.entries_in_memory(self.group, from, to) {
            Some(entries) => Ok(entries),
            None => {
                let (engine, group) = (Arc::clone(&self.engine), self.group);
                tokio::task::spawn_blocking(move || engine.entries(group, from, to))
                    .await
                    .unwrap_or_else(|e| Err(LogError::Failed(format!("reading entries: {e}"))))
            }
        };
        entries
            .map_err(|e| Error::from(StorageIOError::read_logs(openraft::AnyError::error(e))))?
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
            // openraft 0.9 restarts a node whose saved vote is its own and
            // committed as leader of that term at once. With early
            // acknowledgements its log may have lost entries it sent (acked
            // before their flush): in the same term it would hand out their
            // ids again for other entries, and a follower holding the old ones
            // would take the new ones as already there. As a candidate it must
            // win a new term instead, whose first entry settles the log.
            if v.committed && self.early_ack_as != Some(v.node) {
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
        // Never past what is durable here (see `ack_own_appends_early`), so
        // a restart never finds a committed id beyond its log.
        let Some(id) = self.durable.clamp(Some(id)) else {
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
            .map(|e| {
                let (tag, data) = encode(&e.payload);
                log::Entry {
                    id: to_ours(&e.log_id),
                    tag,
                    data,
                }
            })
            .collect();
        let last = entries.last().map(|e| to_raft(e.id));
        let durable = self.durable.clone();
        let early = self.own_as_leader(&entries);
        // Acknowledged now (the leader's own) or once durable.
        let (acked_now, callback) = if early {
            (Some(callback), None)
        } else {
            (None, Some(callback))
        };
        self.engine
            .append(
                self.group,
                entries,
                Box::new(move |r| {
                    // The mark moves before openraft hears: whatever the
                    // answer lets run may wait on the mark.
                    match &r {
                        Ok(()) => durable.reached(last),
                        Err(_) => durable.fail(),
                    }
                    if let Some(callback) = callback {
                        callback.log_io_completed(r.map_err(std::io::Error::other));
                    }
                }),
            )
            .map_err(write_error)?;
        if let Some(callback) = acked_now {
            callback.log_io_completed(Ok(()));
        }
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
            .map_err(write_error)?;
        // openraft waits for this before its next log request: the log
        // still ends where the truncate left it.
        self.durable
            .cut(self.engine.state(self.group).last.map(to_raft));
        Ok(())
    }

    async fn purge(&mut self, log_id: LogIdOf) -> Result<(), Error> {
        durable(|done| self.engine.purge(self.group, to_ours(&log_id), done))
            .await
            .map_err(write_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::{wait_durable, LogConfig};

    fn id(term: u64, node: u64, index: u64) -> LogIdOf {
        openraft::LogId::new(LeaderId::new(term, node), index)
    }

    fn entry(term: u64, node: u64, index: u64) -> log::Entry {
        log::Entry {
            id: to_ours(&id(term, node, index)),
            tag: TAG_NORMAL,
            data: Data::default(),
        }
    }

    #[test]
    fn only_the_leaders_own_appends_in_its_term_are_acknowledged_early() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Arc::new(LogEngine::open(LogConfig::new(dir.path())).unwrap());
        let store = LogStore::new(Arc::clone(&engine), 7).ack_own_appends_early(1);
        let vote = |term, node, committed| {
            wait_durable(|done| {
                engine.save_vote(
                    7,
                    log::Vote {
                        term,
                        node,
                        committed,
                    },
                    done,
                )
            })
            .unwrap()
        };
        vote(2, 1, false);
        assert!(!store.own_as_leader(&[entry(2, 1, 1)]), "a candidate");
        vote(2, 1, true);
        assert!(store.own_as_leader(&[entry(2, 1, 1), entry(2, 1, 2)]));
        assert!(
            !store.own_as_leader(&[entry(1, 1, 1), entry(2, 1, 2)]),
            "entries of an earlier term are a follower's"
        );
        vote(3, 2, true);
        assert!(!store.own_as_leader(&[entry(3, 2, 3)]), "a follower");
        assert!(
            !store.own_as_leader(&[entry(2, 1, 2)]),
            "our old entries, sent back by a new leader"
        );
        let off = LogStore::new(Arc::clone(&engine), 8);
        assert!(!off.own_as_leader(&[entry(3, 2, 3)]));

        vote(4, 1, true);
        let mut change = entry(4, 1, 4);
        change.tag = TAG_MEMBERSHIP;
        assert!(
            !store.own_as_leader(&[entry(4, 1, 3), change]),
            "a membership change waits for its flush"
        );
    }

    /// A restart must not bring the leader back in its old term: its log may
    /// have lost entries whose ids it sent (see `read_vote`).
    #[tokio::test]
    async fn a_leader_acking_early_restarts_as_a_candidate() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Arc::new(LogEngine::open(LogConfig::new(dir.path())).unwrap());
        let mut early = LogStore::new(Arc::clone(&engine), 7).ack_own_appends_early(1);
        let mut plain = LogStore::new(Arc::clone(&engine), 7);
        early.save_vote(&Vote::new_committed(5, 1)).await.unwrap();
        assert_eq!(early.read_vote().await.unwrap(), Some(Vote::new(5, 1)));
        assert_eq!(
            plain.read_vote().await.unwrap(),
            Some(Vote::new_committed(5, 1))
        );
        // Another node's leadership stays as it was.
        early.save_vote(&Vote::new_committed(6, 2)).await.unwrap();
        assert_eq!(
            early.read_vote().await.unwrap(),
            Some(Vote::new_committed(6, 2))
        );
    }

    #[tokio::test]
    async fn the_durable_mark_clamps_commits_and_releases_waiters() {
        let mark = DurableMark::new(Some(id(1, 1, 3)));
        assert_eq!(mark.clamp(Some(id(1, 1, 2))), Some(id(1, 1, 2)));
        assert_eq!(mark.clamp(Some(id(2, 1, 5))), Some(id(1, 1, 3)));
        assert_eq!(mark.clamp(None), None);
        assert_eq!(DurableMark::new(None).clamp(Some(id(1, 1, 1))), None);

        mark.wait_for(3).await.unwrap();
        let waiter = tokio::spawn({
            let mark = mark.clone();
            async move { mark.wait_for(5).await }
        });
        mark.reached(Some(id(2, 1, 4)));
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        mark.reached(Some(id(2, 1, 5)));
        waiter.await.unwrap().unwrap();

        mark.cut(Some(id(2, 1, 4)));
        assert_eq!(mark.point().last, Some(id(2, 1, 4)));
        mark.cut(Some(id(2, 1, 6)));
        assert_eq!(mark.point().last, Some(id(2, 1, 4)), "a cut never raises");

        let waiter = tokio::spawn({
            let mark = mark.clone();
            async move { mark.wait_for(9).await }
        });
        mark.fail();
        assert!(waiter.await.unwrap().is_err(), "a failed log fails waiters");
    }
}
