//! Startup packs: recorded blocks, a pack made from them, and a fresh node
//! serving a start from the pack alone; damage and wrong keys fall back
//! to the image's chunks.

use super::*;
use crate::startup::make_startup_pack;
use smr_format::startup::BlockRun;

/// The reads of a "start": scattered pages and a run over a chunk boundary.
const READS: [(u64, u64); 5] = [
    (5 * CS + 4096, 8192),
    (0, 4096),
    (29 * CS + 60_000, 9000),
    (13 * CS, 3 * 4096),
    (5 * CS + 100, 50), // block 80, next to blocks read before
];

/// Records [`READS`] on `fx` and makes the startup pack; puts its chunks
/// in the store (as a pack blob would be pushed next to the artifact).
fn recorded_pack(fx: &Fixture) -> (Profile, Vec<u8>) {
    let lazy = fx.lazy(32 << 20, 1 << 30);
    lazy.record();
    for (off, len) in READS {
        fx.read(&lazy, off, len).expect("read");
    }
    let mut p = lazy.recorded_profile([3; 32]).expect("recording");
    let blob = make_startup_pack(&fx.img, fx.store.as_ref(), &mut p)
        .expect("make")
        .expect("encrypted image: a pack");
    let pack = p.pack.as_ref().expect("pack");
    let (offsets, _) = pack.offsets();
    for (c, at) in pack.chunks.iter().zip(offsets) {
        let bytes = &blob[at as usize..(at + u64::from(c.stored_len)) as usize];
        fx.store.inner.put(&c.id, bytes).expect("put pack chunk");
    }
    (p, blob)
}

fn fresh_lazy(fx: &Fixture, dir: &Path) -> LazyImage {
    let cache = Cache::open(CacheConfig::new(dir)).expect("cache");
    LazyImage::new(fx.img.clone(), fx.store.clone(), cache).expect("lazy image")
}

/// Store reads of the image's own chunks.
fn image_gets(fx: &Fixture) -> u64 {
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
    assert!(!lazy.start_under_way(), "fetched, not read yet");
    for (off, len) in READS {
        let got = fx.read(&lazy, off, len).expect("read");
        assert!(
            got == fx.plain[off as usize..(off + len) as usize],
            "read at {off}"
        );
    }
    assert_eq!(image_gets(&fx), before, "no image chunk fetched");
    assert!(lazy.start_under_way(), "the whole pack read");
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
fn a_start_from_a_warm_cache_is_under_way_too() {
    let fx = fixture(Duration::ZERO);
    let (profile, _) = recorded_pack(&fx);
    let dir = tempfile::tempdir().expect("tempdir");
    let warm = fresh_lazy(&fx, dir.path());
    for (off, len) in READS {
        fx.read(&warm, off, len).expect("read");
    }
    drop(warm);
    // The node's cache holds the image's chunks: they serve the start,
    // the pack serves nothing, and the start still counts as under way
    // (the loop device is retuned after it).
    let lazy = fresh_lazy(&fx, dir.path());
    lazy.use_startup_pack(&profile).expect("our keys");
    assert!(!lazy.start_under_way(), "nothing read yet");
    let before = image_gets(&fx);
    for (off, len) in READS {
        let got = fx.read(&lazy, off, len).expect("read");
        assert!(got == fx.plain[off as usize..(off + len) as usize]);
    }
    assert_eq!(image_gets(&fx), before, "served from the cache");
    assert!(lazy.start_under_way());
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
