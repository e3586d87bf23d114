use super::*;
use proptest::prelude::*;

const K: u64 = 1024;

fn sizes() -> CdcSizes {
    CdcSizes::default()
}

#[test]
fn sizes_parse_print_and_are_checked() {
    let s: CdcSizes = "16K:64K:256K".parse().unwrap();
    assert_eq!(s, CdcSizes::default());
    assert_eq!(s.to_string(), "16K:64K:256K");
    assert_eq!("8k:32K:1M".parse::<CdcSizes>().unwrap().max, 1 << 20);
    for bad in [
        "16K:64K",
        "64K:16K:256K",
        "16K:64K:100000",
        "0:64K:256K",
        "16K:64K:8M",
        "1G:2G:3G",
        "x:y:z",
    ] {
        assert!(bad.parse::<CdcSizes>().is_err(), "{bad}");
    }
}

#[test]
fn fixed_grids_cut_every_chunk_size() {
    let g = ChunkGrid::fixed(10 * 64 * K + 4096, 64 * K).unwrap();
    assert_eq!(g.count(), 11);
    assert_eq!(g.range(3), 3 * 64 * K..4 * 64 * K);
    assert_eq!(g.len(10), 4096);
    assert_eq!(g.len(11), 0);
    assert_eq!(g.index_of(64 * K - 1), 0);
    assert_eq!(g.index_of(64 * K), 1);
    assert_eq!(g.index_of(g.size()), 11);
    assert_eq!(g.chunks_of(100..64 * K + 1), 0..2);
    assert_eq!(g.chunks_of(5..5), 0..0);
    assert!(ChunkGrid::fixed(1, 1000).is_err());
}

#[test]
fn variable_grids_look_up_and_round_trip() {
    let lens = [16 * K, 256 * K, 4 * K, 100];
    let g = ChunkGrid::variable(64 * K, sizes(), lens).unwrap();
    assert_eq!(g.count(), 4);
    assert_eq!(g.size(), 276 * K + 100);
    assert_eq!(g.range(1), 16 * K..272 * K);
    assert_eq!(g.index_of(16 * K - 1), 0);
    assert_eq!(g.index_of(16 * K), 1);
    assert_eq!(g.index_of(276 * K + 99), 3);
    assert_eq!(g.index_of(276 * K - 1), 2);
    assert_eq!(g.index_of(g.size()), 4);
    assert_eq!(g.chunks_of(0..g.size()), 0..4);
    assert_eq!(g.max_len(), 256 * K);
    let mut out = Vec::new();
    g.encode_table(&mut out);
    let mut b = out.as_slice();
    let back = ChunkGrid::decode_table(&mut b, g.size(), 64 * K).unwrap();
    assert!(b.is_empty());
    assert_eq!(back, g);
}

#[test]
fn bad_variable_grids_are_refused() {
    let v = |lens: &[u64]| ChunkGrid::variable(64 * K, sizes(), lens.iter().copied());
    assert!(v(&[]).is_err(), "no chunks");
    assert!(v(&[0]).is_err(), "empty chunk");
    assert!(v(&[100, 4096]).is_err(), "a short chunk before the last");
    assert!(v(&[8 << 20]).is_err(), "over 4 MiB");
    // A table whose lengths pass the image size.
    let g = v(&[8 * K, 8 * K]).unwrap();
    let mut out = Vec::new();
    g.encode_table(&mut out);
    let err = ChunkGrid::decode_table(&mut out.as_slice(), 8 * K, 64 * K).unwrap_err();
    assert!(err.to_string().contains("past the image"), "{err}");
    // A count that cannot fit the bytes that follow.
    let mut out = Vec::new();
    for x in [16 * K, 64 * K, 256 * K, 1 << 40] {
        varint::put(&mut out, x);
    }
    assert!(ChunkGrid::decode_table(&mut out.as_slice(), 1 << 30, 64 * K).is_err());
}

#[test]
fn grids_extend_with_nominal_chunks() {
    let g = ChunkGrid::fixed(100 * K, 64 * K).unwrap();
    assert_eq!(g.extended_to(200 * K).unwrap().count(), 4);
    assert!(g.extended_to(10).is_err());
    let v = ChunkGrid::variable(64 * K, sizes(), [20 * K, 1000]).unwrap();
    let e = v.extended_to(20 * K + 4096 + 130 * K).unwrap();
    assert_eq!(e.range(0), v.range(0));
    assert_eq!(e.len(1), 4096, "the short last chunk becomes a whole block");
    assert_eq!(e.len(2), 64 * K);
    assert_eq!(e.len(4), 2 * K);
    assert_eq!(e.size(), 20 * K + 4096 + 130 * K);
}

proptest! {
    #[test]
    fn index_of_agrees_with_the_ranges(
        lens in proptest::collection::vec(1u64..64, 1..50),
        tail in 1u64..100_000,
    ) {
        let mut lens: Vec<u64> = lens.into_iter().map(|b| b * BLOCK).collect();
        lens.push(tail);
        let g = ChunkGrid::variable(64 * K, sizes(), lens.clone()).unwrap();
        for i in 0..g.count() {
            let r = g.range(i);
            prop_assert_eq!(r.end - r.start, lens[i as usize]);
            prop_assert_eq!(g.index_of(r.start), i);
            prop_assert_eq!(g.index_of(r.end - 1), i);
        }
        let mut out = Vec::new();
        g.encode_table(&mut out);
        let back = ChunkGrid::decode_table(&mut out.as_slice(), g.size(), 64 * K).unwrap();
        prop_assert_eq!(back, g);
    }
}
