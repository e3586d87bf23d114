//! `smr run`.

use super::mount::LoopArgs;
use super::serve::ImageArgs;
use crate::progress::human;
use anyhow::{Context, Result};
use smr_node::run::{spec::Overrides, RunRequest, DEFAULT_WORK_ROOT};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Instant, SystemTime};

/// Arguments of `smr run`.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    image: ImageArgs,
    /// Set an environment variable (`K=V`), or copy `K` from smr's environment.
    #[arg(short = 'e', long = "env", value_name = "K=V")]
    env: Vec<String>,
    /// Write the run's statistics as JSON to this file.
    #[arg(long)]
    stats: Option<PathBuf>,
    #[command(flatten)]
    loop_args: LoopArgs,
    /// Where the temporary run directory (overlay upper, bundle) goes.
    #[arg(long, env = "SMR_RUN_DIR", default_value = DEFAULT_WORK_ROOT, hide = true)]
    work_dir: PathBuf,
    /// The OCI runtime.
    #[arg(long, default_value = "runc")]
    runtime: String,
    /// The command (replaces the image's Cmd; its Entrypoint is kept).
    #[arg(last = true)]
    command: Vec<String>,
}

/// Runs a container from the image; its exit code becomes smr's.
pub fn run(a: Args) -> Result<ExitCode> {
    let started = (Instant::now(), SystemTime::now());
    // This process serves the image's FUSE export while the container runs.
    smr_node::malloc::limit_arenas(smr_node::malloc::SERVER_ARENAS);
    let opened = a.image.open_full()?;
    let (image, recipe) = (opened.lazy, opened.recipe);
    let req = RunRequest {
        image,
        recipe,
        overrides: Overrides {
            command: a.command,
            env: a.env,
            terminal: std::io::stdin().is_terminal(),
        },
        loop_opts: a.loop_args.options(),
        work_root: a.work_dir,
        runc: a.runtime,
        started,
    };
    let r = smr_node::run::run(req).with_context(|| format!("running {}", a.image.image))?;
    let start = r.start_seconds.map_or("?".into(), |s| format!("{s:.2}s"));
    eprintln!(
        "smr: exit {}; started in {start}, total {:.2}s; fetched {} of {} ({:.1}%) in {} chunks",
        r.exit_code,
        r.total_seconds,
        human(r.bytes_fetched),
        human(r.image_bytes),
        r.fetched_fraction * 100.0,
        r.chunks_fetched
    );
    if let Some(path) = &a.stats {
        std::fs::write(path, serde_json::to_vec_pretty(&r)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(ExitCode::from(u8::try_from(r.exit_code).unwrap_or(255)))
}
