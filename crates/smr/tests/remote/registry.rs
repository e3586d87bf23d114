//! `smr convert docker://… --push`, then `smr mount` / `smr run` of
//! `docker://…` against a real registry.

use crate::servers::{debian_layout, Registry};
use crate::util::*;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// `smr convert IMAGE --push` with the owner key; returns stderr.
fn push(image: &str, key: &Path, extra: &[&str]) -> String {
    let out = ok(smr()
        .arg("convert")
        .arg(image)
        .arg("--push")
        .arg("--no-optimize")
        .arg("--key-file")
        .arg(key)
        .args(extra));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Mounts `image` lazily on `mnt`; the returned guard unmounts.
pub(crate) struct Mounted<'a> {
    mnt: &'a Path,
    state: &'a Path,
}

impl<'a> Mounted<'a> {
    pub(crate) fn new(
        image: &str,
        mnt: &'a Path,
        state: &'a Path,
        cache: &Path,
        key: &Path,
        env: &[(&str, &str)],
    ) -> Self {
        std::fs::create_dir_all(mnt).unwrap();
        ok(smr()
            .arg("mount")
            .arg(image)
            .arg(mnt)
            .arg("--cache-dir")
            .arg(cache)
            .arg("--key-file")
            .arg(key)
            .arg("--state-dir")
            .arg(state)
            .envs(env.iter().copied()));
        Mounted { mnt, state }
    }
}

impl Drop for Mounted<'_> {
    fn drop(&mut self) {
        let _ = smr()
            .arg("umount")
            .arg(self.mnt)
            .arg("--state-dir")
            .arg(self.state)
            .status();
    }
}

/// The logs of the FUSE servers of the mounts under `state`.
fn server_logs(state: &Path) -> String {
    std::fs::read_dir(state)
        .unwrap()
        .flatten()
        .flat_map(|e| std::fs::read_dir(e.path()).into_iter().flatten().flatten())
        .filter(|e| e.path().extension().is_some_and(|x| x == "log"))
        .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
        .collect()
}

/// The synthetic image pushed to `reg` as `synth:v1` (not converted yet),
/// and its `docker://` name.
fn synthetic_in(reg: &Registry) -> (Synthetic, String) {
    let s = Synthetic::new();
    let layout = s.t.path().join("layout");
    reg.push_layout(&layout, smr_testkit::SYNTHETIC_TAG, "synth:v1", None);
    let image = reg.image("synth:v1");
    (s, image)
}

#[test]
fn push_then_mount_lazily_from_the_registry() {
    let Some(reg) = Registry::start(None) else {
        return;
    };
    let (s, image) = synthetic_in(&reg);

    let first = push(&image, &s.key, &[]);
    assert!(first.contains("pushed smr artifact"), "{first}");
    // Pushing again uploads nothing.
    let again = push(&image, &s.key, &[]);
    assert!(again.contains("uploaded 0 of"), "{again}");

    // The source image is untouched and the artifact is listed by the
    // referrers fallback tag.
    ok(Command::new("skopeo")
        .args(["inspect", "--tls-verify=false"])
        .arg(&image));
    let tags = ok(Command::new("skopeo")
        .args(["list-tags", "--tls-verify=false"])
        .arg(reg.image("synth")));
    let tags = String::from_utf8_lossy(&tags.stdout);
    assert!(tags.contains("\"sha256-"), "{tags}");

    lazy_tree_equals_local(&s, &image, &[]);
}

/// What an image is found by and named by digest (the recipe, the
/// artifact manifest) is fetched once per node: `smr mount`'s FUSE server
/// reads what `smr mount` fetched from the node's cache, and so does the
/// next mount. The server lists no referrers: the mount hands it the
/// artifact and profile it found.
#[test]
fn a_mount_fetches_the_recipe_once_per_node() {
    let Some(reg) = Registry::start(None) else {
        return;
    };
    let (s, image) = synthetic_in(&reg);
    push(&image, &s.key, &[]);
    // The same conversion locally: the recipe pushed, byte for byte.
    convert(&s.src, &s.store, &s.recipe, &s.key, &[]);
    let recipe = std::fs::read(&s.recipe).unwrap();
    let digest = smr_registry::artifact::digest_of(&recipe);
    let (mnt, state, cache) = (
        s.t.path().join("mnt"),
        s.t.path().join("state"),
        s.t.path().join("cache"),
    );
    let before = reg.gets_of(&digest);
    // distribution 2.8 has no referrers API: the referrers of the image
    // are its fallback tag `sha256-HEX`.
    let lists = reg.gets_of("/manifests/sha256-");
    {
        let _m = Mounted::new(&image, &mnt, &state, &cache, &s.key, &[]);
        assert_eq!(reg.gets_of(&digest) - before, 1, "recipe {digest}");
        assert_eq!(
            reg.gets_of("/manifests/sha256-") - lists,
            1,
            "the referrers are listed once: the image server is handed what the mount found"
        );
    }
    let manifests = reg.gets_of("/manifests/sha256:");
    let m = Mounted::new(&image, &mnt, &state, &cache, &s.key, &[]);
    assert_eq!(reg.gets_of(&digest) - before, 1, "recipe {digest}, again");
    assert_eq!(
        reg.gets_of("/manifests/sha256:"),
        manifests,
        "manifests by digest come from the cache"
    );
    assert!(std::fs::read_dir(m.mnt).unwrap().count() > 0);
    drop(m);
    // `smr cache prune --to 0` forgets them.
    ok(smr()
        .args(["cache", "prune", "--to", "0", "--cache-dir"])
        .arg(&cache));
    let _m = Mounted::new(&image, &mnt, &state, &cache, &s.key, &[]);
    assert_eq!(reg.gets_of(&digest) - before, 2, "recipe {digest}, pruned");
}

/// The tree of `image` mounted lazily equals `s` converted locally with
/// `convert_args` and loop-mounted from its extracted file.
fn lazy_tree_equals_local(s: &Synthetic, image: &str, convert_args: &[&str]) {
    convert(&s.src, &s.store, &s.recipe, &s.key, convert_args);
    extract(&s.recipe, &s.store, &s.key, &s.img);
    let local = LoopMount::new(&s.img);
    let (mnt, state, cache) = (
        s.t.path().join("mnt"),
        s.t.path().join("state"),
        s.t.path().join("cache"),
    );
    let m = Mounted::new(image, &mnt, &state, &cache, &s.key, &[]);
    trees_equal(local.dir.path(), m.mnt);
}

/// An artifact of content-defined chunks: pushed in packs, mounted lazily
/// from the registry (the tree of the same conversion done locally), and
/// reproduced by converting its source again with the sizes its recipe
/// records.
#[test]
fn content_defined_chunks_push_mount_and_reproduce() {
    let Some(reg) = Registry::start(None) else {
        return;
    };
    let (s, image) = synthetic_in(&reg);
    let cdc = [
        "--chunking",
        "cdc",
        "--cdc-sizes",
        "8K:32K:128K",
        "--compress",
        "zstd",
    ];
    let pushed = push(&image, &s.key, &cdc);
    assert!(pushed.contains("pushed smr artifact"), "{pushed}");
    lazy_tree_equals_local(&s, &image, &cdc);
    let key = s.key.to_str().unwrap();
    let out = ok(smr().args(["verify", "--reproduce", &image, "--key-file", key]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("reproduced:") && err.contains("8K:32K:128K"),
        "{err}"
    );
}

#[test]
fn serve_nbd_of_a_registry_image() {
    let Some(reg) = Registry::start(None) else {
        return;
    };
    let (s, image) = synthetic_in(&reg);
    push(&image, &s.key, &[]);

    // Served from the registry alone (no --store: the artifact's packs),
    // under the repository's name, it is the image converted locally.
    convert(&s.src, &s.store, &s.recipe, &s.key, &[]);
    extract(&s.recipe, &s.store, &s.key, &s.img);
    let dir = s.t.path().join("srv");
    std::fs::create_dir_all(&dir).unwrap();
    let args: Vec<std::ffi::OsString> = vec![
        image.clone().into(),
        "--key-file".into(),
        s.key.clone().into(),
        "--cache-dir".into(),
        s.t.path().join("cache").into(),
    ];
    let srv = NbdServe::start(&args, &dir);
    let copy = s.t.path().join("copy.img");
    let gets = reg.blob_gets();
    ok(Command::new("nbdcopy").arg(srv.uri_of("synth")).arg(&copy));
    // Coalesced at the fetcher: neighbouring chunks of a pack missing at
    // the same time share a ranged request, counted at the registry (how
    // many are missing together depends on how nbdcopy's requests
    // interleave, so only fewer requests than chunks is certain).
    let inspect = ok(smr().arg("inspect").arg("--json").arg(&s.recipe));
    let recipe: serde_json::Value = serde_json::from_slice(&inspect.stdout).unwrap();
    let chunks = recipe["stored_chunks"].as_u64().unwrap() as usize;
    let requests = reg.blob_gets() - gets;
    assert!(
        requests > 0 && requests < chunks,
        "{requests} registry requests for {chunks} chunks"
    );
    assert_eq!(
        std::fs::metadata(&copy).unwrap().len(),
        std::fs::metadata(&s.img).unwrap().len()
    );
    fsck_clean(&copy);
    let (from_registry, local) = (LoopMount::new(&copy), LoopMount::new(&s.img));
    trees_equal(from_registry.dir.path(), local.dir.path());
    drop(srv);

    // `extract` and `verify` take the registry image too: the same image,
    // byte for byte, as extracted from the local conversion.
    let extracted = s.t.path().join("from-registry.img");
    ok(smr()
        .arg("extract")
        .arg(&image)
        .arg("-o")
        .arg(&extracted)
        .arg("--key-file")
        .arg(&s.key));
    assert!(
        std::fs::read(&extracted).unwrap() == std::fs::read(&s.img).unwrap(),
        "extract of the registry image differs from the local one"
    );
    let verified = ok(smr()
        .arg("verify")
        .arg(&image)
        .arg("--key-file")
        .arg(&s.key));
    let verified = String::from_utf8_lossy(&verified.stderr);
    assert!(
        verified.contains("hashes and contents checked"),
        "{verified}"
    );

    // A recipe file still needs its store; the error names the recipe.
    let err = fails(
        smr()
            .arg("serve-nbd")
            .arg(&s.recipe)
            .arg("--socket")
            .arg(dir.join("x.sock"))
            .arg("--cache-dir")
            .arg(s.t.path().join("cache")),
    );
    assert!(
        err.contains("--store is required") && err.contains(&*s.recipe.to_string_lossy()),
        "{err}"
    );
}

/// An OCI layout (tag `big`) of one layer with two 4 MiB files of
/// incompressible bytes, `big/a` and `big/b`.
fn big_files_layout(dir: &Path) {
    let mut layer = smr_testkit::LayerBuilder::new();
    layer.dir("big/", 0o755);
    for (name, seed) in [("big/a", 1u64), ("big/b", 2)] {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let data: Vec<u8> = (0..4 << 20)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        layer.file(name, &data, 0o644);
    }
    let mut img = smr_testkit::ImageBuilder::new();
    img.layer(layer.into_bytes(), smr_testkit::Compression::Gzip);
    img.write_oci_layout(dir, Some("big")).unwrap();
}

/// The big-files image pushed to `reg` as `big:v1` and converted with
/// `--push`; returns its temp dir (with the key) and reference.
fn pushed_big_files(reg: &Registry) -> (Synthetic, String) {
    let s = Synthetic::new();
    let layout = s.t.path().join("big-layout");
    big_files_layout(&layout);
    reg.push_layout(&layout, "big", "big:v1", None);
    let image = reg.image("big:v1");
    push(&image, &s.key, &[]);
    (s, image)
}

#[test]
fn reads_wait_for_a_registry_outage_and_fail_after_the_deadline() {
    let Some(mut reg) = Registry::start(None) else {
        return;
    };
    let (s, image) = pushed_big_files(&reg);
    let (mnt, state, cache) = (
        s.t.path().join("mnt"),
        s.t.path().join("state"),
        s.t.path().join("cache"),
    );
    let m = Mounted::new(
        &image,
        &mnt,
        &state,
        &cache,
        &s.key,
        // No prefetch: reading one file must not fetch the next.
        &[("SMR_STORE_DEADLINE", "8"), ("SMR_NO_PREFETCH", "true")],
    );
    let files = [m.mnt.join("big/a"), m.mnt.join("big/b")];

    // Registry down: a read blocks; registry back: it completes.
    reg.stop();
    let mut reader = Command::new("sha256sum")
        .arg(&files[0])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        reader.try_wait().unwrap().is_none(),
        "the read did not wait for the registry"
    );
    reg.start_again();
    let out = reader.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the read failed after the registry came back"
    );

    // Down for longer than the deadline: EIO, and the server log names
    // the store and the chunk.
    reg.stop();
    let t = Instant::now();
    let out = run(Command::new("cat").arg(&files[1]).stdout(Stdio::null()));
    assert!(
        !out.status.success(),
        "read succeeded with the registry down"
    );
    let waited = t.elapsed();
    assert!(
        waited >= Duration::from_secs(6),
        "gave up after {waited:?}, before the deadline"
    );
    assert!(waited < Duration::from_secs(60), "blocked {waited:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("Input/output error"), "{stderr}");
    let log = server_logs(&state);
    assert!(
        log.contains("gave up after") && log.contains(&reg.addr),
        "{log}"
    );
    // And once it is back, reads work again without remounting.
    reg.start_again();
    ok(Command::new("cat").arg(&files[1]).stdout(Stdio::null()));
}

#[test]
fn wrong_credentials_are_a_clear_error_without_the_password() {
    let Some(reg) = Registry::start(Some("smr:right-pass")) else {
        return;
    };
    let s = Synthetic::new();
    let layout = s.t.path().join("layout");
    reg.push_layout(
        &layout,
        smr_testkit::SYNTHETIC_TAG,
        "synth:v1",
        Some("smr:right-pass"),
    );
    let image = reg.image("synth:v1");
    let err = fails(
        smr()
            .arg("convert")
            .arg(&image)
            .arg("--push")
            .arg("--key-file")
            .arg(&s.key)
            .arg("--creds")
            .arg("smr:wrong-pass-xyzzy"),
    );
    assert!(
        err.contains("authentication") && err.contains(&reg.addr),
        "{err}"
    );
    assert!(!err.contains("wrong-pass-xyzzy"), "{err}");
    // The right ones work; on the command line with a warning that `ps`
    // shows them, from a file or standard input without one.
    let out = push(&image, &s.key, &["--creds", "smr:right-pass"]);
    assert!(out.contains("pushed smr artifact"), "{out}");
    assert!(
        out.contains("--creds puts the password on the command line"),
        "{out}"
    );
    let file = s.t.path().join("creds");
    std::fs::write(&file, "smr:right-pass\n").unwrap();
    let out = push(&image, &s.key, &["--creds-file", file.to_str().unwrap()]);
    assert!(out.contains("pushed smr artifact"), "{out}");
    assert!(!out.contains("--creds puts"), "{out}");
    let mut c = smr()
        .arg("convert")
        .arg(&image)
        .arg("--push")
        .arg("--key-file")
        .arg(&s.key)
        .arg("--creds-stdin")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    c.stdin
        .take()
        .unwrap()
        .write_all(b"smr:right-pass\n")
        .unwrap();
    let out = c.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && err.contains("pushed smr artifact"),
        "{err}"
    );
    // Two sources at once are refused.
    let err = fails(
        smr()
            .arg("convert")
            .arg(&image)
            .arg("--push")
            .arg("--creds-stdin")
            .arg("--creds-file")
            .arg(&file),
    );
    assert!(err.contains("cannot be used with"), "{err}");
}

#[test]
fn run_debian_python_lazily_from_the_registry() {
    let Some(layout) = debian_layout() else {
        return;
    };
    let Some(reg) = Registry::start(None) else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let key = key_file(t.path());
    // Both images in one repository: registries dedup per repository.
    reg.push_layout(&layout, "debian", "debian:base", None);
    reg.push_layout(&layout, "debian-python", "debian:python", None);
    let base = push(&reg.image("debian:base"), &key, &[]);
    assert!(base.contains("pushed smr artifact"), "{base}");
    // The python image shares the base layer: its packs are already there.
    let py = push(&reg.image("debian:python"), &key, &[]);
    let skipped: u64 = py
        .split(", ")
        .find_map(|part| {
            part.strip_suffix(" already there (")
                .or_else(|| part.split_once(" already there").map(|(n, _)| n))
        })
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    assert!(skipped > 0, "nothing of the base was reused: {py}");

    let stats = t.path().join("stats.json");
    let run_it = |args: &[&str]| {
        smr()
            .arg("run")
            .arg(reg.image("debian:python"))
            .arg("--cache-dir")
            .arg(t.path().join("cache"))
            .arg("--key-file")
            .arg(&key)
            .arg("--stats")
            .arg(&stats)
            .arg("--")
            .args(args)
            .output()
            .unwrap()
    };
    let out = run_it(&["python3", "-c", "import json, sqlite3"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s: serde_json::Value = serde_json::from_slice(&std::fs::read(&stats).unwrap()).unwrap();
    let fraction = s["fetched_fraction"].as_f64().unwrap();
    assert!(fraction > 0.0 && fraction < 0.5, "fetched {fraction}");
    let out = run_it(&["python3", "-c", "import sys; sys.exit(7)"]);
    assert_eq!(out.status.code(), Some(7));
}

/// `skopeo inspect --raw` of `image` as JSON.
fn raw_manifest(image: &str) -> serde_json::Value {
    let out = ok(Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(image));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn a_corrupted_pack_in_the_registry_is_never_served() {
    let Some(reg) = Registry::start(None) else {
        return;
    };
    let (s, image) = pushed_big_files(&reg);

    // Find the artifact's packs through the referrers fallback tag.
    let tags = ok(Command::new("skopeo")
        .args(["list-tags", "--tls-verify=false"])
        .arg(reg.image("big")));
    let tags: serde_json::Value = serde_json::from_slice(&tags.stdout).unwrap();
    let tag = tags["Tags"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t.as_str())
        .find(|t| t.starts_with("sha256-"))
        .unwrap()
        .to_string();
    let referrers = raw_manifest(&reg.image(&format!("big:{tag}")));
    let artifact = referrers["manifests"][0]["digest"].as_str().unwrap();
    let manifest = raw_manifest(&reg.image(&format!("big@{artifact}")));
    let packs: Vec<String> = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["mediaType"] == smr_registry::media_types::SMR_PACK)
        .map(|l| {
            l["digest"]
                .as_str()
                .unwrap()
                .trim_start_matches("sha256:")
                .to_string()
        })
        .collect();
    assert!(!packs.is_empty(), "{manifest}");
    // Flip a byte in the middle of every pack, on the registry's disk.
    for hex in &packs {
        let data = reg
            .dir
            .path()
            .join("reg/data/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data");
        let mut bytes = std::fs::read(&data).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x55;
        std::fs::write(&data, bytes).unwrap();
    }

    let (mnt, state, cache) = (
        s.t.path().join("mnt"),
        s.t.path().join("state"),
        s.t.path().join("cache"),
    );
    let _m = Mounted::new(&image, &mnt, &state, &cache, &s.key, &[]);
    let out = run(Command::new("sha256sum")
        .arg(mnt.join("big/a"))
        .arg(mnt.join("big/b")));
    assert!(!out.status.success(), "corrupted chunks were served");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("Input/output error"), "{stderr}");
    let log = server_logs(&state);
    assert!(log.contains("hash mismatch"), "{log}");
}

/// Two artifacts for one image, sealed under different owner keys (one
/// attached by someone else): each node uses the one its key opens,
/// whichever digest is smaller; a node whose key opens neither gets an
/// error naming both and why.
#[test]
fn a_node_uses_only_an_artifact_its_owner_key_opens() {
    let Some(reg) = Registry::start(None) else {
        return;
    };
    let (s, image) = synthetic_in(&reg);
    let other = s.t.path().join("other.key");
    std::fs::write(&other, format!("{}\n", "cd".repeat(32))).unwrap();
    let stranger = s.t.path().join("stranger.key");
    std::fs::write(&stranger, format!("{}\n", "ef".repeat(32))).unwrap();
    push(&image, &s.key, &[]);
    push(&image, &other, &[]);
    let extract = |key: &Path, out: &str| {
        let mut c = smr();
        c.arg("extract")
            .arg(&image)
            .arg("-o")
            .arg(s.t.path().join(out))
            .arg("--key-file")
            .arg(key);
        c
    };
    ok(&mut extract(&s.key, "mine.img"));
    ok(&mut extract(&other, "theirs.img"));
    let (mine, theirs) = (
        std::fs::read(s.t.path().join("mine.img")).unwrap(),
        std::fs::read(s.t.path().join("theirs.img")).unwrap(),
    );
    assert!(mine == theirs, "both artifacts hold the same image");
    let err = fails(&mut extract(&stranger, "none.img"));
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.contains("no trusted smr artifact") && !last.contains("create it"),
        "{err}"
    );
    assert_eq!(
        last.matches("does not open with the owner key").count(),
        2,
        "{err}"
    );
}
