//! Pages ahead of a sequential reader, from the node cache.
//!
//! A loop device reads the exported file through its page cache, one
//! request to the server per readahead window of the file (128 KiB),
//! and waits for each: with the image's chunks on the node, that round
//! trip is what a warm read costs beyond a plain loop mount. For a reader
//! going through the image in order, the server stores the
//! [`STORE_AHEAD`] bytes after each read in the file's page cache itself
//! (`FUSE_NOTIFY_STORE`, see [`crate::device::PageSink`]), from chunks
//! the node already holds (the memory tier or the disk tier): the
//! kernel then finds those pages and asks for nothing. A chunk the node
//! does not hold is left to the kernel's request: it is never fetched
//! for this (a cold reader's fetches stay the kernel's and the
//! prefetcher's). The bytes stored are the chunks' verified plaintext, as
//! a read would get.

use std::sync::{Arc, Mutex, PoisonError};

use super::{Inner, LazyImage};
use crate::device::PageSink;

/// Bytes of image stored ahead of a sequential reader.
pub(super) const STORE_AHEAD: u64 = 1 << 20;
/// A page: stores cover whole pages (but for the image's last one).
const PAGE: u64 = 4096;

/// A sequential reader's progress: the end of the last read, and how far
/// pages were stored (or are being stored) ahead of it.
#[derive(Debug, Default)]
pub(super) struct Ahead(Mutex<(u64, u64)>);

impl LazyImage {
    /// After a read of `[offset, end)` through the page cache (see
    /// [`crate::device::BlockDevice::read_through_page_cache`]): if it
    /// follows the reads before it, stores the pages after it that are
    /// not stored yet, up to [`STORE_AHEAD`] bytes ahead, on the cache's
    /// pool.
    pub(super) fn store_ahead(&self, offset: u64, end: u64) {
        let i = &self.inner;
        let Some(sink) = i.pages.get() else {
            return;
        };
        let mut st = i.ahead.0.lock().unwrap_or_else(PoisonError::into_inner);
        let (last_end, stored) = *st;
        // In order: from a little behind the last read (reads finish out
        // of order) up to the pages stored ahead (which the kernel skips,
        // asking next for the first page it lacks).
        let sequential =
            last_end.saturating_sub(STORE_AHEAD) <= offset && offset <= last_end.max(stored);
        if !sequential {
            *st = (end, end);
            return;
        }
        st.0 = last_end.max(end);
        let size = self.size();
        let to = match end.saturating_add(STORE_AHEAD) {
            to if to >= size => size,
            to => to / PAGE * PAGE,
        };
        if stored >= end.saturating_add(STORE_AHEAD / 2) || stored >= to {
            return;
        }
        let from = stored.max(end).next_multiple_of(PAGE);
        if from >= to {
            return;
        }
        st.1 = to;
        drop(st);
        // A job per chunk: their disk reads overlap.
        let grid = i.img.recipe.grid();
        for c in grid.chunks_of(from..to) {
            let r = grid.range(c);
            let (lo, hi) = (from.max(r.start), to.min(r.end));
            let (inner, sink) = (i.clone(), sink.clone());
            i.cache.spawn(Box::new(move || {
                inner.store_chunk(sink.as_ref(), c, lo, hi)
            }));
        }
    }
}

impl Inner {
    /// Stores the bytes `[lo, hi)` of the image, inside chunk `c`, in the
    /// exported file's page cache if the node holds the chunk.
    fn store_chunk(self: &Arc<Self>, sink: &dyn PageSink, c: u64, lo: u64, hi: u64) {
        let Some((pos, key)) = self.locate(c) else {
            // A zero chunk: the kernel's read of it costs no fetch.
            return;
        };
        let Some(data) = self
            .cache
            .get_decoded_cached(&key, |stored| self.img.open_verified(pos, stored))
        else {
            return;
        };
        let start = self.img.recipe.grid().start(c);
        let Some(piece) = data.get((lo - start) as usize..(hi - start) as usize) else {
            return;
        };
        match sink.store(lo, piece) {
            Ok(()) => {
                self.bytes_stored_ahead
                    .fetch_add(hi - lo, std::sync::atomic::Ordering::Relaxed);
                // The kernel never asks for a stored page: the chunk's
                // first delivery moves the prefetcher as a read would.
                self.first_delivery(c, Some(&data));
            }
            Err(e) => tracing::debug!(offset = lo, error = %e, "storing pages ahead of a reader"),
        }
    }
}
