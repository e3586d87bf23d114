//! Flatten tests on bad input: each asserts the error names the layer and,
//! where there is one, the entry.

use super::tests::apply_all;
use super::*;
use crate::source::{open_source, Platform};
use crate::test_support::MemSink;
use smr_testkit::{
    blob_path, write_docker_archive, Compression as C, DockerArchiveStyle, Entry, EntryKind,
    ImageBuilder, LayerBuilder, LayerSpec,
};
use std::path::Path;

/// The error of applying `layer` on top of `base` layers (digests `layerN`).
fn apply_err(base: &[Vec<u8>], layer: Vec<u8>) -> FlattenError {
    let mut all = base.to_vec();
    all.push(layer);
    apply_all(&all).expect_err("expected an error")
}

/// Asserts `e` is about `entry` of `layer` and its kind satisfies `check`.
fn assert_entry(e: &FlattenError, layer: &str, entry: &str, check: impl Fn(&ApplyError) -> bool) {
    match e {
        FlattenError::Entry {
            layer: l,
            path,
            source,
        } => {
            assert_eq!((l.as_str(), path.as_str()), (layer, entry), "{e}");
            assert!(check(source), "unexpected kind: {e}");
        }
        other => panic!("expected an entry error, got {other}"),
    }
    let msg = e.to_string();
    assert!(msg.contains(layer) && msg.contains(entry), "{msg}");
}

/// Writes `img` as an OCI layout and flattens it; returns the error and the
/// digest of the last layer.
fn flatten_err(dir: &Path, img: &ImageBuilder, corrupt: impl Fn(&Path)) -> (FlattenError, String) {
    img.write_oci_layout(dir, None).expect("write");
    let src = open_source(&format!("oci:{}", dir.display())).expect("open");
    let image = src.resolve(&Platform::default()).expect("resolve");
    let last = image.layers.last().expect("a layer").digest.clone();
    corrupt(&blob_path(dir, &last));
    let mut sink = MemSink::default();
    let e = flatten(src.as_ref(), &image, &mut sink, &mut |_| {}).expect_err("should fail");
    (e, last)
}

fn simple_layer() -> Vec<u8> {
    let mut l = LayerBuilder::new();
    l.file("a", &[b'a'; 3000], 0o644)
        .file("b", &[b'b'; 3000], 0o644);
    l.into_bytes()
}

fn image_with(spec: LayerSpec) -> ImageBuilder {
    let mut img = ImageBuilder::new();
    img.layers.push(spec);
    img
}

fn spec(tar: Vec<u8>, compression: C) -> LayerSpec {
    LayerSpec {
        tar,
        compression,
        media_type: None,
        diff_id: None,
    }
}

#[test]
fn corrupted_gzip() {
    let d = tempfile::tempdir().expect("tempdir");
    let img = image_with(spec(simple_layer(), C::Gzip));
    let (e, layer) = flatten_err(d.path(), &img, |p| {
        let mut b = std::fs::read(p).expect("read");
        let mid = b.len() / 2;
        for x in &mut b[mid..mid + 8] {
            *x ^= 0x5a;
        }
        std::fs::write(p, b).expect("write");
    });
    assert_eq!(e.layer(), Some(layer.as_str()), "{e}");
    assert!(e.to_string().contains(&layer), "{e}");
}

#[test]
fn corrupted_zstd() {
    let d = tempfile::tempdir().expect("tempdir");
    let img = image_with(spec(simple_layer(), C::Zstd));
    let (e, layer) = flatten_err(d.path(), &img, |p| {
        let mut b = std::fs::read(p).expect("read");
        let n = b.len();
        b[n - 6] ^= 0xff;
        std::fs::write(p, b).expect("write");
    });
    assert_eq!(e.layer(), Some(layer.as_str()), "{e}");
}

#[test]
fn layer_digest_mismatch() {
    let d = tempfile::tempdir().expect("tempdir");
    let img = image_with(spec(simple_layer(), C::None));
    // Same size, one byte of file data changed: the tar still parses.
    let (e, layer) = flatten_err(d.path(), &img, |p| {
        let mut b = std::fs::read(p).expect("read");
        b[600] = b'X';
        std::fs::write(p, b).expect("write");
    });
    match &e {
        FlattenError::Stream {
            layer: l,
            after,
            source: ApplyError::Verify(SourceError::DigestMismatch { digest, actual }),
        } => {
            assert_eq!((l, digest), (&layer, &layer));
            assert_ne!(actual, &layer);
            assert_eq!(after.as_deref(), Some("b"), "names the last entry read");
        }
        other => panic!("unexpected {other}"),
    }
    assert!(e.to_string().contains("expected"), "{e}");
}

#[test]
fn blob_size_mismatch() {
    let d = tempfile::tempdir().expect("tempdir");
    let img = image_with(spec(simple_layer(), C::None));
    let (e, layer) = flatten_err(d.path(), &img, |p| {
        let mut b = std::fs::read(p).expect("read");
        b.extend_from_slice(&[0; 512]);
        std::fs::write(p, b).expect("write");
    });
    assert_eq!(e.layer(), Some(layer.as_str()));
    assert!(
        matches!(
            e,
            FlattenError::Stream {
                source: ApplyError::Verify(SourceError::SizeMismatch { .. }),
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn diff_id_mismatch() {
    let d = tempfile::tempdir().expect("tempdir");
    let mut s = spec(simple_layer(), C::Gzip);
    s.diff_id = Some(format!("sha256:{}", "1".repeat(64)));
    let (e, layer) = flatten_err(d.path(), &image_with(s), |_| {});
    match &e {
        FlattenError::Stream {
            layer: l,
            source:
                ApplyError::Verify(SourceError::DiffIdMismatch {
                    layer: ll,
                    expected,
                    ..
                }),
            ..
        } => {
            assert_eq!((l, ll), (&layer, &layer));
            assert_eq!(expected, &format!("sha256:{}", "1".repeat(64)));
        }
        other => panic!("unexpected {other}"),
    }
}

#[test]
fn gzip_declared_but_plain() {
    let d = tempfile::tempdir().expect("tempdir");
    let mut s = spec(simple_layer(), C::None);
    s.media_type = Some(C::Gzip.oci_media_type().into());
    let (e, layer) = flatten_err(d.path(), &image_with(s), |_| {});
    assert_eq!(e.layer(), Some(layer.as_str()), "{e}");
}

#[test]
fn unknown_media_type() {
    let d = tempfile::tempdir().expect("tempdir");
    let mut s = spec(simple_layer(), C::None);
    s.media_type = Some("application/x-squashfs".into());
    let (e, layer) = flatten_err(d.path(), &image_with(s), |_| {});
    match &e {
        FlattenError::Source(SourceError::UnsupportedMediaType { digest, media_type }) => {
            assert_eq!(
                (digest.as_str(), media_type.as_str()),
                (layer.as_str(), "application/x-squashfs")
            );
        }
        other => panic!("unexpected {other}"),
    }
}

#[test]
fn foreign_layer_rejected() {
    let d = tempfile::tempdir().expect("tempdir");
    let mut s = spec(simple_layer(), C::Gzip);
    s.media_type = Some(crate::media_types::DOCKER_FOREIGN_LAYER_GZIP.into());
    let (e, layer) = flatten_err(d.path(), &image_with(s), |_| {});
    assert!(
        matches!(&e, FlattenError::Source(SourceError::ForeignLayer { digest, .. }) if *digest == layer),
        "{e}"
    );
}

#[test]
fn missing_layer_blob() {
    let d = tempfile::tempdir().expect("tempdir");
    let img = image_with(spec(simple_layer(), C::Gzip));
    let (e, layer) = flatten_err(d.path(), &img, |p| std::fs::remove_file(p).expect("rm"));
    assert!(
        matches!(&e, FlattenError::Source(SourceError::BlobNotFound { digest, .. }) if *digest == layer),
        "{e}"
    );
}

#[test]
fn docker_archive_bzip2_layer() {
    let d = tempfile::tempdir().expect("tempdir");
    let mut img = ImageBuilder::new();
    let mut fake = b"BZh91AY&SY".to_vec();
    fake.resize(600, 0);
    img.layers.push(LayerSpec {
        tar: fake,
        compression: C::None,
        media_type: None,
        diff_id: None,
    });
    let path = d.path().join("x.tar");
    write_docker_archive(&path, &[(&img, &["x:1"])], DockerArchiveStyle::Blobs).expect("write");
    let src = open_source(&format!("docker-archive:{}", path.display())).expect("open");
    let image = src.resolve(&Platform::default()).expect("resolve");
    let e = flatten(src.as_ref(), &image, &mut MemSink::default(), &mut |_| {}).expect_err("bzip2");
    assert!(
        matches!(&e, FlattenError::Source(SourceError::UnsupportedCompression { digest, compression: "bzip2" }) if *digest == image.layers[0].digest),
        "{e}"
    );
}

#[test]
fn truncated_tar() {
    let mut bytes = simple_layer();
    bytes.truncate(512 + 1000); // inside the data of `a`
    let e = apply_err(&[], bytes);
    assert_entry(&e, "layer0", "a", |k| {
        matches!(
            k,
            ApplyError::Truncated {
                expected: 3000,
                actual: 1000
            }
        )
    });
}

#[test]
fn truncated_inside_skipped_data() {
    // `b`'s header is intact, but the stream ends inside its data, which the
    // tar reader skips past after a directory entry with a size.
    let mut l = LayerBuilder::new();
    let mut h = tar::Header::new_ustar();
    h.set_path("dir/").expect("path");
    h.set_entry_type(tar::EntryType::Directory);
    h.set_size(5000);
    h.set_cksum();
    l.raw_header(&h, &[0u8; 100]);
    let mut bytes = l.into_bytes_unterminated();
    bytes.truncate(512 + 100);
    let e = apply_err(&[], bytes);
    match &e {
        FlattenError::Stream { layer, after, .. } => {
            assert_eq!(
                (layer.as_str(), after.as_deref()),
                ("layer0", Some("dir/")),
                "{e}"
            );
        }
        other => panic!("unexpected {other}"),
    }
}

#[test]
fn huge_size_header_does_not_allocate() {
    let mut h = tar::Header::new_ustar();
    h.set_path("huge").expect("path");
    h.set_size(1 << 40);
    h.set_mode(0o644);
    h.set_cksum();
    let mut l = LayerBuilder::new();
    l.raw_header(&h, b"0123456789");
    let e = apply_err(&[], l.into_bytes());
    // 10 bytes + 502 padding + 1024 end-of-archive zeros were there.
    assert_entry(
        &e,
        "layer0",
        "huge",
        |k| matches!(k, ApplyError::Truncated { expected, actual: 1536 } if *expected == 1 << 40),
    );
}

#[test]
fn path_traversal_dotdot() {
    let mut l = LayerBuilder::new();
    l.file("../x", b"x", 0o644);
    let e = apply_err(&[], l.into_bytes());
    assert_entry(&e, "layer0", "../x", |k| {
        matches!(k, ApplyError::PathEscapesRoot)
    });
    assert!(e.to_string().contains("path escapes the root"));
}

#[test]
fn path_traversal_nested_dotdot() {
    let mut l = LayerBuilder::new();
    l.file("etc/../../x", b"x", 0o644);
    let e = apply_err(&[], l.into_bytes());
    assert_entry(&e, "layer0", "etc/../../x", |k| {
        matches!(k, ApplyError::PathEscapesRoot)
    });
}

#[test]
fn absolute_dotdot_escapes_too() {
    let mut l = LayerBuilder::new();
    l.file("/../etc/x", b"x", 0o644);
    let e = apply_err(&[], l.into_bytes());
    assert_entry(&e, "layer0", "/../etc/x", |k| {
        matches!(k, ApplyError::PathEscapesRoot)
    });
}

#[test]
fn symlink_as_parent_directory() {
    let mut l1 = LayerBuilder::new();
    l1.symlink("lnk", "/etc");
    let mut l2 = LayerBuilder::new();
    l2.file("lnk/passwd", b"evil", 0o644);
    let e = apply_err(&[l1.into_bytes()], l2.into_bytes());
    assert_entry(
        &e,
        "layer1",
        "lnk/passwd",
        |k| matches!(k, ApplyError::SymlinkParent { parent } if parent == "lnk"),
    );
}

#[test]
fn symlink_parent_in_hard_link_target() {
    let mut l = LayerBuilder::new();
    l.symlink("lnk", "/etc").hardlink("h", "lnk/passwd");
    let e = apply_err(&[], l.into_bytes());
    assert_entry(&e, "layer0", "h", |k| {
        matches!(k, ApplyError::SymlinkParent { .. })
    });
}

#[test]
fn file_as_parent_directory() {
    let mut l = LayerBuilder::new();
    l.file("f", b"x", 0o644).file("f/x", b"y", 0o644);
    let e = apply_err(&[], l.into_bytes());
    assert_entry(
        &e,
        "layer0",
        "f/x",
        |k| matches!(k, ApplyError::NotADirectory { parent } if parent == "f"),
    );
}

#[test]
fn hard_link_to_missing_target() {
    let mut l = LayerBuilder::new();
    l.hardlink("link", "does/not/exist");
    let e = apply_err(&[], l.into_bytes());
    assert_entry(
        &e,
        "layer0",
        "link",
        |k| matches!(k, ApplyError::LinkTargetMissing { target } if target == "does/not/exist"),
    );
    assert!(e.to_string().contains("does/not/exist"));
}

#[test]
fn hard_link_to_directory() {
    let mut l = LayerBuilder::new();
    l.dir("d/", 0o755).hardlink("link", "d");
    let e = apply_err(&[], l.into_bytes());
    assert_entry(&e, "layer0", "link", |k| {
        matches!(k, ApplyError::LinkToDirectory { .. })
    });
}

#[test]
fn hard_link_target_escapes() {
    let mut l = LayerBuilder::new();
    l.hardlink("link", "../../etc/shadow");
    let e = apply_err(&[], l.into_bytes());
    assert_entry(&e, "layer0", "link", |k| {
        matches!(k, ApplyError::LinkTargetEscapes { .. })
    });
}

#[test]
fn hard_link_to_whited_out_file() {
    let mut l1 = LayerBuilder::new();
    l1.file("a", b"a", 0o644);
    let mut l2 = LayerBuilder::new();
    l2.whiteout("a").hardlink("b", "a");
    let e = apply_err(&[l1.into_bytes()], l2.into_bytes());
    assert_entry(&e, "layer1", "b", |k| {
        matches!(k, ApplyError::LinkTargetMissing { .. })
    });
}

#[test]
fn root_replaced_by_file() {
    let mut l = LayerBuilder::new();
    l.file("./", b"", 0o644);
    // A regular entry named `./` ends with a slash: old-style directory.
    apply_all(&[l.into_bytes()]).expect("old-style dir entry for the root is fine");
    let mut l = LayerBuilder::new();
    l.symlink(".", "/etc");
    let e = apply_err(&[], l.into_bytes());
    assert_entry(&e, "layer0", ".", |k| {
        matches!(k, ApplyError::RootNotDirectory)
    });
}

#[test]
fn invalid_whiteout_name() {
    let mut l = LayerBuilder::new();
    l.file("d/.wh...", b"", 0o644).file("d/.wh.", b"", 0o644);
    let e = apply_err(&[], l.into_bytes());
    // `d/.wh...` is a whiteout of `..`.
    assert_entry(&e, "layer0", "d/.wh...", |k| {
        matches!(k, ApplyError::InvalidWhiteout)
    });
}

#[test]
fn uid_over_32_bits() {
    let mut e = Entry::new("f", EntryKind::File(vec![]));
    e.pax.push(("uid".into(), b"4294967296".to_vec()));
    let mut l = LayerBuilder::new();
    l.entry(e);
    let e = apply_err(&[], l.into_bytes());
    assert_entry(&e, "layer0", "f", |k| {
        matches!(k, ApplyError::InvalidHeader { field: "uid", .. })
    });
}

#[test]
fn bad_pax_mtime() {
    let mut e = Entry::new("f", EntryKind::File(vec![]));
    e.pax.push(("mtime".into(), b"yesterday".to_vec()));
    let mut l = LayerBuilder::new();
    l.entry(e);
    let e = apply_err(&[], l.into_bytes());
    assert_entry(&e, "layer0", "f", |k| {
        matches!(k, ApplyError::InvalidHeader { field: "mtime", .. })
    });
}

#[test]
fn bad_header_checksum() {
    let mut bytes = simple_layer();
    bytes[512 + 3072 + 10] ^= 1; // header of `b`
    let e = apply_err(&[], bytes);
    match &e {
        FlattenError::Stream { layer, after, .. } => {
            assert_eq!(
                (layer.as_str(), after.as_deref()),
                ("layer0", Some("a")),
                "{e}"
            )
        }
        other => panic!("unexpected {other}"),
    }
}

/// A sink that fails: the error says it was the sink, with layer and entry.
struct FailingSink;

impl crate::tree::DataSink for FailingSink {
    fn start_layer(&mut self) -> std::io::Result<()> {
        Ok(())
    }
    fn write_file(
        &mut self,
        _: &mut dyn std::io::Read,
        _: u64,
    ) -> std::io::Result<Vec<crate::tree::Extent>> {
        Err(std::io::Error::other("disk full"))
    }
}

#[test]
fn sink_failure_names_entry() {
    let mut tree = Tree::new();
    let e = apply_layer(
        &mut tree,
        simple_layer().as_slice(),
        "layerX",
        &mut FailingSink,
    )
    .expect_err("sink fails");
    assert_entry(&e, "layerX", "a", |k| matches!(k, ApplyError::Sink(_)));
}

#[test]
fn name_longer_than_ext4_allows() {
    let mut l = LayerBuilder::new();
    let path = format!("etc/{}", "n".repeat(256));
    l.file(&path, b"x", 0o644);
    let e = apply_err(&[], l.into_bytes());
    assert_entry(&e, "layer0", &path, |k| {
        matches!(k, ApplyError::NameTooLong { len: 256, .. })
    });
    assert!(e.to_string().contains("at most 255"), "{e}");
    let mut l = LayerBuilder::new();
    l.file(&format!("etc/{}", "n".repeat(255)), b"x", 0o644);
    assert!(apply_all(&[l.into_bytes()]).is_ok(), "255 bytes fit");
}
