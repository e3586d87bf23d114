//! `smr convert`: OCI image -> chunks in a store + recipe file.

use crate::keys::KeyArgs;
use crate::progress::{bytes_bar, human};
use crate::remote::{is_remote, push_converted, RegistryArgs};
use anyhow::{bail, Context, Result};
use smr_convert::{convert, ConvertOptions, ConvertOutput};
use smr_format::ChunkCodec;
use smr_image::source::ImageSource;
use smr_registry::artifact::{ANNOTATION_LAYOUT, ANNOTATION_ZSTD_LEVEL};
use smr_registry::pack::PackParams;
use smr_registry::push::PushOptions;
use smr_registry::source::RegistrySource;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

/// Chunk compression choices.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compress {
    /// Store chunks uncompressed (default: fastest random access).
    None,
    /// zstd each chunk before encryption (kept only when smaller).
    Zstd,
}

/// Arguments of `smr convert`.
#[derive(clap::Args)]
pub struct Args {
    /// Source image: `docker://HOST[:PORT]/NAME[:TAG|@DIGEST]`,
    /// `oci:DIR[:TAG]` or `docker-archive:FILE[:REF]`.
    source: String,
    /// The chunk store: a directory, `file://`, `s3://BUCKET/PREFIX` or
    /// (read-only, so not here) `http(s)://`. Optional with `--push`, which
    /// then stages chunks in a temporary directory.
    #[arg(long, env = "SMR_STORE")]
    store: Option<String>,
    /// Where to write the recipe (optional with `--push`: the recipe is
    /// part of the pushed artifact).
    #[arg(short = 'o', long)]
    out: Option<PathBuf>,
    /// Push the converted image to the source's repository as an smr
    /// artifact referring to the source image (which stays untouched).
    #[arg(long)]
    push: bool,
    /// With `--push`: chunks per registry blob ("pack") on average; 1 makes
    /// one blob per chunk (default: packs of about 4 MiB).
    #[arg(long, value_name = "N", requires = "push")]
    pack_chunks: Option<u32>,
    #[command(flatten)]
    registry: RegistryArgs,
    /// Chunk size: a power of two from 64K to 4M (suffixes K, M; default
    /// 64K). Given alone, it means `--chunking fixed`; with content-defined
    /// chunks it is the size of the header chunks and the unit the
    /// filesystem aligns layers to.
    #[arg(long, value_parser = parse_size)]
    chunk_size: Option<u64>,
    /// Where chunks are cut: where the content says (`cdc`, the default:
    /// FastCDC on 4 KiB blocks, so that an image with an inserted or
    /// changed file shares the chunks around it), or every `--chunk-size`
    /// bytes (`fixed`, the default when `--chunk-size` is given).
    #[arg(long, value_enum)]
    chunking: Option<Chunking>,
    /// Content-defined chunk sizes MIN:AVG:MAX (multiples of 4K, MAX at
    /// most 4M; default 16K:64K:256K); implies `--chunking cdc`.
    #[arg(long, value_name = "MIN:AVG:MAX")]
    cdc_sizes: Option<smr_format::CdcSizes>,
    /// Store plaintext chunks named by their SHA-256 (for public images).
    #[arg(long)]
    no_encrypt: bool,
    /// Per-chunk compression.
    #[arg(long, value_enum, default_value_t = Compress::None)]
    compress: Compress,
    /// zstd level of `--compress zstd` (1-22): higher makes smaller chunks
    /// (fewer bytes at a cold start) and a slower conversion.
    #[arg(long, default_value_t = smr_format::chunk::ZSTD_LEVEL,
          value_parser = clap::value_parser!(i32).range(1..=22))]
    zstd_level: i32,
    /// File with the 32-byte convergent-encryption salt (default: the documented public salt).
    #[arg(long, env = "SMR_SALT_FILE")]
    salt_file: Option<PathBuf>,
    /// Platform to pick from a multi-platform image (os/arch[/variant]).
    #[arg(long, default_value = "linux/amd64")]
    platform: String,
    #[command(flatten)]
    key: KeyArgs,
    #[command(flatten)]
    optimize: super::optimize::OptimizeArgs,
    #[command(flatten)]
    publish: super::publish::PublishArgs,
    /// With --push: a repository of the same registry to mount blobs from
    /// instead of uploading them (`NAME` or `docker://HOST/NAME`;
    /// repeatable, tried in order), e.g. the repository of the image this
    /// one was built on.
    #[arg(long, value_name = "REPO", requires = "push")]
    mount_from: Vec<String>,
}

/// Parses `512K`, `1M`, `65536`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        None => (t, 1),
        Some((i, _)) => {
            let mult = match t[i..].to_ascii_lowercase().as_str() {
                "k" | "kb" | "kib" => 1 << 10,
                "m" | "mb" | "mib" => 1 << 20,
                "g" | "gb" | "gib" => 1 << 30,
                other => return Err(format!("unknown size suffix `{other}` in `{s}`")),
            };
            (&t[..i], mult)
        }
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("invalid size `{s}`"))
}

/// Writes `bytes` to `path` via a temp file and rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("creating a temp file in {}", dir.display()))?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Runs the conversion and prints a summary.
pub fn run(a: Args) -> Result<ExitCode> {
    let t = Instant::now();
    let opts = convert_options(&a)?;
    // With --push and no --store, chunks are staged in a temporary
    // directory, removed when this function returns, pushed or not.
    let staging;
    let location = match &a.store {
        Some(s) => s.clone(),
        None => {
            staging = tempfile::Builder::new()
                .prefix("smr-push-")
                .tempdir()
                .context("creating a staging directory for the chunks")?;
            staging.path().display().to_string()
        }
    };
    let registry_src = if is_remote(&a.source) {
        Some(RegistrySource::open(&a.source, &a.registry.options()?)?)
    } else {
        None
    };
    let local_src;
    let src: &dyn ImageSource = match &registry_src {
        Some(r) => r,
        None => {
            local_src = smr_image::source::open_source(&a.source)?;
            local_src.as_ref()
        }
    };
    let pack = PackParams::for_chunk_size(opts.cdc.map_or(opts.chunk_size, |c| u64::from(c.avg)));
    let (store, batched) = open_store(&location, pack)?;
    let bar = bytes_bar(0, "converting");
    let out = convert(src, store.clone(), &opts, &mut |p| {
        bar.set_message(format!("layer {}/{}", p.layer_index + 1, p.layer_count));
        bar.set_length(p.compressed_size);
        bar.set_position(p.compressed_bytes);
    })
    .with_context(|| format!("converting {}", a.source))?;
    bar.finish_and_clear();
    if let Some(batch) = &batched {
        batch
            .commit()
            .with_context(|| format!("making the chunks in {location} durable"))?;
        batch
            .write_index(&out.recipe)
            .with_context(|| format!("writing the index of the recipe in {location}"))?;
    }
    if let Some(dir) = local_dir(&location) {
        let local = smr_store::LocalStore::open(&dir)
            .with_context(|| format!("opening the store {location}"))?;
        match local.remove_stale_temps(smr_store::local::STALE_TEMP_AGE) {
            Ok(0) => {}
            Ok(n) => tracing::info!("removed {n} temp files of interrupted writes from {location}"),
            Err(e) => tracing::warn!("cleaning up temp files: {e}"),
        }
    }
    let bytes = out.recipe.encode();
    if let Some(path) = &a.out {
        write_atomic(path, &bytes)?;
    }
    report(&a, src, &out, bytes.len(), t.elapsed().as_secs_f64());
    if let (Some(reg), true) = (&registry_src, a.push) {
        let artifact = push(&a, reg, &out, &bytes, store.as_ref())?;
        let converted = super::optimize::Converted {
            recipe: &bytes,
            store: &location,
            key_file: a.key.key_file.as_deref(),
            has_command: !(out.recipe.config.entrypoint.is_empty()
                && out.recipe.config.cmd.is_empty()),
        };
        let mut profile_entry = None;
        if let Some(profile) = super::optimize::record(&a.optimize, &converted) {
            let pushed = super::profile::push_to_registry(
                reg,
                &a.source,
                &profile,
                Some(artifact.manifest_digest.clone()),
                &a.platform,
                a.key.load()?.as_ref(),
                Some(store.as_ref()),
            );
            match pushed {
                Ok(p) => profile_entry = Some(p.descriptor),
                Err(e) => tracing::warn!(
                    error = format!("{e:#}"),
                    "pushing the startup profile failed; the image works without it"
                ),
            }
        }
        let platform = a.platform.parse().context("--platform")?;
        super::publish::publish(
            &a.publish,
            reg,
            &platform,
            &out.recipe.source_digest,
            &artifact.descriptor,
            profile_entry.as_ref(),
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

/// The conversion's options from the arguments (keys, salt, platform),
/// after checking that they go together.
fn convert_options(a: &Args) -> Result<ConvertOptions> {
    if !a.push && !a.optimize.cmds.is_empty() {
        bail!("--optimize-cmd records a startup profile for the image pushed with --push");
    }
    a.publish.check(a.push, &a.source)?;
    let owner = a.key.load()?;
    if !a.no_encrypt && owner.is_none() {
        bail!("encrypted conversion needs the owner key: pass --key-file PATH (or SMR_KEY_FILE; create one with `smr keygen -o PATH`), or --no-encrypt for a public image");
    }
    let salt = crate::keys::load_salt(a.salt_file.as_deref())?;
    let platform = a.platform.parse().context("--platform")?;
    if a.push && !is_remote(&a.source) {
        bail!("--push needs a docker:// source: the artifact goes next to the source image");
    }
    if !a.push && (a.store.is_none() || a.out.is_none()) {
        bail!("convert needs --store and -o (or --push, which keeps the recipe and chunks in the registry)");
    }
    let cdc = chunking(a.chunking, a.chunk_size, a.cdc_sizes)?;
    Ok(ConvertOptions {
        chunk_size: a.chunk_size.unwrap_or(smr_convert::DEFAULT_CHUNK_SIZE),
        cdc,
        codec: ChunkCodec::new(salt, !a.no_encrypt, a.compress == Compress::Zstd)
            .with_zstd_level(a.zstd_level),
        platform,
        owner: if a.no_encrypt { None } else { owner },
        workers: std::thread::available_parallelism().map_or(2, |n| n.get()),
    })
}

/// How `smr convert` cuts chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Chunking {
    /// Every `--chunk-size` bytes.
    Fixed,
    /// Content-defined boundaries (`--cdc-sizes`).
    Cdc,
}

/// The CDC sizes the flags ask for (`None`: fixed chunks): content-defined
/// unless `--chunking fixed`, or `--chunk-size` alone, says otherwise.
fn chunking(
    chunking: Option<Chunking>,
    chunk_size: Option<u64>,
    sizes: Option<smr_format::CdcSizes>,
) -> anyhow::Result<Option<smr_format::CdcSizes>> {
    Ok(match (chunking, chunk_size, sizes) {
        (Some(Chunking::Fixed), _, Some(s)) => {
            bail!("--cdc-sizes {s} needs content-defined chunks, not --chunking fixed")
        }
        (Some(Chunking::Fixed), _, None) | (None, Some(_), None) => None,
        (_, _, Some(s)) => Some(s),
        (Some(Chunking::Cdc), _, None) | (None, None, None) => {
            Some(smr_format::CdcSizes::default())
        }
    })
}

/// A store taking the chunks in one batch of packs (see [`open_store`]).
pub(crate) type Batched = Option<Arc<dyn smr_store::BatchStore>>;

/// The directory of `location` when it is a local store.
fn local_dir(location: &str) -> Option<std::path::PathBuf> {
    let parsed: smr_store::StoreLocation = location.parse().ok()?;
    parsed.local_dir().map(Path::to_path_buf)
}

/// The store at `location`, and the same store when it takes the chunks
/// in one batch of packs cut with `pack` (a directory or S3), made durable
/// by one commit, and indexed, before the recipe is written
/// (smr_store::packed).
pub(crate) fn open_store(
    location: &str,
    pack: PackParams,
) -> Result<(Arc<dyn smr_store::ChunkStore>, Batched)> {
    let parsed: smr_store::StoreLocation = location
        .parse()
        .with_context(|| format!("--store {location}"))?;
    let opening = || format!("opening the store {location}");
    let batched: Batched = match &parsed {
        smr_store::StoreLocation::Local(dir) => Some(Arc::new(
            smr_store::LocalStore::open_batched(dir)
                .with_context(opening)?
                .with_pack_params(pack),
        )),
        smr_store::StoreLocation::S3(l) => {
            let s3 = smr_store::S3Store::open(l, smr_store::RemoteOptions::from_env()?)
                .with_context(opening)?;
            Some(Arc::new(smr_store::s3::packs::S3Packed::new(s3, pack)))
        }
        smr_store::StoreLocation::Http(_) => None,
    };
    let store: Arc<dyn smr_store::ChunkStore> = match &batched {
        Some(b) => b.clone(),
        None => Arc::from(parsed.open().with_context(opening)?),
    };
    Ok((store, batched))
}

/// Prints what the conversion made, in `secs` seconds.
fn report(a: &Args, src: &dyn ImageSource, out: &ConvertOutput, recipe_len: usize, secs: f64) {
    let c = &out.chunks;
    errln!(
        "converted {} -> {} ({})",
        src.describe(),
        a.out
            .as_ref()
            .map_or("the registry".into(), |p| p.display().to_string()),
        out.recipe.digest()
    );
    errln!(
        "  image {}, file data {} in {} layers, {} entries",
        human(out.ext4.image_size),
        human(out.flatten.file_bytes),
        out.flatten.layers,
        out.flatten.entries
    );
    let dead = (out.ext4.data_blocks_written - out.ext4.live_data_blocks) * 4096;
    errln!(
        "  dead data {} (blocks of files that upper layers replaced or deleted, kept so lower layers' chunks stay shared)",
        human(dead)
    );
    errln!(
        "  chunks {} total: {} zero, {} new, {} reused; {} stored, {} written",
        c.total,
        c.zero,
        c.new,
        c.reused,
        human(c.stored_bytes),
        human(c.written_bytes)
    );
    errln!(
        "  {:.2}s, {:.1} MB/s of layer data, recipe {}",
        secs,
        out.flatten.tar_bytes as f64 / secs / 1e6,
        human(recipe_len as u64)
    );
}

/// Pushes the converted image (recipe `bytes`, chunks in `store`) as the
/// smr artifact of the source image `reg`, and says what it did.
fn push(
    a: &Args,
    reg: &RegistrySource,
    out: &ConvertOutput,
    bytes: &[u8],
    store: &dyn smr_store::ChunkStore,
) -> Result<smr_registry::push::PushReport> {
    let mut conversion = std::collections::BTreeMap::from([(
        ANNOTATION_LAYOUT.to_string(),
        smr_convert::LAYOUT_VERSION.to_string(),
    )]);
    if a.compress == Compress::Zstd {
        conversion.insert(ANNOTATION_ZSTD_LEVEL.to_string(), a.zstd_level.to_string());
    }
    let opts = PushOptions {
        pack: a.pack_chunks.map(PackParams::with_target),
        conversion,
        mount_from: crate::remote::mount_sources(reg, &a.mount_from)?,
        ..Default::default()
    };
    let t = Instant::now();
    let r = push_converted(reg, &out.recipe.source_digest, bytes, store, &opts)?;
    errln!(
        "pushed smr artifact {} to {}: {}; referrers: {}; {:.2}s",
        r.manifest_digest,
        reg.describe(),
        crate::remote::push_summary(&r),
        serde_json::to_value(r.referrers)?
            .as_str()
            .unwrap_or("none"),
        t.elapsed().as_secs_f64()
    );
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::{chunking, parse_size, Chunking};
    use smr_format::CdcSizes;

    #[test]
    fn chunking_is_content_defined_unless_fixed_is_asked_for() {
        let small: CdcSizes = "8K:32K:128K".parse().unwrap();
        let d = Some(CdcSizes::default());
        assert_eq!(chunking(None, None, None).unwrap(), d);
        assert_eq!(chunking(None, Some(1 << 20), None).unwrap(), None);
        assert_eq!(
            chunking(Some(Chunking::Cdc), Some(1 << 20), None).unwrap(),
            d
        );
        assert_eq!(
            chunking(None, Some(1 << 20), Some(small)).unwrap(),
            Some(small)
        );
        assert_eq!(chunking(Some(Chunking::Fixed), None, None).unwrap(), None);
        let e = chunking(Some(Chunking::Fixed), None, Some(small)).unwrap_err();
        assert!(e.to_string().contains("8K:32K:128K"), "{e}");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512K"), Ok(512 << 10));
        assert_eq!(parse_size("1M"), Ok(1 << 20));
        assert_eq!(parse_size("65536"), Ok(65536));
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("K").is_err());
    }
}
