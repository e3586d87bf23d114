//! Counters shared by every process using the cache directory.
//!
//! `DIR/stats` is one fixed record, rewritten in place under `flock`:
//!
//! ```text
//! magic "SMRCST01" | 11 × u64 LE (the fields of CacheCounters, in order)
//! | first 8 bytes of SHA-256 of everything before
//! ```
//!
//! Each process counts into in-memory deltas and adds them to the record
//! (read, modify, write under `LOCK_EX`) at every insert, at least every
//! [`FLUSH_EVERY`](super::FLUSH_EVERY) when active, on `stats()` and on drop.
//! A record that fails its checksum (a torn write after a power cut) is
//! reset: the total is rescanned, the history counters restart at zero.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use serde::Serialize;
use smr_format::ChunkId;

use super::disk;

const MAGIC: &[u8; 8] = b"SMRCST01";
const FIELDS: usize = 11;
const RECORD_LEN: usize = 8 + FIELDS * 8 + 8;

/// Node-wide counters, persisted in `DIR/stats`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct CacheCounters {
    /// Bytes of entries on disk (exact after open/prune/eviction, kept up
    /// to date by inserts and deletions in between).
    pub total_bytes: u64,
    /// Entries on disk.
    pub entries: u64,
    /// Chunks found on disk (verified) when not in a memory tier.
    pub hits: u64,
    /// Chunks not on disk at first look (each leads to a fetch, unless
    /// another process fetched it meanwhile).
    pub misses: u64,
    /// Chunks served from a process's memory tier.
    pub memory_hits: u64,
    /// Fetches from a store.
    pub fetches: u64,
    /// Stored bytes fetched from stores.
    pub fetched_bytes: u64,
    /// Fetches that failed (missing, I/O error, hash mismatch).
    pub fetch_errors: u64,
    /// Entries evicted (budget or prune).
    pub evictions: u64,
    /// Bytes evicted.
    pub evicted_bytes: u64,
    /// Entries found corrupt on load (deleted and refetched).
    pub corrupt: u64,
}

impl CacheCounters {
    fn to_array(self) -> [u64; FIELDS] {
        [
            self.total_bytes,
            self.entries,
            self.hits,
            self.misses,
            self.memory_hits,
            self.fetches,
            self.fetched_bytes,
            self.fetch_errors,
            self.evictions,
            self.evicted_bytes,
            self.corrupt,
        ]
    }

    fn from_array(a: [u64; FIELDS]) -> Self {
        let [total_bytes, entries, hits, misses, memory_hits, fetches, fetched_bytes, fetch_errors, evictions, evicted_bytes, corrupt] =
            a;
        CacheCounters {
            total_bytes,
            entries,
            hits,
            misses,
            memory_hits,
            fetches,
            fetched_bytes,
            fetch_errors,
            evictions,
            evicted_bytes,
            corrupt,
        }
    }

    fn encode(&self) -> [u8; RECORD_LEN] {
        let mut out = [0u8; RECORD_LEN];
        out[..8].copy_from_slice(MAGIC);
        for (i, v) in self.to_array().iter().enumerate() {
            out[8 + i * 8..16 + i * 8].copy_from_slice(&v.to_le_bytes());
        }
        let sum = ChunkId::of(&out[..RECORD_LEN - 8]);
        out[RECORD_LEN - 8..].copy_from_slice(&sum.0[..8]);
        out
    }

    fn decode(b: &[u8; RECORD_LEN]) -> Option<Self> {
        let (body, sum) = b.split_at(RECORD_LEN - 8);
        if !body.starts_with(MAGIC) || ChunkId::of(body).0.get(..8) != Some(sum) {
            return None;
        }
        let mut a = [0u64; FIELDS];
        for (i, chunk) in body[8..].chunks_exact(8).enumerate() {
            let mut w = [0u8; 8];
            w.copy_from_slice(chunk);
            a[i] = u64::from_le_bytes(w);
        }
        Some(Self::from_array(a))
    }
}

/// Deltas counted by this process and not yet added to the file.
#[derive(Debug, Default)]
pub(crate) struct Pending {
    pub(crate) total_bytes: AtomicI64,
    pub(crate) entries: AtomicI64,
    pub(crate) hits: AtomicU64,
    pub(crate) misses: AtomicU64,
    pub(crate) memory_hits: AtomicU64,
    pub(crate) fetches: AtomicU64,
    pub(crate) fetched_bytes: AtomicU64,
    pub(crate) fetch_errors: AtomicU64,
    pub(crate) evictions: AtomicU64,
    pub(crate) evicted_bytes: AtomicU64,
    pub(crate) corrupt: AtomicU64,
}

impl Pending {
    /// Moves the deltas into `c` (resetting them to zero).
    fn drain_into(&self, c: &mut CacheCounters) {
        let add = |v: &mut u64, d: &AtomicU64| *v = v.saturating_add(d.swap(0, Ordering::Relaxed));
        let add_signed = |v: &mut u64, d: &AtomicI64| {
            let d = d.swap(0, Ordering::Relaxed);
            *v = v.saturating_add_signed(d);
        };
        add_signed(&mut c.total_bytes, &self.total_bytes);
        add_signed(&mut c.entries, &self.entries);
        add(&mut c.hits, &self.hits);
        add(&mut c.misses, &self.misses);
        add(&mut c.memory_hits, &self.memory_hits);
        add(&mut c.fetches, &self.fetches);
        add(&mut c.fetched_bytes, &self.fetched_bytes);
        add(&mut c.fetch_errors, &self.fetch_errors);
        add(&mut c.evictions, &self.evictions);
        add(&mut c.evicted_bytes, &self.evicted_bytes);
        add(&mut c.corrupt, &self.corrupt);
    }

    /// Whether there is nothing to add to the file.
    pub(crate) fn is_empty(&self) -> bool {
        let zero = |a: &AtomicU64| a.load(Ordering::Relaxed) == 0;
        let zero_signed = |a: &AtomicI64| a.load(Ordering::Relaxed) == 0;
        zero_signed(&self.total_bytes)
            && zero_signed(&self.entries)
            && [
                &self.hits,
                &self.misses,
                &self.memory_hits,
                &self.fetches,
                &self.fetched_bytes,
                &self.fetch_errors,
                &self.evictions,
                &self.evicted_bytes,
                &self.corrupt,
            ]
            .into_iter()
            .all(zero)
    }
}

/// `DIR/stats`, open for the life of the cache.
#[derive(Debug)]
pub(crate) struct StatsFile {
    path: PathBuf,
    /// flock excludes other processes; the mutex excludes our own threads
    /// (they share this open file description, which flock does not).
    file: Mutex<File>,
    /// Bound on the wait for the flock.
    lock_timeout: std::time::Duration,
}

impl StatsFile {
    pub(crate) fn open(path: &Path, lock_timeout: std::time::Duration) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        Ok(StatsFile {
            path: path.to_path_buf(),
            file: Mutex::new(file),
            lock_timeout,
        })
    }

    /// Reads the record, adds `pending`, applies `f`, writes it back, all
    /// under the lock; returns the new record.
    pub(crate) fn update(
        &self,
        pending: &Pending,
        f: impl FnOnce(&mut CacheCounters),
    ) -> io::Result<CacheCounters> {
        let file = self.file.lock().unwrap_or_else(PoisonError::into_inner);
        disk::lock_within(&file, true, self.lock_timeout)?;
        let result = (|| {
            let mut buf = [0u8; RECORD_LEN];
            let mut c = match file.read_exact_at(&mut buf, 0) {
                Ok(()) => CacheCounters::decode(&buf).unwrap_or_else(|| {
                    tracing::warn!(path = %self.path.display(), "cache stats record damaged; counters restart");
                    CacheCounters::default()
                }),
                // A new (empty) file.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => CacheCounters::default(),
                Err(e) => return Err(e),
            };
            pending.drain_into(&mut c);
            f(&mut c);
            file.write_all_at(&c.encode(), 0)?;
            Ok(c)
        })();
        disk::unlock(&file)?;
        result
    }
}

/// What `smr cache stats` shows: the node-wide counters plus this process's
/// memory tier and fetch concurrency.
#[derive(Debug, Clone, Serialize)]
pub struct CacheStats {
    /// The cache directory.
    pub dir: PathBuf,
    /// The disk budget.
    pub budget_bytes: u64,
    /// Node-wide counters (every process, persisted).
    #[serde(flatten)]
    pub counters: CacheCounters,
    /// This process: bytes in the memory tier.
    pub memory_bytes: u64,
    /// This process: entries in the memory tier.
    pub memory_entries: u64,
    /// This process: the memory tier's budget.
    pub memory_budget_bytes: u64,
    /// This process: cache segments it holds open.
    pub open_files: u64,
    /// This process: the bytes of those segments.
    pub open_file_bytes: u64,
    /// This process: store fetches in flight now.
    pub inflight: u64,
    /// This process: the most store fetches ever in flight at once.
    pub max_inflight: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_roundtrip_and_damage() {
        let c = CacheCounters {
            total_bytes: 1,
            entries: 2,
            corrupt: 11,
            fetches: 6,
            ..Default::default()
        };
        let mut b = c.encode();
        assert_eq!(CacheCounters::decode(&b), Some(c));
        b[20] ^= 1;
        assert_eq!(CacheCounters::decode(&b), None);
    }

    #[test]
    fn update_adds_pending_and_persists() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("stats");
        let s = StatsFile::open(&path, std::time::Duration::from_secs(10)).expect("open");
        let p = Pending::default();
        p.hits.fetch_add(3, Ordering::Relaxed);
        p.total_bytes.fetch_add(100, Ordering::Relaxed);
        let c = s.update(&p, |_| {}).expect("update");
        assert_eq!((c.hits, c.total_bytes), (3, 100));
        p.total_bytes.fetch_sub(40, Ordering::Relaxed);
        drop(s);
        let s2 = StatsFile::open(&path, std::time::Duration::from_secs(10)).expect("reopen");
        let c = s2.update(&p, |c| c.evictions += 1).expect("update");
        assert_eq!((c.hits, c.total_bytes, c.evictions), (3, 60, 1));
        assert_eq!(p.hits.load(Ordering::Relaxed), 0, "deltas drained");
    }
}
