//! A synchronous registry client over [oci-client](oci_client).
//!
//! [`Registry`] is one registry host (credentials, HTTP or HTTPS, timeouts,
//! retry policy); [`Registry::repository`] gives a [`Repository`], which
//! implements [`Blobs`]. Every call runs on the process-wide network runtime
//! ([`smr_store::runtime::block_on`]), so it may be made from any thread
//! that may block, but not from inside that runtime.
//!
//! oci-client does the HTTP work: the bearer-token flow (challenge, token
//! request with basic credentials, token cache), blob and manifest pulls
//! and pushes (monolithic and chunked uploads, cross-repository mounts),
//! ranged blob streams and tag lists. Written here: the retry loop
//! (exponential back-off with jitter, `Retry-After` where we see the
//! response, one credential refresh after a 401), error classification,
//! the credential lookup (`auth`), a streaming `Read` bridge
//! ([`BlobReader`]) and two requests oci-client lacks (blob `HEAD` with
//! the size, and the referrers API without its built-in tag fallback; see
//! `core`).
//!
//! Credentials never appear in `Debug` output, logs or errors: the
//! password is scrubbed from every message that leaves the client.

mod auth;
mod classify;
mod core;
mod ops;
pub mod options;
mod stream;
#[cfg(test)]
mod test_server;

pub use options::{Credentials, RegistryOptions, RetryPolicy};
pub use stream::{to_io, BlobReader};

use crate::blobs::Blobs;
use crate::error::{RegistryError, Result};
use crate::head_start::HeadStart;
use crate::reference::{ImageRef, Scheme};
use bytes::Bytes;
use smr_store::runtime::block_on;
use std::future::Future;
use std::sync::Arc;

/// One registry host.
#[derive(Clone)]
pub struct Registry {
    core: Arc<core::Core>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.core.fmt(f)
    }
}

impl Registry {
    /// A client for `registry` (`host[:port]` as in references). Looks up
    /// credentials (`opts.creds`, else the docker config, else none) and
    /// picks HTTP for loopback and `opts.insecure` hosts, HTTPS otherwise.
    /// No request is made yet.
    pub fn new(registry: &str, opts: &RegistryOptions) -> Result<Registry> {
        crate::reference::check_host(registry).map_err(|reason| RegistryError::BadReference {
            reference: registry.to_string(),
            reason,
        })?;
        let auth = auth::resolve(registry, opts)?;
        tracing::debug!(registry, credentials = %auth.source, "registry client");
        let core = Arc::new(core::Core::new(registry, auth, opts)?);
        Ok(Registry { core })
    }

    /// The registry as given (`host[:port]`, `docker.io`).
    pub fn name(&self) -> &str {
        &self.core.registry
    }

    /// Whether requests use plain HTTP or HTTPS.
    pub fn scheme(&self) -> Scheme {
        self.core.scheme
    }

    /// Where the credentials came from (`--creds`, `docker config PATH`,
    /// `no credentials`); never the credentials themselves.
    pub fn credential_source(&self) -> &str {
        &self.core.auth.source
    }

    /// Opens `n` spare connections in the background for requests about
    /// to be sent at once (see `Core::warm_up`): a lazy start's lookups
    /// then pay no handshake after the first request's.
    pub fn warm_up(&self, n: usize) {
        self.core.warm_up(n);
    }

    /// Repository `name` (e.g. `library/debian`) of this registry.
    pub fn repository(&self, name: &str) -> Result<Repository> {
        // Reuse the reference grammar for the name.
        let probe = format!("{}/{name}", self.core.registry);
        let parsed = ImageRef::parse(&probe)?;
        if parsed.repository != name || parsed.tag.as_deref() != Some("latest") {
            return Err(RegistryError::BadReference {
                reference: probe,
                reason: format!("`{name}` is not a repository name"),
            });
        }
        Ok(Repository {
            core: self.core.clone(),
            name: name.to_string(),
        })
    }
}

/// One repository (`host/name`) of a registry.
#[derive(Clone)]
pub struct Repository {
    core: Arc<core::Core>,
    name: String,
}

impl std::fmt::Debug for Repository {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Repository")
            .field("repo", &self.core.repo_name(&self.name))
            .field("credentials", &self.core.auth.source)
            .finish()
    }
}

impl Repository {
    /// Opens the repository of `reference` (its tag and digest are not
    /// used here).
    pub fn open(reference: &ImageRef, opts: &RegistryOptions) -> Result<Repository> {
        Registry::new(&reference.registry, opts)?.repository(&reference.repository)
    }

    /// The repository name (without host).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The registry this repository belongs to.
    pub fn registry(&self) -> Registry {
        Registry {
            core: self.core.clone(),
        }
    }

    /// Runs `f(core, name)` on the network runtime and waits for it.
    fn run<T, F, Fut>(&self, f: F) -> T
    where
        F: FnOnce(Arc<core::Core>, String) -> Fut,
        Fut: Future<Output = T> + Send + 'static,
        T: Send + 'static,
    {
        block_on(f(self.core.clone(), self.name.clone()))
    }

    /// `len` bytes of blob `digest` from `offset`, handing `progress`
    /// what arrived so far if given.
    fn blob_range(
        &self,
        digest: &str,
        offset: u64,
        len: u64,
        progress: Option<smr_store::Progress>,
    ) -> Result<Vec<u8>> {
        let digest = digest.to_string();
        self.run(move |c, repo| async move {
            c.get_blob_range(&repo, &digest, offset, len, progress)
                .await
        })
    }

    /// Streams blob `digest` (not buffered whole; the caller verifies it).
    /// Waits for the first bytes, so a missing blob or refused credentials
    /// fail here rather than on the first read.
    pub fn open_blob(&self, digest: &str) -> Result<BlobReader> {
        if smr_image::source::digest::parse_digest(digest).is_err() {
            return Err(self.core.finish(RegistryError::Protocol {
                repo: self.describe(),
                what: format!("GET blob {digest}"),
                reason: format!(
                    "digest {digest:?} is not sha256:<64 lowercase hex digits>; not requested"
                ),
            }));
        }
        let mut r = BlobReader::start(self.core.clone(), self.name.clone(), digest.to_string());
        r.prime()?;
        Ok(r)
    }

    /// [`Blobs::push_blob`], mounting the blob from repository `from` of
    /// the same registry when it is there (no bytes are sent then).
    /// Returns whether bytes were uploaded.
    pub fn push_blob_from(&self, digest: &str, data: &[u8], from: Option<&str>) -> Result<bool> {
        let digest = digest.to_string();
        let data = Bytes::copy_from_slice(data);
        let from = from.map(str::to_string);
        self.run(
            move |c, repo| async move { c.push_blob(&repo, &digest, data, from.as_deref()).await },
        )
    }

    /// All tags, sorted; empty when the repository does not exist.
    pub fn list_tags(&self) -> Result<Vec<String>> {
        self.run(|c, repo| async move { c.list_tags(&repo).await })
    }

    /// Deletes manifest `digest` (and every tag naming it); `false` if
    /// there was none.
    pub fn delete_manifest(&self, digest: &str) -> Result<bool> {
        let digest = digest.to_string();
        self.run(move |c, repo| async move { c.delete_manifest(&repo, &digest).await })
    }
}

impl Blobs for Repository {
    fn describe(&self) -> String {
        self.core.repo_name(&self.name)
    }

    fn blob_size(&self, digest: &str) -> Result<Option<u64>> {
        let digest = digest.to_string();
        self.run(move |c, repo| async move { c.blob_size(&repo, &digest).await })
    }

    fn get_blob(&self, digest: &str, limit: u64) -> Result<Vec<u8>> {
        let digest = digest.to_string();
        self.run(move |c, repo| async move { c.get_blob(&repo, &digest, limit).await })
    }

    fn get_blob_range(&self, digest: &str, offset: u64, len: u64) -> Result<Vec<u8>> {
        self.blob_range(digest, offset, len, None)
    }

    fn get_blob_range_progressive(
        &self,
        digest: &str,
        offset: u64,
        len: u64,
        progress: &smr_store::Progress,
    ) -> Result<Vec<u8>> {
        self.blob_range(digest, offset, len, Some(progress.clone()))
    }

    fn head_start(&self, digest: &str, offset: u64, len: u64) -> Option<HeadStart> {
        let (core, repo, blob) = (self.core.clone(), self.name.clone(), digest.to_string());
        Some(HeadStart::spawn(
            &self.describe(),
            digest,
            offset,
            len,
            move |progress| async move {
                core.get_blob_range(&repo, &blob, offset, len, Some(progress))
                    .await
            },
        ))
    }

    fn push_blob(&self, digest: &str, data: &[u8]) -> Result<bool> {
        self.push_blob_from(digest, data, None)
    }

    /// `false` when the registry declined (e.g. `from` lacks the blob).
    fn mount_blob(&self, digest: &str, from: &str) -> Result<bool> {
        let digest = digest.to_string();
        let from = from.to_string();
        self.run(move |c, repo| async move { c.mount_blob(&repo, &digest, &from).await })
    }

    fn get_manifest(&self, reference: &str) -> Result<Option<(String, Vec<u8>)>> {
        let at = reference.to_string();
        self.run(move |c, repo| async move { c.get_manifest(&repo, &at).await })
    }

    fn put_manifest(&self, reference: &str, media_type: &str, bytes: &[u8]) -> Result<String> {
        let at = reference.to_string();
        let media_type = media_type.to_string();
        let bytes = Bytes::copy_from_slice(bytes);
        self.run(move |c, repo| async move { c.put_manifest(&repo, &at, &media_type, bytes).await })
    }

    fn referrers(&self, digest: &str) -> Result<Option<Vec<u8>>> {
        let digest = digest.to_string();
        self.run(move |c, repo| async move { c.referrers(&repo, &digest).await })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_checked_and_secrets_stay_out_of_debug() {
        let opts = RegistryOptions {
            creds: Some(Credentials {
                username: "u".into(),
                password: "hunter2".into(),
            }),
            ..Default::default()
        };
        let r = Registry::new("127.0.0.1:5000", &opts).expect("client");
        assert_eq!(r.scheme(), Scheme::Http);
        assert_eq!(r.name(), "127.0.0.1:5000");
        let repo = r.repository("smr/x").expect("repo");
        assert_eq!(repo.describe(), "127.0.0.1:5000/smr/x");
        for dbg in [format!("{r:?}"), format!("{repo:?}")] {
            assert!(!dbg.contains("hunter2"), "{dbg}");
        }
        assert_eq!(
            Registry::new("reg.example", &opts)
                .expect("client")
                .scheme(),
            Scheme::Https
        );
        for bad in ["http://x", "a b", "", "h:0"] {
            assert!(Registry::new(bad, &opts).is_err(), "{bad}");
        }
        for bad in ["UPPER", "a:tag", "a@sha256:00", "", "a//b"] {
            assert!(r.repository(bad).is_err(), "{bad}");
        }
    }
}
