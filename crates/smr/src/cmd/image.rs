//! The options of every command that reads an image (a recipe file with
//! its chunk store, or a `docker://` image with its smr artifact), and
//! opening an image with them: for `extract` and `verify`
//! ([`OriginArgs`]), and for serving through the node cache (`run`,
//! `mount`, `serve-nbd`: [`SourceArgs`], [`ImageArgs`]).

use crate::keys::{image_chunks, read_recipe_bytes, KeyArgs};
use crate::policy::NodePolicy;
use crate::remote::{find_artifact, is_remote, RegistryArgs};
use anyhow::{Context, Result};
use smr_format::Profile;
use smr_node::cache::{Cache, CacheConfig};
use smr_node::chunks::ImageChunks;
use smr_node::fetch::{FetchOptions, Fetcher};
use smr_node::lazy::profile::{Replay, DEFAULT_REPLAY_THREADS};
use smr_node::lazy::LazyImage;
use smr_registry::discover::{DiscoverOptions, ProfileListing};
use smr_registry::head_start::HeadStartSlot;
use smr_store::ChunkStore;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The cache directory's subdirectory of registry blobs named by digest.
pub const BLOB_CACHE_DIR: &str = "registry-blobs";

/// `--cache-dir` (or `SMR_CACHE_DIR`).
#[derive(clap::Args, Clone, Debug)]
pub struct CacheArgs {
    /// The node's chunk cache, shared by every image and process.
    #[arg(long, env = "SMR_CACHE_DIR", default_value = smr_node::cache::DEFAULT_DIR)]
    pub cache_dir: PathBuf,
    /// This process's memory tier of the cache (default 16M; the node
    /// daemon gives its image servers less).
    #[arg(long, env = "SMR_CACHE_MEMORY", value_parser = super::cache::parse_size, hide = true)]
    pub cache_memory: Option<u64>,
}

impl CacheArgs {
    /// Where the node keeps registry blobs named by digest (see
    /// [`smr_registry::blob_cache`]): beside the chunks, in the cache
    /// directory.
    pub fn blob_cache_dir(&self) -> PathBuf {
        self.cache_dir.join(BLOB_CACHE_DIR)
    }

    /// Opens (creating) the cache.
    pub fn open(&self) -> Result<Arc<Cache>> {
        let mut cfg = CacheConfig::new(&self.cache_dir);
        if let Some(m) = self.cache_memory {
            cfg.memory_bytes = m;
        }
        Cache::open(cfg).with_context(|| format!("opening the cache {}", self.cache_dir.display()))
    }
}

/// An image served through the node cache: a recipe file with its chunk
/// store, or a registry image with its smr artifact.
#[derive(clap::Args, Clone, Debug)]
pub struct ImageArgs {
    /// The image: a recipe file (chunks in `--store`), or
    /// `docker://HOST[:PORT]/NAME[:TAG|@DIGEST]` (recipe and chunks from the
    /// smr artifact pushed by `smr convert --push`).
    pub image: String,
    #[command(flatten)]
    pub source: SourceArgs,
}

/// Where an image's recipe, chunks and keys come from: the options of every
/// command that reads an image (a recipe file or `docker://`).
#[derive(clap::Args, Clone, Debug)]
pub struct OriginArgs {
    /// The chunk store: a directory, `file://`, `s3://BUCKET/PREFIX` or
    /// `http(s)://…` (required for a recipe file; for a registry image it
    /// replaces the artifact's packs).
    #[arg(long, env = "SMR_STORE")]
    pub store: Option<String>,
    #[command(flatten)]
    pub key: KeyArgs,
    #[command(flatten)]
    pub registry: RegistryArgs,
    #[command(flatten)]
    pub policy: crate::policy::PolicyArgs,
    /// For a registry image with several smr artifacts: the one to use, by
    /// manifest digest (default: the first, in digest order, that the
    /// node's policy trusts).
    #[arg(long, value_name = "DIGEST")]
    pub artifact: Option<String>,
    /// With `--artifact`: the startup profile manifest of that artifact
    /// that `smr mount` found, so that its image server does not list the
    /// referrers again (hidden: `smr mount` passes it).
    #[arg(long, value_name = "DIGEST", hide = true, requires = "artifact")]
    pub profile_manifest: Option<String>,
    /// For a registry image: the platform to pick from an index.
    #[arg(long, default_value = "linux/amd64")]
    pub platform: String,
    /// The node's cache of digest-named registry blobs (see
    /// [`smr_registry::blob_cache`]): set by commands that serve images
    /// through the node cache, under its directory.
    #[arg(skip)]
    pub blob_cache: Option<PathBuf>,
    /// Start reading a registry image's startup pack from the referrers
    /// listing ([`smr_registry::head_start`]): set by commands that serve
    /// the image in this process (`smr run`, `smr serve-nbd`), not by the
    /// `smr mount` that hands it to a server process.
    #[arg(skip)]
    pub read_pack_ahead: bool,
}

/// An image's recipe and chunk store, found by [`OriginArgs::resolve`].
pub struct Resolved {
    /// The recipe.
    pub recipe: smr_format::Recipe,
    /// Its bytes (what a profile is bound to).
    pub recipe_bytes: Vec<u8>,
    /// The chunks.
    pub store: Arc<dyn ChunkStore>,
    /// Where the chunks are, for messages.
    pub location: String,
    /// For a registry image: the digest of the smr artifact used.
    pub artifact: Option<String>,
    /// For a registry image: the artifact's pack index.
    pub pack_index: Option<Arc<smr_registry::pack::PackIndex>>,
    /// The startup profile found next to the artifact, if looked for.
    pub profile: Option<Profile>,
    /// For a registry image: what its lookup listed of the artifact's
    /// profiles.
    pub profile_listing: ProfileListing,
    /// How its chunks are fetched.
    pub fetch: FetchOptions,
    /// Whether the chunks come from a local directory (a fetch costs no
    /// round trip).
    pub local: bool,
    /// For a registry image: the read of its startup pack, begun during
    /// the lookup ([`smr_registry::head_start`]), which `store` answers
    /// the pack's read from; cleared if the pack will not be read whole.
    pub pack_head_start: HeadStartSlot,
}

/// Bytes of a pack read ahead of a sequential reader (e.g. `256K`; `0`
/// disables; default 1M, 0 when a startup profile is replayed).
pub const READAHEAD_ENV: &str = "SMR_FETCH_READAHEAD";

/// Largest hole between two wanted chunks of a pack that is read (and
/// thrown away) so that one request serves both (default 64K, 0 when a
/// startup profile is replayed).
pub const MAX_GAP_ENV: &str = "SMR_FETCH_MAX_GAP";

/// A size (`64K`, `1M`, bytes) from environment variable `name`, if set.
fn size_env(name: &str) -> Result<Option<u64>> {
    match std::env::var(name) {
        Ok(v) => crate::cmd::convert::parse_size(&v)
            .map(Some)
            .map_err(|e| anyhow::anyhow!("{name}: {e}")),
        Err(_) => Ok(None),
    }
}

/// Largest request to a store in a local directory (256 KiB): a read there
/// costs no round trip, so larger requests would only hold more memory
/// (a serving process has 8 requests in flight per image).
const LOCAL_MAX_REQUEST: u64 = 256 << 10;

/// The fetcher's options: when a startup profile will be replayed, it
/// neither reads ahead nor reads across holes between wanted chunks
/// (unless `SMR_FETCH_READAHEAD` / `SMR_FETCH_MAX_GAP` say so): the profile
/// already fetches what the start reads, many requests at once, and those
/// would only add bytes. Requests to a `local` store are smaller.
fn fetch_options(replaying: bool, local: bool) -> Result<FetchOptions> {
    let mut opts = FetchOptions::default();
    if local {
        opts.max_request = LOCAL_MAX_REQUEST;
    }
    if replaying {
        // The profile names the chunks: fetch those, not their neighbours.
        opts.readahead = 0;
        opts.max_gap = 0;
    }
    if let Some(v) = size_env(READAHEAD_ENV)? {
        opts.readahead = v;
    }
    if let Some(v) = size_env(MAX_GAP_ENV)? {
        opts.max_gap = v;
    }
    Ok(opts)
}

impl OriginArgs {
    /// The smr artifact of registry image `image` (and its startup profile,
    /// if `find_profile`) that the node's policy trusts: the owner key of
    /// `--key-file`, the signing keys and pins of the policy directory and
    /// flags.
    pub fn trusted_artifact(
        &self,
        image: &str,
        find_profile: bool,
    ) -> Result<(
        smr_registry::client::Repository,
        smr_registry::discover::Artifact,
    )> {
        let platform = self.platform.parse().context("--platform")?;
        let policy = NodePolicy::load(&self.policy, self.key.load()?)?;
        let opts = DiscoverOptions {
            artifact: self.artifact.clone(),
            profile: find_profile,
            profile_manifest: self.profile_manifest.clone(),
            // Read only through the artifact's own store (not `--store`).
            read_pack_ahead: self.read_pack_ahead && find_profile && self.store.is_none(),
            verify_keys: policy.keys.clone(),
            ..DiscoverOptions::default()
        };
        find_artifact(
            image,
            &platform,
            &self.registry,
            &opts,
            &|a| policy.accept(a),
            self.blob_cache.as_deref(),
        )
    }

    /// Finds `image`'s recipe and chunk store. For a registry image,
    /// `find_profile` also looks for its startup profile, and `replaying`
    /// says one will be replayed (the store then fetches just the chunks
    /// asked for, not their neighbours).
    pub fn resolve(&self, image: &str, find_profile: bool, replaying: bool) -> Result<Resolved> {
        if is_remote(image) {
            let (repo, a) = self.trusted_artifact(image, find_profile)?;
            let (store, location): (Arc<dyn ChunkStore>, String) = match &self.store {
                Some(location) => (open_store(location, &a.recipe_bytes)?, location.clone()),
                None => {
                    let opts = smr_store::RemoteOptions::from_env()?;
                    (Arc::new(a.store(Arc::new(repo), opts)), a.repo.clone())
                }
            };
            let local = self.store.as_deref().is_some_and(is_local_dir);
            let fetch = fetch_options(replaying || a.profile.is_some(), local)?;
            return Ok(Resolved {
                recipe: a.recipe,
                recipe_bytes: a.recipe_bytes,
                store,
                location,
                artifact: Some(a.digest),
                pack_index: Some(a.index),
                profile: a.profile,
                profile_listing: a.profile_listing,
                fetch,
                local,
                pack_head_start: a.pack_head_start,
            });
        }
        let location = self
            .store
            .as_deref()
            .with_context(|| format!("--store is required for the recipe {image}"))?;
        let (recipe, recipe_bytes) = read_recipe_bytes(Path::new(image))?;
        let store = open_store(location, &recipe_bytes)?;
        let local = is_local_dir(location);
        Ok(Resolved {
            recipe,
            recipe_bytes,
            store,
            location: location.to_string(),
            artifact: None,
            pack_index: None,
            profile: None,
            profile_listing: ProfileListing::NotListed,
            fetch: fetch_options(replaying, local)?,
            local,
            pack_head_start: HeadStartSlot::default(),
        })
    }
}

/// Where an image's recipe, chunks, keys and startup profile come from,
/// and the node cache it is served through: the options of every command
/// that serves images.
#[derive(clap::Args, Clone, Debug)]
pub struct SourceArgs {
    #[command(flatten)]
    pub origin: OriginArgs,
    #[command(flatten)]
    pub cache: CacheArgs,
    /// Replay this startup profile (written by `smr run --record-profile`):
    /// the chunks it lists are fetched ahead of the reads, many at once.
    /// Default for a registry image: the profile pushed next to its smr
    /// artifact (`smr profile push`), if any.
    #[arg(long, value_name = "FILE")]
    pub profile: Option<PathBuf>,
    /// Replay no startup profile (and look for none in the registry).
    #[arg(long, conflicts_with = "profile")]
    pub no_profile: bool,
    /// Fetch nothing ahead from the recipe's file map: neither the
    /// filesystem metadata when the image is mounted (without a profile)
    /// nor the rest of a file after a read misses inside it. (Always so
    /// for a local directory store, where a fetch costs no round trip.)
    #[arg(long, env = "SMR_NO_PREFETCH")]
    pub no_prefetch: bool,
}

/// An image opened for serving.
pub struct OpenedImage {
    /// The lazy image.
    pub lazy: LazyImage,
    /// Its recipe (from the file, or the registry artifact).
    pub recipe: smr_format::Recipe,
    /// For a registry image: the digest of the smr artifact used.
    pub artifact: Option<String>,
    /// For a registry image: the artifact's pack index.
    pub pack_index: Option<Arc<smr_registry::pack::PackIndex>>,
    /// The startup profile to replay (checked against the recipe).
    pub profile: Option<Profile>,
    /// For a registry image: what its lookup listed of the artifact's
    /// profiles (see [`Resolved::profile_listing`]).
    pub profile_listing: ProfileListing,
    /// SHA-256 of the recipe's bytes (what a recorded profile is bound to).
    pub recipe_sha256: [u8; 32],
    /// Whether the profile's startup pack serves the start.
    pub startup_pack: bool,
}

impl OpenedImage {
    /// Starts fetching ahead in the background: the startup profile's
    /// replay if there is one (see [`LazyImage::replay`]), else the
    /// filesystem metadata ([`LazyImage::prefetch_metadata`]) unless
    /// `--no-prefetch`.
    pub fn start_prefetch(&self) -> Option<Replay> {
        match &self.profile {
            Some(p) => Some(self.lazy.replay(p, DEFAULT_REPLAY_THREADS)),
            None => {
                if self.lazy.file_prefetch() {
                    self.lazy.prefetch_metadata();
                }
                None
            }
        }
    }
}

impl ImageArgs {
    /// Opens the recipe (with its keys), the store and the cache, and
    /// finds the startup profile (`--profile`, or the registry's unless
    /// `--no-profile`) and, for a registry image, the artifact used.
    pub fn open_full(&self) -> Result<OpenedImage> {
        self.open_with(!self.source.no_profile)
    }

    /// [`ImageArgs::open_full`]; `profiles: false` neither reads nor looks
    /// for a profile.
    pub fn open_with(&self, profiles: bool) -> Result<OpenedImage> {
        self.source
            .open(&self.image, profiles, self.source.cache.open()?)
    }
}

impl SourceArgs {
    /// The origin, reading digest-named registry blobs through the node
    /// cache's directory ([`CacheArgs::blob_cache_dir`]).
    pub fn cached_origin(&self) -> OriginArgs {
        OriginArgs {
            blob_cache: Some(self.cache.blob_cache_dir()),
            ..self.origin.clone()
        }
    }

    /// Opens `image` (see [`ImageArgs::image`]) for serving through
    /// `cache`: its recipe (with its keys) and store, and, if `profiles`,
    /// its startup profile (`--profile`, or the registry's).
    pub fn open(&self, image: &str, profiles: bool, cache: Arc<Cache>) -> Result<OpenedImage> {
        let local_profile = match (&self.profile, profiles) {
            (Some(path), true) => Some((path, super::profile::read(path)?)),
            _ => None,
        };
        let r = self.cached_origin().resolve(
            image,
            profiles && local_profile.is_none(),
            local_profile.is_some(),
        )?;
        let (recipe, recipe_bytes) = (r.recipe, r.recipe_bytes);
        let found_profile = r.profile;
        // A registry profile's startup pack is read from the registry, next
        // to the artifact's packs (another --store does not have it).
        let use_pack = found_profile.is_some() && self.origin.store.is_none();
        let profile = match local_profile {
            Some((path, p)) => {
                p.check_recipe(&recipe_bytes)
                    .with_context(|| format!("profile {} for {image}", path.display()))?;
                Some(p)
            }
            None => found_profile,
        };
        let img = image_chunks(recipe.clone(), &self.origin.key, true, image)?;
        let fetcher = Fetcher::new(r.store, r.fetch);
        let lazy = open_lazy(img, image, &r.location, fetcher, cache)?;
        // Fetching ahead pays where a fetch costs a round trip; from a
        // local directory it would only read chunks nobody asked for.
        let prefetch = !self.no_prefetch && !r.local;
        lazy.set_file_prefetch(prefetch);
        let mut startup_pack = false;
        if let (Some(p), true) = (&profile, use_pack) {
            match lazy.use_startup_pack(p) {
                Ok(0) => {}
                Ok(n) => {
                    startup_pack = true;
                    tracing::debug!(image, chunks = n, "startup pack in use");
                }
                Err(e) => tracing::warn!(image, error = %e, "not using the profile's startup pack"),
            }
        }
        // The pack's read begun during the lookup serves a start that
        // fetches the whole pack: served from it, none of it cached yet.
        let pack_cached = profile
            .as_ref()
            .and_then(|p| p.pack.as_ref())
            .is_some_and(|pack| pack.chunks.iter().any(|c| lazy.cache().contains(&c.id)));
        if !startup_pack || pack_cached {
            r.pack_head_start.clear();
        }
        Ok(OpenedImage {
            lazy,
            recipe,
            artifact: r.artifact,
            pack_index: r.pack_index,
            profile,
            profile_listing: r.profile_listing,
            recipe_sha256: Profile::recipe_hash(&recipe_bytes),
            startup_pack,
        })
    }
}

/// Whether the store at `location` is a local directory.
fn is_local_dir(location: &str) -> bool {
    location
        .parse::<smr_store::StoreLocation>()
        .is_ok_and(|l| l.local_dir().is_some())
}

/// Opens the chunk store at `location` for the recipe `recipe_bytes`; a
/// local one must exist. A remote store, which cannot be listed, is read
/// through the recipe's index if it has one (smr_store::packed).
fn open_store(location: &str, recipe_bytes: &[u8]) -> Result<Arc<dyn ChunkStore>> {
    let parsed: smr_store::StoreLocation = location
        .parse()
        .with_context(|| format!("--store {location}"))?;
    if let Some(dir) = parsed.local_dir() {
        anyhow::ensure!(dir.is_dir(), "store {location} does not exist");
    }
    let mut store = parsed
        .open()
        .with_context(|| format!("opening the store {location}"))?;
    if parsed.local_dir().is_none() {
        let recipe_sha256 = Profile::recipe_hash(recipe_bytes);
        store = smr_store::packed::Indexed::open(store, &recipe_sha256)
            .with_context(|| format!("reading the recipe's index in the store {location}"))?;
    }
    Ok(Arc::from(store))
}

/// Serves `img` (named `label` in errors) lazily through `fetcher` (of the
/// store at `location`) and `cache`.
fn open_lazy(
    img: ImageChunks,
    label: &str,
    location: &str,
    fetcher: Arc<Fetcher>,
    cache: Arc<Cache>,
) -> Result<LazyImage> {
    let store = fetcher.store();
    // A store without the image's first chunk is the wrong store:
    // say so now rather than as EIO on the first read.
    if let Some(first) = img.recipe.chunks.first() {
        anyhow::ensure!(
            store.exists(&first.id)?,
            "store {location} lacks chunk {} of {label}",
            first.id,
        );
    }
    LazyImage::with_fetcher(img, fetcher, cache).with_context(|| format!("serving {label}"))
}
