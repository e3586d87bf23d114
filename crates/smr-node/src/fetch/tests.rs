//! The fetcher over a real directory store holding "packs" (several chunks
//! per file, as a registry artifact has them), counted and gated at the
//! store.

use super::*;
use smr_store::{LocalStore, PutOutcome, Target};
use std::sync::atomic::AtomicBool;
use std::time::Duration;

/// A directory store whose chunks live in pack files `packs/<n>`; counts
/// requests, can fail them, and can hold requests of some objects until
/// released.
struct PackStore {
    local: LocalStore,
    _dir: tempfile::TempDir,
    where_: HashMap<ChunkId, Extent>,
    requests: AtomicU64,
    fail: AtomicBool,
    panic: AtomicBool,
    held: Mutex<Vec<ObjectName>>,
    release: Condvar,
}

/// The chunks of each pack: `(id, bytes)`.
type Packs = Vec<Vec<(ChunkId, Vec<u8>)>>;

/// `packs[p]` chunks of 10 KiB (distinct bytes) in pack `p`; returns the
/// store and the chunks.
fn pack_store(packs: &[usize]) -> (Arc<PackStore>, Packs) {
    let dir = tempfile::tempdir().unwrap();
    let local = LocalStore::open(dir.path()).unwrap();
    std::fs::create_dir_all(dir.path().join("packs")).unwrap();
    let (mut where_, mut all) = (HashMap::new(), Vec::new());
    for (p, &n) in packs.iter().enumerate() {
        let (mut data, mut chunks) = (Vec::new(), Vec::new());
        for i in 0..n {
            let bytes: Vec<u8> = (0..10_240).map(|b| (b * 7 + i * 13 + p) as u8).collect();
            let id = ChunkId::of(&bytes);
            where_.insert(
                id,
                Extent {
                    object: ObjectName::new(format!("packs/{p}")),
                    range: ByteRange::new(data.len() as u64, bytes.len() as u64),
                },
            );
            data.extend_from_slice(&bytes);
            chunks.push((id, bytes));
        }
        std::fs::write(dir.path().join(format!("packs/{p}")), &data).unwrap();
        all.push(chunks);
    }
    let store = PackStore {
        local,
        _dir: dir,
        where_,
        requests: AtomicU64::new(0),
        fail: AtomicBool::new(false),
        panic: AtomicBool::new(false),
        held: Mutex::new(Vec::new()),
        release: Condvar::new(),
    };
    (Arc::new(store), all)
}

impl PackStore {
    fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }

    fn hold(&self, object: &str) {
        self.held.lock().unwrap().push(ObjectName::new(object));
    }

    fn release_all(&self) {
        self.held.lock().unwrap().clear();
        self.release.notify_all();
    }
}

impl ChunkStore for PackStore {
    fn describe(&self) -> String {
        "packs".into()
    }
    fn locate(&self, id: &ChunkId) -> smr_store::Result<Extent> {
        self.where_
            .get(id)
            .cloned()
            .ok_or_else(|| StoreError::Missing {
                what: Target::Chunk(*id),
                store: self.describe(),
            })
    }
    fn read_ranges(
        &self,
        object: &ObjectName,
        ranges: &[ByteRange],
    ) -> smr_store::Result<Vec<Vec<u8>>> {
        self.requests
            .fetch_add(ranges.len() as u64, Ordering::SeqCst);
        let mut held = self.held.lock().unwrap();
        while held.contains(object) {
            held = self.release.wait(held).unwrap();
        }
        drop(held);
        assert!(!self.panic.load(Ordering::SeqCst), "injected panic");
        if self.fail.load(Ordering::SeqCst) {
            return Err(StoreError::ChunkIo {
                what: Target::of(object, ranges[0]),
                store: self.describe(),
                source: std::io::Error::other("injected failure"),
            });
        }
        self.local.read_ranges(object, ranges)
    }
    fn put(&self, id: &ChunkId, data: &[u8]) -> smr_store::Result<PutOutcome> {
        self.local.put(id, data)
    }
    fn exists(&self, id: &ChunkId) -> smr_store::Result<bool> {
        Ok(self.where_.contains_key(id))
    }
}

fn extents(store: &PackStore, chunks: &[(ChunkId, Vec<u8>)]) -> Vec<(ChunkId, Extent)> {
    chunks
        .iter()
        .map(|(id, _)| (*id, store.locate(id).unwrap()))
        .collect()
}

#[test]
fn adjacent_misses_become_one_request() {
    let (store, chunks) = pack_store(&[12]);
    let f = Fetcher::new(store.clone(), FetchOptions::default());
    // Hold the pack so that all twelve are queued before any request.
    store.hold("packs/0");
    f.plan(&extents(&store, &chunks[0]), Priority::Demand, |_| true);
    store.release_all();
    for (id, bytes) in &chunks[0] {
        assert_eq!(&f.get(id, Priority::Demand).unwrap(), bytes);
    }
    // Planned together, read together.
    assert_eq!(store.requests(), 1);
    let s = f.stats();
    assert_eq!((s.requests, s.chunks, s.bytes_discarded), (1, 12, 0));
}

#[test]
fn holes_up_to_max_gap_are_read_larger_ones_split() {
    let (store, chunks) = pack_store(&[10]);
    let opts = FetchOptions {
        max_gap: 10_240,
        ..FetchOptions::default()
    };
    let f = Fetcher::new(store.clone(), opts);
    store.hold("packs/0");
    // 0, 2 (one chunk's hole: read), then 6 (a three-chunk hole: split).
    let picked: Vec<_> = [0, 2, 6].iter().map(|&i| chunks[0][i].clone()).collect();
    f.plan(&extents(&store, &picked), Priority::Demand, |_| true);
    store.release_all();
    for (id, bytes) in &picked {
        assert_eq!(&f.get(id, Priority::Demand).unwrap(), bytes);
    }
    let s = f.stats();
    assert_eq!((s.requests, s.bytes_discarded), (2, 10_240), "{s:?}");
    assert_eq!(s.requests, store.requests());
}

#[test]
fn requests_respect_the_size_cap() {
    let (store, chunks) = pack_store(&[10]);
    let opts = FetchOptions {
        max_request: 3 * 10_240,
        ..FetchOptions::default()
    };
    let f = Fetcher::new(store.clone(), opts);
    store.hold("packs/0");
    f.plan(&extents(&store, &chunks[0]), Priority::Demand, |_| true);
    store.release_all();
    for (id, bytes) in &chunks[0] {
        assert_eq!(&f.get(id, Priority::Demand).unwrap(), bytes);
    }
    // Ten chunks, at most three per request.
    assert_eq!(store.requests(), 4);
}

#[test]
fn a_prefetch_never_delays_a_demand_read() {
    // Each chunk in its own pack: nothing coalesces.
    let (store, chunks) = pack_store(&[1; 12]);
    let opts = FetchOptions {
        requests: 3,
        reserved: 1,
        ..FetchOptions::default()
    };
    let f = Fetcher::new(store.clone(), opts);
    // Every prefetch hangs at the store.
    for p in 0..10 {
        store.hold(&format!("packs/{p}"));
    }
    let prefetches: Vec<_> = (0..10).map(|p| chunks[p][0].clone()).collect();
    f.plan(&extents(&store, &prefetches), Priority::Prefetch, |_| true);
    std::thread::sleep(Duration::from_millis(50));
    // Prefetches took at most their share of the request threads ...
    assert_eq!(store.requests(), 2, "prefetches running");
    // ... so demand reads go through at once, while they hang.
    for p in [10, 11] {
        let (id, bytes) = &chunks[p][0];
        assert_eq!(&f.get(id, Priority::Demand).unwrap(), bytes);
    }
    assert_eq!(store.requests(), 4);
    // A queued prefetch a reader now waits for goes first when a
    // thread frees up.
    let (late, late_bytes) = chunks[9][0].clone();
    let waiter = {
        let f = f.clone();
        std::thread::spawn(move || f.get(&late, Priority::Demand))
    };
    std::thread::sleep(Duration::from_millis(50));
    store.release_all();
    assert_eq!(waiter.join().unwrap().unwrap(), late_bytes);
    // The other prefetches wait for their readers.
    for (id, bytes) in &prefetches[..9] {
        assert_eq!(&f.get(id, Priority::Demand).unwrap(), bytes);
    }
    assert_eq!(store.requests(), 12, "each chunk read once");
}

#[test]
fn concurrent_gets_of_a_chunk_share_one_request() {
    let (store, chunks) = pack_store(&[1]);
    let f = Fetcher::new(store.clone(), FetchOptions::default());
    store.hold("packs/0");
    let (id, bytes) = chunks[0][0].clone();
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let f = f.clone();
            std::thread::spawn(move || f.get(&id, Priority::Demand))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(50));
    store.release_all();
    for t in threads {
        assert_eq!(t.join().unwrap().unwrap(), bytes);
    }
    assert_eq!(store.requests(), 1);
}

#[test]
fn a_failed_request_reaches_every_chunk_it_was_to_serve() {
    let (store, chunks) = pack_store(&[6]);
    let f = Fetcher::new(store.clone(), FetchOptions::default());
    store.fail.store(true, Ordering::SeqCst);
    store.hold("packs/0");
    f.plan(&extents(&store, &chunks[0]), Priority::Demand, |_| true);
    std::thread::sleep(Duration::from_millis(20));
    store.release_all();
    for (id, _) in &chunks[0] {
        let err = f.get(id, Priority::Demand).unwrap_err().to_string();
        assert!(
            err.contains("packs/0") && err.contains("injected failure"),
            "{err}"
        );
    }
    // Nothing is remembered: the next get asks again, and succeeds.
    store.fail.store(false, Ordering::SeqCst);
    let before = store.requests();
    let (id, bytes) = &chunks[0][3];
    assert_eq!(&f.get(id, Priority::Demand).unwrap(), bytes);
    assert_eq!(store.requests(), before + 1);
    assert!(f.stats().failed_requests >= 1);
}

#[test]
fn unknown_chunks_fail_without_a_request() {
    let (store, _) = pack_store(&[1]);
    let f = Fetcher::new(store.clone(), FetchOptions::default());
    let err = f.get(&ChunkId([9; 32]), Priority::Demand).unwrap_err();
    assert!(matches!(
        err,
        FetchError::Locate(StoreError::Missing { .. })
    ));
    assert_eq!(store.requests(), 0);
}

#[test]
fn a_panicking_store_fails_the_request_and_the_fetcher_goes_on() {
    let (store, chunks) = pack_store(&[3]);
    let f = Fetcher::new(store.clone(), FetchOptions::default());
    store.panic.store(true, Ordering::SeqCst);
    let (id, bytes) = &chunks[0][1];
    let err = f.get(id, Priority::Demand).unwrap_err().to_string();
    assert!(err.contains("the store panicked"), "{err}");
    store.panic.store(false, Ordering::SeqCst);
    assert_eq!(&f.get(id, Priority::Demand).unwrap(), bytes);
    assert_eq!(super::tests_running(&f), 0, "request slots freed");
}
