//! A chunk store in a local directory. Ranged reads are `pread`s of an
//! object's file. Two layouts, read side by side (see [`crate::packed`]):
//!
//! - **Packed** (`packs/`, `indexes/`): what [`LocalStore::open_batched`]
//!   writes, the mode of `smr convert` and `smr commit`. A `put` appends
//!   the chunk to the pack being filled (puts come in image order:
//!   [`ChunkStore::ordered_puts`]) and starts its writeback;
//!   [`LocalStore::commit`] makes the batch durable with one `syncfs`,
//!   renames every pack to its digest and syncs `packs/`;
//!   [`LocalStore::write_index`] then writes the recipe's index. A handful
//!   of files per image instead of one per chunk: no inode, rename and
//!   directory entry per chunk at convert time, and a warm read gets the
//!   disk's readahead.
//! - **Per chunk** (`chunks/<2 hex>/<64 hex>`): what [`LocalStore::open`]'s
//!   immediate `put`s write (each written, `fsync`ed, renamed and its
//!   directory `fsync`ed before it returns), and the layout of stores made
//!   before packs (`smr store migrate` packs them).
//!
//! A chunk already in the store (in a pack or its own file) is never
//! stored again; its pack or file is *refreshed* (modification time set to
//! now), which is what keeps a concurrent garbage collection from taking
//! it (`crate::gc`). The batch's chunks are readable by this store before
//! the commit, by other processes after the index names them.
//!
//! # What a crash leaves
//! Temp files (`.tmp-*`, never read as chunks or packs; `smr verify`
//! reports them, `smr convert` removes those older than
//! [`STALE_TEMP_AGE`]) and perhaps packs no index names yet; whole chunk
//! files and whole packs, since data is synced before every rename; never
//! an index naming bytes that are not there. A per-chunk file of the wrong
//! length (only damage from outside could make one) is replaced by the
//! next immediate `put` of that chunk instead of being taken as present.

use crate::packed::{self, PackMap, PackWriter, StoreIndex, INDEXES_DIR, PACKS_DIR};
use crate::{ByteRange, ChunkStore, Extent, ObjectName, PutOutcome, Result, StoreError, Target};
use smr_format::pack::PackParams;
use smr_format::ChunkId;
use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::FileExt;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

/// A directory-backed chunk store (see the module docs for its two modes).
#[derive(Debug)]
pub struct LocalStore {
    root: PathBuf,
    tmp_counter: AtomicU64,
    /// Chunks in committed packs: every index's (read when first needed:
    /// many callers open a store and never locate a chunk), and this
    /// store's commits.
    packed: OnceLock<RwLock<PackMap>>,
    /// Batched mode: the packs being written (boxed: a store opened only
    /// to read stays small).
    batch: Option<Box<Mutex<Batch>>>,
}

/// The chunks put since the last commit, in packs under temp names.
struct Batch {
    writer: PackWriter,
    /// Where each is: its pack's temp name, offset and length.
    chunks: HashMap<ChunkId, (ObjectName, u64, u32)>,
}

impl std::fmt::Debug for Batch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batch")
            .field("chunks", &self.chunks.len())
            .finish()
    }
}

/// Name prefix of the store's temp files.
pub const TEMP_PREFIX: &str = ".tmp-";

/// Age after which a temp file is taken as left by an interrupted writer:
/// far longer than any write takes (a batched convert holds its temp files
/// until its commit, minutes for the largest images).
pub const STALE_TEMP_AGE: Duration = Duration::from_secs(24 * 3600);

impl LocalStore {
    /// Opens (creating if needed) the store at `root`; an `indexes/` that
    /// cannot be listed is an error here. The indexes are read when a
    /// chunk is first looked up: one that cannot be read then is skipped
    /// with a warning (its recipe's packed chunks are reported missing;
    /// others stay readable).
    pub fn open(root: impl AsRef<Path>) -> Result<Self> {
        let root = root.as_ref().to_path_buf();
        let io = |source| StoreError::Io {
            store: root.display().to_string(),
            source,
        };
        fs::create_dir_all(root.join("chunks")).map_err(io)?;
        match fs::read_dir(root.join(INDEXES_DIR)) {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(io(e)),
        }
        Ok(LocalStore {
            root,
            tmp_counter: AtomicU64::new(0),
            packed: OnceLock::new(),
            batch: None,
        })
    }

    /// The committed packs' map, every index read into it on first use.
    fn packed(&self) -> &RwLock<PackMap> {
        self.packed.get_or_init(|| {
            RwLock::new(load_indexes(&self.root).unwrap_or_else(|e| {
                tracing::warn!(store = %self.root.display(), error = %e, "cannot read the store's indexes");
                PackMap::default()
            }))
        })
    }

    /// Opens the store at `root` in batched mode: puts go to packs, cut
    /// for chunks of about 64 KiB (see [`LocalStore::with_pack_params`]),
    /// made durable and visible to others only by [`LocalStore::commit`]
    /// and [`LocalStore::write_index`]. Dropping the store without
    /// committing removes the batch's temp files.
    pub fn open_batched(root: impl AsRef<Path>) -> Result<Self> {
        let mut s = Self::open(root)?;
        let params = PackParams::for_chunk_size(64 << 10);
        s.batch = Some(Box::new(Mutex::new(Batch {
            writer: PackWriter::new(&s.root, params),
            chunks: HashMap::new(),
        })));
        Ok(s)
    }

    /// Cuts the batch's packs with `params` (before the first put).
    pub fn with_pack_params(mut self, params: PackParams) -> Self {
        if let Some(b) = &mut self.batch {
            let b = b.get_mut().unwrap_or_else(PoisonError::into_inner);
            b.writer = PackWriter::new(&self.root, params);
        }
        self
    }

    fn io_err(&self, source: std::io::Error) -> StoreError {
        StoreError::Io {
            store: self.describe(),
            source,
        }
    }

    fn lock_batch(&self) -> Option<std::sync::MutexGuard<'_, Batch>> {
        self.batch
            .as_ref()
            .map(|b| b.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Makes every chunk put so far durable and readable by others once an
    /// index names it: closes the pack being filled, `syncfs` (one
    /// writeback and journal commit for the whole batch), renames each
    /// pack to its digest, `fsync`s `packs/`. A no-op in immediate mode.
    /// On error the packs not yet renamed stay in the batch (a later
    /// commit retries them).
    pub fn commit(&self) -> Result<()> {
        let Some(mut batch) = self.lock_batch() else {
            return Ok(());
        };
        batch.writer.seal().map_err(|e| self.io_err(e))?;
        let mut sealed = batch.writer.take_sealed();
        if sealed.is_empty() {
            return Ok(());
        }
        let renamed = (|| -> std::io::Result<()> {
            packed::syncfs(&self.root)?;
            while let Some(p) = sealed.first() {
                let to = self.root.join(packed::pack_object(&p.digest).as_str());
                fs::rename(self.root.join(p.temp.as_str()), to)?;
                let p = sealed.remove(0);
                let mut map = self
                    .packed()
                    .write()
                    .unwrap_or_else(PoisonError::into_inner);
                for (id, offset, len) in p.chunks {
                    map.insert(id, p.digest, offset, len);
                    batch.chunks.remove(&id);
                }
            }
            File::open(self.root.join(PACKS_DIR))?.sync_all()
        })();
        if let Err(e) = renamed {
            batch.writer.restore(sealed);
            return Err(self.io_err(e));
        }
        Ok(())
    }

    /// Writes the index of `recipe` (`indexes/<its SHA-256>`): where each
    /// of its chunks is among the store's packs. Call after
    /// [`LocalStore::commit`]; the index is durable when this returns.
    /// Returns its object name, or `None` when no chunk of the recipe is
    /// packed (every one has its own file: nothing to index).
    pub fn write_index(&self, recipe: &smr_format::Recipe) -> Result<Option<ObjectName>> {
        let digest = smr_format::Profile::recipe_hash(&recipe.encode());
        self.write_index_of(&digest, recipe.chunks.iter().map(|c| c.id))
    }

    /// [`LocalStore::write_index`] of the chunks `ids`, named `name` (a
    /// recipe's SHA-256).
    pub fn write_index_of(
        &self,
        name: &[u8; 32],
        ids: impl IntoIterator<Item = ChunkId>,
    ) -> Result<Option<ObjectName>> {
        let ids: Vec<ChunkId> = ids.into_iter().collect();
        if let Some(batch) = self.lock_batch() {
            if let Some(id) = ids.iter().find(|id| batch.chunks.contains_key(id)) {
                return Err(self.chunk_err(
                    id,
                    std::io::Error::other(
                        "the chunk is not committed yet: commit before writing the index",
                    ),
                ));
            }
        }
        let index = self
            .packed()
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .index_of(&ids)
            .map_err(|e| self.io_err(std::io::Error::new(ErrorKind::InvalidData, e)))?;
        let Some(index) = index else {
            return Ok(None);
        };
        let object = packed::index_object(name);
        self.write_durably(&object, &index.encode())
            .map_err(|e| self.io_err(e))?;
        Ok(Some(object))
    }

    /// Writes `bytes` as `object` via a temp file, `fsync`, rename and a
    /// `fsync` of the directory.
    pub(crate) fn write_durably(&self, object: &ObjectName, bytes: &[u8]) -> std::io::Result<()> {
        let path = self.root.join(object.as_str());
        let dir = path.parent().unwrap_or(&self.root).to_path_buf();
        fs::create_dir_all(&dir)?;
        let tmp = dir.join(format!(
            "{TEMP_PREFIX}{}-{}",
            std::process::id(),
            self.tmp_counter.fetch_add(1, Ordering::Relaxed)
        ));
        let write = || -> std::io::Result<()> {
            let mut f = File::create(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()?;
            fs::rename(&tmp, &path)?;
            File::open(&dir)?.sync_all()
        };
        write().inspect_err(|_| {
            let _ = fs::remove_file(&tmp);
        })
    }

    /// Temp files (`.tmp-*`) under the store last modified at least `age`
    /// ago: what interrupted writers left (a live writer's temp files are
    /// seconds old). Each with its age.
    pub fn stale_temps(&self, age: Duration) -> Result<Vec<(PathBuf, Duration)>> {
        let io = |source| self.io_err(source);
        let now = SystemTime::now();
        let mut dirs = vec![self.root.join(PACKS_DIR), self.root.join(INDEXES_DIR)];
        for dir in fs::read_dir(self.root.join("chunks")).map_err(io)? {
            let dir = dir.map_err(io)?;
            if dir.file_type().map_err(io)?.is_dir() {
                dirs.push(dir.path());
            }
        }
        let mut out = Vec::new();
        for dir in dirs {
            let entries = match fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(io(e)),
            };
            for e in entries {
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

    /// Where chunk `id` is in the uncommitted batch, if it is there.
    fn batched(&self, id: &ChunkId) -> Option<Extent> {
        let batch = self.lock_batch()?;
        let (object, offset, len) = batch.chunks.get(id)?;
        Some(Extent {
            object: object.clone(),
            range: ByteRange::new(*offset, u64::from(*len)),
        })
    }

    /// Where chunk `id` is among the committed packs, if it is packed.
    fn in_pack(&self, id: &ChunkId) -> Option<Extent> {
        let map = self.packed().read().unwrap_or_else(PoisonError::into_inner);
        let (pack, offset, len) = map.locate(id)?;
        Some(Extent {
            object: packed::pack_object(&pack),
            range: ByteRange::new(offset, u64::from(len)),
        })
    }

    /// Whether chunk `id` is in a committed pack that is still there,
    /// refreshing the pack (see the module docs); a chunk whose pack
    /// vanished (garbage collected) is forgotten.
    fn packed_and_refreshed(&self, id: &ChunkId) -> bool {
        let Some(extent) = self.in_pack(id) else {
            return false;
        };
        if crate::gc::refresh(&self.root.join(extent.object.as_str())) {
            return true;
        }
        self.packed()
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(id);
        false
    }

    /// Path of chunk `id`'s own file (the per-chunk layout).
    pub fn chunk_path(&self, id: &ChunkId) -> PathBuf {
        let hex = id.to_hex();
        self.root.join("chunks").join(&hex[..2]).join(hex)
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Every chunk the store's packs hold, with its pack and range.
    pub fn packed_chunks(&self) -> Vec<(ChunkId, Extent)> {
        let map = self.packed().read().unwrap_or_else(PoisonError::into_inner);
        map.iter()
            .map(|(id, pack, offset, len)| {
                (
                    id,
                    Extent {
                        object: packed::pack_object(&pack),
                        range: ByteRange::new(offset, u64::from(len)),
                    },
                )
            })
            .collect()
    }

    fn chunk_err(&self, id: &ChunkId, source: std::io::Error) -> StoreError {
        StoreError::ChunkIo {
            what: Target::Chunk(*id),
            store: self.describe(),
            source,
        }
    }

    /// The file of `object`, a path under the root. Names that could leave
    /// the root are refused.
    fn object_path(&self, object: &ObjectName) -> Result<PathBuf> {
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

    fn locate(&self, id: &ChunkId) -> Result<Extent> {
        Ok(self
            .batched(id)
            .or_else(|| self.in_pack(id))
            .unwrap_or_else(|| Extent::own_object(id)))
    }

    fn exists(&self, id: &ChunkId) -> Result<bool> {
        if self.batched(id).is_some() || self.in_pack(id).is_some() {
            return Ok(true);
        }
        match fs::symlink_metadata(self.chunk_path(id)) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
            Err(e) => Err(self.chunk_err(id, e)),
        }
    }

    /// Batched puts come in image order, so that packs hold images' chunks
    /// in order and are cut the same way every time.
    fn ordered_puts(&self) -> bool {
        self.batch.is_some()
    }

    fn put(&self, id: &ChunkId, data: &[u8]) -> Result<PutOutcome> {
        if self.batched(id).is_some() || self.packed_and_refreshed(id) {
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
        if let Some(mut batch) = self.lock_batch() {
            if batch.chunks.contains_key(id) {
                // Another thread put the same chunk meanwhile.
                return Ok(PutOutcome::Existed);
            }
            let len = u32::try_from(data.len())
                .map_err(|_| self.chunk_err(id, ErrorKind::InvalidInput.into()))?;
            let (pack, offset) = batch
                .writer
                .append(id, data)
                .map_err(|e| self.chunk_err(id, e))?;
            batch.chunks.insert(*id, (pack, offset, len));
            return Ok(PutOutcome::Written);
        }
        self.write_durably(&ObjectName::of_chunk(id), data)
            .map_err(|e| self.chunk_err(id, e))?;
        Ok(PutOutcome::Written)
    }
}

impl Drop for LocalStore {
    fn drop(&mut self) {
        // An uncommitted batch (a failed conversion): its temp packs are
        // garbage; remove them rather than leave them behind.
        if let Some(batch) = self.lock_batch() {
            for tmp in batch.writer.temp_names() {
                let _ = fs::remove_file(self.root.join(tmp.as_str()));
            }
        }
    }
}

/// Every index under `root/indexes`, merged. An unreadable index is
/// skipped with a warning.
fn load_indexes(root: &Path) -> Result<PackMap> {
    let mut map = PackMap::default();
    let dir = root.join(INDEXES_DIR);
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(map),
        Err(source) => {
            return Err(StoreError::Io {
                store: root.display().to_string(),
                source,
            })
        }
    };
    let mut names: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .and_then(crate::gc::packs::parse_name)
                .is_some()
        })
        .collect();
    names.sort();
    for path in names {
        let read = fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|b| StoreIndex::decode(&b).map_err(|e| e.to_string()));
        match read {
            Ok(index) => map.add_index(&index),
            Err(e) => tracing::warn!("skipping the store index {}: {e}", path.display()),
        }
    }
    Ok(map)
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
        assert!(
            !LocalStore::open(dir.path())
                .unwrap()
                .exists(&ids[3])
                .unwrap(),
            "not visible before the commit"
        );
        let e = s.write_index_of(&[7; 32], ids.clone()).unwrap_err();
        assert!(e.to_string().contains("not committed yet"), "{e}");
        s.commit().unwrap();
        s.commit().unwrap();
        s.write_index_of(&[7; 32], ids.clone()).unwrap().unwrap();
        let other = LocalStore::open(dir.path()).unwrap();
        for (id, c) in ids.iter().zip(&chunks) {
            assert_eq!(other.get(id).unwrap(), *c);
            assert!(other
                .locate(id)
                .unwrap()
                .object
                .as_str()
                .starts_with("packs/"));
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

    /// A store reads its indexes when a chunk is first looked up, not at
    /// open: a reader opened before a writer's index sees it; an
    /// `indexes` that cannot be listed fails the open.
    #[test]
    fn indexes_are_read_on_first_lookup() {
        let dir = tempfile::tempdir().unwrap();
        let data = vec![9u8; 5000];
        let id = ChunkId::of(&data);
        let reader = LocalStore::open(dir.path()).unwrap();
        let w = LocalStore::open_batched(dir.path()).unwrap();
        w.put(&id, &data).unwrap();
        w.commit().unwrap();
        w.write_index_of(&[1; 32], [id]).unwrap().unwrap();
        assert_eq!(reader.get(&id).unwrap(), data);

        let bad = tempfile::tempdir().unwrap();
        std::fs::write(bad.path().join(INDEXES_DIR), b"not a directory").unwrap();
        let e = LocalStore::open(bad.path()).unwrap_err();
        assert!(
            e.to_string().contains(&bad.path().display().to_string()),
            "{e}"
        );
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
        s.write_index_of(&[1; 32], [id]).unwrap();
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
        let subs = fs::read_dir(root.join("chunks"))
            .unwrap()
            .map(|d| d.unwrap().path());
        for sub in subs.chain([root.join("packs"), root.join("indexes")]) {
            if !sub.is_dir() {
                continue;
            }
            for e in fs::read_dir(sub).unwrap() {
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
