//! The second half of [`super::Ext4Writer::finish`]: plan, lay out, then
//! write metadata blocks, bitmaps and inode tables in increasing offset
//! order, and last the descriptor table and superblock.

use std::io;

use zerocopy::little_endian::{I16, U16, U32};
use zerocopy::{FromZeros, IntoBytes};

use super::format::*;
use super::layout::{self, Bitmap, Geometry};
use super::plan::{self, Plan};
use super::{inode, Ext4Error, Ext4Stats, Ext4Writer, ImageSink};
use crate::tree::{Kind, Tree};

const BATCH: usize = 1 << 20;

/// Coalesces adjacent writes into large ones.
struct Batch<'a, S: ImageSink> {
    sink: &'a mut S,
    start: u64,
    buf: Vec<u8>,
}

impl<S: ImageSink> Batch<'_, S> {
    fn write(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        if offset != self.start + self.buf.len() as u64 {
            self.flush()?;
            self.start = offset;
        }
        self.buf.extend_from_slice(data);
        if self.buf.len() >= BATCH {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            self.sink.write_at(self.start, &self.buf)?;
            self.start += self.buf.len() as u64;
            self.buf.clear();
        }
        Ok(())
    }
}

/// Sets bits `[from, BLOCK_SIZE * 8)` of a bitmap block (the padding past
/// the end of a group, which e2fsck expects set).
fn set_tail(bitmap: &mut [u8], from: u64) {
    for bit in from..BLOCK_SIZE * 8 {
        bitmap[(bit / 8) as usize] |= 1 << (bit % 8);
    }
}

pub(super) fn finish<S: ImageSink>(
    w: Ext4Writer<S>,
    tree: &Tree,
) -> Result<(S, Ext4Stats), Ext4Error> {
    let Ext4Writer {
        mut sink,
        opts,
        data_start,
        cursor,
        blocks_written,
        buf: _,
    } = w;
    let mut plan = plan::build(tree, data_start..cursor)?;
    let misc_start = cursor.next_multiple_of(opts.chunk_size / BLOCK_SIZE);
    let mut next = misc_start;
    for node in plan.nodes.iter_mut().flatten() {
        node.first_block = next;
        next += node.meta_blocks;
    }
    let misc_blocks = next - misc_start;
    let last_ino = u64::from(plan.last_ino());
    let geo = layout::compute(misc_start, misc_blocks, plan.live_data_blocks, last_ino)?;
    tracing::debug!(?geo, misc_start, misc_blocks, last_ino, "ext4 layout");

    let mut used = std::mem::take(&mut plan.used);
    used.set_range(0, 1 + geo.gdt_blocks());
    used.set_range(misc_start, geo.meta_end - misc_start);

    sink.metadata_starts(misc_start * BLOCK_SIZE)?;
    let mut batch = Batch {
        sink: &mut sink,
        start: 0,
        buf: Vec::with_capacity(BATCH),
    };
    let mut scratch = Vec::new();
    for (ino, node) in plan.nodes.iter().enumerate() {
        if let Some(node) = node {
            scratch.clear();
            inode::render(tree, &plan, ino as u32, node, &mut scratch)?;
            batch.write(node.first_block * BLOCK_SIZE, &scratch)?;
        }
    }
    let free_blocks = write_bitmaps(&mut batch, &geo, &used, last_ino)?;
    write_inode_tables(&mut batch, &geo, tree, &plan)?;
    batch.flush()?;

    let free_inodes = geo.inodes_count() - last_ino;
    let descs = group_descs(&geo, &plan, &free_blocks, last_ino);
    let free_total: u64 = free_blocks.iter().sum();
    let sb = superblock(&geo, &opts, free_total, free_inodes);
    sink.write_at(SUPERBLOCK_OFFSET, sb.as_bytes())?;
    sink.write_at(BLOCK_SIZE, descs.as_bytes())?;
    sink.set_len(geo.blocks_count * BLOCK_SIZE)?;

    let files = file_ranges(tree, &plan);
    let stats = Ext4Stats {
        image_size: geo.blocks_count * BLOCK_SIZE,
        header_len: super::header_len(),
        data_blocks_written: blocks_written,
        live_data_blocks: plan.live_data_blocks,
        metadata_blocks: 1 + geo.gdt_blocks() + misc_blocks + geo.groups * (2 + geo.itable_blocks),
        inodes_used: last_ino,
        inodes_total: geo.inodes_count(),
        blocks_total: geo.blocks_count,
        free_blocks: free_total,
        metadata_offset: misc_start * BLOCK_SIZE,
        files: files.iter().map(|(_, r)| r.clone()).collect(),
        groups: groups(files),
    };
    Ok((sink, stats))
}

/// Each reachable regular file's data: first to last data block, in
/// bytes, with the inode of the directory it was first named in.
fn file_ranges(tree: &Tree, plan: &Plan) -> Vec<(u32, std::ops::Range<u64>)> {
    plan.nodes
        .iter()
        .flatten()
        .filter_map(|node| match &tree.get(node.src?).kind {
            Kind::File { extents, .. } => {
                let first = extents.iter().map(|e| e.physical).min()?;
                let end = extents.iter().map(|e| e.physical + e.len).max()?;
                Some((node.parent, first * BLOCK_SIZE..end * BLOCK_SIZE))
            }
            _ => None,
        })
        .collect()
}

/// Runs of files laid out one after another in the image that are all in
/// one directory, from `files` (directory, data): each from the first
/// file's first byte to the last one's end, in image order.
fn groups(mut files: Vec<(u32, std::ops::Range<u64>)>) -> Vec<std::ops::Range<u64>> {
    files.sort_by_key(|(_, r)| r.start);
    let mut out: Vec<(u32, std::ops::Range<u64>)> = Vec::new();
    for (dir, r) in files {
        match out.last_mut() {
            Some((d, g)) if *d == dir => g.end = g.end.max(r.end),
            _ => out.push((dir, r)),
        }
    }
    out.into_iter().map(|(_, r)| r).collect()
}

/// Writes block then inode bitmaps; returns each group's free block count.
fn write_bitmaps<S: ImageSink>(
    batch: &mut Batch<'_, S>,
    geo: &Geometry,
    used: &Bitmap,
    last_ino: u64,
) -> io::Result<Vec<u64>> {
    let mut free = Vec::with_capacity(geo.groups as usize);
    for g in 0..geo.groups {
        let start = g * BLOCKS_PER_GROUP;
        let in_group = (geo.blocks_count - start).min(BLOCKS_PER_GROUP);
        free.push(in_group - used.count_aligned(start, start + BLOCKS_PER_GROUP));
        let mut bytes = used.bytes(start, BLOCK_SIZE as usize);
        set_tail(&mut bytes, in_group);
        batch.write((geo.block_bitmaps + g) * BLOCK_SIZE, &bytes)?;
    }
    let ipg = geo.inodes_per_group;
    for g in 0..geo.groups {
        let mut bytes = vec![0u8; BLOCK_SIZE as usize];
        let in_use = last_ino.saturating_sub(g * ipg).min(ipg);
        for bit in 0..in_use {
            bytes[(bit / 8) as usize] |= 1 << (bit % 8);
        }
        set_tail(&mut bytes, ipg);
        batch.write((geo.inode_bitmaps + g) * BLOCK_SIZE, &bytes)?;
    }
    Ok(free)
}

/// Writes the inode table blocks that hold used inodes (the rest are zeros).
fn write_inode_tables<S: ImageSink>(
    batch: &mut Batch<'_, S>,
    geo: &Geometry,
    tree: &Tree,
    plan: &Plan,
) -> Result<(), Ext4Error> {
    let mut scratch = Vec::new();
    let mut block = vec![0u8; BLOCK_SIZE as usize];
    let last_ino = u64::from(plan.last_ino());
    for g in 0..geo.groups {
        let first_ino = g * geo.inodes_per_group + 1;
        if first_ino > last_ino {
            break;
        }
        for b in 0..geo.itable_blocks {
            block.fill(0);
            let mut any = false;
            for i in 0..INODES_PER_BLOCK {
                let ino = first_ino + b * INODES_PER_BLOCK + i;
                let Some(Some(node)) = plan.nodes.get(ino as usize) else {
                    continue;
                };
                scratch.clear();
                let rec = inode::render(tree, plan, ino as u32, node, &mut scratch)?;
                let at = (i * INODE_SIZE) as usize;
                block[at..at + INODE_SIZE as usize].copy_from_slice(rec.as_bytes());
                any = true;
            }
            if any {
                let table_block = geo.inode_tables + g * geo.itable_blocks + b;
                batch.write(table_block * BLOCK_SIZE, &block)?;
            }
        }
    }
    Ok(())
}

fn group_descs(geo: &Geometry, plan: &Plan, free_blocks: &[u64], last_ino: u64) -> Vec<GroupDesc> {
    let ipg = geo.inodes_per_group;
    let mut dirs = vec![0u64; geo.groups as usize];
    for (ino, node) in plan.nodes.iter().enumerate() {
        if node.as_ref().is_some_and(|n| n.is_dir) {
            dirs[((ino as u64 - 1) / ipg) as usize] += 1;
        }
    }
    (0..geo.groups)
        .map(|g| {
            let in_use = last_ino.saturating_sub(g * ipg).min(ipg);
            let mut d = GroupDesc::new_zeroed();
            d.block_bitmap = U32::new((geo.block_bitmaps + g) as u32);
            d.inode_bitmap = U32::new((geo.inode_bitmaps + g) as u32);
            d.inode_table = U32::new((geo.inode_tables + g * geo.itable_blocks) as u32);
            d.free_blocks_count = U16::new(free_blocks[g as usize] as u16);
            d.free_inodes_count = U16::new((ipg - in_use) as u16);
            d.used_dirs_count = U16::new(dirs[g as usize] as u16);
            d
        })
        .collect()
}

fn superblock(
    geo: &Geometry,
    opts: &super::Options,
    free_blocks: u64,
    free_inodes: u64,
) -> SuperBlock {
    let mut sb = SuperBlock::new_zeroed();
    sb.inodes_count = U32::new(geo.inodes_count() as u32);
    sb.blocks_count_lo = U32::new(geo.blocks_count as u32);
    sb.blocks_count_hi = U32::new((geo.blocks_count >> 32) as u32);
    sb.free_blocks_count_lo = U32::new(free_blocks as u32);
    sb.free_blocks_count_hi = U32::new((free_blocks >> 32) as u32);
    sb.free_inodes_count = U32::new(free_inodes as u32);
    sb.first_data_block = U32::new(0);
    sb.log_block_size = U32::new(LOG_BLOCK_SIZE);
    sb.log_cluster_size = U32::new(LOG_BLOCK_SIZE);
    sb.blocks_per_group = U32::new(BLOCKS_PER_GROUP as u32);
    sb.clusters_per_group = U32::new(BLOCKS_PER_GROUP as u32);
    sb.inodes_per_group = U32::new(geo.inodes_per_group as u32);
    sb.max_mnt_count = I16::new(-1);
    sb.magic = U16::new(EXT4_MAGIC);
    sb.state = U16::new(1);
    sb.errors = U16::new(1);
    sb.rev_level = U32::new(1);
    sb.first_ino = U32::new(LOST_FOUND_INO);
    sb.inode_size = U16::new(INODE_SIZE as u16);
    sb.feature_compat = U32::new(COMPAT_EXT_ATTR | COMPAT_SPARSE_SUPER2);
    sb.feature_incompat = U32::new(INCOMPAT_FILETYPE | INCOMPAT_EXTENTS | INCOMPAT_FLEX_BG);
    sb.feature_ro_compat = U32::new(
        RO_COMPAT_SPARSE_SUPER
            | RO_COMPAT_LARGE_FILE
            | RO_COMPAT_HUGE_FILE
            | RO_COMPAT_DIR_NLINK
            | RO_COMPAT_EXTRA_ISIZE,
    );
    sb.uuid = opts.uuid;
    sb.hash_seed = opts.hash_seed;
    sb.def_hash_version = HASH_HALF_MD4;
    sb.min_extra_isize = U16::new(EXTRA_ISIZE);
    sb.want_extra_isize = U16::new(EXTRA_ISIZE);
    sb.flags = U32::new(FLAGS_SIGNED_HASH);
    sb.log_groups_per_flex = 4;
    sb
}

#[cfg(test)]
mod group_tests {
    use super::groups;

    #[test]
    fn a_directory_s_files_group_until_another_directory_s_come_between() {
        // Directory 2's files, directory 3's (a subdirectory), then 2's
        // again; given out of order.
        let files = vec![
            (2, 300..400),
            (2, 0..100),
            (3, 200..250),
            (2, 100..180),
            (3, 250..300),
            (2, 400..401),
        ];
        assert_eq!(groups(files), vec![0..180, 200..300, 300..401]);
        assert_eq!(groups(Vec::new()), Vec::<std::ops::Range<u64>>::new());
    }
}
