//! `smr cache stats` and `smr cache prune`.

use super::image::CacheArgs;
use crate::progress::human;
use anyhow::{bail, Context, Result};
use std::process::ExitCode;

/// Arguments of `smr cache`.
#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: CacheCommand,
}

#[derive(clap::Subcommand)]
enum CacheCommand {
    /// Show the node cache's size and counters.
    Stats {
        #[command(flatten)]
        cache: CacheArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Evict (LRU-K order) until the cache holds at most `--to` bytes;
    /// `--to 0` also forgets the registry blobs kept by digest (recipes,
    /// pack indexes, manifests).
    Prune {
        #[command(flatten)]
        cache: CacheArgs,
        /// Target size, e.g. 1G, 500M, 0 (binary units).
        #[arg(long, value_parser = parse_size)]
        to: u64,
    },
}

/// Parses `123`, `64K`, `500M`, `1G`, `2T` (also `KiB`, `MB`...: binary
/// units either way).
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("not a size: {s:?}"))?;
    let shift = match unit
        .trim()
        .to_ascii_uppercase()
        .trim_end_matches("IB")
        .trim_end_matches('B')
    {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return Err(format!("unknown unit in {s:?} (use K, M, G or T)")),
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("size too large: {s:?}"))
}

/// Runs `smr cache ...`.
pub fn run(a: Args) -> Result<ExitCode> {
    match a.command {
        CacheCommand::Stats { cache, json } => {
            if !cache.cache_dir.is_dir() {
                bail!("no cache at {}", cache.cache_dir.display());
            }
            let s = cache.open()?.stats()?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                let c = &s.counters;
                outln!("cache      {}", s.dir.display());
                outln!(
                    "size       {} in {} chunks (budget {})",
                    human(c.total_bytes),
                    c.entries,
                    human(s.budget_bytes)
                );
                outln!(
                    "hits       {} (memory {}), misses {}",
                    c.hits,
                    c.memory_hits,
                    c.misses
                );
                outln!(
                    "fetches    {} ({}), errors {}",
                    c.fetches,
                    human(c.fetched_bytes),
                    c.fetch_errors
                );
                outln!(
                    "evictions  {} ({}), corrupt entries healed {}",
                    c.evictions,
                    human(c.evicted_bytes),
                    c.corrupt
                );
            }
        }
        CacheCommand::Prune { cache, to } => {
            let r = cache.open()?.prune(to)?;
            let blobs = cache.blob_cache_dir();
            if to == 0 && blobs.exists() {
                std::fs::remove_dir_all(&blobs)
                    .with_context(|| format!("removing {}", blobs.display()))?;
            }
            errln!(
                "evicted {} chunks ({}) in {} segments; {} chunks left{}",
                r.evicted_entries,
                human(r.evicted_bytes),
                r.evicted_segments,
                r.remaining_entries,
                if r.busy_skipped > 0 {
                    format!(
                        ", {} segments kept while their processes write them",
                        r.busy_skipped
                    )
                } else {
                    String::new()
                }
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("500MiB"), Ok(500 << 20));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert!(parse_size("1X").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
