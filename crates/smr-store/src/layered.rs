//! [`Layered`]: a store of new chunks over the store of an image they
//! extend, read as one (what `smr commit --push` hands the pusher: the
//! chunks it wrote, and the base image's for the rest).

use crate::{ByteRange, ChunkStore, Extent, ObjectName, Progress, PutOutcome, Result, StoreError};
use smr_format::ChunkId;
use std::sync::Arc;

/// Chunks from `top` when it has them, else from `base`; writes go to
/// `top`.
pub struct Layered {
    top: Arc<dyn ChunkStore>,
    base: Arc<dyn ChunkStore>,
}

impl Layered {
    /// `top` over `base`.
    pub fn new(top: Arc<dyn ChunkStore>, base: Arc<dyn ChunkStore>) -> Self {
        Layered { top, base }
    }
}

impl ChunkStore for Layered {
    fn describe(&self) -> String {
        format!("{} over {}", self.top.describe(), self.base.describe())
    }

    fn locate(&self, id: &ChunkId) -> Result<Extent> {
        match self.top.exists(id)? {
            true => self.top.locate(id),
            false => self.base.locate(id),
        }
    }

    /// From `top`, or from `base` when `top` has no such object (objects of
    /// the two are told apart by name: a pack is no chunk file).
    fn read_ranges(&self, object: &ObjectName, ranges: &[ByteRange]) -> Result<Vec<Vec<u8>>> {
        match self.top.read_ranges(object, ranges) {
            Err(StoreError::Missing { .. }) => self.base.read_ranges(object, ranges),
            r => r,
        }
    }

    fn read_range_progressive(
        &self,
        object: &ObjectName,
        range: ByteRange,
        progress: &Progress,
    ) -> Result<Vec<u8>> {
        match self.top.read_range_progressive(object, range, progress) {
            Err(StoreError::Missing { .. }) => {
                self.base.read_range_progressive(object, range, progress)
            }
            r => r,
        }
    }

    fn get(&self, id: &ChunkId) -> Result<Vec<u8>> {
        match self.top.get(id) {
            Err(StoreError::Missing { .. }) => self.base.get(id),
            r => r,
        }
    }

    fn ordered_puts(&self) -> bool {
        self.top.ordered_puts()
    }

    fn put(&self, id: &ChunkId, data: &[u8]) -> Result<PutOutcome> {
        self.top.put(id, data)
    }

    fn exists(&self, id: &ChunkId) -> Result<bool> {
        Ok(self.top.exists(id)? || self.base.exists(id)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::LocalStore;

    #[test]
    fn reads_fall_through_to_the_base_and_writes_stay_on_top() {
        let (t, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let top = Arc::new(LocalStore::open(t.path()).unwrap());
        let base = Arc::new(LocalStore::open(b.path()).unwrap());
        let (old, new) = (b"old chunk".to_vec(), b"new chunk".to_vec());
        let (old_id, new_id) = (ChunkId::of(&old), ChunkId::of(&new));
        base.put(&old_id, &old).unwrap();
        let l = Layered::new(top.clone(), base.clone());
        assert_eq!(l.put(&new_id, &new).unwrap(), PutOutcome::Written);
        assert!(top.exists(&new_id).unwrap() && !base.exists(&new_id).unwrap());
        assert_eq!(l.get(&old_id).unwrap(), old);
        assert_eq!(l.get(&new_id).unwrap(), new);
        assert!(l.exists(&old_id).unwrap() && l.exists(&new_id).unwrap());
        let missing = ChunkId::of(b"neither");
        assert!(!l.exists(&missing).unwrap());
        let err = l.get(&missing).unwrap_err();
        assert!(matches!(err, StoreError::Missing { .. }), "{err}");
        assert!(l.describe().contains(" over "));
    }
}
