//! A chunk store in a local directory: `ROOT/chunks/<2 hex>/<64 hex>`.
//!
//! Writes go to a unique temp name in the same directory, are fsynced and
//! renamed into place, and the directory is fsynced: a crash leaves either no
//! chunk or the whole chunk. An existing chunk is never rewritten, so
//! concurrent writers of the same chunk are harmless (both write identical
//! bytes; the last rename wins).

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
        if self.exists(id)? {
            return Ok(PutOutcome::Existed);
        }
        let path = self.chunk_path(id);
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
