//! Chunk stores: where sealed chunks live, named by their SHA-256.
//!
//! One small trait, [`ChunkStore`], and its backends. Stores deal in stored
//! (sealed) bytes only; verification against the name happens in the reader
//! (`smr_format::chunk::open_chunk`), so a store can never serve bad bytes
//! unnoticed.

pub mod error;
pub mod local;
pub mod runtime;

pub use error::{Result, StoreError};
pub use local::LocalStore;

use smr_format::ChunkId;

/// What a `put` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    /// The chunk was new and has been written.
    Written,
    /// The chunk was already present; nothing was written.
    Existed,
}

/// A content-addressed store of sealed chunks.
pub trait ChunkStore: Send + Sync {
    /// A human-readable location (path or URL, never credentials).
    fn describe(&self) -> String;
    /// The stored bytes of chunk `id` (unverified: callers verify).
    fn get(&self, id: &ChunkId) -> Result<Vec<u8>>;
    /// Stores `data` under `id` unless present. `id` must be SHA-256 of `data`.
    fn put(&self, id: &ChunkId, data: &[u8]) -> Result<PutOutcome>;
    /// Whether chunk `id` is present.
    fn exists(&self, id: &ChunkId) -> Result<bool>;
}

/// Opens a store from a location. Today: a local directory path or
/// `file://` URL; remote backends come with the remote-store work.
pub fn open_store(location: &str) -> Result<Box<dyn ChunkStore>> {
    if let Some(path) = location.strip_prefix("file://") {
        return Ok(Box::new(LocalStore::open(path)?));
    }
    if location.contains("://") {
        return Err(StoreError::Unsupported(location.to_string()));
    }
    Ok(Box::new(LocalStore::open(location)?))
}
