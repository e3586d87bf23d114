use super::*;
use crate::artifact::fallback_tag;
use crate::pack::PackParams;
use crate::push::{push, PushOptions};
use crate::testing::{tags, test_image, DirBlobs, TestImage};
use smr_image::media_types::OCI_INDEX;
use smr_store::LocalStore;
use std::sync::atomic::Ordering;

struct Env {
    _dir: tempfile::TempDir,
    blobs: DirBlobs,
    img: TestImage,
    artifact: String,
}

/// One image pushed with 4 chunks per pack.
fn pushed() -> Env {
    let dir = tempfile::tempdir().unwrap();
    let blobs = DirBlobs::new(dir.path().join("registry"), false);
    let store = LocalStore::open(dir.path().join("store")).unwrap();
    let img = test_image(&store, "a", &tags("a-", 0..12));
    let o = PushOptions {
        pack: Some(PackParams::with_target(4)),
        ..PushOptions::default()
    };
    let artifact = push(&blobs, &img.subject, &img.recipe_bytes, &store, &o)
        .unwrap()
        .manifest_digest;
    Env {
        _dir: dir,
        blobs,
        img,
        artifact,
    }
}

fn manifest(e: &Env) -> ArtifactManifest {
    let (_, bytes) = e.blobs.get_manifest(&e.artifact).unwrap().unwrap();
    ArtifactManifest::parse("r", &e.artifact, &bytes).unwrap()
}

#[test]
fn nothing_to_find_is_not_found() {
    let e = pushed();
    let other = digest_of(b"some other image");
    let err = discover(&e.blobs, &other, &DiscoverOptions::default()).unwrap_err();
    assert!(matches!(err, RegistryError::NotFound { .. }), "{err}");
    assert!(
        err.to_string()
            .contains(&format!("smr artifact for {other}")),
        "{err}"
    );
    let err = discover(&e.blobs, "latest", &DiscoverOptions::default()).unwrap_err();
    assert!(err.to_string().contains("not a sha256 digest"), "{err}");
}

#[test]
fn options_select_by_digest_and_chunk_size() {
    let e = pushed();
    let s = &e.img.subject.digest;
    let by_digest = DiscoverOptions {
        artifact: Some(e.artifact.clone()),
        ..DiscoverOptions::default()
    };
    assert_eq!(
        discover(&e.blobs, s, &by_digest).unwrap().digest,
        e.artifact
    );
    let size = |c| DiscoverOptions {
        chunk_size: Some(c),
        ..DiscoverOptions::default()
    };
    assert_eq!(
        discover(&e.blobs, s, &size(64 << 10)).unwrap().digest,
        e.artifact
    );
    let err = discover(&e.blobs, s, &size(512 << 10))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("chunk size 524288") && err.contains("1 others"),
        "{err}"
    );
    // An artifact of another subject is refused.
    let other = digest_of(b"other");
    let err = open_artifact(&e.blobs, &e.artifact, Some(&other))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!("not {other}")) && err.contains(&e.artifact),
        "{err}"
    );
}

#[test]
fn a_corrupt_recipe_or_index_blob_is_refused() {
    let e = pushed();
    let m = manifest(&e);
    let recipe = m.recipe().unwrap().digest.clone();
    e.blobs.corrupt(&recipe, b"junk");
    let err = open_artifact(&e.blobs, &e.artifact, None).unwrap_err();
    assert!(matches!(err, RegistryError::DigestMismatch { .. }), "{err}");
    assert!(err.to_string().contains(&recipe), "{err}");

    let e = pushed();
    let index = manifest(&e).pack_index().unwrap().digest.clone();
    e.blobs.corrupt(&index, b"junk");
    let err = open_artifact(&e.blobs, &e.artifact, None).unwrap_err();
    assert!(err.to_string().contains(&index), "{err}");
}

/// Pushes `m` (edited) as a new manifest; returns its digest.
fn repush(e: &Env, m: &ArtifactManifest) -> String {
    e.blobs
        .put_manifest("edited", OCI_MANIFEST, &m.to_bytes())
        .unwrap()
}

#[test]
fn manifests_that_disagree_with_their_index_or_recipe_are_refused() {
    let e = pushed();
    let mut m = manifest(&e);
    m.layers.pop();
    let d = repush(&e, &m);
    let err = open_artifact(&e.blobs, &d, None).unwrap_err().to_string();
    assert!(
        err.contains("pack layers, but the pack index lists"),
        "{err}"
    );

    let mut m = manifest(&e);
    m.layers[2].size += 1;
    let d = repush(&e, &m);
    let err = open_artifact(&e.blobs, &d, None).unwrap_err().to_string();
    assert!(err.contains("pack layer 0 is"), "{err}");

    // A recipe converted from another image, under this subject.
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::open(dir.path()).unwrap();
    let other = test_image(&store, "b", &tags("a-", 0..12));
    e.blobs
        .push_blob(&digest_of(&other.recipe_bytes), &other.recipe_bytes)
        .unwrap();
    let mut m = manifest(&e);
    m.layers[0] = Descriptor::of(crate::media_types::SMR_RECIPE, &other.recipe_bytes);
    let d = repush(&e, &m);
    let err = open_artifact(&e.blobs, &d, None).unwrap_err().to_string();
    assert!(err.contains("recipe was converted from"), "{err}");
}

#[test]
fn a_fallback_tag_that_is_not_an_index_is_an_error() {
    let e = pushed();
    let subject = digest_of(b"x");
    let tag = fallback_tag(&subject).unwrap();
    e.blobs
        .put_manifest(&tag, OCI_INDEX, br#"{"schemaVersion":2,"layers":[]}"#)
        .unwrap();
    let err = discover(&e.blobs, &subject, &DiscoverOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&tag) && err.contains("not an image index"),
        "{err}"
    );
}

/// Of two artifacts of one image, the policy's choice is used whatever its
/// digest; with every candidate refused, the error names each and why.
#[test]
fn a_refused_artifact_is_skipped_whatever_its_digest() {
    let e = pushed();
    let store = LocalStore::open(e._dir.path().join("store")).unwrap();
    let o = PushOptions {
        pack: Some(PackParams::with_target(2)),
        ..PushOptions::default()
    };
    let second = push(&e.blobs, &e.img.subject, &e.img.recipe_bytes, &store, &o)
        .unwrap()
        .manifest_digest;
    assert_ne!(second, e.artifact);
    let s = &e.img.subject.digest;
    let opts = DiscoverOptions::default();
    for trusted in [&e.artifact, &second] {
        let only = |a: &Artifact| {
            (&a.digest == trusted)
                .then_some(())
                .ok_or_else(|| "not the trusted one".to_string())
        };
        let got = discover_trusted(&e.blobs, s, &opts, &only).unwrap();
        assert_eq!(&got.digest, trusted);
    }
    let err =
        discover_trusted(&e.blobs, s, &opts, &|_| Err("signed by nobody".into())).unwrap_err();
    assert!(
        matches!(err, RegistryError::NoTrustedArtifact { .. }),
        "{err}"
    );
    let text = err.to_string();
    assert!(
        text.contains(&e.artifact) && text.contains(&second) && text.contains("signed by nobody"),
        "{text}"
    );
}

#[test]
fn referrers_come_from_the_api_when_it_lists_the_type_else_from_the_tag() {
    let mut e = pushed();
    let subject = e.img.subject.digest.clone();
    let digests = |v: Vec<Descriptor>| v.into_iter().map(|d| d.digest).collect::<Vec<_>>();
    let asked = || e.blobs.referrer_lists.load(Ordering::Relaxed);
    let before = asked();
    // No API (distribution 2.8): the tag, the API asked all the same.
    let found = list_referrers(&e.blobs, &subject).unwrap();
    assert_eq!(digests(found), vec![e.artifact.clone()]);
    assert_eq!(asked(), before + 1);
    // With the API, a stale tag is not what counts.
    e.blobs.referrers_api = true;
    let tag = fallback_tag(&subject).unwrap();
    let empty = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}"#;
    e.blobs.put_manifest(&tag, OCI_INDEX, empty).unwrap();
    let found = list_referrers(&e.blobs, &subject).unwrap();
    assert_eq!(digests(found), vec![e.artifact.clone()]);
    // An API answer without the type asked for: the tag's list.
    let found = list_referrers_of(&e.blobs, &subject, "application/x-other").unwrap();
    assert!(found.is_empty(), "{found:?}");
    let asked = e.blobs.referrer_lists.load(Ordering::Relaxed);
    assert_eq!(asked, before + 3);
}

/// How often each of `digests` was fetched since the last call.
fn fetched(e: &Env, digests: &[&str]) -> Vec<usize> {
    let gets = std::mem::take(&mut *e.blobs.blob_gets.lock().unwrap());
    digests
        .iter()
        .map(|d| gets.iter().filter(|g| g == d).count())
        .collect()
}

#[test]
fn blobs_the_referrers_entry_names_are_fetched_once_beside_the_manifest() {
    let e = pushed();
    let m = manifest(&e);
    let (recipe, index) = (m.recipe().unwrap().clone(), m.pack_index().unwrap().clone());
    let subject = e.img.subject.digest.clone();
    // The push names them in the manifest's annotations, which the
    // fallback tag's entry carries.
    let entry = list_referrers(&e.blobs, &subject).unwrap().remove(0);
    let named = |prefix, media_type| early::named(&entry, prefix, media_type);
    assert_eq!(named(ANNOTATION_RECIPE, SMR_RECIPE), Some(recipe.clone()));
    assert_eq!(
        named(ANNOTATION_PACK_INDEX, SMR_PACK_INDEX),
        Some(index.clone())
    );
    let both = [recipe.digest.as_str(), index.digest.as_str()];
    fetched(&e, &both);
    let opts = DiscoverOptions::default();
    assert_eq!(
        discover(&e.blobs, &subject, &opts).unwrap().digest,
        e.artifact
    );
    assert_eq!(
        fetched(&e, &both),
        vec![1, 1],
        "each once, not again after the manifest"
    );

    // An entry that names another blob as the recipe, and garbage as the
    // index: one wasted fetch; the manifest's blobs are what is used.
    let tag = fallback_tag(&subject).unwrap();
    let (_, bytes) = e.blobs.get_manifest(&tag).unwrap().unwrap();
    let mut listing: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    let a = &mut listing["manifests"][0]["annotations"];
    a["vnd.smr.recipe.digest"] = index.digest.clone().into();
    a["vnd.smr.recipe.size"] = index.size.to_string().into();
    a["vnd.smr.pack-index.digest"] = "sha256:not-a-digest".into();
    let edited = serde_json::to_vec(&listing).unwrap();
    e.blobs.put_manifest(&tag, OCI_INDEX, &edited).unwrap();
    let a = discover(&e.blobs, &subject, &opts).unwrap();
    assert_eq!(a.digest, e.artifact);
    assert_eq!(a.recipe_bytes, e.img.recipe_bytes);
    assert_eq!(fetched(&e, &both), vec![1, 2]);
}

#[test]
fn only_a_sha256_digest_and_a_size_within_the_limit_name_a_blob() {
    let at = |digest: &str, size: &str| {
        let mut d = Descriptor::new(SMR_ARTIFACT, digest_of(b"m"), 1);
        d.annotations = [("p.digest", digest), ("p.size", size)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        early::named(&d, "p", SMR_RECIPE)
    };
    let good = digest_of(b"blob");
    assert_eq!(
        at(&good, "4"),
        Some(Descriptor::new(SMR_RECIPE, good.clone(), 4))
    );
    assert_eq!(at("sha512:00", "4"), None);
    assert_eq!(at(&good.to_uppercase(), "4"), None);
    assert_eq!(at(&good, "-1"), None);
    assert_eq!(at(&good, &(ARTIFACT_BLOB_LIMIT + 1).to_string()), None);
    let mut d = Descriptor::new(SMR_ARTIFACT, digest_of(b"m"), 1);
    d.annotations.insert("p.digest".into(), good);
    assert_eq!(early::named(&d, "p", SMR_RECIPE), None, "no size");
}
