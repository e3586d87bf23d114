//! `--index` mode: the smr artifact inside the image index.
//!
//! Like the SOCI snapshotter's index manifest v2, the tag's owner binds the
//! artifact to the image: `smr convert --push --index` writes a new image
//! index that holds the source's platform manifest(s) untouched (the
//! source's own index entries as they were, or, for a single manifest, one
//! entry with its platform) plus the smr artifact and its startup profile:
//!
//! ```text
//! { "schemaVersion": 2,
//!   "mediaType": "application/vnd.oci.image.index.v1+json",
//!   "manifests": [
//!     { <platform manifest>, "platform": { "architecture": "amd64", "os": "linux" } },
//!     { "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": <smr artifact>, …,
//!       "artifactType": "application/vnd.smr.image.v1",
//!       "annotations": { "vnd.smr.subject": <platform manifest digest>, "vnd.smr.chunk-size": … } },
//!     { <its startup profile, artifactType application/vnd.smr.profile.v1, the same vnd.smr.subject> } ] }
//! ```
//!
//! The smr entries have no `platform`, so every tool that picks a platform
//! skips them: containerd sorts entries without one after those that
//! match and pulls the first, skopeo and smr's own resolver take only
//! entries whose platform matches. A node that resolves the tag finds the
//! artifact in the index it already read: no referrers lookup.

use crate::artifact::{bad, index_manifests, Descriptor};
use crate::error::{RegistryError, Result};
use smr_image::media_types::OCI_INDEX;
use smr_image::source::Platform;

/// Annotation of an smr entry in an image index: the platform manifest it
/// belongs to.
pub const ANNOTATION_SUBJECT: &str = "vnd.smr.subject";

/// The entries of image index `bytes` that belong to platform manifest
/// `manifest` (smr artifacts and profiles); a malformed index or entry
/// gives none (the referrers are looked at instead).
pub fn entries_for(bytes: &[u8], manifest: &str) -> Vec<Descriptor> {
    let Ok(doc) = serde_json::from_slice::<serde_json::Value>(bytes) else {
        return Vec::new();
    };
    let Ok(entries) = index_manifests(&doc) else {
        return Vec::new();
    };
    entries
        .iter()
        .filter_map(|e| serde_json::from_value::<Descriptor>(e.clone()).ok())
        .filter(|d| d.annotations.get(ANNOTATION_SUBJECT).map(String::as_str) == Some(manifest))
        .collect()
}

/// The image index holding the source `top` (`(media type, bytes)` of what
/// the source reference named: an index or a platform manifest, whose
/// platform is then `platform`) and `entries` (smr artifact, profile) that
/// belong to platform manifest `subject`. Older smr entries for the same
/// manifest are replaced; everything else is kept as it was.
pub fn build_index(
    repo: &str,
    top: (&str, &[u8]),
    platform: &Platform,
    subject: &str,
    entries: &[Descriptor],
) -> Result<Vec<u8>> {
    let (media_type, bytes) = top;
    let what = "the source's top manifest";
    let mut doc = if smr_image::source::spec::ManifestKind::of(media_type)
        == Some(smr_image::source::spec::ManifestKind::Index)
    {
        let mut doc: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|source| RegistryError::Json {
                what: format!("{repo}: {what}"),
                source,
            })?;
        if !doc.is_object() {
            return Err(bad(repo, what, "not a JSON object"));
        }
        // Docker manifest lists cannot hold artifact entries: the new
        // index is an OCI one, holding the same entries.
        doc["mediaType"] = serde_json::Value::from(OCI_INDEX);
        index_manifests(&doc).map_err(|reason| bad(repo, what, reason))?;
        doc
    } else {
        let mut entry = serde_json::json!({
            "mediaType": media_type,
            "digest": crate::artifact::digest_of(bytes),
            "size": bytes.len(),
            "platform": { "architecture": platform.architecture, "os": platform.os },
        });
        if let Some(v) = &platform.variant {
            entry["platform"]["variant"] = serde_json::Value::from(v.as_str());
        }
        serde_json::json!({ "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [entry] })
    };
    let list = doc
        .get_mut("manifests")
        .and_then(|m| m.as_array_mut())
        .ok_or_else(|| bad(repo, what, "no manifests list"))?;
    list.retain(|e| {
        e.pointer(&format!("/annotations/{ANNOTATION_SUBJECT}"))
            .and_then(|s| s.as_str())
            != Some(subject)
    });
    for d in entries {
        let mut d = d.clone();
        d.annotations
            .insert(ANNOTATION_SUBJECT.to_string(), subject.to_string());
        list.push(
            serde_json::to_value(&d).map_err(|source| RegistryError::Json {
                what: format!("index entry {}", d.digest),
                source,
            })?,
        );
    }
    serde_json::to_vec(&doc).map_err(|source| RegistryError::Json {
        what: format!("{repo}: the new image index"),
        source,
    })
}

#[cfg(test)]
mod tests;
