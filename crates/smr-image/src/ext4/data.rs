//! Streaming file data into the image: the writer's [`DataSink`] side.
//!
//! Data is read in 1 MiB buffers and written block by block at the data
//! cursor, in arrival order. All-zero blocks are neither written nor
//! allocated (they become holes); runs of non-zero blocks are written with one
//! call each. If reading or writing fails, the blocks already written stay in
//! the image unreferenced (free in the bitmap) and the cursor stays past them,
//! so the writer remains usable.

use std::io::{self, Read};

use super::format::BLOCK_SIZE;
use super::layout::MAX_BLOCKS;
use super::{Ext4Error, Ext4Writer, ImageSink};
use crate::tree::{DataSink, Extent};

const BUF_SIZE: usize = 1 << 20;
const BLOCK: usize = BLOCK_SIZE as usize;

/// Whether a block is all zeros (branch-free per 64 bytes so it vectorizes).
fn is_zero(block: &[u8]) -> bool {
    block
        .chunks(64)
        .all(|c| c.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

/// Fills `buf` from `data`; `UnexpectedEof` names how far the file got.
fn read_full(data: &mut dyn Read, buf: &mut [u8], done: u64, size: u64) -> io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        match data.read(&mut buf[filled..]) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "file data ended after {} of {size} bytes",
                        done + filled as u64
                    ),
                ))
            }
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Appends a run, merging it with the previous one when both logical and
/// physical blocks continue it.
fn push_run(extents: &mut Vec<Extent>, logical: u64, physical: u64, len: u64) {
    if let Some(last) = extents.last_mut() {
        if last.logical + last.len == logical && last.physical + last.len == physical {
            last.len += len;
            return;
        }
    }
    extents.push(Extent {
        logical,
        physical,
        len,
    });
}

impl<S: ImageSink> Ext4Writer<S> {
    fn align_cursor(&mut self) {
        let chunk_blocks = (self.opts.chunk_size / BLOCK_SIZE).max(1);
        self.cursor = self.cursor.next_multiple_of(chunk_blocks);
    }

    fn write_run(&mut self, start: usize, end: usize) -> io::Result<u64> {
        let blocks = ((end - start) / BLOCK) as u64;
        let physical = self.cursor;
        if physical + blocks > MAX_BLOCKS {
            return Err(io::Error::other(Ext4Error::TooLarge {
                blocks: physical + blocks,
                max: MAX_BLOCKS,
            }));
        }
        // Advance first: if the write fails, whatever landed is dead space.
        self.cursor += blocks;
        self.sink
            .write_at(physical * BLOCK_SIZE, &self.buf[start..end])?;
        self.blocks_written += blocks;
        Ok(physical)
    }
}

impl<S: ImageSink> DataSink for Ext4Writer<S> {
    fn start_layer(&mut self) -> io::Result<()> {
        self.check_options().map_err(io::Error::other)?;
        self.align_cursor();
        Ok(())
    }

    fn write_file(&mut self, data: &mut dyn Read, size: u64) -> io::Result<Vec<Extent>> {
        self.check_options().map_err(io::Error::other)?;
        if self.buf.len() != BUF_SIZE {
            self.buf = vec![0; BUF_SIZE];
        }
        let mut extents = Vec::new();
        let mut done = 0u64;
        while done < size {
            let want = (size - done).min(BUF_SIZE as u64) as usize;
            read_full(data, &mut self.buf[..want], done, size)?;
            let padded = want.next_multiple_of(BLOCK);
            self.buf[want..padded].fill(0);
            let first_logical = done / BLOCK_SIZE;
            let mut b = 0;
            while b < padded {
                if is_zero(&self.buf[b..b + BLOCK]) {
                    b += BLOCK;
                    continue;
                }
                let start = b;
                while b < padded && !is_zero(&self.buf[b..b + BLOCK]) {
                    b += BLOCK;
                }
                let physical = self.write_run(start, b)?;
                let logical = first_logical + (start / BLOCK) as u64;
                push_run(
                    &mut extents,
                    logical,
                    physical,
                    ((b - start) / BLOCK) as u64,
                );
            }
            done += want as u64;
        }
        Ok(extents)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection() {
        let mut b = vec![0u8; BLOCK];
        assert!(is_zero(&b));
        b[BLOCK - 1] = 1;
        assert!(!is_zero(&b));
    }

    #[test]
    fn runs_merge_only_when_both_sides_continue() {
        let mut v = Vec::new();
        push_run(&mut v, 0, 10, 2);
        push_run(&mut v, 2, 12, 3);
        push_run(&mut v, 6, 15, 1);
        assert_eq!(
            v,
            [
                Extent {
                    logical: 0,
                    physical: 10,
                    len: 5
                },
                Extent {
                    logical: 6,
                    physical: 15,
                    len: 1
                }
            ]
        );
    }
}
