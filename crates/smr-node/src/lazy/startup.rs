//! Serving a startup pack ([`smr_format::startup`]): the blocks a start
//! reads, fetched as a few large ranged reads of one blob, in the order
//! the start reads them.
//!
//! A read whose blocks are all in the pack, of an image chunk in neither
//! cache tier, is served from the pack's chunks (fetched through the
//! image's fetcher and node cache like any chunk, so verified against
//! their names, cached and shared). Everything else takes the image's own
//! chunks. A pack chunk that cannot be fetched or verified is marked
//! broken: the reads of its blocks go to the image's chunks from then on,
//! so a damaged pack costs bytes, never a wrong or failed read.
//!
//! Exported through FUSE ([`crate::device::BlockDevice::exported`]), the
//! image also stores the pack's blocks in the kernel's page cache of its
//! file as the pack arrives, in pack order, from one thread: a loop device
//! reading the file through the page cache then finds them there, and the
//! start's reads of them never wait for a FUSE request (thousands of small
//! ones for a runtime that faults its libraries in page by page).

use super::prefetch::Bits;
use super::{Inner, LazyImage};
use crate::cache::{CacheError, DecodeKey, Pin};
use crate::chunks::ChunkError;
use crate::device::PageSink;
use crate::fetch::Priority;
use smr_format::startup::{
    open_pack_chunk, pack_spans, total_blocks, BlockMap, PackDecoder, PackSpan, StartupPack, BLOCK,
};
use smr_format::{ChunkKey, FormatError, Profile};
use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};

/// The startup pack an image serves blocks from.
pub(super) struct Startup {
    /// The pack as the profile lists it.
    pack: StartupPack,
    /// Decodes the pack's zstd streams, one chunk after another.
    decoder: Mutex<PackDecoder>,
    map: BlockMap,
    /// Each pack chunk's name, key and lengths, in pack order.
    pub(super) chunks: Vec<DecodeKey>,
    /// Blocks per pack chunk.
    piece: u64,
    /// Pack chunks that failed: their blocks come from the image's chunks.
    broken: Bits,
    /// Bytes the pack holds.
    bytes: u64,
    /// Where the image's blocks sit in the pack, in pack order.
    spans: Vec<PackSpan>,
    /// The pack's chunks kept through evictions while the image is served.
    _pin: Option<Pin>,
}

impl LazyImage {
    /// Serves the blocks of `profile`'s startup pack from it from now on
    /// (until their image chunks are cached); returns the number of pack
    /// chunks, 0 if the profile has no pack. Fails if the pack was not made
    /// with this recipe's keys (see [`Profile::check_pack`]), lists blocks
    /// outside the image, or the image is not encrypted (a pack is trusted
    /// only through the recipe's keys). Call it before reads start; a
    /// second pack is refused.
    pub fn use_startup_pack(&self, profile: &Profile) -> Result<usize, FormatError> {
        let Some(pack) = &profile.pack else {
            return Ok(0);
        };
        let secret = self.inner.img.pack_secret().ok_or_else(|| {
            FormatError::Profile(
                "a startup pack is used only with an encrypted recipe and its keys".into(),
            )
        })?;
        profile.check_pack(&secret)?;
        let map = BlockMap::new(&profile.blocks, self.size() / BLOCK)?;
        let total = total_blocks(&profile.blocks);
        let chunks: Vec<DecodeKey> = pack
            .chunks
            .iter()
            .enumerate()
            .map(|(i, c)| DecodeKey {
                id: c.id,
                key: Some(
                    secret
                        .chunk_key(&profile.blocks, pack.piece_blocks, i as u64)
                        .0,
                ),
                compressed: c.compressed,
                plain_len: pack.plain_len(i, total) as u32,
            })
            .collect();
        let pin = self
            .inner
            .cache
            .pin(chunks.iter().map(|k| k.id))
            .map_err(|e| tracing::warn!(error = %e, "could not pin the startup pack in the cache"))
            .ok();
        let n = chunks.len();
        let startup = Startup {
            pack: pack.clone(),
            decoder: Mutex::new(PackDecoder::new()),
            map,
            broken: Bits::new(n as u64),
            bytes: total * BLOCK,
            spans: pack_spans(&profile.blocks, pack.piece_blocks),
            chunks,
            piece: u64::from(pack.piece_blocks),
            _pin: pin,
        };
        self.inner
            .startup
            .set(startup)
            .map_err(|_| FormatError::Profile("this image serves a startup pack already".into()))?;
        tracing::debug!(chunks = n, blocks = total, pack = %pack.blob_digest(), "serving from the startup pack");
        self.start_seeding();
        Ok(n)
    }

    /// Hands the image the page cache of the file it is exported as: with
    /// a startup pack, the pack's blocks are stored there (see the module
    /// doc). A second call is ignored.
    pub fn seed_pages(&self, pages: Arc<dyn PageSink>) {
        if self.inner.pages.set(pages).is_ok() {
            self.start_seeding();
        }
    }

    /// Starts the thread that stores the pack's blocks in the page cache,
    /// once there are both a pack and a page cache.
    fn start_seeding(&self) {
        let i = &self.inner;
        if i.startup.get().is_none()
            || i.pages.get().is_none()
            || i.seeding.swap(true, Ordering::AcqRel)
        {
            return;
        }
        let inner = self.inner.clone();
        let spawned = std::thread::Builder::new()
            .name("smr-seed".into())
            .spawn(move || inner.seed());
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the thread that stores the startup pack in the page cache");
        }
    }

    /// Bytes of the startup pack's blocks (0 without a pack): what a
    /// start served from it reads, about.
    pub fn startup_pack_bytes(&self) -> u64 {
        self.inner.startup.get().map_or(0, |s| s.bytes)
    }
}

impl Inner {
    /// Whether the piece `[lo, hi)` of chunk `c` is to be served from the
    /// startup pack: chunk `c` is stored, in neither cache tier, and every
    /// block of the piece is in the pack, in a pack chunk not broken.
    pub(super) fn served_from_pack(&self, c: u64, lo: u64, hi: u64) -> bool {
        let Some(s) = self.startup.get() else {
            return false;
        };
        hi > lo
            && (lo / BLOCK..hi.div_ceil(BLOCK))
                .all(|b| s.map.locate(b).is_some_and(|p| !s.broken.get(p / s.piece)))
            && self.is_missing(c)
    }

    /// The image bytes `[lo, hi)` from the startup pack: a range of one
    /// pack chunk when they are consecutive there, else copied block by
    /// block. `None` (logged, the pack chunk marked broken) if a pack chunk
    /// fails: the caller reads the image's chunk instead.
    pub(super) fn pack_read(&self, lo: u64, hi: u64) -> Option<(Arc<Vec<u8>>, Range<usize>)> {
        let s = self.startup.get()?;
        let at = |x: u64| {
            s.map
                .locate(x / BLOCK)
                .map(|p| (p / s.piece, (p % s.piece) * BLOCK + x % BLOCK))
        };
        // One slice when every block sits right after the one before it in
        // the pack, within one pack chunk. (The ends alone would not do: a
        // start that read a block's neighbours in another order leaves
        // them permuted in between.)
        let (b0, b1) = (lo / BLOCK, (hi - 1) / BLOCK);
        let p0 = s.map.locate(b0)?;
        let consecutive = p0 / s.piece == (p0 + b1 - b0) / s.piece
            && (b0 + 1..=b1).all(|b| s.map.locate(b) == Some(p0 + b - b0));
        if consecutive {
            let (c0, o0) = at(lo)?;
            let d = self.pack_chunk(s, c0)?;
            return Some((d, o0 as usize..(o0 + hi - lo) as usize));
        }
        let mut out = Vec::with_capacity((hi - lo) as usize);
        let mut x = lo;
        while x < hi {
            let (c, o) = at(x)?;
            let n = (hi.min((x / BLOCK + 1) * BLOCK) - x) as usize;
            let d = self.pack_chunk(s, c)?;
            out.extend_from_slice(d.get(o as usize..o as usize + n)?);
            x += n as u64;
        }
        let n = out.len();
        Some((Arc::new(out), 0..n))
    }

    /// The plaintext of pack chunk `i` (fetched on demand if the replay has
    /// not brought it yet); `None` and marked broken if it fails.
    fn pack_chunk(&self, s: &Startup, i: u64) -> Option<Arc<Vec<u8>>> {
        let idx = usize::try_from(i).ok()?;
        let key = s.chunks.get(idx)?;
        let r = self.cache.get_decoded(
            key,
            true,
            || self.fetch(&key.id, Priority::Demand),
            |stored| match s.pack.in_stream(idx) {
                true => self.decode_in_stream(s, idx, stored),
                false => open(s, idx, stored, &mut PackDecoder::new()),
            },
        );
        match r {
            Ok(d) if d.len() == key.plain_len as usize => Some(d),
            Ok(d) => {
                self.pack_broken(s, i, &format!("decoded to {} bytes", d.len()));
                None
            }
            Err(e) => {
                self.pack_broken(s, i, &e.to_string());
                None
            }
        }
    }

    /// Stores every block of the startup pack in the page cache
    /// ([`LazyImage::seed_pages`]), in pack order, each pack chunk as soon
    /// as it is in the node cache (fetched here if the replay has not
    /// asked for it yet). Skips the blocks of a pack chunk that fails
    /// (their reads go to the image's chunks); ends early once the image
    /// is dropped or when the page cache refuses a store (the export is
    /// gone).
    fn seed(&self) {
        let (Some(s), Some(pages)) = (self.startup.get(), self.pages.get()) else {
            return;
        };
        let mut current: Option<(u64, Option<Arc<Vec<u8>>>)> = None;
        for span in &s.spans {
            if current.as_ref().map(|c| c.0) != Some(span.chunk) {
                if self.prefetch.stopped() {
                    return;
                }
                let data = self.seed_chunk(s, span.chunk);
                current = Some((span.chunk, data));
            }
            let Some((_, Some(d))) = &current else {
                continue;
            };
            let Some(bytes) = d.get(span.at as usize..(span.at + span.len) as usize) else {
                continue;
            };
            if let Err(e) = pages.store(span.image, bytes) {
                tracing::debug!(offset = span.image, error = %e, "page cache refused the startup pack's blocks; no more are stored");
                return;
            }
            self.bytes_seeded.fetch_add(span.len, Ordering::Relaxed);
        }
        tracing::debug!(
            bytes = self.bytes_seeded.load(Ordering::Relaxed),
            "startup pack stored in the page cache"
        );
    }

    /// Pack chunk `i`'s plaintext for [`Inner::seed`]; `None` if it is
    /// broken or fails now.
    fn seed_chunk(&self, s: &Startup, i: u64) -> Option<Arc<Vec<u8>>> {
        if s.broken.get(i) {
            return None;
        }
        if let Err(e) = self.prefetch_pack(usize::try_from(i).ok()?) {
            tracing::debug!(pack_chunk = i, error = %e, "startup pack chunk not stored in the page cache");
            return None;
        }
        self.pack_chunk(s, i)
    }

    /// Decodes pack chunk `i` of a zstd stream from its verified stored
    /// bytes: in the image's one decoder, after the chunks before it in
    /// its stream that the decoder has not just decoded (each kept in the
    /// memory tier on the way, as the next reads want them). A chunk that
    /// fails on the way breaks it and the rest of its stream, whose blocks
    /// are then read from the image's chunks.
    ///
    /// The chunks before it are awaited first, without the decoder: a read
    /// ahead of the download must not hold up, until its chunk arrives,
    /// the reads and the page-cache stores of the chunks that arrive
    /// before it.
    fn decode_in_stream(
        &self,
        s: &Startup,
        i: usize,
        stored: Vec<u8>,
    ) -> Result<Vec<u8>, ChunkError> {
        let start = s.pack.stream_start(i);
        for kj in s.chunks.get(start..i).unwrap_or_default() {
            if self.cache.is_missing(&kj.id) && !self.cache.in_memory(kj) {
                // A failure is reported by the walk below, which tries again.
                let _ = self
                    .cache
                    .get_or_fetch(&kj.id, || self.fetch(&kj.id, Priority::Demand));
            }
        }
        let mut decoder = s.decoder.lock().unwrap_or_else(PoisonError::into_inner);
        // Decoded by another reader's walk while this one waited.
        if let Some(plain) = s.chunks.get(i).and_then(|k| self.cache.kept(k)) {
            return Ok(plain.to_vec());
        }
        let from = decoder
            .next()
            .filter(|n| (start..=i).contains(n))
            .unwrap_or(start);
        for j in from..i {
            let Some(kj) = s.chunks.get(j) else { break };
            let r = self
                .cache
                .get_or_fetch(&kj.id, || self.fetch(&kj.id, Priority::Demand))
                .map_err(|e| {
                    ChunkError::Format(FormatError::ChunkDecode {
                        id: kj.id,
                        reason: e.to_string(),
                    })
                })
                .and_then(|stored| open(s, j, stored.to_vec(), &mut decoder));
            match r {
                Ok(plain) => self.cache.keep(kj, &Arc::new(plain)),
                Err(e) => {
                    let why = format!("pack chunk {j}, before it in its zstd stream, failed: {e}");
                    for k in j..s.pack.stream_end(i) {
                        self.pack_broken(s, k as u64, &why);
                    }
                    return Err(e);
                }
            }
        }
        let r = open(s, i, stored, &mut decoder);
        if let Err(e) = &r {
            let why = format!("pack chunk {i}, before it in its zstd stream, failed: {e}");
            for k in i + 1..s.pack.stream_end(i) {
                self.pack_broken(s, k as u64, &why);
            }
        }
        r
    }

    fn pack_broken(&self, s: &Startup, i: u64, why: &str) {
        if s.broken.set(i) {
            let id = s.chunks.get(i as usize).map(|k| k.id);
            tracing::warn!(pack_chunk = i, chunk = ?id, error = why, "startup pack chunk unusable: its blocks are read from the image's chunks");
        }
    }

    /// Fetches pack chunk `i` into the node cache ahead of the reads,
    /// counted as prefetched.
    pub(super) fn prefetch_pack(&self, i: usize) -> Result<bool, CacheError> {
        let Some(key) = self.startup.get().and_then(|s| s.chunks.get(i)) else {
            return Ok(false);
        };
        if self.cache.contains(&key.id) {
            return Ok(false);
        }
        self.cache
            .get_or_fetch(&key.id, || {
                let bytes = self.fetch(&key.id, Priority::Prefetch)?;
                self.prefetch.chunks.fetch_add(1, Ordering::Relaxed);
                let n = bytes.len() as u64;
                self.prefetch.bytes.fetch_add(n, Ordering::Relaxed);
                Ok(bytes)
            })
            .map(|_| true)
    }

    /// Queues every pack chunk with the fetcher at once as a stream, in
    /// pack order: one large ranged read at a time, its chunks handed out
    /// as they arrive, so the start's reads follow the download.
    pub(super) fn plan_pack(&self) {
        let Some(s) = self.startup.get() else {
            return;
        };
        let store = self.fetcher.store();
        let wants: Vec<_> = s
            .chunks
            .iter()
            .filter_map(|k| store.locate(&k.id).ok().map(|e| (k.id, e)))
            .collect();
        self.fetcher
            .plan_stream(&wants, |id| self.cache.is_missing(id));
    }
}

/// Decrypts and decodes pack chunk `i`, which the cache has verified.
fn open(
    s: &Startup,
    i: usize,
    stored: Vec<u8>,
    decoder: &mut PackDecoder,
) -> Result<Vec<u8>, ChunkError> {
    let key = s
        .chunks
        .get(i)
        .and_then(|k| Some((ChunkKey(k.key?), k.plain_len)));
    let Some((key, len)) = key else {
        return Err(FormatError::Profile(format!("startup pack chunk {i} has no key")).into());
    };
    Ok(open_pack_chunk(
        &s.pack,
        &s.spans,
        i,
        &key,
        stored,
        len as usize,
        decoder,
    )?)
}
