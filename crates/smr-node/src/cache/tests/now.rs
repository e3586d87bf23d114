//! `Cache::get_decoded_now`: chunks served without waiting, or not at all.

use super::*;

/// The key of a [`one_chunk`] chunk (unencrypted, uncompressed), decoded
/// with `decryption` standing in for the chunk key: the memory tier keys
/// by it, so a new one sends the next read to the disk tier.
fn key(id: ChunkId, len: usize, decryption: u8) -> DecodeKey {
    DecodeKey {
        id,
        key: Some([decryption; 32]),
        compressed: false,
        plain_len: len as u32,
    }
}

fn invert(v: Vec<u8>) -> Result<Vec<u8>, ChunkError> {
    Ok(v.iter().map(|b| b ^ 0xff).collect())
}

/// Has the kernel drop a file's clean pages from the page cache.
fn evict_pages(path: &Path) {
    let f = fs::File::open(path).expect("open segment");
    // Segments are written without fsync: write the pages back first, or
    // the kernel keeps them (dirty pages are not dropped).
    f.sync_all().expect("sync entry");
    rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed).expect("fadvise");
}

#[test]
fn a_warm_entry_is_served_at_once_and_a_missing_one_is_not() {
    const LEN: usize = 64 << 10;
    let c = one_chunk(LEN);
    let expected: Vec<u8> = bytes(1, LEN).iter().map(|b| b ^ 0xff).collect();
    // Just inserted: its segment is open and its pages are cached.
    let a = c
        .cache
        .get_decoded_now(&key(c.id, LEN, 1), true, invert)
        .expect("at hand");
    assert!(*a == expected);
    let b = c
        .cache
        .get_decoded_now(&key(c.id, LEN, 1), true, |_| panic!("decoded again"))
        .expect("from memory");
    assert!(Arc::ptr_eq(&a, &b));
    let s = c.cache.stats().expect("stats");
    assert_eq!((s.counters.hits, s.counters.memory_hits), (1, 1));

    let absent = ChunkId::of(b"not in the cache");
    assert!(c
        .cache
        .get_decoded_now(&key(absent, LEN, 1), true, invert)
        .is_none());
    assert_eq!(c.f.calls(), 1, "never fetches");
}

#[test]
fn an_entry_not_in_the_page_cache_is_left_to_get_decoded() {
    const LEN: usize = 256 << 10;
    let c = one_chunk(LEN);
    evict_pages(&c.segment);
    assert!(
        c.cache
            .get_decoded_now(&key(c.id, LEN, 1), true, invert)
            .is_none(),
        "would wait for the disk"
    );
    // The waiting path reads it (and so brings it into the page cache).
    c.cache
        .get_decoded(&key(c.id, LEN, 1), true, never, invert)
        .expect("read from disk");
    let again = c
        .cache
        .get_decoded_now(&key(c.id, LEN, 2), true, invert)
        .expect("at hand now");
    assert_eq!(again.len(), LEN);
    assert_eq!(c.f.calls(), 1);
}

#[test]
fn a_corrupt_entry_is_left_to_get_decoded_which_heals_it() {
    const LEN: usize = 16 << 10;
    let c = one_chunk(LEN);
    flip_in_place(&c.segment, c.offset + 999);
    assert!(c
        .cache
        .get_decoded_now(&key(c.id, LEN, 1), true, invert)
        .is_none());
    assert_eq!(c.f.calls(), 1, "not refetched here");
    assert_healed(&c.cache, &c.f, &c.id);
}

#[test]
fn only_kept_chunks_enter_the_memory_tier() {
    const LEN: usize = 8 << 10;
    let c = one_chunk(LEN);
    let passing = key(c.id, LEN, 1);
    c.cache
        .get_decoded_now(&passing, false, invert)
        .expect("at hand");
    c.cache
        .get_decoded(&passing, false, never, invert)
        .expect("from disk");
    assert!(!c.cache.in_memory(&passing), "not kept");
    c.cache
        .get_decoded_now(&passing, true, invert)
        .expect("at hand");
    assert!(c.cache.in_memory(&passing), "kept");
    let other = key(c.id, LEN, 2);
    c.cache
        .get_decoded(&other, true, never, invert)
        .expect("from disk");
    assert!(c.cache.in_memory(&other));
}
