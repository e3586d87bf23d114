//! The pack index: where each chunk lives among an artifact's packs.
//!
//! Binary, versioned, canonical, about 35 bytes per chunk; byte by byte in
//! `docs/FORMAT.md` §5:
//!
//! ```text
//! magic "SMRPIDX\0" | u16 version | varint target | varint min | varint max
//! | varint n_packs | n_packs × pack | sha256[32]
//! pack  = digest[32] | varint n_chunks | n_chunks × (varint stored_len | id[32])
//! ```
//! A chunk's offset in its pack is the sum of the lengths listed before it.

use super::{PackError, PackParams};
use crate::artifact::{digest_of_hex, parse_digest};
use sha2::{Digest, Sha256};
use smr_format::varint::put as put_varint;
use smr_format::ChunkId;
use std::collections::HashMap;

/// The 8 magic bytes every pack index starts with.
pub const MAGIC: &[u8; 8] = b"SMRPIDX\0";
/// The pack index format version this code writes and reads.
pub const VERSION: u16 = 1;

/// One chunk of a pack, in concatenation order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexedChunk {
    /// The chunk's name.
    pub id: ChunkId,
    /// Its stored length in bytes.
    pub len: u32,
}

/// One pack: a blob that is the concatenation of its chunks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexedPack {
    /// The blob digest, `sha256:<hex>`.
    pub digest: String,
    /// Its chunks in order.
    pub chunks: Vec<IndexedChunk>,
}

impl IndexedPack {
    /// The pack's size in bytes (sum of its chunk lengths).
    pub fn size(&self) -> u64 {
        self.chunks.iter().map(|c| u64::from(c.len)).sum()
    }
}

/// Where a chunk's bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkLocation {
    /// Position of the pack in [`PackIndex::packs`].
    pub pack: usize,
    /// Byte offset of the chunk in the pack.
    pub offset: u64,
    /// Stored length of the chunk.
    pub len: u32,
}

/// Totals of a pack index.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PackIndexStats {
    /// Number of packs.
    pub packs: u64,
    /// Number of (distinct) chunks.
    pub chunks: u64,
    /// Sum of the pack sizes.
    pub bytes: u64,
}

/// Every chunk of an artifact, by pack. Built by the pusher, decoded by
/// readers; [`PackIndex::locate`] is a hash lookup.
#[derive(Debug, Clone)]
pub struct PackIndex {
    params: PackParams,
    packs: Vec<IndexedPack>,
    lookup: HashMap<ChunkId, ChunkLocation>,
}

impl PartialEq for PackIndex {
    fn eq(&self, other: &Self) -> bool {
        self.params == other.params && self.packs == other.packs
    }
}

impl Eq for PackIndex {}

impl PackIndex {
    /// Builds an index, checking it as [`PackIndex::decode`] would: packs
    /// and chunks non-empty, no chunk or pack twice, digests well formed,
    /// a one-chunk pack named by its chunk.
    pub fn new(params: PackParams, packs: Vec<IndexedPack>) -> Result<Self, PackError> {
        params.validate()?;
        let mut lookup = HashMap::new();
        let mut pack_pos: HashMap<&str, usize> = HashMap::new();
        for (p, pack) in packs.iter().enumerate() {
            let digest = parse_digest(&pack.digest)
                .ok_or_else(|| PackError::BadDigest(pack.digest.clone()))?;
            if pack_pos.insert(&pack.digest, p).is_some() {
                return Err(PackError::DuplicatePack {
                    pack: pack.digest.clone(),
                });
            }
            match pack.chunks.as_slice() {
                [] => {
                    return Err(PackError::EmptyPack {
                        pack: pack.digest.clone(),
                    })
                }
                [only] if only.id.0 != digest => {
                    return Err(PackError::SingleChunkDigest {
                        pack: pack.digest.clone(),
                        id: only.id,
                    })
                }
                _ => {}
            }
            let mut offset = 0u64;
            for c in &pack.chunks {
                if c.len == 0 {
                    return Err(PackError::EmptyChunk {
                        id: c.id,
                        pack: pack.digest.clone(),
                    });
                }
                let loc = ChunkLocation {
                    pack: p,
                    offset,
                    len: c.len,
                };
                if let Some(first) = lookup.insert(c.id, loc) {
                    let first = packs.get(first.pack).map_or("?", |f| f.digest.as_str());
                    return Err(PackError::DuplicateChunk {
                        id: c.id,
                        first: first.to_string(),
                        second: pack.digest.clone(),
                    });
                }
                offset = offset.checked_add(u64::from(c.len)).ok_or_else(|| {
                    PackError::PackTooLarge {
                        pack: pack.digest.clone(),
                    }
                })?;
            }
        }
        Ok(PackIndex {
            params,
            packs,
            lookup,
        })
    }

    /// The parameters the packs were cut with (informational: readers do
    /// not depend on them).
    pub fn params(&self) -> PackParams {
        self.params
    }

    /// The packs, in image order of their first chunk.
    pub fn packs(&self) -> &[IndexedPack] {
        &self.packs
    }

    /// Where chunk `id` is, or `None` if no pack holds it.
    pub fn locate(&self, id: &ChunkId) -> Option<ChunkLocation> {
        self.lookup.get(id).copied()
    }

    /// Numbers of packs and chunks, and total pack bytes.
    pub fn stats(&self) -> PackIndexStats {
        PackIndexStats {
            packs: self.packs.len() as u64,
            chunks: self.lookup.len() as u64,
            bytes: self.packs.iter().map(IndexedPack::size).sum(),
        }
    }

    /// The index's bytes (canonical: equal indexes encode equally).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.lookup.len() * 35 + self.packs.len() * 34);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        for v in [self.params.target, self.params.min, self.params.max] {
            put_varint(&mut out, u64::from(v));
        }
        put_varint(&mut out, self.packs.len() as u64);
        for pack in &self.packs {
            // `new` checked every digest.
            out.extend_from_slice(&parse_digest(&pack.digest).unwrap_or([0; 32]));
            put_varint(&mut out, pack.chunks.len() as u64);
            for c in &pack.chunks {
                put_varint(&mut out, u64::from(c.len));
                out.extend_from_slice(&c.id.0);
            }
        }
        let sum = Sha256::digest(&out);
        out.extend_from_slice(&sum);
        out
    }

    /// Decodes and checks index bytes. Every byte is treated as hostile:
    /// counts are bounded by the bytes left, varints must be minimal, the
    /// checksum must match, and the content must pass [`PackIndex::new`].
    pub fn decode(bytes: &[u8]) -> Result<Self, PackError> {
        let mut r = Reader { bytes, at: 0 };
        if r.take(8, "magic")? != MAGIC {
            return Err(PackError::BadMagic);
        }
        let version = u16::from_le_bytes(r.array::<2>("version")?);
        if version != VERSION {
            return Err(PackError::UnsupportedVersion(version));
        }
        let target = r.varint_u32("target")?;
        let min = r.varint_u32("min")?;
        let max = r.varint_u32("max")?;
        let params = PackParams { target, min, max };
        params.validate()?;
        let n_packs = r.count("pack", 34)?;
        let mut packs = Vec::with_capacity(n_packs);
        for _ in 0..n_packs {
            let digest = digest_of_hex(&hex::encode(r.array::<32>("pack digest")?));
            let n = r.count("chunk", 33)?;
            let mut chunks = Vec::with_capacity(n);
            for _ in 0..n {
                let len = r.varint_u32("chunk length")?;
                let id = ChunkId(r.array::<32>("chunk id")?);
                chunks.push(IndexedChunk { id, len });
            }
            packs.push(IndexedPack { digest, chunks });
        }
        let body_len = r.at;
        let rest = bytes.len().saturating_sub(body_len);
        if rest < 32 {
            return Err(PackError::Truncated {
                at: body_len,
                what: "checksum",
            });
        }
        if rest > 32 {
            return Err(PackError::TrailingBytes(rest - 32));
        }
        let (body, sum) = bytes.split_at(body_len);
        if Sha256::digest(body).as_slice() != sum {
            return Err(PackError::Checksum);
        }
        PackIndex::new(params, packs)
    }
}

/// A cursor over untrusted bytes.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&[u8], PackError> {
        let end = self.at.checked_add(n);
        let s = end
            .and_then(|end| self.bytes.get(self.at..end))
            .ok_or(PackError::Truncated { at: self.at, what })?;
        self.at += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], PackError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, what)?);
        Ok(a)
    }

    fn varint(&mut self, what: &'static str) -> Result<u64, PackError> {
        let start = self.at;
        let bad = |reason| PackError::BadVarint {
            at: start,
            what,
            reason,
        };
        let mut v: u64 = 0;
        for i in 0..10 {
            let byte = self.array::<1>(what)?[0];
            let bits = u64::from(byte & 0x7f);
            if i == 9 && bits > 1 {
                return Err(bad("overflows 64 bits"));
            }
            v |= bits << (7 * i);
            if byte & 0x80 == 0 {
                if byte == 0 && i > 0 {
                    return Err(bad("overlong encoding"));
                }
                return Ok(v);
            }
        }
        Err(bad("longer than 10 bytes"))
    }

    fn varint_u32(&mut self, what: &'static str) -> Result<u32, PackError> {
        let start = self.at;
        let v = self.varint(what)?;
        u32::try_from(v).map_err(|_| PackError::BadVarint {
            at: start,
            what,
            reason: "does not fit 32 bits",
        })
    }

    /// A count of items of at least `min_size` bytes each, bounded by the
    /// bytes left (so a hostile count cannot make us allocate much).
    fn count(&mut self, what: &'static str, min_size: usize) -> Result<usize, PackError> {
        let count = self.varint(what)?;
        let remaining = self.bytes.len().saturating_sub(self.at);
        match usize::try_from(count) {
            Ok(n) if n.saturating_mul(min_size) <= remaining => Ok(n),
            _ => Err(PackError::Count {
                what,
                count,
                remaining,
            }),
        }
    }
}
