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
//! - Close the current pack where [`smr_format::pack`]'s rule says.
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

pub use smr_format::pack::{
    id_mod, BadPackParams, PackParams, DEFAULT_PACK_BYTES, MAX_CHUNKS_PER_PACK,
};

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
    #[error(transparent)]
    BadParams(#[from] BadPackParams),
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
