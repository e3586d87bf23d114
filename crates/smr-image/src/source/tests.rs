//! Source tests: reference parsing, OCI layouts (tags, platforms, nested
//! indexes, Docker media types), docker archives, and bad input.

use super::*;
use smr_testkit::{
    blob_path, write_docker_archive, Compression, DockerArchiveStyle, ImageBuilder, LayerBuilder,
    OciLayout as Layout,
};
use tempfile::TempDir;

fn tmp() -> TempDir {
    tempfile::tempdir().expect("tempdir")
}

fn one_layer_image(content: &[u8]) -> ImageBuilder {
    let mut l = LayerBuilder::new();
    l.file("hello", content, 0o644);
    let mut img = ImageBuilder::new();
    img.layer(l.into_bytes(), Compression::Gzip);
    img
}

fn open(dir: &Path, tag: Option<&str>) -> Box<dyn ImageSource> {
    let r = match tag {
        Some(t) => format!("oci:{}:{t}", dir.display()),
        None => format!("oci:{}", dir.display()),
    };
    open_source(&r).expect("open source")
}

/// A layout with one image per platform, in one index tagged `multi`.
fn multi_platform(dir: &Path, nested: bool) {
    let mut layout = Layout::new();
    let mut descs = Vec::new();
    for (arch, variant) in [("amd64", None), ("arm64", Some("v8")), ("arm", Some("v7"))] {
        let mut img = one_layer_image(arch.as_bytes());
        img.platform("linux", arch, variant);
        descs.push(layout.add_image(&img));
    }
    let mut top = layout.add_index(&descs, false);
    if nested {
        let mid = layout.add_index(&[top], false);
        top = layout.add_index(&[mid], true);
    }
    layout.tag(top, Some("multi"));
    layout.write(dir).expect("write layout");
}

#[test]
fn platform_parse_and_display() {
    let p: Platform = "linux/arm64/v8".parse().expect("parse");
    assert_eq!(p.variant.as_deref(), Some("v8"));
    assert_eq!(p.to_string(), "linux/arm64/v8");
    let p: Platform = "linux/x86_64".parse().expect("parse");
    assert_eq!(p, Platform::default());
    for bad in ["linux", "linux/", "/amd64", "a/b/c/d", ""] {
        assert!(
            matches!(
                bad.parse::<Platform>(),
                Err(SourceError::BadPlatform { .. })
            ),
            "{bad}"
        );
    }
}

#[test]
fn references() {
    let e = open_source("docker://docker.io/library/alpine:3")
        .err()
        .expect("error");
    assert!(matches!(e, SourceError::Unsupported { .. }), "{e}");
    assert!(e.to_string().contains("docker://"));
    let e = open_source("alpine:3").err().expect("error");
    assert!(matches!(e, SourceError::BadReference { .. }), "{e}");
}

#[test]
fn oci_single_manifest_with_and_without_tag() {
    let d = tmp();
    let mut img = one_layer_image(b"hi");
    img.entrypoint = vec!["/bin/app".into()];
    img.user = "1:2".into();
    img.working_dir = "/w".into();
    img.labels.insert("k".into(), "v".into());
    let desc = img.write_oci_layout(d.path(), Some("v1")).expect("write");
    for tag in [Some("v1"), None] {
        let src = open(d.path(), tag);
        let r = src.resolve(&Platform::default()).expect("resolve");
        assert_eq!(r.manifest_digest, desc.digest);
        assert_eq!(r.config.entrypoint, vec!["/bin/app".to_string()]);
        assert_eq!(r.config.cmd, vec!["/bin/sh".to_string()]);
        assert_eq!(r.config.user, "1:2");
        assert_eq!(r.config.working_dir, "/w");
        assert_eq!(r.config.labels.get("k").map(String::as_str), Some("v"));
        assert_eq!(
            (r.config.os.as_str(), r.config.architecture.as_str()),
            ("linux", "amd64")
        );
        assert_eq!(r.layers.len(), 1);
        assert_eq!(r.layers[0].media_type, Compression::Gzip.oci_media_type());
        assert_eq!(r.layers[0].diff_id, img.layers[0].diff_id());
    }
    assert!(open(d.path(), Some("v1")).describe().ends_with(":v1"));
}

#[test]
fn oci_tag_not_found_lists_tags() {
    let d = tmp();
    one_layer_image(b"x")
        .write_oci_layout(d.path(), Some("v1"))
        .expect("write");
    let e = open(d.path(), Some("v2"))
        .resolve(&Platform::default())
        .expect_err("no v2");
    assert!(
        matches!(&e, SourceError::TagNotFound { tag, available } if tag == "v2" && available == &["v1"])
    );
    assert!(e.to_string().contains("v1"), "{e}");
}

#[test]
fn oci_several_images_without_tag_is_ambiguous() {
    let d = tmp();
    let mut layout = Layout::new();
    let a = layout.add_image(&one_layer_image(b"a"));
    let b = layout.add_image(&one_layer_image(b"b"));
    layout.tag(a, Some("a")).tag(b, Some("b"));
    layout.write(d.path()).expect("write");
    let e = open(d.path(), None)
        .resolve(&Platform::default())
        .expect_err("ambiguous");
    assert!(matches!(e, SourceError::AmbiguousImage { .. }), "{e}");
    assert!(e.to_string().contains("a, b"), "{e}");
    let r = open(d.path(), Some("b"))
        .resolve(&Platform::default())
        .expect("b");
    assert_eq!(r.layers.len(), 1);
}

#[test]
fn platform_selection_in_multi_platform_index() {
    for nested in [false, true] {
        let d = tmp();
        multi_platform(d.path(), nested);
        let src = open(d.path(), Some("multi"));
        for (p, arch) in [
            ("linux/amd64", "amd64"),
            ("linux/arm64", "arm64"),
            ("linux/arm64/v8", "arm64"),
            ("linux/arm/v7", "arm"),
        ] {
            let r = src.resolve(&p.parse().expect("platform")).expect("resolve");
            assert_eq!(r.config.architecture, arch, "nested={nested} {p}");
        }
        let e = src
            .resolve(&"linux/s390x".parse().expect("platform"))
            .expect_err("no s390x");
        match &e {
            SourceError::NoMatchingPlatform { wanted, available } => {
                assert_eq!(wanted, "linux/s390x");
                assert_eq!(
                    available,
                    &["linux/amd64", "linux/arm/v7", "linux/arm64/v8"]
                );
            }
            other => panic!("unexpected {other}"),
        }
        assert!(e.to_string().contains("linux/arm/v7"));
    }
}

#[test]
fn docker_media_types() {
    let d = tmp();
    let mut img = one_layer_image(b"docker");
    img.docker_media_types = true;
    let mut layout = Layout::new();
    let m = layout.add_image(&img);
    let list = layout.add_index(&[m], true);
    layout.tag(list, Some("d"));
    layout.write(d.path()).expect("write");
    let r = open(d.path(), None)
        .resolve(&Platform::default())
        .expect("resolve");
    assert_eq!(
        r.layers[0].media_type,
        crate::media_types::DOCKER_LAYER_GZIP
    );
}

#[test]
fn docker_archive_styles_and_tags() {
    for style in [DockerArchiveStyle::Legacy, DockerArchiveStyle::Blobs] {
        let d = tmp();
        let path = d.path().join("img.tar");
        let a = one_layer_image(b"a");
        let mut b = one_layer_image(b"b");
        b.layers[0].compression = Compression::None;
        write_docker_archive(
            &path,
            &[(&a, &["repo/a:1"]), (&b, &["repo/b:latest"])],
            style,
        )
        .expect("write");
        let src = open_source(&format!("docker-archive:{}:repo/b", path.display())).expect("open");
        let r = src.resolve(&Platform::default()).expect("resolve b");
        assert_eq!(r.layers[0].diff_id, b.layers[0].diff_id());
        assert_eq!(
            r.layers[0].digest, r.layers[0].diff_id,
            "uncompressed: digest is diff_id"
        );
        let src =
            open_source(&format!("docker-archive:{}:repo/a:1", path.display())).expect("open");
        let r = src.resolve(&Platform::default()).expect("resolve a");
        assert_eq!(
            r.layers[0].digest,
            smr_testkit::sha256_digest(&a.layers[0].blob())
        );
        let mut blob = Vec::new();
        src.open_blob(&r.config_digest)
            .expect("config blob")
            .read_to_end(&mut blob)
            .expect("read");
        assert_eq!(blob, a.config_json());

        let src = open_source(&format!("docker-archive:{}", path.display())).expect("open");
        let e = src.resolve(&Platform::default()).expect_err("ambiguous");
        assert!(e.to_string().contains("repo/a:1"), "{e}");
        let src = open_source(&format!("docker-archive:{}:nope:1", path.display())).expect("open");
        let e = src.resolve(&Platform::default()).expect_err("missing");
        assert!(matches!(e, SourceError::TagNotFound { .. }), "{e}");
    }
}

// ---- bad input ----

#[test]
fn bad_index_json() {
    let d = tmp();
    one_layer_image(b"x")
        .write_oci_layout(d.path(), None)
        .expect("write");
    std::fs::write(
        d.path().join("index.json"),
        b"{\"schemaVersion\": 2, \"manifests\": [",
    )
    .expect("w");
    let e = open(d.path(), None)
        .resolve(&Platform::default())
        .expect_err("bad json");
    assert!(
        matches!(&e, SourceError::Json { what, .. } if what.ends_with("index.json")),
        "{e}"
    );
}

#[test]
fn index_json_with_wrong_schema_version() {
    let d = tmp();
    one_layer_image(b"x")
        .write_oci_layout(d.path(), None)
        .expect("write");
    std::fs::write(
        d.path().join("index.json"),
        br#"{"schemaVersion": 1, "manifests": []}"#,
    )
    .expect("w");
    let e = open(d.path(), None)
        .resolve(&Platform::default())
        .expect_err("schema");
    assert!(matches!(e, SourceError::Invalid { .. }), "{e}");
}

#[test]
fn missing_oci_layout_file() {
    let d = tmp();
    one_layer_image(b"x")
        .write_oci_layout(d.path(), None)
        .expect("write");
    std::fs::remove_file(d.path().join("oci-layout")).expect("rm");
    let e = open_source(&format!("oci:{}", d.path().display()))
        .err()
        .expect("error");
    assert!(matches!(e, SourceError::Io { .. }), "{e}");
}

#[test]
fn missing_manifest_blob() {
    let d = tmp();
    let desc = one_layer_image(b"x")
        .write_oci_layout(d.path(), None)
        .expect("write");
    std::fs::remove_file(blob_path(d.path(), &desc.digest)).expect("rm");
    let e = open(d.path(), None)
        .resolve(&Platform::default())
        .expect_err("missing");
    assert!(
        matches!(&e, SourceError::BlobNotFound { digest, .. } if *digest == desc.digest),
        "{e}"
    );
}

#[test]
fn corrupted_manifest_blob() {
    let d = tmp();
    let desc = one_layer_image(b"x")
        .write_oci_layout(d.path(), None)
        .expect("write");
    let p = blob_path(d.path(), &desc.digest);
    let mut bytes = std::fs::read(&p).expect("read");
    bytes[0] = b' ';
    std::fs::write(&p, bytes).expect("write");
    let e = open(d.path(), None)
        .resolve(&Platform::default())
        .expect_err("mismatch");
    assert!(
        matches!(&e, SourceError::DigestMismatch { digest, .. } if *digest == desc.digest),
        "{e}"
    );
}

#[test]
fn manifest_blob_longer_than_descriptor() {
    let d = tmp();
    let desc = one_layer_image(b"x")
        .write_oci_layout(d.path(), None)
        .expect("write");
    let p = blob_path(d.path(), &desc.digest);
    let mut bytes = std::fs::read(&p).expect("read");
    bytes.push(b'\n');
    std::fs::write(&p, bytes).expect("write");
    let e = open(d.path(), None)
        .resolve(&Platform::default())
        .expect_err("size");
    assert!(matches!(e, SourceError::SizeMismatch { .. }), "{e}");
}

#[test]
fn hostile_digest_in_index() {
    let d = tmp();
    one_layer_image(b"x")
        .write_oci_layout(d.path(), None)
        .expect("write");
    let idx = format!(
        r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"{}","digest":"sha256:../../../etc/passwd","size":1}}]}}"#,
        crate::media_types::OCI_MANIFEST
    );
    std::fs::write(d.path().join("index.json"), idx).expect("w");
    let e = open(d.path(), None)
        .resolve(&Platform::default())
        .expect_err("invalid");
    assert!(matches!(e, SourceError::InvalidDigest { .. }), "{e}");
}

#[test]
fn unknown_manifest_media_type() {
    let d = tmp();
    one_layer_image(b"x")
        .write_oci_layout(d.path(), None)
        .expect("write");
    let idx = format!(
        r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/x-foo","digest":"sha256:{}","size":1}}]}}"#,
        "0".repeat(64)
    );
    std::fs::write(d.path().join("index.json"), idx).expect("w");
    let e = open(d.path(), None)
        .resolve(&Platform::default())
        .expect_err("media type");
    assert!(
        matches!(&e, SourceError::UnsupportedMediaType { media_type, .. } if media_type == "application/x-foo"),
        "{e}"
    );
}

#[test]
fn diff_ids_count_mismatch() {
    let d = tmp();
    let mut img = one_layer_image(b"x");
    let mut layout = Layout::new();
    let good = layout.add_image(&img);
    // A second manifest whose config lists two diff_ids for one layer.
    img.layers.push(img.layers[0].clone());
    let cfg = img.config_json();
    let cfg_size = cfg.len();
    let cfg_digest = layout.add_blob(cfg);
    let manifest: serde_json::Value =
        serde_json::from_slice(&layout.blobs[&good.digest]).expect("manifest json");
    let mut manifest = manifest;
    manifest["config"]["digest"] = cfg_digest.into();
    manifest["config"]["size"] = cfg_size.into();
    let bytes = serde_json::to_vec(&manifest).expect("json");
    let mut desc = good.clone();
    desc.size = bytes.len() as u64;
    desc.digest = layout.add_blob(bytes);
    layout.tag(desc, None);
    layout.write(d.path()).expect("write");
    let e = open(d.path(), None)
        .resolve(&Platform::default())
        .expect_err("count");
    assert!(e.to_string().contains("diff_ids"), "{e}");
}

#[test]
fn docker_archive_missing_manifest_json() {
    let d = tmp();
    let path = d.path().join("x.tar");
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    h.set_path("other").expect("path");
    h.set_size(0);
    h.set_cksum();
    b.append(&h, std::io::empty()).expect("append");
    std::fs::write(&path, b.into_inner().expect("tar")).expect("write");
    let e = open_source(&format!("docker-archive:{}", path.display()))
        .err()
        .expect("error");
    assert!(e.to_string().contains("manifest.json"), "{e}");
}
