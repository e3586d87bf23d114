//! `smr daemon` (the node daemon: containerd's remote snapshotter) and
//! `smr pull --containerd` (a lazy pull through containerd).

use crate::remote::RegistryArgs;
use anyhow::{Context, Result};
use smr_daemon::pull::{PullOptions, Pulled};
use smr_daemon::{DaemonConfig, MountConfig};
use std::path::PathBuf;
use std::process::ExitCode;

/// Arguments of `smr daemon`.
#[derive(clap::Args)]
pub struct DaemonArgs {
    /// Snapshots, their metadata and the image mounts.
    #[arg(long, default_value = smr_daemon::DEFAULT_ROOT)]
    root: PathBuf,
    /// The socket containerd's proxy snapshotter plugin connects to.
    #[arg(long, default_value = smr_daemon::DEFAULT_SNAPSHOTTER_SOCKET)]
    snapshotter_socket: PathBuf,
    /// The control API (`/status`, `/metrics`; HTTP over a UNIX socket).
    #[arg(long, default_value = smr_daemon::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Memory tier of each image server (one per mounted image; the page
    /// cache above the loop device holds what is read again).
    #[arg(long, default_value = "4M", value_parser = super::cache::parse_size)]
    image_cache_memory: u64,
    /// Unmount an image no container has used for this long; it is mounted
    /// again when a container needs it (`0s`: never).
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    release_after: std::time::Duration,
    /// Also serve `/metrics` on this TCP address (e.g. 127.0.0.1:9100).
    #[arg(long, value_name = "ADDR")]
    metrics: Option<std::net::SocketAddr>,
    /// The node's chunk cache, shared by every image.
    #[arg(long, env = "SMR_CACHE_DIR", default_value = smr_node::cache::DEFAULT_DIR)]
    cache_dir: PathBuf,
    /// The owner key: only artifacts sealed under it are served lazily
    /// (others fall back to containerd's own unpacking).
    #[arg(long, env = "SMR_KEY_FILE")]
    key_file: Option<PathBuf>,
    /// Also serve a CRI image service on this socket, in front of
    /// containerd's (`--containerd`): point kubelet's
    /// `--image-service-endpoint` here, and the registry credentials of its
    /// pulls (image pull secrets) are used for the images' lazy mounts too.
    #[arg(long, value_name = "SOCKET")]
    cri_image_socket: Option<PathBuf>,
    /// containerd's socket, for `--cri-image-socket`.
    #[arg(
        long,
        value_name = "SOCKET",
        default_value = "/run/containerd/containerd.sock"
    )]
    containerd: PathBuf,
}

/// Runs the daemon until SIGTERM or SIGINT.
pub fn run(a: DaemonArgs) -> Result<ExitCode> {
    let abs = |p: &PathBuf| super::mount::absolute(p);
    let cfg = DaemonConfig {
        root: abs(&a.root)?,
        snapshotter_socket: abs(&a.snapshotter_socket)?,
        socket: abs(&a.socket)?,
        metrics_addr: a.metrics,
        release_after: (!a.release_after.is_zero()).then_some(a.release_after),
        cri_proxy: match &a.cri_image_socket {
            Some(socket) => Some(smr_daemon::cri::CriProxyConfig {
                socket: abs(socket)?,
                containerd: abs(&a.containerd)?,
            }),
            None => None,
        },
        mount: MountConfig {
            smr: std::env::current_exe().context("locating the smr binary")?,
            cache_dir: abs(&a.cache_dir)?,
            key_file: a.key_file.as_ref().map(abs).transpose()?,
            cache_memory: Some(a.image_cache_memory),
        },
    };
    let rt = tokio::runtime::Runtime::new().context("starting the runtime")?;
    rt.block_on(async {
        let shutdown = async {
            use tokio::signal::unix::{signal, SignalKind};
            match (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) {
                (Ok(mut t), Ok(mut i)) => {
                    tokio::select! { _ = t.recv() => {}, _ = i.recv() => {} }
                }
                _ => std::future::pending::<()>().await,
            }
            tracing::info!("shutting down");
        };
        smr_daemon::serve(cfg, shutdown).await
    })?;
    Ok(ExitCode::SUCCESS)
}

/// Arguments of `smr status`.
#[derive(clap::Args)]
pub struct StatusArgs {
    /// The daemon's control socket.
    #[arg(long, default_value = smr_daemon::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Print the daemon's JSON as it is.
    #[arg(long)]
    json: bool,
}

/// The node daemon's control socket: `SMR_DAEMON_SOCKET`, else the
/// default.
pub fn daemon_socket() -> PathBuf {
    std::env::var_os("SMR_DAEMON_SOCKET")
        .map_or_else(|| PathBuf::from(smr_daemon::DEFAULT_SOCKET), PathBuf::from)
}

/// Whether a daemon answers on `socket`.
pub fn daemon_runs(socket: &std::path::Path) -> bool {
    smr_daemon::client::daemon_runs(socket)
}

/// `METHOD path` (with a JSON `body`) on the control socket: the body of a
/// 2xx answer; any other answer is an error with the daemon's message.
/// Mounts wait for a registry, so the timeout is long.
pub fn control_request(
    socket: &std::path::Path,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
) -> Result<String> {
    let timeout = std::time::Duration::from_secs(300);
    Ok(smr_daemon::client::request(
        socket, method, path, body, timeout,
    )?)
}

/// Shows what the daemon serves.
pub fn run_status(a: StatusArgs) -> Result<ExitCode> {
    let body = control_request(&a.socket, "GET", "/status", None)?;
    if a.json {
        outln!("{body}");
        return Ok(ExitCode::SUCCESS);
    }
    let v: serde_json::Value =
        serde_json::from_str(&body).context("decoding the daemon's status")?;
    let n = |p: &str| v.pointer(p).and_then(|x| x.as_u64()).unwrap_or(0);
    outln!("root:      {}", v["root"].as_str().unwrap_or("?"));
    outln!("uptime:    {} s", n("/uptime_seconds"));
    outln!(
        "snapshots: {} active, {} view, {} committed, {} remote",
        n("/snapshots/active"),
        n("/snapshots/view"),
        n("/snapshots/committed"),
        n("/snapshots/remote")
    );
    let images = v["images"].as_array().cloned().unwrap_or_default();
    outln!("images:    {}", images.len());
    for i in images {
        outln!(
            "  {} ({} layers, {})",
            i["image"].as_str().unwrap_or("?"),
            i["layers"],
            if i["mounted"].as_bool() == Some(true) {
                "mounted"
            } else {
                "not mounted"
            }
        );
    }
    if v["cache"].is_object() {
        outln!(
            "cache:     {} chunks, {} bytes; {} fetches ({} bytes), {} disk hits, {} memory hits, {} misses, {} errors",
            n("/cache/entries"),
            n("/cache/total_bytes"),
            n("/cache/fetches"),
            n("/cache/fetched_bytes"),
            n("/cache/hits"),
            n("/cache/memory_hits"),
            n("/cache/misses"),
            n("/cache/fetch_errors")
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Arguments of `smr pull`.
#[derive(clap::Args)]
pub struct PullArgs {
    /// The image, `docker://host/name[:tag][@digest]`.
    image: String,
    /// containerd's socket: the image is pulled into it, its layers
    /// prepared by the smr snapshotter (served lazily when the image has an
    /// smr artifact the node trusts).
    #[arg(long, default_value = "/run/containerd/containerd.sock")]
    containerd: PathBuf,
    /// The containerd namespace (`k8s.io` is CRI's).
    #[arg(long, short = 'n', default_value = "default")]
    namespace: String,
    /// The name of smr's proxy snapshotter plugin in containerd's config.
    #[arg(long, default_value = "smr")]
    snapshotter: String,
    #[command(flatten)]
    registry: RegistryArgs,
}

/// Pulls an image into containerd.
pub fn run_pull(a: PullArgs) -> Result<ExitCode> {
    let opts = PullOptions {
        containerd: a.containerd.clone(),
        namespace: a.namespace.clone(),
        snapshotter: a.snapshotter.clone(),
        registry: a.registry.options()?,
        platform: Default::default(),
        daemon: Some(daemon_socket()),
    };
    let rt = tokio::runtime::Runtime::new().context("starting the runtime")?;
    let p: Pulled = rt
        .block_on(smr_daemon::pull::pull(&a.image, &opts))
        .with_context(|| format!("pulling {} into containerd", a.image))?;
    outln!(
        "{}: {} ({} layers lazy, {} unpacked, {} present)",
        p.name,
        p.manifest,
        p.remote,
        p.unpacked,
        p.present
    );
    Ok(ExitCode::SUCCESS)
}

/// An image bound by the node daemon for a command of this process
/// (`smr run`, `smr serve-nbd`): the daemon keeps it mounted; unbound on
/// drop.
pub struct DaemonBind {
    socket: PathBuf,
    dir: tempfile::TempDir,
    /// `docker://host/repo@manifest`: what the daemon mounted.
    pub image: String,
    /// The flattened image as a file the daemon exports, if it said.
    pub file: Option<PathBuf>,
}

impl DaemonBind {
    /// Asks the daemon on `socket` to mount `image` and bind it on a
    /// directory of this run.
    pub fn new(socket: PathBuf, image: &str) -> Result<DaemonBind> {
        let dir = tempfile::Builder::new()
            .prefix("smr-run-")
            .tempdir()
            .context("creating the image's mount point")?;
        let req = serde_json::json!({
            "image": image,
            "mountpoint": dir.path(),
            "owner": std::process::id(),
        });
        let body = control_request(&socket, "POST", "/mounts", Some(&req))
            .with_context(|| format!("mounting {image} through the smr daemon"))?;
        let b: serde_json::Value = serde_json::from_str(&body).context("the daemon's answer")?;
        let image = b["image"].as_str().unwrap_or(image).to_string();
        let file = b["file"].as_str().map(PathBuf::from);
        Ok(DaemonBind {
            socket,
            dir,
            image,
            file,
        })
    }

    /// Where the image is bound (read-only).
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }
}

impl Drop for DaemonBind {
    fn drop(&mut self) {
        let req = serde_json::json!({ "mountpoint": self.dir.path() });
        if let Err(e) = control_request(&self.socket, "DELETE", "/mounts", Some(&req)) {
            tracing::warn!(error = format!("{e:#}"), mountpoint = %self.dir.path().display(), "the daemon did not unbind the image");
        }
    }
}
