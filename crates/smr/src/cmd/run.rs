//! `smr run`.

use super::image::ImageArgs;
use super::mount::LoopArgs;
use crate::progress::human;
use anyhow::{Context, Result};
use smr_node::mount::LoopOptions;
use smr_node::run::{spec::Overrides, RootFs, RunRequest, DEFAULT_WORK_ROOT};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Instant, SystemTime};

/// Arguments of `smr run`.
#[derive(clap::Args)]
pub struct Args {
    /// The image: a recipe file (chunks in `--store`), or
    /// `docker://HOST[:PORT]/NAME[:TAG|@DIGEST]` (from the smr artifact).
    #[arg(required_unless_present = "volume")]
    image: Option<String>,
    #[command(flatten)]
    source: super::image::SourceArgs,
    /// Run on this writable volume (`smr volume create`): the container's
    /// root is the volume's filesystem itself, and what it writes stays.
    #[arg(long, value_name = "NAME", conflicts_with = "image")]
    volume: Option<String>,
    #[command(flatten)]
    root: super::volume::RootArgs,
    /// Set an environment variable (`K=V`), or copy `K` from smr's environment.
    #[arg(short = 'e', long = "env", value_name = "K=V")]
    env: Vec<String>,
    /// Write the run's statistics as JSON to this file (the image is then
    /// served by this process, whose fetches they count, even when an smr
    /// daemon runs).
    #[arg(long)]
    stats: Option<PathBuf>,
    /// Record the chunks this run reads, in first-read order, as a startup
    /// profile in this file (replay it with `--profile`, or publish it with
    /// `smr profile push`).
    #[arg(long, value_name = "FILE")]
    record_profile: Option<PathBuf>,
    #[command(flatten)]
    loop_args: LoopArgs,
    /// Where the temporary run directory (overlay upper, bundle) goes.
    #[arg(long, env = "SMR_RUN_DIR", default_value = DEFAULT_WORK_ROOT, hide = true)]
    work_dir: PathBuf,
    /// The OCI runtime.
    #[arg(long, default_value = "runc")]
    runtime: String,
    /// The container's network, like `docker run --network`: `default` (a
    /// namespace of its own, outbound through slirp4netns when installed;
    /// the host's loopback is not reachable), `none` (loopback only) or
    /// `host` (the host's network namespace).
    #[arg(
        long = "net",
        alias = "network",
        value_name = "MODE",
        default_value = "default"
    )]
    network: smr_node::run::net::Network,
    /// Security options, like `docker run --security-opt`:
    /// `seccomp=unconfined` (no filter) or `seccomp=FILE` (an OCI
    /// LinuxSeccomp JSON profile) instead of smr's default filter.
    #[arg(long = "security-opt", value_name = "OPT")]
    security_opt: Vec<String>,
    /// Kill the container (SIGKILL) once it has run this long (`30s`,
    /// `5m`); smr then exits 137 and still writes `--stats` and
    /// `--record-profile`.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    timeout: Option<std::time::Duration>,
    /// Serve the image in this process even when an smr daemon runs (by
    /// default a registry image is mounted by the daemon, once for every
    /// container of it on the node).
    #[arg(long)]
    standalone: bool,
    /// The command (replaces the image's Cmd; its Entrypoint is kept).
    #[arg(last = true)]
    command: Vec<String>,
}

/// Runs a container from the image; its exit code becomes smr's.
pub fn run(a: Args) -> Result<ExitCode> {
    let started = (Instant::now(), SystemTime::now());
    let mut seccomp = smr_node::run::seccomp::Seccomp::Default;
    for opt in &a.security_opt {
        seccomp = smr_node::run::seccomp::Seccomp::parse(opt)?;
    }
    let daemon = super::daemon::daemon_socket();
    let image = a.image.clone().unwrap_or_default();
    let through_daemon = crate::remote::is_remote(&image)
        && a.volume.is_none()
        && !a.standalone
        && a.record_profile.is_none()
        && a.stats.is_none()
        && a.source.profile.is_none()
        && super::daemon::daemon_runs(&daemon);
    if through_daemon {
        return run_through_daemon(a, daemon, seccomp, started);
    }
    // This process serves the image's FUSE export while the container runs.
    smr_node::malloc::limit_arenas(smr_node::malloc::SERVER_ARENAS);
    let (opened, volume, label) = match &a.volume {
        Some(name) => {
            let v = super::volume::open(&a.root, name, &a.source)?;
            (v.base, Some(v.volume), format!("volume {name}"))
        }
        None => {
            let mut image = ImageArgs {
                image: a.image.clone().unwrap_or_default(),
                source: a.source.clone(),
            };
            // This process reads the pack: begin with the lookup.
            image.source.origin.read_pack_ahead = true;
            (image.open_full()?, None, image.image)
        }
    };
    // Started first: the replay's fetches overlap the mount and runc.
    let replay = opened.start_prefetch();
    if a.record_profile.is_some() {
        opened.lazy.record();
    }
    let lazy = opened.lazy.clone();
    let root = match volume {
        Some(volume) => RootFs::Volume {
            volume,
            image: opened.lazy,
        },
        None => RootFs::Image(opened.lazy),
    };
    let startup = if a.record_profile.is_some() {
        Startup::Record
    } else if opened.startup_pack {
        // With the readahead the profile was recorded with.
        Startup::Pack(opened.profile.as_ref().map_or(
            a.loop_args.record_options().readahead_kb,
            smr_format::Profile::readahead_kb,
        ))
    } else {
        Startup::None
    };
    let req = request(&a, root, opened.recipe, seccomp, started, startup);
    let recorded_readahead = req.loop_opts.readahead_kb;
    let mut r = smr_node::run::run(req).with_context(|| format!("running {label}"))?;
    r.profile = replay.map(|p| p.stats());
    if let Some(path) = &a.record_profile {
        let mut p = lazy
            .recorded_profile(opened.recipe_sha256)
            .context("recording was not started")?;
        p.recorded_readahead_kb = Some(recorded_readahead);
        super::convert::write_atomic(path, &p.encode())?;
        errln!(
            "smr: recorded a startup profile of {} chunks in {}",
            p.chunks.len(),
            path.display()
        );
    }
    let start = r.start_seconds.map_or("?".into(), |s| format!("{s:.2}s"));
    errln!(
        "smr: exit {}; started in {start}, total {:.2}s; fetched {} of {} ({:.1}%) in {} chunks",
        r.exit_code,
        r.total_seconds,
        human(r.bytes_fetched),
        human(r.image_bytes),
        r.fetched_fraction * 100.0,
        r.chunks_fetched
    );
    if let Some(p) = &r.profile {
        let done = p
            .seconds
            .map_or("not finished".into(), |s| format!("done in {s:.2}s"));
        errln!(
            "smr: startup profile: {} chunks, {} fetched ahead, {} already cached, {} failed; {done}",
            p.chunks, p.fetched, p.cached, p.failed
        );
    }
    if let Some(path) = &a.stats {
        std::fs::write(path, serde_json::to_vec_pretty(&r)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(ExitCode::from(u8::try_from(r.exit_code).unwrap_or(255)))
}

/// `smr run docker://…` when an smr daemon runs: the daemon mounts the
/// image (once for the node, its cache and fetches shared), binds it for
/// this run, and the container's overlay sits on it; the image's config
/// comes from the artifact the daemon mounted, as this node's policy
/// trusts it.
fn run_through_daemon(
    a: Args,
    socket: PathBuf,
    seccomp: smr_node::run::seccomp::Seccomp,
    started: (Instant, SystemTime),
) -> Result<ExitCode> {
    let image = a.image.clone().unwrap_or_default();
    let bind = super::daemon::DaemonBind::new(socket.clone(), &image)?;
    let (_, artifact) = a
        .source
        .cached_origin()
        .trusted_artifact(&bind.image, false)
        .with_context(|| format!("reading the config of {}", bind.image))?;
    let root = RootFs::Mounted(bind.dir().to_path_buf());
    let req = request(&a, root, artifact.recipe, seccomp, started, Startup::None);
    let r = smr_node::run::run(req).with_context(|| format!("running {image}"))?;
    drop(bind);
    let start = r.start_seconds.map_or("?".into(), |s| format!("{s:.2}s"));
    errln!(
        "smr: exit {}; started in {start}, total {:.2}s; image served by the smr daemon ({}; its fetches: smr status)",
        r.exit_code,
        r.total_seconds,
        socket.display()
    );
    Ok(ExitCode::from(u8::try_from(r.exit_code).unwrap_or(255)))
}

/// What a run's start does with a startup profile, which decides its loop
/// device's settings (see [`super::mount::LoopArgs::record_options`] and [`super::mount::LoopArgs::pack_options`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Startup {
    /// Neither records nor serves one: the settings asked for.
    None,
    /// Records one: the startup settings for the whole run, so that the
    /// profile lists the blocks a start with them reads.
    Record,
    /// Is served from a startup pack: the startup settings, with the
    /// readahead (KiB) the pack's profile was recorded with, until the
    /// start is over, then the settings asked for.
    Pack(u32),
}

/// The run of `root` (with `recipe`'s config) that the arguments ask for.
fn request(
    a: &Args,
    root: RootFs,
    recipe: smr_format::Recipe,
    seccomp: smr_node::run::seccomp::Seccomp,
    started: (Instant, SystemTime),
    startup: Startup,
) -> RunRequest {
    RunRequest {
        root,
        recipe,
        overrides: Overrides {
            command: a.command.clone(),
            env: a.env.clone(),
            terminal: std::io::stdin().is_terminal(),
        },
        loop_opts: match startup {
            Startup::None => a.loop_args.options(),
            Startup::Record => a.loop_args.record_options(),
            Startup::Pack(kb) => LoopOptions {
                readahead_kb: kb,
                ..a.loop_args.pack_options()
            },
        },
        after_start: matches!(startup, Startup::Pack(_)).then(|| a.loop_args.options()),
        work_root: a.work_dir.clone(),
        runc: a.runtime.clone(),
        network: a.network,
        seccomp,
        started,
        timeout: a.timeout,
    }
}
