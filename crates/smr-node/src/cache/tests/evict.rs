//! Budget, LRU-K order over segments, busy segments, pins.

use super::*;

/// Bytes of segments actually on disk.
fn on_disk(dir: &Path) -> u64 {
    fs::read_dir(dir.join("segments"))
        .expect("segments")
        .map(|e| e.expect("entry"))
        .filter(|e| !e.file_name().to_string_lossy().ends_with(".idx"))
        .map(|e| e.metadata().expect("meta").len())
        .sum()
}

/// Budget 4 MiB: segments of 256 KiB, four 64 KiB chunks each.
const BUDGET: u64 = 4 << 20;
const LEN: u64 = 64 * KIB;

#[test]
fn budget_holds_and_a_segment_read_twice_survives_a_scan() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (store, ids) = store_with(&tmp.path().join("store"), 100, LEN as usize);
    let f = Fetcher::new(store, Duration::ZERO);
    let dir = tmp.path().join("cache");
    {
        let cache = Cache::open(config(&dir, BUDGET)).expect("open");
        for id in &ids[..4] {
            cache.get_or_fetch(id, || f.get(id)).expect("fetch");
        }
    }
    // The first segment, sealed, is read again after a restart: its
    // history (in its timestamps) now holds two accesses.
    let cache = Cache::open(config(&dir, BUDGET)).expect("reopen");
    cache.get_or_fetch(&ids[0], never).expect("second access");
    for id in &ids[4..] {
        cache.get_or_fetch(id, || f.get(id)).expect("scan");
        assert!(on_disk(&dir) <= BUDGET, "over budget: {}", on_disk(&dir));
    }
    assert!(
        ids[..4].iter().all(|id| cache.contains(id)),
        "the segment accessed twice outlives the scan"
    );
    assert!(
        !cache.contains(&ids[4]),
        "the oldest segment seen once went first"
    );
    assert!(cache.contains(&ids[99]), "the newest stays");
    let s = cache.stats().expect("stats");
    assert_eq!(s.counters.total_bytes, on_disk(&dir));
    assert_eq!(s.counters.evictions, 100 - s.counters.entries);
    assert_eq!(s.counters.evicted_bytes, s.counters.evictions * LEN);
}

/// Another process's segment is not evicted while it writes it; a segment
/// evicted under a reader is still read right, and closed by its next
/// refresh.
#[test]
fn segments_being_written_stay_and_evicted_ones_read_right_until_closed() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (store, ids) = store_with(&tmp.path().join("store"), 12, LEN as usize);
    let f = Fetcher::new(store, Duration::ZERO);
    let dir = tmp.path().join("cache");
    let writer = Cache::open(config(&dir, BUDGET)).expect("writer");
    let reader = Cache::open(config(&dir, BUDGET)).expect("reader");
    let other = Cache::open(config(&dir, BUDGET)).expect("evictor");
    for id in &ids[..6] {
        writer.get_or_fetch(id, || f.get(id)).expect("fetch");
    }
    reader.refresh().expect("refresh");
    for id in &ids[..6] {
        reader.get_or_fetch(id, never).expect("shared");
    }
    assert_eq!(reader.stats().expect("stats").open_files, 2);
    let r = other.prune(0).expect("prune");
    assert_eq!((r.evicted_segments, r.busy_skipped), (1, 1), "{r:?}");
    assert_eq!(
        (r.evicted_entries, r.remaining_entries),
        (4, 2),
        "the sealed segment went, the one being written stayed"
    );
    // The reader still has the evicted segment open: right bytes.
    for id in &ids[..4] {
        let got = reader.get_or_fetch(id, never).expect("still readable");
        assert_eq!(ChunkId::of(&got), *id);
    }
    reader.refresh().expect("refresh");
    assert_eq!(reader.stats().expect("stats").open_files, 1, "closed");
    assert!(!reader.contains(&ids[0]) && reader.contains(&ids[5]));
    // Threads reading while another cache evicts everything it can:
    // every read is right, refetched when its segment is gone.
    std::thread::scope(|s| {
        for t in 0..3usize {
            let (reader, f, ids) = (&reader, &f, &ids);
            s.spawn(move || {
                for k in 0..200 {
                    let id = &ids[(k * 7 + t) % ids.len()];
                    let got = reader.get_or_fetch(id, || f.get(id)).expect("read");
                    assert_eq!(ChunkId::of(&got), *id);
                }
            });
        }
        for _ in 0..20 {
            other.prune(0).expect("prune");
            std::thread::sleep(Duration::from_millis(2));
        }
    });
    // A writer idle long enough has its segment sealed (its flusher does
    // so after 30 s): then it can be evicted while the process lives.
    assert!(writer.segs.seal_if_idle(Duration::ZERO));
    assert!(!writer.segs.seal_if_idle(Duration::ZERO), "nothing to seal");
    let r = other.prune(0).expect("prune");
    assert!(r.evicted_segments >= 1, "{r:?}");
    writer.refresh().expect("refresh");
    assert!(!writer.contains(&ids[5]), "its sealed segment was evicted");
    drop(reader);
    let r = other.prune(0).expect("prune");
    assert_eq!((r.remaining_entries, r.remaining_bytes), (0, 0), "{r:?}");
    assert_eq!(on_disk(&dir), 0);
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
fn pinned_segments_go_last_and_a_dead_pin_is_dropped() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // 128 KiB chunks: two per segment.
    let len = 2 * LEN;
    let (store, ids) = store_with(&tmp.path().join("store"), 6, len as usize);
    let f = Fetcher::new(store, Duration::ZERO);
    let dir = tmp.path().join("cache");
    {
        let cache = Cache::open(config(&dir, BUDGET)).expect("open");
        for id in &ids {
            cache.get_or_fetch(id, || f.get(id)).expect("fetch");
        }
    }
    let cache = Cache::open(config(&dir, BUDGET)).expect("reopen");
    // The pinned chunk's segment is the oldest: plain LRU would take it
    // first.
    let pin = cache.pin([ids[1]]).expect("pin");
    let r = cache.prune(2 * len).expect("prune");
    assert_eq!((r.evicted_segments, r.evicted_entries), (2, 4), "{r:?}");
    assert!(ids[..2].iter().all(|id| cache.contains(id)), "pinned kept");
    assert!(ids[2..].iter().all(|id| !cache.contains(id)));
    // Over the budget with only pinned entries left, they go too.
    let r = cache.prune(len).expect("prune");
    assert_eq!(r.evicted_entries, 2);
    // A pin whose process is gone (its lock not held) counts for nothing
    // and is removed.
    let pins = dir.join("pins");
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
