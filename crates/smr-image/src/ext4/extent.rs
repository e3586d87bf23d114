//! Extent trees (`fs/ext4/ext4_extents.h`).
//!
//! Up to four extents live in the inode's `i_block`. More extents are packed
//! 340 to a leaf block; when there are more than four leaf blocks, index
//! blocks are added level by level (any depth) until at most four nodes
//! remain for the root in `i_block`. Tree blocks are numbered bottom-up,
//! leaves first, from the first block given.

use zerocopy::little_endian::{U16, U32};
use zerocopy::IntoBytes;

use super::format::{
    ExtentHeader, ExtentIndex, ExtentLeaf, BLOCK_SIZE, EXTENTS_IN_INODE, EXTENTS_PER_BLOCK,
    EXTENT_MAGIC, MAX_EXTENT_LEN,
};
use crate::tree::Extent;

/// Splits runs into ext4 extents of at most [`MAX_EXTENT_LEN`] blocks.
///
/// The caller has checked that logical blocks fit in 32 bits and physical
/// blocks in 48 bits.
pub fn leaves(runs: &[Extent]) -> Vec<ExtentLeaf> {
    let mut out = Vec::with_capacity(runs.len());
    for run in runs {
        let mut done = 0;
        while done < run.len {
            let len = (run.len - done).min(MAX_EXTENT_LEN);
            let start = run.physical + done;
            out.push(ExtentLeaf {
                block: U32::new(u32::try_from(run.logical + done).unwrap_or(u32::MAX)),
                len: U16::new(u16::try_from(len).unwrap_or(u16::MAX)),
                start_hi: U16::new(u16::try_from(start >> 32).unwrap_or(u16::MAX)),
                start_lo: U32::new(start as u32),
            });
            done += len;
        }
    }
    out
}

/// Number of ext4 extents [`leaves`] produces for `runs`.
pub fn leaf_count(runs: &[Extent]) -> u64 {
    runs.iter().map(|r| r.len.div_ceil(MAX_EXTENT_LEN)).sum()
}

/// Number of tree blocks needed for `n` extents.
pub fn tree_blocks(mut n: u64) -> u64 {
    let mut blocks = 0;
    while n > EXTENTS_IN_INODE as u64 {
        n = n.div_ceil(EXTENTS_PER_BLOCK as u64);
        blocks += n;
    }
    blocks
}

fn entry_bytes(b: &[u8]) -> [u8; 12] {
    let mut out = [0u8; 12];
    out.copy_from_slice(b);
    out
}

fn header(entries: usize, max: usize, depth: u16) -> ExtentHeader {
    ExtentHeader {
        magic: U16::new(EXTENT_MAGIC),
        entries: U16::new(u16::try_from(entries).unwrap_or(u16::MAX)),
        max: U16::new(u16::try_from(max).unwrap_or(u16::MAX)),
        depth: U16::new(depth),
        generation: U32::new(0),
    }
}

/// Builds the tree for `extents`: appends its blocks (numbered from
/// `first_block`, exactly [`tree_blocks`] of them) to `out` and returns the
/// 60-byte `i_block` root.
pub fn build(extents: &[ExtentLeaf], first_block: u64, out: &mut Vec<u8>) -> [u8; 60] {
    // Each node entry: (first logical block, its 12 on-disk bytes).
    let mut level: Vec<(u32, [u8; 12])> = extents
        .iter()
        .map(|e| (e.block.get(), entry_bytes(e.as_bytes())))
        .collect();
    let mut depth = 0u16;
    let mut next_block = first_block;
    while level.len() > EXTENTS_IN_INODE {
        let mut upper = Vec::with_capacity(level.len().div_ceil(EXTENTS_PER_BLOCK));
        for group in level.chunks(EXTENTS_PER_BLOCK) {
            let start = out.len();
            out.extend_from_slice(header(group.len(), EXTENTS_PER_BLOCK, depth).as_bytes());
            for (_, bytes) in group {
                out.extend_from_slice(bytes);
            }
            out.resize(start + BLOCK_SIZE as usize, 0);
            let index = ExtentIndex {
                block: U32::new(group[0].0),
                leaf_lo: U32::new(next_block as u32),
                leaf_hi: U16::new(u16::try_from(next_block >> 32).unwrap_or(u16::MAX)),
                unused: U16::new(0),
            };
            upper.push((group[0].0, entry_bytes(index.as_bytes())));
            next_block += 1;
        }
        level = upper;
        depth += 1;
    }
    let mut root = [0u8; 60];
    root[..12].copy_from_slice(header(level.len(), EXTENTS_IN_INODE, depth).as_bytes());
    for (i, (_, bytes)) in level.iter().enumerate() {
        root[12 + 12 * i..24 + 12 * i].copy_from_slice(bytes);
    }
    root
}

#[cfg(test)]
mod tests {
    use super::*;
    use zerocopy::FromBytes;

    fn run(logical: u64, physical: u64, len: u64) -> Extent {
        Extent {
            logical,
            physical,
            len,
        }
    }

    #[test]
    fn long_runs_split_at_32768_blocks() {
        let l = leaves(&[run(0, 1 << 33, 70000)]);
        assert_eq!(l.len(), 3);
        assert_eq!(leaf_count(&[run(0, 1 << 33, 70000)]), 3);
        assert_eq!(l[1].block.get(), 32768);
        assert_eq!(l[1].start_hi.get(), 2);
        assert_eq!(l[1].start_lo.get(), 32768);
        assert_eq!(l[2].len.get(), 4464);
    }

    #[test]
    fn tree_block_counts() {
        assert_eq!(tree_blocks(0), 0);
        assert_eq!(tree_blocks(4), 0);
        assert_eq!(tree_blocks(5), 1);
        assert_eq!(tree_blocks(340 * 4), 4);
        // 1361 extents: 5 leaves, one index block above them.
        assert_eq!(tree_blocks(340 * 4 + 1), 6);
    }

    #[test]
    fn small_trees_live_in_the_inode() {
        let ext = leaves(&[run(0, 100, 1), run(2, 101, 1)]);
        let mut out = Vec::new();
        let root = build(&ext, 999, &mut out);
        assert!(out.is_empty());
        let (h, rest) = ExtentHeader::read_from_prefix(&root).expect("header");
        assert_eq!((h.entries.get(), h.max.get(), h.depth.get()), (2, 4, 0));
        let (e, _) = ExtentLeaf::read_from_prefix(&rest[12..]).expect("leaf");
        assert_eq!((e.block.get(), e.start_lo.get()), (2, 101));
    }

    #[test]
    fn deep_trees_index_every_block() {
        let n = 340 * 4 + 1;
        let runs: Vec<Extent> = (0..n).map(|i| run(2 * i, 1000 + i, 1)).collect();
        let ext = leaves(&runs);
        let mut out = Vec::new();
        let root = build(&ext, 5000, &mut out);
        assert_eq!(out.len() as u64, tree_blocks(n) * BLOCK_SIZE);
        let (h, rest) = ExtentHeader::read_from_prefix(&root).expect("header");
        assert_eq!((h.entries.get(), h.depth.get()), (1, 2));
        let (idx, _) = ExtentIndex::read_from_prefix(rest).expect("index");
        // The index block is the last one written, after the 5 leaves.
        assert_eq!((idx.block.get(), idx.leaf_lo.get()), (0, 5005));
        let top = &out[5 * 4096..6 * 4096];
        let (h, rest) = ExtentHeader::read_from_prefix(top).expect("header");
        assert_eq!((h.entries.get(), h.max.get(), h.depth.get()), (5, 340, 1));
        let second = ExtentIndex::read_from_prefix(&rest[12..]).expect("index").0;
        assert_eq!((second.block.get(), second.leaf_lo.get()), (680, 5001));
        let leaf = &out[4 * 4096..5 * 4096];
        let (h, rest) = ExtentHeader::read_from_prefix(leaf).expect("header");
        assert_eq!((h.entries.get(), h.depth.get()), (1, 0));
        let last = ExtentLeaf::read_from_prefix(rest).expect("leaf").0;
        assert_eq!(last.block.get() as u64, 2 * (n - 1));
    }
}
