//! The lazy image: an image's bytes served on demand from its chunks.
//!
//! `read_at(offset, buf)` maps the range to chunks. Zero chunks (absent
//! from the recipe) are zeros, with no I/O. Stored chunks come from the
//! node [`Cache`] (memory tier, then disk), else from the store; every byte
//! served has been verified against its chunk's SHA-256. [`LazyImage::read_at`]
//! copies each chunk's bytes once, straight into the caller's buffer;
//! [`LazyImage::read_parts`] (what the NBD server uses) hands out the cached
//! chunks themselves, so a reply is written from them without any copy.
//!
//! A read spanning several chunks that must come from the store fetches
//! them in parallel on the cache's fetch pool. No readahead beyond the request is
//! done implicitly: the kernel's readahead already asks for the next blocks
//! (and `read_ahead_kb` is how to tune it), and guessing here again would
//! fetch chunks nobody reads. Explicit prefetch ([`LazyImage::prefetch`],
//! NBD `CACHE`, a startup profile) is the way to fetch ahead.
//!
//! A chunk that cannot be fetched or verified fails, with an `EIO`-mapped
//! [`io::Error`] and an error log naming the chunk and the store, exactly
//! the reads that touch it; nothing is remembered, so a later read retries.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, PoisonError};

use crossbeam_channel::bounded;
use smr_format::{ChunkId, FormatError};
use smr_store::{ChunkStore, Extent};

use crate::cache::{Cache, CacheError, DecodeKey};
use crate::chunks::{ChunkError, ImageChunks};
use crate::device::{BlockDevice, ReadPart};
use crate::fetch::{FetchOptions, Fetcher, Priority};

/// The first read-ahead window of a sequential reader: two 64 KiB chunks.
const FIRST_WINDOW: u64 = 128 << 10;

/// A read failed because one chunk could not be produced. Carried inside
/// the [`io::Error`] returned by [`LazyImage::read_at`].
#[derive(Debug, thiserror::Error)]
#[error("chunk {index} ({id}) of the image, from store {store}: {source}")]
pub struct ChunkReadError {
    /// Chunk number in the image.
    pub index: u64,
    /// Chunk name.
    pub id: ChunkId,
    /// The store it comes from.
    pub store: String,
    /// What went wrong.
    #[source]
    pub source: CacheError,
}

impl ChunkReadError {
    /// The errno a reader should see.
    pub fn to_errno(&self) -> i32 {
        libc::EIO
    }
}

/// Counters of one lazy image.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct LazyStats {
    /// Chunks this image fetched from its store.
    pub chunks_fetched: u64,
    /// Stored bytes this image fetched from its store.
    pub bytes_fetched: u64,
    /// `read_at` calls.
    pub reads: u64,
    /// Bytes returned by `read_at`.
    pub bytes_read: u64,
    /// `read_at` calls that failed.
    pub read_errors: u64,
    /// Chunks fetched ahead of the reads (file-map prefetch, profile
    /// replay).
    pub chunks_prefetched: u64,
    /// Stored bytes of those.
    pub bytes_prefetched: u64,
    /// Stored bytes of chunks fetched ahead that no read has asked for.
    pub prefetched_unread_bytes: u64,
    /// Prefetches that failed (left to the readers).
    pub prefetch_failed: u64,
    /// Bytes of the startup pack stored in the kernel's page cache of the
    /// exported file ahead of the reads (the kernel reads them without
    /// asking: they are not in `bytes_read`).
    pub bytes_seeded: u64,
    /// Bytes of chunks the node held stored in that page cache ahead of a
    /// reader going through the image in order (not in `bytes_read`
    /// either).
    pub bytes_stored_ahead: u64,
}

/// An image served lazily from a chunk store through the node cache.
/// Cheap to clone; safe to read from many threads at once.
#[derive(Clone)]
pub struct LazyImage {
    inner: Arc<Inner>,
    /// Shared by the clones: when the last one goes, prefetching stops
    /// (its workers hold the image only while they fetch).
    _prefetch: Arc<prefetch::StopOnDrop>,
    /// The image's chunks pinned in the node cache while any clone lives.
    _pin: Option<Arc<crate::cache::Pin>>,
}

struct Inner {
    img: ImageChunks,
    fetcher: Arc<Fetcher>,
    store_desc: String,
    /// Sequential-reader detection: the chunk after the last read that
    /// missed, and the read-ahead window in bytes.
    stream: std::sync::Mutex<(u64, u64)>,
    cache: Arc<Cache>,
    chunks_fetched: AtomicU64,
    bytes_fetched: AtomicU64,
    reads: AtomicU64,
    bytes_read: AtomicU64,
    read_errors: AtomicU64,
    recorder: OnceLock<Arc<profile::Recorder>>,
    prefetch: Arc<prefetch::Prefetch>,
    startup: OnceLock<startup::Startup>,
    /// The page cache of the file the image is exported as.
    pages: OnceLock<Arc<dyn crate::device::PageSink>>,
    /// Whether the startup pack's blocks are being stored there.
    seeding: AtomicBool,
    bytes_seeded: AtomicU64,
    /// Pages stored ahead of a sequential reader (see `lazy/ahead.rs`).
    ahead: ahead::Ahead,
    bytes_stored_ahead: AtomicU64,
}

impl std::fmt::Debug for LazyImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LazyImage")
            .field("size", &self.size())
            .field("store", &self.inner.store_desc)
            .finish_non_exhaustive()
    }
}

impl LazyImage {
    /// Serves `img` from `store` through `cache`, fetching with the default
    /// [`FetchOptions`]. Fails if the recipe is encrypted and `img` has no
    /// keys (ciphertext is never served).
    pub fn new(
        img: ImageChunks,
        store: Arc<dyn ChunkStore>,
        cache: Arc<Cache>,
    ) -> Result<Self, ChunkError> {
        Self::with_fetcher(img, Fetcher::new(store, FetchOptions::default()), cache)
    }

    /// [`LazyImage::new`] with the fetcher of its store.
    pub fn with_fetcher(
        img: ImageChunks,
        fetcher: Arc<Fetcher>,
        cache: Arc<Cache>,
    ) -> Result<Self, ChunkError> {
        if img.keys_missing() {
            return Err(FormatError::KeyRequired.into());
        }
        let prefetch = Arc::new(prefetch::Prefetch::new(img.recipe.chunk_count()));
        // The image's chunks are kept through evictions while it is served.
        let pin = match cache.pin(img.recipe.chunks.iter().map(|c| c.id)) {
            Ok(p) => Some(Arc::new(p)),
            Err(e) => {
                tracing::warn!(error = %e, "could not pin the image's chunks in the cache");
                None
            }
        };
        Ok(LazyImage {
            _pin: pin,
            _prefetch: Arc::new(prefetch::StopOnDrop(prefetch.clone())),
            inner: Arc::new(Inner {
                prefetch,
                store_desc: fetcher.store().describe(),
                img,
                fetcher,
                stream: std::sync::Mutex::new((u64::MAX, 0)),
                cache,
                chunks_fetched: AtomicU64::new(0),
                bytes_fetched: AtomicU64::new(0),
                reads: AtomicU64::new(0),
                bytes_read: AtomicU64::new(0),
                read_errors: AtomicU64::new(0),
                recorder: OnceLock::new(),
                startup: OnceLock::new(),
                pages: OnceLock::new(),
                seeding: AtomicBool::new(false),
                ahead: ahead::Ahead::default(),
                bytes_stored_ahead: AtomicU64::new(0),
                bytes_seeded: AtomicU64::new(0),
            }),
        })
    }

    /// Image size in bytes.
    pub fn size(&self) -> u64 {
        self.inner.img.recipe.image_size
    }

    /// Where the image's chunks start and end.
    pub fn grid(&self) -> &smr_format::ChunkGrid {
        self.inner.img.recipe.grid()
    }

    /// The node cache it reads through.
    pub fn cache(&self) -> &Arc<Cache> {
        &self.inner.cache
    }

    /// The fetcher of its store.
    pub fn fetcher(&self) -> &Arc<Fetcher> {
        &self.inner.fetcher
    }

    /// This image's counters.
    pub fn stats(&self) -> LazyStats {
        let i = &self.inner;
        let p = &i.prefetch;
        let unread = p
            .unread()
            .filter_map(|c| i.img.recipe.entry(c))
            .map(|e| u64::from(e.stored_len))
            .sum();
        LazyStats {
            chunks_prefetched: p.chunks.load(Ordering::Relaxed),
            bytes_prefetched: p.bytes.load(Ordering::Relaxed),
            prefetched_unread_bytes: unread,
            prefetch_failed: p.failed.load(Ordering::Relaxed),
            chunks_fetched: i.chunks_fetched.load(Ordering::Relaxed),
            bytes_fetched: i.bytes_fetched.load(Ordering::Relaxed),
            reads: i.reads.load(Ordering::Relaxed),
            bytes_read: i.bytes_read.load(Ordering::Relaxed),
            read_errors: i.read_errors.load(Ordering::Relaxed),
            bytes_seeded: i.bytes_seeded.load(Ordering::Relaxed),
            bytes_stored_ahead: i.bytes_stored_ahead.load(Ordering::Relaxed),
        }
    }

    /// Fills `buf` with the image bytes at `offset`. The range must lie
    /// inside the image.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let r = self.read_inner(offset, buf);
        self.count_read(buf.len(), r.is_ok());
        r
    }

    fn read_inner(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.each_chunk(offset, buf.len() as u64, |lo, piece| {
            let at = (lo - offset) as usize;
            match piece {
                ChunkSlice::Zero(n) => buf.get_mut(at..at + n).ok_or_else(range_bug)?.fill(0),
                ChunkSlice::Data(d, r) => {
                    let dst = buf.get_mut(at..at + r.len()).ok_or_else(range_bug)?;
                    dst.copy_from_slice(d.get(r).ok_or_else(range_bug)?);
                }
            }
            Ok(())
        })
    }

    /// Like [`LazyImage::read_at`], but hands out the cached chunks' bytes
    /// instead of copying them: a part per chunk (zero chunks as
    /// [`ReadPart::Zero`]). A part that is less than half of its chunk is
    /// copied, so that a small read never pins a whole chunk.
    pub fn read_parts(&self, offset: u64, len: usize) -> io::Result<Vec<ReadPart>> {
        let mut parts: Vec<ReadPart> = Vec::new();
        let r = self.each_chunk(offset, len as u64, |_, data| push_part(&mut parts, data));
        self.count_read(len, r.is_ok());
        r.map(|()| parts)
    }

    /// [`LazyImage::read_parts`] if every chunk of the range is at hand
    /// (zero, or see [`Cache::get_decoded_now`]); `None` if one is not
    /// (and the read is not counted): then `read_parts` must wait for it.
    /// Never waits for a chunk's disk read or fetch.
    pub fn read_parts_now(&self, offset: u64, len: usize) -> Option<io::Result<Vec<ReadPart>>> {
        let end = match self.end_of(offset, len as u64) {
            Ok(end) => end,
            Err(e) => {
                self.count_read(len, false);
                return Some(Err(e));
            }
        };
        let mut parts: Vec<ReadPart> = Vec::new();
        // Whole chunks loaded but not kept: if a later chunk is not at
        // hand, they are kept after all, so that `read_parts` does not
        // load and decrypt them again.
        let mut passing: Vec<(DecodeKey, Arc<Vec<u8>>)> = Vec::new();
        if len > 0 {
            let grid = self.grid();
            let recorder = self.inner.recorder.get();
            if let Some(r) = recorder {
                r.touch_blocks(offset, end);
            }
            for c in grid.chunks_of(offset..end) {
                if let Some(r) = recorder {
                    r.touch(c);
                }
                let data = match self.inner.locate(c) {
                    None => None,
                    Some((pos, key)) => {
                        let keep = !self.covers(c, offset, end);
                        let got = self.inner.cache.get_decoded_now(&key, keep, |stored| {
                            self.inner.img.open_verified(pos, stored)
                        });
                        let Some(d) = got else {
                            for (k, d) in &passing {
                                self.inner.cache.keep(k, d);
                            }
                            return None;
                        };
                        if !keep {
                            passing.push((key, d.clone()));
                        }
                        Some(d)
                    }
                };
                if let Err(e) = piece(c, grid.range(c), offset, end, data.as_ref())
                    .and_then(|(_, p)| push_part(&mut parts, p))
                {
                    self.count_read(len, false);
                    return Some(Err(e));
                }
            }
        }
        self.count_read(len, true);
        Some(Ok(parts))
    }

    /// Whether the read `[offset, end)` takes all of chunk `c`.
    fn covers(&self, c: u64, offset: u64, end: u64) -> bool {
        let r = self.grid().range(c);
        offset <= r.start && end >= r.end
    }

    /// Counts a read of `len` bytes that succeeded or failed.
    fn count_read(&self, len: usize, ok: bool) {
        let i = &self.inner;
        i.reads.fetch_add(1, Ordering::Relaxed);
        if ok {
            i.bytes_read.fetch_add(len as u64, Ordering::Relaxed);
        } else {
            i.read_errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The end of a read of `len` bytes at `offset`, if it lies inside the
    /// image.
    fn end_of(&self, offset: u64, len: u64) -> io::Result<u64> {
        offset
            .checked_add(len)
            .filter(|e| *e <= self.size())
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "read of {len} bytes at {offset} past the image end ({})",
                        self.size()
                    ),
                )
            })
    }

    /// Calls `f(start, slice)` for each chunk's piece of `[offset, offset +
    /// len)`, in order. Chunks that must be fetched from the store, beyond
    /// the first, are handed to the cache's fetch pool first, so that one
    /// read's fetches overlap; chunks in the disk cache are loaded here.
    fn each_chunk(
        &self,
        offset: u64,
        len: u64,
        mut f: impl FnMut(u64, ChunkSlice<'_>) -> io::Result<()>,
    ) -> io::Result<()> {
        let end = self.end_of(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let grid = self.grid();
        let chunks = grid.chunks_of(offset..end);
        let (first, last) = (chunks.start, chunks.end - 1);
        // Chunks that must come from the store are handed to the fetcher
        // together (so that neighbours share a request), with a read-ahead
        // window for a sequential reader; then every chunk is loaded here,
        // in order, joining those fetches. Chunks in the disk cache get
        // their disk reads started meanwhile (`needs_fetch`), except the
        // first of the read, which is loaded at once anyway.
        // Pieces whose blocks the startup pack holds come from it instead
        // (nothing to look up, nor allocate, for an image without one).
        let piece_of = |c: u64| {
            let r = grid.range(c);
            (offset.max(r.start), end.min(r.end))
        };
        let packed: Vec<bool> = match self.inner.startup.get() {
            None => Vec::new(),
            Some(_) => (first..=last)
                .map(|c| {
                    let (lo, hi) = piece_of(c);
                    self.inner.served_from_pack(c, lo, hi)
                })
                .collect(),
        };
        let in_pack = |c: u64| packed.get((c - first) as usize) == Some(&true);
        let missing: Vec<u64> = if last > first {
            (first..=last)
                .filter(|&c| !in_pack(c) && self.inner.needs_fetch(c))
                .collect()
        } else {
            Vec::from_iter((!in_pack(first) && self.inner.is_missing(first)).then_some(first))
        };
        self.inner.plan(&missing);
        let recorder = self.inner.recorder.get();
        if let Some(r) = recorder {
            r.touch_blocks(offset, end);
        }
        for c in first..=last {
            if let Some(r) = recorder {
                r.touch(c);
            }
            let first_read = self.inner.first_delivery(c, None);
            if in_pack(c) {
                let (lo, hi) = piece_of(c);
                if let Some((d, r)) = self.inner.pack_read(lo, hi) {
                    f(lo, ChunkSlice::Data(&d, r))?;
                    continue;
                }
            }
            let data = self
                .inner
                .chunk(c, !self.covers(c, offset, end))
                .map_err(|e| self.inner.fail(c, offset, e))?;
            if let (true, Some(d)) = (first_read, &data) {
                self.inner.prefetch_elf(c, d);
            }
            let (lo, piece) = piece(c, grid.range(c), offset, end, data.as_ref())?;
            f(lo, piece)?;
        }
        Ok(())
    }

    /// Allocation status of `[offset, offset + len)` (clamped to the
    /// image) as runs of `(length, is_hole)`: zero chunks are holes.
    pub fn block_status(&self, offset: u64, len: u64) -> Vec<(u64, bool)> {
        let end = offset.saturating_add(len).min(self.size());
        let grid = self.grid();
        let chunks = &self.inner.img.recipe.chunks;
        let first = grid.index_of(offset);
        let mut p = chunks.partition_point(|e| e.index < first);
        let mut runs: Vec<(u64, bool)> = Vec::new();
        let mut at = offset;
        while at < end {
            let index = grid.index_of(at);
            let (stop, hole) = match chunks.get(p) {
                Some(e) if e.index == index => {
                    p += 1;
                    (grid.range(index).end, false)
                }
                Some(e) => (grid.start(e.index), true),
                None => (end, true),
            };
            let stop = stop.min(end);
            match runs.last_mut() {
                Some(last) if last.1 == hole => last.0 += stop - at,
                _ => runs.push((stop - at, hole)),
            }
            at = stop;
        }
        runs
    }

    /// Brings the stored chunks of `[offset, offset + len)` into the node
    /// cache (disk, not memory), fetching missing ones in parallel on the
    /// cache's fetch pool; returns when all are done. Fails if any chunk
    /// failed (each failure is logged).
    pub fn prefetch(&self, offset: u64, len: u64) -> io::Result<()> {
        let end = offset.saturating_add(len).min(self.size());
        if offset >= end {
            return Ok(());
        }
        let grid = self.grid();
        let wanted = grid.chunks_of(offset..end);
        let chunks = &self.inner.img.recipe.chunks;
        let from = chunks.partition_point(|e| e.index < wanted.start);
        let to = chunks.partition_point(|e| e.index < wanted.end);
        let todo: Vec<usize> = (from..to)
            .filter(|&pos| {
                chunks
                    .get(pos)
                    .is_some_and(|e| !self.inner.cache.contains(&e.id))
            })
            .collect();
        let (tx, rx) = bounded(todo.len());
        for &pos in &todo {
            let (inner, tx) = (self.inner.clone(), tx.clone());
            self.inner.cache.spawn(Box::new(move || {
                let _ = tx.send((pos, inner.prefetch_pos(pos)));
            }));
        }
        drop(tx);
        let mut first_err = None;
        for (pos, r) in rx.iter() {
            if let Err(e) = r {
                let index = chunks.get(pos).map_or(0, |e| e.index);
                let err = self.inner.fail(index, grid.start(index), e);
                first_err.get_or_insert(err);
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

type ChunkResult = Result<Option<Arc<Vec<u8>>>, CacheError>;

/// One chunk's piece of a read: zeros, or a range of its plaintext.
enum ChunkSlice<'a> {
    Zero(usize),
    Data(&'a Arc<Vec<u8>>, std::ops::Range<usize>),
}

/// Chunk `c`'s piece of the read `[offset, end)` (`chunk` its bytes in
/// the image; `data` its plaintext, `None` for a zero chunk), and where it
/// starts.
fn piece(
    c: u64,
    chunk: std::ops::Range<u64>,
    offset: u64,
    end: u64,
    data: Option<&Arc<Vec<u8>>>,
) -> io::Result<(u64, ChunkSlice<'_>)> {
    let start = chunk.start;
    let (lo, hi) = (offset.max(start), end.min(chunk.end));
    let piece = match data {
        None => ChunkSlice::Zero((hi - lo) as usize),
        Some(d) => {
            let r = (lo - start) as usize..(hi - start) as usize;
            if r.end > d.len() {
                return Err(io::Error::other(format!(
                    "chunk {c} decoded to {} bytes, too short",
                    d.len()
                )));
            }
            ChunkSlice::Data(d, r)
        }
    };
    Ok((lo, piece))
}

/// Appends a chunk's piece to a read's parts (see [`LazyImage::read_parts`]).
fn push_part(parts: &mut Vec<ReadPart>, data: ChunkSlice<'_>) -> io::Result<()> {
    match data {
        ChunkSlice::Zero(n) => match parts.last_mut() {
            Some(ReadPart::Zero(z)) => *z += n,
            _ => parts.push(ReadPart::Zero(n)),
        },
        ChunkSlice::Data(d, r) if r.len() * 2 < d.len() => {
            parts.push(ReadPart::Owned(d.get(r).ok_or_else(range_bug)?.to_vec()))
        }
        ChunkSlice::Data(d, r) => parts.push(ReadPart::Shared(d.clone(), r)),
    }
    Ok(())
}

fn range_bug() -> io::Error {
    io::Error::other("read range arithmetic")
}

impl Inner {
    /// Position in the chunk table and cache key of chunk `index`, or
    /// `None` for a zero chunk.
    fn locate(&self, index: u64) -> Option<(usize, DecodeKey)> {
        let r = &self.img.recipe;
        let pos = r.chunks.binary_search_by_key(&index, |e| e.index).ok()?;
        let e = r.chunks.get(pos)?;
        let key = DecodeKey {
            id: e.id,
            key: self.img.key(pos).map(|k| k.0),
            compressed: e.compressed,
            plain_len: r.chunk_len(index) as u32,
        };
        Some((pos, key))
    }

    /// Whether chunk `index` is stored and in neither cache tier (so must
    /// come from the store). A chunk in the disk tier gets its disk read
    /// started in the background.
    fn needs_fetch(&self, index: u64) -> bool {
        self.locate(index).is_some_and(|(_, k)| {
            !self.cache.in_memory(&k) && !self.cache.contains_readahead(&k.id)
        })
    }

    /// Whether chunk `index` is stored and in neither cache tier (no disk
    /// read is started for it).
    fn is_missing(&self, index: u64) -> bool {
        self.locate(index)
            .is_some_and(|(_, k)| !self.cache.in_memory(&k) && !self.cache.contains(&k.id))
    }

    /// The plaintext of chunk `index`, `None` for a zero chunk; kept in
    /// the memory tier if `keep` (see [`Cache::get_decoded`]).
    fn chunk(&self, index: u64, keep: bool) -> ChunkResult {
        let Some((pos, key)) = self.locate(index) else {
            return Ok(None);
        };
        self.cache
            .get_decoded(
                &key,
                keep,
                || self.fetch(&key.id, Priority::Demand),
                // get_or_fetch hands over only bytes it has hashed against
                // the chunk's name (at insert; loads check the entry's
                // checksum): do not hash them again.
                |stored| self.img.open_verified(pos, stored),
            )
            .map(Some)
    }

    /// Fetches chunk table entry `pos` into the cache ahead of the reads,
    /// counted as prefetched.
    fn prefetch_pos(&self, pos: usize) -> Result<(), CacheError> {
        let Some(e) = self.img.recipe.chunks.get(pos) else {
            return Ok(());
        };
        self.cache
            .get_or_fetch(&e.id, || {
                let bytes = self.fetch(&e.id, Priority::Prefetch)?;
                let p = &self.prefetch;
                if p.fetched.set(e.index) {
                    p.chunks.fetch_add(1, Ordering::Relaxed);
                    p.bytes.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                }
                Ok(bytes)
            })
            .map(|_| ())
    }

    /// Queues the chunks of a read that must come from the store (`missing`,
    /// in order) as demand fetches, and, when the reader goes through the
    /// image in order, the chunks after them in the same object (a window
    /// that doubles per sequential read up to the fetcher's read-ahead).
    fn plan(self: &Arc<Self>, missing: &[u64]) {
        let (Some(&first), Some(&last)) = (missing.first(), missing.last()) else {
            return;
        };
        tracing::debug!(
            chunks = ?(first..=last),
            offset = self.img.recipe.grid().range(first).start,
            "demand miss"
        );
        let mut wants: Vec<(ChunkId, Extent)> =
            missing.iter().filter_map(|&c| self.extent(c)).collect();
        let object = wants.last().map(|(_, e)| e.object.clone());
        // The neighbours the miss brings ride in its own request: queued
        // by the prefetch workers, they would take a request of their own,
        // which can start late (the workers busy with older prefetches),
        // while the next read, of the next small file, often wants them.
        if let Some(object) = &object {
            let neighbours = last + 1..self.neighbours_end(last);
            wants.extend(self.run_in_object(neighbours, object, u64::MAX));
        }
        let missing = |id: &ChunkId| self.cache.is_missing(id);
        self.fetcher.plan(&wants, Priority::Demand, missing);
        self.prefetch_file(last);
        let max = self.fetcher.options().readahead;
        let mut stream = self.stream.lock().unwrap_or_else(PoisonError::into_inner);
        let (next, window) = *stream;
        let sequential = first <= next && next <= last + 1;
        let window = match (sequential, max) {
            (true, 1..) => (window * 2).clamp(FIRST_WINDOW.min(max), max),
            _ => 0,
        };
        *stream = (last + 1, window);
        drop(stream);
        let Some(object) = object else {
            return;
        };
        let ahead = self.run_in_object(last + 1..self.img.recipe.chunk_count(), &object, window);
        self.fetcher.plan(&ahead, Priority::Prefetch, missing);
    }

    /// The chunks of `range` that follow one another in `object`, from the
    /// range's start: zero chunks skipped, those in the memory tier left
    /// out; it stops at a chunk kept elsewhere (or whose place the store
    /// cannot say) and once the chunks counted hold `max_bytes` as stored.
    fn run_in_object(
        &self,
        range: std::ops::Range<u64>,
        object: &smr_store::ObjectName,
        max_bytes: u64,
    ) -> Vec<(ChunkId, Extent)> {
        let recipe = &self.img.recipe;
        let (mut wants, mut bytes) = (Vec::new(), 0u64);
        for c in range {
            if bytes >= max_bytes {
                break;
            }
            let Some((pos, key)) = self.locate(c) else {
                continue;
            };
            let Some(e) = self.extent_at(pos) else { break };
            if e.object != *object {
                break;
            }
            bytes += e.range.len.unwrap_or_else(|| recipe.chunk_len(c));
            if !self.cache.in_memory(&key) {
                wants.push((key.id, e));
            }
        }
        wants
    }

    /// Where the store keeps chunk `index` (`None` for a zero chunk, or
    /// when the store cannot say: the read then reports it).
    fn extent(&self, index: u64) -> Option<(ChunkId, Extent)> {
        let (pos, key) = self.locate(index)?;
        Some((key.id, self.extent_at(pos)?))
    }

    fn extent_at(&self, pos: usize) -> Option<Extent> {
        let e = self.img.recipe.chunks.get(pos)?;
        self.fetcher.store().locate(&e.id).ok()
    }

    fn fetch(&self, id: &ChunkId, prio: Priority) -> Result<Vec<u8>, ChunkError> {
        let bytes = self.fetcher.get(id, prio)?;
        self.chunks_fetched.fetch_add(1, Ordering::Relaxed);
        self.bytes_fetched
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        Ok(bytes)
    }

    /// Logs a chunk failure and turns it into the reader's error.
    fn fail(&self, index: u64, offset: u64, source: CacheError) -> io::Error {
        let id = source
            .chunk()
            .or_else(|| self.locate(index).map(|(_, k)| k.id))
            .unwrap_or(ChunkId([0; 32]));
        tracing::error!(chunk = %id, index, offset, store = %self.store_desc, error = %source, "chunk unavailable: failing the reads that touch it");
        io::Error::other(ChunkReadError {
            index,
            id,
            store: self.store_desc.clone(),
            source,
        })
    }
}

impl BlockDevice for LazyImage {
    fn size(&self) -> u64 {
        LazyImage::size(self)
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        LazyImage::read_at(self, offset, buf)
    }

    fn read_parts(&self, offset: u64, len: usize) -> io::Result<Vec<ReadPart>> {
        LazyImage::read_parts(self, offset, len)
    }

    fn read_parts_now(&self, offset: u64, len: usize) -> Option<io::Result<Vec<ReadPart>>> {
        LazyImage::read_parts_now(self, offset, len)
    }

    fn block_status(&self, offset: u64, len: u64) -> io::Result<Vec<(u64, bool)>> {
        Ok(LazyImage::block_status(self, offset, len))
    }

    fn prefetch(&self, offset: u64, len: u64) -> io::Result<()> {
        LazyImage::prefetch(self, offset, len)
    }

    fn exported(&self, pages: Arc<dyn crate::device::PageSink>) {
        self.seed_pages(pages)
    }

    fn read_through_page_cache(&self, offset: u64, len: usize) {
        self.store_ahead(offset, offset.saturating_add(len as u64));
    }
}

mod ahead;
pub mod prefetch;
pub mod profile;
mod startup;
#[cfg(test)]
mod tests;
