//! Eviction: LRU-K (K = 2) over the entries' timestamps.
//!
//! Each entry's history lives in its own inode, so every process sees it
//! and it survives restarts: atime is the last access, mtime the one before
//! (0 = accessed once so far). Victims, in order:
//! 1. entries accessed once (mtime = 0), least recent access first — a scan
//!    of chunks read once can only push out other chunks read once;
//! 2. then the rest by their K-th (2nd) most recent access, oldest first.
//!
//! Entries of images in use (pinned: `cache/pins.rs`) come after all
//! others, in the same order.
//!
//! An entry being read holds `LOCK_SH` (so does every entry a process keeps
//! open in its handle cache: `cache/handles.rs`); the evictor takes
//! `LOCK_EX|LOCK_NB` and skips entries it cannot lock.
//!
//! Accesses are recorded with a granularity (default a minute): see
//! [`super::CacheConfig::access_granularity`] and the module docs of
//! `cache`.

use std::fs::{self, File};
use std::io::{self, ErrorKind};
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use smr_format::ChunkId;

use super::disk::{self, Layout};

/// What a prune (or an eviction pass) did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PruneReport {
    /// Entries found by the scan.
    pub scanned_entries: u64,
    /// Their bytes.
    pub scanned_bytes: u64,
    /// Entries deleted.
    pub evicted_entries: u64,
    /// Their bytes.
    pub evicted_bytes: u64,
    /// Entries skipped because a reader held them.
    pub busy_skipped: u64,
    /// Entries left.
    pub remaining_entries: u64,
    /// Bytes left.
    pub remaining_bytes: u64,
    /// Temp files of dead inserts removed (prune and open only).
    pub temp_removed: u64,
}

/// One entry as seen by a scan.
#[derive(Debug)]
pub(crate) struct Scanned {
    path: PathBuf,
    len: u64,
    /// Last access.
    atime: SystemTime,
    /// The access before (UNIX_EPOCH: none yet).
    mtime: SystemTime,
}

impl Scanned {
    /// The entry's size in bytes.
    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    fn accessed_once(&self) -> bool {
        self.mtime <= UNIX_EPOCH
    }

    /// Sort key: accessed-once entries first by last access, then the rest
    /// by their second most recent access.
    fn victim_order(&self) -> (bool, SystemTime) {
        if self.accessed_once() {
            (false, self.atime)
        } else {
            (true, self.mtime)
        }
    }
}

/// Every well-named entry of the cache (files whose name is not a chunk id
/// are ignored: they are never read as entries).
pub(crate) fn scan(layout: &Layout) -> io::Result<Vec<Scanned>> {
    let mut out = Vec::new();
    for sub in fs::read_dir(&layout.chunks)? {
        let sub = sub?;
        if !sub.file_type()?.is_dir() {
            continue;
        }
        for e in fs::read_dir(sub.path())? {
            let e = e?;
            let name = e.file_name();
            if name
                .to_str()
                .and_then(|n| n.parse::<ChunkId>().ok())
                .is_none()
            {
                continue;
            }
            let meta = match e.metadata() {
                Ok(m) if m.is_file() => m,
                Ok(_) => continue,
                Err(err) if err.kind() == ErrorKind::NotFound => continue,
                Err(err) => return Err(err),
            };
            out.push(Scanned {
                path: e.path(),
                len: meta.len(),
                atime: meta.accessed().unwrap_or(UNIX_EPOCH),
                mtime: meta.modified().unwrap_or(UNIX_EPOCH),
            });
        }
    }
    Ok(out)
}

/// Deletes entries in LRU-K order until at most `target` bytes remain.
/// The caller holds the global lock.
pub(crate) fn evict_to(layout: &Layout, target: u64) -> io::Result<PruneReport> {
    let mut entries = scan(layout)?;
    // Chunks of images in use go last (super::pins).
    let pinned = super::pins::pinned(layout).unwrap_or_else(|e| {
        tracing::warn!(error = %e, "reading the cache's pins; evicting without them");
        Default::default()
    });
    let is_pinned = |e: &Scanned| {
        e.path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.parse::<ChunkId>().ok())
            .is_some_and(|id| pinned.contains(&id))
    };
    entries.sort_by_key(|e| (is_pinned(e), e.victim_order()));
    let mut r = PruneReport {
        scanned_entries: entries.len() as u64,
        scanned_bytes: entries.iter().map(|e| e.len).sum(),
        ..Default::default()
    };
    r.remaining_entries = r.scanned_entries;
    r.remaining_bytes = r.scanned_bytes;
    for e in &entries {
        if r.remaining_bytes <= target {
            break;
        }
        let f = match File::open(&e.path) {
            Ok(f) => f,
            Err(err) if err.kind() == ErrorKind::NotFound => {
                // Gone meanwhile (a corrupt entry deleted by a reader).
                r.remaining_entries -= 1;
                r.remaining_bytes -= e.len;
                continue;
            }
            Err(err) => return Err(err),
        };
        if !disk::try_lock_exclusive(&f)? {
            r.busy_skipped += 1;
            continue;
        }
        match fs::remove_file(&e.path) {
            Ok(()) => {
                r.evicted_entries += 1;
                r.evicted_bytes += e.len;
            }
            Err(err) if err.kind() == ErrorKind::NotFound => {}
            Err(err) => return Err(err),
        }
        r.remaining_entries -= 1;
        r.remaining_bytes -= e.len;
        tracing::debug!(path = %e.path.display(), len = e.len, once = e.accessed_once(), "evicted");
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn victim_order_is_lru_2() {
        let t = |s| UNIX_EPOCH + Duration::from_secs(s);
        let e = |name: &str, atime, mtime| Scanned {
            path: name.into(),
            len: 1,
            atime,
            mtime,
        };
        let mut v = [
            e("warm-old-2nd", t(100), t(10)),
            e("once-new", t(90), UNIX_EPOCH),
            e("warm-new-2nd", t(50), t(40)),
            e("once-old", t(80), UNIX_EPOCH),
        ];
        v.sort_by_key(Scanned::victim_order);
        let names: Vec<_> = v.iter().map(|e| e.path.display().to_string()).collect();
        assert_eq!(
            names,
            ["once-old", "once-new", "warm-old-2nd", "warm-new-2nd"]
        );
    }
}
