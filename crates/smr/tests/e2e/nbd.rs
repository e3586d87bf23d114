//! `smr serve-nbd` with the lazy image, against real NBD clients.

use super::util::*;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// `smr serve-nbd` of recipes from one local store.
struct Server;

impl Server {
    fn start(recipe: &Path, store: &Path, key: &Path, cache: &Path, dir: &Path) -> NbdServe {
        Self::start_many(&[recipe], &["--name", "img"], store, key, cache, dir)
    }

    /// `smr serve-nbd RECIPES... --store --key-file --cache-dir EXTRA...`
    /// on `dir/nbd.sock`.
    fn start_many(
        recipes: &[&Path],
        extra: &[&str],
        store: &Path,
        key: &Path,
        cache: &Path,
        dir: &Path,
    ) -> NbdServe {
        let mut args: Vec<OsString> = recipes.iter().map(|r| r.as_os_str().into()).collect();
        for (flag, value) in [
            ("--store", store),
            ("--key-file", key),
            ("--cache-dir", cache),
        ] {
            args.push(flag.into());
            args.push(value.as_os_str().into());
        }
        args.extend(extra.iter().map(OsString::from));
        NbdServe::start(&args, dir)
    }
}

/// Converts the synthetic image with 64 KiB chunks; returns (recipe, store, key, extracted image).
fn setup(dir: &Path) -> (PathBuf, PathBuf, PathBuf, PathBuf) {
    smr_testkit::synthetic_everything(&dir.join("layout")).unwrap();
    let src = format!(
        "oci:{}:{}",
        dir.join("layout").display(),
        smr_testkit::SYNTHETIC_TAG
    );
    let (store, recipe, img) = (dir.join("store"), dir.join("r"), dir.join("img"));
    let key = key_file(dir);
    convert(&src, &store, &recipe, &key, &["--chunk-size", "64K"]);
    extract(&recipe, &store, &key, &img);
    (recipe, store, key, img)
}

/// nbdcopy of the export equals `smr extract`'s image, qemu-img agrees, and
/// `nbdinfo --map` shows the zero chunks as holes — from an empty cache,
/// then from the warm one.
#[test]
fn nbd_export_matches_extracted_image() {
    let t = tempfile::tempdir().unwrap();
    let (recipe, store, key, img) = setup(t.path());
    let srv = Server::start(&recipe, &store, &key, &t.path().join("cache"), t.path());
    let copy = t.path().join("copy");
    ok(Command::new("nbdcopy").arg(srv.uri()).arg(&copy));
    assert!(
        std::fs::read(&copy).unwrap() == std::fs::read(&img).unwrap(),
        "nbdcopy differs from extract"
    );
    let out = ok(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&img)
        .arg(srv.uri()));
    assert!(String::from_utf8_lossy(&out.stdout).contains("identical"));
    // Again from the warm cache: now the reads are answered on the
    // server's event loop (`read_parts_now`), not on its blocking threads.
    let warm = t.path().join("warm-copy");
    ok(Command::new("nbdcopy").arg(srv.uri()).arg(&warm));
    assert!(
        std::fs::read(&warm).unwrap() == std::fs::read(&img).unwrap(),
        "warm nbdcopy differs from extract"
    );
    let info = ok(Command::new("qemu-img").arg("info").arg(srv.uri()));
    let size = std::fs::metadata(&img).unwrap().len();
    assert!(String::from_utf8_lossy(&info.stdout).contains(&size.to_string()));

    // Every zero chunk (absent from the recipe) is reported as a hole.
    let v: serde_json::Value =
        serde_json::from_slice(&ok(smr().arg("inspect").arg("--json").arg(&recipe)).stdout)
            .unwrap();
    let stored: std::collections::HashSet<u64> = v["chunks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["index"].as_u64().unwrap())
        .collect();
    let map = ok(Command::new("nbdinfo")
        .args(["--map", "--json"])
        .arg(srv.uri()));
    let runs: serde_json::Value = serde_json::from_slice(&map.stdout).unwrap();
    let cs = 65536u64;
    let mut holes = 0;
    for r in runs.as_array().unwrap() {
        let (off, len, ty) = (
            r["offset"].as_u64().unwrap(),
            r["length"].as_u64().unwrap(),
            r["type"].as_u64().unwrap(),
        );
        let hole = ty & 1 == 1;
        for i in off / cs..(off + len).div_ceil(cs) {
            assert_eq!(hole, !stored.contains(&i), "chunk {i} at run {r}");
        }
        holes += u64::from(hole) * len;
    }
    let zero_chunks = v["zero_chunks"].as_u64().unwrap();
    assert!(
        zero_chunks > 0 && holes > 0,
        "the synthetic image has zero chunks"
    );
}

/// A chunk corrupted in the store gives EIO on exactly the reads touching
/// it, a log line naming it, and the other reads succeed.
#[test]
fn nbd_corrupt_chunk_fails_only_its_reads() {
    let t = tempfile::tempdir().unwrap();
    let (recipe, store, key, img) = setup(t.path());
    let v: serde_json::Value =
        serde_json::from_slice(&ok(smr().arg("inspect").arg("--json").arg(&recipe)).stdout)
            .unwrap();
    let bad = &v["chunks"][1];
    let (id, index) = (
        bad["id"].as_str().unwrap().to_string(),
        bad["index"].as_u64().unwrap(),
    );
    corrupt_chunk(&store, &id, 5, 0x80);
    let srv = Server::start(&recipe, &store, &key, &t.path().join("cache"), t.path());
    let cs = 65536u64;
    let read = |off: u64, len: u64| {
        // Debian's python3 has the nbd module (python3-libnbd); a python3
        // earlier on PATH may not.
        run(Command::new("/usr/bin/python3")
            .args(["-m", "nbd"])
            .arg("-u")
            .arg(srv.uri())
            .arg("-c")
            .arg(format!(
                "import sys; sys.stdout.buffer.write(h.pread({len}, {off}))"
            )))
    };
    let bad_read = read(index * cs + 100, 4096);
    assert!(
        !bad_read.status.success(),
        "read of the corrupt chunk must fail"
    );
    let good = read(0, 4096);
    assert!(
        good.status.success(),
        "{}",
        String::from_utf8_lossy(&good.stderr)
    );
    let expect = std::fs::read(&img).unwrap();
    assert_eq!(good.stdout, &expect[..4096]);
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        srv.log().contains(&id),
        "log names the chunk: {}",
        srv.log()
    );
}

/// One `smr serve-nbd` serves several recipes, each under its own export
/// name (the recipe's file name by default, `--name` per recipe otherwise),
/// through one cache; each export reads as its own image.
#[test]
fn one_server_exports_several_images() {
    let t = tempfile::tempdir().unwrap();
    let (small, store, key, img) = setup(t.path());
    let src = format!(
        "oci:{}:{}",
        t.path().join("layout").display(),
        smr_testkit::SYNTHETIC_TAG
    );
    let (a, b) = (t.path().join("a.recipe"), t.path().join("b.recipe"));
    std::fs::copy(&small, &a).unwrap();
    convert(&src, &store, &b, &key, &["--chunk-size", "256K"]);
    let cache = t.path().join("cache");
    let expect = std::fs::read(&img).unwrap();
    // The ext4 layout depends on the chunk size: b is another image.
    let img_b = t.path().join("img-b");
    extract(&b, &store, &key, &img_b);
    let expect_b = std::fs::read(&img_b).unwrap();

    let srv = Server::start_many(&[&a, &b], &[], &store, &key, &cache, t.path());
    let list = ok(Command::new("nbdinfo").arg("--list").arg(srv.uri_of("a")));
    let listed = String::from_utf8_lossy(&list.stdout);
    assert!(
        listed.contains("export=\"a\"") && listed.contains("export=\"b\""),
        "{listed}"
    );
    for (name, want) in [("a", &expect), ("b", &expect_b)] {
        let copy = t.path().join(format!("copy-{name}"));
        ok(Command::new("nbdcopy").arg(srv.uri_of(name)).arg(&copy));
        assert!(
            std::fs::read(&copy).unwrap() == *want,
            "export {name} differs"
        );
    }
    drop(srv);

    // Explicit names, one per recipe; the same image twice is fine.
    let srv = Server::start_many(
        &[&a, &a],
        &["--name", "one", "--name", "two"],
        &store,
        &key,
        &cache,
        t.path(),
    );
    for name in ["one", "two"] {
        let size = ok(Command::new("nbdinfo").arg("--size").arg(srv.uri_of(name)));
        assert_eq!(
            String::from_utf8_lossy(&size.stdout).trim(),
            expect.len().to_string()
        );
    }
    drop(srv);

    // Two exports with one name, or a --name count that does not match,
    // are refused before serving.
    let err = fails(
        smr()
            .arg("serve-nbd")
            .args([&a, &a])
            .arg("--store")
            .arg(&store)
            .arg("--key-file")
            .arg(&key)
            .arg("--cache-dir")
            .arg(&cache)
            .arg("--socket")
            .arg(t.path().join("x.sock")),
    );
    assert!(err.contains("--name"), "{err}");
    let err = fails(
        smr()
            .arg("serve-nbd")
            .args([&a, &b])
            .args(["--name", "only-one"])
            .arg("--store")
            .arg(&store)
            .arg("--cache-dir")
            .arg(&cache)
            .arg("--socket")
            .arg(t.path().join("x.sock")),
    );
    assert!(err.contains("one --name per image"), "{err}");
    // A profile file belongs to one image.
    let err = fails(
        smr()
            .arg("serve-nbd")
            .args([&a, &b])
            .arg("--profile")
            .arg(t.path().join("py.profile"))
            .arg("--store")
            .arg(&store)
            .arg("--cache-dir")
            .arg(&cache)
            .arg("--socket")
            .arg(t.path().join("x.sock")),
    );
    assert!(err.contains("--profile is for one image"), "{err}");
}

/// Listening beyond loopback warns that exports are unauthenticated; on
/// loopback it does not.
#[test]
fn serving_beyond_loopback_warns() {
    let t = tempfile::tempdir().unwrap();
    let (recipe, store, key, _) = setup(t.path());
    for (listen, warns) in [("0.0.0.0:0", true), ("127.0.0.1:0", false)] {
        let log = t.path().join("serve.log");
        let mut child = smr()
            .arg("serve-nbd")
            .arg(&recipe)
            .arg("--store")
            .arg(&store)
            .arg("--key-file")
            .arg(&key)
            .arg("--cache-dir")
            .arg(t.path().join("cache"))
            .args(["--listen", listen])
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let start = std::time::Instant::now();
        let text = loop {
            let text = std::fs::read_to_string(&log).unwrap();
            if text.contains("serving export") {
                break text;
            }
            assert!(start.elapsed() < Duration::from_secs(20), "{text}");
            std::thread::sleep(Duration::from_millis(50));
        };
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(
            text.contains("no authentication"),
            warns,
            "{listen}: {text}"
        );
    }
}
