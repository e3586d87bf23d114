//! smr's pure formats: chunk ids, convergent chunk encryption, the recipe,
//! startup profiles.
//!
//! Nothing here does I/O beyond byte slices and key files; everything is
//! deterministic. `docs/FORMAT.md` specifies the bytes.

pub mod chunk;
pub mod config;
mod ctr;
pub mod error;
pub mod file;
pub mod filemap;
pub mod grid;
pub mod key;
pub mod pack;
pub mod profile;
pub mod recipe;
pub mod startup;
pub mod varint;

pub use chunk::{ChunkCodec, ChunkId, ChunkKey, SealedChunk};
pub use error::{FormatError, Result};
pub use file::read_bounded;
pub use filemap::FileMap;
pub use grid::{CdcSizes, ChunkGrid};
pub use key::OwnerKey;
pub use profile::Profile;
pub use recipe::{ChunkEntry, Recipe};
