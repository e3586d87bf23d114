//! The `Blobs` implementation against distribution 2.8: blobs, ranges,
//! uploads, mounts, manifests, referrers, tags.

use super::util::*;
use smr_registry::client::{Registry, RegistryOptions};
use smr_registry::{Blobs, RegistryError};
use std::io::Read;

#[test]
fn blobs_ranges_and_uploads() {
    let Some(reg) = TestRegistry::start(None) else {
        return;
    };
    let repo = reg.repo("smr/blobs");
    assert_eq!(repo.describe(), format!("{}/smr/blobs", reg.addr));
    let data = random_bytes(3 << 20, 1);
    let d = digest(&data);

    assert_eq!(repo.blob_size(&d).expect("head"), None);
    match repo.get_blob(&d, LIMIT) {
        Err(RegistryError::NotFound { repo: r, what }) => {
            assert!(r.ends_with("smr/blobs"), "{r}");
            assert!(what.contains(&d), "{what}");
        }
        other => panic!("expected NotFound, got {other:?}"),
    }
    assert!(
        repo.push_blob(&d, &data).expect("push"),
        "first push uploads"
    );
    assert!(
        !repo.push_blob(&d, &data).expect("push again"),
        "second push is a no-op"
    );
    assert_eq!(repo.blob_size(&d).expect("head"), Some(data.len() as u64));
    assert!(repo.get_blob(&d, LIMIT).expect("get") == data);

    // Ranges.
    for (off, len) in [
        (0u64, 1u64),
        (0, 4096),
        (12345, 100_000),
        ((3 << 20) - 1, 1),
        (1 << 20, 2 << 20),
    ] {
        let got = repo.get_blob_range(&d, off, len).expect("range");
        assert!(
            got == data[off as usize..(off + len) as usize],
            "range {off}+{len}"
        );
    }
    assert!(repo.get_blob_range(&d, 5, 0).expect("empty").is_empty());
    let e = repo
        .get_blob_range(&d, (3 << 20) - 10, 100)
        .expect_err("past the end");
    assert!(matches!(e, RegistryError::Protocol { .. }), "{e}");

    // Streaming read.
    let mut r = repo.open_blob(&d).expect("open");
    let mut out = Vec::new();
    r.read_to_end(&mut out).expect("read");
    assert!(out == data);
    let missing = digest(b"missing");
    let e = repo.open_blob(&missing).expect_err("missing blob");
    assert!(matches!(e, RegistryError::NotFound { .. }), "{e}");

    // Wrong bytes for a digest are refused before upload.
    let e = repo
        .push_blob(&missing, b"other bytes")
        .expect_err("mismatch");
    assert!(matches!(e, RegistryError::DigestMismatch { .. }), "{e}");
    assert_eq!(repo.blob_size(&missing).expect("head"), None);
}

#[test]
fn chunked_uploads_and_cross_repo_mounts() {
    let Some(reg) = TestRegistry::start(None) else {
        return;
    };
    let opts = RegistryOptions {
        chunked_upload_threshold: 1 << 20,
        ..fast_options()
    };
    let registry = Registry::new(&reg.addr, &opts).expect("client");
    let a = registry.repository("smr/a").expect("repo a");
    let b = registry.repository("smr/b").expect("repo b");
    // 9 MiB: three PATCHes of at most 4 MiB.
    let big = random_bytes(9 << 20, 2);
    let d = digest(&big);
    assert!(a.push_blob(&d, &big).expect("chunked push"));
    assert!(a.get_blob(&d, LIMIT).expect("get") == big);

    // Mounted into b from a: nothing uploaded.
    assert_eq!(b.blob_size(&d).expect("head b"), None);
    assert!(!b.push_blob_from(&d, &big, Some("smr/a")).expect("mount"));
    assert_eq!(b.blob_size(&d).expect("head b"), Some(big.len() as u64));
    // A mount from a repository without the blob falls back to uploading.
    let small = random_bytes(1000, 3);
    let ds = digest(&small);
    assert!(!b.mount_blob(&ds, "smr/a").expect("mount refused"));
    assert!(b
        .push_blob_from(&ds, &small, Some("smr/a"))
        .expect("upload"));
}

#[test]
fn manifests_round_trip_tags_and_referrers() {
    let Some(reg) = TestRegistry::start(None) else {
        return;
    };
    let repo = reg.repo("smr/manifests");
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let cd = digest(config);
    repo.push_blob(&cd, config).expect("config");
    let mt = "application/vnd.oci.image.manifest.v1+json";
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"{mt}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{cd}","size":{}}},"layers":[]}}"#,
        config.len()
    );
    let md = repo
        .put_manifest("v1", mt, manifest.as_bytes())
        .expect("put");
    assert_eq!(md, digest(manifest.as_bytes()));
    for at in ["v1", md.as_str()] {
        let (got_mt, bytes) = repo.get_manifest(at).expect("get").expect("present");
        assert_eq!(got_mt, mt);
        assert_eq!(bytes, manifest.as_bytes(), "bytes as pushed ({at})");
    }
    assert_eq!(repo.get_manifest("nope").expect("get"), None);
    assert_eq!(
        reg.repo("smr/no-such-repo")
            .get_manifest("v1")
            .expect("get"),
        None
    );
    // Docker schema 2 too, and by digest.
    let dmt = "application/vnd.docker.distribution.manifest.v2+json";
    let dmanifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"{dmt}","config":{{"mediaType":"application/vnd.docker.container.image.v1+json","digest":"{cd}","size":{}}},"layers":[]}}"#,
        config.len()
    );
    let dd = digest(dmanifest.as_bytes());
    assert_eq!(
        repo.put_manifest(&dd, dmt, dmanifest.as_bytes())
            .expect("put by digest"),
        dd
    );
    repo.put_manifest("v2", dmt, dmanifest.as_bytes())
        .expect("tag it");
    let (got_mt, _) = repo.get_manifest(&dd).expect("get").expect("present");
    assert_eq!(got_mt, dmt);
    // A digest that does not match the bytes is refused.
    let e = repo
        .put_manifest(&md, dmt, dmanifest.as_bytes())
        .expect_err("mismatch");
    assert!(matches!(e, RegistryError::DigestMismatch { .. }), "{e}");

    assert_eq!(repo.list_tags().expect("tags"), ["v1", "v2"]);
    assert!(reg
        .repo("smr/no-such-repo")
        .list_tags()
        .expect("tags")
        .is_empty());

    // distribution 2.8 has no referrers API.
    assert_eq!(repo.referrers(&md).expect("referrers"), None);
}
