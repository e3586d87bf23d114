//! Rendering one planned inode: its 256-byte record and its metadata blocks
//! (directory blocks, extent tree blocks, long symlink target, xattr block),
//! in that order from the node's first block.
//!
//! The same function serves both output passes (metadata blocks, then inode
//! tables), so the two always agree.

use std::collections::BTreeMap;

use zerocopy::little_endian::{U16, U32};
use zerocopy::FromZeros;

use super::format::{
    Inode, BLOCK_SIZE, EXTENTS_FL, EXTRA_ISIZE, FT_BLKDEV, FT_CHRDEV, FT_DIR, FT_FIFO, FT_REG_FILE,
    FT_SYMLINK, LOST_FOUND_INO, S_IFBLK, S_IFCHR, S_IFDIR, S_IFIFO, S_IFLNK, S_IFREG,
};
use super::plan::{ordered_entries, Node, Plan, LOST_FOUND_BLOCKS};
use super::{dir, extent, xattr, Ext4Error};
use crate::tree::{Extent, InodeId, Kind, Meta, Tree};

/// Seconds range an ext4 timestamp with 2 epoch bits can hold.
const MIN_TIME: i64 = -(1 << 31);
const MAX_TIME: i64 = (1 << 31) - 1 + 3 * (1 << 32);

/// Encodes a time as (`i_*time`, `i_*time_extra`): the low 32 bits of the
/// seconds, then 2 epoch bits and 30 bits of nanoseconds. Out-of-range
/// values are clamped (1901-12-13 to 2446-05-10), as the kernel does.
pub fn encode_time(sec: i64, nsec: u32) -> (u32, u32) {
    let sec = sec.clamp(MIN_TIME, MAX_TIME);
    let nsec = nsec.min(999_999_999);
    let epoch = ((sec - i64::from(sec as i32)) >> 32) as u32 & 3;
    (sec as u32, epoch | (nsec << 2))
}

/// Encodes a device number in `i_block[0..2]` like the kernel: the old 16-bit
/// form in word 0 when major and minor are < 256, else the new 32-bit form in
/// word 1.
pub fn encode_dev(major: u32, minor: u32) -> [u32; 2] {
    if major < 256 && minor < 256 {
        [(major << 8) | minor, 0]
    } else {
        [0, (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12)]
    }
}

/// Directory entry type of a tree inode kind.
pub fn file_type(kind: &Kind) -> u8 {
    match kind {
        Kind::File { .. } => FT_REG_FILE,
        Kind::Dir { .. } => FT_DIR,
        Kind::Symlink { .. } => FT_SYMLINK,
        Kind::CharDev { .. } => FT_CHRDEV,
        Kind::BlockDev { .. } => FT_BLKDEV,
        Kind::Fifo => FT_FIFO,
    }
}

/// Renders inode `ino`: appends exactly `node.meta_blocks` blocks to `out`
/// and returns the inode record.
pub fn render(
    tree: &Tree,
    plan: &Plan,
    ino: u32,
    node: &Node,
    out: &mut Vec<u8>,
) -> Result<Inode, Ext4Error> {
    let start_len = out.len();
    let lost_found_meta;
    let (kind, meta) = match node.src {
        Some(id) => {
            let i = &tree.inodes[id as usize];
            (Some(&i.kind), &i.meta)
        }
        None => {
            lost_found_meta = synth_lost_found_meta(tree);
            (None, &lost_found_meta)
        }
    };
    let mut inode = Inode::new_zeroed();
    let body = render_body(tree, plan, ino, node, kind, &mut inode, out);
    render_xattrs(ino, node, meta, start_len, &mut inode, out)?;
    debug_assert_eq!(
        (out.len() - start_len) as u64,
        node.meta_blocks * BLOCK_SIZE
    );
    set_mode_and_owner(&mut inode, body.type_bits, meta);
    set_size(&mut inode, body.size);
    set_times(&mut inode, meta);
    set_counts(&mut inode, node);
    inode.flags = U32::new(body.flags);
    inode.extra_isize = U16::new(EXTRA_ISIZE);
    Ok(inode)
}

/// What the kind-specific part of an inode decides besides `i_block`.
struct Body {
    /// File type bits of `i_mode`.
    type_bits: u16,
    /// `i_size`.
    size: u64,
    /// `i_flags`.
    flags: u32,
}

/// Metadata of a `lost+found` the tree lacks: owned by root, mode 0700,
/// the root's times.
fn synth_lost_found_meta(tree: &Tree) -> Meta {
    let root = &tree.inodes[tree.root as usize].meta;
    Meta {
        mode: 0o700,
        mtime: root.mtime,
        mtime_nsec: root.mtime_nsec,
        ..Meta::default()
    }
}

/// Fills `i_block` by kind (`None`: the made-up `lost+found`) and appends
/// the kind's metadata blocks (directory blocks, extent tree blocks, long
/// symlink target) to `out`.
fn render_body(
    tree: &Tree,
    plan: &Plan,
    ino: u32,
    node: &Node,
    kind: Option<&Kind>,
    inode: &mut Inode,
    out: &mut Vec<u8>,
) -> Body {
    match kind {
        None => render_dir(node, inode, out, |out| {
            render_lost_found_blocks(ino, node, out)
        }),
        Some(Kind::Dir { entries }) => render_dir(node, inode, out, |out| {
            render_dir_blocks(tree, plan, ino, node, entries, out)
        }),
        Some(Kind::File { size, extents }) => {
            inode.block = extent::build(&extent::leaves(extents), node.first_block, out);
            Body {
                type_bits: S_IFREG,
                size: *size,
                flags: EXTENTS_FL,
            }
        }
        Some(Kind::Symlink { target }) => render_symlink(node, target, inode, out),
        Some(Kind::CharDev { major, minor }) => {
            set_device(inode, *major, *minor);
            no_data(S_IFCHR)
        }
        Some(Kind::BlockDev { major, minor }) => {
            set_device(inode, *major, *minor);
            no_data(S_IFBLK)
        }
        Some(Kind::Fifo) => no_data(S_IFIFO),
    }
}

/// The body of an inode with neither data nor flags.
fn no_data(type_bits: u16) -> Body {
    Body {
        type_bits,
        size: 0,
        flags: 0,
    }
}

/// A directory: `blocks` appends its directory blocks and returns their
/// count; then the extent tree mapping them follows.
fn render_dir(
    node: &Node,
    inode: &mut Inode,
    out: &mut Vec<u8>,
    blocks: impl FnOnce(&mut Vec<u8>) -> u64,
) -> Body {
    let first = out.len();
    let blocks = blocks(out);
    debug_assert_eq!(blocks, node.dir_blocks);
    debug_assert_eq!((out.len() - first) as u64, blocks * BLOCK_SIZE);
    let run = Extent {
        logical: 0,
        physical: node.first_block,
        len: blocks,
    };
    inode.block = extent::build(&extent::leaves(&[run]), node.first_block + blocks, out);
    Body {
        type_bits: S_IFDIR,
        size: blocks * BLOCK_SIZE,
        flags: EXTENTS_FL,
    }
}

/// The directory blocks of a tree directory: `.`, `..`, then the entries
/// (with a made-up `lost+found` in the root when the plan has one).
fn render_dir_blocks(
    tree: &Tree,
    plan: &Plan,
    ino: u32,
    node: &Node,
    entries: &BTreeMap<Vec<u8>, InodeId>,
    out: &mut Vec<u8>,
) -> u64 {
    let with_lf = node.src == Some(tree.root) && plan.synth_lost_found;
    let dots = [(&b"."[..], ino, FT_DIR), (&b".."[..], node.parent, FT_DIR)];
    let children = ordered_entries(entries, with_lf).map(|(name, id)| match id {
        Some(id) => (
            name,
            plan.ino_of[id as usize],
            file_type(&tree.inodes[id as usize].kind),
        ),
        None => (name, LOST_FOUND_INO, FT_DIR),
    });
    let all = dots.into_iter().chain(children);
    dir::render(
        all.map(|(name, ino, file_type)| dir::Entry {
            ino,
            name,
            file_type,
        }),
        out,
    )
}

/// The directory blocks of a made-up `lost+found`: `.` and `..`, then
/// empty blocks up to [`LOST_FOUND_BLOCKS`].
fn render_lost_found_blocks(ino: u32, node: &Node, out: &mut Vec<u8>) -> u64 {
    let dots = [
        dir::Entry {
            ino,
            name: b".",
            file_type: FT_DIR,
        },
        dir::Entry {
            ino: node.parent,
            name: b"..",
            file_type: FT_DIR,
        },
    ];
    dir::render(dots, out);
    for _ in 1..LOST_FOUND_BLOCKS {
        dir::empty_block(out);
    }
    LOST_FOUND_BLOCKS
}

/// A symlink: a target under 60 bytes is stored inline in `i_block`, a
/// longer one in a block of its own mapped by an extent.
fn render_symlink(node: &Node, target: &[u8], inode: &mut Inode, out: &mut Vec<u8>) -> Body {
    let mut flags = 0;
    if target.len() < 60 {
        inode.block[..target.len()].copy_from_slice(target);
    } else {
        let at = out.len();
        out.resize(at + BLOCK_SIZE as usize, 0);
        out[at..at + target.len()].copy_from_slice(target);
        let run = Extent {
            logical: 0,
            physical: node.first_block,
            len: 1,
        };
        inode.block = extent::build(&extent::leaves(&[run]), node.first_block + 1, out);
        flags = EXTENTS_FL;
    }
    Body {
        type_bits: S_IFLNK,
        size: target.len() as u64,
        flags,
    }
}

/// A device inode: the device number in `i_block[0..8]`.
fn set_device(inode: &mut Inode, major: u32, minor: u32) {
    let words = encode_dev(major, minor);
    inode.block[..4].copy_from_slice(&words[0].to_le_bytes());
    inode.block[4..8].copy_from_slice(&words[1].to_le_bytes());
}

/// Extended attributes: those that fit go in the inode body, the rest in an
/// xattr block appended to `out` as the node's last metadata block.
fn render_xattrs(
    ino: u32,
    node: &Node,
    meta: &Meta,
    start_len: usize,
    inode: &mut Inode,
    out: &mut Vec<u8>,
) -> Result<(), Ext4Error> {
    let split = xattr::prepare(&meta.xattrs)
        .and_then(xattr::split)
        .map_err(|source| Ext4Error::Xattr {
            path: format!("inode {ino}"),
            source,
        })?;
    inode.xattr_area = xattr::ibody(&split.ibody);
    if !split.block.is_empty() {
        let block_no = node.first_block + node.meta_blocks - 1;
        debug_assert_eq!(
            out.len() - start_len,
            (node.meta_blocks - 1) as usize * 4096
        );
        out.extend_from_slice(&xattr::block(&split.block));
        inode.file_acl_lo = U32::new(block_no as u32);
        inode.file_acl_high = U16::new((block_no >> 32) as u16);
    }
    Ok(())
}

/// `i_mode` (type bits and permissions), `i_uid` and `i_gid`.
fn set_mode_and_owner(inode: &mut Inode, type_bits: u16, meta: &Meta) {
    inode.mode = U16::new(type_bits | (meta.mode & 0o7777) as u16);
    inode.uid = U16::new(meta.uid as u16);
    inode.uid_high = U16::new((meta.uid >> 16) as u16);
    inode.gid = U16::new(meta.gid as u16);
    inode.gid_high = U16::new((meta.gid >> 16) as u16);
}

/// `i_size`, split in its low and high words.
fn set_size(inode: &mut Inode, size: u64) {
    inode.size_lo = U32::new(size as u32);
    inode.size_high = U32::new((size >> 32) as u32);
}

/// All four timestamps (access, change, modification, creation) are the
/// modification time.
fn set_times(inode: &mut Inode, meta: &Meta) {
    let (t, extra) = encode_time(meta.mtime, meta.mtime_nsec);
    for (field, extra_field) in [
        (&mut inode.atime, &mut inode.atime_extra),
        (&mut inode.ctime, &mut inode.ctime_extra),
        (&mut inode.mtime, &mut inode.mtime_extra),
        (&mut inode.crtime, &mut inode.crtime_extra),
    ] {
        *field = U32::new(t);
        *extra_field = U32::new(extra);
    }
}

/// `i_links_count` and `i_blocks` (512-byte sectors of data and metadata).
fn set_counts(inode: &mut Inode, node: &Node) {
    // dir_nlink: a directory with too many subdirectories counts 1.
    let links = if node.is_dir && node.links >= 65000 {
        1
    } else {
        node.links
    };
    inode.links_count = U16::new(u16::try_from(links).unwrap_or(u16::MAX));
    let sectors = (node.data_blocks + node.meta_blocks) * (BLOCK_SIZE / 512);
    inode.blocks_lo = U32::new(sectors as u32);
    inode.blocks_high = U16::new((sectors >> 32) as u16);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_round_trip_through_the_kernel_decoding() {
        fn decode(lo: u32, extra: u32) -> (i64, u32) {
            let mut sec = i64::from(lo as i32);
            sec += i64::from(extra & 3) << 32;
            (sec, extra >> 2)
        }
        for sec in [
            0,
            1,
            -1,
            1 << 31,
            (1 << 31) - 1,
            -(1 << 31),
            1 << 33,
            15_000_000_000,
        ] {
            let (lo, extra) = encode_time(sec, 123_456_789);
            assert_eq!(decode(lo, extra), (sec, 123_456_789), "sec {sec}");
        }
        assert_eq!(
            decode(encode_time(i64::MIN, 0).0, encode_time(i64::MIN, 0).1).0,
            MIN_TIME
        );
        let (lo, extra) = encode_time(i64::MAX, 2_000_000_000);
        assert_eq!(decode(lo, extra), (MAX_TIME, 999_999_999));
    }

    #[test]
    fn device_numbers_use_old_and_new_forms() {
        assert_eq!(encode_dev(1, 3), [0x0103, 0]);
        assert_eq!(encode_dev(255, 255), [0xffff, 0]);
        // new_encode_dev(MKDEV(256, 1)) = 1 | 256 << 8
        assert_eq!(encode_dev(256, 1), [0, 0x1_0001]);
        // minor 0x12345: low byte 0x45, high bits 0x123 << 20
        assert_eq!(
            encode_dev(8, 0x12345),
            [0, 0x45 | (8 << 8) | (0x12300 << 12)]
        );
    }
}
