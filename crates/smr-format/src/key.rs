//! The owner's key that seals a recipe's key table.

use crate::error::{FormatError, Result};
use std::path::Path;

/// A 32-byte AES-256 key owned by the image owner (tenant).
#[derive(Clone, PartialEq, Eq)]
pub struct OwnerKey(pub [u8; 32]);

impl std::fmt::Debug for OwnerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OwnerKey(..)")
    }
}

/// Largest key file read: a key is 32 raw bytes or 64 hex digits.
pub const MAX_KEY_FILE_BYTES: u64 = 4096;

impl OwnerKey {
    /// Reads a key file: exactly 32 raw bytes, or 64 hex digits with an
    /// optional trailing newline.
    pub fn from_file(path: &Path) -> Result<Self> {
        let err = |reason: String| FormatError::KeyFile {
            path: path.display().to_string(),
            reason,
        };
        let bytes =
            crate::read_bounded(path, MAX_KEY_FILE_BYTES).map_err(|e| err(e.to_string()))?;
        Self::parse(&bytes).map_err(err)
    }

    /// Parses key file contents (see [`OwnerKey::from_file`]).
    pub fn parse(bytes: &[u8]) -> std::result::Result<Self, String> {
        if bytes.len() == 32 {
            let mut k = [0u8; 32];
            k.copy_from_slice(bytes);
            return Ok(OwnerKey(k));
        }
        let text = std::str::from_utf8(bytes)
            .map_err(|_| {
                format!(
                    "expected 32 raw bytes or 64 hex digits, got {} bytes",
                    bytes.len()
                )
            })?
            .trim_end_matches(['\n', '\r']);
        let mut k = [0u8; 32];
        hex::decode_to_slice(text, &mut k).map_err(|_| {
            format!(
                "expected 32 raw bytes or 64 hex digits, got {} bytes",
                bytes.len()
            )
        })?;
        Ok(OwnerKey(k))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_raw_and_hex() {
        let raw = [7u8; 32];
        assert_eq!(OwnerKey::parse(&raw).unwrap().0, raw);
        let hex = format!("{}\n", hex::encode(raw));
        assert_eq!(OwnerKey::parse(hex.as_bytes()).unwrap().0, raw);
        assert!(OwnerKey::parse(b"short")
            .unwrap_err()
            .contains("64 hex digits"));
        assert!(OwnerKey::parse(&[b'z'; 64]).is_err());
    }

    #[test]
    fn debug_hides_key() {
        assert_eq!(format!("{:?}", OwnerKey([1; 32])), "OwnerKey(..)");
    }
}
