use super::index::{MAGIC, VERSION};
use super::*;
use crate::artifact::digest_of;
use sha2::{Digest, Sha256};

/// Deterministic pseudo-random chunk ids: `tag` keeps sequences apart.
fn ids(tag: &str, n: usize) -> Vec<ChunkId> {
    (0..n)
        .map(|i| ChunkId::of(format!("{tag}-{i}").as_bytes()))
        .collect()
}

#[test]
fn plans_are_deterministic_and_cover_each_chunk_once() {
    let mut seq = ids("a", 500);
    // Duplicates: the first occurrence decides the pack.
    seq.extend(ids("a", 50));
    let p = PackParams::with_target(8);
    let a = plan(&p, &seq).unwrap();
    assert_eq!(a, plan(&p, &seq).unwrap());
    let flat: Vec<ChunkId> = a.concat();
    assert_eq!(flat, ids("a", 500));
}

#[test]
fn packs_respect_bounds_and_average_the_target() {
    let seq = ids("b", 20_000);
    for target in [2u32, 8, 64] {
        let p = PackParams::with_target(target);
        let packs = plan(&p, &seq).unwrap();
        let (last, full) = packs.split_last().unwrap();
        assert!(!last.is_empty() && last.len() <= p.max as usize);
        for pack in full {
            let n = pack.len() as u32;
            assert!(n >= p.min && n <= p.max, "target {target}: pack of {n}");
            let end = pack.last().unwrap();
            assert!(n == p.max || id_mod(end, target) == 0);
        }
        let mean = seq.len() as f64 / packs.len() as f64;
        let t = f64::from(target);
        assert!(
            mean > t * 0.6 && mean < t * 1.6,
            "target {target}: mean {mean}"
        );
    }
}

#[test]
fn target_one_is_one_pack_per_chunk() {
    let seq = ids("c", 100);
    let packs = plan(&PackParams::with_target(1), &seq).unwrap();
    assert_eq!(packs.len(), 100);
    assert!(packs.iter().zip(&seq).all(|(p, id)| p == &[*id]));
}

#[test]
fn id_mod_reads_the_id_as_a_big_endian_integer() {
    let mut id = ChunkId([0; 32]);
    id.0[31] = 10;
    id.0[30] = 1; // 266
    assert_eq!(id_mod(&id, 7), 266 % 7);
    assert_eq!(id_mod(&id, 1), 0);
    let max = ChunkId([0xff; 32]);
    // 2^256 - 1 ≡ 0 mod 3 (2^2 ≡ 1 mod 3, so 2^256 ≡ 1).
    assert_eq!(id_mod(&max, 3), 0);
}

#[test]
fn bad_params_are_rejected() {
    for p in [
        PackParams {
            target: 4,
            min: 0,
            max: 8,
        },
        PackParams {
            target: 4,
            min: 5,
            max: 8,
        },
        PackParams {
            target: 4,
            min: 1,
            max: 3,
        },
        PackParams {
            target: 4,
            min: 1,
            max: MAX_CHUNKS_PER_PACK + 1,
        },
        PackParams::with_target(MAX_CHUNKS_PER_PACK + 1),
    ] {
        let err = plan(&p, &ids("d", 3)).unwrap_err();
        assert!(err.to_string().contains("bad pack parameters"), "{err}");
    }
    assert_eq!(PackParams::for_chunk_size(512 << 10).target, 8);
    assert_eq!(PackParams::for_chunk_size(64 << 10).target, 64);
    let grid = |sizes: &str| {
        smr_format::ChunkGrid::variable(64 << 10, sizes.parse().unwrap(), [4096]).unwrap()
    };
    let recipe = |grid| {
        smr_format::Recipe::new(
            grid,
            "sha256:x".into(),
            Default::default(),
            vec![],
            None,
            None,
        )
        .unwrap()
    };
    assert_eq!(
        PackParams::for_recipe(&recipe(grid("8K:32K:128K"))).target,
        128
    );
    assert_eq!(
        PackParams::for_recipe(&recipe(grid("16K:64K:256K"))).target,
        64
    );
    let fixed = smr_format::ChunkGrid::fixed(1 << 20, 512 << 10).unwrap();
    assert_eq!(PackParams::for_recipe(&recipe(fixed)).target, 8);
    assert_eq!(
        PackParams::for_chunk_size(4 << 20),
        PackParams::with_target(1)
    );
}

/// Chunk ids of `packs` that sit in a pack identical in both plans.
fn shared_in_identical_packs(a: &[Vec<ChunkId>], b: &[Vec<ChunkId>]) -> usize {
    let bs: HashSet<&Vec<ChunkId>> = b.iter().collect();
    a.iter().filter(|p| bs.contains(p)).map(Vec::len).sum()
}

#[test]
fn a_shared_base_and_a_shared_suffix_give_identical_packs() {
    let (base, tail) = (ids("base", 600), ids("tail", 600));
    let a: Vec<ChunkId> = [base.clone(), ids("only-a", 80), tail.clone()].concat();
    let b: Vec<ChunkId> = [base.clone(), ids("only-b", 130), tail.clone()].concat();
    let p = PackParams::with_target(8);
    let (pa, pb) = (plan(&p, &a).unwrap(), plan(&p, &b).unwrap());
    // Every pack that ends inside the shared base is identical in both.
    let mut seen = 0;
    for (x, y) in pa.iter().zip(&pb) {
        seen += x.len();
        if seen > base.len() {
            break;
        }
        assert_eq!(x, y);
    }
    // Only the packs around the two junctions differ: at most 2 × max
    // chunks of each shared run are lost.
    let shared = shared_in_identical_packs(&pa, &pb);
    let lost = base.len() + tail.len() - shared;
    assert!(lost <= 4 * p.max as usize, "lost {lost} shared chunks");
    assert!(shared > 1000, "shared {shared}");
}

fn chunk(tag: &str, i: usize, len: usize) -> (ChunkId, Vec<u8>) {
    let bytes: Vec<u8> = format!("{tag}:{i}:").bytes().cycle().take(len).collect();
    (ChunkId::of(&bytes), bytes)
}

/// An index over real bytes: packs of `sizes.len()` chunks each.
fn sample_index(sizes: &[usize]) -> PackIndex {
    let mut packs = Vec::new();
    let mut n = 0;
    for &count in sizes {
        let mut data = Vec::new();
        let mut chunks = Vec::new();
        for _ in 0..count {
            let (id, bytes) = chunk("s", n, 100 + n * 7);
            n += 1;
            chunks.push(IndexedChunk {
                id,
                len: bytes.len() as u32,
            });
            data.extend_from_slice(&bytes);
        }
        packs.push(IndexedPack {
            digest: digest_of(&data),
            chunks,
        });
    }
    PackIndex::new(PackParams::with_target(4), packs).unwrap()
}

#[test]
fn index_round_trips_and_locates_chunks() {
    let idx = sample_index(&[3, 1, 5]);
    let bytes = idx.encode();
    assert_eq!(&bytes[..8], MAGIC);
    let back = PackIndex::decode(&bytes).unwrap();
    assert_eq!(back, idx);
    assert_eq!(back.encode(), bytes);
    let stats = back.stats();
    assert_eq!((stats.packs, stats.chunks), (3, 9));
    assert_eq!(
        stats.bytes,
        back.packs().iter().map(IndexedPack::size).sum::<u64>()
    );
    // Offsets are running sums of the lengths in each pack.
    for (p, pack) in back.packs().iter().enumerate() {
        let mut offset = 0;
        for c in &pack.chunks {
            let loc = back.locate(&c.id).unwrap();
            assert_eq!((loc.pack, loc.offset, loc.len), (p, offset, c.len));
            offset += u64::from(c.len);
        }
    }
    assert_eq!(back.locate(&ChunkId([7; 32])), None);
    // The single-chunk pack is named by its chunk.
    let single = &back.packs()[1];
    assert_eq!(single.digest, format!("sha256:{}", single.chunks[0].id));
    // About 35 bytes per chunk.
    assert!(bytes.len() < 64 + 3 * 34 + 9 * 35, "{} bytes", bytes.len());
}

/// A pack as `(digest, [(stored length, chunk id)])`, unchecked.
type RawPack = ([u8; 32], Vec<(u64, [u8; 32])>);

/// Encodes without any checking (to build malformed indexes).
fn raw(params: [u64; 3], packs: &[RawPack]) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(&VERSION.to_le_bytes());
    for v in params {
        index_tests_varint(&mut out, v);
    }
    index_tests_varint(&mut out, packs.len() as u64);
    for (digest, chunks) in packs {
        out.extend_from_slice(digest);
        index_tests_varint(&mut out, chunks.len() as u64);
        for (len, id) in chunks {
            index_tests_varint(&mut out, *len);
            out.extend_from_slice(id);
        }
    }
    seal(out)
}

fn seal(mut body: Vec<u8>) -> Vec<u8> {
    let sum = Sha256::digest(&body);
    body.extend_from_slice(&sum);
    body
}

fn index_tests_varint(out: &mut Vec<u8>, v: u64) {
    smr_format::varint::put(out, v);
}

fn decode_err(bytes: &[u8]) -> String {
    PackIndex::decode(bytes).unwrap_err().to_string()
}

#[test]
fn malformed_indexes_are_rejected_with_clear_errors() {
    let good = sample_index(&[2, 2]).encode();
    let (a, b) = ([1u8; 32], [2u8; 32]);
    let p = [4, 1, 16];

    let mut bad = good.clone();
    bad[0] = b'X';
    assert!(decode_err(&bad).contains("bad magic"));

    let mut v2 = good.clone();
    v2[8] = 2;
    assert!(decode_err(&v2).contains("unsupported pack index version 2"));

    for cut in 0..good.len() {
        let err = PackIndex::decode(&good[..cut]).unwrap_err();
        assert!(
            matches!(
                err,
                PackError::Truncated { .. } | PackError::Checksum | PackError::Count { .. }
            ),
            "cut at {cut}: {err}"
        );
    }
    let mut flipped = good.clone();
    let last = flipped.len() - 40;
    flipped[last] ^= 1;
    assert!(decode_err(&flipped).contains("checksum mismatch"));

    let mut trailing = good[..good.len() - 32].to_vec();
    trailing.push(0);
    assert!(decode_err(&seal(trailing)).contains("1 unexpected bytes"));

    let dup = raw(
        p,
        &[
            (a, vec![(5, [9; 32]), (5, [8; 32])]),
            (b, vec![(5, [9; 32]), (5, [7; 32])]),
        ],
    );
    let err = decode_err(&dup);
    assert!(
        err.contains(&format!("chunk {} is listed twice", ChunkId([9; 32]))),
        "{err}"
    );

    let dup_pack = raw(
        p,
        &[
            (a, vec![(5, [9; 32]), (5, [8; 32])]),
            (a, vec![(5, [6; 32]), (5, [7; 32])]),
        ],
    );
    assert!(decode_err(&dup_pack).contains("is listed twice"));

    let empty = raw(p, &[(a, vec![])]);
    assert!(decode_err(&empty).contains(&format!("pack sha256:{} has no chunks", hex::encode(a))));

    let zero = raw(p, &[(a, vec![(0, [9; 32]), (5, [8; 32])])]);
    assert!(decode_err(&zero).contains("has length 0"));

    let single = raw(p, &[(a, vec![(5, [9; 32])])]);
    assert!(decode_err(&single).contains("holds only chunk"));
    let single_ok = raw(p, &[([9; 32], vec![(5, [9; 32])])]);
    assert!(PackIndex::decode(&single_ok).is_ok());

    let params = raw([4, 5, 16], &[]);
    assert!(decode_err(&params).contains("bad pack parameters"));

    let mut huge = MAGIC.to_vec();
    huge.extend_from_slice(&VERSION.to_le_bytes());
    huge.extend_from_slice(&[4, 1, 16]);
    index_tests_varint(&mut huge, u64::MAX);
    assert!(decode_err(&seal(huge)).contains("does not fit in the remaining"));

    let mut overlong = MAGIC.to_vec();
    overlong.extend_from_slice(&VERSION.to_le_bytes());
    overlong.extend_from_slice(&[0x84, 0x00, 1, 16, 0]);
    assert!(decode_err(&seal(overlong)).contains("overlong"));

    let big_len = raw(p, &[(a, vec![(1 << 32, [9; 32]), (5, [8; 32])])]);
    assert!(decode_err(&big_len).contains("does not fit 32 bits"));
}

#[test]
fn new_rejects_bad_digests() {
    let pack = IndexedPack {
        digest: "sha256:xyz".into(),
        chunks: vec![IndexedChunk {
            id: ChunkId([1; 32]),
            len: 3,
        }],
    };
    let err = PackIndex::new(PackParams::with_target(2), vec![pack]).unwrap_err();
    assert!(err.to_string().contains("bad pack digest `sha256:xyz`"));
}
