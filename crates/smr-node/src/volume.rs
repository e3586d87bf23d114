//! Writable volumes: a read-only base image (the lazy image of a recipe)
//! plus a local sparse COW file and a persistent map of the 4 KiB blocks
//! that live in it ([`map::CowMap`]).
//!
//! A volume directory holds `cow` (the image's size, sparse: a block that
//! was written lives at its own offset), `map` and `lock` (held, `flock`,
//! by the one process serving the volume). Reads of mapped blocks come
//! from the COW, the rest from the base; a write goes to the COW (a write
//! covering part of a block not yet mapped first copies the block from the
//! base), then sets the blocks' bits in memory.
//!
//! Crash consistency: the map on disk changes only at a flush, which takes
//! a copy of the map, makes the COW file's data durable (`fdatasync`), then
//! writes that copy by a rename. So after a kill or a power cut at any
//! point the map on disk only names blocks whose writes had completed
//! before a flush that made them durable, and every write completed before
//! a flush reads back. Writes after the last flush may be lost (NBD and
//! disks promise no more); the filesystem's journal copes, as on a disk.

pub mod map;

use crate::device::BlockDevice;
use map::{CowMap, BLOCK};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

#[cfg(test)]
mod tests;

/// Locks serializing writes that copy a partial block from the base.
const STRIPES: usize = 64;

/// Errors opening or creating a volume.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// A file of the volume could not be read or written.
    #[error("volume {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// Another process serves the volume.
    #[error("volume {0} is in use by another process (its lock is held)")]
    InUse(PathBuf),
    /// A file of the volume is damaged or does not fit the base image.
    #[error("volume {path}: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> VolumeError + '_ {
    move |source| VolumeError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The files of the volume in `dir`.
fn paths(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    (dir.join("cow"), dir.join("map"), dir.join("lock"))
}

/// Takes the lock of the volume in `dir` without waiting: held by the one
/// process that serves, commits or removes the volume (dropping the file
/// releases it). Another holder: [`VolumeError::InUse`].
pub fn lock_volume(dir: &Path) -> Result<File, VolumeError> {
    let (_, _, lock) = paths(dir);
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock)
        .map_err(io_err(&lock))?;
    rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive)
        .map_err(|_| VolumeError::InUse(dir.to_path_buf()))?;
    Ok(f)
}

/// A writable volume over `base`.
pub struct Volume {
    base: Arc<dyn BlockDevice>,
    cow: File,
    map: RwLock<CowMap>,
    /// The map changed since it was last written.
    map_dirty: AtomicBool,
    map_path: PathBuf,
    dir: PathBuf,
    size: u64,
    stripes: Vec<Mutex<()>>,
    flushing: Mutex<()>,
    _lock: File,
}

impl std::fmt::Debug for Volume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Volume")
            .field("dir", &self.dir)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Volume {
    /// Creates an empty volume of `size` bytes in `dir` (which must not
    /// hold one).
    pub fn create(dir: &Path, size: u64) -> Result<(), VolumeError> {
        crate::dirs::private_dir(dir).map_err(io_err(dir))?;
        let _lock = lock_volume(dir)?;
        let (cow, map, _) = paths(dir);
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&cow)
            .map_err(io_err(&cow))?;
        f.set_len(size).map_err(io_err(&cow))?;
        f.sync_all().map_err(io_err(&cow))?;
        CowMap::save(&CowMap::new(size.div_ceil(BLOCK)).encode(), &map).map_err(io_err(&map))
    }

    /// Opens the volume in `dir` over `base`, taking its lock. The volume
    /// is as large as its COW file, at least the base: blocks past the
    /// base's end read as zeros until written.
    pub fn open(dir: &Path, base: Arc<dyn BlockDevice>) -> Result<Volume, VolumeError> {
        let lock = lock_volume(dir)?;
        let (cow_path, map_path, _) = paths(dir);
        let cow = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&cow_path)
            .map_err(io_err(&cow_path))?;
        let size = cow.metadata().map_err(io_err(&cow_path))?.len();
        if size < base.size() {
            return Err(VolumeError::Corrupt {
                path: cow_path,
                reason: format!(
                    "the COW file is {size} bytes, less than the base image's {}",
                    base.size()
                ),
            });
        }
        let bytes = smr_format::read_bounded(&map_path, (size / BLOCK / 8) + 4096)
            .map_err(io_err(&map_path))?;
        let map = CowMap::decode(&bytes, size.div_ceil(BLOCK)).map_err(|reason| {
            VolumeError::Corrupt {
                path: map_path.clone(),
                reason,
            }
        })?;
        Ok(Volume {
            base,
            cow,
            map: RwLock::new(map),
            map_dirty: AtomicBool::new(false),
            map_path,
            dir: dir.to_path_buf(),
            size,
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            flushing: Mutex::new(()),
            _lock: lock,
        })
    }

    /// The volume's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A copy of the map (what lives in the COW now).
    pub fn map(&self) -> CowMap {
        self.map.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The base image.
    pub fn base(&self) -> &Arc<dyn BlockDevice> {
        &self.base
    }

    /// Reads `buf` at `offset` of the base; past its end, zeros.
    fn read_base(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let in_base = self
            .base
            .size()
            .saturating_sub(offset)
            .min(buf.len() as u64) as usize;
        let (head, tail) = buf.split_at_mut(in_base);
        if !head.is_empty() {
            self.base.read_at(offset, head)?;
        }
        tail.fill(0);
        Ok(())
    }

    fn mapped(&self, block: u64) -> bool {
        self.map
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(block)
    }

    fn set_mapped(&self, first: u64, count: u64) {
        self.map
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .set_range(first, count);
        self.map_dirty.store(true, Ordering::SeqCst);
    }

    /// Writes `data` into the part `within` of block `block` that is not
    /// mapped yet: the rest of the block comes from the base first.
    fn write_partial(&self, block: u64, within: usize, data: &[u8]) -> io::Result<()> {
        let _g = lock(&self.stripes[(block % STRIPES as u64) as usize]);
        let at = block * BLOCK;
        if self.mapped(block) {
            return self.cow.write_all_at(data, at + within as u64);
        }
        let len = BLOCK.min(self.size - at) as usize;
        let mut buf = vec![0u8; len];
        self.read_base(at, &mut buf)?;
        buf[within..within + data.len()].copy_from_slice(data);
        self.cow.write_all_at(&buf, at)?;
        self.set_mapped(block, 1);
        Ok(())
    }

    /// Punches out whole blocks `first..first + count` of the COW (they
    /// read as zeros) and maps them.
    fn zero_blocks(&self, first: u64, count: u64) -> io::Result<()> {
        if count == 0 {
            return Ok(());
        }
        let start = first * BLOCK;
        let len = (count * BLOCK).min(self.size - start);
        rustix::fs::fallocate(
            &self.cow,
            rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
            start,
            len,
        )?;
        self.set_mapped(first, count);
        Ok(())
    }

    /// `[offset, end)` cut at block boundaries: runs of whole blocks
    /// (`true`; the image's last block is whole up to the image's end) and
    /// pieces of one block (`false`).
    fn segments(&self, offset: u64, end: u64) -> Vec<(u64, u64, bool)> {
        let mut out: Vec<(u64, u64, bool)> = Vec::new();
        let mut at = offset;
        while at < end {
            let start = at / BLOCK * BLOCK;
            let block_end = (start + BLOCK).min(self.size);
            let whole = at == start && end >= block_end;
            let to = if whole { block_end } else { end.min(block_end) };
            match out.last_mut() {
                Some(last) if whole && last.2 && last.1 == at => last.1 = to,
                _ => out.push((at, to, whole)),
            }
            at = to;
        }
        out
    }

    /// Zeroes `[offset, offset + len)`: whole blocks are punched out of
    /// the COW, pieces of blocks written.
    pub fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        for (start, end, whole) in self.segments(offset, offset + len) {
            if whole {
                self.zero_blocks(start / BLOCK, (end - start).div_ceil(BLOCK))?;
            } else {
                let block = start / BLOCK;
                let zeros = vec![0u8; (end - start) as usize];
                self.write_partial(block, (start - block * BLOCK) as usize, &zeros)?;
            }
        }
        Ok(())
    }
}

impl BlockDevice for Volume {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            let block = at / BLOCK;
            let cow = self.mapped(block);
            // The run of blocks in the same place as this one.
            let mut end = ((block + 1) * BLOCK).min(offset + buf.len() as u64);
            while end < offset + buf.len() as u64 && self.mapped(end / BLOCK) == cow {
                end = ((end / BLOCK + 1) * BLOCK).min(offset + buf.len() as u64);
            }
            let part = &mut buf[done..(end - offset) as usize];
            if cow {
                self.cow.read_exact_at(part, at)?;
            } else {
                self.read_base(at, part)?;
            }
            done = (end - offset) as usize;
        }
        Ok(())
    }

    fn read_only(&self) -> bool {
        false
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        for (start, end, whole) in self.segments(offset, offset + data.len() as u64) {
            let piece = &data[(start - offset) as usize..(end - offset) as usize];
            let block = start / BLOCK;
            if whole {
                self.cow.write_all_at(piece, start)?;
                self.set_mapped(block, (end - start).div_ceil(BLOCK));
            } else {
                self.write_partial(block, (start - block * BLOCK) as usize, piece)?;
            }
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        let _one = lock(&self.flushing);
        // The map as it is now names only writes that completed; the data
        // of those is made durable before the map that names it is written.
        let dirty = self.map_dirty.swap(false, Ordering::SeqCst);
        let snapshot = dirty.then(|| self.map().encode());
        if let Err(e) = self.cow.sync_data() {
            self.map_dirty.fetch_or(dirty, Ordering::SeqCst);
            return Err(e);
        }
        if let Some(bytes) = snapshot {
            if let Err(e) = CowMap::save(&bytes, &self.map_path) {
                self.map_dirty.store(true, Ordering::SeqCst);
                tracing::error!(map = %self.map_path.display(), error = %e, "writing the volume map failed");
                return Err(e);
            }
        }
        Ok(())
    }

    fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        // Trimmed bytes may read as anything: zeros, cheaply.
        self.zero_range(offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.zero_range(offset, len)
    }
}
