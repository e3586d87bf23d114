//! Finding and opening the smr artifact of a source image.
//!
//! The candidates are the referrers of the source manifest whose
//! `artifactType` is [`ARTIFACT_TYPE`]: from the referrers API when the
//! registry has it, else (or when it lists none) from the `sha256-<hex>`
//! fallback tag. Several artifacts may refer to one image (different chunk
//! sizes, salts or pack sizes); without timestamps "newest" is unknowable,
//! so the choice is deterministic instead: filtered by
//! [`DiscoverOptions`], then the smallest digest.
//!
//! Opening an artifact fetches and checks everything a reader relies on:
//! the manifest (by digest), its media types and subject, the recipe and
//! the pack index (each verified against its digest and size), that the
//! manifest's packs are the index's packs, and that every chunk of the
//! recipe has a pack.

use crate::artifact::{
    bad, digest_of, fallback_tag, parse_referrers, ArtifactManifest, Descriptor,
    ANNOTATION_CHUNK_SIZE, ARTIFACT_TYPE, MANIFEST_MEDIA_TYPE,
};
use crate::blobs::Blobs;
use crate::error::{RegistryError, Result};
use crate::pack::PackIndex;
use crate::store::{RegistryStore, StoreOptions};
use smr_format::Recipe;
use std::sync::Arc;

#[cfg(test)]
mod tests;

/// Which artifact to pick when several refer to the image.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiscoverOptions {
    /// This artifact manifest digest, and no other.
    pub artifact: Option<String>,
    /// Only artifacts with this chunk size (their `vnd.smr.chunk-size`
    /// annotation).
    pub chunk_size: Option<u64>,
}

/// An opened, checked smr artifact.
#[derive(Debug, Clone)]
pub struct Artifact {
    /// `host/name` of its repository.
    pub repo: String,
    /// Digest of the artifact manifest.
    pub digest: String,
    /// The manifest.
    pub manifest: ArtifactManifest,
    /// The recipe's bytes (verified against the manifest).
    pub recipe_bytes: Vec<u8>,
    /// The decoded recipe (keys still sealed).
    pub recipe: Recipe,
    /// The pack index.
    pub index: Arc<PackIndex>,
}

impl Artifact {
    /// A chunk store serving this artifact's chunks from `blobs` (the same
    /// repository).
    pub fn store(&self, blobs: Arc<dyn Blobs>, opts: StoreOptions) -> RegistryStore {
        RegistryStore::new(blobs, self.index.clone(), opts)
    }
}

/// The smr artifacts referring to `subject` (a manifest digest), sorted by
/// digest, without duplicates.
pub fn list_artifacts(blobs: &dyn Blobs, subject: &str) -> Result<Vec<Descriptor>> {
    let repo = blobs.describe();
    let keep = |list: Vec<Descriptor>| -> Vec<Descriptor> {
        let mut v: Vec<Descriptor> = list
            .into_iter()
            .filter(|d| d.artifact_type.as_deref() == Some(ARTIFACT_TYPE))
            .collect();
        v.sort_by(|a, b| a.digest.cmp(&b.digest));
        v.dedup_by(|a, b| a.digest == b.digest);
        v
    };
    if let Some(bytes) = blobs.referrers(subject)? {
        let found = keep(parse_referrers(
            &repo,
            &format!("referrers of {subject}"),
            &bytes,
        )?);
        if !found.is_empty() {
            tracing::debug!(%subject, count = found.len(), "smr artifacts from the referrers API");
            return Ok(found);
        }
    }
    let tag = fallback_tag(subject).ok_or_else(|| bad(&repo, subject, "not a sha256 digest"))?;
    let Some((_, bytes)) = blobs.get_manifest(&tag)? else {
        return Ok(Vec::new());
    };
    let found = keep(parse_referrers(
        &repo,
        &format!("referrers tag {tag}"),
        &bytes,
    )?);
    tracing::debug!(%subject, %tag, count = found.len(), "smr artifacts from the fallback tag");
    Ok(found)
}

/// Finds, opens and checks the smr artifact of source manifest `subject`.
pub fn discover(blobs: &dyn Blobs, subject: &str, opts: &DiscoverOptions) -> Result<Artifact> {
    if let Some(digest) = &opts.artifact {
        return open_artifact(blobs, digest, Some(subject));
    }
    let all = list_artifacts(blobs, subject)?;
    let wanted = opts.chunk_size.map(|c| c.to_string());
    let fits: Vec<&Descriptor> = all
        .iter()
        .filter(|d| wanted.is_none() || d.annotations.get(ANNOTATION_CHUNK_SIZE) == wanted.as_ref())
        .collect();
    let Some(chosen) = fits.first() else {
        let what = match opts.chunk_size {
            Some(c) => format!(
                "smr artifact with chunk size {c} for {subject} ({} others)",
                all.len()
            ),
            None => format!("smr artifact for {subject}"),
        };
        return Err(RegistryError::NotFound {
            repo: blobs.describe(),
            what,
        });
    };
    if fits.len() > 1 {
        let others: Vec<&str> = fits.iter().skip(1).map(|d| d.digest.as_str()).collect();
        tracing::info!(%subject, chosen = %chosen.digest, ?others, "several smr artifacts: taking the smallest digest");
    }
    open_artifact(blobs, &chosen.digest, Some(subject))
}

/// Opens artifact manifest `digest` and checks it (and, if given, that its
/// subject is `subject`).
pub fn open_artifact(blobs: &dyn Blobs, digest: &str, subject: Option<&str>) -> Result<Artifact> {
    let repo = blobs.describe();
    let (media_type, bytes) =
        blobs
            .get_manifest(digest)?
            .ok_or_else(|| RegistryError::NotFound {
                repo: repo.clone(),
                what: format!("smr artifact manifest {digest}"),
            })?;
    verify(&repo, &format!("manifest {digest}"), digest, &bytes)?;
    if media_type != MANIFEST_MEDIA_TYPE {
        return Err(bad(
            &repo,
            digest,
            format!("served as `{media_type}`, not an image manifest"),
        ));
    }
    let manifest = ArtifactManifest::parse(&repo, digest, &bytes)?;
    if let Some(s) = subject {
        if manifest.subject.digest != s {
            return Err(bad(
                &repo,
                digest,
                format!("its subject is {}, not {s}", manifest.subject.digest),
            ));
        }
    }
    let (Some(recipe_desc), Some(index_desc)) = (manifest.recipe(), manifest.pack_index()) else {
        return Err(bad(&repo, digest, "recipe or pack index layer missing"));
    };
    let recipe_bytes = fetch(blobs, &format!("recipe of {digest}"), recipe_desc)?;
    let recipe = Recipe::decode(&recipe_bytes).map_err(|source| RegistryError::Format {
        what: format!("{repo}: recipe {} of {digest}", recipe_desc.digest),
        source,
    })?;
    if recipe.source_digest != manifest.subject.digest {
        return Err(bad(
            &repo,
            digest,
            format!(
                "recipe was converted from {}, not from the subject {}",
                recipe.source_digest, manifest.subject.digest
            ),
        ));
    }
    let index_bytes = fetch(blobs, &format!("pack index of {digest}"), index_desc)?;
    let index = PackIndex::decode(&index_bytes).map_err(|source| RegistryError::Pack {
        what: format!("{repo}: pack index {} of {digest}", index_desc.digest),
        source,
    })?;
    check_packs(&repo, digest, &manifest, &index)?;
    if let Some(e) = recipe.chunks.iter().find(|e| index.locate(&e.id).is_none()) {
        return Err(bad(
            &repo,
            digest,
            format!(
                "chunk {} (index {}) of the recipe is in no pack",
                e.id, e.index
            ),
        ));
    }
    tracing::info!(%repo, artifact = %digest, packs = index.packs().len(), chunks = recipe.chunks.len(), "opened smr artifact");
    Ok(Artifact {
        repo,
        digest: digest.to_string(),
        manifest,
        recipe_bytes,
        recipe,
        index: Arc::new(index),
    })
}

/// The manifest's pack layers must be the index's packs, in order.
fn check_packs(repo: &str, digest: &str, m: &ArtifactManifest, index: &PackIndex) -> Result<()> {
    let layers = m.packs();
    if layers.len() != index.packs().len() {
        return Err(bad(
            repo,
            digest,
            format!(
                "{} pack layers, but the pack index lists {} packs",
                layers.len(),
                index.packs().len()
            ),
        ));
    }
    for (i, (l, p)) in layers.iter().zip(index.packs()).enumerate() {
        if l.digest != p.digest || l.size != p.size() {
            return Err(bad(
                repo,
                digest,
                format!(
                    "pack layer {i} is {} ({} bytes), the pack index says {} ({} bytes)",
                    l.digest,
                    l.size,
                    p.digest,
                    p.size()
                ),
            ));
        }
    }
    Ok(())
}

/// Blob `desc`, checked against its digest and size.
fn fetch(blobs: &dyn Blobs, what: &str, desc: &Descriptor) -> Result<Vec<u8>> {
    let bytes = blobs.get_blob(&desc.digest)?;
    let repo = blobs.describe();
    verify(
        &repo,
        &format!("{what} {}", desc.digest),
        &desc.digest,
        &bytes,
    )?;
    if bytes.len() as u64 != desc.size {
        return Err(RegistryError::Protocol {
            repo,
            what: format!("GET blob {} ({what})", desc.digest),
            reason: format!("{} bytes, the manifest says {}", bytes.len(), desc.size),
        });
    }
    Ok(bytes)
}

fn verify(repo: &str, what: &str, digest: &str, bytes: &[u8]) -> Result<()> {
    let actual = digest_of(bytes);
    if actual == digest {
        return Ok(());
    }
    Err(RegistryError::DigestMismatch {
        repo: repo.to_string(),
        what: what.to_string(),
        actual,
    })
}
