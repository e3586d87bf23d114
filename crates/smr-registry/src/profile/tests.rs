use super::*;
use crate::discover::{discover, DiscoverOptions};
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
    Profile {
        recipe_sha256: Profile::recipe_hash(&a.recipe_bytes),
        chunks,
    }
}

#[test]
fn a_pushed_profile_is_found_with_its_artifact() {
    for api in [false, true] {
        let (_d, blobs, img, artifact) = pushed(api);
        let none = discover(&blobs, &img.subject.digest, &with_profile()).unwrap();
        assert!(none.profile.is_none(), "no profile pushed yet");
        let p = profile_of(&artifact, vec![3, 0, 1]);
        let r = push_profile(&blobs, &artifact, &p).unwrap();
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
        push_profile(&blobs, &artifact, &p).unwrap();
        assert_eq!(
            discover(&blobs, &img.subject.digest, &with_profile())
                .unwrap()
                .profile,
            Some(p)
        );
    }
}

#[test]
fn a_profile_of_another_recipe_is_refused() {
    let (_d, blobs, _img, artifact) = pushed(false);
    let wrong = Profile {
        recipe_sha256: [0; 32],
        chunks: vec![1],
    };
    let e = push_profile(&blobs, &artifact, &wrong)
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
    let r = push_profile(&blobs, &artifact, &profile_of(&artifact, vec![2])).unwrap();
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
    push_profile(&blobs, &artifact, &profile_of(&artifact, vec![3, 0, 1])).unwrap();
    let newer = profile_of(&artifact, vec![1]);
    push_profile(&blobs, &artifact, &newer).unwrap();
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
