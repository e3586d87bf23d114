//! `smr profile`: publish and show startup profiles.

use crate::remote::{find_artifact_in, is_remote, RegistryArgs};
use anyhow::{Context, Result};
use smr_format::Profile;
use smr_registry::discover::DiscoverOptions;
use smr_registry::source::RegistrySource;
use std::path::PathBuf;
use std::process::ExitCode;

/// Arguments of `smr profile`.
#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Push a profile (from `smr run --record-profile`) next to the image's
    /// smr artifact, where every later `smr run`/`smr mount` of the image
    /// finds and replays it.
    Push(PushArgs),
    /// Show a profile file: the recipe it belongs to and its chunks.
    Show(ShowArgs),
}

/// Arguments of `smr profile push`.
#[derive(clap::Args)]
struct PushArgs {
    /// The image: `docker://HOST[:PORT]/NAME[:TAG|@DIGEST]`.
    image: String,
    /// The profile file.
    profile: PathBuf,
    #[command(flatten)]
    registry: RegistryArgs,
    /// The smr artifact the profile was recorded with, by manifest digest
    /// (default: the one `smr run` picks).
    #[arg(long, value_name = "DIGEST")]
    artifact: Option<String>,
    /// The platform to pick from an index.
    #[arg(long, default_value = "linux/amd64")]
    platform: String,
    /// With the owner key, a profile that lists blocks gets its startup
    /// pack made (from the artifact's chunks) and pushed with it.
    #[command(flatten)]
    key: crate::keys::KeyArgs,
}

/// Arguments of `smr profile show`.
#[derive(clap::Args)]
struct ShowArgs {
    /// The profile file.
    profile: PathBuf,
    /// Print JSON (recipe hash, every chunk index and every block run
    /// `[first, count]`, in first-read order).
    #[arg(long)]
    json: bool,
    /// The image the profile was recorded on (a recipe file, or
    /// `docker://…`, whose smr artifact with that recipe is used): also
    /// show the bytes the start reads (plaintext) and fetches (as stored).
    #[arg(long, value_name = "IMAGE")]
    image: Option<String>,
    /// With a `docker://` image: the platform to pick from an index.
    #[arg(long, default_value = "linux/amd64", requires = "image")]
    platform: String,
    #[command(flatten)]
    registry: RegistryArgs,
}

/// Runs `smr profile`.
pub fn run(a: Args) -> Result<ExitCode> {
    match a.command {
        Command::Push(p) => push(p),
        Command::Show(s) => show(s),
    }
}

/// Reads and decodes a profile file.
pub(crate) fn read(path: &std::path::Path) -> Result<Profile> {
    let bytes = smr_format::read_bounded(path, smr_format::profile::MAX_PROFILE_BYTES)
        .with_context(|| format!("reading profile {}", path.display()))?;
    Profile::decode(&bytes).with_context(|| format!("profile {}", path.display()))
}

fn push(a: PushArgs) -> Result<ExitCode> {
    anyhow::ensure!(
        is_remote(&a.image),
        "{}: profiles are pushed to a registry image (docker://…)",
        a.image
    );
    let profile = read(&a.profile)?;
    let src = RegistrySource::open(&a.image, &a.registry.options()?)?;
    let owner = a.key.load()?;
    let pushed = push_to_registry(
        &src,
        &a.image,
        &profile,
        a.artifact.clone(),
        &a.platform,
        owner.as_ref(),
        None,
    )
    .with_context(|| format!("pushing profile {} for {}", a.profile.display(), a.image))?;
    outln!("{}", pushed.manifest_digest);
    Ok(ExitCode::SUCCESS)
}

/// Pushes `profile` next to the smr artifact of `image` (the one with
/// digest `artifact`, else the one `smr run` picks among those whose recipe
/// the profile was recorded against); says what it pushed.
///
/// A profile with blocks gets its startup pack made first when `owner`
/// opens the recipe's keys, from the image's chunks in `chunks` (default:
/// the artifact's packs in the registry).
pub(crate) fn push_to_registry(
    src: &RegistrySource,
    image: &str,
    profile: &Profile,
    artifact: Option<String>,
    platform: &str,
    owner: Option<&smr_format::OwnerKey>,
    chunks: Option<&dyn smr_store::ChunkStore>,
) -> Result<smr_registry::profile::ProfilePush> {
    let (repo, artifact) = recorded_on(src, image, profile, artifact, platform)?;
    let mut profile = profile.clone();
    let pack = match (owner, profile.pack.is_none() && !profile.blocks.is_empty()) {
        (Some(owner), true) => startup_pack(&repo, &artifact, &mut profile, owner, chunks)?,
        _ => None,
    };
    if pack.is_none() {
        profile.pack = None;
    }
    let r = smr_registry::profile::push_profile(&repo, &artifact, &profile, pack.as_deref())?;
    let pack_note = r
        .pack_bytes
        .map(|b| {
            format!(
                ", startup pack of {} blocks in {b} bytes",
                smr_format::startup::total_blocks(&profile.blocks)
            )
        })
        .unwrap_or_default();
    errln!(
        "smr: pushed startup profile {} ({} chunks{pack_note}) for smr artifact {} ({:?})",
        r.manifest_digest,
        r.chunks,
        artifact.digest,
        r.referrers
    );
    Ok(r)
}

/// Makes `profile`'s startup pack (see [`push_to_registry`]).
fn startup_pack(
    repo: &smr_registry::client::Repository,
    artifact: &smr_registry::discover::Artifact,
    profile: &mut Profile,
    owner: &smr_format::OwnerKey,
    chunks: Option<&dyn smr_store::ChunkStore>,
) -> Result<Option<Vec<u8>>> {
    let keys = artifact
        .recipe
        .keys(Some(owner))
        .context("opening the recipe's keys for the startup pack")?;
    let img = smr_node::chunks::ImageChunks::new(artifact.recipe.clone(), keys);
    let registry;
    let store: &dyn smr_store::ChunkStore = match chunks {
        Some(s) => s,
        None => {
            let opts = smr_store::RemoteOptions::from_env()?;
            registry = artifact.store(std::sync::Arc::new(repo.clone()), opts);
            &registry
        }
    };
    smr_node::startup::make_startup_pack(&img, store, profile)
        .context("making the startup pack from the image's chunks")
}

fn show(a: ShowArgs) -> Result<ExitCode> {
    let p = read(&a.profile)?;
    let recipe = format!("sha256:{}", hex::encode(p.recipe_sha256));
    let bytes = match &a.image {
        Some(image) => Some(profile_bytes(
            &p,
            &recipe_of(image, &p, &a.registry, &a.platform)?,
        )),
        None => None,
    };
    let blocks = smr_format::startup::total_blocks(&p.blocks);
    let pack = p.pack.as_ref().map(|k| (k.chunks.len(), k.offsets().1));
    if a.json {
        let mut doc = serde_json::json!({
            "recipe": recipe,
            "chunks": p.chunks,
            "blocks_read_bytes": blocks * smr_format::startup::BLOCK,
            "blocks": p.blocks.iter().map(|r| [r.first, u64::from(r.count)]).collect::<Vec<_>>(),
        });
        if let Some(kb) = p.recorded_readahead_kb {
            doc["readahead_kb"] = kb.into();
        }
        if let Some((n, size)) = pack {
            doc["startup_pack"] = serde_json::json!({ "chunks": n, "bytes": size });
        }
        if let Some((plain, stored)) = bytes {
            doc["bytes"] = plain.into();
            doc["stored_bytes"] = stored.into();
        }
        outln!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        outln!("recipe: {recipe}");
        outln!("chunks: {}", p.chunks.len());
        if let Some((plain, stored)) = bytes {
            outln!("bytes:  {plain} read by the start, {stored} fetched (as stored)");
        }
        if blocks > 0 {
            let read = blocks * smr_format::startup::BLOCK;
            outln!("blocks: {blocks} ({read} bytes read by the start)");
            if let Some(kb) = p.recorded_readahead_kb {
                outln!("readahead: {kb} KiB (the loop device's, recorded and served with)");
            }
        }
        if let Some((n, size)) = pack {
            outln!("pack:   {n} chunks, {size} bytes");
        }
        let head: Vec<String> = p.chunks.iter().take(16).map(u64::to_string).collect();
        let more = if p.chunks.len() > 16 { ", …" } else { "" };
        outln!("first:  {}{more}", head.join(", "));
    }
    Ok(ExitCode::SUCCESS)
}

/// The recipe `profile` was recorded against: the file `image`, or the
/// recipe of the smr artifact of `docker://` `image` that has it.
fn recipe_of(
    image: &str,
    profile: &Profile,
    registry: &RegistryArgs,
    platform: &str,
) -> Result<smr_format::Recipe> {
    if !is_remote(image) {
        let (recipe, bytes) = crate::keys::read_recipe_bytes(std::path::Path::new(image))?;
        profile
            .check_recipe(&bytes)
            .with_context(|| format!("profile for {image}"))?;
        return Ok(recipe);
    }
    let src = RegistrySource::open(image, &registry.options()?)?;
    let (_, artifact) = recorded_on(&src, image, profile, None, platform)?;
    Ok(artifact.recipe)
}

/// The smr artifact of `image` (in `src`) whose recipe `profile` was
/// recorded against: the one with digest `artifact`, else the one `smr
/// run` picks among those with that recipe.
fn recorded_on(
    src: &RegistrySource,
    image: &str,
    profile: &Profile,
    artifact: Option<String>,
    platform: &str,
) -> Result<(
    smr_registry::client::Repository,
    smr_registry::discover::Artifact,
)> {
    let platform = platform.parse().context("--platform")?;
    let opts = DiscoverOptions {
        artifact,
        ..DiscoverOptions::default()
    };
    let accept = |art: &smr_registry::discover::Artifact| {
        profile
            .check_recipe(&art.recipe_bytes)
            .map_err(|e| format!("not the recipe the profile was recorded against: {e}"))
    };
    find_artifact_in(src, image, &platform, &opts, &accept, None)
}

/// Plaintext and stored bytes of the stored chunks `profile` lists.
fn profile_bytes(profile: &Profile, recipe: &smr_format::Recipe) -> (u64, u64) {
    profile
        .chunks
        .iter()
        .filter_map(|&c| {
            recipe
                .entry(c)
                .map(|e| (recipe.chunk_len(c), u64::from(e.stored_len)))
        })
        .fold((0, 0), |(p, s), (a, b)| (p + a, s + b))
}
