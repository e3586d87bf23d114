//! `docker://` as an image source: resolution, blobs, conversion identical
//! to the `oci:` layout's.

use super::util::*;
use smr_convert::{convert, ConvertOptions};
use smr_format::chunk::default_salt;
use smr_format::{ChunkCodec, OwnerKey};
use smr_image::source::digest::VerifyingReader;
use smr_image::source::oci_layout::OciLayout;
use smr_image::source::{ImageSource, Platform, ResolvedImage, SourceError};
use smr_registry::source::{open_source, RegistrySource};
use smr_registry::Blobs;
use smr_testkit::{synthetic_everything, ImageBuilder, LayerBuilder, SYNTHETIC_TAG};
use std::io::Read;
use std::path::Path;
use std::sync::Arc;

/// Reads every blob of `img` from `src`, verifying each against its
/// digest and size; returns the bytes read.
fn read_all_blobs(src: &dyn ImageSource, img: &ResolvedImage, layout: Option<&Path>) -> u64 {
    let mut total = 0;
    let mut blobs = vec![(img.config_digest.clone(), None)];
    blobs.extend(img.layers.iter().map(|l| (l.digest.clone(), Some(l.size))));
    for (d, size) in blobs {
        let mut r = VerifyingReader::new(src.open_blob(&d).expect("open blob"), &d, size);
        let mut out = Vec::new();
        r.read_to_end(&mut out)
            .unwrap_or_else(|e| panic!("blob {d}: {e}"));
        if let Some(l) = layout {
            let want = std::fs::read(smr_testkit::blob_path(l, &d)).expect("layout blob");
            assert!(out == want, "blob {d} differs from the layout's");
        }
        total += out.len() as u64;
    }
    total
}

/// Converts `src` with fixed options; returns the encoded recipe.
fn recipe_of(src: &dyn ImageSource, chunk_size: u64) -> Vec<u8> {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(smr_store::LocalStore::open(dir.path()).expect("store"));
    let opts = ConvertOptions {
        chunk_size,
        cdc: None,
        codec: ChunkCodec::new(default_salt(), true, false),
        platform: Platform::default(),
        owner: Some(OwnerKey([7; 32])),
        workers: 2,
    };
    convert(src, store, &opts, &mut |_| {})
        .expect("convert")
        .recipe
        .encode()
}

#[test]
fn synthetic_via_skopeo_resolves_reads_and_converts_like_the_layout() {
    let Some(reg) = TestRegistry::start(None) else {
        return;
    };
    if !tools(&["skopeo"]) {
        return;
    }
    let t = tempfile::tempdir().expect("tempdir");
    let layout = t.path().join("layout");
    synthetic_everything(&layout).expect("layout");
    let reference = reg.docker_ref("smr/synthetic:v1");
    skopeo_push(&layout, SYNTHETIC_TAG, &reference, &[]);

    let src = RegistrySource::open(&reference, &fast_options()).expect("source");
    assert_eq!(src.describe(), reference);
    let img = src.resolve(&Platform::default()).expect("resolve");
    let oci = OciLayout::open(&layout, Some(SYNTHETIC_TAG)).expect("layout");
    let want = oci.resolve(&Platform::default()).expect("resolve layout");
    assert_eq!(img, want, "same manifest, config and layers as the layout");
    let n = read_all_blobs(&src, &img, Some(&layout));
    assert!(n > 0);
    assert_eq!(recipe_of(&src, 64 << 10), recipe_of(&oci, 64 << 10));

    // Pinned by digest: the same image; by a digest of another blob: an
    // error naming it.
    let pinned = RegistrySource::open(
        &format!(
            "{}@{}",
            reg.docker_ref("smr/synthetic"),
            img.manifest_digest
        ),
        &fast_options(),
    )
    .expect("pinned source");
    assert_eq!(pinned.resolve(&Platform::default()).expect("pinned"), img);
    let missing = RegistrySource::open(
        &format!("{}@{}", reg.docker_ref("smr/synthetic"), img.config_digest),
        &fast_options(),
    )
    .expect("source");
    let e = missing
        .resolve(&Platform::default())
        .expect_err("not a manifest");
    assert!(e.to_string().contains(&img.config_digest), "{e}");

    // A missing tag lists the tags that exist.
    let nope = RegistrySource::open(&reg.docker_ref("smr/synthetic:nope"), &fast_options())
        .expect("source");
    match nope.resolve(&Platform::default()) {
        Err(SourceError::TagNotFound { tag, available }) => {
            assert_eq!(tag, "nope");
            assert_eq!(available, ["v1"]);
        }
        other => panic!("expected TagNotFound, got {other:?}"),
    }
    // open_source dispatches on the prefix.
    let s = open_source(&reference, &fast_options()).expect("open_source");
    assert_eq!(s.describe(), reference);
    let e = open_source("docker://127.0.0.1:1/UPPER", &fast_options())
        .err()
        .expect("bad reference");
    assert!(e.to_string().contains("UPPER"), "{e}");
}

#[test]
fn synthetic_pushed_by_the_client_converts_like_the_layout() {
    let Some(reg) = TestRegistry::start(None) else {
        return;
    };
    let t = tempfile::tempdir().expect("tempdir");
    let layout = t.path().join("layout");
    synthetic_everything(&layout).expect("layout");
    let repo = reg.repo("smr/own");
    let digest = client_push(&layout, SYNTHETIC_TAG, &repo);
    let src =
        RegistrySource::open(&reg.docker_ref("smr/own:latest"), &fast_options()).expect("source");
    let img = src.resolve(&Platform::default()).expect("resolve");
    assert_eq!(img.manifest_digest, digest);
    let oci = OciLayout::open(&layout, Some(SYNTHETIC_TAG)).expect("layout");
    assert_eq!(
        img,
        oci.resolve(&Platform::default()).expect("resolve layout")
    );
    assert_eq!(recipe_of(&src, 128 << 10), recipe_of(&oci, 128 << 10));
}

#[test]
fn multi_platform_index_selects_like_the_layout() {
    let Some(reg) = TestRegistry::start(None) else {
        return;
    };
    for docker in [false, true] {
        let t = tempfile::tempdir().expect("tempdir");
        let dir = t.path().join("layout");
        let mut layout = smr_testkit::OciLayout::new();
        let mut children = Vec::new();
        for (arch, variant) in [("amd64", None), ("arm64", Some("v8"))] {
            let mut l = LayerBuilder::new();
            l.file("arch", arch.as_bytes(), 0o644);
            let mut img = ImageBuilder::new();
            img.platform("linux", arch, variant)
                .layer(l.into_bytes(), smr_testkit::Compression::Gzip);
            img.docker_media_types = docker;
            children.push(layout.add_image(&img));
        }
        let index = layout.add_index(&children, docker);
        layout.tag(index.clone(), Some("multi"));
        layout.write(&dir).expect("write layout");

        // Push blobs, then child manifests by digest, then the index.
        let repo = reg.repo("smr/multi");
        for (d, bytes) in &layout.blobs {
            if children.iter().any(|c| &c.digest == d) || *d == index.digest {
                continue;
            }
            repo.push_blob(d, bytes).expect("push blob");
        }
        for c in &children {
            repo.put_manifest(&c.digest, &c.media_type, &layout.blobs[&c.digest])
                .expect("put child");
        }
        repo.put_manifest("multi", &index.media_type, &layout.blobs[&index.digest])
            .expect("put index");

        let src = RegistrySource::open(&reg.docker_ref("smr/multi:multi"), &fast_options())
            .expect("source");
        let oci = OciLayout::open(&dir, Some("multi")).expect("layout");
        for p in ["linux/amd64", "linux/arm64", "linux/arm64/v8"] {
            let p: Platform = p.parse().expect("platform");
            let got = src.resolve(&p).expect("resolve");
            assert_eq!(got, oci.resolve(&p).expect("layout resolve"), "{p}");
            read_all_blobs(&src, &got, Some(&dir));
        }
        let e = src
            .resolve(&"linux/s390x".parse().expect("platform"))
            .expect_err("no such platform");
        assert!(matches!(e, SourceError::NoMatchingPlatform { .. }), "{e}");
    }
}

#[test]
fn debian_images_via_skopeo_convert_like_the_layout() {
    let Some(layout) = debian_layout() else {
        return;
    };
    let Some(reg) = TestRegistry::start(None) else {
        return;
    };
    if !tools(&["skopeo"]) {
        return;
    }
    for tag in ["debian", "debian-python"] {
        skopeo_push(&layout, tag, &reg.docker_ref(&format!("smr/{tag}:12")), &[]);
        let src = RegistrySource::open(&reg.docker_ref(&format!("smr/{tag}:12")), &fast_options())
            .expect("source");
        let img = src.resolve(&Platform::default()).expect("resolve");
        let oci = OciLayout::open(&layout, Some(tag)).expect("layout");
        assert_eq!(img, oci.resolve(&Platform::default()).expect("layout"));
        let n = read_all_blobs(&src, &img, None);
        assert_eq!(
            n,
            img.layers.iter().map(|l| l.size).sum::<u64>() + {
                src.repository()
                    .blob_size(&img.config_digest)
                    .expect("size")
                    .expect("config present")
            }
        );
        if tag == "debian" {
            assert_eq!(recipe_of(&src, 512 << 10), recipe_of(&oci, 512 << 10));
        }
    }
}

/// One source reads its tag once: `resolve` after `resolve_manifest` (what
/// `smr pull` does) is the manifest read first, even if the tag moved
/// in between; a new source reads the tag again.
#[test]
fn a_source_reads_its_tag_once() {
    let Some(reg) = TestRegistry::start(None) else {
        return;
    };
    if !tools(&["skopeo"]) {
        return;
    }
    let t = tempfile::tempdir().expect("tempdir");
    let dir = t.path().join("layout");
    let mut layout = smr_testkit::OciLayout::new();
    for name in ["a", "b"] {
        let mut l = LayerBuilder::new();
        l.file("which", name.as_bytes(), 0o644);
        let mut img = ImageBuilder::new();
        img.layer(l.into_bytes(), smr_testkit::Compression::Gzip);
        let desc = layout.add_image(&img);
        layout.tag(desc, Some(name));
    }
    layout.write(&dir).expect("write layout");
    let reference = reg.docker_ref("smr/moving:v1");
    skopeo_push(&dir, "a", &reference, &[]);
    let src = RegistrySource::open(&reference, &fast_options()).expect("source");
    let (first, direct) = src
        .resolve_manifest(&Platform::default())
        .expect("manifest");
    assert!(direct);
    skopeo_push(&dir, "b", &reference, &[]);
    let img = src.resolve(&Platform::default()).expect("resolve");
    assert_eq!(img.manifest_digest, first);
    let again = RegistrySource::open(&reference, &fast_options()).expect("source");
    let moved = again.resolve(&Platform::default()).expect("resolve");
    assert_ne!(moved.manifest_digest, first);
}
