//! smr's pure formats: chunk ids, convergent chunk encryption, the recipe.
//!
//! Nothing here does I/O beyond byte slices; everything is deterministic.

pub mod config;
