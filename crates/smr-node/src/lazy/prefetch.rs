//! Prefetch without a profile, from the recipe's file map
//! ([`smr_format::FileMap`]).
//!
//! These are fetched ahead of the reads:
//! - **the filesystem metadata**, when the image is mounted
//!   ([`LazyImage::prefetch_metadata`]): the header chunks and the
//!   metadata region at the end of the image (directories, extent blocks,
//!   bitmaps, inode tables), which every path lookup and `open` walks;
//! - **the rest of a file**, when a read misses inside a file that spans
//!   several chunks: its later chunks, [`FILE_PREFETCH_BYTES`] ahead of the
//!   furthest chunk read so far (the first read of a chunk fetched ahead
//!   moves the window). A start that maps a shared library and faults it
//!   in page by page then pays a round trip or two for the file instead of
//!   one per fault;
//! - **the other files of its directory**, when a read misses in a group
//!   of one directory's files laid out together
//!   ([`smr_format::FileMap::groups`]) that holds at most
//!   [`GROUP_PREFETCH_BYTES`] as stored: a start that imports a package's
//!   modules, or loads a directory's libraries, one after another pays one
//!   round trip for the directory instead of one per file;
//! - **the writable segments of an ELF file** when a chunk holding its
//!   header is first read (`Inner::prefetch_elf`, the crate's `elf` module): the
//!   loader relocates them right after reading the header, one more
//!   round trip per shared library otherwise;
//! - **the neighbours of a miss** in the file data, [`NEIGHBOUR_BYTES`] as
//!   stored (so compressed chunks reach further):
//!   files are laid out in layer order, so small files next to each other
//!   are mostly of one directory, read one after another (a package's
//!   modules). Those in the miss's object are also planned with the miss
//!   itself ([`LazyImage`]'s reads), so that its ranged request brings them.
//!
//! Queued chunks are fetched into the node cache by a few worker threads
//! at [`Priority::Prefetch`](crate::fetch::Priority). A worker takes a
//! batch of neighbouring chunks (up to the fetcher's largest request) and
//! hands it to the fetcher at once, so that it becomes one ranged request
//! where the store keeps the chunks together (registry packs); the
//! container's own misses go first. Each chunk is queued at most once per image and
//! verified by the cache like any fetch; a failed prefetch is logged and
//! left to the reader, who fetches it again.

use super::{Inner, LazyImage};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, PoisonError, Weak};

/// Bytes of a file queued ahead of a read inside it: after a miss, and
/// again after the first read of a chunk fetched ahead, so the window moves
/// with the reader. A start maps shared libraries whose code it touches
/// here and there: 4 MiB ahead fetched 2.3 MB of the 2.4 MB of a LAPACK
/// library that `import numpy` loads and reads 140 KB of. At 1 MiB the
/// unprofiled start of debian-python fetched 23.0 MB instead of 25.0 and
/// was faster in each of 8 interleaved rounds (median 2.64 s against
/// 2.76 s on the shaped link); node's fetched 22.6 MB instead of 27.3, in
/// about the same time. 2 MiB and 512 KiB were slower for python.
pub const FILE_PREFETCH_BYTES: u64 = 1 << 20;
/// Stored bytes of chunks after any miss in the file data queued too.
pub const NEIGHBOUR_BYTES: u64 = 192 << 10;
/// Stored bytes of a group of one directory's files (see
/// [`smr_format::FileMap::groups`]) queued whole after a miss inside it;
/// a larger group is left to the other rules. Python 3.11's compiled
/// standard library (`/usr/lib/python3.11/__pycache__`, 171 files whose
/// modules a start imports in dependency order, not in the directory's)
/// takes 2.28 MB with zstd: at 3 MiB instead of 2 the unprofiled start of
/// debian-python fetched the same 23.2 MB and was faster in 10 of 12
/// interleaved pairs (0.95x through `smr run`, 0.995x through the
/// snapshotter), node's the same 23.0 MB in about the same time; 4 MiB
/// fetched 2.6 MB more and was 9% slower in each of 12 pairs.
pub const GROUP_PREFETCH_BYTES: u64 = 3 << 20;
/// Largest writable segment of an ELF file queued on the first read of the
/// chunk that holds its header.
pub const ELF_SEGMENT_BYTES: u64 = 4 << 20;
/// Where a file can start inside a chunk (ext4 blocks).
const ELF_BLOCK: usize = 4096;
/// Most chunks queued as neighbours of one miss (zero chunks count).
const MAX_NEIGHBOURS: u64 = 64;
/// Most chunks in one worker's batch (its stored bytes are bounded by the
/// fetcher's largest request).
const MAX_BATCH: usize = 1024;
/// Worker threads per image: one batch each in flight, about as many as
/// the fetcher's request slots that prefetches may take.
const WORKERS: usize = 6;
/// Of those, the most that fetch the metadata at once: it is fetched in
/// the background of the mount and the start, whose own reads share the
/// link with it.
const BACKGROUND_WORKERS: usize = 2;

/// Chunks waiting to be fetched ahead.
#[derive(Debug, Default)]
struct Queues {
    /// The rest of files a container is reading, newest first.
    urgent: VecDeque<u64>,
    /// The metadata, in image order.
    background: VecDeque<u64>,
    /// Workers fetching from `background` now.
    background_running: usize,
}

/// One bit per chunk index, set at most once.
#[derive(Debug)]
pub(super) struct Bits(Vec<AtomicU64>);

impl Bits {
    pub(super) fn new(n: u64) -> Self {
        let words = usize::try_from(n.div_ceil(64)).unwrap_or(0);
        Bits((0..words).map(|_| AtomicU64::new(0)).collect())
    }

    /// Sets bit `i`; true if this call set it (false if set before or out
    /// of range).
    pub(super) fn set(&self, i: u64) -> bool {
        let Some(word) = usize::try_from(i / 64).ok().and_then(|w| self.0.get(w)) else {
            return false;
        };
        let bit = 1u64 << (i % 64);
        word.load(Ordering::Relaxed) & bit == 0 && word.fetch_or(bit, Ordering::Relaxed) & bit == 0
    }

    /// Whether bit `i` is set.
    pub(super) fn get(&self, i: u64) -> bool {
        usize::try_from(i / 64)
            .ok()
            .and_then(|w| self.0.get(w))
            .is_some_and(|w| w.load(Ordering::Relaxed) & (1 << (i % 64)) != 0)
    }

    /// Indices set here and not in `other`.
    fn without(&self, other: &Bits) -> impl Iterator<Item = u64> + '_ {
        let other: Vec<u64> = other.0.iter().map(|w| w.load(Ordering::Relaxed)).collect();
        self.0.iter().enumerate().flat_map(move |(w, word)| {
            let mut bits = word.load(Ordering::Relaxed) & !other.get(w).copied().unwrap_or(0);
            std::iter::from_fn(move || {
                (bits != 0).then(|| {
                    let b = bits.trailing_zeros();
                    bits &= bits - 1;
                    w as u64 * 64 + u64::from(b)
                })
            })
        })
    }
}

/// Prefetch state of one image: the queue, which chunks were queued,
/// fetched ahead and read.
#[derive(Debug)]
pub(super) struct Prefetch {
    queue: Mutex<Queues>,
    work: Condvar,
    stop: AtomicBool,
    started: OnceLock<()>,
    /// Whether misses inside files queue the rest of the file.
    pub(super) files: AtomicBool,
    /// Largest group of files queued whole ([`GROUP_PREFETCH_BYTES`]).
    pub(super) group_bytes: AtomicU64,
    queued: Bits,
    /// Chunks a prefetch or profile replay fetched from the store.
    pub(super) fetched: Bits,
    /// Chunks a reader asked for.
    pub(super) read: Bits,
    /// Chunks of the startup profile being replayed.
    pub(super) profiled: Bits,
    pub(super) chunks: AtomicU64,
    pub(super) bytes: AtomicU64,
    pub(super) failed: AtomicU64,
}

/// Stops a [`Prefetch`] when dropped.
#[derive(Debug)]
pub(super) struct StopOnDrop(pub(super) Arc<Prefetch>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.stop();
    }
}

impl Prefetch {
    /// State for an image of `chunk_count` chunks, file prefetch on.
    pub(super) fn new(chunk_count: u64) -> Self {
        Prefetch {
            queue: Mutex::new(Queues::default()),
            work: Condvar::new(),
            stop: AtomicBool::new(false),
            started: OnceLock::new(),
            files: AtomicBool::new(true),
            group_bytes: AtomicU64::new(GROUP_PREFETCH_BYTES),
            queued: Bits::new(chunk_count),
            fetched: Bits::new(chunk_count),
            read: Bits::new(chunk_count),
            profiled: Bits::new(chunk_count),
            chunks: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        }
    }

    /// Chunks fetched ahead that no reader asked for (yet).
    pub(super) fn unread(&self) -> impl Iterator<Item = u64> + '_ {
        self.fetched.without(&self.read)
    }

    /// Whether [`Prefetch::stop`] was called (the image is gone).
    pub(super) fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Stops the workers (they finish the fetch they are in).
    pub(super) fn stop(&self) {
        // Under the lock, so that no worker is between its check of
        // `stop` and its wait.
        let _q = self.lock();
        self.stop.store(true, Ordering::Relaxed);
        self.work.notify_all();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queues> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Inner {
    /// Queues stored chunks `indices` that were never queued, at the back
    /// of the queue, or at its front if `urgent` (a container's miss just
    /// asked for their file), and starts the workers on first use.
    pub(super) fn queue_prefetch(
        self: &Arc<Self>,
        indices: impl IntoIterator<Item = u64>,
        urgent: bool,
    ) {
        let p = &self.prefetch;
        let new: Vec<u64> = indices
            .into_iter()
            .filter(|&c| self.img.recipe.entry(c).is_some() && p.queued.set(c))
            .collect();
        let added = new.len();
        if added == 0 {
            return;
        }
        let mut q = p.lock();
        if urgent {
            for &c in new.iter().rev() {
                q.urgent.push_front(c);
            }
        } else {
            q.background.extend(new);
        }
        drop(q);
        p.started.get_or_init(|| {
            for i in 0..WORKERS {
                let (me, state) = (Arc::downgrade(self), p.clone());
                let spawned = std::thread::Builder::new()
                    .name(format!("smr-prefetch-{i}"))
                    .spawn(move || worker(&me, &state));
                if let Err(e) = spawned {
                    tracing::warn!(error = %e, "cannot start a prefetch thread");
                }
            }
        });
        for _ in 0..added.min(WORKERS) {
            p.work.notify_one();
        }
    }

    /// After a demand miss of chunk `index`: the rest of its file, if it is
    /// in one that spans several chunks and the chunk is not in the
    /// startup profile being replayed (which knows better what is read).
    /// One past the last neighbour that a miss in chunk `index` brings
    /// (`index + 1`: none, when the file-map prefetch is off or the chunk
    /// is the profile's). Small files next to each other are usually of
    /// one directory: the neighbours of a miss in the file data,
    /// [`NEIGHBOUR_BYTES`] of them as stored (what the link carries:
    /// compressed chunks reach further).
    pub(super) fn neighbours_end(&self, index: u64) -> u64 {
        let recipe = &self.img.recipe;
        let map = match &recipe.file_map {
            Some(map) if self.prefetch.files.load(Ordering::Relaxed) => map,
            _ => return index + 1,
        };
        if self.prefetch.profiled.get(index) {
            return index + 1;
        }
        let mut end = index + 1;
        let mut bytes = 0u64;
        while end < map.metadata_chunk && bytes < NEIGHBOUR_BYTES && end - index <= MAX_NEIGHBOURS {
            bytes += recipe.entry(end).map_or(0, |e| u64::from(e.stored_len));
            end += 1;
        }
        end
    }

    /// Marks chunk `index` delivered to the kernel (read, or stored in
    /// its page cache ahead of a reader); on its first delivery, a chunk
    /// fetched ahead moves the window ahead of the reader (the rest of its
    /// file, its neighbours: [`Inner::prefetch_file`]) and, given its
    /// bytes, an ELF header in it queues its writable segments
    /// ([`Inner::prefetch_elf`]). Returns whether it was the first.
    pub(super) fn first_delivery(self: &Arc<Self>, index: u64, data: Option<&[u8]>) -> bool {
        if !self.prefetch.read.set(index) {
            return false;
        }
        if self.prefetch.fetched.get(index) {
            self.prefetch_file(index);
        }
        if let Some(d) = data {
            self.prefetch_elf(index, d);
        }
        true
    }

    pub(super) fn prefetch_file(self: &Arc<Self>, index: u64) {
        if !self.prefetch.files.load(Ordering::Relaxed) || self.prefetch.profiled.get(index) {
            return;
        }
        let recipe = &self.img.recipe;
        let Some(map) = &recipe.file_map else {
            return;
        };
        // The other files of its directory, if they are few: a start reads
        // many of one directory's small files one after another (a
        // package's modules), each a miss of its own otherwise. Queued
        // first, so that the file's own chunks (queued next) go ahead.
        if let Some(group) = map.group_at(index) {
            let budget = self.prefetch.group_bytes.load(Ordering::Relaxed);
            let mut stored = 0u64;
            let small = group.range().all(|c| {
                stored += recipe.entry(c).map_or(0, |e| u64::from(e.stored_len));
                stored <= budget
            });
            if small {
                self.queue_prefetch(group.range().filter(|&c| c != index), true);
            }
        }
        let mut end = self.neighbours_end(index);
        if let Some(run) = map.file_at(index) {
            // The rest of the file, up to FILE_PREFETCH_BYTES of it.
            let limit = recipe
                .chunk_start(index + 1)
                .saturating_add(FILE_PREFETCH_BYTES);
            let max = recipe.chunk_of(limit).max(index + 2) - (index + 1);
            end = end.max(run.range().end.min(index + 1 + max));
        }
        self.queue_prefetch(index + 1..end, true);
    }
}

impl Inner {
    /// On the first read of chunk `index` (its plaintext `data`): the
    /// writable segments of at most [`ELF_SEGMENT_BYTES`] of each ELF file
    /// that starts in it at a block boundary (see [`crate::elf`]), placed
    /// by their file offsets within the run of chunks of the file that
    /// starts in this chunk. The loader reads the header, then relocates:
    /// queued now, a segment is on its way before the loader touches it.
    /// A wrong guess costs bytes, never a read: these are prefetches.
    pub(super) fn prefetch_elf(self: &Arc<Self>, index: u64, data: &[u8]) {
        if !self.prefetch.files.load(Ordering::Relaxed) || self.prefetch.profiled.get(index) {
            return;
        }
        let recipe = &self.img.recipe;
        let Some(run) = recipe.file_map.as_ref().and_then(|m| m.file_at(index)) else {
            return;
        };
        let start = recipe.chunk_start(index);
        for at in (0..data.len()).step_by(ELF_BLOCK) {
            let Some(head) = data.get(at..) else {
                break;
            };
            for seg in crate::elf::writable_segments(head) {
                let (Some(lo), Some(hi)) = (
                    (start + at as u64).checked_add(seg.start),
                    (start + at as u64).checked_add(seg.end),
                ) else {
                    continue;
                };
                if seg.end - seg.start > ELF_SEGMENT_BYTES || hi > recipe.image_size {
                    continue;
                }
                // All-zero blocks are not stored (a file's holes), so the
                // segment lies at most that much before where its offsets
                // say: past the file's last chunk, it is moved back to end
                // there, a chunk wider.
                let (mut first, mut end) = (recipe.chunk_of(lo), recipe.chunk_of(hi - 1) + 1);
                let run = run.range();
                if end > run.end {
                    first = first.saturating_sub(end - run.end + 1);
                    end = run.end;
                }
                if first > index && first < end {
                    self.queue_prefetch(first..end, true);
                }
            }
        }
    }
}

/// Fetches queued chunks until the last [`LazyImage`] handle is dropped
/// (which stops `p`). It holds the image only while it fetches.
fn worker(me: &Weak<Inner>, p: &Prefetch) {
    while let Some((batch, background)) = next_batch(me, p) {
        if let Some(inner) = me.upgrade() {
            inner.fetch_batch(&batch, p);
        }
        if background {
            p.lock().background_running -= 1;
            p.work.notify_one();
        }
    }
}

/// Waits for queued chunks and takes the first with the neighbours queued
/// after it: consecutive stored chunks (zero chunks between them
/// skipped), as many as one request of the image's fetcher spans as
/// stored; the urgent queue first, the background one only while
/// fewer than [`BACKGROUND_WORKERS`] fetch from it. Says whether the batch
/// is a background one. `None` once stopped or the image is gone.
fn next_batch(me: &Weak<Inner>, p: &Prefetch) -> Option<(Vec<u64>, bool)> {
    let mut q = p.lock();
    loop {
        if p.stop.load(Ordering::Relaxed) {
            return None;
        }
        let background = q.urgent.is_empty();
        if background && q.background_running >= BACKGROUND_WORKERS {
            q = p.work.wait(q).unwrap_or_else(PoisonError::into_inner);
            continue;
        }
        let from = if background {
            &mut q.background
        } else {
            &mut q.urgent
        };
        if let Some(first) = from.pop_front() {
            // Not held while waiting: the image goes when its last handle
            // does.
            let inner = me.upgrade()?;
            let max = inner.fetcher.options().max_request;
            // Stored bytes, not chunks: the metadata compresses to a few
            // hundred bytes a chunk, and the chunks an ext4 mount reads
            // first (the superblock's, the root inode's) then come in the
            // first requests.
            let stored = |c: u64| {
                inner
                    .img
                    .recipe
                    .entry(c)
                    .map_or(0, |e| u64::from(e.stored_len))
            };
            // Zero chunks between two queued ones are not stored: the two
            // are next to each other where the store keeps them in order.
            let next_to =
                |a: u64, b: u64| b > a && (a + 1..b).all(|c| inner.img.recipe.entry(c).is_none());
            let mut batch = vec![first];
            let mut bytes = stored(first);
            while let Some(&next) = from.front() {
                bytes += stored(next);
                let last = batch[batch.len() - 1];
                if !next_to(last, next) || bytes > max || batch.len() >= MAX_BATCH {
                    break;
                }
                batch.push(next);
                from.pop_front();
            }
            if background {
                q.background_running += 1;
            }
            return Some((batch, background));
        }
        q = p.work.wait(q).unwrap_or_else(PoisonError::into_inner);
    }
}

impl Inner {
    /// Fetches the chunks `batch` into the cache: planned together (one
    /// request where the store allows), then each taken in order.
    fn fetch_batch(&self, batch: &[u64], p: &Prefetch) {
        let todo: Vec<(usize, smr_format::ChunkEntry)> = batch
            .iter()
            .filter_map(|&c| self.locate(c))
            .filter_map(|(pos, _)| Some((pos, *self.img.recipe.chunks.get(pos)?)))
            .filter(|(_, e)| !self.cache.contains(&e.id))
            .collect();
        let wants: Vec<_> = todo
            .iter()
            .filter_map(|(_, e)| Some((e.id, self.fetcher.store().locate(&e.id).ok()?)))
            .collect();
        self.fetcher
            .plan(&wants, crate::fetch::Priority::Prefetch, |id| {
                self.cache.is_missing(id)
            });
        for (pos, e) in todo {
            if let Err(err) = self.prefetch_pos(pos) {
                p.failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(chunk = %e.id, index = e.index, error = %err, "prefetch failed; the reads of this chunk will retry");
            }
        }
    }
}

impl LazyImage {
    /// Queues the filesystem's metadata for prefetch: the chunks before
    /// the first file data and the metadata region at the end (from the
    /// recipe's file map; nothing for a recipe without one).
    pub fn prefetch_metadata(&self) {
        let recipe = &self.inner.img.recipe;
        let Some(map) = &recipe.file_map else {
            return;
        };
        let header = recipe.chunk_of(smr_format::filemap::HEADER_BYTES - 1) + 1;
        let chunks = recipe.chunk_count();
        self.inner
            .queue_prefetch((0..header).chain(map.metadata_chunk..chunks), false);
    }

    /// Whether a miss inside a file prefetches the rest of the file (on by
    /// default).
    pub fn set_file_prefetch(&self, on: bool) {
        self.inner.prefetch.files.store(on, Ordering::Relaxed);
    }

    /// Whether the file map's prefetch is on ([`LazyImage::set_file_prefetch`]).
    pub fn file_prefetch(&self) -> bool {
        self.inner.prefetch.files.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_set_once_and_difference() {
        let a = Bits::new(130);
        assert!(a.set(0) && a.set(64) && a.set(129));
        assert!(!a.set(64));
        assert!(!a.set(192), "out of range");
        assert!(a.get(129) && !a.get(1));
        let b = Bits::new(130);
        b.set(64);
        assert_eq!(a.without(&b).collect::<Vec<_>>(), vec![0, 129]);
    }
}
