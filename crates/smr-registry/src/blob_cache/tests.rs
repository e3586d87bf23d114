use super::*;
use crate::testing::DirBlobs;

const MT: &str = "application/vnd.oci.image.manifest.v1+json";

fn setup() -> (tempfile::TempDir, DirBlobs) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let reg = tmp.path().join("reg");
    fs::create_dir_all(reg.join("blobs")).expect("mkdir");
    fs::create_dir_all(reg.join("manifests")).expect("mkdir");
    let inner = DirBlobs::new(&reg, true);
    (tmp, inner)
}

#[test]
fn digest_named_reads_are_served_from_the_cache_once_fetched() {
    let (tmp, inner) = setup();
    let blob = b"a recipe".to_vec();
    let d = digest_of(&blob);
    inner.push_blob(&d, &blob).expect("push");
    let m = br#"{"schemaVersion":2}"#.to_vec();
    let md = inner.put_manifest("v1", MT, &m).expect("put");
    let cache = CachedBlobs::new(&inner, tmp.path().join("cache"));
    assert_eq!(cache.get_blob(&d, 1 << 20).expect("get"), blob);
    assert_eq!(
        cache.get_manifest(&md).expect("get"),
        Some((MT.to_string(), m.clone()))
    );
    // Gone from the registry: still there for the next open.
    fs::remove_dir_all(tmp.path().join("reg/blobs")).expect("rm");
    fs::remove_file(tmp.path().join("reg/manifests").join(&md)).expect("rm");
    let again = CachedBlobs::new(&inner, tmp.path().join("cache"));
    assert_eq!(again.get_blob(&d, 1 << 20).expect("cached"), blob);
    assert_eq!(
        again.get_manifest(&md).expect("cached"),
        Some((MT.to_string(), m))
    );
    // ... but not past the caller's limit.
    assert!(again.get_blob(&d, 3).is_err());
}

#[test]
fn tags_and_referrers_always_go_to_the_registry() {
    let (tmp, inner) = setup();
    let cache = CachedBlobs::new(&inner, tmp.path().join("cache"));
    let v1 = br#"{"v":1}"#.to_vec();
    inner.put_manifest("latest", MT, &v1).expect("put");
    assert_eq!(
        cache.get_manifest("latest").expect("get").expect("some").1,
        v1
    );
    let v2 = br#"{"v":2}"#.to_vec();
    inner.put_manifest("latest", MT, &v2).expect("put");
    assert_eq!(
        cache.get_manifest("latest").expect("get").expect("some").1,
        v2,
        "a moved tag is seen at once"
    );
    // What the tag named was cached under its digest.
    let d1 = digest_of(&v1);
    fs::remove_file(tmp.path().join("reg/manifests").join(&d1)).expect("rm");
    assert_eq!(cache.get_manifest(&d1).expect("get").expect("cached").1, v1);
    assert_eq!(cache.get_manifest("missing").expect("get"), None);
}

#[test]
fn a_corrupt_entry_is_fetched_again_and_healed() {
    let (tmp, inner) = setup();
    let blob = b"a pack index".to_vec();
    let d = digest_of(&blob);
    inner.push_blob(&d, &blob).expect("push");
    let cache = CachedBlobs::new(&inner, tmp.path().join("cache"));
    cache.get_blob(&d, 1 << 20).expect("get");
    let entry = cache.path("blobs", &d).expect("path");
    fs::write(&entry, b"a pack indeX").expect("corrupt");
    assert_eq!(cache.get_blob(&d, 1 << 20).expect("refetched"), blob);
    assert_eq!(fs::read(&entry).expect("healed"), blob);
    // A corrupt entry and no registry copy: the registry's error, never
    // the bad bytes.
    fs::write(&entry, b"garbage").expect("corrupt");
    fs::remove_dir_all(tmp.path().join("reg/blobs")).expect("rm");
    fs::create_dir_all(tmp.path().join("reg/blobs")).expect("mkdir");
    let err = cache.get_blob(&d, 1 << 20).expect_err("not found");
    assert!(err.to_string().contains(&d), "{err}");
}

#[test]
fn only_well_formed_digests_name_files() {
    let (tmp, inner) = setup();
    let cache = CachedBlobs::new(&inner, tmp.path().join("cache"));
    for bad in [
        "sha256:../../etc/passwd",
        "sha256:ABCDEF",
        "md5:0123",
        &format!("sha256:{}/", "a".repeat(63)),
    ] {
        assert_eq!(cache.path("blobs", bad), None, "{bad}");
        assert!(cache.get_blob(bad, 10).is_err(), "{bad}");
    }
    assert!(!tmp.path().join("cache").exists(), "nothing written");
}

#[test]
fn the_least_recently_used_entries_go_past_the_limit() {
    let (tmp, inner) = setup();
    let cache = CachedBlobs::new(&inner, tmp.path().join("cache")).with_max_entries(3);
    let blobs: Vec<Vec<u8>> = (0..5).map(|i| format!("blob {i}").into_bytes()).collect();
    let t0 = SystemTime::now() - std::time::Duration::from_secs(100);
    for (i, b) in blobs.iter().enumerate() {
        let d = digest_of(b);
        inner.push_blob(&d, b).expect("push");
        cache.get_blob(&d, 1 << 20).expect("get");
        // Distinct, increasing ages whatever the clock's resolution.
        let f = fs::File::options()
            .append(true)
            .open(cache.path("blobs", &d).expect("path"))
            .expect("open");
        f.set_modified(t0 + std::time::Duration::from_secs(i as u64))
            .expect("mtime");
    }
    let kept: Vec<bool> = blobs
        .iter()
        .map(|b| cache.path("blobs", &digest_of(b)).expect("path").exists())
        .collect();
    // Each write evicts down to 3; the last write's own entry is the
    // newest and stays.
    assert_eq!(kept.iter().filter(|k| **k).count(), 3, "{kept:?}");
    assert!(kept[4] && !kept[0], "{kept:?}");
}
