//! Conversion of an OCI image into chunks in a store, and its recipe.
//!
//! [`convert`] runs the `smr_image` pipeline (source, flattening, ext4
//! writer) into a [`chunker::ChunkingSink`], which cuts the image byte
//! stream into fixed-size chunks, seals them (`smr_format`) and puts them
//! into a `smr_store::ChunkStore`; the chunk table becomes the recipe.

pub mod chunker;
mod convert;

pub use convert::{convert, ConvertError, ConvertOptions, ConvertOutput, DEFAULT_CHUNK_SIZE};
