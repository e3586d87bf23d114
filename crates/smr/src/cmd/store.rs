//! `smr store migrate FROM TO RECIPE...`: copy the chunks of the given
//! recipes from a store of any layout and location into a local store in
//! the packed layout, in image order, one index per recipe
//! (smr_store::packed). Every chunk is checked against its name on the
//! way; `FROM` is left as it is.

use crate::keys::read_recipe_bytes;
use crate::progress::{bytes_bar, human};
use anyhow::{Context, Result};
use smr_format::pack::PackParams;
use smr_format::ChunkId;
use smr_store::{ChunkStore, LocalStore, PutOutcome, StoreLocation};
use std::path::PathBuf;
use std::process::ExitCode;

/// Arguments of `smr store`.
#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    cmd: StoreCmd,
}

#[derive(clap::Subcommand)]
enum StoreCmd {
    /// Copy the chunks of recipes into a local store of packs (from a
    /// store of chunk files, or any other store).
    Migrate(MigrateArgs),
}

/// Arguments of `smr store migrate`.
#[derive(clap::Args)]
struct MigrateArgs {
    /// The store to copy from: a directory, `s3://…` or `http(s)://…`.
    from: String,
    /// The local directory store to copy into (created if needed).
    to: PathBuf,
    /// The recipes whose chunks are copied: files, or directories searched
    /// for `*.recipe`.
    #[arg(required = true, value_name = "RECIPE")]
    recipes: Vec<PathBuf>,
}

/// Runs `smr store`.
pub fn run(a: Args) -> Result<ExitCode> {
    match a.cmd {
        StoreCmd::Migrate(m) => migrate(m),
    }
}

fn migrate(a: MigrateArgs) -> Result<ExitCode> {
    let t = std::time::Instant::now();
    let mut files = Vec::new();
    for p in &a.recipes {
        super::gc::collect(p, &mut files).with_context(|| format!("recipe {}", p.display()))?;
    }
    anyhow::ensure!(!files.is_empty(), "no recipes found in {:?}", a.recipes);
    // Every recipe is read before anything is written.
    let recipes = files
        .iter()
        .map(|f| read_recipe_bytes(f))
        .collect::<Result<Vec<_>>>()?;
    let from: StoreLocation = a
        .from
        .parse()
        .with_context(|| format!("store {}", a.from))?;
    if let Some(dir) = from.local_dir() {
        anyhow::ensure!(dir.is_dir(), "store {} does not exist", a.from);
    }
    let (mut written, mut present, mut bytes) = (0u64, 0u64, 0u64);
    for ((recipe, recipe_bytes), file) in recipes.iter().zip(&files) {
        let mut source = from
            .open()
            .with_context(|| format!("opening the store {}", a.from))?;
        if from.local_dir().is_none() {
            let sha = smr_format::Profile::recipe_hash(recipe_bytes);
            source = smr_store::packed::Indexed::open(source, &sha).with_context(|| {
                format!("reading the index of {} in {}", file.display(), a.from)
            })?;
        }
        let to = LocalStore::open_batched(&a.to)
            .with_context(|| format!("opening the store {}", a.to.display()))?
            .with_pack_params(PackParams::for_recipe(recipe));
        let bar = bytes_bar(recipe.chunks.len() as u64, "migrating");
        for (n, c) in recipe.chunks.iter().enumerate() {
            let data = source
                .get(&c.id)
                .with_context(|| format!("chunk {} (#{}) of {}", c.id, c.index, file.display()))?;
            anyhow::ensure!(
                ChunkId::of(&data) == c.id,
                "chunk {} (#{}) of {} is corrupt in {}",
                c.id,
                c.index,
                file.display(),
                a.from
            );
            match to.put(&c.id, &data)? {
                PutOutcome::Written => {
                    written += 1;
                    bytes += data.len() as u64;
                }
                PutOutcome::Existed => present += 1,
            }
            bar.set_position(n as u64 + 1);
        }
        bar.finish_and_clear();
        to.commit()
            .with_context(|| format!("making the packs in {} durable", a.to.display()))?;
        to.write_index(recipe)
            .with_context(|| format!("writing the index of {}", file.display()))?;
    }
    let packs = smr_store::gc::packs::pack_files(&LocalStore::open(&a.to)?)?;
    errln!(
        "migrated {} recipes from {} to {}: {written} chunks ({}) written, {present} already there; {} packs, in {:.1}s",
        recipes.len(),
        a.from,
        a.to.display(),
        human(bytes),
        packs.len(),
        t.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}
