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
//! (`gc::remove_file_if_older`).

use crate::local::LocalStore;
use crate::packed::{index_object, PackMap, StoreIndex, INDEXES_DIR, PACKS_DIR};
use crate::{ByteRange, ObjectName, Result, StoreError, Target};
use smr_format::ChunkId;
use std::collections::HashSet;
use std::fs;
use std::io::ErrorKind;
use std::path::Path;
use std::time::SystemTime;

/// A file of `packs/` or `indexes/` named by 64 hex digits.
#[derive(Debug, Clone)]
pub struct NamedFile {
    /// The name's 32 bytes (a pack's digest, an index's recipe SHA-256).
    pub name: [u8; 32],
    /// Its object name in the store.
    pub object: ObjectName,
    /// Its length.
    pub len: u64,
    /// When it was written or last refreshed.
    pub modified: SystemTime,
}

/// What a collection needs of a store holding packs: listing, reading and
/// writing its objects, and deleting one unless it was refreshed.
pub trait PackedObjects {
    /// The store's location.
    fn location(&self) -> String;
    /// The objects of `dir` (`packs` or `indexes`) named by 64 hex digits.
    fn list(&self, dir: &str) -> Result<Vec<NamedFile>>;
    /// The bytes of `object`.
    fn read(&self, object: &ObjectName) -> Result<Vec<u8>>;
    /// Writes `object` (durably, replacing it).
    fn write(&self, object: &ObjectName, bytes: &[u8]) -> Result<()>;
    /// Deletes `f` unless it was written or refreshed at or after `cutoff`;
    /// whether it was deleted.
    fn remove_if_older(&self, f: &NamedFile, cutoff: SystemTime) -> Result<bool>;
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
    let path = store.root().join(dir);
    let err = |path: &Path, source| StoreError::Io {
        store: format!(
            "{} ({})",
            crate::ChunkStore::describe(store),
            path.display()
        ),
        source,
    };
    let entries = match fs::read_dir(&path) {
        Ok(e) => e,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(err(&path, e)),
    };
    let mut out = Vec::new();
    for e in entries {
        let e = e.map_err(|e| err(&path, e))?;
        let Some(name) = e.file_name().to_str().and_then(parse_name) else {
            continue;
        };
        let m = match e.metadata() {
            Ok(m) => m,
            Err(x) if x.kind() == ErrorKind::NotFound => continue,
            Err(x) => return Err(err(&e.path(), x)),
        };
        out.push(NamedFile {
            name,
            object: ObjectName::new(format!("{dir}/{}", hex::encode(name))),
            len: m.len(),
            modified: m.modified().map_err(|x| err(&e.path(), x))?,
        });
    }
    out.sort_by_key(|f| f.name);
    Ok(out)
}

/// The 32 bytes a name of 64 lowercase hex digits spells.
pub(crate) fn parse_name(name: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    let lower = name
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    (lower && hex::decode_to_slice(name, &mut out).is_ok()).then_some(out)
}

impl PackedObjects for LocalStore {
    fn location(&self) -> String {
        crate::ChunkStore::describe(self)
    }

    fn list(&self, dir: &str) -> Result<Vec<NamedFile>> {
        named_files(self, dir)
    }

    fn read(&self, object: &ObjectName) -> Result<Vec<u8>> {
        fs::read(self.root().join(object.as_str())).map_err(|source| StoreError::ChunkIo {
            what: Target::of(object, ByteRange::WHOLE),
            store: crate::ChunkStore::describe(self),
            source,
        })
    }

    fn write(&self, object: &ObjectName, bytes: &[u8]) -> Result<()> {
        self.write_durably(object, bytes)
            .map_err(|source| StoreError::ChunkIo {
                what: Target::of(object, ByteRange::WHOLE),
                store: crate::ChunkStore::describe(self),
                source,
            })
    }

    fn remove_if_older(&self, f: &NamedFile, cutoff: SystemTime) -> Result<bool> {
        let what = Target::of(&f.object, ByteRange::WHOLE);
        super::remove_file_if_older(self, &self.root().join(f.object.as_str()), what, cutoff)
    }
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
    store: &dyn PackedObjects,
    roots: &[Root],
    cutoff: SystemTime,
    dry_run: bool,
) -> Result<PackReport> {
    let index_files = store.list(INDEXES_DIR)?;
    let mut young_packs: HashSet<[u8; 32]> = HashSet::new();
    let mut map = PackMap::default();
    for f in &index_files {
        let bytes = store.read(&f.object)?;
        let index = StoreIndex::decode(&bytes).map_err(|e| StoreError::ChunkIo {
            what: Target::of(&f.object, ByteRange::WHOLE),
            store: store.location(),
            source: std::io::Error::new(ErrorKind::InvalidData, e),
        })?;
        map.add_index(&index);
        if f.modified >= cutoff {
            young_packs.extend(index.packs().iter().copied());
        }
    }
    // Where the roots' chunks are, by every index; each root's index
    // written anew from that.
    let mut live_packs: HashSet<[u8; 32]> = HashSet::new();
    for r in roots {
        let index = map.index_of(&r.chunks).map_err(|e| StoreError::Io {
            store: store.location(),
            source: std::io::Error::new(ErrorKind::InvalidData, e),
        })?;
        let Some(index) = index else {
            continue;
        };
        live_packs.extend(index.packs().iter().copied());
        if !dry_run {
            store.write(&index_object(&r.sha256), &index.encode())?;
        }
    }
    let root_names: HashSet<[u8; 32]> = roots.iter().map(|r| r.sha256).collect();
    let mut report = PackReport::default();
    for f in &index_files {
        if root_names.contains(&f.name) || f.modified >= cutoff {
            continue;
        }
        if dry_run || store.remove_if_older(f, cutoff)? {
            report.indexes_deleted += 1;
        }
    }
    for f in store.list(PACKS_DIR)? {
        report.packs.add(&f);
        if live_packs.contains(&f.name) {
            report.referenced.add(&f);
        } else if young_packs.contains(&f.name) || f.modified >= cutoff {
            report.within_grace.add(&f);
        } else if dry_run || store.remove_if_older(&f, cutoff)? {
            report.deleted.add(&f);
        } else {
            report.within_grace.add(&f);
        }
    }
    Ok(report)
}
