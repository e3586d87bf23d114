//! File-map prefetch: the rest of a file after a miss inside it, the
//! metadata at mount, and the counters of what was fetched ahead.

use super::*;
use smr_format::FileMap;
use std::time::Instant;

/// Files at chunks 5..=12 and 20..=29, metadata from chunk 40.
fn map() -> FileMap {
    FileMap::from_byte_ranges(
        &ChunkGrid::fixed(SIZE, CS).expect("grid"),
        40 * CS,
        [
            5 * CS + 100..12 * CS + 5,
            20 * CS..30 * CS - 1,
            14 * CS..14 * CS + 9,
        ],
    )
    .expect("map")
}

/// Stored chunks among `range`, counting a repeated id once.
fn stored(fx: &Fixture, range: std::ops::Range<u64>) -> u64 {
    let ids: std::collections::HashSet<_> = range
        .filter_map(|c| fx.img.recipe.entry(c).map(|e| e.id))
        .collect();
    ids.len() as u64
}

/// End of the neighbours queued after a miss at `index`: as many chunks
/// as hold `NEIGHBOUR_BYTES` stored, at most 64, before the metadata.
fn neighbours_end(fx: &Fixture, index: u64) -> u64 {
    let (mut end, mut bytes) = (index + 1, 0u64);
    while end < 40 && bytes < crate::lazy::prefetch::NEIGHBOUR_BYTES && end - index <= 64 {
        bytes += fx
            .img
            .recipe
            .entry(end)
            .map_or(0, |e| u64::from(e.stored_len));
        end += 1;
    }
    end
}

/// Waits until `n` chunks were prefetched (panics after 20 s).
fn wait_prefetched(lazy: &LazyImage, n: u64) -> LazyStats {
    let t = Instant::now();
    loop {
        let s = lazy.stats();
        if s.chunks_prefetched >= n {
            // Let a wrong extra prefetch show up.
            std::thread::sleep(Duration::from_millis(50));
            return lazy.stats();
        }
        assert!(t.elapsed() < Duration::from_secs(20), "{s:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_miss_inside_a_file_prefetches_the_rest_of_the_file() {
    let fx = fixture_with_map(Duration::from_millis(2), Some(map()));
    let lazy = fx.lazy(32 << 20, 1 << 30);
    let got = fx.read(&lazy, 6 * CS + 10, 100).expect("read");
    assert_eq!(
        got,
        fx.plain[(6 * CS + 10) as usize..(6 * CS + 110) as usize]
    );
    // The rest of the file (to chunk 12) or the neighbours, if further.
    let ahead = stored(&fx, 7..neighbours_end(&fx, 6).max(13));
    let s = wait_prefetched(&lazy, ahead);
    assert_eq!(s.chunks_prefetched, ahead, "{s:?}");
    // Only the miss and what was queued after it reached the store.
    assert_eq!(fx.store.total(), 1 + ahead);
    assert!(s.prefetched_unread_bytes > 0);
    // Reading the rest of the file needs the store no more (the first
    // reads of chunks fetched ahead move the window further on).
    let rest = fx.read(&lazy, 7 * CS, 6 * CS).expect("read");
    assert!(rest == fx.plain[(7 * CS) as usize..(13 * CS) as usize]);
    std::thread::sleep(Duration::from_millis(300));
    let s = lazy.stats();
    assert!(s.chunks_prefetched >= ahead, "{s:?}");
    assert_eq!(fx.store.max_per_chunk(), 1, "a chunk fetched twice");
    assert_eq!(fx.store.total(), 1 + s.chunks_prefetched, "{s:?}");
}

/// Waits until chunk `c` was read from the store (panics after 20 s).
fn wait_fetched(fx: &Fixture, c: u64) {
    let id = fx.img.recipe.entry(c).expect("a stored chunk").id;
    let t = Instant::now();
    while fx.store.gets(&id) == 0 {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "chunk {c} never fetched"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn reading_an_elf_header_prefetches_its_writable_segment() {
    let grid = ChunkGrid::fixed(SIZE, CS).expect("grid");
    // A shared object filling chunks 10..48, its writable segment at file
    // offset 34 chunks + 100 (image chunk 44), a second one claimed past
    // the file's end (in chunk 48, moved back to end there: chunks 46..48,
    // of which 47 is zeros).
    let head = crate::elf::test_header(
        3,
        &[
            (1, 5, 0, CS),
            (1, 6, 34 * CS + 100, 200),
            (1, 6, 38 * CS + 10, 100),
        ],
    );
    let mut plain = plain_image();
    plain[(10 * CS) as usize..][..head.len()].copy_from_slice(&head);
    let map =
        FileMap::from_byte_ranges(&grid, 48 * CS, std::iter::once(10 * CS..48 * CS)).expect("map");
    let fx = fixture_of(
        plain.clone(),
        Duration::ZERO,
        Some(map.clone()),
        grid.clone(),
    );
    let lazy = fx.lazy(32 << 20, 1 << 30);
    let got = fx.read(&lazy, 10 * CS, 64).expect("read");
    assert_eq!(got, plain[(10 * CS) as usize..(10 * CS + 64) as usize]);
    // Beyond the file window (1 MiB: to chunk 27) and the neighbours.
    assert!(neighbours_end(&fx, 10) < 44);
    for c in [44, 46] {
        wait_fetched(&fx, c);
    }
    let between = fx.img.recipe.entry(45).expect("stored").id;
    assert_eq!(fx.store.gets(&between), 0, "only the segments");
    let tail = fx.read(&lazy, 44 * CS, 4 * CS).expect("read");
    assert!(tail == plain[(44 * CS) as usize..(48 * CS) as usize]);
    assert_eq!(fx.store.max_per_chunk(), 1, "a chunk fetched twice");

    // With file prefetch off, the header brings nothing.
    let fx = fixture_of(plain, Duration::ZERO, Some(map), grid);
    let lazy = fx.lazy(32 << 20, 1 << 30);
    lazy.set_file_prefetch(false);
    fx.read(&lazy, 10 * CS, 64).expect("read");
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(fx.store.total(), 1);
}

#[test]
fn a_miss_outside_files_prefetches_its_neighbours_and_metadata_nothing() {
    let fx = fixture_with_map(Duration::ZERO, Some(map()));
    let lazy = fx.lazy(32 << 20, 1 << 30);
    // Chunk 14 holds a small file: its neighbours.
    fx.read(&lazy, 14 * CS, 9).expect("read");
    let near = stored(&fx, 15..neighbours_end(&fx, 14));
    assert!(near >= 3, "{near}");
    let s = wait_prefetched(&lazy, near);
    assert_eq!(s.chunks_prefetched, near, "{s:?}");
    // Misses in the metadata region queue nothing after them.
    fx.read(&lazy, 45 * CS, 9).expect("read");
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(lazy.stats().chunks_prefetched, near);
    assert_eq!(fx.store.total(), near + 2);
}

/// Stored bytes of chunks `range`.
fn stored_bytes(fx: &Fixture, range: std::ops::Range<u64>) -> u64 {
    range
        .filter_map(|c| fx.img.recipe.entry(c))
        .map(|e| u64::from(e.stored_len))
        .sum()
}

/// [`map`] with groups of a directory's files: `groups` (chunk ranges).
fn map_with_groups(groups: &[std::ops::Range<u64>]) -> FileMap {
    let m = map();
    let files = m
        .files
        .iter()
        .map(|r| r.start * CS..(r.start + r.count) * CS - 1);
    let groups = groups.iter().map(|g| g.start * CS..g.end * CS - 1);
    FileMap::with_groups(
        &ChunkGrid::fixed(SIZE, CS).expect("grid"),
        40 * CS,
        files,
        groups,
    )
    .expect("map")
}

#[test]
fn a_miss_in_a_small_group_prefetches_the_group_and_not_in_a_large_one() {
    let small = 31..38;
    let fx = fixture_with_map(
        Duration::ZERO,
        Some(map_with_groups(std::slice::from_ref(&small))),
    );
    assert!(stored_bytes(&fx, small.clone()) <= crate::lazy::prefetch::GROUP_PREFETCH_BYTES);
    let lazy = fx.lazy(32 << 20, 1 << 30);
    let at_most = |lazy: &LazyImage, bytes: u64| {
        lazy.inner
            .prefetch
            .group_bytes
            .store(bytes, std::sync::atomic::Ordering::Relaxed)
    };
    fx.read(&lazy, 33 * CS, 9).expect("read");
    // The group, before and after the miss, and the neighbours after it.
    let want = stored(&fx, 31..33) + stored(&fx, 34..neighbours_end(&fx, 33).max(38));
    let s = wait_prefetched(&lazy, want);
    assert_eq!(s.chunks_prefetched, want, "{s:?}");
    assert_eq!(fx.store.total(), 1 + want);
    // Reading the group needs the store no more.
    let all = fx.read(&lazy, 31 * CS, 7 * CS).expect("read");
    assert!(all == fx.plain[(31 * CS) as usize..(38 * CS) as usize]);
    assert_eq!(fx.store.max_per_chunk(), 1, "a chunk fetched twice");

    // A group larger than the budget (made smaller than this image):
    // only the neighbours.
    let large = 1..40;
    let fx = fixture_with_map(
        Duration::ZERO,
        Some(map_with_groups(std::slice::from_ref(&large))),
    );
    let lazy = fx.lazy(32 << 20, 1 << 30);
    let budget = stored_bytes(&fx, large) - 1;
    assert!(budget > stored_bytes(&fx, 15..neighbours_end(&fx, 14)));
    at_most(&lazy, budget);
    fx.read(&lazy, 14 * CS, 9).expect("read");
    let near = stored(&fx, 15..neighbours_end(&fx, 14));
    let s = wait_prefetched(&lazy, near);
    assert_eq!(s.chunks_prefetched, near, "{s:?}");
}

#[test]
fn metadata_is_prefetched_at_mount_and_counted_until_read() {
    let fx = fixture_with_map(Duration::ZERO, Some(map()));
    let lazy = fx.lazy(32 << 20, 1 << 30);
    lazy.prefetch_metadata();
    // The header (65 blocks of 4 KiB: chunks 0..=4) and chunks 40..=48.
    let want = stored(&fx, 0..5) + stored(&fx, 40..49);
    let s = wait_prefetched(&lazy, want);
    assert_eq!(s.chunks_prefetched, want);
    assert_eq!(fx.store.total(), want);
    let bytes: u64 = (0..5)
        .chain(40..49)
        .filter_map(|c| fx.img.recipe.entry(c))
        .map(|e| u64::from(e.stored_len))
        .sum();
    assert!(s.prefetched_unread_bytes <= bytes && s.prefetched_unread_bytes > 0);
    assert_eq!(s.bytes_prefetched, s.prefetched_unread_bytes);
    let tail = fx.read(&lazy, 40 * CS, SIZE - 40 * CS).expect("read");
    assert!(tail == fx.plain[(40 * CS) as usize..]);
    assert_eq!(fx.store.total(), want, "read from what was prefetched");
}

#[test]
fn without_a_file_map_or_with_file_prefetch_off_only_the_miss_is_fetched() {
    for with_map in [false, true] {
        let fx = fixture_with_map(Duration::ZERO, with_map.then(map));
        let lazy = fx.lazy(32 << 20, 1 << 30);
        lazy.set_file_prefetch(false);
        lazy.prefetch_metadata();
        if with_map {
            wait_prefetched(&lazy, 1);
        }
        let before = fx.store.total();
        fx.read(&lazy, 21 * CS, 10).expect("read");
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(fx.store.total(), before + 1);
        if !with_map {
            assert_eq!(lazy.stats().chunks_prefetched, 0);
        }
    }
}

#[test]
fn a_bad_chunk_in_a_prefetched_file_fails_only_its_reads() {
    let fx = fixture_with_map(Duration::ZERO, Some(map()));
    // Chunk 23's stored bytes flipped in the store.
    let bad = fx.img.recipe.entry(23).expect("stored").id;
    let path = fx.store.inner.chunk_path(&bad);
    let mut bytes = fs::read(&path).expect("read chunk");
    bytes[7] ^= 1;
    fs::write(&path, bytes).expect("write chunk");
    let lazy = fx.lazy(32 << 20, 1 << 30);
    fx.read(&lazy, 20 * CS, 10).expect("read");
    let s = wait_prefetched(&lazy, stored(&fx, 21..30) - 1);
    assert_eq!(s.prefetch_failed, 1, "{s:?}");
    let err = fx.read(&lazy, 23 * CS, 10).unwrap_err();
    assert!(err.to_string().contains(&bad.to_string()), "{err}");
    let ok = fx.read(&lazy, 24 * CS, 2 * CS).expect("read");
    assert!(ok == fx.plain[(24 * CS) as usize..(26 * CS) as usize]);
}

#[test]
fn dropping_the_image_stops_its_prefetch() {
    // Everything is "metadata": more chunks queued than workers.
    let all =
        FileMap::from_byte_ranges(&ChunkGrid::fixed(SIZE, CS).expect("grid"), 0, []).expect("map");
    let fx = fixture_with_map(Duration::from_millis(30), Some(all));
    // Batches of a few chunks, so that some are still queued at the drop.
    let opts = crate::fetch::FetchOptions {
        max_request: 2 * CS,
        ..Default::default()
    };
    let cache = Cache::open(CacheConfig::new(&fx.cache_dir)).expect("cache");
    let fetcher = crate::fetch::Fetcher::new(fx.store.clone(), opts);
    let lazy = LazyImage::with_fetcher(fx.img.clone(), fetcher, cache).expect("lazy image");
    lazy.prefetch_metadata();
    std::thread::sleep(Duration::from_millis(40));
    drop(lazy);
    std::thread::sleep(Duration::from_millis(200));
    let after = fx.store.total();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(fx.store.total(), after, "prefetch went on after the drop");
    assert!(after < stored(&fx, 0..49), "{after}");
}

/// The fixture's chunks in one object, `pack`, in image order (as a
/// registry artifact keeps them in packs); records each request's range.
struct Packed {
    extents: HashMap<ChunkId, smr_store::Extent>,
    data: Vec<u8>,
    requests: Mutex<Vec<smr_store::ByteRange>>,
}

impl Packed {
    fn of(fx: &Fixture) -> Arc<Self> {
        let (mut extents, mut data) = (HashMap::new(), Vec::new());
        for e in &fx.img.recipe.chunks {
            if extents.contains_key(&e.id) {
                continue;
            }
            let bytes = fs::read(fx.store.inner.chunk_path(&e.id)).expect("chunk");
            let range = smr_store::ByteRange::new(data.len() as u64, bytes.len() as u64);
            let object = smr_store::ObjectName::new("pack");
            extents.insert(e.id, smr_store::Extent { object, range });
            data.extend_from_slice(&bytes);
        }
        Arc::new(Packed {
            extents,
            data,
            requests: Mutex::new(Vec::new()),
        })
    }
}

impl ChunkStore for Packed {
    fn describe(&self) -> String {
        "packed".into()
    }
    fn locate(&self, id: &ChunkId) -> smr_store::Result<smr_store::Extent> {
        self.extents
            .get(id)
            .cloned()
            .ok_or_else(|| smr_store::StoreError::Missing {
                what: smr_store::Target::Chunk(*id),
                store: self.describe(),
            })
    }
    fn read_ranges(
        &self,
        _object: &smr_store::ObjectName,
        ranges: &[smr_store::ByteRange],
    ) -> smr_store::Result<Vec<Vec<u8>>> {
        self.requests
            .lock()
            .expect("lock")
            .extend_from_slice(ranges);
        Ok(ranges
            .iter()
            .map(|r| {
                let end = r.end().unwrap_or(self.data.len() as u64);
                self.data[r.offset as usize..end as usize].to_vec()
            })
            .collect())
    }
    fn put(&self, _id: &ChunkId, _data: &[u8]) -> smr_store::Result<PutOutcome> {
        unreachable!("read only")
    }
    fn exists(&self, id: &ChunkId) -> smr_store::Result<bool> {
        Ok(self.extents.contains_key(id))
    }
}

#[test]
fn a_miss_brings_its_neighbours_in_its_own_request() {
    let fx = fixture_with_map(Duration::ZERO, Some(map()));
    let store = Packed::of(&fx);
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = Cache::open(CacheConfig::new(dir.path())).expect("cache");
    let lazy = LazyImage::new(fx.img.clone(), store.clone(), cache).expect("lazy image");
    // Chunk 14 holds a small file: the miss and its neighbours, one read.
    fx.read(&lazy, 14 * CS, 9).expect("read");
    let end = neighbours_end(&fx, 14);
    let near = stored(&fx, 15..end);
    assert!(near >= 3, "{near}");
    wait_prefetched(&lazy, near);
    let extent = |c: u64| store.extents[&fx.img.recipe.entry(c).expect("stored").id].range;
    let last = (15..end)
        .rev()
        .find(|&c| fx.img.recipe.entry(c).is_some())
        .expect("a neighbour");
    let requests = store.requests.lock().expect("lock").clone();
    assert_eq!(requests.len(), 1, "{requests:?}");
    assert_eq!(requests[0].offset, extent(14).offset, "{requests:?}");
    assert_eq!(requests[0].end(), extent(last).end(), "{requests:?}");
    // The next small file's read needs no request.
    fx.read(&lazy, 15 * CS, 9).expect("read");
    assert_eq!(store.requests.lock().expect("lock").len(), 1);
}

/// The metadata of [`map`] (chunks 40 to 48, two of them zero chunks
/// whose neighbours are next to each other in the pack) fits one request
/// of `max_request` bytes as stored, although that is fewer bytes than
/// its chunks' nominal size: it is fetched in one request, and so is the
/// header.
#[test]
fn metadata_goes_in_requests_as_large_as_the_fetcher_allows_as_stored() {
    let fx = fixture_with_map(Duration::ZERO, Some(map()));
    let store = Packed::of(&fx);
    let meta = stored_bytes(&fx, 40..49);
    assert!(meta < 9 * CS, "{meta}: compressed and zero chunks");
    let opts = crate::fetch::FetchOptions {
        max_request: meta,
        ..Default::default()
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = Cache::open(CacheConfig::new(dir.path())).expect("cache");
    let fetcher = crate::fetch::Fetcher::new(store.clone(), opts);
    let lazy = LazyImage::with_fetcher(fx.img.clone(), fetcher, cache).expect("lazy image");
    lazy.prefetch_metadata();
    let header = smr_format::filemap::HEADER_BYTES.div_ceil(CS);
    wait_prefetched(&lazy, stored(&fx, 0..header) + stored(&fx, 40..49));
    let extent = |c: u64| store.extents[&fx.img.recipe.entry(c).expect("stored").id].range;
    let requests = store.requests.lock().expect("lock").clone();
    assert_eq!(requests.len(), 2, "{requests:?}");
    assert!(
        requests
            .iter()
            .any(|r| r.offset == extent(40).offset && r.end() == extent(48).end()),
        "{requests:?}"
    );
}

#[test]
fn chunks_stored_ahead_of_a_reader_count_as_read_for_the_prefetcher() {
    let fx = fixture_with_map(Duration::from_millis(2), Some(map()));
    let lazy = fx.lazy(32 << 20, 1 << 30);
    let pages = Arc::new(super::startup::Pages::default());
    lazy.seed_pages(pages.clone());
    // A miss inside the file at chunks 5..=12 fetches the rest of it.
    super::ahead::cached_read(&lazy, 6 * CS, 4096);
    wait_prefetched(&lazy, stored(&fx, 7..neighbours_end(&fx, 6).max(13)));
    let read = |c: u64| lazy.inner.prefetch.read.get(c);
    assert!(!(8..=11).any(read), "not read yet");
    // The reader goes on in order: the chunks after it are stored in the
    // page cache, and the kernel never asks for them. Their first
    // delivery is what moves the prefetch window on (chunks 7 and 12 are
    // zeros, never stored).
    super::ahead::cached_read(&lazy, 6 * CS + 4096, 4096);
    let t = Instant::now();
    while !(8..=11).all(read) {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "stored chunks not counted as read"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(lazy.stats().bytes_stored_ahead >= 4 * CS);
}
