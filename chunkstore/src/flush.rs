//! Durability by one device cache flush instead of a per-file fdatasync.
//!
//! Why: every write to a file updates its mtime, ctime and i_version once per
//! clock tick. With a file per chunk, nearly every write lands in a file whose
//! timestamps are stale, and on ext4 without a journal the next fdatasync of
//! that file then writes the inode-table block (a synchronous 4 KiB metadata
//! write) before the cache flush. Traced with `block_rq_issue` on this
//! machine's root (ext4, no journal): 1643 such writes in 2000 write+fdatasync
//! pairs spread over 64 files, 69 with one file; p50 154 against 123 us.
//! `lazytime` does not help: the i_version bump dirties the inode anyway.
//!
//! What makes a completed O_DIRECT overwrite durable is only the device's
//! cache flush: the file's block map is the one thing fdatasync must also
//! persist, and a pool file's never changes after formatting (written in
//! full, synced, then overwritten in place). On ext4 and XFS, fdatasync of a
//! file that is never written (the anchor) issues exactly that flush, and a
//! flush covers every write completed before it, in any file of the device.
//!
//! So a file is flushed through the anchor only where all of that holds,
//! checked when it is opened: the filesystem is ext4 or XFS, the anchor sits
//! on the same filesystem, the file is open with O_DIRECT, and FIEMAP maps its
//! whole length to written, unshared extents (no holes, no unwritten or
//! delayed extents, nothing reflinked that an overwrite would copy). Any
//! other file is fdatasynced itself. What a crash can lose this way is only
//! the chunk files' timestamps, which nothing reads.
//!
//! "O_DIRECT" means the filesystem honours it for that file: ext4 quietly
//! writes through the page cache for inodes with journalled data, so statx
//! must report a direct-IO alignment (STATX_DIOALIGN, Linux 6.1) as well.
//! Assumed, not checked again after open: nothing outside the store shares
//! (reflink, dedupe) or moves (defragmenters) a checked file's blocks, and
//! XFS data is not on a realtime subvolume.
//!
//! The anchor must not share its inode-table block with a file we write:
//! ext4 without a journal writes an fsynced inode's block when it is dirty,
//! and a neighbour's timestamp update dirties it (traced: one 4 KiB write
//! per clock tick through an anchor created next to the log's segments).
//! So the anchor is picked from a run of empty files made together in
//! `flush/anchors/`: one whose whole aligned block of inode numbers is that
//! run's. `flush/` is marked a top directory (FS_TOPDIR_FL), so ext4 puts
//! `anchors/` in a block group of its own choosing, away from the churned
//! one the store's files live in and from other stores on the same disk
//! doing the same at the same moment (three chunkservers starting together
//! interleaved their candidates so that none found a whole block).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::error::StoreError;
use crate::pool::sync_dir;

/// The directory of anchor candidates in a store or log directory.
pub const ANCHOR_DIR: &str = "flush";
/// Empty files made there at a time: enough to hold a whole aligned block of
/// inode numbers at up to [`INODES_PER_BLOCK_MAX`] inodes per block, when
/// the filesystem hands out fresh numbers in a row.
const ANCHOR_BATCH: usize = 2 * INODES_PER_BLOCK_MAX as usize;
/// Candidates at most: freed inode numbers are handed out first, scattered,
/// so a batch may not hold a whole block; the next ones usually do.
const ANCHOR_CANDIDATES_MAX: usize = 8 * ANCHOR_BATCH;
/// ext4 with 4 KiB blocks and 128-byte inodes (the default is 256: 16).
const INODES_PER_BLOCK_MAX: u64 = 32;

const EXT4_SUPER_MAGIC: i64 = 0xEF53;
const XFS_SUPER_MAGIC: i64 = 0x5846_5342;

/// Flushes a filesystem's device cache by fdatasyncing a never-written file.
#[derive(Debug)]
pub struct DeviceFlush {
    anchor: File,
    path: PathBuf,
    dev: u64,
    filesystem: &'static str,
}

impl DeviceFlush {
    /// The device flush for the filesystem holding `dir`, creating the anchor
    /// there; `None` on a filesystem where fdatasync of a clean file is not
    /// known to flush the device (everything but ext4 and XFS).
    pub fn for_dir(dir: &Path) -> Result<Option<DeviceFlush>, StoreError> {
        let Some(filesystem) = filesystem_name(dir)? else {
            return Ok(None);
        };
        // Without an anchor every file is fdatasynced itself: slower, not wrong.
        let picked = pick_anchor(&dir.join(ANCHOR_DIR)).and_then(|path| {
            File::open(&path)
                .map(|anchor| (path.clone(), anchor))
                .map_err(|e| StoreError::io("open", &path, &e))
        });
        let (path, anchor) = match picked {
            Ok(picked) => picked,
            Err(e) => {
                tracing::warn!(error = %e, "no flush anchor; fdatasync per file instead");
                return Ok(None);
            }
        };
        let dev = anchor
            .metadata()
            .map_err(|e| StoreError::io("stat", &path, &e))?
            .dev();
        Ok(Some(DeviceFlush {
            anchor,
            path,
            dev,
            filesystem,
        }))
    }

    /// The never-written file whose fdatasync is the flush (for a ring slot).
    pub fn anchor(&self) -> &File {
        &self.anchor
    }

    /// The anchor file.
    pub fn anchor_path(&self) -> &Path {
        &self.path
    }

    /// ext4 or xfs.
    pub fn filesystem(&self) -> &'static str {
        self.filesystem
    }

    /// Flushes the device cache: every write completed before it is durable.
    /// The same flush through a duplicate of the anchor's descriptor, for
    /// use without the store.
    pub fn try_clone(&self) -> Result<DeviceFlush, StoreError> {
        Ok(DeviceFlush {
            anchor: self
                .anchor
                .try_clone()
                .map_err(|e| StoreError::io("dup", &self.path, &e))?,
            path: self.path.clone(),
            dev: self.dev,
            filesystem: self.filesystem,
        })
    }

    pub fn flush(&self) -> Result<(), StoreError> {
        self.anchor
            .sync_data()
            .map_err(|e| StoreError::io("flush through", &self.path, &e))
    }

    /// Whether a completed write to `file` (of `len` bytes) is made durable by
    /// [`DeviceFlush::flush`] alone: same filesystem, O_DIRECT, and a block
    /// map that an overwrite leaves unchanged. Any failure to tell is "no".
    pub fn covers(&self, file: &File, len: u64) -> bool {
        let same_device = file.metadata().is_ok_and(|m| m.dev() == self.dev);
        same_device
            && is_direct(file)
            && direct_io_honoured(file)
            && fully_written(file, len).unwrap_or(false)
    }
}

/// Makes anchor candidates in `flush_dir`, a batch at a time (those there
/// already count), and returns the first whose aligned block of inode
/// numbers holds only candidates; the first candidate, with a warning, if
/// none does (still correct, only slower). Reopening picks the same one.
fn pick_anchor(flush_dir: &Path) -> Result<PathBuf, StoreError> {
    use std::collections::HashSet;
    std::fs::create_dir_all(flush_dir).map_err(|e| StoreError::io("create", flush_dir, &e))?;
    spread_subdirectories(flush_dir);
    let flush_dir = &flush_dir.join("anchors");
    std::fs::create_dir_all(flush_dir).map_err(|e| StoreError::io("create", flush_dir, &e))?;
    let mut paths = Vec::new();
    let mut inodes = Vec::new();
    let mut created = false;
    while paths.len() < ANCHOR_CANDIDATES_MAX {
        for i in paths.len()..paths.len() + ANCHOR_BATCH {
            let path = flush_dir.join(format!("{i:03}"));
            created |= !path.exists();
            let file = File::options()
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(|e| StoreError::io("create", &path, &e))?;
            let meta = file
                .metadata()
                .map_err(|e| StoreError::io("stat", &path, &e))?;
            paths.push(path);
            inodes.push(meta.ino());
        }
        let ours: HashSet<u64> = inodes.iter().copied().collect();
        let isolated = |ino: u64| {
            // Inode numbers start at 1; a block holds an aligned run of them.
            let first = ino.saturating_sub(1) / INODES_PER_BLOCK_MAX * INODES_PER_BLOCK_MAX + 1;
            (first..first + INODES_PER_BLOCK_MAX).all(|i| ours.contains(&i))
        };
        if let Some(i) = inodes.iter().position(|&ino| isolated(ino)) {
            if created {
                sync_dir(flush_dir)?;
            }
            return Ok(paths[i].clone());
        }
    }
    if created {
        sync_dir(flush_dir)?;
    }
    tracing::warn!(dir = %flush_dir.display(), "no flush anchor has an inode block of its own; a device flush may also write inodes");
    Ok(paths[0].clone())
}

/// Asks ext4 to place `dir`'s subdirectories as it places top-level ones
/// (spread over block groups). Advice: failure is logged only.
fn spread_subdirectories(dir: &Path) {
    const FS_IOC_GETFLAGS: libc::c_ulong = 0x8008_6601;
    const FS_IOC_SETFLAGS: libc::c_ulong = 0x4008_6602;
    const FS_TOPDIR_FL: libc::c_int = 0x0002_0000;
    let Ok(handle) = File::open(dir) else {
        return;
    };
    let fd = handle.as_raw_fd();
    let mut flags: libc::c_int = 0;
    // SAFETY: the flag ioctls read or write one int we own.
    let ok = unsafe {
        libc::ioctl(fd, FS_IOC_GETFLAGS, &mut flags) == 0 && {
            flags |= FS_TOPDIR_FL;
            libc::ioctl(fd, FS_IOC_SETFLAGS, &flags) == 0
        }
    };
    if !ok {
        let e = std::io::Error::last_os_error();
        tracing::debug!(dir = %dir.display(), error = %e, "could not mark a top directory");
    }
}

/// "ext4" or "xfs" for the filesystem holding `dir`, else `None`.
fn filesystem_name(dir: &Path) -> Result<Option<&'static str>, StoreError> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| StoreError::io("statfs", dir, &std::io::ErrorKind::InvalidInput.into()))?;
    // SAFETY: statfs fills the zeroed struct we own from a NUL-terminated path.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c_path.as_ptr(), &mut stat) } != 0 {
        return Err(StoreError::io(
            "statfs",
            dir,
            &std::io::Error::last_os_error(),
        ));
    }
    #[allow(clippy::unnecessary_cast)] // f_type's width differs by architecture
    Ok(match stat.f_type as i64 {
        EXT4_SUPER_MAGIC => Some("ext4"),
        XFS_SUPER_MAGIC => Some("xfs"),
        _ => None,
    })
}

fn is_direct(file: &File) -> bool {
    // SAFETY: F_GETFL on a descriptor we borrow.
    let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    flags >= 0 && flags & libc::O_DIRECT != 0
}

/// Whether the filesystem does direct IO on `file` at all (statx reports an
/// alignment for it; ext4 reports 0 for inodes whose data it journals).
fn direct_io_honoured(file: &File) -> bool {
    // SAFETY: statx fills the zeroed struct we own; the empty path with
    // AT_EMPTY_PATH names the descriptor itself.
    let mut stat: libc::statx = unsafe { std::mem::zeroed() };
    let rc = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stat,
        )
    };
    rc == 0 && stat.stx_mask & libc::STATX_DIOALIGN != 0 && stat.stx_dio_offset_align != 0
}

// FS_IOC_FIEMAP and its structures, from linux/fiemap.h.
const FS_IOC_FIEMAP: libc::c_ulong = 0xC020_660B;
const FIEMAP_FLAG_SYNC: u32 = 0x1;
const FIEMAP_EXTENT_LAST: u32 = 0x1;
/// Extents an overwrite in place might change the metadata of, or that are
/// not plain blocks: unknown, delalloc, encoded, encrypted, not aligned,
/// inline, tail-packed, unwritten, shared.
const FIEMAP_EXTENT_NOT_PLAIN: u32 =
    0x2 | 0x4 | 0x8 | 0x80 | 0x100 | 0x200 | 0x400 | 0x800 | 0x2000;
const EXTENTS_PER_CALL: usize = 32;

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct FiemapExtent {
    logical: u64,
    physical: u64,
    length: u64,
    reserved64: [u64; 2],
    flags: u32,
    reserved: [u32; 3],
}

#[repr(C)]
struct Fiemap {
    start: u64,
    length: u64,
    flags: u32,
    mapped_extents: u32,
    extent_count: u32,
    reserved: u32,
    extents: [FiemapExtent; EXTENTS_PER_CALL],
}

/// Whether `[0, len)` of `file` is mapped without holes to plain written
/// extents.
fn fully_written(file: &File, len: u64) -> std::io::Result<bool> {
    let mut next = 0u64;
    while next < len {
        let mut map = Fiemap {
            start: next,
            length: len - next,
            flags: FIEMAP_FLAG_SYNC,
            mapped_extents: 0,
            extent_count: EXTENTS_PER_CALL as u32,
            reserved: 0,
            extents: [FiemapExtent::default(); EXTENTS_PER_CALL],
        };
        // SAFETY: FS_IOC_FIEMAP reads the header and fills at most
        // `extent_count` extents of the struct we own.
        if unsafe { libc::ioctl(file.as_raw_fd(), FS_IOC_FIEMAP, &mut map) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mapped = (map.mapped_extents as usize).min(EXTENTS_PER_CALL);
        if mapped == 0 {
            return Ok(false); // a hole up to the end
        }
        let before = next;
        for extent in &map.extents[..mapped] {
            if extent.logical > next || extent.flags & FIEMAP_EXTENT_NOT_PLAIN != 0 {
                return Ok(false);
            }
            let Some(end) = extent.logical.checked_add(extent.length) else {
                return Ok(false);
            };
            next = next.max(end);
            if extent.flags & FIEMAP_EXTENT_LAST != 0 && next < len {
                return Ok(false);
            }
        }
        if next == before {
            return Ok(false); // no progress: a map we do not understand
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::OpenOptionsExt;

    const LEN: u64 = 1 << 20;

    fn open(path: &Path, direct: bool) -> File {
        File::options()
            .read(true)
            .write(true)
            .custom_flags(if direct { libc::O_DIRECT } else { 0 })
            .open(path)
            .unwrap()
    }

    #[test]
    fn only_fully_written_direct_files_are_covered() {
        let dir = tempfile::tempdir().unwrap();
        let Some(flush) = DeviceFlush::for_dir(dir.path()).unwrap() else {
            eprintln!("skipped: the temporary directory is on neither ext4 nor xfs");
            return;
        };
        let written = dir.path().join("written");
        std::fs::write(&written, vec![1u8; LEN as usize]).unwrap();
        File::open(&written).unwrap().sync_all().unwrap();
        assert!(flush.covers(&open(&written, true), LEN));
        assert!(!flush.covers(&open(&written, false), LEN), "no O_DIRECT");
        assert!(!flush.covers(&open(&written, true), 2 * LEN), "shorter");

        let sparse = dir.path().join("sparse");
        File::create(&sparse).unwrap().set_len(LEN).unwrap();
        assert!(!flush.covers(&open(&sparse, true), LEN), "a hole");

        let holed = dir.path().join("holed");
        let file = File::create(&holed).unwrap();
        use std::os::unix::fs::FileExt;
        file.write_all_at(&[1u8; 4096], 0).unwrap();
        file.write_all_at(&[1u8; 4096], LEN - 4096).unwrap();
        file.sync_all().unwrap();
        assert!(!flush.covers(&open(&holed, true), LEN), "a hole inside");

        let allocated = dir.path().join("allocated");
        let file = File::create(&allocated).unwrap();
        // SAFETY: fallocate on a descriptor we own.
        let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, LEN as libc::off_t) };
        assert_eq!(rc, 0);
        assert!(
            !flush.covers(&open(&allocated, true), LEN),
            "unwritten extents"
        );

        flush.flush().unwrap();
        assert_eq!(std::fs::metadata(flush.anchor_path()).unwrap().len(), 0);
        // Opening again picks the same anchor from the same candidates.
        let again = DeviceFlush::for_dir(dir.path()).unwrap().unwrap();
        assert_eq!(again.anchor_path(), flush.anchor_path());
    }
}
