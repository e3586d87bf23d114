//! Pushing a converted image to a registry as an smr artifact.
//!
//! Order matters for crash safety: packs, pack index, recipe and the empty
//! config blob first (each only if the registry lacks it), the artifact
//! manifest after all of them (so no manifest ever points at a missing
//! blob), and the referrers entry last (so nothing lists a manifest that
//! does not exist). Every step is idempotent: pushing the same recipe again
//! uploads nothing.

use crate::artifact::{
    bad, blob_annotations, digest_of, fallback_tag, index_manifests, parse_digest, parse_referrers,
    ArtifactManifest, Descriptor, ANNOTATION_CHUNKING, ANNOTATION_CHUNKS,
    ANNOTATION_CHUNKS_PER_PACK, ANNOTATION_CHUNK_SIZE, ANNOTATION_ENCRYPTED, ANNOTATION_IMAGE_SIZE,
    ANNOTATION_PACK_INDEX, ANNOTATION_RECIPE, EMPTY_BLOB, EMPTY_DIGEST,
};
use crate::blobs::Blobs;
use crate::error::{RegistryError, Result};
use crate::media_types::{SMR_PACK, SMR_PACK_INDEX, SMR_RECIPE};
use crate::pack::{self, IndexedChunk, IndexedPack, PackIndex, PackParams};
use smr_format::{ChunkId, FormatError, Recipe};
use smr_image::media_types::{OCI_EMPTY, OCI_INDEX, OCI_MANIFEST};
use smr_store::ChunkStore;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};

#[cfg(test)]
mod tests;

/// Manifests above this size may be refused by registries (the OCI
/// distribution spec only promises 4 MiB).
const MANIFEST_SIZE_WARN: usize = 4 << 20;

/// How to push.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PushOptions {
    /// Pack boundaries; `None` = [`PackParams::for_chunk_size`] of the
    /// recipe (packs of about 4 MiB). `PackParams::with_target(1)` makes
    /// one blob per chunk.
    pub pack: Option<PackParams>,
    /// Packs built and uploaded at once (0 = 3). Each holds one pack in
    /// memory.
    pub threads: usize,
    /// Also tag the artifact manifest (it is reachable without a tag,
    /// through the referrers of its subject).
    pub tag: Option<String>,
    /// How the recipe was made, beyond what the recipe says
    /// ([`crate::artifact::ANNOTATION_LAYOUT`],
    /// [`crate::artifact::ANNOTATION_ZSTD_LEVEL`]): added to the manifest's
    /// annotations, so that `smr verify --reproduce` converts the same way.
    pub conversion: BTreeMap<String, String>,
    /// Repositories of the same registry to mount missing blobs from
    /// (OCI distribution `mount=`/`from=`) before uploading them, tried in
    /// order: an image whose packs another repository holds uploads none.
    pub mount_from: Vec<String>,
    /// Packs already built elsewhere (another artifact's pack index): a
    /// planned pack with exactly the chunks of one of these has its digest,
    /// so it is neither read from the store nor built when the registry
    /// has it or can mount it.
    pub known_packs: Vec<IndexedPack>,
}

/// How the artifact was made findable from its subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReferrersUpdate {
    /// The registry's referrers API lists it (no fallback tag written).
    Api,
    /// The fallback tag `sha256-<hex>` was created listing it.
    TagCreated,
    /// It was added to the existing fallback tag's index.
    TagUpdated,
    /// The fallback tag's index already listed it.
    TagUnchanged,
}

/// What a push did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PushReport {
    /// Digest of the artifact manifest.
    pub manifest_digest: String,
    /// The artifact as a referrers entry (artifact type, annotations).
    #[serde(skip)]
    pub descriptor: Descriptor,
    /// Whether the manifest was written (false: it already existed).
    pub manifest_pushed: bool,
    /// Number of packs.
    pub packs: u64,
    /// Distinct chunks in the packs.
    pub chunks: u64,
    /// Blobs of the artifact: packs, pack index, recipe, config.
    pub blobs_total: u64,
    /// Blobs uploaded.
    pub blobs_uploaded: u64,
    /// Blobs the registry already had.
    pub blobs_skipped: u64,
    /// Bytes uploaded.
    pub bytes_uploaded: u64,
    /// Bytes of the blobs the registry already had.
    pub bytes_skipped: u64,
    /// Blobs mounted from another repository ([`PushOptions::mount_from`]).
    pub blobs_mounted: u64,
    /// Bytes of the mounted blobs.
    pub bytes_mounted: u64,
    /// How the artifact is found from its subject (`None`: it has none).
    pub referrers: Option<ReferrersUpdate>,
}

/// Upload counters, shared by the pack threads.
#[derive(Default)]
struct Tally {
    total: u64,
    uploaded: u64,
    skipped: u64,
    bytes_uploaded: u64,
    bytes_skipped: u64,
    mounted: u64,
    bytes_mounted: u64,
}

/// Where a pushed blob came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Upload {
    /// The registry had it.
    Present,
    /// Mounted from another repository.
    Mounted,
    /// Uploaded.
    Uploaded,
}

impl Tally {
    fn count(&mut self, how: Upload, len: u64) {
        self.total += 1;
        let (n, bytes) = match how {
            Upload::Present => (&mut self.skipped, &mut self.bytes_skipped),
            Upload::Mounted => (&mut self.mounted, &mut self.bytes_mounted),
            Upload::Uploaded => (&mut self.uploaded, &mut self.bytes_uploaded),
        };
        *n += 1;
        *bytes += len;
    }
}

/// Pushes the image of `recipe_bytes`, with chunks from `store`, as an smr
/// artifact whose subject is `subject` (the source image's platform
/// manifest, which must be the one the recipe was converted from).
pub fn push(
    blobs: &dyn Blobs,
    subject: &Descriptor,
    recipe_bytes: &[u8],
    store: &dyn ChunkStore,
    options: &PushOptions,
) -> Result<PushReport> {
    push_artifact(blobs, Some(subject), recipe_bytes, store, options)
}

/// Pushes the image of `recipe_bytes`, which has no OCI source (one made
/// by `smr commit`), as an smr artifact without a subject, reached by
/// [`PushOptions::tag`] (required).
pub fn push_image(
    blobs: &dyn Blobs,
    recipe_bytes: &[u8],
    store: &dyn ChunkStore,
    options: &PushOptions,
) -> Result<PushReport> {
    if options.tag.is_none() {
        return Err(bad(
            &blobs.describe(),
            &digest_of(recipe_bytes),
            "an image without a source image is reached only by its tag: give one",
        ));
    }
    push_artifact(blobs, None, recipe_bytes, store, options)
}

fn push_artifact(
    blobs: &dyn Blobs,
    subject: Option<&Descriptor>,
    recipe_bytes: &[u8],
    store: &dyn ChunkStore,
    options: &PushOptions,
) -> Result<PushReport> {
    let repo = blobs.describe();
    let recipe_digest = digest_of(recipe_bytes);
    let recipe = Recipe::decode(recipe_bytes).map_err(|source| RegistryError::Format {
        what: format!("recipe {recipe_digest}"),
        source,
    })?;
    if let Some(subject) = subject {
        check_subject(&repo, subject, &recipe, &recipe_digest)?;
    }
    let params = options
        .pack
        .unwrap_or_else(|| PackParams::for_recipe(&recipe));
    let plan = pack::plan(&params, recipe.chunks.iter().map(|e| &e.id)).map_err(|source| {
        RegistryError::Pack {
            what: format!("pack layout of recipe {recipe_digest}"),
            source,
        }
    })?;
    let subject_digest = subject.map_or("none", |s| s.digest.as_str());
    let span =
        tracing::info_span!("push", %repo, subject = %subject_digest, recipe = %recipe_digest);
    let _enter = span.enter();
    tracing::info!(
        chunks = recipe.chunks.len(),
        packs = plan.len(),
        target = params.target,
        "pushing smr artifact"
    );

    let mut lens: HashMap<ChunkId, u32> = HashMap::new();
    for e in &recipe.chunks {
        lens.entry(e.id).or_insert(e.stored_len);
    }
    let tally = Mutex::new(Tally::default());
    let threads = if options.threads == 0 {
        3
    } else {
        options.threads
    };
    let packs = push_packs(blobs, store, &plan, &lens, threads, options, &tally)?;
    let index = PackIndex::new(params, packs).map_err(|source| RegistryError::Pack {
        what: format!("pack index of recipe {recipe_digest}"),
        source,
    })?;
    let index_bytes = index.encode();
    let from = &options.mount_from;
    upload(blobs, &digest_of(&index_bytes), &index_bytes, from, &tally)?;
    upload(blobs, &recipe_digest, recipe_bytes, from, &tally)?;
    upload(blobs, &digest_of(EMPTY_BLOB), EMPTY_BLOB, &[], &tally)?;

    let pack_descs = index
        .packs()
        .iter()
        .map(|p| Descriptor::new(SMR_PACK, p.digest.clone(), p.size()))
        .collect();
    let (recipe_desc, index_desc) = (
        Descriptor::of(SMR_RECIPE, recipe_bytes),
        Descriptor::of(SMR_PACK_INDEX, &index_bytes),
    );
    let mut annotations = annotations(&recipe, &params, &options.conversion);
    annotations.extend(blob_annotations(ANNOTATION_RECIPE, &recipe_desc));
    annotations.extend(blob_annotations(ANNOTATION_PACK_INDEX, &index_desc));
    let manifest = ArtifactManifest::new(
        subject.cloned(),
        recipe_desc,
        index_desc,
        pack_descs,
        annotations,
    );
    debug_assert!(manifest.validate().is_ok() && manifest.config.media_type == OCI_EMPTY);
    let bytes = manifest.to_bytes();
    if bytes.len() > MANIFEST_SIZE_WARN {
        tracing::warn!(
            size = bytes.len(),
            packs = index.packs().len(),
            "artifact manifest exceeds 4 MiB; registries may refuse it (use more chunks per pack)"
        );
    }
    let digest = digest_of(&bytes);
    let manifest_pushed = blobs.get_manifest(&digest)?.is_none();
    if manifest_pushed {
        let got = blobs.put_manifest(&digest, OCI_MANIFEST, &bytes)?;
        check_digest(&repo, &digest, &got)?;
    }
    if let Some(tag) = &options.tag {
        let got = blobs.put_manifest(tag, OCI_MANIFEST, &bytes)?;
        check_digest(&repo, &digest, &got)?;
    }
    let referrers = match subject {
        Some(_) => Some(update_referrers(
            blobs,
            &manifest,
            &bytes,
            &digest,
            &|_| false,
        )?),
        None => None,
    };
    let t = tally.into_inner().unwrap_or_else(PoisonError::into_inner);
    let stats = index.stats();
    let report = PushReport {
        descriptor: manifest.referrer(&bytes),
        manifest_digest: digest,
        manifest_pushed,
        packs: stats.packs,
        chunks: stats.chunks,
        blobs_total: t.total,
        blobs_uploaded: t.uploaded,
        blobs_skipped: t.skipped,
        bytes_uploaded: t.bytes_uploaded,
        bytes_skipped: t.bytes_skipped,
        blobs_mounted: t.mounted,
        bytes_mounted: t.bytes_mounted,
        referrers,
    };
    tracing::info!(manifest = %report.manifest_digest, uploaded = report.blobs_uploaded, skipped = report.blobs_skipped, mounted = report.blobs_mounted, bytes = report.bytes_uploaded, ?referrers, "pushed smr artifact");
    Ok(report)
}

/// Checks that `recipe` was converted from `subject`.
fn check_subject(
    repo: &str,
    subject: &Descriptor,
    recipe: &Recipe,
    recipe_digest: &str,
) -> Result<()> {
    if parse_digest(&subject.digest).is_none() {
        return Err(bad(repo, &subject.digest, "subject is not a sha256 digest"));
    }
    if recipe.source_digest != subject.digest {
        return Err(bad(
            repo,
            &subject.digest,
            format!(
                "recipe {recipe_digest} was converted from {}, not from this subject",
                recipe.source_digest
            ),
        ));
    }
    Ok(())
}

/// The artifact's annotations: a summary that the referrers list shows
/// (no timestamps: the same push gives the same manifest).
fn annotations(
    recipe: &Recipe,
    params: &PackParams,
    conversion: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let mut a: BTreeMap<String, String> = [
        (ANNOTATION_CHUNK_SIZE, recipe.chunk_size.to_string()),
        (
            ANNOTATION_CHUNKING,
            recipe
                .grid()
                .cdc_sizes()
                .map_or("fixed".to_string(), |s| format!("cdc {s}")),
        ),
        (ANNOTATION_IMAGE_SIZE, recipe.image_size.to_string()),
        (ANNOTATION_CHUNKS, recipe.chunks.len().to_string()),
        (ANNOTATION_ENCRYPTED, recipe.encrypted().to_string()),
        (ANNOTATION_CHUNKS_PER_PACK, params.target.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    a.extend(conversion.clone());
    a
}

fn check_digest(repo: &str, want: &str, got: &str) -> Result<()> {
    if want == got {
        return Ok(());
    }
    Err(RegistryError::Protocol {
        repo: repo.to_string(),
        what: format!("PUT manifest {want}"),
        reason: format!("the registry stored it as {got}"),
    })
}

/// Builds and uploads every pack of `plan` on `threads` threads; returns
/// the packs in plan order.
fn push_packs(
    blobs: &dyn Blobs,
    store: &dyn ChunkStore,
    plan: &[Vec<ChunkId>],
    lens: &HashMap<ChunkId, u32>,
    threads: usize,
    options: &PushOptions,
    tally: &Mutex<Tally>,
) -> Result<Vec<IndexedPack>> {
    let known: HashMap<Vec<ChunkId>, &IndexedPack> = options
        .known_packs
        .iter()
        .map(|p| (p.chunks.iter().map(|c| c.id).collect(), p))
        .collect();
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let done: Mutex<Vec<Option<IndexedPack>>> = Mutex::new(vec![None; plan.len()]);
    let first_err: Mutex<Option<RegistryError>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..threads.clamp(1, plan.len().max(1)) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(ids) = plan.get(i) else { break };
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let pushed = match known.get(ids) {
                    Some(p) => push_known_pack(blobs, store, p, lens, options, tally),
                    None => push_pack(blobs, store, ids, lens, &options.mount_from, tally),
                };
                match pushed {
                    Ok(p) => {
                        if let Some(slot) = done
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .get_mut(i)
                        {
                            *slot = Some(p);
                        }
                    }
                    Err(e) => {
                        stop.store(true, Ordering::Relaxed);
                        first_err
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .get_or_insert(e);
                        break;
                    }
                }
            });
        }
    });
    if let Some(e) = first_err
        .into_inner()
        .unwrap_or_else(PoisonError::into_inner)
    {
        return Err(e);
    }
    let done = done.into_inner().unwrap_or_else(PoisonError::into_inner);
    // Every slot is filled when no thread failed.
    Ok(done.into_iter().flatten().collect())
}

/// Reads pack `ids` from `store` (checking each chunk), uploads it unless
/// present.
fn push_pack(
    blobs: &dyn Blobs,
    store: &dyn ChunkStore,
    ids: &[ChunkId],
    lens: &HashMap<ChunkId, u32>,
    mount_from: &[String],
    tally: &Mutex<Tally>,
) -> Result<IndexedPack> {
    let size: u64 = ids
        .iter()
        .map(|id| u64::from(lens.get(id).copied().unwrap_or(0)))
        .sum();
    let mut data = Vec::with_capacity(size as usize);
    let mut chunks = Vec::with_capacity(ids.len());
    for id in ids {
        let bytes = store.get(id)?;
        let what = || format!("chunk {id} from store {}", store.describe());
        // A corrupt chunk pushed once would stay in the registry for good.
        smr_format::chunk::verify(id, &bytes).map_err(|source| RegistryError::Format {
            what: what(),
            source,
        })?;
        let want = lens.get(id).copied().unwrap_or(0);
        if bytes.len() as u64 != u64::from(want) {
            return Err(RegistryError::Format {
                what: what(),
                source: FormatError::Recipe(format!(
                    "the recipe lists {want} stored bytes, the store holds {}",
                    bytes.len()
                )),
            });
        }
        chunks.push(IndexedChunk { id: *id, len: want });
        data.extend_from_slice(&bytes);
    }
    let digest = match chunks.as_slice() {
        // A one-chunk pack is the chunk: its digest is the (verified) id.
        [only] => format!("sha256:{}", only.id),
        _ => digest_of(&data),
    };
    upload(blobs, &digest, &data, mount_from, tally)?;
    Ok(IndexedPack { digest, chunks })
}

/// Pushes planned pack `known` whose digest is known: nothing is read when
/// the registry has it or mounts it; otherwise it is built and uploaded.
fn push_known_pack(
    blobs: &dyn Blobs,
    store: &dyn ChunkStore,
    known: &IndexedPack,
    lens: &HashMap<ChunkId, u32>,
    options: &PushOptions,
    tally: &Mutex<Tally>,
) -> Result<IndexedPack> {
    let lens_agree = known.chunks.iter().all(|c| lens.get(&c.id) == Some(&c.len));
    if lens_agree {
        if let Some(how) = present_or_mounted(blobs, &known.digest, &options.mount_from)? {
            let mut t = tally.lock().unwrap_or_else(PoisonError::into_inner);
            t.count(how, known.size());
            return Ok(known.clone());
        }
    }
    let ids: Vec<ChunkId> = known.chunks.iter().map(|c| c.id).collect();
    push_pack(blobs, store, &ids, lens, &[], tally)
}

/// Whether blob `digest` is in the registry already, or was mounted from
/// one of `mount_from`; `None`: it has to be uploaded.
fn present_or_mounted(
    blobs: &dyn Blobs,
    digest: &str,
    mount_from: &[String],
) -> Result<Option<Upload>> {
    if blobs.blob_size(digest)?.is_some() {
        return Ok(Some(Upload::Present));
    }
    for from in mount_from {
        if blobs.mount_blob(digest, from)? {
            tracing::debug!(blob = %digest, %from, "blob mounted");
            return Ok(Some(Upload::Mounted));
        }
    }
    Ok(None)
}

/// Uploads blob `digest` unless the registry has it (HEAD first) or can
/// mount it from one of `mount_from`.
fn upload(
    blobs: &dyn Blobs,
    digest: &str,
    data: &[u8],
    mount_from: &[String],
    tally: &Mutex<Tally>,
) -> Result<()> {
    let how = match present_or_mounted(blobs, digest, mount_from)? {
        Some(how) => how,
        None if blobs.push_blob(digest, data)? => Upload::Uploaded,
        None => Upload::Present,
    };
    tracing::debug!(blob = %digest, size = data.len(), ?how, "blob");
    tally
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .count(how, data.len() as u64);
    Ok(())
}

/// Pushes a small referrer (a profile, a signature): the empty config blob,
/// its one layer's `blob`, then `manifest` by digest; returns the
/// manifest's digest and bytes. `what` names it in errors.
pub(crate) fn push_small_referrer(
    blobs: &dyn Blobs,
    manifest: &ArtifactManifest,
    blob: &[u8],
    what: &str,
) -> Result<(String, Vec<u8>)> {
    blobs.push_blob(EMPTY_DIGEST, EMPTY_BLOB)?;
    blobs.push_blob(&digest_of(blob), blob)?;
    let bytes = manifest.to_bytes();
    let digest = digest_of(&bytes);
    let got = blobs.put_manifest(&digest, OCI_MANIFEST, &bytes)?;
    if got != digest {
        return Err(bad(
            &blobs.describe(),
            &digest,
            format!("the registry stored the {what} manifest as {got}"),
        ));
    }
    Ok((digest, bytes))
}

/// Makes the artifact findable from its subject: nothing to do when the
/// referrers API already lists it, else a read-modify-write of the
/// fallback tag's image index (entries sorted by digest; other tools'
/// entries kept as they are, except those `supersedes` says the new entry
/// replaces). Concurrent pushers to the same subject can
/// lose each other's entry: the tag schema has no compare-and-swap.
pub(crate) fn update_referrers(
    blobs: &dyn Blobs,
    manifest: &ArtifactManifest,
    bytes: &[u8],
    digest: &str,
    supersedes: &dyn Fn(&Descriptor) -> bool,
) -> Result<ReferrersUpdate> {
    let repo = blobs.describe();
    let Some(subject) = manifest.subject.as_ref().map(|s| &s.digest) else {
        return Err(bad(&repo, digest, "has no subject to be listed under"));
    };
    if let Some(list) = blobs.referrers(subject)? {
        let list = parse_referrers(&repo, &format!("referrers of {subject}"), &list)?;
        if list.iter().any(|d| d.digest == digest) {
            return Ok(ReferrersUpdate::Api);
        }
        tracing::debug!(%subject, "the referrers API does not list the artifact: writing the fallback tag");
    }
    let tag = fallback_tag(subject)
        .ok_or_else(|| bad(&repo, subject, "subject is not a sha256 digest"))?;
    let entry =
        serde_json::to_value(manifest.referrer(bytes)).map_err(|source| RegistryError::Json {
            what: format!("referrers entry of {digest}"),
            source,
        })?;
    let (mut doc, update) = match blobs.get_manifest(&tag)? {
        None => (
            serde_json::json!({
                "schemaVersion": 2,
                "mediaType": OCI_INDEX,
                "manifests": [],
            }),
            ReferrersUpdate::TagCreated,
        ),
        Some((media_type, old)) => {
            if media_type != OCI_INDEX {
                return Err(bad(
                    &repo,
                    &tag,
                    format!(
                        "the referrers fallback tag holds a `{media_type}`, not an image index"
                    ),
                ));
            }
            let doc: serde_json::Value =
                serde_json::from_slice(&old).map_err(|source| RegistryError::Json {
                    what: format!("{repo}: referrers index {tag}"),
                    source,
                })?;
            let listed = index_manifests(&doc)
                .map_err(|reason| bad(&repo, &tag, reason))?
                .iter()
                .any(|m| m.get("digest").and_then(|d| d.as_str()) == Some(digest));
            if listed {
                return Ok(ReferrersUpdate::TagUnchanged);
            }
            (doc, ReferrersUpdate::TagUpdated)
        }
    };
    if let Some(list) = doc.get_mut("manifests").and_then(|m| m.as_array_mut()) {
        list.retain(|m| {
            !serde_json::from_value::<Descriptor>(m.clone()).is_ok_and(|d| supersedes(&d))
        });
        list.push(entry);
        list.sort_by(|a, b| {
            let key = |v: &serde_json::Value| {
                v.get("digest").and_then(|d| d.as_str()).map(str::to_string)
            };
            key(a).cmp(&key(b))
        });
    }
    let out = serde_json::to_vec(&doc).map_err(|source| RegistryError::Json {
        what: format!("referrers index {tag}"),
        source,
    })?;
    blobs.put_manifest(&tag, OCI_INDEX, &out)?;
    tracing::info!(%tag, ?update, "referrers fallback tag written");
    Ok(update)
}
