//! The packed layout on S3 (`smr_store::packed`): [`S3Packed`] appends the
//! chunks it is given, in order, to packs held in memory, uploads each pack
//! as `packs/<sha256>` when the content rule closes it (a few uploads in
//! flight), and writes a recipe's index once every pack is up. Tens of
//! PUTs per image instead of one per chunk, and a cold start reads a few
//! objects by ranges.
//!
//! Chunks already in the store's packs (by its indexes, read at the first
//! put) are not stored again; chunk objects of the per-chunk layout are
//! not looked for (a HEAD per chunk is what packs avoid): `smr store
//! migrate` moves such a store to packs. Writers hold the store's writer
//! lease, so no collection runs meanwhile ([`super::lease`]).

use super::S3Store;
use crate::gc::packs::{parse_name, NamedFile, PackedObjects};
use crate::packed::{index_object, pack_name, pack_object, PackMap, StoreIndex, MAX_PACK_BYTES};
use crate::{ByteRange, ChunkStore, Extent, ObjectName, PutOutcome, Result, StoreError, Target};
use smr_format::pack::PackParams;
use smr_format::ChunkId;
use std::collections::{HashSet, VecDeque};
use std::sync::{Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::SystemTime;

/// Most packs uploading at once.
const UPLOADS_IN_FLIGHT: usize = 4;

/// A pack on its way up: its digest and chunks, once the upload is done.
type Upload = JoinHandle<Result<([u8; 32], Vec<(ChunkId, u64, u32)>)>>;

/// An [`S3Store`] written in packs (see the module docs).
pub struct S3Packed {
    store: S3Store,
    params: PackParams,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Every chunk in the store's packs (`None` until the indexes are read).
    known: Option<PackMap>,
    /// The pack being filled.
    open: Vec<u8>,
    open_chunks: Vec<(ChunkId, u64, u32)>,
    /// Chunks put but not yet in an uploaded pack.
    pending: HashSet<ChunkId>,
    uploads: VecDeque<Upload>,
}

impl S3Packed {
    /// `store`, written in packs cut with `params`.
    pub fn new(store: S3Store, params: PackParams) -> Self {
        S3Packed {
            store,
            params,
            state: Mutex::new(State::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Reads every index of the store into `state.known`, once. A damaged
    /// index is skipped with a warning.
    fn load(&self, state: &mut State) -> Result<()> {
        if state.known.is_some() {
            return Ok(());
        }
        let mut map = PackMap::default();
        for (object, _) in self.store.list_dir(crate::packed::INDEXES_DIR)? {
            let name = object.as_str().rsplit('/').next().unwrap_or_default();
            if parse_name(name).is_none() {
                continue;
            }
            let bytes = self.store.read_ranges(&object, &[ByteRange::WHOLE])?;
            match StoreIndex::decode(bytes.first().map_or(&[][..], Vec::as_slice)) {
                Ok(index) => map.add_index(&index),
                Err(e) => tracing::warn!("skipping the store index {object}: {e}"),
            }
        }
        state.known = Some(map);
        Ok(())
    }

    /// Starts uploading the pack being filled, waiting for the oldest
    /// upload first when enough are in flight.
    fn seal(&self, state: &mut State) -> Result<()> {
        if state.open_chunks.is_empty() {
            return Ok(());
        }
        while state.uploads.len() >= UPLOADS_IN_FLIGHT {
            self.finish_one(state)?;
        }
        let bytes = std::mem::take(&mut state.open);
        let chunks = std::mem::take(&mut state.open_chunks);
        let digest = pack_name(&chunks);
        let store = self.store.clone();
        state.uploads.push_back(std::thread::spawn(move || {
            store.put_object(&pack_object(&digest), bytes)?;
            Ok((digest, chunks))
        }));
        Ok(())
    }

    /// Waits for the oldest upload; its chunks become known.
    fn finish_one(&self, state: &mut State) -> Result<()> {
        let Some(upload) = state.uploads.pop_front() else {
            return Ok(());
        };
        let (digest, chunks) = upload.join().map_err(|_| StoreError::Io {
            store: self.describe(),
            source: std::io::Error::other("a pack upload panicked"),
        })??;
        let known = state.known.get_or_insert_with(PackMap::default);
        for (id, offset, len) in chunks {
            known.insert(id, digest, offset, len);
            state.pending.remove(&id);
        }
        Ok(())
    }

    /// Uploads the last pack and waits for every upload: the chunks put so
    /// far are then in the store (an index may name them).
    pub fn commit(&self) -> Result<()> {
        let mut state = self.lock();
        self.seal(&mut state)?;
        while !state.uploads.is_empty() {
            self.finish_one(&mut state)?;
        }
        Ok(())
    }

    /// Writes the index of `recipe` (after [`S3Packed::commit`]); `None`
    /// when none of its chunks is packed.
    pub fn write_index(&self, recipe: &smr_format::Recipe) -> Result<Option<ObjectName>> {
        let state = self.lock();
        if let Some(c) = recipe.chunks.iter().find(|c| state.pending.contains(&c.id)) {
            return Err(StoreError::ChunkIo {
                what: Target::Chunk(c.id),
                store: self.describe(),
                source: std::io::Error::other(
                    "the chunk is not committed yet: commit before writing the index",
                ),
            });
        }
        let Some(known) = &state.known else {
            return Ok(None);
        };
        let index = known
            .index_of(recipe.chunks.iter().map(|c| &c.id))
            .map_err(|e| StoreError::Io {
                store: self.describe(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
            })?;
        let Some(index) = index else {
            return Ok(None);
        };
        let object = index_object(&smr_format::Profile::recipe_hash(&recipe.encode()));
        self.store.put_object(&object, index.encode())?;
        Ok(Some(object))
    }
}

impl ChunkStore for S3Packed {
    fn describe(&self) -> String {
        self.store.describe()
    }

    fn locate(&self, id: &ChunkId) -> Result<Extent> {
        let state = self.lock();
        let found = state.known.as_ref().and_then(|k| k.locate(id));
        Ok(match found {
            Some((pack, offset, len)) => Extent {
                object: pack_object(&pack),
                range: ByteRange::new(offset, u64::from(len)),
            },
            None => Extent::own_object(id),
        })
    }

    fn read_ranges(&self, object: &ObjectName, ranges: &[ByteRange]) -> Result<Vec<Vec<u8>>> {
        self.store.read_ranges(object, ranges)
    }

    fn exists(&self, id: &ChunkId) -> Result<bool> {
        {
            let mut state = self.lock();
            self.load(&mut state)?;
            let known = state.known.as_ref().is_some_and(|k| k.locate(id).is_some());
            if known || state.pending.contains(id) {
                return Ok(true);
            }
        }
        self.store.exists(id)
    }

    fn ordered_puts(&self) -> bool {
        true
    }

    fn put(&self, id: &ChunkId, data: &[u8]) -> Result<PutOutcome> {
        self.store.writer_lease(Target::Chunk(*id))?;
        let mut state = self.lock();
        self.load(&mut state)?;
        let known = state.known.as_ref().is_some_and(|k| k.locate(id).is_some());
        if known || state.pending.contains(id) {
            return Ok(PutOutcome::Existed);
        }
        let len = u32::try_from(data.len()).map_err(|_| StoreError::ChunkIo {
            what: Target::Chunk(*id),
            store: self.describe(),
            source: std::io::ErrorKind::InvalidInput.into(),
        })?;
        let offset = state.open.len() as u64;
        state.open.extend_from_slice(data);
        state.open_chunks.push((*id, offset, len));
        state.pending.insert(*id);
        let count = state.open_chunks.len() as u32;
        if self.params.cut_after(id, count) || state.open.len() as u64 >= MAX_PACK_BYTES {
            self.seal(&mut state)?;
        }
        Ok(PutOutcome::Written)
    }
}

impl PackedObjects for S3Store {
    fn location(&self) -> String {
        ChunkStore::describe(self)
    }

    fn list(&self, dir: &str) -> Result<Vec<NamedFile>> {
        let mut out: Vec<NamedFile> = self
            .list_dir(dir)?
            .into_iter()
            .filter_map(|(object, m)| {
                let name = parse_name(object.as_str().rsplit('/').next()?)?;
                Some(NamedFile {
                    name,
                    object,
                    len: m.size,
                    modified: SystemTime::from(m.last_modified),
                })
            })
            .collect();
        out.sort_by_key(|f| f.name);
        Ok(out)
    }

    fn read(&self, object: &ObjectName) -> Result<Vec<u8>> {
        Ok(self
            .read_ranges(object, &[ByteRange::WHOLE])?
            .pop()
            .unwrap_or_default())
    }

    fn write(&self, object: &ObjectName, bytes: &[u8]) -> Result<()> {
        self.put_object(object, bytes.to_vec())
    }

    /// Under the collector's lease no writer runs: the listed time is the
    /// object's.
    fn remove_if_older(&self, f: &NamedFile, cutoff: SystemTime) -> Result<bool> {
        if f.modified >= cutoff {
            return Ok(false);
        }
        self.delete_object(&f.object)?;
        Ok(true)
    }
}
