//! Chunk names and convergent encryption: the only place that knows how a
//! chunk's plaintext becomes stored bytes and back.
//!
//! Sealing a chunk (see `docs/FORMAT.md`):
//! 1. optionally compress the plaintext with zstd (kept only if smaller);
//! 2. if encrypting: key = SHA-256(salt ‖ P) where P is the (possibly
//!    compressed) bytes, then AES-256-CTR with a zero IV (each key encrypts
//!    exactly one plaintext, so the IV need not vary);
//! 3. name = SHA-256 of the stored bytes.
//!
//! The same plaintext and salt always give the same stored bytes and name,
//! which is what makes chunks deduplicate across images and nodes.

use crate::error::{FormatError, Result};
use sha2::{Digest, Sha256};
use std::fmt;

/// zstd level used for `--compress zstd` unless another is chosen
/// ([`ChunkCodec::with_zstd_level`]). 9, not zstd's usual 3: an image is
/// compressed once and fetched by every node that starts it; on
/// debian-python level 9 stores 5.6% fewer bytes than level 3 for 1.9x the
/// conversion time (levels 3-19 in docs/BENCHMARKS.md), and decompression
/// costs the same.
pub const ZSTD_LEVEL: i32 = 9;

/// The default convergent-encryption salt: SHA-256 of this string.
/// Stores that want tenant isolation set their own salt.
pub const DEFAULT_SALT_SEED: &str = "smr default convergent salt v1";

/// A chunk's name: SHA-256 of its stored bytes.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ChunkId(pub [u8; 32]);

impl ChunkId {
    /// The id of `stored` bytes.
    pub fn of(stored: &[u8]) -> Self {
        ChunkId(Sha256::digest(stored).into())
    }

    /// Lowercase hex form (64 digits).
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl std::str::FromStr for ChunkId {
    type Err = FormatError;
    fn from_str(s: &str) -> Result<Self> {
        let mut b = [0u8; 32];
        hex::decode_to_slice(s, &mut b).map_err(|_| FormatError::BadChunkId(s.to_string()))?;
        Ok(ChunkId(b))
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkId({})", &self.to_hex()[..16])
    }
}

/// A per-chunk AES-256 key (derived from the chunk's content and the salt).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ChunkKey(pub [u8; 32]);

impl fmt::Debug for ChunkKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ChunkKey(..)")
    }
}

/// A chunk ready to be stored.
#[derive(Debug, Clone)]
pub struct SealedChunk {
    /// Name of the stored bytes.
    pub id: ChunkId,
    /// Key to decrypt it, if encrypted.
    pub key: Option<ChunkKey>,
    /// Whether the plaintext was zstd-compressed before encryption.
    pub compressed: bool,
    /// The bytes to store.
    pub stored: Vec<u8>,
}

/// How chunks are sealed: salt, encryption on/off, compression on/off.
#[derive(Clone)]
pub struct ChunkCodec {
    salt: [u8; 32],
    encrypt: bool,
    compress: bool,
    zstd_level: i32,
}

impl fmt::Debug for ChunkCodec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChunkCodec")
            .field("encrypt", &self.encrypt)
            .field("compress", &self.compress)
            .field("zstd_level", &self.zstd_level)
            .finish_non_exhaustive()
    }
}

/// The default salt (see [`DEFAULT_SALT_SEED`]).
pub fn default_salt() -> [u8; 32] {
    Sha256::digest(DEFAULT_SALT_SEED.as_bytes()).into()
}

impl ChunkCodec {
    /// A codec with the given salt and options.
    pub fn new(salt: [u8; 32], encrypt: bool, compress: bool) -> Self {
        ChunkCodec {
            salt,
            encrypt,
            compress,
            zstd_level: ZSTD_LEVEL,
        }
    }

    /// The same codec compressing at zstd `level` (1-22; higher: smaller
    /// chunks, slower conversion; decompression speed barely changes).
    /// Sealing stays deterministic for a given level.
    pub fn with_zstd_level(mut self, level: i32) -> Self {
        self.zstd_level = level.clamp(1, 22);
        self
    }

    /// Whether chunks sealed by this codec are encrypted.
    pub fn encrypts(&self) -> bool {
        self.encrypt
    }

    /// Turns plaintext into stored bytes, name and key.
    pub fn seal(&self, plain: &[u8]) -> SealedChunk {
        let (mut data, compressed) = compress(plain, self.compress.then_some(self.zstd_level));
        let key = if self.encrypt {
            let mut h = Sha256::new();
            h.update(self.salt);
            h.update(&data);
            let key = ChunkKey(h.finalize().into());
            apply_ctr(&key, &mut data);
            Some(key)
        } else {
            None
        };
        SealedChunk {
            id: ChunkId::of(&data),
            key,
            compressed,
            stored: data,
        }
    }
}

/// Seals `plain` under a key the caller derived (not the convergent one):
/// zstd at `zstd_level` if given (kept only if smaller), then AES-256-CTR
/// with a zero IV. The caller guarantees that `key` never seals other
/// bytes (what startup packs derive their keys for, see
/// [`crate::startup`]).
pub fn seal_with_key(plain: &[u8], key: &ChunkKey, zstd_level: Option<i32>) -> SealedChunk {
    let (data, compressed) = compress(plain, zstd_level);
    seal_encoded_with_key(data, key, compressed)
}

/// Seals bytes the caller has already encoded (`compressed` says whether
/// they are zstd data) under a key it derived, as [`seal_with_key`] does
/// after compressing: AES-256-CTR with a zero IV, named by the result.
pub fn seal_encoded_with_key(mut data: Vec<u8>, key: &ChunkKey, compressed: bool) -> SealedChunk {
    apply_ctr(key, &mut data);
    SealedChunk {
        id: ChunkId::of(&data),
        key: Some(*key),
        compressed,
        stored: data,
    }
}

/// Decrypts stored bytes whose hash the caller has already checked,
/// without decompressing them (see [`decode_verified`]).
pub fn decrypt_verified(key: Option<&ChunkKey>, mut stored: Vec<u8>) -> Vec<u8> {
    if let Some(key) = key {
        apply_ctr(key, &mut stored);
    }
    stored
}

/// `plain` compressed at `level` if that makes it smaller, and whether it
/// did.
pub(crate) fn compress(plain: &[u8], level: Option<i32>) -> (Vec<u8>, bool) {
    match level.map(|l| zstd::bulk::compress(plain, l)) {
        Some(Ok(c)) if c.len() < plain.len() => (c, true),
        _ => (plain.to_vec(), false),
    }
}

fn apply_ctr(key: &ChunkKey, data: &mut [u8]) {
    crate::ctr::apply_keystream(&key.0, data);
}

/// Checks that `stored` is the chunk named `id`, then decrypts and
/// decompresses it into exactly `plain_len` bytes.
///
/// Nothing unverified is ever returned: a hash mismatch is an error.
pub fn open_chunk(
    id: &ChunkId,
    key: Option<&ChunkKey>,
    compressed: bool,
    stored: Vec<u8>,
    plain_len: usize,
) -> Result<Vec<u8>> {
    verify(id, &stored)?;
    decode_verified(id, key, compressed, stored, plain_len)
}

/// Checks that `stored` hashes to `id`.
pub fn verify(id: &ChunkId, stored: &[u8]) -> Result<()> {
    let actual = ChunkId::of(stored);
    if actual != *id {
        return Err(FormatError::ChunkHashMismatch { id: *id, actual });
    }
    Ok(())
}

/// Decrypts and decompresses stored bytes whose hash the caller has
/// *already* checked against `id` (e.g. a cache that verifies every entry
/// it loads), so hot paths hash each chunk once, not twice. `id` only names
/// the chunk in errors.
pub fn decode_verified(
    id: &ChunkId,
    key: Option<&ChunkKey>,
    compressed: bool,
    stored: Vec<u8>,
    plain_len: usize,
) -> Result<Vec<u8>> {
    let stored = decrypt_verified(key, stored);
    let plain = if compressed {
        zstd::bulk::decompress(&stored, plain_len).map_err(|e| FormatError::ChunkDecode {
            id: *id,
            reason: format!("zstd: {e}"),
        })?
    } else {
        stored
    };
    if plain.len() != plain_len {
        return Err(FormatError::ChunkDecode {
            id: *id,
            reason: format!("decoded to {} bytes, expected {plain_len}", plain.len()),
        });
    }
    Ok(plain)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        (0..65536u32).map(|i| (i % 251) as u8).collect()
    }

    #[test]
    fn seal_open_roundtrip_all_modes() {
        let plain = sample();
        for (enc, comp) in [(false, false), (true, false), (false, true), (true, true)] {
            let codec = ChunkCodec::new(default_salt(), enc, comp);
            let s = codec.seal(&plain);
            assert_eq!(s.key.is_some(), enc);
            assert_eq!(s.compressed, comp, "this sample compresses well");
            if enc {
                assert_ne!(
                    &s.stored[..32],
                    &plain[..32],
                    "ciphertext differs from plaintext"
                );
            }
            let back = open_chunk(
                &s.id,
                s.key.as_ref(),
                s.compressed,
                s.stored.clone(),
                plain.len(),
            )
            .unwrap();
            assert_eq!(back, plain);
        }
    }

    #[test]
    fn convergent_and_salted() {
        let plain = sample();
        let a = ChunkCodec::new(default_salt(), true, false).seal(&plain);
        let b = ChunkCodec::new(default_salt(), true, false).seal(&plain);
        assert_eq!(a.id, b.id);
        assert_eq!(a.stored, b.stored);
        let c = ChunkCodec::new([9; 32], true, false).seal(&plain);
        assert_ne!(a.id, c.id, "a different salt gives a different chunk");
        let d = ChunkCodec::new(default_salt(), false, false).seal(&plain);
        assert_eq!(
            d.id,
            ChunkId::of(&plain),
            "plaintext chunks are named by their SHA-256"
        );
    }

    #[test]
    fn flipped_bit_is_named() {
        let plain = sample();
        let s = ChunkCodec::new(default_salt(), true, false).seal(&plain);
        let mut bad = s.stored.clone();
        bad[100] ^= 1;
        let err = open_chunk(&s.id, s.key.as_ref(), false, bad, plain.len()).unwrap_err();
        assert!(err.to_string().contains(&s.id.to_hex()), "{err}");
    }

    #[test]
    fn higher_zstd_levels_seal_smaller_and_still_open() {
        let plain: Vec<u8> = (0..65536u32)
            .map(|i| (i % 251) as u8 ^ (i / 4096) as u8)
            .chain(b"tail".iter().copied())
            .take(65536)
            .collect();
        let fast = ChunkCodec::new(default_salt(), true, true).seal(&plain);
        let codec = ChunkCodec::new(default_salt(), true, true).with_zstd_level(19);
        let small = codec.seal(&plain);
        assert!(small.stored.len() <= fast.stored.len());
        assert_eq!(codec.seal(&plain).id, small.id, "deterministic");
        assert!(small.compressed);
        let opened = open_chunk(
            &small.id,
            small.key.as_ref(),
            true,
            small.stored,
            plain.len(),
        )
        .expect("open");
        assert_eq!(opened, plain);
    }

    #[test]
    fn incompressible_stays_raw() {
        let plain: Vec<u8> = ChunkCodec::new(default_salt(), true, false)
            .seal(&sample())
            .stored;
        let s = ChunkCodec::new(default_salt(), false, true).seal(&plain);
        assert!(!s.compressed);
        assert_eq!(s.stored, plain);
    }

    #[test]
    fn wrong_length_is_an_error() {
        let s = ChunkCodec::new(default_salt(), false, false).seal(b"abc");
        assert!(open_chunk(&s.id, None, false, s.stored.clone(), 4).is_err());
        assert!(matches!(
            "xyz".parse::<ChunkId>(),
            Err(FormatError::BadChunkId(_))
        ));
    }
}
