//! The file map of a recipe: where the filesystem metadata starts and which
//! runs of chunks hold one file's data (docs/FORMAT.md §3, "File map").
//!
//! The converter knows both; a node uses them to prefetch without a
//! startup profile: the metadata region (directories, extent blocks,
//! bitmaps, inode tables), which every `open` walks, as soon as an image is
//! mounted, the rest of a file when a read misses inside it, and the
//! other files of its directory. Only runs spanning two chunks or more are
//! listed: a smaller one is fetched whole by its one miss.
//!
//! ```text
//! metadata_chunk  varint   first chunk of the metadata region
//! n               varint   number of file runs
//! n x (varint start_gap, varint count - 2)
//! [with groups (the recipe's flag):
//! g               varint   number of group runs
//! g x (varint start_gap, varint count - 2)]
//! ```
//! A file run holds one file's data; a group run the data of files laid
//! out one after another in the image that are all in one directory (a
//! directory's files split where another directory's data comes between
//! them). Each list is in increasing start order. Files occupy disjoint
//! block ranges, and so do groups, so two runs of a list share at most one
//! chunk: a run starts at or after the last chunk of the previous one.
//! `start_gap` is the start minus that last chunk (for the first run, the
//! start itself). Encoding is canonical.

use crate::error::{FormatError, Result};
use crate::grid::ChunkGrid;
use crate::varint;
use std::ops::Range;

/// Bytes at the start of every image that hold only the superblock and
/// the group descriptor reservation (docs/FORMAT.md §4: blocks 0 to 64 of
/// 4 KiB); file data starts after them. Part of the metadata a node
/// prefetches with the metadata region.
pub const HEADER_BYTES: u64 = 65 * 4096;

/// Chunks of one file's data: `start..start + count`, `count >= 2`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkRun {
    /// First chunk holding the file's data.
    pub start: u64,
    /// Chunks from the first to the last holding its data (at least 2).
    pub count: u64,
}

impl ChunkRun {
    /// Chunk indices of the run.
    pub fn range(&self) -> Range<u64> {
        self.start..self.start + self.count
    }

    fn last(&self) -> u64 {
        self.start + self.count - 1
    }
}

/// Where the metadata starts and which chunk runs are files (see the
/// module docs).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileMap {
    /// First chunk of the metadata region at the end of the image; chunks
    /// from here to the end hold only metadata (or zeros).
    pub metadata_chunk: u64,
    /// Runs of files spanning two chunks or more, in increasing start order.
    pub files: Vec<ChunkRun>,
    /// Runs of consecutive files of one directory spanning two chunks or
    /// more, in increasing start order.
    pub groups: Vec<ChunkRun>,
}

impl FileMap {
    /// Builds a map from files' data as ranges of bytes in the image (in any
    /// order; empty ranges ignored) and the metadata region's first byte.
    /// Ranges must be disjoint, as a filesystem's files are.
    pub fn from_byte_ranges(
        grid: &ChunkGrid,
        metadata_offset: u64,
        files: impl IntoIterator<Item = Range<u64>>,
    ) -> Result<Self> {
        Self::with_groups(grid, metadata_offset, files, [])
    }

    /// [`FileMap::from_byte_ranges`], with the directories' groups of
    /// files (`groups`, byte ranges as well, disjoint).
    pub fn with_groups(
        grid: &ChunkGrid,
        metadata_offset: u64,
        files: impl IntoIterator<Item = Range<u64>>,
        groups: impl IntoIterator<Item = Range<u64>>,
    ) -> Result<Self> {
        let map = FileMap {
            metadata_chunk: grid.index_of(metadata_offset),
            files: runs_of(grid, files),
            groups: runs_of(grid, groups),
        };
        map.check(u64::MAX)?;
        Ok(map)
    }

    /// The run of the file whose data covers chunk `index`: the one that
    /// starts there if one does (a reader going forward), else the one that
    /// ends there or spans it.
    pub fn file_at(&self, index: u64) -> Option<ChunkRun> {
        run_at(&self.files, index)
    }

    /// The group of files whose data covers chunk `index`, chosen as
    /// [`FileMap::file_at`] chooses a file.
    pub fn group_at(&self, index: u64) -> Option<ChunkRun> {
        run_at(&self.groups, index)
    }

    /// Appends the map's canonical bytes (the groups only if there are
    /// any: the recipe's flag says so).
    pub fn encode(&self, out: &mut Vec<u8>) {
        varint::put(out, self.metadata_chunk);
        encode_runs(out, &self.files);
        if !self.groups.is_empty() {
            encode_runs(out, &self.groups);
        }
    }

    /// Reads a map from the front of `b` for an image of `chunk_count`
    /// chunks, with its groups if `groups`, checking every invariant.
    pub fn decode(b: &mut &[u8], chunk_count: u64, groups: bool) -> Result<Self> {
        let metadata_chunk = varint::get(b, "file map: metadata chunk")?;
        let files = decode_runs(b, "run")?;
        let groups = match groups {
            true => decode_runs(b, "group")?,
            false => Vec::new(),
        };
        let map = FileMap {
            metadata_chunk,
            files,
            groups,
        };
        map.check(chunk_count)?;
        Ok(map)
    }

    /// Runs in increasing start order, sharing at most one chunk, inside
    /// `chunk_count` chunks, as is the metadata chunk.
    pub(crate) fn check(&self, chunk_count: u64) -> Result<()> {
        if self.metadata_chunk > chunk_count {
            return Err(bad(format!(
                "metadata chunk {} beyond the image's {chunk_count} chunks",
                self.metadata_chunk
            )));
        }
        check_runs(&self.files, chunk_count, "run")?;
        check_runs(&self.groups, chunk_count, "group")
    }
}

/// The runs of chunks of byte ranges `ranges` (in any order; empty ones and
/// those within one chunk left out), in increasing start order.
fn runs_of(grid: &ChunkGrid, ranges: impl IntoIterator<Item = Range<u64>>) -> Vec<ChunkRun> {
    let mut runs: Vec<ChunkRun> = ranges
        .into_iter()
        .filter(|r| r.end > r.start)
        .map(|r| {
            let chunks = grid.chunks_of(r);
            ChunkRun {
                start: chunks.start,
                count: chunks.end - chunks.start,
            }
        })
        .filter(|r| r.count >= 2)
        .collect();
    runs.sort_by_key(|r| r.start);
    runs
}

/// The run of `runs` covering chunk `index`: the one that starts there if
/// one does, else the one that ends there or spans it.
fn run_at(runs: &[ChunkRun], index: u64) -> Option<ChunkRun> {
    let after = runs.partition_point(|r| r.start <= index);
    let run = *runs.get(after.checked_sub(1)?)?;
    (index <= run.last()).then_some(run)
}

fn encode_runs(out: &mut Vec<u8>, runs: &[ChunkRun]) {
    varint::put(out, runs.len() as u64);
    let mut floor = 0;
    for r in runs {
        varint::put(out, r.start - floor);
        varint::put(out, r.count - 2);
        floor = r.last();
    }
}

/// A list of runs (`what`: their name in errors) from the front of `b`.
fn decode_runs(b: &mut &[u8], what: &str) -> Result<Vec<ChunkRun>> {
    let n = varint::get(b, "file map: run count")?;
    if n > b.len() as u64 / 2 {
        return Err(bad(format!("{n} {what}s do not fit in {} bytes", b.len())));
    }
    let mut runs = Vec::with_capacity(n as usize);
    let mut floor = 0u64;
    for i in 0..n {
        let gap = varint::get(b, "file map: run start")?;
        let extra = varint::get(b, "file map: run length")?;
        let run = floor
            .checked_add(gap)
            .zip(extra.checked_add(2))
            .map(|(start, count)| ChunkRun { start, count })
            .filter(|r| r.start.checked_add(r.count).is_some())
            .ok_or_else(|| bad(format!("{what} {i} overflows")))?;
        floor = run.last();
        runs.push(run);
    }
    Ok(runs)
}

/// Runs in increasing start order, sharing at most one chunk, inside
/// `chunk_count` chunks.
fn check_runs(runs: &[ChunkRun], chunk_count: u64, what: &str) -> Result<()> {
    let mut prev: Option<ChunkRun> = None;
    for (i, r) in runs.iter().enumerate() {
        let overlaps = prev.is_some_and(|p| r.start < p.last() || r.start <= p.start);
        if r.count < 2 || overlaps || r.start + r.count > chunk_count {
            return Err(bad(format!(
                "{what} {i} (chunks {}..{}) overlaps the previous one or leaves the image",
                r.start,
                r.start + r.count
            )));
        }
        prev = Some(*r);
    }
    Ok(())
}

fn bad(reason: String) -> FormatError {
    FormatError::Recipe(format!("file map: {reason}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const CS: u64 = 64 << 10;

    fn grid() -> ChunkGrid {
        ChunkGrid::fixed(1 << 50, CS).unwrap()
    }

    fn map(files: &[Range<u64>]) -> FileMap {
        FileMap::from_byte_ranges(&grid(), 100 * CS, files.iter().cloned()).unwrap()
    }

    fn roundtrip(m: &FileMap, chunks: u64) -> FileMap {
        let mut out = Vec::new();
        m.encode(&mut out);
        let mut b = out.as_slice();
        let back = FileMap::decode(&mut b, chunks, !m.groups.is_empty()).unwrap();
        assert!(b.is_empty());
        back
    }

    #[test]
    fn small_files_are_left_out_and_runs_sorted() {
        // One chunk each: left out. Two files sharing chunk 3.
        let m = map(&[
            3 * CS + 100..5 * CS,
            0..CS,
            CS + 10..CS + 20,
            2 * CS..3 * CS + 50,
        ]);
        assert_eq!(m.metadata_chunk, 100);
        assert_eq!(
            m.files,
            vec![
                ChunkRun { start: 2, count: 2 },
                ChunkRun { start: 3, count: 2 }
            ]
        );
        assert_eq!(roundtrip(&m, 200), m);
    }

    #[test]
    fn file_at_prefers_the_run_starting_there() {
        let m = map(&[2 * CS..3 * CS + 50, 3 * CS + 100..6 * CS, 10 * CS..12 * CS]);
        assert_eq!(m.file_at(1), None);
        assert_eq!(m.file_at(2).map(|r| r.range()), Some(2..4));
        assert_eq!(m.file_at(3).map(|r| r.range()), Some(3..6));
        assert_eq!(m.file_at(5).map(|r| r.range()), Some(3..6));
        assert_eq!(m.file_at(6), None);
        assert_eq!(m.file_at(11).map(|r| r.range()), Some(10..12));
        assert_eq!(m.file_at(12), None);
        assert_eq!(FileMap::default().file_at(0), None);
    }

    #[test]
    fn groups_roundtrip_and_are_found_like_files() {
        let files = [2 * CS..3 * CS + 50, 3 * CS + 100..6 * CS];
        // Two directories' groups; one within a chunk (left out).
        let groups = [CS + 10..6 * CS, 6 * CS..9 * CS + 1, 9 * CS + 5..9 * CS + 9];
        let m = FileMap::with_groups(&grid(), 100 * CS, files, groups).unwrap();
        assert_eq!(
            m.groups,
            vec![
                ChunkRun { start: 1, count: 5 },
                ChunkRun { start: 6, count: 4 }
            ]
        );
        assert_eq!(roundtrip(&m, 200), m);
        assert_eq!(m.group_at(0), None);
        assert_eq!(m.group_at(3).map(|r| r.range()), Some(1..6));
        assert_eq!(m.group_at(6).map(|r| r.range()), Some(6..10));
        assert_eq!(m.group_at(10), None);
        // Read without its groups, the bytes have some left over.
        let mut out = Vec::new();
        m.encode(&mut out);
        let mut b = out.as_slice();
        let plain = FileMap::decode(&mut b, 200, false).unwrap();
        assert!(plain.groups.is_empty() && !b.is_empty());
        // Overlapping groups are refused, by name.
        let err = FileMap::with_groups(&grid(), 0, [], [0..3 * CS, CS..5 * CS]).unwrap_err();
        assert!(err.to_string().contains("group 1"), "{err}");
    }

    #[test]
    fn overlapping_files_are_refused() {
        let err = FileMap::from_byte_ranges(&grid(), 0, [0..3 * CS, CS..5 * CS]).unwrap_err();
        assert!(err.to_string().contains("run 1"), "{err}");
    }

    #[test]
    fn bad_bytes_are_refused_with_the_reason() {
        let enc = |m: &FileMap| {
            let mut out = Vec::new();
            m.encode(&mut out);
            out
        };
        let good = map(&[0..3 * CS, 5 * CS..9 * CS]);
        let bytes = enc(&good);
        // Beyond the image.
        let mut b = bytes.as_slice();
        let err = FileMap::decode(&mut b, 8, false).unwrap_err().to_string();
        assert!(
            err.contains("metadata chunk") || err.contains("leaves the image"),
            "{err}"
        );
        // Truncated.
        for cut in 0..bytes.len() {
            let mut b = &bytes[..cut];
            assert!(FileMap::decode(&mut b, 200, false).is_err(), "cut at {cut}");
        }
        // A count larger than the bytes.
        let mut huge = Vec::new();
        varint::put(&mut huge, 1);
        varint::put(&mut huge, 1 << 40);
        let err = FileMap::decode(&mut huge.as_slice(), 200, false).unwrap_err();
        assert!(err.to_string().contains("do not fit"), "{err}");
        // Overflowing run.
        let mut over = Vec::new();
        varint::put(&mut over, 0);
        varint::put(&mut over, 1);
        varint::put(&mut over, u64::MAX);
        varint::put(&mut over, 0);
        let err = FileMap::decode(&mut over.as_slice(), u64::MAX, false).unwrap_err();
        assert!(err.to_string().contains("overflows"), "{err}");
    }

    proptest! {
        #[test]
        fn encode_decode_roundtrip(sizes in proptest::collection::vec((0u64..4, 1u64..(8 * CS)), 0..64)) {
            // Files laid out one after another with gaps, as the writer does.
            let mut at = 0;
            let files: Vec<Range<u64>> = sizes.iter().map(|&(gap, len)| {
                let start = at + gap * 4096;
                at = start + len;
                start..at
            }).collect();
            let m = FileMap::from_byte_ranges(&grid(), at.next_multiple_of(CS), files.clone()).unwrap();
            let chunks = at.div_ceil(CS) + 1;
            prop_assert_eq!(roundtrip(&m, chunks), m.clone());
            // Every chunk of a multi-chunk file finds a run covering it.
            for f in &files {
                for c in f.start / CS..=(f.end - 1) / CS {
                    if (f.end - 1) / CS > f.start / CS {
                        let run = m.file_at(c).unwrap();
                        prop_assert!(run.range().contains(&c));
                    }
                }
            }
        }
    }
}
