//! The in-process memory tier: a plain LRU of decoded (plaintext, verified)
//! chunks with a byte budget.
//!
//! It exists so that many small reads inside one chunk (the kernel reads 4
//! to 128 KiB at a time) do not re-read, re-hash and re-decrypt the chunk
//! from disk each time. Values are `Arc`s: dropping an entry never frees
//! bytes a reader is still copying from.

use lru::LruCache;
use std::sync::Arc;
use std::time::Instant;

use smr_format::ChunkId;

/// What a decoded chunk depends on. The same stored bytes decoded with a
/// different key (only a bogus recipe would do that) are a different
/// entry, so one image can never poison what another reads.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DecodeKey {
    /// The chunk's name.
    pub id: ChunkId,
    /// Its decryption key, if encrypted.
    pub key: Option<[u8; 32]>,
    /// Whether the plaintext was compressed.
    pub compressed: bool,
    /// The plaintext length.
    pub plain_len: u32,
}

struct Slot {
    data: Arc<Vec<u8>>,
    /// When the disk entry's LRU-K history was last updated on behalf of
    /// hits served from here.
    touched: Instant,
}

/// The LRU itself (callers hold it behind a mutex): the `lru` crate's
/// list, bounded here by bytes rather than by count.
pub(crate) struct MemoryLru {
    budget: u64,
    bytes: u64,
    slots: LruCache<DecodeKey, Slot>,
}

impl MemoryLru {
    pub(crate) fn new(budget: u64) -> Self {
        MemoryLru {
            budget,
            bytes: 0,
            slots: LruCache::unbounded(),
        }
    }

    /// The chunk if present (marking it most recently used), and whether
    /// the caller should record an access on disk: true when the last one
    /// recorded for this entry is at least `touch_every` old.
    pub(crate) fn get(
        &mut self,
        key: &DecodeKey,
        touch_every: std::time::Duration,
    ) -> Option<(Arc<Vec<u8>>, bool)> {
        let slot = self.slots.get_mut(key)?;
        let touch = slot.touched.elapsed() >= touch_every;
        if touch {
            slot.touched = Instant::now();
        }
        Some((slot.data.clone(), touch))
    }

    /// Whether `key` is present (without changing the order).
    pub(crate) fn contains(&self, key: &DecodeKey) -> bool {
        self.slots.contains(key)
    }

    /// Inserts a chunk, evicting least recently used ones to stay within
    /// budget. A chunk larger than the whole budget is not kept.
    pub(crate) fn put(&mut self, key: DecodeKey, data: Arc<Vec<u8>>) {
        let len = data.len() as u64;
        if len > self.budget {
            return;
        }
        self.remove(&key);
        while self.bytes + len > self.budget {
            let Some((_, victim)) = self.slots.pop_lru() else {
                break;
            };
            self.bytes -= victim.data.len() as u64;
        }
        self.bytes += len;
        self.slots.put(
            key,
            Slot {
                data,
                touched: Instant::now(),
            },
        );
    }

    fn remove(&mut self, key: &DecodeKey) {
        if let Some(s) = self.slots.pop(key) {
            self.bytes -= s.data.len() as u64;
        }
    }

    /// Bytes and entries held.
    pub(crate) fn usage(&self) -> (u64, u64) {
        (self.bytes, self.slots.len() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn key(n: u8) -> DecodeKey {
        DecodeKey {
            id: ChunkId([n; 32]),
            key: None,
            compressed: false,
            plain_len: 10,
        }
    }

    #[test]
    fn lru_order_and_budget() {
        let mut m = MemoryLru::new(30);
        let hour = Duration::from_secs(3600);
        for n in 0..3 {
            m.put(key(n), Arc::new(vec![n; 10]));
        }
        assert!(m.get(&key(0), hour).is_some(), "0 becomes most recent");
        m.put(key(3), Arc::new(vec![3; 10]));
        assert!(!m.contains(&key(1)), "least recently used goes first");
        assert!(m.contains(&key(0)) && m.contains(&key(2)) && m.contains(&key(3)));
        assert_eq!(m.usage(), (30, 3));
        m.put(key(9), Arc::new(vec![9; 31]));
        assert!(!m.contains(&key(9)), "larger than the budget: not kept");
        let other_key = DecodeKey {
            key: Some([1; 32]),
            ..key(0)
        };
        assert!(
            m.get(&other_key, hour).is_none(),
            "another decryption key is another entry"
        );
        let (_, touch) = m.get(&key(0), Duration::ZERO).expect("present");
        assert!(touch);
        let (_, touch) = m.get(&key(0), hour).expect("present");
        assert!(!touch);
    }
}
