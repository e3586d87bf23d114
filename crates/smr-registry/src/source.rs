//! `docker://host[:port]/name[:tag][@sha256:…]`: an image in a registry as
//! an [`ImageSource`].
//!
//! Resolution is the other sources' ([`resolve_descriptor`]): the top
//! manifest or index is fetched by tag (or by the pinned digest, verified),
//! and platform selection, manifest and config reading go through
//! [`ImageSource::open_blob`]. Registries serve manifests from the
//! manifests endpoint, not the blobs one, so this source remembers which
//! digests are manifests (the top one, and the entries of every index it
//! read) and serves those from `GET /v2/<name>/manifests/<digest>`, keeping
//! their bytes exactly as the registry stores them. The resolved manifest
//! digest is therefore the digest of the platform manifest in the registry,
//! the same as an `oci:` layout copy of the image with preserved digests
//! gives, and so is the converted recipe.
//!
//! Layers are streamed ([`BlobReader`]): never whole in memory.

use crate::blob_cache::CachedBlobs;
use crate::blobs::Blobs;
use crate::client::{to_io, BlobReader, RegistryOptions, Repository};
use crate::error::RegistryError;
use crate::reference::{ImageRef, DOCKER_PREFIX};
use bytes::Bytes;
use smr_image::source::digest::{parse_digest, sha256_digest};
use smr_image::source::spec::{Descriptor, Index, ManifestKind};
use smr_image::source::{resolve_descriptor, ImageSource, Platform, ResolvedImage, SourceError};
use std::collections::{HashMap, HashSet};
use std::io::{Cursor, Read};
use std::path::PathBuf;
use std::sync::Mutex;

/// Tags listed in a "tag not found" error at most.
const TAGS_SHOWN: usize = 50;

/// An image in a registry.
pub struct RegistrySource {
    reference: ImageRef,
    repo: Repository,
    /// Manifests and indexes read so far, by digest.
    manifests: Mutex<HashMap<String, Bytes>>,
    /// Digests that index entries name as manifests or indexes.
    manifest_digests: Mutex<HashSet<String>>,
    /// What the reference named (tag or digest): media type, bytes.
    top: Mutex<Option<(String, Bytes)>>,
    /// The node's cache of digest-named blobs that manifests fetched by
    /// digest are read through ([`RegistrySource::with_blob_cache`]).
    blob_cache: Option<PathBuf>,
}

impl std::fmt::Debug for RegistrySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistrySource")
            .field("reference", &self.reference.to_string())
            .field("repo", &self.repo)
            .finish_non_exhaustive()
    }
}

impl RegistrySource {
    /// Parses `reference` (`docker://…`, prefix optional) and sets up a
    /// client for its registry. No request is made yet.
    pub fn open(reference: &str, opts: &RegistryOptions) -> Result<Self, RegistryError> {
        Self::new(ImageRef::parse(reference)?, opts)
    }

    /// A source for the parsed `reference`.
    pub fn new(reference: ImageRef, opts: &RegistryOptions) -> Result<Self, RegistryError> {
        let repo = Repository::open(&reference, opts)?;
        Ok(RegistrySource {
            reference,
            repo,
            manifests: Mutex::new(HashMap::new()),
            manifest_digests: Mutex::new(HashSet::new()),
            top: Mutex::new(None),
            blob_cache: None,
        })
    }

    /// The same source reading manifests named by digest (a pinned
    /// reference, index entries) through the node's blob cache in `dir`
    /// ([`CachedBlobs`]): a node that found the image once does not fetch
    /// them again. Tags are always asked of the registry.
    pub fn with_blob_cache(mut self, dir: impl Into<PathBuf>) -> Self {
        self.blob_cache = Some(dir.into());
        self
    }

    /// Manifest `reference` (a tag or a digest), through the blob cache
    /// when there is one.
    fn get_manifest(&self, reference: &str) -> Result<Option<(String, Vec<u8>)>, RegistryError> {
        match &self.blob_cache {
            Some(dir) => CachedBlobs::new(&self.repo, dir.as_path()).get_manifest(reference),
            None => self.repo.get_manifest(reference),
        }
    }

    /// The parsed reference.
    pub fn reference(&self) -> &ImageRef {
        &self.reference
    }

    /// The repository client.
    pub fn repository(&self) -> &Repository {
        &self.repo
    }

    /// The manifest or index the reference named, as `(media type,
    /// bytes)`, once [`ImageSource::resolve`] read it.
    pub fn top(&self) -> Option<(String, Bytes)> {
        lock(&self.top).clone()
    }

    /// The entries of the image index the reference named that belong to
    /// platform manifest `manifest` (its smr artifact and profiles, written
    /// by `--index`, [`crate::index`]); none when it named no index.
    pub fn index_entries(&self, manifest: &str) -> Vec<crate::artifact::Descriptor> {
        match self.top() {
            Some((media_type, bytes)) if media_type == smr_image::media_types::OCI_INDEX => {
                crate::index::entries_for(&bytes, manifest)
            }
            _ => Vec::new(),
        }
    }

    /// Keeps manifest `bytes`; for an index, notes its entries' digests.
    fn remember(&self, digest: &str, media_type: &str, bytes: Bytes) {
        if ManifestKind::of(media_type) == Some(ManifestKind::Index) {
            // A malformed index fails later, in resolve_descriptor.
            if let Ok(index) = serde_json::from_slice::<Index>(&bytes) {
                let mut set = lock(&self.manifest_digests);
                for child in index.manifests {
                    if ManifestKind::of(&child.media_type).is_some() {
                        set.insert(child.digest);
                    }
                }
            }
        }
        lock(&self.manifests).insert(digest.to_string(), bytes);
    }

    /// Blob or manifest `digest` is not in the repository.
    fn not_found(&self, digest: &str) -> SourceError {
        SourceError::BlobNotFound {
            digest: digest.to_string(),
            source_name: self.describe(),
        }
    }

    /// `e` as a [`SourceError`]; `digest` is what was being read.
    fn source_error(&self, e: RegistryError, digest: &str) -> SourceError {
        match e {
            RegistryError::NotFound { .. } => self.not_found(digest),
            RegistryError::DigestMismatch { actual, .. } => SourceError::DigestMismatch {
                digest: digest.to_string(),
                actual,
            },
            RegistryError::Json { what, source } => SourceError::Json { what, source },
            other => SourceError::Io {
                path: PathBuf::from(self.describe()),
                source: to_io(other),
            },
        }
    }

    /// The tag-not-found error, with (some of) the tags that do exist.
    fn tag_not_found(&self, tag: &str) -> SourceError {
        let mut available = self.repo.list_tags().unwrap_or_else(|e| {
            tracing::debug!(error = %e, "listing tags for an error message");
            Vec::new()
        });
        if available.len() > TAGS_SHOWN {
            let more = available.len() - TAGS_SHOWN;
            available.truncate(TAGS_SHOWN);
            available.push(format!("… ({more} more)"));
        }
        SourceError::TagNotFound {
            tag: tag.to_string(),
            available,
        }
    }

    /// Manifest `digest` (remembered, or fetched from the manifests
    /// endpoint and verified).
    fn manifest(&self, digest: &str) -> Result<Bytes, SourceError> {
        if let Some(b) = lock(&self.manifests).get(digest) {
            return Ok(b.clone());
        }
        match self.get_manifest(digest) {
            Ok(Some((media_type, bytes))) => {
                let bytes = Bytes::from(bytes);
                self.remember(digest, &media_type, bytes.clone());
                Ok(bytes)
            }
            Ok(None) => Err(self.not_found(digest)),
            Err(e) => Err(self.source_error(e, digest)),
        }
    }
}

impl RegistrySource {
    /// The descriptor of the reference's top manifest (a tag's or the
    /// pinned digest's: an index or an image manifest), fetched and
    /// remembered; a pinned digest is checked. Fetched once per source: a
    /// tag read again (`resolve_manifest`, then `resolve`) is the manifest
    /// read first.
    fn top_descriptor(&self) -> Result<Descriptor, SourceError> {
        if let Some((media_type, bytes)) = self.top() {
            return Ok(Descriptor {
                media_type,
                digest: sha256_digest(&bytes),
                size: bytes.len() as u64,
                platform: None,
                annotations: None,
            });
        }
        let at = self.reference.manifest_reference();
        tracing::debug!(source = %self.describe(), %at, "resolving");
        let (media_type, bytes) = match self.get_manifest(at) {
            Ok(Some(v)) => v,
            Ok(None) => {
                return Err(match &self.reference.digest {
                    Some(d) => self.not_found(d),
                    None => self.tag_not_found(at),
                })
            }
            Err(e) => return Err(self.source_error(e, at)),
        };
        let digest = sha256_digest(&bytes);
        if let Some(pinned) = &self.reference.digest {
            if *pinned != digest {
                return Err(SourceError::DigestMismatch {
                    digest: pinned.clone(),
                    actual: digest,
                });
            }
        }
        let desc = Descriptor {
            media_type: media_type.clone(),
            digest: digest.clone(),
            size: bytes.len() as u64,
            platform: None,
            annotations: None,
        };
        let bytes = Bytes::from(bytes);
        *lock(&self.top) = Some((media_type.clone(), bytes.clone()));
        self.remember(&digest, &media_type, bytes);
        Ok(desc)
    }

    /// The digest of the image manifest for `platform` the reference
    /// names, and whether the reference named it directly (no index on
    /// the way). Reads the tag and any indexes, neither the manifest
    /// itself nor its config: what finding an image's smr artifact needs
    /// (its subject), a round trip or two less than
    /// [`ImageSource::resolve`].
    pub fn resolve_manifest(&self, platform: &Platform) -> Result<(String, bool), SourceError> {
        let top = self.top_descriptor()?;
        let (manifest, direct) = smr_image::source::select_manifest(self, &top, platform)?;
        Ok((manifest.digest, direct))
    }
}

impl RegistrySource {
    /// [`ImageSource::resolve`], reading what follows the top manifest
    /// (indexes, the manifest, its config) through `via`: a wrapper of
    /// this source, e.g. one that keeps what it reads.
    pub fn resolve_via(
        &self,
        via: &dyn ImageSource,
        platform: &Platform,
    ) -> Result<ResolvedImage, SourceError> {
        let desc = self.top_descriptor()?;
        resolve_descriptor(via, &desc, platform)
    }
}

impl ImageSource for RegistrySource {
    fn resolve(&self, platform: &Platform) -> Result<ResolvedImage, SourceError> {
        self.resolve_via(self, platform)
    }

    fn open_blob(&self, digest: &str) -> Result<Box<dyn Read + Send + '_>, SourceError> {
        parse_digest(digest)?;
        let is_manifest = lock(&self.manifests).contains_key(digest)
            || lock(&self.manifest_digests).contains(digest);
        if is_manifest {
            return Ok(Box::new(Cursor::new(self.manifest(digest)?)));
        }
        let reader: BlobReader = self
            .repo
            .open_blob(digest)
            .map_err(|e| self.source_error(e, digest))?;
        Ok(Box::new(reader))
    }

    fn describe(&self) -> String {
        self.reference.to_string()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Opens any image source: `docker://…` here, everything else through
/// [`smr_image::source::open_source`]. What the CLI calls.
pub fn open_source(
    reference: &str,
    opts: &RegistryOptions,
) -> Result<Box<dyn ImageSource>, SourceError> {
    if !reference.starts_with(DOCKER_PREFIX) {
        return smr_image::source::open_source(reference);
    }
    match RegistrySource::open(reference, opts) {
        Ok(s) => Ok(Box::new(s)),
        Err(RegistryError::BadReference { reference, reason }) => Err(SourceError::Invalid {
            what: format!("image reference `{reference}`"),
            problem: reason,
        }),
        Err(e) => Err(SourceError::Io {
            path: PathBuf::from(reference),
            source: to_io(e),
        }),
    }
}
