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
    /// Streamed reads: the next one stops after this many bytes until
    /// released (then fails if `fail` is set by then).
    stall_at: Mutex<Option<usize>>,
    stalled: Mutex<bool>,
    unstall: Condvar,
    /// Requests running now, the most at once, and each one's range.
    running: AtomicU64,
    max_running: AtomicU64,
    ranges: Mutex<Vec<ByteRange>>,
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
        stall_at: Mutex::new(None),
        stalled: Mutex::new(false),
        unstall: Condvar::new(),
        running: AtomicU64::new(0),
        max_running: AtomicU64::new(0),
        ranges: Mutex::new(Vec::new()),
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
        *self.stalled.lock().unwrap() = false;
        self.release.notify_all();
        self.unstall.notify_all();
    }

    /// Stops the calling read until [`PackStore::release_all`].
    fn stall(&self) {
        let mut stalled = self.stalled.lock().unwrap();
        *stalled = true;
        while *stalled {
            stalled = self.unstall.wait(stalled).unwrap();
        }
    }

    /// Waits while `object` is held.
    fn wait_held(&self, object: &ObjectName) {
        let mut held = self.held.lock().unwrap();
        while held.contains(object) {
            held = self.release.wait(held).unwrap();
        }
    }

    /// Counts a request of `range` running while `read` runs.
    fn counted<T>(&self, range: ByteRange, read: impl FnOnce() -> T) -> T {
        self.ranges.lock().unwrap().push(range);
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_running.fetch_max(now, Ordering::SeqCst);
        let out = read();
        self.running.fetch_sub(1, Ordering::SeqCst);
        out
    }

    /// What every request meets first: a hold on its object, then the
    /// injected panic or failure.
    fn admit(&self, object: &ObjectName, range: ByteRange) -> smr_store::Result<()> {
        self.wait_held(object);
        assert!(!self.panic.load(Ordering::SeqCst), "injected panic");
        match self.fail.load(Ordering::SeqCst) {
            true => Err(self.injected(object, range)),
            false => Ok(()),
        }
    }

    fn injected(&self, object: &ObjectName, range: ByteRange) -> StoreError {
        StoreError::ChunkIo {
            what: Target::of(object, range),
            store: self.describe(),
            source: std::io::Error::other("injected failure"),
        }
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
        self.counted(ranges[0], || {
            self.admit(object, ranges[0])?;
            self.local.read_ranges(object, ranges)
        })
    }
    /// Hands out the answer 1 KiB at a time, stalling where told.
    fn read_range_progressive(
        &self,
        object: &ObjectName,
        range: ByteRange,
        progress: &smr_store::Progress,
    ) -> smr_store::Result<Vec<u8>> {
        self.requests.fetch_add(1, Ordering::SeqCst);
        self.counted(range, || {
            self.admit(object, range)?;
            let all = self.local.read_ranges(object, &[range])?.remove(0);
            let mut stall = self.stall_at.lock().unwrap().take();
            for end in (1024..all.len() + 1024).step_by(1024) {
                let end = end.min(all.len());
                if stall.is_some_and(|at| end > at) {
                    stall = None;
                    self.stall();
                    if self.fail.load(Ordering::SeqCst) {
                        return Err(self.injected(object, range));
                    }
                }
                progress(&all[..end]);
            }
            Ok(all)
        })
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
    settle(&f);
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
    settle(&f);
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

/// Waits until no request runs (counters are final).
fn settle(f: &Fetcher) {
    while super::tests_running(f) > 0 {
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// `f.get(id)` on another thread; its answer within five seconds, or
/// `None` if it is still waiting.
fn get_within(f: &Arc<Fetcher>, id: ChunkId) -> Option<Result<Vec<u8>, FetchError>> {
    let (tx, rx) = std::sync::mpsc::channel();
    let f = f.clone();
    std::thread::spawn(move || tx.send(f.get(&id, Priority::Demand)));
    rx.recv_timeout(Duration::from_secs(5)).ok()
}

#[test]
fn chunks_at_the_front_of_a_long_request_arrive_before_its_end() {
    let (store, chunks) = pack_store(&[12]);
    let f = Fetcher::new(store.clone(), FetchOptions::default());
    // The answer stops after three and a half chunks.
    *store.stall_at.lock().unwrap() = Some(35 * 1024);
    f.plan(&extents(&store, &chunks[0]), Priority::Prefetch, |_| true);
    for (id, bytes) in &chunks[0][..3] {
        let got = get_within(&f, *id).expect("delivered while the request runs");
        assert_eq!(&got.unwrap(), bytes);
    }
    assert_eq!(store.running.load(Ordering::SeqCst), 1, "still running");
    store.release_all();
    for (id, bytes) in &chunks[0][3..] {
        assert_eq!(&f.get(id, Priority::Demand).unwrap(), bytes);
    }
    assert_eq!(store.requests(), 1, "one request served all twelve");
}

#[test]
fn a_request_that_fails_midway_keeps_the_chunks_it_delivered() {
    let (store, chunks) = pack_store(&[6]);
    let f = Fetcher::new(store.clone(), FetchOptions::default());
    *store.stall_at.lock().unwrap() = Some(25 * 1024);
    f.plan(&extents(&store, &chunks[0]), Priority::Demand, |_| true);
    let (late, _) = chunks[0][4];
    let waiter = {
        let f = f.clone();
        std::thread::spawn(move || f.get(&late, Priority::Demand))
    };
    for (id, bytes) in &chunks[0][..2] {
        assert_eq!(&get_within(&f, *id).unwrap().unwrap(), bytes);
    }
    store.fail.store(true, Ordering::SeqCst);
    store.release_all();
    let err = waiter.join().unwrap().unwrap_err().to_string();
    assert!(err.contains("injected failure"), "{err}");
    settle(&f);
    assert!(f.stats().failed_requests >= 1);
    assert_eq!(super::tests_running(&f), 0, "request slots freed");
}

#[test]
fn a_stream_is_read_in_order_one_large_request_at_a_time() {
    let (store, chunks) = pack_store(&[30]);
    let opts = FetchOptions {
        max_request: 3 * 10_240,
        max_stream: 8 * 10_240,
        ..FetchOptions::default()
    };
    let f = Fetcher::new(store.clone(), opts);
    store.hold("packs/0");
    f.plan_stream(&extents(&store, &chunks[0]), |_| true);
    std::thread::sleep(Duration::from_millis(50));
    store.release_all();
    for (id, bytes) in &chunks[0] {
        assert_eq!(&f.get(id, Priority::Prefetch).unwrap(), bytes);
    }
    let ranges = store.ranges.lock().unwrap().clone();
    let spans: Vec<_> = ranges.iter().map(|r| (r.offset / 10_240, r.len)).collect();
    let want: Vec<_> = [(0, 8), (8, 8), (16, 8), (24, 6)]
        .iter()
        .map(|&(at, n)| (at, Some(n * 10_240)))
        .collect();
    assert_eq!(spans, want, "in order, up to eight chunks each");
    assert_eq!(store.max_running.load(Ordering::SeqCst), 1);
}

#[test]
fn a_reader_of_a_stream_chunk_does_not_wait_for_the_stream() {
    let (store, chunks) = pack_store(&[30]);
    let opts = FetchOptions {
        max_request: 2 * 10_240,
        max_stream: 8 * 10_240,
        ..FetchOptions::default()
    };
    let f = Fetcher::new(store.clone(), opts);
    // The stream's first request stalls in its first chunk.
    *store.stall_at.lock().unwrap() = Some(1024);
    f.plan_stream(&extents(&store, &chunks[0]), |_| true);
    let (id, bytes) = &chunks[0][20];
    let got = get_within(&f, *id).expect("a demand read runs beside the stream");
    assert_eq!(&got.unwrap(), bytes);
    store.release_all();
    for (id, bytes) in &chunks[0] {
        assert_eq!(&f.get(id, Priority::Demand).unwrap(), bytes);
    }
    // The demand request took chunk 20 and its queued neighbour.
    let ranges = store.ranges.lock().unwrap().clone();
    assert!(
        ranges.contains(&ByteRange::new(20 * 10_240, 2 * 10_240)),
        "{ranges:?}"
    );
}
