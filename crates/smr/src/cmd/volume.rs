//! `smr volume create|ls|rm`: writable volumes under the node's root
//! (`ROOT/volumes/NAME`: `volume.json`, the base recipe, the COW file and
//! its map; smr_node::volume), served by `smr serve-nbd --volume` and made
//! into new images by `smr commit`.

use super::image::{ImageArgs, SourceArgs};
use crate::progress::human;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use smr_node::volume::Volume;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

/// The node root of a default install.
pub const DEFAULT_ROOT: &str = "/var/lib/smr";
/// The base recipe's copy in a volume's directory.
const BASE_RECIPE: &str = "base.recipe";
const META: &str = "volume.json";

/// `--root` (or `SMR_ROOT`).
#[derive(clap::Args, Clone, Debug)]
pub struct RootArgs {
    /// The node's root directory (volumes live in `ROOT/volumes`).
    #[arg(long, env = "SMR_ROOT", default_value = DEFAULT_ROOT)]
    pub root: PathBuf,
}

impl RootArgs {
    /// The directory of volume `name`, after checking the name.
    pub fn volume_dir(&self, name: &str) -> Result<PathBuf> {
        let ok = !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            && !name.starts_with('.');
        anyhow::ensure!(
            ok,
            "volume name {name:?}: use 1-64 letters, digits, '-', '_' or '.' (not first)"
        );
        Ok(self.root.join("volumes").join(name))
    }
}

/// What a volume is made of (`volume.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VolumeMeta {
    /// Its name.
    pub name: String,
    /// The base image as given: a recipe file (copied into the volume as
    /// `base.recipe`) or `docker://…`.
    pub image: String,
    /// The base's chunk store (absolute for a local directory), if not the
    /// registry artifact's.
    pub store: Option<String>,
    /// For a registry base: the smr artifact used, pinned.
    pub artifact: Option<String>,
    /// SHA-256 (hex) of the base recipe's bytes.
    pub recipe_sha256: String,
    /// Image size in bytes.
    pub size: u64,
    /// When it was created (RFC 3339).
    pub created: String,
}

impl VolumeMeta {
    /// Reads `DIR/volume.json`.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(META);
        let bytes = smr_format::read_bounded(&path, 1 << 20)
            .with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_slice(&bytes).with_context(|| format!("{}", path.display()))
    }

    /// The image to open as the base: the copied recipe, or the registry
    /// image.
    pub fn base_image(&self, dir: &Path) -> String {
        if crate::remote::is_remote(&self.image) {
            self.image.clone()
        } else {
            dir.join(BASE_RECIPE).display().to_string()
        }
    }

    /// `source` with the base's store and artifact.
    pub fn source(&self, source: &SourceArgs) -> SourceArgs {
        let mut s = source.clone();
        if self.store.is_some() {
            s.origin.store = self.store.clone();
        }
        if self.artifact.is_some() {
            s.origin.artifact = self.artifact.clone();
        }
        s
    }
}

/// A volume opened for serving or committing: its lock held.
pub struct OpenedVolume {
    /// What it is made of.
    pub meta: VolumeMeta,
    /// The base image, opened.
    pub base: super::image::OpenedImage,
    /// The volume device.
    pub volume: Arc<Volume>,
}

/// Opens volume `name` over its base (opened with `source`'s keys and
/// cache). Fails if another process has it open.
pub fn open(root: &RootArgs, name: &str, source: &SourceArgs) -> Result<OpenedVolume> {
    let dir = root.volume_dir(name)?;
    anyhow::ensure!(dir.is_dir(), "no volume {name} in {}", root.root.display());
    let meta = VolumeMeta::read(&dir)?;
    let image = meta.base_image(&dir);
    let src = meta.source(source);
    let base = src
        .open(&image, false, src.cache.open()?)
        .with_context(|| format!("opening the base {} of volume {name}", meta.image))?;
    let sha = hex::encode(base.recipe_sha256);
    anyhow::ensure!(
        sha == meta.recipe_sha256,
        "volume {name}: its base {} now has recipe sha256:{sha}, the volume was made on sha256:{}",
        meta.image,
        meta.recipe_sha256
    );
    let volume = Volume::open(&dir, Arc::new(base.lazy.clone()))
        .with_context(|| format!("opening volume {name}"))?;
    Ok(OpenedVolume {
        meta,
        base,
        volume: Arc::new(volume),
    })
}

/// Arguments of `smr volume`.
#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Subcommand)]
enum Cmd {
    /// Create a writable volume on an image (recipe file or docker://).
    Create(Box<CreateArgs>),
    /// List the node's volumes.
    Ls(LsArgs),
    /// Remove a volume (refused while it is served).
    Rm(RmArgs),
}

/// `smr volume create NAME --from IMAGE`.
#[derive(clap::Args)]
pub struct CreateArgs {
    /// The volume's name.
    name: String,
    /// The base image: a recipe file (chunks in `--store`) or `docker://…`.
    #[arg(long = "from", value_name = "IMAGE")]
    from: String,
    /// The volume's size (`4G`, `512M`, bytes), at least the base's, or
    /// `base` for the base's own. Default: the base's size plus 1 GiB
    /// (sparse: only written blocks take space). The ext4 is grown to fill
    /// it (`resize2fs`, written into the volume).
    #[arg(long, value_name = "SIZE")]
    size: Option<String>,
    /// Do not give the volume's ext4 a journal. smr images have none (they
    /// are read-only); a volume gets one (`tune2fs -O has_journal`,
    /// written into the volume) so that its filesystem survives a crash
    /// of the server or the host.
    #[arg(long)]
    no_journal: bool,
    #[command(flatten)]
    source: SourceArgs,
    #[command(flatten)]
    root: RootArgs,
}

/// `smr volume ls`.
#[derive(clap::Args)]
pub struct LsArgs {
    #[command(flatten)]
    root: RootArgs,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
}

/// `smr volume rm NAME`.
#[derive(clap::Args)]
pub struct RmArgs {
    /// The volume's name.
    name: String,
    #[command(flatten)]
    root: RootArgs,
}

/// Runs `smr volume`.
pub fn run(a: Args) -> Result<ExitCode> {
    match a.cmd {
        Cmd::Create(a) => create(*a),
        Cmd::Ls(a) => ls(a),
        Cmd::Rm(a) => rm(a),
    }
}

fn create(a: CreateArgs) -> Result<ExitCode> {
    let dir = a.root.volume_dir(&a.name)?;
    if dir.exists() {
        bail!("volume {} exists ({})", a.name, dir.display());
    }
    let image = ImageArgs {
        image: a.from.clone(),
        source: a.source.clone(),
    };
    let opened = image.open_with(false)?;
    let base_size = smr_node::device::BlockDevice::size(&opened.lazy);
    let size = match a.size.as_deref() {
        None => base_size + (1 << 30),
        Some("base") => base_size,
        Some(s) => super::convert::parse_size(s).map_err(|e| anyhow::anyhow!("--size: {e}"))?,
    };
    anyhow::ensure!(
        size >= base_size && size % 4096 == 0,
        "--size {}: a volume is a whole number of 4 KiB blocks, at least its base's {base_size} bytes",
        a.size.as_deref().unwrap_or("")
    );
    let store = super::mount::absolute_store(a.source.origin.store.as_deref())?;
    let meta = VolumeMeta {
        name: a.name.clone(),
        image: a.from.clone(),
        store,
        artifact: opened.artifact.clone(),
        recipe_sha256: hex::encode(opened.recipe_sha256),
        size,
        created: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
    };
    std::fs::create_dir_all(dir.parent().unwrap_or(&a.root.root))
        .with_context(|| format!("creating {}", a.root.root.display()))?;
    // Built in a temporary directory next to it, renamed into place when
    // whole: a failure leaves nothing half-made.
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{}-", a.name))
        .tempdir_in(dir.parent().unwrap_or(&a.root.root))
        .context("creating the volume directory")?;
    if !crate::remote::is_remote(&a.from) {
        let bytes = opened.recipe.encode();
        anyhow::ensure!(
            smr_format::Profile::recipe_hash(&bytes) == opened.recipe_sha256,
            "the recipe {} does not encode back to its own bytes",
            a.from
        );
        super::convert::write_atomic(&tmp.path().join(BASE_RECIPE), &bytes)?;
    }
    Volume::create(tmp.path(), size).context("creating the COW file and map")?;
    if size > base_size || !a.no_journal {
        prepare_fs(tmp.path(), &opened.lazy, size > base_size, !a.no_journal)
            .with_context(|| format!("volume {}: preparing its ext4", a.name))?;
    }
    super::convert::write_atomic(&tmp.path().join(META), &serde_json::to_vec_pretty(&meta)?)?;
    let made = tmp.keep();
    std::fs::rename(&made, &dir)
        .with_context(|| format!("moving the volume into {}", dir.display()))?;
    errln!(
        "created volume {} ({}) on {} in {}",
        a.name,
        human(size),
        a.from,
        dir.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// Grows the ext4 of the volume in `dir` to the volume's size (`grow`) and
/// gives it a journal unless it has one (`journal`), through the volume
/// exported as a file.
fn prepare_fs(
    dir: &Path,
    base: &smr_node::lazy::LazyImage,
    grow: bool,
    journal: bool,
) -> Result<()> {
    use smr_node::device::BlockDevice;
    use smr_node::fuse::{FuseConfig, FuseMount};
    let volume: Arc<Volume> = Arc::new(Volume::open(dir, Arc::new(base.clone()))?);
    let mnt = tempfile::tempdir().context("creating a mount point")?;
    let cfg = FuseConfig {
        file_name: "volume".into(),
        ..FuseConfig::default()
    };
    let fuse = FuseMount::spawn(volume.clone(), mnt.path(), &cfg, "smr-volume")?;
    let has_journal = std::process::Command::new("dumpe2fs")
        .arg("-h")
        .arg(fuse.file())
        .stderr(std::process::Stdio::null())
        .output()
        .context("running dumpe2fs (e2fsprogs)")?;
    let features = String::from_utf8_lossy(&has_journal.stdout);
    anyhow::ensure!(
        has_journal.status.success(),
        "the image is not an ext4 filesystem dumpe2fs can read"
    );
    let e2fs = |tool: &str, args: &[&str]| -> Result<()> {
        let out = std::process::Command::new(tool)
            .args(args)
            .arg(fuse.file())
            .output()
            .with_context(|| format!("running {tool} (e2fsprogs)"))?;
        anyhow::ensure!(
            out.status.success(),
            "{tool} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(())
    };
    if grow {
        // The image was made clean by the converter: no check first.
        e2fs("resize2fs", &["-f"])?;
    }
    if journal && !features.contains("has_journal") {
        e2fs("tune2fs", &["-O", "has_journal"])?;
    }
    tracing::info!(volume = %dir.display(), grow, journal, "filesystem prepared");
    drop(fuse);
    volume.flush().context("flushing the volume")?;
    Ok(())
}

fn ls(a: LsArgs) -> Result<ExitCode> {
    let dir = a.root.root.join("volumes");
    let mut rows = Vec::new();
    if let Ok(rd) = std::fs::read_dir(&dir) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            let meta = match VolumeMeta::read(&e.path()) {
                Ok(m) => m,
                Err(err) => {
                    tracing::warn!(volume = %name, error = format!("{err:#}"), "unreadable volume");
                    continue;
                }
            };
            let used = std::fs::metadata(e.path().join("cow"))
                .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
                .unwrap_or(0);
            rows.push((meta, used));
        }
    }
    rows.sort_by(|a, b| a.0.name.cmp(&b.0.name));
    if a.json {
        let v: Vec<serde_json::Value> = rows
            .iter()
            .map(|(m, used)| serde_json::json!({ "volume": m, "cow_bytes": used }))
            .collect();
        outln!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    outln!(
        "{:<20} {:>10} {:>10}  {:<20}  BASE",
        "NAME",
        "SIZE",
        "WRITTEN",
        "CREATED"
    );
    for (m, used) in rows {
        outln!(
            "{:<20} {:>10} {:>10}  {:<20}  {}",
            m.name,
            human(m.size),
            human(used),
            m.created,
            m.image
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn rm(a: RmArgs) -> Result<ExitCode> {
    let dir = a.root.volume_dir(&a.name)?;
    anyhow::ensure!(
        dir.is_dir(),
        "no volume {} in {}",
        a.name,
        a.root.root.display()
    );
    // Held while removing: a server cannot open it meanwhile.
    let _lock = smr_node::volume::lock_volume(&dir)
        .with_context(|| format!("removing volume {}: stop what uses it first", a.name))?;
    std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    errln!("removed volume {}", a.name);
    Ok(ExitCode::SUCCESS)
}
