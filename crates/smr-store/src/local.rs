//! A chunk store in a local directory: `ROOT/chunks/<2 hex>/<64 hex>`.
//! Ranged reads are `pread`s of an object's file.
//!
//! A chunk is written under a unique temp name in its directory and renamed
//! into place only once its bytes are durable, so a file under a chunk's
//! name is always the whole chunk. An existing chunk is never rewritten, so
//! concurrent writers of the same chunk are harmless (both write identical
//! bytes; the last rename wins). Two ways of getting there:
//!
//! - **Immediate** ([`LocalStore::open`]): each `put` writes, `fsync`s,
//!   renames and `fsync`s the directory, and returns once the chunk is
//!   durable. Two journal commits per chunk; with many puts in flight the
//!   filesystem folds their `fsync`s into shared commits, but at 64 KiB
//!   chunks (4,000 per image) it still made `smr convert` about as slow as
//!   `mkfs.ext4 -d` (docs/BENCHMARKS.md, "Convert throughput").
//! - **Batched** ([`LocalStore::open_batched`], what `smr convert` uses): a
//!   `put` only writes its temp file and starts its writeback
//!   (`sync_file_range`, no waiting); [`LocalStore::commit`] then makes the
//!   whole batch durable with one `syncfs` (which finds most of it written
//!   already), renames every temp file into place and `fsync`s the
//!   directories (0.05-0.2 s measured for a 4,000-chunk image). The
//!   chunks of a batch are readable (`get`, `exists`) by this store before
//!   the commit, by others after.
//!   The caller commits before anything refers to the chunks (the recipe is
//!   written after the commit).
//!
//! # What a crash leaves
//! Temp files (`.tmp-*`, never read as chunks; safe to delete while no
//! writer runs: `smr verify` reports them, and `smr convert` removes those
//! older than [`STALE_TEMP_AGE`]), and whole chunks: data is always synced before the rename.
//! A rename whose directory `fsync` had not completed may be lost; the
//! chunk is then missing and the next `put` writes it again (no recipe
//! refers to it yet). Never a chunk file with partial contents, so a `put`
//! can trust an existing file without reading it back. A chunk file of the
//! wrong length (only damage from outside could make one) is replaced by
//! the next `put` of that chunk instead of being taken as present.

use crate::{ByteRange, ChunkStore, ObjectName, PutOutcome, Result, StoreError, Target};
use smr_format::ChunkId;
use std::collections::{BTreeSet, HashMap};
use std::fs::{self, File};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::FileExt;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime};

/// A directory-backed chunk store (see the module docs for its two modes).
#[derive(Debug)]
pub struct LocalStore {
    root: PathBuf,
    tmp_counter: AtomicU64,
    /// Batched mode: chunks written to temp files, not yet committed.
    batch: Option<Mutex<HashMap<ChunkId, PathBuf>>>,
}

/// Name prefix of the store's temp files.
pub const TEMP_PREFIX: &str = ".tmp-";

/// Age after which a temp file is taken as left by an interrupted writer:
/// far longer than any write takes (a batched convert holds its temp files
/// until its commit, minutes for the largest images).
pub const STALE_TEMP_AGE: Duration = Duration::from_secs(24 * 3600);

impl LocalStore {
    /// Opens (creating if needed) the store at `root`.
    pub fn open(root: impl AsRef<Path>) -> Result<Self> {
        let root = root.as_ref().to_path_buf();
        fs::create_dir_all(root.join("chunks")).map_err(|source| StoreError::Io {
            store: root.display().to_string(),
            source,
        })?;
        Ok(LocalStore {
            root,
            tmp_counter: AtomicU64::new(0),
            batch: None,
        })
    }

    /// Opens the store at `root` in batched mode: puts are made durable and
    /// visible to others only by [`LocalStore::commit`]. Dropping the store
    /// without committing removes the batch's temp files.
    pub fn open_batched(root: impl AsRef<Path>) -> Result<Self> {
        let mut s = Self::open(root)?;
        s.batch = Some(Mutex::new(HashMap::new()));
        Ok(s)
    }

    /// Makes every chunk put so far durable and visible under its name:
    /// `syncfs` (one writeback and journal commit for the whole batch),
    /// rename each temp file into place, `fsync` each directory renamed
    /// into. A no-op in immediate mode. On error the chunks not yet renamed
    /// stay in the batch (a later commit retries them).
    pub fn commit(&self) -> Result<()> {
        let Some(batch) = &self.batch else {
            return Ok(());
        };
        let mut batch = batch.lock().unwrap_or_else(PoisonError::into_inner);
        if batch.is_empty() {
            return Ok(());
        }
        let io = |source| StoreError::Io {
            store: self.describe(),
            source,
        };
        syncfs(&self.root).map_err(io)?;
        let mut dirs = BTreeSet::new();
        let pending: Vec<(ChunkId, PathBuf)> = batch.iter().map(|(k, v)| (*k, v.clone())).collect();
        for (id, tmp) in pending {
            let path = self.chunk_path(&id);
            fs::rename(&tmp, &path).map_err(|e| self.chunk_err(&id, e))?;
            batch.remove(&id);
            if let Some(dir) = path.parent() {
                dirs.insert(dir.to_path_buf());
            }
        }
        for dir in dirs {
            File::open(&dir).and_then(|d| d.sync_all()).map_err(io)?;
        }
        Ok(())
    }

    /// Temp files (`.tmp-*`) under the store last modified at least `age`
    /// ago: what interrupted writers left (a live writer's temp files are
    /// seconds old). Each with its age.
    pub fn stale_temps(&self, age: Duration) -> Result<Vec<(PathBuf, Duration)>> {
        let io = |source| StoreError::Io {
            store: self.describe(),
            source,
        };
        let now = SystemTime::now();
        let mut out = Vec::new();
        for dir in fs::read_dir(self.root.join("chunks")).map_err(io)? {
            let dir = dir.map_err(io)?;
            if !dir.file_type().map_err(io)?.is_dir() {
                continue;
            }
            for e in fs::read_dir(dir.path()).map_err(io)? {
                let e = e.map_err(io)?;
                if !e
                    .file_name()
                    .as_encoded_bytes()
                    .starts_with(TEMP_PREFIX.as_bytes())
                {
                    continue;
                }
                // Gone meanwhile (its writer committed or cleaned up): skip.
                let Ok(modified) = e.metadata().and_then(|m| m.modified()) else {
                    continue;
                };
                let old = now.duration_since(modified).unwrap_or_default();
                if old >= age {
                    out.push((e.path(), old));
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// Removes the temp files [`stale_temps`](Self::stale_temps) finds
    /// older than `age`; returns how many.
    pub fn remove_stale_temps(&self, age: Duration) -> Result<usize> {
        let stale = self.stale_temps(age)?;
        let mut n = 0;
        for (path, _) in stale {
            match fs::remove_file(&path) {
                Ok(()) => n += 1,
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(StoreError::Io {
                        store: format!("{}: removing {}", self.describe(), path.display()),
                        source,
                    })
                }
            }
        }
        Ok(n)
    }

    /// The temp file of chunk `id` if it is in the uncommitted batch.
    fn batched(&self, id: &ChunkId) -> Option<PathBuf> {
        let batch = self.batch.as_ref()?;
        batch
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(id)
            .cloned()
    }

    /// Path of chunk `id` in this store.
    pub fn chunk_path(&self, id: &ChunkId) -> PathBuf {
        let hex = id.to_hex();
        self.root.join("chunks").join(&hex[..2]).join(hex)
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn chunk_err(&self, id: &ChunkId, source: std::io::Error) -> StoreError {
        StoreError::ChunkIo {
            what: Target::Chunk(*id),
            store: self.describe(),
            source,
        }
    }

    /// The file of `object`: a chunk of the uncommitted batch, or a path
    /// under the root. Names that could leave the root are refused.
    fn object_path(&self, object: &ObjectName) -> Result<PathBuf> {
        if let Some(path) = object.chunk().and_then(|id| self.batched(&id)) {
            return Ok(path);
        }
        let rel = Path::new(object.as_str());
        if !rel.components().all(|c| matches!(c, Component::Normal(_))) {
            return Err(StoreError::ChunkIo {
                what: Target::of(object, ByteRange::WHOLE),
                store: self.describe(),
                source: std::io::Error::new(
                    ErrorKind::InvalidInput,
                    "object name is not a plain relative path",
                ),
            });
        }
        Ok(self.root.join(rel))
    }

    /// Reads `range` of the open `file` (`object`'s).
    fn read_range(&self, file: &File, object: &ObjectName, range: ByteRange) -> Result<Vec<u8>> {
        let err = |source| StoreError::ChunkIo {
            what: Target::of(object, range),
            store: self.describe(),
            source,
        };
        let len = match range.len {
            Some(len) => len,
            None => file
                .metadata()
                .map_err(err)?
                .len()
                .saturating_sub(range.offset),
        };
        let mut buf =
            vec![0; usize::try_from(len).map_err(|_| err(ErrorKind::OutOfMemory.into()))?];
        file.read_exact_at(&mut buf, range.offset).map_err(|e| {
            err(match e.kind() {
                ErrorKind::UnexpectedEof => std::io::Error::new(
                    ErrorKind::UnexpectedEof,
                    "the range ends past the end of the object",
                ),
                _ => e,
            })
        })?;
        Ok(buf)
    }
}

impl ChunkStore for LocalStore {
    fn describe(&self) -> String {
        self.root.display().to_string()
    }

    fn read_ranges(&self, object: &ObjectName, ranges: &[ByteRange]) -> Result<Vec<Vec<u8>>> {
        let path = self.object_path(object)?;
        let file = File::open(&path).map_err(|e| match e.kind() {
            ErrorKind::NotFound => StoreError::Missing {
                what: Target::of(object, ByteRange::WHOLE),
                store: self.describe(),
            },
            _ => StoreError::ChunkIo {
                what: Target::of(object, ByteRange::WHOLE),
                store: self.describe(),
                source: e,
            },
        })?;
        ranges
            .iter()
            .map(|&r| self.read_range(&file, object, r))
            .collect()
    }

    fn exists(&self, id: &ChunkId) -> Result<bool> {
        if self.batched(id).is_some() {
            return Ok(true);
        }
        match fs::symlink_metadata(self.chunk_path(id)) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
            Err(e) => Err(self.chunk_err(id, e)),
        }
    }

    fn put(&self, id: &ChunkId, data: &[u8]) -> Result<PutOutcome> {
        if self.batched(id).is_some() {
            return Ok(PutOutcome::Existed);
        }
        let path = self.chunk_path(id);
        match fs::symlink_metadata(&path) {
            // Present: refreshed, so that a garbage collection running now
            // keeps it (crate::gc); gone meanwhile: written below.
            Ok(m) if m.is_file() && m.len() == data.len() as u64 && crate::gc::refresh(&path) => {
                return Ok(PutOutcome::Existed)
            }
            // Damaged (wrong length) or not a file: replaced by the rename.
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(self.chunk_err(id, e)),
        }
        let dir = path.parent().expect("chunk path has a parent");
        fs::create_dir_all(dir).map_err(|e| self.chunk_err(id, e))?;
        let tmp = dir.join(format!(
            "{TEMP_PREFIX}{}-{}-{}",
            &id.to_hex()[..16],
            std::process::id(),
            self.tmp_counter.fetch_add(1, Ordering::Relaxed)
        ));
        let write = || -> std::io::Result<()> {
            let mut f = File::create(&tmp)?;
            f.write_all(data)?;
            if self.batch.is_some() {
                // Synced and renamed by `commit`; start writing it back now
                // so that the commit finds little left to write.
                start_writeback(&f);
                return Ok(());
            }
            f.sync_all()?;
            fs::rename(&tmp, &path)?;
            File::open(dir)?.sync_all()
        };
        if let Err(e) = write() {
            let _ = fs::remove_file(&tmp);
            return Err(self.chunk_err(id, e));
        }
        if let Some(batch) = &self.batch {
            let mut batch = batch.lock().unwrap_or_else(PoisonError::into_inner);
            if batch.contains_key(id) {
                // Another thread put the same chunk meanwhile.
                drop(batch);
                let _ = fs::remove_file(&tmp);
                return Ok(PutOutcome::Existed);
            }
            batch.insert(*id, tmp);
        }
        Ok(PutOutcome::Written)
    }
}

impl Drop for LocalStore {
    fn drop(&mut self) {
        // An uncommitted batch (a failed conversion): its temp files are
        // garbage; remove them rather than leave them behind.
        if let Some(batch) = &self.batch {
            let batch = batch.lock().unwrap_or_else(PoisonError::into_inner);
            for tmp in batch.values() {
                let _ = fs::remove_file(tmp);
            }
        }
    }
}

/// Starts the writeback of `file`'s dirty pages without waiting for it
/// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`): a hint, errors ignored.
// FFI calls on a descriptor we own; see the SAFETY notes.
#[allow(unsafe_code)]
fn start_writeback(file: &File) {
    use std::os::fd::AsRawFd;
    // SAFETY: `file` is open for the duration of the call, so its
    // descriptor is valid; sync_file_range reads no memory of ours.
    let _ = unsafe { libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
}

/// `syncfs(2)` on the filesystem holding `path`: writes back and commits
/// everything dirty on it (the batch's temp files among it) in one go.
#[allow(unsafe_code)]
fn syncfs(path: &Path) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let dir = File::open(path)?;
    // SAFETY: `dir` is an open file for the duration of the call, so its
    // descriptor is valid; syncfs reads no memory of ours.
    let r = unsafe { libc::syncfs(dir.as_raw_fd()) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_get_exists_and_no_rewrite() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStore::open(dir.path()).unwrap();
        let data = b"hello chunk".to_vec();
        let id = ChunkId::of(&data);
        assert!(!s.exists(&id).unwrap());
        assert!(matches!(s.get(&id), Err(StoreError::Missing { .. })));
        assert_eq!(s.put(&id, &data).unwrap(), PutOutcome::Written);
        assert_eq!(s.put(&id, &data).unwrap(), PutOutcome::Existed);
        assert_eq!(s.get(&id).unwrap(), data);
        let hex = id.to_hex();
        assert!(dir
            .path()
            .join("chunks")
            .join(&hex[..2])
            .join(&hex)
            .is_file());
        // No temp files left behind.
        let names: Vec<_> = fs::read_dir(dir.path().join("chunks").join(&hex[..2]))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1);
    }

    /// Batched puts are readable by the store at once, land under their
    /// names only at the commit, and an uncommitted batch leaves nothing.
    #[test]
    fn batched_puts_become_chunks_at_commit() {
        let dir = tempfile::tempdir().unwrap();
        let chunks: Vec<Vec<u8>> = (0..20u8).map(|i| vec![i; 3000 + usize::from(i)]).collect();
        let ids: Vec<ChunkId> = chunks.iter().map(|c| ChunkId::of(c)).collect();
        let s = LocalStore::open_batched(dir.path()).unwrap();
        for (id, c) in ids.iter().zip(&chunks) {
            assert_eq!(s.put(id, c).unwrap(), PutOutcome::Written);
        }
        assert_eq!(s.put(&ids[3], &chunks[3]).unwrap(), PutOutcome::Existed);
        assert!(s.exists(&ids[3]).unwrap());
        assert_eq!(s.get(&ids[3]).unwrap(), chunks[3]);
        let other = LocalStore::open(dir.path()).unwrap();
        assert!(
            !other.exists(&ids[3]).unwrap(),
            "not visible before the commit"
        );
        s.commit().unwrap();
        s.commit().unwrap();
        for (id, c) in ids.iter().zip(&chunks) {
            assert_eq!(other.get(id).unwrap(), *c);
        }
        assert_eq!(s.put(&ids[0], &chunks[0]).unwrap(), PutOutcome::Existed);
        drop(s);
        assert_eq!(tmp_files(dir.path()), 0);

        // Dropped without a commit: no chunk, no temp file.
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStore::open_batched(dir.path()).unwrap();
        s.put(&ids[0], &chunks[0]).unwrap();
        drop(s);
        assert!(!LocalStore::open(dir.path())
            .unwrap()
            .exists(&ids[0])
            .unwrap());
        assert_eq!(tmp_files(dir.path()), 0);
    }

    /// Concurrent batched puts of the same chunk: one is written.
    #[test]
    fn concurrent_batched_puts_of_same_chunk() {
        let dir = tempfile::tempdir().unwrap();
        let s = std::sync::Arc::new(LocalStore::open_batched(dir.path()).unwrap());
        let data = vec![9u8; 50_000];
        let id = ChunkId::of(&data);
        let written: usize = (0..8)
            .map(|_| {
                let (s, data) = (s.clone(), data.clone());
                std::thread::spawn(move || s.put(&id, &data).unwrap())
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| usize::from(h.join().unwrap() == PutOutcome::Written))
            .sum();
        assert_eq!(written, 1, "one put writes, the others find it");
        s.commit().unwrap();
        assert_eq!(
            LocalStore::open(dir.path()).unwrap().get(&id).unwrap(),
            data
        );
        drop(s);
        assert_eq!(tmp_files(dir.path()), 0);
    }

    /// Temp files anywhere under the store.
    fn tmp_files(root: &Path) -> usize {
        let mut n = 0;
        for sub in fs::read_dir(root.join("chunks")).unwrap() {
            for e in fs::read_dir(sub.unwrap().path()).unwrap() {
                n += usize::from(
                    e.unwrap()
                        .file_name()
                        .to_string_lossy()
                        .starts_with(".tmp-"),
                );
            }
        }
        n
    }

    #[test]
    fn stale_temps_are_found_and_removed_fresh_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStore::open(dir.path()).unwrap();
        let sub = dir.path().join("chunks/ab");
        fs::create_dir_all(&sub).unwrap();
        let old = sub.join(".tmp-abcd-1-0");
        let fresh = sub.join(".tmp-abcd-2-0");
        fs::write(&old, b"partial").unwrap();
        fs::write(&fresh, b"partial").unwrap();
        let two_days = SystemTime::now() - Duration::from_secs(48 * 3600);
        File::options()
            .write(true)
            .open(&old)
            .unwrap()
            .set_modified(two_days)
            .unwrap();
        let stale = s.stale_temps(STALE_TEMP_AGE).unwrap();
        assert_eq!(stale.len(), 1);
        assert_eq!(stale[0].0, old);
        assert!(stale[0].1 >= Duration::from_secs(47 * 3600));
        assert_eq!(s.remove_stale_temps(STALE_TEMP_AGE).unwrap(), 1);
        assert!(!old.exists() && fresh.exists());
        assert_eq!(s.stale_temps(Duration::ZERO).unwrap().len(), 1);
    }

    #[test]
    fn put_replaces_a_chunk_file_of_the_wrong_length() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStore::open(dir.path()).unwrap();
        let data = vec![7u8; 5000];
        let id = ChunkId::of(&data);
        fs::create_dir_all(s.chunk_path(&id).parent().unwrap()).unwrap();
        for torn in [&data[..0], &data[..4096]] {
            fs::write(s.chunk_path(&id), torn).unwrap();
            assert_eq!(s.put(&id, &data).unwrap(), PutOutcome::Written);
            assert_eq!(s.get(&id).unwrap(), data);
        }
        assert_eq!(s.put(&id, &data).unwrap(), PutOutcome::Existed);
    }

    #[test]
    fn concurrent_puts_of_same_chunk() {
        let dir = tempfile::tempdir().unwrap();
        let s = std::sync::Arc::new(LocalStore::open(dir.path()).unwrap());
        let data = vec![42u8; 100_000];
        let id = ChunkId::of(&data);
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let (s, data) = (s.clone(), data.clone());
                std::thread::spawn(move || s.put(&id, &data).unwrap())
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(s.get(&id).unwrap(), data);
        let n = fs::read_dir(s.chunk_path(&id).parent().unwrap())
            .unwrap()
            .count();
        assert_eq!(n, 1, "exactly the chunk, no temp files");
    }

    #[test]
    fn missing_error_names_chunk_and_store() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStore::open(dir.path()).unwrap();
        let id = ChunkId([0xab; 32]);
        let msg = s.get(&id).unwrap_err().to_string();
        assert!(
            msg.contains(&id.to_hex()) && msg.contains(&s.describe()),
            "{msg}"
        );
    }
}
