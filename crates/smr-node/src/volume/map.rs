//! The COW map of a writable volume: one bit per 4 KiB block of the image,
//! set when the block's bytes live in the COW file.
//!
//! On disk (`DIR/map`): `SMRVMAP1` ‖ block count (u64 LE) ‖ SHA-256 of the
//! bitmap ‖ the bitmap (bit `b % 8` of byte `b / 8` is block `b`). It is
//! replaced whole, by a rename, so it is never torn; the digest catches any
//! other damage.

use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::Path;

/// Bytes per block the map tracks.
pub const BLOCK: u64 = 4096;
const MAGIC: &[u8; 8] = b"SMRVMAP1";
const HEADER: usize = 8 + 8 + 32;

/// Which blocks live in the COW file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CowMap {
    bits: Vec<u8>,
    blocks: u64,
}

impl CowMap {
    /// A map of `blocks` blocks, none in the COW.
    pub fn new(blocks: u64) -> Self {
        CowMap {
            bits: vec![0; blocks.div_ceil(8) as usize],
            blocks,
        }
    }

    /// Number of blocks.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// Whether block `b` lives in the COW (false beyond the end).
    pub fn get(&self, b: u64) -> bool {
        b < self.blocks && self.bits[(b / 8) as usize] & (1 << (b % 8)) != 0
    }

    /// Marks blocks `first..first + count` as living in the COW.
    pub fn set_range(&mut self, first: u64, count: u64) {
        for b in first..(first + count).min(self.blocks) {
            self.bits[(b / 8) as usize] |= 1 << (b % 8);
        }
    }

    /// Whether any of blocks `first..first + count` lives in the COW.
    pub fn any_in(&self, first: u64, count: u64) -> bool {
        (first..(first + count).min(self.blocks)).any(|b| self.get(b))
    }

    /// Blocks that live in the COW.
    pub fn mapped(&self) -> u64 {
        self.bits.iter().map(|b| u64::from(b.count_ones())).sum()
    }

    /// The on-disk bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER + self.bits.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.blocks.to_le_bytes());
        out.extend_from_slice(&Sha256::digest(&self.bits));
        out.extend_from_slice(&self.bits);
        out
    }

    /// Decodes a map of `blocks` blocks, or says what is wrong with it.
    pub fn decode(bytes: &[u8], blocks: u64) -> Result<Self, String> {
        if bytes.len() < HEADER || &bytes[..8] != MAGIC {
            return Err("not a volume map (bad magic or too short)".into());
        }
        let mut n = [0u8; 8];
        n.copy_from_slice(&bytes[8..16]);
        let n = u64::from_le_bytes(n);
        if n != blocks {
            return Err(format!("a map of {n} blocks for an image of {blocks}"));
        }
        let bits = &bytes[HEADER..];
        if bits.len() as u64 != blocks.div_ceil(8) {
            return Err(format!(
                "{} bitmap bytes, {} expected",
                bits.len(),
                blocks.div_ceil(8)
            ));
        }
        if Sha256::digest(bits).as_slice() != &bytes[16..48] {
            return Err("the bitmap does not match its checksum".into());
        }
        if !blocks.is_multiple_of(8) && bits.last().is_some_and(|l| l >> (blocks % 8) != 0) {
            return Err("bits set beyond the last block".into());
        }
        Ok(CowMap {
            bits: bits.to_vec(),
            blocks,
        })
    }

    /// Writes `bytes` (an encoded map) to `path` by a rename, durably: a
    /// crash leaves the old map or the new one, never a mix.
    pub fn save(bytes: &[u8], path: &Path) -> std::io::Result<()> {
        let dir = path.parent().unwrap_or(Path::new("."));
        let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
        tmp.write_all(bytes)?;
        tmp.as_file().sync_all()?;
        tmp.persist(path).map_err(|e| e.error)?;
        std::fs::File::open(dir)?.sync_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_round_trip_and_damage_is_named() {
        let mut m = CowMap::new(21);
        m.set_range(3, 5);
        m.set_range(20, 9);
        assert!(m.get(3) && m.get(7) && !m.get(8) && m.get(20) && !m.get(21));
        assert_eq!(m.mapped(), 6);
        assert!(m.any_in(0, 4) && !m.any_in(8, 12));
        let bytes = m.encode();
        assert_eq!(CowMap::decode(&bytes, 21).unwrap(), m);
        assert!(CowMap::decode(&bytes, 22)
            .unwrap_err()
            .contains("21 blocks"));
        let mut bad = bytes.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert!(CowMap::decode(&bad, 21).unwrap_err().contains("checksum"));
        assert!(CowMap::decode(&bytes[..bytes.len() - 1], 21).is_err());
        assert!(CowMap::decode(b"garbage", 21)
            .unwrap_err()
            .contains("magic"));
    }
}
