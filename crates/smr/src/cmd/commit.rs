//! `smr commit VOLUME -o NEW.recipe --store S`: a volume made into a new
//! image. Every chunk with no block in the COW keeps its entry (id, key)
//! and is not stored again; a chunk with written blocks is read through
//! the volume, sealed with the base's codec and stored (a chunk that is
//! now all zeros is dropped); the image config is kept. The cost grows
//! with the written chunks, not the image. Convergent sealing makes the
//! new recipe a function of the volume's bytes.
//!
//! `--push docker://R/NAME:TAG` pushes the new image as an smr artifact
//! with no subject (it has no OCI source image), tagged: the packs the
//! base's artifact already has are neither read nor uploaded again (same
//! repository), or mounted from the base's repository (same registry).

use super::image::SourceArgs;
use super::volume::{open, RootArgs};
use crate::progress::human;
use anyhow::{Context, Result};
use smr_format::chunk::ZSTD_LEVEL;
use smr_format::{ChunkCodec, ChunkEntry, ChunkKey, Recipe};
use smr_node::device::BlockDevice;
use smr_node::volume::map::BLOCK;
use smr_registry::push::{push_image, PushOptions};
use smr_registry::reference::ImageRef;
use smr_registry::source::RegistrySource;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

/// Arguments of `smr commit`.
#[derive(clap::Args)]
pub struct Args {
    /// The volume.
    volume: String,
    /// Where to write the new recipe.
    #[arg(short = 'o', long, required_unless_present = "push")]
    out: Option<PathBuf>,
    /// Push the new image to a registry, tagged (`docker://HOST/NAME:TAG`):
    /// it runs as `smr run docker://HOST/NAME:TAG`.
    #[arg(long, value_name = "docker://REF")]
    push: Option<String>,
    /// With --push: sign the pushed image with this cosign private key
    /// (password in `$COSIGN_PASSWORD`).
    #[arg(long, value_name = "FILE", env = "SMR_SIGN_KEY", requires = "push")]
    sign_key: Option<PathBuf>,
    /// The chunk store the new chunks go to (the base's, for the new image
    /// to share its chunks there; it is also where the base is read from
    /// unless the volume says otherwise).
    #[arg(long = "to-store", value_name = "STORE")]
    to_store: Option<String>,
    #[command(flatten)]
    source: SourceArgs,
    #[command(flatten)]
    root: RootArgs,
    /// The convergent-encryption salt the base was converted with
    /// (default: the public salt).
    #[arg(long, env = "SMR_SALT_FILE")]
    salt_file: Option<PathBuf>,
    /// zstd level for written chunks, when the base's chunks are
    /// compressed.
    #[arg(long, default_value_t = ZSTD_LEVEL)]
    zstd_level: i32,
}

/// Commits the volume.
pub fn run(a: Args) -> Result<ExitCode> {
    let t = Instant::now();
    let v = open(&a.root, &a.volume, &a.source)?;
    let base = v.base.recipe.clone();
    let owner = a.source.origin.key.load()?;
    let keys = if base.encrypted() {
        let owner = owner
            .as_ref()
            .context("the base's chunks are encrypted: pass the owner key (--key-file)")?;
        base.keys(Some(owner))
            .with_context(|| format!("the base recipe of volume {}", a.volume))?
    } else {
        None
    };
    let salt = crate::keys::load_salt(a.salt_file.as_deref())?;
    let compress = base.chunks.iter().any(|c| c.compressed);
    let codec = ChunkCodec::new(salt, base.encrypted(), compress).with_zstd_level(a.zstd_level);
    if let Some(r) = &a.push {
        anyhow::ensure!(
            crate::remote::is_remote(r),
            "--push {r}: give a registry image, docker://HOST/NAME:TAG"
        );
    }
    // With --push and no --to-store, the written chunks are staged in a
    // temporary directory, and the kept ones stay where the base has them.
    let staging = match (&a.to_store, &a.push) {
        (None, Some(_)) => Some(tempfile::tempdir().context("creating a staging directory")?),
        _ => None,
    };
    let copy_kept = staging.is_none();
    let location = match &staging {
        Some(dir) => dir.path().display().to_string(),
        None => a
            .to_store
            .clone()
            .or_else(|| v.meta.store.clone())
            .or_else(|| a.source.origin.store.clone())
            .context("give the store for the new chunks (--to-store)")?,
    };
    let pack = smr_format::pack::PackParams::for_recipe(&base);
    let (store, batched) = super::convert::open_store(&location, pack)?;

    let map = v.volume.map();
    let size = v.volume.size();
    // The base's chunks, and the nominal chunk size past its end.
    let grid = base
        .grid()
        .extended_to(size)
        .with_context(|| format!("volume {} is smaller than its base", a.volume))?;
    let by_index: std::collections::HashMap<u64, usize> = base
        .chunks
        .iter()
        .enumerate()
        .map(|(i, c)| (c.index, i))
        .collect();
    let (mut entries, mut new_keys) = (Vec::new(), Vec::new());
    let (mut dirty, mut stored, mut stored_bytes, mut dropped) = (0u64, 0u64, 0u64, 0u64);
    let base_store = v.base.lazy.fetcher().store().clone();
    let mut copied = 0u64;
    for index in 0..grid.count() {
        let range = grid.range(index);
        // A chunk the volume grew is new, written or not.
        let written = range != base.grid().range(index)
            || map.any_in(
                range.start / BLOCK,
                (range.end - range.start).div_ceil(BLOCK),
            );
        if !written {
            if let Some(&pos) = by_index.get(&index) {
                let e = base.chunks[pos];
                // The new image must be whole in the store it goes to: a
                // kept chunk it lacks comes from the base's store.
                if copy_kept && !store.exists(&e.id)? {
                    let bytes = base_store.get(&e.id).with_context(|| {
                        format!(
                            "chunk {} (#{index}) of the base of volume {} is missing from {}",
                            e.id,
                            a.volume,
                            base_store.describe()
                        )
                    })?;
                    anyhow::ensure!(
                        smr_format::ChunkId::of(&bytes) == e.id,
                        "chunk {} (#{index}) of the base is corrupt in {}",
                        e.id,
                        base_store.describe()
                    );
                    store.put(&e.id, &bytes)?;
                    copied += 1;
                }
                entries.push(e);
                if let Some(k) = &keys {
                    new_keys.push(k[pos]);
                }
            }
            continue;
        }
        dirty += 1;
        let mut plain = vec![0u8; (range.end - range.start) as usize];
        v.volume
            .read_at(range.start, &mut plain)
            .with_context(|| format!("reading chunk #{index} of volume {}", a.volume))?;
        if plain.iter().all(|&b| b == 0) {
            dropped += 1;
            continue;
        }
        let sealed = codec.seal(&plain);
        if !store.exists(&sealed.id)? {
            store
                .put(&sealed.id, &sealed.stored)
                .with_context(|| format!("storing chunk {} (#{index})", sealed.id))?;
            stored += 1;
            stored_bytes += sealed.stored.len() as u64;
        }
        entries.push(ChunkEntry {
            index,
            id: sealed.id,
            stored_len: u32::try_from(sealed.stored.len()).context("chunk too large")?,
            compressed: sealed.compressed,
        });
        if let Some(k) = sealed.key {
            new_keys.push(k);
        }
    }
    let sealed_keys: Option<(&[ChunkKey], &smr_format::OwnerKey)> = match (&keys, &owner) {
        (Some(_), Some(o)) => Some((&new_keys, o)),
        _ => None,
    };
    // The image this one was committed from: the base recipe's hash.
    let source = format!("sha256:{}", v.meta.recipe_sha256);
    let recipe = Recipe::new(
        grid,
        source,
        base.config.clone(),
        entries,
        None,
        sealed_keys,
    )
    .context("building the new recipe")?;
    if let Some(batch) = &batched {
        batch
            .commit()
            .with_context(|| format!("making the chunks in {location} durable"))?;
        batch
            .write_index(&recipe)
            .with_context(|| format!("writing the index of the recipe in {location}"))?;
    }
    let bytes = recipe.encode();
    if let Some(out) = &a.out {
        super::convert::write_atomic(out, &bytes)?;
    }
    if copied > 0 {
        errln!("copied {copied} unchanged chunks of the base into {location}");
    }
    errln!(
        "committed volume {} -> {} ({}): {} of {} chunks written ({} stored, {}; {} now zero), {} kept; {:.2}s",
        a.volume,
        a.out.as_ref().map_or("the registry".into(), |o| o.display().to_string()),
        recipe.digest(),
        dirty,
        recipe.chunk_count(),
        stored,
        human(stored_bytes),
        dropped,
        recipe.chunks.len() as u64 - (dirty - dropped),
        t.elapsed().as_secs_f64()
    );
    if let Some(reference) = &a.push {
        let layered = smr_store::Layered::new(store, base_store);
        let base_index = v.base.pack_index.as_deref();
        push(&a, &v.meta, base_index, reference, &bytes, &layered)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Pushes the committed image (recipe `bytes`, chunks in `store`) to
/// `reference`, with what the base's artifact (its pack index
/// `base_index`, for a registry base) lets it skip or mount, and signs it
/// with `--sign-key`.
fn push(
    a: &Args,
    meta: &super::volume::VolumeMeta,
    base_index: Option<&smr_registry::pack::PackIndex>,
    reference: &str,
    bytes: &[u8],
    store: &dyn smr_store::ChunkStore,
) -> Result<()> {
    let t = Instant::now();
    let reg = RegistrySource::open(reference, &a.source.origin.registry.options()?)?;
    let target = reg.reference();
    anyhow::ensure!(
        target.digest.is_none(),
        "--push {reference}: a pushed image is named by a tag, not a digest"
    );
    let mut opts = PushOptions {
        tag: Some(target.tag.clone().unwrap_or_else(|| "latest".into())),
        ..PushOptions::default()
    };
    if let Some(index) = base_index {
        // The base's pack layout, so that runs of unchanged chunks make
        // the same packs.
        opts.pack = Some(index.params());
        opts.known_packs = index.packs().to_vec();
        let base_ref = ImageRef::parse(&meta.image)?;
        if base_ref.registry == target.registry && base_ref.repository != target.repository {
            opts.mount_from.push(base_ref.repository);
        }
    }
    let key = a
        .sign_key
        .as_deref()
        .map(super::keygen::load_signing_key)
        .transpose()?;
    let repo = reg.repository();
    let r = push_image(repo, bytes, store, &opts)
        .with_context(|| format!("pushing the committed image to {reference}"))?;
    errln!(
        "pushed {reference} (smr image {}): {}; {:.2}s",
        r.manifest_digest,
        crate::remote::push_summary(&r),
        t.elapsed().as_secs_f64()
    );
    if let Some(key) = key {
        let s = smr_registry::signature::sign_manifest(repo, &r.descriptor, &key)
            .with_context(|| format!("signing {}", r.manifest_digest))?;
        errln!(
            "signed {} with key {}: signature {}",
            r.manifest_digest,
            s.key_id,
            s.manifest_digest
        );
    }
    Ok(())
}
