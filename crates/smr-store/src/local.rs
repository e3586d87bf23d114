//! A chunk store in a local directory: `ROOT/chunks/<2 hex>/<64 hex>`.
//!
//! Writes go to a unique temp name in the same directory, are fsynced and
//! renamed into place, and the directory is fsynced: a crash leaves either no
//! chunk or the whole chunk, and `put` returns only once the chunk is
//! durable. An existing chunk is never rewritten, so concurrent writers of
//! the same chunk are harmless (both write identical bytes; the last rename
//! wins).
//!
//! # Crash safety and speed
//! Two `fsync`s per chunk are the price of "durable when `put` returns".
//! They are paid in parallel, not skipped: the converter stores chunks from
//! many threads at once (`smr_image::chunker::put_threads`), and ext4 (like
//! any journaling filesystem) folds the `fsync`s that arrive while a journal
//! commit is under way into the next commit, so 16 puts in flight cost about
//! one commit, not 32. Measured in docs/BENCHMARKS.md ("Convert
//! throughput"). The alternative (no per-chunk `fsync`, one `syncfs` before
//! the recipe is written) was rejected: once puts overlap it saves far less
//! than the overlap did (see the benchmark), it makes `put`'s durability depend on every caller syncing, and
//! after a crash a chunk file could exist with the right name and wrong
//! contents (delayed allocation), so every `put` of an existing chunk would
//! have to read it back.
//!
//! What a crash leaves, at each step of a `put`: a temp file (`.tmp-*`,
//! never read as a chunk, harmless garbage), or the complete chunk (data
//! synced before the rename), possibly without its directory entry if the
//! directory `fsync` had not finished (then the chunk is simply missing and
//! the next `put` writes it again). A chunk file of the wrong length (only
//! damage from outside could make one) is replaced by the next `put` of
//! that chunk instead of being taken as present.

use crate::{ChunkStore, PutOutcome, Result, StoreError};
use smr_format::ChunkId;
use std::fs::{self, File};
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// A directory-backed chunk store.
#[derive(Debug)]
pub struct LocalStore {
    root: PathBuf,
    tmp_counter: AtomicU64,
}

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
        })
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
            id: *id,
            store: self.describe(),
            source,
        }
    }
}

impl ChunkStore for LocalStore {
    fn describe(&self) -> String {
        self.root.display().to_string()
    }

    fn get(&self, id: &ChunkId) -> Result<Vec<u8>> {
        fs::read(self.chunk_path(id)).map_err(|e| match e.kind() {
            ErrorKind::NotFound => StoreError::Missing {
                id: *id,
                store: self.describe(),
            },
            _ => self.chunk_err(id, e),
        })
    }

    fn exists(&self, id: &ChunkId) -> Result<bool> {
        match fs::symlink_metadata(self.chunk_path(id)) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
            Err(e) => Err(self.chunk_err(id, e)),
        }
    }

    fn put(&self, id: &ChunkId, data: &[u8]) -> Result<PutOutcome> {
        let path = self.chunk_path(id);
        match fs::symlink_metadata(&path) {
            Ok(m) if m.is_file() && m.len() == data.len() as u64 => return Ok(PutOutcome::Existed),
            // Damaged (wrong length) or not a file: replaced by the rename.
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(self.chunk_err(id, e)),
        }
        let dir = path.parent().expect("chunk path has a parent");
        fs::create_dir_all(dir).map_err(|e| self.chunk_err(id, e))?;
        let tmp = dir.join(format!(
            ".tmp-{}-{}-{}",
            &id.to_hex()[..16],
            std::process::id(),
            self.tmp_counter.fetch_add(1, Ordering::Relaxed)
        ));
        let write = || -> std::io::Result<()> {
            let mut f = File::create(&tmp)?;
            f.write_all(data)?;
            f.sync_all()?;
            fs::rename(&tmp, &path)?;
            File::open(dir)?.sync_all()
        };
        if let Err(e) = write() {
            let _ = fs::remove_file(&tmp);
            return Err(self.chunk_err(id, e));
        }
        Ok(PutOutcome::Written)
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
