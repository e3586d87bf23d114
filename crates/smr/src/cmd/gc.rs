//! `smr gc --store DIR|s3://… --keep ROOT... [--grace 24h] [--dry-run]`:
//! delete the packs, indexes and chunk files of a store that no root
//! recipe needs (smr_store::gc::packs for packs). A conversion
//! running meanwhile loses nothing: on a local store by the argument of
//! smr_store::gc, on S3 because writers and the collector exclude each
//! other (smr_store::s3::lease).
//! `smr gc docker://HOST/NAME [--dry-run]`: delete the smr artifacts,
//! profiles and signatures of a repository whose image is gone
//! (smr_registry::gc).

use crate::keys::read_recipe;
use crate::progress::human;
use anyhow::{bail, Context, Result};
use smr_format::ChunkId;
use smr_store::gc::{chunk_files, remove_if_older, ChunkFile};
use smr_store::{LocalStore, S3Store, StoreLocation};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

/// Arguments of `smr gc`.
#[derive(clap::Args)]
pub struct Args {
    /// A repository (`docker://HOST[:PORT]/NAME`) to clean of smr
    /// referrers whose image was deleted, instead of a store.
    #[arg(value_name = "docker://REPO", conflicts_with_all = ["store", "keep", "roots"])]
    repository: Option<String>,
    #[command(flatten)]
    registry: crate::remote::RegistryArgs,
    /// The chunk store: a directory or `s3://bucket[/prefix]`.
    #[arg(long, required_unless_present = "repository")]
    store: Option<String>,
    /// A root: a recipe file, or a directory searched for `*.recipe`
    /// (repeatable). Every chunk a root names is kept.
    #[arg(
        long = "keep",
        value_name = "PATH",
        required_unless_present_any = ["roots", "repository"]
    )]
    keep: Vec<PathBuf>,
    /// A file listing roots, one path per line (`#` comments).
    #[arg(long, value_name = "FILE")]
    roots: Option<PathBuf>,
    /// Also keep the base recipes of the volumes under this node root.
    #[arg(long = "volumes-root", value_name = "ROOT")]
    volumes_root: Option<PathBuf>,
    /// Only chunks written (or reused) longer ago than this are deleted:
    /// longer than any conversion or commit takes.
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    grace: Duration,
    /// Report what would be deleted; delete nothing.
    #[arg(long)]
    dry_run: bool,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    json: bool,
}

/// The root recipe files: `--keep` paths, `--roots` lines, volume bases.
fn root_files(a: &Args) -> Result<Vec<PathBuf>> {
    let mut given = a.keep.clone();
    if let Some(list) = &a.roots {
        let text = std::fs::read_to_string(list)
            .with_context(|| format!("reading the roots list {}", list.display()))?;
        for line in text.lines() {
            let line = line.split('#').next().unwrap_or("").trim();
            if !line.is_empty() {
                given.push(PathBuf::from(line));
            }
        }
    }
    if let Some(root) = &a.volumes_root {
        let dir = root.join("volumes");
        if dir.is_dir() {
            given.push(dir);
        }
    }
    let mut files = Vec::new();
    for p in given {
        collect(&p, &mut files).with_context(|| format!("root {}", p.display()))?;
    }
    Ok(files)
}

/// `p` if it is a file, else every `*.recipe` under the directory `p`.
pub(crate) fn collect(p: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let meta = std::fs::metadata(p).with_context(|| format!("reading {}", p.display()))?;
    if meta.is_file() {
        out.push(p.to_path_buf());
        return Ok(());
    }
    for e in std::fs::read_dir(p).with_context(|| format!("listing {}", p.display()))? {
        let path = e
            .with_context(|| format!("listing {}", p.display()))?
            .path();
        if path.is_dir() {
            collect(&path, out)?;
        } else if path.extension().is_some_and(|x| x == "recipe") {
            out.push(path);
        }
    }
    Ok(())
}

/// Cleans a repository of orphaned smr referrers.
fn run_registry(a: &Args, image: &str) -> Result<ExitCode> {
    let iref = smr_registry::reference::ImageRef::parse(image)?;
    let repo = smr_registry::client::Repository::open(&iref, &a.registry.options()?)?;
    let r = smr_registry::gc::collect(&repo, a.dry_run)
        .with_context(|| format!("collecting smr referrers in {image}"))?;
    if a.json {
        outln!("{}", serde_json::to_string_pretty(&r)?);
    }
    let verb = if a.dry_run { "would delete" } else { "deleted" };
    errln!(
        "{}: {} missing images; {verb} {} smr manifests, {} referrers tags",
        smr_registry::Blobs::describe(&repo),
        r.subjects_gone.len(),
        r.deleted.len(),
        r.tags.len()
    );
    Ok(ExitCode::SUCCESS)
}

/// The store being collected.
enum Swept {
    Local(LocalStore),
    S3 {
        store: S3Store,
        /// The collector's lease, held until the end.
        _lease: smr_store::s3::lease::Lease,
    },
}

impl Swept {
    /// Opens `location` for collection (on S3: takes the collector's
    /// lease, so no writer runs until it is done).
    fn open(location: &str) -> Result<Swept> {
        let parsed: StoreLocation = location
            .parse()
            .with_context(|| format!("--store {location}"))?;
        match parsed {
            StoreLocation::Local(dir) => {
                anyhow::ensure!(dir.is_dir(), "store {} does not exist", dir.display());
                let s = LocalStore::open(&dir)
                    .with_context(|| format!("opening the store {}", dir.display()))?;
                Ok(Swept::Local(s))
            }
            StoreLocation::S3(l) => {
                let s = S3Store::open(&l, smr_store::RemoteOptions::from_env()?)
                    .with_context(|| format!("opening the store {location}"))?;
                let lease = s.begin_collection()?;
                Ok(Swept::S3 {
                    store: s,
                    _lease: lease,
                })
            }
            StoreLocation::Http(_) => {
                bail!("--store {location}: an HTTP store is read-only; collect the store it serves")
            }
        }
    }

    fn files(&self) -> Result<Vec<ChunkFile>> {
        Ok(match self {
            Swept::Local(s) => chunk_files(s)?,
            Swept::S3 { store, .. } => store.chunk_objects()?,
        })
    }

    /// Deletes `f` if it is still older than `cutoff`.
    fn remove(&self, f: &ChunkFile, cutoff: SystemTime) -> Result<bool> {
        match self {
            Swept::Local(s) => Ok(remove_if_older(s, &f.id, cutoff)?),
            Swept::S3 { store, .. } => {
                store.delete_chunk(&f.id)?;
                Ok(true)
            }
        }
    }
}

/// Runs the collection.
pub fn run(a: Args) -> Result<ExitCode> {
    if let Some(image) = &a.repository {
        return run_registry(&a, image);
    }
    let started = SystemTime::now();
    let cutoff = started - a.grace;
    let location = a.store.clone().context("--store is required")?;
    let store = Swept::open(&location)?;
    // Every root first: one that cannot be read stops the collection
    // before anything is deleted.
    let roots = root_files(&a)?;
    if roots.is_empty() {
        bail!("no root recipes found: refusing to delete every chunk of {location}");
    }
    let mut live: HashSet<ChunkId> = HashSet::new();
    let mut packed_roots = Vec::new();
    for r in &roots {
        let recipe = read_recipe(r).with_context(|| format!("root {}", r.display()))?;
        let bytes = std::fs::read(r).with_context(|| format!("root {}", r.display()))?;
        live.extend(recipe.chunks.iter().map(|c| c.id));
        packed_roots.push(smr_store::gc::packs::Root {
            sha256: smr_format::Profile::recipe_hash(&bytes),
            chunks: recipe.chunks.iter().map(|c| c.id).collect(),
        });
    }
    let objects: &dyn smr_store::gc::packs::PackedObjects = match &store {
        Swept::Local(s) => s,
        Swept::S3 { store, .. } => store,
    };
    let packs = smr_store::gc::packs::collect(objects, &packed_roots, cutoff, a.dry_run)
        .with_context(|| format!("collecting the packs of {location}"))?;
    let files = store.files()?;
    let (mut referenced, mut young, mut deleted) = ((0u64, 0u64), (0u64, 0u64), (0u64, 0u64));
    let mut candidates = Vec::new();
    for f in &files {
        if live.contains(&f.id) {
            referenced = (referenced.0 + 1, referenced.1 + f.len);
        } else if f.modified >= cutoff {
            young = (young.0 + 1, young.1 + f.len);
        } else {
            candidates.push(f);
        }
    }
    for f in &candidates {
        if a.dry_run || store.remove(f, cutoff)? {
            deleted = (deleted.0 + 1, deleted.1 + f.len);
        } else {
            young = (young.0 + 1, young.1 + f.len);
        }
    }
    let verb = if a.dry_run { "would delete" } else { "deleted" };
    if a.json {
        let v = serde_json::json!({
            "roots": roots.len(),
            "chunks": files.len(),
            "referenced": { "chunks": referenced.0, "bytes": referenced.1 },
            "within_grace": { "chunks": young.0, "bytes": young.1 },
            "deleted": { "chunks": deleted.0, "bytes": deleted.1 },
            "packs": {
                "packs": packs.packs.count,
                "bytes": packs.packs.bytes,
                "referenced": { "packs": packs.referenced.count, "bytes": packs.referenced.bytes },
                "within_grace": { "packs": packs.within_grace.count, "bytes": packs.within_grace.bytes },
                "deleted": { "packs": packs.deleted.count, "bytes": packs.deleted.bytes },
                "indexes_deleted": packs.indexes_deleted,
            },
            "dry_run": a.dry_run,
        });
        outln!("{}", serde_json::to_string_pretty(&v)?);
    }
    errln!(
        "{location}: {} chunks, {} roots: {} referenced ({}), {} unreferenced within the {} grace ({}); {verb} {} ({}) in {:.2}s",
        files.len(),
        roots.len(),
        referenced.0,
        human(referenced.1),
        young.0,
        humantime::format_duration(a.grace),
        human(young.1),
        deleted.0,
        human(deleted.1),
        started.elapsed().map_or(0.0, |d| d.as_secs_f64())
    );
    if packs.packs.count > 0 {
        errln!(
            "{location}: {} packs ({}): {} holding roots' chunks, {} within the grace; {verb} {} packs ({}) and {} indexes",
            packs.packs.count,
            human(packs.packs.bytes),
            packs.referenced.count,
            packs.within_grace.count,
            packs.deleted.count,
            human(packs.deleted.bytes),
            packs.indexes_deleted
        );
    }
    Ok(ExitCode::SUCCESS)
}
