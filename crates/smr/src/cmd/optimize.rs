//! Startup profiles made at conversion (`smr convert --push`; stargz's
//! `ctr-remote image optimize` is the model).
//!
//! Right after the push, the new image is run once per start command, from
//! the chunks just converted (the local store, so nothing is downloaded),
//! with `smr run --net none --timeout PERIOD --record-profile`: no network,
//! and killed once the period is over; a start that exits 0 is run again
//! (`--optimize-runs`, 2 by default), since its last reads vary between
//! runs. What each run read, in first-read order, is merged into one
//! profile (commands in the order given, each chunk and block once) and
//! pushed next to the artifact, where every later start of the image finds
//! it. A command that fails, hangs or tries the network
//! still yields what it read; nothing here fails the conversion.

use anyhow::{Context, Result};
use smr_format::Profile;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

/// Options of `smr convert --push` about the startup profile.
#[derive(clap::Args, Debug, Clone)]
pub struct OptimizeArgs {
    /// A start command to record instead of the image's Entrypoint + Cmd,
    /// in shell words (`python3 -c 'import numpy'`); it replaces the Cmd,
    /// the Entrypoint is kept, as with `smr run -- CMD`. Repeat it for
    /// several starts: their reads merge into one profile.
    #[arg(long = "optimize-cmd", value_name = "CMD")]
    pub cmds: Vec<String>,
    /// How long each recorded start may run before it is killed (what it
    /// read until then is kept).
    #[arg(long, value_name = "DURATION", default_value = "10s",
          value_parser = humantime::parse_duration)]
    pub optimize_period: Duration,
    /// Record each start this many times; their reads merge. A start's
    /// last reads can vary from run to run (what a process touches as it
    /// exits, a thread's timing), and each one the profile misses costs a
    /// cold start a round trip. A start that fails or runs for the whole
    /// period is not run again.
    #[arg(long, value_name = "N", default_value_t = 2,
          value_parser = clap::value_parser!(u32).range(1..=10))]
    pub optimize_runs: u32,
    /// Record and push no startup profile.
    #[arg(long, conflicts_with = "cmds")]
    pub no_optimize: bool,
}

/// Where the converted image is, for the recording runs.
pub struct Converted<'a> {
    /// The recipe's bytes.
    pub recipe: &'a [u8],
    /// The store holding its chunks.
    pub store: &'a str,
    /// The owner key file, if the recipe is encrypted.
    pub key_file: Option<&'a Path>,
    /// Whether the image has an Entrypoint or Cmd to run by default.
    pub has_command: bool,
}

/// Runs the start commands and returns their merged profile, or `None`
/// (logged) when none could be recorded.
pub fn record(a: &OptimizeArgs, image: &Converted<'_>) -> Option<Profile> {
    if a.no_optimize {
        return None;
    }
    if !rustix::process::geteuid().is_root() {
        tracing::warn!("not recording a startup profile: running the image needs root (pass --no-optimize to silence this)");
        return None;
    }
    let commands: Vec<Option<Vec<String>>> = if a.cmds.is_empty() {
        if !image.has_command {
            tracing::warn!("not recording a startup profile: the image has neither Entrypoint nor Cmd (give --optimize-cmd)");
            return None;
        }
        vec![None]
    } else {
        let mut out = Vec::new();
        for c in &a.cmds {
            match shlex::split(c) {
                Some(words) if !words.is_empty() => out.push(Some(words)),
                _ => {
                    tracing::warn!(command = %c, "--optimize-cmd is not a valid shell command line: skipped")
                }
            }
        }
        out
    };
    match record_all(a, image, &commands) {
        Ok(p) if p.chunks.is_empty() => {
            tracing::warn!("the recorded starts read nothing: no startup profile");
            None
        }
        Ok(p) => {
            errln!("smr: startup profile of {} chunks", p.chunks.len());
            Some(p)
        }
        Err(e) => {
            tracing::warn!(
                error = format!("{e:#}"),
                "recording a startup profile failed; the image is pushed without one"
            );
            None
        }
    }
}

fn record_all(
    a: &OptimizeArgs,
    image: &Converted<'_>,
    commands: &[Option<Vec<String>>],
) -> Result<Profile> {
    let tmp = tempfile::Builder::new()
        .prefix("smr-optimize-")
        .tempdir()
        .context("creating a directory for the recording runs")?;
    let recipe = tmp.path().join("image.recipe");
    std::fs::write(&recipe, image.recipe)
        .with_context(|| format!("writing {}", recipe.display()))?;
    let exe = std::env::current_exe().context("finding the smr binary")?;
    let mut merged = Profile::new(Profile::recipe_hash(image.recipe), Vec::new());
    let mut seen = std::collections::HashSet::new();
    let mut seen_blocks = std::collections::HashSet::new();
    let runs = a.optimize_runs.max(1);
    let starts = commands
        .iter()
        .enumerate()
        .flat_map(|s| (1..=runs).map(move |r| (s, r)));
    let mut stopped = std::collections::HashSet::new();
    for ((ci, cmd), run) in starts {
        if stopped.contains(&ci) {
            continue;
        }
        let i = format!("{ci}-{run}");
        let mut label = cmd.as_ref().map_or_else(
            || "the image's Entrypoint + Cmd".to_string(),
            |w| shlex::try_join(w.iter().map(String::as_str)).unwrap_or_default(),
        );
        if run > 1 {
            label = format!("{label}, run {run} of {runs},");
        }
        let out = tmp.path().join(format!("start-{i}.profile"));
        let log = tmp.path().join(format!("start-{i}.log"));
        let stats = tmp.path().join(format!("start-{i}.json"));
        let log_file =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut c = Command::new(&exe);
        c.arg("run")
            .arg(&recipe)
            .arg("--store")
            .arg(image.store)
            .arg("--cache-dir")
            .arg(tmp.path().join(format!("cache-{i}")))
            .args(["--no-profile", "--net", "none", "--timeout"])
            .arg(humantime::format_duration(a.optimize_period).to_string())
            .arg("--record-profile")
            .arg(&out)
            .arg("--stats")
            .arg(&stats);
        if let Some(k) = image.key_file {
            c.arg("--key-file").arg(k);
        }
        if let Some(words) = cmd {
            c.arg("--").args(words);
        }
        let mut child = c
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().context("log file")?)
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("starting {}", exe.display()))?;
        // `smr run` stops the container after the period; this bounds the
        // rest (mount, teardown) should it hang.
        let status = wait_or_kill(&mut child, a.optimize_period + SETUP_ALLOWANCE)?;
        let tail = log_tail(&log);
        let timed_out = std::fs::read(&stats)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v["timed_out"].as_bool())
            .unwrap_or(false);
        let outcome = match status.code() {
            _ if timed_out => format!(
                "ran for the whole {} and was stopped",
                humantime::format_duration(a.optimize_period)
            ),
            Some(0) => "exited 0".to_string(),
            Some(code) => format!("failed with exit code {code} ({tail})"),
            None => format!("was killed ({tail})"),
        };
        if timed_out || status.code() != Some(0) {
            stopped.insert(ci);
        }
        let read = match std::fs::read(&out) {
            Ok(bytes) => {
                let p = Profile::decode(&bytes).with_context(|| format!("profile of {label}"))?;
                let n = p.chunks.len();
                merged
                    .chunks
                    .extend(p.chunks.into_iter().filter(|c| seen.insert(*c)));
                let new = merge_blocks(&mut merged.blocks, &p.blocks, &mut seen_blocks);
                // Every recording runs with the same settings.
                merged.recorded_readahead_kb = p.recorded_readahead_kb;
                match run {
                    1 => format!("read {n} chunks"),
                    _ => format!("read {n} chunks and {new} blocks the runs before did not"),
                }
            }
            Err(e) => format!("recorded nothing: {e}"),
        };
        errln!("smr: startup profile: {label} {outcome}; {read}",);
    }
    Ok(merged)
}

/// Appends to `into` the blocks of `runs` not in `seen`, in order;
/// returns how many.
fn merge_blocks(
    into: &mut Vec<smr_format::startup::BlockRun>,
    runs: &[smr_format::startup::BlockRun],
    seen: &mut std::collections::HashSet<u64>,
) -> u64 {
    let mut added = 0;
    for r in runs {
        for b in (r.first..r.first + u64::from(r.count)).filter(|&b| seen.insert(b)) {
            smr_format::startup::push_block(into, b);
            added += 1;
        }
    }
    added
}

/// Time a recording run may take beyond its period (mount, runc, teardown).
const SETUP_ALLOWANCE: Duration = Duration::from_secs(120);

/// Waits for `child`, killing it (SIGKILL) after `limit`.
fn wait_or_kill(
    child: &mut std::process::Child,
    limit: Duration,
) -> Result<std::process::ExitStatus> {
    if let Some(status) =
        smr_node::run::wait_at_most(child, limit).context("waiting for smr run")?
    {
        return Ok(status);
    }
    tracing::warn!(
        pid = child.id(),
        "the recording run did not end in time: killing it"
    );
    let _ = child.kill();
    child.wait().context("waiting for smr run")
}

/// The last lines of a run's output, for the log.
fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(5)..].join(" | ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use smr_format::startup::BlockRun;

    #[test]
    fn merging_appends_only_unseen_blocks_in_their_order() {
        let b = |first: u64, count: u32| BlockRun { first, count };
        let (mut into, mut seen) = (Vec::new(), std::collections::HashSet::new());
        assert_eq!(merge_blocks(&mut into, &[b(10, 3), b(1, 1)], &mut seen), 4);
        // A second run read 11 and 1 again, then 13 (after 12) and 40.
        assert_eq!(
            merge_blocks(&mut into, &[b(11, 3), b(1, 1), b(40, 1)], &mut seen),
            2
        );
        assert_eq!(into, vec![b(10, 3), b(1, 1), b(13, 1), b(40, 1)]);
    }
}
