//! Registries on the command line: `--creds`, `docker://` images served
//! lazily from their smr artifact, and `smr convert --push`.

use anyhow::{Context, Result};
use smr_image::source::{ImageSource, Platform};
use smr_registry::artifact::Descriptor;
use smr_registry::blob_cache::CachedBlobs;
use smr_registry::client::{Credentials, RegistryOptions, Repository};
use smr_registry::discover::{discover_trusted, Accept, Artifact, DiscoverOptions};
use smr_registry::push::{push, PushOptions, PushReport};
use smr_registry::reference::DOCKER_PREFIX;
use smr_registry::source::RegistrySource;
use smr_store::ChunkStore;
use std::path::Path;

/// Environment variable holding registry credentials `USER:PASS`.
pub const CREDS_ENV: &str = "SMR_REGISTRY_CREDS";

/// Largest credentials file read.
const MAX_CREDS_BYTES: u64 = 64 << 10;

/// Options for talking to registries, shared by the subcommands.
///
/// Credentials come from `--creds-file`, `--creds-stdin`, `--creds` or
/// `SMR_REGISTRY_CREDS`, else `~/.docker/config.json` (or
/// `$DOCKER_CONFIG/config.json`) with its credential helpers.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct RegistryArgs {
    /// Registry credentials `USER:PASS` on the command line, where every
    /// user of the host sees them (`ps`): prefer `--creds-file`,
    /// `--creds-stdin` or `SMR_REGISTRY_CREDS`.
    #[arg(long, value_name = "USER:PASS", conflicts_with_all = ["creds_file", "creds_stdin"])]
    pub creds: Option<String>,
    /// A file holding registry credentials `USER:PASS` (one line).
    #[arg(long, value_name = "FILE", conflicts_with = "creds_stdin")]
    pub creds_file: Option<std::path::PathBuf>,
    /// Read registry credentials `USER:PASS` (one line) from standard input.
    #[arg(long)]
    pub creds_stdin: bool,
    /// The credentials once read (standard input can be read only once).
    #[arg(skip)]
    resolved: std::sync::OnceLock<Option<String>>,
}

impl RegistryArgs {
    /// The client options: the environment plus the credentials given.
    pub fn options(&self) -> Result<RegistryOptions> {
        let mut o = RegistryOptions::from_env();
        if let Some((c, from)) = self.creds_with_source()? {
            o.creds = Some(Credentials::parse(&c).context(from)?);
        }
        Ok(o)
    }

    /// The credentials given as `USER:PASS`, if any (to hand to a helper
    /// process through [`CREDS_ENV`]).
    pub fn creds_string(&self) -> Result<Option<String>> {
        Ok(self.creds_with_source()?.map(|(c, _)| c))
    }

    fn creds_with_source(&self) -> Result<Option<(String, &'static str)>> {
        let from = if self.creds_file.is_some() {
            "--creds-file"
        } else if self.creds_stdin {
            "--creds-stdin"
        } else if self.creds.is_some() {
            "--creds"
        } else {
            CREDS_ENV
        };
        if let Some(c) = self.resolved.get() {
            return Ok(c.clone().map(|c| (c, from)));
        }
        let creds = if let Some(path) = &self.creds_file {
            let bytes = smr_format::read_bounded(path, MAX_CREDS_BYTES)
                .with_context(|| format!("reading --creds-file {}", path.display()))?;
            Some(one_line(&bytes).with_context(|| format!("--creds-file {}", path.display()))?)
        } else if self.creds_stdin {
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(
                &mut std::io::Read::take(std::io::stdin().lock(), MAX_CREDS_BYTES),
                &mut bytes,
            )
            .context("reading --creds-stdin")?;
            Some(one_line(&bytes).context("--creds-stdin")?)
        } else if let Some(c) = &self.creds {
            tracing::warn!(
                "--creds puts the password on the command line, where every user of this host \
                 can read it (ps); use --creds-file, --creds-stdin or {CREDS_ENV}"
            );
            Some(c.clone())
        } else {
            std::env::var(CREDS_ENV).ok().filter(|c| !c.is_empty())
        };
        let _ = self.resolved.set(creds.clone());
        Ok(creds.map(|c| (c, from)))
    }
}

/// The first line of `bytes`, without its line ending; refuses an empty one.
fn one_line(bytes: &[u8]) -> Result<String> {
    let text = std::str::from_utf8(bytes).context("credentials are not UTF-8")?;
    let line = text.lines().next().unwrap_or("").trim_end_matches('\r');
    anyhow::ensure!(!line.is_empty(), "no USER:PASS line");
    Ok(line.to_string())
}

/// Connections opened beside the first request of an artifact lookup: its
/// later steps send several requests at once (the referrers API and the
/// fallback tag; then the artifact and profile manifests with the recipe,
/// pack index and profile blobs their referrers entries name). Four
/// measured no faster than two on the shaped link.
const SPARE_CONNECTIONS: usize = 2;

/// Whether `image` names a registry image rather than a recipe file.
pub fn is_remote(image: &str) -> bool {
    image.starts_with(DOCKER_PREFIX)
}

/// Resolves `reference` for `platform`, finds the smr artifact whose
/// subject is that manifest (with `opts`, the first that `accept` takes),
/// and opens it; returns its repository too. With `blob_cache`, what is
/// named by digest (manifests, recipe, pack index, profile) is read
/// through the node's cache there ([`CachedBlobs`]).
pub fn find_artifact(
    reference: &str,
    platform: &Platform,
    args: &RegistryArgs,
    opts: &DiscoverOptions,
    accept: Accept<'_>,
    blob_cache: Option<&Path>,
) -> Result<(Repository, Artifact)> {
    let mut src = RegistrySource::open(reference, &args.options()?)?;
    if let Some(dir) = blob_cache {
        src = src.with_blob_cache(dir);
    }
    find_artifact_in(&src, reference, platform, opts, accept, blob_cache)
}

/// [`find_artifact`] in the registry source `src` already opened for
/// `reference`.
pub fn find_artifact_in(
    src: &RegistrySource,
    reference: &str,
    platform: &Platform,
    opts: &DiscoverOptions,
    accept: Accept<'_>,
    blob_cache: Option<&Path>,
) -> Result<(Repository, Artifact)> {
    let repo = src.repository().clone();
    // A lookup that names its artifact (as the image server `smr mount`
    // starts is handed it) asks the registry less: no spare connections.
    if opts.artifact.is_none() {
        repo.registry().warm_up(SPARE_CONNECTIONS);
    }
    let cached = blob_cache.map(|dir| CachedBlobs::new(&repo, dir));
    let blobs: &dyn smr_registry::Blobs = match &cached {
        Some(c) => c,
        None => &repo,
    };
    // The manifest's digest is all the artifact lookup needs (its
    // subject): not the manifest itself nor its config. A reference
    // pinned by digest (as the node daemon mounts images) names it
    // already, unless it names an index: the lookup starts alongside the
    // manifest's, and is used if the manifest is the image's.
    let pinned = src.reference().digest.as_deref();
    let (resolved, early) = std::thread::scope(|s| {
        let early = pinned.map(|d| s.spawn(move || discover_trusted(blobs, d, opts, accept)));
        let resolved = src.resolve_manifest(platform);
        (resolved, early.map(|h| h.join()))
    });
    // A tag naming an smr image itself (`smr commit --push`).
    if let Some(digest) = image_artifact(src) {
        let a = smr_registry::discover::open_image(blobs, &digest, opts, accept)
            .with_context(|| format!("opening the smr image {reference} ({digest})"))?;
        tracing::info!(image = %reference, artifact = %a.digest, profile = a.profile.is_some(), "opened smr image");
        return Ok((repo, a));
    }
    let (digest, direct) = resolved.with_context(|| format!("resolving {reference}"))?;
    let digest = &digest;
    // `--index` mode: the index the reference named may list the artifact.
    let opts = &DiscoverOptions {
        index_entries: src.index_entries(digest),
        ..opts.clone()
    };
    let early = match early {
        Some(Ok(found)) if direct && opts.index_entries.is_empty() => Some(found),
        _ => None,
    };
    let found = early.unwrap_or_else(|| discover_trusted(blobs, digest, opts, accept));
    let artifact = match found {
        Ok(a) => a,
        Err(e @ smr_registry::RegistryError::NoTrustedArtifact { .. }) => {
            return Err(e).with_context(|| format!("finding the smr artifact of {reference}"))
        }
        Err(e) => {
            return Err(e).with_context(|| {
                format!(
                    "finding the smr artifact of {reference} ({digest}); create it with `smr convert {reference} --push`"
                )
            })
        }
    };
    let config = &artifact.recipe.config;
    if direct && (config.os != platform.os || config.architecture != platform.architecture) {
        tracing::warn!(
            manifest = %digest,
            "image is for {}/{}, not the requested {platform}; using it anyway",
            config.os,
            config.architecture
        );
    }
    tracing::info!(image = %reference, artifact = %artifact.digest, profile = artifact.profile.is_some(), "opened smr artifact");
    Ok((repo, artifact))
}

/// The repository names of `--mount-from` values, each a repository of
/// `reg`'s registry given as `docker://HOST/NAME` or just `NAME`.
pub fn mount_sources(reg: &RegistrySource, given: &[String]) -> Result<Vec<String>> {
    let here = &reg.reference().registry;
    given
        .iter()
        .map(|g| {
            if !is_remote(g) {
                return Ok(g.trim_matches('/').to_string());
            }
            let r = smr_registry::reference::ImageRef::parse(g)
                .with_context(|| format!("--mount-from {g}"))?;
            anyhow::ensure!(
                r.registry == *here,
                "--mount-from {g}: blobs mount only between repositories of one registry ({here})"
            );
            Ok(r.repository)
        })
        .collect()
}

/// The digest of the manifest `src`'s reference named, when it is an smr
/// artifact itself (an image with no source, pushed by `smr commit`).
fn image_artifact(src: &RegistrySource) -> Option<String> {
    let (media_type, bytes) = src.top()?;
    if media_type != smr_image::media_types::OCI_MANIFEST {
        return None;
    }
    let doc: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let smr = doc.get("artifactType")?.as_str()? == smr_registry::media_types::SMR_ARTIFACT;
    smr.then(|| smr_registry::artifact::digest_of(&bytes))
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

/// What a push moved: uploaded, mounted and present blobs, packs, chunks.
pub fn push_summary(r: &PushReport) -> String {
    use crate::progress::human;
    let mounted = match r.blobs_mounted {
        0 => String::new(),
        n => format!(
            ", {n} mounted from other repositories ({})",
            human(r.bytes_mounted)
        ),
    };
    format!(
        "uploaded {} of {} blobs ({}){mounted}, {} already there ({}); {} packs of {} chunks",
        r.blobs_uploaded,
        r.blobs_total,
        human(r.bytes_uploaded),
        r.blobs_skipped,
        human(r.bytes_skipped),
        r.packs,
        r.chunks,
    )
}
