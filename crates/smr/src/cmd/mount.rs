//! `smr mount` and `smr umount`.

use super::image::ImageArgs;
use crate::remote::is_remote;
use anyhow::{Context, Result};
use smr_node::mount::{
    LoopOptions, MountRequest, DEFAULT_READAHEAD_KB, DEFAULT_STATE_ROOT, STARTUP_READAHEAD_KB,
};
use smr_registry::discover::ProfileListing;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

/// Loop device options shared by `smr mount` and `smr run`.
#[derive(clap::Args, Clone, Debug)]
pub struct LoopArgs {
    /// The loop device's read_ahead_kb: how far the kernel reads ahead of
    /// what programs ask for (more chunks fetched, fewer round trips).
    /// Default 128, or `--startup-readahead-kb` for a start that records a
    /// startup profile; a start served from a startup pack reads with the
    /// readahead its profile was recorded with.
    #[arg(long)]
    pub readahead_kb: Option<u32>,
    /// Open the FUSE file with O_DIRECT from the loop device (no second
    /// page cache of the image); always so for a start that records a
    /// startup profile.
    #[arg(long)]
    pub direct_io: bool,
    /// The read_ahead_kb of the FUSE file itself (its FUSE mount's), which
    /// adds to the loop device's when the loop device reads it through
    /// the page cache; default the kernel's, 128 (none for a start served
    /// from a startup pack); 0: none. More: faster warm reads, more
    /// chunks fetched at a cold start.
    #[arg(long)]
    pub fuse_readahead_kb: Option<u32>,
    /// The loop device's read_ahead_kb while a startup profile is recorded
    /// (the profile keeps it, and a start served from its startup pack
    /// reads with it: the pack holds what the recorded start read). A
    /// smaller value, a smaller pack and more, smaller reads.
    #[arg(long, env = "SMR_STARTUP_READAHEAD_KB", default_value_t = STARTUP_READAHEAD_KB)]
    pub startup_readahead_kb: u32,
}

impl LoopArgs {
    /// As library options.
    pub fn options(&self) -> LoopOptions {
        LoopOptions {
            readahead_kb: self.readahead_kb.unwrap_or(DEFAULT_READAHEAD_KB),
            direct_io: self.direct_io,
            writable: false,
            backing_readahead_kb: self.fuse_readahead_kb,
        }
    }

    /// The options of a start that records a startup profile: direct
    /// I/O (every block it reads reaches the server), and
    /// `--startup-readahead-kb` unless `--readahead-kb` is given.
    pub fn record_options(&self) -> LoopOptions {
        LoopOptions {
            direct_io: true,
            ..self.pack_options()
        }
    }

    /// The options of a start served from a startup pack (whose profile
    /// then gives the readahead): the readahead of [`Self::record_options`],
    /// through the page cache (where the server stores the pack's blocks)
    /// unless `--direct-io` is given, and no readahead of the FUSE file's
    /// own unless `--fuse-readahead-kb` is given. The loop device keeps
    /// that for good (the kernel takes it at open); with the normal 128
    /// KiB, a read of a block not stored yet would ask for blocks around
    /// it that the pack lacks, each a fetch.
    pub fn pack_options(&self) -> LoopOptions {
        LoopOptions {
            readahead_kb: self.readahead_kb.unwrap_or(self.startup_readahead_kb),
            backing_readahead_kb: Some(self.fuse_readahead_kb.unwrap_or(0)),
            ..self.options()
        }
    }
}

/// `--state-dir` (or `SMR_STATE_DIR`).
#[derive(clap::Args, Clone, Debug)]
pub struct StateArgs {
    /// Where mount state (server pid, loop device, logs) is kept.
    #[arg(long, env = "SMR_STATE_DIR", default_value = DEFAULT_STATE_ROOT, hide = true)]
    pub state_dir: PathBuf,
}

/// Arguments of `smr mount`.
#[derive(clap::Args)]
pub struct MountArgs {
    /// `IMAGE MOUNTPOINT`, or with `--volume`, `MOUNTPOINT`: the image (a
    /// recipe file or `docker://…`) and where to mount its filesystem
    /// (read-only; a volume's read-write).
    #[arg(value_name = "IMAGE|MOUNTPOINT", num_args = 1..=2, required = true)]
    targets: Vec<String>,
    #[command(flatten)]
    source: super::image::SourceArgs,
    /// Mount this writable volume (`smr volume create`) read-write.
    #[arg(long, value_name = "NAME")]
    volume: Option<String>,
    #[command(flatten)]
    root: super::volume::RootArgs,
    #[command(flatten)]
    loop_args: LoopArgs,
    #[command(flatten)]
    state: StateArgs,
    /// Mount in a server of this command's own even when the node daemon
    /// runs (otherwise a `docker://` image is mounted once by the daemon,
    /// with its owner key and cache, and bound here).
    #[arg(long)]
    standalone: bool,
    /// Print `accepted` on stdout once the image's artifact is found,
    /// trusted and opened, before mounting it (for the node daemon, which
    /// answers containerd then).
    #[arg(long, hide = true)]
    print_accepted: bool,
}

/// Arguments of `smr umount`.
#[derive(clap::Args)]
pub struct UmountArgs {
    /// The mount point given to `smr mount`.
    mountpoint: PathBuf,
    #[command(flatten)]
    state: StateArgs,
}

/// `p` made absolute (not resolving symlinks), or an error naming it.
pub(super) fn absolute(p: &Path) -> Result<PathBuf> {
    std::path::absolute(p).with_context(|| format!("resolving {}", p.display()))
}

/// A `--store` location for another process: a local directory made
/// absolute, a URL as it is.
pub(super) fn absolute_store(store: Option<&str>) -> Result<Option<String>> {
    store
        .map(|s| match s.contains("://") {
            true => Ok(s.to_string()),
            false => Ok(absolute(Path::new(s))?.display().to_string()),
        })
        .transpose()
}

/// Mounts the image lazily: FUSE server process, loop device, ext4; a
/// registry image through the node daemon when one runs.
pub fn run_mount(m: MountArgs) -> Result<ExitCode> {
    let (image, mountpoint) = match (&m.volume, &m.targets[..]) {
        (Some(name), [mnt]) => {
            let dir = m.root.volume_dir(name)?;
            anyhow::ensure!(
                dir.is_dir(),
                "no volume {name} in {}",
                m.root.root.display()
            );
            let meta = super::volume::VolumeMeta::read(&dir)?;
            (meta.base_image(&dir), PathBuf::from(mnt))
        }
        (None, [image, mnt]) => (image.clone(), PathBuf::from(mnt)),
        (Some(_), _) => anyhow::bail!("with --volume, give only the mount point"),
        (None, _) => anyhow::bail!("give the image and the mount point"),
    };
    let source = match &m.volume {
        Some(name) => {
            let dir = m.root.volume_dir(name)?;
            super::volume::VolumeMeta::read(&dir)?.source(&m.source)
        }
        None => m.source.clone(),
    };
    let a = Mount {
        image: ImageArgs { image, source },
        mountpoint,
        loop_args: m.loop_args,
        state: m.state,
        standalone: m.standalone,
        print_accepted: m.print_accepted,
        volume: m.volume,
        root: m.root,
    };
    mount(a)
}

/// `smr mount`'s arguments, resolved.
struct Mount {
    image: ImageArgs,
    mountpoint: PathBuf,
    loop_args: LoopArgs,
    state: StateArgs,
    standalone: bool,
    print_accepted: bool,
    volume: Option<String>,
    root: super::volume::RootArgs,
}

fn mount(a: Mount) -> Result<ExitCode> {
    let daemon = super::daemon::daemon_socket();
    let through_daemon = is_remote(&a.image.image) && a.volume.is_none() && !a.standalone;
    if through_daemon && super::daemon::daemon_runs(&daemon) {
        let mnt = absolute(&a.mountpoint)?;
        let req = serde_json::json!({ "image": a.image.image, "mountpoint": mnt });
        let body = super::daemon::control_request(&daemon, "POST", "/mounts", Some(&req))
            .with_context(|| format!("mounting {}", a.image.image))?;
        let b: serde_json::Value = serde_json::from_str(&body).context("the daemon's answer")?;
        errln!(
            "mounted {} on {} through the smr daemon ({})",
            b["image"].as_str().unwrap_or("?"),
            mnt.display(),
            daemon.display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    // Fail here, with a clear message, on a bad recipe, key, store, cache
    // or profile. The server replays the profile; it is looked up here,
    // alongside the artifact (no round trip more), so that the server
    // reads it from the node's blob cache and lists no referrers.
    let opened = a.image.open_full()?;
    if a.print_accepted {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        writeln!(out, "{}", smr_node::mount::ACCEPTED)
            .and_then(|()| out.flush())
            .context("printing that the image was accepted")?;
    }
    let lazy = opened.lazy;
    let exe = std::env::current_exe().context("locating the smr binary")?;
    // The server process opens the same image: local paths made absolute,
    // credentials passed in its environment (never on its command line).
    let image = if is_remote(&a.image.image) {
        a.image.image.clone()
    } else {
        absolute(Path::new(&a.image.image))?.display().to_string()
    };
    let store = absolute_store(a.image.source.origin.store.as_deref())?;
    let cache_dir = absolute(&a.image.source.cache.cache_dir)?;
    let cache_memory = a.image.source.cache.cache_memory;
    let key = a
        .image
        .source
        .origin
        .key
        .key_file
        .as_deref()
        .map(absolute)
        .transpose()?;
    let profile = a
        .image
        .source
        .profile
        .as_deref()
        .map(absolute)
        .transpose()?;
    let creds = a.image.source.origin.registry.creds_string()?;
    // A volume may be larger than its base.
    let image_size = match &a.volume {
        Some(v) => super::volume::VolumeMeta::read(&a.root.volume_dir(v)?)?.size,
        None => lazy.size(),
    };
    let req = MountRequest {
        state_root: a.state.state_dir.clone(),
        mountpoint: a.mountpoint.clone(),
        image_size,
        loop_opts: LoopOptions {
            writable: a.volume.is_some(),
            ..a.loop_args.options()
        },
        // The server marks whether it serves a startup pack.
        startup_opts: a.volume.is_none().then(|| a.loop_args.pack_options()),
        // The daemon starts the image's program from it (smr_daemon's
        // warming) without asking the registry again.
        config: a.volume.is_none().then(|| opened.recipe.config.clone()),
    };
    let root = absolute(&a.root.root)?;
    let label = match &a.volume {
        Some(v) => format!("volume {v} (read-write)"),
        None => a.image.image.clone(),
    };
    drop(lazy);
    let st = smr_node::mount::mount_with_server(&req, |fuse_dir, out, err| {
        let mut c = Command::new("setsid");
        c.arg(&exe).arg("__serve-fuse").arg(&image);
        if let Some(s) = &store {
            c.arg("--store").arg(s);
        }
        // The server serves the artifact checked here, even if another
        // is pushed meanwhile.
        if let Some(d) = &opened.artifact {
            c.arg("--artifact").arg(d);
        }
        if let Some(creds) = &creds {
            c.env(crate::remote::CREDS_ENV, creds);
        }
        c.arg("--platform").arg(&a.image.source.origin.platform);
        c.arg("--cache-dir")
            .arg(&cache_dir)
            .arg("--dir")
            .arg(fuse_dir);
        if let Some(m) = cache_memory {
            c.arg("--cache-memory").arg(m.to_string());
        }
        if let Some(k) = &key {
            c.arg("--key-file").arg(k);
        }
        // The profile this lookup listed: the server need not list the
        // referrers again.
        match (&profile, &opened.profile_listing) {
            (Some(p), _) => {
                c.arg("--profile").arg(p);
            }
            _ if a.image.source.no_profile => {
                c.arg("--no-profile");
            }
            (None, ProfileListing::NoProfile) if opened.artifact.is_some() => {
                c.arg("--no-profile");
            }
            (None, ProfileListing::Manifest(d)) if opened.artifact.is_some() => {
                c.arg("--profile-manifest").arg(d);
            }
            (None, _) => {}
        }
        if a.image.source.no_prefetch {
            c.arg("--no-prefetch");
        }
        if let Some(v) = &a.volume {
            c.arg("--volume").arg(v).arg("--root").arg(&root);
        }
        if std::env::var_os("SMR_LOG").is_none() {
            c.env("SMR_LOG", "info");
        }
        c.stdin(Stdio::null()).stdout(out).stderr(err).spawn()
    })
    .with_context(|| format!("mounting {label}"))?;
    errln!(
        "mounted {label} on {} ({}, read_ahead_kb {}, server pid {}, log {})",
        st.mountpoint.display(),
        st.loop_dev,
        st.readahead_kb,
        st.server_pid,
        st.log.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// Undoes `smr mount` (its own mount, or a bind made by the daemon).
pub fn run_umount(a: UmountArgs) -> Result<ExitCode> {
    let daemon = super::daemon::daemon_socket();
    let st = match smr_node::mount::unmount(&a.state.state_dir, &a.mountpoint) {
        Err(smr_node::mount::MountError::NotMounted(..)) if super::daemon::daemon_runs(&daemon) => {
            let mnt = absolute(&a.mountpoint)?;
            let req = serde_json::json!({ "mountpoint": mnt });
            super::daemon::control_request(&daemon, "DELETE", "/mounts", Some(&req))
                .with_context(|| format!("unmounting {}", a.mountpoint.display()))?;
            errln!("unmounted {} (through the smr daemon)", mnt.display());
            return Ok(ExitCode::SUCCESS);
        }
        r => r.with_context(|| format!("unmounting {}", a.mountpoint.display()))?,
    };
    errln!(
        "unmounted {} (detached {})",
        st.mountpoint.display(),
        st.loop_dev
    );
    Ok(ExitCode::SUCCESS)
}
