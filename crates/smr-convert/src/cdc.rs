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
//!
//! Zeros are cut apart from data: a run of zero blocks at least `min`
//! long is a chunk of its own (never stored), and a data chunk ends where
//! such a run begins. [`CdcStream`] cuts an image as the ext4 writer
//! streams it, with the same result as [`boundaries`] on the whole.

use fastcdc::v2020::FastCDC;
use std::io;

pub use smr_format::CdcSizes;

/// Chunk boundaries fall on multiples of this (the ext4 block size).
pub const BLOCK: usize = smr_format::grid::BLOCK as usize;

/// Bytes the cut of a chunk may look at past its start: `max` for the
/// rolling hash and the zero prefix, plus `min` to see a zero run that
/// starts just before `max`.
fn lookahead(sizes: CdcSizes) -> usize {
    sizes.max as usize + sizes.min as usize
}

/// The length of the chunk starting at `w[0]`, where `w` holds the next
/// [`lookahead`] bytes of the image or all that remain of it. Depends only
/// on those bytes, so a stream cuts as the whole image would.
///
/// - A run of zero blocks of at least `min` bytes is a chunk of its own
///   (at most `max`): never stored, so zeros cost nothing however long.
/// - Otherwise FastCDC cuts within `max`, rounded up to a block; the chunk
///   ends earlier where a zero run of `min` bytes starts after `min`.
fn next_len(w: &[u8], sizes: CdcSizes) -> usize {
    let (min, max) = (sizes.min as usize, sizes.max as usize);
    let head = &w[..w.len().min(max)];
    let zeros = head.iter().position(|&b| b != 0).unwrap_or(head.len());
    let zero_chunk = if zeros == head.len() {
        zeros
    } else {
        zeros / BLOCK * BLOCK
    };
    if zero_chunk >= min || zero_chunk == w.len() {
        return zero_chunk;
    }
    let (_, cut) = FastCDC::new(head, sizes.min, sizes.avg, sizes.max).cut(0, head.len());
    let end = cut.next_multiple_of(BLOCK).min(head.len());
    let run_starts = |b: &usize| {
        w.get(*b..*b + min)
            .is_some_and(|run| run.iter().all(|&x| x == 0))
    };
    (min..end)
        .step_by(BLOCK)
        .find(|b| w[*b] == 0 && run_starts(b))
        .unwrap_or(end)
}

/// The chunk ends (exclusive) of `data`, in order: each a multiple of
/// [`BLOCK`] except the last, which is `data.len()`. Empty for empty data.
pub fn boundaries(data: &[u8], sizes: CdcSizes) -> Vec<usize> {
    let mut ends = Vec::with_capacity(data.len() / sizes.avg as usize + 1);
    let mut start = 0;
    while start < data.len() {
        start += next_len(&data[start..], sizes);
        ends.push(start);
    }
    ends
}

/// Cuts a byte stream into content-defined chunks as it arrives, exactly
/// where [`boundaries`] cuts the whole stream. Holds at most the
/// lookahead (`max + min`) plus one write.
#[derive(Debug)]
pub struct CdcStream {
    sizes: CdcSizes,
    buf: Vec<u8>,
    /// Bytes of `buf` already cut off.
    pos: usize,
}

impl CdcStream {
    /// A stream cutting with `sizes`.
    pub fn new(sizes: CdcSizes) -> Self {
        CdcStream {
            sizes,
            buf: Vec::with_capacity(2 * lookahead(sizes)),
            pos: 0,
        }
    }

    /// Appends `data`, handing every chunk that is now decided to `out`.
    pub fn push(
        &mut self,
        data: &[u8],
        out: &mut dyn FnMut(&[u8]) -> io::Result<()>,
    ) -> io::Result<()> {
        self.buf.extend_from_slice(data);
        self.cut(false, out)
    }

    /// Appends `n` zero bytes (a hole in the image), a bounded piece at a
    /// time.
    pub fn push_zeros(
        &mut self,
        mut n: u64,
        out: &mut dyn FnMut(&[u8]) -> io::Result<()>,
    ) -> io::Result<()> {
        let step = lookahead(self.sizes) as u64;
        while n > 0 {
            let k = n.min(step);
            self.buf.resize(self.buf.len() + k as usize, 0);
            self.cut(false, out)?;
            n -= k;
        }
        Ok(())
    }

    /// Ends the stream: the remaining bytes become the last chunks.
    pub fn finish(mut self, out: &mut dyn FnMut(&[u8]) -> io::Result<()>) -> io::Result<()> {
        self.cut(true, out)
    }

    fn cut(&mut self, last: bool, out: &mut dyn FnMut(&[u8]) -> io::Result<()>) -> io::Result<()> {
        let need = lookahead(self.sizes);
        while self.pos < self.buf.len() && (last || self.buf.len() - self.pos >= need) {
            let w = &self.buf[self.pos..];
            let len = next_len(w, self.sizes);
            out(&w[..len])?;
            self.pos += len;
        }
        if self.pos > self.buf.len() / 2 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        Ok(())
    }
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

    /// Cuts `data` through a [`CdcStream`] fed in pieces of the given
    /// sizes, zero pieces given as holes; returns the chunk ends.
    fn streamed(data: &[u8], pieces: &[usize], sizes: CdcSizes) -> Vec<usize> {
        let mut ends = Vec::new();
        let mut at = 0usize;
        let mut out = |c: &[u8]| {
            at += c.len();
            ends.push(at);
            Ok(())
        };
        let mut stream = CdcStream::new(sizes);
        let mut fed = 0;
        for &n in pieces.iter().cycle() {
            let piece = &data[fed..(fed + n).min(data.len())];
            if piece.iter().all(|&b| b == 0) {
                stream.push_zeros(piece.len() as u64, &mut out).unwrap();
            } else {
                stream.push(piece, &mut out).unwrap();
            }
            fed += piece.len();
            if fed == data.len() {
                break;
            }
        }
        stream.finish(&mut out).unwrap();
        ends
    }

    #[test]
    fn zero_runs_are_chunks_of_their_own() {
        let sizes = CdcSizes::default();
        let mut data = noise(4, 100);
        let data_end = data.len();
        data.extend(vec![0u8; 700 * BLOCK]);
        data.extend(noise(5, 50));
        let ends = boundaries(&data, sizes);
        assert!(
            ends.contains(&data_end),
            "a chunk ends where the zeros start"
        );
        let mut start = 0;
        let mut zero_chunks = 0;
        for &end in &ends {
            let c = &data[start..end];
            if c.iter().all(|&b| b == 0) {
                zero_chunks += 1;
                assert!(c.len() <= sizes.max as usize);
            } else {
                assert!(
                    !c.windows(sizes.min as usize)
                        .step_by(BLOCK)
                        .skip(1)
                        .any(|w| w.iter().all(|&b| b == 0)),
                    "a data chunk holds a zero run"
                );
            }
            start = end;
        }
        assert_eq!(zero_chunks, 700 * BLOCK / sizes.max as usize + 1);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        /// Streaming cuts exactly where the whole image is cut, whatever
        /// the write sizes and holes.
        #[test]
        fn a_stream_cuts_like_the_whole(
            seed in any::<u64>(),
            layout in proptest::collection::vec((1usize..80, any::<bool>()), 1..12),
            pieces in proptest::collection::vec(1usize..300_000, 1..8),
        ) {
            let sizes = CdcSizes::default();
            let mut data = Vec::new();
            for (i, (blocks, zero)) in layout.iter().enumerate() {
                if *zero {
                    data.extend(vec![0u8; blocks * BLOCK]);
                } else {
                    data.extend(noise(seed ^ i as u64, *blocks));
                }
            }
            data.extend_from_slice(&[9, 9, 9]);
            prop_assert_eq!(streamed(&data, &pieces, sizes), boundaries(&data, sizes));
        }
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
