//! `smr serve-nbd` (one or more images from one process) and the hidden
//! `smr __serve-fuse`.

use super::image::{ImageArgs, SourceArgs};
use crate::remote::is_remote;
use anyhow::{Context, Result};
use smr_node::nbd::{Export, NbdServer, ServerConfig};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

/// Arguments of `smr serve-nbd`.
#[derive(clap::Args)]
pub struct NbdArgs {
    /// The images to serve, one export each, through one node cache and
    /// one memory tier: recipe files (chunks in `--store`) or
    /// `docker://HOST[:PORT]/NAME[:TAG|@DIGEST]` (from the smr artifact).
    #[arg(required_unless_present = "volumes", value_name = "IMAGE")]
    images: Vec<String>,
    /// Also serve these writable volumes (`smr volume create`), one export
    /// each, named after the volume: WRITE, FLUSH, FUA, TRIM and
    /// WRITE_ZEROES, each FLUSH making every completed write durable.
    #[arg(long = "volume", value_name = "NAME")]
    volumes: Vec<String>,
    #[command(flatten)]
    root: super::volume::RootArgs,
    #[command(flatten)]
    source: SourceArgs,
    /// TCP address to listen on.
    #[arg(long, default_value = "127.0.0.1:10809", conflicts_with = "socket")]
    listen: String,
    /// UNIX socket to listen on instead of TCP.
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Export name, once per image in the same order (default: a recipe's
    /// file name without `.recipe`, a registry image's repository name
    /// without its registry, path, tag or digest). The first export is
    /// also the default one (empty name).
    #[arg(long = "name", value_name = "NAME")]
    names: Vec<String>,
    /// Clients served at once. Over a limit, a new client takes the slot of
    /// the connection idle longest (at least 10 s), else it is refused.
    #[arg(long, default_value_t = 1024)]
    max_connections: usize,
    /// Clients from one IP address served at once (TCP).
    #[arg(long, default_value_t = 64)]
    max_connections_per_address: usize,
    /// Close a connection idle this long (e.g. `10m`), even when no other
    /// client waits. Off by default: a kernel or nbdfuse client stays
    /// connected, idle, while its device is in use.
    #[arg(long, value_parser = humantime::parse_duration)]
    idle_timeout: Option<std::time::Duration>,
    /// Serve registry images from this process even when an smr daemon
    /// runs (by default the daemon mounts each image once for the node, and
    /// this server reads the image file it exports, sharing its cache).
    #[arg(long)]
    standalone: bool,
}

/// The export name of `image` when none is given: a recipe's file name
/// without a `.recipe` suffix; for `docker://HOST/PATH/NAME:TAG`, `NAME`.
fn default_export_name(image: &str) -> String {
    if is_remote(image) {
        let last = image.rsplit('/').next().unwrap_or(image);
        let last = last.split('@').next().unwrap_or(last);
        return last.split(':').next().unwrap_or(last).to_string();
    }
    let file = Path::new(image)
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    match file.strip_suffix(".recipe") {
        Some(stem) if !stem.is_empty() => stem.to_string(),
        _ => file,
    }
}

/// Export names for `images`: `names` if given (one per image), else the
/// defaults; every name must be distinct.
fn export_names(images: &[String], names: &[String]) -> Result<Vec<String>> {
    let out: Vec<String> = if names.is_empty() {
        images.iter().map(|r| default_export_name(r)).collect()
    } else {
        anyhow::ensure!(
            names.len() == images.len(),
            "give one --name per image, in order ({} images, {} names)",
            images.len(),
            names.len()
        );
        names.to_vec()
    };
    let mut seen = std::collections::HashSet::new();
    for (name, image) in out.iter().zip(images) {
        anyhow::ensure!(
            seen.insert(name.as_str()),
            "two exports would be named {name:?} (the second is {image}): name them with --name"
        );
    }
    Ok(out)
}

/// Serves the images over NBD until SIGINT or SIGTERM. Each image's
/// startup profile (`--profile`, for one image; else the registry's) is
/// replayed from the start, so its chunks are at hand when a client reads.
pub fn run_nbd(mut a: NbdArgs) -> Result<ExitCode> {
    smr_node::malloc::limit_arenas(smr_node::malloc::SERVER_ARENAS);
    anyhow::ensure!(
        a.source.profile.is_none() || a.images.len() == 1,
        "--profile is for one image ({} given): a registry image's own profile is found without it",
        a.images.len()
    );
    let mut names = export_names(&a.images, &a.names)?;
    // This process reads the images' packs: begin with their lookups.
    a.source.origin.read_pack_ahead = true;
    let cache = a.source.cache.open()?;
    let mut exports = Vec::with_capacity(a.images.len() + a.volumes.len());
    let mut replays = Vec::new();
    let daemon = super::daemon::daemon_socket();
    let use_daemon = !a.standalone
        && a.source.profile.is_none()
        && a.images.iter().any(|i| crate::remote::is_remote(i))
        && super::daemon::daemon_runs(&daemon);
    // Held until the server stops: the daemon keeps these images mounted.
    let mut binds = Vec::new();
    for (image, name) in a.images.iter().zip(&names) {
        if use_daemon && crate::remote::is_remote(image) {
            let bind = super::daemon::DaemonBind::new(daemon.clone(), image)?;
            let file = bind
                .file
                .clone()
                .with_context(|| format!("the smr daemon did not say where {image} is exported"))?;
            let dev = smr_node::device::FileDevice::open(&file).with_context(|| {
                format!(
                    "opening {} (the daemon's export of {image})",
                    file.display()
                )
            })?;
            let about = format!("smr {image} (through the smr daemon)");
            exports.push(Export::new(name.clone(), Arc::new(dev)).with_description(about));
            errln!(
                "serving {image} as {name:?} through the smr daemon ({})",
                daemon.display()
            );
            binds.push(bind);
            continue;
        }
        let opened = a.source.open(image, !a.source.no_profile, cache.clone())?;
        replays.extend(opened.start_prefetch());
        let lazy = Arc::new(opened.lazy);
        exports.push(Export::new(name.clone(), lazy).with_description(format!("smr {image}")));
    }
    // Held open (and locked) until the server stops.
    let mut volumes = Vec::with_capacity(a.volumes.len());
    for name in &a.volumes {
        anyhow::ensure!(
            !names.contains(name),
            "an image export is already named {name:?}: name it with --name"
        );
        let v = super::volume::open(&a.root, name, &a.source)?;
        let dev: Arc<dyn smr_node::nbd::BlockDevice> = v.volume.clone();
        let about = format!("smr volume {name} on {}", v.meta.image);
        exports.push(Export::new(name.clone(), dev).with_description(about));
        names.push(name.clone());
        volumes.push(v);
    }
    let config = ServerConfig {
        max_connections: a.max_connections,
        max_connections_per_address: a.max_connections_per_address,
        idle_timeout: a.idle_timeout,
        ..ServerConfig::default()
    };
    let server = NbdServer::with_config(exports, config)?;
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])?;
    let (running, uris): (_, Vec<String>) = match &a.socket {
        Some(path) => {
            let l = smr_node::dirs::listen_unix(path, 0o600)
                .with_context(|| format!("binding {}", path.display()))?;
            let uris = names
                .iter()
                .map(|n| format!("nbd+unix:///{n}?socket={}", path.display()))
                .collect();
            (server.spawn_unix(l)?, uris)
        }
        None => {
            let l = std::net::TcpListener::bind(&a.listen)
                .with_context(|| format!("binding {}", a.listen))?;
            let addr = l.local_addr()?;
            if !addr.ip().is_loopback() {
                tracing::warn!(
                    "serving on {addr}: NBD has no authentication or encryption here, so anyone \
                     who can reach this address reads the exported images decrypted"
                );
            }
            let uris = names.iter().map(|n| format!("nbd://{addr}/{n}")).collect();
            (server.spawn_tcp(l)?, uris)
        }
    };
    let what = a
        .images
        .iter()
        .cloned()
        .chain(a.volumes.iter().map(|v| format!("volume {v}")));
    for ((name, image), uri) in names.iter().zip(what).zip(&uris) {
        errln!("serving export {name:?} ({image}) on {uri}");
    }
    let sig = signals.forever().next();
    errln!("signal {sig:?}: stopping");
    for r in &replays {
        tracing::info!(stats = ?r.stats(), "startup profile replay");
    }
    drop(replays);
    running.stop()?;
    for v in &volumes {
        smr_node::nbd::BlockDevice::flush(v.volume.as_ref())
            .with_context(|| format!("flushing volume {}", v.meta.name))?;
    }
    if let Some(path) = &a.socket {
        let _ = std::fs::remove_file(path);
    }
    Ok(ExitCode::SUCCESS)
}

/// Arguments of the hidden `smr __serve-fuse` (started by `smr mount`).
#[derive(clap::Args)]
pub struct FuseArgs {
    #[command(flatten)]
    image: ImageArgs,
    /// Directory to mount the FUSE export on.
    #[arg(long)]
    dir: PathBuf,
    /// Serve this writable volume (over its base, `image`) instead.
    #[arg(long)]
    volume: Option<String>,
    #[command(flatten)]
    root: super::volume::RootArgs,
}

/// The FUSE server's counters, next to its mount state (read by the node
/// daemon's `/metrics`).
pub const STATS_FILE: &str = "stats.json";

/// Rewrites `path` every second with the image's read and fetch counters
/// (atomically: a reader sees the old or the new file, never half of one).
fn publish_stats(lazy: smr_node::lazy::LazyImage, image: String, path: PathBuf) {
    std::thread::spawn(move || {
        let tmp = path.with_extension("json.tmp");
        loop {
            let v = serde_json::json!({
                "image": image,
                "lazy": lazy.stats(),
                "fetch": lazy.fetcher().stats(),
                "latency_bounds_ms": smr_node::fetch::LATENCY_BOUNDS_MS,
            });
            let ok =
                std::fs::write(&tmp, v.to_string()).and_then(|()| std::fs::rename(&tmp, &path));
            if let Err(e) = ok {
                tracing::debug!(error = %e, path = %path.display(), "writing stats");
            }
            std::thread::sleep(std::time::Duration::from_secs(1));
        }
    });
}

/// Says that this server serves a startup pack (`smr mount` then attaches
/// the loop device with the startup settings and the readahead the pack's
/// profile was recorded with, smr_node::mount), and
/// watches for the start's end to put the device back to the settings
/// `smr mount` asked for.
fn mark_startup_pack(
    lazy: &smr_node::lazy::LazyImage,
    readahead_kb: u32,
    state: &std::path::Path,
    fuse_dir: &std::path::Path,
) -> Result<smr_node::mount::RetuneWatch> {
    smr_node::mount::write_startup_mark(state, readahead_kb).with_context(|| {
        format!(
            "writing {}",
            state.join(smr_node::mount::STARTUP_PACK_MARK).display()
        )
    })?;
    let file = fuse_dir.join(smr_node::fuse::FuseConfig::default().file_name);
    let state_file = state.join(smr_node::mount::STATE_FILE);
    let pack = lazy.startup_pack_bytes();
    // The mount's state names the loop device once it is attached.
    let mounted = move || {
        let json = std::fs::read(&state_file).ok()?;
        serde_json::from_slice::<smr_node::mount::MountState>(&json).ok()
    };
    let loop_dev = mounted.clone();
    // The device's read counter when first seen (just after mounting).
    let since = std::sync::OnceLock::new();
    let under_way = move || {
        let dev = loop_dev()?.loop_dev;
        let since = *since.get_or_init(|| smr_node::mount::device_read_bytes(&dev).unwrap_or(0));
        smr_node::mount::pack_start_under_way(&dev, since, pack)
    };
    smr_node::mount::retune_after_start(
        under_way,
        file,
        move || mounted().and_then(|st| Some((st.loop_dev, st.after_start?))),
        smr_node::mount::StartEnd::default(),
    )
    .context("starting the startup pack's retune watch")
}

/// Serves the image's FUSE export until unmounted or signalled.
pub fn run_fuse(a: FuseArgs) -> Result<ExitCode> {
    smr_node::malloc::limit_arenas(smr_node::malloc::SERVER_ARENAS);
    // One of these runs per mounted image, for as long as it is mounted.
    smr_node::malloc::bound_heap();
    if let Some(name) = &a.volume {
        let v = super::volume::open(&a.root, name, &a.image.source)?;
        let dev: Arc<dyn smr_node::nbd::BlockDevice> = v.volume.clone();
        tracing::info!(dir = %a.dir.display(), pid = std::process::id(), volume = %name, "serving a volume's FUSE export");
        smr_node::mount::serve_fuse_process(dev, &a.dir, &format!("smr:volume:{name}"))?;
        smr_node::nbd::BlockDevice::flush(v.volume.as_ref())
            .with_context(|| format!("flushing volume {name}"))?;
        tracing::info!("FUSE export unmounted, volume flushed; exiting");
        return Ok(ExitCode::SUCCESS);
    }
    let opened = a.image.open_full()?;
    let replay = opened.start_prefetch();
    let name = format!("smr:{}", a.image.image);
    tracing::info!(dir = %a.dir.display(), pid = std::process::id(), profile = replay.is_some(), "serving FUSE export");
    let mut _retune = None;
    if let Some(state) = a.dir.parent() {
        if let (true, Some(p)) = (opened.startup_pack, &opened.profile) {
            _retune = Some(mark_startup_pack(
                &opened.lazy,
                p.readahead_kb(),
                state,
                &a.dir,
            )?);
        }
        publish_stats(
            opened.lazy.clone(),
            a.image.image.clone(),
            state.join(STATS_FILE),
        );
    }
    smr_node::mount::serve_fuse_process(Arc::new(opened.lazy), &a.dir, &name)?;
    if let Some(r) = replay {
        tracing::info!(stats = ?r.stats(), "startup profile replay");
    }
    tracing::info!("FUSE export unmounted; exiting");
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_names_default_to_recipe_file_names_and_must_differ() {
        let r = |s: &str| s.to_string();
        let recipes = [
            r("/x/debian.recipe"),
            r("py.recipe"),
            r("plain"),
            r(".recipe"),
        ];
        assert_eq!(
            export_names(&recipes, &[]).expect("names"),
            ["debian", "py", "plain", ".recipe"]
        );
        let named = ["a".to_string(), "b".to_string()];
        assert_eq!(
            export_names(&recipes[..2], &named).expect("names"),
            ["a", "b"]
        );
        let err = export_names(&recipes, &named).expect_err("count");
        assert!(err.to_string().contains("one --name per image"), "{err}");
        let err = export_names(&[r("a/py.recipe"), r("b/py.recipe")], &[]).expect_err("dup");
        assert!(err.to_string().contains("\"py\""), "{err}");
        let images = [
            r("docker://127.0.0.1:5000/py:v1"),
            r("docker://reg.example/team/base@sha256:0123"),
            r("docker://reg.example:443/deb"),
        ];
        assert_eq!(
            export_names(&images, &[]).expect("names"),
            ["py", "base", "deb"]
        );
    }
}
