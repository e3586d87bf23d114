//! Tests of the lazy image over real encrypted, compressed chunks in a real
//! [`LocalStore`], through a real cache directory. [`CountingStore`] only
//! counts (and can slow) the calls reaching the local store.

use std::collections::HashMap;
use std::fs;
use std::path::Path;
use std::sync::{Arc, Barrier, Mutex};
use std::time::Duration;

use proptest::prelude::*;

mod ahead;
mod prefetch;
mod startup;
mod startup_stream;
use smr_format::chunk::default_salt;
use smr_format::config::ImageConfig;
use smr_format::{ChunkCodec, ChunkEntry, ChunkGrid, OwnerKey, Profile, Recipe};
use smr_store::{LocalStore, PutOutcome};

use super::*;
use crate::cache::CacheConfig;

const CS: u64 = 64 << 10;
/// 49 chunks, the last one short.
const SIZE: u64 = 48 * CS + 12345;

/// A real store that counts reads per chunk.
struct CountingStore {
    inner: LocalStore,
    gets: Mutex<HashMap<ChunkId, u64>>,
    delay: Duration,
    /// A chunk whose reads wait until it is set to `None`.
    held: (Mutex<Option<ChunkId>>, std::sync::Condvar),
}

impl CountingStore {
    fn total(&self) -> u64 {
        self.gets.lock().expect("lock").values().sum()
    }

    /// Makes the reads of `id` wait (`Some`), or lets them go (`None`).
    fn hold(&self, id: Option<ChunkId>) {
        *self.held.0.lock().expect("lock") = id;
        self.held.1.notify_all();
    }

    /// Reads of chunk `id` so far.
    fn gets(&self, id: &ChunkId) -> u64 {
        self.gets
            .lock()
            .expect("lock")
            .get(id)
            .copied()
            .unwrap_or(0)
    }

    fn max_per_chunk(&self) -> u64 {
        self.gets
            .lock()
            .expect("lock")
            .values()
            .copied()
            .max()
            .unwrap_or(0)
    }
}

impl ChunkStore for CountingStore {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn read_ranges(
        &self,
        object: &smr_store::ObjectName,
        ranges: &[smr_store::ByteRange],
    ) -> smr_store::Result<Vec<Vec<u8>>> {
        let id = object.chunk().expect("a chunk's own object");
        *self.gets.lock().expect("lock").entry(id).or_default() += 1;
        let held = self.held.0.lock().expect("lock");
        drop(
            self.held
                .1
                .wait_while(held, |h| *h == Some(id))
                .expect("lock"),
        );
        std::thread::sleep(self.delay);
        self.inner.read_ranges(object, ranges)
    }
    fn put(&self, id: &ChunkId, data: &[u8]) -> smr_store::Result<PutOutcome> {
        self.inner.put(id, data)
    }
    fn exists(&self, id: &ChunkId) -> smr_store::Result<bool> {
        self.inner.exists(id)
    }
}

/// Chunk `c`'s plaintext: zeros for c % 5 == 2 (trimmed from the recipe),
/// a compressible ramp for c % 3 == 0, chunks 10 and 11 identical, random
/// bytes otherwise.
fn plain_image() -> Vec<u8> {
    let mut out = Vec::with_capacity(SIZE as usize);
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    for c in 0..SIZE.div_ceil(CS) {
        let len = CS.min(SIZE - c * CS) as usize;
        let chunk: Vec<u8> = match c {
            _ if c % 5 == 2 => vec![0; len],
            11 => out[(10 * CS) as usize..(11 * CS) as usize].to_vec(),
            _ if c % 3 == 0 => (0..len).map(|i| (i / 7 + c as usize) as u8).collect(),
            _ => (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect(),
        };
        out.extend_from_slice(&chunk);
    }
    out
}

struct Fixture {
    plain: Vec<u8>,
    img: ImageChunks,
    store: Arc<CountingStore>,
    _tmp: tempfile::TempDir,
    cache_dir: std::path::PathBuf,
}

/// Seals the image into a fresh store (encrypted and compressed, as
/// `smr convert` does) and returns it with its opened recipe.
fn fixture(delay: Duration) -> Fixture {
    fixture_with_map(delay, None)
}

/// [`fixture`] with a recipe that carries `file_map`.
fn fixture_with_map(delay: Duration, file_map: Option<smr_format::FileMap>) -> Fixture {
    let grid = ChunkGrid::fixed(SIZE, CS).expect("grid");
    fixture_with_grid(delay, file_map, grid)
}

/// The image cut by `grid` (content-defined chunking makes such grids).
fn fixture_with_grid(
    delay: Duration,
    file_map: Option<smr_format::FileMap>,
    grid: ChunkGrid,
) -> Fixture {
    fixture_of(plain_image(), delay, file_map, grid)
}

/// The image `plain` (of [`SIZE`] bytes) cut by `grid`.
fn fixture_of(
    plain: Vec<u8>,
    delay: Duration,
    file_map: Option<smr_format::FileMap>,
    grid: ChunkGrid,
) -> Fixture {
    let tmp = tempfile::tempdir().expect("tempdir");
    let local = LocalStore::open(tmp.path().join("store")).expect("store");
    let codec = ChunkCodec::new(default_salt(), true, true);
    let (mut entries, mut keys) = (Vec::new(), Vec::new());
    let pieces = (0..grid.count()).map(|c| {
        let r = grid.range(c);
        &plain[r.start as usize..r.end as usize]
    });
    for (index, data) in pieces.enumerate() {
        if data.iter().all(|b| *b == 0) {
            continue;
        }
        let s = codec.seal(data);
        local.put(&s.id, &s.stored).expect("put");
        entries.push(ChunkEntry {
            index: index as u64,
            id: s.id,
            stored_len: s.stored.len() as u32,
            compressed: s.compressed,
        });
        keys.push(s.key.expect("encrypted"));
    }
    let owner = OwnerKey([7; 32]);
    let recipe = Recipe::new(
        grid,
        "sha256:test".into(),
        ImageConfig::default(),
        entries,
        file_map,
        Some((&keys, &owner)),
    )
    .expect("recipe");
    let keys = recipe.keys(Some(&owner)).expect("keys");
    let store = Arc::new(CountingStore {
        inner: local,
        gets: Mutex::new(HashMap::new()),
        delay,
        held: (Mutex::new(None), std::sync::Condvar::new()),
    });
    let cache_dir = tmp.path().join("cache");
    Fixture {
        plain,
        img: ImageChunks::new(recipe, keys),
        store,
        _tmp: tmp,
        cache_dir,
    }
}

impl Fixture {
    fn lazy(&self, memory_bytes: u64, budget_bytes: u64) -> LazyImage {
        let cfg = CacheConfig {
            memory_bytes,
            budget_bytes,
            ..CacheConfig::new(&self.cache_dir)
        };
        let cache = Cache::open(cfg).expect("cache");
        LazyImage::new(self.img.clone(), self.store.clone(), cache).expect("lazy image")
    }

    fn stored_chunks(&self) -> u64 {
        self.img.recipe.chunks.len() as u64
    }

    fn read(&self, lazy: &LazyImage, off: u64, len: u64) -> io::Result<Vec<u8>> {
        let mut buf = vec![0xa5; len as usize];
        lazy.read_at(off, &mut buf)?;
        Ok(buf)
    }
}

#[test]
fn random_reads_equal_the_image_with_and_without_memory_and_eviction() {
    let fx = fixture(Duration::ZERO);
    // Default tiers; then no memory tier and a disk budget of 8 chunks, so
    // chunks are evicted and refetched all along.
    // (Fewer reads there: every read then decrypts, slow in debug builds.)
    for (memory, budget, reads) in [(32 << 20, 1 << 30, 400), (0, 8 * CS, 100)] {
        let lazy = fx.lazy(memory, budget);
        let mut x: u64 = 42;
        for _ in 0..reads {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let off = (x >> 11) % SIZE;
            let len = ((x >> 40) % (300 << 10)).min(SIZE - off);
            let got = fx.read(&lazy, off, len).expect("read");
            assert!(
                got == fx.plain[off as usize..(off + len) as usize],
                "read {len} at {off}"
            );
        }
        let s = lazy.stats();
        assert_eq!((s.reads, s.read_errors), (reads, 0));
        if budget < SIZE {
            let c = lazy.cache().stats().expect("stats").counters;
            assert!(c.evictions > 0 && c.total_bytes <= budget, "{c:?}");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn any_read_equals_the_image(off in 0..SIZE, len in 0..(3 * CS)) {
        static FX: std::sync::OnceLock<(Fixture, LazyImage)> = std::sync::OnceLock::new();
        let (fx, lazy) = FX.get_or_init(|| {
            let fx = fixture(Duration::ZERO);
            let lazy = fx.lazy(1 << 20, 1 << 30);
            (fx, lazy)
        });
        let len = len.min(SIZE - off);
        let got = fx.read(lazy, off, len).expect("read");
        prop_assert!(got == fx.plain[off as usize..(off + len) as usize]);
    }
}

/// A variable grid over the image: chunks of 4 KiB to 256 KiB.
fn variable_grid() -> ChunkGrid {
    let mut lens = Vec::new();
    let mut at = 0;
    for len in [16u64, 200, 4, 64, 132, 36, 256]
        .iter()
        .cycle()
        .map(|k| k << 10)
    {
        if at + len >= SIZE {
            lens.push(SIZE - at);
            break;
        }
        lens.push(len);
        at += len;
    }
    ChunkGrid::variable(CS, smr_format::CdcSizes::default(), lens).expect("grid")
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    /// Reads of an image cut into chunks of varying sizes: the bytes of
    /// the image, whichever chunks they span; zero chunks are holes.
    #[test]
    fn any_read_of_a_variable_grid_equals_the_image(off in 0..SIZE, len in 0..(3 * CS)) {
        static FX: std::sync::OnceLock<(Fixture, LazyImage)> = std::sync::OnceLock::new();
        let (fx, lazy) = FX.get_or_init(|| {
            let fx = fixture_with_grid(Duration::ZERO, None, variable_grid());
            let lazy = fx.lazy(1 << 20, 1 << 30);
            (fx, lazy)
        });
        let len = len.min(SIZE - off);
        let got = fx.read(lazy, off, len).expect("read");
        prop_assert!(got == fx.plain[off as usize..(off + len) as usize]);
        let parts = lazy.read_parts(off, len as usize).expect("parts");
        prop_assert!(flatten(&parts) == fx.plain[off as usize..(off + len) as usize]);
        let mut at = off;
        for (n, hole) in lazy.block_status(off, len) {
            let bytes = &fx.plain[at as usize..(at + n) as usize];
            if hole {
                prop_assert!(bytes.iter().all(|&b| b == 0), "hole at {at} holds data");
            }
            at += n;
        }
        prop_assert_eq!(at, off + len);
    }
}

/// `read_parts` gives the same bytes as `read_at`, zero chunks as zero
/// parts (never data), whole-chunk pieces as shared cached chunks, and
/// small pieces copied (so a small read never pins a whole chunk).
#[test]
fn read_parts_share_cached_chunks_and_report_zero_chunks() {
    let fx = fixture(Duration::ZERO);
    let lazy = fx.lazy(32 << 20, 1 << 30);
    for (off, len) in [
        (0, SIZE),
        (CS + 100, 3 * CS),
        (2 * CS, CS),
        (7 * CS, 5 * CS),
        (SIZE - 10, 10),
        (5, 4096),
    ] {
        let parts = lazy.read_parts(off, len as usize).expect("parts");
        assert!(
            flatten(&parts) == fx.plain[off as usize..(off + len) as usize],
            "{len} at {off}"
        );
    }
    // Chunks 1..=3: 1 whole (shared), 2 a zero chunk, 3 whole (shared).
    let parts = lazy.read_parts(CS, (3 * CS) as usize).expect("parts");
    assert!(
        matches!(
            parts.as_slice(),
            [ReadPart::Shared(..), ReadPart::Zero(z), ReadPart::Shared(..)] if *z == CS as usize
        ),
        "{parts:?}"
    );
    // A small piece is copied.
    let parts = lazy.read_parts(CS + 10, 4096).expect("parts");
    assert!(
        matches!(parts.as_slice(), [ReadPart::Owned(v)] if v.len() == 4096),
        "{parts:?}"
    );
    let err = lazy.read_parts(SIZE - 10, 11).expect_err("past the end");
    assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
}

/// The bytes of a read's parts, zero parts as zeros.
fn flatten(parts: &[ReadPart]) -> Vec<u8> {
    let mut v = Vec::new();
    for p in parts {
        match p.data() {
            Some(d) => v.extend_from_slice(d),
            None => v.resize(v.len() + p.len(), 0),
        }
    }
    v
}

#[test]
fn read_parts_now_answers_only_what_is_at_hand() {
    let fx = fixture(Duration::ZERO);
    // No memory tier: "at hand" is the disk tier in the page cache.
    let lazy = fx.lazy(0, 1 << 30);
    let (off, len) = (CS + 100, 5 * CS);
    assert!(
        lazy.read_parts_now(off, len as usize).is_none(),
        "cold chunks must be fetched: not at hand"
    );
    assert_eq!(fx.store.total(), 0, "and nothing was fetched for it");
    // Zero chunks are always at hand (chunk 2 is one).
    let zero = lazy
        .read_parts_now(2 * CS + 5, 100)
        .expect("at hand")
        .expect("read");
    assert!(matches!(zero.as_slice(), [ReadPart::Zero(100)]), "{zero:?}");
    lazy.read_parts(off, len as usize).expect("fetched");
    let fetched = fx.store.total();
    let now = lazy
        .read_parts_now(off, len as usize)
        .expect("warm chunks are at hand")
        .expect("read");
    assert!(flatten(&now) == fx.plain[off as usize..(off + len) as usize]);
    assert_eq!(fx.store.total(), fetched, "served without a fetch");
    let s = lazy.stats();
    assert_eq!(
        (s.reads, s.bytes_read),
        (3, 2 * len + 100),
        "the cold attempt is not counted"
    );
    let err = lazy
        .read_parts_now(SIZE - 10, 11)
        .expect("an error is an answer")
        .expect_err("past the end");
    assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    assert_eq!(lazy.stats().read_errors, 1);
}

#[test]
fn whole_chunks_read_pass_by_the_memory_tier_and_pieces_stay() {
    let fx = fixture(Duration::ZERO);
    let lazy = fx.lazy(32 << 20, 1 << 30);
    let mem = |lazy: &LazyImage| lazy.cache().stats().expect("stats").memory_entries;
    // Chunks 0 and 1 in the disk tier (a cold read would keep what the
    // fetch pool fetched for the reader), then read whole by each path.
    lazy.prefetch(0, 2 * CS).expect("prefetch");
    lazy.read_parts(0, (2 * CS) as usize).expect("read_parts");
    lazy.read_parts_now(0, (2 * CS) as usize)
        .expect("at hand")
        .expect("warm");
    fx.read(&lazy, 0, 2 * CS).expect("read_at");
    assert_eq!(mem(&lazy), 0, "whole chunks are not kept");
    // A piece of chunk 3, then of chunk 4 at hand: both kept.
    lazy.read_parts(3 * CS + 10, 100).expect("piece");
    fx.read(&lazy, 4 * CS, 10).expect("piece");
    lazy.read_parts_now(4 * CS + 20, 10)
        .expect("at hand")
        .expect("piece");
    assert_eq!(mem(&lazy), 2);
    // The image's short last chunk, read to its end, counts as whole.
    let last = (SIZE - 1) / CS;
    lazy.read_parts(last * CS, (SIZE - last * CS) as usize)
        .expect("last");
    assert_eq!(mem(&lazy), 2);
}

#[test]
fn chunks_read_before_one_not_at_hand_are_kept_for_the_slow_path() {
    let fx = fixture(Duration::ZERO);
    let lazy = fx.lazy(32 << 20, 1 << 30);
    // Chunk 0 on disk, chunk 1 not cached at all.
    lazy.prefetch(0, CS).expect("prefetch");
    assert!(lazy.read_parts_now(0, (2 * CS) as usize).is_none());
    let s = lazy.cache().stats().expect("stats");
    assert_eq!(s.memory_entries, 1, "chunk 0, decoded once, is kept");
    let parts = lazy.read_parts(0, (2 * CS) as usize).expect("slow path");
    assert!(flatten(&parts) == fx.plain[..(2 * CS) as usize]);
    let s = lazy.cache().stats().expect("stats");
    assert_eq!(
        s.counters.memory_hits, 1,
        "the slow path took chunk 0 from memory"
    );
}

#[test]
fn spanning_reads_whole_image_and_bounds() {
    let fx = fixture(Duration::from_millis(20));
    let lazy = fx.lazy(32 << 20, 1 << 30);
    // Across a data|data boundary, then data|zero|data (chunks 1, 2, 3).
    assert_eq!(
        fx.read(&lazy, CS - 10, 20).expect("read"),
        &fx.plain[(CS - 10) as usize..(CS + 10) as usize]
    );
    assert_eq!(
        fx.read(&lazy, CS + 5, 2 * CS).expect("read"),
        &fx.plain[(CS + 5) as usize..(3 * CS + 5) as usize]
    );
    let all = fx.read(&lazy, 0, SIZE).expect("whole image");
    assert!(all == fx.plain);
    assert_eq!(fx.store.max_per_chunk(), 1);
    // Chunks 10 and 11 are the same chunk: fetched once.
    assert_eq!(fx.store.total(), fx.stored_chunks() - 1);
    assert!(
        lazy.fetcher().stats().max_in_flight > 1,
        "a big read fetches in parallel"
    );
    assert!(fx.read(&lazy, SIZE - 1, 1).is_ok());
    let err = fx.read(&lazy, SIZE - 1, 2).expect_err("past the end");
    assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
}

#[test]
fn zero_chunks_cost_no_io_and_are_holes() {
    let fx = fixture(Duration::ZERO);
    let lazy = fx.lazy(32 << 20, 1 << 30);
    assert!(fx
        .read(&lazy, 2 * CS, CS)
        .expect("zero chunk")
        .iter()
        .all(|b| *b == 0));
    assert!(fx
        .read(&lazy, 7 * CS + 100, 1000)
        .expect("zero chunk")
        .iter()
        .all(|b| *b == 0));
    assert_eq!(fx.store.total(), 0, "no store I/O for zero chunks");
    assert_eq!(lazy.stats().chunks_fetched, 0);
    // Chunks 0..=4: data, data, hole, data, data.
    assert_eq!(
        lazy.block_status(100, 5 * CS - 100),
        vec![(2 * CS - 100, false), (CS, true), (2 * CS, false)]
    );
    assert_eq!(lazy.block_status(2 * CS + 1, 10), vec![(10, true)]);
    let all = lazy.block_status(0, u64::MAX);
    assert_eq!(
        all.iter().map(|r| r.0).sum::<u64>(),
        SIZE,
        "clamped to the image"
    );
    let holes: u64 = all.iter().filter(|r| r.1).map(|r| r.0).sum();
    let zero_chunks = SIZE.div_ceil(CS) - fx.stored_chunks();
    assert_eq!(holes, zero_chunks * CS);
    assert_eq!(fx.store.total(), 0);
}

#[test]
fn concurrent_cold_readers_fetch_each_chunk_once() {
    let fx = fixture(Duration::from_millis(10));
    let lazy = fx.lazy(32 << 20, 1 << 30);
    let barrier = Barrier::new(8);
    std::thread::scope(|s| {
        for t in 0..8u64 {
            let (fx, lazy, barrier) = (&fx, &lazy, &barrier);
            s.spawn(move || {
                barrier.wait();
                // Each thread walks the image from a different place, in
                // 100 KiB reads (not chunk aligned).
                let step = 100 << 10;
                let n = SIZE.div_ceil(step);
                for k in 0..n {
                    let off = ((k + t * 5) % n) * step;
                    let len = step.min(SIZE - off);
                    let got = fx.read(lazy, off, len).expect("read");
                    assert!(got == fx.plain[off as usize..(off + len) as usize]);
                }
            });
        }
    });
    assert_eq!(fx.store.max_per_chunk(), 1, "single flight");
    assert_eq!(fx.store.total(), fx.stored_chunks() - 1);
    assert_eq!(lazy.stats().chunks_fetched, fx.stored_chunks() - 1);
}

/// Collects log lines of the current thread.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl io::Write for Logs {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.0.lock().expect("lock").extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_bad_chunk_fails_exactly_the_reads_touching_it() {
    let fx = fixture(Duration::ZERO);
    let lazy = fx.lazy(32 << 20, 1 << 30);
    let bad = *fx.img.recipe.entry(4).expect("chunk 4 is stored");
    let gone = *fx.img.recipe.entry(8).expect("chunk 8 is stored");
    let bad_path = fx.store.inner.chunk_path(&bad.id);
    let mut raw = fs::read(&bad_path).expect("chunk");
    raw[17] ^= 1;
    fs::write(&bad_path, raw).expect("corrupt the store");
    fs::remove_file(fx.store.inner.chunk_path(&gone.id)).expect("lose a chunk");

    let logs = Logs::default();
    let sink = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_writer(move || sink.clone())
        .finish();
    tracing::subscriber::with_default(subscriber, || {
        for (index, id) in [(4, bad.id), (8, gone.id)] {
            let err = fx.read(&lazy, index * CS + 10, 100).expect_err("bad chunk");
            let inner = err
                .get_ref()
                .and_then(|e| e.downcast_ref::<ChunkReadError>())
                .expect("ChunkReadError");
            assert_eq!(
                (inner.index, inner.id, inner.to_errno()),
                (index, id, libc::EIO)
            );
            assert!(
                err.to_string().contains(&id.to_hex())
                    && err.to_string().contains(&fx.store.describe()),
                "{err}"
            );
        }
        assert!(
            fx.read(&lazy, 3 * CS, 2 * CS).is_err(),
            "a read spanning into the bad chunk fails"
        );
    });
    let logs = String::from_utf8(logs.0.lock().expect("lock").clone()).expect("utf8");
    for id in [bad.id, gone.id] {
        assert!(
            logs.lines().any(|l| l.contains("ERROR")
                && l.contains(&id.to_hex())
                && l.contains(&fx.store.describe())),
            "no error line naming {id} and the store in:\n{logs}"
        );
    }
    // Everything else reads fine.
    assert!(fx.read(&lazy, 0, 4 * CS).expect("before") == fx.plain[..(4 * CS) as usize]);
    assert!(
        fx.read(&lazy, 5 * CS, 3 * CS).expect("between")
            == fx.plain[(5 * CS) as usize..(8 * CS) as usize]
    );
    assert!(fx.read(&lazy, 9 * CS, SIZE - 9 * CS).expect("after") == fx.plain[(9 * CS) as usize..]);
    assert!(
        !lazy.cache().contains(&bad.id),
        "bad bytes are never cached"
    );
    assert_eq!(lazy.stats().read_errors, 3);
}

#[test]
fn prefetch_fills_the_cache_in_parallel() {
    let fx = fixture(Duration::from_millis(20));
    let lazy = fx.lazy(32 << 20, 1 << 30);
    lazy.prefetch(0, SIZE).expect("prefetch");
    let unique = fx.stored_chunks() - 1;
    assert_eq!(fx.store.total(), unique);
    let s = lazy.cache().stats().expect("stats");
    assert!(
        s.max_inflight > 4,
        "fetches overlap: max in flight {}",
        s.max_inflight
    );
    assert_eq!(
        (s.inflight, s.counters.entries, s.memory_entries),
        (0, unique, 0)
    );
    lazy.prefetch(0, SIZE).expect("again: nothing to do");
    assert!(fx.read(&lazy, 0, SIZE).expect("read") == fx.plain);
    assert_eq!(
        fx.store.total(),
        unique,
        "reads after a prefetch cost no store I/O"
    );
}

#[test]
fn images_share_the_node_cache() {
    let fx = fixture(Duration::ZERO);
    let first = fx.lazy(32 << 20, 1 << 30);
    assert!(fx.read(&first, 0, SIZE).expect("read") == fx.plain);
    let fetched = fx.store.total();
    // Another process serving the same (or an overlapping) image.
    let second = fx.lazy(32 << 20, 1 << 30);
    let dev: Arc<dyn BlockDevice> = Arc::new(second.clone());
    let mut buf = vec![0; SIZE as usize];
    dev.read_at(0, &mut buf).expect("read via BlockDevice");
    assert!(buf == fx.plain);
    assert_eq!(dev.size(), SIZE);
    assert_eq!(
        fx.store.total(),
        fetched,
        "no store I/O for chunks already on the node"
    );
    assert_eq!(second.stats().chunks_fetched, 0);
}

#[test]
fn an_encrypted_image_without_keys_is_refused() {
    let fx = fixture(Duration::ZERO);
    let no_keys = ImageChunks::new(fx.img.recipe.clone(), None);
    let cache = Cache::open(CacheConfig::new(&fx.cache_dir)).expect("cache");
    let err = LazyImage::new(no_keys, fx.store.clone(), cache).expect_err("keys required");
    assert!(
        matches!(err, ChunkError::Format(FormatError::KeyRequired)),
        "{err}"
    );
    assert!(Path::new(&fx.cache_dir).is_dir());
}

#[test]
fn recording_lists_stored_chunks_in_first_read_order() {
    let fx = fixture(Duration::ZERO);
    let lazy = fx.lazy(32 << 20, 1 << 30);
    fx.read(&lazy, 0, 10).expect("before recording");
    assert!(lazy.recorded_profile([1; 32]).is_none(), "not recording");
    let rec = lazy.record();
    for (off, len) in [
        (5 * CS + 100, 10),
        (0, 1),
        (5 * CS, CS),     // chunk 5 again
        (2 * CS, 10),     // a zero chunk: never fetched, so not listed
        (30 * CS - 1, 2), // spans 29 and 30
    ] {
        fx.read(&lazy, off, len).expect("read");
    }
    lazy.prefetch(40 * CS, CS)
        .expect("prefetches are not reads");
    assert_eq!(rec.chunks(), vec![5, 0, 2, 29, 30]);
    let p = lazy.recorded_profile([1; 32]).expect("recording");
    assert_eq!(p.chunks, vec![5, 0, 29, 30]);
    assert_eq!(p.recipe_sha256, [1; 32]);
    assert!(Arc::ptr_eq(&rec, &lazy.record()), "record is idempotent");
}

#[test]
fn replay_fetches_the_profile_in_parallel_once() {
    let fx = fixture(Duration::from_millis(20));
    let lazy = fx.lazy(32 << 20, 1 << 30);
    // Every chunk, last first, plus a zero chunk and one past the end.
    let mut chunks: Vec<u64> = (0..SIZE.div_ceil(CS)).rev().collect();
    chunks.push(1000);
    let profile = Profile::new([0; 32], chunks);
    let unique = fx.stored_chunks() - 1; // chunks 10 and 11 are one chunk
    let stats = lazy.replay(&profile, 8).wait();
    assert_eq!(
        stats.chunks,
        fx.stored_chunks(),
        "zero and missing chunks skipped"
    );
    assert_eq!(stats.fetched + stats.cached, stats.chunks);
    assert_eq!(stats.failed, 0);
    assert!(stats.seconds.is_some());
    assert_eq!(fx.store.total(), unique, "each chunk fetched once");
    let s = lazy.cache().stats().expect("stats");
    assert!(s.max_inflight > 4, "in parallel: {}", s.max_inflight);
    assert_eq!(s.memory_entries, 0, "replay fills the disk tier only");
    assert!(fx.read(&lazy, 0, SIZE).expect("read") == fx.plain);
    assert_eq!(
        fx.store.total(),
        unique,
        "reads after the replay fetch nothing"
    );
    let again = lazy.replay(&profile, 8).wait();
    assert_eq!((again.fetched, again.cached), (0, fx.stored_chunks()));
}

#[test]
fn replay_failures_are_left_to_the_readers() {
    let fx = fixture(Duration::ZERO);
    let lazy = fx.lazy(32 << 20, 1 << 30);
    let victim = *fx.img.recipe.entry(4).expect("chunk 4 is stored");
    fs::write(fx.store.inner.chunk_path(&victim.id), b"garbage").expect("corrupt");
    let profile = Profile::new([0; 32], vec![0, victim.index, 1]);
    let stats = lazy.replay(&profile, 2).wait();
    assert_eq!((stats.fetched, stats.failed), (2, 1));
    let err = fx.read(&lazy, victim.index * CS, 1).expect_err("bad chunk");
    assert!(err.to_string().contains(&victim.id.to_hex()), "{err}");
    assert!(fx.read(&lazy, 0, 2 * CS).is_ok());
}
