//! `smr extract` and `smr verify`.

use super::image::OriginArgs;
use crate::keys::image_chunks;
use crate::progress::human;
use anyhow::{bail, Context, Result};
use std::fs::OpenOptions;
use std::io::BufWriter;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

/// Arguments of `smr extract`.
#[derive(clap::Args)]
pub struct ExtractArgs {
    /// The image: a recipe file (chunks in `--store`), or
    /// `docker://HOST[:PORT]/NAME[:TAG|@DIGEST]` (recipe and chunks from the
    /// smr artifact pushed by `smr convert --push`).
    image: String,
    /// Where the image goes: a file (written next to itself and renamed
    /// into place when complete; a symlink is followed to the file it
    /// names), `-` for standard output, or a FIFO or character device
    /// (written through, front to back). Directories and block devices are
    /// refused.
    #[arg(short = 'o', long)]
    out: PathBuf,
    #[command(flatten)]
    origin: OriginArgs,
}

/// Arguments of `smr verify`.
#[derive(clap::Args)]
pub struct VerifyArgs {
    /// The image: a recipe file (chunks in `--store`), or `docker://…`
    /// (its smr artifact).
    image: String,
    #[command(flatten)]
    origin: OriginArgs,
    /// Convert the source image again, as the artifact says it was
    /// converted, and check that its recipe is exactly what the image gives
    /// (registry images; the first difference is named).
    #[arg(long)]
    reproduce: bool,
    /// With `--reproduce`: the salt file the image was converted with.
    #[arg(long, requires = "reproduce")]
    salt_file: Option<PathBuf>,
}

fn threads() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get()) * 2
}

/// What `smr extract -o` writes to.
#[derive(Debug, PartialEq)]
enum Output {
    /// A regular file (new or replaced atomically); a symlink resolved to
    /// the file it names.
    File(PathBuf),
    /// Standard output (`-`).
    Stdout,
    /// A FIFO or character device, written through in order.
    Stream(PathBuf),
}

/// Decides how to write to `out`, refusing what cannot be written safely.
fn output(out: &Path) -> Result<Output> {
    if out.as_os_str() == "-" {
        return Ok(Output::Stdout);
    }
    let meta = match std::fs::symlink_metadata(out) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Output::File(out.to_path_buf()))
        }
        Err(e) => return Err(e).with_context(|| format!("output {}", out.display())),
    };
    let ft = meta.file_type();
    if ft.is_symlink() {
        let target = std::fs::canonicalize(out).with_context(|| {
            format!(
                "output {} is a symlink whose target cannot be resolved",
                out.display()
            )
        })?;
        return output(&target);
    }
    if ft.is_file() {
        Ok(Output::File(out.to_path_buf()))
    } else if ft.is_fifo() || ft.is_char_device() {
        Ok(Output::Stream(out.to_path_buf()))
    } else if ft.is_dir() {
        bail!("output {} is a directory; name a file", out.display())
    } else if ft.is_block_device() {
        bail!(
            "output {} is a block device; refusing to overwrite it (write to a file, or `-o -` and redirect)",
            out.display()
        )
    } else {
        bail!(
            "output {} is neither a file, a FIFO nor a character device",
            out.display()
        )
    }
}

/// Rebuilds the image.
pub fn run_extract(a: ExtractArgs) -> Result<ExitCode> {
    let out = output(&a.out)?;
    let r = a.origin.resolve(&a.image, false, false)?;
    let img = image_chunks(r.recipe, &a.origin.key, true, &a.image)?;
    let t = Instant::now();
    let store = r.store.as_ref();
    let size = match &out {
        Output::File(path) => smr_node::restore::extract(&img, store, path, threads()),
        Output::Stdout => {
            let mut w = BufWriter::with_capacity(1 << 20, std::io::stdout().lock());
            smr_node::restore::extract_stream(&img, store, &mut w, "standard output", threads())
        }
        Output::Stream(path) => {
            let file = OpenOptions::new()
                .write(true)
                .open(path)
                .with_context(|| format!("opening {}", path.display()))?;
            let mut w = BufWriter::with_capacity(1 << 20, file);
            let name = path.display().to_string();
            smr_node::restore::extract_stream(&img, store, &mut w, &name, threads())
        }
    }
    .with_context(|| format!("extracting {}", a.image))?;
    let shown = match &out {
        Output::Stdout => "standard output".to_string(),
        Output::File(p) | Output::Stream(p) => p.display().to_string(),
    };
    errln!(
        "extracted {shown} ({}) in {:.2}s",
        human(size),
        t.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}

/// Temp files older than this are reported by `smr verify` (a running
/// writer's are younger).
const REPORTED_TEMP_AGE: std::time::Duration = std::time::Duration::from_secs(60);

/// Reports temp files that interrupted writes left in a local store.
fn report_temps(location: Option<&str>) {
    let Some(dir) = location
        .and_then(|l| l.parse::<smr_store::StoreLocation>().ok())
        .and_then(|l| l.local_dir().map(Path::to_path_buf))
    else {
        return;
    };
    let temps = smr_store::LocalStore::open(&dir).and_then(|s| s.stale_temps(REPORTED_TEMP_AGE));
    match temps {
        Ok(t) if t.is_empty() => {}
        Ok(t) => {
            for (path, age) in &t {
                errln!("left over: {} ({}s old)", path.display(), age.as_secs());
            }
            errln!(
                "{} temp files of interrupted writes in {} (not chunks; `smr convert` into this store removes those older than {}h)",
                t.len(),
                dir.display(),
                smr_store::local::STALE_TEMP_AGE.as_secs() / 3600
            );
        }
        Err(e) => tracing::warn!("looking for temp files: {e}"),
    }
}

/// Checks every chunk; fails naming each bad chunk.
pub fn run_verify(a: VerifyArgs) -> Result<ExitCode> {
    if a.reproduce {
        return super::reproduce::run(&a.image, &a.origin, a.salt_file.as_deref());
    }
    let r = a.origin.resolve(&a.image, false, false)?;
    let img = image_chunks(r.recipe, &a.origin.key, false, &a.image)?;
    let store = r.store;
    let report = smr_node::restore::verify(&img, store.as_ref(), threads());
    for (index, e) in &report.failures {
        errln!("chunk #{index}: {e}");
    }
    report_temps(a.origin.store.as_deref());
    if !report.failures.is_empty() {
        bail!(
            "{} of {} chunks are missing or corrupt in {}",
            report.failures.len(),
            report.checked,
            store.describe()
        );
    }
    let how = if img.keys_missing() {
        "hashes checked; pass --key-file to also check decryption"
    } else {
        "hashes and contents checked"
    };
    errln!(
        "{} chunks ({}) intact ({how})",
        report.checked,
        human(report.bytes)
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outputs_are_told_apart() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        assert_eq!(output(Path::new("-")).unwrap(), Output::Stdout);
        let new = d.join("new.img");
        assert_eq!(output(&new).unwrap(), Output::File(new.clone()));
        std::fs::write(d.join("old.img"), b"x").unwrap();
        let old = d.join("old.img").canonicalize().unwrap();
        assert_eq!(output(&old).unwrap(), Output::File(old.clone()));
        std::os::unix::fs::symlink(&old, d.join("link")).unwrap();
        assert_eq!(output(&d.join("link")).unwrap(), Output::File(old));
        std::os::unix::fs::symlink(d.join("gone"), d.join("dangling")).unwrap();
        let e = format!("{:#}", output(&d.join("dangling")).unwrap_err());
        assert!(e.contains("dangling") && e.contains("symlink"), "{e}");
        let e = format!("{:#}", output(d).unwrap_err());
        assert!(e.contains("is a directory"), "{e}");
        assert_eq!(
            output(Path::new("/dev/null")).unwrap(),
            Output::Stream("/dev/null".into())
        );
        let fifo = d.join("fifo");
        assert!(std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success());
        assert_eq!(output(&fifo).unwrap(), Output::Stream(fifo));
        // A block device node of our own (loop major 7), not a live one.
        let blk = d.join("blk");
        let made = std::process::Command::new("mknod")
            .arg(&blk)
            .args(["b", "7", "250"])
            .status()
            .unwrap();
        assert!(made.success(), "mknod needs root, as the test suite does");
        let e = format!("{:#}", output(&blk).unwrap_err());
        assert!(e.contains("block device") && e.contains("blk"), "{e}");
    }
}
