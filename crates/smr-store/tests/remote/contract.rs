//! One test body for every store (puzzlefs-style): what any `ChunkStore`
//! must do, run against each implementation.

use crate::support::chunk;
use smr_store::{ByteRange, ChunkStore, LocalStore, ObjectName, PutOutcome, StoreError};
use std::sync::Arc;

/// The read-write contract: missing, put, put again, get, exists,
/// concurrent puts of one chunk.
pub fn read_write(store: Arc<dyn ChunkStore>) {
    let (id, data) = chunk(70_000);
    assert!(!store.exists(&id).unwrap());
    match store.get(&id) {
        Err(StoreError::Missing {
            what: got,
            store: s,
        }) => {
            assert_eq!(got, id.into());
            assert_eq!(s, store.describe());
        }
        other => panic!("expected Missing, got {other:?}"),
    }
    assert_eq!(store.put(&id, &data).unwrap(), PutOutcome::Written);
    assert_eq!(store.put(&id, &data).unwrap(), PutOutcome::Existed);
    assert!(store.exists(&id).unwrap());
    assert_eq!(store.get(&id).unwrap(), data);

    let (id, data) = chunk(1000);
    let data = Arc::new(data);
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let (store, data) = (store.clone(), data.clone());
            std::thread::spawn(move || store.put(&id, &data).unwrap())
        })
        .collect();
    let outcomes: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(outcomes.contains(&PutOutcome::Written), "{outcomes:?}");
    assert_eq!(store.get(&id).unwrap(), *data);
}

/// The read-only contract for a store serving what `seed` holds.
pub fn read_only(store: &dyn ChunkStore, seed: &LocalStore) {
    let (id, data) = chunk(100_000);
    seed.put(&id, &data).unwrap();
    assert!(store.exists(&id).unwrap());
    assert_eq!(store.get(&id).unwrap(), data);
    let (absent, _) = chunk(10);
    assert!(!store.exists(&absent).unwrap());
    let e = store.get(&absent).unwrap_err();
    assert!(matches!(e, StoreError::Missing { .. }), "{e}");
    let e = store.put(&absent, b"x").unwrap_err();
    assert!(matches!(e, StoreError::ReadOnly { .. }), "{e}");
}

/// Writes an object of `len` random bytes at `ROOT/packs/p` (where a pack
/// store keeps several chunks in one object) and returns its name and bytes.
pub fn pack_object(root: &std::path::Path, len: usize) -> (ObjectName, Vec<u8>) {
    let (_, data) = chunk(len);
    std::fs::create_dir_all(root.join("packs")).unwrap();
    std::fs::write(root.join("packs/p"), &data).unwrap();
    (ObjectName::new("packs/p"), data)
}

/// The ranged-read contract over `object` holding `data` (at least
/// 100,000 bytes): several ranges in one call come back in order and
/// exact; a range ending past the object is an error naming it, never a
/// short read; a missing object is `Missing`.
pub fn ranged(store: &dyn ChunkStore, object: &ObjectName, data: &[u8]) {
    let ranges = [
        ByteRange::new(5000, 20_000),
        ByteRange::new(0, 10),
        ByteRange {
            offset: 99_000,
            len: None,
        },
        ByteRange::WHOLE,
    ];
    let got = store.read_ranges(object, &ranges).unwrap();
    assert_eq!(got.len(), 4);
    assert!(got[0] == data[5000..25_000]);
    assert!(got[1] == data[..10]);
    assert!(got[2] == data[99_000..]);
    assert!(got[3] == data);
    let past = ByteRange::new(data.len() as u64 - 5, 10);
    let t = std::time::Instant::now();
    let e = store.read_ranges(object, &[past]).unwrap_err();
    assert!(e.to_string().contains("packs/p"), "{e}");
    assert!(
        !e.is_transient() && !matches!(e, StoreError::GaveUp { .. }),
        "{e}"
    );
    assert!(t.elapsed().as_secs() < 2, "not retried: {e}");
    let absent = ObjectName::new("packs/absent");
    let e = store
        .read_ranges(&absent, &[ByteRange::new(0, 1)])
        .unwrap_err();
    assert!(matches!(e, StoreError::Missing { .. }), "{e}");
}

#[test]
fn local_store() {
    let dir = tempfile::tempdir().unwrap();
    read_write(Arc::new(LocalStore::open(dir.path()).unwrap()));
    let store = LocalStore::open(dir.path()).unwrap();
    let (object, data) = pack_object(dir.path(), 100_000);
    ranged(&store, &object, &data);
}
