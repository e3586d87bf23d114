//! How well chunks of a series of filesystem images dedup, fixed-size
//! chunks against content-defined ones ([`smr_convert::cdc`]).
//!
//! ```text
//! cargo run --release -p smr-convert --example dedup_study -- \
//!     [--fixed 64K]... [--cdc 16K:64K:256K]... [--json] IMG...
//! ```
//!
//! The images are read in series order (each one the next version of the
//! one before, as a node would pull them). For each chunking, and each
//! image: its chunks and bytes (all-zero chunks are not stored, as smr
//! trims them), the bytes new to a node that holds the image before it
//! (what a full read of the next version fetches), and the bytes new to a
//! store that holds every image before it (what storing it adds). Chunks
//! are compared by the SHA-256 of their plaintext: smr's convergent
//! encryption gives equal plaintexts equal ids, so this is smr's dedup.
//! Defaults: `--fixed 64K --cdc 16K:64K:256K`.

use sha2::{Digest, Sha256};
use smr_convert::cdc::{boundaries, CdcSizes};
use std::collections::{HashMap, HashSet};
use std::process::ExitCode;

/// A way of cutting an image.
#[derive(Clone, Copy)]
enum Chunking {
    Fixed(usize),
    Cdc(CdcSizes),
}

impl std::fmt::Display for Chunking {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Chunking::Fixed(s) => write!(f, "fixed {}K", s >> 10),
            Chunking::Cdc(c) => write!(f, "cdc {c}"),
        }
    }
}

impl Chunking {
    fn ends(&self, data: &[u8]) -> Vec<usize> {
        match *self {
            Chunking::Fixed(size) => (1..=data.len().div_ceil(size))
                .map(|i| (i * size).min(data.len()))
                .collect(),
            Chunking::Cdc(sizes) => boundaries(data, sizes),
        }
    }
}

/// One image's figures under one chunking.
#[derive(serde::Serialize)]
struct Row {
    chunking: String,
    image: String,
    chunks: usize,
    bytes: u64,
    new_to_node: u64,
    new_to_store: u64,
}

fn parse_fixed(s: &str) -> Result<usize, String> {
    let t = s.trim().to_ascii_lowercase();
    let (num, mult) = match t.strip_suffix('k') {
        Some(n) => (n, 1 << 10),
        None => match t.strip_suffix('m') {
            Some(n) => (n, 1 << 20),
            None => (t.as_str(), 1),
        },
    };
    num.parse::<usize>()
        .ok()
        .map(|n| n * mult)
        .filter(|&n| n >= 4096 && n % 4096 == 0)
        .ok_or_else(|| format!("--fixed {s}: a multiple of 4K"))
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dedup_study: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), String> {
    let (mut schemes, mut images, mut json) = (Vec::new(), Vec::new(), false);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--fixed" => {
                let v = args.next().ok_or("--fixed needs a size")?;
                schemes.push(Chunking::Fixed(parse_fixed(&v)?));
            }
            "--cdc" => {
                let v = args.next().ok_or("--cdc needs MIN:AVG:MAX")?;
                schemes.push(Chunking::Cdc(v.parse()?));
            }
            "--json" => json = true,
            _ => images.push(a),
        }
    }
    if images.is_empty() {
        return Err(
            "usage: dedup_study [--fixed SIZE]... [--cdc MIN:AVG:MAX]... [--json] IMG...".into(),
        );
    }
    if schemes.is_empty() {
        schemes = vec![
            Chunking::Fixed(64 << 10),
            Chunking::Cdc(CdcSizes::default()),
        ];
    }
    let mut rows = Vec::new();
    // Chunk hashes and lengths of each image under each scheme.
    let mut per: Vec<Vec<HashMap<[u8; 32], u64>>> = vec![Vec::new(); schemes.len()];
    for path in &images {
        let data = std::fs::read(path).map_err(|e| format!("{path}: {e}"))?;
        for (k, scheme) in schemes.iter().enumerate() {
            let mut chunks = HashMap::new();
            let mut start = 0;
            for end in scheme.ends(&data) {
                let c = &data[start..end];
                start = end;
                if c.iter().all(|&b| b == 0) {
                    continue;
                }
                chunks.insert(Sha256::digest(c).into(), c.len() as u64);
            }
            per[k].push(chunks);
        }
    }
    for (k, scheme) in schemes.iter().enumerate() {
        let mut stored: HashSet<[u8; 32]> = HashSet::new();
        for (i, chunks) in per[k].iter().enumerate() {
            let previous = i.checked_sub(1).map(|p| &per[k][p]);
            let (mut new_node, mut new_store) = (0, 0);
            for (h, len) in chunks {
                if !previous.is_some_and(|p| p.contains_key(h)) {
                    new_node += len;
                }
                if stored.insert(*h) {
                    new_store += len;
                }
            }
            rows.push(Row {
                chunking: scheme.to_string(),
                image: images[i].clone(),
                chunks: chunks.len(),
                bytes: chunks.values().sum(),
                new_to_node: new_node,
                new_to_store: new_store,
            });
        }
    }
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&rows).map_err(|e| e.to_string())?
        );
        return Ok(());
    }
    let mib = |b: u64| format!("{:.1}", b as f64 / (1 << 20) as f64);
    println!("| chunking | image | chunks | MiB | new to a node holding the previous image, MiB | new to the store, MiB |");
    println!("| --- | --- | --- | --- | --- | --- |");
    for r in &rows {
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            r.chunking,
            r.image,
            r.chunks,
            mib(r.bytes),
            mib(r.new_to_node),
            mib(r.new_to_store)
        );
    }
    Ok(())
}
