//! Group geometry and the block bitmap.
//!
//! The number of groups depends on the image size, and the size on the
//! number of groups (bitmaps and inode tables per group): [`compute`] iterates
//! to a fixed point, growing the group count until the image fits.

use super::format::{BLOCKS_PER_GROUP, BLOCK_SIZE, GROUP_DESC_SIZE, INODES_PER_BLOCK};
use super::Ext4Error;

/// Blocks reserved for the group descriptor table (1 TiB of groups).
pub const GDT_RESERVED_BLOCKS: u64 = 64;
/// Blocks before the first layer's data: block 0 and the descriptor table.
pub const HEADER_BLOCKS: u64 = 1 + GDT_RESERVED_BLOCKS;
/// Most groups the reserved descriptor table can describe.
pub const MAX_GROUPS: u64 = GDT_RESERVED_BLOCKS * BLOCK_SIZE / GROUP_DESC_SIZE;
/// Most blocks an image can have.
pub const MAX_BLOCKS: u64 = MAX_GROUPS * BLOCKS_PER_GROUP;
/// Free blocks kept at least (16 MiB), so the image can be mounted read-write.
const MIN_FREE_BLOCKS: u64 = (16 << 20) / BLOCK_SIZE;
/// Free inodes kept at least.
const MIN_FREE_INODES: u64 = 1024;
/// Most inodes per group (one bitmap block).
const MAX_INODES_PER_GROUP: u64 = BLOCK_SIZE * 8;

/// Where the per-group structures go and how big the image is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Geometry {
    /// Block groups.
    pub groups: u64,
    /// Inodes per group (a multiple of 16: whole inode table blocks).
    pub inodes_per_group: u64,
    /// Inode table blocks per group.
    pub itable_blocks: u64,
    /// First block bitmap; group `g`'s is at `+ g`.
    pub block_bitmaps: u64,
    /// First inode bitmap; group `g`'s is at `+ g`.
    pub inode_bitmaps: u64,
    /// First inode table; group `g`'s is at `+ g * itable_blocks`.
    pub inode_tables: u64,
    /// End of the metadata (first headroom block).
    pub meta_end: u64,
    /// Blocks in the filesystem.
    pub blocks_count: u64,
}

impl Geometry {
    /// Blocks of the real descriptor table.
    pub fn gdt_blocks(&self) -> u64 {
        gdt_blocks(self.groups)
    }

    /// Inodes in the filesystem.
    pub fn inodes_count(&self) -> u64 {
        self.groups * self.inodes_per_group
    }
}

fn gdt_blocks(groups: u64) -> u64 {
    (groups * GROUP_DESC_SIZE).div_ceil(BLOCK_SIZE)
}

/// Sizes the filesystem. Per-inode metadata occupies `misc_blocks` from
/// `misc_start`; bitmaps and inode tables follow it; then free headroom of
/// at least max(10% of used blocks, 16 MiB) and max(25% of used inodes, 1024).
pub fn compute(
    misc_start: u64,
    misc_blocks: u64,
    live_data_blocks: u64,
    used_inodes: u64,
) -> Result<Geometry, Ext4Error> {
    let inodes_wanted = used_inodes + (used_inodes.div_ceil(4)).max(MIN_FREE_INODES);
    if inodes_wanted > u64::from(u32::MAX) {
        return Err(Ext4Error::TooManyInodes {
            count: inodes_wanted,
        });
    }
    let mut groups = inodes_wanted.div_ceil(MAX_INODES_PER_GROUP).max(1);
    loop {
        if groups > MAX_GROUPS {
            return Err(Ext4Error::TooLarge {
                blocks: groups * BLOCKS_PER_GROUP,
                max: MAX_BLOCKS,
            });
        }
        let inodes_per_group = inodes_wanted
            .div_ceil(groups)
            .next_multiple_of(INODES_PER_BLOCK);
        let itable_blocks = inodes_per_group / INODES_PER_BLOCK;
        let block_bitmaps = misc_start + misc_blocks;
        let inode_bitmaps = block_bitmaps + groups;
        let inode_tables = inode_bitmaps + groups;
        let meta_end = inode_tables + groups * itable_blocks;
        let used =
            1 + gdt_blocks(groups) + live_data_blocks + misc_blocks + groups * (2 + itable_blocks);
        let mut blocks_count = meta_end + used.div_ceil(10).max(MIN_FREE_BLOCKS);
        let needed = blocks_count.div_ceil(BLOCKS_PER_GROUP);
        if needed > groups {
            groups = needed;
            continue;
        }
        // Fewer groups would do (rounding of the inode tables): keep the
        // count consistent by letting the last group start.
        blocks_count = blocks_count.max((groups - 1) * BLOCKS_PER_GROUP + 1);
        if blocks_count > MAX_BLOCKS {
            return Err(Ext4Error::TooLarge {
                blocks: blocks_count,
                max: MAX_BLOCKS,
            });
        }
        return Ok(Geometry {
            groups,
            inodes_per_group,
            itable_blocks,
            block_bitmaps,
            inode_bitmaps,
            inode_tables,
            meta_end,
            blocks_count,
        });
    }
}

/// A growable bitmap, bit `n` of byte `n / 8` at position `n % 8` (ext4 order).
#[derive(Debug, Default, Clone)]
pub struct Bitmap {
    words: Vec<u64>,
}

impl Bitmap {
    fn grow(&mut self, bits: u64) {
        let words = bits.div_ceil(64) as usize;
        if self.words.len() < words {
            self.words.resize(words, 0);
        }
    }

    /// Whether bit `n` is set.
    #[cfg(test)]
    pub fn get(&self, n: u64) -> bool {
        self.words
            .get((n / 64) as usize)
            .is_some_and(|w| w & (1 << (n % 64)) != 0)
    }

    /// Sets `len` bits from `start`.
    pub fn set_range(&mut self, start: u64, len: u64) {
        self.set_range_exclusive(start, len);
    }

    /// Sets `len` bits from `start`; returns the first bit that was already set.
    pub fn set_range_exclusive(&mut self, start: u64, len: u64) -> Option<u64> {
        self.grow(start + len);
        let mut clash = None;
        let mut n = start;
        let end = start + len;
        while n < end {
            let (w, bit) = ((n / 64) as usize, n % 64);
            let span = (64 - bit).min(end - n);
            let mask = if span == 64 {
                u64::MAX
            } else {
                ((1u64 << span) - 1) << bit
            };
            let old = self.words[w];
            if clash.is_none() && old & mask != 0 {
                clash = Some(w as u64 * 64 + u64::from((old & mask).trailing_zeros()));
            }
            self.words[w] = old | mask;
            n += span;
        }
        clash
    }

    /// Number of set bits in `[start, end)`; `start` and `end` multiples of 64.
    pub fn count_aligned(&self, start: u64, end: u64) -> u64 {
        let (a, b) = ((start / 64) as usize, (end / 64) as usize);
        let b = b.min(self.words.len());
        if a >= b {
            return 0;
        }
        self.words[a..b]
            .iter()
            .map(|w| u64::from(w.count_ones()))
            .sum()
    }

    /// The bytes of bits `[start, start + 8 * len)`; `start` a multiple of 64.
    pub fn bytes(&self, start: u64, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len);
        let first = (start / 64) as usize;
        for i in 0..len.div_ceil(8) {
            let w = self.words.get(first + i).copied().unwrap_or(0);
            out.extend_from_slice(&w.to_le_bytes());
        }
        out.truncate(len);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_ranges_and_clashes() {
        let mut b = Bitmap::default();
        assert_eq!(b.set_range_exclusive(3, 130), None);
        assert!(b.get(3) && b.get(132) && !b.get(2) && !b.get(133));
        assert_eq!(b.set_range_exclusive(130, 10), Some(130));
        assert_eq!(b.count_aligned(0, 192), 137);
        let bytes = b.bytes(0, 2);
        assert_eq!(bytes, [0b1111_1000, 0xff]);
    }

    #[test]
    fn geometry_is_a_fixed_point_with_headroom() {
        for (data, inodes) in [(0, 11), (100_000, 50_000), (3_000_000, 10)] {
            let g = compute(65 + data, 100, data, inodes).expect("fits");
            assert_eq!(g.blocks_count.div_ceil(BLOCKS_PER_GROUP), g.groups);
            assert!(g.inodes_count() >= inodes + 1024);
            assert!(g.blocks_count - g.meta_end >= MIN_FREE_BLOCKS);
            assert_eq!(g.inodes_per_group % 16, 0);
            assert!(g.inodes_per_group <= MAX_INODES_PER_GROUP);
        }
        assert!(matches!(
            compute(MAX_BLOCKS, 0, MAX_BLOCKS, 11),
            Err(Ext4Error::TooLarge { .. })
        ));
    }
}
