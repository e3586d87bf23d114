//! Test support for smr: synthetic layer tarballs, OCI image layouts and
//! docker-archive tarballs, built in code and byte-deterministic.
//!
//! - [`LayerBuilder`] writes a layer tar entry by entry (every entry type,
//!   whiteouts, PAX xattrs, long names, raw malformed headers).
//! - [`ImageBuilder`] / [`OciLayout`] write OCI layouts (nested indexes,
//!   multi-platform, chosen compression and media types);
//!   [`write_docker_archive`] writes `docker save` tarballs.
//! - [`synthetic_everything`] writes the canonical image used by end-to-end
//!   and golden tests.
//! - [`env`](mod@env): tools on PATH and the cached Debian images, skipped or
//!   required (`SMR_REQUIRE_IMAGES`).
//! - [`noise`]: deterministic pseudo-random bytes.

pub mod env;
mod image;
mod layer;
mod synthetic;

pub use image::{
    blob_path, compress, sha256_digest, write_docker_archive, Compression, Descriptor,
    DockerArchiveStyle, ImageBuilder, LayerSpec, OciLayout, DOCKER_CONFIG, DOCKER_LIST,
    DOCKER_MANIFEST, OCI_CONFIG, OCI_INDEX, OCI_MANIFEST,
};
pub use layer::{Entry, EntryKind, LayerBuilder, LongNames, FIXED_MTIME};
pub use synthetic::{
    synthetic_everything, synthetic_gnu_long_name, synthetic_image, synthetic_long_name,
    synthetic_long_target, SYNTHETIC_CAPABILITY, SYNTHETIC_TAG,
};

/// `len` deterministic pseudo-random bytes (xorshift64), different for
/// each `seed`; no 8-byte word of it is zero, so it never makes a zero
/// block or compresses.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn noise_is_deterministic_and_seeded() {
        assert_eq!(noise(100, 7), noise(100, 7));
        assert_ne!(noise(100, 7), noise(100, 8));
        assert_eq!(noise(13, 7), noise(100, 7)[..13]);
        assert!(noise(1 << 16, 3)
            .chunks(8)
            .all(|w| w.iter().any(|b| *b != 0)));
    }

    #[test]
    fn synthetic_is_byte_deterministic() {
        let a = tempfile::tempdir().expect("tempdir");
        let b = tempfile::tempdir().expect("tempdir");
        synthetic_everything(a.path()).expect("write a");
        synthetic_everything(b.path()).expect("write b");
        for name in ["index.json", "oci-layout"] {
            assert_eq!(
                std::fs::read(a.path().join(name)).expect("read"),
                std::fs::read(b.path().join(name)).expect("read")
            );
        }
        let idx = std::fs::read(a.path().join("index.json")).expect("read");
        assert_eq!(
            sha256_digest(&idx),
            sha256_digest(&std::fs::read(b.path().join("index.json")).expect("read"))
        );
    }

    #[test]
    fn long_names_round_trip_through_tar() {
        let long = synthetic_long_name();
        for style in [LongNames::Pax, LongNames::Gnu] {
            let mut l = LayerBuilder::new();
            l.long_names(style).file(&long, b"x", 0o644);
            l.symlink("s", &synthetic_long_target());
            let bytes = l.into_bytes();
            let mut ar = tar::Archive::new(bytes.as_slice());
            let mut it = ar.entries().expect("entries");
            let e = it.next().expect("one").expect("ok");
            assert_eq!(e.path_bytes().as_ref(), long.as_bytes());
            let e = it.next().expect("two").expect("ok");
            assert_eq!(
                e.link_name_bytes().expect("link").as_ref(),
                synthetic_long_target().as_bytes()
            );
        }
    }

    #[test]
    fn gzip_is_deterministic() {
        let a = compress(b"hello", Compression::Gzip);
        assert_eq!(a, compress(b"hello", Compression::Gzip));
        assert_eq!(&a[4..8], &[0, 0, 0, 0], "gzip header mtime is 0");
    }
}
