//! Startup profiles: which chunks of an image a start reads, in the order
//! it first reads them (docs/FORMAT.md §6).
//!
//! A profile is recorded while a container starts (`smr run
//! --record-profile`) and replayed at later starts: the chunks it lists are
//! fetched with many requests in flight before the container asks for
//! them, instead of one kernel read at a time. It is bound to one recipe
//! by the recipe's SHA-256, since chunk indices mean nothing for another.
//!
//! ```text
//! magic    8 bytes   "SMRPROF1"
//! recipe  32 bytes   SHA-256 of the recipe's bytes
//! count   varint     number of entries
//! entries count x varint: chunk index (image offset / chunk size),
//!                    in first-read order, each at most once
//! ```
//!
//! Encoding is canonical, so the same reads give the same bytes.

use crate::error::{FormatError, Result};
use crate::varint;
use sha2::{Digest, Sha256};

/// The first bytes of every profile.
pub const PROFILE_MAGIC: &[u8; 8] = b"SMRPROF1";

/// Most entries a profile may have (a profile of every chunk of a 64 GiB
/// image at 4 KiB chunks); bounds what a hostile profile can allocate.
pub const MAX_PROFILE_ENTRIES: u64 = 1 << 24;
/// Largest profile file read (bounds [`MAX_PROFILE_ENTRIES`] varints).
pub const MAX_PROFILE_BYTES: u64 = 256 << 20;

/// A startup profile: chunk indices of one recipe in first-read order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Profile {
    /// SHA-256 of the recipe's bytes.
    pub recipe_sha256: [u8; 32],
    /// Chunk indices, in the order they were first read, without repeats.
    pub chunks: Vec<u64>,
}

impl Profile {
    /// The SHA-256 a profile of the recipe `recipe_bytes` carries.
    pub fn recipe_hash(recipe_bytes: &[u8]) -> [u8; 32] {
        Sha256::digest(recipe_bytes).into()
    }

    /// The profile's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(48 + self.chunks.len() * 3);
        out.extend_from_slice(PROFILE_MAGIC);
        out.extend_from_slice(&self.recipe_sha256);
        varint::put(&mut out, self.chunks.len() as u64);
        for &c in &self.chunks {
            varint::put(&mut out, c);
        }
        out
    }

    /// Parses and checks a profile: magic, lengths, canonical varints, no
    /// repeated index, nothing after the last entry.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let bad = |reason: String| FormatError::Profile(reason);
        let rest = bytes
            .strip_prefix(PROFILE_MAGIC.as_slice())
            .ok_or_else(|| bad("not an smr profile (bad magic)".into()))?;
        let (hash, mut rest) = rest
            .split_first_chunk::<32>()
            .ok_or_else(|| bad("truncated recipe hash".into()))?;
        let count = varint::take(&mut rest).map_err(|r| bad(format!("{r} (entry count)")))?;
        if count > MAX_PROFILE_ENTRIES || count > rest.len() as u64 {
            return Err(bad(format!(
                "{count} entries do not fit in {} bytes",
                rest.len()
            )));
        }
        let mut chunks = Vec::with_capacity(count as usize);
        let mut seen = std::collections::HashSet::with_capacity(count as usize);
        for i in 0..count {
            let c = varint::take(&mut rest).map_err(|r| bad(format!("{r} (entry {i})")))?;
            if !seen.insert(c) {
                return Err(bad(format!("entry {i}: chunk {c} listed twice")));
            }
            chunks.push(c);
        }
        if !rest.is_empty() {
            return Err(bad(format!("{} bytes after the last entry", rest.len())));
        }
        Ok(Profile {
            recipe_sha256: *hash,
            chunks,
        })
    }

    /// Fails unless this profile was recorded for the recipe `recipe_bytes`.
    pub fn check_recipe(&self, recipe_bytes: &[u8]) -> Result<()> {
        let actual = Self::recipe_hash(recipe_bytes);
        if actual == self.recipe_sha256 {
            return Ok(());
        }
        Err(FormatError::Profile(format!(
            "recorded for recipe sha256:{}, not this one (sha256:{})",
            hex::encode(self.recipe_sha256),
            hex::encode(actual)
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Profile {
        Profile {
            recipe_sha256: Profile::recipe_hash(b"recipe"),
            chunks: vec![0, 7, 3, 100_000, 1],
        }
    }

    #[test]
    fn round_trips_and_is_canonical() {
        let p = sample();
        let bytes = p.encode();
        assert_eq!(&bytes[..8], PROFILE_MAGIC);
        assert_eq!(Profile::decode(&bytes).unwrap(), p);
        assert_eq!(Profile::decode(&bytes).unwrap().encode(), bytes);
        p.check_recipe(b"recipe").unwrap();
        let e = p.check_recipe(b"other").unwrap_err().to_string();
        assert!(e.contains("not this one"), "{e}");
    }

    #[test]
    fn rejects_malformed_profiles() {
        let good = sample().encode();
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"SMRPROF2".to_vec(), "bad magic"),
            (good[..20].to_vec(), "truncated recipe hash"),
            (good[..40].to_vec(), "truncated varint (entry count)"),
            (
                good[..good.len() - 1].to_vec(),
                "truncated varint (entry 4)",
            ),
            ([good.clone(), vec![0]].concat(), "after the last entry"),
            (
                {
                    let mut b = good[..40].to_vec();
                    b.extend_from_slice(&[2, 5, 5]);
                    b
                },
                "listed twice",
            ),
            (
                {
                    let mut b = good[..40].to_vec();
                    b.extend_from_slice(&[1, 0x80, 0x00]);
                    b
                },
                "overlong varint (entry 0)",
            ),
            (
                {
                    let mut b = good[..40].to_vec();
                    varint::put(&mut b, u64::MAX);
                    b
                },
                "do not fit",
            ),
        ];
        for (bytes, want) in cases {
            let e = Profile::decode(&bytes).unwrap_err().to_string();
            assert!(e.contains(want), "{e:?} should mention {want:?}");
            assert!(e.starts_with("profile: "), "{e}");
        }
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Profile::decode(&bytes);
            let mut b = PROFILE_MAGIC.to_vec();
            b.extend_from_slice(&[0; 32]);
            b.extend_from_slice(&bytes);
            let _ = Profile::decode(&b);
        }

        #[test]
        fn any_distinct_list_round_trips(set in proptest::collection::btree_set(any::<u64>(), 0..50)) {
            let p = Profile { recipe_sha256: [9; 32], chunks: set.into_iter().rev().collect() };
            prop_assert_eq!(Profile::decode(&p.encode()).unwrap(), p);
        }
    }
}
