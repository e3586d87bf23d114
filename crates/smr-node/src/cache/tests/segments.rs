//! Segments and journals on disk: fill order, sealing, what other
//! processes see, damaged journals, and the LRU-K timestamps.

use super::*;
use std::fs::{File, FileTimes};
use std::time::{SystemTime, UNIX_EPOCH};

/// (atime, mtime) of a file: a segment's LRU-K history.
fn times(path: &Path) -> (SystemTime, SystemTime) {
    let m = fs::metadata(path).expect("metadata");
    (m.accessed().expect("atime"), m.modified().expect("mtime"))
}

/// The journals in the cache directory `dir`.
fn journals(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = fs::read_dir(dir.join("segments"))
        .expect("segments")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "idx"))
        .collect();
    v.sort();
    v
}

/// Budget 4 MiB: segments of 256 KiB.
const BUDGET: u64 = 4 << 20;

#[test]
fn segments_fill_in_fetch_order_and_are_sealed_when_full_and_at_exit() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (store, ids) = store_with(&tmp.path().join("store"), 10, 64 * 1024);
    let f = Fetcher::new(store, Duration::ZERO);
    let dir = tmp.path().join("cache");
    let cache = Cache::open(config(&dir, BUDGET)).expect("open");
    for id in &ids {
        cache.get_or_fetch(id, || f.get(id)).expect("fetch");
    }
    let places: Vec<_> = ids
        .iter()
        .map(|id| cache.segs.place(id).expect("cached"))
        .collect();
    // Four chunks per segment, back to back in the order fetched.
    for (k, (path, loc)) in places.iter().enumerate() {
        assert_eq!(*path, places[k / 4 * 4].0, "chunk {k}");
        assert_eq!(loc.off, (k as u64 % 4) * 64 * KIB, "chunk {k}");
    }
    assert!(places[0].0 < places[4].0 && places[4].0 < places[8].0);
    let sealed = |p: &Path| {
        let j = fs::read(p).expect("journal");
        j.ends_with(&super::super::journal::Record::Sealed.encode())
    };
    let js = journals(&dir);
    assert_eq!(js.len(), 3);
    assert!(sealed(&js[0]) && sealed(&js[1]) && !sealed(&js[2]));
    assert_eq!(times(&places[0].0).1, UNIX_EPOCH, "sealed as seen once");
    drop(cache);
    assert!(sealed(&js[2]), "sealed when the cache is dropped");
    assert_eq!(
        fs::metadata(&places[8].0).expect("segment").len(),
        128 * KIB
    );
}

/// A process sees what another inserted once it refreshes (a miss does
/// so under the chunk's fetch lock, so it never fetches it again).
#[test]
fn other_processes_entries_are_found_through_their_journals() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (store, ids) = store_with(&tmp.path().join("store"), 3, 4096);
    let f = Fetcher::new(store, Duration::ZERO);
    let dir = tmp.path().join("cache");
    let a = Cache::open(config(&dir, BUDGET)).expect("a");
    let b = Cache::open(config(&dir, BUDGET)).expect("b");
    a.get_or_fetch(&ids[0], || f.get(&ids[0])).expect("fetch");
    assert!(!b.contains(&ids[0]), "not yet seen");
    let got = b.get_or_fetch(&ids[0], never).expect("found on the miss");
    assert_eq!(ChunkId::of(&got), ids[0]);
    a.get_or_fetch(&ids[1], || f.get(&ids[1])).expect("fetch");
    b.refresh().expect("refresh");
    assert!(b.contains(&ids[1]) && !b.contains(&ids[2]));
    assert_eq!(f.calls(), 2);
}

/// A journal with a torn last record (a power cut) is read up to it; a
/// record naming another segment or an entry larger than any chunk is
/// ignored; garbage files in the directory are not segments.
#[test]
fn damaged_journals_are_read_up_to_the_damage() {
    use super::super::journal::{Loc, Record};
    let tmp = tempfile::tempdir().expect("tempdir");
    let (store, ids) = store_with(&tmp.path().join("store"), 4, 4096);
    let f = Fetcher::new(store, Duration::ZERO);
    let dir = tmp.path().join("cache");
    let cache = Cache::open(config(&dir, BUDGET)).expect("open");
    for id in &ids[..2] {
        cache.get_or_fetch(id, || f.get(id)).expect("fetch");
    }
    drop(cache);
    let j = journals(&dir).pop().expect("a journal");
    let mut bytes = fs::read(&j).expect("journal");
    let sealed = Record::Sealed.encode();
    bytes.truncate(bytes.len() - sealed.len());
    let (_, loc) = {
        let c = Cache::open(config(&dir, BUDGET)).expect("peek");
        c.segs.place(&ids[0]).expect("cached")
    };
    let bogus = |id: ChunkId, loc: Loc| Record::Entry { id, loc }.encode();
    bytes.extend_from_slice(&bogus(
        ids[2],
        Loc {
            seg: loc.seg + 1,
            ..loc
        },
    ));
    bytes.extend_from_slice(&bogus(
        ids[3],
        Loc {
            len: u32::MAX,
            ..loc
        },
    ));
    let mut torn = bogus(ids[3], loc);
    torn[10] ^= 1;
    bytes.extend_from_slice(&torn);
    fs::write(&j, &bytes).expect("damage the journal");
    fs::write(dir.join("segments/not-a-segment.idx"), b"junk").expect("junk");
    let cache = Cache::open(config(&dir, BUDGET)).expect("reopen");
    for id in &ids[..2] {
        cache.get_or_fetch(id, never).expect("kept");
    }
    assert!(!cache.contains(&ids[2]) && !cache.contains(&ids[3]));
    assert_eq!(cache.stats().expect("stats").counters.entries, 2);
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
    let (segment, _) = cache.segs.place(&ids[0]).expect("cached");
    drop(cache);
    let sealed = times(&segment);
    assert_eq!(sealed.1, UNIX_EPOCH, "seen once so far");
    let cache = Cache::open(cfg.clone()).expect("reopen");
    for _ in 0..3 {
        cache.get_or_fetch(&ids[0], never).expect("hit");
    }
    assert_eq!(
        times(&segment),
        sealed,
        "loads within a minute of the last recorded access write nothing"
    );
    drop(cache);

    // The last recorded access is two minutes old: the next load records
    // (mtime := that access, atime := now), the one after it does not.
    let two_min_ago = SystemTime::now() - Duration::from_secs(120);
    File::options()
        .write(true)
        .open(&segment)
        .expect("segment")
        .set_times(FileTimes::new().set_accessed(two_min_ago))
        .expect("age the segment");
    let cache = Cache::open(cfg).expect("reopen");
    cache.get_or_fetch(&ids[0], never).expect("hit");
    let (atime, mtime) = times(&segment);
    assert_eq!(mtime, two_min_ago, "the previous access moved to mtime");
    assert!(atime > two_min_ago + Duration::from_secs(100), "{atime:?}");
    cache.get_or_fetch(&ids[0], never).expect("hit");
    assert_eq!(times(&segment), (atime, mtime), "recorded once");
}

#[test]
fn a_memory_hit_on_a_segment_not_open_is_recorded_off_the_event_loop() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (store, ids) = store_with(&tmp.path().join("store"), 1, 4096);
    let f = Fetcher::new(store, Duration::ZERO);
    let dir = tmp.path().join("cache");
    drop(
        Cache::open(config(&dir, 1 << 30))
            .expect("open")
            .get_or_fetch(&ids[0], || f.get(&ids[0]))
            .expect("fetch"),
    );
    let cache = Cache::open(config(&dir, 1 << 30)).expect("reopen");
    let key = DecodeKey {
        id: ids[0],
        key: None,
        compressed: false,
        plain_len: 4096,
    };
    // Kept in memory from a fresh view of the segments (none open).
    cache.keep(&key, &Arc::new(bytes(1, 4096)));
    assert_eq!(cache.stats().expect("stats").open_files, 0);
    let (segment, _) = cache.segs.place(&ids[0]).expect("cached");
    let (before, _) = times(&segment);
    std::thread::sleep(Duration::from_millis(20));
    cache
        .get_decoded_now(&key, true, |_| panic!("decoded again"))
        .expect("from the memory tier");
    // Nothing open to record through: a pool thread opens the segment.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while times(&segment).0 <= before {
        assert!(
            std::time::Instant::now() < deadline,
            "the access was never recorded"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let (atime, mtime) = times(&segment);
    assert_eq!(mtime, before, "the previous access moved to mtime");
    assert!(atime > before);
}
