//! The chunk file pool: files formatted ahead of time (every byte written, so a
//! chunk's first write is an overwrite and the filesystem allocates nothing on
//! the data path), handed out by rename and taken back by rename.
//!
//! Files in the pool are `<dir>/pool/<n>.chunk` with a Free metadata page. A
//! file being formatted is `<n>.tmp` until it is complete and synced; leftovers
//! of a crash are removed at open.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::StoreError;
use crate::format::{MetaPage, CRC_BYTES, FILE_BYTES, PAGE_BYTES};

/// Bytes written per call while formatting.
const FORMAT_WRITE_BYTES: usize = 1 << 20;

pub struct Pool {
    dir: PathBuf,
    free: Vec<PathBuf>,
    next_number: u64,
    /// Files this pool formatted or found (free or handed out), for messages.
    formatted: usize,
    low_water: usize,
    warned_low: bool,
}

impl Pool {
    /// Opens `<root>/pool`, removing half-formatted files.
    pub fn open(root: &Path, low_water: usize) -> Result<Pool, StoreError> {
        let dir = root.join("pool");
        fs::create_dir_all(&dir).map_err(|e| StoreError::io("create", &dir, &e))?;
        let mut free = Vec::new();
        let mut next_number = 0;
        for entry in fs::read_dir(&dir).map_err(|e| StoreError::io("list", &dir, &e))? {
            let entry = entry.map_err(|e| StoreError::io("list", &dir, &e))?;
            let path = entry.path();
            let number = path
                .file_stem()
                .and_then(|s| s.to_str())
                .and_then(|s| s.parse::<u64>().ok());
            match (path.extension().and_then(|e| e.to_str()), number) {
                (Some("chunk"), Some(n)) => {
                    let len = entry
                        .metadata()
                        .map_err(|e| StoreError::io("stat", &path, &e))?
                        .len();
                    if len != FILE_BYTES {
                        tracing::warn!(path = %path.display(), len, "pool file of the wrong size; removing");
                        fs::remove_file(&path).map_err(|e| StoreError::io("remove", &path, &e))?;
                        continue;
                    }
                    next_number = next_number.max(n + 1);
                    free.push(path);
                }
                (Some("tmp"), _) => {
                    tracing::info!(path = %path.display(), "removing a half-formatted pool file");
                    fs::remove_file(&path).map_err(|e| StoreError::io("remove", &path, &e))?;
                }
                _ => tracing::warn!(path = %path.display(), "unexpected file in the pool; ignored"),
            }
        }
        free.sort();
        let formatted = free.len();
        Ok(Pool {
            dir,
            free,
            next_number,
            formatted,
            low_water,
            warned_low: false,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Free formatted files.
    pub fn len(&self) -> usize {
        self.free.len()
    }

    pub fn is_empty(&self) -> bool {
        self.free.is_empty()
    }

    /// Formats files until `target` are free; `progress(done, total)` after each.
    pub fn fill(
        &mut self,
        target: usize,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<(), StoreError> {
        let total = target.saturating_sub(self.free.len());
        for done in 0..total {
            self.format_one()?;
            progress(done + 1, total);
        }
        self.warned_low = false;
        Ok(())
    }

    fn format_one(&mut self) -> Result<(), StoreError> {
        let file = self.reserve();
        file.format()?;
        self.add(file);
        Ok(())
    }

    /// Names the next file to format, for formatting away from the pool's
    /// owner ([`UnformattedFile::format`]) and handing it in with
    /// [`Pool::add`]: 16 MiB take tens of milliseconds to write, and the
    /// store must not be held meanwhile.
    pub fn reserve(&mut self) -> UnformattedFile {
        let number = self.next_number;
        self.next_number += 1;
        UnformattedFile {
            tmp: self.dir.join(format!("{number:08}.tmp")),
            done: self.dir.join(format!("{number:08}.chunk")),
        }
    }

    /// Takes in a file [`UnformattedFile::format`] finished.
    pub fn add(&mut self, file: UnformattedFile) {
        self.free.push(file.done);
        self.formatted += 1;
    }

    /// Takes a formatted file for a new chunk or snapshot.
    pub fn take(&mut self) -> Result<PathBuf, StoreError> {
        let path = self.free.pop().ok_or(StoreError::PoolExhausted {
            formatted: self.formatted,
        })?;
        if self.free.len() < self.low_water && !self.warned_low {
            self.warned_low = true;
            tracing::warn!(
                free = self.free.len(),
                low_water = self.low_water,
                "chunk file pool below its low-water mark"
            );
        }
        Ok(path)
    }

    /// Undoes a `take` whose rename never happened.
    pub fn untake(&mut self, path: PathBuf) {
        self.free.push(path);
    }

    /// Takes back a file whose metadata page already says Free: renamed into the pool.
    pub fn give_back(&mut self, path: &Path) -> Result<(), StoreError> {
        let number = self.next_number;
        self.next_number += 1;
        let target = self.dir.join(format!("{number:08}.chunk"));
        fs::rename(path, &target).map_err(|e| StoreError::io("rename", path, &e))?;
        sync_dir(&self.dir)?;
        if let Some(parent) = path.parent() {
            sync_dir(parent)?;
        }
        self.free.push(target);
        Ok(())
    }
}

/// A pool file named but not yet formatted (see [`Pool::reserve`]). A crash
/// while formatting leaves its `.tmp`, removed at open; one after the rename
/// leaves a formatted `.chunk`, which the next open finds.
pub struct UnformattedFile {
    tmp: PathBuf,
    done: PathBuf,
}

impl UnformattedFile {
    /// Writes, syncs and renames the file into place (needs no pool).
    pub fn format(&self) -> Result<(), StoreError> {
        if let Err(e) = write_formatted(&self.tmp) {
            // Leave nothing half-made behind; the error says why.
            let _ = fs::remove_file(&self.tmp);
            return Err(e);
        }
        fs::rename(&self.tmp, &self.done).map_err(|e| StoreError::io("rename", &self.tmp, &e))?;
        sync_dir(
            self.done
                .parent()
                .expect("a pool file is in the pool directory"),
        )
    }
}

/// Writes a whole formatted file: a Free metadata page, a zero checksum
/// table (all pages unwritten) and zero data, then syncs it.
fn write_formatted(path: &Path) -> Result<(), StoreError> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| StoreError::io("create", path, &e))?;
    let mut meta = vec![0u8; PAGE_BYTES];
    MetaPage::free(0).encode(&mut meta);
    file.write_all(&meta)
        .map_err(|e| StoreError::io("format", path, &e))?;
    let zeros = vec![0u8; FORMAT_WRITE_BYTES];
    let mut left = FILE_BYTES as usize - PAGE_BYTES;
    debug_assert!(left > CRC_BYTES);
    while left > 0 {
        let n = left.min(zeros.len());
        file.write_all(&zeros[..n])
            .map_err(|e| StoreError::io("format", path, &e))?;
        left -= n;
    }
    file.sync_all()
        .map_err(|e| StoreError::io("fsync", path, &e))?;
    crate::uring::drop_page_cache(&file, path);
    Ok(())
}

/// Makes a directory's entries (renames, creations) durable.
pub fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StoreError::io("fsync directory", dir, &e))
}
