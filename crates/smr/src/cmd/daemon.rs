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
    /// The node's chunk cache, shared by every image.
    #[arg(long, env = "SMR_CACHE_DIR", default_value = smr_node::cache::DEFAULT_DIR)]
    cache_dir: PathBuf,
    /// The owner key: only artifacts sealed under it are served lazily
    /// (others fall back to containerd's own unpacking).
    #[arg(long, env = "SMR_KEY_FILE")]
    key_file: Option<PathBuf>,
}

/// Runs the daemon until SIGTERM or SIGINT.
pub fn run(a: DaemonArgs) -> Result<ExitCode> {
    let abs =
        |p: &PathBuf| std::path::absolute(p).with_context(|| format!("resolving {}", p.display()));
    let cfg = DaemonConfig {
        root: abs(&a.root)?,
        snapshotter_socket: abs(&a.snapshotter_socket)?,
        mount: MountConfig {
            smr: std::env::current_exe().context("locating the smr binary")?,
            cache_dir: abs(&a.cache_dir)?,
            key_file: a.key_file.as_ref().map(abs).transpose()?,
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
