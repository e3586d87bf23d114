//! The smr artifact against a real registry (Debian's docker-registry,
//! distribution 2.8, started by `scripts/registry.sh`): push a source image,
//! convert it, push the artifact, find it again from a fresh client through
//! the referrers tag fallback, and rebuild the image through the ranged,
//! coalescing registry store.

#![allow(clippy::unwrap_used)]

use smr_convert::{convert, ConvertOptions};
use smr_format::chunk::open_chunk;
use smr_format::{ChunkCodec, OwnerKey};
use smr_image::media_types::{OCI_INDEX, OCI_MANIFEST};
use smr_image::source::{open_source, Platform};
use smr_registry::artifact::{fallback_tag, Descriptor};
use smr_registry::client::{Registry, RegistryOptions, Repository};
use smr_registry::discover::{discover, list_artifacts, DiscoverOptions};
use smr_registry::pack::PackParams;
use smr_registry::push::{push, PushOptions, PushReport, ReferrersUpdate};
use smr_registry::Blobs;
use smr_store::{ChunkStore, LocalStore};
use smr_testkit::{Compression, ImageBuilder, LayerBuilder, OciLayout};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// A throwaway registry, stopped on drop.
struct TestRegistry {
    dir: tempfile::TempDir,
    addr: String,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/registry.sh")
}

impl TestRegistry {
    /// Starts one, or returns `None` (after saying so) when docker-registry
    /// is not installed, unless SMR_REQUIRE_IMAGES is set (CI).
    fn start() -> Option<TestRegistry> {
        if !smr_testkit::env::require_tools(&["docker-registry"]) {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new(script())
            .arg("start")
            .arg(dir.path())
            .arg("0")
            .stderr(Stdio::inherit())
            .output()
            .expect("running scripts/registry.sh");
        assert!(out.status.success(), "scripts/registry.sh start failed");
        let addr = String::from_utf8(out.stdout).unwrap().trim().to_string();
        Some(TestRegistry { dir, addr })
    }

    fn repo(&self, name: &str) -> Repository {
        Registry::new(&self.addr, &RegistryOptions::default())
            .unwrap()
            .repository(name)
            .unwrap()
    }
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        let _ = Command::new(script())
            .arg("stop")
            .arg(self.dir.path())
            .status();
    }
}

/// Deterministic incompressible bytes.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    std::iter::repeat_with(|| rng.u8(..)).take(len).collect()
}

/// A 3 MiB base layer, and an app layer of 1 MiB on top.
fn images() -> (ImageBuilder, ImageBuilder) {
    let mut base_layer = LayerBuilder::new();
    base_layer.dir("usr", 0o755).dir("usr/lib", 0o755);
    for i in 0..6 {
        base_layer.file(&format!("usr/lib/lib{i}.so"), &noise(i, 512 << 10), 0o644);
    }
    let mut app_layer = LayerBuilder::new();
    app_layer
        .dir("app", 0o755)
        .file("app/main", &noise(99, 1 << 20), 0o755);
    let mut base = ImageBuilder::new();
    base.layer(base_layer.into_bytes(), Compression::Gzip);
    let mut app = base.clone();
    app.layer(app_layer.into_bytes(), Compression::Gzip);
    (base, app)
}

struct Converted {
    recipe_bytes: Vec<u8>,
    subject: Descriptor,
}

/// Pushes `img` to `repo:tag` as a source image and converts it (from an
/// OCI layout with the same bytes) into `store`.
fn publish_and_convert(
    repo: &Repository,
    img: &ImageBuilder,
    tag: &str,
    store: &Arc<LocalStore>,
    owner: &OwnerKey,
) -> Converted {
    let mut layout = OciLayout::new();
    let desc = layout.add_image(img);
    layout.tag(desc.clone(), Some(tag));
    let dir = tempfile::tempdir().unwrap();
    layout.write(dir.path()).unwrap();
    for (digest, bytes) in &layout.blobs {
        if *digest != desc.digest {
            repo.push_blob(digest, bytes).unwrap();
        }
    }
    let manifest = &layout.blobs[&desc.digest];
    assert_eq!(desc.media_type, OCI_MANIFEST);
    let pushed = repo.put_manifest(tag, OCI_MANIFEST, manifest).unwrap();
    assert_eq!(pushed, desc.digest);

    let src = open_source(&format!("oci:{}:{tag}", dir.path().display())).unwrap();
    let opts = ConvertOptions {
        chunk_size: 64 << 10,
        cdc: None,
        codec: ChunkCodec::new(smr_format::chunk::default_salt(), true, false),
        platform: Platform::default(),
        owner: Some(owner.clone()),
        workers: 2,
    };
    let out = convert(src.as_ref(), store.clone(), &opts, &mut |_| {}).unwrap();
    assert_eq!(out.recipe.source_digest, desc.digest);
    Converted {
        recipe_bytes: out.recipe.encode(),
        subject: Descriptor::new(OCI_MANIFEST, desc.digest, desc.size),
    }
}

fn push_opts() -> PushOptions {
    PushOptions {
        pack: Some(PackParams::with_target(8)),
        ..PushOptions::default()
    }
}

fn do_push(repo: &Repository, c: &Converted, store: &LocalStore) -> PushReport {
    push(repo, &c.subject, &c.recipe_bytes, store, &push_opts()).unwrap()
}

/// Rebuilds the image of `recipe_bytes` from `store`, verifying and
/// decrypting every chunk, with 8 threads taking chunks in image order (as
/// `smr extract` and the node cache's fetch pool do).
fn extract(recipe_bytes: &[u8], owner: &OwnerKey, store: &dyn ChunkStore) -> Vec<u8> {
    let recipe = smr_format::Recipe::decode(recipe_bytes).unwrap();
    let keys = recipe.keys(Some(owner)).unwrap().unwrap();
    let next = AtomicUsize::new(0);
    let image = Mutex::new(vec![0u8; recipe.image_size as usize]);
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| loop {
                let pos = next.fetch_add(1, Ordering::Relaxed);
                let Some(e) = recipe.chunks.get(pos) else {
                    break;
                };
                let stored = store.get(&e.id).unwrap();
                let len = recipe.chunk_len(e.index) as usize;
                let plain = open_chunk(&e.id, keys.get(pos), e.compressed, stored, len).unwrap();
                let at = recipe.chunk_start(e.index) as usize;
                image.lock().unwrap()[at..at + len].copy_from_slice(&plain);
            });
        }
    });
    image.into_inner().unwrap()
}

#[test]
fn push_find_and_serve_through_a_real_registry() {
    let Some(reg) = TestRegistry::start() else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let store = Arc::new(LocalStore::open(work.path().join("store")).unwrap());
    let owner = OwnerKey([42; 32]);
    let repo = reg.repo("smr/test");
    let (base_img, app_img) = images();
    let base = publish_and_convert(&repo, &base_img, "base", &store, &owner);
    let app = publish_and_convert(&repo, &app_img, "app", &store, &owner);
    let source_manifest = repo.get_manifest("app").unwrap().unwrap();

    // Push: everything is new for the base image; the app image finds the
    // packs of the shared base layer already there.
    let rb = do_push(&repo, &base, &store);
    assert_eq!(rb.referrers, Some(ReferrersUpdate::TagCreated), "{rb:?}");
    assert_eq!(rb.blobs_uploaded, rb.blobs_total, "{rb:?}");
    let ra = do_push(&repo, &app, &store);
    assert!(ra.blobs_skipped > 2 && ra.bytes_skipped > 1 << 20, "{ra:?}");
    // Pushing again uploads nothing.
    let again = do_push(&repo, &app, &store);
    assert_eq!(
        (again.blobs_uploaded, again.bytes_uploaded),
        (0, 0),
        "{again:?}"
    );
    assert_eq!(again.manifest_digest, ra.manifest_digest);
    assert_eq!(again.referrers, Some(ReferrersUpdate::TagUnchanged));

    // The source image is untouched; the fallback tag lists the artifact.
    assert_eq!(repo.get_manifest("app").unwrap().unwrap(), source_manifest);
    let tag = fallback_tag(&app.subject.digest).unwrap();
    let (mt, _) = repo.get_manifest(&tag).unwrap().unwrap();
    assert_eq!(mt, OCI_INDEX);

    // A fresh client finds it and serves the image from the packs.
    let fresh: Arc<dyn Blobs> = Arc::new(reg.repo("smr/test"));
    let listed = list_artifacts(fresh.as_ref(), &app.subject.digest).unwrap();
    assert_eq!(listed.len(), 1);
    let artifact = discover(
        fresh.as_ref(),
        &app.subject.digest,
        &DiscoverOptions::default(),
    )
    .unwrap();
    assert_eq!(artifact.digest, ra.manifest_digest);
    assert_eq!(artifact.recipe_bytes, app.recipe_bytes);
    let remote = artifact.store(fresh.clone(), smr_store::RemoteOptions::default());
    let from_registry = extract(&app.recipe_bytes, &owner, &remote);
    let from_local = extract(&app.recipe_bytes, &owner, store.as_ref());
    assert!(from_registry == from_local, "images differ");
}

/// A cold start's largest read, the startup pack, begins at the referrers
/// listing (the profile manifest names it) and answers the store's read
/// of the whole pack; the next read of it goes to the registry again.
#[test]
fn a_startup_pack_read_begun_at_the_lookup_answers_its_reader() {
    use smr_format::startup::{BlockRun, PackSecret};
    use smr_format::Profile;
    use smr_store::{ByteRange, ObjectName, Progress};
    let Some(reg) = TestRegistry::start() else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let store = Arc::new(LocalStore::open(work.path().join("store")).unwrap());
    let owner = OwnerKey([42; 32]);
    let repo = reg.repo("smr/pack");
    let (base_img, _) = images();
    let base = publish_and_convert(&repo, &base_img, "base", &store, &owner);
    do_push(&repo, &base, &store);
    let artifact = discover(&repo, &base.subject.digest, &DiscoverOptions::default()).unwrap();
    let mut profile = Profile::new(Profile::recipe_hash(&artifact.recipe_bytes), vec![0, 1]);
    profile.blocks = vec![BlockRun {
        first: 0,
        count: 300,
    }];
    let plain = noise(7, 300 * 4096);
    let secret = PackSecret::of_keys(&[smr_format::ChunkKey([9; 32])]);
    let blob = profile.seal_pack(&secret, &plain, 64);
    smr_registry::profile::push_profile(&repo, &artifact, &profile, Some(&blob)).unwrap();
    let pack = profile.pack.as_ref().unwrap().blob_digest();

    let fresh: Arc<dyn Blobs> = Arc::new(reg.repo("smr/pack"));
    let opts = DiscoverOptions {
        profile: true,
        read_pack_ahead: true,
        ..DiscoverOptions::default()
    };
    let found = discover(fresh.as_ref(), &base.subject.digest, &opts).unwrap();
    assert_eq!(found.profile.as_ref(), Some(&profile));
    assert!(found.pack_head_start.is_set(), "the listing names the pack");
    let remote = found.store(fresh.clone(), smr_store::RemoteOptions::default());
    let (object, whole) = (
        ObjectName::new(pack.as_str()),
        ByteRange::new(0, blob.len() as u64),
    );
    let grew = Arc::new(AtomicUsize::new(0));
    let g = grew.clone();
    let progress: Progress = Arc::new(move |p: &[u8]| {
        g.fetch_max(p.len(), Ordering::Relaxed);
    });
    let got = remote
        .read_range_progressive(&object, whole, &progress)
        .unwrap();
    assert!(got == blob, "the pack as pushed");
    assert!(!found.pack_head_start.is_set(), "taken by its reader");
    assert!(grew.load(Ordering::Relaxed) <= blob.len());
    // Read again: from the registry, the same bytes.
    let again = remote
        .read_range_progressive(&object, whole, &progress)
        .unwrap();
    assert!(again == blob);

    // A node whose blob cache holds the profile started from it before
    // (its pack is cached): nothing is read ahead.
    let blob_dir = work.path().join("blob-cache");
    let cached = smr_registry::blob_cache::CachedBlobs::new(fresh.as_ref(), &blob_dir);
    let first = discover(&cached, &base.subject.digest, &opts).unwrap();
    assert!(first.pack_head_start.is_set(), "a cold node");
    drop(first);
    let again = discover(&cached, &base.subject.digest, &opts).unwrap();
    assert!(again.profile.is_some() && !again.pack_head_start.is_set());

    // Not asked for: nothing is read ahead.
    let plain_opts = DiscoverOptions {
        read_pack_ahead: false,
        ..opts
    };
    let found = discover(fresh.as_ref(), &base.subject.digest, &plain_opts).unwrap();
    assert!(found.profile.is_some() && !found.pack_head_start.is_set());
}
