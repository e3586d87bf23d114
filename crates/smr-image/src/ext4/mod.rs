//! The deterministic, streaming ext4 writer.
//!
//! # Image layout
//!
//! ```text
//! block 0            superblock at byte 1024 (written last, by finish)
//! blocks 1..=64      group descriptor table reservation (1 TiB of groups);
//!                    blocks past the real table are free and zero
//! data_offset()      first layer's data, aligned to the chunk size; each
//!                    later layer starts on the next chunk boundary
//! ...                data in arrival order; all-zero blocks are holes
//! chunk-aligned      per inode, in inode order: directory blocks, extent
//!                    tree blocks, long symlink targets, xattr blocks
//!                    then all block bitmaps, all inode bitmaps, all inode
//!                    tables (flex_bg lets them live anywhere)
//! end                free headroom (zeros, never written)
//! ```
//!
//! Nothing before [`data_offset`] depends on file data, and a layer's data
//! region depends only on that layer and the chunk-aligned offset it starts
//! at, so unchanged layers keep identical chunks. The filesystem has 4 KiB
//! blocks, 256-byte inodes, extents, no journal, no checksums, linear
//! directories, and one superblock (`sparse_super2` with no backups).
//!
//! Inode numbers are assigned breadth-first from the root, entries in name
//! order: 2 is the root, 11 is `lost+found` (the tree's own or a new empty
//! one), tree entries start at 12. Same tree and same data give the same
//! bytes: there is no time or randomness anywhere.

mod data;
mod dir;
mod emit;
mod extent;
mod format;
mod inode;
mod layout;
mod plan;
mod xattr;

#[cfg(test)]
mod tests;

use std::io;

pub use xattr::XattrError;

use crate::tree::Tree;

/// Length of the header region `[0, header_len())`: the superblock and the
/// group descriptor table reservation. It is the same for every image, and
/// bytes in it are written only by [`Ext4Writer::finish`].
pub const fn header_len() -> u64 {
    layout::HEADER_BLOCKS * format::BLOCK_SIZE
}

// The header a node prefetches as metadata is this writer's.
const _: () = assert!(header_len() == smr_format::filemap::HEADER_BYTES);

/// Largest image this writer produces (limited by the reserved descriptor table).
pub const MAX_IMAGE_SIZE: u64 = layout::MAX_BLOCKS * format::BLOCK_SIZE;

/// Offset where the first layer's data starts: [`header_len`] rounded up to
/// `chunk_size`. Chunks below it hold only header bytes (and zeros).
pub fn data_offset(chunk_size: u64) -> u64 {
    header_len().next_multiple_of(chunk_size.max(1))
}

/// Destination of image bytes.
///
/// Offsets are absolute image offsets. Writes outside the header region
/// `[0, header_len())` arrive at non-decreasing offsets; gaps between writes
/// are zeros; writes into the header region happen only during
/// [`Ext4Writer::finish`], after everything else, followed by one call to
/// [`ImageSink::set_len`].
pub trait ImageSink {
    /// Writes all of `data` at `offset`.
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()>;

    /// Called once, before the first write of the metadata region at the
    /// end of the image (which starts at `offset`, a multiple of the chunk
    /// size): every later write is at or past it. Sinks that do not care
    /// keep this default, which does nothing.
    fn metadata_starts(&mut self, offset: u64) -> io::Result<()> {
        let _ = offset;
        Ok(())
    }

    /// Called once, last: the image is `size` bytes long, the tail past the
    /// last write being zeros. Sinks that learn the size another way may keep
    /// this default, which does nothing.
    fn set_len(&mut self, size: u64) -> io::Result<()> {
        let _ = size;
        Ok(())
    }
}

impl ImageSink for std::fs::File {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        std::os::unix::fs::FileExt::write_all_at(self, data, offset)
    }

    fn set_len(&mut self, size: u64) -> io::Result<()> {
        std::fs::File::set_len(self, size)
    }
}

/// An in-memory image (tests, small images).
impl ImageSink for Vec<u8> {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        let start = usize::try_from(offset).map_err(io::Error::other)?;
        let end = start + data.len();
        if self.len() < end {
            self.resize(end, 0);
        }
        self[start..end].copy_from_slice(data);
        Ok(())
    }

    fn set_len(&mut self, size: u64) -> io::Result<()> {
        self.resize(usize::try_from(size).map_err(io::Error::other)?, 0);
        Ok(())
    }
}

impl<S: ImageSink + ?Sized> ImageSink for &mut S {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        (**self).write_at(offset, data)
    }

    fn set_len(&mut self, size: u64) -> io::Result<()> {
        (**self).set_len(size)
    }
}

/// Writer settings. Each one changes the image bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// Alignment of each layer's data: a power of two, at least 4096.
    pub chunk_size: u64,
    /// Filesystem UUID (`s_uuid`).
    pub uuid: [u8; 16],
    /// Directory hash seed (`s_hash_seed`).
    pub hash_seed: [u8; 16],
}

/// What [`Ext4Writer::finish`] produced.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ext4Stats {
    /// Image size in bytes.
    pub image_size: u64,
    /// Length of the header region (see [`header_len`]).
    pub header_len: u64,
    /// File data blocks written by [`crate::tree::DataSink::write_file`].
    pub data_blocks_written: u64,
    /// Data blocks referenced by files reachable from the root.
    pub live_data_blocks: u64,
    /// Blocks holding filesystem metadata (superblock, descriptors, bitmaps,
    /// inode tables, directories, extent trees, xattr blocks, long symlinks).
    pub metadata_blocks: u64,
    /// Inodes in use (including the reserved inodes 1 to 10).
    pub inodes_used: u64,
    /// Inodes in the filesystem.
    pub inodes_total: u64,
    /// Blocks in the filesystem.
    pub blocks_total: u64,
    /// Free blocks.
    pub free_blocks: u64,
    /// Byte offset where the metadata after the data starts (directory
    /// and extent blocks, bitmaps, inode tables; chunk-aligned): from here
    /// to the end the image holds only metadata and zeros.
    pub metadata_offset: u64,
    /// The data of every reachable regular file with data, as the byte
    /// range of the image from its first to its last data block (files'
    /// ranges are disjoint), in inode order.
    pub files: Vec<std::ops::Range<u64>>,
    /// The data of runs of files laid out one after another that are all
    /// in one directory (by the name each is first reached by), as byte
    /// ranges from the first file's data to the last one's, in image
    /// order (disjoint).
    pub groups: Vec<std::ops::Range<u64>>,
}

/// Why an image could not be written. Path fields name the tree entry
/// (`/a/b`), lossily decoded.
#[derive(Debug, thiserror::Error)]
pub enum Ext4Error {
    /// The sink failed.
    #[error("image I/O: {0}")]
    Io(#[from] io::Error),
    /// The image would exceed [`MAX_IMAGE_SIZE`].
    #[error("image needs {blocks} blocks of 4 KiB; at most {max} are supported")]
    TooLarge {
        /// Blocks needed.
        blocks: u64,
        /// Blocks supported.
        max: u64,
    },
    /// [`Options::chunk_size`] is not a power of two >= 4096.
    #[error("chunk size {0} is not a power of two >= 4096")]
    ChunkSize(u64),
    /// The tree names an inode id outside its arena.
    #[error("{path}: inode id {id} is not in the tree")]
    BadInodeId {
        /// Entry path.
        path: String,
        /// The id.
        id: u32,
    },
    /// The root is not a directory.
    #[error("the tree root is not a directory")]
    RootNotDir,
    /// A directory entry name is empty, `.`, `..`, over 255 bytes, or holds `/` or NUL.
    #[error("{path}: invalid entry name")]
    BadName {
        /// Entry path.
        path: String,
    },
    /// A directory is reachable by more than one name (or contains itself).
    #[error("{path}: directory reachable by more than one name")]
    DirLinkedTwice {
        /// Second path found.
        path: String,
    },
    /// More hard links than ext4 allows.
    #[error("{path}: {links} hard links, at most 65000 allowed")]
    TooManyLinks {
        /// One of the paths.
        path: String,
        /// Number of names.
        links: u64,
    },
    /// A file is larger than ext4 extents can map.
    #[error("{path}: size {size} exceeds the ext4 file size limit")]
    FileTooLarge {
        /// Entry path.
        path: String,
        /// Size in bytes.
        size: u64,
    },
    /// A file's extents are unordered, overlap, pass its size, or point
    /// outside the data written through this writer.
    #[error("{path}: invalid extents: {reason}")]
    BadExtents {
        /// Entry path.
        path: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// Two reachable inodes claim the same data block.
    #[error("{path}: data block {block} already belongs to another file")]
    SharedBlock {
        /// Entry path of the second claimant.
        path: String,
        /// Image block number.
        block: u64,
    },
    /// A symlink target is empty or 4096 bytes or longer.
    #[error("{path}: symlink target of {len} bytes (1 to 4095 allowed)")]
    SymlinkLength {
        /// Entry path.
        path: String,
        /// Target length.
        len: usize,
    },
    /// A device number does not fit Linux's 12-bit major, 20-bit minor.
    #[error("{path}: device number {major}:{minor} out of range")]
    DeviceNumber {
        /// Entry path.
        path: String,
        /// Major number.
        major: u32,
        /// Minor number.
        minor: u32,
    },
    /// Extended attributes that cannot be stored.
    #[error("{path}: {source}")]
    Xattr {
        /// Entry path.
        path: String,
        /// What is wrong.
        #[source]
        source: XattrError,
    },
    /// More inodes than ext4 allows.
    #[error("{count} inodes needed, more than ext4 supports")]
    TooManyInodes {
        /// Inodes needed.
        count: u64,
    },
}

/// Streams file data into an ext4 image and then writes its metadata.
///
/// Use it as the flattener's [`crate::tree::DataSink`], then call
/// [`Ext4Writer::finish`] with the final tree.
pub struct Ext4Writer<S: ImageSink> {
    sink: S,
    opts: Options,
    /// Block where the first layer's data starts.
    data_start: u64,
    /// Next data block to write.
    cursor: u64,
    /// Data blocks written so far.
    blocks_written: u64,
    /// Read buffer for file data (allocated on first use).
    buf: Vec<u8>,
}

impl<S: ImageSink> Ext4Writer<S> {
    /// A writer that will put the image into `sink`. Invalid options are
    /// reported by the first call that needs them.
    pub fn new(sink: S, opts: Options) -> Self {
        let data_start = data_offset(opts.chunk_size) / format::BLOCK_SIZE;
        Ext4Writer {
            sink,
            opts,
            data_start,
            cursor: data_start,
            blocks_written: 0,
            buf: Vec::new(),
        }
    }

    fn check_options(&self) -> Result<(), Ext4Error> {
        let c = self.opts.chunk_size;
        if !c.is_power_of_two() || c < format::BLOCK_SIZE {
            return Err(Ext4Error::ChunkSize(c));
        }
        Ok(())
    }

    /// Lays out and writes all metadata for the files of `tree` reachable
    /// from its root, then the superblock and descriptor table; returns the
    /// sink and statistics.
    ///
    /// File extents must come from this writer's
    /// [`crate::tree::DataSink::write_file`]. Data of unreachable inodes stays
    /// in the image as free blocks.
    pub fn finish(self, tree: &Tree) -> Result<(S, Ext4Stats), Ext4Error> {
        self.check_options()?;
        emit::finish(self, tree)
    }
}
