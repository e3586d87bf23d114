//! `smr serve-nbd`, the hidden `smr __serve-fuse`, and the options every
//! command that serves an image shares.

use crate::keys::{open_image, KeyArgs};
use anyhow::{Context, Result};
use smr_node::cache::{Cache, CacheConfig};
use smr_node::lazy::LazyImage;
use smr_node::nbd::{Export, NbdServer};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

/// `--cache-dir` (or `SMR_CACHE_DIR`).
#[derive(clap::Args, Clone, Debug)]
pub struct CacheArgs {
    /// The node's chunk cache, shared by every image and process.
    #[arg(long, env = "SMR_CACHE_DIR", default_value = smr_node::cache::DEFAULT_DIR)]
    pub cache_dir: PathBuf,
}

impl CacheArgs {
    /// Opens (creating) the cache.
    pub fn open(&self) -> Result<Arc<Cache>> {
        Cache::open(CacheConfig::new(&self.cache_dir))
            .with_context(|| format!("opening the cache {}", self.cache_dir.display()))
    }
}

/// A recipe served from a store through the node cache.
#[derive(clap::Args, Clone, Debug)]
pub struct ImageArgs {
    /// The recipe.
    pub recipe: PathBuf,
    /// The chunk store (directory or file:// URL).
    #[arg(long, env = "SMR_STORE")]
    pub store: String,
    #[command(flatten)]
    pub cache: CacheArgs,
    #[command(flatten)]
    pub key: KeyArgs,
}

impl ImageArgs {
    /// Opens the recipe (with its keys), the store and the cache.
    pub fn open(&self) -> Result<LazyImage> {
        let img = open_image(&self.recipe, &self.key, true)?;
        let local = self.store.strip_prefix("file://").unwrap_or(&self.store);
        if !self.store.contains("://") || self.store.starts_with("file://") {
            anyhow::ensure!(
                std::path::Path::new(local).is_dir(),
                "store {} does not exist",
                self.store
            );
        }
        let store = smr_store::open_store(&self.store)
            .with_context(|| format!("opening the store {}", self.store))?;
        // A store without the image's first chunk is the wrong store:
        // say so now rather than as EIO on the first read.
        if let Some(first) = img.recipe.chunks.first() {
            anyhow::ensure!(
                store.exists(&first.id)?,
                "store {} lacks chunk {} of {}",
                self.store,
                first.id,
                self.recipe.display()
            );
        }
        let cache = self.cache.open()?;
        LazyImage::new(img, Arc::from(store), cache)
            .with_context(|| format!("serving {}", self.recipe.display()))
    }
}

/// Arguments of `smr serve-nbd`.
#[derive(clap::Args)]
pub struct NbdArgs {
    #[command(flatten)]
    image: ImageArgs,
    /// TCP address to listen on.
    #[arg(long, default_value = "127.0.0.1:10809", conflicts_with = "socket")]
    listen: String,
    /// UNIX socket to listen on instead of TCP.
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Export name (default: the image's source digest).
    #[arg(long)]
    name: Option<String>,
}

/// Serves the image over NBD until SIGINT or SIGTERM.
pub fn run_nbd(a: NbdArgs) -> Result<ExitCode> {
    let lazy = a.image.open()?;
    let recipe = crate::keys::read_recipe(&a.image.recipe)?;
    let name = a.name.unwrap_or_else(|| recipe.source_digest.clone());
    let export = Export::new(name.clone(), Arc::new(lazy))
        .with_description(format!("smr {}", a.image.recipe.display()));
    let server = NbdServer::new(vec![export])?;
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])?;
    let running = match &a.socket {
        Some(path) => {
            let _ = std::fs::remove_file(path);
            let l = std::os::unix::net::UnixListener::bind(path)
                .with_context(|| format!("binding {}", path.display()))?;
            eprintln!(
                "serving export {name:?} on nbd+unix:///{name}?socket={}",
                path.display()
            );
            server.spawn_unix(l)?
        }
        None => {
            let l = std::net::TcpListener::bind(&a.listen)
                .with_context(|| format!("binding {}", a.listen))?;
            eprintln!(
                "serving export {name:?} on nbd://{}/{name}",
                l.local_addr()?
            );
            server.spawn_tcp(l)?
        }
    };
    let sig = signals.forever().next();
    eprintln!("signal {sig:?}: stopping");
    running.stop()?;
    if let Some(path) = &a.socket {
        let _ = std::fs::remove_file(path);
    }
    Ok(ExitCode::SUCCESS)
}

/// Arguments of the hidden `smr __serve-fuse` (started by `smr mount`).
#[derive(clap::Args)]
pub struct FuseArgs {
    #[command(flatten)]
    image: ImageArgs,
    /// Directory to mount the FUSE export on.
    #[arg(long)]
    dir: PathBuf,
}

/// Serves the image's FUSE export until unmounted or signalled.
pub fn run_fuse(a: FuseArgs) -> Result<ExitCode> {
    let lazy = a.image.open()?;
    let name = format!("smr:{}", a.image.recipe.display());
    tracing::info!(dir = %a.dir.display(), pid = std::process::id(), "serving FUSE export");
    smr_node::mount::serve_fuse_process(Arc::new(lazy), &a.dir, &name)?;
    tracing::info!("FUSE export unmounted; exiting");
    Ok(ExitCode::SUCCESS)
}
