//! Startup profiles on a lazy image: recording which chunks a start reads
//! (in first-read order) and replaying that list with many fetches in
//! flight, ahead of the reads (the format: [`smr_format::profile`]).
//!
//! Why: a starting container reads one file after another, so its misses
//! reach the store one or two at a time and each pays a round trip. The
//! same chunks requested all at once are bandwidth-bound instead (the
//! registry store coalesces the adjacent ones into ranged requests).
//!
//! Replay only warms the node cache (disk tier, ciphertext): each chunk is
//! verified by the cache like any fetch, and the container's own reads
//! join a replay fetch in flight through single flight, or find the chunk
//! in the cache. A failed replay fetch is logged and left to the reader,
//! who retries it and gets the error if it persists.

use super::prefetch::Bits;
use super::{Inner, LazyImage};
use smr_format::startup::{push_block, BlockRun, BLOCK};
use smr_format::Profile;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Instant;

/// Threads a replay fetches with: enough to keep the store's request slots
/// (16 for a registry) full and give it neighbours to coalesce.
pub const DEFAULT_REPLAY_THREADS: usize = 32;

/// Records the chunk indices and the 4 KiB blocks read from an image, in
/// first-read order.
#[derive(Debug)]
pub struct Recorder {
    seen: Bits,
    order: Mutex<Vec<u64>>,
    blocks_seen: Bits,
    blocks: Mutex<Vec<BlockRun>>,
}

impl Recorder {
    fn new(chunk_count: u64, image_size: u64) -> Self {
        Recorder {
            seen: Bits::new(chunk_count),
            order: Mutex::new(Vec::new()),
            blocks_seen: Bits::new(image_size.div_ceil(BLOCK)),
            blocks: Mutex::new(Vec::new()),
        }
    }

    /// Notes a read of the image bytes `[offset, end)`: the blocks it
    /// touches that no read touched before, appended in order (a block
    /// following the last one recorded extends its run).
    pub(super) fn touch_blocks(&self, offset: u64, end: u64) {
        if end <= offset {
            return;
        }
        let mut new = (offset / BLOCK..end.div_ceil(BLOCK)).filter(|&b| self.blocks_seen.set(b));
        let Some(first) = new.next() else {
            return;
        };
        let mut runs = self.blocks.lock().unwrap_or_else(PoisonError::into_inner);
        for b in std::iter::once(first).chain(new) {
            push_block(&mut runs, b);
        }
    }

    /// Block runs read so far, in first-read order.
    pub fn blocks(&self) -> Vec<BlockRun> {
        self.blocks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Notes a read of chunk `index` (cheap when already seen).
    pub(super) fn touch(&self, index: u64) {
        if self.seen.set(index) {
            self.order
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(index);
        }
    }

    /// Indices read so far, in first-read order.
    pub fn chunks(&self) -> Vec<u64> {
        self.order
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// What a replay did.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct ReplayStats {
    /// Whether the replay fetched a startup pack (then `chunks` and the
    /// counts below are the pack's chunks).
    pub startup_pack: bool,
    /// Stored chunks the profile lists.
    pub chunks: u64,
    /// Of those, fetched by the replay (or by a reader it then joined).
    pub fetched: u64,
    /// Already in the node cache when the replay came to them.
    pub cached: u64,
    /// Fetches that failed (left to the readers).
    pub failed: u64,
    /// Seconds from the replay's start until its last fetch finished
    /// (`None` if it was stopped before).
    pub seconds: Option<f64>,
}

/// A replay running in the background; stopped (not waited for) on drop.
#[derive(Debug)]
pub struct Replay {
    state: Arc<ReplayState>,
    threads: Vec<JoinHandle<()>>,
}

#[derive(Debug)]
struct ReplayState {
    /// Chunk table positions, or pack chunk numbers if `pack`.
    positions: Vec<usize>,
    pack: bool,
    next: AtomicUsize,
    stop: AtomicBool,
    fetched: AtomicU64,
    cached: AtomicU64,
    failed: AtomicU64,
    running: AtomicUsize,
    started: Instant,
    seconds: Mutex<Option<f64>>,
}

impl Replay {
    /// Counters so far.
    pub fn stats(&self) -> ReplayStats {
        let s = &self.state;
        ReplayStats {
            startup_pack: s.pack,
            chunks: s.positions.len() as u64,
            fetched: s.fetched.load(Ordering::Relaxed),
            cached: s.cached.load(Ordering::Relaxed),
            failed: s.failed.load(Ordering::Relaxed),
            seconds: *s.seconds.lock().unwrap_or_else(PoisonError::into_inner),
        }
    }

    /// Waits until every listed chunk was handled; returns the counters.
    pub fn wait(mut self) -> ReplayStats {
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        self.stats()
    }
}

impl Drop for Replay {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::Relaxed);
    }
}

impl LazyImage {
    /// Starts recording the chunks read from now on (by `read_at`,
    /// `read_parts`; not by prefetches). Idempotent.
    pub fn record(&self) -> Arc<Recorder> {
        let (chunks, size) = (self.grid().count(), self.size());
        self.inner
            .recorder
            .get_or_init(|| Arc::new(Recorder::new(chunks, size)))
            .clone()
    }

    /// The profile of what was read since [`LazyImage::record`] (zero
    /// chunks and their blocks left out: they are never fetched), bound to
    /// the recipe whose bytes hash to `recipe_sha256`. `None` when not
    /// recording.
    pub fn recorded_profile(&self, recipe_sha256: [u8; 32]) -> Option<Profile> {
        let rec = self.inner.recorder.get()?;
        let chunks = rec
            .chunks()
            .into_iter()
            .filter(|&c| self.inner.locate(c).is_some())
            .collect();
        let grid = self.grid();
        let stored = |b: u64| self.inner.locate(grid.index_of(b * BLOCK)).is_some();
        let mut blocks: Vec<BlockRun> = Vec::new();
        for r in rec.blocks() {
            for b in (r.first..r.first + u64::from(r.count)).filter(|&b| stored(b)) {
                push_block(&mut blocks, b);
            }
        }
        let mut p = Profile::new(recipe_sha256, chunks);
        p.blocks = blocks;
        Some(p)
    }

    /// Fetches the profile's chunks into the node cache in its order, from
    /// `threads` threads, in the background. Indices beyond the image and
    /// zero chunks are skipped. The caller checks that the profile belongs
    /// to this image's recipe ([`Profile::check_recipe`]).
    ///
    /// With a startup pack in use ([`LazyImage::use_startup_pack`]) the
    /// pack's chunks are fetched instead, queued all at once so that they
    /// arrive in a few large ranged reads, in the order the start reads
    /// them.
    pub fn replay(&self, profile: &Profile, threads: usize) -> Replay {
        for &c in &profile.chunks {
            self.inner.prefetch.profiled.set(c);
        }
        let pack = self.inner.startup.get().map(|s| s.chunks.len());
        let positions: Vec<usize> = match pack {
            Some(n) => {
                self.inner.plan_pack();
                (0..n).collect()
            }
            None => profile
                .chunks
                .iter()
                .filter_map(|&c| self.inner.locate(c).map(|(pos, _)| pos))
                .collect(),
        };
        let n = threads.clamp(1, positions.len().max(1));
        let state = Arc::new(ReplayState {
            positions,
            pack: pack.is_some(),
            next: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            fetched: AtomicU64::new(0),
            cached: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            running: AtomicUsize::new(n),
            started: Instant::now(),
            seconds: Mutex::new(None),
        });
        tracing::debug!(
            chunks = state.positions.len(),
            threads = n,
            "replaying startup profile"
        );
        let threads = (0..n)
            .filter_map(|i| {
                let (inner, state) = (self.inner.clone(), state.clone());
                std::thread::Builder::new()
                    .name(format!("smr-replay-{i}"))
                    .spawn(move || replay_worker(&inner, &state))
                    .map_err(|e| tracing::warn!(error = %e, "cannot start a replay thread"))
                    .ok()
            })
            .collect();
        Replay { state, threads }
    }
}

fn replay_worker(inner: &Inner, s: &ReplayState) {
    while !s.stop.load(Ordering::Relaxed) {
        let i = s.next.fetch_add(1, Ordering::Relaxed);
        let Some(&pos) = s.positions.get(i) else {
            break;
        };
        if s.pack {
            match inner.prefetch_pack(pos) {
                Ok(true) => s.fetched.fetch_add(1, Ordering::Relaxed),
                Ok(false) => s.cached.fetch_add(1, Ordering::Relaxed),
                Err(err) => {
                    tracing::warn!(pack_chunk = pos, error = %err, "profile replay: startup pack chunk failed; its blocks are read from the image");
                    s.failed.fetch_add(1, Ordering::Relaxed)
                }
            };
            continue;
        }
        let Some(e) = inner.img.recipe.chunks.get(pos) else {
            continue;
        };
        if inner.cache.contains(&e.id) {
            s.cached.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        match inner.prefetch_pos(pos) {
            Ok(()) => {
                s.fetched.fetch_add(1, Ordering::Relaxed);
            }
            Err(err) => {
                s.failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(chunk = %e.id, index = e.index, error = %err, "profile replay: fetch failed; the reads of this chunk will retry");
            }
        }
    }
    if s.running.fetch_sub(1, Ordering::AcqRel) == 1 && !s.stop.load(Ordering::Relaxed) {
        *s.seconds.lock().unwrap_or_else(PoisonError::into_inner) =
            Some(s.started.elapsed().as_secs_f64());
    }
}
