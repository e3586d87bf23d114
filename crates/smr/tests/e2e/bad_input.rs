//! Bad input through the CLI: a clear error naming the layer (and entry), a
//! non-zero exit, no recipe, no stray temp files anywhere.

use super::util::*;
use smr_testkit::{Compression, ImageBuilder, LayerBuilder, LayerSpec};
use std::path::Path;

/// A tar header for `path` (written raw, so `..` and huge sizes pass through).
fn raw_file(path: &str, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.as_old_mut().name[..path.len()].copy_from_slice(path.as_bytes());
    h.set_mode(0o644);
    h.set_size(size);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    h
}

fn base_layer() -> Vec<u8> {
    let mut l = LayerBuilder::new();
    l.dir("etc/", 0o755).file("etc/ok", b"fine\n", 0o644);
    l.into_bytes()
}

/// Writes an image whose second layer is `spec`; returns (source, layer digest).
fn image_with(dir: &Path, spec: LayerSpec) -> (String, String) {
    let mut img = ImageBuilder::new();
    img.layer(base_layer(), Compression::Gzip);
    let digest = smr_testkit::sha256_digest(&spec.blob());
    img.layers.push(spec);
    img.write_oci_layout(&dir.join("layout"), Some("t"))
        .expect("write layout");
    (format!("oci:{}:t", dir.join("layout").display()), digest)
}

fn spec(tar: Vec<u8>, compression: Compression) -> LayerSpec {
    LayerSpec {
        tar,
        compression,
        media_type: None,
        diff_id: None,
    }
}

/// Runs convert, expects failure; checks the error names `needles`, and that
/// neither a recipe nor any temp file was left.
fn convert_fails(dir: &Path, source: &str, needles: &[&str]) {
    let key = key_file(dir);
    let recipe = dir.join("out.recipe");
    let err = fails(
        smr()
            .arg("convert")
            .arg(source)
            .arg("--store")
            .arg(dir.join("store"))
            .arg("-o")
            .arg(&recipe)
            .arg("--key-file")
            .arg(&key),
    );
    for n in needles {
        assert!(err.contains(n), "error should name `{n}`:\n{err}");
    }
    assert!(!recipe.exists(), "no recipe written");
    assert!(find_named(dir, ".tmp").is_empty(), "no temp files left");
    for e in std::fs::read_dir(dir).unwrap() {
        let name = e.unwrap().file_name();
        assert!(
            ["layout", "store", "key"].contains(&name.to_str().unwrap()),
            "unexpected {name:?} left in {dir:?}"
        );
    }
}

#[test]
fn corrupted_gzip() {
    let t = tempfile::tempdir().unwrap();
    let mut s = spec(base_layer(), Compression::None);
    s.media_type = Some("application/vnd.oci.image.layer.v1.tar+gzip".into());
    let (src, digest) = image_with(t.path(), s);
    convert_fails(t.path(), &src, &[&digest]);
}

#[test]
fn truncated_tar() {
    let t = tempfile::tempdir().unwrap();
    let mut l = LayerBuilder::new();
    l.file("big", &vec![7u8; 100_000], 0o644);
    let mut bytes = l.into_bytes_unterminated();
    bytes.truncate(50_000);
    let (src, digest) = image_with(t.path(), spec(bytes, Compression::Gzip));
    convert_fails(t.path(), &src, &[&digest, "big"]);
}

#[test]
fn layer_digest_mismatch() {
    let t = tempfile::tempdir().unwrap();
    let (src, digest) = image_with(t.path(), spec(base_layer(), Compression::Gzip));
    let blob = smr_testkit::blob_path(&t.path().join("layout"), &digest);
    let mut bytes = std::fs::read(&blob).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 1;
    std::fs::write(&blob, bytes).unwrap();
    convert_fails(t.path(), &src, &[&digest]);
}

#[test]
fn path_traversal() {
    for path in ["../escape", "a/../../escape"] {
        let t = tempfile::tempdir().unwrap();
        let mut l = LayerBuilder::new();
        l.raw_header(&raw_file(path, 4), b"evil");
        let (src, digest) = image_with(t.path(), spec(l.into_bytes(), Compression::Gzip));
        convert_fails(t.path(), &src, &[&digest, path]);
    }
}

#[test]
fn symlink_as_parent_directory() {
    let t = tempfile::tempdir().unwrap();
    let mut l = LayerBuilder::new();
    l.symlink("lnk", "/etc")
        .file("lnk/passwd", b"owned\n", 0o644);
    let (src, digest) = image_with(t.path(), spec(l.into_bytes(), Compression::Gzip));
    convert_fails(t.path(), &src, &[&digest, "lnk/passwd"]);
}

#[test]
fn hard_link_to_missing_target() {
    let t = tempfile::tempdir().unwrap();
    let mut l = LayerBuilder::new();
    l.hardlink("etc/link", "etc/nonexistent");
    let (src, digest) = image_with(t.path(), spec(l.into_bytes(), Compression::Gzip));
    convert_fails(t.path(), &src, &[&digest, "etc/link", "etc/nonexistent"]);
}

#[test]
fn header_claiming_huge_size() {
    let t = tempfile::tempdir().unwrap();
    let mut l = LayerBuilder::new();
    l.raw_header(&raw_file("huge", 1 << 40), b"0123456789");
    let (src, digest) = image_with(t.path(), spec(l.into_bytes(), Compression::Gzip));
    convert_fails(t.path(), &src, &[&digest, "huge"]);
}

#[test]
fn unknown_media_type() {
    let t = tempfile::tempdir().unwrap();
    let mut s = spec(base_layer(), Compression::Gzip);
    s.media_type = Some("application/vnd.example.unknown".into());
    let (src, digest) = image_with(t.path(), s);
    convert_fails(
        t.path(),
        &src,
        &[&digest, "application/vnd.example.unknown"],
    );
}

#[test]
fn missing_source() {
    let t = tempfile::tempdir().unwrap();
    std::fs::create_dir(t.path().join("layout")).unwrap();
    let src = format!("oci:{}:t", t.path().join("layout").display());
    convert_fails(t.path(), &src, &["oci-layout", "No such file"]);
}

/// A 256-byte file name (ext4 holds 255) is refused naming the layer and
/// the tar entry.
#[test]
fn file_name_too_long_for_ext4() {
    let t = tempfile::tempdir().unwrap();
    let name = format!("etc/{}", "n".repeat(256));
    let mut l = LayerBuilder::new();
    l.file(&name, b"x", 0o644);
    let (src, digest) = image_with(t.path(), spec(l.into_bytes(), Compression::Gzip));
    convert_fails(t.path(), &src, &[&digest, &name, "255"]);
}

/// A key file or recipe that never ends (`/dev/zero`) is refused after a
/// bounded read, naming the file and the limit.
#[test]
fn endless_key_file_and_recipe() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("img");
    let err = fails(
        smr()
            .args(["extract", "/dev/zero", "--store"])
            .arg(t.path())
            .arg("-o")
            .arg(&out),
    );
    assert!(err.contains("/dev/zero") && err.contains("limit"), "{err}");
    let s = Synthetic::new();
    convert(&s.src, &s.store, &s.recipe, &s.key, &[]);
    let err = fails(
        smr()
            .arg("extract")
            .arg(&s.recipe)
            .arg("--store")
            .arg(&s.store)
            .args(["--key-file", "/dev/zero", "-o"])
            .arg(&out),
    );
    assert!(err.contains("/dev/zero") && err.contains("limit"), "{err}");
    assert!(!out.exists());
}
