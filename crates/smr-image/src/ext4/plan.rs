//! First pass over the tree: inode numbers, link counts, validation, and the
//! number of metadata blocks each inode needs.
//!
//! The walk is breadth-first from the root, each directory's entries in name
//! order; an inode gets its number the first time it is reached. The root is
//! inode 2 and the root's `lost+found` entry is inode 11 (a new empty
//! directory when the tree has none); the others count up from 12.

use std::collections::{BTreeMap, VecDeque};
use std::ops::{Bound, Range};

use super::format::{
    BLOCK_SIZE, EXTENTS_IN_INODE, FIRST_USER_INO, LOST_FOUND_INO, MAX_EXTENT_LEN, ROOT_INO,
};
use super::layout::Bitmap;
use super::{dir, extent, xattr, Ext4Error};
use crate::tree::{InodeId, Kind, Tree};

/// Name of the directory e2fsck wants in the root.
pub const LOST_FOUND: &[u8] = b"lost+found";
/// Blocks of a new `lost+found` (16 KiB, as mke2fs makes it).
pub const LOST_FOUND_BLOCKS: u64 = 4;
/// `EXT4_LINK_MAX`.
const LINK_MAX: u64 = 65000;
/// Largest file ext4 maps with extents of 4 KiB blocks (2^32 - 1 blocks).
const MAX_FILE_SIZE: u64 = ((1 << 32) - 1) * BLOCK_SIZE;

/// One inode of the image.
#[derive(Debug)]
pub struct Node {
    /// Tree inode; `None` for a `lost+found` the tree lacks.
    pub src: Option<InodeId>,
    /// Directories: the parent's inode number.
    pub parent: u32,
    /// Names (non-directories) or 2 + subdirectories (directories).
    pub links: u64,
    /// Whether this is a directory.
    pub is_dir: bool,
    /// Directories: directory blocks.
    pub dir_blocks: u64,
    /// Regular files: data blocks in the data region.
    pub data_blocks: u64,
    /// Blocks this inode owns after the data region.
    pub meta_blocks: u64,
    /// Whether the last of `meta_blocks` is an xattr block.
    pub xattr_block: bool,
    /// First of `meta_blocks` (set by the layout).
    pub first_block: u64,
}

/// The result of the first pass.
pub struct Plan {
    /// Indexed by inode number; `None` for reserved and unused numbers.
    pub nodes: Vec<Option<Node>>,
    /// Tree inode id to image inode number (0: unreachable).
    pub ino_of: Vec<u32>,
    /// Whether `lost+found` is made up (not in the tree).
    pub synth_lost_found: bool,
    /// Data blocks of reachable files.
    pub used: Bitmap,
    /// Number of bits set in `used`.
    pub live_data_blocks: u64,
}

impl Plan {
    /// Highest inode number in use.
    pub fn last_ino(&self) -> u32 {
        u32::try_from(self.nodes.len().saturating_sub(1)).unwrap_or(u32::MAX)
    }
}

/// A directory's entry names in on-disk order (without `.` and `..`).
pub fn ordered_entries<'a>(
    entries: &'a BTreeMap<Vec<u8>, InodeId>,
    with_lost_found: bool,
) -> impl Iterator<Item = (&'a [u8], Option<InodeId>)> + 'a {
    let lf = LOST_FOUND;
    let before = entries.range::<[u8], _>((Bound::Unbounded, Bound::Excluded(lf)));
    let after = entries.range::<[u8], _>((Bound::Excluded(lf), Bound::Unbounded));
    // lost+found sorts between the two ranges: the made-up one or the tree's.
    let middle = if with_lost_found {
        Some((lf, None))
    } else {
        entries.get_key_value(lf).map(|(n, id)| (&n[..], Some(*id)))
    };
    before
        .map(|(n, id)| (&n[..], Some(*id)))
        .chain(middle)
        .chain(after.map(|(n, id)| (&n[..], Some(*id))))
}

fn path_of(parent: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(parent.len() + 1 + name.len());
    if parent != b"/" {
        p.extend_from_slice(parent);
    }
    p.push(b'/');
    p.extend_from_slice(name);
    p
}

fn show(path: &[u8]) -> String {
    String::from_utf8_lossy(path).into_owned()
}

fn valid_name(name: &[u8]) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name != b"."
        && name != b".."
        && !name.iter().any(|&c| c == b'/' || c == 0)
}

struct Walker<'t> {
    tree: &'t Tree,
    data: Range<u64>,
    plan: Plan,
}

/// Walks `tree`; `data` is the range of blocks file extents may use.
pub fn build(tree: &Tree, data: Range<u64>) -> Result<Plan, Ext4Error> {
    let root = tree
        .inodes
        .get(tree.root as usize)
        .ok_or(Ext4Error::BadInodeId {
            path: "/".into(),
            id: tree.root,
        })?;
    let Kind::Dir {
        entries: root_entries,
    } = &root.kind
    else {
        return Err(Ext4Error::RootNotDir);
    };
    let synth = !root_entries.contains_key(LOST_FOUND);
    let mut w = Walker {
        tree,
        data,
        plan: Plan {
            nodes: (0..FIRST_USER_INO).map(|_| None).collect(),
            ino_of: vec![0; tree.inodes.len()],
            synth_lost_found: synth,
            used: Bitmap::default(),
            live_data_blocks: 0,
        },
    };
    w.plan.ino_of[tree.root as usize] = ROOT_INO;
    let root_node = w.node(tree.root, b"/", ROOT_INO)?;
    w.plan.nodes[ROOT_INO as usize] = Some(root_node);
    if synth {
        w.plan.nodes[LOST_FOUND_INO as usize] = Some(Node {
            src: None,
            parent: ROOT_INO,
            links: 2,
            is_dir: true,
            dir_blocks: LOST_FOUND_BLOCKS,
            data_blocks: 0,
            meta_blocks: LOST_FOUND_BLOCKS,
            xattr_block: false,
            first_block: 0,
        });
        w.add_subdir(ROOT_INO);
    }
    let mut queue = VecDeque::from([(tree.root, ROOT_INO, b"/".to_vec())]);
    while let Some((id, ino, path)) = queue.pop_front() {
        let Kind::Dir { entries } = &w.tree.inodes[id as usize].kind else {
            continue;
        };
        for (name, &child) in entries {
            let child_path = path_of(&path, name);
            if !valid_name(name) {
                return Err(Ext4Error::BadName {
                    path: show(&child_path),
                });
            }
            let inode = w
                .tree
                .inodes
                .get(child as usize)
                .ok_or(Ext4Error::BadInodeId {
                    path: show(&child_path),
                    id: child,
                })?;
            let is_dir = matches!(inode.kind, Kind::Dir { .. });
            let known = w.plan.ino_of[child as usize];
            if known != 0 {
                if is_dir {
                    return Err(Ext4Error::DirLinkedTwice {
                        path: show(&child_path),
                    });
                }
                w.add_link(known, &child_path)?;
                continue;
            }
            let child_ino = if ino == ROOT_INO && name == LOST_FOUND {
                LOST_FOUND_INO
            } else {
                u32::try_from(w.plan.nodes.len())
                    .ok()
                    .filter(|&n| n < u32::MAX)
                    .ok_or(Ext4Error::TooManyInodes {
                        count: w.plan.nodes.len() as u64,
                    })?
            };
            w.plan.ino_of[child as usize] = child_ino;
            let node = w.node(child, &child_path, ino)?;
            if child_ino == LOST_FOUND_INO {
                w.plan.nodes[LOST_FOUND_INO as usize] = Some(node);
            } else {
                w.plan.nodes.push(Some(node));
            }
            if is_dir {
                w.add_subdir(ino);
                queue.push_back((child, child_ino, child_path));
            }
        }
    }
    Ok(w.plan)
}

impl Walker<'_> {
    fn add_subdir(&mut self, dir: u32) {
        if let Some(Some(n)) = self.plan.nodes.get_mut(dir as usize) {
            n.links += 1;
        }
    }

    fn add_link(&mut self, ino: u32, path: &[u8]) -> Result<(), Ext4Error> {
        if let Some(Some(n)) = self.plan.nodes.get_mut(ino as usize) {
            n.links += 1;
            if n.links > LINK_MAX {
                return Err(Ext4Error::TooManyLinks {
                    path: show(path),
                    links: n.links,
                });
            }
        }
        Ok(())
    }

    /// Validates tree inode `id` (first reached at `path`) and sizes its metadata.
    fn node(&mut self, id: InodeId, path: &[u8], parent: u32) -> Result<Node, Ext4Error> {
        let inode = &self.tree.inodes[id as usize];
        let mut node = Node {
            src: Some(id),
            parent,
            links: 1,
            is_dir: false,
            dir_blocks: 0,
            data_blocks: 0,
            meta_blocks: 0,
            xattr_block: false,
            first_block: 0,
        };
        match &inode.kind {
            Kind::Dir { entries } => {
                let with_lf = id == self.tree.root && self.plan.synth_lost_found;
                let names = [1, 2]
                    .into_iter()
                    .chain(ordered_entries(entries, with_lf).map(|(n, _)| n.len()));
                node.is_dir = true;
                node.links = 2;
                node.dir_blocks = dir::block_count(names);
                node.meta_blocks =
                    node.dir_blocks + extent::tree_blocks(node.dir_blocks.div_ceil(MAX_EXTENT_LEN));
            }
            Kind::File { size, extents } => {
                let err = |reason| Ext4Error::BadExtents {
                    path: show(path),
                    reason,
                };
                if *size > MAX_FILE_SIZE {
                    return Err(Ext4Error::FileTooLarge {
                        path: show(path),
                        size: *size,
                    });
                }
                let size_blocks = size.div_ceil(BLOCK_SIZE);
                let mut prev_end = 0;
                for e in extents {
                    let end = e.logical.checked_add(e.len).ok_or(err("overflow"))?;
                    if e.len == 0 {
                        return Err(err("empty extent"));
                    }
                    if e.logical < prev_end {
                        return Err(err("unordered or overlapping"));
                    }
                    if end > size_blocks {
                        return Err(err("past the end of the file"));
                    }
                    let phys_end = e.physical.checked_add(e.len).ok_or(err("overflow"))?;
                    if e.physical < self.data.start || phys_end > self.data.end {
                        return Err(err("outside the data written by this writer"));
                    }
                    if let Some(block) = self.plan.used.set_range_exclusive(e.physical, e.len) {
                        return Err(Ext4Error::SharedBlock {
                            path: show(path),
                            block,
                        });
                    }
                    node.data_blocks += e.len;
                    prev_end = end;
                }
                self.plan.live_data_blocks += node.data_blocks;
                let n = extent::leaf_count(extents);
                node.meta_blocks = if n > EXTENTS_IN_INODE as u64 {
                    extent::tree_blocks(n)
                } else {
                    0
                };
            }
            Kind::Symlink { target } => {
                if target.is_empty() || target.len() >= BLOCK_SIZE as usize {
                    return Err(Ext4Error::SymlinkLength {
                        path: show(path),
                        len: target.len(),
                    });
                }
                node.meta_blocks = u64::from(target.len() >= 60);
            }
            Kind::CharDev { major, minor } | Kind::BlockDev { major, minor } => {
                if *major > 0xfff || *minor > 0xf_ffff {
                    return Err(Ext4Error::DeviceNumber {
                        path: show(path),
                        major: *major,
                        minor: *minor,
                    });
                }
            }
            Kind::Fifo => {}
        }
        let split = xattr::prepare(&inode.meta.xattrs)
            .and_then(xattr::split)
            .map_err(|source| Ext4Error::Xattr {
                path: show(path),
                source,
            })?;
        if !split.block.is_empty() {
            node.xattr_block = true;
            node.meta_blocks += 1;
        }
        Ok(node)
    }
}
