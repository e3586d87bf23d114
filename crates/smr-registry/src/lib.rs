//! smr and OCI registries.
//!
//! - [`blobs`]: the [`blobs::Blobs`] trait, one repository's blobs and
//!   manifests, as the rest of this crate sees a registry.
//! - [`blob_cache`]: a node-local cache of digest-named blobs and
//!   manifests ([`blob_cache::CachedBlobs`]).
//! - [`error`]: the crate error, [`RegistryError`].
//! - [`pack`]: packs (chunks concatenated into blobs) and the pack index.
//! - [`media_types`]: the smr artifacts' media types.
//! - [`artifact`]: the smr artifact manifest.
//! - [`push`]: pushing a converted image as an smr artifact.
//! - [`discover`]: finding and opening the smr artifact of an image.
//! - [`profile`]: startup profiles pushed next to the smr artifact.
//! - [`signature`]: cosign-compatible signatures of smr artifacts.
//! - [`index`]: `--index` mode, the smr artifact inside the image index.
//! - [`gc`]: deleting smr referrers whose image is gone.
//! - [`store`]: [`RegistryStore`], a chunk store over an artifact's packs.
//! - [`reference`](mod@reference): `docker://host[:port]/name[:tag][@digest]` references.
//! - [`client`]: the registry client ([`client::Registry`],
//!   [`client::Repository`]), over oci-client.
//! - [`source`]: `docker://` image sources ([`source::RegistrySource`]).

pub mod artifact;
pub mod blob_cache;
pub mod blobs;
pub mod client;
pub mod discover;
pub mod error;
pub mod gc;
pub mod head_start;
pub mod index;
pub mod media_types;
pub mod pack;
pub mod profile;
pub mod push;
pub mod reference;
pub mod signature;
pub mod source;
pub mod store;
#[cfg(test)]
mod testing;

pub use blobs::Blobs;
pub use error::{RegistryError, Result};
pub use store::RegistryStore;
