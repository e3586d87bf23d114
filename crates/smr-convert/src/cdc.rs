//! Content-defined chunk boundaries on 4 KiB blocks.
//!
//! FastCDC (the `fastcdc` crate's 2020 algorithm, normalization level 1)
//! looks for a cut from each chunk's start; the cut is rounded up to the
//! next 4 KiB block boundary (and held to the maximum size), and the next
//! chunk starts there. Every chunk therefore starts on a block boundary,
//! where an ext4 image's files start too, and where a cut falls depends
//! only on the bytes from the chunk's start: the same content at another
//! block-aligned offset is cut the same way once a cut lands on the same
//! content, so an inserted file changes the chunks around it, not every
//! chunk after it (what fixed-size chunks do when the insertion is not a
//! multiple of the chunk size).

use fastcdc::v2020::FastCDC;
use std::fmt;
use std::str::FromStr;

/// Chunk boundaries fall on multiples of this (the ext4 block size).
pub const BLOCK: usize = 4096;

/// Minimum, average and maximum chunk sizes, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CdcSizes {
    /// No chunk but the last is smaller.
    pub min: u32,
    /// The size FastCDC aims at.
    pub avg: u32,
    /// No chunk is larger.
    pub max: u32,
}

impl Default for CdcSizes {
    /// 16 KiB : 64 KiB : 256 KiB, around smr's default fixed chunk size.
    fn default() -> Self {
        CdcSizes {
            min: 16 << 10,
            avg: 64 << 10,
            max: 256 << 10,
        }
    }
}

impl CdcSizes {
    /// Checks the sizes: multiples of 4 KiB, `min < avg < max`, within
    /// FastCDC's limits.
    pub fn validate(&self) -> Result<(), String> {
        use fastcdc::v2020::{AVERAGE_MAX, MAXIMUM_MAX, MINIMUM_MIN};
        let block = BLOCK as u32;
        if [self.min, self.avg, self.max]
            .iter()
            .any(|s| s % block != 0)
        {
            return Err(format!("{self}: every size must be a multiple of 4K"));
        }
        if !(self.min < self.avg && self.avg < self.max) {
            return Err(format!("{self}: need MIN < AVG < MAX"));
        }
        if self.min < MINIMUM_MIN || self.avg > AVERAGE_MAX || self.max > MAXIMUM_MAX {
            return Err(format!(
                "{self}: sizes must lie within {MINIMUM_MIN} bytes and {MAXIMUM_MAX} bytes"
            ));
        }
        Ok(())
    }
}

impl fmt::Display for CdcSizes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let k = |v: u32| format!("{}K", v >> 10);
        write!(f, "{}:{}:{}", k(self.min), k(self.avg), k(self.max))
    }
}

impl FromStr for CdcSizes {
    type Err = String;

    /// `MIN:AVG:MAX` with `K`/`M` suffixes, e.g. `16K:64K:256K`.
    fn from_str(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.split(':').collect();
        let [min, avg, max] = parts[..] else {
            return Err(format!("`{s}`: expected MIN:AVG:MAX, e.g. 16K:64K:256K"));
        };
        let size = |p: &str| -> Result<u32, String> {
            let p = p.trim();
            let (num, shift) = match p.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
                None => (p, 0),
                Some((i, _)) => match p[i..].to_ascii_lowercase().as_str() {
                    "k" | "kib" => (&p[..i], 10),
                    "m" | "mib" => (&p[..i], 20),
                    other => return Err(format!("`{s}`: unknown size suffix `{other}`")),
                },
            };
            num.parse::<u32>()
                .ok()
                .and_then(|n| n.checked_shl(shift).filter(|v| v >> shift == n))
                .ok_or_else(|| format!("`{s}`: `{p}` is not a size"))
        };
        let sizes = CdcSizes {
            min: size(min)?,
            avg: size(avg)?,
            max: size(max)?,
        };
        sizes.validate()?;
        Ok(sizes)
    }
}

/// The chunk ends (exclusive) of `data`, in order: each a multiple of
/// [`BLOCK`] except the last, which is `data.len()`. Empty for empty data.
pub fn boundaries(data: &[u8], sizes: CdcSizes) -> Vec<usize> {
    let cdc = FastCDC::new(data, sizes.min, sizes.avg, sizes.max);
    let max = sizes.max as usize;
    let mut ends = Vec::with_capacity(data.len() / sizes.avg as usize + 1);
    let mut start = 0;
    while start < data.len() {
        let (_, cut) = cdc.cut(start, data.len() - start);
        let end = cut.next_multiple_of(BLOCK).min(start + max).min(data.len());
        ends.push(end);
        start = end;
    }
    ends
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// `blocks` blocks of pseudo-random bytes from `seed`.
    fn noise(seed: u64, blocks: usize) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..blocks * BLOCK)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    fn chunks(data: &[u8], sizes: CdcSizes) -> Vec<&[u8]> {
        let mut start = 0;
        boundaries(data, sizes)
            .into_iter()
            .map(|end| {
                let c = &data[start..end];
                start = end;
                c
            })
            .collect()
    }

    #[test]
    fn sizes_parse_print_and_are_checked() {
        let s: CdcSizes = "16K:64K:256K".parse().unwrap();
        assert_eq!(s, CdcSizes::default());
        assert_eq!(s.to_string(), "16K:64K:256K");
        assert_eq!("8k:32K:1M".parse::<CdcSizes>().unwrap().max, 1 << 20);
        for bad in [
            "16K:64K",
            "64K:16K:256K",
            "16K:64K:100000",
            "1G:2G:3G",
            "x:y:z",
        ] {
            assert!(bad.parse::<CdcSizes>().is_err(), "{bad}");
        }
    }

    #[test]
    fn chunks_are_whole_blocks_within_the_sizes() {
        let sizes = CdcSizes::default();
        let data = noise(1, 1200);
        let ends = boundaries(&data, sizes);
        assert_eq!(ends.last(), Some(&data.len()));
        let mut start = 0;
        for (i, &end) in ends.iter().enumerate() {
            let len = end - start;
            assert_eq!(end % BLOCK, 0);
            assert!(len <= sizes.max as usize, "chunk {i}: {len}");
            if i + 1 < ends.len() {
                assert!(len >= sizes.min as usize, "chunk {i}: {len}");
            }
            start = end;
        }
        let avg = data.len() / ends.len();
        assert!(avg > 32 << 10 && avg < 160 << 10, "average {avg}");
        assert!(boundaries(&[], sizes).is_empty());
        assert_eq!(boundaries(&[7; 100], sizes), [100]);
    }

    #[test]
    fn an_inserted_block_changes_only_the_chunks_around_it() {
        let sizes = CdcSizes::default();
        let data = noise(2, 2000);
        let mut edited = data[..900 * BLOCK].to_vec();
        edited.extend_from_slice(&noise(3, 1));
        edited.extend_from_slice(&data[900 * BLOCK..]);
        let before: std::collections::HashSet<&[u8]> = chunks(&data, sizes).into_iter().collect();
        let after = chunks(&edited, sizes);
        let changed = after.iter().filter(|c| !before.contains(*c)).count();
        assert!(changed <= 3, "{changed} of {} chunks changed", after.len());
        // Fixed-size chunks of 64 KiB would change every chunk after it.
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// The same content at another block-aligned offset is cut the
        /// same way once the cuts meet again: after a few chunks, the
        /// boundaries coincide (shifted by the offset).
        #[test]
        fn identical_content_at_other_offsets_is_cut_identically(
            seed in any::<u64>(),
            prefix_blocks in 1usize..40,
        ) {
            let sizes = CdcSizes::default();
            let body = noise(seed, 600);
            let mut shifted = noise(seed ^ 0xdead_beef, prefix_blocks);
            let offset = shifted.len();
            shifted.extend_from_slice(&body);
            let a: Vec<usize> = boundaries(&body, sizes);
            let b: Vec<usize> = boundaries(&shifted, sizes)
                .into_iter()
                .filter(|&e| e > offset)
                .map(|e| e - offset)
                .collect();
            // Find the first common boundary (within the first half of
            // the body's chunks); from there on they agree.
            let first = a.iter().position(|e| b.contains(e));
            prop_assert!(first.is_some_and(|i| i < a.len() / 2), "never resynchronized");
            let i = first.unwrap_or(0);
            let j = b.iter().position(|e| *e == a[i]).unwrap_or(0);
            prop_assert_eq!(&a[i..], &b[j..]);
        }
    }
}
