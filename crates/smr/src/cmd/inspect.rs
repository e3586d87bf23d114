//! `smr inspect`: show a recipe, or compare the chunks of two recipes.

use crate::keys::read_recipe;
use crate::progress::human;
use anyhow::Result;
use serde_json::json;
use smr_format::Recipe;
use std::collections::HashSet;
use std::path::PathBuf;
use std::process::ExitCode;

/// Arguments of `smr inspect`.
#[derive(clap::Args)]
pub struct Args {
    /// The recipe (with --compare: the base image's recipe).
    recipe: PathBuf,
    /// Report how many of RECIPE's chunks OTHER also uses (dedup between images).
    #[arg(long, value_name = "OTHER")]
    compare: Option<PathBuf>,
    /// Machine-readable JSON output.
    #[arg(long)]
    json: bool,
}

/// Prints the summary or comparison.
pub fn run(a: Args) -> Result<ExitCode> {
    let r = read_recipe(&a.recipe)?;
    let digest = r.digest();
    if let Some(other) = &a.compare {
        let o = read_recipe(other)?;
        let c = compare(&r, &o);
        if a.json {
            outln!("{}", serde_json::to_string_pretty(&c)?);
        } else {
            outln!(
                "{} of {} chunks of {} ({:.1}%) are also in {} ({} of {} stored bytes, {:.1}%)",
                c["shared_chunks"],
                c["base_chunks"],
                a.recipe.display(),
                c["shared_fraction"].as_f64().unwrap_or(0.0) * 100.0,
                other.display(),
                human(c["shared_bytes"].as_u64().unwrap_or(0)),
                human(c["base_bytes"].as_u64().unwrap_or(0)),
                c["shared_bytes_fraction"].as_f64().unwrap_or(0.0) * 100.0,
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    if a.json {
        outln!("{}", serde_json::to_string_pretty(&to_json(&r, &digest))?);
        return Ok(ExitCode::SUCCESS);
    }
    let stored: u64 = r.chunks.iter().map(|e| u64::from(e.stored_len)).sum();
    let compressed = r.chunks.iter().filter(|e| e.compressed).count();
    outln!("recipe:       {} ({digest})", a.recipe.display());
    outln!("source:       {}", r.source_digest);
    outln!(
        "image size:   {} ({} bytes)",
        human(r.image_size),
        r.image_size
    );
    match r.grid().cdc_sizes() {
        None => outln!("chunk size:   {}", human(r.chunk_size)),
        Some(s) => outln!(
            "chunking:     content-defined {s} (largest {}; header and layout unit {})",
            human(r.grid().max_len()),
            human(r.chunk_size)
        ),
    }
    outln!(
        "chunks:       {} total, {} zero, {} stored ({})",
        r.chunk_count(),
        r.chunk_count() - r.chunks.len() as u64,
        r.chunks.len(),
        human(stored)
    );
    outln!(
        "encryption:   {}",
        if r.encrypted() {
            "convergent AES-256-CTR; key table sealed with AES-256-GCM-SIV"
        } else {
            "none (chunks named by SHA-256 of plaintext)"
        }
    );
    outln!(
        "compression:  zstd on {compressed} of {} chunks",
        r.chunks.len()
    );
    match &r.file_map {
        Some(m) => outln!(
            "file map:     metadata from chunk {} ({} stored chunks); {} files span 2+ chunks ({} chunks); {} groups of a directory's files span 2+ chunks",
            m.metadata_chunk,
            r.chunks.iter().filter(|e| e.index >= m.metadata_chunk).count(),
            m.files.len(),
            m.files.iter().map(|f| f.count).sum::<u64>(),
            m.groups.len()
        ),
        None => outln!("file map:     none (recipe format version 1: no prefetch without a profile)"),
    }
    let c = &r.config;
    outln!("platform:     {}/{}", c.os, c.architecture);
    outln!("entrypoint:   {:?}", c.entrypoint);
    outln!("cmd:          {:?}", c.cmd);
    outln!("env:          {:?}", c.env);
    outln!("workdir:      {:?}", c.working_dir);
    outln!("user:         {:?}", c.user);
    Ok(ExitCode::SUCCESS)
}

fn to_json(r: &Recipe, digest: &str) -> serde_json::Value {
    let chunks: Vec<_> = r
        .chunks
        .iter()
        .map(|e| {
            json!({
                "index": e.index,
                "offset": r.chunk_start(e.index),
                "len": r.chunk_len(e.index),
                "id": e.id.to_hex(),
                "stored_len": e.stored_len,
                "compressed": e.compressed,
            })
        })
        .collect();
    json!({
        "recipe_digest": digest,
        "format_version": r.version(),
        "chunking": match r.grid().cdc_sizes() {
            Some(s) => json!({"kind": "cdc", "min": s.min, "avg": s.avg, "max": s.max}),
            None => json!({"kind": "fixed"}),
        },
        "file_map": r.file_map.as_ref().map(|m| json!({
            "metadata_chunk": m.metadata_chunk,
            "files": m.files.iter().map(|f| [f.start, f.count]).collect::<Vec<_>>(),
            "groups": m.groups.iter().map(|g| [g.start, g.count]).collect::<Vec<_>>(),
        })),
        "source_digest": r.source_digest,
        "image_size": r.image_size,
        "chunk_size": r.chunk_size,
        "chunk_count": r.chunk_count(),
        "zero_chunks": r.chunk_count() - r.chunks.len() as u64,
        "stored_chunks": r.chunks.len(),
        "stored_bytes": r.chunks.iter().map(|e| u64::from(e.stored_len)).sum::<u64>(),
        "encrypted": r.encrypted(),
        "config": r.config,
        "chunks": chunks,
    })
}

/// Chunk sharing between a base recipe and another one.
pub fn compare(base: &Recipe, other: &Recipe) -> serde_json::Value {
    let theirs: HashSet<_> = other.chunks.iter().map(|e| e.id).collect();
    let mut seen = HashSet::new();
    let (mut n, mut shared, mut bytes, mut shared_bytes) = (0u64, 0u64, 0u64, 0u64);
    for e in &base.chunks {
        if !seen.insert(e.id) {
            continue;
        }
        n += 1;
        bytes += u64::from(e.stored_len);
        if theirs.contains(&e.id) {
            shared += 1;
            shared_bytes += u64::from(e.stored_len);
        }
    }
    let frac = |a: u64, b: u64| if b == 0 { 1.0 } else { a as f64 / b as f64 };
    json!({
        "base_chunks": n,
        "shared_chunks": shared,
        "shared_fraction": frac(shared, n),
        "base_bytes": bytes,
        "shared_bytes": shared_bytes,
        "shared_bytes_fraction": frac(shared_bytes, bytes),
    })
}
