//! Conversion of an OCI image into chunks in a store, and its recipe.
//!
//! [`convert`] runs the `smr_image` pipeline (source, flattening, ext4
//! writer) into a [`chunker::ChunkingSink`], which cuts the image byte
//! stream into fixed-size chunks, seals them (`smr_format`) and puts them
//! into a `smr_store::ChunkStore`; the chunk table becomes the recipe.
//! [`cdc`] finds content-defined boundaries on 4 KiB blocks (used by the
//! chunking study, `examples/dedup_study.rs`).

pub mod cdc;
pub mod chunker;
mod convert;

/// The version of the image layout the converter writes: which ext4
/// layout, chunking and recipe a source converts to. Conversion is
/// deterministic within one layout version; any change to what a source
/// converts to bumps it (recorded in pushed artifacts, checked by `smr
/// verify --reproduce`).
pub const LAYOUT_VERSION: u32 = 1;

pub use convert::{convert, ConvertError, ConvertOptions, ConvertOutput, DEFAULT_CHUNK_SIZE};
