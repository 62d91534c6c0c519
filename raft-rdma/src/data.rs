//! An entry's bytes, kept where they arrived.
//!
//! A client's write comes off the fabric in a registered buffer; the entry
//! it becomes holds that buffer ([`Data::Fabric`]) through the log, the
//! AppendEntries that carry it to followers (sent from it, without a copy)
//! and the apply. A follower's entry is a slice of the buffer its
//! AppendEntries arrived in. Bytes made locally or read back from disk are
//! [`Data::Heap`].

use std::fmt;
use std::ops::{Deref, Range};

use bytes::Bytes;
use quiver_fabric::arena::Buf;

/// Bytes of a log entry: in a fabric buffer, or on the heap.
#[derive(Clone)]
pub enum Data {
    /// In the fabric's registered memory, as received.
    Fabric(Buf),
    Heap(Bytes),
}

impl Data {
    /// The bytes of `range` (relative to these), sharing the same memory.
    pub fn slice(&self, range: Range<usize>) -> Data {
        match self {
            Data::Fabric(b) => Data::Fabric(b.slice(range)),
            Data::Heap(b) => Data::Heap(b.slice(range)),
        }
    }

    /// The fabric buffer these bytes are in, if they are in one.
    pub fn fabric_buf(&self) -> Option<&Buf> {
        match self {
            Data::Fabric(b) => Some(b),
            Data::Heap(_) => None,
        }
    }
}

impl Deref for Data {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Data::Fabric(b) => b,
            Data::Heap(b) => b,
        }
    }
}

impl AsRef<[u8]> for Data {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl Default for Data {
    fn default() -> Data {
        Data::Heap(Bytes::new())
    }
}

impl From<Vec<u8>> for Data {
    fn from(v: Vec<u8>) -> Data {
        Data::Heap(Bytes::from(v))
    }
}

impl From<&[u8]> for Data {
    fn from(v: &[u8]) -> Data {
        Data::Heap(Bytes::copy_from_slice(v))
    }
}

impl From<Buf> for Data {
    fn from(b: Buf) -> Data {
        Data::Fabric(b)
    }
}

impl PartialEq for Data {
    fn eq(&self, other: &Data) -> bool {
        self[..] == other[..]
    }
}

impl Eq for Data {}

impl fmt::Debug for Data {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let at = match self {
            Data::Fabric(_) => "fabric",
            Data::Heap(_) => "heap",
        };
        write!(f, "Data({} bytes, {at})", self.len())
    }
}

/// An arena of one 4 KiB buffer, for tests of fabric-held data.
#[cfg(test)]
pub(crate) fn one_buffer_arena() -> quiver_fabric::arena::Arena {
    use quiver_fabric::arena::{Arena, ArenaConfig, SizeClass};
    Arena::new(&ArenaConfig {
        classes: vec![SizeClass {
            buf_bytes: 4096,
            count: 1,
        }],
        huge_pages: false,
    })
    .expect("a 4 KiB arena")
}

#[cfg(test)]
mod tests {
    use super::{one_buffer_arena, Data};

    #[test]
    fn a_slice_of_a_fabric_buffer_shares_its_memory() {
        let arena = one_buffer_arena();
        let mut buf = arena.alloc(100).unwrap();
        buf.iter_mut().enumerate().for_each(|(i, b)| *b = i as u8);
        let data = Data::from(buf.freeze());
        let part = data.slice(10..20);
        assert_eq!(&part[..], &(10u8..20).collect::<Vec<_>>()[..]);
        assert_eq!(part.as_ptr(), data[10..].as_ptr());
        assert!(part.fabric_buf().is_some());
        assert_eq!(
            Data::from(vec![1, 2, 3]).slice(1..3),
            Data::from(&[2u8, 3][..])
        );
    }
}
