//! Startup packs: the 4 KiB blocks a start reads, in the order it first
//! reads them, sealed into chunks of their own (docs/FORMAT.md §6).
//!
//! A chunk-granular profile makes a node fetch every chunk a start
//! touches, whole; a start that reads one page of a 64 KiB chunk (or a few
//! pages of a 256 KiB one) pays for all of it. The startup pack holds
//! exactly the blocks read, in first-read order, so a node fetches them in
//! a few large ranged reads of one blob and the container's first reads
//! are the first bytes to arrive. The image's own chunks are unchanged
//! (dedup and determinism stay); a block is served from the pack only
//! while its image chunk is not at hand.
//!
//! **Trust.** A profile is not signed like the artifact, so the pack's
//! chunk list carries a tag: HMAC-SHA-256 under a secret derived from
//! every key of the recipe's key table ([`PackSecret`]). Only whoever can
//! open the recipe can make a pack a node accepts, and every pack chunk is
//! checked against its name like any chunk. Pack chunk `i` is encrypted
//! with a key derived from the same secret, the block list and `i`: the
//! key determines the plaintext (the recipe keys name the image's content,
//! the block list which of its blocks), so a key never encrypts two
//! different texts. Images without encryption get no startup pack.

use crate::chunk::{
    decode_verified, decrypt_verified, seal_encoded_with_key, ChunkId, ChunkKey, SealedChunk,
};
use crate::error::{FormatError, Result};
use crate::varint;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

mod stream;
mod x86;
pub use stream::{PackDecoder, PACK_WINDOW_LOG, STREAM_PIECES};

/// Bytes of an image block (ext4's block size): the recording granularity.
pub const BLOCK: u64 = 4096;
/// Blocks of plaintext per startup-pack chunk unless another is chosen:
/// 256 KiB, large enough to compress well and few enough chunks that a
/// pack of tens of MB is a few hundred entries.
pub const PIECE_BLOCKS: u32 = 64;
/// zstd level of startup packs: higher than the image's (9), as a pack is
/// sealed once and read whole by every cold start. In streams of
/// [`STREAM_PIECES`] pieces, level 19 stores a Node.js start's blocks in
/// 8% fewer bytes than level 14, at about 2.8 MB/s of plaintext per core.
pub const PACK_ZSTD_LEVEL: i32 = 19;
/// Bit of a pack chunk's flags: its plaintext went through the x86 filter.
const FLAG_X86: u8 = 4;
/// Largest piece a reader accepts (4 MiB of plaintext).
pub const MAX_PIECE_BLOCKS: u32 = 1024;
/// Most blocks a profile may list (64 GiB of image).
pub const MAX_BLOCKS: u64 = 1 << 24;

/// Consecutive image blocks `first..first + count`, read one after another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockRun {
    /// First block (image offset / 4096).
    pub first: u64,
    /// Number of blocks (at least 1).
    pub count: u32,
}

/// One sealed chunk of a startup pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackChunk {
    /// Name: SHA-256 of the stored bytes.
    pub id: ChunkId,
    /// Stored length in bytes.
    pub stored_len: u32,
    /// Whether its plaintext was zstd-compressed before encryption.
    pub compressed: bool,
    /// Whether its zstd data continues the stream of the chunk before it
    /// (see [`PackDecoder`]): it decodes only right after that one.
    pub continues: bool,
    /// Whether its plaintext went through the x86 filter before
    /// compression (undone after decoding; docs/FORMAT.md §6).
    pub x86: bool,
}

/// The startup pack of a profile: a blob that is the concatenation of
/// `chunks`, which hold the profile's blocks in order, `piece_blocks`
/// blocks each (the last one the rest).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartupPack {
    /// SHA-256 of the pack blob.
    pub digest: [u8; 32],
    /// Blocks of plaintext per chunk.
    pub piece_blocks: u32,
    /// The sealed chunks, in pack order.
    pub chunks: Vec<PackChunk>,
    /// HMAC-SHA-256 of the profile's bytes before it (see [`PackSecret`]).
    pub tag: [u8; 32],
}

impl StartupPack {
    /// The pack blob's digest, `sha256:<hex>`.
    pub fn blob_digest(&self) -> String {
        format!("sha256:{}", hex::encode(self.digest))
    }

    /// Byte offset of each chunk in the blob, and the blob's size.
    pub fn offsets(&self) -> (Vec<u64>, u64) {
        let mut at = 0u64;
        let offsets = self
            .chunks
            .iter()
            .map(|c| {
                let o = at;
                at += u64::from(c.stored_len);
                o
            })
            .collect();
        (offsets, at)
    }

    /// Whether chunk `i` decodes only in the stream it belongs to: it
    /// continues the chunk before it, or the chunk after it continues it.
    pub fn in_stream(&self, i: usize) -> bool {
        let continues = |i: usize| self.chunks.get(i).is_some_and(|c| c.continues);
        continues(i) || continues(i + 1)
    }

    /// The first chunk of the stream chunk `i` belongs to (`i` itself if it
    /// starts one or stands alone).
    pub fn stream_start(&self, i: usize) -> usize {
        let mut s = i.min(self.chunks.len());
        while s > 0 && self.chunks.get(s).is_some_and(|c| c.continues) {
            s -= 1;
        }
        s
    }

    /// One past the last chunk of the stream chunk `i` belongs to.
    pub fn stream_end(&self, i: usize) -> usize {
        let mut e = i + 1;
        while self.chunks.get(e).is_some_and(|c| c.continues) {
            e += 1;
        }
        e.min(self.chunks.len().max(i + 1))
    }

    /// Plaintext length of chunk `i` of a pack of `total_blocks` blocks.
    pub fn plain_len(&self, i: usize, total_blocks: u64) -> u64 {
        let piece = u64::from(self.piece_blocks);
        let start = i as u64 * piece;
        total_blocks.saturating_sub(start).min(piece) * BLOCK
    }
}

/// Opens pack chunk `i` of `pack` from its stored bytes, which the caller
/// has checked against its name: decrypts them with `key`, then decodes
/// them into `plain_len` bytes, in `decoder` when they are zstd data (a
/// chunk that continues a stream only right after the chunk before it),
/// and undoes the x86 filter on its bytes if it went through it. `spans`
/// are the pack's ([`pack_spans`]).
pub fn open_pack_chunk(
    pack: &StartupPack,
    spans: &[PackSpan],
    i: usize,
    key: &ChunkKey,
    stored: Vec<u8>,
    plain_len: usize,
    decoder: &mut PackDecoder,
) -> Result<Vec<u8>> {
    let c = pack
        .chunks
        .get(i)
        .ok_or_else(|| FormatError::Profile(format!("the startup pack has no chunk {i}")))?;
    let mut plain = if c.compressed {
        let data = decrypt_verified(Some(key), stored);
        let more = pack.chunks.get(i + 1).is_some_and(|n| n.continues);
        decoder
            .decode(i, c.continues, more, &data, plain_len)
            .map_err(|reason| FormatError::ChunkDecode {
                id: c.id,
                reason: format!("startup pack chunk {i}: {reason}"),
            })?
    } else {
        decode_verified(&c.id, Some(key), false, stored, plain_len)?
    };
    if c.x86 {
        filter_spans(&mut plain, chunk_spans(spans, i as u64), false).map_err(|at| {
            FormatError::ChunkDecode {
                id: c.id,
                reason: format!("startup pack chunk {i}: {plain_len} bytes hold no block at {at}"),
            }
        })?;
    }
    Ok(plain)
}

/// Runs the x86 filter over each of `spans` in `piece`, the plaintext of
/// the pack chunk they belong to: encoding if `forward`, else decoding.
/// Fails with the offset of a span that lies outside the piece.
fn filter_spans(
    piece: &mut [u8],
    spans: &[PackSpan],
    forward: bool,
) -> std::result::Result<(), u64> {
    for span in spans {
        let bytes = usize::try_from(span.at)
            .ok()
            .zip(usize::try_from(span.at + span.len).ok())
            .and_then(|(from, to)| piece.get_mut(from..to))
            .ok_or(span.at)?;
        match forward {
            true => x86::encode(bytes, span.image),
            false => x86::decode(bytes, span.image),
        }
    }
    Ok(())
}

/// The spans of pack chunk `chunk` among a pack's `spans` (in pack order).
pub fn chunk_spans(spans: &[PackSpan], chunk: u64) -> &[PackSpan] {
    let from = spans.partition_point(|s| s.chunk < chunk);
    let to = spans.partition_point(|s| s.chunk <= chunk);
    spans.get(from..to).unwrap_or_default()
}

/// The secret a startup pack's keys and tag derive from: SHA-256 of a
/// domain string and every chunk key of the recipe, in table order.
#[derive(Clone)]
pub struct PackSecret([u8; 32]);

impl std::fmt::Debug for PackSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PackSecret(..)")
    }
}

impl PackSecret {
    /// The secret of a recipe whose key table holds `keys`.
    pub fn of_keys<'a>(keys: impl IntoIterator<Item = &'a ChunkKey>) -> Self {
        let mut h = Sha256::new();
        h.update(b"smr startup pack secret v1");
        for k in keys {
            h.update(k.0);
        }
        PackSecret(h.finalize().into())
    }

    /// The key of pack chunk `i` for the block list `runs` cut into pieces
    /// of `piece_blocks`.
    pub fn chunk_key(&self, runs: &[BlockRun], piece_blocks: u32, i: u64) -> ChunkKey {
        let mut h = Sha256::new();
        h.update(b"smr startup pack key v1");
        h.update(self.0);
        h.update(runs_digest(runs));
        h.update(piece_blocks.to_le_bytes());
        h.update(i.to_le_bytes());
        ChunkKey(h.finalize().into())
    }

    /// HMAC-SHA-256 of `body` under this secret.
    pub fn tag(&self, body: &[u8]) -> [u8; 32] {
        self.mac(body).finalize().into_bytes().into()
    }

    /// Fails unless `tag` is the tag of `body` (compared in constant time).
    pub fn check(&self, body: &[u8], tag: &[u8; 32]) -> Result<()> {
        self.mac(body).verify_slice(tag).map_err(|_| {
            FormatError::Profile(
                "the startup pack's tag does not match the recipe's keys (made for another image, or altered)".into(),
            )
        })
    }

    fn mac(&self, body: &[u8]) -> Hmac<Sha256> {
        // HMAC takes a key of any length: new_from_slice cannot fail.
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("HMAC accepts 32-byte keys"));
        m.update(body);
        m
    }
}

/// SHA-256 of the encoded block list.
fn runs_digest(runs: &[BlockRun]) -> [u8; 32] {
    let mut b = Vec::with_capacity(runs.len() * 4);
    put_runs(&mut b, runs);
    Sha256::digest(&b).into()
}

/// Appends block `b` to `runs`: it extends the last run if it follows it.
pub fn push_block(runs: &mut Vec<BlockRun>, b: u64) {
    match runs.last_mut() {
        Some(r) if r.first + u64::from(r.count) == b && r.count < u32::MAX => r.count += 1,
        _ => runs.push(BlockRun { first: b, count: 1 }),
    }
}

/// Total blocks of `runs`.
pub fn total_blocks(runs: &[BlockRun]) -> u64 {
    runs.iter().map(|r| u64::from(r.count)).sum()
}

/// Consecutive image bytes that sit one after another in one pack chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackSpan {
    /// The pack chunk.
    pub chunk: u64,
    /// Offset of the bytes in the chunk's plaintext.
    pub at: u64,
    /// Image offset of the bytes.
    pub image: u64,
    /// Length in bytes (whole blocks).
    pub len: u64,
}

/// Where the blocks of `runs` sit in a pack of `piece_blocks`-block chunks:
/// each run cut at chunk boundaries, in pack order (the inverse of
/// [`BlockMap`]).
pub fn pack_spans(runs: &[BlockRun], piece_blocks: u32) -> Vec<PackSpan> {
    let piece = u64::from(piece_blocks.max(1));
    let mut out = Vec::with_capacity(runs.len());
    let mut pos = 0u64;
    for r in runs {
        let (mut first, mut left) = (r.first, u64::from(r.count));
        while left > 0 {
            let n = left.min(piece - pos % piece);
            out.push(PackSpan {
                chunk: pos / piece,
                at: pos % piece * BLOCK,
                image: first * BLOCK,
                len: n * BLOCK,
            });
            (pos, first, left) = (pos + n, first + n, left - n);
        }
    }
    out
}

/// Seals the pack plaintext `plain` (the blocks of `runs`, in order) into
/// chunks of `piece_blocks` blocks: the blob (their concatenation), its
/// SHA-256 and the chunk list. The pieces are zstd-compressed
/// ([`PACK_ZSTD_LEVEL`]) in streams of [`STREAM_PIECES`], whether or not
/// the image's chunks are: a pack is read whole by every node at every cold
/// start. A stream's pieces go through the x86 filter first when that
/// makes them smaller at a fast level. The streams are sealed on all
/// cores; the result does not depend on how many.
pub fn seal_pack(
    secret: &PackSecret,
    runs: &[BlockRun],
    plain: &[u8],
    piece_blocks: u32,
) -> (Vec<u8>, [u8; 32], Vec<PackChunk>) {
    let piece = (u64::from(piece_blocks.max(1)) * BLOCK) as usize;
    let spans = pack_spans(runs, piece_blocks);
    let pieces: Vec<&[u8]> = plain.chunks(piece).collect();
    let streams: Vec<&[&[u8]]> = pieces.chunks(STREAM_PIECES).collect();
    let seal_stream = |s: usize| {
        // The stream's pieces through the x86 filter, one stream at a time
        // (a copy of its 8 MiB, not of the whole pack).
        let filtered: Vec<Vec<u8>> = streams[s]
            .iter()
            .enumerate()
            .map(|(k, p)| {
                let mut f = p.to_vec();
                // The spans are the pieces' own (`plain` holds the blocks
                // of `runs`): none lies outside its piece.
                let _ = filter_spans(
                    &mut f,
                    chunk_spans(&spans, (s * STREAM_PIECES + k) as u64),
                    true,
                );
                f
            })
            .collect();
        let filtered: Vec<&[u8]> = filtered.iter().map(Vec::as_slice).collect();
        let x86 = stream::smaller(&filtered, streams[s]);
        let source = if x86 { &filtered[..] } else { streams[s] };
        let encoded = stream::encode_stream(source, PACK_ZSTD_LEVEL)
            .unwrap_or_else(|e| panic!("zstd failed on bytes in memory: {e}"));
        encoded
            .into_iter()
            .enumerate()
            .map(|(k, e)| {
                let i = (s * STREAM_PIECES + k) as u64;
                let key = secret.chunk_key(runs, piece_blocks, i);
                (
                    seal_encoded_with_key(e.data, &key, e.compressed),
                    e.continues,
                    x86,
                )
            })
            .collect::<Vec<_>>()
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per = streams.len().div_ceil(threads).max(1);
    let sealed: Vec<(SealedChunk, bool, bool)> = std::thread::scope(|scope| {
        let seal_stream = &seal_stream;
        let workers: Vec<_> = (0..streams.len())
            .step_by(per)
            .map(|from| {
                let to = (from + per).min(streams.len());
                scope.spawn(move || (from..to).flat_map(seal_stream).collect::<Vec<_>>())
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect()
    });
    let mut blob = Vec::new();
    let chunks = sealed
        .into_iter()
        .map(|(s, continues, x86)| {
            blob.extend_from_slice(&s.stored);
            PackChunk {
                id: s.id,
                stored_len: s.stored.len() as u32,
                compressed: s.compressed,
                continues,
                x86,
            }
        })
        .collect();
    let digest = Sha256::digest(&blob).into();
    (blob, digest, chunks)
}

/// Appends the encoded block list: count, then `first` and `count` of each
/// run as varints.
pub(crate) fn put_runs(out: &mut Vec<u8>, runs: &[BlockRun]) {
    varint::put(out, runs.len() as u64);
    for r in runs {
        varint::put(out, r.first);
        varint::put(out, u64::from(r.count));
    }
}

/// Reads a block list: runs of at least one block, no block twice, at most
/// [`MAX_BLOCKS`] blocks.
pub(crate) fn take_runs(rest: &mut &[u8]) -> std::result::Result<Vec<BlockRun>, String> {
    let m = varint::take(rest).map_err(|r| format!("{r} (block run count)"))?;
    if m > rest.len() as u64 / 2 {
        return Err(format!("{m} block runs do not fit in {} bytes", rest.len()));
    }
    let mut runs = Vec::with_capacity(m as usize);
    let mut total = 0u64;
    for i in 0..m {
        let first = varint::take(rest).map_err(|r| format!("{r} (block run {i})"))?;
        let count = varint::take(rest).map_err(|r| format!("{r} (block run {i})"))?;
        let count = u32::try_from(count)
            .ok()
            .filter(|&c| c > 0)
            .ok_or_else(|| format!("block run {i}: {count} blocks"))?;
        if first.checked_add(u64::from(count)).is_none() {
            return Err(format!("block run {i} ends past 2^64"));
        }
        total += u64::from(count);
        if total > MAX_BLOCKS {
            return Err(format!("more than {MAX_BLOCKS} blocks"));
        }
        runs.push(BlockRun { first, count });
    }
    let mut sorted = runs.clone();
    sorted.sort_by_key(|r| r.first);
    if let Some(w) = sorted
        .windows(2)
        .find(|w| w[0].first + u64::from(w[0].count) > w[1].first)
    {
        return Err(format!("block {} listed twice", w[1].first));
    }
    Ok(runs)
}

/// Appends the pack section.
pub(crate) fn put_pack(out: &mut Vec<u8>, p: &StartupPack) {
    out.extend_from_slice(&p.digest);
    varint::put(out, u64::from(p.piece_blocks));
    varint::put(out, p.chunks.len() as u64);
    for c in &p.chunks {
        out.extend_from_slice(&c.id.0);
        varint::put(out, u64::from(c.stored_len));
        let codec = match (c.compressed, c.continues) {
            (false, _) => 0,
            (true, false) => 1,
            (true, true) => 2,
        };
        out.push(codec | if c.x86 { FLAG_X86 } else { 0 });
    }
}

/// Reads a pack section (without its tag) for `total` blocks.
pub(crate) fn take_pack(rest: &mut &[u8], total: u64) -> std::result::Result<StartupPack, String> {
    let (digest, r) = rest
        .split_first_chunk::<32>()
        .ok_or("truncated startup pack digest")?;
    *rest = r;
    let piece = varint::take(rest).map_err(|r| format!("{r} (pack piece)"))?;
    let piece_blocks = u32::try_from(piece)
        .ok()
        .filter(|p| (1..=MAX_PIECE_BLOCKS).contains(p))
        .ok_or_else(|| format!("pack piece of {piece} blocks"))?;
    let n = varint::take(rest).map_err(|r| format!("{r} (pack chunk count)"))?;
    let want = total.div_ceil(u64::from(piece_blocks));
    if n != want {
        return Err(format!(
            "{n} pack chunks for {total} blocks in pieces of {piece_blocks} (want {want})"
        ));
    }
    let max_len = u64::from(piece_blocks) * BLOCK + 1024;
    let mut chunks = Vec::with_capacity(n as usize);
    for i in 0..n {
        let (id, r) = rest
            .split_first_chunk::<32>()
            .ok_or_else(|| format!("truncated pack chunk {i}"))?;
        *rest = r;
        let len = varint::take(rest).map_err(|r| format!("{r} (pack chunk {i})"))?;
        let stored_len = u32::try_from(len)
            .ok()
            .filter(|&l| l > 0 && u64::from(l) <= max_len)
            .ok_or_else(|| format!("pack chunk {i}: stored length {len}"))?;
        let (&flag, r) = rest
            .split_first()
            .ok_or_else(|| format!("truncated pack chunk {i}"))?;
        *rest = r;
        let x86 = flag & FLAG_X86 != 0;
        let (compressed, continues) = match flag & !FLAG_X86 {
            0 => (false, false),
            1 => (true, false),
            2 if chunks.last().is_some_and(|c: &PackChunk| c.compressed) => (true, true),
            2 => {
                return Err(format!(
                    "pack chunk {i} continues a zstd stream, but no compressed chunk is before it"
                ))
            }
            _ => return Err(format!("pack chunk {i}: flags {flag}")),
        };
        chunks.push(PackChunk {
            id: ChunkId(*id),
            stored_len,
            compressed,
            continues,
            x86,
        });
    }
    Ok(StartupPack {
        digest: *digest,
        piece_blocks,
        chunks,
        tag: [0; 32],
    })
}

/// Where each listed block is in a startup pack: lookups by image block.
#[derive(Debug, Clone)]
pub struct BlockMap {
    /// `(first block, count, position in the pack)`, by first block.
    runs: Vec<(u64, u32, u64)>,
}

impl BlockMap {
    /// The map of `runs` (in pack order); fails if a run leaves an image
    /// of `image_blocks` blocks.
    pub fn new(runs: &[BlockRun], image_blocks: u64) -> Result<Self> {
        let mut at = 0u64;
        let mut out = Vec::with_capacity(runs.len());
        for r in runs {
            let end = r.first.saturating_add(u64::from(r.count));
            if end > image_blocks {
                return Err(FormatError::Profile(format!(
                    "block run {}+{} leaves the image ({image_blocks} blocks)",
                    r.first, r.count
                )));
            }
            out.push((r.first, r.count, at));
            at += u64::from(r.count);
        }
        out.sort_unstable_by_key(|r| r.0);
        Ok(BlockMap { runs: out })
    }

    /// Position in the pack of image block `block`, if listed.
    pub fn locate(&self, block: u64) -> Option<u64> {
        let i = self.runs.partition_point(|r| r.0 <= block).checked_sub(1)?;
        let &(first, count, pos) = self.runs.get(i)?;
        (block < first + u64::from(count)).then(|| pos + block - first)
    }
}

#[cfg(test)]
mod tests;
