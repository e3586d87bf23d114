//! The disk budget follows the free space of the cache's filesystem: the
//! cache never takes the last few percent of a disk it shares with the
//! node's containers and logs, whatever budget it was given. A full disk is
//! said once, not on every chunk.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

/// Part of the filesystem the cache leaves free: 1/20 (5%) ...
const RESERVE_DIVISOR: u64 = 20;
/// ... but no more than 1 GiB.
const MAX_RESERVE: u64 = 1 << 30;

/// The budget in force: `configured`, or less when the filesystem of `dir`
/// cannot hold it: what the cache holds (`used`) plus the free space beyond
/// the reserve. `configured` if the filesystem cannot be asked.
pub(crate) fn budget(dir: &Path, configured: u64, used: u64) -> u64 {
    let Ok(st) = rustix::fs::statvfs(dir) else {
        return configured;
    };
    let size = st.f_blocks.saturating_mul(st.f_frsize);
    let free = st.f_bavail.saturating_mul(st.f_frsize);
    let reserve = (size / RESERVE_DIVISOR).min(MAX_RESERVE);
    configured.min(used.saturating_add(free.saturating_sub(reserve)))
}

/// Whether `e` says the filesystem or the quota is full.
pub(crate) fn is_full(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
}

/// A warning given once per process; later occurrences are debug logs.
#[derive(Debug, Default)]
pub(crate) struct Once(AtomicBool);

impl Once {
    /// True the first time.
    pub(crate) fn first(&self) -> bool {
        !self.0.swap(true, Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_never_exceeds_what_the_disk_has_left() {
        let dir = tempfile::tempdir().unwrap();
        let st = rustix::fs::statvfs(dir.path()).unwrap();
        let free = st.f_bavail * st.f_frsize;
        let b = budget(dir.path(), u64::MAX, 0);
        assert!(b < free, "{b} < {free}");
        assert_eq!(budget(dir.path(), 4096, 0), 4096, "a small budget holds");
        assert_eq!(budget(Path::new("/nonexistent/x"), 77, 0), 77);
        let once = Once::default();
        assert!(once.first() && !once.first());
    }
}
