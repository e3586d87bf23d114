//! Sequential readahead of a [`super::RegistryStore`].
//!
//! A container's start reads files one after another, each a run of
//! adjacent chunks, one kernel read (one or two chunks) at a time: every
//! read that misses would cost a round trip. When a ranged read of a pack
//! starts where the previous one of that pack ended, the reader is
//! streaming through it, and the request is extended by a window of the
//! chunks that follow (doubling per sequential read, like the kernel's own
//! readahead, up to [`super::StoreOptions::readahead`]). The extra chunks
//! wait in a small buffer for the `get`s that follow; a non-sequential read
//! resets the window, so scattered reads fetch nothing extra. Buffered
//! bytes are unverified, like everything a store returns: the node cache
//! hashes each chunk when it takes it.

use crate::pack::PackIndex;
use smr_format::ChunkId;
use std::collections::{HashMap, VecDeque};

/// The first window of a stream: two 64 KiB chunks.
const FIRST_WINDOW: u64 = 128 << 10;

/// Streams and the chunks read ahead for them.
#[derive(Default)]
pub(super) struct Ahead {
    /// Per pack: where the last read ended, and its window.
    streams: HashMap<usize, (u64, u64)>,
    buf: HashMap<ChunkId, Vec<u8>>,
    order: VecDeque<ChunkId>,
    bytes: u64,
}

/// A chunk read ahead: id, offset in the pack, length.
pub(super) type AheadChunk = (ChunkId, u64, u32);

impl Ahead {
    /// Takes chunk `id` out of the buffer.
    pub(super) fn take(&mut self, id: &ChunkId) -> Option<Vec<u8>> {
        let bytes = self.buf.remove(id)?;
        self.bytes -= bytes.len() as u64;
        Some(bytes)
    }

    /// Chunks of `pack` to read after `end` along with a read of
    /// `[start, end)`, at most `max_window` bytes of them and the whole
    /// request at most `max_request`. Records the read.
    pub(super) fn plan(
        &mut self,
        index: &PackIndex,
        pack: usize,
        (start, end): (u64, u64),
        max_window: u64,
        max_request: u64,
    ) -> Vec<AheadChunk> {
        let (next, window) = self.streams.get(&pack).copied().unwrap_or((u64::MAX, 0));
        let sequential = start <= next && next <= end;
        let window = if sequential && max_window > 0 {
            (window * 2).clamp(FIRST_WINDOW.min(max_window), max_window)
        } else {
            0
        };
        let mut out = Vec::new();
        let mut stop = end;
        if window > 0 {
            let limit = (end + window).min(start + max_request);
            let mut offset = 0u64;
            for c in index.packs().get(pack).map_or(&[][..], |p| &p.chunks) {
                let c_end = offset + u64::from(c.len);
                if offset >= end && c_end > limit {
                    break;
                }
                if offset >= end && offset == stop && !self.buf.contains_key(&c.id) {
                    out.push((c.id, offset, c.len));
                    stop = c_end;
                }
                offset = c_end;
            }
        }
        self.streams.insert(pack, (stop, window));
        out
    }

    /// Keeps chunk `id` read ahead, dropping the oldest beyond `cap` bytes.
    pub(super) fn keep(&mut self, id: ChunkId, bytes: Vec<u8>, cap: u64) {
        if self.buf.contains_key(&id) || bytes.len() as u64 > cap {
            return;
        }
        self.bytes += bytes.len() as u64;
        self.buf.insert(id, bytes);
        self.order.push_back(id);
        while self.bytes > cap {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            if let Some(b) = self.buf.remove(&old) {
                self.bytes -= b.len() as u64;
            }
        }
        // Ids taken by `take` linger in `order`; keep it from growing.
        if self.order.len() > 4 * self.buf.len() + 64 {
            let buf = &self.buf;
            self.order.retain(|id| buf.contains_key(id));
        }
    }
}
