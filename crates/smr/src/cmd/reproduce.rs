//! `smr verify --reproduce docker://…`: converts the source image again,
//! the way its smr artifact says it was converted, and checks that the
//! artifact's recipe is exactly what the image gives. This holds because
//! conversion is deterministic (within one layout version,
//! [`smr_convert::LAYOUT_VERSION`], recorded in the artifact).

use super::image::OriginArgs;
use crate::remote::is_remote;
use anyhow::{bail, ensure, Context, Result};
use smr_convert::{convert, ConvertOptions, LAYOUT_VERSION};
use smr_format::chunk::ZSTD_LEVEL;
use smr_format::ChunkCodec;
use smr_registry::artifact::{ANNOTATION_LAYOUT, ANNOTATION_ZSTD_LEVEL};
use smr_registry::source::RegistrySource;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

/// Re-converts `image`'s source and compares recipes; `salt_file` is the
/// salt it was converted with (default: the public salt).
pub fn run(image: &str, origin: &OriginArgs, salt_file: Option<&Path>) -> Result<ExitCode> {
    ensure!(
        is_remote(image),
        "--reproduce checks the smr artifact of a registry image (docker://…), not {image}"
    );
    let platform = origin.platform.parse().context("--platform")?;
    let owner = origin.key.load()?;
    let (_, artifact) = origin.trusted_artifact(image, false)?;
    let recipe = &artifact.recipe;
    let notes = &artifact.manifest.annotations;
    let layout = LAYOUT_VERSION.to_string();
    match notes.get(ANNOTATION_LAYOUT) {
        Some(v) if *v != layout => bail!(
            "smr artifact {} was converted with layout {v}; this smr converts with layout {layout}: reproduce it with an smr of layout {v}",
            artifact.digest
        ),
        Some(_) => {}
        None => tracing::warn!(artifact = %artifact.digest, "the artifact does not say its layout version; assuming {layout}"),
    }
    let level = match notes.get(ANNOTATION_ZSTD_LEVEL) {
        Some(v) => Some(v.parse::<i32>().with_context(|| {
            format!(
                "annotation {ANNOTATION_ZSTD_LEVEL}={v} of {}",
                artifact.digest
            )
        })?),
        None if recipe.chunks.iter().any(|c| c.compressed) => Some(ZSTD_LEVEL),
        None => None,
    };
    let encrypted = recipe.encrypted();
    if encrypted && owner.is_none() {
        bail!("the chunks of smr artifact {} are encrypted: pass the owner key that converted it (--key-file)", artifact.digest);
    }
    let salt = crate::keys::load_salt(salt_file)?;
    let codec = ChunkCodec::new(salt, encrypted, level.is_some())
        .with_zstd_level(level.unwrap_or(ZSTD_LEVEL));
    // The source exactly as the artifact names it: its platform manifest.
    let pinned = format!("docker://{}@{}", artifact.repo, recipe.source_digest);
    let source = RegistrySource::open(&pinned, &origin.registry.options()?)?;
    let staging = tempfile::Builder::new()
        .prefix("smr-reproduce-")
        .tempdir()
        .context("creating a staging directory for the chunks")?;
    let store = Arc::new(
        smr_store::LocalStore::open_batched(staging.path()).context("opening the staging store")?,
    );
    let again = convert(
        &source,
        store,
        &ConvertOptions {
            chunk_size: recipe.chunk_size,
            cdc: recipe.grid().cdc_sizes(),
            codec,
            platform,
            owner: if encrypted { owner } else { None },
            workers: std::thread::available_parallelism().map_or(2, |n| n.get()),
        },
        &mut |_| {},
    )
    .with_context(|| format!("converting {pinned} again"))?;
    if let Some(d) = recipe.first_difference(&again.recipe) {
        bail!(
            "smr artifact {} is not what {image} converts to; first difference: {d}",
            artifact.digest
        );
    }
    errln!(
        "reproduced: smr artifact {} is exactly what {} converts to ({} chunks {}, layout {layout}{}{})",
        artifact.digest,
        pinned,
        recipe.chunks.len(),
        match recipe.grid().cdc_sizes() {
            Some(s) => format!("cut by content ({s})"),
            None => format!("of {}", recipe.chunk_size),
        },
        if encrypted { ", encrypted" } else { "" },
        level.map_or(String::new(), |l| format!(", zstd level {l}"))
    );
    Ok(ExitCode::SUCCESS)
}
