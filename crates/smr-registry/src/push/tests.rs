use super::*;
use crate::discover::{discover, DiscoverOptions};
use crate::media_types::{SMR_ARTIFACT, SMR_PACK};
use crate::testing::{tags, test_image, DirBlobs, TestImage};
use smr_store::LocalStore;
use std::sync::Arc;

struct Env {
    _dir: tempfile::TempDir,
    blobs: Arc<DirBlobs>,
    store: LocalStore,
}

fn env(referrers_api: bool) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let blobs = Arc::new(DirBlobs::new(dir.path().join("registry"), referrers_api));
    let store = LocalStore::open(dir.path().join("store")).unwrap();
    Env {
        _dir: dir,
        blobs,
        store,
    }
}

fn opts(target: u32) -> PushOptions {
    PushOptions {
        pack: Some(PackParams::with_target(target)),
        ..PushOptions::default()
    }
}

/// 40 chunks with a zero chunk and a duplicate.
fn sample(e: &Env, name: &str) -> TestImage {
    let mut t = tags(&format!("{name}-"), 0..40);
    t[7] = None;
    t[20] = t[3].clone();
    test_image(&e.store, name, &t)
}

fn do_push(e: &Env, img: &TestImage, o: &PushOptions) -> Result<PushReport> {
    push(
        e.blobs.as_ref(),
        &img.subject,
        &img.recipe_bytes,
        &e.store,
        o,
    )
}

/// Every chunk of `img`, read through a registry store and opened.
fn check_served(e: &Env, img: &TestImage, artifact: &crate::discover::Artifact) {
    let store = artifact.store(e.blobs.clone(), smr_store::RemoteOptions::default());
    let keys = artifact.recipe.keys(Some(&img.owner)).unwrap().unwrap();
    for (pos, entry) in artifact.recipe.chunks.iter().enumerate() {
        let stored = store.get(&entry.id).unwrap();
        let plain =
            smr_format::chunk::open_chunk(&entry.id, keys.get(pos), false, stored, 64 << 10)
                .unwrap();
        assert_eq!(&plain, &img.plain[&entry.index], "chunk {}", entry.index);
    }
}

#[test]
fn push_discover_and_serve() {
    let e = env(false);
    let img = sample(&e, "a");
    let r = do_push(&e, &img, &opts(4)).unwrap();
    assert_eq!(r.chunks, 38); // 40 - zero chunk - duplicate
    assert_eq!(r.blobs_total, r.packs + 3);
    assert_eq!((r.blobs_uploaded, r.blobs_skipped), (r.blobs_total, 0));
    assert_eq!(r.referrers, Some(ReferrersUpdate::TagCreated));
    assert!(r.manifest_pushed);
    assert_eq!(e.blobs.blob_count() as u64, r.blobs_total);
    // The artifact manifest goes first, then the fallback tag.
    let puts = e.blobs.manifest_puts.lock().unwrap().clone();
    let tag = fallback_tag(&img.subject.digest).unwrap();
    assert_eq!(
        puts,
        vec![
            format!("{} {OCI_MANIFEST}", r.manifest_digest),
            format!("{tag} {OCI_INDEX}"),
        ]
    );

    let a = discover(
        e.blobs.as_ref(),
        &img.subject.digest,
        &DiscoverOptions::default(),
    )
    .unwrap();
    assert_eq!(a.digest, r.manifest_digest);
    assert_eq!(a.recipe_bytes, img.recipe_bytes);
    assert_eq!(a.manifest.artifact_type, SMR_ARTIFACT);
    assert_eq!(a.manifest.subject, Some(img.subject.clone()));
    assert_eq!(a.manifest.annotations[ANNOTATION_CHUNK_SIZE], "65536");
    assert_eq!(a.manifest.annotations[ANNOTATION_CHUNKING], "fixed");
    assert!(a.manifest.packs().iter().all(|p| p.media_type == SMR_PACK));
    check_served(&e, &img, &a);
}

#[test]
fn pushing_twice_uploads_nothing() {
    let e = env(false);
    let img = sample(&e, "a");
    let first = do_push(&e, &img, &opts(4)).unwrap();
    let uploads = e.blobs.uploads.load(Ordering::Relaxed);
    let second = do_push(&e, &img, &opts(4)).unwrap();
    assert_eq!(second.manifest_digest, first.manifest_digest);
    assert_eq!((second.blobs_uploaded, second.bytes_uploaded), (0, 0));
    assert_eq!(second.blobs_skipped, first.blobs_total);
    assert_eq!(second.bytes_skipped, first.bytes_uploaded);
    assert!(!second.manifest_pushed);
    assert_eq!(second.referrers, Some(ReferrersUpdate::TagUnchanged));
    assert_eq!(e.blobs.uploads.load(Ordering::Relaxed), uploads);
    assert_eq!(e.blobs.manifest_puts.lock().unwrap().len(), 2);
}

#[test]
fn the_manifest_is_a_pure_function_of_recipe_and_options() {
    let (e1, e2) = (env(false), env(true));
    let (i1, i2) = (sample(&e1, "a"), sample(&e2, "a"));
    assert_eq!(i1.recipe_bytes, i2.recipe_bytes);
    let o = PushOptions {
        threads: 1,
        ..opts(4)
    };
    let r1 = do_push(&e1, &i1, &o).unwrap();
    let r2 = do_push(&e2, &i2, &opts(4)).unwrap();
    assert_eq!(r1.manifest_digest, r2.manifest_digest);
    let r3 = do_push(&e2, &i2, &opts(8)).unwrap();
    assert_ne!(r3.manifest_digest, r1.manifest_digest);
}

#[test]
fn one_chunk_per_pack_names_each_pack_by_its_chunk() {
    let e = env(false);
    let img = sample(&e, "a");
    let r = do_push(&e, &img, &opts(1)).unwrap();
    assert_eq!(r.packs, 38);
    let a = discover(
        e.blobs.as_ref(),
        &img.subject.digest,
        &DiscoverOptions::default(),
    )
    .unwrap();
    for (layer, pack) in a.manifest.packs().iter().zip(a.index.packs()) {
        assert_eq!(layer.digest, format!("sha256:{}", pack.chunks[0].id));
    }
    check_served(&e, &img, &a);
}

#[test]
fn images_sharing_a_base_share_packs_in_the_registry() {
    let e = env(false);
    let base = tags("base-", 0..60);
    let a = test_image(&e.store, "a", &[base.clone(), tags("a-", 0..10)].concat());
    let b = test_image(&e.store, "b", &[base, tags("b-", 0..25)].concat());
    let ra = do_push(&e, &a, &opts(4)).unwrap();
    let rb = do_push(&e, &b, &opts(4)).unwrap();
    // Packs entirely inside the base are already there; only those at
    // the junction and after it are new (plus index, recipe).
    assert!(rb.blobs_skipped > 60 / 16, "{rb:?}");
    assert!(rb.bytes_skipped >= (60 - 16) * (64 << 10), "{rb:?}");
    assert!(rb.bytes_uploaded < ra.bytes_uploaded, "{ra:?} {rb:?}");
}

#[test]
fn the_referrers_api_needs_no_fallback_tag() {
    let e = env(true);
    let img = sample(&e, "a");
    let r = do_push(&e, &img, &opts(4)).unwrap();
    assert_eq!(r.referrers, Some(ReferrersUpdate::Api));
    let tag = fallback_tag(&img.subject.digest).unwrap();
    assert!(e.blobs.get_manifest(&tag).unwrap().is_none());
    let a = discover(
        e.blobs.as_ref(),
        &img.subject.digest,
        &DiscoverOptions::default(),
    )
    .unwrap();
    assert_eq!(a.digest, r.manifest_digest);
}

#[test]
fn the_fallback_tag_keeps_other_entries_sorted() {
    let e = env(false);
    let img = sample(&e, "a");
    let tag = fallback_tag(&img.subject.digest).unwrap();
    let foreign = serde_json::json!({
        "mediaType": OCI_MANIFEST,
        "digest": digest_of(b"a signature"),
        "size": 11,
        "artifactType": "application/vnd.dev.cosign.artifact.sig.v1+json",
        "annotations": {"x": "y"},
        "extra": [1, 2],
    });
    let doc =
        serde_json::json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [foreign]});
    e.blobs
        .put_manifest(&tag, OCI_INDEX, &serde_json::to_vec(&doc).unwrap())
        .unwrap();

    let r4 = do_push(&e, &img, &opts(4)).unwrap();
    assert_eq!(r4.referrers, Some(ReferrersUpdate::TagUpdated));
    let r1 = do_push(&e, &img, &opts(1)).unwrap();
    assert_eq!(r1.referrers, Some(ReferrersUpdate::TagUpdated));

    let (_, bytes) = e.blobs.get_manifest(&tag).unwrap().unwrap();
    let doc: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    let list = doc["manifests"].as_array().unwrap();
    assert_eq!(list.len(), 3);
    assert!(list.contains(&foreign), "{doc}");
    let digests: Vec<&str> = list.iter().map(|m| m["digest"].as_str().unwrap()).collect();
    let mut sorted = digests.clone();
    sorted.sort_unstable();
    assert_eq!(digests, sorted);
    // Both artifacts are listed; discovery picks the smaller digest.
    let found = crate::discover::list_artifacts(e.blobs.as_ref(), &img.subject.digest).unwrap();
    assert_eq!(found.len(), 2);
    let a = discover(
        e.blobs.as_ref(),
        &img.subject.digest,
        &DiscoverOptions::default(),
    )
    .unwrap();
    assert_eq!(
        a.digest,
        r1.manifest_digest.clone().min(r4.manifest_digest.clone())
    );
}

#[test]
fn a_subject_that_is_not_the_recipes_source_is_refused() {
    let e = env(false);
    let img = sample(&e, "a");
    let other = Descriptor::of(OCI_MANIFEST, b"another manifest");
    let err = push(
        e.blobs.as_ref(),
        &other,
        &img.recipe_bytes,
        &e.store,
        &opts(4),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("was converted from") && err.contains(&img.subject.digest),
        "{err}"
    );
    assert_eq!(e.blobs.blob_count(), 0);
}

#[test]
fn a_missing_or_corrupt_chunk_fails_before_any_manifest() {
    let e = env(false);
    let img = sample(&e, "a");
    let recipe = Recipe::decode(&img.recipe_bytes).unwrap();
    let victim = recipe.chunks[25].id;

    std::fs::write(e.store.chunk_path(&victim), b"rotten").unwrap();
    let err = do_push(&e, &img, &opts(4)).unwrap_err().to_string();
    assert!(
        err.contains(&victim.to_hex()) && err.contains("hash mismatch"),
        "{err}"
    );

    std::fs::remove_file(e.store.chunk_path(&victim)).unwrap();
    let err = do_push(&e, &img, &opts(4)).unwrap_err().to_string();
    assert!(
        err.contains(&victim.to_hex()) && err.contains("missing"),
        "{err}"
    );
    assert!(e.blobs.manifest_puts.lock().unwrap().is_empty());
}

#[test]
fn an_empty_image_pushes_an_artifact_without_packs() {
    let e = env(false);
    let img = test_image(&e.store, "empty", &[None, None]);
    let r = do_push(&e, &img, &PushOptions::default()).unwrap();
    assert_eq!((r.packs, r.chunks, r.blobs_total), (0, 0, 3));
    let a = discover(
        e.blobs.as_ref(),
        &img.subject.digest,
        &DiscoverOptions::default(),
    )
    .unwrap();
    assert!(a.manifest.packs().is_empty());
}

#[test]
fn an_image_without_a_source_is_pushed_by_tag_and_reuses_known_packs() {
    let e = env(false);
    let base = sample(&e, "base");
    do_push(&e, &base, &opts(4)).unwrap();
    let base_artifact =
        discover(e.blobs.as_ref(), &base.subject.digest, &Default::default()).unwrap();
    // The committed image: the base with chunk 30 rewritten; only that
    // chunk is in the local store, the rest is read from the registry
    // (as `smr commit --push` does) only when a pack has to be built.
    let mut t = tags("base-", 0..40);
    t[7] = None;
    t[20] = t[3].clone();
    t[30] = Some("rewritten".into());
    let d = tempfile::tempdir().unwrap();
    let all = LocalStore::open(d.path().join("all")).unwrap();
    let v2 = test_image(&all, "v2", &t);
    let only_new = LocalStore::open(d.path().join("new")).unwrap();
    let recipe = Recipe::decode(&v2.recipe_bytes).unwrap();
    let new = recipe.chunks.iter().find(|c| c.index == 30).unwrap();
    only_new.put(&new.id, &all.get(&new.id).unwrap()).unwrap();

    let o = PushOptions {
        tag: Some("v2".into()),
        known_packs: base_artifact.index.packs().to_vec(),
        ..opts(4)
    };
    let from_registry = Arc::new(base_artifact.store(e.blobs.clone(), Default::default()));
    let store = smr_store::Layered::new(Arc::new(only_new), from_registry);
    let untagged = PushOptions {
        tag: None,
        ..o.clone()
    };
    let err = push_image(e.blobs.as_ref(), &v2.recipe_bytes, &store, &untagged).unwrap_err();
    assert!(err.to_string().contains("tag"), "{err}");

    let count = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    let (uploads, ranges) = (count(&e.blobs.uploads), count(&e.blobs.range_requests));
    let r = push_image(e.blobs.as_ref(), &v2.recipe_bytes, &store, &o).unwrap();
    assert_eq!(r.referrers, None);
    // Only the packs whose chunks changed were built: their unchanged
    // chunks were read, no other pack was.
    let (uploaded, read) = (
        count(&e.blobs.uploads) - uploads,
        count(&e.blobs.range_requests) - ranges,
    );
    let rebuilt = uploaded - 2; // the pack index and the recipe
    assert!((1..=3).contains(&rebuilt), "{uploaded} uploads: {r:?}");
    assert!(
        read < 4 * 3 * rebuilt,
        "{read} chunks read for {rebuilt} packs"
    );
    assert_eq!(r.blobs_skipped + uploaded, r.blobs_total, "{r:?}");

    let (_, tagged) = e.blobs.get_manifest("v2").unwrap().unwrap();
    assert_eq!(digest_of(&tagged), r.manifest_digest);
    let accept_all: crate::discover::Accept<'_> = &|_| Ok(());
    let a = crate::discover::open_image(
        e.blobs.as_ref(),
        &r.manifest_digest,
        &Default::default(),
        accept_all,
    )
    .unwrap();
    assert!(a.is_image() && a.manifest.subject.is_none());
    check_served(&e, &v2, &a);
    // Nothing lists it as a referrer of the base.
    let listed = crate::discover::list_artifacts(e.blobs.as_ref(), &base.subject.digest).unwrap();
    assert_eq!(listed.len(), 1);
    // The base's artifact is not an image of its own, and a policy's
    // refusal is an error naming the image.
    let err = crate::discover::open_image(
        e.blobs.as_ref(),
        &base_artifact.digest,
        &Default::default(),
        accept_all,
    )
    .unwrap_err();
    assert!(err.to_string().contains("name the source image"), "{err}");
    let refuse: crate::discover::Accept<'_> = &|_| Err("not signed".into());
    let err = crate::discover::open_image(
        e.blobs.as_ref(),
        &r.manifest_digest,
        &Default::default(),
        refuse,
    )
    .unwrap_err();
    assert!(err.to_string().contains("not signed"), "{err}");
}
