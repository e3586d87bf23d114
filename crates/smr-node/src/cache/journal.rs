//! A segment's journal: what the segment holds, as fixed-size records
//! appended by the segment's one writer and read by every process sharing
//! the cache.
//!
//! ```text
//! DIR/segments/<id>.idx   "SMRCJ01\n" (8 bytes), then 64-byte records:
//!   0..32   chunk id
//!   32..40  offset of the entry in its segment (u64 LE)
//!   40..44  length of the entry (u32 LE)
//!   44..48  CRC-32C of the entry's bytes (u32 LE)
//!   48..56  segment id (u64 LE): this segment for an entry; for a
//!           tombstone, the segment of the damaged entry
//!   56      kind: 1 entry, 2 tombstone, 3 sealed
//!   57..60  zero
//!   60..64  CRC-32C of bytes 0..60
//! ```
//!
//! An entry record is written after the entry's bytes, so a reader never
//! finds a record whose bytes were not written (a power cut may still lose
//! bytes the record names: the entry's CRC-32C catches that on load). A
//! tombstone names an entry found damaged, so that no process loads it
//! again; the chunk is refetched into the writer's own segment. "Sealed"
//! ends a journal: its segment takes no more entries. A record that fails
//! its own CRC (a torn tail after a power cut) ends the journal too.

use smr_format::ChunkId;

/// The journal's first bytes.
pub(crate) const MAGIC: &[u8; 8] = b"SMRCJ01\n";
/// Bytes per record.
pub(crate) const RECORD: usize = 64;

/// Where an entry's bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Loc {
    /// The segment's id.
    pub(crate) seg: u64,
    /// Offset in the segment.
    pub(crate) off: u64,
    /// Length.
    pub(crate) len: u32,
    /// CRC-32C of the bytes.
    pub(crate) crc: u32,
}

impl Loc {
    /// Whether `buf` is the entry this place names: its length and CRC-32C.
    pub(crate) fn holds(&self, buf: &[u8]) -> bool {
        buf.len() == self.len as usize && super::disk::crc32c(buf) == self.crc
    }
}

/// One journal record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Record {
    /// Chunk `id` is stored at `loc`.
    Entry {
        /// The chunk.
        id: ChunkId,
        /// Where.
        loc: Loc,
    },
    /// The entry of `id` at `loc` failed its check: never load it again.
    Tombstone {
        /// The chunk.
        id: ChunkId,
        /// The damaged entry.
        loc: Loc,
    },
    /// The segment is complete.
    Sealed,
}

const ENTRY: u8 = 1;
const TOMBSTONE: u8 = 2;
const SEALED: u8 = 3;

impl Record {
    /// The record's 64 bytes.
    pub(crate) fn encode(&self) -> [u8; RECORD] {
        let mut b = [0u8; RECORD];
        let (kind, id, loc) = match self {
            Record::Entry { id, loc } => (ENTRY, Some(id), Some(loc)),
            Record::Tombstone { id, loc } => (TOMBSTONE, Some(id), Some(loc)),
            Record::Sealed => (SEALED, None, None),
        };
        if let Some(id) = id {
            b[0..32].copy_from_slice(&id.0);
        }
        if let Some(l) = loc {
            b[32..40].copy_from_slice(&l.off.to_le_bytes());
            b[40..44].copy_from_slice(&l.len.to_le_bytes());
            b[44..48].copy_from_slice(&l.crc.to_le_bytes());
            b[48..56].copy_from_slice(&l.seg.to_le_bytes());
        }
        b[56] = kind;
        let crc = super::disk::crc32c(&b[..60]);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes one record; `None` if it fails its CRC or is of no known
    /// kind.
    pub(crate) fn decode(b: &[u8; RECORD]) -> Option<Record> {
        let crc = u32::from_le_bytes(b[60..64].try_into().ok()?);
        if super::disk::crc32c(&b[..60]) != crc || b[57..60] != [0, 0, 0] {
            return None;
        }
        let id = ChunkId(b[0..32].try_into().ok()?);
        let loc = Loc {
            off: u64::from_le_bytes(b[32..40].try_into().ok()?),
            len: u32::from_le_bytes(b[40..44].try_into().ok()?),
            crc: u32::from_le_bytes(b[44..48].try_into().ok()?),
            seg: u64::from_le_bytes(b[48..56].try_into().ok()?),
        };
        match b[56] {
            ENTRY => Some(Record::Entry { id, loc }),
            TOMBSTONE => Some(Record::Tombstone { id, loc }),
            SEALED => Some(Record::Sealed),
            _ => None,
        }
    }
}

/// What reading a journal from some position found.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Tail {
    /// The whole records read, in order.
    pub(crate) records: Vec<Record>,
    /// Bytes consumed (whole records only: a partial record at the end is
    /// left for the next read, its writer may be writing it).
    pub(crate) consumed: usize,
    /// The journal ends here: sealed, or a record failed its check.
    pub(crate) ended: bool,
    /// A record failed its check (or the magic was wrong).
    pub(crate) damaged: bool,
}

/// Parses `buf`, the journal's bytes from offset `at` on (`at` is 0 or
/// just after a record).
pub(crate) fn parse(buf: &[u8], at: u64) -> Tail {
    let mut t = Tail::default();
    let mut rest = buf;
    if at == 0 {
        if rest.len() < MAGIC.len() {
            return t;
        }
        if &rest[..MAGIC.len()] != MAGIC {
            t.ended = true;
            t.damaged = true;
            return t;
        }
        rest = &rest[MAGIC.len()..];
        t.consumed = MAGIC.len();
    }
    for chunk in rest.chunks_exact(RECORD) {
        let Some(r) = chunk.try_into().ok().and_then(Record::decode) else {
            t.ended = true;
            t.damaged = true;
            return t;
        };
        t.consumed += RECORD;
        if r == Record::Sealed {
            t.ended = true;
            return t;
        }
        t.records.push(r);
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(n: u8) -> Record {
        Record::Entry {
            id: ChunkId::of(&[n]),
            loc: Loc {
                seg: 7,
                off: u64::from(n) * 100,
                len: 100,
                crc: u32::from(n),
            },
        }
    }

    #[test]
    fn records_round_trip_and_partial_tails_wait() {
        let tomb = Record::Tombstone {
            id: ChunkId::of(b"x"),
            loc: Loc {
                seg: u64::MAX,
                off: 1 << 40,
                len: u32::MAX,
                crc: 9,
            },
        };
        let mut j = MAGIC.to_vec();
        for r in [entry(1), tomb, entry(2)] {
            j.extend_from_slice(&r.encode());
        }
        let t = parse(&j, 0);
        assert_eq!(t.records, vec![entry(1), tomb, entry(2)]);
        assert_eq!((t.consumed, t.ended, t.damaged), (j.len(), false, false));
        // A record half written: the whole ones are read, the rest waits.
        let partial = &j[..j.len() - 10];
        let t = parse(partial, 0);
        assert_eq!(t.records.len(), 2);
        assert_eq!(t.consumed, 8 + 2 * RECORD);
        assert!(!t.ended);
        let t = parse(&j[t.consumed..], t.consumed as u64);
        assert_eq!(t.records, vec![entry(2)]);
        // Too short for the magic: nothing yet.
        assert_eq!(parse(&j[..5], 0), Tail::default());
    }

    #[test]
    fn sealed_and_damaged_journals_end() {
        let mut j = MAGIC.to_vec();
        j.extend_from_slice(&entry(1).encode());
        j.extend_from_slice(&Record::Sealed.encode());
        j.extend_from_slice(&entry(2).encode());
        let t = parse(&j, 0);
        assert_eq!(t.records, vec![entry(1)]);
        assert!(t.ended && !t.damaged);
        // A flipped bit anywhere in a record ends the journal there.
        for bit in 0..RECORD * 8 {
            let mut j = MAGIC.to_vec();
            j.extend_from_slice(&entry(1).encode());
            let mut bad = entry(2).encode();
            bad[bit / 8] ^= 1 << (bit % 8);
            j.extend_from_slice(&bad);
            j.extend_from_slice(&entry(3).encode());
            let t = parse(&j, 0);
            assert_eq!(t.records, vec![entry(1)], "bit {bit}");
            assert!(t.ended && t.damaged, "bit {bit}");
        }
        let t = parse(b"NOTAJOURNAL-----", 0);
        assert!(t.ended && t.damaged && t.records.is_empty());
    }
}
