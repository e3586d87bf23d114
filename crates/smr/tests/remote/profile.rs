//! Startup profiles end to end: `smr run --record-profile`, `smr profile
//! push`, and later runs from an empty cache finding and replaying the
//! profile from the registry (or from `--profile FILE`).

use crate::registry::Mounted;
use crate::servers::{debian_layout, Registry};
use crate::util::*;
use std::path::Path;
use std::time::{Duration, Instant};

/// Entries in the node cache `dir`: the entry records of its segments'
/// journals (docs/FORMAT.md: 8 bytes of magic, then 64-byte records whose
/// byte 56 is 1 for an entry).
fn cached_chunks(dir: &Path) -> u64 {
    let Ok(files) = std::fs::read_dir(dir.join("segments")) else {
        return 0;
    };
    files
        .flatten()
        .filter(|f| f.file_name().to_string_lossy().ends_with(".idx"))
        .filter_map(|f| std::fs::read(f.path()).ok())
        .map(|j| {
            j.get(8..)
                .unwrap_or_default()
                .chunks_exact(64)
                .filter(|r| r[56] == 1)
                .count() as u64
        })
        .sum()
}

fn run(image: &str, cache: &Path, key: &Path, stats: &Path, extra: &[&str]) -> serde_json::Value {
    ok(smr()
        .arg("run")
        .arg(image)
        .arg("--cache-dir")
        .arg(cache)
        .arg("--key-file")
        .arg(key)
        .arg("--stats")
        .arg(stats)
        .args(extra)
        .args(["--", "python3", "-c", "import json, sqlite3"]));
    serde_json::from_slice(&std::fs::read(stats).unwrap()).unwrap()
}

#[test]
fn a_recorded_profile_is_pushed_then_found_and_replayed() {
    let Some(layout) = debian_layout() else {
        return;
    };
    let Some(reg) = Registry::start(None) else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let d = |n: &str| t.path().join(n);
    let key = key_file(t.path());
    reg.push_layout(&layout, "debian-python", "py:v1", None);
    let image = reg.image("py:v1");
    ok(smr()
        .arg("convert")
        .arg(&image)
        .arg("--push")
        .arg("--no-optimize")
        .args(["--chunking", "fixed"])
        .arg("--key-file")
        .arg(&key));

    // Record: the profile lists what the start read, nothing more.
    let prof = d("py.profile");
    let recorded = run(
        &image,
        &d("c1"),
        &key,
        &d("s1.json"),
        &["--record-profile", prof.to_str().unwrap()],
    );
    assert!(
        recorded["profile"].is_null(),
        "nothing to replay yet: {recorded}"
    );
    let show = ok(smr().args(["profile", "show", "--json"]).arg(&prof));
    let shown: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap();
    let listed = shown["chunks"].as_array().unwrap().len() as u64;
    let fetched = recorded["chunks_fetched"].as_u64().unwrap();
    assert!(
        listed > 10 && listed <= fetched,
        "{listed} listed, {fetched} fetched"
    );
    // The blocks: what the kernel read, at most.
    let blocks = shown["blocks_read_bytes"].as_u64().unwrap();
    let kernel = recorded["bytes_read"].as_u64().unwrap();
    assert!(
        blocks > 0 && blocks <= kernel,
        "{blocks} in blocks, {kernel} read"
    );
    // Listed as runs `[first, count]`, each block once.
    let runs = shown["blocks"].as_array().unwrap();
    let mut seen = std::collections::HashSet::new();
    for r in runs {
        let (first, count) = (r[0].as_u64().unwrap(), r[1].as_u64().unwrap());
        assert!(count > 0, "empty run {r}");
        for b in first..first + count {
            assert!(seen.insert(b), "block {b} listed twice");
        }
    }
    assert_eq!(seen.len() as u64 * 4096, blocks, "{shown}");
    // With the image: the bytes those chunks hold and their stored size
    // (what a replay fetches: the recording run fetched exactly them).
    let show = ok(smr()
        .args(["profile", "show", "--json", "--image"])
        .arg(&image)
        .arg(&prof));
    let shown: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap();
    // (Fixed 64 KiB chunks: the bytes are known from the count.)
    assert_eq!(shown["bytes"].as_u64(), Some(listed * 64 * 1024), "{shown}");
    let stored = shown["stored_bytes"].as_u64().unwrap();
    assert!(
        stored > 0 && stored <= recorded["bytes_fetched"].as_u64().unwrap(),
        "{shown}"
    );

    // Push it; every later start finds it next to the smr artifact.
    let pushed = ok(smr().args(["profile", "push"]).arg(&image).arg(&prof));
    assert!(String::from_utf8_lossy(&pushed.stdout).starts_with("sha256:"));
    let replayed = run(&image, &d("c2"), &key, &d("s2.json"), &[]);
    let p = &replayed["profile"];
    assert_eq!(p["chunks"].as_u64(), Some(listed), "{replayed}");
    assert_eq!(p["failed"].as_u64(), Some(0), "{replayed}");
    assert_eq!(
        p["fetched"].as_u64().unwrap() + p["cached"].as_u64().unwrap(),
        listed,
        "{replayed}"
    );
    // `smr mount` replays it too: the chunks arrive with no read at all.
    let (mnt, state, c6) = (d("mnt"), d("state"), d("c6"));
    let m = Mounted::new(&image, &mnt, &state, &c6, &key, &[]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while cached_chunks(&c6) < listed {
        assert!(
            Instant::now() < deadline,
            "{} of {listed} chunks cached",
            cached_chunks(&c6)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(m);
    // So does `smr serve-nbd`, before any client connects.
    let (nbd_dir, c7) = (d("nbd"), d("c7"));
    std::fs::create_dir_all(&nbd_dir).unwrap();
    let args: Vec<std::ffi::OsString> = vec![
        image.clone().into(),
        "--key-file".into(),
        key.clone().into(),
        "--cache-dir".into(),
        c7.clone().into(),
    ];
    let srv = NbdServe::start(&args, &nbd_dir);
    let deadline = Instant::now() + Duration::from_secs(60);
    while cached_chunks(&c7) < listed {
        assert!(
            Instant::now() < deadline,
            "{} of {listed} chunks cached: {}",
            cached_chunks(&c7),
            srv.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(srv);
    // The same profile from a file; and none at all with --no-profile.
    let from_file = run(
        &image,
        &d("c3"),
        &key,
        &d("s3.json"),
        &["--profile", prof.to_str().unwrap()],
    );
    assert_eq!(from_file["profile"]["chunks"].as_u64(), Some(listed));
    let without = run(&image, &d("c4"), &key, &d("s4.json"), &["--no-profile"]);
    assert!(without["profile"].is_null(), "{without}");

    // A profile of another recipe is refused with the file's name, by both
    // commands; garbage is named as such.
    let mut other = std::fs::read(&prof).unwrap();
    other[8] ^= 1;
    let bad = d("other.profile");
    std::fs::write(&bad, &other).unwrap();
    let e = fails(smr().args(["profile", "push"]).arg(&image).arg(&bad));
    assert!(e.contains("not this one"), "{e}");
    let e = fails(
        smr()
            .arg("run")
            .arg(&image)
            .arg("--cache-dir")
            .arg(d("c5"))
            .arg("--key-file")
            .arg(&key)
            .arg("--profile")
            .arg(&bad)
            .args(["--", "true"]),
    );
    assert!(
        e.contains("other.profile") && e.contains("not this one"),
        "{e}"
    );
    std::fs::write(&bad, b"not a profile").unwrap();
    let e = fails(smr().args(["profile", "show"]).arg(&bad));
    assert!(
        e.contains("other.profile") && e.contains("bad magic"),
        "{e}"
    );

    // Pushed with the owner key, the profile gets its startup pack (made
    // from the registry's chunks), and a start from an empty cache uses it.
    let pushed = ok(smr()
        .args(["profile", "push"])
        .arg(&image)
        .arg(&prof)
        .arg("--key-file")
        .arg(&key));
    let log = String::from_utf8_lossy(&pushed.stderr);
    assert!(log.contains("startup pack of"), "{log}");
    let packed = run(&image, &d("c8"), &key, &d("s8.json"), &[]);
    assert_eq!(
        packed["profile"]["startup_pack"].as_bool(),
        Some(true),
        "{packed}"
    );
    assert_eq!(packed["profile"]["failed"].as_u64(), Some(0), "{packed}");
}
