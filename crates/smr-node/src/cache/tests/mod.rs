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
mod procs;
mod segments;

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
    pub(super) _tmp: tempfile::TempDir,
    pub(super) f: Fetcher,
    pub(super) cache: Arc<Cache>,
    pub(super) id: ChunkId,
    /// The chunk's segment file.
    pub(super) segment: std::path::PathBuf,
    /// Its entry's offset there.
    pub(super) offset: u64,
}

/// See [`OneChunk`].
pub(super) fn one_chunk(len: usize) -> OneChunk {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (store, ids) = store_with(&tmp.path().join("store"), 1, len);
    let f = Fetcher::new(store, Duration::ZERO);
    let cache = Cache::open(config(&tmp.path().join("cache"), 1 << 30)).expect("open");
    let id = ids[0];
    cache.get_or_fetch(&id, || f.get(&id)).expect("fetch");
    let (segment, loc) = cache.segs.place(&id).expect("cached");
    OneChunk {
        _tmp: tmp,
        f,
        cache,
        id,
        segment,
        offset: loc.off,
    }
}

/// The bytes of `id`'s entry, read from its segment file.
pub(super) fn entry_bytes(cache: &Cache, id: &ChunkId) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let (path, loc) = cache.segs.place(id).expect("an entry");
    let mut b = vec![0; loc.len as usize];
    fs::File::open(path)
        .expect("segment")
        .read_exact_at(&mut b, loc.off)
        .expect("entry bytes");
    b
}

/// Loading `id` (whose entry was corrupted) refetches it (the second
/// fetch of `f`) and stores it again, intact.
pub(super) fn assert_healed(cache: &Cache, f: &Fetcher, id: &ChunkId) {
    let back = cache.get_or_fetch(id, || f.get(id)).expect("healed");
    assert_eq!(ChunkId::of(&back), *id);
    assert_eq!(f.calls(), 2, "refetched");
    assert_eq!(
        ChunkId::of(&entry_bytes(cache, id)),
        *id,
        "stored again intact"
    );
    assert_eq!(cache.get_or_fetch(id, never).expect("hit"), back);
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
fn corrupt_entry_is_detected_condemned_and_refetched() {
    let fx = one_chunk(64 * 1024);
    let (f, cache, id) = (&fx.f, &fx.cache, fx.id);
    flip_in_place(&fx.segment, fx.offset + 1234);
    assert_healed(cache, f, &id);
    let s = cache.stats().expect("stats");
    assert_eq!(
        (s.counters.corrupt, s.counters.fetches, s.counters.entries),
        (1, 2, 1)
    );
    assert_eq!(s.counters.total_bytes, 64 * KIB);
}

/// Damage inside a segment costs the chunks it touches, not the segment:
/// the others are still served from it, the damaged ones are refetched
/// once, and the tombstones keep every later process from loading them.
#[test]
fn corruption_in_a_segment_heals_only_the_affected_chunks() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (store, ids) = store_with(&tmp.path().join("store"), 8, 16 * 1024);
    let f = Fetcher::new(store, Duration::ZERO);
    let dir = tmp.path().join("cache");
    let cache = Cache::open(config(&dir, 1 << 30)).expect("open");
    for id in &ids {
        cache.get_or_fetch(id, || f.get(id)).expect("fetch");
    }
    let (segment, loc2) = cache.segs.place(&ids[2]).expect("cached");
    let (same, loc5) = cache.segs.place(&ids[5]).expect("cached");
    assert_eq!(segment, same, "one segment holds them all");
    flip_in_place(&segment, loc2.off + 7);
    flip_in_place(&segment, loc5.off + u64::from(loc5.len) - 1);
    for id in &ids {
        let got = cache.get_or_fetch(id, || f.get(id)).expect("served");
        assert_eq!(ChunkId::of(&got), *id);
    }
    assert_eq!(f.calls(), 10, "only the two damaged chunks refetched");
    assert_eq!(cache.stats().expect("stats").counters.corrupt, 2);
    drop(cache);
    let cache = Cache::open(config(&dir, 1 << 30)).expect("reopen");
    for id in &ids {
        let got = cache.get_or_fetch(id, never).expect("all cached");
        assert_eq!(ChunkId::of(&got), *id);
    }
    let s = cache.stats().expect("stats");
    assert_eq!(
        (s.counters.corrupt, s.counters.entries),
        (2, 8),
        "not found again"
    );
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
fn the_file_per_entry_layout_is_removed_at_open() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("cache");
    let old = dir.join("chunks/ab");
    fs::create_dir_all(&old).expect("old layout");
    fs::write(old.join("ab".repeat(32)), b"an old entry").expect("old entry");
    fs::create_dir_all(dir.join("tmp")).expect("old temp dir");
    let cache = Cache::open(config(&dir, 1 << 30)).expect("open");
    assert!(!dir.join("chunks").exists() && !dir.join("tmp").exists());
    assert_eq!(cache.stats().expect("stats").counters.total_bytes, 0);
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

/// The counters of a burst reach the stats file once it is over, without
/// waiting for the next second's flush: `smr status` asked just after a
/// container's start sees its fetches.
#[test]
fn counters_reach_the_file_soon_after_a_burst() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (store, ids) = store_with(&tmp.path().join("store"), 3, 1000);
    let f = Fetcher::new(store, Duration::ZERO);
    let dir = tmp.path().join("cache");
    let serving = Cache::open(config(&dir, 1 << 30)).expect("open");
    let viewer = Cache::open(config(&dir, 1 << 30)).expect("open");
    // Opening flushed: the burst's changes wait for the flusher thread,
    // which adds them FLUSH_SETTLE after the last (the next second's flush
    // would be too late for the bound below).
    for id in &ids {
        serving.get_or_fetch(id, || f.get(id)).expect("fetch");
    }
    let t = std::time::Instant::now();
    loop {
        let fetches = viewer.stats().expect("stats").counters.fetches;
        if fetches == 3 {
            break;
        }
        assert!(
            t.elapsed() < FLUSH_EVERY / 2,
            "{fetches} of 3 fetches in the file after {:?}",
            t.elapsed()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}
