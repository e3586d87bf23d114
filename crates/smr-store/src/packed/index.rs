//! The store index: where each chunk of one recipe lives among a store's
//! packs (`indexes/<recipe sha256 hex>`; byte by byte in `docs/FORMAT.md`
//! §2).
//!
//! ```text
//! magic "SMRSIDX\0" | u16 version | varint n_packs | n_packs × digest[32]
//! | varint n_chunks | n_chunks × (id[32] | varint pack | varint offset | varint len)
//! | sha256[32]
//! ```
//! Chunks are sorted by id, strictly ascending (so equal indexes encode
//! equally and a chunk appears once); `pack` is a position in the pack
//! list, whose digests are distinct. Unlike the registry's pack index, it
//! lists only the chunks of its recipe, at explicit offsets: a recipe may
//! use a few chunks of a pack another recipe wrote.

use sha2::{Digest, Sha256};
use smr_format::varint;
use smr_format::ChunkId;
use std::collections::HashMap;

/// The 8 magic bytes every store index starts with.
pub const MAGIC: &[u8; 8] = b"SMRSIDX\0";
/// The store index version this code writes and reads.
pub const VERSION: u16 = 1;

/// Where one chunk's stored bytes are: a byte range of a pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackedChunk {
    /// Position of the pack in [`StoreIndex::packs`].
    pub pack: u32,
    /// Byte offset in the pack.
    pub offset: u64,
    /// Stored length (never 0).
    pub len: u32,
}

/// What is wrong with store index bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IndexError {
    /// The bytes do not start with the magic.
    #[error("not an smr store index (bad magic)")]
    BadMagic,
    /// A version this build does not read.
    #[error("unsupported store index version {0} (this build reads version {VERSION})")]
    UnsupportedVersion(u16),
    /// A field could not be read.
    #[error("at byte {at} ({what}): {reason}")]
    Malformed {
        /// Byte offset of the field.
        at: usize,
        /// The field.
        what: &'static str,
        /// Truncated, overlong varint, out of range…
        reason: &'static str,
    },
    /// The trailing SHA-256 does not match the bytes before it.
    #[error("checksum mismatch (truncated or corrupted store index)")]
    Checksum,
    /// A pack listed twice.
    #[error("pack {0} is listed twice")]
    DuplicatePack(String),
    /// Chunk ids not strictly ascending (a duplicate, or out of order).
    #[error("chunk {0} is out of order or listed twice")]
    ChunkOrder(ChunkId),
    /// A chunk naming a pack past the list, of length 0, or ending past
    /// 2^64.
    #[error("chunk {id}: {reason}")]
    BadChunk {
        /// The chunk.
        id: ChunkId,
        /// What is wrong.
        reason: &'static str,
    },
}

/// The packs and chunk locations of one recipe in a store.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreIndex {
    packs: Vec<[u8; 32]>,
    chunks: Vec<(ChunkId, PackedChunk)>,
}

impl StoreIndex {
    /// An index of `chunks` (any order, each id once) over `packs`,
    /// checked as [`StoreIndex::decode`] checks.
    pub fn new(
        packs: Vec<[u8; 32]>,
        mut chunks: Vec<(ChunkId, PackedChunk)>,
    ) -> Result<Self, IndexError> {
        chunks.sort_by_key(|(id, _)| *id);
        let index = StoreIndex { packs, chunks };
        index.check()?;
        Ok(index)
    }

    /// Builds the index of `chunks` located as `(id, pack digest, offset,
    /// len)`, listing each pack once in order of first use.
    pub fn from_locations(
        chunks: impl IntoIterator<Item = (ChunkId, [u8; 32], u64, u32)>,
    ) -> Result<Self, IndexError> {
        let mut packs = Vec::new();
        let mut pos: HashMap<[u8; 32], u32> = HashMap::new();
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::new();
        for (id, pack, offset, len) in chunks {
            if !seen.insert(id) {
                continue;
            }
            let p = *pos.entry(pack).or_insert_with(|| {
                packs.push(pack);
                (packs.len() - 1) as u32
            });
            out.push((
                id,
                PackedChunk {
                    pack: p,
                    offset,
                    len,
                },
            ));
        }
        Self::new(packs, out)
    }

    fn check(&self) -> Result<(), IndexError> {
        let mut seen = std::collections::HashSet::new();
        for p in &self.packs {
            if !seen.insert(p) {
                return Err(IndexError::DuplicatePack(hex::encode(p)));
            }
        }
        let mut prev: Option<ChunkId> = None;
        for (id, c) in &self.chunks {
            if prev.is_some_and(|p| p >= *id) {
                return Err(IndexError::ChunkOrder(*id));
            }
            prev = Some(*id);
            let bad = |reason| IndexError::BadChunk { id: *id, reason };
            if c.pack as usize >= self.packs.len() {
                return Err(bad("names a pack past the pack list"));
            }
            if c.len == 0 {
                return Err(bad("has length 0"));
            }
            if c.offset.checked_add(u64::from(c.len)).is_none() {
                return Err(bad("ends past 2^64"));
            }
        }
        Ok(())
    }

    /// The pack digests (SHA-256 of each pack's bytes).
    pub fn packs(&self) -> &[[u8; 32]] {
        &self.packs
    }

    /// Every chunk and its location, by id.
    pub fn chunks(&self) -> &[(ChunkId, PackedChunk)] {
        &self.chunks
    }

    /// Where chunk `id` is: its pack's digest and its location.
    pub fn locate(&self, id: &ChunkId) -> Option<([u8; 32], PackedChunk)> {
        let i = self.chunks.binary_search_by_key(id, |(c, _)| *c).ok()?;
        let c = self.chunks[i].1;
        Some((self.packs[c.pack as usize], c))
    }

    /// The index's bytes (canonical).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.packs.len() * 32 + self.chunks.len() * 40);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        varint::put(&mut out, self.packs.len() as u64);
        for p in &self.packs {
            out.extend_from_slice(p);
        }
        varint::put(&mut out, self.chunks.len() as u64);
        for (id, c) in &self.chunks {
            out.extend_from_slice(&id.0);
            varint::put(&mut out, u64::from(c.pack));
            varint::put(&mut out, c.offset);
            varint::put(&mut out, u64::from(c.len));
        }
        let sum = Sha256::digest(&out);
        out.extend_from_slice(&sum);
        out
    }

    /// Decodes and checks index bytes, every byte treated as hostile: the
    /// checksum must match, counts are bounded by the bytes left, varints
    /// are minimal, and the content passes the checks of [`StoreIndex::new`].
    pub fn decode(bytes: &[u8]) -> Result<Self, IndexError> {
        if bytes.get(..8) != Some(MAGIC.as_slice()) {
            return Err(IndexError::BadMagic);
        }
        let body_len =
            bytes
                .len()
                .checked_sub(32)
                .filter(|&n| n >= 10)
                .ok_or(IndexError::Malformed {
                    at: bytes.len(),
                    what: "checksum",
                    reason: "truncated",
                })?;
        let (body, sum) = bytes.split_at(body_len);
        let version = u16::from_le_bytes([body[8], body[9]]);
        if version != VERSION {
            return Err(IndexError::UnsupportedVersion(version));
        }
        if Sha256::digest(body).as_slice() != sum {
            return Err(IndexError::Checksum);
        }
        let mut r = Reader { body, at: 10 };
        let n_packs = r.count("pack count", 32)?;
        let mut packs = Vec::with_capacity(n_packs);
        for _ in 0..n_packs {
            packs.push(r.array("pack digest")?);
        }
        let n_chunks = r.count("chunk count", 35)?;
        let mut chunks = Vec::with_capacity(n_chunks);
        for _ in 0..n_chunks {
            let id = ChunkId(r.array("chunk id")?);
            let pack = r.small("chunk pack")?;
            let offset = r.varint("chunk offset")?;
            let len = r.small("chunk length")?;
            chunks.push((id, PackedChunk { pack, offset, len }));
        }
        if r.at != body.len() {
            return Err(IndexError::Malformed {
                at: r.at,
                what: "end",
                reason: "unexpected bytes before the checksum",
            });
        }
        let index = StoreIndex { packs, chunks };
        index.check()?;
        Ok(index)
    }
}

/// A cursor over the index body.
struct Reader<'a> {
    body: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn err(&self, what: &'static str, reason: &'static str) -> IndexError {
        IndexError::Malformed {
            at: self.at,
            what,
            reason,
        }
    }

    fn array(&mut self, what: &'static str) -> Result<[u8; 32], IndexError> {
        let s = self
            .body
            .get(self.at..self.at + 32)
            .ok_or_else(|| self.err(what, "truncated"))?;
        let mut a = [0u8; 32];
        a.copy_from_slice(s);
        self.at += 32;
        Ok(a)
    }

    fn varint(&mut self, what: &'static str) -> Result<u64, IndexError> {
        let mut rest = &self.body[self.at..];
        let before = rest.len();
        let v = varint::take(&mut rest).map_err(|reason| self.err(what, reason))?;
        self.at += before - rest.len();
        Ok(v)
    }

    fn small(&mut self, what: &'static str) -> Result<u32, IndexError> {
        let start = self.at;
        let v = self.varint(what)?;
        u32::try_from(v).map_err(|_| IndexError::Malformed {
            at: start,
            what,
            reason: "does not fit 32 bits",
        })
    }

    /// A count of items of at least `min_size` bytes, bounded by the bytes
    /// left (a hostile count cannot make us allocate much).
    fn count(&mut self, what: &'static str, min_size: usize) -> Result<usize, IndexError> {
        let start = self.at;
        let n = self.varint(what)?;
        let left = self.body.len() - self.at;
        usize::try_from(n)
            .ok()
            .filter(|n| n.saturating_mul(min_size) <= left)
            .ok_or(IndexError::Malformed {
                at: start,
                what,
                reason: "larger than the bytes left could hold",
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> StoreIndex {
        let pack = |n: u8| [n; 32];
        StoreIndex::from_locations([
            (ChunkId([9; 32]), pack(1), 0, 100),
            (ChunkId([3; 32]), pack(1), 100, 50),
            (ChunkId([5; 32]), pack(2), 4096, 7),
            (ChunkId([3; 32]), pack(2), 0, 50), // a repeat keeps the first
        ])
        .unwrap()
    }

    #[test]
    fn round_trips_canonically_and_locates() {
        let i = sample();
        let bytes = i.encode();
        let back = StoreIndex::decode(&bytes).unwrap();
        assert_eq!(back, i);
        assert_eq!(back.encode(), bytes);
        assert_eq!(i.packs().len(), 2);
        let (pack, c) = i.locate(&ChunkId([5; 32])).unwrap();
        assert_eq!((pack, c.offset, c.len), ([2; 32], 4096, 7));
        assert_eq!(i.locate(&ChunkId([3; 32])).unwrap().1.offset, 100);
        assert!(i.locate(&ChunkId([4; 32])).is_none());
        let ids: Vec<_> = i.chunks().iter().map(|(id, _)| id.0[0]).collect();
        assert_eq!(ids, [3, 5, 9], "sorted by id");
        let empty = StoreIndex::default();
        assert_eq!(StoreIndex::decode(&empty.encode()).unwrap(), empty);
    }

    /// Re-seals `body` (without its checksum) so that content checks, not
    /// the checksum, are what reject it.
    fn sealed(mut body: Vec<u8>) -> Vec<u8> {
        let sum = Sha256::digest(&body);
        body.extend_from_slice(&sum);
        body
    }

    #[test]
    fn hostile_bytes_are_rejected_with_what_is_wrong() {
        let good = sample().encode();
        let body = good[..good.len() - 32].to_vec();
        // Every truncation fails, with or without a valid checksum; none
        // panics.
        for n in 0..good.len() {
            assert!(StoreIndex::decode(&good[..n]).is_err(), "prefix {n}");
        }
        for n in 0..body.len() {
            let e = StoreIndex::decode(&sealed(body[..n].to_vec()));
            assert!(e.is_err(), "re-sealed body prefix {n}");
        }
        let mut flipped = good.clone();
        flipped[20] ^= 1;
        assert_eq!(StoreIndex::decode(&flipped), Err(IndexError::Checksum));
        let mut magic = good.clone();
        magic[0] = b'X';
        assert_eq!(StoreIndex::decode(&magic), Err(IndexError::BadMagic));
        let mut v = body.clone();
        v[8] = 9;
        assert_eq!(
            StoreIndex::decode(&sealed(v)),
            Err(IndexError::UnsupportedVersion(9))
        );
        // A huge pack count cannot make the decoder allocate.
        let mut huge = body[..10].to_vec();
        varint::put(&mut huge, u64::MAX / 2);
        let e = StoreIndex::decode(&sealed(huge)).unwrap_err();
        assert!(e.to_string().contains("pack count"), "{e}");
        // Trailing bytes before the checksum.
        let mut extra = body.clone();
        extra.push(0);
        assert!(StoreIndex::decode(&sealed(extra)).is_err());
        // Content checks: chunk past the pack list, length 0, order.
        let p = vec![[1u8; 32]];
        let c = |pack, len| PackedChunk {
            pack,
            offset: 0,
            len,
        };
        let bad = StoreIndex {
            packs: p.clone(),
            chunks: vec![(ChunkId([1; 32]), c(1, 5))],
        };
        let e = StoreIndex::decode(&bad.encode()).unwrap_err();
        assert!(e.to_string().contains("past the pack list"), "{e}");
        let zero = StoreIndex {
            packs: p.clone(),
            chunks: vec![(ChunkId([1; 32]), c(0, 0))],
        };
        assert!(StoreIndex::decode(&zero.encode())
            .unwrap_err()
            .to_string()
            .contains("length 0"));
        let unordered = StoreIndex {
            packs: p.clone(),
            chunks: vec![(ChunkId([2; 32]), c(0, 1)), (ChunkId([1; 32]), c(0, 1))],
        };
        assert_eq!(
            StoreIndex::decode(&unordered.encode()),
            Err(IndexError::ChunkOrder(ChunkId([1; 32])))
        );
        let twice = StoreIndex {
            packs: vec![[1; 32], [1; 32]],
            chunks: vec![],
        };
        assert!(matches!(
            StoreIndex::decode(&twice.encode()),
            Err(IndexError::DuplicatePack(_))
        ));
    }
}
