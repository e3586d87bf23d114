use super::*;
use crate::Profile;
use proptest::prelude::*;

fn secret(seed: u8) -> PackSecret {
    PackSecret::of_keys(&[ChunkKey([seed; 32]), ChunkKey([seed ^ 1; 32])])
}

fn runs() -> Vec<BlockRun> {
    vec![
        BlockRun {
            first: 10,
            count: 3,
        },
        BlockRun { first: 0, count: 1 },
        BlockRun {
            first: 100,
            count: 70,
        },
    ]
}

/// Plaintext whose block `k` of the pack is filled with `k`.
fn plain(total: u64) -> Vec<u8> {
    (0..total)
        .flat_map(|k| vec![(k % 251) as u8; BLOCK as usize])
        .collect()
}

fn packed(piece: u32) -> (Profile, Vec<u8>, Vec<u8>) {
    let mut p = Profile::new([7; 32], vec![0, 2, 1]);
    p.blocks = runs();
    let text = plain(total_blocks(&p.blocks));
    let blob = p.seal_pack(&secret(1), &text, piece);
    (p, blob, text)
}

#[test]
fn a_sealed_pack_round_trips_and_opens_to_its_blocks() {
    let (p, blob, text) = packed(16);
    let bytes = p.encode();
    assert_eq!(&bytes[..8], b"SMRPROF2");
    let back = Profile::decode(&bytes).unwrap();
    assert_eq!(back, p);
    back.check_pack(&secret(1)).unwrap();
    let pack = back.pack.as_ref().unwrap();
    assert_eq!(pack.chunks.len(), 74usize.div_ceil(16));
    assert_eq!(
        pack.blob_digest(),
        format!("sha256:{}", hex::encode(Sha256::digest(&blob)))
    );
    let (offsets, size) = pack.offsets();
    assert_eq!(size, blob.len() as u64);
    let total = total_blocks(&back.blocks);
    let mut opened = Vec::new();
    let mut decoder = PackDecoder::new();
    let spans = pack_spans(&back.blocks, pack.piece_blocks);
    for (i, c) in pack.chunks.iter().enumerate() {
        let at = offsets[i] as usize;
        let stored = blob[at..at + c.stored_len as usize].to_vec();
        crate::chunk::verify(&c.id, &stored).unwrap();
        let key = secret(1).chunk_key(&back.blocks, pack.piece_blocks, i as u64);
        let len = pack.plain_len(i, total) as usize;
        opened.extend(open_pack_chunk(pack, &spans, i, &key, stored, len, &mut decoder).unwrap());
    }
    assert_eq!(opened, text);
    assert!(
        !pack.chunks[0].continues && pack.chunks[1..].iter().all(|c| c.continues),
        "the pieces are one zstd stream"
    );
    assert!(
        pack.chunks.iter().all(|c| c.compressed),
        "repetitive blocks compress"
    );
}

#[test]
fn the_recorded_readahead_is_kept_and_bound_by_the_tag() {
    let (p, _, text) = packed(16);
    assert_eq!(p.readahead_kb(), crate::profile::V2_READAHEAD_KB);
    let mut p3 = p.clone();
    p3.recorded_readahead_kb = Some(8);
    p3.seal_pack(&secret(1), &text, 16);
    let bytes = p3.encode();
    assert_eq!(&bytes[..8], b"SMRPROF3");
    let back = Profile::decode(&bytes).unwrap();
    assert_eq!(back, p3);
    assert_eq!(back.readahead_kb(), 8);
    back.check_pack(&secret(1)).unwrap();
    assert_eq!(back.encode(), bytes, "canonical");
    // Another readahead under the same tag is refused.
    let mut forged = back.clone();
    forged.recorded_readahead_kb = Some(128);
    assert!(forged.check_pack(&secret(1)).is_err());
    // A readahead beyond any kernel's is refused.
    let mut big = Profile::new([7; 32], vec![0]);
    big.blocks = runs();
    big.recorded_readahead_kb = Some(u32::MAX);
    let e = Profile::decode(&big.encode()).unwrap_err();
    assert!(e.to_string().contains("readahead"), "{e}");
}

/// Blocks of machine code as the image holds them at `runs`: every 16
/// bytes a call (E8) of one of a few functions near image offset 1 MiB,
/// with the bytes between them from a fixed pseudo-random sequence.
fn calls(runs: &[BlockRun]) -> Vec<u8> {
    let mut noise = 0x2545_f491_4f6c_dd1du64;
    let mut out = Vec::new();
    for r in runs {
        for b in r.first..r.first + u64::from(r.count) {
            for k in 0..BLOCK / 16 {
                let at = b * BLOCK + k * 16;
                let target = (1 << 20) + (noise % 8) * 64;
                let rel = target.wrapping_sub(at + 5) as u32;
                out.push(0xE8);
                out.extend_from_slice(&rel.to_le_bytes());
                for _ in 0..11 {
                    noise ^= noise << 13;
                    noise ^= noise >> 7;
                    noise ^= noise << 17;
                    out.push([0x90, 0x31, 0xC0, 0x5D][(noise % 4) as usize]);
                }
            }
        }
    }
    out
}

#[test]
fn machine_code_goes_through_the_x86_filter_and_opens_to_its_blocks() {
    let mut p = Profile::new([7; 32], vec![0, 2, 1]);
    p.blocks = runs();
    let text = calls(&p.blocks);
    let blob = p.seal_pack(&secret(1), &text, 16);
    let back = Profile::decode(&p.encode()).unwrap();
    assert_eq!(back, p, "the filter's flags round-trip");
    let pack = back.pack.as_ref().unwrap();
    assert!(
        pack.chunks.iter().all(|c| c.x86),
        "calls compress better filtered"
    );
    let (offsets, filtered) = pack.offsets();
    let spans = pack_spans(&back.blocks, pack.piece_blocks);
    let total = total_blocks(&back.blocks);
    let mut decoder = PackDecoder::new();
    let mut opened = Vec::new();
    for (i, c) in pack.chunks.iter().enumerate() {
        let stored = blob[offsets[i] as usize..][..c.stored_len as usize].to_vec();
        let key = secret(1).chunk_key(&back.blocks, pack.piece_blocks, i as u64);
        let len = pack.plain_len(i, total) as usize;
        opened.extend(open_pack_chunk(pack, &spans, i, &key, stored, len, &mut decoder).unwrap());
    }
    assert_eq!(opened, text);

    let pieces: Vec<&[u8]> = text.chunks(16 * BLOCK as usize).collect();
    let unfiltered: usize = stream::encode_stream(&pieces, PACK_ZSTD_LEVEL)
        .unwrap()
        .iter()
        .map(|e| e.data.len())
        .sum();
    assert!(
        filtered < unfiltered as u64,
        "{filtered} bytes filtered, {unfiltered} not"
    );
}

#[test]
fn data_does_not_go_through_the_x86_filter() {
    let (p, _, _) = packed(16);
    assert!(p.pack.unwrap().chunks.iter().all(|c| !c.x86));
}

#[test]
fn sealing_is_deterministic() {
    let (a, blob_a, _) = packed(64);
    let (b, blob_b, _) = packed(64);
    assert_eq!(a.encode(), b.encode());
    assert_eq!(blob_a, blob_b);
}

#[test]
fn the_tag_binds_the_pack_to_the_recipe_keys_and_the_blocks() {
    let (p, _, _) = packed(16);
    let e = p.check_pack(&secret(2)).unwrap_err().to_string();
    assert!(e.contains("tag does not match"), "{e}");
    let mut moved = p.clone();
    moved.blocks[1].first = 1;
    assert!(moved.check_pack(&secret(1)).is_err());
    let mut swapped = p.clone();
    if let Some(pack) = &mut swapped.pack {
        pack.chunks.swap(0, 1);
    }
    assert!(swapped.check_pack(&secret(1)).is_err());
    // A flipped bit anywhere in the encoded profile is refused (decode or tag).
    let bytes = p.encode();
    for i in (40..bytes.len()).step_by(7) {
        let mut b = bytes.clone();
        b[i] ^= 0x10;
        if let Ok(q) = Profile::decode(&b) {
            assert!(
                q.check_pack(&secret(1)).is_err(),
                "bit flip at byte {i} accepted"
            );
        }
    }
}

#[test]
fn keys_differ_per_chunk_and_per_block_list() {
    let s = secret(1);
    let r = runs();
    assert_ne!(s.chunk_key(&r, 64, 0), s.chunk_key(&r, 64, 1));
    assert_ne!(s.chunk_key(&r, 64, 0), s.chunk_key(&r, 32, 0));
    assert_ne!(s.chunk_key(&r, 64, 0), s.chunk_key(&r[1..], 64, 0));
    assert_ne!(s.chunk_key(&r, 64, 0), secret(3).chunk_key(&r, 64, 0));
}

#[test]
fn malformed_block_lists_and_packs_are_refused() {
    let (p, _, _) = packed(16);
    let good = p.encode();
    let body_start = 8 + 32 + 1 + 3;
    let with_runs = |runs: &[(u64, u64)]| {
        let mut b = good[..body_start].to_vec();
        varint::put(&mut b, runs.len() as u64);
        for &(f, c) in runs {
            varint::put(&mut b, f);
            varint::put(&mut b, c);
        }
        b.push(0);
        b
    };
    // One block whose one pack chunk has the flags `flag`.
    let one_chunk_flagged = |flag: u8| {
        let mut b = with_runs(&[(1, 1)]);
        *b.last_mut().unwrap() = 1;
        b.extend_from_slice(&[0; 32]);
        varint::put(&mut b, 1);
        varint::put(&mut b, 1);
        b.extend_from_slice(&[5; 32]);
        varint::put(&mut b, 100);
        b.push(flag);
        b
    };
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (with_runs(&[(5, 3), (6, 1)]), "block 6 listed twice"),
        (with_runs(&[(5, 0)]), "0 blocks"),
        (with_runs(&[(u64::MAX, 2)]), "past 2^64"),
        (with_runs(&[]), "version 2 without blocks"),
        (with_runs(&[(1, 1 << 25)]), "more than"),
        (
            good[..good.len() - 1].to_vec(),
            "truncated startup pack tag",
        ),
        ([good.clone(), vec![0]].concat(), "after the last entry"),
        (
            {
                let mut b = with_runs(&[(1, 2)]);
                *b.last_mut().unwrap() = 9;
                b
            },
            "startup pack flag 9",
        ),
        (
            {
                let mut b = with_runs(&[(1, 20)]);
                *b.last_mut().unwrap() = 1;
                b.extend_from_slice(&[0; 32]);
                varint::put(&mut b, 16);
                varint::put(&mut b, 1);
                b
            },
            "1 pack chunks for 20 blocks",
        ),
        (
            {
                let mut b = with_runs(&[(1, 2)]);
                *b.last_mut().unwrap() = 1;
                b.extend_from_slice(&[0; 32]);
                varint::put(&mut b, 0);
                b
            },
            "pack piece of 0 blocks",
        ),
        (
            {
                let mut b = with_runs(&[(1, 2)]);
                *b.last_mut().unwrap() = 1;
                b.extend_from_slice(&[0; 32]);
                varint::put(&mut b, 1);
                varint::put(&mut b, 2);
                for flag in [0, 2] {
                    b.extend_from_slice(&[5; 32]);
                    varint::put(&mut b, 100);
                    b.push(flag);
                }
                b
            },
            "pack chunk 1 continues a zstd stream, but no compressed chunk is before it",
        ),
        (one_chunk_flagged(3), "pack chunk 0: flags 3"),
        (one_chunk_flagged(FLAG_X86 | 8), "pack chunk 0: flags 12"),
    ];
    for (bytes, want) in cases {
        let e = Profile::decode(&bytes).unwrap_err().to_string();
        assert!(e.contains(want), "{e:?} should mention {want:?}");
    }
}

#[test]
fn a_profile_without_blocks_stays_version_1() {
    let p = Profile::new([1; 32], vec![3, 1]);
    assert_eq!(&p.encode()[..8], b"SMRPROF1");
    p.check_pack(&secret(1)).unwrap();
}

#[test]
fn pack_spans_cut_runs_at_chunk_boundaries() {
    let runs = [
        BlockRun {
            first: 10,
            count: 3,
        },
        BlockRun { first: 2, count: 1 },
        BlockRun {
            first: 40,
            count: 5,
        },
    ];
    let span = |chunk, at, image, len| PackSpan {
        chunk,
        at: at * BLOCK,
        image: image * BLOCK,
        len: len * BLOCK,
    };
    assert_eq!(
        pack_spans(&runs, 4),
        vec![
            span(0, 0, 10, 3),
            span(0, 3, 2, 1),
            span(1, 0, 40, 4),
            span(2, 0, 44, 1),
        ]
    );
    assert!(pack_spans(&[], 4).is_empty());
}

#[test]
fn block_map_refuses_runs_past_the_image() {
    let e = BlockMap::new(&runs(), 150).unwrap_err().to_string();
    assert!(e.contains("leaves the image"), "{e}");
}

proptest! {
    #[test]
    fn block_map_agrees_with_a_linear_scan(
        starts in proptest::collection::btree_set(0u64..2000, 1..40),
        lens in proptest::collection::vec(1u32..8, 40),
        order in proptest::collection::vec(any::<u32>(), 40),
    ) {
        // Disjoint runs from sorted starts, then shuffled into "read order".
        let starts: Vec<u64> = starts.into_iter().map(|s| s * 10).collect();
        let mut runs: Vec<BlockRun> = starts
            .iter()
            .zip(&lens)
            .map(|(&first, &count)| BlockRun { first, count })
            .collect();
        let mut keyed: Vec<(u32, BlockRun)> = order.iter().copied().zip(runs.drain(..)).collect();
        keyed.sort_by_key(|k| k.0);
        let runs: Vec<BlockRun> = keyed.into_iter().map(|k| k.1).collect();
        let map = BlockMap::new(&runs, 30_000).unwrap();
        let mut expect = std::collections::HashMap::new();
        let mut pos = 0u64;
        for r in &runs {
            for b in r.first..r.first + u64::from(r.count) {
                expect.insert(b, pos);
                pos += 1;
            }
        }
        for b in 0..20_100u64 {
            prop_assert_eq!(map.locate(b), expect.get(&b).copied());
        }
    }

    #[test]
    fn pack_spans_invert_the_block_map(
        runs in proptest::collection::vec((0u64..50, 1u32..20), 0..20),
        piece in 1u32..9,
    ) {
        // Disjoint runs: 100 blocks apart.
        let runs: Vec<BlockRun> = runs
            .iter()
            .enumerate()
            .map(|(i, &(f, count))| BlockRun { first: i as u64 * 100 + f, count })
            .collect();
        let map = BlockMap::new(&runs, 4000).unwrap();
        let spans = pack_spans(&runs, piece);
        let mut covered = 0;
        for s in &spans {
            prop_assert!(s.at + s.len <= u64::from(piece) * BLOCK, "{:?} leaves its chunk", s);
            for k in 0..s.len / BLOCK {
                let pos = s.chunk * u64::from(piece) + s.at / BLOCK + k;
                prop_assert_eq!(map.locate(s.image / BLOCK + k), Some(pos));
            }
            covered += s.len / BLOCK;
        }
        prop_assert_eq!(covered, total_blocks(&runs));
    }

    #[test]
    fn any_block_list_round_trips(runs in proptest::collection::vec((0u64..1 << 40, 1u32..100), 0..20)) {
        // Make the runs disjoint by spacing them out.
        let runs: Vec<BlockRun> = runs
            .iter()
            .enumerate()
            .map(|(i, &(f, c))| BlockRun { first: (i as u64) << 41 | f, count: c })
            .collect();
        let mut p = Profile::new([3; 32], vec![1, 2]);
        p.blocks = runs;
        prop_assert_eq!(Profile::decode(&p.encode()).unwrap(), p);
    }
}
