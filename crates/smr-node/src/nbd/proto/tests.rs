use super::*;
use proptest::prelude::*;

fn info_bytes(name: &[u8], items: &[u16]) -> Vec<u8> {
    let mut v = (name.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(name);
    v.extend_from_slice(&(items.len() as u16).to_be_bytes());
    for i in items {
        v.extend_from_slice(&i.to_be_bytes());
    }
    v
}

#[test]
fn info_request_round_trip_and_truncation() {
    let b = info_bytes(b"root", &[INFO_NAME, INFO_BLOCK_SIZE]);
    let r = parse_info_request(&b).expect("valid");
    assert_eq!(r.name, b"root");
    assert_eq!(r.items, vec![INFO_NAME, INFO_BLOCK_SIZE]);
    for cut in 0..b.len() {
        assert!(parse_info_request(&b[..cut]).is_err(), "cut at {cut}");
    }
    let mut long = b.clone();
    long.push(0);
    assert!(parse_info_request(&long).is_err());
}

#[test]
fn meta_context_rejects_huge_counts_without_allocating() {
    let mut b = 0u32.to_be_bytes().to_vec();
    b.extend_from_slice(&u32::MAX.to_be_bytes());
    assert!(parse_meta_context_request(&b).is_err());
    let mut b = 0u32.to_be_bytes().to_vec();
    b.extend_from_slice(&1u32.to_be_bytes());
    b.extend_from_slice(&(BASE_ALLOCATION.len() as u32).to_be_bytes());
    b.extend_from_slice(BASE_ALLOCATION);
    let r = parse_meta_context_request(&b).expect("valid");
    assert_eq!(r.queries, vec![BASE_ALLOCATION]);
}

#[test]
fn string_longer_than_spec_limit_is_rejected() {
    let name = vec![b'a'; MAX_STRING_LEN + 1];
    assert!(parse_info_request(&info_bytes(&name, &[])).is_err());
}

const LIM: Limits = Limits {
    size: 1 << 20,
    read_only: true,
    structured: true,
    block_status: true,
};

fn req(kind: u16, flags: u16, offset: u64, len: u32) -> Request {
    Request {
        flags,
        kind,
        cookie: 7,
        offset,
        len,
    }
}

#[test]
fn validation_error_codes() {
    let e = |r: &Request| validate(r, &LIM).err().map(|x| (x.errno, x.skip));
    assert_eq!(e(&req(CMD_READ, 0, 0, 0)), Some((EINVAL, 0)));
    assert_eq!(
        e(&req(CMD_READ, 0, 0, MAX_BLOCK_SIZE + 1)),
        Some((EOVERFLOW, 0))
    );
    assert_eq!(e(&req(CMD_READ, 0, (1 << 20) - 1, 2)), Some((EINVAL, 0)));
    assert_eq!(e(&req(CMD_READ, 0, u64::MAX, 1)), Some((EINVAL, 0)));
    assert_eq!(e(&req(CMD_READ, 1 << 9, 0, 1)), Some((EINVAL, 0)));
    assert_eq!(e(&req(CMD_WRITE, 0, 0, 100)), Some((EPERM, 100)));
    assert_eq!(e(&req(CMD_TRIM, 0, 0, 100)), Some((EPERM, 0)));
    assert_eq!(e(&req(CMD_WRITE_ZEROES, 0, 0, 100)), Some((EPERM, 0)));
    assert_eq!(e(&req(99, 0, 0, 0)), Some((EINVAL, 0)));
    assert_eq!(e(&req(CMD_BLOCK_STATUS, 0, 0, 0)), Some((EINVAL, 0)));
    let rw = Limits {
        read_only: false,
        ..LIM
    };
    let w = validate(&req(CMD_WRITE, 0, 1 << 20, 1), &rw).err();
    assert_eq!(
        w,
        Some(Rejected {
            errno: ENOSPC,
            skip: 1
        })
    );
    let no_meta = Limits {
        block_status: false,
        ..LIM
    };
    assert!(validate(&req(CMD_BLOCK_STATUS, 0, 0, 1), &no_meta).is_err());
    let simple = Limits {
        structured: false,
        ..LIM
    };
    assert!(validate(&req(CMD_READ, CMD_FLAG_DF, 0, 1), &simple).is_err());
    assert_eq!(
        validate(&req(CMD_READ, CMD_FLAG_DF, 10, 5), &LIM),
        Ok(Command::Read {
            offset: 10,
            len: 5,
            df: true
        })
    );
}

#[test]
fn extents_merge_clip_and_cap() {
    let runs = [(10, false), (0, true), (5, false), (100, true), (7, false)];
    assert_eq!(
        extents_from_runs(&runs, 50, 16),
        vec![(15, 0), (35, STATE_HOLE | STATE_ZERO)]
    );
    assert_eq!(extents_from_runs(&runs, 50, 1), vec![(15, 0)]);
    assert_eq!(extents_from_runs(&[], 9, 16), vec![(9, 0)]);
    assert_eq!(extents_from_runs(&[(u64::MAX, true)], 9, 16), vec![(9, 3)]);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4096))]

    #[test]
    fn parsers_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = parse_info_request(&data);
        let _ = parse_meta_context_request(&data);
        if data.len() >= REQUEST_LEN {
            let mut h = [0u8; REQUEST_LEN];
            h.copy_from_slice(&data[..REQUEST_LEN]);
            if let Ok(r) = Request::parse(&h) {
                prop_assert_eq!(r.encode(), h);
                let _ = validate(&r, &LIM);
            }
        }
    }

    #[test]
    fn validated_ranges_are_in_bounds(kind in 0u16..10, flags in any::<u16>(),
                                      offset in any::<u64>(), len in any::<u32>(),
                                      ro in any::<bool>(), st in any::<bool>()) {
        let lim = Limits { read_only: ro, structured: st, ..LIM };
        let r = req(kind, flags, offset, len);
        match validate(&r, &lim) {
            Ok(Command::Read { offset, len, .. })
            | Ok(Command::Write { offset, len, .. })
            | Ok(Command::Trim { offset, len, .. })
            | Ok(Command::WriteZeroes { offset, len, .. })
            | Ok(Command::Cache { offset, len })
            | Ok(Command::BlockStatus { offset, len, .. }) => {
                prop_assert!(offset + u64::from(len) <= lim.size);
                prop_assert!(len <= MAX_BLOCK_SIZE || kind == CMD_CACHE);
            }
            Ok(_) => {}
            Err(rej) => prop_assert_eq!(rej.skip, payload_len(&r)),
        }
    }

    #[test]
    fn extents_cover_at_most_len(runs in proptest::collection::vec((any::<u64>(), any::<bool>()), 0..40),
                                 len in 1u32.., max in 1usize..8) {
        let ex = extents_from_runs(&runs, len, max);
        prop_assert!(!ex.is_empty() && ex.len() <= max);
        let total: u64 = ex.iter().map(|e| u64::from(e.0)).sum();
        prop_assert!(total <= u64::from(len));
        prop_assert!(ex.iter().all(|e| e.0 > 0));
    }
}
