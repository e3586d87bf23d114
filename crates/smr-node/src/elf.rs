//! What the dynamic loader reads of an ELF file, from its headers: the
//! program headers, the writable segments (where it relocates
//! `.data.rel.ro`, `.got`, `.data` soon after reading the header), the
//! dynamic section's entries (the libraries it needs).
//!
//! A start without a profile loads shared libraries one after another.
//! The loader reads a library's header, maps its segments and relocates
//! it, which touches the writable segment at the end of the file: without
//! a hint that is one more miss, and one more round trip, per library. A
//! read of an image chunk that holds the start of an ELF file lets the
//! prefetcher ([`crate::lazy::prefetch`]) queue that segment at once, and
//! [`crate::warm`] follows the libraries a program needs.
//!
//! Only 64-bit little-endian headers are read (the machine's own), with
//! every field bounds-checked: the bytes are a file's, which anyone could
//! have written (they were verified against the chunk's name, which says
//! nothing about what they mean).

use std::ops::Range;

/// Size of an ELF64 program header.
const PHDR_SIZE: usize = 56;
/// Most program headers looked at.
const MAX_PHDRS: usize = 64;
/// `PT_LOAD`.
pub(crate) const PT_LOAD: u32 = 1;
/// `PT_DYNAMIC`.
pub(crate) const PT_DYNAMIC: u32 = 2;
/// `PF_W`.
const PF_W: u32 = 2;
/// `DT_NEEDED`: a library the file needs (an offset into the string table).
pub(crate) const DT_NEEDED: u64 = 1;
/// `DT_STRTAB`: the string table's address.
pub(crate) const DT_STRTAB: u64 = 5;
/// `DT_RPATH`: library directories (the older tag).
pub(crate) const DT_RPATH: u64 = 15;
/// `DT_RUNPATH`: library directories.
pub(crate) const DT_RUNPATH: u64 = 29;
/// Most dynamic entries looked at.
const MAX_DYNAMIC: usize = 4096;

/// One program header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Phdr {
    /// `p_type`.
    pub kind: u32,
    /// `p_flags`.
    pub flags: u32,
    /// `p_offset`.
    pub offset: u64,
    /// `p_vaddr`.
    pub vaddr: u64,
    /// `p_filesz`.
    pub filesz: u64,
}

/// The program headers of the ELF file whose first bytes are `head` (as
/// many as are at hand). Empty if `head` does not start with a 64-bit
/// little-endian ELF header of an executable or shared object.
pub(crate) fn program_headers(head: &[u8]) -> Vec<Phdr> {
    let mut out = Vec::new();
    if head.get(..6) != Some(&[0x7f, b'E', b'L', b'F', 2, 1][..]) {
        return out;
    }
    let (Some(kind), Some(phoff), Some(phentsize), Some(phnum)) = (
        u16_at(head, 16),
        u64_at(head, 32),
        u16_at(head, 54),
        u16_at(head, 56),
    ) else {
        return out;
    };
    // ET_EXEC or ET_DYN, with program headers of the ELF64 size.
    if !(kind == 2 || kind == 3) || usize::from(phentsize) != PHDR_SIZE {
        return out;
    }
    let Ok(phoff) = usize::try_from(phoff) else {
        return out;
    };
    for i in 0..usize::from(phnum).min(MAX_PHDRS) {
        let Some(at) = phoff.checked_add(i * PHDR_SIZE) else {
            break;
        };
        let field = |off: usize| at.checked_add(off);
        let (Some(kind), Some(flags), Some(offset), Some(vaddr), Some(filesz)) = (
            u32_at(head, at),
            field(4).and_then(|a| u32_at(head, a)),
            field(8).and_then(|a| u64_at(head, a)),
            field(16).and_then(|a| u64_at(head, a)),
            field(32).and_then(|a| u64_at(head, a)),
        ) else {
            break;
        };
        out.push(Phdr {
            kind,
            flags,
            offset,
            vaddr,
            filesz,
        });
    }
    out
}

/// The file ranges (offsets from the file's first byte) of the writable
/// loadable segments of the ELF file whose first bytes are `head` (see
/// [`program_headers`]).
pub(crate) fn writable_segments(head: &[u8]) -> Vec<Range<u64>> {
    program_headers(head)
        .into_iter()
        .filter(|p| p.kind == PT_LOAD && p.flags & PF_W != 0 && p.filesz > 0)
        .filter_map(|p| Some(p.offset..p.offset.checked_add(p.filesz)?))
        .collect()
}

/// The file offset of address `vaddr`, from the loadable segment that
/// holds it.
pub(crate) fn file_offset(phdrs: &[Phdr], vaddr: u64) -> Option<u64> {
    phdrs
        .iter()
        .filter(|p| p.kind == PT_LOAD)
        .find(|p| vaddr >= p.vaddr && vaddr - p.vaddr < p.filesz)
        .and_then(|p| p.offset.checked_add(vaddr - p.vaddr))
}

/// The `(tag, value)` entries of a dynamic segment's bytes, up to
/// `DT_NULL`.
pub(crate) fn dynamic_entries(bytes: &[u8]) -> Vec<(u64, u64)> {
    bytes
        .chunks_exact(16)
        .take(MAX_DYNAMIC)
        .map_while(|e| {
            let (tag, val) = (u64_at(e, 0)?, u64_at(e, 8)?);
            (tag != 0).then_some((tag, val))
        })
        .collect()
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(
        b.get(at..at.checked_add(2)?)?.try_into().ok()?,
    ))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        b.get(at..at.checked_add(4)?)?.try_into().ok()?,
    ))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(
        b.get(at..at.checked_add(8)?)?.try_into().ok()?,
    ))
}

/// An ELF64 header of `kind` (2 executable, 3 shared object) with program
/// headers `(type, flags, offset, filesz)`.
#[cfg(test)]
pub(crate) fn test_header(kind: u16, phdrs: &[(u32, u32, u64, u64)]) -> Vec<u8> {
    let mut h = vec![0u8; 64];
    h[..6].copy_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1]);
    h[16..18].copy_from_slice(&kind.to_le_bytes());
    h[32..40].copy_from_slice(&64u64.to_le_bytes());
    h[54..56].copy_from_slice(&(PHDR_SIZE as u16).to_le_bytes());
    h[56..58].copy_from_slice(&(phdrs.len() as u16).to_le_bytes());
    for &(t, f, off, sz) in phdrs {
        let mut p = vec![0u8; PHDR_SIZE];
        p[..4].copy_from_slice(&t.to_le_bytes());
        p[4..8].copy_from_slice(&f.to_le_bytes());
        p[8..16].copy_from_slice(&off.to_le_bytes());
        // Mapped at its own offset, as a shared object's first segment.
        p[16..24].copy_from_slice(&off.to_le_bytes());
        p[32..40].copy_from_slice(&sz.to_le_bytes());
        h.extend(p);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_writable_load_segments_of_a_shared_object() {
        // Like liblapack: R, R E, R, RW segments and a writable GNU_STACK.
        let h = test_header(
            3,
            &[
                (PT_LOAD, 4, 0, 0x1edd0),
                (PT_LOAD, 5, 0x1f000, 0x62e881),
                (PT_LOAD, 4, 0x64e000, 0xab030),
                (PT_LOAD, 6, 0x6f9c68, 0x43b8),
                (0x6474e551, 6, 0, 0),
            ],
        );
        assert_eq!(writable_segments(&h), vec![0x6f9c68..0x6f9c68 + 0x43b8]);
        assert_eq!(
            writable_segments(&test_header(2, &[(PT_LOAD, 6, 0x1000, 10)])).len(),
            1
        );
    }

    #[test]
    fn addresses_map_to_file_offsets_and_dynamic_entries_end_at_null() {
        let phdrs = program_headers(&test_header(
            3,
            &[(PT_LOAD, 4, 0, 0x1000), (PT_LOAD, 6, 0x5000, 0x100)],
        ));
        assert_eq!(file_offset(&phdrs, 0x10), Some(0x10));
        assert_eq!(file_offset(&phdrs, 0x50ff), Some(0x50ff));
        assert_eq!(file_offset(&phdrs, 0x2000), None, "between the segments");
        assert_eq!(file_offset(&phdrs, 0x5100), None, "past the second");
        let mut d = Vec::new();
        for (t, v) in [
            (DT_NEEDED, 1u64),
            (DT_STRTAB, 0x400),
            (0, 0),
            (DT_NEEDED, 9),
        ] {
            d.extend(t.to_le_bytes());
            d.extend(v.to_le_bytes());
        }
        assert_eq!(
            dynamic_entries(&d),
            vec![(DT_NEEDED, 1), (DT_STRTAB, 0x400)]
        );
        assert_eq!(dynamic_entries(&d[..20]), vec![(DT_NEEDED, 1)]);
    }

    #[test]
    fn anything_else_gives_nothing() {
        let good = test_header(3, &[(PT_LOAD, 6, 0x1000, 10)]);
        // Not ELF, 32-bit, big-endian, a relocatable object, a core file.
        let mut not = good.clone();
        not[1] = b'X';
        let mut b32 = good.clone();
        b32[4] = 1;
        let mut be = good.clone();
        be[5] = 2;
        for bad in [
            not,
            b32,
            be,
            test_header(1, &[(PT_LOAD, 6, 0, 1)]),
            test_header(4, &[(PT_LOAD, 6, 0, 1)]),
        ] {
            assert!(writable_segments(&bad).is_empty());
        }
        // Truncated anywhere: no panic; a segment once the fields read
        // (to p_filesz, which ends at byte 64 + 40) are at hand.
        for n in 0..good.len() {
            assert_eq!(
                writable_segments(&good[..n]).len(),
                usize::from(n >= 104),
                "{n}"
            );
        }
        // Program headers far past the bytes, an overflowing segment.
        let mut far = good.clone();
        far[32..40].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(writable_segments(&far).is_empty());
        assert!(writable_segments(&test_header(3, &[(PT_LOAD, 6, u64::MAX, 2)])).is_empty());
        assert!(writable_segments(&test_header(3, &[(PT_LOAD, 6, 0x1000, 0)])).is_empty());
    }
}
