//! One repository of a registry, as the artifact and store code sees it.
//!
//! [`Blobs`] is deliberately small and synchronous: the registry client
//! ([`crate::client`]) implements it over HTTP; tests may implement it over
//! a directory. All digests are `sha256:<64 hex>` strings.

use crate::error::Result;

/// Blobs and manifests of one repository (`host/name`).
pub trait Blobs: Send + Sync {
    /// `host/name` of the repository (never credentials).
    fn describe(&self) -> String;

    /// The size of blob `digest`, or `None` when the repository lacks it.
    fn blob_size(&self, digest: &str) -> Result<Option<u64>>;

    /// The whole blob `digest`, verified against its digest; a blob of
    /// more than `limit` bytes is an error, found while it is read.
    fn get_blob(&self, digest: &str, limit: u64) -> Result<Vec<u8>>;

    /// `len` bytes of blob `digest` from `offset` (HTTP Range). Not
    /// verifiable here: callers verify what they cut out of it.
    fn get_blob_range(&self, digest: &str, offset: u64, len: u64) -> Result<Vec<u8>>;

    /// [`Blobs::get_blob_range`], handing `progress` the bytes received so
    /// far while they arrive (see
    /// [`smr_store::ChunkStore::read_range_progressive`]). By default the
    /// answer comes whole and `progress` is never called.
    fn get_blob_range_progressive(
        &self,
        digest: &str,
        offset: u64,
        len: u64,
        progress: &smr_store::Progress,
    ) -> Result<Vec<u8>> {
        let _ = progress;
        self.get_blob_range(digest, offset, len)
    }

    /// Starts reading `len` bytes of blob `digest` from `offset` in the
    /// background, for a reader that will ask for exactly that range
    /// ([`crate::head_start`]); `None` if this repository cannot (the
    /// default: the reader then reads as usual).
    fn head_start(
        &self,
        digest: &str,
        offset: u64,
        len: u64,
    ) -> Option<crate::head_start::HeadStart> {
        let _ = (digest, offset, len);
        None
    }

    /// Whether blob `digest` is at hand without a request (a node's blob
    /// cache, [`crate::blob_cache`]); by default `false`.
    fn holds_blob(&self, digest: &str) -> bool {
        let _ = digest;
        false
    }

    /// Uploads `data` as blob `digest` unless present (then a no-op).
    /// Returns whether bytes were uploaded.
    fn push_blob(&self, digest: &str, data: &[u8]) -> Result<bool>;

    /// Mounts blob `digest` from repository `from` of the same registry
    /// (OCI distribution `mount=`/`from=`); `false` when it could not
    /// (then the caller uploads). By default nothing can be mounted.
    fn mount_blob(&self, digest: &str, from: &str) -> Result<bool> {
        let _ = (digest, from);
        Ok(false)
    }

    /// The manifest named by tag or digest `reference` as
    /// `(media type, bytes)`, or `None` when it does not exist. Bytes fetched
    /// by digest are verified.
    fn get_manifest(&self, reference: &str) -> Result<Option<(String, Vec<u8>)>>;

    /// Pushes manifest `bytes` of `media_type` under tag or digest
    /// `reference`; returns its digest.
    fn put_manifest(&self, reference: &str, media_type: &str, bytes: &[u8]) -> Result<String>;

    /// The referrers API (`GET /v2/<name>/referrers/<digest>`): the image
    /// index listing manifests whose `subject` is `digest`, or `None` when
    /// the registry does not implement the API (404), in which case callers
    /// use the `sha256-<hex>` tag-schema fallback.
    fn referrers(&self, digest: &str) -> Result<Option<Vec<u8>>>;
}
