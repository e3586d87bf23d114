//! Where an image's chunks start and end: the chunk grid of a recipe.
//!
//! A *fixed* grid cuts the image every `chunk_size` bytes (the last chunk
//! may be short). A *variable* grid, made by content-defined chunking
//! (`smr convert --chunking cdc`), lists every chunk's length; chunks start
//! on 4 KiB blocks, so lengths are stored in blocks (docs/FORMAT.md §3):
//!
//! ```text
//! varint min | varint avg | varint max        the CDC sizes the converter used
//! varint n                                    chunks the image spans (>= 1)
//! (n - 1) × varint blocks                     each chunk's length but the last
//! ```
//! The last chunk is whatever remains of the image. Every length is at
//! least one block and at most [`MAX_CHUNK_SIZE`]. Chunk numbers index the
//! grid in both kinds; a recipe's chunk table and file map use them.

use crate::error::{FormatError, Result};
use crate::recipe::{check_chunk_size, MAX_CHUNK_SIZE};
use crate::varint;
use std::fmt;
use std::ops::Range;
use std::str::FromStr;
use std::sync::Arc;

/// Variable chunks start on multiples of this (the ext4 block size).
pub const BLOCK: u64 = 4096;

/// Minimum, average and maximum sizes of content-defined chunks, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CdcSizes {
    /// No chunk but the last is smaller (zero runs aside).
    pub min: u32,
    /// The size the rolling hash aims at.
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
    /// Checks the sizes: multiples of 4 KiB, `4K <= min < avg < max`,
    /// `min <= 1M`, `max <= 4M`.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let block = BLOCK as u32;
        if [self.min, self.avg, self.max]
            .iter()
            .any(|s| s % block != 0 || *s == 0)
        {
            return Err(format!("{self}: every size must be a multiple of 4K"));
        }
        if !(self.min < self.avg && self.avg < self.max) {
            return Err(format!("{self}: need MIN < AVG < MAX"));
        }
        if self.min > 1 << 20 || u64::from(self.max) > MAX_CHUNK_SIZE {
            return Err(format!("{self}: need MIN <= 1M and MAX <= 4M"));
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
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let parts: Vec<&str> = s.split(':').collect();
        let [min, avg, max] = parts[..] else {
            return Err(format!("`{s}`: expected MIN:AVG:MAX, e.g. 16K:64K:256K"));
        };
        let size = |p: &str| -> std::result::Result<u32, String> {
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

/// An image's chunk boundaries (see the module docs). Cheap to clone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkGrid {
    size: u64,
    chunk_size: u64,
    variable: Option<Variable>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Variable {
    sizes: CdcSizes,
    /// Chunk starts, then the image size: `count + 1` increasing offsets.
    bounds: Arc<[u64]>,
}

impl ChunkGrid {
    /// Chunks of `chunk_size` (a power of two, 64 KiB to 4 MiB) over an
    /// image of `size` bytes.
    pub fn fixed(size: u64, chunk_size: u64) -> Result<Self> {
        check_chunk_size(chunk_size)?;
        Ok(ChunkGrid {
            size,
            chunk_size,
            variable: None,
        })
    }

    /// Chunks of the given lengths, in order, made with `sizes`;
    /// `chunk_size` is the image's nominal chunk size (its ext4 layout
    /// unit). Every length but the last is a positive multiple of 4 KiB,
    /// each at most 4 MiB; the image is their sum.
    pub fn variable(
        chunk_size: u64,
        sizes: CdcSizes,
        lengths: impl IntoIterator<Item = u64>,
    ) -> Result<Self> {
        check_chunk_size(chunk_size)?;
        sizes.validate().map_err(bad)?;
        let mut bounds = vec![0u64];
        let mut at = 0u64;
        let mut last_len = BLOCK;
        for len in lengths {
            if !last_len.is_multiple_of(BLOCK) {
                return Err(bad(format!(
                    "chunk {} of {last_len} bytes is not whole blocks",
                    bounds.len() - 2
                )));
            }
            if len == 0 || len > MAX_CHUNK_SIZE {
                return Err(bad(format!(
                    "chunk {} has {len} bytes (1 to 4 MiB)",
                    bounds.len() - 1
                )));
            }
            at = at
                .checked_add(len)
                .ok_or_else(|| bad("image size overflows".into()))?;
            bounds.push(at);
            last_len = len;
        }
        if bounds.len() < 2 {
            return Err(bad("a variable grid needs at least one chunk".into()));
        }
        Ok(ChunkGrid {
            size: at,
            chunk_size,
            variable: Some(Variable {
                sizes,
                bounds: bounds.into(),
            }),
        })
    }

    /// The image size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The nominal chunk size: every chunk's for a fixed grid, the ext4
    /// layout unit for a variable one.
    pub fn chunk_size(&self) -> u64 {
        self.chunk_size
    }

    /// The CDC sizes of a variable grid; `None` for a fixed one.
    pub fn cdc_sizes(&self) -> Option<CdcSizes> {
        self.variable.as_ref().map(|v| v.sizes)
    }

    /// Number of chunks the image spans (stored plus zero).
    pub fn count(&self) -> u64 {
        match &self.variable {
            None => self.size.div_ceil(self.chunk_size),
            Some(v) => v.bounds.len() as u64 - 1,
        }
    }

    /// First byte of chunk `index` (the image size past the last chunk).
    pub fn start(&self, index: u64) -> u64 {
        match &self.variable {
            None => index.saturating_mul(self.chunk_size).min(self.size),
            Some(v) => usize::try_from(index)
                .ok()
                .and_then(|i| v.bounds.get(i))
                .copied()
                .unwrap_or(self.size),
        }
    }

    /// The bytes of chunk `index` (empty past the last chunk).
    pub fn range(&self, index: u64) -> Range<u64> {
        self.start(index)..self.start(index.saturating_add(1))
    }

    /// Length of chunk `index` (0 past the last chunk).
    pub fn len(&self, index: u64) -> u64 {
        let r = self.range(index);
        r.end - r.start
    }

    /// Whether the image is empty.
    pub fn is_empty(&self) -> bool {
        self.size == 0
    }

    /// The chunk holding byte `offset` ([`ChunkGrid::count`] at or past
    /// the image's end).
    pub fn index_of(&self, offset: u64) -> u64 {
        if offset >= self.size {
            return self.count();
        }
        match &self.variable {
            None => offset / self.chunk_size,
            Some(v) => v.bounds.partition_point(|&b| b <= offset) as u64 - 1,
        }
    }

    /// The chunks holding any byte of `range` (clamped to the image).
    pub fn chunks_of(&self, range: Range<u64>) -> Range<u64> {
        let end = range.end.min(self.size);
        if range.start >= end {
            let i = self.index_of(range.start);
            return i..i;
        }
        self.index_of(range.start)..self.index_of(end - 1) + 1
    }

    /// The longest chunk's length.
    pub fn max_len(&self) -> u64 {
        match &self.variable {
            None => self.chunk_size.min(self.size),
            Some(v) => v.bounds.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0),
        }
    }

    /// Whether the grid lists its chunks (content-defined chunking).
    pub fn is_variable(&self) -> bool {
        self.variable.is_some()
    }

    /// This grid over an image grown to `size` bytes: the new bytes get
    /// chunks of the nominal chunk size; a variable grid's last chunk is
    /// completed to whole blocks first. A smaller `size` is an error.
    pub fn extended_to(&self, size: u64) -> Result<Self> {
        if size < self.size {
            return Err(bad(format!(
                "cannot shrink an image of {} bytes to {size}",
                self.size
            )));
        }
        let Some(v) = &self.variable else {
            return ChunkGrid::fixed(size, self.chunk_size);
        };
        let mut lens: Vec<u64> = v.bounds.windows(2).map(|w| w[1] - w[0]).collect();
        let mut at = self.size;
        if let Some(last) = lens.last_mut() {
            let whole = (*last).next_multiple_of(BLOCK).min(*last + (size - at));
            at += whole - *last;
            *last = whole;
        }
        while at < size {
            let n = self.chunk_size.min(size - at);
            lens.push(n);
            at += n;
        }
        ChunkGrid::variable(self.chunk_size, v.sizes, lens)
    }

    /// Appends a variable grid's table (nothing for a fixed grid).
    pub(crate) fn encode_table(&self, out: &mut Vec<u8>) {
        let Some(v) = &self.variable else { return };
        for s in [v.sizes.min, v.sizes.avg, v.sizes.max] {
            varint::put(out, u64::from(s));
        }
        let n = v.bounds.len() - 1;
        varint::put(out, n as u64);
        for w in v.bounds.windows(2).take(n - 1) {
            varint::put(out, (w[1] - w[0]) / BLOCK);
        }
    }

    /// Reads a variable grid's table for an image of `size` bytes.
    pub(crate) fn decode_table(b: &mut &[u8], size: u64, chunk_size: u64) -> Result<Self> {
        let mut size_field = |what| -> Result<u32> {
            u32::try_from(varint::get(b, what)?).map_err(|_| bad(format!("{what} too large")))
        };
        let sizes = CdcSizes {
            min: size_field("grid: CDC min")?,
            avg: size_field("grid: CDC avg")?,
            max: size_field("grid: CDC max")?,
        };
        let n = varint::get(b, "grid: chunk count")?;
        if n == 0 || n - 1 > b.len() as u64 {
            return Err(bad(format!("{n} chunks do not fit in {} bytes", b.len())));
        }
        let mut lens = Vec::with_capacity(n as usize);
        let mut at = 0u64;
        for i in 0..n - 1 {
            let blocks = varint::get(b, "grid: chunk length")?;
            let len = blocks
                .checked_mul(BLOCK)
                .filter(|l| (1..=MAX_CHUNK_SIZE).contains(l))
                .ok_or_else(|| bad(format!("chunk {i} has {blocks} blocks")))?;
            at = at
                .checked_add(len)
                .filter(|a| *a < size)
                .ok_or_else(|| bad(format!("chunk {i} ends past the image ({size} bytes)")))?;
            lens.push(len);
        }
        lens.push(size - at);
        ChunkGrid::variable(chunk_size, sizes, lens)
    }
}

fn bad(reason: String) -> FormatError {
    FormatError::Recipe(format!("chunk grid: {reason}"))
}

#[cfg(test)]
mod tests;
