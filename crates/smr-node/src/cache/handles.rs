//! The open-file cache: a bounded cache (CLOCK, an approximation of LRU)
//! of open cache entries, so that loading an entry again is one `pread`
//! (no path lookup, no `open`, `flock`, `fstat`, `fgetxattr` or `close`),
//! and so that the kernel keeps the entries' inodes and dentries while they
//! are open: after `drop_caches`, reopening an entry costs directory and
//! inode block reads before its data is read at all. Entries are opened
//! when first loaded, read ahead, or inserted (the next load of a chunk just
//! fetched is likely soon).
//!
//! # What a cached handle holds, and why that is safe
//! A [`Handle`] is an entry opened read-only (`O_NOATIME`) with `LOCK_SH`
//! taken on it for as long as the handle lives, not only while a read is
//! under way, and with its length and recorded CRC-32C read once at open.
//! - **Is a `flock` per read still needed? No.** Reading through an open
//!   descriptor is safe without it: an entry unlinked by an evictor stays
//!   readable, whole, until the last descriptor is closed, and entries are
//!   never modified in place (inserts write a temp file and rename it). So
//!   a read racing an eviction would still return the right bytes. What
//!   the lock is for is the rest of the cache's promises, and for those
//!   holding it for the handle's life is as good as per read:
//! - **Eviction never evicts an entry being read.** The evictor skips the
//!   entries it cannot `LOCK_EX|LOCK_NB`, and an entry with a cached
//!   handle counts as being read. So no entry is unlinked while a process
//!   holds it open, and the evictor never counts bytes as freed that an
//!   open descriptor still keeps on the disk. A process evicting (or
//!   pruning) first drops its own handles ([`Handles::clear`]): only other
//!   processes' handles, and reads in progress, pin entries. An entry
//!   unlinked between our `open` and our `LOCK_SH` (the evictor won the
//!   race) is seen by its link count and not cached.
//! - **The byte budget.** Pinned entries cannot be evicted by anyone, so
//!   the handles of one process are bounded both in number and in bytes
//!   (see [`super::CacheConfig::open_files`]; bytes: a sixteenth of the
//!   disk budget). An eviction can only leave the total over the budget if
//!   the pins of all processes together exceed 90% of it (more than 14
//!   processes each holding its maximum). A process releases an entry as
//!   soon as the entry leaves its handle cache, or when it exits; until
//!   then `smr cache prune` from another process skips it (counted in
//!   `busy_skipped`), as it skips an entry being read. Space the budget
//!   does not see: an entry deleted behind the cache's back while open
//!   (`rm`, or a corrupt entry deleted by another process) keeps its blocks
//!   until the handle leaves the cache, at most the same bound.
//! - **Corruption is still caught on every load.** The bytes are read from
//!   the inode on each load and checked against the CRC-32C read at open
//!   (the attribute is set before the entry is renamed into place and
//!   never changes, so caching it loses nothing); bytes corrupted in place
//!   after the handle was opened fail the check as any damaged entry does:
//!   the handle is dropped, the entry deleted (only if its path still
//!   names that file) and the chunk refetched. If the path names another file by then
//!   (another process replaced the entry), that one is loaded instead.
//! - **Sharing the directory.** Other processes see the same locks,
//!   entries and timestamps whether or not a process keeps handles open; a
//!   handle changes nothing on disk.
//!   LRU-K history is still written to the entry (see `cache/disk.rs`).
//! - **Costs.** A file descriptor per handle (the soft `RLIMIT_NOFILE` is
//!   raised for them, see [`file_limit`]; out of descriptors, the cache is
//!   emptied and the open retried), and the kernel memory of the open
//!   files and their inodes (about a KiB each).

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use smr_format::ChunkId;

/// File descriptors left to the rest of the process when sizing the cache
/// from `RLIMIT_NOFILE` (sockets, FUSE, stores, logs).
const RESERVED_FDS: u64 = 1024;

/// An open, `LOCK_SH`-pinned cache entry (see the module docs).
#[derive(Debug)]
pub(crate) struct Handle {
    /// The entry, read-only, holding `LOCK_SH` until dropped.
    pub(crate) file: File,
    /// Its length at open (entries never change size; one that did is
    /// caught by the checksum).
    pub(crate) len: u64,
    /// Its recorded CRC-32C, `None` if it has none (checked by SHA-256).
    pub(crate) crc: Option<u32>,
    /// Device and inode, to tell whether the entry's path still names this
    /// file (before deleting it as corrupt).
    pub(crate) dev_ino: (u64, u64),
    /// The last access recorded on the entry that this process knows of,
    /// in nanoseconds since the epoch: loads closer than the granularity
    /// to it need no system call at all.
    recorded_ns: AtomicU64,
}

impl Handle {
    /// A handle for an open, locked entry whose last recorded access (its
    /// atime) is `recorded`.
    pub(crate) fn new(
        file: File,
        len: u64,
        crc: Option<u32>,
        dev_ino: (u64, u64),
        recorded: SystemTime,
    ) -> Self {
        Handle {
            file,
            len,
            crc,
            dev_ino,
            recorded_ns: AtomicU64::new(nanos(recorded)),
        }
    }

    /// Claims the recording of an access at `now`: true (and `now` becomes
    /// the last recorded access) if the last one this process knows of is
    /// at least `granularity` older and no other thread claimed it first.
    pub(crate) fn claim_record(&self, now: SystemTime, granularity: Duration) -> bool {
        let last = self.recorded_ns.load(Ordering::Relaxed);
        let last_t = UNIX_EPOCH + Duration::from_nanos(last);
        super::disk::due(last_t, now, granularity)
            && self
                .recorded_ns
                .compare_exchange(last, nanos(now), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    /// Notes that the entry's last recorded access is `t` (seen on disk).
    pub(crate) fn set_recorded(&self, t: SystemTime) {
        self.recorded_ns.store(nanos(t), Ordering::Relaxed);
    }
}

fn nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

struct Slot {
    handle: Arc<Handle>,
    /// Used since the clock hand last passed it.
    referenced: bool,
    /// Tells this slot's place in the ring from a stale one (the id was
    /// removed and cached again).
    generation: u64,
}

/// CLOCK (second chance), the usual approximation of LRU: a hit only sets
/// a flag (no reordering under the lock); the hand evicts the first entry
/// not used since it last went by.
#[derive(Default)]
struct Lru {
    slots: HashMap<ChunkId, Slot>,
    ring: VecDeque<(ChunkId, u64)>,
    bytes: u64,
    generation: u64,
}

impl Lru {
    fn remove(&mut self, id: &ChunkId) -> Option<Arc<Handle>> {
        let s = self.slots.remove(id)?;
        self.bytes -= s.handle.len;
        // Its place in the ring goes stale; drop stale places once they
        // are half of it.
        if self.ring.len() > 2 * self.slots.len() + 64 {
            let slots = &self.slots;
            self.ring
                .retain(|(id, g)| slots.get(id).is_some_and(|s| s.generation == *g));
        }
        Some(s.handle)
    }

    /// Evicts one handle (`None` if there are none).
    fn evict_one(&mut self) -> Option<Arc<Handle>> {
        while let Some((id, generation)) = self.ring.pop_front() {
            let Some(slot) = self.slots.get_mut(&id) else {
                continue;
            };
            if slot.generation != generation {
                continue;
            }
            if slot.referenced {
                slot.referenced = false;
                self.ring.push_back((id, generation));
                continue;
            }
            return self.remove(&id);
        }
        None
    }
}

/// The bounded cache of [`Handle`]s of one process.
pub(crate) struct Handles {
    lru: Mutex<Lru>,
    max_files: usize,
    max_bytes: u64,
}

impl Handles {
    /// At most `max_files` handles of at most `max_bytes` in all (either 0
    /// disables the cache).
    pub(crate) fn new(max_files: usize, max_bytes: u64) -> Self {
        Handles {
            lru: Mutex::new(Lru::default()),
            max_files,
            max_bytes,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Lru> {
        self.lru.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The handle of `id`, marked as used.
    pub(crate) fn get(&self, id: &ChunkId) -> Option<Arc<Handle>> {
        let mut lru = self.lock();
        let slot = lru.slots.get_mut(id)?;
        slot.referenced = true;
        Some(slot.handle.clone())
    }

    /// Whether `id` has a handle (without marking it used).
    pub(crate) fn contains(&self, id: &ChunkId) -> bool {
        self.lock().slots.contains_key(id)
    }

    /// Caches `handle` as `id`'s, unless another thread cached one first:
    /// returns the cached handle (or `handle` itself if it is not kept: the
    /// cache is disabled or the entry is larger than the byte bound). The
    /// least recently used handles (by the clock) go to stay within the
    /// bounds; they are closed (their locks released) after the cache's
    /// mutex is released.
    pub(crate) fn insert(&self, id: ChunkId, handle: Handle) -> Arc<Handle> {
        let handle = Arc::new(handle);
        if self.max_files == 0 || handle.len > self.max_bytes {
            return handle;
        }
        let mut closed = Vec::new();
        {
            let mut lru = self.lock();
            if let Some(s) = lru.slots.get(&id) {
                return s.handle.clone();
            }
            while lru.slots.len() >= self.max_files || lru.bytes + handle.len > self.max_bytes {
                match lru.evict_one() {
                    Some(h) => closed.push(h),
                    None => break,
                }
            }
            lru.generation += 1;
            let generation = lru.generation;
            lru.ring.push_back((id, generation));
            lru.bytes += handle.len;
            lru.slots.insert(
                id,
                Slot {
                    handle: handle.clone(),
                    referenced: false,
                    generation,
                },
            );
        }
        drop(closed);
        handle
    }

    /// Forgets `id`'s handle if it is `handle` (a newer one is kept).
    pub(crate) fn remove(&self, id: &ChunkId, handle: &Arc<Handle>) {
        let removed = {
            let mut lru = self.lock();
            match lru.slots.get(id) {
                Some(s) if Arc::ptr_eq(&s.handle, handle) => lru.remove(id),
                _ => None,
            }
        };
        drop(removed);
    }

    /// Closes every handle (those in use by a reader stay open, and pinned,
    /// until the read ends).
    pub(crate) fn clear(&self) {
        let all = {
            let mut lru = self.lock();
            lru.ring.clear();
            lru.bytes = 0;
            std::mem::take(&mut lru.slots)
        };
        drop(all);
    }

    /// Handles cached and the bytes of their entries.
    pub(crate) fn usage(&self) -> (u64, u64) {
        let lru = self.lock();
        (lru.slots.len() as u64, lru.bytes)
    }
}

/// How many handles a process may cache: `wanted`, less if the open-file
/// limit is too low for it and [`RESERVED_FDS`] more. Raises the soft
/// `RLIMIT_NOFILE` towards the hard limit if that is what it takes (a
/// process-wide setting; this process only uses `epoll`, never `select`,
/// so descriptors above 1024 are fine).
pub(crate) fn file_limit(wanted: usize) -> usize {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    if wanted == 0 {
        return 0;
    }
    let need = (wanted as u64).saturating_add(RESERVED_FDS);
    let lim = getrlimit(Resource::Nofile);
    let mut soft = lim.current.unwrap_or(u64::MAX);
    if soft < need {
        let raised = lim.maximum.map_or(need, |hard| hard.min(need));
        if raised > soft
            && setrlimit(
                Resource::Nofile,
                Rlimit {
                    current: Some(raised),
                    maximum: lim.maximum,
                },
            )
            .is_ok()
        {
            soft = raised;
        }
    }
    // With a low limit, keep half of it for the rest of the process.
    let room = soft.saturating_sub(RESERVED_FDS).max(soft / 2);
    usize::try_from(room.min(wanted as u64)).unwrap_or(wanted)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handle(len: u64) -> Handle {
        let file = tempfile::tempfile().expect("temp file");
        Handle::new(file, len, None, (0, 0), UNIX_EPOCH)
    }

    fn id(n: u8) -> ChunkId {
        ChunkId([n; 32])
    }

    #[test]
    fn bounded_by_files_and_bytes_in_lru_order() {
        let h = Handles::new(3, 100);
        for n in 0..3 {
            h.insert(id(n), handle(10));
        }
        assert!(
            h.get(&id(0)).is_some(),
            "0 is used: the clock spares it once"
        );
        h.insert(id(3), handle(10));
        assert!(!h.contains(&id(1)), "the oldest unused is closed");
        assert_eq!(h.usage(), (3, 30));
        // Bytes: 80 more only fit by closing the least recently used (2).
        h.insert(id(4), handle(80));
        assert_eq!(h.usage(), (3, 100));
        assert!(!h.contains(&id(2)));
        assert!(h.contains(&id(4)) && h.contains(&id(3)) && h.contains(&id(0)));
        h.insert(id(6), handle(20));
        assert_eq!(h.usage(), (2, 100), "two closed for 20 bytes");
        assert!(h.contains(&id(6)) && h.contains(&id(4)));
        let big = h.insert(id(5), handle(101));
        assert_eq!(big.len, 101, "handed back, not kept");
        assert!(!h.contains(&id(5)));
        h.clear();
        assert_eq!(h.usage(), (0, 0));
        let off = Handles::new(0, 100);
        off.insert(id(1), handle(1));
        assert_eq!(off.usage(), (0, 0), "0 files disables it");
    }

    #[test]
    fn the_first_handle_cached_wins_and_remove_takes_only_it() {
        let h = Handles::new(10, 1000);
        let a = h.insert(id(1), handle(10));
        let b = h.insert(id(1), handle(10));
        assert!(Arc::ptr_eq(&a, &b), "a racing open reuses the cached one");
        let stale = Arc::new(handle(10));
        h.remove(&id(1), &stale);
        assert!(h.contains(&id(1)), "another handle is not removed");
        h.remove(&id(1), &a);
        assert!(!h.contains(&id(1)));
        assert_eq!(h.usage(), (0, 0));
        // Removed and cached again many times: stale places in the clock's
        // ring are skipped and do not pile up.
        for _ in 0..1000 {
            let a = h.insert(id(1), handle(10));
            h.remove(&id(1), &a);
        }
        assert!(h.lock().ring.len() <= 65, "compacted past 64 stale places");
        for n in 0..12 {
            h.insert(id(n), handle(10));
        }
        assert_eq!(h.usage(), (10, 100));
        assert!(!h.contains(&id(0)) && !h.contains(&id(1)) && h.contains(&id(11)));
    }

    #[test]
    fn recording_is_claimed_once_per_granularity() {
        let t0 = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let h = Handle::new(tempfile::tempfile().expect("temp"), 1, None, (0, 0), t0);
        let minute = Duration::from_secs(60);
        assert!(!h.claim_record(t0 + Duration::from_secs(59), minute));
        assert!(h.claim_record(t0 + minute, minute));
        assert!(
            !h.claim_record(t0 + minute + Duration::from_secs(1), minute),
            "the claim moved the last recorded access"
        );
        assert!(h.claim_record(t0 + minute, Duration::ZERO));
    }

    #[test]
    fn file_limit_never_exceeds_what_is_wanted() {
        assert_eq!(file_limit(0), 0);
        let n = file_limit(64);
        assert!(n > 0 && n <= 64, "{n}");
    }
}
