//! Packs: how an image's chunks are grouped into registry blobs.
//!
//! A registry is a poor place for millions of tiny blobs (one upload
//! session, one HEAD and one manifest descriptor each), so chunks are
//! concatenated into *packs* and read back by HTTP Range. Where the pack
//! boundaries fall decides what two images share at the registry level, so
//! they are content-defined (`docs/FORMAT.md` §5):
//!
//! - Walk the recipe's chunk ids in image order, skipping ids seen before
//!   (the first occurrence of a duplicate decides its pack).
//! - Close the current pack after chunk `id` when it holds `max` chunks, or
//!   when it holds at least `min` and `id`, read as a 256-bit big-endian
//!   integer, is divisible by `target`.
//!
//! Chunk ids are uniformly distributed, so packs average about `target`
//! chunks, and a boundary depends only on the ids near it: two images that
//! share a run of chunks (a base layer) cut that run at the same places and
//! produce identical packs for all of it but its ends. `target = 1` puts
//! every chunk in a pack of its own, whose digest is then the chunk id.
//!
//! The [`PackIndex`] maps every chunk id to its pack and byte range.

mod index;
#[cfg(test)]
mod tests;

pub use index::{ChunkLocation, IndexedChunk, IndexedPack, PackIndex, PackIndexStats};

use smr_format::ChunkId;
use std::collections::HashSet;

/// Pack bytes aimed at by [`PackParams::for_chunk_size`]: 4 MiB.
pub const DEFAULT_PACK_BYTES: u64 = 4 << 20;

/// Largest accepted `max` chunks per pack (a 4 MiB-chunk image would then
/// make 4 GiB packs: more is surely a mistake).
pub const MAX_CHUNKS_PER_PACK: u32 = 1 << 10;

/// Pack boundary parameters, in chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackParams {
    /// Average chunks per pack: the divisor of the cut rule.
    pub target: u32,
    /// No content-defined cut before a pack holds this many chunks.
    pub min: u32,
    /// A pack is always closed when it holds this many chunks.
    pub max: u32,
}

impl PackParams {
    /// Parameters for packs of about [`DEFAULT_PACK_BYTES`] given the
    /// image's chunk size: `target = 4 MiB / chunk_size` (at least 1),
    /// `min = target / 4`, `max = 4 × target`.
    pub fn for_chunk_size(chunk_size: u64) -> Self {
        let target = (DEFAULT_PACK_BYTES / chunk_size.max(1)).clamp(1, 256) as u32;
        Self::with_target(target)
    }

    /// [`PackParams::for_chunk_size`] of the recipe's average chunk: the
    /// chunk size of a fixed grid, the CDC average of a variable one.
    pub fn for_recipe(recipe: &smr_format::Recipe) -> Self {
        let avg = recipe
            .grid()
            .cdc_sizes()
            .map_or(recipe.chunk_size, |s| u64::from(s.avg));
        Self::for_chunk_size(avg)
    }

    /// Parameters around `target` chunks per pack: `min = max(1, target /
    /// 4)`, `max = 4 × target` (capped at [`MAX_CHUNKS_PER_PACK`]).
    /// `with_target(1)` gives one pack per chunk.
    pub fn with_target(target: u32) -> Self {
        let target = target.max(1);
        PackParams {
            target,
            min: (target / 4).max(1),
            max: target
                .saturating_mul(4)
                .min(MAX_CHUNKS_PER_PACK)
                .max(target),
        }
    }

    /// Checks `1 <= min <= target <= max <= MAX_CHUNKS_PER_PACK`.
    pub fn validate(&self) -> Result<(), PackError> {
        let ok = self.min >= 1
            && self.min <= self.target
            && self.target <= self.max
            && self.max <= MAX_CHUNKS_PER_PACK;
        if ok {
            Ok(())
        } else {
            Err(PackError::BadParams(*self))
        }
    }

    /// Whether a pack holding `count` chunks, the last being `id`, ends here.
    fn cut_after(&self, id: &ChunkId, count: u32) -> bool {
        count >= self.max || (count >= self.min && id_mod(id, self.target) == 0)
    }
}

/// `id` as a 256-bit big-endian integer, modulo `m` (`m >= 1`).
fn id_mod(id: &ChunkId, m: u32) -> u64 {
    let m = u64::from(m.max(1));
    // r < m < 2^32, so r << 8 never overflows.
    id.0.iter()
        .fold(0u64, |r, &b| ((r << 8) | u64::from(b)) % m)
}

/// Groups chunk ids (in image order, duplicates allowed) into packs: each
/// pack is the list of its chunk ids in the order they are concatenated.
/// Deterministic: a pure function of `ids` and `params`.
pub fn plan<'a>(
    params: &PackParams,
    ids: impl IntoIterator<Item = &'a ChunkId>,
) -> Result<Vec<Vec<ChunkId>>, PackError> {
    params.validate()?;
    let mut seen = HashSet::new();
    let mut packs = Vec::new();
    let mut current: Vec<ChunkId> = Vec::new();
    for id in ids {
        if !seen.insert(*id) {
            continue;
        }
        current.push(*id);
        if params.cut_after(id, current.len() as u32) {
            packs.push(std::mem::take(&mut current));
        }
    }
    if !current.is_empty() {
        packs.push(current);
    }
    Ok(packs)
}

/// What is wrong with pack parameters or a pack index.
#[derive(Debug, thiserror::Error)]
pub enum PackError {
    /// Pack bounds that do not satisfy `1 <= min <= target <= max <= 1024`.
    #[error("bad pack parameters (target {}, min {}, max {}): need 1 <= min <= target <= max <= {MAX_CHUNKS_PER_PACK}", .0.target, .0.min, .0.max)]
    BadParams(PackParams),
    /// The bytes do not start with the pack index magic.
    #[error("not an smr pack index (bad magic)")]
    BadMagic,
    /// A format version this code does not read.
    #[error("unsupported pack index version {0} (this build reads version {v})", v = index::VERSION)]
    UnsupportedVersion(u16),
    /// The bytes end inside a field.
    #[error("truncated at byte {at} (reading {what})")]
    Truncated {
        /// Byte offset where the field starts.
        at: usize,
        /// The field.
        what: &'static str,
    },
    /// A varint that is overlong or does not fit its field.
    #[error("bad varint at byte {at} ({what}): {reason}")]
    BadVarint {
        /// Byte offset of the varint.
        at: usize,
        /// The field.
        what: &'static str,
        /// Overlong, overflowing or out of range.
        reason: &'static str,
    },
    /// A count larger than the remaining bytes could hold.
    #[error("{what} count {count} does not fit in the remaining {remaining} bytes")]
    Count {
        /// What is counted.
        what: &'static str,
        /// The count read.
        count: u64,
        /// Bytes left at that point.
        remaining: usize,
    },
    /// Bytes after the checksum's expected place.
    #[error("{0} unexpected bytes before the checksum")]
    TrailingBytes(usize),
    /// The trailing SHA-256 does not match.
    #[error("checksum mismatch (truncated or corrupted pack index)")]
    Checksum,
    /// A pack with no chunks.
    #[error("pack {pack} has no chunks")]
    EmptyPack {
        /// The pack's digest.
        pack: String,
    },
    /// A chunk of length 0 (a stored chunk is never empty).
    #[error("chunk {id} in pack {pack} has length 0")]
    EmptyChunk {
        /// The chunk.
        id: ChunkId,
        /// Its pack's digest.
        pack: String,
    },
    /// The same chunk listed twice.
    #[error("chunk {id} is listed twice (packs {first} and {second})")]
    DuplicateChunk {
        /// The chunk.
        id: ChunkId,
        /// The pack of its first listing.
        first: String,
        /// The pack of its second listing.
        second: String,
    },
    /// The same pack listed twice.
    #[error("pack {pack} is listed twice")]
    DuplicatePack {
        /// The pack's digest.
        pack: String,
    },
    /// A pack of one chunk whose digest is not that chunk's id (its bytes
    /// are exactly the chunk, so the two must agree).
    #[error("pack {pack} holds only chunk {id}, so its digest must be sha256:{id}")]
    SingleChunkDigest {
        /// The pack's digest.
        pack: String,
        /// The chunk.
        id: ChunkId,
    },
    /// A digest string that is not `sha256:<64 lowercase hex>`.
    #[error("bad pack digest `{0}` (expected sha256:<64 lowercase hex digits>)")]
    BadDigest(String),
    /// A pack whose size overflows.
    #[error("pack {pack} is too large")]
    PackTooLarge {
        /// The pack's digest.
        pack: String,
    },
}
