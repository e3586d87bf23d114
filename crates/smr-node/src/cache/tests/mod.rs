//! Tests of the node cache on real directories, threads and processes.
//! Chunks are real stored bytes in a real [`LocalStore`]; [`Fetcher`]
//! only counts the store calls and can slow them down.

use std::fs;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use smr_format::ChunkId;
use smr_store::{ChunkStore, LocalStore};

use super::*;

mod evict;
mod locks;
mod now;
mod open_files;
mod procs;

pub(super) const KIB: u64 = 1 << 10;

/// `len` pseudo-random bytes, distinct for each `seed`.
pub(super) fn bytes(seed: u64, len: usize) -> Vec<u8> {
    smr_testkit::noise(len, seed.wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

/// A real store holding `n` chunks of `len` bytes, and their ids.
pub(super) fn store_with(dir: &Path, n: u64, len: usize) -> (LocalStore, Vec<ChunkId>) {
    let store = LocalStore::open(dir).expect("store");
    let ids = (0..n)
        .map(|i| {
            let data = bytes(i + 1, len);
            let id = ChunkId::of(&data);
            store.put(&id, &data).expect("put");
            id
        })
        .collect();
    (store, ids)
}

/// Counts (and optionally slows) calls to a real store.
pub(super) struct Fetcher {
    pub(super) store: LocalStore,
    pub(super) calls: AtomicU64,
    pub(super) delay: Duration,
}

impl Fetcher {
    pub(super) fn new(store: LocalStore, delay: Duration) -> Self {
        Fetcher {
            store,
            calls: AtomicU64::new(0),
            delay,
        }
    }

    pub(super) fn get(&self, id: &ChunkId) -> Result<Vec<u8>, ChunkError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(self.delay);
        Ok(self.store.get(id)?)
    }

    pub(super) fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }
}

pub(super) fn config(dir: &Path, budget: u64) -> CacheConfig {
    CacheConfig {
        budget_bytes: budget,
        memory_bytes: 1 << 20,
        fetch_threads: 4,
        // Every access counts: the LRU-K tests read twice within a second.
        access_granularity: Duration::ZERO,
        ..CacheConfig::new(dir)
    }
}

/// One chunk of `len` bytes in a real store, fetched once into a fresh
/// cache (budget 1 GiB, [`config`]).
pub(super) struct OneChunk {
    pub(super) tmp: tempfile::TempDir,
    pub(super) f: Fetcher,
    pub(super) cache: Arc<Cache>,
    pub(super) id: ChunkId,
    /// The chunk's cache entry.
    pub(super) entry: std::path::PathBuf,
}

/// See [`OneChunk`].
pub(super) fn one_chunk(len: usize) -> OneChunk {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (store, ids) = store_with(&tmp.path().join("store"), 1, len);
    let f = Fetcher::new(store, Duration::ZERO);
    let cache = Cache::open(config(&tmp.path().join("cache"), 1 << 30)).expect("open");
    let id = ids[0];
    cache.get_or_fetch(&id, || f.get(&id)).expect("fetch");
    let entry = cache.layout.entry(&id);
    OneChunk {
        tmp,
        f,
        cache,
        id,
        entry,
    }
}

/// Loading `id` (whose entry `entry` was corrupted) refetches it (the
/// second fetch of `f`) and rewrites the entry intact.
pub(super) fn assert_healed(cache: &Cache, f: &Fetcher, id: &ChunkId, entry: &Path) {
    let back = cache.get_or_fetch(id, || f.get(id)).expect("healed");
    assert_eq!(ChunkId::of(&back), *id);
    assert_eq!(f.calls(), 2, "refetched");
    assert_eq!(
        ChunkId::of(&fs::read(entry).expect("entry")),
        *id,
        "entry rewritten intact"
    );
}

/// Flips one byte of a file in place (same inode, same length).
pub(super) fn flip_in_place(path: &Path, at: u64) {
    use std::os::unix::fs::FileExt;
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open entry for writing");
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).expect("read byte");
    b[0] ^= 0x20;
    f.write_all_at(&b, at).expect("write byte");
}

pub(super) fn never() -> Result<Vec<u8>, ChunkError> {
    panic!("must not fetch: the chunk is cached")
}

#[test]
fn miss_then_hit_and_everything_survives_a_restart() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (store, ids) = store_with(&tmp.path().join("store"), 2, 64 * 1024);
    let f = Fetcher::new(store, Duration::ZERO);
    let dir = tmp.path().join("cache");
    {
        let cache = Cache::open(config(&dir, 1 << 30)).expect("open");
        let a = cache
            .get_or_fetch(&ids[0], || f.get(&ids[0]))
            .expect("fetch");
        assert_eq!(ChunkId::of(&a), ids[0]);
        assert!(cache.contains(&ids[0]) && !cache.contains(&ids[1]));
        let b = cache.get_or_fetch(&ids[0], never).expect("hit");
        assert_eq!(a, b);
        let s = cache.stats().expect("stats");
        assert_eq!(
            (s.counters.hits, s.counters.misses, s.counters.fetches),
            (1, 1, 1)
        );
        assert_eq!((s.counters.entries, s.counters.total_bytes), (1, 64 * KIB));
        assert_eq!(s.counters.fetched_bytes, 64 * KIB);
        assert_eq!(f.calls(), 1);
    }
    let cache = Cache::open(config(&dir, 1 << 30)).expect("reopen");
    let a = cache.get_or_fetch(&ids[0], never).expect("entry survived");
    assert_eq!(ChunkId::of(&a), ids[0]);
    let s = cache.stats().expect("stats");
    assert_eq!(
        (s.counters.hits, s.counters.misses, s.counters.fetches),
        (2, 1, 1),
        "counters survived"
    );
    assert_eq!(
        (s.counters.entries, s.counters.total_bytes),
        (1, 64 * KIB),
        "total rescanned"
    );
    let json = serde_json::to_value(&s).expect("serializes");
    assert_eq!(json["hits"], 2, "{json}");
}

#[test]
fn stats_of_one_process_are_seen_by_another() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (store, ids) = store_with(&tmp.path().join("store"), 1, 1000);
    let f = Fetcher::new(store, Duration::ZERO);
    let dir = tmp.path().join("cache");
    let serving = Cache::open(config(&dir, 1 << 30)).expect("open");
    let viewer = Cache::open(config(&dir, 1 << 30)).expect("open");
    serving
        .get_or_fetch(&ids[0], || f.get(&ids[0]))
        .expect("fetch");
    // Counters reach the file when the process flushes (at most a second
    // after a change while busy, or when asked).
    serving.flush().expect("flush");
    assert_eq!(viewer.stats().expect("stats").counters.fetches, 1);
    serving.get_or_fetch(&ids[0], never).expect("hit");
    drop(serving); // flushes the hit
    let s = viewer.stats().expect("stats");
    assert_eq!(
        (s.counters.hits, s.counters.fetches, s.counters.entries),
        (1, 1, 1)
    );
}

#[test]
fn corrupt_entry_is_detected_deleted_and_refetched() {
    let fx = one_chunk(64 * 1024);
    let (f, cache, id, entry) = (&fx.f, &fx.cache, fx.id, &fx.entry);
    let mut raw = fs::read(entry).expect("entry");
    raw[1234] ^= 0x40;
    fs::write(entry, &raw).expect("corrupt it");

    assert_healed(cache, f, &id, entry);
    let s = cache.stats().expect("stats");
    assert_eq!(
        (s.counters.corrupt, s.counters.fetches, s.counters.entries),
        (1, 2, 1)
    );
    assert_eq!(s.counters.total_bytes, 64 * KIB);
}

/// Loads check the CRC-32C recorded at insert; an entry without it (a
/// filesystem without user xattrs, an older smr) is checked with SHA-256,
/// and corruption is caught either way.
#[test]
fn entries_are_checked_by_recorded_crc_else_by_sha256() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (store, ids) = store_with(&tmp.path().join("store"), 2, 64 * 1024);
    let f = Fetcher::new(store, Duration::ZERO);
    let cache = Cache::open(config(&tmp.path().join("cache"), 1 << 30)).expect("open");
    for id in &ids {
        cache.get_or_fetch(id, || f.get(id)).expect("fetch");
    }
    let (a, b) = (cache.layout.entry(&ids[0]), cache.layout.entry(&ids[1]));
    let file = fs::File::open(&a).expect("entry");
    let mut crc = [0u8; 4];
    match rustix::fs::fgetxattr(&file, "user.smr.crc32c", &mut crc) {
        Ok(4) => {
            let want = crc32c::crc32c(&fs::read(&a).expect("entry"));
            assert_eq!(u32::from_le_bytes(crc), want, "CRC recorded at insert");
        }
        // This filesystem has no user xattrs: only the fallback is tested.
        r => eprintln!("no CRC xattr on {}: {r:?}", a.display()),
    }
    // Without the attribute: loaded (by SHA-256), corruption still found.
    // The attribute is read when an entry is opened: start again without
    // open entries (as another process would).
    for p in [&a, &b] {
        let _ = rustix::fs::removexattr(p, "user.smr.crc32c");
    }
    drop(cache);
    let cache = Cache::open(config(&tmp.path().join("cache"), 1 << 30)).expect("reopen");
    cache
        .get_or_fetch(&ids[0], never)
        .expect("SHA-256 fallback hit");
    let mut raw = fs::read(&b).expect("entry");
    raw[99] ^= 1;
    fs::write(&b, &raw).expect("corrupt it");
    cache
        .get_or_fetch(&ids[1], || f.get(&ids[1]))
        .expect("healed");
    assert_eq!(f.calls(), 3, "only the corrupt entry was refetched");
    assert_eq!(cache.stats().expect("stats").counters.corrupt, 1);
}

#[test]
fn bad_bytes_from_the_store_are_an_error_and_never_cached() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (store, ids) = store_with(&tmp.path().join("store"), 1, 4096);
    let mut bad = fs::read(store.chunk_path(&ids[0])).expect("chunk");
    bad[0] ^= 1;
    fs::write(store.chunk_path(&ids[0]), bad).expect("corrupt the store");
    let f = Fetcher::new(store, Duration::ZERO);
    let cache = Cache::open(config(&tmp.path().join("cache"), 1 << 30)).expect("open");
    let err = cache
        .get_or_fetch(&ids[0], || f.get(&ids[0]))
        .expect_err("hash mismatch");
    assert_eq!(err.chunk(), Some(ids[0]));
    assert_eq!(err.to_errno(), libc::EIO);
    assert!(err.to_string().contains(&ids[0].to_hex()), "{err}");
    assert!(!cache.contains(&ids[0]));
    let missing = ChunkId([7; 32]);
    let err = cache
        .get_or_fetch(&missing, || f.get(&missing))
        .expect_err("missing");
    assert!(err.to_string().contains("missing"), "{err}");
    assert_eq!(cache.stats().expect("stats").counters.fetch_errors, 2);
}

#[test]
fn inserts_leave_whole_entries_with_their_crc_and_no_temp_files() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let layout = disk::Layout::create(&tmp.path().join("cache"), super::DEFAULT_LOCK_TIMEOUT)
        .expect("layout");
    let (a, b) = (bytes(1, 5000), bytes(2, 7000));
    let (ida, idb) = (ChunkId::of(&a), ChunkId::of(&b));
    // Unnamed file linked into place (O_TMPFILE), its directory made on
    // the way; then over a file in the way.
    let h = disk::insert(&layout, &ida, &a).expect("insert");
    assert_eq!((h.len, h.crc), (5000, Some(crc32c::crc32c(&a))));
    fs::write(layout.entry(&ida), b"in the way").expect("bogus entry");
    disk::insert(&layout, &ida, &a).expect("again, replacing");
    // The named-temp-file fallback.
    let h = disk::insert_named(&layout, &idb, &b).expect("insert named");
    assert_eq!(h.len, 7000);
    for (id, data) in [(ida, &a), (idb, &b)] {
        assert_eq!(&fs::read(layout.entry(&id)).expect("entry"), data);
    }
    assert_eq!(fs::read_dir(&layout.tmp).expect("tmp").count(), 0);
}

#[test]
fn leftover_temp_files_are_never_entries_and_are_cleaned() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (store, ids) = store_with(&tmp.path().join("store"), 2, 4096);
    let f = Fetcher::new(store, Duration::ZERO);
    let dir = tmp.path().join("cache");
    drop(Cache::open(config(&dir, 1 << 30)).expect("create"));
    // A process killed mid-insert left half a chunk in tmp/.
    let dead = dir.join("tmp").join(format!("{}.4242.0", ids[0].to_hex()));
    fs::write(&dead, &bytes(1, 4096)[..100]).expect("partial temp");
    // A live insert (its writer holds the lock) must survive cleaning.
    let live = dir.join("tmp").join(format!("{}.4243.0", ids[1].to_hex()));
    fs::write(&live, b"in progress").expect("live temp");
    let live_file = fs::File::open(&live).expect("open");
    assert!(disk::try_lock_exclusive(&live_file).expect("lock"));

    let cache = Cache::open(config(&dir, 1 << 30)).expect("open");
    assert!(!dead.exists(), "dead temp removed at open");
    assert!(live.exists(), "live temp kept");
    assert!(!cache.contains(&ids[0]));
    let got = cache
        .get_or_fetch(&ids[0], || f.get(&ids[0]))
        .expect("fetched, not the partial temp");
    assert_eq!(ChunkId::of(&got), ids[0]);
    assert_eq!(
        cache.stats().expect("stats").counters.total_bytes,
        4096,
        "temps are not counted"
    );

    drop(live_file);
    let r = cache.prune(u64::MAX).expect("prune");
    assert_eq!(
        (r.temp_removed, r.evicted_entries, r.remaining_entries),
        (1, 0, 1)
    );
    assert!(!live.exists(), "removed once its writer is gone");
}

#[test]
fn threads_reading_one_cold_chunk_fetch_it_once() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (store, ids) = store_with(&tmp.path().join("store"), 1, 64 * 1024);
    let f = Fetcher::new(store, Duration::from_millis(100));
    let cache = Cache::open(config(&tmp.path().join("cache"), 1 << 30)).expect("open");
    let barrier = Barrier::new(8);
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| {
                barrier.wait();
                let got = cache
                    .get_or_fetch(&ids[0], || f.get(&ids[0]))
                    .expect("chunk");
                assert_eq!(ChunkId::of(&got), ids[0]);
            });
        }
    });
    assert_eq!(f.calls(), 1);
    assert_eq!(cache.stats().expect("stats").counters.fetches, 1);
}

/// Two `Cache`s on one directory stand for two processes: OFD and `flock` locks
/// belong to open file descriptions, and each cache opens its own, so the
/// locking between them is exactly that between processes (the real
/// multi-process test is in `procs`).
#[test]
fn two_caches_on_one_dir_fetch_each_chunk_once() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (store, ids) = store_with(&tmp.path().join("store"), 8, 16 * 1024);
    let f = Fetcher::new(store, Duration::from_millis(30));
    let dir = tmp.path().join("cache");
    let caches = [
        Cache::open(config(&dir, 1 << 30)).expect("a"),
        Cache::open(config(&dir, 1 << 30)).expect("b"),
    ];
    let barrier = Barrier::new(8);
    std::thread::scope(|s| {
        for t in 0..8usize {
            let (cache, f, ids, barrier) = (&caches[t % 2], &f, &ids, &barrier);
            s.spawn(move || {
                barrier.wait();
                for k in 0..ids.len() {
                    let id = &ids[(k + t) % ids.len()];
                    let got = cache.get_or_fetch(id, || f.get(id)).expect("chunk");
                    assert_eq!(ChunkId::of(&got), *id);
                }
            });
        }
    });
    assert_eq!(f.calls(), 8, "one fetch per chunk across both caches");
    // The other "process" adds its counters when it flushes.
    caches[1].flush().expect("flush");
    let s = caches[0].stats().expect("stats");
    assert_eq!((s.counters.fetches, s.counters.entries), (8, 8));
    assert!(!dir.join("locks").exists(), "no lock file per chunk");
    assert_eq!(
        fs::metadata(dir.join("fetch.lock"))
            .expect("fetch.lock")
            .len(),
        0,
        "fetch locks take no bytes"
    );
}

#[test]
fn memory_tier_decodes_once_and_keys_by_decryption_key() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (store, ids) = store_with(&tmp.path().join("store"), 1, 4096);
    let f = Fetcher::new(store, Duration::ZERO);
    let cache = Cache::open(config(&tmp.path().join("cache"), 1 << 30)).expect("open");
    let key = DecodeKey {
        id: ids[0],
        key: None,
        compressed: false,
        plain_len: 4096,
    };
    let decodes = AtomicU64::new(0);
    let decode = |v: Vec<u8>| {
        decodes.fetch_add(1, Ordering::SeqCst);
        Ok(v.iter().map(|b| b ^ 0xff).collect())
    };
    let a = cache
        .get_decoded(&key, true, || f.get(&ids[0]), decode)
        .expect("decoded");
    let b = cache
        .get_decoded(&key, true, never, decode)
        .expect("from memory");
    assert!(Arc::ptr_eq(&a, &b));
    assert_eq!(decodes.load(Ordering::SeqCst), 1);
    assert!(cache.in_memory(&key));
    let other = DecodeKey {
        key: Some([1; 32]),
        ..key.clone()
    };
    assert!(!cache.in_memory(&other));
    cache
        .get_decoded(&other, true, never, decode)
        .expect("decoded from disk");
    assert_eq!(decodes.load(Ordering::SeqCst), 2);
    let s = cache.stats().expect("stats");
    assert_eq!(
        (s.counters.memory_hits, s.counters.hits, s.counters.fetches),
        (1, 1, 1)
    );
    assert_eq!((s.memory_entries, s.memory_bytes), (2, 8192));
}

#[test]
fn the_entry_crc_is_the_standard_crc32c() {
    // Lengths and offsets around the folding widths, and a whole chunk.
    let data = bytes(99, (1 << 20) + 300);
    for len in [
        0usize,
        1,
        7,
        15,
        16,
        63,
        64,
        65,
        255,
        256,
        4095,
        4096,
        65536,
        1 << 20,
    ] {
        for off in [0usize, 1, 3, 17] {
            let s = &data[off..off + len];
            assert_eq!(disk::crc32c(s), crc32c::crc32c(s), "{len} bytes at {off}");
        }
    }
    assert_eq!(
        disk::crc32c(b"123456789"),
        0xe306_9283,
        "the check value of CRC-32C"
    );
}
