//! On-disk ext4 structures (the subset this writer produces).
//!
//! Field names follow the kernel's `fs/ext4/ext4.h` and
//! `Documentation/filesystems/ext4/`. Every multi-byte field is little-endian.

use zerocopy::little_endian::{I16, U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Filesystem block size in bytes.
pub const BLOCK_SIZE: u64 = 4096;
/// `log2(BLOCK_SIZE) - 10`, as stored in `s_log_block_size`.
pub const LOG_BLOCK_SIZE: u32 = 2;
/// Blocks per block group (one bitmap block worth of bits).
pub const BLOCKS_PER_GROUP: u64 = BLOCK_SIZE * 8;
/// On-disk inode record size.
pub const INODE_SIZE: u64 = 256;
/// Inodes per inode-table block.
pub const INODES_PER_BLOCK: u64 = BLOCK_SIZE / INODE_SIZE;
/// Bytes of the inode past the 128-byte base that this writer uses.
pub const EXTRA_ISIZE: u16 = 32;
/// Size of a group descriptor (no `64bit` feature).
pub const GROUP_DESC_SIZE: u64 = 32;
/// Superblock magic.
pub const EXT4_MAGIC: u16 = 0xEF53;
/// Byte offset of the superblock in the image.
pub const SUPERBLOCK_OFFSET: u64 = 1024;

/// Root directory inode number.
pub const ROOT_INO: u32 = 2;
/// `lost+found` inode number (the first non-reserved inode).
pub const LOST_FOUND_INO: u32 = 11;
/// First inode number handed to tree entries other than `lost+found`.
pub const FIRST_USER_INO: u32 = 12;

/// Feature flags (compat).
pub const COMPAT_EXT_ATTR: u32 = 0x0008;
/// Backup superblocks only in the groups named by `s_backup_bgs`.
pub const COMPAT_SPARSE_SUPER2: u32 = 0x0200;
/// Directory entries carry a file type byte.
pub const INCOMPAT_FILETYPE: u32 = 0x0002;
/// Inodes may use extent trees.
pub const INCOMPAT_EXTENTS: u32 = 0x0040;
/// Bitmaps and inode tables may live anywhere.
pub const INCOMPAT_FLEX_BG: u32 = 0x0200;
/// Sparse superblock backups.
pub const RO_COMPAT_SPARSE_SUPER: u32 = 0x0001;
/// Files larger than 2 GiB.
pub const RO_COMPAT_LARGE_FILE: u32 = 0x0002;
/// `i_blocks` has 48 bits.
pub const RO_COMPAT_HUGE_FILE: u32 = 0x0008;
/// Directories may have more than 65000 subdirectories.
pub const RO_COMPAT_DIR_NLINK: u32 = 0x0020;
/// Inodes have `i_extra_isize` extra bytes.
pub const RO_COMPAT_EXTRA_ISIZE: u32 = 0x0040;

/// `s_flags`: directory hashes use signed chars (what x86 mke2fs sets).
pub const FLAGS_SIGNED_HASH: u32 = 0x0001;
/// `s_def_hash_version`: half MD4.
pub const HASH_HALF_MD4: u8 = 1;

/// Inode flag: the inode uses extents.
pub const EXTENTS_FL: u32 = 0x0008_0000;

/// File type bits of `i_mode`.
pub const S_IFIFO: u16 = 0o010000;
/// Character device.
pub const S_IFCHR: u16 = 0o020000;
/// Directory.
pub const S_IFDIR: u16 = 0o040000;
/// Block device.
pub const S_IFBLK: u16 = 0o060000;
/// Regular file.
pub const S_IFREG: u16 = 0o100000;
/// Symbolic link.
pub const S_IFLNK: u16 = 0o120000;

/// Directory entry file types (`ext4_dir_entry_2.file_type`).
pub const FT_REG_FILE: u8 = 1;
/// Directory.
pub const FT_DIR: u8 = 2;
/// Character device.
pub const FT_CHRDEV: u8 = 3;
/// Block device.
pub const FT_BLKDEV: u8 = 4;
/// Named pipe.
pub const FT_FIFO: u8 = 5;
/// Symbolic link.
pub const FT_SYMLINK: u8 = 7;

/// Extent header magic.
pub const EXTENT_MAGIC: u16 = 0xF30A;
/// Longest initialized extent, in blocks.
pub const MAX_EXTENT_LEN: u64 = 32768;
/// Extent entries (or index entries) in the inode's `i_block`.
pub const EXTENTS_IN_INODE: usize = 4;
/// Extent entries (or index entries) in one tree block.
pub const EXTENTS_PER_BLOCK: usize = (BLOCK_SIZE as usize - 12) / 12;

/// Xattr block and in-inode header magic.
pub const XATTR_MAGIC: u32 = 0xEA02_0000;

/// The ext4 superblock (`struct ext4_super_block`), 1024 bytes at offset 1024.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct SuperBlock {
    /// `s_inodes_count`: total inode count.
    pub inodes_count: U32,
    /// `s_blocks_count_lo`: total block count.
    pub blocks_count_lo: U32,
    /// `s_r_blocks_count_lo`: blocks reserved for the superuser.
    pub r_blocks_count_lo: U32,
    /// `s_free_blocks_count_lo`: free block count.
    pub free_blocks_count_lo: U32,
    /// `s_free_inodes_count`: free inode count.
    pub free_inodes_count: U32,
    /// `s_first_data_block`: 0 for 4 KiB blocks.
    pub first_data_block: U32,
    /// `s_log_block_size`: block size is `2^(10 + this)`.
    pub log_block_size: U32,
    /// `s_log_cluster_size`: same as the block size without bigalloc.
    pub log_cluster_size: U32,
    /// `s_blocks_per_group`.
    pub blocks_per_group: U32,
    /// `s_clusters_per_group`.
    pub clusters_per_group: U32,
    /// `s_inodes_per_group`.
    pub inodes_per_group: U32,
    /// `s_mtime`: last mount time.
    pub mtime: U32,
    /// `s_wtime`: last write time.
    pub wtime: U32,
    /// `s_mnt_count`: mounts since the last check.
    pub mnt_count: U16,
    /// `s_max_mnt_count`: mounts before a check (-1: never).
    pub max_mnt_count: I16,
    /// `s_magic`: 0xEF53.
    pub magic: U16,
    /// `s_state`: 1 = cleanly unmounted.
    pub state: U16,
    /// `s_errors`: 1 = continue on errors.
    pub errors: U16,
    /// `s_minor_rev_level`.
    pub minor_rev_level: U16,
    /// `s_lastcheck`: time of the last check.
    pub lastcheck: U32,
    /// `s_checkinterval`: seconds between checks (0: never).
    pub checkinterval: U32,
    /// `s_creator_os`: 0 = Linux.
    pub creator_os: U32,
    /// `s_rev_level`: 1 = dynamic inode sizes.
    pub rev_level: U32,
    /// `s_def_resuid`: uid allowed to use reserved blocks.
    pub def_resuid: U16,
    /// `s_def_resgid`: gid allowed to use reserved blocks.
    pub def_resgid: U16,
    /// `s_first_ino`: first non-reserved inode.
    pub first_ino: U32,
    /// `s_inode_size`: inode record size.
    pub inode_size: U16,
    /// `s_block_group_nr`: group holding this superblock copy.
    pub block_group_nr: U16,
    /// `s_feature_compat`.
    pub feature_compat: U32,
    /// `s_feature_incompat`.
    pub feature_incompat: U32,
    /// `s_feature_ro_compat`.
    pub feature_ro_compat: U32,
    /// `s_uuid`: volume UUID.
    pub uuid: [u8; 16],
    /// `s_volume_name`: volume label.
    pub volume_name: [u8; 16],
    /// `s_last_mounted`: directory where last mounted.
    pub last_mounted: [u8; 64],
    /// `s_algorithm_usage_bitmap`: compression (unused).
    pub algorithm_usage_bitmap: U32,
    /// `s_prealloc_blocks`.
    pub prealloc_blocks: u8,
    /// `s_prealloc_dir_blocks`.
    pub prealloc_dir_blocks: u8,
    /// `s_reserved_gdt_blocks`: blocks reserved for online resize.
    pub reserved_gdt_blocks: U16,
    /// `s_journal_uuid`.
    pub journal_uuid: [u8; 16],
    /// `s_journal_inum`.
    pub journal_inum: U32,
    /// `s_journal_dev`.
    pub journal_dev: U32,
    /// `s_last_orphan`: head of the orphan inode list.
    pub last_orphan: U32,
    /// `s_hash_seed`: seed for directory hashes.
    pub hash_seed: [u8; 16],
    /// `s_def_hash_version`: default directory hash.
    pub def_hash_version: u8,
    /// `s_jnl_backup_type`.
    pub jnl_backup_type: u8,
    /// `s_desc_size`: group descriptor size (0 without `64bit`).
    pub desc_size: U16,
    /// `s_default_mount_opts`.
    pub default_mount_opts: U32,
    /// `s_first_meta_bg`.
    pub first_meta_bg: U32,
    /// `s_mkfs_time`: filesystem creation time.
    pub mkfs_time: U32,
    /// `s_jnl_blocks`: backup of the journal inode's block map.
    pub jnl_blocks: [U32; 17],
    /// `s_blocks_count_hi`.
    pub blocks_count_hi: U32,
    /// `s_r_blocks_count_hi`.
    pub r_blocks_count_hi: U32,
    /// `s_free_blocks_count_hi`.
    pub free_blocks_count_hi: U32,
    /// `s_min_extra_isize`: every inode has at least this many extra bytes.
    pub min_extra_isize: U16,
    /// `s_want_extra_isize`: new inodes should have this many extra bytes.
    pub want_extra_isize: U16,
    /// `s_flags`: misc flags (hash signedness).
    pub flags: U32,
    /// `s_raid_stride`.
    pub raid_stride: U16,
    /// `s_mmp_interval`.
    pub mmp_interval: U16,
    /// `s_mmp_block`.
    pub mmp_block: U64,
    /// `s_raid_stripe_width`.
    pub raid_stripe_width: U32,
    /// `s_log_groups_per_flex`: flex group size is `2^this`.
    pub log_groups_per_flex: u8,
    /// `s_checksum_type`.
    pub checksum_type: u8,
    /// `s_encryption_level`.
    pub encryption_level: u8,
    /// `s_reserved_pad`.
    pub reserved_pad: u8,
    /// `s_kbytes_written`: lifetime writes.
    pub kbytes_written: U64,
    /// `s_snapshot_inum` .. `s_snapshot_list` (unused, 20 bytes).
    pub snapshot: [u8; 20],
    /// `s_error_count` .. `s_last_error_func` (error tracking, 108 bytes).
    pub error_info: [u8; 108],
    /// `s_mount_opts`: default mount options string.
    pub mount_opts: [u8; 64],
    /// `s_usr_quota_inum`.
    pub usr_quota_inum: U32,
    /// `s_grp_quota_inum`.
    pub grp_quota_inum: U32,
    /// `s_overhead_clusters`: 0 lets the kernel compute it.
    pub overhead_clusters: U32,
    /// `s_backup_bgs`: groups holding backups with `sparse_super2` (0 = none).
    pub backup_bgs: [U32; 2],
    /// `s_encrypt_algos`.
    pub encrypt_algos: [u8; 4],
    /// `s_encrypt_pw_salt`.
    pub encrypt_pw_salt: [u8; 16],
    /// `s_lpf_ino`: the `lost+found` inode.
    pub lpf_ino: U32,
    /// `s_prj_quota_inum`.
    pub prj_quota_inum: U32,
    /// `s_checksum_seed`.
    pub checksum_seed: U32,
    /// `s_wtime_hi` .. `s_last_error_errcode` (8 bytes of high time bits and codes).
    pub time_hi: [u8; 8],
    /// `s_encoding`: filename charset encoding.
    pub encoding: U16,
    /// `s_encoding_flags`.
    pub encoding_flags: U16,
    /// `s_orphan_file_inum`.
    pub orphan_file_inum: U32,
    /// `s_reserved`: padding to the end of the block.
    pub reserved: [U32; 94],
    /// `s_checksum`: crc32c of the superblock (only with `metadata_csum`).
    pub checksum: U32,
}

/// A 32-byte block group descriptor (`struct ext4_group_desc` without `64bit`).
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct GroupDesc {
    /// `bg_block_bitmap_lo`: block of the block bitmap.
    pub block_bitmap: U32,
    /// `bg_inode_bitmap_lo`: block of the inode bitmap.
    pub inode_bitmap: U32,
    /// `bg_inode_table_lo`: first block of the inode table.
    pub inode_table: U32,
    /// `bg_free_blocks_count_lo`.
    pub free_blocks_count: U16,
    /// `bg_free_inodes_count_lo`.
    pub free_inodes_count: U16,
    /// `bg_used_dirs_count_lo`.
    pub used_dirs_count: U16,
    /// `bg_flags`: no uninit flags without `gdt_csum`.
    pub flags: U16,
    /// `bg_exclude_bitmap_lo`: snapshots (unused).
    pub exclude_bitmap: U32,
    /// `bg_block_bitmap_csum_lo`.
    pub block_bitmap_csum: U16,
    /// `bg_inode_bitmap_csum_lo`.
    pub inode_bitmap_csum: U16,
    /// `bg_itable_unused_lo`.
    pub itable_unused: U16,
    /// `bg_checksum`.
    pub checksum: U16,
}

/// A 256-byte inode record (`struct ext4_inode` plus the in-inode xattr area).
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct Inode {
    /// `i_mode`: type and permission bits.
    pub mode: U16,
    /// `i_uid`: low 16 bits of the owner.
    pub uid: U16,
    /// `i_size_lo`: low 32 bits of the size.
    pub size_lo: U32,
    /// `i_atime`: access time (low 32 bits of seconds).
    pub atime: U32,
    /// `i_ctime`: change time.
    pub ctime: U32,
    /// `i_mtime`: modification time.
    pub mtime: U32,
    /// `i_dtime`: deletion time.
    pub dtime: U32,
    /// `i_gid`: low 16 bits of the group.
    pub gid: U16,
    /// `i_links_count`: hard link count.
    pub links_count: U16,
    /// `i_blocks_lo`: low 32 bits of the 512-byte sector count.
    pub blocks_lo: U32,
    /// `i_flags`: inode flags.
    pub flags: U32,
    /// `l_i_version` (osd1).
    pub version: U32,
    /// `i_block`: extent tree root, fast symlink target or device number.
    pub block: [u8; 60],
    /// `i_generation`: NFS generation.
    pub generation: U32,
    /// `i_file_acl_lo`: xattr block.
    pub file_acl_lo: U32,
    /// `i_size_high`: high 32 bits of the size.
    pub size_high: U32,
    /// `i_obso_faddr`.
    pub obso_faddr: U32,
    /// `l_i_blocks_high` (osd2): high 16 bits of the sector count.
    pub blocks_high: U16,
    /// `l_i_file_acl_high`: high 16 bits of the xattr block.
    pub file_acl_high: U16,
    /// `l_i_uid_high`: high 16 bits of the owner.
    pub uid_high: U16,
    /// `l_i_gid_high`: high 16 bits of the group.
    pub gid_high: U16,
    /// `l_i_checksum_lo`.
    pub checksum_lo: U16,
    /// `l_i_reserved`.
    pub reserved: U16,
    /// `i_extra_isize`: bytes used past offset 128.
    pub extra_isize: U16,
    /// `i_checksum_hi`.
    pub checksum_hi: U16,
    /// `i_ctime_extra`: epoch bits and nanoseconds.
    pub ctime_extra: U32,
    /// `i_mtime_extra`.
    pub mtime_extra: U32,
    /// `i_atime_extra`.
    pub atime_extra: U32,
    /// `i_crtime`: creation time.
    pub crtime: U32,
    /// `i_crtime_extra`.
    pub crtime_extra: U32,
    /// `i_version_hi`.
    pub version_hi: U32,
    /// `i_projid`: project id.
    pub projid: U32,
    /// In-inode extended attribute area (`ext4_xattr_ibody_header` + entries).
    pub xattr_area: [u8; 96],
}

/// Offset of the in-inode xattr area within the inode record.
#[cfg(test)]
pub const INODE_XATTR_OFFSET: usize = 128 + EXTRA_ISIZE as usize;

/// `struct ext4_extent_header`, first 12 bytes of every extent tree node.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct ExtentHeader {
    /// `eh_magic`: 0xF30A.
    pub magic: U16,
    /// `eh_entries`: valid entries following the header.
    pub entries: U16,
    /// `eh_max`: capacity of the node.
    pub max: U16,
    /// `eh_depth`: 0 for leaves.
    pub depth: U16,
    /// `eh_generation`.
    pub generation: U32,
}

/// `struct ext4_extent`: a leaf entry mapping file blocks to disk blocks.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct ExtentLeaf {
    /// `ee_block`: first file block.
    pub block: U32,
    /// `ee_len`: number of blocks (<= 32768 when initialized).
    pub len: U16,
    /// `ee_start_hi`: high 16 bits of the first disk block.
    pub start_hi: U16,
    /// `ee_start_lo`: low 32 bits of the first disk block.
    pub start_lo: U32,
}

/// `struct ext4_extent_idx`: an index entry pointing at a lower tree node.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct ExtentIndex {
    /// `ei_block`: first file block covered by the subtree.
    pub block: U32,
    /// `ei_leaf_lo`: low 32 bits of the node's disk block.
    pub leaf_lo: U32,
    /// `ei_leaf_hi`: high 16 bits of the node's disk block.
    pub leaf_hi: U16,
    /// `ei_unused`.
    pub unused: U16,
}

/// `struct ext4_dir_entry_2` without the name.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct DirEntryHeader {
    /// `inode`: 0 for an unused entry.
    pub inode: U32,
    /// `rec_len`: distance to the next entry.
    pub rec_len: U16,
    /// `name_len`.
    pub name_len: u8,
    /// `file_type`: an `FT_*` value.
    pub file_type: u8,
}

/// `struct ext4_xattr_header` at the start of an xattr block.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct XattrBlockHeader {
    /// `h_magic`: 0xEA020000.
    pub magic: U32,
    /// `h_refcount`: inodes sharing the block.
    pub refcount: U32,
    /// `h_blocks`: always 1.
    pub blocks: U32,
    /// `h_hash`: hash of all entry hashes.
    pub hash: U32,
    /// `h_checksum` (only with `metadata_csum`).
    pub checksum: U32,
    /// `h_reserved`.
    pub reserved: [U32; 3],
}

/// `struct ext4_xattr_entry` without the name.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct XattrEntryHeader {
    /// `e_name_len`.
    pub name_len: u8,
    /// `e_name_index`: namespace prefix index.
    pub name_index: u8,
    /// `e_value_offs`: value offset (from the block start, or the first in-inode entry).
    pub value_offs: U16,
    /// `e_value_inum`: value inode (unused: 0).
    pub value_inum: U32,
    /// `e_value_size`.
    pub value_size: U32,
    /// `e_hash`: hash of name and value.
    pub hash: U32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn struct_sizes_match_the_spec() {
        assert_eq!(size_of::<SuperBlock>(), 1024);
        assert_eq!(size_of::<GroupDesc>(), GROUP_DESC_SIZE as usize);
        assert_eq!(size_of::<Inode>(), INODE_SIZE as usize);
        assert_eq!(std::mem::offset_of!(Inode, extra_isize), 128);
        assert_eq!(std::mem::offset_of!(Inode, xattr_area), INODE_XATTR_OFFSET);
        assert_eq!(std::mem::offset_of!(SuperBlock, blocks_count_hi), 0x150);
        assert_eq!(std::mem::offset_of!(SuperBlock, log_groups_per_flex), 0x174);
        assert_eq!(std::mem::offset_of!(SuperBlock, mount_opts), 0x200);
        assert_eq!(std::mem::offset_of!(SuperBlock, backup_bgs), 0x24C);
        assert_eq!(std::mem::offset_of!(SuperBlock, lpf_ino), 0x268);
        assert_eq!(std::mem::offset_of!(SuperBlock, encoding), 0x27C);
        assert_eq!(size_of::<ExtentHeader>(), 12);
        assert_eq!(size_of::<ExtentLeaf>(), 12);
        assert_eq!(size_of::<ExtentIndex>(), 12);
        assert_eq!(size_of::<XattrBlockHeader>(), 32);
        assert_eq!(size_of::<XattrEntryHeader>(), 16);
        assert_eq!(EXTENTS_PER_BLOCK, 340);
    }
}
