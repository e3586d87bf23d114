//! Finding and opening the smr artifact of a source image.
//!
//! The candidates are the referrers of the source manifest whose
//! `artifactType` is [`SMR_ARTIFACT`]: from the referrers API when the
//! registry has it, else (or when it lists none) from the `sha256-<hex>`
//! fallback tag. Several artifacts may refer to one image (different chunk
//! sizes, salts or pack sizes); without timestamps "newest" is unknowable,
//! so the choice is deterministic instead: filtered by
//! [`DiscoverOptions`], then tried in digest order, the first one the
//! caller's policy accepts ([`discover_trusted`]) is used. Digest order
//! only breaks ties between trusted artifacts: one that anyone able to push
//! attached cannot win by grinding a small digest.
//!
//! The startup profile of the chosen artifact ([`crate::profile`]) is
//! found in the same referrers list.
//!
//! Opening an artifact fetches and checks everything a reader relies on:
//! the manifest (by digest), its media types and subject, the recipe and
//! the pack index (each verified against its digest and size), that the
//! manifest's packs are the index's packs, and that every chunk of the
//! recipe has a pack.

use crate::artifact::{
    bad, digest_of, fallback_tag, parse_referrers, ArtifactManifest, Descriptor,
    ANNOTATION_CHUNK_SIZE, ANNOTATION_PACK_INDEX, ANNOTATION_RECIPE,
};
use crate::blobs::Blobs;
use crate::error::{RegistryError, Result};
use crate::head_start::{HeadStart, HeadStartSlot};
use crate::media_types::{SMR_ARTIFACT, SMR_PACK_INDEX, SMR_PROFILE, SMR_RECIPE, SMR_STARTUP_PACK};
use crate::pack::PackIndex;
use crate::profile::{
    fetch_profile_early, profiles_of, ANNOTATION_PROFILE_BLOB, ANNOTATION_PROFILE_PACK,
};
use crate::signature::{find_signature, SignedBy, VerifyKey};
use crate::store::RegistryStore;
use early::Early;
use smr_format::{Profile, Recipe};
use smr_image::media_types::OCI_MANIFEST;
use std::sync::Arc;

pub(crate) mod early;
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
    /// Also look for the artifact's startup profile
    /// ([`crate::profile`]); fetched alongside the recipe and pack index.
    pub profile: bool,
    /// Look for a signature of each candidate by one of these keys
    /// ([`crate::signature`]), alongside the recipe and pack index; the
    /// outcome is [`Artifact::signature`], for the caller's policy.
    pub verify_keys: Vec<Arc<VerifyKey>>,
    /// The entries of the image index the image was resolved through that
    /// name this image's smr artifact and profiles (`--index` mode,
    /// [`crate::index`]): tried first, with no referrers lookup.
    pub index_entries: Vec<Descriptor>,
    /// With [`DiscoverOptions::artifact`] and [`DiscoverOptions::profile`]:
    /// the startup profile manifest a lookup already made found for that
    /// artifact ([`Artifact::profile_listing`]), so the referrers are not
    /// listed again.
    pub profile_manifest: Option<String>,
    /// With [`DiscoverOptions::profile`]: start reading the profile's
    /// startup pack from the referrers listing, for a caller that will
    /// read it from [`Artifact::store`] ([`Artifact::pack_head_start`]).
    pub read_pack_ahead: bool,
}

/// What the listing an artifact was found in (the referrers of its image,
/// or the image index's entries) says of its startup profiles.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum ProfileListing {
    /// Nothing was listed: the artifact was named and no profile asked for.
    #[default]
    NotListed,
    /// The listing names no profile of the artifact.
    NoProfile,
    /// The newest profile manifest of the artifact the listing names.
    Manifest(String),
}

impl ProfileListing {
    /// What `listed` says of `artifact`'s profiles.
    fn of(listed: &[Descriptor], artifact: &str) -> Self {
        match profiles_of(listed, artifact).into_iter().next() {
            Some(d) => ProfileListing::Manifest(d.digest),
            None => ProfileListing::NoProfile,
        }
    }
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
    /// The manifest's size in bytes.
    pub manifest_size: u64,
    /// The recipe's bytes (verified against the manifest).
    pub recipe_bytes: Vec<u8>,
    /// The decoded recipe (keys still sealed).
    pub recipe: Recipe,
    /// The pack index.
    pub index: Arc<PackIndex>,
    /// Its startup profile, when asked for ([`DiscoverOptions::profile`]),
    /// found and valid for the recipe (a bad one is logged and left out:
    /// a profile only speeds a start up).
    pub profile: Option<Profile>,
    /// With [`DiscoverOptions::verify_keys`]: the trusted key whose
    /// signature verified, or why none did.
    pub signature: Option<std::result::Result<SignedBy, String>>,
    /// Whether the image index the image was resolved through names it.
    pub from_index: bool,
    /// What the listing it was found in says of its profiles (whether or
    /// not the profile was fetched): another process can then open the
    /// same artifact and profile with no lookup
    /// ([`DiscoverOptions::profile_manifest`]).
    pub profile_listing: ProfileListing,
    /// The read of its profile's startup pack, started from the
    /// referrers listing before the profile arrived ([`crate::head_start`]);
    /// the store of [`Artifact::store`] hands it to the pack's reader.
    pub pack_head_start: HeadStartSlot,
}

impl Artifact {
    /// A chunk store serving this artifact's chunks from `blobs` (the same
    /// repository), and those of its profile's startup pack if it has one.
    pub fn store(&self, blobs: Arc<dyn Blobs>, opts: smr_store::RemoteOptions) -> RegistryStore {
        RegistryStore::new(blobs, self.serving_index(), opts)
            .with_head_start(self.pack_head_start.clone())
    }

    /// The pack index, with the startup pack of the profile as one more
    /// pack (the artifact's own index, logged, if that cannot be).
    fn serving_index(&self) -> Arc<PackIndex> {
        let Some(pack) = self.profile.as_ref().and_then(|p| p.pack.as_ref()) else {
            return self.index.clone();
        };
        let startup = crate::pack::IndexedPack {
            digest: pack.blob_digest(),
            chunks: pack
                .chunks
                .iter()
                .map(|c| crate::pack::IndexedChunk {
                    id: c.id,
                    len: c.stored_len,
                })
                .collect(),
        };
        let mut packs = self.index.packs().to_vec();
        packs.push(startup);
        match PackIndex::new(self.index.params(), packs) {
            Ok(i) => Arc::new(i),
            Err(e) => {
                tracing::warn!(artifact = %self.digest, pack = %pack.blob_digest(), error = %e, "the startup pack cannot be served: starting without it");
                self.index.clone()
            }
        }
    }

    /// The artifact manifest's descriptor (the subject of its profiles
    /// when it has no source image, and of its signatures).
    pub fn descriptor(&self) -> Descriptor {
        Descriptor::new(OCI_MANIFEST, self.digest.clone(), self.manifest_size)
    }

    /// Whether it is an image with no OCI source (made by `smr commit`),
    /// reached by its own tag rather than as a referrer.
    pub fn is_image(&self) -> bool {
        self.manifest.subject.is_none()
    }
}

/// The smr artifacts referring to `subject` (a manifest digest), sorted by
/// digest, without duplicates.
pub fn list_artifacts(blobs: &dyn Blobs, subject: &str) -> Result<Vec<Descriptor>> {
    Ok(artifacts_among(&list_referrers(blobs, subject)?))
}

fn artifacts_among(list: &[Descriptor]) -> Vec<Descriptor> {
    let mut v: Vec<Descriptor> = list
        .iter()
        .filter(|d| d.artifact_type.as_deref() == Some(SMR_ARTIFACT))
        .cloned()
        .collect();
    v.sort_by(|a, b| a.digest.cmp(&b.digest));
    v.dedup_by(|a, b| a.digest == b.digest);
    v
}

/// Every referrer of `subject`: from the referrers API when it lists an
/// smr artifact, else from the fallback tag (none if there is no tag).
pub fn list_referrers(blobs: &dyn Blobs, subject: &str) -> Result<Vec<Descriptor>> {
    list_referrers_of(blobs, subject, SMR_ARTIFACT)
}

/// Every referrer of `subject`: from the referrers API when it lists one of
/// `artifact_type`, else from the fallback tag (none if there is no tag).
pub fn list_referrers_of(
    blobs: &dyn Blobs,
    subject: &str,
    artifact_type: &str,
) -> Result<Vec<Descriptor>> {
    let repo = blobs.describe();
    let tag = fallback_tag(subject).ok_or_else(|| bad(&repo, subject, "not a sha256 digest"))?;
    // Both at once: a registry without the API (distribution 2.8 and
    // others) answers 404 and the tag is what counts; one round trip
    // instead of two, for one small request more where the API answers.
    let (api, tagged) = std::thread::scope(|s| {
        let tagged = s.spawn(|| blobs.get_manifest(&tag));
        let api = blobs.referrers(subject);
        let tagged = tagged
            .join()
            .unwrap_or_else(|_| Err(bad(&repo, subject, "fetching the referrers tag panicked")));
        (api, tagged)
    });
    if let Some(bytes) = api? {
        let found = parse_referrers(&repo, &format!("referrers of {subject}"), &bytes)?;
        if found
            .iter()
            .any(|d| d.artifact_type.as_deref() == Some(artifact_type))
        {
            tracing::debug!(%subject, count = found.len(), "referrers from the referrers API");
            return Ok(found);
        }
    }
    let Some((_, bytes)) = tagged? else {
        return Ok(Vec::new());
    };
    let found = parse_referrers(&repo, &format!("referrers tag {tag}"), &bytes)?;
    tracing::debug!(%subject, %tag, count = found.len(), "referrers from the fallback tag");
    Ok(found)
}

/// Finds, opens and checks the smr artifact of source manifest `subject`
/// (and its profile, if asked: fetched in parallel with the artifact).
pub fn discover(blobs: &dyn Blobs, subject: &str, opts: &DiscoverOptions) -> Result<Artifact> {
    discover_trusted(blobs, subject, opts, &|_| Ok(()))
}

/// What a caller accepts: `Err(why)` refuses an opened artifact.
pub type Accept<'a> = &'a (dyn Fn(&Artifact) -> std::result::Result<(), String> + Sync);

/// [`discover`], using only an artifact `accept` takes: candidates are
/// opened in digest order and the first accepted is used; a refused or
/// broken one is logged and skipped, so that an artifact someone else
/// attached cannot win by its digest alone. None accepted:
/// [`RegistryError::NoTrustedArtifact`], naming each and why.
pub fn discover_trusted(
    blobs: &dyn Blobs,
    subject: &str,
    opts: &DiscoverOptions,
    accept: Accept<'_>,
) -> Result<Artifact> {
    if opts.artifact.is_none() && !opts.index_entries.is_empty() {
        match discover_among(blobs, subject, opts, Some(&opts.index_entries), accept) {
            Ok(mut a) => {
                tracing::info!(%subject, artifact = %a.digest, "smr artifact named by the image index");
                a.from_index = true;
                return Ok(a);
            }
            Err(e) => {
                tracing::warn!(%subject, error = %e, "no usable smr artifact in the image index; looking among the referrers");
            }
        }
    }
    let known_profile = opts.profile && opts.profile_manifest.is_some();
    let listed = match (&opts.artifact, opts.profile) {
        (Some(_), false) => None,
        (Some(_), true) if known_profile => None,
        _ => Some(list_referrers(blobs, subject)?),
    };
    discover_among(blobs, subject, opts, listed.as_deref(), accept)
}

/// [`discover_trusted`] among the referrers (or index entries) `listed`
/// (`None`: none were listed, the artifact is named).
fn discover_among(
    blobs: &dyn Blobs,
    subject: &str,
    opts: &DiscoverOptions,
    listed: Option<&[Descriptor]>,
    accept: Accept<'_>,
) -> Result<Artifact> {
    let candidates = match &opts.artifact {
        Some(digest) => vec![digest.clone()],
        None => choose(
            blobs,
            subject,
            opts,
            &artifacts_among(listed.unwrap_or(&[])),
        )?,
    };
    let mut refused = Vec::new();
    for digest in &candidates {
        let why = match open_chosen(blobs, Some(subject), opts, listed.unwrap_or(&[]), digest) {
            Ok(mut a) => match accept(&a) {
                Ok(()) => {
                    if let Some(listed) = listed {
                        a.profile_listing = ProfileListing::of(listed, digest);
                    }
                    return Ok(a);
                }
                Err(why) => why,
            },
            Err(e) if candidates.len() == 1 => return Err(e),
            Err(e) => e.to_string(),
        };
        tracing::warn!(%subject, artifact = %digest, %why, "smr artifact refused");
        refused.push(format!("{digest} ({why})"));
    }
    Err(RegistryError::NoTrustedArtifact {
        repo: blobs.describe(),
        subject: subject.to_string(),
        refused: refused.join(", "),
    })
}

/// Opens the smr artifact `digest` that a tag names directly: an image
/// with no OCI source (made by `smr commit`, [`crate::push::push_image`]).
/// Its startup profile is listed under the artifact itself; `accept`
/// decides as for [`discover_trusted`].
pub fn open_image(
    blobs: &dyn Blobs,
    digest: &str,
    opts: &DiscoverOptions,
    accept: Accept<'_>,
) -> Result<Artifact> {
    let listed = match (opts.profile, &opts.profile_manifest) {
        (true, None) => Some(list_referrers_of(blobs, digest, SMR_PROFILE)?),
        _ => None,
    };
    let mut a = open_chosen(blobs, None, opts, listed.as_deref().unwrap_or(&[]), digest)?;
    if !a.is_image() {
        return Err(bad(
            &blobs.describe(),
            digest,
            "it is the smr artifact of a source image: name the source image instead",
        ));
    }
    accept(&a).map_err(|why| {
        tracing::warn!(artifact = %digest, %why, "smr image refused");
        RegistryError::NoTrustedArtifact {
            repo: blobs.describe(),
            subject: digest.to_string(),
            refused: format!("{digest} ({why})"),
        }
    })?;
    if let Some(listed) = &listed {
        a.profile_listing = ProfileListing::of(listed, digest);
    }
    Ok(a)
}

/// Opens candidate `chosen` (checking its subject is `subject`, when
/// given) with its startup profile (when asked for and listed in
/// `listed`) and its signature (when keys are given), all three at once.
fn open_chosen(
    blobs: &dyn Blobs,
    subject: Option<&str>,
    opts: &DiscoverOptions,
    listed: &[Descriptor],
    chosen: &str,
) -> Result<Artifact> {
    let chosen = chosen.to_string();
    // The listed entries, whose annotations name the blobs to fetch
    // beside their manifests (see `early`).
    let (profile, profile_entry) = match (&opts.profile_manifest, opts.profile) {
        (_, false) => (None, None),
        (Some(d), true) => (Some(d.clone()), None),
        (None, true) => match profiles_of(listed, &chosen).into_iter().next() {
            Some(d) => (Some(d.digest.clone()), Some(d)),
            None => (None, None),
        },
    };
    // The startup pack is the largest read of a cold start: begun now,
    // it arrives while the manifests and the profile are read and checked.
    // Not when the node holds the profile blob already: it has started
    // from this profile before, so the pack is in its cache, most likely.
    let profile_held = |e: &Descriptor| {
        early::named(e, ANNOTATION_PROFILE_BLOB, SMR_PROFILE)
            .is_some_and(|b| blobs.holds_blob(&b.digest))
    };
    let pack_head = profile_entry
        .as_ref()
        .filter(|e| opts.read_pack_ahead && !profile_held(e))
        .and_then(|e| early::named(e, ANNOTATION_PROFILE_PACK, SMR_STARTUP_PACK))
        .and_then(|d| blobs.head_start(&d.digest, 0, d.size));
    let entry = listed.iter().find(|d| d.digest == chosen);
    let named = |prefix, media_type| entry.and_then(|d| early::named(d, prefix, media_type));
    let keys = &opts.verify_keys;
    let panicked = |what: &str| bad(&blobs.describe(), &chosen, format!("{what} panicked"));
    let (artifact, profile, signature) = std::thread::scope(|s| {
        let p = profile.as_ref().map(|d| {
            let blob = profile_entry
                .as_ref()
                .and_then(|e| early::named(e, ANNOTATION_PROFILE_BLOB, SMR_PROFILE));
            let blob = Early::start(s, blobs, blob, format!("profile of {d}"));
            (d, s.spawn(|| fetch_profile_early(blobs, d, &chosen, blob)))
        });
        let sig = (!keys.is_empty()).then(|| s.spawn(|| find_signature(blobs, &chosen, keys)));
        let early = (
            Early::start(
                s,
                blobs,
                named(ANNOTATION_RECIPE, SMR_RECIPE),
                format!("recipe of {chosen}"),
            ),
            Early::start(
                s,
                blobs,
                named(ANNOTATION_PACK_INDEX, SMR_PACK_INDEX),
                format!("pack index of {chosen}"),
            ),
        );
        let a = open_artifact_early(blobs, &chosen, subject, early);
        let p = p.map(|(d, h)| (d, h.join().unwrap_or_else(|_| Err(panicked("profile")))));
        let sig = sig.map(|h| {
            h.join()
                .unwrap_or_else(|_| Err(panicked("signature check")))
        });
        (a, p, sig)
    });
    let mut artifact = artifact?;
    artifact.signature = signature.transpose()?;
    let Some((profile_desc, profile)) = profile else {
        return Ok(artifact);
    };
    let profile = profile.and_then(|p| {
        p.check_recipe(&artifact.recipe_bytes)
            .map_err(|source| RegistryError::Format {
                what: format!("profile {}", profile_desc),
                source,
            })?;
        Ok(p)
    });
    match profile {
        Ok(p) => {
            tracing::info!(profile = %profile_desc, chunks = p.chunks.len(), "found startup profile");
            if let Some(head) = pack_head.filter(|h| names_pack(&p, h)) {
                artifact.pack_head_start = HeadStartSlot::new(head);
            }
            artifact.profile = Some(p);
        }
        Err(e) => {
            tracing::warn!(profile = %profile_desc, error = %e, "startup profile unusable; starting without it");
        }
    }
    Ok(artifact)
}

/// Whether `head` reads the whole startup pack of `profile`.
fn names_pack(profile: &Profile, head: &HeadStart) -> bool {
    profile
        .pack
        .as_ref()
        .is_some_and(|pack| head.is(&pack.blob_digest(), 0, pack.offsets().1))
}

/// The candidates among `all`: filtered by `opts`, in digest order (the
/// order the caller tries them in).
fn choose(
    blobs: &dyn Blobs,
    subject: &str,
    opts: &DiscoverOptions,
    all: &[Descriptor],
) -> Result<Vec<String>> {
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
        tracing::info!(%subject, first = %chosen.digest, ?others, "several smr artifacts: trying them in digest order");
    }
    Ok(fits.iter().map(|d| d.digest.clone()).collect())
}

/// Opens artifact manifest `digest` and checks it (and, if given, that its
/// subject is `subject`).
pub fn open_artifact(blobs: &dyn Blobs, digest: &str, subject: Option<&str>) -> Result<Artifact> {
    open_artifact_early(blobs, digest, subject, (None, None))
}

/// [`open_artifact`], taking the recipe and the pack index from the early
/// fetches `(recipe, index)` where they fetched the blobs the manifest
/// lists.
fn open_artifact_early(
    blobs: &dyn Blobs,
    digest: &str,
    subject: Option<&str>,
    (early_recipe, early_index): (Option<Early>, Option<Early>),
) -> Result<Artifact> {
    let repo = blobs.describe();
    let (media_type, bytes) =
        blobs
            .get_manifest(digest)?
            .ok_or_else(|| RegistryError::NotFound {
                repo: repo.clone(),
                what: format!("smr artifact manifest {digest}"),
            })?;
    verify(&repo, &format!("manifest {digest}"), digest, &bytes)?;
    if media_type != OCI_MANIFEST {
        return Err(bad(
            &repo,
            digest,
            format!("served as `{media_type}`, not an image manifest"),
        ));
    }
    let manifest = ArtifactManifest::parse(&repo, digest, &bytes)?;
    let has_subject = manifest.subject.as_ref().map(|d| d.digest.as_str());
    if let Some(s) = subject {
        if has_subject != Some(s) {
            return Err(bad(
                &repo,
                digest,
                format!("its subject is {}, not {s}", has_subject.unwrap_or("none")),
            ));
        }
    }
    let (Some(recipe_desc), Some(index_desc)) = (manifest.recipe(), manifest.pack_index()) else {
        return Err(bad(&repo, digest, "recipe or pack index layer missing"));
    };
    // Two blobs, two round trips: in parallel.
    let (recipe_bytes, index_bytes) = std::thread::scope(|s| {
        let index = s.spawn(|| {
            early::take(
                early_index,
                blobs,
                &format!("pack index of {digest}"),
                index_desc,
            )
        });
        let recipe = early::take(
            early_recipe,
            blobs,
            &format!("recipe of {digest}"),
            recipe_desc,
        );
        let index = index
            .join()
            .unwrap_or_else(|_| Err(bad(&repo, digest, "pack index fetch panicked")));
        (recipe, index)
    });
    let (recipe_bytes, index_bytes) = (recipe_bytes?, index_bytes?);
    let recipe = Recipe::decode(&recipe_bytes).map_err(|source| RegistryError::Format {
        what: format!("{repo}: recipe {} of {digest}", recipe_desc.digest),
        source,
    })?;
    if let Some(s) = has_subject.filter(|s| recipe.source_digest != *s) {
        return Err(bad(
            &repo,
            digest,
            format!(
                "recipe was converted from {}, not from the subject {s}",
                recipe.source_digest
            ),
        ));
    }
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
        manifest_size: bytes.len() as u64,
        recipe_bytes,
        recipe,
        index: Arc::new(index),
        profile: None,
        signature: None,
        from_index: false,
        profile_listing: ProfileListing::NotListed,
        pack_head_start: HeadStartSlot::default(),
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

/// Largest blob of an smr artifact read into memory (recipe, profile,
/// pack index, config): a recipe of 256 MiB describes an image of
/// hundreds of GiB.
pub const ARTIFACT_BLOB_LIMIT: u64 = 256 << 20;

/// Blob `desc`, checked against its digest and size; read up to the size
/// its descriptor gives.
pub(crate) fn fetch(blobs: &dyn Blobs, what: &str, desc: &Descriptor) -> Result<Vec<u8>> {
    let repo = blobs.describe();
    if desc.size > ARTIFACT_BLOB_LIMIT {
        return Err(RegistryError::Protocol {
            repo,
            what: format!("GET blob {} ({what})", desc.digest),
            reason: format!(
                "the manifest says {} bytes, more than the {ARTIFACT_BLOB_LIMIT}-byte limit",
                desc.size
            ),
        });
    }
    let bytes = blobs.get_blob(&desc.digest, desc.size)?;
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

pub(crate) fn verify(repo: &str, what: &str, digest: &str, bytes: &[u8]) -> Result<()> {
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
