//! `smr extract` and `smr verify`.

use super::image::OriginArgs;
use crate::keys::image_chunks;
use crate::progress::human;
use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

/// Arguments of `smr extract`.
#[derive(clap::Args)]
pub struct ExtractArgs {
    /// The image: a recipe file (chunks in `--store`), or
    /// `docker://HOST[:PORT]/NAME[:TAG|@DIGEST]` (recipe and chunks from the
    /// smr artifact pushed by `smr convert --push`).
    image: String,
    /// Output image file.
    #[arg(short = 'o', long)]
    out: PathBuf,
    #[command(flatten)]
    origin: OriginArgs,
}

/// Arguments of `smr verify`.
#[derive(clap::Args)]
pub struct VerifyArgs {
    /// The image: a recipe file (chunks in `--store`), or `docker://…`
    /// (its smr artifact).
    image: String,
    #[command(flatten)]
    origin: OriginArgs,
}

fn threads() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get()) * 2
}

/// Rebuilds the image.
pub fn run_extract(a: ExtractArgs) -> Result<ExitCode> {
    let r = a.origin.resolve(&a.image, false, false)?;
    let img = image_chunks(r.recipe, &a.origin.key, true, &a.image)?;
    let t = Instant::now();
    let size = smr_node::restore::extract(&img, r.store.as_ref(), &a.out, threads())
        .with_context(|| format!("extracting {}", a.image))?;
    eprintln!(
        "extracted {} ({}) in {:.2}s",
        a.out.display(),
        human(size),
        t.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}

/// Checks every chunk; fails naming each bad chunk.
pub fn run_verify(a: VerifyArgs) -> Result<ExitCode> {
    let r = a.origin.resolve(&a.image, false, false)?;
    let img = image_chunks(r.recipe, &a.origin.key, false, &a.image)?;
    let store = r.store;
    let report = smr_node::restore::verify(&img, store.as_ref(), threads());
    for (index, e) in &report.failures {
        eprintln!("chunk #{index}: {e}");
    }
    if !report.failures.is_empty() {
        bail!(
            "{} of {} chunks are missing or corrupt in {}",
            report.failures.len(),
            report.checked,
            store.describe()
        );
    }
    let how = if img.keys_missing() {
        "hashes checked; pass --key-file to also check decryption"
    } else {
        "hashes and contents checked"
    };
    eprintln!(
        "{} chunks ({}) intact ({how})",
        report.checked,
        human(report.bytes)
    );
    Ok(ExitCode::SUCCESS)
}
