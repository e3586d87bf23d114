//! The flattened filesystem tree shared by the flattener and the ext4 writer.
//!
//! Inodes live in one arena ([`Tree::inodes`]); directories map names to inode
//! ids. Inodes that were replaced or deleted by an upper layer stay in the
//! arena but are unreachable from the root; writers walk from the root and skip
//! them. Every collection that reaches the output is ordered (`BTreeMap`), so
//! the same input always yields the same tree.

use std::collections::BTreeMap;
use std::io::Read;

/// Index of an inode in [`Tree::inodes`].
pub type InodeId = u32;

/// Filesystem block size used for data layout (bytes).
pub const BLOCK_SIZE: u64 = 4096;

/// A run of file blocks stored contiguously in the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// First block of the run within the file (in [`BLOCK_SIZE`] units).
    pub logical: u64,
    /// First block of the run within the image (in [`BLOCK_SIZE`] units).
    pub physical: u64,
    /// Number of blocks in the run.
    pub len: u64,
}

/// Metadata common to every inode kind.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Meta {
    /// Permission bits including setuid, setgid and sticky (`0o7777` mask).
    pub mode: u32,
    /// Owner user id.
    pub uid: u32,
    /// Owner group id.
    pub gid: u32,
    /// Modification time, seconds since the epoch (may be negative).
    pub mtime: i64,
    /// Nanoseconds part of the modification time.
    pub mtime_nsec: u32,
    /// Extended attributes, full names (e.g. `security.capability`) to values.
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

/// What an inode is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// A regular file: its size and where its non-hole blocks are.
    File {
        /// Size in bytes.
        size: u64,
        /// Data extents in increasing logical order; blocks not covered are holes.
        extents: Vec<Extent>,
    },
    /// A directory: names (without `/`, never `.` or `..`) to inode ids.
    Dir {
        /// Entries ordered by name bytes.
        entries: BTreeMap<Vec<u8>, InodeId>,
    },
    /// A symbolic link and its target bytes.
    Symlink {
        /// Link target, as stored in the tar header.
        target: Vec<u8>,
    },
    /// A character device.
    CharDev {
        /// Major number.
        major: u32,
        /// Minor number.
        minor: u32,
    },
    /// A block device.
    BlockDev {
        /// Major number.
        major: u32,
        /// Minor number.
        minor: u32,
    },
    /// A named pipe.
    Fifo,
}

/// One inode of the tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inode {
    /// The inode's type and type-specific payload.
    pub kind: Kind,
    /// Ownership, mode, times and xattrs.
    pub meta: Meta,
}

/// A flattened filesystem: an inode arena and its root directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tree {
    /// All inodes ever created; unreachable ones are garbage.
    pub inodes: Vec<Inode>,
    /// The root directory's id.
    pub root: InodeId,
}

impl Tree {
    /// A tree holding only an empty root directory (mode 0755, root-owned).
    pub fn new() -> Self {
        let root = Inode {
            kind: Kind::Dir {
                entries: BTreeMap::new(),
            },
            meta: Meta {
                mode: 0o755,
                ..Meta::default()
            },
        };
        Tree {
            inodes: vec![root],
            root: 0,
        }
    }

    /// Adds an inode to the arena and returns its id.
    pub fn push(&mut self, inode: Inode) -> InodeId {
        let id = InodeId::try_from(self.inodes.len()).expect("more than 2^32 inodes");
        self.inodes.push(inode);
        id
    }

    /// The inode with id `id`.
    ///
    /// # Panics
    /// If `id` was not returned by [`Tree::push`] (ids are never input-derived).
    pub fn get(&self, id: InodeId) -> &Inode {
        &self.inodes[id as usize]
    }

    /// Mutable access to the inode with id `id`.
    ///
    /// # Panics
    /// If `id` was not returned by [`Tree::push`].
    pub fn get_mut(&mut self, id: InodeId) -> &mut Inode {
        &mut self.inodes[id as usize]
    }
}

impl Default for Tree {
    fn default() -> Self {
        Self::new()
    }
}

/// Where the flattener puts regular file data while it reads the layers.
///
/// The ext4 writer implements this: data is laid out in the order it arrives,
/// and each layer starts on a chunk boundary so that a layer's data region
/// depends only on that layer.
pub trait DataSink {
    /// Called before the first entry of each layer.
    fn start_layer(&mut self) -> std::io::Result<()>;

    /// Stores `size` bytes read from `data` as one file's contents and returns
    /// the extents that hold them. All-zero blocks may be left as holes.
    /// Fails if `data` ends before `size` bytes.
    fn write_file(&mut self, data: &mut dyn Read, size: u64) -> std::io::Result<Vec<Extent>>;
}
