//! Errors of the node cache.

use std::path::PathBuf;
use std::sync::Arc;

use smr_format::ChunkId;

use crate::chunks::ChunkError;

/// Result alias for the cache.
pub type Result<T, E = CacheError> = std::result::Result<T, E>;

/// Why the cache could not produce a chunk or run an operation.
///
/// Failures of the cache directory itself while serving (a full disk, an
/// unreadable entry) are not errors: the cache logs them and falls back to
/// the store. Only a chunk that cannot be fetched or decoded fails a read.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// The store could not deliver the chunk, or delivered bytes whose
    /// SHA-256 is not the chunk's name.
    #[error("fetching chunk {id}: {source}")]
    Fetch {
        /// The chunk.
        id: ChunkId,
        /// What the store (or the verification) said (boxed: store errors
        /// are large, and this error travels through every read).
        source: Box<ChunkError>,
    },
    /// The verified stored bytes could not be decrypted or decompressed.
    #[error("decoding chunk {id}: {source}")]
    Decode {
        /// The chunk.
        id: ChunkId,
        /// What went wrong.
        source: Box<ChunkError>,
    },
    /// An I/O error on the cache directory (opening, scanning, pruning).
    #[error("cache {path}: {source}", path = path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The thread fetching the chunk for everyone panicked.
    #[error("the fetch of chunk {id} panicked")]
    Panicked {
        /// The chunk.
        id: ChunkId,
    },
    /// The same failure, seen by another reader waiting on the same fetch
    /// (single flight shares one outcome among all waiters).
    #[error(transparent)]
    Shared(Arc<CacheError>),
}

impl CacheError {
    /// The underlying error, looking through [`CacheError::Shared`].
    pub fn root(&self) -> &CacheError {
        match self {
            CacheError::Shared(inner) => inner.root(),
            other => other,
        }
    }

    /// The chunk concerned, if the error is about one chunk.
    pub fn chunk(&self) -> Option<ChunkId> {
        match self.root() {
            CacheError::Fetch { id, .. }
            | CacheError::Decode { id, .. }
            | CacheError::Panicked { id } => Some(*id),
            _ => None,
        }
    }

    /// The errno a reader of the image should see.
    pub fn to_errno(&self) -> i32 {
        libc::EIO
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        CacheError::Io {
            path: path.into(),
            source,
        }
    }
}
