//! AppendEntries on the fabric, as pure encode/decode: the request's fields
//! and each entry's id, tag and length go in the message's header; the
//! entries' data are its payload, one after another. An entry's data are
//! never encoded: the sender passes a lone entry's fabric buffer to the
//! fabric as the payload (sent without a copy), and the receiver's entries
//! are slices of the buffer the payload arrived in.
//!
//! Header (little-endian), after the fabric node's kind and group bytes:
//!
//! | bytes | field |
//! |---|---|
//! | 0 | version (1) |
//! | 1..18 | vote: term, node, committed (1 byte) |
//! | 18..43 | prev_log_id: present (1 byte), term, node, index |
//! | 43..68 | leader_commit: the same |
//! | 68..72 | entry count |
//! | 72.. | per entry, 29 bytes: term, node, index, tag, data length (u32) |

use openraft::raft::AppendEntriesRequest;
use openraft::{Entry, LeaderId, Vote};

use crate::data::Data;
use crate::log::LogId;
use crate::store::{decode_payload, encode, to_ours, to_raft, TypeConfig};

const VERSION: u8 = 1;
const FIXED_BYTES: usize = 72;
const ENTRY_BYTES: usize = 29;

/// Most entries one message carries: their ids must fit the fabric's 4 KiB
/// user header beside the request's fields and the node's 9 bytes.
pub const ENTRIES_MAX: usize = 128;
const _: () = assert!(9 + FIXED_BYTES + ENTRIES_MAX * ENTRY_BYTES <= 4096);

/// Why a received AppendEntries does not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AppendError {
    #[error("AppendEntries header: {0}")]
    Header(String),
    #[error("AppendEntries entries hold {want} bytes of data, the payload {got}")]
    Length { want: usize, got: usize },
    #[error("AppendEntries entry {index}: {why}")]
    Entry { index: u64, why: String },
}

/// An encoded request: the header and the entries' data in order.
pub struct Encoded {
    pub header: Vec<u8>,
    pub data: Vec<Data>,
}

impl Encoded {
    /// Bytes of the payload.
    pub fn data_len(&self) -> usize {
        self.data.iter().map(|d| d.len()).sum()
    }
}

fn put_log_id(out: &mut Vec<u8>, id: Option<&openraft::LogId<u64>>) {
    let ours = id.map(to_ours);
    out.push(u8::from(ours.is_some()));
    let id = ours.unwrap_or_default();
    for v in [id.term, id.node, id.index] {
        out.extend_from_slice(&v.to_le_bytes());
    }
}

/// Encodes `rpc`; at most [`ENTRIES_MAX`] entries.
pub fn encode_request(rpc: &AppendEntriesRequest<TypeConfig>) -> Encoded {
    assert!(rpc.entries.len() <= ENTRIES_MAX, "too many entries");
    let mut header = Vec::with_capacity(FIXED_BYTES + rpc.entries.len() * ENTRY_BYTES);
    header.push(VERSION);
    header.extend_from_slice(&rpc.vote.leader_id.term.to_le_bytes());
    header.extend_from_slice(&rpc.vote.leader_id.node_id.to_le_bytes());
    header.push(u8::from(rpc.vote.committed));
    put_log_id(&mut header, rpc.prev_log_id.as_ref());
    put_log_id(&mut header, rpc.leader_commit.as_ref());
    header.extend_from_slice(&(rpc.entries.len() as u32).to_le_bytes());
    let mut data = Vec::with_capacity(rpc.entries.len());
    for e in &rpc.entries {
        let (tag, bytes) = encode(&e.payload);
        let id = to_ours(&e.log_id);
        for v in [id.term, id.node, id.index] {
            header.extend_from_slice(&v.to_le_bytes());
        }
        header.push(tag);
        header.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        data.push(bytes);
    }
    Encoded { header, data }
}

/// Reads the header's fields in order.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], AppendError> {
        let end = self.at + n;
        let got = self.bytes.get(self.at..end).ok_or_else(|| {
            AppendError::Header(format!("{} bytes, wanted {end} at least", self.bytes.len()))
        })?;
        self.at = end;
        Ok(got)
    }

    fn u8(&mut self) -> Result<u8, AppendError> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, AppendError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }

    fn u64(&mut self) -> Result<u64, AppendError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }

    fn log_id(&mut self) -> Result<LogId, AppendError> {
        Ok(LogId {
            term: self.u64()?,
            node: self.u64()?,
            index: self.u64()?,
        })
    }

    fn optional_log_id(&mut self) -> Result<Option<openraft::LogId<u64>>, AppendError> {
        let present = self.u8()?;
        let id = self.log_id()?;
        match present {
            0 => Ok(None),
            1 => Ok(Some(to_raft(id))),
            other => Err(AppendError::Header(format!("log id flag {other}"))),
        }
    }
}

/// Decodes a request from its header and payload; entries' data are slices
/// of `payload`.
pub fn decode_request(
    header: &[u8],
    payload: &Data,
) -> Result<AppendEntriesRequest<TypeConfig>, AppendError> {
    let mut r = Reader {
        bytes: header,
        at: 0,
    };
    let version = r.u8()?;
    if version != VERSION {
        return Err(AppendError::Header(format!("version {version}")));
    }
    let (term, node) = (r.u64()?, r.u64()?);
    let vote = Vote {
        leader_id: LeaderId::new(term, node),
        committed: r.u8()? != 0,
    };
    let prev_log_id = r.optional_log_id()?;
    let leader_commit = r.optional_log_id()?;
    let count = r.u32()? as usize;
    if count > ENTRIES_MAX || header.len() != FIXED_BYTES + count * ENTRY_BYTES {
        return Err(AppendError::Header(format!(
            "{count} entries in {} bytes",
            header.len()
        )));
    }
    let mut entries = Vec::with_capacity(count);
    let mut at = 0usize;
    for _ in 0..count {
        let id = r.log_id()?;
        let tag = r.u8()?;
        let len = r.u32()? as usize;
        let end = at.saturating_add(len);
        if end > payload.len() {
            return Err(AppendError::Length {
                want: end,
                got: payload.len(),
            });
        }
        let data = payload.slice(at..end);
        at = end;
        let payload = decode_payload(tag, &data).map_err(|why| AppendError::Entry {
            index: id.index,
            why,
        })?;
        entries.push(Entry {
            log_id: to_raft(id),
            payload,
        });
    }
    if at != payload.len() {
        return Err(AppendError::Length {
            want: at,
            got: payload.len(),
        });
    }
    Ok(AppendEntriesRequest {
        vote,
        prev_log_id,
        entries,
        leader_commit,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Request;
    use openraft::{EntryPayload, Membership};
    use std::collections::BTreeSet;

    fn id(term: u64, node: u64, index: u64) -> openraft::LogId<u64> {
        openraft::LogId::new(openraft::CommittedLeaderId::new(term, node), index)
    }

    fn sample() -> AppendEntriesRequest<TypeConfig> {
        let members = Membership::new(vec![BTreeSet::from([1, 2, 3])], None);
        AppendEntriesRequest {
            vote: Vote::new_committed(4, 2),
            prev_log_id: Some(id(3, 1, 9)),
            leader_commit: Some(id(4, 2, 10)),
            entries: vec![
                Entry {
                    log_id: id(4, 2, 10),
                    payload: EntryPayload::Blank,
                },
                Entry {
                    log_id: id(4, 2, 11),
                    payload: EntryPayload::Normal(Request::new(1, b"first".to_vec())),
                },
                Entry {
                    log_id: id(4, 2, 12),
                    payload: EntryPayload::Membership(members),
                },
                Entry {
                    log_id: id(4, 2, 13),
                    payload: EntryPayload::Normal(Request::new(3, Vec::new())),
                },
            ],
        }
    }

    fn joined(e: &Encoded) -> Data {
        Data::from(e.data.iter().flat_map(|d| d.to_vec()).collect::<Vec<u8>>())
    }

    #[test]
    fn a_request_reads_back_as_sent() {
        let rpc = sample();
        let encoded = encode_request(&rpc);
        let back = decode_request(&encoded.header, &joined(&encoded)).unwrap();
        assert_eq!(format!("{back:?}"), format!("{rpc:?}"));
        let heartbeat = AppendEntriesRequest::<TypeConfig> {
            vote: Vote::new(7, 1),
            prev_log_id: None,
            entries: Vec::new(),
            leader_commit: None,
        };
        let encoded = encode_request(&heartbeat);
        assert_eq!(encoded.data_len(), 0);
        let back = decode_request(&encoded.header, &Data::default()).unwrap();
        assert_eq!(format!("{back:?}"), format!("{heartbeat:?}"));
    }

    #[test]
    fn received_entries_are_slices_of_the_payload_buffer() {
        let arena = crate::data::one_buffer_arena();
        let rpc = sample();
        let encoded = encode_request(&rpc);
        let bytes = joined(&encoded);
        let mut buf = arena.alloc(bytes.len()).unwrap();
        buf.copy_from_slice(&bytes);
        let payload = Data::from(buf.freeze());
        let back = decode_request(&encoded.header, &payload).unwrap();
        let EntryPayload::Normal(request) = &back.entries[1].payload else {
            panic!("not a request: {:?}", back.entries[1]);
        };
        assert!(request.body.fabric_buf().is_some());
        assert_eq!(request.body.as_ptr(), payload.as_ptr());
    }

    #[test]
    fn bad_headers_and_payloads_are_errors() {
        let encoded = encode_request(&sample());
        let payload = joined(&encoded);
        for cut in [0, 1, 30, FIXED_BYTES, encoded.header.len() - 1] {
            assert!(
                decode_request(&encoded.header[..cut], &payload).is_err(),
                "cut at {cut}"
            );
        }
        let short = payload.slice(0..payload.len() - 1);
        assert!(matches!(
            decode_request(&encoded.header, &short),
            Err(AppendError::Length { .. })
        ));
        let mut long = payload.to_vec();
        long.push(0);
        assert!(matches!(
            decode_request(&encoded.header, &Data::from(long)),
            Err(AppendError::Length { .. })
        ));
        let mut version = encoded.header.clone();
        version[0] = 9;
        assert!(decode_request(&version, &payload).is_err());
        let mut tag = encoded.header.clone();
        tag[FIXED_BYTES + 24] = 0x7f;
        assert!(matches!(
            decode_request(&tag, &payload),
            Err(AppendError::Entry { index: 10, .. })
        ));
        let mut huge = encoded.header.clone();
        huge[FIXED_BYTES + 25..FIXED_BYTES + 29].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode_request(&huge, &payload).is_err());
    }
}
