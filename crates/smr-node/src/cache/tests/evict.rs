//! Budget, LRU-K order, busy entries.

use super::*;

/// Bytes of entries actually on disk.
fn on_disk(dir: &Path) -> u64 {
    let mut total = 0;
    for sub in fs::read_dir(dir.join("chunks")).expect("chunks") {
        for e in fs::read_dir(sub.expect("sub").path()).expect("sub dir") {
            total += e.expect("entry").metadata().expect("meta").len();
        }
    }
    total
}

#[test]
fn budget_holds_and_a_chunk_read_twice_survives_a_scan() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let len = 16 * 1024;
    let (store, ids) = store_with(&tmp.path().join("store"), 30, len as usize);
    let f = Fetcher::new(store, Duration::ZERO);
    let dir = tmp.path().join("cache");
    let budget = 10 * len;
    {
        let cache = Cache::open(config(&dir, budget)).expect("open");
        cache
            .get_or_fetch(&ids[0], || f.get(&ids[0]))
            .expect("fetch");
        cache.get_or_fetch(&ids[0], never).expect("second access");
    }
    // The history lives in the entries: it survives a restart.
    let cache = Cache::open(config(&dir, budget)).expect("reopen");
    for id in &ids[1..] {
        cache.get_or_fetch(id, || f.get(id)).expect("scan");
        assert!(on_disk(&dir) <= budget, "over budget: {}", on_disk(&dir));
    }
    assert!(
        cache.contains(&ids[0]),
        "the chunk accessed twice outlives the scan"
    );
    assert!(
        !cache.contains(&ids[1]),
        "the oldest chunk seen once went first"
    );
    assert!(cache.contains(&ids[29]), "the newest stays");
    let s = cache.stats().expect("stats");
    assert_eq!(s.counters.total_bytes, on_disk(&dir));
    assert_eq!(s.counters.evictions, 30 - s.counters.entries);
    assert_eq!(s.counters.evicted_bytes, s.counters.evictions * len);
}

#[test]
fn an_entry_being_read_is_not_evicted() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (store, ids) = store_with(&tmp.path().join("store"), 3, 4096);
    let f = Fetcher::new(store, Duration::ZERO);
    let cache = Cache::open(config(&tmp.path().join("cache"), 1 << 30)).expect("open");
    for id in &ids {
        cache.get_or_fetch(id, || f.get(id)).expect("fetch");
    }
    // What a reader in another process holds while loading an entry.
    let reader = fs::File::open(cache.layout.entry(&ids[1])).expect("entry");
    rustix::fs::flock(&reader, rustix::fs::FlockOperation::LockShared).expect("LOCK_SH");

    let r = cache.prune(0).expect("prune");
    assert_eq!(
        (r.scanned_entries, r.evicted_entries, r.busy_skipped),
        (3, 2, 1)
    );
    assert_eq!((r.remaining_entries, r.remaining_bytes), (1, 4096));
    assert!(cache.contains(&ids[1]) && !cache.contains(&ids[0]) && !cache.contains(&ids[2]));

    drop(reader);
    let r = cache.prune(0).expect("prune");
    assert_eq!((r.evicted_entries, r.remaining_bytes), (1, 0));
    let s = cache.stats().expect("stats");
    assert_eq!(
        (
            s.counters.evictions,
            s.counters.entries,
            s.counters.total_bytes
        ),
        (3, 0, 0)
    );
}

/// The cache on a filesystem smaller than its budget: the budget follows
/// the free space, so inserts keep succeeding (older entries evicted) and
/// a little space stays free, instead of every insert failing.
#[test]
fn a_nearly_full_disk_shrinks_the_budget() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let len = 64 * 1024;
    let (store, ids) = store_with(&tmp.path().join("store"), 160, len as usize);
    let f = Fetcher::new(store, Duration::ZERO);
    let mnt = tmp.path().join("small");
    fs::create_dir(&mnt).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs"])
        .arg(&mnt)
        .status()
        .expect("mount");
    assert!(
        mounted.success(),
        "mounting a tmpfs needs root, as the suite does"
    );
    struct Umount<'a>(&'a Path);
    impl Drop for Umount<'_> {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(self.0).status();
        }
    }
    let _umount = Umount(&mnt);
    let dir = mnt.join("cache");
    let cache = Cache::open(config(&dir, 1 << 30)).expect("open");
    for id in &ids {
        cache.get_or_fetch(id, || f.get(id)).expect("served");
        assert!(cache.contains(id), "each new chunk is cached");
    }
    assert!(on_disk(&dir) < 4 << 20, "{}", on_disk(&dir));
    assert!(cache.stats().expect("stats").counters.evictions > 0);
    let st = rustix::fs::statvfs(&mnt).unwrap();
    assert!(st.f_bavail * st.f_frsize > 0, "the cache left room");
}

#[test]
fn pinned_chunks_go_last_and_a_dead_pin_is_dropped() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (store, ids) = store_with(&tmp.path().join("store"), 6, 4096);
    let f = Fetcher::new(store, Duration::ZERO);
    let cache = Cache::open(config(&tmp.path().join("cache"), 1 << 30)).expect("open");
    // Pinned chunks are the oldest, so plain LRU would take them first.
    for id in &ids {
        cache.get_or_fetch(id, || f.get(id)).expect("fetch");
    }
    let pin = cache.pin(ids[..3].iter().copied()).expect("pin");
    let r = cache.prune(3 * 4096).expect("prune");
    assert_eq!(r.evicted_entries, 3);
    assert!(ids[..3].iter().all(|id| cache.contains(id)), "pinned kept");
    assert!(ids[3..].iter().all(|id| !cache.contains(id)));
    // Over the budget with only pinned entries left, they go too.
    let r = cache.prune(4096).expect("prune");
    assert_eq!(r.evicted_entries, 2);
    // A pin whose process is gone (its lock not held) counts for nothing
    // and is removed.
    let pins = tmp.path().join("cache/pins");
    let stale = pins.join("999999-0");
    fs::write(&stale, ids[0].0).expect("stale pin");
    drop(pin);
    let r = cache.prune(0).expect("prune");
    assert_eq!(r.remaining_entries, 0);
    assert_eq!(
        fs::read_dir(&pins).expect("pins").count(),
        0,
        "stale and dropped pins removed"
    );
}
