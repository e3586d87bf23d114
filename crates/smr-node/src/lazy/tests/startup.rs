//! Startup packs: recorded blocks, a pack made from them, and a fresh node
//! serving a start from the pack alone; damage and wrong keys fall back
//! to the image's chunks.

use super::*;
use crate::startup::make_startup_pack;
use smr_format::startup::BlockRun;

/// The reads of a "start": scattered pages and a run over a chunk boundary.
pub(super) const READS: [(u64, u64); 5] = [
    (5 * CS + 4096, 8192),
    (0, 4096),
    (29 * CS + 60_000, 9000),
    (13 * CS, 3 * 4096),
    (5 * CS + 100, 50), // block 80, next to blocks read before
];

/// Records [`READS`] on `fx` and makes the startup pack; puts its chunks
/// in the store (as a pack blob would be pushed next to the artifact).
pub(super) fn recorded_pack(fx: &Fixture) -> (Profile, Vec<u8>) {
    let lazy = fx.lazy(32 << 20, 1 << 30);
    lazy.record();
    for (off, len) in READS {
        fx.read(&lazy, off, len).expect("read");
    }
    let mut p = lazy.recorded_profile([3; 32]).expect("recording");
    let blob = make_startup_pack(&fx.img, fx.store.as_ref(), &mut p)
        .expect("make")
        .expect("encrypted image: a pack");
    put_pack_chunks(fx, &p, &blob);
    (p, blob)
}

/// Puts the chunks of `p`'s pack blob `blob` in the store, as a pack blob
/// pushed next to the artifact would serve them.
pub(super) fn put_pack_chunks(fx: &Fixture, p: &Profile, blob: &[u8]) {
    let pack = p.pack.as_ref().expect("pack");
    let (offsets, _) = pack.offsets();
    for (c, at) in pack.chunks.iter().zip(offsets) {
        let bytes = &blob[at as usize..(at + u64::from(c.stored_len)) as usize];
        fx.store.inner.put(&c.id, bytes).expect("put pack chunk");
    }
}

pub(super) fn fresh_lazy(fx: &Fixture, dir: &Path) -> LazyImage {
    let cache = Cache::open(CacheConfig::new(dir)).expect("cache");
    LazyImage::new(fx.img.clone(), fx.store.clone(), cache).expect("lazy image")
}

/// Store reads of the image's own chunks.
pub(super) fn image_gets(fx: &Fixture) -> u64 {
    let ids: std::collections::HashSet<ChunkId> =
        fx.img.recipe.chunks.iter().map(|e| e.id).collect();
    let gets = fx.store.gets.lock().expect("lock");
    gets.iter()
        .filter(|(id, _)| ids.contains(id))
        .map(|(_, n)| n)
        .sum()
}

#[test]
fn recording_lists_blocks_in_first_read_order_without_zero_chunks() {
    let fx = fixture(Duration::ZERO);
    let lazy = fx.lazy(32 << 20, 1 << 30);
    lazy.record();
    for (off, len) in [
        (5 * CS + 4096, 8192),
        (0, 1),
        (2 * CS, 4096),
        (5 * CS, 4096 * 2),
    ] {
        fx.read(&lazy, off, len).expect("read");
    }
    let p = lazy.recorded_profile([1; 32]).expect("recording");
    let b = |first: u64, count: u32| BlockRun { first, count };
    // Chunk 2 is zeros (not stored): its block is left out; block 80 was
    // read before, 81 joins nothing.
    assert_eq!(p.blocks, vec![b(81, 2), b(0, 1), b(80, 1)]);
}

#[test]
fn a_fresh_node_starts_from_the_pack_alone() {
    let fx = fixture(Duration::ZERO);
    let (profile, blob) = recorded_pack(&fx);
    let pack = profile.pack.as_ref().expect("pack");
    let read_bytes: u64 = profile
        .blocks
        .iter()
        .map(|r| u64::from(r.count) * 4096)
        .sum();
    assert_eq!(read_bytes, (2 + 1 + 3 + 3 + 1) * 4096);
    assert!(
        (blob.len() as u64) < read_bytes,
        "the pack holds only the blocks read (compressed): {} bytes",
        blob.len()
    );
    let before = image_gets(&fx);
    let dir = tempfile::tempdir().expect("tempdir");
    let lazy = fresh_lazy(&fx, dir.path());
    assert_eq!(
        lazy.use_startup_pack(&profile).expect("our keys"),
        pack.chunks.len()
    );
    let stats = lazy.replay(&profile, 4).wait();
    assert_eq!((stats.chunks, stats.failed), (pack.chunks.len() as u64, 0));
    assert_eq!(lazy.startup_pack_bytes(), read_bytes);
    for (off, len) in READS {
        let got = fx.read(&lazy, off, len).expect("read");
        assert!(
            got == fx.plain[off as usize..(off + len) as usize],
            "read at {off}"
        );
    }
    assert_eq!(image_gets(&fx), before, "no image chunk fetched");
    assert_eq!(lazy.stats().bytes_fetched, blob.len() as u64);
    // A read beyond the pack takes the image's chunks, and then they win.
    let off = 5 * CS;
    assert!(fx.read(&lazy, off, CS).expect("read") == fx.plain[off as usize..(off + CS) as usize]);
    assert_eq!(image_gets(&fx), before + 1);
    assert!(
        fx.read(&lazy, off + 4096, 4096).expect("read")
            == fx.plain[(off + 4096) as usize..(off + 8192) as usize]
    );
    assert!(
        lazy.use_startup_pack(&profile).is_err(),
        "one pack per image"
    );
}

#[test]
fn blocks_read_out_of_order_are_served_in_image_order() {
    let fx = fixture(Duration::ZERO);
    let lazy = fx.lazy(32 << 20, 1 << 30);
    lazy.record();
    // Blocks 81, 83, 82, 84 (of chunk 5): the pack holds them in that
    // order, so a read of 81..=84 has its ends where an in-order run's
    // would be, and its middle swapped.
    let at = 5 * CS + 4096;
    for b in [0, 2, 1, 3] {
        fx.read(&lazy, at + b * 4096, 4096).expect("read");
    }
    let mut p = lazy.recorded_profile([4; 32]).expect("recording");
    let blob = make_startup_pack(&fx.img, fx.store.as_ref(), &mut p)
        .expect("make")
        .expect("encrypted image: a pack");
    let pack = p.pack.as_ref().expect("pack");
    assert_eq!(pack.chunks.len(), 1, "one pack chunk holds all four");
    fx.store
        .inner
        .put(&pack.chunks[0].id, &blob)
        .expect("put pack chunk");
    let dir = tempfile::tempdir().expect("tempdir");
    let lazy = fresh_lazy(&fx, dir.path());
    lazy.use_startup_pack(&p).expect("our keys");
    let before = image_gets(&fx);
    for (off, len) in [(at, 4 * 4096), (at + 4096, 2 * 4096), (at + 100, 3 * 4096)] {
        let got = fx.read(&lazy, off, len).expect("read");
        assert!(
            got == fx.plain[off as usize..(off + len) as usize],
            "read of {len} bytes at {off}"
        );
    }
    assert_eq!(image_gets(&fx), before, "served from the pack");
}

#[test]
fn a_damaged_pack_chunk_costs_bytes_never_a_wrong_read() {
    let fx = fixture(Duration::ZERO);
    let (profile, _) = recorded_pack(&fx);
    let first = profile.pack.as_ref().expect("pack").chunks[0];
    fs::write(
        fx.store.inner.chunk_path(&first.id),
        vec![0u8; first.stored_len as usize],
    )
    .expect("corrupt");
    let dir = tempfile::tempdir().expect("tempdir");
    let lazy = fresh_lazy(&fx, dir.path());
    lazy.use_startup_pack(&profile).expect("pack");
    let stats = lazy.replay(&profile, 2).wait();
    assert_eq!(stats.failed, 1);
    for _ in 0..2 {
        for (off, len) in READS {
            let got = fx
                .read(&lazy, off, len)
                .expect("read from the image's chunks");
            assert!(
                got == fx.plain[off as usize..(off + len) as usize],
                "read at {off}"
            );
        }
    }
    assert_eq!(lazy.stats().read_errors, 0);
    assert_eq!(
        fx.store.gets.lock().expect("lock").get(&first.id).copied(),
        Some(2),
        "the bad pack chunk is tried by the replay and one read, then left alone"
    );
}

#[test]
fn a_pack_made_with_other_keys_or_altered_is_refused() {
    let fx = fixture(Duration::ZERO);
    let (profile, _) = recorded_pack(&fx);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut moved = profile.clone();
    moved.blocks[0].first += 1;
    let e = fresh_lazy(&fx, dir.path())
        .use_startup_pack(&moved)
        .unwrap_err();
    assert!(e.to_string().contains("tag does not match"), "{e}");
    // The same image under other keys (another owner's conversion).
    let other = fixture_with_grid(
        Duration::ZERO,
        None,
        ChunkGrid::fixed(SIZE, CS * 2).expect("grid"),
    );
    let cache = Cache::open(CacheConfig::new(dir.path().join("other"))).expect("cache");
    let lazy = LazyImage::new(other.img.clone(), other.store.clone(), cache).expect("lazy");
    assert!(lazy.use_startup_pack(&profile).is_err());
    // Without encryption there is no pack to make.
    let plain_img = ImageChunks::new(fx.img.recipe.clone(), None);
    let mut p = profile.clone();
    assert!(make_startup_pack(&plain_img, fx.store.as_ref(), &mut p)
        .expect("make")
        .is_none());
}

/// The page cache of an exported file, kept in memory: what was stored
/// where.
#[derive(Default)]
pub(super) struct Pages(pub(super) std::sync::Mutex<Vec<(u64, Vec<u8>)>>);

impl crate::device::PageSink for Pages {
    fn store(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.0.lock().unwrap().push((offset, data.to_vec()));
        Ok(())
    }
}

/// Waits until the image has stored `bytes` in its page cache (or 10 s).
pub(super) fn seeded(lazy: &LazyImage, bytes: u64) -> u64 {
    let t = std::time::Instant::now();
    while lazy.stats().bytes_seeded < bytes && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(5));
    }
    lazy.stats().bytes_seeded
}

#[test]
fn the_packs_blocks_are_stored_in_the_page_cache_as_the_image_has_them() {
    let fx = fixture(Duration::from_millis(20));
    let (profile, _) = recorded_pack(&fx);
    let total = smr_format::startup::total_blocks(&profile.blocks);
    let dir = tempfile::tempdir().expect("tempdir");
    let lazy = fresh_lazy(&fx, dir.path());
    let pages = Arc::new(Pages::default());
    let before = image_gets(&fx);
    // Exported first, the pack named later: seeding starts with the pack.
    lazy.seed_pages(pages.clone());
    assert_eq!(lazy.stats().bytes_seeded, 0, "nothing to store yet");
    lazy.use_startup_pack(&profile).expect("our keys");
    assert_eq!(seeded(&lazy, total * 4096), total * 4096);
    let stored = pages.0.lock().unwrap().clone();
    let mut blocks = Vec::new();
    for (off, data) in &stored {
        assert_eq!(off % 4096, 0);
        assert!(
            data[..] == fx.plain[*off as usize..*off as usize + data.len()],
            "stored bytes at {off} are the image's"
        );
        blocks.extend((0..data.len() as u64 / 4096).map(|k| off / 4096 + k));
    }
    let listed: Vec<u64> = profile
        .blocks
        .iter()
        .flat_map(|r| r.first..r.first + u64::from(r.count))
        .collect();
    assert_eq!(
        blocks, listed,
        "every block of the pack, once, in pack order"
    );
    assert_eq!(image_gets(&fx), before, "no image chunk fetched to seed");
}

#[test]
fn the_blocks_of_a_damaged_pack_chunk_are_not_stored() {
    let fx = fixture(Duration::ZERO);
    let (profile, _) = recorded_pack(&fx);
    let pack = profile.pack.as_ref().expect("pack");
    let first = pack.chunks[0];
    let mut bad = fs::read(fx.store.inner.chunk_path(&first.id)).expect("read");
    bad[10] ^= 1;
    fs::write(fx.store.inner.chunk_path(&first.id), bad).expect("corrupt");
    let dir = tempfile::tempdir().expect("tempdir");
    let lazy = fresh_lazy(&fx, dir.path());
    lazy.use_startup_pack(&profile).expect("our keys");
    let pages = Arc::new(Pages::default());
    lazy.seed_pages(pages.clone());
    let total = smr_format::startup::total_blocks(&profile.blocks);
    let piece = u64::from(pack.piece_blocks);
    let want = (total - piece.min(total)) * 4096;
    seeded(&lazy, want);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        lazy.stats().bytes_seeded,
        want,
        "all but the first chunk's blocks"
    );
    for (off, data) in pages.0.lock().unwrap().iter() {
        assert!(data[..] == fx.plain[*off as usize..*off as usize + data.len()]);
    }
    // Its blocks are still read right, from the image's chunks.
    for (off, len) in READS {
        let got = fx.read(&lazy, off, len).expect("read");
        assert!(got == fx.plain[off as usize..(off + len) as usize]);
    }
}
