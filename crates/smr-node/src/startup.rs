//! Making startup packs ([`smr_format::startup`]) from a recorded
//! profile's blocks: what `smr convert --push` and `smr profile push` do
//! before pushing a profile. Serving them is [`crate::lazy::LazyImage::use_startup_pack`].

use crate::chunks::{ChunkError, ImageChunks};
use smr_format::pack::MAX_CHUNKS_PER_PACK;
use smr_format::startup::{BlockRun, BLOCK, PIECE_BLOCKS};
use smr_format::{FormatError, Profile};
use smr_store::ChunkStore;
use std::collections::VecDeque;

/// Decoded image chunks kept while the blocks are gathered (the blocks of
/// a start come back to a chunk a few times, mostly soon).
const KEEP_CHUNKS: usize = 64;

/// Makes the startup pack of `profile`'s blocks from the image's chunks in
/// `store` (each verified against its name): sets [`Profile::pack`] and
/// returns the pack blob to push with the profile. `Ok(None)` when there
/// is nothing to make: the profile lists no blocks, or the recipe is not
/// encrypted (a pack is trusted through the recipe's keys only). Blocks
/// beyond what one pack holds ([`MAX_CHUNKS_PER_PACK`] chunks) are left out
/// of it (they are read from the image's chunks).
pub fn make_startup_pack(
    img: &ImageChunks,
    store: &dyn ChunkStore,
    profile: &mut Profile,
) -> Result<Option<Vec<u8>>, ChunkError> {
    let recipe = &img.recipe;
    let Some(secret) = img.pack_secret() else {
        return Ok(None);
    };
    profile.pack = None;
    let max_blocks = u64::from(MAX_CHUNKS_PER_PACK) * u64::from(PIECE_BLOCKS);
    profile.blocks = clip_runs(&profile.blocks, max_blocks);
    if profile.blocks.is_empty() {
        return Ok(None);
    }
    let image_blocks = recipe.image_size / BLOCK;
    let mut plain = Vec::new();
    let mut kept: VecDeque<(u64, Vec<u8>)> = VecDeque::new();
    for r in &profile.blocks {
        for b in r.first..r.first + u64::from(r.count) {
            if b >= image_blocks {
                return Err(FormatError::Profile(format!(
                    "block {b} is beyond the image ({image_blocks} blocks)"
                ))
                .into());
            }
            let at = b * BLOCK;
            let c = recipe.grid().index_of(at);
            let start = recipe.grid().start(c);
            let within = (at - start) as usize..(at - start + BLOCK) as usize;
            let Ok(pos) = recipe.chunks.binary_search_by_key(&c, |e| e.index) else {
                plain.resize(plain.len() + BLOCK as usize, 0);
                continue;
            };
            let i = match kept.iter().position(|(k, _)| *k == c) {
                Some(i) => i,
                None => {
                    let (_, data) = img.fetch(store, pos)?;
                    if kept.len() == KEEP_CHUNKS {
                        kept.pop_front();
                    }
                    kept.push_back((c, data));
                    kept.len() - 1
                }
            };
            let data = kept
                .get(i)
                .and_then(|(_, d)| d.get(within))
                .ok_or_else(|| {
                    FormatError::Profile(format!("chunk {c} is shorter than block {b}"))
                })?;
            plain.extend_from_slice(data);
        }
    }
    Ok(Some(profile.seal_pack(&secret, &plain, PIECE_BLOCKS)))
}

/// The first `max` blocks of `runs`.
fn clip_runs(runs: &[BlockRun], max: u64) -> Vec<BlockRun> {
    let mut left = max;
    let mut out = Vec::new();
    for r in runs {
        if left == 0 {
            break;
        }
        let count = u64::from(r.count).min(left);
        left -= count;
        out.push(BlockRun {
            first: r.first,
            count: count as u32,
        });
    }
    out
}
