//! Eviction: whole segments, LRU-K (K = 2) over the segments' timestamps.
//!
//! Each segment's history lives in its inode, so every process sees it and
//! it survives restarts: atime is the last access, mtime the one before
//! (0 = accessed once so far: a segment is sealed with that history).
//! Victims, in order:
//! 1. segments accessed once (mtime = 0), least recent access first — a
//!    scan of chunks read once can only push out other chunks read once;
//! 2. then the rest by their K-th (2nd) most recent access, oldest first.
//!
//! Segments holding a chunk of an image in use (pinned: `cache/pins.rs`)
//! come after all others, in the same order. Segments still being written
//! are never evicted (counted as busy). A segment is deleted while readers
//! may have it open: they still read correct bytes (`cache/segments.rs`).
//!
//! Accesses are recorded with a granularity (default a minute): see
//! [`super::CacheConfig::access_granularity`].

use std::io;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::disk::Layout;
use super::segments::{SegInfo, Segments};

/// What a prune (or an eviction pass) did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PruneReport {
    /// Entries found by the scan.
    pub scanned_entries: u64,
    /// Bytes of the segments found.
    pub scanned_bytes: u64,
    /// Entries deleted (with their segments).
    pub evicted_entries: u64,
    /// Bytes of the segments deleted.
    pub evicted_bytes: u64,
    /// Segments deleted.
    pub evicted_segments: u64,
    /// Segments skipped because a process is still writing them.
    pub busy_skipped: u64,
    /// Entries left.
    pub remaining_entries: u64,
    /// Bytes left.
    pub remaining_bytes: u64,
    /// Segments of processes that died, sealed (or removed when they held
    /// nothing), by prune and open only.
    pub abandoned_sealed: u64,
}

/// Sort key: segments accessed once first by last access, then the rest
/// by their second most recent access.
fn victim_order(s: &SegInfo) -> (bool, bool, SystemTime) {
    if s.mtime <= UNIX_EPOCH {
        (s.pinned, false, s.atime)
    } else {
        (s.pinned, true, s.mtime)
    }
}

/// Deletes sealed segments in LRU-K order until at most `target` bytes
/// remain. The caller holds the global lock.
pub(crate) fn evict_to(layout: &Layout, segs: &Segments, target: u64) -> io::Result<PruneReport> {
    // Chunks of images in use go last (super::pins).
    let pinned = super::pins::pinned(layout).unwrap_or_else(|e| {
        tracing::warn!(error = %e, "reading the cache's pins; evicting without them");
        Default::default()
    });
    let mut all = segs.survey(&pinned)?;
    all.sort_by_key(victim_order);
    let mut r = PruneReport {
        scanned_entries: all.iter().map(|s| s.entries).sum(),
        scanned_bytes: all.iter().map(|s| s.len).sum(),
        ..Default::default()
    };
    r.remaining_entries = r.scanned_entries;
    r.remaining_bytes = r.scanned_bytes;
    for s in &all {
        if r.remaining_bytes <= target {
            break;
        }
        if !s.sealed {
            r.busy_skipped += 1;
            continue;
        }
        segs.remove(s.id)?;
        r.evicted_segments += 1;
        r.evicted_entries += s.entries;
        r.evicted_bytes += s.len;
        r.remaining_entries -= s.entries;
        r.remaining_bytes -= s.len;
        tracing::debug!(
            segment = s.id,
            len = s.len,
            entries = s.entries,
            pinned = s.pinned,
            "evicted"
        );
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn victim_order_is_lru_2_with_pins_last() {
        let t = |s| UNIX_EPOCH + Duration::from_secs(s);
        let seg = |id, atime, mtime, pinned| SegInfo {
            id,
            len: 1,
            atime,
            mtime,
            sealed: true,
            entries: 1,
            pinned,
        };
        let mut v = [
            seg(1, t(100), t(10), false),
            seg(2, t(90), UNIX_EPOCH, false),
            seg(3, t(50), t(40), false),
            seg(4, t(80), UNIX_EPOCH, false),
            seg(5, t(1), UNIX_EPOCH, true),
        ];
        v.sort_by_key(victim_order);
        let ids: Vec<_> = v.iter().map(|s| s.id).collect();
        assert_eq!(ids, [4, 2, 1, 3, 5]);
    }
}
