//! Garbage collection of a local chunk store: delete the chunks no root
//! refers to, without ever deleting one that a conversion or commit
//! running at the same time will refer to.
//!
//! The argument (after Lambda's roots-based GC, with a grace period):
//!
//! 1. A writer (`smr convert`, `smr commit`) stores every chunk its recipe
//!    will name through `put` before it writes the recipe. `put` of a new
//!    chunk creates its file (modification time = now); `put` of a chunk
//!    already present *refreshes* the file's modification time, and if the
//!    file vanished meanwhile it writes the chunk anew ([`refresh`]).
//! 2. The collector takes `cutoff = start - grace`, reads every root (a
//!    root it cannot read stops it before anything is deleted), and
//!    deletes a chunk only if no root names it and its file is older than
//!    `cutoff`. It deletes by renaming the file aside, looking at the
//!    renamed file's time, and then unlinking it, or renaming it back if it
//!    was refreshed ([`remove_if_older`]).
//!
//! A recipe written before the collector read the roots is a root. A
//! writer still running put each of its chunks at most `grace` ago (grace
//! longer than any conversion: 24 h by default), so each of its chunks is
//! younger than `cutoff` unless that writer's refresh has not happened
//! yet; then either the refresh comes before the collector's rename (the
//! renamed file shows the new time and is put back) or after it (the
//! refresh finds no file and `put` writes the chunk again). No order of
//! the two loses a chunk a writer relies on.
//!
//! Packs ([`packs`]) follow the same argument with the pack file in the
//! chunk file's place: a writer reusing a chunk of a pack refreshes the
//! pack, and a pack goes only when no root's chunk and no young index is in
//! it and it is older than `cutoff`.

pub mod packs;

use crate::local::LocalStore;
use crate::{ChunkStore, Result, StoreError, Target};
use smr_format::ChunkId;
use std::fs;
use std::io::ErrorKind;
use std::path::Path;
use std::time::SystemTime;

/// Sets the modification time of the chunk file at `path` to now; `false`
/// if it is gone (or cannot be touched: the caller writes it again).
pub fn refresh(path: &Path) -> bool {
    fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|f| f.set_modified(SystemTime::now()))
        .is_ok()
}

/// A chunk file of the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkFile {
    /// The chunk.
    pub id: ChunkId,
    /// Its length in bytes.
    pub len: u64,
    /// When it was written or last refreshed.
    pub modified: SystemTime,
}

/// Every chunk file of `store` (temp files and stray names skipped).
pub fn chunk_files(store: &LocalStore) -> Result<Vec<ChunkFile>> {
    let chunks = store.root().join("chunks");
    let mut out = Vec::new();
    let list_err = |path: &Path, source: std::io::Error| StoreError::Io {
        store: format!("{} ({})", store.describe(), path.display()),
        source,
    };
    let fan = match fs::read_dir(&chunks) {
        Ok(rd) => rd,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(list_err(&chunks, e)),
    };
    for dir in fan {
        let dir = dir.map_err(|e| list_err(&chunks, e))?.path();
        if !dir.is_dir() {
            continue;
        }
        for f in fs::read_dir(&dir).map_err(|e| list_err(&dir, e))? {
            let f = f.map_err(|e| list_err(&dir, e))?;
            let Some(id) = f
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<ChunkId>().ok())
            else {
                continue;
            };
            let m = match f.metadata() {
                Ok(m) => m,
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(list_err(&f.path(), e)),
            };
            if m.is_file() {
                out.push(ChunkFile {
                    id,
                    len: m.len(),
                    modified: m.modified().map_err(|e| list_err(&f.path(), e))?,
                });
            }
        }
    }
    out.sort_by_key(|a| a.id);
    Ok(out)
}

/// Deletes chunk `id` of `store` unless its file was written or refreshed
/// at or after `cutoff` (see the module docs for why the rename comes
/// first); returns whether it was deleted.
pub fn remove_if_older(store: &LocalStore, id: &ChunkId, cutoff: SystemTime) -> Result<bool> {
    remove_file_if_older(store, &store.chunk_path(id), Target::Chunk(*id), cutoff)
}

/// Deletes the file at `path` (of `store`, about `what`) unless it was
/// written or refreshed at or after `cutoff`: renamed aside, its time
/// looked at, then unlinked or renamed back.
pub(crate) fn remove_file_if_older(
    store: &LocalStore,
    path: &Path,
    what: Target,
    cutoff: SystemTime,
) -> Result<bool> {
    let name = path
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    let aside = path.with_file_name(format!(
        "{}gc-{name}-{}",
        crate::local::TEMP_PREFIX,
        std::process::id()
    ));
    let err = |source| StoreError::ChunkIo {
        what: what.clone(),
        store: store.describe(),
        source,
    };
    match fs::rename(path, &aside) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(err(e)),
    }
    let modified = fs::metadata(&aside)
        .and_then(|m| m.modified())
        .map_err(err)?;
    if modified >= cutoff {
        // Refreshed by a writer just now: put back (a writer that found it
        // gone meanwhile wrote the same bytes; either copy is the chunk).
        fs::rename(&aside, path).map_err(err)?;
        return Ok(false);
    }
    fs::remove_file(&aside).map_err(err)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn id(n: u8) -> ChunkId {
        ChunkId([n; 32])
    }

    #[test]
    fn old_chunks_go_refreshed_and_young_ones_stay() {
        let d = tempfile::tempdir().unwrap();
        let s = LocalStore::open(d.path()).unwrap();
        for n in 1..=3 {
            s.put(&id(n), &[n; 10]).unwrap();
        }
        let listed = chunk_files(&s).unwrap();
        assert_eq!(listed.len(), 3);
        let old = SystemTime::now() - Duration::from_secs(3600);
        for n in [1, 2] {
            let f = fs::OpenOptions::new()
                .write(true)
                .open(s.chunk_path(&id(n)))
                .unwrap();
            f.set_modified(old).unwrap();
        }
        // A writer reuses chunk 2: refreshed, so kept.
        assert_eq!(s.put(&id(2), &[2; 10]).unwrap(), crate::PutOutcome::Existed);
        let cutoff = SystemTime::now() - Duration::from_secs(60);
        assert!(remove_if_older(&s, &id(1), cutoff).unwrap());
        assert!(!remove_if_older(&s, &id(2), cutoff).unwrap());
        assert!(!remove_if_older(&s, &id(3), cutoff).unwrap());
        assert!(
            !s.exists(&id(1)).unwrap() && s.exists(&id(2)).unwrap() && s.exists(&id(3)).unwrap()
        );
        assert!(
            !remove_if_older(&s, &id(1), cutoff).unwrap(),
            "already gone"
        );
        assert_eq!(chunk_files(&s).unwrap().len(), 2, "nothing left aside");
    }

    #[test]
    fn a_put_after_the_collector_took_the_file_writes_it_again() {
        let d = tempfile::tempdir().unwrap();
        let s = LocalStore::open(d.path()).unwrap();
        s.put(&id(4), &[4; 10]).unwrap();
        fs::remove_file(s.chunk_path(&id(4))).unwrap();
        assert_eq!(s.put(&id(4), &[4; 10]).unwrap(), crate::PutOutcome::Written);
        assert_eq!(s.get(&id(4)).unwrap(), vec![4; 10]);
    }
}
