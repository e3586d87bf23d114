//! One test body for every store (puzzlefs-style): what any `ChunkStore`
//! must do, run against each implementation.

use crate::support::chunk;
use smr_store::{ChunkStore, LocalStore, PutOutcome, StoreError};
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

#[test]
fn local_store() {
    let dir = tempfile::tempdir().unwrap();
    read_write(Arc::new(LocalStore::open(dir.path()).unwrap()));
}
