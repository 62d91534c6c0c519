//! The log's on-disk record (format version 2; version 1 is still read), as
//! pure encode/decode.
//!
//! A segment is a sequence of batches; each batch starts on a 4 KiB boundary
//! (the log writes with O_DIRECT) and is a run of records followed by zeros up
//! to the next boundary. A record is a 48-byte little-endian header and a
//! payload:
//!
//! | bytes | field |
//! |---|---|
//! | 0..4 | magic `QLOG` |
//! | 4 | version (2; 1 in logs written before segments were reused) |
//! | 5 | kind: 1 entry, 2 truncate, 3 purge, 4 vote, 5 committed, 6 seal |
//! | 6..8 | zero |
//! | 8..16 | group (copyset id) |
//! | 16..24 | index (entry, truncate from, purge up to, committed index; vote: term) |
//! | 24..32 | term (vote: voted-for node) |
//! | 32..40 | leader node of the log id (vote: 1 if committed) |
//! | 40..44 | payload length |
//! | 44..48 | crc32c of the segment's sequence number (u64 LE; version 1: nothing), bytes 0..44 and the payload |
//!
//! Segment files are reused once every group has purged their entries, so a
//! segment's bytes after its last batch may be records of an earlier life of
//! the file. The sequence number in the checksum makes those fail: a reader
//! takes them for the end of the data, like a torn batch. A seal record ends
//! every segment but the newest (written before the next one starts).
//!
//! A reader at a zero magic skips to the next 4 KiB boundary; a zero magic on
//! a boundary ends the segment (no batch starts there). A record whose
//! checksum fails is where a torn batch (or an earlier life) begins: recovery
//! stops there.

/// Bytes of a record header.
pub const HEADER_BYTES: usize = 48;
/// Batches start on these boundaries.
pub const PAGE_BYTES: usize = 4096;
/// Largest payload of one record.
pub const PAYLOAD_BYTES_MAX: usize = 64 << 20;
const MAGIC: [u8; 4] = *b"QLOG";
/// The version written.
pub const VERSION: u8 = 2;
/// The version before segments were reused (no sequence number in the checksum).
const VERSION_1: u8 = 1;

/// A Raft log id: (term, leader node, index).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct LogId {
    pub term: u64,
    pub node: u64,
    pub index: u64,
}

/// A vote: a term, whom it went to, and whether it is committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Vote {
    pub term: u64,
    pub node: u64,
    pub committed: bool,
}

/// What one record says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record<'a> {
    /// The payload on disk is `head` then `payload` (the writer passes the
    /// Raft layer's tag byte as `head` so the entry's data is not copied to
    /// prepend it); a decoded record has it all in `payload`.
    Entry {
        group: u64,
        id: LogId,
        head: &'a [u8],
        payload: &'a [u8],
    },
    /// Entries from `from` on are gone (a conflict with the leader).
    Truncate {
        group: u64,
        from: u64,
    },
    /// Entries up to and including `upto` are gone (a snapshot covers them).
    Purge {
        group: u64,
        upto: LogId,
    },
    Vote {
        group: u64,
        vote: Vote,
    },
    Committed {
        group: u64,
        id: LogId,
    },
    /// The segment ends here; the log goes on in the next one.
    Seal,
}

impl Record<'_> {
    pub fn group(&self) -> u64 {
        match *self {
            Record::Entry { group, .. }
            | Record::Truncate { group, .. }
            | Record::Purge { group, .. }
            | Record::Vote { group, .. }
            | Record::Committed { group, .. } => group,
            Record::Seal => 0,
        }
    }

    /// Bytes this record takes on disk.
    pub fn encoded_len(&self) -> usize {
        HEADER_BYTES
            + match self {
                Record::Entry { head, payload, .. } => head.len() + payload.len(),
                _ => 0,
            }
    }

    /// Appends the record to `out`, for the segment with sequence number `seq`.
    pub fn encode(&self, out: &mut Vec<u8>, seq: u64) {
        type Fields<'p> = (u8, u64, u64, u64, u64, &'p [u8], &'p [u8]);
        let (kind, group, a, b, c, head, payload): Fields<'_> = match *self {
            Record::Entry {
                group,
                id,
                head,
                payload,
            } => (1, group, id.index, id.term, id.node, head, payload),
            Record::Truncate { group, from } => (2, group, from, 0, 0, &[], &[]),
            Record::Purge { group, upto } => (3, group, upto.index, upto.term, upto.node, &[], &[]),
            Record::Vote { group, vote } => (
                4,
                group,
                vote.term,
                vote.node,
                u64::from(vote.committed),
                &[],
                &[],
            ),
            Record::Committed { group, id } => (5, group, id.index, id.term, id.node, &[], &[]),
            Record::Seal => (6, 0, 0, 0, 0, &[], &[]),
        };
        let len = head.len() + payload.len();
        assert!(len <= PAYLOAD_BYTES_MAX, "log payload too large");
        let start = out.len();
        out.extend_from_slice(&MAGIC);
        out.push(VERSION);
        out.push(kind);
        out.extend_from_slice(&[0, 0]);
        for v in [group, a, b, c] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&(len as u32).to_le_bytes());
        let crc = checksum(VERSION, seq, &out[start..start + 44], &[head, payload]);
        out.extend_from_slice(&crc.to_le_bytes());
        out.extend_from_slice(head);
        out.extend_from_slice(payload);
    }
}

/// A record's checksum: over the segment's sequence number (version 2 on),
/// the header's first 44 bytes and the payload.
fn checksum(version: u8, seq: u64, header: &[u8], payload: &[&[u8]]) -> u32 {
    let seed = if version == VERSION_1 {
        0
    } else {
        crc32c::crc32c(&seq.to_le_bytes())
    };
    payload
        .iter()
        .fold(crc32c::crc32c_append(seed, header), |crc, piece| {
            crc32c::crc32c_append(crc, piece)
        })
}

/// The format version of the record at the start of `bytes`, if one starts there.
pub fn version_at_start(bytes: &[u8]) -> Option<u8> {
    (bytes.len() >= HEADER_BYTES && bytes[0..4] == MAGIC).then(|| bytes[4])
}

/// Why decoding stopped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("record at {offset}: {what}")]
    Bad { offset: usize, what: String },
}

/// What a reader finds at an offset.
#[derive(Debug, PartialEq, Eq)]
pub enum Next<'a> {
    /// A record and the offset after it.
    Record(Record<'a>, usize),
    /// Zeros: the rest of this page is padding; continue at the offset given.
    Skip(usize),
    /// No batch starts here: the segment's data ends.
    End,
}

/// Reads what lies at `offset` of the bytes of the segment with sequence
/// number `seq`.
pub fn next(bytes: &[u8], offset: usize, seq: u64) -> Result<Next<'_>, RecordError> {
    let bad = |what: String| RecordError::Bad { offset, what };
    if offset >= bytes.len() {
        return Ok(Next::End);
    }
    if offset.is_multiple_of(PAGE_BYTES) {
        if bytes[offset..].iter().take(4).all(|&b| b == 0) {
            return Ok(Next::End);
        }
    } else {
        // Inside a batch's last page: zeros up to the boundary are its padding
        // (however few: a record may end a byte before the boundary).
        let boundary = offset.next_multiple_of(PAGE_BYTES).min(bytes.len());
        if bytes[offset..boundary].iter().all(|&b| b == 0) {
            return Ok(Next::Skip(boundary));
        }
    }
    let Some(h) = bytes.get(offset..offset + HEADER_BYTES) else {
        return Err(bad("truncated header".into()));
    };
    if h[0..4] != MAGIC {
        return Err(bad("bad magic".into()));
    }
    let version = h[4];
    if version != VERSION && version != VERSION_1 {
        return Err(bad(format!("format version {version}")));
    }
    let u64_at = |i: usize| u64::from_le_bytes(h[i..i + 8].try_into().expect("8 bytes"));
    let len = u32::from_le_bytes(h[40..44].try_into().expect("4 bytes")) as usize;
    if len > PAYLOAD_BYTES_MAX {
        return Err(bad(format!("payload length {len}")));
    }
    let end = offset + HEADER_BYTES + len;
    let Some(payload) = bytes.get(offset + HEADER_BYTES..end) else {
        return Err(bad("truncated payload".into()));
    };
    let crc = u32::from_le_bytes(h[44..48].try_into().expect("4 bytes"));
    if checksum(version, seq, &h[..44], &[payload]) != crc {
        return Err(bad("checksum mismatch".into()));
    }
    let (group, a, b, c) = (u64_at(8), u64_at(16), u64_at(24), u64_at(32));
    let id = LogId {
        index: a,
        term: b,
        node: c,
    };
    let record = match h[5] {
        1 => Record::Entry {
            group,
            id,
            head: &[],
            payload,
        },
        2 => Record::Truncate { group, from: a },
        3 => Record::Purge { group, upto: id },
        4 => Record::Vote {
            group,
            vote: Vote {
                term: a,
                node: b,
                committed: c != 0,
            },
        },
        5 => Record::Committed { group, id },
        6 => Record::Seal,
        kind => return Err(bad(format!("record kind {kind}"))),
    };
    if h[5] != 1 && len != 0 {
        return Err(bad("payload on a record kind without one".into()));
    }
    Ok(Next::Record(record, end))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Record<'static>> {
        let id = LogId {
            term: 3,
            node: 2,
            index: 17,
        };
        vec![
            Record::Entry {
                group: 9,
                id,
                head: &[],
                payload: b"hello raft",
            },
            Record::Entry {
                group: 9,
                id: LogId { index: 18, ..id },
                head: &[],
                payload: b"",
            },
            Record::Truncate { group: 9, from: 18 },
            Record::Purge { group: 4, upto: id },
            Record::Vote {
                group: 4,
                vote: Vote {
                    term: 5,
                    node: 1,
                    committed: true,
                },
            },
            Record::Committed { group: 4, id },
            Record::Seal,
        ]
    }

    const SEQ: u64 = 42;

    /// Records, then zeros to a page boundary, as the writer lays batches out.
    fn batch(records: &[Record<'_>]) -> Vec<u8> {
        let mut out = Vec::new();
        for r in records {
            r.encode(&mut out, SEQ);
        }
        out.resize(out.len().next_multiple_of(PAGE_BYTES), 0);
        out
    }

    fn read_all(bytes: &[u8]) -> (Vec<Record<'_>>, Result<(), RecordError>) {
        read_all_of(bytes, SEQ)
    }

    fn read_all_of(bytes: &[u8], seq: u64) -> (Vec<Record<'_>>, Result<(), RecordError>) {
        let mut out = Vec::new();
        let mut offset = 0;
        loop {
            match next(bytes, offset, seq) {
                Ok(Next::Record(r, end)) => {
                    out.push(r);
                    offset = end;
                }
                Ok(Next::Skip(to)) => offset = to,
                Ok(Next::End) => return (out, Ok(())),
                Err(e) => return (out, Err(e)),
            }
        }
    }

    #[test]
    fn batches_round_trip_across_padding() {
        let records = sample();
        let mut bytes = batch(&records[..3]);
        bytes.extend(batch(&records[3..]));
        bytes.extend(vec![0; PAGE_BYTES * 2]);
        let (read, end) = read_all(&bytes);
        end.unwrap();
        assert_eq!(read, records);
    }

    #[test]
    fn a_record_ending_just_before_a_page_boundary_is_followed() {
        for gap in [0, 1, 2, 3, 4, 47, 48, 49] {
            let filler = PAGE_BYTES - HEADER_BYTES - gap;
            let long = vec![9u8; filler];
            let first = Record::Entry {
                group: 1,
                id: LogId::default(),
                head: &[],
                payload: &long,
            };
            let second = Record::Truncate { group: 1, from: 3 };
            let mut bytes = batch(std::slice::from_ref(&first));
            assert_eq!(bytes.len(), PAGE_BYTES);
            bytes.extend(batch(std::slice::from_ref(&second)));
            let (read, end) = read_all(&bytes);
            end.unwrap_or_else(|e| panic!("gap {gap}: {e}"));
            assert_eq!(read, vec![first, second], "gap {gap}");
        }
    }

    #[test]
    fn an_entry_written_in_two_pieces_reads_back_as_one_payload() {
        let written = Record::Entry {
            group: 2,
            id: LogId::default(),
            head: &[1],
            payload: b"data",
        };
        let bytes = batch(std::slice::from_ref(&written));
        let (read, end) = read_all(&bytes);
        end.unwrap();
        let expected = Record::Entry {
            group: 2,
            id: LogId::default(),
            head: &[],
            payload: b"\x01data",
        };
        assert_eq!(read, vec![expected]);
    }

    #[test]
    fn a_torn_or_flipped_record_stops_the_reader_with_an_error() {
        let records = sample();
        let clean = batch(&records);
        for at in [0, 5, 12, 44, 50, HEADER_BYTES + 10] {
            let mut bytes = clean.clone();
            bytes[at] ^= 0x40;
            let (read, end) = read_all(&bytes);
            assert!(end.is_err(), "flip at {at} went unnoticed");
            assert!(read.len() < records.len());
        }
        // Torn: the second half of the batch never reached the disk.
        let mut torn = clean.clone();
        let cut = records[0].encoded_len() + 20;
        torn[cut..].fill(0);
        let (read, end) = read_all(&torn);
        assert_eq!(read.len(), 1);
        assert!(end.is_err());
    }

    #[test]
    fn records_of_another_segment_fail_their_checksum() {
        let records = sample();
        let bytes = batch(&records);
        let (read, end) = read_all_of(&bytes, SEQ + 1);
        assert!(read.is_empty());
        assert!(
            end.is_err(),
            "a record of segment {SEQ} read as one of {}",
            SEQ + 1
        );
        assert_eq!(version_at_start(&bytes), Some(VERSION));
    }

    #[test]
    fn version_1_records_still_read() {
        // Version 1: no sequence number in the checksum.
        let mut bytes = Vec::new();
        Record::Truncate { group: 3, from: 9 }.encode(&mut bytes, 0);
        bytes[4] = VERSION_1;
        let crc = checksum(VERSION_1, 0, &bytes[..44], &[]);
        bytes[44..48].copy_from_slice(&crc.to_le_bytes());
        bytes.resize(PAGE_BYTES, 0);
        for seq in [1, 7, 1000] {
            let (read, end) = read_all_of(&bytes, seq);
            end.unwrap();
            assert_eq!(read, vec![Record::Truncate { group: 3, from: 9 }]);
        }
        assert_eq!(version_at_start(&bytes), Some(VERSION_1));
    }
}
