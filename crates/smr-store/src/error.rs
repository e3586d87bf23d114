//! Errors of chunk stores.

use smr_format::ChunkId;

/// Result alias for this crate.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// What went wrong talking to a store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The chunk is not in the store.
    #[error("chunk {id} is missing from store {store}")]
    Missing {
        /// The chunk.
        id: ChunkId,
        /// The store's location.
        store: String,
    },
    /// An I/O error on a chunk.
    #[error("store {store}: chunk {id}: {source}")]
    ChunkIo {
        /// The chunk.
        id: ChunkId,
        /// The store's location.
        store: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// An I/O error on the store itself.
    #[error("store {store}: {source}")]
    Io {
        /// The store's location.
        store: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The location names a backend this build does not support.
    #[error("unsupported store location `{0}` (expected a directory path or file:// URL)")]
    Unsupported(String),
}

impl StoreError {
    /// The errno a reader should see for this error.
    pub fn to_errno(&self) -> i32 {
        libc::EIO
    }
}
