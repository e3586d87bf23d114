//! Chunk stores on S3 (s3s-fs) and plain HTTP through the `smr` binary:
//! the same image converted into them extracts to the same bytes as from a
//! local store.

use crate::servers::{FileServer, S3};
use crate::util::*;

#[test]
fn s3_store_round_trip() {
    let Some(s3) = S3::start() else {
        return;
    };
    let s = Synthetic::new();
    convert(&s.src, &s.store, &s.recipe, &s.key, &[]);
    extract(&s.recipe, &s.store, &s.key, &s.img);

    let env = s3.env();
    let remote = "s3://smr/images";
    let recipe = s.t.path().join("s3.recipe");
    ok(smr()
        .arg("convert")
        .arg(&s.src)
        .arg("--store")
        .arg(remote)
        .arg("-o")
        .arg(&recipe)
        .arg("--key-file")
        .arg(&s.key)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str()))));
    assert_eq!(
        std::fs::read(&recipe).unwrap(),
        std::fs::read(&s.recipe).unwrap()
    );
    let img = s.t.path().join("s3.img");
    extract_with(&recipe, remote, &s.key, &img, &env);
    assert!(std::fs::read(&img).unwrap() == std::fs::read(&s.img).unwrap());

    // Wrong credentials: a clear error naming the store, no secret.
    let mut bad = env.clone();
    bad.retain(|(k, _)| *k != "AWS_SECRET_ACCESS_KEY");
    bad.push(("AWS_SECRET_ACCESS_KEY", "not-the-secret-123".into()));
    let err = fails(
        smr()
            .arg("verify")
            .arg(&recipe)
            .arg("--store")
            .arg(remote)
            .envs(bad.iter().map(|(k, v)| (*k, v.as_str()))),
    );
    assert!(err.contains("s3://smr/images"), "{err}");
    assert!(!err.contains("not-the-secret-123"), "{err}");
}

/// A store of packs copied as it is into an S3 bucket: a node reads it
/// through the recipe's index, with ranged GETs of the packs.
#[test]
fn s3_serves_a_store_of_packs() {
    let Some(s3) = S3::start() else {
        return;
    };
    let s = Synthetic::new();
    convert(&s.src, &s.store, &s.recipe, &s.key, &[]);
    extract(&s.recipe, &s.store, &s.key, &s.img);
    for dir in ["packs", "indexes"] {
        let to = s3.object_path(&format!("packed/{dir}"));
        std::fs::create_dir_all(&to).unwrap();
        for e in std::fs::read_dir(s.store.join(dir)).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
    let img = s.t.path().join("s3-packed.img");
    extract_with(&s.recipe, "s3://smr/packed", &s.key, &img, &s3.env());
    assert!(std::fs::read(&img).unwrap() == std::fs::read(&s.img).unwrap());
    // A damaged index is an error naming it, not a wrong read.
    let index = std::fs::read_dir(s3.object_path("packed/indexes"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let mut bytes = std::fs::read(&index).unwrap();
    bytes[12] ^= 1;
    std::fs::write(&index, bytes).unwrap();
    let env = s3.env();
    let err = fails(
        smr()
            .arg("verify")
            .arg(&s.recipe)
            .arg("--store")
            .arg("s3://smr/packed")
            .envs(env.iter().map(|(k, v)| (*k, v.as_str()))),
    );
    assert!(
        err.contains("indexes/") && err.contains("checksum"),
        "{err}"
    );
}

#[test]
fn http_store_serves_a_local_store_read_only() {
    let s = Synthetic::new();
    convert(&s.src, &s.store, &s.recipe, &s.key, &[]);
    extract(&s.recipe, &s.store, &s.key, &s.img);
    let Some(http) = FileServer::start(&s.store) else {
        return;
    };
    let img = s.t.path().join("http.img");
    extract_with(&s.recipe, &http.url, &s.key, &img, &[]);
    assert!(std::fs::read(&img).unwrap() == std::fs::read(&s.img).unwrap());
    // Converting into it is refused: it is read-only.
    let err = fails(
        smr()
            .arg("convert")
            .arg(&s.src)
            .arg("--store")
            .arg(&http.url)
            .arg("-o")
            .arg(s.t.path().join("x.recipe"))
            .arg("--key-file")
            .arg(&s.key),
    );
    assert!(err.contains("read-only"), "{err}");
    assert!(!s.t.path().join("x.recipe").exists());
}

#[test]
fn s3_store_gc_deletes_only_unreferenced_packs_and_waits_for_no_writer() {
    let Some(s3) = S3::start() else {
        return;
    };
    let s = Synthetic::new();
    let env = s3.env();
    let remote = "s3://smr/gc";
    let d = s.t.path();
    let with_env = |c: &mut std::process::Command| {
        c.envs(env.iter().map(|(k, v)| (*k, v.as_str())));
    };
    // Two images in one store: 64K and 128K chunks share no chunk.
    let (a, b) = (d.join("a.recipe"), d.join("b.recipe"));
    for (recipe, size) in [(&a, "64K"), (&b, "128K")] {
        let mut c = smr();
        c.args([
            "convert",
            &s.src,
            "--store",
            remote,
            "--chunk-size",
            size,
            "-o",
        ])
        .arg(recipe)
        .arg("--key-file")
        .arg(&s.key);
        with_env(&mut c);
        ok(&mut c);
    }
    assert!(
        !s3.object_path("gc/leases").exists()
            || std::fs::read_dir(s3.object_path("gc/leases"))
                .unwrap()
                .count()
                == 0,
        "writers removed their leases"
    );
    let gc = |args: &[&str]| {
        let mut c = smr();
        c.args(["gc", "--store", remote, "--keep"])
            .arg(&a)
            .args(args);
        with_env(&mut c);
        c.output().unwrap()
    };
    let count = |args: &[&str]| -> (u64, u64) {
        let out = gc(&[args, &["--json"]].concat());
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        (
            v["packs"]["packs"].as_u64().unwrap(),
            v["packs"]["deleted"]["packs"].as_u64().unwrap(),
        )
    };
    // Converted in packs, with one index per recipe.
    let listed = |dir: &str| {
        std::fs::read_dir(s3.object_path(&format!("gc/{dir}"))).map_or(0, |d| d.count())
    };
    assert!(listed("packs") > 0 && listed("chunks") == 0);
    assert_eq!(listed("indexes"), 2);
    // Young packs stay; a dry run deletes nothing.
    let (total, deleted) = count(&["--grace", "1h"]);
    assert_eq!(deleted, 0);
    let (same, would) = count(&["--grace", "0s", "--dry-run"]);
    assert!(
        same == total && would > 0 && would < total,
        "{would} of {total}"
    );

    // A live writer's lease (a conversion running) makes GC step back.
    let lease = s3.object_path("gc/leases/writer-elsewhere");
    std::fs::create_dir_all(lease.parent().unwrap()).unwrap();
    std::fs::write(&lease, "pid 1 on elsewhere").unwrap();
    let out = gc(&["--grace", "0s"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("being written by pid 1 on elsewhere"),
        "{err}"
    );
    // Once stale (its writer died), it is removed and GC runs.
    std::fs::File::options()
        .write(true)
        .open(&lease)
        .unwrap()
        .set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(3600))
        .unwrap();
    let (left, deleted) = count(&["--grace", "0s"]);
    assert_eq!((left, deleted), (total, would));
    assert!(!lease.exists());
    let (left, deleted) = count(&["--grace", "0s"]);
    assert_eq!((left, deleted), (total - would, 0));
    assert_eq!(listed("indexes"), 1, "the root's");

    // The root still extracts; the collected image names a missing chunk.
    extract_with(&a, remote, &s.key, &d.join("a.img"), &env);
    let mut c = smr();
    c.args(["verify"]).arg(&b).args(["--store", remote]);
    with_env(&mut c);
    let err = fails(&mut c);
    assert!(err.contains("missing"), "{err}");
}
