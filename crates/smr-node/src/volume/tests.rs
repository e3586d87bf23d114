use super::*;
use proptest::prelude::*;

/// A base image in memory (the lazy image's stand-in: the volume only
/// reads it).
struct MemBase(Vec<u8>);

impl BlockDevice for MemBase {
    fn size(&self) -> u64 {
        self.0.len() as u64
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let o = offset as usize;
        buf.copy_from_slice(&self.0[o..o + buf.len()]);
        Ok(())
    }
}

fn base_bytes(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 4096) as u8).collect()
}

fn volume(dir: &Path, base: &[u8]) -> Volume {
    if !dir.join("cow").exists() {
        Volume::create(dir, base.len() as u64).unwrap();
    }
    Volume::open(dir, Arc::new(MemBase(base.to_vec()))).unwrap()
}

fn read_all(v: &Volume) -> Vec<u8> {
    let mut out = vec![0u8; v.size() as usize];
    v.read_at(0, &mut out).unwrap();
    out
}

#[test]
fn reads_come_from_the_base_until_written() {
    let d = tempfile::tempdir().unwrap();
    let base = base_bytes(5 * 4096 + 100);
    let v = volume(d.path(), &base);
    assert_eq!(read_all(&v), base);
    let mut model = base.clone();
    for (at, len, byte) in [
        (10u64, 20usize, 1u8),
        (4090, 10, 2),
        (8192, 8192, 3),
        (5 * 4096 + 50, 50, 4),
    ] {
        v.write_at(at, &vec![byte; len]).unwrap();
        model[at as usize..at as usize + len].fill(byte);
    }
    assert_eq!(read_all(&v), model);
    let m = v.map();
    // Blocks 0, 1 (partial writes, copied from the base), 2, 3, 5 (the
    // short last block).
    assert_eq!(m.mapped(), 5);
    assert!(!m.get(4));
}

#[test]
fn flushed_writes_survive_and_unflushed_ones_never_half_appear() {
    let d = tempfile::tempdir().unwrap();
    let base = base_bytes(8 * 4096);
    let mut model = base.clone();
    {
        let v = volume(d.path(), &base);
        v.write_at(4096, &[9; 4096]).unwrap();
        v.flush().unwrap();
        model[4096..8192].fill(9);
        // Written after the flush, then the process dies.
        v.write_at(3 * 4096, &[7; 4096]).unwrap();
    }
    let v = volume(d.path(), &base);
    assert_eq!(
        read_all(&v),
        model,
        "the unflushed block reads from the base"
    );
    assert_eq!(v.map().mapped(), 1);
}

#[test]
fn sector_writes_to_one_block_from_many_threads_all_land() {
    let d = tempfile::tempdir().unwrap();
    let base = base_bytes(4 * 4096);
    let v = Arc::new(volume(d.path(), &base));
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let v = v.clone();
            std::thread::spawn(move || {
                for block in 0..4u64 {
                    v.write_at(block * 4096 + t * 512, &[t as u8 + 1; 512])
                        .unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let all = read_all(&v);
    for block in 0..4usize {
        for t in 0..8usize {
            let at = block * 4096 + t * 512;
            assert!(
                all[at..at + 512].iter().all(|&b| b == t as u8 + 1),
                "block {block} sector {t}"
            );
        }
    }
}

#[test]
fn zeroing_punches_whole_blocks_and_writes_pieces() {
    let d = tempfile::tempdir().unwrap();
    let base = base_bytes(64 * 4096);
    let v = volume(d.path(), &base);
    v.write_at(0, &vec![5; 64 * 4096]).unwrap();
    v.flush().unwrap();
    let before = std::fs::metadata(d.path().join("cow")).unwrap();
    v.write_zeroes(100, 40 * 4096).unwrap();
    v.trim(50 * 4096, 4096).unwrap();
    let mut model = vec![5u8; 64 * 4096];
    model[100..100 + 40 * 4096].fill(0);
    model[50 * 4096..51 * 4096].fill(0);
    assert_eq!(read_all(&v), model);
    let after = std::fs::metadata(d.path().join("cow")).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert!(after.blocks() < before.blocks(), "holes were punched");
}

#[test]
fn a_volume_in_use_a_wrong_cow_and_a_damaged_map_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let base = base_bytes(4 * 4096);
    let v = volume(d.path(), &base);
    let again = Volume::open(d.path(), Arc::new(MemBase(base.clone())));
    assert!(matches!(again, Err(VolumeError::InUse(_))));
    drop(v);
    let bigger = Volume::open(d.path(), Arc::new(MemBase(base_bytes(5 * 4096))))
        .err()
        .unwrap();
    assert!(
        bigger
            .to_string()
            .contains("the COW file is 16384 bytes, less than the base image's 20480"),
        "{bigger}"
    );
    let mut map = std::fs::read(d.path().join("map")).unwrap();
    *map.last_mut().unwrap() ^= 0x80;
    std::fs::write(d.path().join("map"), map).unwrap();
    let e = Volume::open(d.path(), Arc::new(MemBase(base)))
        .err()
        .unwrap();
    assert!(
        e.to_string().contains("map") && e.to_string().contains("checksum"),
        "{e}"
    );
    assert!(
        Volume::create(d.path(), 4096).is_err(),
        "an existing volume is not replaced"
    );
}

#[derive(Debug, Clone)]
enum Op {
    Write(u64, usize, u8),
    Zero(u64, u64),
    Flush,
}

fn op(size: u64) -> impl Strategy<Value = Op> {
    prop_oneof![
        (0..size, 1usize..9000, any::<u8>())
            .prop_map(move |(at, len, b)| { Op::Write(at, len.min((size - at) as usize), b) }),
        (0..size, 1u64..20000).prop_map(move |(at, len)| Op::Zero(at, len.min(size - at))),
        Just(Op::Flush),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn reads_match_a_model_through_reopens(ops in proptest::collection::vec(op(10 * 4096 + 777), 1..24)) {
        let d = tempfile::tempdir().unwrap();
        let base = base_bytes(10 * 4096 + 777);
        let mut model = base.clone();
        let mut v = volume(d.path(), &base);
        for op in ops {
            match op {
                Op::Write(at, len, b) => {
                    v.write_at(at, &vec![b; len]).unwrap();
                    model[at as usize..at as usize + len].fill(b);
                }
                Op::Zero(at, len) => {
                    v.write_zeroes(at, len).unwrap();
                    model[at as usize..(at + len) as usize].fill(0);
                }
                Op::Flush => {
                    v.flush().unwrap();
                    drop(v);
                    v = volume(d.path(), &base);
                }
            }
            prop_assert_eq!(&read_all(&v), &model);
        }
        v.flush().unwrap();
        drop(v);
        prop_assert_eq!(read_all(&volume(d.path(), &base)), model);
    }
}

#[test]
fn a_volume_larger_than_its_base_reads_zeros_past_it() {
    let d = tempfile::tempdir().unwrap();
    let base = base_bytes(3 * 4096);
    Volume::create(d.path(), 8 * 4096).unwrap();
    let v = Volume::open(d.path(), Arc::new(MemBase(base.clone()))).unwrap();
    assert_eq!(v.size(), 8 * 4096);
    let mut model = base.clone();
    model.resize(8 * 4096, 0);
    assert_eq!(read_all(&v), model);
    // A write straddling the base's end, and one past it.
    v.write_at(3 * 4096 - 100, &[7; 200]).unwrap();
    v.write_at(6 * 4096 + 10, &[9; 10]).unwrap();
    model[3 * 4096 - 100..3 * 4096 + 100].fill(7);
    model[6 * 4096 + 10..6 * 4096 + 20].fill(9);
    assert_eq!(read_all(&v), model);
    v.flush().unwrap();
    drop(v);
    let v = Volume::open(d.path(), Arc::new(MemBase(base))).unwrap();
    assert_eq!(read_all(&v), model);
}
