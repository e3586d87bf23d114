//! Startup profiles in a registry: an OCI artifact next to the smr
//! artifact, so that every node starting the image replays the same
//! working set (docs/FORMAT.md §6).
//!
//! ```text
//! { "schemaVersion": 2,
//!   "mediaType": "application/vnd.oci.image.manifest.v1+json",
//!   "artifactType": "application/vnd.smr.profile.v1",
//!   "config": <the OCI empty descriptor>,
//!   "layers": [ <the profile, application/vnd.smr.profile.v1>,
//!               <its startup pack, application/vnd.smr.startup-pack.v1,
//!                if it has one> ],
//!   "subject": <source platform manifest>,
//!   "annotations": { "org.opencontainers.image.created": "…",
//!                    "vnd.smr.profile.artifact": "sha256:<smr artifact>",
//!                    "vnd.smr.profile.chunks": "<entries>",
//!                    "vnd.smr.profile.blob.digest": "<layer 0's>",
//!                    "vnd.smr.profile.blob.size": "<layer 0's>" } }
//! ```
//!
//! Its subject is the source image, like the smr artifact's, so one
//! referrers lookup finds both (a start pays no extra round trip to learn
//! there is a profile); `vnd.smr.profile.artifact` says which smr
//! artifact's chunk indices it lists, and the profile itself carries the
//! recipe's SHA-256, checked before use. Several profiles of one artifact
//! may be listed (recorded again after the workload changed): the newest by
//! `created` wins, then the smallest digest. In the referrers fallback tag
//! a push replaces the artifact's older profiles.

use crate::artifact::{bad, blob_annotations, digest_of, ArtifactManifest, Descriptor};
use crate::blobs::Blobs;
use crate::discover::Artifact;
use crate::error::{RegistryError, Result};
use crate::media_types::{SMR_PROFILE, SMR_STARTUP_PACK};
use crate::push::{push_small_referrer, update_referrers, ReferrersUpdate};
use smr_format::Profile;
use smr_image::media_types::{OCI_EMPTY, OCI_MANIFEST};
use std::collections::BTreeMap;

/// Annotation: digest of the smr artifact the profile belongs to.
pub const ANNOTATION_PROFILE_ARTIFACT: &str = "vnd.smr.profile.artifact";
/// Annotation: number of chunks the profile lists (decimal).
pub const ANNOTATION_PROFILE_CHUNKS: &str = "vnd.smr.profile.chunks";
/// Annotation: when the profile was pushed (RFC 3339, UTC).
pub const ANNOTATION_CREATED: &str = "org.opencontainers.image.created";
/// Annotation prefix naming the profile blob of a profile manifest
/// (`PREFIX.digest`, `PREFIX.size`; see
/// [`ANNOTATION_RECIPE`](crate::artifact::ANNOTATION_RECIPE)).
pub const ANNOTATION_PROFILE_BLOB: &str = "vnd.smr.profile.blob";
/// Annotation prefix naming the startup pack blob of a profile manifest
/// that has one (`PREFIX.digest`, `PREFIX.size`): a cold start begins
/// reading the pack from the referrers listing ([`crate::head_start`]).
pub const ANNOTATION_PROFILE_PACK: &str = "vnd.smr.profile.pack";

/// What [`push_profile`] did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ProfilePush {
    /// Digest of the profile manifest.
    pub manifest_digest: String,
    /// The profile as a referrers entry (artifact type, annotations).
    #[serde(skip)]
    pub descriptor: Descriptor,
    /// Digest of the profile blob.
    pub profile_digest: String,
    /// Chunks the profile lists.
    pub chunks: usize,
    /// Size of its startup pack blob, if it has one.
    pub pack_bytes: Option<u64>,
    /// How the profile was made findable.
    pub referrers: ReferrersUpdate,
}

/// The manifest of `profile_bytes` (`chunks` entries) and its startup
/// pack `pack` (if any) for the smr artifact `artifact`, created at
/// `created` (RFC 3339).
pub fn profile_manifest(
    artifact: &Artifact,
    profile_bytes: &[u8],
    pack: Option<&[u8]>,
    chunks: usize,
    created: &str,
) -> ArtifactManifest {
    let layer = Descriptor::of(SMR_PROFILE, profile_bytes);
    let mut annotations = BTreeMap::from([
        (ANNOTATION_CREATED.to_string(), created.to_string()),
        (
            ANNOTATION_PROFILE_ARTIFACT.to_string(),
            artifact.digest.clone(),
        ),
        (ANNOTATION_PROFILE_CHUNKS.to_string(), chunks.to_string()),
    ]);
    annotations.extend(blob_annotations(ANNOTATION_PROFILE_BLOB, &layer));
    let pack = pack.map(|p| Descriptor::of(SMR_STARTUP_PACK, p));
    if let Some(p) = &pack {
        annotations.extend(blob_annotations(ANNOTATION_PROFILE_PACK, p));
    }
    ArtifactManifest {
        schema_version: 2,
        media_type: OCI_MANIFEST.to_string(),
        artifact_type: SMR_PROFILE.to_string(),
        config: Descriptor::empty(),
        layers: std::iter::once(layer).chain(pack).collect(),
        // An image without a source has its profiles listed under itself.
        subject: Some(
            artifact
                .manifest
                .subject
                .clone()
                .unwrap_or_else(|| artifact.descriptor()),
        ),
        annotations,
    }
}

/// Pushes `profile` as the startup profile of `artifact` (blobs, then the
/// manifest, then the referrers entry, as for the smr artifact), with the
/// blob of its startup pack `pack` if it has one. Fails if the profile was
/// recorded for another recipe, or `pack` is not the blob it names.
pub fn push_profile(
    blobs: &dyn Blobs,
    artifact: &Artifact,
    profile: &Profile,
    pack: Option<&[u8]>,
) -> Result<ProfilePush> {
    let repo = blobs.describe();
    profile
        .check_recipe(&artifact.recipe_bytes)
        .map_err(|source| RegistryError::Format {
            what: format!("{repo}: profile for smr artifact {}", artifact.digest),
            source,
        })?;
    let named = profile.pack.as_ref().map(|p| p.blob_digest());
    if named != pack.map(digest_of) {
        return Err(bad(
            &repo,
            &artifact.digest,
            format!("the profile names startup pack {named:?}, the blob given does not match"),
        ));
    }
    let bytes = profile.encode();
    let created = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let manifest = profile_manifest(artifact, &bytes, pack, profile.chunks.len(), &created);
    if let Some(p) = pack {
        blobs.push_blob(&digest_of(p), p)?;
    }
    let profile_digest = digest_of(&bytes);
    let (digest, manifest_bytes) = push_small_referrer(blobs, &manifest, &bytes, "profile")?;
    // In the fallback tag, a new profile replaces the artifact's older ones
    // (the referrers API cannot forget them: there, the newest wins).
    let older = |d: &Descriptor| is_profile_of(d, &artifact.digest);
    let referrers = update_referrers(blobs, &manifest, &manifest_bytes, &digest, &older)?;
    tracing::info!(%repo, manifest = %digest, artifact = %artifact.digest, chunks = profile.chunks.len(), ?referrers, "pushed startup profile");
    Ok(ProfilePush {
        descriptor: manifest.referrer(&manifest_bytes),
        manifest_digest: digest,
        profile_digest,
        chunks: profile.chunks.len(),
        pack_bytes: pack.map(|p| p.len() as u64),
        referrers,
    })
}

/// Whether referrer `d` is a startup profile of the smr artifact `artifact`.
fn is_profile_of(d: &Descriptor, artifact: &str) -> bool {
    d.artifact_type.as_deref() == Some(SMR_PROFILE)
        && d.annotations
            .get(ANNOTATION_PROFILE_ARTIFACT)
            .map(String::as_str)
            == Some(artifact)
}

/// The profiles among `referrers` that belong to the smr artifact
/// `artifact`, best first (newest `created`, then smallest digest).
pub fn profiles_of(referrers: &[Descriptor], artifact: &str) -> Vec<Descriptor> {
    let mut v: Vec<Descriptor> = referrers
        .iter()
        .filter(|d| is_profile_of(d, artifact))
        .cloned()
        .collect();
    let created = |d: &Descriptor| d.annotations.get(ANNOTATION_CREATED).cloned();
    v.sort_by(|a, b| created(b).cmp(&created(a)).then(a.digest.cmp(&b.digest)));
    v.dedup_by(|a, b| a.digest == b.digest);
    v
}

/// Fetches profile manifest `digest` and its profile, checking the
/// manifest (digest, media types, the artifact it names) and the profile
/// (digest, format). The recipe binding is checked by the caller, against
/// the recipe it serves ([`Profile::check_recipe`]).
pub fn fetch_profile(blobs: &dyn Blobs, digest: &str, artifact: &str) -> Result<Profile> {
    fetch_profile_early(blobs, digest, artifact, None)
}

/// [`fetch_profile`], taking the profile blob from `early` where that
/// fetched the blob the manifest lists.
pub(crate) fn fetch_profile_early(
    blobs: &dyn Blobs,
    digest: &str,
    artifact: &str,
    early: Option<crate::discover::early::Early>,
) -> Result<Profile> {
    let repo = blobs.describe();
    let what = format!("profile manifest {digest}");
    let (media_type, bytes) =
        blobs
            .get_manifest(digest)?
            .ok_or_else(|| RegistryError::NotFound {
                repo: repo.clone(),
                what: what.clone(),
            })?;
    crate::discover::verify(&repo, &what, digest, &bytes)?;
    let m: ArtifactManifest =
        serde_json::from_slice(&bytes).map_err(|source| RegistryError::Json {
            what: format!("{repo}: {what}"),
            source,
        })?;
    let (layer, pack) = match (media_type.as_str(), m.artifact_type.as_str(), &m.layers[..]) {
        (OCI_MANIFEST, SMR_PROFILE, [l])
            if l.media_type == SMR_PROFILE && m.config.media_type == OCI_EMPTY =>
        {
            (l, None)
        }
        (OCI_MANIFEST, SMR_PROFILE, [l, p])
            if l.media_type == SMR_PROFILE
                && p.media_type == SMR_STARTUP_PACK
                && m.config.media_type == OCI_EMPTY =>
        {
            (l, Some(p))
        }
        _ => {
            return Err(bad(
                &repo,
                digest,
                "not an smr profile (media type, artifactType or layers)",
            ))
        }
    };
    let named = m.annotations.get(ANNOTATION_PROFILE_ARTIFACT);
    if named.map(String::as_str) != Some(artifact) {
        return Err(bad(
            &repo,
            digest,
            format!("a profile of artifact {named:?}, not {artifact}"),
        ));
    }
    let blob = crate::discover::early::take(early, blobs, &format!("profile of {digest}"), layer)?;
    let profile = Profile::decode(&blob).map_err(|source| RegistryError::Format {
        what: format!("{repo}: profile {} of {digest}", layer.digest),
        source,
    })?;
    let named = profile
        .pack
        .as_ref()
        .map(|p| (p.blob_digest(), p.offsets().1));
    let listed = pack.map(|p| (p.digest.clone(), p.size));
    if named != listed {
        return Err(bad(
            &repo,
            digest,
            format!("its profile names startup pack {named:?}, its manifest lists {listed:?}"),
        ));
    }
    Ok(profile)
}

#[cfg(test)]
mod tests;
