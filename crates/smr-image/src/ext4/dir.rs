//! Linear directories (`ext4_dir_entry_2` records, no htree).
//!
//! Entries are packed in the order given into 4 KiB blocks; an entry never
//! crosses a block, and the last entry of each block stretches to its end.

use zerocopy::little_endian::{U16, U32};
use zerocopy::IntoBytes;

use super::format::{DirEntryHeader, BLOCK_SIZE};

const BLOCK: usize = BLOCK_SIZE as usize;

/// One directory entry to write.
#[derive(Debug, Clone, Copy)]
pub struct Entry<'a> {
    /// Inode number.
    pub ino: u32,
    /// Name bytes (1..=255, no `/` or NUL).
    pub name: &'a [u8],
    /// `FT_*` file type.
    pub file_type: u8,
}

fn rec_len(name_len: usize) -> usize {
    (8 + name_len + 3) & !3
}

/// Blocks needed for entries with these name lengths (in order).
pub fn block_count(name_lens: impl IntoIterator<Item = usize>) -> u64 {
    let (mut blocks, mut left) = (1, BLOCK);
    for len in name_lens {
        let r = rec_len(len);
        if r > left {
            blocks += 1;
            left = BLOCK;
        }
        left -= r;
    }
    blocks
}

/// Appends the directory blocks for `entries` to `out`; returns the block count
/// (always equal to [`block_count`] of the same names).
pub fn render<'a>(entries: impl IntoIterator<Item = Entry<'a>>, out: &mut Vec<u8>) -> u64 {
    let mut block_start = out.len();
    out.resize(block_start + BLOCK, 0);
    let mut blocks = 1;
    let mut at = 0; // offset within the current block
    let mut last: Option<usize> = None; // offset of the last entry in the block
    for e in entries {
        let r = rec_len(e.name.len());
        if r > BLOCK - at {
            if let Some(l) = last {
                stretch(&mut out[block_start..], l);
            }
            block_start = out.len();
            out.resize(block_start + BLOCK, 0);
            blocks += 1;
            at = 0;
        }
        let header = DirEntryHeader {
            inode: U32::new(e.ino),
            rec_len: U16::new(r as u16),
            name_len: e.name.len() as u8,
            file_type: e.file_type,
        };
        let pos = block_start + at;
        out[pos..pos + 8].copy_from_slice(header.as_bytes());
        out[pos + 8..pos + 8 + e.name.len()].copy_from_slice(e.name);
        last = Some(at);
        at += r;
    }
    // No entries at all: the block is one unused entry.
    stretch(&mut out[block_start..], last.unwrap_or(0));
    blocks
}

/// Appends one empty directory block (a single unused entry spanning it).
pub fn empty_block(out: &mut Vec<u8>) {
    let start = out.len();
    out.resize(start + BLOCK, 0);
    out[start + 4..start + 6].copy_from_slice(&(BLOCK as u16).to_le_bytes());
}

/// Makes the entry at `entry` of `block` extend to the end of the block.
fn stretch(block: &mut [u8], entry: usize) {
    let len = (BLOCK - entry) as u16;
    block[entry + 4..entry + 6].copy_from_slice(&len.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize, len: usize) -> Vec<Vec<u8>> {
        (0..n).map(|i| format!("{i:0len$}").into_bytes()).collect()
    }

    /// Walks rec_len chains; returns (inode, name) of every entry.
    fn parse(blocks: &[u8]) -> Vec<(u32, Vec<u8>)> {
        let mut out = Vec::new();
        for b in blocks.chunks(BLOCK) {
            let mut at = 0;
            while at < BLOCK {
                let ino = u32::from_le_bytes(b[at..at + 4].try_into().expect("4"));
                let rl = usize::from(u16::from_le_bytes([b[at + 4], b[at + 5]]));
                let nl = usize::from(b[at + 6]);
                assert!(rl >= rec_len(nl) && rl % 4 == 0, "bad rec_len {rl}");
                if ino != 0 {
                    out.push((ino, b[at + 8..at + 8 + nl].to_vec()));
                }
                at += rl;
            }
            assert_eq!(at, BLOCK, "entries must end exactly at the block end");
        }
        out
    }

    #[test]
    fn packing_matches_count_and_round_trips() {
        for (n, len) in [(0, 1), (1, 1), (500, 10), (2000, 255), (3000, 7)] {
            let ns = names(n, len);
            let entries: Vec<Entry> = ns
                .iter()
                .enumerate()
                .map(|(i, name)| Entry {
                    ino: i as u32 + 12,
                    name,
                    file_type: 1,
                })
                .collect();
            let mut out = Vec::new();
            let blocks = render(entries.iter().copied(), &mut out);
            assert_eq!(blocks, block_count(ns.iter().map(Vec::len)));
            assert_eq!(out.len(), blocks as usize * BLOCK);
            let parsed = parse(&out);
            assert_eq!(parsed.len(), n);
            for (i, (ino, name)) in parsed.iter().enumerate() {
                assert_eq!((*ino, name), (i as u32 + 12, &ns[i]));
            }
        }
    }

    #[test]
    fn empty_block_is_one_unused_entry() {
        let mut out = Vec::new();
        empty_block(&mut out);
        assert!(parse(&out).is_empty());
    }
}
