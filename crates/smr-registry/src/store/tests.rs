use super::*;
use crate::artifact::digest_of;
use crate::pack::{IndexedChunk, IndexedPack, PackParams};
use crate::testing::DirBlobs;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{mpsc, Barrier};
use std::thread;

struct Fixture {
    _dir: tempfile::TempDir,
    blobs: Arc<DirBlobs>,
    index: Arc<PackIndex>,
    /// `chunks[pack][i] = (id, bytes)`.
    chunks: Vec<Vec<(ChunkId, Vec<u8>)>>,
}

/// Packs of `sizes[p]` chunks of about 10 KiB each, pushed to a directory.
fn fixture(sizes: &[usize]) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let blobs = Arc::new(DirBlobs::new(dir.path(), false));
    let mut packs = Vec::new();
    let mut chunks = Vec::new();
    for (p, &n) in sizes.iter().enumerate() {
        let mut data = Vec::new();
        let mut list = Vec::new();
        for i in 0..n {
            let bytes: Vec<u8> = (0..10_000 + i * 100)
                .map(|b| (b * 31 + p * 7 + i) as u8)
                .collect();
            data.extend_from_slice(&bytes);
            list.push((ChunkId::of(&bytes), bytes));
        }
        let digest = digest_of(&data);
        blobs.push_blob(&digest, &data).unwrap();
        packs.push(IndexedPack {
            digest,
            chunks: list
                .iter()
                .map(|(id, b)| IndexedChunk {
                    id: *id,
                    len: b.len() as u32,
                })
                .collect(),
        });
        chunks.push(list);
    }
    let index = Arc::new(PackIndex::new(PackParams::with_target(4), packs).unwrap());
    Fixture {
        _dir: dir,
        blobs,
        index,
        chunks,
    }
}

impl Fixture {
    fn store(&self, opts: StoreOptions) -> Arc<RegistryStore> {
        Arc::new(RegistryStore::new(
            self.blobs.clone(),
            self.index.clone(),
            opts,
        ))
    }

    fn pack(&self, p: usize) -> String {
        self.index.packs()[p].digest.clone()
    }
}

fn lingering(ms: u64) -> StoreOptions {
    StoreOptions {
        linger: Duration::from_millis(ms),
        readahead: 0,
        ..StoreOptions::default()
    }
}

/// Gets `ids` from one thread each, started together.
fn get_all(store: &Arc<RegistryStore>, ids: &[ChunkId]) -> Vec<smr_store::Result<Vec<u8>>> {
    let barrier = Arc::new(Barrier::new(ids.len()));
    let handles: Vec<_> = ids
        .iter()
        .map(|id| {
            let (store, barrier, id) = (store.clone(), barrier.clone(), *id);
            thread::spawn(move || {
                barrier.wait();
                store.get(&id)
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

#[test]
fn adjacent_gets_from_many_threads_are_coalesced() {
    let fx = fixture(&[8, 3]);
    let store = fx.store(lingering(50));
    let ids: Vec<ChunkId> = fx.chunks[0].iter().map(|c| c.0).collect();
    let got = get_all(&store, &ids);
    for (r, (_, want)) in got.into_iter().zip(&fx.chunks[0]) {
        assert_eq!(&r.unwrap(), want);
    }
    let requests = fx.blobs.range_requests.load(Relaxed);
    assert!(requests < 8, "{requests} requests for 8 adjacent chunks");
    let s = store.stats();
    assert_eq!(s.requests, requests);
    assert_eq!(s.chunks_served, 8);
    assert_eq!(s.bytes_transferred, fx.index.packs()[0].size());
    assert_eq!((s.bytes_discarded, s.failed_requests), (0, 0));
}

/// Lingering 50 ms, giving up on transient failures after `deadline_ms`.
fn with_deadline(deadline_ms: u64) -> StoreOptions {
    StoreOptions {
        deadline: Duration::from_millis(deadline_ms),
        ..lingering(50)
    }
}

#[test]
fn a_failed_read_reaches_every_waiter_of_its_batch() {
    let fx = fixture(&[8]);
    fx.blobs.fail_ranges(&fx.pack(0));
    // A deadline shorter than the first back-off: one try each.
    let store = fx.store(with_deadline(10));
    let ids: Vec<ChunkId> = fx.chunks[0].iter().map(|c| c.0).collect();
    let got = get_all(&store, &ids);
    for (r, id) in got.into_iter().zip(&ids) {
        let err = r.unwrap_err();
        assert!(matches!(err, StoreError::GaveUp { .. }), "{err}");
        let err = err.to_string();
        assert!(err.contains(&id.to_hex()), "{err}");
        assert!(
            err.contains(&fx.pack(0)) && err.contains("injected failure"),
            "{err}"
        );
    }
    let s = store.stats();
    assert_eq!(s.failed_requests, s.requests);
    assert_eq!(s.chunks_served, 0);
    // Nothing is remembered: the next get tries again.
    let fx2_ok = fx.blobs.range_requests.load(Relaxed);
    assert!(store.get(&ids[0]).is_err());
    assert_eq!(fx.blobs.range_requests.load(Relaxed), fx2_ok + 1);
}

#[test]
fn transient_failures_are_retried_until_the_store_comes_back() {
    let fx = fixture(&[4]);
    fx.blobs.fail_ranges(&fx.pack(0));
    let store = fx.store(with_deadline(20_000));
    let id = fx.chunks[0][1].0;
    let reader = {
        let store = store.clone();
        thread::spawn(move || store.get(&id))
    };
    // The reader blocks, retrying, while the "registry" is down.
    thread::sleep(Duration::from_millis(400));
    assert!(!reader.is_finished());
    let tries = fx.blobs.range_requests.load(Relaxed);
    assert!(tries >= 2, "{tries} tries in 400 ms");
    fx.blobs.heal_ranges(&fx.pack(0));
    assert_eq!(reader.join().unwrap().unwrap(), fx.chunks[0][1].1);
}

#[test]
fn missing_chunks_are_not_retried() {
    let fx = fixture(&[2]);
    let store = fx.store(with_deadline(20_000));
    std::fs::remove_dir_all(fx._dir.path().join("blobs")).ok();
    let err = store.get(&fx.chunks[0][0].0).unwrap_err();
    assert!(!matches!(err, StoreError::GaveUp { .. }), "{err}");
    assert_eq!(fx.blobs.range_requests.load(Relaxed), 1);
}

#[test]
fn a_slow_read_does_not_block_unrelated_ones() {
    let fx = fixture(&[4, 4]);
    let gate = fx.blobs.gate_ranges(&fx.pack(0));
    let store = fx.store(lingering(0));
    let slow = {
        let (store, id) = (store.clone(), fx.chunks[0][0].0);
        thread::spawn(move || store.get(&id))
    };
    while fx.blobs.range_requests.load(Relaxed) == 0 {
        thread::sleep(Duration::from_millis(1));
    }
    // A chunk of another pack is served while the first read hangs.
    let (tx, rx) = mpsc::channel();
    let (store2, id) = (store.clone(), fx.chunks[1][2].0);
    thread::spawn(move || tx.send(store2.get(&id)).unwrap());
    let got = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("blocked behind a slow read");
    assert_eq!(got.unwrap(), fx.chunks[1][2].1);
    gate.open();
    assert_eq!(slow.join().unwrap().unwrap(), fx.chunks[0][0].1);
    assert_eq!(store.stats().max_in_flight, 2);
}

#[test]
fn requests_in_flight_are_capped() {
    let fx = fixture(&[6]);
    let gate = fx.blobs.gate_ranges(&fx.pack(0));
    let store = fx.store(StoreOptions {
        max_in_flight: 2,
        max_gap: 0,
        max_request: 1,
        linger: Duration::ZERO,
        readahead: 0,
        ..StoreOptions::default()
    });
    let handles: Vec<_> = fx.chunks[0]
        .iter()
        .map(|(id, _)| {
            let (store, id) = (store.clone(), *id);
            thread::spawn(move || store.get(&id))
        })
        .collect();
    thread::sleep(Duration::from_millis(200));
    assert_eq!(fx.blobs.range_requests.load(Relaxed), 2);
    gate.open();
    for (h, (_, want)) in handles.into_iter().zip(&fx.chunks[0]) {
        assert_eq!(&h.join().unwrap().unwrap(), want);
    }
    let s = store.stats();
    assert_eq!((s.requests, s.max_in_flight), (6, 2));
}

#[test]
fn small_gaps_are_read_and_discarded_large_ones_split() {
    let fx = fixture(&[3]);
    let ids = [fx.chunks[0][0].0, fx.chunks[0][2].0];
    let gap = fx.chunks[0][1].1.len() as u64;

    let store = fx.store(lingering(50));
    let got = get_all(&store, &ids);
    assert_eq!(got[0].as_ref().unwrap(), &fx.chunks[0][0].1);
    assert_eq!(got[1].as_ref().unwrap(), &fx.chunks[0][2].1);
    let s = store.stats();
    assert_eq!((s.requests, s.bytes_discarded), (1, gap));

    let store = fx.store(StoreOptions {
        max_gap: gap - 1,
        ..lingering(50)
    });
    for r in get_all(&store, &ids) {
        r.unwrap();
    }
    assert_eq!(store.stats().requests, 2);
}

#[test]
fn requests_respect_the_size_cap() {
    let fx = fixture(&[8]);
    let store = fx.store(StoreOptions {
        max_request: 25_000,
        ..lingering(50)
    });
    let ids: Vec<ChunkId> = fx.chunks[0].iter().map(|c| c.0).collect();
    for (r, (_, want)) in get_all(&store, &ids).into_iter().zip(&fx.chunks[0]) {
        assert_eq!(&r.unwrap(), want);
    }
    // Chunks are 10-11 KB: at most two per 25 KB request.
    assert!(store.stats().requests >= 4);
}

#[test]
fn unknown_chunks_are_missing_and_puts_are_refused() {
    let fx = fixture(&[2]);
    let store = fx.store(StoreOptions::default());
    let unknown = ChunkId([3; 32]);
    assert!(matches!(
        store.get(&unknown),
        Err(StoreError::Missing { id, .. }) if id == unknown
    ));
    assert!(!store.exists(&unknown).unwrap());
    let (id, bytes) = &fx.chunks[0][1];
    assert!(store.exists(id).unwrap());
    let err = store.put(id, bytes).unwrap_err().to_string();
    assert!(
        err.contains("read-only") && err.contains(&id.to_hex()),
        "{err}"
    );
    assert_eq!(&store.get(id).unwrap(), bytes);
    assert_eq!(fx.blobs.range_requests.load(Relaxed), 1);
}

#[test]
fn after_giving_up_reads_fail_at_once_until_the_registry_answers() {
    let fx = fixture(&[4]);
    fx.blobs.fail_ranges(&fx.pack(0));
    let store = fx.store(with_deadline(300));
    let (a, b) = (fx.chunks[0][0].0, fx.chunks[0][3].0);
    let t = Instant::now();
    assert!(matches!(store.get(&a), Err(StoreError::GaveUp { .. })));
    assert!(
        t.elapsed() >= Duration::from_millis(100),
        "{:?}",
        t.elapsed()
    );
    // Marked down: one try, no waiting.
    let before = fx.blobs.range_requests.load(Relaxed);
    let t = Instant::now();
    assert!(matches!(store.get(&b), Err(StoreError::GaveUp { .. })));
    assert!(
        t.elapsed() < Duration::from_millis(200),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(fx.blobs.range_requests.load(Relaxed), before + 1);
    // Back: reads succeed, and the next outage is waited out again.
    fx.blobs.heal_ranges(&fx.pack(0));
    assert_eq!(store.get(&b).unwrap(), fx.chunks[0][3].1);
    fx.blobs.fail_ranges(&fx.pack(0));
    let t = Instant::now();
    assert!(store.get(&a).is_err());
    assert!(
        t.elapsed() >= Duration::from_millis(100),
        "{:?}",
        t.elapsed()
    );
}

#[test]
fn sequential_reads_are_read_ahead_scattered_ones_are_not() {
    let fx = fixture(&[12]);
    let store = fx.store(StoreOptions {
        linger: Duration::ZERO,
        readahead: 40_000,
        ..StoreOptions::default()
    });
    let chunks = &fx.chunks[0];
    // Scattered: no stream, nothing read ahead.
    for i in [9, 2, 6] {
        assert_eq!(store.get(&chunks[i].0).unwrap(), chunks[i].1);
    }
    let s = store.stats();
    assert_eq!((s.requests, s.readahead_bytes, s.readahead_hits), (3, 0, 0));
    // Sequential from 3: 4 starts the stream (3 ended where 4 starts), so
    // its request also reads the chunks after it, up to the window; they
    // are then served without requests.
    for (i, (id, want)) in chunks.iter().enumerate().skip(3).take(9) {
        assert_eq!(&store.get(id).unwrap(), want, "chunk {i}");
    }
    let s = store.stats();
    assert!(s.readahead_hits > 0, "{s:?}");
    assert!(s.requests < 3 + 9, "{s:?}");
    assert_eq!(s.chunks_served, 12);
    assert_eq!(s.requests + s.readahead_hits, 12, "{s:?}");
}
