//! A node-local cache of the small, content-addressed things an image's
//! smr artifact is found by: manifests fetched by digest, the recipe, the
//! pack index, profiles and signatures.
//!
//! Opening a registry image takes a round trip per step (tag, artifact
//! manifest, recipe and pack index, profile), and on a node the same image
//! is opened again and again: by `smr mount` and then by its FUSE server,
//! by the snapshotter at a pull and at every container. Whatever is named
//! by its digest never changes, so [`CachedBlobs`] keeps it on disk and
//! answers from there; what can change (tags, referrers, blob existence,
//! ranged reads of packs) always goes to the registry. Every cached entry
//! is verified against its digest when it is read (a bad one is deleted
//! and fetched again), so the cache can make an open faster, never
//! different. Entries are few and small (an image's are its recipe and
//! pack index: hundreds of KB); past [`MAX_ENTRIES`] the least recently
//! used go.

use crate::artifact::digest_of;
use crate::{Blobs, Result};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

/// Most entries a cache keeps (blobs and manifests together).
pub const MAX_ENTRIES: usize = 1024;

/// Serial numbers of temporary files, unique within this process.
static TMP_SERIAL: AtomicU64 = AtomicU64::new(0);

/// [`Blobs`] that answers digest-named reads from a directory first (see
/// the module docs); everything else goes to `inner`.
pub struct CachedBlobs<'a> {
    inner: &'a dyn Blobs,
    dir: PathBuf,
    max_entries: usize,
}

impl<'a> CachedBlobs<'a> {
    /// `inner`'s blobs, cached in `dir` (created when first written).
    pub fn new(inner: &'a dyn Blobs, dir: impl Into<PathBuf>) -> Self {
        CachedBlobs {
            inner,
            dir: dir.into(),
            max_entries: MAX_ENTRIES,
        }
    }

    /// The same cache keeping at most `n` entries.
    pub fn with_max_entries(mut self, n: usize) -> Self {
        self.max_entries = n;
        self
    }

    /// The file of `digest` in `kind` (`blobs` or `manifests`), if the
    /// digest is a well-formed SHA-256 digest (nothing else names a file).
    fn path(&self, kind: &str, digest: &str) -> Option<PathBuf> {
        let hex = digest.strip_prefix("sha256:")?;
        let ok = hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        ok.then(|| self.dir.join(kind).join(hex))
    }

    /// The entry's bytes if it is there and its content (from
    /// `body_at(bytes)` on) still matches `digest`; a mismatching entry is
    /// removed.
    fn read(&self, path: &Path, digest: &str, body_at: fn(&[u8]) -> usize) -> Option<Vec<u8>> {
        let bytes = fs::read(path).ok()?;
        if digest_of(&bytes[body_at(&bytes)..]) != digest {
            tracing::warn!(path = %path.display(), %digest, "cached entry does not match its digest; fetching it again");
            let _ = fs::remove_file(path);
            return None;
        }
        // Recently used: the last to be evicted.
        if let Ok(f) = fs::File::options().append(true).open(path) {
            let _ = f.set_modified(SystemTime::now());
        }
        Some(bytes)
    }

    /// Stores `bytes` at `path` (atomically: a reader sees all or none of
    /// it); failures only cost the next open a round trip.
    fn write(&self, path: &Path, bytes: &[&[u8]]) {
        let Some(dir) = path.parent() else { return };
        let tmp = dir.join(format!(
            ".tmp-{}-{}",
            std::process::id(),
            TMP_SERIAL.fetch_add(1, Ordering::Relaxed)
        ));
        let written = fs::create_dir_all(dir).and_then(|()| {
            let mut f = fs::File::create(&tmp)?;
            for b in bytes {
                f.write_all(b)?;
            }
            fs::rename(&tmp, path)
        });
        if let Err(e) = written {
            tracing::debug!(path = %path.display(), error = %e, "not cached");
            let _ = fs::remove_file(&tmp);
            return;
        }
        self.evict();
    }

    /// Removes the least recently used entries beyond the most it keeps.
    fn evict(&self) {
        let mut all: Vec<(SystemTime, PathBuf)> = ["blobs", "manifests"]
            .iter()
            .filter_map(|k| fs::read_dir(self.dir.join(k)).ok())
            .flatten()
            .flatten()
            .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
            .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
            .collect();
        if all.len() <= self.max_entries {
            return;
        }
        all.sort();
        for (_, p) in &all[..all.len() - self.max_entries] {
            let _ = fs::remove_file(p);
        }
    }
}

/// Where a cached manifest's bytes start: after its media type's line.
fn manifest_body_at(entry: &[u8]) -> usize {
    entry
        .iter()
        .position(|&c| c == b'\n')
        .map_or(entry.len(), |i| i + 1)
}

impl Blobs for CachedBlobs<'_> {
    fn describe(&self) -> String {
        self.inner.describe()
    }

    fn blob_size(&self, digest: &str) -> Result<Option<u64>> {
        self.inner.blob_size(digest)
    }

    fn get_blob(&self, digest: &str, limit: u64) -> Result<Vec<u8>> {
        let path = self.path("blobs", digest);
        if let Some(p) = &path {
            if let Some(b) = self.read(p, digest, |_| 0) {
                if b.len() as u64 <= limit {
                    return Ok(b);
                }
            }
        }
        let bytes = self.inner.get_blob(digest, limit)?;
        // The inner store verified it against `digest`; checked again, as
        // it is what every later open will get.
        if let Some(p) = path.filter(|_| digest_of(&bytes) == digest) {
            self.write(&p, &[&bytes]);
        }
        Ok(bytes)
    }

    fn get_blob_range(&self, digest: &str, offset: u64, len: u64) -> Result<Vec<u8>> {
        self.inner.get_blob_range(digest, offset, len)
    }

    fn get_blob_range_progressive(
        &self,
        digest: &str,
        offset: u64,
        len: u64,
        progress: &smr_store::Progress,
    ) -> Result<Vec<u8>> {
        self.inner
            .get_blob_range_progressive(digest, offset, len, progress)
    }

    fn holds_blob(&self, digest: &str) -> bool {
        self.path("blobs", digest).is_some_and(|p| p.is_file())
    }

    /// Started by the registry: the cache keeps manifests and small blobs,
    /// not the ranges read ahead.
    fn head_start(
        &self,
        digest: &str,
        offset: u64,
        len: u64,
    ) -> Option<crate::head_start::HeadStart> {
        self.inner.head_start(digest, offset, len)
    }

    fn push_blob(&self, digest: &str, data: &[u8]) -> Result<bool> {
        self.inner.push_blob(digest, data)
    }

    fn mount_blob(&self, digest: &str, from: &str) -> Result<bool> {
        self.inner.mount_blob(digest, from)
    }

    /// A manifest named by digest comes from the cache when it is there
    /// (stored as its media type, a newline, then its bytes); one named by
    /// tag always from the registry, and is cached under its digest.
    fn get_manifest(&self, reference: &str) -> Result<Option<(String, Vec<u8>)>> {
        if let Some(p) = self.path("manifests", reference) {
            if let Some(b) = self.read(&p, reference, manifest_body_at) {
                let at = manifest_body_at(&b);
                // Up to the first newline: never one inside.
                let media_type = String::from_utf8_lossy(&b[..at.saturating_sub(1)]).into_owned();
                if !media_type.is_empty() {
                    return Ok(Some((media_type, b[at..].to_vec())));
                }
            }
        }
        let got = self.inner.get_manifest(reference)?;
        if let Some((media_type, bytes)) = &got {
            let digest = digest_of(bytes);
            let by_digest = !reference.starts_with("sha256:") || reference == digest;
            if let Some(p) = self.path("manifests", &digest).filter(|_| by_digest) {
                if !media_type.is_empty() && !media_type.contains('\n') {
                    self.write(&p, &[media_type.as_bytes(), b"\n", bytes]);
                }
            }
        }
        Ok(got)
    }

    fn put_manifest(&self, reference: &str, media_type: &str, bytes: &[u8]) -> Result<String> {
        self.inner.put_manifest(reference, media_type, bytes)
    }

    fn referrers(&self, digest: &str) -> Result<Option<Vec<u8>>> {
        self.inner.referrers(digest)
    }
}

#[cfg(test)]
mod tests;
