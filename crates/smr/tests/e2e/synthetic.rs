//! The synthetic image (every entry type and whiteout case) end to end.

use super::util::*;
use std::path::Path;

/// The kernel and e2fsprogs accept the image, and the mounted tree equals
/// `umoci unpack` of the same layout.
#[test]
fn synthetic_converts_mounts_and_matches_umoci() {
    let Synthetic {
        t,
        src,
        store,
        recipe,
        img,
        key,
    } = Synthetic::new();
    convert(&src, &store, &recipe, &key, &[]);
    extract(&recipe, &store, &key, &img);
    fsck_clean(&img);
    let m = LoopMount::new(&img);
    let rootfs = umoci_unpack(
        &t.path().join("layout"),
        smr_testkit::SYNTHETIC_TAG,
        t.path(),
    );
    // Implicit parent directories: we give them mtime 0 (deterministic),
    // umoci the time of unpacking.
    let implicit = [
        ".", "dev", "gnu", "long", "long/*", "replace", "run", "srv", "srv/a", "srv/a/b", "var",
        "var/lib",
    ];
    trees_equal_except_mtimes(m.dir.path(), &rootfs, &implicit);
    // Spot checks that the comparison saw what matters.
    let tool = m.dir.path().join("usr/bin/tool");
    let cap = xattr_of(&tool, "security.capability");
    assert_eq!(cap.as_deref(), Some(smr_testkit::SYNTHETIC_CAPABILITY));
    assert!(
        !m.dir.path().join("etc/hostname").exists(),
        "whiteout applied"
    );
}

fn xattr_of(path: &Path, name: &str) -> Option<Vec<u8>> {
    let out = run(std::process::Command::new("getfattr")
        .args(["--only-values", "--absolute-names", "-n", name])
        .arg(path));
    out.status.success().then_some(out.stdout)
}

/// Two conversions in different temp dirs, at different times, give
/// identical recipe bytes and image bytes, for every chunk mode.
#[test]
fn conversion_is_deterministic() {
    for extra in [
        &[][..],
        &["--compress", "zstd"],
        &["--no-encrypt", "--chunk-size", "1M"],
        &["--chunking", "fixed", "--compress", "zstd"],
        &["--no-encrypt", "--cdc-sizes", "4K:16K:64K"],
    ] {
        let mut outs = Vec::new();
        for _ in 0..2 {
            let Synthetic {
                t: _t,
                src,
                store,
                recipe,
                img,
                key,
            } = Synthetic::new();
            convert(&src, &store, &recipe, &key, extra);
            extract(&recipe, &store, &key, &img);
            fsck_clean(&img);
            outs.push((
                std::fs::read(&recipe).unwrap(),
                std::fs::read(&img).unwrap(),
            ));
            std::thread::sleep(std::time::Duration::from_millis(1100));
        }
        assert!(outs[0].0 == outs[1].0, "recipe bytes differ for {extra:?}");
        assert!(outs[0].1 == outs[1].1, "image bytes differ for {extra:?}");
    }
}

/// The recipe digest of the synthetic image is pinned: a change here means
/// the on-disk format changed (update docs/FORMAT.md and bump the version).
/// Pinned three times: fixed chunks of 512 KiB and of 64 KiB (the format,
/// whatever the default) and with no flags (so that changing the default
/// is deliberate: content-defined chunks at 16K:64K:256K).
#[test]
fn golden_recipe_digest() {
    for (extra, golden) in [
        (&["--chunk-size", "512K"][..], GOLDEN_512K),
        (&["--chunking", "fixed"][..], GOLDEN_FIXED_64K),
        (&[][..], GOLDEN_CDC),
    ] {
        // `_t` keeps the temp dir alive to the end of the iteration.
        let Synthetic {
            t: _t,
            src,
            store,
            recipe,
            key,
            ..
        } = Synthetic::new();
        convert(&src, &store, &recipe, &key, extra);
        let out = ok(smr().arg("inspect").arg("--json").arg(&recipe));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(
            v["recipe_digest"], golden,
            "recipe format or ext4 layout changed ({extra:?})"
        );
    }
}

/// Golden digests of recipe format version 2 (with the file map): fixed
/// chunks of 512 KiB and 64 KiB.
const GOLDEN_512K: &str = "sha256:b866a52e7ccb82e35f095f5263d0308187471f90c1135dff8a8ca5bea1416c42";
const GOLDEN_FIXED_64K: &str =
    "sha256:26ee387baaf660cf9515651ab1ae97a3efdf21f851ce64f9c54626caa7f8acf6";
/// Golden digest of recipe format version 3 (content-defined chunks,
/// default sizes): the default since the image-series evaluation
/// (docs/EVALUATION.md).
const GOLDEN_CDC: &str = "sha256:2aa3fb947316e0efbafd74b525f70defb0589590c133c4d53cfbf8c3751f9c23";

/// A flipped bit in a stored chunk is detected and the chunk is named, by
/// both `verify` and `extract`; extract leaves no output behind.
#[test]
fn corrupted_chunk_is_detected_and_named() {
    let Synthetic {
        t,
        src,
        store,
        recipe,
        img,
        key,
    } = Synthetic::new();
    convert(&src, &store, &recipe, &key, &["--chunk-size", "64K"]);
    ok(smr().arg("verify").arg(&recipe).arg("--store").arg(&store));
    let out = ok(smr().arg("inspect").arg("--json").arg(&recipe));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = v["chunks"][1]["id"].as_str().unwrap().to_string();
    corrupt_chunk(&store, &id, 17, 0x04);
    let err = fails(smr().arg("verify").arg(&recipe).arg("--store").arg(&store));
    assert!(err.contains(&id), "verify names the chunk: {err}");
    let err = fails(
        smr()
            .arg("extract")
            .arg(&recipe)
            .arg("--store")
            .arg(&store)
            .arg("--key-file")
            .arg(&key)
            .arg("-o")
            .arg(&img),
    );
    assert!(err.contains(&id), "extract names the chunk: {err}");
    assert!(!img.exists());
    assert!(
        find_named(t.path(), "smr-tmp").is_empty(),
        "no temp output left"
    );
    // A missing chunk is named too.
    let gone = remove_chunk(&store, &id.parse().unwrap());
    let err = fails(smr().arg("verify").arg(&recipe).arg("--store").arg(&store));
    assert!(
        gone.iter().any(|g| err.contains(g)) && err.contains("missing"),
        "{err}"
    );
}

/// Keys: missing or wrong keys give clear errors; inspect never shows keys
/// but works without them.
#[test]
fn key_errors_are_clear() {
    let Synthetic {
        t,
        src,
        store,
        recipe,
        img,
        key,
    } = Synthetic::new();
    let err = fails(
        smr()
            .arg("convert")
            .arg(&src)
            .arg("--store")
            .arg(&store)
            .arg("-o")
            .arg(&recipe),
    );
    assert!(err.contains("--key-file"), "{err}");
    assert!(!recipe.exists());
    convert(&src, &store, &recipe, &key, &[]);
    let wrong = t.path().join("wrong");
    std::fs::write(&wrong, "cd".repeat(32)).unwrap();
    let err = fails(
        smr()
            .arg("extract")
            .arg(&recipe)
            .arg("--store")
            .arg(&store)
            .arg("--key-file")
            .arg(&wrong)
            .arg("-o")
            .arg(&img),
    );
    assert!(err.contains("wrong key"), "{err}");
    let err = fails(
        smr()
            .arg("extract")
            .arg(&recipe)
            .arg("--store")
            .arg(&store)
            .arg("-o")
            .arg(&img),
    );
    assert!(err.contains("no key"), "{err}");
    assert!(!img.exists());
    let out = ok(smr().arg("inspect").arg("--json").arg(&recipe));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("\"encrypted\": true") && !text.contains("key\""),
        "{text}"
    );
}

/// A docker-archive of the same image converts to the same tree.
#[test]
fn docker_archive_input() {
    let Synthetic {
        t,
        src,
        store,
        recipe,
        img,
        key,
    } = Synthetic::new();
    let img_def = smr_testkit::synthetic_image();
    let tar = t.path().join("image.tar");
    smr_testkit::write_docker_archive(
        &tar,
        &[(&img_def, &["synthetic:latest"][..])],
        smr_testkit::DockerArchiveStyle::Legacy,
    )
    .expect("write docker archive");
    convert(
        &format!("docker-archive:{}", tar.display()),
        &store,
        &recipe,
        &key,
        &[],
    );
    extract(&recipe, &store, &key, &img);
    fsck_clean(&img);
    let (recipe2, img2) = (t.path().join("r2"), t.path().join("img2"));
    convert(&src, &store, &recipe2, &key, &[]);
    extract(&recipe2, &store, &key, &img2);
    let (a, b) = (LoopMount::new(&img), LoopMount::new(&img2));
    trees_equal(a.dir.path(), b.dir.path());
}

/// Concurrent converts into one store are safe: both succeed, both verify,
/// and no temp files remain in the store.
#[test]
fn concurrent_converts_share_a_store() {
    let Synthetic {
        t, src, store, key, ..
    } = Synthetic::new();
    let children: Vec<_> = (0..4)
        .map(|i| {
            smr()
                .arg("convert")
                .arg(&src)
                .arg("--store")
                .arg(&store)
                .arg("-o")
                .arg(t.path().join(format!("r{i}")))
                .arg("--key-file")
                .arg(&key)
                .args(["--chunk-size", "64K"])
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let first = std::fs::read(t.path().join("r0")).unwrap();
    for i in 0..4 {
        let r = t.path().join(format!("r{i}"));
        assert_eq!(std::fs::read(&r).unwrap(), first);
        ok(smr()
            .arg("verify")
            .arg(&r)
            .arg("--store")
            .arg(&store)
            .arg("--key-file")
            .arg(&key));
    }
    assert!(find_named(&store, ".tmp").is_empty());
}

/// Temp files an interrupted convert left in the store: `verify` reports
/// them, a later convert removes those older than a day and keeps younger
/// ones (a concurrent writer's).
#[test]
fn leftover_temp_files_are_reported_then_removed() {
    let s = Synthetic::new();
    convert(&s.src, &s.store, &s.recipe, &s.key, &[]);
    let dir = s.store.join("chunks/00");
    std::fs::create_dir_all(&dir).unwrap();
    let (old, young) = (dir.join(".tmp-killed-1-0"), dir.join(".tmp-recent-2-0"));
    let now = std::time::SystemTime::now();
    for (path, age) in [(&old, 48 * 3600), (&young, 120)] {
        let f = std::fs::File::create(path).unwrap();
        f.set_modified(now - std::time::Duration::from_secs(age))
            .unwrap();
    }
    let verify = || {
        let out = ok(smr()
            .arg("verify")
            .arg(&s.recipe)
            .arg("--store")
            .arg(&s.store));
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = verify();
    assert!(
        err.contains(".tmp-killed-1-0") && err.contains(".tmp-recent-2-0"),
        "{err}"
    );
    assert!(err.contains("2 temp files of interrupted writes"), "{err}");
    convert(&s.src, &s.store, &s.recipe, &s.key, &[]);
    assert!(!old.exists() && young.exists());
    let err = verify();
    assert!(
        err.contains("1 temp files") && !err.contains("killed"),
        "{err}"
    );
}
