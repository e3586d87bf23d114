//! Extended attributes: name prefixes, POSIX ACL conversion, hashes, and the
//! in-inode and xattr-block encodings (`fs/ext4/xattr.c`, `fs/ext4/acl.c`).
//!
//! Attributes are sorted as the kernel requires for xattr blocks (name index,
//! name length, name). They fill the in-inode area first, in that order; the
//! ones that do not fit go to one external block.

use std::collections::BTreeMap;

use zerocopy::little_endian::{U16, U32};
use zerocopy::{FromZeros, IntoBytes};

use super::format::{XattrBlockHeader, XattrEntryHeader, BLOCK_SIZE, XATTR_MAGIC};

/// Size of the in-inode xattr area (after `i_extra_isize`).
pub const IBODY_SIZE: usize = 96;
/// Bytes of the ibody area available to entries and values (magic and end marker excluded).
const IBODY_CAPACITY: usize = IBODY_SIZE - 4 - 4;
/// Bytes of a block available to entries and values (header and end marker excluded).
const BLOCK_CAPACITY: usize = BLOCK_SIZE as usize - 32 - 4;

/// Why a set of extended attributes cannot be stored.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum XattrError {
    /// The name has no prefix ext4 can store (or an empty suffix).
    #[error("unsupported xattr name {0:?}")]
    Name(String),
    /// The attributes do not fit in the inode plus one block.
    #[error("xattr {name:?} ({size} bytes) does not fit in the inode or the xattr block")]
    TooLarge {
        /// Full attribute name.
        name: String,
        /// Value size in bytes.
        size: usize,
    },
    /// A POSIX ACL value is not in the Linux xattr format.
    #[error("malformed POSIX ACL in {0:?}")]
    Acl(String),
}

/// One attribute as ext4 stores it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attr {
    /// `e_name_index`: the namespace prefix.
    pub index: u8,
    /// Name without the prefix.
    pub name: Vec<u8>,
    /// Value in ext4's on-disk form.
    pub value: Vec<u8>,
}

impl Attr {
    fn entry_len(&self) -> usize {
        pad4(16 + self.name.len())
    }
    fn value_len(&self) -> usize {
        pad4(self.value.len())
    }
    fn full_name(&self) -> String {
        let prefix = PREFIXES
            .iter()
            .find(|(i, _)| *i == self.index)
            .map_or("", |(_, p)| p);
        format!("{prefix}{}", String::from_utf8_lossy(&self.name))
    }
}

/// Attributes split between the inode and the external block.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Split {
    /// Stored after `i_extra_isize`.
    pub ibody: Vec<Attr>,
    /// Stored in the inode's xattr block (`i_file_acl`).
    pub block: Vec<Attr>,
}

const ACL_ACCESS: &[u8] = b"system.posix_acl_access";
const ACL_DEFAULT: &[u8] = b"system.posix_acl_default";
/// Name indexes of `fs/ext4/xattr.h`, most specific prefix first.
const PREFIXES: [(u8, &str); 6] = [
    (2, "system.posix_acl_access"),
    (3, "system.posix_acl_default"),
    (1, "user."),
    (4, "trusted."),
    (6, "security."),
    (7, "system."),
];

fn pad4(n: usize) -> usize {
    (n + 3) & !3
}

/// Maps full names to ext4 name indexes, converts ACLs, and sorts.
pub fn prepare(xattrs: &BTreeMap<Vec<u8>, Vec<u8>>) -> Result<Vec<Attr>, XattrError> {
    let mut out = Vec::with_capacity(xattrs.len());
    for (name, value) in xattrs {
        let lossy = || String::from_utf8_lossy(name).into_owned();
        let attr = if name == ACL_ACCESS || name == ACL_DEFAULT {
            Attr {
                index: if name == ACL_ACCESS { 2 } else { 3 },
                name: Vec::new(),
                value: acl_to_disk(value).ok_or_else(|| XattrError::Acl(lossy()))?,
            }
        } else {
            let (index, suffix) = PREFIXES[2..]
                .iter()
                .find_map(|(i, p)| name.strip_prefix(p.as_bytes()).map(|s| (*i, s)))
                .ok_or_else(|| XattrError::Name(lossy()))?;
            // system.* other than ACLs has no kernel handler except system.data,
            // which means inline data: refuse both rather than store junk.
            if suffix.is_empty() || suffix.len() > 255 || index == 7 {
                return Err(XattrError::Name(lossy()));
            }
            Attr {
                index,
                name: suffix.to_vec(),
                value: value.clone(),
            }
        };
        out.push(attr);
    }
    out.sort_by(|a, b| (a.index, a.name.len(), &a.name).cmp(&(b.index, b.name.len(), &b.name)));
    Ok(out)
}

/// Converts a `system.posix_acl_*` value from the Linux xattr format
/// (version 2, 8-byte entries) to ext4's (version 1, short entries for the
/// owner, group, mask and other). `None` if malformed.
pub fn acl_to_disk(value: &[u8]) -> Option<Vec<u8>> {
    const USER_OBJ: u16 = 1;
    const USER: u16 = 2;
    const GROUP_OBJ: u16 = 4;
    const GROUP: u16 = 8;
    const MASK: u16 = 0x10;
    const OTHER: u16 = 0x20;
    let (header, entries) = value.split_first_chunk::<4>()?;
    if u32::from_le_bytes(*header) != 2 || entries.len() % 8 != 0 {
        return None;
    }
    let mut out = 1u32.to_le_bytes().to_vec();
    for e in entries.chunks_exact(8) {
        let tag = u16::from_le_bytes([e[0], e[1]]);
        match tag {
            USER_OBJ | GROUP_OBJ | MASK | OTHER => out.extend_from_slice(&e[..4]),
            USER | GROUP => out.extend_from_slice(e),
            _ => return None,
        }
    }
    Some(out)
}

/// `ext4_xattr_hash_entry`: hash of the name and the (zero-padded) value.
pub fn entry_hash(name: &[u8], value: &[u8]) -> u32 {
    let mut hash = 0u32;
    for &c in name {
        hash = (hash << 5) ^ (hash >> 27) ^ u32::from(c);
    }
    for word in value.chunks(4) {
        let mut w = [0u8; 4];
        w[..word.len()].copy_from_slice(word);
        hash = (hash << 16) ^ (hash >> 16) ^ u32::from_le_bytes(w);
    }
    hash
}

/// `ext4_xattr_rehash`: the block hash over the entry hashes.
pub fn block_hash(entry_hashes: impl IntoIterator<Item = u32>) -> u32 {
    let mut hash = 0u32;
    for h in entry_hashes {
        if h == 0 {
            return 0;
        }
        hash = (hash << 16) ^ (hash >> 16) ^ h;
    }
    hash
}

/// Puts each attribute in the inode if it still fits there, else in the block.
pub fn split(attrs: Vec<Attr>) -> Result<Split, XattrError> {
    let mut out = Split::default();
    let (mut ibody_left, mut block_left) = (IBODY_CAPACITY, BLOCK_CAPACITY);
    for a in attrs {
        let need = a.entry_len() + a.value_len();
        if need <= ibody_left {
            ibody_left -= need;
            out.ibody.push(a);
        } else if need <= block_left {
            block_left -= need;
            out.block.push(a);
        } else {
            return Err(XattrError::TooLarge {
                name: a.full_name(),
                size: a.value.len(),
            });
        }
    }
    Ok(out)
}

/// Writes entries from the start of `area` and values from its end;
/// `offs_base` is added to value offsets. Returns the entry hashes.
fn put_entries(attrs: &[Attr], area: &mut [u8], offs_base: usize) -> Vec<u32> {
    let mut entry_at = 0;
    let mut value_end = area.len();
    let mut hashes = Vec::with_capacity(attrs.len());
    for a in attrs {
        let mut value_offs = 0;
        if !a.value.is_empty() {
            value_end -= a.value_len();
            area[value_end..value_end + a.value.len()].copy_from_slice(&a.value);
            value_offs = value_end + offs_base;
        }
        let hash = entry_hash(&a.name, &a.value);
        hashes.push(hash);
        let header = XattrEntryHeader {
            // Lengths were checked by `prepare` and `split`.
            name_len: u8::try_from(a.name.len()).unwrap_or(u8::MAX),
            name_index: a.index,
            value_offs: U16::new(u16::try_from(value_offs).unwrap_or(u16::MAX)),
            value_inum: U32::new(0),
            value_size: U32::new(u32::try_from(a.value.len()).unwrap_or(u32::MAX)),
            hash: U32::new(hash),
        };
        area[entry_at..entry_at + 16].copy_from_slice(header.as_bytes());
        area[entry_at + 16..entry_at + 16 + a.name.len()].copy_from_slice(&a.name);
        entry_at += a.entry_len();
    }
    hashes
}

/// The in-inode xattr area: `ext4_xattr_ibody_header` then entries; value
/// offsets count from the first entry. All zeros when `attrs` is empty.
pub fn ibody(attrs: &[Attr]) -> [u8; IBODY_SIZE] {
    let mut area = [0u8; IBODY_SIZE];
    if !attrs.is_empty() {
        area[..4].copy_from_slice(&XATTR_MAGIC.to_le_bytes());
        put_entries(attrs, &mut area[4..], 0);
    }
    area
}

/// One xattr block holding `attrs` (already sorted), referenced by one inode.
pub fn block(attrs: &[Attr]) -> Vec<u8> {
    let mut blk = vec![0u8; BLOCK_SIZE as usize];
    let hashes = put_entries(attrs, &mut blk[32..], 32);
    let mut header = XattrBlockHeader::new_zeroed();
    header.magic = U32::new(XATTR_MAGIC);
    header.refcount = U32::new(1);
    header.blocks = U32::new(1);
    header.hash = U32::new(block_hash(hashes));
    blk[..32].copy_from_slice(header.as_bytes());
    blk
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &[u8])]) -> BTreeMap<Vec<u8>, Vec<u8>> {
        pairs
            .iter()
            .map(|(n, v)| (n.as_bytes().to_vec(), v.to_vec()))
            .collect()
    }

    #[test]
    fn entry_hash_matches_the_kernel_algorithm() {
        // Worked by hand: name "a" -> 0x61; then one value word 0x00000001:
        // (0x61 << 16) ^ (0x61 >> 16) ^ 1 = 0x00610001.
        assert_eq!(entry_hash(b"a", &[1]), 0x0061_0001);
        assert_eq!(entry_hash(b"", &[]), 0);
        // Name folding: "ab" = (0x61 << 5) ^ 0x62.
        assert_eq!(entry_hash(b"ab", &[]), (0x61 << 5) ^ 0x62);
        assert_eq!(block_hash([1, 2]), (1 << 16) ^ 2);
        assert_eq!(block_hash([1, 0, 2]), 0);
    }

    #[test]
    fn names_map_to_indexes_and_sort_like_the_kernel() {
        let attrs = prepare(&map(&[
            ("user.zz", b"1"),
            ("user.b", b"2"),
            ("security.capability", b"3"),
            ("trusted.x", b"4"),
        ]))
        .expect("valid");
        let keys: Vec<(u8, &[u8])> = attrs.iter().map(|a| (a.index, &a.name[..])).collect();
        assert_eq!(
            keys,
            [(1, &b"b"[..]), (1, b"zz"), (4, b"x"), (6, b"capability")]
        );
        assert!(matches!(
            prepare(&map(&[("foo.bar", b"")])),
            Err(XattrError::Name(_))
        ));
        assert!(matches!(
            prepare(&map(&[("user.", b"")])),
            Err(XattrError::Name(_))
        ));
    }

    #[test]
    fn acl_converts_to_the_short_ext4_form() {
        let mut v = 2u32.to_le_bytes().to_vec();
        for (tag, perm, id) in [
            (1u16, 6u16, u32::MAX),
            (2, 4, 1000),
            (4, 4, u32::MAX),
            (0x10, 7, u32::MAX),
            (0x20, 0, u32::MAX),
        ] {
            v.extend_from_slice(&tag.to_le_bytes());
            v.extend_from_slice(&perm.to_le_bytes());
            v.extend_from_slice(&id.to_le_bytes());
        }
        let d = acl_to_disk(&v).expect("valid acl");
        assert_eq!(d.len(), 4 + 4 + 8 + 4 + 4 + 4);
        assert_eq!(&d[..4], &1u32.to_le_bytes());
        assert_eq!(&d[8..16], &[2, 0, 4, 0, 0xe8, 3, 0, 0]);
        assert_eq!(acl_to_disk(&[1, 0, 0, 0]), None);
        assert_eq!(acl_to_disk(&[2, 0, 0, 0, 9]), None);
    }

    #[test]
    fn split_fills_inode_then_block_then_fails() {
        let small = prepare(&map(&[("security.capability", &[0u8; 20])])).expect("ok");
        let s = split(small).expect("fits");
        assert_eq!((s.ibody.len(), s.block.len()), (1, 0));
        let big = prepare(&map(&[("user.big", &[7u8; 2000]), ("user.a", b"x")])).expect("ok");
        let s = split(big).expect("fits");
        assert_eq!((s.ibody.len(), s.block.len()), (1, 1));
        let huge = prepare(&map(&[("user.huge", &[7u8; 5000])])).expect("ok");
        assert!(matches!(split(huge), Err(XattrError::TooLarge { .. })));
    }

    #[test]
    fn block_layout_has_header_entries_and_values_at_the_end() {
        let attrs = prepare(&map(&[("user.k", b"hello")])).expect("ok");
        let b = block(&attrs);
        assert_eq!(&b[..4], &XATTR_MAGIC.to_le_bytes());
        assert_eq!(b[32], 1); // name_len
        assert_eq!(b[33], 1); // user.
        let offs = usize::from(u16::from_le_bytes([b[34], b[35]]));
        assert_eq!(offs, 4096 - 8);
        assert_eq!(&b[offs..offs + 5], b"hello");
        assert_eq!(&b[48..49], b"k");
    }
}
