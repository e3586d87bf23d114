//! `smr run`: a container on a lazily served image.
//!
//! All in this process, set up in order and undone in reverse on every
//! path (success, failure, Ctrl-C / SIGTERM / SIGHUP):
//!
//! 1. the [`LazyImage`] exported by in-process FUSE threads
//!    ([`FuseMount`]), so the image's counters are at hand for the stats;
//! 2. a read-only loop device and ext4 mount of it ([`ImageMount`]; the
//!    kernel frees the device when the mount goes);
//! 3. an overlayfs with a writable upper and work directory in a temp
//!    directory under [`RunRequest::work_root`] (on tmpfs under `/run` by
//!    default: the container's writes are dropped at exit);
//! 4. the container's network ([`net`]: a namespace of its own by
//!    default, with `slirp4netns` for outbound traffic when installed),
//!    and an OCI bundle whose `config.json` comes from the image config in
//!    the recipe ([`spec`]), with the default seccomp filter ([`seccomp`]);
//! 5. `runc run`, in the foreground, its exit status passed through
//!    (`128 + n` for a container killed by signal n), with a state root of
//!    the run's own (`run/runtime.rs`). Signals that reach smr are forwarded
//!    with `runc kill`.
//!
//! `start_seconds` runs from the caller's start instant to the moment the
//! container's process has been started: runc writes its `--pid-file`
//! once it has let the process run, and the file's modification time is
//! read back. (A `poststart` hook would cost every start a fork and exec:
//! runc runs it before it lets the process go.) It does not include the
//! process's own work (e.g. python importing modules); `total_seconds`
//! does.
//!
//! The work root and the run directories are `0700`, and `config.json`
//! (which holds the `-e` variables) is `0600`: the image's ext4 mount and
//! the overlay under them are the container's root, where the image's
//! setuid files and device nodes work (as in any container runtime); no
//! other host user may reach them there. (The ext4 mount itself is
//! `nosuid,nodev` as well, see [`mount`]; the overlay is not, so that the
//! container sees its image as built.)
//!
//! Killing smr with SIGKILL leaves all that behind (the FUSE connection
//! then reads as aborted); the next `smr run` with the same work root
//! removes it ([`sweep`]: each run holds a lock on its directory while it
//! lives).

pub mod net;
mod runtime;
pub mod seccomp;
pub mod spec;
pub mod sweep;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use smr_format::Recipe;

use crate::fuse::{FuseConfig, FuseMount};
use crate::lazy::LazyImage;
use crate::mount::{self, ImageMount, LoopOptions, MountError};
use runtime::Runtime;

/// Where run directories go unless told otherwise.
pub const DEFAULT_WORK_ROOT: &str = "/run/smr/run";

/// Errors of `smr run`.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Neither the image nor the command line gives a command.
    #[error("no command: the image has no Entrypoint or Cmd; give one after `--`")]
    NoCommand,
    /// The image's or the requested user is not in the image.
    #[error("user {0:?} not found in the image's /etc/passwd or /etc/group")]
    UnknownUser(String),
    /// Mounting failed.
    #[error(transparent)]
    Mount(#[from] MountError),
    /// A file operation failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// runc could not be started.
    #[error("cannot run {runc}: {source}")]
    Runtime {
        /// The runtime binary.
        runc: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Interrupted by a signal before the container started.
    #[error("interrupted by signal {0} before the container started")]
    Interrupted(i32),
}

/// Result of this module.
pub type Result<T> = std::result::Result<T, RunError>;

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> RunError + '_ {
    move |source| RunError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Bytes of all stored (non-zero) chunks: what a full pull would fetch.
pub fn image_bytes(recipe: &Recipe) -> u64 {
    recipe
        .chunks
        .iter()
        .map(|c| recipe.chunk_len(c.index))
        .sum()
}

/// What the container's root filesystem comes from.
#[derive(Debug, Clone)]
pub enum RootFs {
    /// The lazy image, exported and mounted by this run, under an overlay
    /// whose upper takes the container's writes.
    Image(LazyImage),
    /// A writable volume over its lazy base `image` (crate::volume): the
    /// container's root is the volume's filesystem itself, mounted
    /// read-write (no overlay), and what the container writes stays.
    Volume {
        /// The volume.
        volume: Arc<crate::volume::Volume>,
        /// Its base.
        image: LazyImage,
    },
    /// An image already mounted read-only at this directory (by the node
    /// daemon, for every container of the image): the overlay's lower.
    /// Its fetches are counted by the daemon, not in the run's report.
    Mounted(PathBuf),
}

/// What to run.
#[derive(Debug, Clone)]
pub struct RunRequest {
    /// The root filesystem.
    pub root: RootFs,
    /// The image's recipe (config, chunk table).
    pub recipe: Recipe,
    /// Command, env and terminal overrides.
    pub overrides: spec::Overrides,
    /// Loop device settings.
    pub loop_opts: LoopOptions,
    /// The loop device's settings once the start is over, if `loop_opts`
    /// are a startup pack's ([`crate::mount::retune_after_start`]).
    pub after_start: Option<LoopOptions>,
    /// Parent of the temporary run directory.
    pub work_root: PathBuf,
    /// The OCI runtime binary.
    pub runc: String,
    /// The container's network.
    pub network: net::Network,
    /// The container's seccomp filter.
    pub seccomp: seccomp::Seccomp,
    /// When smr started (for `start_seconds`).
    pub started: (Instant, SystemTime),
    /// Kill the container (SIGKILL) once it has run this long.
    pub timeout: Option<Duration>,
}

/// What happened, for `--stats`.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    /// The container's exit code (`128 + n` when killed by signal n).
    pub exit_code: i32,
    /// Whether it was killed because it ran past the timeout.
    pub timed_out: bool,
    /// From smr's start until the container process was started.
    pub start_seconds: Option<f64>,
    /// From smr's start until the container exited.
    pub total_seconds: f64,
    /// Stored bytes fetched from the store by this run.
    pub bytes_fetched: u64,
    /// Chunks fetched from the store by this run.
    pub chunks_fetched: u64,
    /// Bytes of all non-zero chunks of the image.
    pub image_bytes: u64,
    /// `bytes_fetched / image_bytes`.
    pub fetched_fraction: f64,
    /// Bytes the kernel asked the image for through FUSE.
    pub bytes_read: u64,
    /// Bytes of the startup pack stored in the page cache of the FUSE
    /// file ahead of the reads (the kernel reads those without asking).
    pub bytes_seeded: u64,
    /// Bytes the kernel read from the image's loop device after mounting
    /// it, however they were served (through FUSE or from the page cache
    /// of the FUSE file); `None` without one.
    pub device_bytes_read: Option<u64>,
    /// Stored bytes fetched ahead of the reads (file-map prefetch, profile
    /// replay); part of `bytes_fetched`.
    pub bytes_prefetched: u64,
    /// Of those, bytes of chunks no read asked for.
    pub prefetched_unread_bytes: u64,
    /// Most store requests (or, replaying a profile, chunk fetches) in
    /// flight at once in this process.
    pub max_inflight: u64,
    /// The fetcher's counters: store requests, bytes, coalescing.
    pub fetch: crate::fetch::FetchStats,
    /// The startup profile's replay, if one ran (filled in by the caller
    /// that started it).
    pub profile: Option<crate::lazy::profile::ReplayStats>,
}

/// Waits at most `limit` for `child` to exit: its status, or `None` if it
/// still runs.
pub fn wait_at_most(
    child: &mut std::process::Child,
    limit: Duration,
) -> std::io::Result<Option<std::process::ExitStatus>> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits for `runc run`; past `timeout`, kills the container `id` with
/// SIGKILL (which even a PID 1 without handlers cannot ignore) and waits
/// for it to go. Returns the status and whether the timeout struck.
fn wait_with_timeout(
    child: &mut std::process::Child,
    timeout: Option<Duration>,
    runtime: &Runtime,
    id: &str,
) -> std::io::Result<(std::process::ExitStatus, bool)> {
    let Some(timeout) = timeout else {
        return Ok((child.wait()?, false));
    };
    if let Some(status) = wait_at_most(child, timeout)? {
        return Ok((status, false));
    }
    tracing::info!(
        container = id,
        ?timeout,
        "container ran past its timeout: killing it"
    );
    runtime.kill(id, "KILL");
    Ok((child.wait()?, true))
}

/// Which container is running, for the signal forwarder.
#[derive(Default)]
struct Live {
    container: Mutex<Option<(Runtime, String)>>,
    signal: std::sync::atomic::AtomicI32,
    stop: AtomicBool,
}

/// Forwards SIGINT, SIGTERM and SIGHUP to the container once it runs, and
/// records them before that (setup then stops at the next step).
fn forward_signals(live: Arc<Live>) -> Result<signal_hook::iterator::Handle> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])
        .map_err(|source| io_err(Path::new("signal handlers"))(source))?;
    let handle = signals.handle();
    std::thread::spawn(move || {
        for sig in signals.forever() {
            if live.stop.load(Ordering::SeqCst) {
                break;
            }
            live.signal.store(sig, Ordering::SeqCst);
            let c = live
                .container
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone();
            if let Some((runtime, id)) = c {
                runtime.kill(&id, &sig.to_string());
            }
        }
    });
    Ok(handle)
}

fn check(live: &Live) -> Result<()> {
    match live.signal.load(Ordering::SeqCst) {
        0 => Ok(()),
        sig => Err(RunError::Interrupted(sig)),
    }
}

/// The container's network namespace for `network` (see [`net`]).
fn make_network(network: net::Network) -> Result<Option<Option<net::PrivateNet>>> {
    Ok(match network {
        net::Network::Host => None,
        net::Network::None => Some(None),
        net::Network::Default => match net::find_slirp4netns() {
            Some(slirp) => Some(Some(net::private(&slirp).map_err(io_err(&slirp))?)),
            None => {
                tracing::info!("slirp4netns is not installed: the container has a network namespace with loopback only");
                Some(None)
            }
        },
    })
}

/// The overlay mount, unmounted on drop.
struct Overlay(PathBuf);

impl Drop for Overlay {
    fn drop(&mut self) {
        if let Err(e) = mount::umount(&self.0, true) {
            tracing::warn!(error = %e, "overlay not unmounted");
        }
    }
}

/// The container, deleted on drop (unless the runtime has already: see
/// [`runtime`]).
struct Container {
    runtime: Runtime,
    id: String,
}

impl Drop for Container {
    fn drop(&mut self) {
        self.runtime.delete(&self.id);
    }
}

/// Writes `data` to a new file readable by its owner only (`0600`).
fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?
        .write_all(data)
}

/// Runs the container; see the module docs. Everything set up is undone
/// before this returns.
pub fn run(req: RunRequest) -> Result<RunReport> {
    let live = Arc::new(Live::default());
    let handle = forward_signals(live.clone())?;
    let result = run_inner(&req, &live);
    live.stop.store(true, Ordering::SeqCst);
    handle.close();
    result
}

fn run_inner(req: &RunRequest, live: &Live) -> Result<RunReport> {
    crate::dirs::private_dir(&req.work_root).map_err(io_err(&req.work_root))?;
    sweep::sweep(&req.work_root, &req.runc);
    // Locked while this run lives: a later run's sweep knows we are alive.
    let tmp = sweep::RunDir::create(&req.work_root).map_err(io_err(&req.work_root))?;
    let dir = |n: &str| -> Result<PathBuf> {
        let p = tmp.path().join(n);
        std::fs::create_dir_all(&p).map_err(io_err(&p))?;
        Ok(p)
    };
    let (fuse_dir, lower, upper, work, rootfs, bundle) = (
        dir("fuse")?,
        dir("lower")?,
        dir("upper")?,
        dir("work")?,
        dir("rootfs")?,
        dir("bundle")?,
    );
    let id = sweep::container_id(tmp.path());
    // The container's network is made while the image is mounted: it
    // depends on nothing else (`None`: the host's; `Some(None)`: loopback
    // only). Joined below; dropped, it is undone.
    let network = req.network;
    let netns = std::thread::Builder::new()
        .name("smr-net".into())
        .spawn(move || make_network(network))
        .map_err(io_err(&req.work_root))?;

    // Bound in setup order: dropped (undone) in reverse.
    let mut retune = None;
    // The image's loop device's read counter once mounted.
    let mut device_read = 0;
    let (fuse, image, overlay) = match &req.root {
        RootFs::Mounted(dir) => {
            mount::mount_overlay(dir, &upper, &work, &rootfs)?;
            (None, None, Some(Overlay(rootfs.clone())))
        }
        RootFs::Volume { volume, .. } => {
            let dev = volume.clone() as Arc<dyn crate::nbd::BlockDevice>;
            let fuse = FuseMount::spawn(dev, &fuse_dir, &FuseConfig::default(), &id)
                .map_err(MountError::from)?;
            check(live)?;
            let opts = LoopOptions {
                writable: true,
                ..req.loop_opts
            };
            let image = ImageMount::attach(fuse.file(), &rootfs, opts)?;
            (Some(fuse), Some(image), None)
        }
        RootFs::Image(lazy) => {
            let dev = Arc::new(lazy.clone()) as Arc<dyn crate::nbd::BlockDevice>;
            let fuse = FuseMount::spawn(dev, &fuse_dir, &FuseConfig::default(), &id)
                .map_err(MountError::from)?;
            check(live)?;
            let image = ImageMount::attach(fuse.file(), &lower, req.loop_opts)?;
            device_read = mount::device_read_bytes(image.loop_dev()).unwrap_or(0);
            if let Some(opts) = req.after_start {
                let (pack, dev) = (lazy.startup_pack_bytes(), image.loop_dev().to_string());
                let (read, since) = (dev.clone(), device_read);
                let watch = mount::retune_after_start(
                    move || mount::pack_start_under_way(&read, since, pack),
                    fuse.file().to_path_buf(),
                    move || Some((dev.clone(), opts)),
                    mount::StartEnd::default(),
                );
                retune = Some(watch.map_err(io_err(fuse.file()))?);
            }
            check(live)?;
            mount::mount_overlay(&lower, &upper, &work, &rootfs)?;
            (Some(fuse), Some(image), Some(Overlay(rootfs.clone())))
        }
    };
    check(live)?;

    let cfg = &req.recipe.config;
    let user = spec::resolve_user_in(&cfg.user, &rootfs)?;
    let args = spec::process_args(cfg, &req.overrides.command)?;
    let env = spec::environment(cfg, &user, &req.overrides.env, |k| std::env::var(k).ok());
    let marker = tmp.path().join("started");
    let mut netns = netns
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))?;
    let resolv_conf = match &netns {
        Some(Some(_)) => {
            let p = bundle.join("resolv.conf");
            // slirp4netns's DNS forwarder.
            std::fs::write(&p, "nameserver 10.0.2.3\n").map_err(io_err(&p))?;
            p
        }
        _ => PathBuf::from("/etc/resolv.conf"),
    };
    let config = spec::build(&spec::SpecInput {
        image: cfg,
        user: &user,
        args,
        env,
        terminal: req.overrides.terminal,
        rootfs: &rootfs,
        hostname: "smr",
        network: match &netns {
            None => spec::NetNs::Host,
            Some(None) => spec::NetNs::New,
            Some(Some(n)) => spec::NetNs::Path(n.path()),
        },
        resolv_conf: &resolv_conf,
        seccomp: req.seccomp.spec(),
    });
    let config_path = bundle.join("config.json");
    let json = serde_json::to_vec_pretty(&config).map_err(|e| io_err(&config_path)(e.into()))?;
    write_private(&config_path, &json).map_err(io_err(&config_path))?;
    check(live)?;

    let runtime = Runtime::in_run_dir(&req.runc, tmp.path());
    let container = Container {
        runtime: runtime.clone(),
        id: id.clone(),
    };
    *live
        .container
        .lock()
        .unwrap_or_else(PoisonError::into_inner) = Some((runtime.clone(), id.clone()));
    let runtime_err = |source| RunError::Runtime {
        runc: req.runc.clone(),
        source,
    };
    let mut child = runtime
        .command()
        .arg("run")
        .arg("--bundle")
        .arg(&bundle)
        .arg("--pid-file")
        .arg(&marker)
        .arg(&id)
        .spawn()
        .map_err(runtime_err)?;
    let (status, timed_out) =
        wait_with_timeout(&mut child, req.timeout, &runtime, &id).map_err(runtime_err)?;
    *live
        .container
        .lock()
        .unwrap_or_else(PoisonError::into_inner) = None;
    let total_seconds = req.started.0.elapsed().as_secs_f64();
    let exit_code = status.code().unwrap_or_else(|| {
        128 + std::os::unix::process::ExitStatusExt::signal(&status).unwrap_or(0)
    });
    let start_seconds = std::fs::metadata(&marker)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(req.started.1).ok())
        .map(|d| d.as_secs_f64());

    let image_bytes = image_bytes(&req.recipe);
    let lazy = match &req.root {
        RootFs::Image(image) | RootFs::Volume { image, .. } => Some(image),
        RootFs::Mounted(_) => None,
    };
    let stats = lazy.map(|i| i.stats()).unwrap_or_default();
    let cache = lazy.and_then(|i| i.cache().stats().ok());
    let fetch = lazy.map(|i| i.fetcher().stats()).unwrap_or_default();
    let report = RunReport {
        exit_code,
        timed_out,
        start_seconds,
        total_seconds,
        bytes_fetched: stats.bytes_fetched,
        chunks_fetched: stats.chunks_fetched,
        image_bytes,
        fetched_fraction: if image_bytes == 0 {
            0.0
        } else {
            stats.bytes_fetched as f64 / image_bytes as f64
        },
        bytes_read: stats.bytes_read,
        bytes_seeded: stats.bytes_seeded,
        device_bytes_read: image
            .as_ref()
            .and_then(|i| mount::device_read_bytes(i.loop_dev()))
            .map(|n| n.saturating_sub(device_read)),
        bytes_prefetched: stats.bytes_prefetched,
        prefetched_unread_bytes: stats.prefetched_unread_bytes,
        max_inflight: cache.map_or(0, |c| c.max_inflight).max(fetch.max_in_flight),
        fetch,
        profile: None,
    };

    // Tear down in reverse, reporting the first failure. slirp4netns
    // exits while the mounts are undone; the namespace is dropped (and
    // slirp4netns waited for) once they are.
    if let Some(Some(n)) = &mut netns {
        n.stop();
    }
    drop(retune);
    drop(container);
    drop(overlay);
    if let Some(image) = image {
        image.teardown()?;
    }
    if let Some(fuse) = fuse {
        fuse.unmount(Duration::from_secs(10))
            .map_err(MountError::from)?;
    }
    drop(netns);
    if let RootFs::Volume { volume, .. } = &req.root {
        crate::device::BlockDevice::flush(volume.as_ref()).map_err(io_err(volume.dir()))?;
    }
    tmp.close().map_err(io_err(&req.work_root))?;
    Ok(report)
}
