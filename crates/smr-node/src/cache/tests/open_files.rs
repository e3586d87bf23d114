//! Open entries (the handle cache) and the access-time granularity.

use super::*;
use std::fs::{File, FileTimes};
use std::time::{SystemTime, UNIX_EPOCH};

/// (atime, mtime) of a file: the entry's LRU-K history.
fn times(path: &Path) -> (SystemTime, SystemTime) {
    let m = fs::metadata(path).expect("metadata");
    (m.accessed().expect("atime"), m.modified().expect("mtime"))
}

#[test]
fn accesses_within_the_granularity_write_no_timestamps() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (store, ids) = store_with(&tmp.path().join("store"), 1, 4096);
    let f = Fetcher::new(store, Duration::ZERO);
    let dir = tmp.path().join("cache");
    let cfg = CacheConfig {
        access_granularity: DEFAULT_ACCESS_GRANULARITY,
        ..config(&dir, 1 << 30)
    };
    let cache = Cache::open(cfg.clone()).expect("open");
    cache
        .get_or_fetch(&ids[0], || f.get(&ids[0]))
        .expect("fetch");
    let entry = cache.layout.entry(&ids[0]);
    let inserted = times(&entry);
    assert_eq!(inserted.1, UNIX_EPOCH, "seen once so far");
    for _ in 0..3 {
        cache.get_or_fetch(&ids[0], never).expect("hit");
    }
    assert_eq!(
        times(&entry),
        inserted,
        "loads within a minute of the last recorded access write nothing"
    );
    drop(cache);

    // The last recorded access is two minutes old: the next load records
    // (mtime := that access, atime := now), the one after it does not.
    let two_min_ago = SystemTime::now() - Duration::from_secs(120);
    File::options()
        .write(true)
        .open(&entry)
        .expect("entry")
        .set_times(FileTimes::new().set_accessed(two_min_ago))
        .expect("age the entry");
    let cache = Cache::open(cfg).expect("reopen");
    cache.get_or_fetch(&ids[0], never).expect("hit");
    let (atime, mtime) = times(&entry);
    assert_eq!(mtime, two_min_ago, "the previous access moved to mtime");
    assert!(atime > two_min_ago + Duration::from_secs(100), "{atime:?}");
    cache.get_or_fetch(&ids[0], never).expect("hit");
    assert_eq!(times(&entry), (atime, mtime), "recorded once");
}

#[test]
fn with_no_granularity_every_load_is_recorded_through_the_handle() {
    let fx = one_chunk(4096);
    let (cache, id, entry) = (&fx.cache, fx.id, &fx.entry);
    let (first, _) = times(entry);
    std::thread::sleep(Duration::from_millis(20));
    cache.get_or_fetch(&id, never).expect("hit");
    let (second, prev) = times(entry);
    assert_eq!(prev, first, "mtime is the access before");
    assert!(second > first);
    assert_eq!(
        cache.stats().expect("stats").open_files,
        1,
        "through a handle"
    );
}

#[test]
fn open_files_are_bounded_in_number_and_in_bytes() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (store, ids) = store_with(&tmp.path().join("store"), 4, 4096);
    let f = Fetcher::new(store, Duration::ZERO);
    let by_count = Cache::open(CacheConfig {
        open_files: 2,
        ..config(&tmp.path().join("a"), 1 << 30)
    })
    .expect("open");
    // A budget of 128 KiB lets a process hold 8 KiB open: two entries.
    let by_bytes = Cache::open(config(&tmp.path().join("b"), 128 * KIB)).expect("open");
    for cache in [&by_count, &by_bytes] {
        for id in &ids {
            cache.get_or_fetch(id, || f.get(id)).expect("fetch");
            cache.get_or_fetch(id, never).expect("hit");
        }
        let s = cache.stats().expect("stats");
        assert_eq!((s.open_files, s.open_file_bytes), (2, 8192));
        // Entries beyond the bound are still read (opened for the load).
        for id in &ids {
            assert_eq!(
                ChunkId::of(&cache.get_or_fetch(id, never).expect("hit")),
                *id
            );
        }
    }
    let none = Cache::open(CacheConfig {
        open_files: 0,
        ..config(&tmp.path().join("a"), 1 << 30)
    })
    .expect("open");
    none.get_or_fetch(&ids[0], never)
        .expect("hit without handles");
    assert_eq!(none.stats().expect("stats").open_files, 0);
}

#[test]
fn a_corrupt_entry_is_caught_through_a_cached_handle() {
    let fx = one_chunk(64 * 1024);
    let (f, cache, id, entry) = (&fx.f, &fx.cache, fx.id, &fx.entry);
    cache.get_or_fetch(&id, never).expect("hit");
    assert_eq!(cache.stats().expect("stats").open_files, 1);
    flip_in_place(entry, 4321);

    assert_healed(cache, f, &id, entry);
    let s = cache.stats().expect("stats");
    assert_eq!(
        (
            s.counters.corrupt,
            s.counters.entries,
            s.counters.total_bytes
        ),
        (1, 1, 64 * KIB)
    );
    // And the new entry is served (and checked) through a new handle.
    cache.get_or_fetch(&id, never).expect("hit");
    assert_eq!(cache.stats().expect("stats").open_files, 1);
}

/// A handle to an old file whose path now names a new, good entry (another
/// process replaced it): the old file's corruption must not delete the new
/// entry, and the load goes on with the new one.
#[test]
fn corruption_behind_a_stale_handle_does_not_delete_the_new_entry() {
    let fx = one_chunk(4096);
    let (tmp, cache, id, entry) = (&fx.tmp, &fx.cache, fx.id, &fx.entry);
    let good = fs::read(entry).expect("entry");
    flip_in_place(entry, 7);
    let replacement = tmp.path().join("replacement");
    fs::write(&replacement, &good).expect("good copy");
    fs::rename(&replacement, entry).expect("replace the entry");

    let got = cache.get_or_fetch(&id, never).expect("the new entry");
    assert_eq!(ChunkId::of(&got), id);
    assert!(entry.is_file(), "the good entry stays");
    let s = cache.stats().expect("stats");
    assert_eq!((s.counters.corrupt, s.counters.entries), (0, 1));
}

/// Entries a process holds open are pinned: another process's eviction
/// skips them; the process's own eviction lets go of them first.
#[test]
fn open_entries_are_pinned_against_other_processes_eviction() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (store, ids) = store_with(&tmp.path().join("store"), 3, 4096);
    let f = Fetcher::new(store, Duration::ZERO);
    let dir = tmp.path().join("cache");
    let a = Cache::open(config(&dir, 1 << 30)).expect("a");
    let b = Cache::open(config(&dir, 1 << 30)).expect("b");
    for id in &ids {
        a.get_or_fetch(id, || f.get(id)).expect("fetch");
    }
    assert_eq!(a.stats().expect("stats").open_files, 3, "opened at insert");
    let r = b.prune(0).expect("prune by b");
    assert_eq!((r.evicted_entries, r.busy_skipped), (0, 3));

    // `a` lets go of its handles before it evicts; then holds one again.
    let r = a.prune(u64::MAX).expect("prune by a");
    assert_eq!(r.evicted_entries, 0);
    assert_eq!(a.stats().expect("stats").open_files, 0);
    a.get_or_fetch(&ids[1], never).expect("hit");
    let r = b.prune(0).expect("prune by b");
    assert_eq!((r.evicted_entries, r.busy_skipped), (2, 1));
    assert!(a.contains(&ids[1]) && !b.contains(&ids[0]) && !b.contains(&ids[2]));
    let r = a.prune(0).expect("prune by a");
    assert_eq!((r.evicted_entries, r.remaining_bytes), (1, 0));
    assert!(!b.contains(&ids[1]));
}

/// A file far larger than any chunk where an entry should be (not written
/// by smr) is not read into memory: the chunk is refetched over it.
#[test]
fn an_oversized_file_in_place_of_an_entry_is_refetched() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (store, ids) = store_with(&tmp.path().join("store"), 1, 4096);
    let f = Fetcher::new(store, Duration::ZERO);
    let cache = Cache::open(config(&tmp.path().join("cache"), 1 << 30)).expect("open");
    let entry = cache.layout.entry(&ids[0]);
    fs::create_dir_all(entry.parent().expect("fan-out dir")).expect("mkdir");
    File::create(&entry)
        .expect("bogus entry")
        .set_len(1 << 40)
        .expect("sparse 1 TiB");
    let got = cache
        .get_or_fetch(&ids[0], || f.get(&ids[0]))
        .expect("refetched");
    assert_eq!(ChunkId::of(&got), ids[0]);
    assert_eq!(f.calls(), 1);
    assert_eq!(fs::metadata(&entry).expect("entry").len(), 4096, "replaced");
}

#[test]
fn a_memory_hit_without_a_handle_is_recorded_off_the_event_loop() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (store, ids) = store_with(&tmp.path().join("store"), 1, 4096);
    let f = Fetcher::new(store, Duration::ZERO);
    let cache = Cache::open(CacheConfig {
        open_files: 0,
        ..config(&tmp.path().join("cache"), 1 << 30)
    })
    .expect("open");
    let id = ids[0];
    let key = DecodeKey {
        id,
        key: None,
        compressed: false,
        plain_len: 4096,
    };
    cache
        .get_decoded(&key, true, || f.get(&id), Ok)
        .expect("fetched and kept");
    let entry = cache.layout.entry(&id);
    let (before, _) = times(&entry);
    std::thread::sleep(Duration::from_millis(20));
    cache
        .get_decoded_now(&key, true, |_| panic!("decoded again"))
        .expect("from the memory tier");
    // No handle to record through: a pool thread opens the entry by path.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while times(&entry).0 <= before {
        assert!(
            std::time::Instant::now() < deadline,
            "the access was never recorded"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let (atime, mtime) = times(&entry);
    assert_eq!(mtime, before, "the previous access moved to mtime");
    assert!(atime > before);
    assert_eq!(cache.stats().expect("stats").open_files, 0, "no handle");
}
