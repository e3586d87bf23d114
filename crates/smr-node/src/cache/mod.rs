//! The node chunk cache: one directory per node, shared by every image and
//! every process, plus a small per-process memory tier.
//!
//! # Design
//! - **What is stored.** Entries hold a chunk's *stored* bytes (ciphertext
//!   when the image is encrypted), as AWS Lambda does: data at rest on the
//!   node stays encrypted, and decrypting on load is cheap. Entries are
//!   appended to segment files in the order they are fetched, found
//!   through the segments' journals (`cache/segments.rs`, formats in
//!   `cache/journal.rs`), so that a warm read gets the disk's readahead.
//!   Bytes fetched from a store are hashed before they are inserted, so
//!   nothing unverified is ever cached or served; the insert records the
//!   entry's CRC-32C, which is checked every time the entry is loaded from
//!   disk; a mismatch condemns that entry alone (a tombstone in the
//!   journal), counts a `corrupt` event and refetches the chunk. Why a CRC
//!   and what it does not protect against: `cache/disk.rs`.
//! - **Crash safety without fsync.** An entry's journal record is written
//!   after its bytes; nothing is fsynced: a cache needs no durability,
//!   only never to serve a wrong byte. After a power cut a journal may end
//!   in a torn record (it ends there) or name bytes that were lost (their
//!   CRC fails on load, the chunk is refetched). The segment of a killed
//!   process is sealed by the next [`Cache::open`] or [`Cache::prune`].
//!   An fsync would cost a journal commit per chunk fetched.
//! - **Memory tier.** A byte-bounded LRU (default 16 MiB) of decoded,
//!   verified chunks per process, so that the many small reads the kernel
//!   makes inside one chunk neither re-read nor re-hash it. It is keyed by
//!   chunk *and* decryption key ([`DecodeKey`]). Only chunks read in part
//!   are kept (the caller says, `keep`): a reader taking whole chunks, a
//!   scan, would only push the others out.
//! - **Single flight.** Within a process, a map of fetches in flight makes
//!   concurrent readers of one chunk wait for one fetch (and one decode).
//!   Across processes (and so across images), the fetching thread holds
//!   the chunk's byte lock in `DIR/fetch.lock` (`cache/fetch_lock.rs`: no
//!   file per chunk), then brings its index up to date and looks again
//!   before fetching. No global lock is held during a fetch.
//! - **Budget and LRU-K.** Inserts add to a node-wide total in `DIR/stats`
//!   (with the other counters, at most once a second, see below); an insert
//!   that takes the total known to this process over the budget evicts,
//!   under `DIR/lock`, down to 90% of the budget, whole segments at a time
//!   (a segment is a sixteenth of the budget, at most 64 MiB). Order and
//!   history: `cache/evict.rs`. An access is recorded in the segment's
//!   timestamps only if the last one recorded is at least
//!   [`CacheConfig::access_granularity`] old (default 60 s), for loads
//!   from disk and hits from the memory tier alike: LRU-K's "correlated
//!   reference period", accesses closer than that count as one. A chunk
//!   read once in a scan leaves its segment among the first victims; a
//!   segment read again minutes or days later ranks by that second
//!   access. What it buys: a warm read writes no metadata.
//! - **Idle writers.** A process's segment is sealed when nothing was
//!   appended to it for 30 s (checked once a second), so that a server
//!   that stopped fetching does not keep its last segment from eviction.
//! - **Open segments.** Each process keeps the segments it reads open, so
//!   that a load is a single `pread`. Evicted segments stay readable
//!   through those descriptors (sealed segments are never written), and
//!   are closed at the next refresh of the index (at most a second later).
//! - **Counters.** Hits, misses, fetches, evictions and the rest are
//!   counted in memory per process and added to `DIR/stats` under `flock`
//!   (format in `cache/stats.rs`) at most once every [`FLUSH_EVERY`] (by
//!   the thread that changes them, or a timer thread when the process is
//!   idle), [`FLUSH_SETTLE`] after they last changed (the end of a burst,
//!   by the timer thread), and when the cache is dropped; `smr cache stats` in another
//!   process sees them. The total is rescanned on open
//!   and prune. So processes see each other's inserts up to a second late,
//!   and the budget can be overshot by what the node fetches meanwhile.
//! - **Concurrency.** Many fetches may be in flight (one per chunk); a pool
//!   of [`CacheConfig::fetch_threads`] threads serves prefetches and the
//!   extra chunks of multi-chunk reads. [`CacheStats::inflight`] and
//!   [`CacheStats::max_inflight`] show the fetch concurrency reached.
//!
//! - **Who may touch it.** The directory is its owner's alone (`0700`:
//!   created so, an existing one with wider permissions is narrowed on
//!   open, one owned by another user is refused), so no other user can
//!   hold one of its locks or read its entries. Every wait for a lock has
//!   a bound ([`CacheConfig::lock_timeout`], default 60 s): past it a
//!   miss is fetched without the fetch lock (a duplicate fetch at worst),
//!   and the other waits fail with an error naming the file.
//!
//! All processes sharing a directory must run as the same user (setting
//! timestamps, and opening entries with `O_NOATIME`, require owning the
//! files).

pub(crate) mod disk;
mod error;
mod evict;
mod fetch_lock;
mod flight;
mod journal;
mod memory;
mod pins;
mod pool;
mod segments;
mod space;
mod stats;

#[cfg(test)]
mod tests;

pub use error::{CacheError, Result};
pub use evict::PruneReport;
pub use memory::DecodeKey;
pub use pins::Pin;
pub use stats::{CacheCounters, CacheStats};

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use smr_format::{ChunkId, FormatError};

use crate::chunks::ChunkError;
use disk::Layout;
use flight::Flights;
use memory::MemoryLru;
use pool::{FetchPool, Job};
use segments::{Load, Segments};
use stats::{Pending, StatsFile};

/// Where the node cache lives unless told otherwise (`--cache-dir`,
/// `SMR_CACHE_DIR`).
pub const DEFAULT_DIR: &str = "/var/lib/smr/cache";
/// Default disk budget: 10 GiB.
pub const DEFAULT_BUDGET_BYTES: u64 = 10 << 30;
/// Default memory tier: 16 MiB per process, shared by every image the
/// process serves. It only has to hold the chunks that reads are working
/// through (the kernel reads a chunk in several requests); the disk tier
/// and the page cache hold the rest. Part of the serving process's memory
/// budget (under 64 MiB while serving 4 images; docs/BENCHMARKS.md).
pub const DEFAULT_MEMORY_BYTES: u64 = 16 << 20;
/// Default number of fetch threads per process.
pub const DEFAULT_FETCH_THREADS: usize = 16;
/// How often an active process adds its counters to `DIR/stats`.
pub const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// How long after its counters last changed a process adds what it has
/// not added yet (the end of a burst: a container's start, say), so that
/// `smr status` and `smr cache stats` asked just after it see it.
pub const FLUSH_SETTLE: Duration = Duration::from_millis(25);
/// A process's segment with nothing appended for this long is sealed, so
/// that an idle server's last segment can be evicted.
const SEAL_IDLE_AFTER: Duration = Duration::from_secs(30);
/// Default [`CacheConfig::access_granularity`]: accesses to one entry
/// closer than this to the last recorded one count once for LRU-K.
pub const DEFAULT_ACCESS_GRANULARITY: Duration = Duration::from_secs(60);

/// How to open a [`Cache`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheConfig {
    /// The cache directory (created if needed).
    pub dir: PathBuf,
    /// Disk budget: bytes of entries kept before evicting.
    pub budget_bytes: u64,
    /// Memory tier budget of this process (0 disables it).
    pub memory_bytes: u64,
    /// Threads for prefetches and multi-chunk reads.
    pub fetch_threads: usize,
    /// LRU-K's correlated reference period: an access to an entry less
    /// than this after the last one recorded is not recorded (no metadata
    /// write); the two count as one access. `Duration::ZERO` records
    /// every access.
    pub access_granularity: Duration,
    /// Bound on every wait for a lock in the cache directory (another
    /// process's fetch of the same chunk, the stats record, an entry):
    /// past it a fetch goes ahead without the fetch lock, and other waits
    /// fail with an error naming the file. Default
    /// [`DEFAULT_LOCK_TIMEOUT`], or `SMR_CACHE_LOCK_TIMEOUT` (seconds).
    pub lock_timeout: Duration,
}

/// Default [`CacheConfig::lock_timeout`].
pub const DEFAULT_LOCK_TIMEOUT: Duration = Duration::from_secs(60);

/// Environment variable overriding [`DEFAULT_LOCK_TIMEOUT`] (seconds,
/// fractions allowed).
pub const LOCK_TIMEOUT_ENV: &str = "SMR_CACHE_LOCK_TIMEOUT";

/// [`DEFAULT_LOCK_TIMEOUT`], or [`LOCK_TIMEOUT_ENV`] when it holds a
/// positive number of seconds (anything else is ignored with a warning).
fn lock_timeout_from_env() -> Duration {
    let Some(v) = std::env::var_os(LOCK_TIMEOUT_ENV) else {
        return DEFAULT_LOCK_TIMEOUT;
    };
    match v.to_str().and_then(|s| s.parse::<f64>().ok()) {
        Some(s) if s > 0.0 && s.is_finite() && s < 1e9 => Duration::from_secs_f64(s),
        _ => {
            tracing::warn!(value = ?v, "{LOCK_TIMEOUT_ENV} is not a positive number of seconds; using {DEFAULT_LOCK_TIMEOUT:?}");
            DEFAULT_LOCK_TIMEOUT
        }
    }
}

impl CacheConfig {
    /// Defaults for everything but the directory.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        CacheConfig {
            dir: dir.into(),
            budget_bytes: DEFAULT_BUDGET_BYTES,
            memory_bytes: DEFAULT_MEMORY_BYTES,
            fetch_threads: DEFAULT_FETCH_THREADS,
            access_granularity: DEFAULT_ACCESS_GRANULARITY,
            lock_timeout: lock_timeout_from_env(),
        }
    }
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig::new(DEFAULT_DIR)
    }
}

/// The node cache (see the module docs). Share it as `Arc<Cache>`.
pub struct Cache {
    cfg: CacheConfig,
    layout: Layout,
    stats_file: StatsFile,
    pending: Pending,
    memory: Mutex<MemoryLru>,
    segs: Segments,
    raw: Flights<ChunkId>,
    decoded: Flights<DecodeKey>,
    pool: FetchPool,
    inflight: AtomicU64,
    max_inflight: AtomicU64,
    opened: Instant,
    flushed_ms: AtomicU64,
    /// When the counters last changed (ms since `opened`).
    changed_ms: AtomicU64,
    /// Counters changed since the last flush wait for the flusher thread
    /// ([`FLUSH_SETTLE`]).
    trailing: AtomicBool,
    /// The flusher thread, woken when `trailing` is set.
    flusher: std::sync::OnceLock<std::thread::Thread>,
    /// The node-wide total of entry bytes as of the last flush.
    known_total: AtomicU64,
    /// A failed insert was warned about (later ones are debug logs).
    insert_warned: space::Once,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl Cache {
    /// Opens (creating) the cache directory: reads the segments' journals,
    /// seals the segments of dead processes, rescans the total size and
    /// evicts down to the budget if it is over.
    pub fn open(cfg: CacheConfig) -> Result<Arc<Cache>> {
        let layout = Layout::create(&cfg.dir).map_err(|e| CacheError::io(&cfg.dir, e))?;
        // Segments are a sixteenth of the budget the disk can hold.
        let budget = space::budget(&cfg.dir, cfg.budget_bytes, 0);
        let segs = Segments::open(&layout.segments, budget)
            .map_err(|e| CacheError::io(&layout.segments, e))?;
        let stats_file = StatsFile::open(&layout.stats(), cfg.lock_timeout)
            .map_err(|e| CacheError::io(layout.stats(), e))?;
        let cache = Cache {
            memory: Mutex::new(MemoryLru::new(cfg.memory_bytes)),
            segs,
            pool: FetchPool::new(cfg.fetch_threads),
            cfg,
            layout,
            stats_file,
            pending: Pending::default(),
            raw: Flights::new(),
            decoded: Flights::new(),
            inflight: AtomicU64::new(0),
            max_inflight: AtomicU64::new(0),
            opened: Instant::now(),
            flushed_ms: AtomicU64::new(0),
            changed_ms: AtomicU64::new(0),
            trailing: AtomicBool::new(false),
            flusher: std::sync::OnceLock::new(),
            known_total: AtomicU64::new(0),
            insert_warned: space::Once::default(),
        };
        let global = cache.global_lock(true)?;
        let root_io = |e| CacheError::io(&cache.layout.root, e);
        if cache.layout.remove_per_entry_files().map_err(root_io)? {
            tracing::info!(dir = %cache.cfg.dir.display(), "removed the entries of the file-per-entry layout");
        }
        let segs_io = |e| CacheError::io(&cache.layout.segments, e);
        cache.segs.seal_abandoned().map_err(segs_io)?;
        let survey = cache.segs.survey(&Default::default()).map_err(segs_io)?;
        let bytes = survey.iter().map(|s| s.len).sum();
        let n = cache.segs.entries();
        cache.update_stats(|c| {
            c.total_bytes = bytes;
            c.entries = n;
        })?;
        let budget = cache.budget(bytes);
        if bytes > budget {
            // Opened with a smaller budget than the directory holds, or the
            // disk filled up.
            cache.evict_locked(low_watermark(budget))?;
        }
        drop(global);
        tracing::debug!(dir = %cache.cfg.dir.display(), entries = n, bytes, "cache opened");
        let cache = Arc::new(cache);
        start_flusher(&cache);
        Ok(cache)
    }

    /// The configuration it was opened with.
    pub fn config(&self) -> &CacheConfig {
        &self.cfg
    }

    /// The cache directory.
    pub fn dir(&self) -> &Path {
        &self.cfg.dir
    }

    /// Whether chunk `id` has an entry on disk as far as this process
    /// knows (not verified; the index is brought up to date at least once
    /// a second).
    pub fn contains(&self, id: &ChunkId) -> bool {
        self.segs.contains(id)
    }

    /// Whether chunk `id` is neither being fetched (or loaded) through
    /// [`Cache::get_or_fetch`] in this process nor on disk: checked in that
    /// order, so a chunk that a fetch is inserting is never reported
    /// missing.
    pub fn is_missing(&self, id: &ChunkId) -> bool {
        !self.raw.contains(id) && !self.contains(id)
    }

    /// Like [`Cache::contains`], and if the entry exists, starts reading it
    /// from the disk in the background (so that loading it soon after does
    /// not wait): what a multi-chunk read does for the chunks after the
    /// first, so that their disk reads overlap without extra threads.
    pub fn contains_readahead(&self, id: &ChunkId) -> bool {
        self.segs.readahead(id)
    }

    /// The decoded bytes of a chunk if the node has it (memory tier, else
    /// disk, then `decode`), never fetching; `None` if it has not, or if
    /// loading or decoding it fails (a corrupt entry is dropped as by any
    /// load). Not kept in the memory tier.
    pub fn get_decoded_cached(
        &self,
        key: &DecodeKey,
        decode: impl FnOnce(Vec<u8>) -> Result<Vec<u8>, ChunkError>,
    ) -> Option<Arc<Vec<u8>>> {
        self.decoded_at_hand(key, false, true, decode)
    }

    /// The verified stored bytes of chunk `id`: from disk, or from `fetch`
    /// (called at most once per chunk at a time on the node) and inserted.
    /// Does not use the memory tier.
    pub fn get_or_fetch(
        &self,
        id: &ChunkId,
        fetch: impl FnOnce() -> Result<Vec<u8>, ChunkError>,
    ) -> Result<Arc<Vec<u8>>> {
        let r = self
            .raw
            .run(id, *id, || self.load_or_fetch(id, fetch).map(Arc::new));
        self.maybe_flush();
        r
    }

    /// The decoded (plaintext, verified) bytes of a chunk: from the memory
    /// tier, else [`Cache::get_or_fetch`] then `decode`, kept in memory if
    /// `keep`. A reader that takes a whole chunk (a sequential scan, say)
    /// is unlikely to want it again soon: keeping it would only push out
    /// chunks that partial readers come back to.
    pub fn get_decoded(
        &self,
        key: &DecodeKey,
        keep: bool,
        fetch: impl FnOnce() -> Result<Vec<u8>, ChunkError>,
        decode: impl FnOnce(Vec<u8>) -> Result<Vec<u8>, ChunkError>,
    ) -> Result<Arc<Vec<u8>>> {
        if let Some(data) = self.memory_get(key, true) {
            self.maybe_flush();
            return Ok(data);
        }
        let r = self.decoded.run(key, key.id, || {
            // Another leader may have finished since we looked.
            if let Some(data) = self.memory_get(key, true) {
                return Ok(data);
            }
            let stored = self.get_or_fetch(&key.id, fetch)?;
            let stored = Arc::try_unwrap(stored).unwrap_or_else(|shared| (*shared).clone());
            let plain = decode(stored).map_err(|source| CacheError::Decode {
                id: key.id,
                source: Box::new(source),
            })?;
            let plain = Arc::new(plain);
            if keep {
                self.keep(key, &plain);
            }
            Ok(plain)
        });
        self.maybe_flush();
        r
    }

    /// [`Cache::get_decoded`] (`keep` alike) for a chunk at hand: from the
    /// memory tier, or from a segment already open whose bytes for it are
    /// all in the page cache. `None` when that would wait for a disk read
    /// or a fetch, or when anything went wrong (decoding included):
    /// `get_decoded` then waits, and reports. Never waits for a chunk's
    /// disk read or fetch, so an event loop can serve warm reads itself.
    pub fn get_decoded_now(
        &self,
        key: &DecodeKey,
        keep: bool,
        decode: impl FnOnce(Vec<u8>) -> Result<Vec<u8>, ChunkError>,
    ) -> Option<Arc<Vec<u8>>> {
        self.decoded_at_hand(key, keep, false, decode)
    }

    /// The body of [`Cache::get_decoded_now`] (`wait` false: no disk read
    /// waited for, access times recorded in the background) and of
    /// [`Cache::get_decoded_cached`] (`wait` true).
    fn decoded_at_hand(
        &self,
        key: &DecodeKey,
        keep: bool,
        wait: bool,
        decode: impl FnOnce(Vec<u8>) -> Result<Vec<u8>, ChunkError>,
    ) -> Option<Arc<Vec<u8>>> {
        if let Some(data) = self.memory_get(key, wait) {
            self.maybe_flush();
            return Some(data);
        }
        let stored = if wait {
            self.load_disk(&key.id)
        } else {
            self.segs.load_now(&key.id, self.cfg.access_granularity)
        }?;
        self.pending.hits.fetch_add(1, Ordering::Relaxed);
        let plain = Arc::new(decode(stored).ok()?);
        if keep {
            self.keep(key, &plain);
        }
        self.maybe_flush();
        Some(plain)
    }

    /// Puts decoded bytes in the memory tier.
    pub(crate) fn keep(&self, key: &DecodeKey, plain: &Arc<Vec<u8>>) {
        self.memory
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .put(key.clone(), plain.clone());
    }

    /// The memory tier's copy of a decoded chunk, if it holds one.
    pub(crate) fn kept(&self, key: &DecodeKey) -> Option<Arc<Vec<u8>>> {
        self.memory_get(key, false)
    }

    /// Whether the memory tier holds `key`.
    pub fn in_memory(&self, key: &DecodeKey) -> bool {
        self.memory
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(key)
    }

    /// Node-wide counters (after adding this process's) and this process's
    /// memory tier and fetch concurrency.
    pub fn stats(&self) -> Result<CacheStats> {
        let counters = self.update_stats(|_| {})?;
        let (memory_bytes, memory_entries) = self
            .memory
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .usage();
        let (open_files, open_file_bytes) = self.segs.open_files();
        Ok(CacheStats {
            dir: self.cfg.dir.clone(),
            budget_bytes: self.cfg.budget_bytes,
            counters,
            memory_bytes,
            memory_entries,
            memory_budget_bytes: self.cfg.memory_bytes,
            open_files,
            open_file_bytes,
            inflight: self.inflight.load(Ordering::Relaxed),
            max_inflight: self.max_inflight.load(Ordering::Relaxed),
        })
    }

    /// Pins `ids` (the chunks of an image in use) until the returned
    /// [`Pin`] is dropped: evictions take them last (`cache/pins.rs`).
    pub fn pin(&self, ids: impl IntoIterator<Item = ChunkId>) -> Result<Pin> {
        pins::pin(&self.layout, ids).map_err(|source| CacheError::Io {
            path: self.layout.root.join("pins"),
            source,
        })
    }

    /// Evicts whole segments (LRU-K order, those holding pinned chunks
    /// last, never one still being written) until at most `to_bytes`
    /// remain; also seals the segments of dead processes, and resets the
    /// total from the scan.
    pub fn prune(&self, to_bytes: u64) -> Result<PruneReport> {
        let _global = self.global_lock(true)?;
        let sealed = self
            .segs
            .seal_abandoned()
            .map_err(|e| CacheError::io(&self.layout.segments, e))?;
        let mut report = self.evict_locked(to_bytes)?;
        report.abandoned_sealed = sealed;
        Ok(report)
    }

    /// Brings this process's view of the disk tier up to date (entries
    /// other processes inserted, segments evicted); done at least once a
    /// second on its own.
    pub fn refresh(&self) -> Result<()> {
        self.segs
            .refresh()
            .map_err(|e| CacheError::io(&self.layout.segments, e))
    }

    /// Adds this process's counters to `DIR/stats` now.
    pub fn flush(&self) -> Result<()> {
        self.update_stats(|_| {}).map(|_| ())
    }

    /// Runs `job` on the fetch pool.
    pub(crate) fn spawn(&self, job: Job) {
        self.pool.spawn(job);
    }

    fn load_or_fetch(
        &self,
        id: &ChunkId,
        fetch: impl FnOnce() -> Result<Vec<u8>, ChunkError>,
    ) -> Result<Vec<u8>> {
        if let Some(b) = self.load_disk(id) {
            self.pending.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(b);
        }
        self.pending.misses.fetch_add(1, Ordering::Relaxed);
        let lock = match fetch_lock::lock(&self.layout.fetch_lock, id, self.cfg.lock_timeout) {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::warn!(chunk = %id, lock = %self.layout.fetch_lock.display(), error = %e, "cannot take chunk fetch lock; fetching without it");
                None
            }
        };
        if lock.is_some() {
            // Another process may have fetched it while we waited.
            if let Err(e) = self.refresh() {
                tracing::warn!(error = %e, "cannot read the cache's journals");
            }
            if let Some(b) = self.load_disk(id) {
                return Ok(b);
            }
        }
        let bytes = self.fetch_verified(id, fetch)?;
        let inserted = match self.insert(id, &bytes) {
            Ok(()) => {
                self.pending
                    .total_bytes
                    .fetch_add(bytes.len() as i64, Ordering::Relaxed);
                self.pending.entries.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(e) if self.insert_warned.first() => {
                tracing::warn!(chunk = %id, dir = %self.cfg.dir.display(), error = %e, "cannot insert chunk into cache; serving it uncached (said once; later failures are debug logs)");
                false
            }
            Err(e) => {
                tracing::debug!(chunk = %id, error = %e, "cannot insert chunk into cache");
                false
            }
        };
        // Waiters re-check the disk once they hold the lock.
        drop(lock);
        if inserted {
            self.after_insert();
        }
        Ok(bytes)
    }

    fn load_disk(&self, id: &ChunkId) -> Option<Vec<u8>> {
        match self.segs.load(id, self.cfg.access_granularity) {
            Load::Hit(b) => Some(b),
            Load::Absent => None,
            Load::Corrupt { len } => {
                self.pending.corrupt.fetch_add(1, Ordering::Relaxed);
                self.pending
                    .total_bytes
                    .fetch_sub(len as i64, Ordering::Relaxed);
                self.pending.entries.fetch_sub(1, Ordering::Relaxed);
                None
            }
        }
    }

    fn fetch_verified(
        &self,
        id: &ChunkId,
        fetch: impl FnOnce() -> Result<Vec<u8>, ChunkError>,
    ) -> Result<Vec<u8>> {
        let now = self.inflight.fetch_add(1, Ordering::Relaxed) + 1;
        self.max_inflight.fetch_max(now, Ordering::Relaxed);
        let _guard = Dec(&self.inflight);
        self.pending.fetches.fetch_add(1, Ordering::Relaxed);
        let checked = fetch().and_then(|bytes| {
            let actual = ChunkId::of(&bytes);
            if actual != *id {
                return Err(FormatError::ChunkHashMismatch { id: *id, actual }.into());
            }
            Ok(bytes)
        });
        match checked {
            Ok(bytes) => {
                self.pending
                    .fetched_bytes
                    .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                Ok(bytes)
            }
            Err(source) => {
                self.pending.fetch_errors.fetch_add(1, Ordering::Relaxed);
                Err(CacheError::Fetch {
                    id: *id,
                    source: Box::new(source),
                })
            }
        }
    }

    /// The memory tier's copy of `key`, recording the access in its
    /// segment when it is due. With `wait` false (an event loop) an access
    /// to a segment not open yet is recorded by a pool thread, since
    /// opening it may wait for the disk.
    fn memory_get(&self, key: &DecodeKey, wait: bool) -> Option<Arc<Vec<u8>>> {
        let (data, touch) = self
            .memory
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(key, self.cfg.access_granularity)?;
        self.pending.memory_hits.fetch_add(1, Ordering::Relaxed);
        if touch {
            let granularity = self.cfg.access_granularity;
            if wait {
                self.segs.touch(&key.id, granularity);
            } else if let Some(job) = self.segs.touch_now(&key.id, granularity) {
                self.spawn(Box::new(job));
            }
        }
        Some(data)
    }

    /// Inserts into the disk tier. On a full filesystem (which the budget,
    /// following free space, makes rare: others can fill it meanwhile),
    /// evicts a tenth of the cache and tries once more.
    fn insert(&self, id: &ChunkId, bytes: &[u8]) -> std::io::Result<()> {
        match self.segs.insert(id, bytes) {
            Err(e) if space::is_full(&e) => {
                let used = self.estimated_total();
                let budget = space::budget(&self.cfg.dir, self.cfg.budget_bytes, used);
                let target = low_watermark(budget.min(used));
                let evicted = self.global_lock(false).and_then(|g| match g {
                    Some(_g) => self.evict_locked(target).map(Some),
                    None => Ok(None),
                });
                if let Err(e) = evicted {
                    tracing::debug!(error = %e, "cache eviction on a full disk failed");
                }
                self.segs.insert(id, bytes)
            }
            r => r,
        }
    }

    /// The node-wide total last seen plus what this process added since.
    fn estimated_total(&self) -> u64 {
        let pending = self.pending.total_bytes.load(Ordering::Relaxed);
        self.known_total
            .load(Ordering::Relaxed)
            .saturating_add_signed(pending)
    }

    /// The budget in force for `used` bytes cached: the configured one,
    /// or less when the filesystem has no room for it (`cache/space.rs`).
    fn budget(&self, used: u64) -> u64 {
        space::budget(&self.cfg.dir, self.cfg.budget_bytes, used)
    }

    /// Flushes the counters when due; when the total known here goes over
    /// the budget, flushes (getting the node-wide total) and evicts, unless
    /// another process is evicting already.
    fn after_insert(&self) {
        let estimate = self.estimated_total();
        if estimate <= self.budget(estimate) {
            self.maybe_flush();
            return;
        }
        let total = match self.update_stats(|_| {}) {
            Ok(c) => c.total_bytes,
            Err(e) => {
                tracing::warn!(error = %e, "cannot update cache stats");
                return;
            }
        };
        let budget = self.budget(total);
        if total <= budget {
            return;
        }
        let result = self.global_lock(false).and_then(|g| match g {
            Some(_g) => self.evict_locked(low_watermark(budget)).map(Some),
            None => Ok(None),
        });
        match result {
            Ok(Some(r)) => tracing::debug!(
                evicted = r.evicted_entries,
                bytes = r.evicted_bytes,
                busy = r.busy_skipped,
                "cache eviction"
            ),
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "cache eviction failed"),
        }
    }

    fn evict_locked(&self, target: u64) -> Result<PruneReport> {
        let r = evict::evict_to(&self.layout, &self.segs, target)
            .map_err(|e| CacheError::io(&self.layout.segments, e))?;
        self.update_stats(|c| {
            c.total_bytes = r.remaining_bytes;
            c.entries = r.remaining_entries;
            c.evictions += r.evicted_entries;
            c.evicted_bytes += r.evicted_bytes;
        })?;
        Ok(r)
    }

    /// `DIR/lock`, taken exclusively (waiting, or `None` if busy).
    fn global_lock(&self, wait: bool) -> Result<Option<std::fs::File>> {
        let path = self.layout.global_lock();
        let io = |e| CacheError::io(&path, e);
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        if wait {
            disk::lock_within(&f, true, self.cfg.lock_timeout).map_err(io)?;
        } else if !disk::try_lock_exclusive(&f).map_err(io)? {
            return Ok(None);
        }
        Ok(Some(f))
    }

    fn update_stats(&self, f: impl FnOnce(&mut CacheCounters)) -> Result<CacheCounters> {
        let r = self
            .stats_file
            .update(&self.pending, f)
            .map_err(|e| CacheError::io(self.layout.stats(), e));
        if let Ok(c) = &r {
            self.known_total.store(c.total_bytes, Ordering::Relaxed);
        }
        self.flushed_ms
            .store(self.opened.elapsed().as_millis() as u64, Ordering::Relaxed);
        r
    }

    fn maybe_flush(&self) {
        let now = self.opened.elapsed().as_millis() as u64;
        // Loads first: this runs on every hit, from every FUSE thread.
        if self.changed_ms.load(Ordering::Relaxed) != now {
            self.changed_ms.store(now, Ordering::Relaxed);
        }
        let last = self.flushed_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) < FLUSH_EVERY.as_millis() as u64 {
            // Flushed a moment ago: the flusher thread adds this once the
            // counters settle.
            if !self.trailing.load(Ordering::Relaxed)
                && !self.trailing.swap(true, Ordering::Relaxed)
            {
                if let Some(t) = self.flusher.get() {
                    t.unpark();
                }
            }
            return;
        }
        // One thread flushes; the others go on.
        if self
            .flushed_ms
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            if let Err(e) = self.flush() {
                tracing::warn!(error = %e, "cannot update cache stats");
            }
        }
    }

    /// The flusher thread's part of [`Cache::maybe_flush`]: adds the
    /// counters a flush left behind once they have gone [`FLUSH_SETTLE`]
    /// without a change.
    fn flush_if_settled(&self) {
        if !self.trailing.load(Ordering::Relaxed) {
            return;
        }
        let now = self.opened.elapsed().as_millis() as u64;
        let quiet = now.saturating_sub(self.changed_ms.load(Ordering::Relaxed));
        if quiet < FLUSH_SETTLE.as_millis() as u64 {
            return;
        }
        // Cleared first: a change from now on arms it again.
        self.trailing.store(false, Ordering::Relaxed);
        if let Err(e) = self.flush() {
            tracing::warn!(error = %e, "cannot update cache stats");
        }
    }
}

impl Drop for Cache {
    fn drop(&mut self) {
        if let Err(e) = self.flush() {
            tracing::warn!(error = %e, "cannot save cache stats");
        }
    }
}

/// A thread that ends with the cache: every [`FLUSH_EVERY`] it brings the
/// index up to date, seals an idle segment and adds the counters of an
/// idle cache to `DIR/stats` (a busy one flushes on its own); and once
/// counters a flush left behind have gone [`FLUSH_SETTLE`] without a
/// change, it adds them.
fn start_flusher(cache: &Arc<Cache>) {
    let weak = Arc::downgrade(cache);
    let spawned = std::thread::Builder::new()
        .name("smr-cache-stats".into())
        .spawn(move || {
            let mut tick = Instant::now() + FLUSH_EVERY;
            loop {
                let armed = weak
                    .upgrade()
                    .is_some_and(|c| c.trailing.load(Ordering::Relaxed));
                let until_tick = tick.saturating_duration_since(Instant::now());
                std::thread::park_timeout(if armed {
                    until_tick.min(FLUSH_SETTLE)
                } else {
                    until_tick
                });
                let Some(cache) = weak.upgrade() else { return };
                cache.flush_if_settled();
                if Instant::now() < tick {
                    continue;
                }
                tick = Instant::now() + FLUSH_EVERY;
                if let Err(e) = cache.refresh() {
                    tracing::debug!(error = %e, "cannot read the cache's journals");
                }
                cache.segs.seal_if_idle(SEAL_IDLE_AFTER);
                if !cache.pending.is_empty() {
                    cache.maybe_flush();
                }
            }
        });
    match spawned {
        Ok(t) => {
            let _ = cache.flusher.set(t.thread().clone());
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot start the cache stats thread: counters are saved at exit")
        }
    }
}

/// Decrements the in-flight counter, even on panic.
struct Dec<'a>(&'a AtomicU64);

impl Drop for Dec<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Where eviction stops: 90% of the budget.
fn low_watermark(budget: u64) -> u64 {
    budget - budget / 10
}
