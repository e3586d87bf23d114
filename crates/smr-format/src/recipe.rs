//! The recipe: everything needed to rebuild or serve an image from its chunks.
//!
//! Binary, versioned, canonical (one encoding per value), compact (about 70
//! bytes per non-zero chunk). Layout, byte by byte, in `docs/FORMAT.md`:
//!
//! ```text
//! magic "SMRRECP\0" | u16 version | u8 chunk_size_log2 | u8 flags | u64 image_size
//! | str source_digest | str config_json | [version 3, variable: chunk grid]
//! | varint n | n × entry
//! | [version 2, or 3 with a map: file map (with groups: flag 8)]
//! | [if encrypted: nonce[12] | sealed key table (n×32 + 16)] | sha256[32]
//! entry = varint index_gap | varint (stored_len << 1 | compressed) | id[32]
//! ```
//! Version 3 is written only for a variable chunk grid (content-defined
//! chunks, see [`crate::grid`]); fixed-grid recipes keep versions 1 and 2,
//! so their bytes do not change.
//! Integers are little-endian; `str` is a varint length and UTF-8 bytes.
//! The chunk table is readable without any key (garbage collection needs it);
//! the key table is sealed with AES-256-GCM-SIV under the owner's key, with
//! everything before it as associated data, so with the key the whole recipe
//! is authenticated. The nonce is derived from that associated data, so
//! sealing is deterministic.

use crate::chunk::{ChunkId, ChunkKey};
use crate::config::ImageConfig;
use crate::error::{FormatError, Result};
use crate::filemap::FileMap;
use crate::grid::ChunkGrid;
use crate::key::OwnerKey;
use crate::varint;
use aes_gcm_siv::aead::{Aead, KeyInit, Payload};
use aes_gcm_siv::Aes256GcmSiv;
use sha2::{Digest, Sha256};

/// The 8 magic bytes every recipe starts with.
pub const MAGIC: &[u8; 8] = b"SMRRECP\0";
/// The newest recipe format version this code writes and reads (see the
/// module docs for which version a recipe gets).
pub const VERSION: u16 = 3;
/// Smallest allowed chunk size (64 KiB).
pub const MIN_CHUNK_SIZE: u64 = 64 << 10;
/// Largest allowed chunk size (4 MiB).
pub const MAX_CHUNK_SIZE: u64 = 4 << 20;
/// Largest recipe read from a file or registry (a 64 KiB-chunk image of
/// about 200 GiB).
pub const MAX_RECIPE_BYTES: u64 = 256 << 20;
const FLAG_ENCRYPTED: u8 = 1;
/// Version 3: the chunk grid is variable (its table follows the config).
const FLAG_VARIABLE: u8 = 2;
/// Version 3: a file map follows the chunk table.
const FLAG_FILE_MAP: u8 = 4;
/// Versions 2 and 3 with a file map: the map lists groups of files too.
const FLAG_GROUPS: u8 = 8;
const MAX_STR: u64 = 16 << 20;

/// One stored (non-zero) chunk of the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkEntry {
    /// Chunk number in the recipe's [`ChunkGrid`].
    pub index: u64,
    /// Name (SHA-256 of the stored bytes).
    pub id: ChunkId,
    /// Length of the stored bytes.
    pub stored_len: u32,
    /// Whether the plaintext was zstd-compressed before encryption.
    pub compressed: bool,
}

/// A decoded recipe. Keys stay sealed until [`Recipe::keys`] opens them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recipe {
    /// Size of the filesystem image in bytes.
    pub image_size: u64,
    /// Nominal chunk size in bytes (a power of two, 64 KiB..4 MiB): every
    /// chunk's size in a fixed grid, the ext4 layout unit in a variable one.
    /// Where chunks are is [`Recipe::grid`]'s to say.
    pub chunk_size: u64,
    /// Digest of the source image manifest (e.g. `sha256:...`).
    pub source_digest: String,
    /// Runtime config of the source image.
    pub config: ImageConfig,
    /// Non-zero chunks in increasing index order; absent indexes are zeros.
    pub chunks: Vec<ChunkEntry>,
    /// Where the metadata and the files' data are, for prefetching (`None`
    /// in a version 1 recipe).
    pub file_map: Option<FileMap>,
    /// Where the chunks start and end.
    grid: ChunkGrid,
    /// The sealed key table (nonce ‖ ciphertext ‖ tag), if chunks are encrypted.
    sealed_keys: Option<Vec<u8>>,
}

/// Checks a chunk size against the allowed range.
pub fn check_chunk_size(chunk_size: u64) -> Result<()> {
    if !chunk_size.is_power_of_two() || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size) {
        return Err(FormatError::Recipe(format!(
            "chunk size {chunk_size} is not a power of two between 64 KiB and 4 MiB"
        )));
    }
    Ok(())
}

impl Recipe {
    /// Builds a recipe for an image cut by `grid`. `keys` (one per chunk,
    /// same order) are sealed with `owner`; pass `None` for both for
    /// unencrypted chunks.
    pub fn new(
        grid: ChunkGrid,
        source_digest: String,
        config: ImageConfig,
        chunks: Vec<ChunkEntry>,
        file_map: Option<FileMap>,
        keys: Option<(&[ChunkKey], &OwnerKey)>,
    ) -> Result<Self> {
        let mut r = Recipe {
            image_size: grid.size(),
            chunk_size: grid.chunk_size(),
            source_digest,
            config,
            chunks,
            file_map,
            grid,
            sealed_keys: None,
        };
        r.check_table()?;
        if let Some((keys, owner)) = keys {
            if keys.len() != r.chunks.len() {
                return Err(FormatError::Recipe(format!(
                    "{} keys for {} chunks",
                    keys.len(),
                    r.chunks.len()
                )));
            }
            let aad = r.encode_body(true);
            let nonce = derive_nonce(&aad);
            let plain: Vec<u8> = keys.iter().flat_map(|k| k.0).collect();
            let cipher = Aes256GcmSiv::new(&owner.0.into());
            let ct = cipher
                .encrypt(
                    &nonce.into(),
                    Payload {
                        msg: &plain,
                        aad: &aad,
                    },
                )
                .map_err(|_| FormatError::Recipe("sealing the key table failed".into()))?;
            let mut sealed = nonce.to_vec();
            sealed.extend_from_slice(&ct);
            r.sealed_keys = Some(sealed);
        }
        Ok(r)
    }

    /// Whether the chunks are encrypted (a key table is present).
    pub fn encrypted(&self) -> bool {
        self.sealed_keys.is_some()
    }

    /// The format version the recipe is written as: 3 with a variable
    /// chunk grid, else 2 with a file map, else 1.
    pub fn version(&self) -> u16 {
        match (self.grid.is_variable(), self.file_map.is_some()) {
            (true, _) => 3,
            (false, true) => 2,
            (false, false) => 1,
        }
    }

    /// Where the chunks start and end.
    pub fn grid(&self) -> &ChunkGrid {
        &self.grid
    }

    /// Number of chunks the image spans (stored plus zero).
    pub fn chunk_count(&self) -> u64 {
        self.grid.count()
    }

    /// Plaintext length of chunk `index` (chunks vary in a variable grid;
    /// the last one may be short).
    pub fn chunk_len(&self, index: u64) -> u64 {
        self.grid.len(index)
    }

    /// First byte of chunk `index` in the image.
    pub fn chunk_start(&self, index: u64) -> u64 {
        self.grid.start(index)
    }

    /// The chunk holding image byte `offset`.
    pub fn chunk_of(&self, offset: u64) -> u64 {
        self.grid.index_of(offset)
    }

    /// The chunk entry covering chunk number `index`, or `None` for a zero chunk.
    pub fn entry(&self, index: u64) -> Option<&ChunkEntry> {
        self.chunks
            .binary_search_by_key(&index, |e| e.index)
            .ok()
            .and_then(|i| self.chunks.get(i))
    }

    /// Opens the key table. Returns one key per chunk (same order as
    /// [`Recipe::chunks`]), or `None` when chunks are not encrypted.
    pub fn keys(&self, owner: Option<&OwnerKey>) -> Result<Option<Vec<ChunkKey>>> {
        let Some(sealed) = &self.sealed_keys else {
            return Ok(None);
        };
        let owner = owner.ok_or(FormatError::KeyRequired)?;
        let (nonce, ct) = sealed.split_at(12);
        let aad = self.encode_body(true);
        let plain = Aes256GcmSiv::new(&owner.0.into())
            .decrypt(nonce.into(), Payload { msg: ct, aad: &aad })
            .map_err(|_| FormatError::WrongKey)?;
        Ok(Some(
            plain
                .chunks_exact(32)
                .map(|c| {
                    let mut k = [0u8; 32];
                    k.copy_from_slice(c);
                    ChunkKey(k)
                })
                .collect(),
        ))
    }

    /// Canonical bytes of the recipe.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = self.encode_body(self.encrypted());
        if let Some(sealed) = &self.sealed_keys {
            out.extend_from_slice(sealed);
        }
        let sum: [u8; 32] = Sha256::digest(&out).into();
        out.extend_from_slice(&sum);
        out
    }

    /// SHA-256 of [`Recipe::encode`], as `sha256:<hex>`.
    pub fn digest(&self) -> String {
        format!("sha256:{}", hex::encode(Sha256::digest(self.encode())))
    }

    fn encode_body(&self, encrypted: bool) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.chunks.len() * 40);
        out.extend_from_slice(MAGIC);
        let variable = self.grid.is_variable();
        out.extend_from_slice(&self.version().to_le_bytes());
        out.push(self.chunk_size.trailing_zeros() as u8);
        let mut flags = if encrypted { FLAG_ENCRYPTED } else { 0 };
        if variable {
            flags |= FLAG_VARIABLE;
            if self.file_map.is_some() {
                flags |= FLAG_FILE_MAP;
            }
        }
        if self.file_map.as_ref().is_some_and(|m| !m.groups.is_empty()) {
            flags |= FLAG_GROUPS;
        }
        out.push(flags);
        out.extend_from_slice(&self.image_size.to_le_bytes());
        put_str(&mut out, self.source_digest.as_bytes());
        let config = serde_json::to_vec(&self.config).expect("ImageConfig serializes");
        put_str(&mut out, &config);
        self.grid.encode_table(&mut out);
        varint::put(&mut out, self.chunks.len() as u64);
        let mut next = 0u64;
        for e in &self.chunks {
            varint::put(&mut out, e.index - next);
            varint::put(
                &mut out,
                u64::from(e.stored_len) << 1 | u64::from(e.compressed),
            );
            out.extend_from_slice(&e.id.0);
            next = e.index + 1;
        }
        if let Some(map) = &self.file_map {
            map.encode(&mut out);
        }
        out
    }

    /// Parses recipe bytes, checking the checksum and every invariant.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let bad = |m: &str| FormatError::Recipe(m.to_string());
        if bytes.len() < 8 + 2 + 2 + 8 + 32 || bytes.get(..8) != Some(&MAGIC[..]) {
            return Err(bad("not an smr recipe (bad magic or too short)"));
        }
        let (body, sum) = bytes.split_at(bytes.len() - 32);
        if Sha256::digest(body).as_slice() != sum {
            return Err(FormatError::RecipeChecksum);
        }
        let mut b = &body[8..];
        let version = u16::from_le_bytes(take::<2>(&mut b)?);
        if !(1..=VERSION).contains(&version) {
            return Err(FormatError::Recipe(format!(
                "unsupported recipe version {version} (this smr reads 1 to {VERSION})"
            )));
        }
        let [log2, flags] = take::<2>(&mut b)?;
        let known = match version {
            3 => FLAG_ENCRYPTED | FLAG_VARIABLE | FLAG_FILE_MAP | FLAG_GROUPS,
            2 => FLAG_ENCRYPTED | FLAG_GROUPS,
            _ => FLAG_ENCRYPTED,
        };
        if flags & !known != 0 || log2 > 40 || (version == 3) != (flags & FLAG_VARIABLE != 0) {
            return Err(bad("unknown flags or chunk size"));
        }
        let chunk_size = 1u64 << log2;
        check_chunk_size(chunk_size)?;
        let image_size = u64::from_le_bytes(take::<8>(&mut b)?);
        let source_digest = String::from_utf8(get_str(&mut b, "source digest")?.to_vec())
            .map_err(|_| bad("source digest is not UTF-8"))?;
        let config: ImageConfig = serde_json::from_slice(get_str(&mut b, "config")?)
            .map_err(|e| FormatError::Recipe(format!("config: {e}")))?;
        let grid = if flags & FLAG_VARIABLE != 0 {
            ChunkGrid::decode_table(&mut b, image_size, chunk_size)?
        } else {
            ChunkGrid::fixed(image_size, chunk_size)?
        };
        let n = varint::get(&mut b, "chunk count")?;
        let max = grid.count();
        if n > max {
            return Err(FormatError::Recipe(format!(
                "{n} chunks for an image of {max} chunks"
            )));
        }
        let mut chunks = Vec::with_capacity(n as usize);
        let mut next = 0u64;
        for _ in 0..n {
            let gap = varint::get(&mut b, "chunk index")?;
            let index = next
                .checked_add(gap)
                .filter(|i| *i < max)
                .ok_or_else(|| bad("chunk index out of range"))?;
            let len = varint::get(&mut b, "chunk length")?;
            let stored_len = u32::try_from(len >> 1).map_err(|_| bad("chunk length too large"))?;
            let id = ChunkId(take::<32>(&mut b)?);
            chunks.push(ChunkEntry {
                index,
                id,
                stored_len,
                compressed: len & 1 == 1,
            });
            next = index + 1;
        }
        let has_map = match version {
            1 => false,
            2 => true,
            _ => flags & FLAG_FILE_MAP != 0,
        };
        if !has_map && flags & FLAG_GROUPS != 0 {
            return Err(bad("groups of files flagged without a file map"));
        }
        let file_map = if has_map {
            Some(FileMap::decode(&mut b, max, flags & FLAG_GROUPS != 0)?)
        } else {
            None
        };
        let sealed_keys = if flags & FLAG_ENCRYPTED != 0 {
            if b.len() != 12 + chunks.len() * 32 + 16 {
                return Err(bad("key table has the wrong size"));
            }
            Some(b.to_vec())
        } else {
            if !b.is_empty() {
                return Err(bad("trailing bytes after the chunk table"));
            }
            None
        };
        let r = Recipe {
            image_size,
            chunk_size,
            source_digest,
            config,
            chunks,
            file_map,
            grid,
            sealed_keys,
        };
        r.check_table()?;
        if r.encode() != bytes {
            return Err(bad("non-canonical encoding"));
        }
        Ok(r)
    }

    fn check_table(&self) -> Result<()> {
        let max = self.grid.count();
        let mut prev: Option<u64> = None;
        for e in &self.chunks {
            if e.index >= max || prev.is_some_and(|p| p >= e.index) {
                return Err(FormatError::Recipe(format!(
                    "chunk table not strictly increasing or out of range at index {}",
                    e.index
                )));
            }
            prev = Some(e.index);
        }
        if let Some(map) = &self.file_map {
            map.check(max)?;
        }
        Ok(())
    }
}

fn derive_nonce(aad: &[u8]) -> [u8; 12] {
    let mut h = Sha256::new();
    h.update(b"smr recipe nonce v1");
    h.update(aad);
    let d = h.finalize();
    let mut n = [0u8; 12];
    n.copy_from_slice(&d[..12]);
    n
}

fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    varint::put(out, s.len() as u64);
    out.extend_from_slice(s);
}

fn get_str<'a>(b: &mut &'a [u8], what: &str) -> Result<&'a [u8]> {
    let len = varint::get(b, what)?;
    if len > MAX_STR || len > b.len() as u64 {
        return Err(FormatError::Recipe(format!(
            "{what}: length {len} out of range"
        )));
    }
    let (s, rest) = b.split_at(len as usize);
    *b = rest;
    Ok(s)
}

fn take<const N: usize>(b: &mut &[u8]) -> Result<[u8; N]> {
    let (head, rest) = b
        .split_first_chunk::<N>()
        .ok_or_else(|| FormatError::Recipe("truncated".into()))?;
    *b = rest;
    Ok(*head)
}

mod diff;

#[cfg(test)]
mod tests;
