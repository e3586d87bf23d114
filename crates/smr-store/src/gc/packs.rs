//! Garbage collection of a local store's packs and indexes.
//!
//! Before anything is deleted, every index is read (one that cannot be
//! read stops the collection: the packs it names are unknown) and every
//! root recipe's index is written anew from them, so that a root whose
//! chunks lie in packs other recipes wrote keeps finding them. Then:
//!
//! - an index goes if it is no root's and older than `cutoff`;
//! - a pack goes if no root's chunk is in it (by the indexes read), no
//!   index younger than `cutoff` names it, and it is older than `cutoff`.
//!
//! A pack holding live and dead chunks stays whole: packs are never
//! rewritten. Deletion renames aside first, as for chunk files
//! ([`super::remove_file_if_older`]).

use super::remove_file_if_older;
use crate::local::LocalStore;
use crate::packed::{pack_object, StoreIndex, INDEXES_DIR, PACKS_DIR};
use crate::{ByteRange, ChunkStore, Result, StoreError, Target};
use smr_format::ChunkId;
use std::collections::HashSet;
use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// A file of `packs/` or `indexes/` named by 64 hex digits.
#[derive(Debug, Clone)]
pub struct NamedFile {
    /// The name's 32 bytes (a pack's digest, an index's recipe SHA-256).
    pub name: [u8; 32],
    /// Its path.
    pub path: PathBuf,
    /// Its length.
    pub len: u64,
    /// When it was written or last refreshed.
    pub modified: SystemTime,
}

/// Counts of one kind of file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    /// How many.
    pub count: u64,
    /// Their bytes.
    pub bytes: u64,
}

impl Tally {
    fn add(&mut self, f: &NamedFile) {
        self.count += 1;
        self.bytes += f.len;
    }
}

/// What a pack collection found and did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PackReport {
    /// Every pack.
    pub packs: Tally,
    /// Packs holding a root's chunk.
    pub referenced: Tally,
    /// Unreferenced packs kept because they (or an index naming them) are
    /// younger than the cutoff.
    pub within_grace: Tally,
    /// Packs deleted (or that would be, in a dry run).
    pub deleted: Tally,
    /// Indexes deleted (or that would be).
    pub indexes_deleted: u64,
}

/// The files of `dir` named by 64 hex digits (temp files skipped).
fn named_files(store: &LocalStore, dir: &str) -> Result<Vec<NamedFile>> {
    let dir = store.root().join(dir);
    let err = |path: &Path, source| StoreError::Io {
        store: format!("{} ({})", store.describe(), path.display()),
        source,
    };
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(err(&dir, e)),
    };
    let mut out = Vec::new();
    for e in entries {
        let e = e.map_err(|e| err(&dir, e))?;
        let mut name = [0u8; 32];
        let Some(n) = e.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        if hex::decode_to_slice(&n, &mut name).is_err() {
            continue;
        }
        let m = match e.metadata() {
            Ok(m) => m,
            Err(x) if x.kind() == ErrorKind::NotFound => continue,
            Err(x) => return Err(err(&e.path(), x)),
        };
        out.push(NamedFile {
            name,
            path: e.path(),
            len: m.len(),
            modified: m.modified().map_err(|x| err(&e.path(), x))?,
        });
    }
    out.sort_by_key(|f| f.name);
    Ok(out)
}

/// Every pack file of `store`.
pub fn pack_files(store: &LocalStore) -> Result<Vec<NamedFile>> {
    named_files(store, PACKS_DIR)
}

/// A root recipe: its SHA-256 and its chunks.
#[derive(Debug, Clone)]
pub struct Root {
    /// SHA-256 of the recipe's bytes (its index's name).
    pub sha256: [u8; 32],
    /// Its chunks.
    pub chunks: Vec<ChunkId>,
}

/// Collects the packs and indexes of `store` (see the module docs), keeping
/// what `roots` need. Nothing is deleted or written in a dry run.
pub fn collect(
    store: &LocalStore,
    roots: &[Root],
    cutoff: SystemTime,
    dry_run: bool,
) -> Result<PackReport> {
    let live: HashSet<ChunkId> = roots
        .iter()
        .flat_map(|r| r.chunks.iter().copied())
        .collect();
    let root_names: HashSet<[u8; 32]> = roots.iter().map(|r| r.sha256).collect();
    let index_files = named_files(store, INDEXES_DIR)?;
    let mut young_packs: HashSet<[u8; 32]> = HashSet::new();
    for f in &index_files {
        let object = crate::packed::index_object(&f.name);
        let bad = |source| StoreError::ChunkIo {
            what: Target::of(&object, ByteRange::WHOLE),
            store: store.describe(),
            source,
        };
        let bytes = fs::read(&f.path).map_err(bad)?;
        let index = StoreIndex::decode(&bytes)
            .map_err(|e| bad(std::io::Error::new(ErrorKind::InvalidData, e)))?;
        if f.modified >= cutoff {
            young_packs.extend(index.packs().iter().copied());
        }
    }
    // Where the live chunks are, by every index (the store read them all
    // when it opened); each root's index written anew from that.
    let mut live_packs: HashSet<[u8; 32]> = HashSet::new();
    for id in &live {
        if let Ok(extent) = store.locate(id) {
            if let Some(hex) = extent.object.as_str().strip_prefix("packs/") {
                let mut d = [0u8; 32];
                if hex::decode_to_slice(hex, &mut d).is_ok() {
                    live_packs.insert(d);
                }
            }
        }
    }
    let mut report = PackReport::default();
    if !dry_run {
        for r in roots {
            store.write_index_of(&r.sha256, r.chunks.iter().copied())?;
        }
    }
    for f in &index_files {
        if root_names.contains(&f.name) || f.modified >= cutoff {
            continue;
        }
        let what = Target::of(&crate::packed::index_object(&f.name), ByteRange::WHOLE);
        if dry_run || remove_file_if_older(store, &f.path, what, cutoff)? {
            report.indexes_deleted += 1;
        }
    }
    for f in pack_files(store)? {
        report.packs.add(&f);
        if live_packs.contains(&f.name) {
            report.referenced.add(&f);
        } else if young_packs.contains(&f.name) || f.modified >= cutoff {
            report.within_grace.add(&f);
        } else {
            let what = Target::of(&pack_object(&f.name), ByteRange::WHOLE);
            if dry_run || remove_file_if_older(store, &f.path, what, cutoff)? {
                report.deleted.add(&f);
            } else {
                report.within_grace.add(&f);
            }
        }
    }
    Ok(report)
}
