use super::*;

fn entries(n: u64) -> Vec<ChunkEntry> {
    (0..n)
        .map(|i| ChunkEntry {
            index: i * 2 + 1,
            id: ChunkId([i as u8; 32]),
            stored_len: 1000 + i as u32,
            compressed: i % 2 == 0,
        })
        .collect()
}

fn config() -> ImageConfig {
    ImageConfig {
        architecture: "amd64".into(),
        os: "linux".into(),
        cmd: vec!["/bin/sh".into()],
        env: vec!["PATH=/bin".into()],
        ..ImageConfig::default()
    }
}

fn file_map() -> FileMap {
    FileMap::from_byte_ranges(
        &ChunkGrid::fixed(21 * 65536, 65536).unwrap(),
        18 * 65536,
        [65536..4 * 65536, 5 * 65536..5 * 65536 + 9],
    )
    .unwrap()
}

fn sample_with(encrypted: bool, map: Option<FileMap>) -> (Recipe, OwnerKey) {
    let owner = OwnerKey([3; 32]);
    let ch = entries(10);
    let keys: Vec<ChunkKey> = (0..10).map(|i| ChunkKey([i as u8 + 100; 32])).collect();
    let r = Recipe::new(
        ChunkGrid::fixed(21 * 65536, 65536).unwrap(),
        "sha256:abc".into(),
        config(),
        ch,
        map,
        encrypted.then_some((&keys[..], &owner)),
    )
    .unwrap();
    (r, owner)
}

fn sample(encrypted: bool) -> (Recipe, OwnerKey) {
    sample_with(encrypted, Some(file_map()))
}

#[test]
fn version_1_without_a_file_map_still_reads() {
    for enc in [false, true] {
        let (r, owner) = sample_with(enc, None);
        let bytes = r.encode();
        assert_eq!(bytes[8..10], 1u16.to_le_bytes());
        let back = Recipe::decode(&bytes).unwrap();
        assert_eq!(back.file_map, None);
        assert_eq!(back.encode(), bytes);
        assert_eq!(back.keys(Some(&owner)).unwrap().is_some(), enc);
    }
    let (v2, _) = sample(true);
    let bytes = v2.encode();
    assert_eq!(bytes[8..10], 2u16.to_le_bytes());
    assert_eq!(Recipe::decode(&bytes).unwrap().file_map, Some(file_map()));
}

#[test]
fn the_key_table_authenticates_the_file_map() {
    let (r, owner) = sample(true);
    let mut other = r.clone();
    other.file_map = Some(FileMap::default());
    // The chunk table and keys are the same; only the map differs, so
    // the sealed keys no longer open.
    let bytes = other.encode();
    let back = Recipe::decode(&bytes).unwrap();
    assert!(matches!(
        back.keys(Some(&owner)),
        Err(FormatError::WrongKey)
    ));
}

#[test]
fn a_file_map_beyond_the_image_is_refused() {
    let map = FileMap::from_byte_ranges(
        &ChunkGrid::fixed(1 << 40, 65536).unwrap(),
        0,
        std::iter::once(19 * 65536..23 * 65536),
    )
    .unwrap();
    let err = Recipe::new(
        ChunkGrid::fixed(21 * 65536, 65536).unwrap(),
        "sha256:abc".into(),
        config(),
        entries(10),
        Some(map),
        None,
    )
    .unwrap_err();
    assert!(err.to_string().contains("file map"), "{err}");
}

#[test]
fn roundtrip_plain_and_encrypted() {
    for enc in [false, true] {
        let (r, owner) = sample(enc);
        let bytes = r.encode();
        let back = Recipe::decode(&bytes).unwrap();
        assert_eq!(back, r);
        assert_eq!(back.encode(), bytes, "canonical");
        let keys = back.keys(Some(&owner)).unwrap();
        assert_eq!(keys.is_some(), enc);
        if let Some(k) = keys {
            assert_eq!(k[3].0, [103; 32]);
        }
    }
}

#[test]
fn sealing_is_deterministic() {
    assert_eq!(sample(true).0.encode(), sample(true).0.encode());
}

#[test]
fn wrong_or_missing_key() {
    let (r, _) = sample(true);
    assert!(matches!(r.keys(None), Err(FormatError::KeyRequired)));
    assert!(matches!(
        r.keys(Some(&OwnerKey([4; 32]))),
        Err(FormatError::WrongKey)
    ));
}

#[test]
fn tampering_detected() {
    let (r, owner) = sample(true);
    let bytes = r.encode();
    // Any flipped byte fails the checksum.
    for i in [0, 9, 20, 40, bytes.len() - 40, bytes.len() - 1] {
        let mut b = bytes.clone();
        b[i] ^= 0x40;
        assert!(Recipe::decode(&b).is_err(), "byte {i}");
    }
    // Tampering with the chunk table and fixing up the checksum fails the key table's authentication.
    let mut b = bytes.clone();
    let pos = b.len() - 32 - (12 + 10 * 32 + 16) - 5;
    b[pos] ^= 1;
    let n = b.len() - 32;
    let sum: [u8; 32] = Sha256::digest(&b[..n]).into();
    b[n..].copy_from_slice(&sum);
    let forged = Recipe::decode(&b).unwrap();
    assert!(matches!(
        forged.keys(Some(&owner)),
        Err(FormatError::WrongKey)
    ));
}

#[test]
fn truncated_and_garbage() {
    let (r, _) = sample(false);
    let bytes = r.encode();
    for n in [0, 7, 8, 30, bytes.len() - 1] {
        assert!(Recipe::decode(&bytes[..n]).is_err());
    }
    assert!(Recipe::decode(b"garbage garbage garbage garbage garbage garbage garbage").is_err());
}

#[test]
fn compact() {
    let owner = OwnerKey([1; 32]);
    let n = 32768u64; // a 16 GiB image of 512 KiB chunks
    let ch: Vec<ChunkEntry> = (0..n)
        .map(|i| ChunkEntry {
            index: i,
            id: ChunkId([1; 32]),
            stored_len: 524288,
            compressed: false,
        })
        .collect();
    let keys = vec![ChunkKey([2; 32]); n as usize];
    let r = Recipe::new(
        ChunkGrid::fixed(n << 19, 1 << 19).unwrap(),
        "sha256:x".into(),
        config(),
        ch,
        None,
        Some((&keys, &owner)),
    )
    .unwrap();
    let len = r.encode().len() as u64;
    assert!(len < 100 * n, "{len} bytes for {n} chunks");
    assert!(len < 4 << 20);
}

#[test]
fn chunk_geometry() {
    let (r, _) = sample(false);
    assert_eq!(r.chunk_count(), 21);
    assert_eq!(r.chunk_len(20), 65536);
    assert!(r.entry(0).is_none());
    assert_eq!(r.entry(1).unwrap().stored_len, 1000);
    assert!(check_chunk_size(1 << 15).is_err());
    assert!(check_chunk_size(3 << 16).is_err());
    assert!(check_chunk_size(1 << 22).is_ok());
}

proptest::proptest! {
    #[test]
    fn decode_never_panics(data: Vec<u8>) {
        let _ = Recipe::decode(&data);
    }
}

/// A variable grid of 21 chunks (lengths 4 KiB to 256 KiB, a short last).
fn variable_grid() -> ChunkGrid {
    let lens = (0..20u64)
        .map(|i| 4096 * (1 + (i * 7) % 64))
        .chain(std::iter::once(1000));
    ChunkGrid::variable(65536, crate::CdcSizes::default(), lens).unwrap()
}

#[test]
fn variable_grid_recipes_round_trip_as_version_3() {
    let grid = variable_grid();
    for (encrypted, map) in [(false, None), (true, None), (true, Some(()))] {
        let map = map.map(|()| {
            FileMap::from_byte_ranges(
                &grid,
                grid.start(9),
                std::iter::once(grid.start(2)..grid.start(5)),
            )
            .unwrap()
        });
        let owner = OwnerKey([5; 32]);
        let ch = entries(10);
        let keys: Vec<ChunkKey> = (0..ch.len()).map(|i| ChunkKey([i as u8; 32])).collect();
        let r = Recipe::new(
            grid.clone(),
            "sha256:v".into(),
            config(),
            ch,
            map.clone(),
            encrypted.then_some((&keys[..], &owner)),
        )
        .unwrap();
        let bytes = r.encode();
        assert_eq!(u16::from_le_bytes([bytes[8], bytes[9]]), 3);
        let back = Recipe::decode(&bytes).unwrap();
        assert_eq!(back, r);
        assert_eq!(back.grid(), &grid);
        assert_eq!(back.file_map, map);
        assert_eq!(back.chunk_len(1), grid.len(1));
        assert_eq!(back.chunk_of(grid.start(7) + 5), 7);
        if encrypted {
            assert_eq!(back.keys(Some(&owner)).unwrap().unwrap(), keys);
        }
    }
}

#[test]
fn a_variable_grid_shorter_than_the_chunk_table_is_refused() {
    // Chunk 11 is listed, but a grid of 5 chunks has no chunk 11.
    let grid = ChunkGrid::variable(65536, crate::CdcSizes::default(), [4096; 5]).unwrap();
    let err = Recipe::new(grid, "sha256:v".into(), config(), entries(10), None, None).unwrap_err();
    assert!(err.to_string().contains("out of range"), "{err}");
}

#[test]
fn groups_of_files_are_flagged_and_read_back() {
    let grid = ChunkGrid::fixed(21 * 65536, 65536).unwrap();
    let map = FileMap::with_groups(
        &grid,
        18 * 65536,
        std::iter::once(65536..4 * 65536),
        [65536..5 * 65536 + 9, 6 * 65536..9 * 65536],
    )
    .unwrap();
    for enc in [false, true] {
        let (r, owner) = sample_with(enc, Some(map.clone()));
        let bytes = r.encode();
        assert_eq!(
            bytes[8..10],
            2u16.to_le_bytes(),
            "a fixed grid stays version 2"
        );
        assert_eq!(bytes[11] & FLAG_GROUPS, FLAG_GROUPS);
        let back = Recipe::decode(&bytes).unwrap();
        assert_eq!(back.file_map.as_ref(), Some(&map));
        assert_eq!(back.keys(Some(&owner)).unwrap().is_some(), enc);
    }
    // Without groups the flag is clear (the bytes of older recipes).
    let (plain, _) = sample(false);
    assert_eq!(plain.encode()[11] & FLAG_GROUPS, 0);
    // The flag on a recipe without a file map is refused.
    let (v1, _) = sample_with(false, None);
    let mut bytes = v1.encode();
    bytes[11] |= FLAG_GROUPS;
    let body = bytes.len() - 32;
    let sum: [u8; 32] = Sha256::digest(&bytes[..body]).into();
    bytes[body..].copy_from_slice(&sum);
    let err = Recipe::decode(&bytes).unwrap_err();
    assert!(err.to_string().contains("flags"), "{err}");
}

#[test]
fn a_fixed_recipe_claiming_version_3_is_refused() {
    let (r, _) = sample_with(false, Some(file_map()));
    let mut bytes = r.encode();
    bytes[8] = 3;
    let body = bytes.len() - 32;
    let sum: [u8; 32] = Sha256::digest(&bytes[..body]).into();
    bytes[body..].copy_from_slice(&sum);
    let err = Recipe::decode(&bytes).unwrap_err();
    assert!(err.to_string().contains("flags"), "{err}");
}

proptest::proptest! {
    /// A version 3 recipe with a byte changed and its checksum made right
    /// again (what a careless or hostile writer could produce) decodes to
    /// a recipe whose grid and chunk table agree, or is refused; never a
    /// panic.
    #[test]
    fn a_changed_version_3_recipe_is_refused_or_consistent(at in 0usize..4096, bit in 0u8..8) {
        let grid = variable_grid();
        let map = FileMap::from_byte_ranges(&grid, grid.start(9), std::iter::once(grid.start(2)..grid.start(5))).unwrap();
        let r = Recipe::new(grid, "sha256:v".into(), config(), entries(10), Some(map), None).unwrap();
        let mut bytes = r.encode();
        let body = bytes.len() - 32;
        let i = at % body;
        bytes[i] ^= 1 << bit;
        let sum: [u8; 32] = Sha256::digest(&bytes[..body]).into();
        bytes[body..].copy_from_slice(&sum);
        if let Ok(back) = Recipe::decode(&bytes) {
            let g = back.grid();
            proptest::prop_assert_eq!(g.size(), back.image_size);
            proptest::prop_assert!(back.chunks.iter().all(|e| e.index < g.count()));
            proptest::prop_assert!((0..g.count()).all(|c| g.len(c) >= 1 && g.len(c) <= crate::recipe::MAX_CHUNK_SIZE));
        }
    }
}
