//! `smr convert`: OCI image -> chunks in a store + recipe file.

use crate::keys::KeyArgs;
use crate::progress::{bytes_bar, human};
use anyhow::{bail, Context, Result};
use smr_format::chunk::default_salt;
use smr_format::ChunkCodec;
use smr_image::convert::{convert, ConvertOptions};
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
    /// Source image: `oci:DIR[:TAG]` or `docker-archive:FILE[:REF]`.
    source: String,
    /// The chunk store (directory or file:// URL).
    #[arg(long, env = "SMR_STORE")]
    store: String,
    /// Where to write the recipe.
    #[arg(short = 'o', long)]
    out: PathBuf,
    /// Chunk size: a power of two from 64K to 4M (suffixes K, M).
    #[arg(long, default_value = "512K", value_parser = parse_size)]
    chunk_size: u64,
    /// Store plaintext chunks named by their SHA-256 (for public images).
    #[arg(long)]
    no_encrypt: bool,
    /// Per-chunk compression.
    #[arg(long, value_enum, default_value_t = Compress::None)]
    compress: Compress,
    /// File with the 32-byte convergent-encryption salt (default: the documented public salt).
    #[arg(long, env = "SMR_SALT_FILE")]
    salt_file: Option<PathBuf>,
    /// Platform to pick from a multi-platform image (os/arch[/variant]).
    #[arg(long, default_value = "linux/amd64")]
    platform: String,
    #[command(flatten)]
    key: KeyArgs,
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

fn read_salt(path: &Path) -> Result<[u8; 32]> {
    let key = smr_format::OwnerKey::from_file(path).context("loading the salt")?;
    Ok(key.0)
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
    let owner = a.key.load()?;
    if !a.no_encrypt && owner.is_none() {
        bail!("encrypted conversion needs the owner key: pass --key-file PATH (or SMR_KEY_FILE; create one with `smr keygen -o PATH`), or --no-encrypt for a public image");
    }
    let salt = match &a.salt_file {
        Some(p) => read_salt(p)?,
        None => default_salt(),
    };
    let platform = a.platform.parse().context("--platform")?;
    let src = smr_image::source::open_source(&a.source)?;
    let store: Arc<dyn smr_store::ChunkStore> = Arc::from(smr_store::open_store(&a.store)?);
    let opts = ConvertOptions {
        chunk_size: a.chunk_size,
        codec: ChunkCodec::new(salt, !a.no_encrypt, a.compress == Compress::Zstd),
        platform,
        owner: if a.no_encrypt { None } else { owner },
        workers: std::thread::available_parallelism().map_or(2, |n| n.get()),
    };
    let bar = bytes_bar(0, "converting");
    let out = convert(src.as_ref(), store.clone(), &opts, &mut |p| {
        bar.set_message(format!("layer {}/{}", p.layer_index + 1, p.layer_count));
        bar.set_length(p.compressed_size);
        bar.set_position(p.compressed_bytes);
    })
    .with_context(|| format!("converting {}", a.source))?;
    bar.finish_and_clear();
    let bytes = out.recipe.encode();
    write_atomic(&a.out, &bytes)?;
    let c = &out.chunks;
    let secs = t.elapsed().as_secs_f64();
    eprintln!(
        "converted {} -> {} ({})",
        src.describe(),
        a.out.display(),
        out.recipe.digest()
    );
    eprintln!(
        "  image {}, file data {} in {} layers, {} entries",
        human(out.ext4.image_size),
        human(out.flatten.file_bytes),
        out.flatten.layers,
        out.flatten.entries
    );
    let dead = (out.ext4.data_blocks_written - out.ext4.live_data_blocks) * 4096;
    eprintln!(
        "  dead data {} (blocks of files that upper layers replaced or deleted, kept so lower layers' chunks stay shared)",
        human(dead)
    );
    eprintln!(
        "  chunks {} total: {} zero, {} new, {} reused; {} stored, {} written",
        c.total,
        c.zero,
        c.new,
        c.reused,
        human(c.stored_bytes),
        human(c.written_bytes)
    );
    eprintln!(
        "  {:.2}s, {:.1} MB/s of layer data, recipe {}",
        secs,
        out.flatten.tar_bytes as f64 / secs / 1e6,
        human(bytes.len() as u64)
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512K"), Ok(512 << 10));
        assert_eq!(parse_size("1M"), Ok(1 << 20));
        assert_eq!(parse_size("65536"), Ok(65536));
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("K").is_err());
    }
}
