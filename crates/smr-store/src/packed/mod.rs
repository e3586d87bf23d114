//! The packed layout of directory, HTTP(S) and S3 stores.
//!
//! ```text
//! packs/<64 hex>      sealed chunks concatenated; named by the SHA-256 of its chunk table
//! indexes/<64 hex>    the StoreIndex of one recipe, named by the recipe's SHA-256
//! chunks/<2>/<64>     the per-chunk layout (still read; `smr store migrate` packs it)
//! ```
//! A writer (`smr convert`, `smr commit`) appends the chunks it stores, in
//! image order, to packs cut by content ([`smr_format::pack`]), so a warm
//! read of an image reads a few large files front to back and a remote
//! store serves a cold start with ranged reads of a few objects. A chunk
//! already in the store is never stored again: a recipe's index may point
//! into packs other recipes wrote. A reader of a store that cannot be
//! listed (HTTP) finds a recipe's chunks through its index ([`Indexed`]);
//! a local store loads every index when it opens ([`PackMap`]).
//!
//! # Crash safety
//! A pack is written under a temp name, made durable (`syncfs`), renamed
//! to its digest, and its directory synced, all before the index naming it
//! is written (temp file, `fsync`, rename, directory `fsync`). A crash
//! leaves temp files and perhaps packs no index names (garbage collection
//! removes both); never an index naming bytes that are not there.

pub mod index;
pub mod writer;

pub use index::{IndexError, PackedChunk, StoreIndex};
pub use writer::{PackWriter, SealedPack, MAX_PACK_BYTES};

use crate::{ByteRange, ChunkStore, Extent, ObjectName, PutOutcome, Result, StoreError, Target};
use smr_format::ChunkId;
use std::collections::HashMap;
use std::fs::File;
use std::path::Path;

/// A store that takes a writer's chunks in one batch of packs: nothing is
/// durable, or visible to other processes, before [`BatchStore::commit`],
/// and a recipe's chunks are found through its index, written by
/// [`BatchStore::write_index`] after the commit and before the recipe.
pub trait BatchStore: ChunkStore {
    /// Makes every chunk put so far durable in its pack.
    fn commit(&self) -> Result<()>;
    /// Writes the index of `recipe`; `None` when none of its chunks is in
    /// a pack (nothing to index).
    fn write_index(&self, recipe: &smr_format::Recipe) -> Result<Option<ObjectName>>;
}

impl BatchStore for crate::LocalStore {
    fn commit(&self) -> Result<()> {
        crate::LocalStore::commit(self)
    }

    fn write_index(&self, recipe: &smr_format::Recipe) -> Result<Option<ObjectName>> {
        crate::LocalStore::write_index(self, recipe)
    }
}

impl BatchStore for crate::s3::packs::S3Packed {
    fn commit(&self) -> Result<()> {
        crate::s3::packs::S3Packed::commit(self)
    }

    fn write_index(&self, recipe: &smr_format::Recipe) -> Result<Option<ObjectName>> {
        crate::s3::packs::S3Packed::write_index(self, recipe)
    }
}

/// The directory (or key prefix) of packs.
pub const PACKS_DIR: &str = "packs";
/// The directory (or key prefix) of store indexes.
pub const INDEXES_DIR: &str = "indexes";

/// A pack's name: SHA-256 over its chunk table, each chunk's id (32 bytes)
/// and stored length (u32, little-endian) in order. Chunk ids are SHA-256
/// of the chunks' bytes, so this names the pack's bytes as surely as a
/// hash of them, without hashing them a second time.
pub fn pack_name(chunks: &[(ChunkId, u64, u32)]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for (id, _, len) in chunks {
        h.update(id.0);
        h.update(len.to_le_bytes());
    }
    h.finalize().into()
}

/// The object of the pack named `digest`.
pub fn pack_object(digest: &[u8; 32]) -> ObjectName {
    ObjectName::new(format!("{PACKS_DIR}/{}", hex::encode(digest)))
}

/// The object of the index of the recipe whose bytes hash to `recipe_sha256`.
pub fn index_object(recipe_sha256: &[u8; 32]) -> ObjectName {
    ObjectName::new(format!("{INDEXES_DIR}/{}", hex::encode(recipe_sha256)))
}

/// Where a chunk is in a [`PackMap`]: a range of one of its packs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapEntry {
    /// Position of the pack in the map's pack list.
    pub pack: u32,
    /// Byte offset in the pack.
    pub offset: u64,
    /// Stored length.
    pub len: u32,
}

/// Every packed chunk a local store knows of: the union of its indexes
/// and the packs it committed since it opened. Pack digests are interned.
#[derive(Debug, Default)]
pub struct PackMap {
    packs: Vec<[u8; 32]>,
    pack_pos: HashMap<[u8; 32], u32>,
    chunks: HashMap<ChunkId, MapEntry>,
}

impl PackMap {
    /// Records chunk `id` at `offset`, `len` in pack `digest`, unless it is
    /// known already (the first location found stays).
    pub fn insert(&mut self, id: ChunkId, digest: [u8; 32], offset: u64, len: u32) {
        if self.chunks.contains_key(&id) {
            return;
        }
        let pack = *self.pack_pos.entry(digest).or_insert_with(|| {
            self.packs.push(digest);
            (self.packs.len() - 1) as u32
        });
        self.chunks.insert(id, MapEntry { pack, offset, len });
    }

    /// Adds every chunk of `index`.
    pub fn add_index(&mut self, index: &StoreIndex) {
        for (id, c) in index.chunks() {
            self.insert(*id, index.packs()[c.pack as usize], c.offset, c.len);
        }
    }

    /// Where chunk `id` is: its pack's digest, offset and length.
    pub fn locate(&self, id: &ChunkId) -> Option<([u8; 32], u64, u32)> {
        let e = self.chunks.get(id)?;
        Some((self.packs[e.pack as usize], e.offset, e.len))
    }

    /// The index of the chunks `ids` that this map locates (others are
    /// left out: chunk files, or absent); `None` when it locates none.
    pub fn index_of<'a>(
        &self,
        ids: impl IntoIterator<Item = &'a ChunkId>,
    ) -> std::result::Result<Option<StoreIndex>, IndexError> {
        let located: Vec<_> = ids
            .into_iter()
            .filter_map(|id| self.locate(id).map(|(p, o, l)| (*id, p, o, l)))
            .collect();
        if located.is_empty() {
            return Ok(None);
        }
        StoreIndex::from_locations(located).map(Some)
    }

    /// Forgets chunk `id` (its pack vanished).
    pub fn remove(&mut self, id: &ChunkId) {
        self.chunks.remove(id);
    }

    /// Every chunk known: id, pack digest, offset, length.
    pub fn iter(&self) -> impl Iterator<Item = (ChunkId, [u8; 32], u64, u32)> + '_ {
        self.chunks
            .iter()
            .map(|(id, e)| (*id, self.packs[e.pack as usize], e.offset, e.len))
    }

    /// Number of chunks known.
    pub fn len(&self) -> usize {
        self.chunks.len()
    }

    /// Whether no chunk is known.
    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }
}

/// A store whose chunks are found through one recipe's [`StoreIndex`]
/// first, and as their own objects (`chunks/…`) otherwise: how a node
/// reads a packed HTTP(S) or S3 store, which it cannot list.
pub struct Indexed {
    inner: Box<dyn ChunkStore>,
    index: StoreIndex,
}

impl Indexed {
    /// `inner` read through the index of the recipe hashing to
    /// `recipe_sha256`, if the store has one; `inner` unchanged if not (a
    /// store in the per-chunk layout). A damaged index is an error naming it.
    pub fn open(
        inner: Box<dyn ChunkStore>,
        recipe_sha256: &[u8; 32],
    ) -> Result<Box<dyn ChunkStore>> {
        let object = index_object(recipe_sha256);
        let bytes = match inner.read_ranges(&object, &[ByteRange::WHOLE]) {
            Ok(mut b) => b.pop().unwrap_or_default(),
            Err(StoreError::Missing { .. }) => return Ok(inner),
            Err(e) => return Err(e),
        };
        let index = StoreIndex::decode(&bytes).map_err(|e| StoreError::ChunkIo {
            what: Target::of(&object, ByteRange::WHOLE),
            store: inner.describe(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        })?;
        tracing::debug!(
            store = inner.describe(),
            packs = index.packs().len(),
            chunks = index.chunks().len(),
            "reading chunks through the store index {object}"
        );
        Ok(Box::new(Indexed { inner, index }))
    }
}

impl ChunkStore for Indexed {
    fn describe(&self) -> String {
        self.inner.describe()
    }

    fn locate(&self, id: &ChunkId) -> Result<Extent> {
        match self.index.locate(id) {
            Some((pack, c)) => Ok(Extent {
                object: pack_object(&pack),
                range: ByteRange::new(c.offset, u64::from(c.len)),
            }),
            None => self.inner.locate(id),
        }
    }

    fn read_ranges(&self, object: &ObjectName, ranges: &[ByteRange]) -> Result<Vec<Vec<u8>>> {
        self.inner.read_ranges(object, ranges)
    }

    fn put(&self, id: &ChunkId, data: &[u8]) -> Result<PutOutcome> {
        self.inner.put(id, data)
    }

    fn exists(&self, id: &ChunkId) -> Result<bool> {
        Ok(self.index.locate(id).is_some() || self.inner.exists(id)?)
    }
}

/// Starts the writeback of `file`'s dirty pages without waiting for it
/// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`): a hint, errors ignored.
// FFI calls on a descriptor we own; see the SAFETY notes.
#[allow(unsafe_code)]
pub(crate) fn start_writeback(file: &File) {
    use std::os::fd::AsRawFd;
    // SAFETY: `file` is open for the duration of the call, so its
    // descriptor is valid; sync_file_range reads no memory of ours.
    let _ = unsafe { libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
}

/// `syncfs(2)` on the filesystem holding `path`: writes back and commits
/// everything dirty on it (a batch's temp packs among it) in one go.
#[allow(unsafe_code)]
pub(crate) fn syncfs(path: &Path) -> std::io::Result<()> {
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
