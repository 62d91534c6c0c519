//! Shared test helpers: an arena, a store in a temporary directory, page patterns.

#![allow(dead_code)]

use std::path::Path;

use quiver_arena::{Arena, ArenaConfig, SizeClass};
use quiver_chunkstore::{ChunkKey, ChunkStore, StoreConfig, PAGE_BYTES};

pub fn arena() -> Arena {
    Arena::new(&ArenaConfig {
        classes: vec![
            SizeClass {
                buf_bytes: 4 << 10,
                count: 512,
            },
            SizeClass {
                buf_bytes: 16 << 10,
                count: 512,
            },
            SizeClass {
                buf_bytes: 1 << 20,
                count: 16,
            },
        ],
        huge_pages: false,
    })
    .unwrap()
}

pub fn open(dir: &Path, pool_files: usize) -> ChunkStore {
    let mut config = StoreConfig::new(dir);
    config.pool_files = pool_files;
    config.pool_low_water = 1;
    ChunkStore::open(config, arena()).unwrap()
}

pub fn key(chunk: u64) -> ChunkKey {
    ChunkKey { copyset: 1, chunk }
}

/// A page whose bytes name `tag`, so any mix-up shows.
pub fn page(tag: u64) -> Vec<u8> {
    let mut p = vec![0u8; PAGE_BYTES];
    for (i, b) in p.iter_mut().enumerate() {
        *b = (tag as usize).wrapping_mul(131).wrapping_add(i * 7) as u8;
    }
    p[..8].copy_from_slice(&tag.to_le_bytes());
    p
}

/// The tag a page was written with, if it is one of ours.
pub fn tag_of(bytes: &[u8]) -> Option<u64> {
    let tag = u64::from_le_bytes(bytes[..8].try_into().unwrap());
    (bytes == &page(tag)[..]).then_some(tag)
}
