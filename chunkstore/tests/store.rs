//! The chunk store on real files with real io_uring: semantics page by page.

mod common;

use common::{key, open, page, tag_of};
use quiver_chunkstore::format::{DATA_OFFSET, FILE_BYTES};
use quiver_chunkstore::{CloneSource, StoreError, CHUNK_BYTES, PAGE_BYTES};

const P: u64 = PAGE_BYTES as u64;

#[test]
fn written_pages_read_back_and_unwritten_pages_are_zero() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path(), 2);
    store.create(key(1), 1).unwrap();
    store.write(key(1), 1, 3 * P, &page(7), true).unwrap();
    let both = [page(8), page(9)].concat();
    store
        .write(key(1), 1, CHUNK_BYTES - 2 * P, &both, false)
        .unwrap();
    assert_eq!(
        &*store.read(key(1), 3 * P, PAGE_BYTES).unwrap(),
        &page(7)[..]
    );
    assert_eq!(
        &*store
            .read(key(1), CHUNK_BYTES - 2 * P, 2 * PAGE_BYTES)
            .unwrap(),
        &both[..]
    );
    let around = store.read(key(1), 2 * P, 3 * PAGE_BYTES).unwrap();
    assert!(around[..PAGE_BYTES].iter().all(|&b| b == 0));
    assert_eq!(&around[PAGE_BYTES..2 * PAGE_BYTES], &page(7)[..]);
    assert!(around[2 * PAGE_BYTES..].iter().all(|&b| b == 0));
    let stat = store.stat(key(1)).unwrap();
    assert_eq!(
        (stat.size, stat.sn, stat.pages_written),
        (CHUNK_BYTES, 1, 3)
    );
}

#[test]
fn bad_offsets_and_lengths_are_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path(), 1);
    store.create(key(1), 1).unwrap();
    let cases: [(u64, usize); 5] = [
        (1, 4096),
        (4096, 100),
        (0, 0),
        (CHUNK_BYTES, 4096),
        (CHUNK_BYTES - P, 8192),
    ];
    for (offset, len) in cases {
        let data = vec![0u8; len];
        let err = store.write(key(1), 1, offset, &data, false).unwrap_err();
        assert!(
            matches!(
                err,
                StoreError::Unaligned { .. } | StoreError::OutOfRange { .. }
            ),
            "{offset}+{len}: {err:?}"
        );
        if len > 0 {
            let err = store.read(key(1), offset, len).unwrap_err();
            assert!(matches!(
                err,
                StoreError::Unaligned { .. } | StoreError::OutOfRange { .. }
            ));
        }
    }
    let huge = store.read(key(1), u64::MAX - 4095, 4096).unwrap_err();
    assert!(matches!(huge, StoreError::OutOfRange { .. }));
    assert!(matches!(
        store.read(key(2), 0, 4096),
        Err(StoreError::NoSuchChunk(_))
    ));
    assert!(matches!(
        store.create(key(1), 1),
        Err(StoreError::ChunkExists(_))
    ));
    assert!(matches!(
        store.write(key(1), 0, 0, &page(1), false),
        Err(StoreError::StaleSequence { .. })
    ));
}

#[test]
fn the_pool_runs_out_cleanly_and_deleted_chunks_come_back_as_zeros() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path(), 2);
    store.create(key(1), 1).unwrap();
    store.create(key(2), 1).unwrap();
    assert!(matches!(
        store.create(key(3), 1),
        Err(StoreError::PoolExhausted { .. })
    ));
    store.write(key(1), 1, 0, &page(5), true).unwrap();
    store.delete(key(1)).unwrap();
    assert_eq!(store.pool_free(), 1);
    // The reused file still holds page(5) on disk, but reads as zeros.
    store.create(key(3), 1).unwrap();
    assert!(store
        .read(key(3), 0, PAGE_BYTES)
        .unwrap()
        .iter()
        .all(|&b| b == 0));
    assert!(matches!(
        store.read(key(1), 0, PAGE_BYTES),
        Err(StoreError::NoSuchChunk(_))
    ));
    // One file at a time (a background task's way), up to the pool's size.
    assert!(store.replenish_one().unwrap());
    assert_eq!(store.pool_free(), 1);
    store.replenish().unwrap();
    assert_eq!(store.pool_free(), 2);
    assert!(!store.replenish_one().unwrap());
}

/// A background task formats a pool file without holding the store: the
/// store works meanwhile, the file counts once handed in, and one formatted
/// but never handed in (a crash in between) is found at the next open.
#[test]
fn pool_files_are_formatted_away_from_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path(), 2);
    store.create(key(1), 1).unwrap();
    store.create(key(2), 1).unwrap();
    assert_eq!(store.pool_free(), 0);

    let file = store.pool_file_wanted().expect("the pool is short");
    let formatting = std::thread::spawn(move || {
        file.format().unwrap();
        file
    });
    store.write(key(1), 1, 0, &page(7), true).unwrap();
    let file = formatting.join().unwrap();
    assert_eq!(store.pool_free(), 0, "not counted until handed in");
    store.pool_file_formatted(file);
    assert_eq!(store.pool_free(), 1);
    assert_eq!(store.read(key(1), 0, PAGE_BYTES).unwrap()[..], page(7)[..]);

    // Formatted, never handed in: the next open finds it.
    let lost = store.pool_file_wanted().expect("still short");
    lost.format().unwrap();
    drop(store);
    let store = open(dir.path(), 2);
    assert_eq!(store.pool_free(), 2);
}

/// A write without sync leaves its checksum page for the chunk's next sync:
/// one IO per write, and after `sync_dirty` a reopened store reads every
/// such page back (the checksum pages reached the disk).
#[test]
fn checksums_of_writes_without_sync_reach_the_disk_at_the_next_sync() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path(), 1);
    store.create(key(1), 1).unwrap();
    // Pages under the first and the last checksum page of the table.
    let last = CHUNK_BYTES / PAGE_BYTES as u64 - 1;
    for (i, p) in [0, 1, 5, last].into_iter().enumerate() {
        store
            .write(
                key(1),
                1,
                p * PAGE_BYTES as u64,
                &page(10 + i as u64),
                false,
            )
            .unwrap();
    }
    assert_eq!(store.sync_dirty().unwrap(), 1);
    drop(store);
    let mut store = open(dir.path(), 1);
    for (i, p) in [0, 1, 5, last].into_iter().enumerate() {
        let read = store
            .read(key(1), p * PAGE_BYTES as u64, PAGE_BYTES)
            .unwrap();
        assert_eq!(read[..], page(10 + i as u64)[..], "page {p}");
    }
}

/// The sync in two halves: the store is free while the owed syncs run, a
/// write meanwhile stays dirty for the next sync, and a failed sync's
/// chunks are dirty again.
#[test]
fn a_sync_owed_outside_the_store_keeps_later_writes_dirty() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path(), 2);
    store.create(key(1), 1).unwrap();
    store.create(key(2), 1).unwrap();
    store.write(key(1), 1, 0, &page(1), false).unwrap();
    let owed = store.begin_sync().unwrap();
    // The store serves while the sync is owed.
    store.write(key(2), 1, 0, &page(2), false).unwrap();
    assert_eq!(owed.complete().unwrap(), 1);
    // Only the chunk written meanwhile is left.
    assert_eq!(store.sync_dirty().unwrap(), 1);
    assert_eq!(store.sync_dirty().unwrap(), 0);
    // A failed sync hands its chunks back.
    store.write(key(1), 1, 0, &page(3), false).unwrap();
    let owed = store.begin_sync().unwrap();
    store.still_dirty(owed.into_keys());
    assert_eq!(store.sync_dirty().unwrap(), 1);
    drop(store);
    let mut store = open(dir.path(), 2);
    assert_eq!(store.read(key(1), 0, PAGE_BYTES).unwrap()[..], page(3)[..]);
    assert_eq!(store.read(key(2), 0, PAGE_BYTES).unwrap()[..], page(2)[..]);
}

#[test]
fn a_flipped_byte_is_a_corrupt_page_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path(), 1);
    store.create(key(1), 1).unwrap();
    store
        .write(key(1), 1, 10 * P, &[page(1), page(2)].concat(), true)
        .unwrap();
    let path = dir.path().join("chunks/1/1.chunk");
    assert_eq!(std::fs::metadata(&path).unwrap().len(), FILE_BYTES);
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    use std::os::unix::fs::FileExt;
    file.write_all_at(&[0xee], DATA_OFFSET + 11 * P + 1000)
        .unwrap();
    file.sync_all().unwrap();
    drop(file);
    let err = store.read(key(1), 10 * P, 2 * PAGE_BYTES).unwrap_err();
    assert_eq!(
        err,
        StoreError::Corrupt {
            chunk: key(1),
            page: 11
        }
    );
    assert_eq!(
        &*store.read(key(1), 10 * P, PAGE_BYTES).unwrap(),
        &page(1)[..]
    );
    // After a restart too: the checksum table is on disk.
    drop(store);
    let mut store = open(dir.path(), 1);
    assert!(matches!(
        store.read(key(1), 11 * P, PAGE_BYTES),
        Err(StoreError::Corrupt { page: 11, .. })
    ));
}

#[test]
fn snapshots_preserve_the_old_epoch_page_by_page() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path(), 4);
    store.create(key(1), 1).unwrap();
    for p in 0..4 {
        store.write(key(1), 1, p * P, &page(10 + p), true).unwrap();
    }
    assert!(matches!(
        store.read_snapshot(key(1), 0, PAGE_BYTES),
        Err(StoreError::NoSnapshot(_))
    ));
    // Sequence 2 begins: page 1's old contents move to the snapshot first.
    store.write(key(1), 2, P, &page(21), true).unwrap();
    let stat = store.stat(key(1)).unwrap();
    assert_eq!((stat.sn, stat.snapshot_sn), (2, Some(1)));
    let snap = store.read_snapshot(key(1), 0, 4 * PAGE_BYTES).unwrap();
    let now = store.read(key(1), 0, 4 * PAGE_BYTES).unwrap();
    for p in 0..4 {
        let range = p * PAGE_BYTES..(p + 1) * PAGE_BYTES;
        assert_eq!(
            tag_of(&snap[range.clone()]),
            Some(10 + p as u64),
            "snapshot page {p}"
        );
        let expected = if p == 1 { 21 } else { 10 + p as u64 };
        assert_eq!(tag_of(&now[range]), Some(expected), "chunk page {p}");
    }
    // More sequence-2 writes: page 1 is copied once only; page 3 is copied now.
    store.write(key(1), 2, P, &page(22), true).unwrap();
    store.write(key(1), 2, 3 * P, &page(23), true).unwrap();
    let snap = store.read_snapshot(key(1), 0, 4 * PAGE_BYTES).unwrap();
    for p in 0..4 {
        assert_eq!(
            tag_of(&snap[p * PAGE_BYTES..(p + 1) * PAGE_BYTES]),
            Some(10 + p as u64)
        );
    }
    // A third epoch needs the snapshot gone first.
    let err = store.write(key(1), 3, 0, &page(30), true).unwrap_err();
    assert_eq!(
        err,
        StoreError::SnapshotExists {
            chunk: key(1),
            kept: 1,
            wanted: 3
        }
    );
    // It all survives a restart.
    drop(store);
    let mut store = open(dir.path(), 4);
    let snap = store.read_snapshot(key(1), P, PAGE_BYTES).unwrap();
    assert_eq!(tag_of(&snap), Some(11));
    assert_eq!(
        tag_of(&store.read(key(1), P, PAGE_BYTES).unwrap()),
        Some(22)
    );
    let free_before = store.pool_free();
    store.delete_snapshot(key(1)).unwrap();
    assert_eq!(store.pool_free(), free_before + 1);
    store.write(key(1), 3, 0, &page(30), true).unwrap();
    assert_eq!(store.stat(key(1)).unwrap().snapshot_sn, Some(2));
}

#[test]
fn clones_read_through_to_their_source_until_written() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path(), 6);
    store.create(key(1), 1).unwrap();
    for p in 0..4 {
        store.write(key(1), 1, p * P, &page(100 + p), true).unwrap();
    }
    store
        .create_clone(key(2), 1, CloneSource::Chunk(key(1)))
        .unwrap();
    assert_eq!(
        tag_of(&store.read(key(2), 2 * P, PAGE_BYTES).unwrap()),
        Some(102)
    );
    store.write(key(2), 1, 2 * P, &page(202), true).unwrap();
    // The clone's own page; the source untouched.
    assert_eq!(
        tag_of(&store.read(key(2), 2 * P, PAGE_BYTES).unwrap()),
        Some(202)
    );
    assert_eq!(
        tag_of(&store.read(key(1), 2 * P, PAGE_BYTES).unwrap()),
        Some(102)
    );
    // Unwritten clone pages follow the source's current contents.
    store
        .write(key(1), 1, 3 * P, &page(103 + 1000), true)
        .unwrap();
    let mixed = store.read(key(2), 0, 4 * PAGE_BYTES).unwrap();
    let tags: Vec<_> = (0..4)
        .map(|p| tag_of(&mixed[p * PAGE_BYTES..(p + 1) * PAGE_BYTES]))
        .collect();
    assert_eq!(tags, vec![Some(100), Some(101), Some(202), Some(1103)]);
    // A clone of a snapshot reads the snapshot.
    store.write(key(1), 2, 0, &page(999), true).unwrap();
    store
        .create_clone(key(3), 1, CloneSource::Snapshot(key(1)))
        .unwrap();
    assert_eq!(
        tag_of(&store.read(key(3), 0, PAGE_BYTES).unwrap()),
        Some(100)
    );
    assert_eq!(
        tag_of(&store.read(key(3), 3 * P, PAGE_BYTES).unwrap()),
        Some(1103)
    );
    assert!(matches!(
        store.create_clone(key(4), 1, CloneSource::Snapshot(key(2))),
        Err(StoreError::NoSnapshot(_))
    ));
    // Flattening copies the gaps; the clone then stands alone.
    store.flatten(key(3)).unwrap();
    assert_eq!(store.stat(key(3)).unwrap().clone_source, None);
    // Its source may go: the pages it read through are its own now.
    store.delete_snapshot(key(1)).unwrap();
    assert_eq!(
        tag_of(&store.read(key(3), 3 * P, PAGE_BYTES).unwrap()),
        Some(1103)
    );
    assert_eq!(
        tag_of(&store.read(key(3), 0, PAGE_BYTES).unwrap()),
        Some(100)
    );
    assert!(store
        .read(key(3), 100 * P, PAGE_BYTES)
        .unwrap()
        .iter()
        .all(|&b| b == 0));
    // The local-page bitmap survives a restart.
    drop(store);
    let mut store = open(dir.path(), 6);
    let stat = store.stat(key(2)).unwrap();
    assert_eq!(stat.clone_source, Some(CloneSource::Chunk(key(1))));
    assert_eq!(
        tag_of(&store.read(key(2), 2 * P, PAGE_BYTES).unwrap()),
        Some(202)
    );
    assert_eq!(
        tag_of(&store.read(key(2), P, PAGE_BYTES).unwrap()),
        Some(101)
    );
}

#[test]
fn overlapping_writes_to_one_chunk_keep_their_order() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path(), 3);
    store.create(key(1), 1).unwrap();
    store.create(key(2), 1).unwrap();
    let arena = store.arena().clone();
    for round in 0..64u64 {
        for chunk in [1, 2] {
            let mut b = arena.alloc(2 * PAGE_BYTES).unwrap();
            b.copy_from_slice(&[page(round * 10 + chunk), page(round * 10 + chunk + 5)].concat());
            // Alternate two overlapping ranges so each write overlaps the last.
            let offset = (round % 2) * P;
            store
                .submit_write(key(chunk), 1, offset, b.freeze(), false, round * 10 + chunk)
                .unwrap();
        }
    }
    let mut finished = Vec::new();
    while let Some(done) = store.poll(true).unwrap() {
        done.result.unwrap();
        finished.push(done.token);
    }
    assert_eq!(finished.len(), 128);
    // Last round (63) wrote pages 1..3 with tags 631/636 (chunk 1); page 0 is from round 62.
    let data = store.read(key(1), 0, 3 * PAGE_BYTES).unwrap();
    let tags: Vec<_> = (0..3)
        .map(|p| tag_of(&data[p * PAGE_BYTES..(p + 1) * PAGE_BYTES]))
        .collect();
    assert_eq!(tags, vec![Some(621), Some(631), Some(636)]);
    // Completions of one chunk arrive in submission order.
    let chunk1: Vec<_> = finished.iter().filter(|t| *t % 10 == 1).collect();
    assert!(chunk1.windows(2).all(|w| w[0] < w[1]));
}

/// More writes than the op table holds: submitting waits for a slot instead
/// of failing, and every write completes and reads back.
#[test]
fn a_full_op_table_makes_submitters_wait_not_fail() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = quiver_chunkstore::StoreConfig::new(dir.path());
    config.pool_files = 2;
    config.pool_low_water = 1;
    config.ops_max = 4;
    let mut store = quiver_chunkstore::ChunkStore::open(config, common::arena()).unwrap();
    store.create(key(1), 1).unwrap();
    let arena = store.arena().clone();
    // Writes sharing a checksum page queue behind each other: the table
    // fills with waiting operations.
    for i in 0..32u64 {
        let mut b = arena.alloc(PAGE_BYTES).unwrap();
        b.copy_from_slice(&page(i));
        store
            .submit_write(key(1), 1, i * P, b.freeze(), false, i)
            .unwrap();
    }
    let mut finished = 0;
    while let Some(done) = store.poll(true).unwrap() {
        done.result.unwrap();
        finished += 1;
    }
    assert_eq!(finished, 32);
    // A synchronous read with the table just drained still works.
    let data = store.read(key(1), 0, 32 * PAGE_BYTES).unwrap();
    for i in 0..32usize {
        assert_eq!(
            tag_of(&data[i * PAGE_BYTES..(i + 1) * PAGE_BYTES]),
            Some(i as u64)
        );
    }
}

#[test]
fn buffers_not_from_the_arena_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path(), 1);
    store.create(key(1), 1).unwrap();
    let other = common::arena();
    let mut b = other.alloc(PAGE_BYTES).unwrap();
    b.copy_from_slice(&page(1));
    let err = store
        .submit_write(key(1), 1, 0, b.freeze(), false, 1)
        .unwrap_err();
    assert_eq!(err, StoreError::Unregistered);
}

/// Pages of `path` in the page cache (mincore over a shared mapping).
fn cached_pages(path: &std::path::Path) -> usize {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(path).unwrap();
    let len = file.metadata().unwrap().len() as usize;
    // SAFETY: a read-only shared mapping of a file we keep open; only its
    // residency is asked, never its bytes.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    assert_ne!(addr, libc::MAP_FAILED, "mmap {}", path.display());
    let pages = len.div_ceil(PAGE_BYTES);
    let mut resident = vec![0u8; pages];
    // SAFETY: `resident` has one byte per page of the mapping.
    let rc = unsafe { libc::mincore(addr, len, resident.as_mut_ptr()) };
    assert_eq!(rc, 0, "mincore {}", path.display());
    // SAFETY: unmapping exactly what was mapped.
    unsafe { libc::munmap(addr, len) };
    resident.iter().filter(|&&b| b & 1 == 1).count()
}

#[test]
fn formatted_pool_files_leave_nothing_in_the_page_cache() {
    let dir = tempfile::tempdir().unwrap();
    // SAFETY: statfs into a zeroed struct, on a NUL-terminated path.
    let fs_type = unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        let path = std::ffi::CString::new(dir.path().as_os_str().as_encoded_bytes()).unwrap();
        assert_eq!(libc::statfs(path.as_ptr(), &mut st), 0);
        st.f_type
    };
    if fs_type == libc::TMPFS_MAGIC {
        eprintln!(
            "skipped: {} is tmpfs, where the page cache is the file",
            dir.path().display()
        );
        return;
    }
    let store = open(dir.path(), 2);
    drop(store);
    let mut files = 0;
    for entry in std::fs::read_dir(dir.path().join("pool")).unwrap() {
        let path = entry.unwrap().path();
        // Cached pages would make each O_DIRECT write's non-blocking attempt
        // fail and go to an io-wq thread.
        assert_eq!(cached_pages(&path), 0, "{} is cached", path.display());
        files += 1;
    }
    assert_eq!(files, 2);
}

/// Sync writes in flight together over many chunks: with the device flush
/// they share flushes (group commit); with it off each fdatasyncs its own
/// file. Either way every write completes once, in order per chunk, and
/// reads back.
#[test]
fn sync_writes_at_depth_complete_through_either_sync_method() {
    for device_flush in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let mut config = quiver_chunkstore::StoreConfig::new(dir.path());
        config.pool_files = 8;
        config.pool_low_water = 1;
        config.device_flush = device_flush;
        let mut store = quiver_chunkstore::ChunkStore::open(config, common::arena()).unwrap();
        let on_ext4_or_xfs = quiver_chunkstore::flush::DeviceFlush::for_dir(dir.path())
            .unwrap()
            .is_some();
        assert_eq!(
            store.sync_method().starts_with("device flush"),
            device_flush && on_ext4_or_xfs,
            "{}",
            store.sync_method()
        );
        for chunk in 1..=8 {
            store.create(key(chunk), 1).unwrap();
        }
        let arena = store.arena().clone();
        for i in 0..256u64 {
            let mut b = arena.alloc(PAGE_BYTES).unwrap();
            b.copy_from_slice(&page(i));
            let chunk = 1 + i % 8;
            store
                .submit_write(key(chunk), 1, (i / 8) * P, b.freeze(), true, i)
                .unwrap();
        }
        let mut finished = Vec::new();
        while let Some(done) = store.poll(true).unwrap() {
            done.result.unwrap();
            finished.push(done.token);
        }
        finished.sort_unstable();
        assert_eq!(finished, (0..256).collect::<Vec<_>>());
        for i in 0..256u64 {
            let data = store.read(key(1 + i % 8), (i / 8) * P, PAGE_BYTES).unwrap();
            assert_eq!(tag_of(&data), Some(i));
        }
    }
}
