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
//! Version 2 (`SMRPROF2`) adds the 4 KiB blocks read, in first-read
//! order, and optionally the startup pack holding them ([`crate::startup`]):
//!
//! ```text
//! magic    8 bytes   "SMRPROF2"
//! recipe, count, entries   as in version 1
//! runs     varint m, then m x (varint first block, varint blocks)
//! pack     1 byte: 0 (none) or 1, then
//!          digest 32 bytes (SHA-256 of the pack blob), varint piece
//!          (blocks per pack chunk), varint n, n x (id 32 bytes, varint
//!          stored length, 1 byte: 0 stored as is, 1 zstd, 2 zstd that
//!          continues the stream of the chunk before it), and
//!          tag 32 bytes: HMAC-SHA-256 of every byte before it
//! ```
//!
//! Version 3 (`SMRPROF3`) is version 2 with the loop device's readahead
//! of the recorded start (KiB, a varint) between the runs and the pack
//! flag: a start served from the pack reads with it, so that it asks for
//! the blocks the recorded one did. A version 2 profile was recorded with
//! [`V2_READAHEAD_KB`].
//!
//! A profile without blocks is written as version 1, one with blocks and
//! no readahead as version 2. Encoding is canonical, so the same reads
//! give the same bytes.

use crate::error::{FormatError, Result};
use crate::startup::{self, BlockRun, PackSecret, StartupPack};
use crate::varint;
use sha2::{Digest, Sha256};

/// The first bytes of every profile.
pub const PROFILE_MAGIC: &[u8; 8] = b"SMRPROF1";
/// The first bytes of a profile with blocks (version 2).
pub const PROFILE_MAGIC_V2: &[u8; 8] = b"SMRPROF2";
/// The first bytes of a profile with blocks and their readahead (version 3).
pub const PROFILE_MAGIC_V3: &[u8; 8] = b"SMRPROF3";
/// The loop readahead (KiB) version 2 profiles were recorded with.
pub const V2_READAHEAD_KB: u32 = 32;
/// Largest recorded readahead accepted (KiB; the kernel caps it lower).
pub const MAX_READAHEAD_KB: u64 = 1 << 20;

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
    /// The 4 KiB blocks read, in first-read order (empty if recorded by a
    /// version without them).
    pub blocks: Vec<BlockRun>,
    /// The startup pack of `blocks`, once made (see [`Profile::seal_pack`]).
    pub pack: Option<StartupPack>,
    /// The loop device's readahead (KiB) while the blocks were recorded
    /// (`None`: a version 2 profile, see [`Profile::readahead_kb`]).
    pub recorded_readahead_kb: Option<u32>,
}

impl Profile {
    /// The SHA-256 a profile of the recipe `recipe_bytes` carries.
    pub fn recipe_hash(recipe_bytes: &[u8]) -> [u8; 32] {
        Sha256::digest(recipe_bytes).into()
    }

    /// A profile of `chunks` only (version 1).
    pub fn new(recipe_sha256: [u8; 32], chunks: Vec<u64>) -> Self {
        Profile {
            recipe_sha256,
            chunks,
            blocks: Vec::new(),
            pack: None,
            recorded_readahead_kb: None,
        }
    }

    /// The loop readahead (KiB) of the recorded start: what a start served
    /// from the pack reads with ([`V2_READAHEAD_KB`] for a version 2
    /// profile).
    pub fn readahead_kb(&self) -> u32 {
        self.recorded_readahead_kb.unwrap_or(V2_READAHEAD_KB)
    }

    /// The profile's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = self.encode_body();
        if let Some(p) = &self.pack {
            out.extend_from_slice(&p.tag);
        }
        out
    }

    /// Every byte up to the pack's tag.
    fn encode_body(&self) -> Vec<u8> {
        let v2 = !self.blocks.is_empty() || self.pack.is_some();
        let ra = self.recorded_readahead_kb.filter(|_| v2);
        let mut out = Vec::with_capacity(48 + self.chunks.len() * 3 + self.blocks.len() * 5);
        out.extend_from_slice(match (v2, ra) {
            (false, _) => PROFILE_MAGIC,
            (true, None) => PROFILE_MAGIC_V2,
            (true, Some(_)) => PROFILE_MAGIC_V3,
        });
        out.extend_from_slice(&self.recipe_sha256);
        varint::put(&mut out, self.chunks.len() as u64);
        for &c in &self.chunks {
            varint::put(&mut out, c);
        }
        if v2 {
            startup::put_runs(&mut out, &self.blocks);
            if let Some(kb) = ra {
                varint::put(&mut out, u64::from(kb));
            }
            match &self.pack {
                None => out.push(0),
                Some(p) => {
                    out.push(1);
                    startup::put_pack(&mut out, p);
                }
            }
        }
        out
    }

    /// Makes the startup pack of this profile's blocks, whose bytes are
    /// `plain` (in order), under `secret` (the recipe's keys): sets
    /// [`Profile::pack`] and returns the pack blob.
    pub fn seal_pack(&mut self, secret: &PackSecret, plain: &[u8], piece_blocks: u32) -> Vec<u8> {
        let (blob, digest, chunks) = startup::seal_pack(secret, &self.blocks, plain, piece_blocks);
        self.pack = Some(StartupPack {
            digest,
            piece_blocks,
            chunks,
            tag: [0; 32],
        });
        let tag = secret.tag(&self.encode_body());
        if let Some(p) = &mut self.pack {
            p.tag = tag;
        }
        blob
    }

    /// Fails unless the startup pack was made under `secret` (the keys of
    /// the recipe being served) for exactly these blocks and chunks.
    pub fn check_pack(&self, secret: &PackSecret) -> Result<()> {
        match &self.pack {
            Some(p) => secret.check(&self.encode_body(), &p.tag),
            None => Ok(()),
        }
    }

    /// Parses and checks a profile: magic, lengths, canonical varints, no
    /// repeated index or block, a pack whose chunks cover the blocks,
    /// nothing after the last entry.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let bad = |reason: String| FormatError::Profile(reason);
        let (version, rest) = match bytes.split_first_chunk::<8>() {
            Some((m, rest)) if m == PROFILE_MAGIC => (1, rest),
            Some((m, rest)) if m == PROFILE_MAGIC_V2 => (2, rest),
            Some((m, rest)) if m == PROFILE_MAGIC_V3 => (3, rest),
            _ => return Err(bad("not an smr profile (bad magic)".into())),
        };
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
        let mut p = Profile::new(*hash, chunks);
        if version >= 2 {
            p.blocks = startup::take_runs(&mut rest).map_err(bad)?;
            if version == 3 {
                let kb = varint::take(&mut rest).map_err(|r| bad(format!("{r} (readahead)")))?;
                if kb > MAX_READAHEAD_KB {
                    return Err(bad(format!("readahead {kb} KiB")));
                }
                p.recorded_readahead_kb = Some(kb as u32);
            }
            let (&flag, r) = rest
                .split_first()
                .ok_or_else(|| bad("truncated startup pack flag".into()))?;
            rest = r;
            match flag {
                0 => {}
                1 => {
                    let total = startup::total_blocks(&p.blocks);
                    let mut pack = startup::take_pack(&mut rest, total).map_err(bad)?;
                    let (tag, r) = rest
                        .split_first_chunk::<32>()
                        .ok_or_else(|| bad("truncated startup pack tag".into()))?;
                    pack.tag = *tag;
                    rest = r;
                    p.pack = Some(pack);
                }
                f => return Err(bad(format!("startup pack flag {f}"))),
            }
            if p.blocks.is_empty() && p.pack.is_none() {
                return Err(bad(format!(
                    "version {version} without blocks (write version 1)"
                )));
            }
        }
        if !rest.is_empty() {
            return Err(bad(format!("{} bytes after the last entry", rest.len())));
        }
        Ok(p)
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
        Profile::new(Profile::recipe_hash(b"recipe"), vec![0, 7, 3, 100_000, 1])
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
            (b"SMRPROF9".to_vec(), "bad magic"),
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
            let p = Profile::new([9; 32], set.into_iter().rev().collect());
            prop_assert_eq!(Profile::decode(&p.encode()).unwrap(), p);
        }
    }
}
