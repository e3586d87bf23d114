//! Fetching one chunk of an image from a store, verified and decrypted.

use smr_format::{ChunkEntry, ChunkKey, FormatError, Recipe};
use smr_store::{ChunkStore, StoreError};

/// Why a chunk could not be produced.
#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    /// The store failed or lacks the chunk.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The fetcher's request for it failed.
    #[error(transparent)]
    Fetch(#[from] crate::fetch::FetchError),
    /// The stored bytes failed verification or decoding.
    #[error(transparent)]
    Format(#[from] FormatError),
}

impl ChunkError {
    /// The errno a reader of the image should see.
    pub fn to_errno(&self) -> i32 {
        libc::EIO
    }
}

/// An image's recipe with its opened key table: what is needed to turn
/// stored chunks into plaintext.
#[derive(Debug, Clone)]
pub struct ImageChunks {
    /// The recipe.
    pub recipe: Recipe,
    keys: Option<Vec<ChunkKey>>,
}

impl ImageChunks {
    /// Pairs a recipe with its keys (see [`Recipe::keys`]).
    pub fn new(recipe: Recipe, keys: Option<Vec<ChunkKey>>) -> Self {
        ImageChunks { recipe, keys }
    }

    /// Whether the recipe is encrypted but no keys were given.
    pub fn keys_missing(&self) -> bool {
        self.recipe.encrypted() && self.keys.is_none()
    }

    /// The key of the chunk at position `pos` of the chunk table (`None`
    /// for unencrypted recipes or when keys were not given).
    pub fn key(&self, pos: usize) -> Option<&ChunkKey> {
        self.keys.as_ref().and_then(|k| k.get(pos))
    }

    /// The secret a startup pack of this image is keyed and tagged with
    /// (from every chunk key), or `None` when the recipe is not encrypted or
    /// its keys were not given.
    pub fn pack_secret(&self) -> Option<smr_format::startup::PackSecret> {
        let keys = self.keys.as_ref().filter(|k| !k.is_empty())?;
        Some(smr_format::startup::PackSecret::of_keys(keys))
    }

    /// Fetches the `pos`-th stored chunk from `store`, verifies its hash and
    /// returns its plaintext. Without keys for an encrypted recipe, only the
    /// hash is checked and the ciphertext is returned.
    pub fn fetch(
        &self,
        store: &dyn ChunkStore,
        pos: usize,
    ) -> Result<(ChunkEntry, Vec<u8>), ChunkError> {
        let entry = self.entry_at(pos)?;
        let stored = store.get(&entry.id)?;
        self.open(pos, stored)
    }

    /// Verifies `stored` (bytes of the `pos`-th chunk obtained elsewhere, e.g.
    /// from the node cache) against its name and returns the plaintext, as
    /// [`ImageChunks::fetch`] does after its `get`.
    pub fn open(&self, pos: usize, stored: Vec<u8>) -> Result<(ChunkEntry, Vec<u8>), ChunkError> {
        let entry = self.entry_at(pos)?;
        smr_format::chunk::verify(&entry.id, &stored)?;
        Ok((entry, self.open_verified(pos, stored)?))
    }

    /// Like [`ImageChunks::open`] for stored bytes whose SHA-256 the caller
    /// has already checked against the chunk's name (the node cache checks
    /// every entry it inserts or loads): decrypts and decompresses without
    /// hashing again.
    pub fn open_verified(&self, pos: usize, stored: Vec<u8>) -> Result<Vec<u8>, ChunkError> {
        let entry = self.entry_at(pos)?;
        if self.keys_missing() {
            return Ok(stored);
        }
        let plain_len = self.recipe.chunk_len(entry.index) as usize;
        Ok(smr_format::chunk::decode_verified(
            &entry.id,
            self.key(pos),
            entry.compressed,
            stored,
            plain_len,
        )?)
    }

    fn entry_at(&self, pos: usize) -> Result<ChunkEntry, ChunkError> {
        Ok(*self
            .recipe
            .chunks
            .get(pos)
            .ok_or_else(|| FormatError::Recipe(format!("no chunk at table position {pos}")))?)
    }
}
