//! smr and OCI registries.
//!
//! - [`blobs`]: the [`blobs::Blobs`] trait, one repository's blobs and
//!   manifests, as the rest of this crate sees a registry.
//! - [`error`]: [`RegistryError`].

pub mod blobs;
pub mod error;

pub use blobs::Blobs;
pub use error::{RegistryError, Result};
