//! Registries on the command line: `--creds`, `docker://` images served
//! lazily from their smr artifact, and `smr convert --push`.

use anyhow::{Context, Result};
use smr_image::source::{ImageSource, Platform};
use smr_registry::artifact::Descriptor;
use smr_registry::client::{Credentials, RegistryOptions, Repository};
use smr_registry::discover::{discover, Artifact, DiscoverOptions};
use smr_registry::push::{push, PushOptions, PushReport};
use smr_registry::reference::DOCKER_PREFIX;
use smr_registry::source::RegistrySource;
use smr_registry::store::StoreOptions;
use smr_registry::RegistryStore;
use smr_store::ChunkStore;
use std::sync::Arc;

/// Bytes read ahead of a sequential reader per registry request (e.g.
/// `256K`; `0` disables; default 1M).
pub const READAHEAD_ENV: &str = "SMR_REGISTRY_READAHEAD";

/// Largest hole between two wanted chunks of a pack that is read (and
/// thrown away) so that one request serves both (default 64K, `0` when
/// replaying a startup profile).
pub const MAX_GAP_ENV: &str = "SMR_REGISTRY_MAX_GAP";

/// A size (`64K`, `1M`, bytes) from environment variable `name`, if set.
fn size_env(name: &str) -> Result<Option<u64>> {
    match std::env::var(name) {
        Ok(v) => crate::cmd::convert::parse_size(&v)
            .map(Some)
            .map_err(|e| anyhow::anyhow!("{name}: {e}")),
        Err(_) => Ok(None),
    }
}

/// Options for talking to registries, shared by the subcommands.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct RegistryArgs {
    /// Registry credentials `USER:PASS` (default: `~/.docker/config.json`,
    /// or `$DOCKER_CONFIG/config.json`, with its credential helpers).
    #[arg(long, env = "SMR_REGISTRY_CREDS", hide_env_values = true)]
    pub creds: Option<String>,
}

impl RegistryArgs {
    /// The client options: the environment plus `--creds`.
    pub fn options(&self) -> Result<RegistryOptions> {
        let mut o = RegistryOptions::from_env();
        if let Some(c) = &self.creds {
            o.creds = Some(Credentials::parse(c).context("--creds")?);
        }
        Ok(o)
    }
}

/// Whether `image` names a registry image rather than a recipe file.
pub fn is_remote(image: &str) -> bool {
    image.starts_with(DOCKER_PREFIX)
}

/// A registry image opened through its smr artifact.
pub struct RemoteImage {
    /// The artifact (recipe, pack index).
    pub artifact: Artifact,
    /// Its chunks, read by ranged requests from the artifact's packs.
    pub store: Arc<RegistryStore>,
}

/// Resolves `reference` for `platform`, finds the smr artifact whose
/// subject is that manifest (with `opts`), and opens it; returns its
/// repository too.
pub fn find_artifact(
    reference: &str,
    platform: &Platform,
    args: &RegistryArgs,
    opts: &DiscoverOptions,
) -> Result<(Repository, Artifact)> {
    let src = RegistrySource::open(reference, &args.options()?)?;
    let resolved = src
        .resolve(platform)
        .with_context(|| format!("resolving {reference}"))?;
    let repo = src.repository().clone();
    let artifact = discover(&repo, &resolved.manifest_digest, opts).with_context(|| {
        format!(
            "finding the smr artifact of {reference} ({}); create it with `smr convert {reference} --push`",
            resolved.manifest_digest
        )
    })?;
    tracing::info!(image = %reference, artifact = %artifact.digest, profile = artifact.profile.is_some(), "opened smr artifact");
    Ok((repo, artifact))
}

/// [`find_artifact`], then a chunk store over the artifact's packs. When a
/// startup profile will be replayed (`replaying`, or one was found), the
/// store neither reads ahead nor reads across holes between wanted chunks
/// (unless `SMR_REGISTRY_READAHEAD` / `SMR_REGISTRY_MAX_GAP` say so): the
/// profile already fetches what the start reads, many requests at once,
/// and those would only add bytes.
pub fn open_remote(
    reference: &str,
    platform: &Platform,
    args: &RegistryArgs,
    opts: &DiscoverOptions,
    replaying: bool,
) -> Result<RemoteImage> {
    let (repo, artifact) = find_artifact(reference, platform, args, opts)?;
    let mut opts = StoreOptions {
        deadline: smr_store::RemoteOptions::from_env()?.deadline,
        ..StoreOptions::default()
    };
    let replaying = replaying || artifact.profile.is_some();
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
    let store = Arc::new(artifact.store(Arc::new(repo), opts));
    Ok(RemoteImage { artifact, store })
}

/// Pushes a converted image (`recipe_bytes`, chunks in `store`) as the smr
/// artifact of `manifest_digest` in the repository of `src`.
pub fn push_converted(
    src: &RegistrySource,
    manifest_digest: &str,
    recipe_bytes: &[u8],
    store: &dyn ChunkStore,
    opts: &PushOptions,
) -> Result<PushReport> {
    let repo: &Repository = src.repository();
    let (media_type, bytes) = smr_registry::Blobs::get_manifest(repo, manifest_digest)?
        .with_context(|| {
            format!(
                "manifest {manifest_digest} vanished from {}",
                src.describe()
            )
        })?;
    let subject = Descriptor::of(&media_type, &bytes);
    push(repo, &subject, recipe_bytes, store, opts)
        .with_context(|| format!("pushing the smr artifact to {}", src.describe()))
}
