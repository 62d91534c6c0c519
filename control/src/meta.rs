//! The persistent model: chunkservers, copysets, volumes, segments. Every
//! change is built as a store [`Batch`] of records, written to the store,
//! and only then applied to the in-memory [`Model`] by parsing the same
//! batch back, so memory never holds what the store does not.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use crate::store::Batch;

/// Bytes per chunk: the unit a copyset stores (the chunk store's size).
pub const CHUNK_BYTES: u64 = 16 << 20;
/// Bytes per segment by default: the unit of allocation of a volume.
pub const DEFAULT_SEGMENT_BYTES: u64 = 1 << 30;
/// The largest volume: 1 PiB.
pub const VOLUME_BYTES_MAX: u64 = 1 << 50;

const CHUNKSERVER: &str = "chunkserver/";
const COPYSET: &str = "copyset/";
const VOLUME: &str = "volume/";
const RECYCLED: &str = "recycled/";
const SEGMENT: &str = "segment/";
const COUNTERS: &str = "counters";
const GARBAGE: &str = "garbage/";

/// Why a control request failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    #[error("volume {0:?} does not exist")]
    NoSuchVolume(String),
    #[error("volume {0:?} exists already")]
    VolumeExists(String),
    #[error("bad volume name {name:?}: {why}")]
    BadName { name: String, why: &'static str },
    #[error("bad size {size}: {why}")]
    BadSize { size: u64, why: String },
    #[error("volume {name:?} is open for writing by {writer:?} for {ms_left} ms more (open with force to take it over)")]
    VolumeBusy {
        name: String,
        writer: String,
        ms_left: u64,
    },
    #[error("volume {name:?}: epoch {epoch} is stale (the current writer has epoch {current})")]
    StaleEpoch {
        name: String,
        epoch: u64,
        current: u64,
    },
    #[error("logical pool {0:?} does not exist")]
    NoSuchPool(String),
    #[error(
        "logical pool {0:?} has no copysets yet (are three zones of chunkservers registered?)"
    )]
    NoCopysets(String),
    #[error("segment {index} is past the end of volume {name:?}")]
    SegmentOutOfRange { name: String, index: u64 },
    #[error("chunkserver {0} is not registered")]
    UnknownChunkserver(u64),
    #[error("chunkserver {id} is registered with address {registered}, not {claimed}")]
    AddressTaken {
        id: u64,
        registered: String,
        claimed: String,
    },
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("metadata corrupt at {key}: {why}")]
    Corrupt { key: String, why: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkserverRecord {
    pub id: u64,
    pub addr: String,
    pub zone: String,
    pub server: String,
    /// Physical pool.
    pub pool: String,
    pub capacity_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopysetRecord {
    pub id: u32,
    /// Logical pool.
    pub pool: String,
    /// Members by chunkserver id.
    pub peers: Vec<u64>,
    /// The membership epoch its leader last reported; 0 until a leader has
    /// reported at all (until then the members are told to create it).
    pub epoch: u64,
}

/// The client holding a volume's write lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Writer {
    pub client: String,
    pub until_unix_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub id: u64,
    pub name: String,
    pub size: u64,
    pub owner: String,
    pub pool: String,
    pub segment_size: u64,
    pub created_unix_ms: u64,
    /// Raised on every write open: chunk writes carry it, and chunkservers
    /// refuse writes older than the newest they have seen (fencing).
    pub epoch: u64,
    pub writer: Option<Writer>,
    pub deleted_unix_ms: Option<u64>,
}

impl VolumeRecord {
    pub fn segments(&self) -> u64 {
        self.size / self.segment_size
    }

    /// The writer whose lease still runs at `now`.
    pub fn live_writer(&self, now_unix_ms: u64) -> Option<&Writer> {
        self.writer
            .as_ref()
            .filter(|w| w.until_unix_ms > now_unix_ms)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentRecord {
    pub volume: u64,
    pub index: u64,
    /// (copyset, chunk id) per chunk of the segment, in order.
    pub chunks: Vec<(u32, u64)>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub next_volume: u64,
    pub next_chunk: u64,
    pub next_copyset: u32,
}

fn chunkserver_key(id: u64) -> String {
    format!("{CHUNKSERVER}{id:020}")
}
fn copyset_key(id: u32) -> String {
    format!("{COPYSET}{id:010}")
}
fn volume_key(name: &str) -> String {
    format!("{VOLUME}{name}")
}
fn recycled_key(id: u64) -> String {
    format!("{RECYCLED}{id:020}")
}
fn segment_key(volume: u64, index: u64) -> String {
    format!("{SEGMENT}{volume:020}/{index:020}")
}
fn garbage_key(copyset: u32, chunk: u64) -> String {
    format!("{GARBAGE}{copyset:010}/{chunk:020}")
}
fn parse_garbage_key(key: &str) -> Option<(u32, u64)> {
    let (copyset, chunk) = key.strip_prefix(GARBAGE)?.split_once('/')?;
    Some((copyset.parse().ok()?, chunk.parse().ok()?))
}

/// Builds a batch of record changes.
#[derive(Debug, Default)]
pub struct Changes(pub Batch);

impl Changes {
    fn put<T: Serialize>(&mut self, key: String, value: &T) {
        let bytes = serde_json::to_vec(value).expect("records serialize");
        self.0.puts.push((key, bytes));
    }
    pub fn chunkserver(&mut self, r: &ChunkserverRecord) {
        self.put(chunkserver_key(r.id), r);
    }
    pub fn copyset(&mut self, r: &CopysetRecord) {
        self.put(copyset_key(r.id), r);
    }
    pub fn volume(&mut self, r: &VolumeRecord) {
        self.put(volume_key(&r.name), r);
    }
    pub fn remove_volume(&mut self, name: &str) {
        self.0.deletes.push(volume_key(name));
    }
    pub fn recycled(&mut self, r: &VolumeRecord) {
        self.put(recycled_key(r.id), r);
    }
    pub fn remove_recycled(&mut self, id: u64) {
        self.0.deletes.push(recycled_key(id));
    }
    pub fn segment(&mut self, r: &SegmentRecord) {
        self.put(segment_key(r.volume, r.index), r);
    }
    pub fn remove_segment(&mut self, volume: u64, index: u64) {
        self.0.deletes.push(segment_key(volume, index));
    }
    pub fn counters(&mut self, r: &Counters) {
        self.put(COUNTERS.to_owned(), r);
    }
    /// A chunk of a purged volume, to delete on its copyset.
    pub fn garbage(&mut self, copyset: u32, chunk: u64) {
        self.0.puts.push((garbage_key(copyset, chunk), Vec::new()));
    }
    pub fn remove_garbage(&mut self, copyset: u32, chunk: u64) {
        self.0.deletes.push(garbage_key(copyset, chunk));
    }
    pub fn into_batch(self) -> Batch {
        self.0
    }
}

/// Everything the control plane knows that must survive it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Model {
    pub chunkservers: BTreeMap<u64, ChunkserverRecord>,
    pub copysets: BTreeMap<u32, CopysetRecord>,
    pub volumes: BTreeMap<String, VolumeRecord>,
    pub recycled: BTreeMap<u64, VolumeRecord>,
    pub segments: HashMap<(u64, u64), SegmentRecord>,
    pub counters: Counters,
    /// Copyset → chunks of purged volumes still to delete there.
    pub garbage: BTreeMap<u32, std::collections::BTreeSet<u64>>,
}

fn parse<T: serde::de::DeserializeOwned>(key: &str, value: &[u8]) -> Result<T, ControlError> {
    serde_json::from_slice(value).map_err(|e| ControlError::Corrupt {
        key: key.to_owned(),
        why: e.to_string(),
    })
}

impl Model {
    /// The model held by a store's full contents.
    pub fn from_entries(entries: &[(String, Vec<u8>)]) -> Result<Model, ControlError> {
        let mut model = Model::default();
        model.apply(&Batch {
            puts: entries.to_vec(),
            deletes: Vec::new(),
        })?;
        Ok(model)
    }

    /// Applies a batch the store has accepted.
    pub fn apply(&mut self, batch: &Batch) -> Result<(), ControlError> {
        for key in &batch.deletes {
            if let Some(name) = key.strip_prefix(VOLUME) {
                self.volumes.remove(name);
            } else if key.starts_with(RECYCLED) {
                self.recycled.retain(|id, _| recycled_key(*id) != *key);
            } else if key.starts_with(SEGMENT) {
                self.segments
                    .retain(|(v, i), _| segment_key(*v, *i) != *key);
            } else if let Some((copyset, chunk)) = parse_garbage_key(key) {
                if let Some(set) = self.garbage.get_mut(&copyset) {
                    set.remove(&chunk);
                    if set.is_empty() {
                        self.garbage.remove(&copyset);
                    }
                }
            }
        }
        for (key, value) in &batch.puts {
            if key.starts_with(CHUNKSERVER) {
                let r: ChunkserverRecord = parse(key, value)?;
                self.chunkservers.insert(r.id, r);
            } else if key.starts_with(COPYSET) {
                let r: CopysetRecord = parse(key, value)?;
                self.copysets.insert(r.id, r);
            } else if key.starts_with(VOLUME) {
                let r: VolumeRecord = parse(key, value)?;
                self.volumes.insert(r.name.clone(), r);
            } else if key.starts_with(RECYCLED) {
                let r: VolumeRecord = parse(key, value)?;
                self.recycled.insert(r.id, r);
            } else if key.starts_with(SEGMENT) {
                let r: SegmentRecord = parse(key, value)?;
                self.segments.insert((r.volume, r.index), r);
            } else if key == COUNTERS {
                self.counters = parse(key, value)?;
            } else if let Some((copyset, chunk)) = parse_garbage_key(key) {
                self.garbage.entry(copyset).or_default().insert(chunk);
            }
            // Other keys (the leader record) belong to the store.
        }
        Ok(())
    }

    pub fn volume(&self, name: &str) -> Result<&VolumeRecord, ControlError> {
        self.volumes
            .get(name)
            .ok_or_else(|| ControlError::NoSuchVolume(name.to_owned()))
    }

    /// Copysets of a logical pool, by id.
    pub fn pool_copysets(&self, pool: &str) -> Vec<&CopysetRecord> {
        self.copysets.values().filter(|c| c.pool == pool).collect()
    }

    /// Copysets each chunkserver is a member of.
    pub fn copysets_per_chunkserver(&self) -> HashMap<u64, usize> {
        let mut counts: HashMap<u64, usize> = self.chunkservers.keys().map(|id| (*id, 0)).collect();
        for c in self.copysets.values() {
            for p in &c.peers {
                *counts.entry(*p).or_default() += 1;
            }
        }
        counts
    }
}

/// Checks a volume name: 1 to 128 of `A-Z a-z 0-9 . _ -`, not starting
/// with `.` or `-` (it appears in URLs, paths and command lines).
pub fn check_name(name: &str) -> Result<(), ControlError> {
    let bad = |why| {
        Err(ControlError::BadName {
            name: name.to_owned(),
            why,
        })
    };
    if name.is_empty() || name.len() > 128 {
        return bad("must be 1 to 128 characters");
    }
    if name.starts_with(['.', '-']) {
        return bad("must not start with '.' or '-'");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        return bad("only letters, digits, '.', '_' and '-' are allowed");
    }
    Ok(())
}

/// Checks a volume size against its segment size.
pub fn check_size(size: u64, segment_size: u64) -> Result<(), ControlError> {
    let bad = |why: String| Err(ControlError::BadSize { size, why });
    if size == 0 {
        return bad("a volume needs at least one segment".into());
    }
    if !size.is_multiple_of(segment_size) {
        return bad(format!(
            "not a multiple of the segment size ({segment_size} bytes)"
        ));
    }
    if size > VOLUME_BYTES_MAX {
        return bad(format!(
            "over the largest volume ({VOLUME_BYTES_MAX} bytes)"
        ));
    }
    Ok(())
}

/// Volume operations on the model: each checks, then returns the changes
/// to store (nothing is changed in memory until the store accepts them).
impl Model {
    pub fn create_volume(
        &self,
        name: &str,
        size: u64,
        owner: &str,
        pool: &str,
        segment_size: u64,
        now_unix_ms: u64,
    ) -> Result<(Batch, VolumeRecord), ControlError> {
        check_name(name)?;
        check_size(size, segment_size)?;
        if self.volumes.contains_key(name) {
            return Err(ControlError::VolumeExists(name.to_owned()));
        }
        let mut counters = self.counters.clone();
        counters.next_volume += 1;
        let volume = VolumeRecord {
            id: counters.next_volume,
            name: name.to_owned(),
            size,
            owner: owner.to_owned(),
            pool: pool.to_owned(),
            segment_size,
            created_unix_ms: now_unix_ms,
            epoch: 0,
            writer: None,
            deleted_unix_ms: None,
        };
        let mut c = Changes::default();
        c.volume(&volume);
        c.counters(&counters);
        Ok((c.into_batch(), volume))
    }

    pub fn extend_volume(
        &self,
        name: &str,
        new_size: u64,
    ) -> Result<(Batch, VolumeRecord), ControlError> {
        let mut volume = self.volume(name)?.clone();
        check_size(new_size, volume.segment_size)?;
        if new_size <= volume.size {
            return Err(ControlError::BadSize {
                size: new_size,
                why: format!("volumes only grow (it has {} bytes)", volume.size),
            });
        }
        volume.size = new_size;
        let mut c = Changes::default();
        c.volume(&volume);
        Ok((c.into_batch(), volume))
    }

    pub fn rename_volume(
        &self,
        name: &str,
        new_name: &str,
    ) -> Result<(Batch, VolumeRecord), ControlError> {
        check_name(new_name)?;
        let mut volume = self.volume(name)?.clone();
        if self.volumes.contains_key(new_name) {
            return Err(ControlError::VolumeExists(new_name.to_owned()));
        }
        volume.name = new_name.to_owned();
        let mut c = Changes::default();
        c.remove_volume(name);
        c.volume(&volume);
        Ok((c.into_batch(), volume))
    }

    /// Moves a volume into the recycle bin (its segments stay until purge).
    pub fn delete_volume(
        &self,
        name: &str,
        now_unix_ms: u64,
    ) -> Result<(Batch, VolumeRecord), ControlError> {
        let mut volume = self.volume(name)?.clone();
        if let Some(w) = volume.live_writer(now_unix_ms) {
            return Err(ControlError::VolumeBusy {
                name: name.to_owned(),
                writer: w.client.clone(),
                ms_left: w.until_unix_ms - now_unix_ms,
            });
        }
        volume.deleted_unix_ms = Some(now_unix_ms);
        volume.writer = None;
        let mut c = Changes::default();
        c.remove_volume(name);
        c.recycled(&volume);
        Ok((c.into_batch(), volume))
    }

    /// The next step of purging a volume that spent `retention_ms` in the
    /// recycle bin: one segment at a time (its chunks become garbage, deleted
    /// on their copysets later), the volume record last. Each step is one
    /// batch small enough for etcd (65 operations for 64 chunks).
    pub fn purge_step(&self, now_unix_ms: u64, retention_ms: u64) -> Option<(Batch, String)> {
        let volume = self.recycled.values().find(|v| {
            v.deleted_unix_ms
                .is_some_and(|at| now_unix_ms.saturating_sub(at) >= retention_ms)
        })?;
        let mut c = Changes::default();
        let segment = self
            .segments
            .values()
            .filter(|s| s.volume == volume.id)
            .min_by_key(|s| s.index);
        let what = match segment {
            Some(s) => {
                c.remove_segment(volume.id, s.index);
                for (copyset, chunk) in &s.chunks {
                    c.garbage(*copyset, *chunk);
                }
                format!(
                    "volume {} (id {}): segment {} purged",
                    volume.name, volume.id, s.index
                )
            }
            None => {
                c.remove_recycled(volume.id);
                format!("volume {} (id {}) purged", volume.name, volume.id)
            }
        };
        Some((c.into_batch(), what))
    }

    /// Opens a volume for writing: a new epoch and a lease for `client`.
    pub fn open_for_write(
        &self,
        name: &str,
        client: &str,
        force: bool,
        now_unix_ms: u64,
        lease_ms: u64,
    ) -> Result<(Batch, VolumeRecord), ControlError> {
        let mut volume = self.volume(name)?.clone();
        if let Some(w) = volume.live_writer(now_unix_ms) {
            if !force && w.client != client {
                return Err(ControlError::VolumeBusy {
                    name: name.to_owned(),
                    writer: w.client.clone(),
                    ms_left: w.until_unix_ms - now_unix_ms,
                });
            }
        }
        volume.epoch += 1;
        volume.writer = Some(Writer {
            client: client.to_owned(),
            until_unix_ms: now_unix_ms + lease_ms,
        });
        let mut c = Changes::default();
        c.volume(&volume);
        Ok((c.into_batch(), volume))
    }

    /// Checks that `epoch` is the volume's current write epoch.
    pub fn check_epoch(&self, name: &str, epoch: u64) -> Result<&VolumeRecord, ControlError> {
        let volume = self.volume(name)?;
        if epoch != volume.epoch || volume.writer.is_none() {
            return Err(ControlError::StaleEpoch {
                name: name.to_owned(),
                epoch,
                current: volume.epoch,
            });
        }
        Ok(volume)
    }

    pub fn refresh_lease(
        &self,
        name: &str,
        epoch: u64,
        now_unix_ms: u64,
        lease_ms: u64,
    ) -> Result<(Batch, VolumeRecord), ControlError> {
        let mut volume = self.check_epoch(name, epoch)?.clone();
        if let Some(w) = volume.writer.as_mut() {
            w.until_unix_ms = now_unix_ms + lease_ms;
        }
        let mut c = Changes::default();
        c.volume(&volume);
        Ok((c.into_batch(), volume))
    }

    pub fn close_volume(&self, name: &str, epoch: u64) -> Result<Batch, ControlError> {
        let mut volume = self.check_epoch(name, epoch)?.clone();
        volume.writer = None;
        let mut c = Changes::default();
        c.volume(&volume);
        Ok(c.into_batch())
    }

    /// Allocates segment `index` of a volume: one chunk per 16 MiB, spread
    /// over the pool's copysets round-robin from a rotating start, so
    /// segments of all volumes land evenly.
    pub fn allocate_segment(
        &self,
        volume: &VolumeRecord,
        index: u64,
    ) -> Result<(Batch, SegmentRecord), ControlError> {
        if index >= volume.segments() {
            return Err(ControlError::SegmentOutOfRange {
                name: volume.name.clone(),
                index,
            });
        }
        let copysets: Vec<u32> = self
            .pool_copysets(&volume.pool)
            .iter()
            .map(|c| c.id)
            .collect();
        if copysets.is_empty() {
            return Err(ControlError::NoCopysets(volume.pool.clone()));
        }
        let chunks = volume.segment_size / CHUNK_BYTES;
        let mut counters = self.counters.clone();
        let start = counters.next_chunk as usize;
        let segment = SegmentRecord {
            volume: volume.id,
            index,
            chunks: (0..chunks)
                .map(|i| {
                    counters.next_chunk += 1;
                    (
                        copysets[(start + i as usize) % copysets.len()],
                        counters.next_chunk,
                    )
                })
                .collect(),
        };
        let mut c = Changes::default();
        c.segment(&segment);
        c.counters(&counters);
        Ok((c.into_batch(), segment))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn applied(model: &mut Model, batch: Batch) {
        model.apply(&batch).unwrap();
    }

    fn with_copysets(n: u32) -> Model {
        let mut m = Model::default();
        let mut c = Changes::default();
        for id in 1..=n {
            c.copyset(&CopysetRecord {
                id,
                pool: "default".into(),
                peers: vec![1, 2, 3],
                epoch: 0,
            });
        }
        applied(&mut m, c.into_batch());
        m
    }

    #[test]
    fn names_and_sizes_are_checked() {
        for bad in ["", ".x", "-x", "a/b", "a b", &"x".repeat(129)] {
            assert!(
                matches!(check_name(bad), Err(ControlError::BadName { .. })),
                "{bad:?}"
            );
        }
        check_name("db-01.vol_2").unwrap();
        let m = Model::default();
        for size in [0, GIB + 4096, VOLUME_BYTES_MAX + GIB] {
            let e = m
                .create_volume("v", size, "o", "default", GIB, 0)
                .unwrap_err();
            assert!(matches!(e, ControlError::BadSize { .. }), "{size}: {e}");
        }
    }

    #[test]
    fn volume_lifecycle() {
        let mut m = with_copysets(4);
        let (b, v) = m
            .create_volume("v", 2 * GIB, "me", "default", GIB, 10)
            .unwrap();
        applied(&mut m, b);
        assert_eq!(v.id, 1);
        assert_eq!(
            m.create_volume("v", GIB, "me", "default", GIB, 10)
                .unwrap_err(),
            ControlError::VolumeExists("v".into())
        );
        let (b, _) = m.extend_volume("v", 3 * GIB).unwrap();
        applied(&mut m, b);
        assert!(m.extend_volume("v", GIB).is_err(), "shrinking is refused");
        let (b, _) = m.create_volume("w", GIB, "me", "default", GIB, 10).unwrap();
        applied(&mut m, b);
        assert_eq!(
            m.rename_volume("v", "w").unwrap_err(),
            ControlError::VolumeExists("w".into())
        );
        let (b, v) = m.rename_volume("v", "v2").unwrap();
        applied(&mut m, b);
        assert_eq!((v.id, v.size), (1, 3 * GIB));
        assert!(m.volume("v").is_err());
        let (b, _) = m.delete_volume("v2", 100).unwrap();
        applied(&mut m, b);
        assert!(!m.volumes.contains_key("v2"));
        assert_eq!(m.recycled[&1].deleted_unix_ms, Some(100));
        assert!(
            m.purge_step(150, 100).is_none(),
            "kept for the retention time"
        );
        let (b, what) = m.purge_step(200, 100).unwrap();
        applied(&mut m, b);
        assert_eq!(what, "volume v2 (id 1) purged");
        assert!(m.recycled.is_empty());
        // A name freed by delete can be used again, with a new id.
        let (_, v) = m
            .create_volume("v2", GIB, "me", "default", GIB, 10)
            .unwrap();
        assert_eq!(v.id, 3);
    }

    #[test]
    fn write_lease_and_epochs() {
        let mut m = with_copysets(1);
        let (b, _) = m.create_volume("v", GIB, "me", "default", GIB, 0).unwrap();
        applied(&mut m, b);
        let (b, v) = m.open_for_write("v", "a", false, 1000, 500).unwrap();
        applied(&mut m, b);
        assert_eq!(v.epoch, 1);
        let e = m.open_for_write("v", "b", false, 1200, 500).unwrap_err();
        assert!(
            matches!(e, ControlError::VolumeBusy { ms_left: 300, .. }),
            "{e}"
        );
        assert!(m.delete_volume("v", 1200).is_err(), "an open volume stays");
        // The lease expired: b gets it with a new epoch; a is fenced.
        let (b, v) = m.open_for_write("v", "b", false, 1600, 500).unwrap();
        applied(&mut m, b);
        assert_eq!(v.epoch, 2);
        assert!(matches!(
            m.refresh_lease("v", 1, 1700, 500).unwrap_err(),
            ControlError::StaleEpoch {
                epoch: 1,
                current: 2,
                ..
            }
        ));
        // Force takes it over at once.
        let (b, v) = m.open_for_write("v", "c", true, 1700, 500).unwrap();
        applied(&mut m, b);
        assert_eq!(v.epoch, 3);
        let b = m.close_volume("v", 3).unwrap();
        applied(&mut m, b);
        assert!(m.volume("v").unwrap().writer.is_none());
        assert!(m.close_volume("v", 3).is_err(), "closed already");
    }

    #[test]
    fn segments_spread_over_copysets() {
        let mut m = with_copysets(3);
        let (b, v) = m
            .create_volume("v", 2 * GIB, "me", "default", GIB, 0)
            .unwrap();
        applied(&mut m, b);
        let (b, s0) = m.allocate_segment(&v, 0).unwrap();
        applied(&mut m, b);
        let (b, s1) = m.allocate_segment(&v, 1).unwrap();
        applied(&mut m, b);
        assert_eq!(s0.chunks.len(), 64);
        let mut per_copyset = BTreeMap::new();
        let mut ids = std::collections::HashSet::new();
        for (cs, chunk) in s0.chunks.iter().chain(&s1.chunks) {
            *per_copyset.entry(*cs).or_insert(0) += 1;
            assert!(ids.insert(*chunk), "chunk ids are unique");
        }
        assert!(
            per_copyset.values().all(|n| (42..=43).contains(n)),
            "{per_copyset:?}"
        );
        assert!(matches!(
            m.allocate_segment(&v, 2).unwrap_err(),
            ControlError::SegmentOutOfRange { index: 2, .. }
        ));
        {
            // Purged after deletion: segment by segment, the chunks become
            // garbage, then the record goes.
            let mut m = m.clone();
            let (b, _) = m.delete_volume("v", 0).unwrap();
            applied(&mut m, b);
            for _ in 0..2 {
                let (b, what) = m.purge_step(10, 5).unwrap();
                assert!(what.contains("segment"), "{what}");
                applied(&mut m, b);
            }
            let garbage: usize = m.garbage.values().map(|s| s.len()).sum();
            assert_eq!(garbage, 128);
            let (b, _) = m.purge_step(10, 5).unwrap();
            applied(&mut m, b);
            assert!(m.recycled.is_empty() && m.segments.is_empty());
            assert!(m.purge_step(10, 5).is_none());
            let mut c = Changes::default();
            for (cs, chunks) in &m.garbage {
                for chunk in chunks {
                    c.remove_garbage(*cs, *chunk);
                }
            }
            applied(&mut m, c.into_batch());
            assert!(m.garbage.is_empty());
        }
        // The model survives a reload from the store's entries.
        let mut entries = Vec::new();
        let mut c = Changes::default();
        for cs in m.copysets.values() {
            c.copyset(cs);
        }
        c.volume(m.volume("v").unwrap());
        c.segment(&s0);
        c.segment(&s1);
        c.counters(&m.counters);
        entries.extend(c.into_batch().puts);
        assert_eq!(Model::from_entries(&entries).unwrap(), m);
    }
}
