use super::*;
use crate::artifact::digest_of;
use crate::pack::{IndexedChunk, IndexedPack, PackParams};
use crate::testing::DirBlobs;
use std::sync::atomic::Ordering::Relaxed;
use std::thread;
use std::time::{Duration, Instant};

struct Fixture {
    _dir: tempfile::TempDir,
    blobs: Arc<DirBlobs>,
    index: Arc<PackIndex>,
    /// `chunks[pack][i] = (id, bytes)`.
    chunks: Vec<Vec<(ChunkId, Vec<u8>)>>,
}

/// Packs of `sizes[p]` chunks of about 10 KiB each, pushed to a directory.
fn fixture(sizes: &[usize]) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let blobs = Arc::new(DirBlobs::new(dir.path(), false));
    let mut packs = Vec::new();
    let mut chunks = Vec::new();
    for (p, &n) in sizes.iter().enumerate() {
        let mut data = Vec::new();
        let mut list = Vec::new();
        for i in 0..n {
            let bytes: Vec<u8> = (0..10_000 + i * 100)
                .map(|b| (b * 31 + p * 7 + i) as u8)
                .collect();
            data.extend_from_slice(&bytes);
            list.push((ChunkId::of(&bytes), bytes));
        }
        let digest = digest_of(&data);
        blobs.push_blob(&digest, &data).unwrap();
        packs.push(IndexedPack {
            digest,
            chunks: list
                .iter()
                .map(|(id, b)| IndexedChunk {
                    id: *id,
                    len: b.len() as u32,
                })
                .collect(),
        });
        chunks.push(list);
    }
    let index = Arc::new(PackIndex::new(PackParams::with_target(4), packs).unwrap());
    Fixture {
        _dir: dir,
        blobs,
        index,
        chunks,
    }
}

impl Fixture {
    fn store(&self, opts: RemoteOptions) -> Arc<RegistryStore> {
        Arc::new(RegistryStore::new(
            self.blobs.clone(),
            self.index.clone(),
            opts,
        ))
    }

    fn pack(&self, p: usize) -> String {
        self.index.packs()[p].digest.clone()
    }
}

fn with_deadline(deadline_ms: u64) -> RemoteOptions {
    RemoteOptions::default().with_deadline(Duration::from_millis(deadline_ms))
}

#[test]
fn chunks_are_ranges_of_their_pack_read_in_one_call() {
    let fx = fixture(&[3, 5]);
    let store = fx.store(RemoteOptions::default());
    let (id, bytes) = &fx.chunks[1][2];
    let extent = store.locate(id).unwrap();
    assert_eq!(extent.object.as_str(), fx.pack(1));
    assert_eq!(extent.range.len, Some(bytes.len() as u64));
    // Two ranges of one pack: one call, a request per range.
    let next = store.locate(&fx.chunks[1][3].0).unwrap();
    let got = store
        .read_ranges(&extent.object, &[extent.range, next.range])
        .unwrap();
    assert_eq!(got, vec![bytes.clone(), fx.chunks[1][3].1.clone()]);
    assert_eq!(fx.blobs.range_requests.load(Relaxed), 2);
    // A range past the pack's end is an error naming the pack.
    let past = smr_store::ByteRange::new(1 << 30, 10);
    let err = store.read_ranges(&extent.object, &[past]).unwrap_err();
    assert!(err.to_string().contains(&fx.pack(1)), "{err}");
}

#[test]
fn transient_failures_are_retried_until_the_store_comes_back() {
    let fx = fixture(&[4]);
    fx.blobs.fail_ranges(&fx.pack(0));
    let store = fx.store(with_deadline(20_000));
    let id = fx.chunks[0][1].0;
    let reader = {
        let store = store.clone();
        thread::spawn(move || store.get(&id))
    };
    // The reader blocks, retrying, while the "registry" is down.
    thread::sleep(Duration::from_millis(400));
    assert!(!reader.is_finished());
    let tries = fx.blobs.range_requests.load(Relaxed);
    assert!(tries >= 2, "{tries} tries in 400 ms");
    fx.blobs.heal_ranges(&fx.pack(0));
    assert_eq!(reader.join().unwrap().unwrap(), fx.chunks[0][1].1);
}

#[test]
fn missing_chunks_are_not_retried() {
    let fx = fixture(&[2]);
    let store = fx.store(with_deadline(20_000));
    std::fs::remove_dir_all(fx._dir.path().join("blobs")).ok();
    let err = store.get(&fx.chunks[0][0].0).unwrap_err();
    assert!(!matches!(err, StoreError::GaveUp { .. }), "{err}");
    assert_eq!(fx.blobs.range_requests.load(Relaxed), 1);
}

#[test]
fn unknown_chunks_are_missing_and_puts_are_refused() {
    let fx = fixture(&[2]);
    let store = fx.store(RemoteOptions::default());
    let unknown = ChunkId([3; 32]);
    assert!(matches!(
        store.get(&unknown),
        Err(StoreError::Missing { what, .. }) if what == Target::Chunk(unknown)
    ));
    assert!(!store.exists(&unknown).unwrap());
    let (id, bytes) = &fx.chunks[0][1];
    assert!(store.exists(id).unwrap());
    let err = store.put(id, bytes).unwrap_err().to_string();
    assert!(
        err.contains("read-only") && err.contains(&id.to_hex()),
        "{err}"
    );
    assert_eq!(&store.get(id).unwrap(), bytes);
    assert_eq!(fx.blobs.range_requests.load(Relaxed), 1);
}

#[test]
fn after_giving_up_reads_fail_at_once_until_the_registry_answers() {
    let fx = fixture(&[4]);
    fx.blobs.fail_ranges(&fx.pack(0));
    let store = fx.store(with_deadline(300));
    let (a, b) = (fx.chunks[0][0].0, fx.chunks[0][3].0);
    let t = Instant::now();
    assert!(matches!(store.get(&a), Err(StoreError::GaveUp { .. })));
    assert!(
        t.elapsed() >= Duration::from_millis(100),
        "{:?}",
        t.elapsed()
    );
    // Marked down: one try, no waiting.
    let before = fx.blobs.range_requests.load(Relaxed);
    let t = Instant::now();
    assert!(matches!(store.get(&b), Err(StoreError::GaveUp { .. })));
    assert!(
        t.elapsed() < Duration::from_millis(200),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(fx.blobs.range_requests.load(Relaxed), before + 1);
    // Back: reads succeed, and the next outage is waited out again.
    fx.blobs.heal_ranges(&fx.pack(0));
    assert_eq!(store.get(&b).unwrap(), fx.chunks[0][3].1);
    fx.blobs.fail_ranges(&fx.pack(0));
    let t = Instant::now();
    assert!(store.get(&a).is_err());
    assert!(
        t.elapsed() >= Duration::from_millis(100),
        "{:?}",
        t.elapsed()
    );
}
