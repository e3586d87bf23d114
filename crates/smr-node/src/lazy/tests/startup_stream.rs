//! Startup packs whose chunks form one zstd stream: any read order is
//! served, and a damaged chunk costs its stream's later blocks their pack
//! copy, never a wrong or failed read.

use super::startup::{fresh_lazy, image_gets, recorded_pack, seeded, Pages, READS};
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
    let (offsets, _) = pack.offsets();
    for (c, at) in pack.chunks.iter().zip(offsets) {
        let bytes = &blob[at as usize..(at + u64::from(c.stored_len)) as usize];
        fx.store.inner.put(&c.id, bytes).expect("put pack chunk");
    }
    p
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
    let dir = tempfile::tempdir().expect("tempdir");
    let lazy = fresh_lazy(&fx, dir.path());
    lazy.use_startup_pack(&profile).expect("our keys");
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

#[test]
fn a_damaged_chunk_costs_the_rest_of_its_stream_its_pack_copy_only() {
    let fx = fixture(Duration::ZERO);
    let profile = streamed_pack(&fx);
    let bad = profile.pack.as_ref().expect("pack").chunks[3];
    let mut bytes = fs::read(fx.store.inner.chunk_path(&bad.id)).expect("read");
    bytes[0] ^= 1;
    fs::write(fx.store.inner.chunk_path(&bad.id), bytes).expect("corrupt");
    let before = image_gets(&fx);
    let dir = tempfile::tempdir().expect("tempdir");
    let lazy = fresh_lazy(&fx, dir.path());
    lazy.use_startup_pack(&profile).expect("our keys");
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
    let dir = tempfile::tempdir().expect("tempdir");
    let lazy = fresh_lazy(&fx, dir.path());
    lazy.use_startup_pack(&profile).expect("our keys");
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
