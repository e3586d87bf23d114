//! Blobs fetched beside the manifest that names them.
//!
//! A referrers entry carries its manifest's annotations; an smr artifact
//! names its recipe and pack index there ([`ANNOTATION_RECIPE`],
//! [`ANNOTATION_PACK_INDEX`]), a profile manifest its profile blob
//! ([`ANNOTATION_PROFILE_BLOB`]). A lookup starts those blobs with the
//! manifests rather than after them: one round trip less on the way to a
//! first start. The manifest stays the authority: a blob fetched early is
//! used only if the manifest lists that very digest and size, and it is
//! verified like any other; anything else (no annotations, other blobs,
//! a failed fetch) fetches the blob the manifest lists, as before.
//!
//! [`ANNOTATION_RECIPE`]: crate::artifact::ANNOTATION_RECIPE
//! [`ANNOTATION_PACK_INDEX`]: crate::artifact::ANNOTATION_PACK_INDEX
//! [`ANNOTATION_PROFILE_BLOB`]: crate::profile::ANNOTATION_PROFILE_BLOB

use super::{fetch, ARTIFACT_BLOB_LIMIT};
use crate::artifact::{parse_digest, Descriptor};
use crate::blobs::Blobs;
use crate::error::Result;
use std::sync::mpsc;
use std::thread::Scope;

/// A blob being fetched on a thread of the lookup's scope.
pub(crate) struct Early {
    desc: Descriptor,
    rx: mpsc::Receiver<Result<Vec<u8>>>,
}

/// The blob of media type `media_type` that `entry`'s annotations
/// `PREFIX.digest` and `PREFIX.size` name; `None` without them, or if they
/// are not a sha256 digest and a size within [`ARTIFACT_BLOB_LIMIT`].
pub(crate) fn named(entry: &Descriptor, prefix: &str, media_type: &str) -> Option<Descriptor> {
    let digest = entry.annotations.get(&format!("{prefix}.digest"))?;
    let size: u64 = entry
        .annotations
        .get(&format!("{prefix}.size"))?
        .parse()
        .ok()?;
    (parse_digest(digest).is_some() && size <= ARTIFACT_BLOB_LIMIT)
        .then(|| Descriptor::new(media_type, digest.clone(), size))
}

impl Early {
    /// Starts fetching `desc` (if any) on a thread of `scope`.
    pub(crate) fn start<'scope, 'env>(
        scope: &'scope Scope<'scope, 'env>,
        blobs: &'env dyn Blobs,
        desc: Option<Descriptor>,
        what: String,
    ) -> Option<Early> {
        let desc = desc?;
        let (tx, rx) = mpsc::sync_channel(1);
        let d = desc.clone();
        scope.spawn(move || {
            let _ = tx.send(fetch(blobs, &what, &d));
        });
        Some(Early { desc, rx })
    }
}

/// Blob `desc`, a layer of a manifest just read: from `early` if that
/// fetched this very blob, else fetched now ([`fetch`]).
pub(crate) fn take(
    early: Option<Early>,
    blobs: &dyn Blobs,
    what: &str,
    desc: &Descriptor,
) -> Result<Vec<u8>> {
    if let Some(e) = early {
        if e.desc.digest == desc.digest && e.desc.size == desc.size {
            match e.rx.recv() {
                Ok(Ok(bytes)) => return Ok(bytes),
                Ok(Err(err)) => {
                    tracing::debug!(blob = %desc.digest, error = %err, "early fetch failed; fetching again");
                }
                Err(_) => {}
            }
        } else {
            tracing::debug!(named = %e.desc.digest, listed = %desc.digest, "the referrers entry names another blob than its manifest");
        }
    }
    fetch(blobs, what, desc)
}
