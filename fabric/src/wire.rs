//! The wire format: every frame starts with a fixed-size, rkyv-archived
//! [`FrameHeader`], validated on receipt before any length in it is trusted.
//!
//! ```text
//! | FrameHeader (HEADER_BYTES) | user header (header_len) | payload (payload_len, Eager and RndvData only) |
//! ```
//!
//! All integers are little-endian and unaligned (rkyv's `unaligned` feature), so a
//! header can be read in place from any offset of a receive buffer.

use rkyv::rancor::Failure;
use rkyv::{Archive, Deserialize, Serialize};

/// "QV": the first two bytes of every frame.
pub const MAGIC: u16 = 0x5156;
/// Version of this wire format; a peer with another version is refused at hello.
pub const VERSION: u8 = 1;
/// Bytes of an archived [`FrameHeader`].
pub const HEADER_BYTES: usize = std::mem::size_of::<ArchivedFrameHeader>();
/// Largest user header an active message may carry (it travels in the eager
/// path of every message, including a rendezvous request).
pub const AM_HEADER_BYTES_MAX: usize = 4096;
/// Largest reason text a Close frame carries.
pub const CLOSE_REASON_BYTES_MAX: usize = 256;

const _: () = assert!(
    HEADER_BYTES == 48,
    "the frame header layout changed: bump VERSION"
);
const _: () = assert!(std::mem::align_of::<ArchivedFrameHeader>() == 1);

/// What a frame is.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[rkyv(derive(Debug))]
#[repr(u8)]
pub enum FrameKind {
    /// First frame each way: versions, credits and limits ([`Hello`] as user header).
    Hello = 1,
    /// An active message whose header and payload follow inline. Costs a credit.
    Eager = 2,
    /// Ready-to-send: a rendezvous message's header and total size. Costs a credit.
    Rts = 3,
    /// Clear-to-send: the receiver has a buffer for rendezvous `seq` (`aux` names its slot).
    Cts = 4,
    /// The payload of rendezvous `seq`, into the receiver's slot `aux`.
    RndvData = 5,
    /// Returns credits and carries nothing else.
    Credit = 6,
    /// Orderly close; the user header is a UTF-8 reason.
    Close = 7,
    /// The receiver read rendezvous `seq` from the sender's memory (RDMA READ);
    /// the sender may release the buffer.
    Fin = 8,
}

/// Frame flags.
pub mod flags {
    /// The message is an RPC request; `correlation` identifies it.
    pub const RPC_REQUEST: u16 = 1 << 0;
    /// The message answers the RPC request `correlation`.
    pub const RPC_RESPONSE: u16 = 1 << 1;
    /// The response is an error: the user header is a [`super::RemoteError`] record.
    pub const RPC_ERROR: u16 = 1 << 2;
    /// On Cts: the receiver declined the rendezvous; no data follows.
    pub const CTS_DISCARD: u16 = 1 << 3;
    /// On Rts: the payload is at address `aux` under `rkey` in the sender's
    /// memory; the receiver reads it (RDMA READ) and answers with Fin.
    pub const RTS_REMOTE_READ: u16 = 1 << 4;
    /// Every flag this version knows.
    pub const ALL: u16 = RPC_REQUEST | RPC_RESPONSE | RPC_ERROR | CTS_DISCARD | RTS_REMOTE_READ;
}

/// The fixed part of every frame.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct FrameHeader {
    pub magic: u16,
    pub version: u8,
    pub kind: FrameKind,
    pub flags: u16,
    /// Active-message id (the handler to run).
    pub am_id: u16,
    /// Credits the sender returns to the receiver with this frame.
    pub credits: u32,
    /// Bytes of user header after the frame header.
    pub header_len: u32,
    /// Eager/RndvData: payload bytes that follow. Rts: the announced payload size.
    pub payload_len: u32,
    /// Rendezvous id chosen by the sender of the message (Rts, Cts, RndvData).
    pub seq: u64,
    /// Cts/RndvData: the receiver's slot for the rendezvous.
    pub aux: u64,
    /// RPC correlation id (0: not an RPC).
    pub correlation: u64,
    /// Rts with RTS_REMOTE_READ: the remote key of the payload's memory.
    pub rkey: u32,
}

impl FrameHeader {
    /// A header of `kind` with every other field zero.
    pub fn new(kind: FrameKind) -> FrameHeader {
        FrameHeader {
            magic: MAGIC,
            version: VERSION,
            kind,
            flags: 0,
            am_id: 0,
            credits: 0,
            header_len: 0,
            payload_len: 0,
            seq: 0,
            aux: 0,
            correlation: 0,
            rkey: 0,
        }
    }

    /// Bytes that follow this header on the wire before the next frame.
    pub fn body_len(&self) -> usize {
        let payload = match self.kind {
            FrameKind::Eager | FrameKind::RndvData => self.payload_len as usize,
            _ => 0,
        };
        self.header_len as usize + payload
    }

    /// Writes the archived header into `out` (no allocation).
    pub fn encode(&self, out: &mut [u8; HEADER_BYTES]) {
        let written = rkyv::api::low::to_bytes_in_with_alloc::<_, _, Failure>(
            self,
            rkyv::ser::writer::Buffer::from(&mut out[..]),
            rkyv::ser::allocator::SubAllocator::empty(),
        )
        .expect("a FrameHeader always fits HEADER_BYTES");
        debug_assert_eq!(written.len(), HEADER_BYTES);
    }
}

/// Limits the receiver enforces on what a peer sends it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecvLimits {
    /// Largest user header + payload of an eager frame.
    pub eager_bytes_max: usize,
    /// Largest payload of a rendezvous message.
    pub message_bytes_max: usize,
}

/// Why a frame was refused. Any of these closes the connection it came on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The header did not validate as an archived `FrameHeader` (bad kind tag).
    #[error("frame header does not validate: {0}")]
    Invalid(String),
    #[error("bad magic {0:#06x}")]
    BadMagic(u16),
    #[error("wire version {got}, this build speaks {VERSION}")]
    BadVersion { got: u8 },
    #[error("unknown flags {0:#06x}")]
    BadFlags(u16),
    #[error("{what} of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        what: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{kind:?} frame carries {field}, which it must not")]
    Unexpected {
        kind: FrameKind,
        field: &'static str,
    },
}

/// Validates the first [`HEADER_BYTES`] of `bytes` and returns the header.
///
/// Checks, in order: rkyv structural validation (the kind tag), magic, version,
/// flags, and every length against `limits`, so the caller may trust
/// [`FrameHeader::body_len`] to size its reads.
pub fn decode_header(bytes: &[u8], limits: &RecvLimits) -> Result<FrameHeader, WireError> {
    let bytes = &bytes[..HEADER_BYTES];
    let archived = rkyv::access::<ArchivedFrameHeader, Failure>(bytes)
        .map_err(|e| WireError::Invalid(e.to_string()))?;
    let header: FrameHeader = rkyv::deserialize::<FrameHeader, Failure>(archived)
        .map_err(|e| WireError::Invalid(e.to_string()))?;
    if header.magic != MAGIC {
        return Err(WireError::BadMagic(header.magic));
    }
    if header.version != VERSION {
        return Err(WireError::BadVersion {
            got: header.version,
        });
    }
    if header.flags & !flags::ALL != 0 {
        return Err(WireError::BadFlags(header.flags));
    }
    let header_len = header.header_len as usize;
    let payload_len = header.payload_len as usize;
    let too_large = |what, len, max| Err(WireError::TooLarge { what, len, max });
    let unexpected = |field| {
        Err(WireError::Unexpected {
            kind: header.kind,
            field,
        })
    };
    match header.kind {
        FrameKind::Hello => {
            if header_len != HELLO_BYTES {
                return too_large("hello", header_len, HELLO_BYTES);
            }
            if payload_len != 0 {
                return unexpected("a payload");
            }
        }
        FrameKind::Eager => {
            if header_len > AM_HEADER_BYTES_MAX {
                return too_large("user header", header_len, AM_HEADER_BYTES_MAX);
            }
            if header_len + payload_len > limits.eager_bytes_max {
                return too_large(
                    "eager message",
                    header_len + payload_len,
                    limits.eager_bytes_max,
                );
            }
        }
        FrameKind::Rts => {
            if header_len > AM_HEADER_BYTES_MAX {
                return too_large("user header", header_len, AM_HEADER_BYTES_MAX);
            }
            if payload_len > limits.message_bytes_max {
                return too_large("rendezvous message", payload_len, limits.message_bytes_max);
            }
        }
        FrameKind::Cts | FrameKind::Credit | FrameKind::Fin => {
            if header_len != 0 || payload_len != 0 {
                return unexpected("a body");
            }
        }
        FrameKind::RndvData => {
            if header_len != 0 {
                return unexpected("a user header");
            }
            if payload_len > limits.message_bytes_max {
                return too_large("rendezvous data", payload_len, limits.message_bytes_max);
            }
        }
        FrameKind::Close => {
            if header_len > CLOSE_REASON_BYTES_MAX {
                return too_large("close reason", header_len, CLOSE_REASON_BYTES_MAX);
            }
            if payload_len != 0 {
                return unexpected("a payload");
            }
        }
    }
    Ok(header)
}

/// The body of a Hello frame: what the sender accepts from its peer.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct Hello {
    /// Eager/Rts frames the peer may have unacknowledged at once.
    pub credits: u32,
    /// Largest user header + payload the sender accepts eagerly.
    pub eager_bytes_max: u32,
    /// Largest rendezvous payload the sender accepts.
    pub message_bytes_max: u32,
}

/// Bytes of an archived [`Hello`].
pub const HELLO_BYTES: usize = std::mem::size_of::<ArchivedHello>();

impl Hello {
    pub fn encode(&self, out: &mut [u8; HELLO_BYTES]) {
        rkyv::api::low::to_bytes_in_with_alloc::<_, _, Failure>(
            self,
            rkyv::ser::writer::Buffer::from(&mut out[..]),
            rkyv::ser::allocator::SubAllocator::empty(),
        )
        .expect("a Hello always fits HELLO_BYTES");
    }

    pub fn decode(bytes: &[u8]) -> Result<Hello, WireError> {
        let archived = rkyv::access::<ArchivedHello, Failure>(bytes)
            .map_err(|e| WireError::Invalid(e.to_string()))?;
        rkyv::deserialize::<Hello, Failure>(archived).map_err(|e| WireError::Invalid(e.to_string()))
    }
}

/// The user header of an RPC error response: a code, then UTF-8 text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteError {
    pub code: u32,
    pub message: String,
}

impl RemoteError {
    /// Largest message text carried; longer text is cut at a char boundary.
    pub const MESSAGE_BYTES_MAX: usize = 1024;

    /// Encodes `code` and `message` into `out`, returning the bytes used.
    pub fn encode(code: u32, message: &str, out: &mut [u8]) -> usize {
        let mut end = message
            .len()
            .min(Self::MESSAGE_BYTES_MAX)
            .min(out.len() - 4);
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        out[..4].copy_from_slice(&code.to_le_bytes());
        out[4..4 + end].copy_from_slice(&message.as_bytes()[..end]);
        4 + end
    }

    pub fn decode(bytes: &[u8]) -> Result<RemoteError, WireError> {
        if bytes.len() < 4 {
            return Err(WireError::Invalid(format!(
                "error record of {} bytes",
                bytes.len()
            )));
        }
        let code = u32::from_le_bytes(bytes[..4].try_into().expect("4 bytes"));
        Ok(RemoteError {
            code,
            message: String::from_utf8_lossy(&bytes[4..]).into_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: RecvLimits = RecvLimits {
        eager_bytes_max: 8192,
        message_bytes_max: 1 << 20,
    };

    fn encoded(h: &FrameHeader) -> [u8; HEADER_BYTES] {
        let mut out = [0u8; HEADER_BYTES];
        h.encode(&mut out);
        out
    }

    #[test]
    fn headers_round_trip() {
        let mut h = FrameHeader::new(FrameKind::Eager);
        h.am_id = 7;
        h.flags = flags::RPC_REQUEST;
        h.credits = 3;
        h.header_len = 16;
        h.payload_len = 64;
        h.seq = u64::MAX;
        h.aux = 5;
        h.correlation = 42;
        let bytes = encoded(&h);
        assert_eq!(&bytes[..2], &MAGIC.to_le_bytes());
        assert_eq!(decode_header(&bytes, &LIMITS), Ok(h));
        assert_eq!(h.body_len(), 80);
    }

    #[test]
    fn every_bad_field_is_refused() {
        let good = FrameHeader::new(FrameKind::Credit);
        let mut bytes = encoded(&good);
        bytes[3] = 99; // kind tag
        assert!(matches!(
            decode_header(&bytes, &LIMITS),
            Err(WireError::Invalid(_))
        ));

        let mut h = good;
        h.magic = 1;
        assert_eq!(
            decode_header(&encoded(&h), &LIMITS),
            Err(WireError::BadMagic(1))
        );
        let mut h = good;
        h.version = 9;
        assert_eq!(
            decode_header(&encoded(&h), &LIMITS),
            Err(WireError::BadVersion { got: 9 })
        );
        let mut h = good;
        h.flags = 1 << 15;
        assert!(matches!(
            decode_header(&encoded(&h), &LIMITS),
            Err(WireError::BadFlags(_))
        ));
        let mut h = good;
        h.header_len = 1;
        assert!(matches!(
            decode_header(&encoded(&h), &LIMITS),
            Err(WireError::Unexpected { .. })
        ));

        let mut h = FrameHeader::new(FrameKind::Eager);
        h.payload_len = 9000;
        assert!(matches!(
            decode_header(&encoded(&h), &LIMITS),
            Err(WireError::TooLarge { .. })
        ));
        let mut h = FrameHeader::new(FrameKind::Rts);
        h.payload_len = 2 << 20;
        assert!(matches!(
            decode_header(&encoded(&h), &LIMITS),
            Err(WireError::TooLarge { .. })
        ));
        h.payload_len = 1 << 20;
        h.header_len = AM_HEADER_BYTES_MAX as u32 + 1;
        assert!(matches!(
            decode_header(&encoded(&h), &LIMITS),
            Err(WireError::TooLarge { .. })
        ));
    }

    #[test]
    fn hello_and_remote_error_round_trip() {
        let hello = Hello {
            credits: 64,
            eager_bytes_max: 8192,
            message_bytes_max: 1 << 24,
        };
        let mut out = [0u8; HELLO_BYTES];
        hello.encode(&mut out);
        assert_eq!(Hello::decode(&out), Ok(hello));

        let mut out = [0u8; 64];
        let n = RemoteError::encode(7, "no such chunk: é", &mut out);
        assert_eq!(
            RemoteError::decode(&out[..n]),
            Ok(RemoteError {
                code: 7,
                message: "no such chunk: é".into()
            })
        );
        let n = RemoteError::encode(1, &"x".repeat(100), &mut out);
        assert_eq!(n, 64);
    }

    #[test]
    fn random_bytes_never_panic() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut bytes = [0u8; HEADER_BYTES];
        for _ in 0..100_000 {
            rng.fill(&mut bytes[..]);
            if rng.random_bool(0.5) {
                bytes[..2].copy_from_slice(&MAGIC.to_le_bytes());
                bytes[2] = VERSION;
            }
            if let Ok(h) = decode_header(&bytes, &LIMITS) {
                assert!(h.body_len() <= AM_HEADER_BYTES_MAX + LIMITS.message_bytes_max);
            }
        }
    }
}
