//! Where packs are cut: the content-defined rule every pack writer follows
//! (the registry pusher and the packed chunk stores; `docs/FORMAT.md` §5).
//!
//! Chunks are concatenated into *packs* in image order. A pack is closed
//! after chunk `id` when it holds `max` chunks, or when it holds at least
//! `min` and `id`, read as a 256-bit big-endian integer, is divisible by
//! `target`. Chunk ids are uniformly distributed, so packs average about
//! `target` chunks, and a boundary depends only on the ids near it: two
//! images that share a run of chunks (a base layer) cut that run at the
//! same places and produce identical packs for all of it but its ends.

use crate::ChunkId;

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

/// Pack parameters that do not satisfy
/// `1 <= min <= target <= max <= MAX_CHUNKS_PER_PACK`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("bad pack parameters (target {}, min {}, max {}): need 1 <= min <= target <= max <= {MAX_CHUNKS_PER_PACK}", .0.target, .0.min, .0.max)]
pub struct BadPackParams(pub PackParams);

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
    pub fn for_recipe(recipe: &crate::Recipe) -> Self {
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
    pub fn validate(&self) -> Result<(), BadPackParams> {
        let ok = self.min >= 1
            && self.min <= self.target
            && self.target <= self.max
            && self.max <= MAX_CHUNKS_PER_PACK;
        if ok {
            Ok(())
        } else {
            Err(BadPackParams(*self))
        }
    }

    /// Whether a pack holding `count` chunks, the last being `id`, ends here.
    pub fn cut_after(&self, id: &ChunkId, count: u32) -> bool {
        count >= self.max || (count >= self.min && id_mod(id, self.target) == 0)
    }
}

/// `id` as a 256-bit big-endian integer, modulo `m` (`m >= 1`).
pub fn id_mod(id: &ChunkId, m: u32) -> u64 {
    let m = u64::from(m.max(1));
    // r < m < 2^32, so r << 8 never overflows.
    id.0.iter()
        .fold(0u64, |r, &b| ((r << 8) | u64::from(b)) % m)
}
