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
use smr_registry::RegistryStore;
use smr_store::ChunkStore;
use std::sync::Arc;

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

/// [`find_artifact`], then a chunk store over the artifact's packs (with
/// the remote stores' retry policy, `SMR_STORE_DEADLINE`).
pub fn open_remote(
    reference: &str,
    platform: &Platform,
    args: &RegistryArgs,
    opts: &DiscoverOptions,
) -> Result<RemoteImage> {
    let (repo, artifact) = find_artifact(reference, platform, args, opts)?;
    let store = Arc::new(artifact.store(Arc::new(repo), smr_store::RemoteOptions::from_env()?));
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
