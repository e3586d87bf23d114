//! Startup packs whose chunks form one zstd stream: any read order is
//! served, and a damaged chunk costs its stream's later blocks their pack
//! copy, never a wrong or failed read.

use super::startup::{
    fresh_lazy, image_gets, put_pack_chunks, recorded_pack, seeded, Pages, READS,
};
use super::*;

/// [`recorded_pack`] sealed again in pieces of one block: ten chunks, one
/// zstd stream. Its chunks are put in the store.
fn streamed_pack(fx: &Fixture) -> Profile {
    let (mut p, _) = recorded_pack(fx);
    let plain: Vec<u8> = p
        .blocks
        .iter()
        .flat_map(|r| {
            let (a, b) = (r.first * 4096, (r.first + u64::from(r.count)) * 4096);
            fx.plain[a as usize..b as usize].to_vec()
        })
        .collect();
    let secret = fx.img.pack_secret().expect("encrypted image");
    let blob = p.seal_pack(&secret, &plain, 1);
    let pack = p.pack.as_ref().expect("pack");
    assert_eq!(pack.chunks.len(), 10);
    assert!(pack.chunks[1..].iter().all(|c| c.continues), "one stream");
    put_pack_chunks(fx, &p, &blob);
    p
}

/// A fresh node (empty cache, in a directory kept as long as the result)
/// serving `profile`'s startup pack.
fn serving(fx: &Fixture, profile: &Profile) -> (tempfile::TempDir, LazyImage) {
    let dir = tempfile::tempdir().expect("tempdir");
    let lazy = fresh_lazy(fx, dir.path());
    lazy.use_startup_pack(profile).expect("our keys");
    (dir, lazy)
}

fn check_reads(fx: &Fixture, lazy: &LazyImage, reads: impl Iterator<Item = (u64, u64)>) {
    for (off, len) in reads {
        let got = fx.read(lazy, off, len).expect("read");
        assert!(
            got == fx.plain[off as usize..(off + len) as usize],
            "read at {off}"
        );
    }
}

#[test]
fn a_streamed_pack_serves_reads_in_any_order() {
    let fx = fixture(Duration::ZERO);
    let profile = streamed_pack(&fx);
    let before = image_gets(&fx);
    let (_dir, lazy) = serving(&fx, &profile);
    // Backwards: the last read's blocks sit at the end of the stream, so
    // the decoder walks it from its start.
    check_reads(&fx, &lazy, READS.into_iter().rev());
    check_reads(&fx, &lazy, READS.into_iter());
    assert_eq!(image_gets(&fx), before, "served from the pack alone");
    let gets = fx.store.gets.lock().expect("lock");
    for c in &profile.pack.as_ref().expect("pack").chunks {
        assert_eq!(
            gets.get(&c.id).copied(),
            Some(1),
            "each pack chunk fetched once"
        );
    }
}

/// [`plain_image`] with the chunks [`READS`] touches holding machine
/// code: a call every 16 bytes to one of a few functions.
fn image_with_code() -> Vec<u8> {
    let mut plain = plain_image();
    for c in [0u64, 5, 13, 29] {
        let end = ((c + 1) * CS).min(SIZE);
        for at in (c * CS..end.saturating_sub(16)).step_by(16) {
            let target = 40 * CS + (at / 16 % 4) * 64;
            let rel = target.wrapping_sub(at + 5) as u32;
            let code = &mut plain[at as usize..at as usize + 16];
            code[0] = 0xE8;
            code[1..5].copy_from_slice(&rel.to_le_bytes());
            code[5..].copy_from_slice(&[
                0x48, 0x89, 0xC7, 0x31, 0xC0, 0x5D, 0xC3, 0x90, 0x90, 0x90, 0x90,
            ]);
        }
    }
    plain
}

#[test]
fn a_pack_of_machine_code_is_filtered_and_serves_its_blocks() {
    let grid = ChunkGrid::fixed(SIZE, CS).expect("grid");
    let fx = fixture_of(image_with_code(), Duration::ZERO, None, grid);
    let (p, _) = recorded_pack(&fx);
    assert!(
        p.pack.as_ref().expect("pack").chunks.iter().all(|c| c.x86),
        "calls compress better through the x86 filter"
    );
    let before = image_gets(&fx);
    let (_dir, lazy) = serving(&fx, &p);
    check_reads(&fx, &lazy, READS.into_iter().rev());
    assert_eq!(image_gets(&fx), before, "served from the pack alone");
}

#[test]
fn a_damaged_chunk_costs_the_rest_of_its_stream_its_pack_copy_only() {
    let fx = fixture(Duration::ZERO);
    let profile = streamed_pack(&fx);
    let bad = profile.pack.as_ref().expect("pack").chunks[3];
    let mut bytes = fs::read(fx.store.inner.chunk_path(&bad.id)).expect("read");
    bytes[0] ^= 1;
    fs::write(fx.store.inner.chunk_path(&bad.id), bytes).expect("corrupt");
    let before = image_gets(&fx);
    let (_dir, lazy) = serving(&fx, &profile);
    // READS[0]'s blocks are the pack's first two: before the damage.
    check_reads(&fx, &lazy, READS[..1].iter().copied());
    assert_eq!(
        image_gets(&fx),
        before,
        "blocks before the damage: the pack's"
    );
    for _ in 0..2 {
        check_reads(&fx, &lazy, READS.into_iter().rev());
    }
    assert!(image_gets(&fx) > before, "later blocks: the image's chunks");
    assert_eq!(lazy.stats().read_errors, 0);
    let tries = fx.store.gets.lock().expect("lock").get(&bad.id).copied();
    assert!(
        tries <= Some(2),
        "the bad chunk is left alone once broken: {tries:?}"
    );
}

#[test]
fn seeding_a_streamed_pack_stops_at_the_damage() {
    let fx = fixture(Duration::ZERO);
    let profile = streamed_pack(&fx);
    let bad = profile.pack.as_ref().expect("pack").chunks[6];
    fs::write(fx.store.inner.chunk_path(&bad.id), b"garbage").expect("corrupt");
    let (_dir, lazy) = serving(&fx, &profile);
    let pages = Arc::new(Pages::default());
    lazy.seed_pages(pages.clone());
    assert_eq!(seeded(&lazy, 6 * 4096), 6 * 4096);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        lazy.stats().bytes_seeded,
        6 * 4096,
        "the six blocks before the damage"
    );
    for (off, data) in pages.0.lock().unwrap().iter() {
        assert!(data[..] == fx.plain[*off as usize..*off as usize + data.len()]);
    }
    check_reads(&fx, &lazy, READS.into_iter());
    assert_eq!(lazy.stats().read_errors, 0);
}

#[test]
fn a_read_waiting_in_one_stream_holds_up_no_other_stream() {
    let fx = fixture(Duration::ZERO);
    // One block of each of 36 stored chunks: sealed one block per pack
    // chunk, streams of 32 and 4 chunks.
    let lazy = fx.lazy(32 << 20, 1 << 30);
    lazy.record();
    let stored = fx.img.recipe.chunks.iter().map(|e| e.index);
    let blocks: Vec<u64> = stored.take(36).map(|c| c * CS + 4096).collect();
    for &at in &blocks {
        fx.read(&lazy, at, 4096).expect("read");
    }
    let mut profile = lazy.recorded_profile([5; 32]).expect("recording");
    assert_eq!(smr_format::startup::total_blocks(&profile.blocks), 36);
    let plain: Vec<u8> = blocks
        .iter()
        .flat_map(|&at| fx.plain[at as usize..at as usize + 4096].to_vec())
        .collect();
    let secret = fx.img.pack_secret().expect("encrypted image");
    let blob = profile.seal_pack(&secret, &plain, 1);
    let pack = profile.pack.clone().expect("pack");
    assert!(
        !pack.chunks[32].continues && pack.chunks[33].continues,
        "two streams"
    );
    put_pack_chunks(&fx, &profile, &blob);
    let (_dir, lazy) = serving(&fx, &profile);
    let before = image_gets(&fx);
    // Pack chunk 8 "is still downloading": a read of pack block 9 waits
    // for it, as its stream decodes only in order.
    fx.store.hold(Some(pack.chunks[8].id));
    let (ahead_at, other_at) = (blocks[9], blocks[35]);
    let (fx, lazy) = (&fx, &lazy);
    std::thread::scope(|s| {
        let ahead = s.spawn(move || fx.read(lazy, ahead_at, 4096).expect("read ahead"));
        let t = std::time::Instant::now();
        while fx
            .store
            .gets
            .lock()
            .expect("lock")
            .get(&pack.chunks[8].id)
            .is_none()
        {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "the read ahead never asked"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        let (tx, rx) = std::sync::mpsc::channel();
        s.spawn(move || tx.send(fx.read(lazy, other_at, 4096).expect("read")));
        let got = rx.recv_timeout(Duration::from_secs(10));
        // Let the read ahead finish either way, so that a failure ends.
        fx.store.hold(None);
        let got = got.expect("a read in the other stream is not held up");
        assert!(got == fx.plain[other_at as usize..other_at as usize + 4096]);
        let got = ahead.join().expect("reader");
        assert!(got == fx.plain[ahead_at as usize..ahead_at as usize + 4096]);
    });
    assert_eq!(image_gets(fx), before, "both served from the pack");
}
