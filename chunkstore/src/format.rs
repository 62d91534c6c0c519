//! The on-disk format of a chunk file (version 1).
//!
//! ```text
//! offset 0       4 KiB   metadata page (MetaPage, checksummed)
//! offset 4 KiB   16 KiB  page checksum table: one u32 per data page
//! offset 20 KiB  16 MiB  data: 4096 pages of 4 KiB
//! ```
//!
//! Every file, chunk, snapshot or free pool file, has this shape, so a file
//! moves between roles by rename and a metadata write, never by allocation.
//! A checksum entry of 0 means "not written since the file was (re)allocated":
//! such pages read as zeros without touching the disk, which is how a reused
//! file's stale data stays unreadable without rewriting 16 MiB. Real checksums
//! are crc32c of the page, with 0 mapped to [`CRC_OF_ZERO_SENTINEL`].

use crate::ChunkKey;

pub const PAGE_BYTES: usize = 4096;
pub const CHUNK_BYTES: u64 = 16 << 20;
pub const PAGES: usize = CHUNK_BYTES as usize / PAGE_BYTES;
pub const META_OFFSET: u64 = 0;
pub const CRC_OFFSET: u64 = PAGE_BYTES as u64;
/// Bytes of the checksum table (4 pages).
pub const CRC_BYTES: usize = PAGES * 4;
pub const CRC_PAGES: usize = CRC_BYTES / PAGE_BYTES;
/// Data pages whose checksums share one checksum-table page.
pub const PAGES_PER_CRC_PAGE: usize = PAGE_BYTES / 4;
pub const DATA_OFFSET: u64 = CRC_OFFSET + CRC_BYTES as u64;
pub const FILE_BYTES: u64 = DATA_OFFSET + CHUNK_BYTES;
/// Bytes of a page bitmap (snapshot: copied pages; clone: local pages).
pub const BITMAP_BYTES: usize = PAGES / 8;

const MAGIC: u64 = u64::from_le_bytes(*b"QVCHUNK\0");
const VERSION: u32 = 1;
/// Stored instead of a real crc32c of 0, so 0 can mean "never written".
pub const CRC_OF_ZERO_SENTINEL: u32 = 0xffff_ffff;

/// The stored checksum of a page.
pub fn page_crc(page: &[u8]) -> u32 {
    debug_assert_eq!(page.len(), PAGE_BYTES);
    match crc32c::crc32c(page) {
        0 => CRC_OF_ZERO_SENTINEL,
        crc => crc,
    }
}

/// What a file currently is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum FileKind {
    /// Formatted, in the pool (or being returned to it).
    Free = 0,
    Chunk = 1,
    Snapshot = 2,
}

/// Where a clone reads pages it has not written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloneSource {
    /// Another chunk's current contents.
    Chunk(ChunkKey),
    /// Another chunk as of its snapshot.
    Snapshot(ChunkKey),
}

/// The metadata page, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaPage {
    pub kind: FileKind,
    pub key: ChunkKey,
    /// Chunk: the sequence number of its current contents. Snapshot: the
    /// sequence number it preserves.
    pub sn: u64,
    /// Incremented each time the file is handed out, for debugging reuse.
    pub generation: u64,
    pub clone_source: Option<CloneSource>,
    /// Snapshot: pages copied in. Clone: pages written locally.
    pub bitmap: [u8; BITMAP_BYTES],
}

impl MetaPage {
    pub fn free(generation: u64) -> MetaPage {
        MetaPage {
            kind: FileKind::Free,
            key: ChunkKey {
                copyset: 0,
                chunk: 0,
            },
            sn: 0,
            generation,
            clone_source: None,
            bitmap: [0; BITMAP_BYTES],
        }
    }

    /// Serializes into a 4 KiB page, checksum last.
    pub fn encode(&self, page: &mut [u8]) {
        assert_eq!(page.len(), PAGE_BYTES);
        page.fill(0);
        let mut w = Writer { page, at: 0 };
        w.u64(MAGIC);
        w.u32(VERSION);
        w.u32(self.kind as u32);
        w.u32(self.key.copyset);
        w.u64(self.key.chunk);
        w.u64(self.sn);
        w.u64(self.generation);
        let (source_kind, source) = match self.clone_source {
            None => (
                0,
                ChunkKey {
                    copyset: 0,
                    chunk: 0,
                },
            ),
            Some(CloneSource::Chunk(k)) => (1, k),
            Some(CloneSource::Snapshot(k)) => (2, k),
        };
        w.u32(source_kind);
        w.u32(source.copyset);
        w.u64(source.chunk);
        w.bytes(&self.bitmap);
        let crc = crc32c::crc32c(&page[..PAGE_BYTES - 4]);
        page[PAGE_BYTES - 4..].copy_from_slice(&crc.to_le_bytes());
    }

    /// Validates and decodes a metadata page.
    pub fn decode(page: &[u8]) -> Result<MetaPage, String> {
        if page.len() != PAGE_BYTES {
            return Err(format!("{} bytes, not {PAGE_BYTES}", page.len()));
        }
        let stored = u32::from_le_bytes(page[PAGE_BYTES - 4..].try_into().expect("4 bytes"));
        let computed = crc32c::crc32c(&page[..PAGE_BYTES - 4]);
        if stored != computed {
            return Err(format!(
                "checksum {stored:#010x}, computed {computed:#010x}"
            ));
        }
        let mut r = Reader { page, at: 0 };
        if r.u64() != MAGIC {
            return Err("bad magic".into());
        }
        let version = r.u32();
        if version != VERSION {
            return Err(format!(
                "format version {version}, this build reads {VERSION}"
            ));
        }
        let kind = match r.u32() {
            0 => FileKind::Free,
            1 => FileKind::Chunk,
            2 => FileKind::Snapshot,
            other => return Err(format!("unknown file kind {other}")),
        };
        let key = ChunkKey {
            copyset: r.u32(),
            chunk: r.u64(),
        };
        let sn = r.u64();
        let generation = r.u64();
        let source_kind = r.u32();
        let source = ChunkKey {
            copyset: r.u32(),
            chunk: r.u64(),
        };
        let clone_source = match source_kind {
            0 => None,
            1 => Some(CloneSource::Chunk(source)),
            2 => Some(CloneSource::Snapshot(source)),
            other => return Err(format!("unknown clone source kind {other}")),
        };
        let mut bitmap = [0; BITMAP_BYTES];
        bitmap.copy_from_slice(r.bytes(BITMAP_BYTES));
        Ok(MetaPage {
            kind,
            key,
            sn,
            generation,
            clone_source,
            bitmap,
        })
    }
}

/// Bit `page` of a page bitmap.
pub fn bit(bitmap: &[u8; BITMAP_BYTES], page: usize) -> bool {
    bitmap[page / 8] & (1 << (page % 8)) != 0
}

pub fn set_bit(bitmap: &mut [u8; BITMAP_BYTES], page: usize) {
    bitmap[page / 8] |= 1 << (page % 8);
}

struct Writer<'a> {
    page: &'a mut [u8],
    at: usize,
}

impl Writer<'_> {
    fn bytes(&mut self, b: &[u8]) {
        self.page[self.at..self.at + b.len()].copy_from_slice(b);
        self.at += b.len();
    }
    fn u32(&mut self, v: u32) {
        self.bytes(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.bytes(&v.to_le_bytes());
    }
}

struct Reader<'a> {
    page: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn bytes(&mut self, n: usize) -> &[u8] {
        let b = &self.page[self.at..self.at + n];
        self.at += n;
        b
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.bytes(4).try_into().expect("4 bytes"))
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.bytes(8).try_into().expect("8 bytes"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_page_aligned() {
        assert_eq!(DATA_OFFSET % PAGE_BYTES as u64, 0);
        assert_eq!(CRC_PAGES, 4);
        assert_eq!(FILE_BYTES, (16 << 20) + 20 * 1024);
    }

    #[test]
    fn meta_pages_round_trip_and_catch_damage() {
        let mut meta = MetaPage::free(3);
        meta.kind = FileKind::Chunk;
        meta.key = ChunkKey {
            copyset: 7,
            chunk: 99,
        };
        meta.sn = 5;
        meta.clone_source = Some(CloneSource::Snapshot(ChunkKey {
            copyset: 7,
            chunk: 1,
        }));
        set_bit(&mut meta.bitmap, 4095);
        let mut page = vec![0u8; PAGE_BYTES];
        meta.encode(&mut page);
        assert_eq!(MetaPage::decode(&page), Ok(meta.clone()));
        assert!(bit(&meta.bitmap, 4095) && !bit(&meta.bitmap, 0));
        for at in [0, 9, 100, 4000, 4095] {
            let mut bad = page.clone();
            bad[at] ^= 1;
            assert!(
                MetaPage::decode(&bad).is_err(),
                "flip at {at} went unnoticed"
            );
        }
    }

    #[test]
    fn a_zero_crc_never_reads_as_unwritten() {
        assert_ne!(page_crc(&[0u8; PAGE_BYTES]), 0);
    }
}
