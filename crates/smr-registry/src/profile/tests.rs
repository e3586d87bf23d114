use super::*;
use crate::discover::{discover, DiscoverOptions, ProfileListing};
use crate::push::{push, PushOptions};
use crate::testing::{tags, test_image, DirBlobs, TestImage};
use smr_store::LocalStore;

fn pushed(referrers_api: bool) -> (tempfile::TempDir, DirBlobs, TestImage, Artifact) {
    let dir = tempfile::tempdir().unwrap();
    let blobs = DirBlobs::new(dir.path().join("registry"), referrers_api);
    let store = LocalStore::open(dir.path().join("store")).unwrap();
    let img = test_image(&store, "app", &tags("app-", 0..20));
    let opts = PushOptions::default();
    push(&blobs, &img.subject, &img.recipe_bytes, &store, &opts).unwrap();
    let artifact = discover(&blobs, &img.subject.digest, &DiscoverOptions::default()).unwrap();
    assert!(artifact.profile.is_none(), "not asked for");
    (dir, blobs, img, artifact)
}

fn with_profile() -> DiscoverOptions {
    DiscoverOptions {
        profile: true,
        ..DiscoverOptions::default()
    }
}

fn profile_of(a: &Artifact, chunks: Vec<u64>) -> Profile {
    Profile::new(Profile::recipe_hash(&a.recipe_bytes), chunks)
}

#[test]
fn a_pushed_profile_is_found_with_its_artifact() {
    for api in [false, true] {
        let (_d, blobs, img, artifact) = pushed(api);
        let none = discover(&blobs, &img.subject.digest, &with_profile()).unwrap();
        assert!(none.profile.is_none(), "no profile pushed yet");
        let p = profile_of(&artifact, vec![3, 0, 1]);
        let r = push_profile(&blobs, &artifact, &p, None).unwrap();
        assert_eq!(r.chunks, 3);
        let found = discover(&blobs, &img.subject.digest, &with_profile()).unwrap();
        assert_eq!(
            found.digest, artifact.digest,
            "the profile is not taken for an artifact"
        );
        assert_eq!(found.profile.as_ref(), Some(&p));
        // Pinned artifact (as `smr mount` passes it on): found as well.
        let pinned = DiscoverOptions {
            artifact: Some(artifact.digest.clone()),
            profile: true,
            ..DiscoverOptions::default()
        };
        assert_eq!(
            discover(&blobs, &img.subject.digest, &pinned)
                .unwrap()
                .profile,
            Some(p.clone())
        );
        // Pushing the same profile again changes nothing a reader sees.
        push_profile(&blobs, &artifact, &p, None).unwrap();
        assert_eq!(
            discover(&blobs, &img.subject.digest, &with_profile())
                .unwrap()
                .profile,
            Some(p)
        );
    }
}

#[test]
fn a_listed_profile_opens_again_without_listing_the_referrers() {
    use std::sync::atomic::Ordering::Relaxed;
    let (_d, blobs, img, artifact) = pushed(true);
    let subject = &img.subject.digest;
    let plain = DiscoverOptions::default();
    assert_eq!(
        discover(&blobs, subject, &plain).unwrap().profile_listing,
        ProfileListing::NoProfile
    );
    let p = profile_of(&artifact, vec![2, 0]);
    push_profile(&blobs, &artifact, &p, None).unwrap();
    // Listed (as `smr mount` looks the image up), not fetched.
    let found = discover(&blobs, subject, &plain).unwrap();
    assert!(found.profile.is_none(), "not asked for");
    let ProfileListing::Manifest(manifest) = found.profile_listing.clone() else {
        panic!("the listing names the profile: {:?}", found.profile_listing);
    };
    // What the image server is handed: artifact and profile, no listing.
    let lists = blobs.referrer_lists.load(Relaxed);
    let handed = DiscoverOptions {
        artifact: Some(found.digest.clone()),
        profile: true,
        profile_manifest: Some(manifest),
        ..DiscoverOptions::default()
    };
    let again = discover(&blobs, subject, &handed).unwrap();
    assert_eq!(again.profile, Some(p));
    assert_eq!(blobs.referrer_lists.load(Relaxed), lists, "listed again");
    assert_eq!(again.profile_listing, ProfileListing::NotListed);
    // A profile manifest that is not one (here: the artifact itself) is
    // logged and left out; the artifact still opens.
    let wrong = DiscoverOptions {
        profile_manifest: Some(found.digest.clone()),
        ..handed
    };
    let a = discover(&blobs, subject, &wrong).unwrap();
    assert_eq!(a.digest, found.digest);
    assert!(a.profile.is_none());
}

#[test]
fn a_startup_pack_is_pushed_with_its_profile_and_served_by_the_store() {
    use smr_format::startup::{BlockRun, PackSecret};
    use smr_store::ChunkStore;
    let (d, blobs, img, artifact) = pushed(true);
    let mut p = profile_of(&artifact, vec![0, 1]);
    p.blocks = vec![BlockRun {
        first: 3,
        count: 70,
    }];
    let secret = PackSecret::of_keys(&[smr_format::ChunkKey([5; 32])]);
    let plain: Vec<u8> = (0..70 * 4096u32).map(|i| (i / 4096) as u8).collect();
    let blob = p.seal_pack(&secret, &plain, 64);
    let e = push_profile(&blobs, &artifact, &p, Some(b"another blob"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("does not match"), "{e}");
    let r = push_profile(&blobs, &artifact, &p, Some(&blob)).unwrap();
    assert_eq!(r.pack_bytes, Some(blob.len() as u64));
    // Its referrers entry names the pack, for a lookup to start reading it.
    let named =
        |key: &str| r.descriptor.annotations[&format!("{ANNOTATION_PROFILE_PACK}.{key}")].clone();
    assert_eq!(named("digest"), digest_of(&blob));
    assert_eq!(named("size"), blob.len().to_string());
    let found = discover(&blobs, &img.subject.digest, &with_profile()).unwrap();
    assert_eq!(found.profile.as_ref(), Some(&p));
    // The artifact's store reads the pack's chunks from the pack blob.
    let store = found.store(
        std::sync::Arc::new(DirBlobs::new(d.path().join("registry"), true)),
        Default::default(),
    );
    let pack = p.pack.as_ref().unwrap();
    let (offsets, _) = pack.offsets();
    for (c, at) in pack.chunks.iter().zip(offsets) {
        let got = store.get(&c.id).unwrap();
        assert_eq!(got, blob[at as usize..at as usize + c.stored_len as usize]);
    }
    assert!(
        store.get(&artifact.recipe.chunks[0].id).is_ok(),
        "image chunks too"
    );
}

#[test]
fn a_profile_of_another_recipe_is_refused() {
    let (_d, blobs, _img, artifact) = pushed(false);
    let wrong = Profile::new([0; 32], vec![1]);
    let e = push_profile(&blobs, &artifact, &wrong, None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("not this one") && e.contains(&artifact.digest),
        "{e}"
    );
}

#[test]
fn a_corrupted_profile_is_left_out_and_the_image_still_opens() {
    let (_d, blobs, img, artifact) = pushed(false);
    let r = push_profile(&blobs, &artifact, &profile_of(&artifact, vec![2]), None).unwrap();
    blobs.corrupt(&r.profile_digest, b"SMRPROF1 garbage");
    let found = discover(&blobs, &img.subject.digest, &with_profile()).unwrap();
    assert_eq!(found.digest, artifact.digest);
    assert!(found.profile.is_none());
    let e = fetch_profile(&blobs, &r.manifest_digest, &artifact.digest).unwrap_err();
    assert!(e.to_string().contains(&r.profile_digest), "{e}");
    let e = fetch_profile(&blobs, &r.manifest_digest, "sha256:other").unwrap_err();
    assert!(e.to_string().contains("not sha256:other"), "{e}");
    let e = fetch_profile(&blobs, &artifact.digest, &artifact.digest).unwrap_err();
    assert!(e.to_string().contains("not an smr profile"), "{e}");
}

#[test]
fn the_newest_profile_of_the_artifact_wins() {
    let d = |digest: &str, artifact: &str, created: &str| Descriptor {
        artifact_type: Some(SMR_PROFILE.into()),
        annotations: BTreeMap::from([
            (ANNOTATION_PROFILE_ARTIFACT.into(), artifact.into()),
            (ANNOTATION_CREATED.into(), created.into()),
        ]),
        ..Descriptor::new(OCI_MANIFEST, digest.into(), 10)
    };
    let list = vec![
        d("sha256:b", "sha256:a1", "2026-01-01T00:00:00Z"),
        d("sha256:c", "sha256:a1", "2026-03-01T00:00:00Z"),
        d("sha256:a", "sha256:a1", "2026-03-01T00:00:00Z"),
        d("sha256:d", "sha256:a2", "2027-01-01T00:00:00Z"),
        Descriptor::new(OCI_MANIFEST, "sha256:e".into(), 1),
    ];
    let got: Vec<String> = profiles_of(&list, "sha256:a1")
        .into_iter()
        .map(|d| d.digest)
        .collect();
    assert_eq!(got, ["sha256:a", "sha256:c", "sha256:b"]);
}

#[test]
fn in_the_fallback_tag_a_new_profile_replaces_the_older_one() {
    let (_d, blobs, img, artifact) = pushed(false);
    push_profile(
        &blobs,
        &artifact,
        &profile_of(&artifact, vec![3, 0, 1]),
        None,
    )
    .unwrap();
    let newer = profile_of(&artifact, vec![1]);
    push_profile(&blobs, &artifact, &newer, None).unwrap();
    let listed = crate::discover::list_referrers(&blobs, &img.subject.digest).unwrap();
    let kinds: Vec<&str> = listed
        .iter()
        .filter_map(|d| d.artifact_type.as_deref())
        .collect();
    assert_eq!(
        kinds.iter().filter(|k| **k == SMR_PROFILE).count(),
        1,
        "{kinds:?}"
    );
    assert!(
        kinds.contains(&crate::media_types::SMR_ARTIFACT),
        "the smr artifact stays"
    );
    let found = discover(&blobs, &img.subject.digest, &with_profile()).unwrap();
    assert_eq!(found.profile, Some(newer));
}

#[test]
fn the_profile_blob_is_named_by_its_manifest_and_fetched_once() {
    let (_d, blobs, img, artifact) = pushed(false);
    let p = profile_of(&artifact, vec![3, 0, 1]);
    let r = push_profile(&blobs, &artifact, &p, None).unwrap();
    let (_, bytes) = blobs.get_manifest(&r.manifest_digest).unwrap().unwrap();
    let m: ArtifactManifest = serde_json::from_slice(&bytes).unwrap();
    let layer = m.layers[0].clone();
    let named = |key: &str| m.annotations[&format!("{ANNOTATION_PROFILE_BLOB}.{key}")].clone();
    assert_eq!(
        (named("digest"), named("size")),
        (layer.digest.clone(), layer.size.to_string())
    );
    blobs.blob_gets.lock().unwrap().clear();
    let found = discover(&blobs, &img.subject.digest, &with_profile()).unwrap();
    assert_eq!(found.profile.as_ref(), Some(&p));
    let gets = blobs.blob_gets.lock().unwrap();
    let times = gets.iter().filter(|g| **g == layer.digest).count();
    assert_eq!(times, 1, "fetched beside its manifest, not again: {gets:?}");
}
