//! [`RegistryStore`]: a read-only [`ChunkStore`] over an smr artifact's
//! packs in a registry.
//!
//! A chunk is a byte range of a pack blob ([`ChunkStore::locate`] looks it
//! up in the [`PackIndex`], with no request), and [`ChunkStore::read_ranges`]
//! reads ranges of a pack with HTTP Range requests, one per range, each
//! under the remote stores' retry policy ([`Remote`]). Which ranges to read
//! (neighbouring chunks coalesced, read-ahead) is decided above the store,
//! by the node's fetcher, as for every store. Bytes are not verified here:
//! the node hashes every chunk against its name, as for any store. A read
//! started ahead ([`crate::head_start`]) answers the one read of its very
//! range.

use crate::blobs::Blobs;
use crate::error::RegistryError;
use crate::head_start::HeadStartSlot;
use crate::pack::PackIndex;
use smr_format::ChunkId;
use smr_store::{
    ByteRange, ChunkStore, Extent, ObjectName, Op, Progress, PutOutcome, Remote, RemoteOptions,
    StoreError, Target, TransportKind,
};
use std::io;
use std::sync::Arc;

#[cfg(test)]
mod tests;

/// A read-only chunk store serving an smr artifact's packs.
pub struct RegistryStore {
    blobs: Arc<dyn Blobs>,
    index: Arc<PackIndex>,
    remote: Remote,
    head_start: HeadStartSlot,
}

impl RegistryStore {
    /// A store serving the chunks of `index` from the packs in `blobs`,
    /// with the retry policy of `opts` (deadline, backoff).
    pub fn new(blobs: Arc<dyn Blobs>, index: Arc<PackIndex>, opts: RemoteOptions) -> Self {
        let remote = Remote::new(blobs.describe(), opts);
        RegistryStore {
            blobs,
            index,
            remote,
            head_start: HeadStartSlot::default(),
        }
    }

    /// The store, answering the read `head` holds from it (see
    /// [`crate::head_start`]).
    pub fn with_head_start(mut self, head: HeadStartSlot) -> Self {
        self.head_start = head;
        self
    }

    /// The pack index this store serves.
    pub fn index(&self) -> &Arc<PackIndex> {
        &self.index
    }

    /// One ranged read of `object` (handing `progress` what arrived so
    /// far, if given), its registry error mapped.
    fn read_once(
        &self,
        object: &ObjectName,
        range: ByteRange,
        progress: Option<&Progress>,
    ) -> smr_store::Result<Vec<u8>> {
        let what = Target::of(object, range);
        let Some(len) = range.len else {
            return self
                .blobs
                .get_blob(object.as_str(), self.remote.options().max_object_bytes)
                .map_err(|e| self.error(what, e));
        };
        let head = self.head_start.take(object.as_str(), range.offset, len);
        let bytes = match (head, progress) {
            (Some(head), progress) => {
                tracing::debug!(object = %object, offset = range.offset, len, "read taken from the one started ahead");
                head.finish(progress)
            }
            (None, Some(p)) => self
                .blobs
                .get_blob_range_progressive(object.as_str(), range.offset, len, p),
            (None, None) => self
                .blobs
                .get_blob_range(object.as_str(), range.offset, len),
        }
        .map_err(|e| self.error(what.clone(), e))?;
        if bytes.len() as u64 != len {
            let store = self.remote.store().to_string();
            return Err(StoreError::past_the_end(store, what, bytes.len() as u64));
        }
        Ok(bytes)
    }

    fn error(&self, what: Target, err: RegistryError) -> StoreError {
        let store = self.remote.store().to_string();
        match err {
            RegistryError::NotFound { .. } => StoreError::Missing { what, store },
            // The client has already honoured any Retry-After.
            e if e.is_transient() => StoreError::Transport {
                store,
                what,
                op: Op::Get,
                kind: TransportKind::Interrupted,
                cause: Box::new(e),
            },
            e => StoreError::ChunkIo {
                what,
                store,
                source: io::Error::other(e),
            },
        }
    }
}

impl ChunkStore for RegistryStore {
    fn describe(&self) -> String {
        self.remote.store().to_string()
    }

    /// The chunk's range of its pack, from the pack index (no request).
    fn locate(&self, id: &ChunkId) -> smr_store::Result<Extent> {
        let loc = self.index.locate(id).ok_or_else(|| StoreError::Missing {
            what: Target::Chunk(*id),
            store: self.describe(),
        })?;
        let pack = self
            .index
            .packs()
            .get(loc.pack)
            .ok_or_else(|| StoreError::ChunkIo {
                what: Target::Chunk(*id),
                store: self.describe(),
                source: io::Error::other(format!("pack index names pack {} it lacks", loc.pack)),
            })?;
        Ok(Extent {
            object: ObjectName::new(pack.digest.as_str()),
            range: ByteRange::new(loc.offset, u64::from(loc.len)),
        })
    }

    fn read_ranges(
        &self,
        object: &ObjectName,
        ranges: &[ByteRange],
    ) -> smr_store::Result<Vec<Vec<u8>>> {
        ranges
            .iter()
            .map(|&range| {
                let what = Target::of(object, range);
                self.remote
                    .run_blocking(Op::Get, what, || self.read_once(object, range, None))
            })
            .collect()
    }

    fn read_range_progressive(
        &self,
        object: &ObjectName,
        range: ByteRange,
        progress: &Progress,
    ) -> smr_store::Result<Vec<u8>> {
        let what = Target::of(object, range);
        self.remote.run_blocking(Op::Get, what, || {
            self.read_once(object, range, Some(progress))
        })
    }

    fn put(&self, id: &ChunkId, _data: &[u8]) -> smr_store::Result<PutOutcome> {
        Err(StoreError::ChunkIo {
            what: Target::Chunk(*id),
            store: self.describe(),
            source: io::Error::new(
                io::ErrorKind::Unsupported,
                "a registry store is read-only (chunks reach a registry by pushing an smr artifact)",
            ),
        })
    }

    /// Whether the pack index lists `id` (no network request).
    fn exists(&self, id: &ChunkId) -> smr_store::Result<bool> {
        Ok(self.index.locate(id).is_some())
    }
}
