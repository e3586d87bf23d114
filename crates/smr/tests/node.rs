//! End-to-end tests of serving images: `smr mount`/`umount`, `smr run`,
//! `smr cache`, and cleanup after every kind of failure. They need root,
//! /dev/fuse, loop devices, overlayfs and runc, as CI has.
//!
//! The tests share the kernel's loop devices and FUSE connections and
//! check that none are left behind, so they run one at a time (`SERIAL`).

#![allow(clippy::unwrap_used)]

#[path = "e2e/util.rs"]
#[allow(dead_code)]
mod util;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use util::*;

static SERIAL: Mutex<()> = Mutex::new(());

/// A converted image with its own store, cache, state and run directories.
struct Env {
    t: tempfile::TempDir,
    recipe: PathBuf,
    store: PathBuf,
    key: PathBuf,
    fuse_before: usize,
}

impl Env {
    fn new(source: Option<&str>) -> Env {
        let t = tempfile::tempdir().unwrap();
        let src = match source {
            Some(s) => s.to_string(),
            None => {
                let dir = t.path().join("layout");
                smr_testkit::synthetic_everything(&dir).expect("synthetic layout");
                format!("oci:{}:{}", dir.display(), smr_testkit::SYNTHETIC_TAG)
            }
        };
        let (recipe, store) = (t.path().join("r"), t.path().join("store"));
        let key = key_file(t.path());
        convert(&src, &store, &recipe, &key, &[]);
        Env {
            recipe,
            store,
            key,
            fuse_before: fuse_connections(),
            t,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.t.path().join(name)
    }

    /// `smr SUB RECIPE --store --key-file --cache-dir` with private state.
    fn smr(&self, sub: &str) -> Command {
        self.smr_with(sub, &self.store)
    }

    /// Like `smr` with another store.
    fn smr_with(&self, sub: &str, store: &Path) -> Command {
        let mut c = smr();
        c.arg(sub)
            .arg(&self.recipe)
            .arg("--store")
            .arg(store)
            .arg("--key-file")
            .arg(&self.key)
            .arg("--cache-dir")
            .arg(self.path("cache"))
            .env("SMR_STATE_DIR", self.path("state"))
            .env("SMR_RUN_DIR", self.path("runs"));
        c
    }

    fn umount(&self, mnt: &Path) -> Command {
        let mut c = smr();
        c.arg("umount")
            .arg(mnt)
            .env("SMR_STATE_DIR", self.path("state"));
        c
    }

    /// Nothing of this test is mounted, attached or connected any more.
    fn assert_clean(&self) {
        let root = self.t.path().display().to_string();
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(
            !mounts.contains(&root),
            "mounts left under {root}:\n{mounts}"
        );
        let loops =
            String::from_utf8_lossy(&run(Command::new("losetup").arg("-a")).stdout).into_owned();
        assert!(!loops.contains(&root), "loop devices left: {loops}");
        let t = std::time::Instant::now();
        while fuse_connections() > self.fuse_before && t.elapsed().as_secs() < 5 {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        assert_eq!(fuse_connections(), self.fuse_before, "FUSE connection left");
        let state = self.path("state");
        let left: Vec<_> = std::fs::read_dir(&state)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "state left: {left:?}");
        let runs: Vec<_> = std::fs::read_dir(self.path("runs"))
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        assert!(runs.is_empty(), "run directories left: {runs:?}");
    }
}

fn fuse_connections() -> usize {
    std::fs::read_dir("/sys/fs/fuse/connections").map_or(0, |d| d.count())
}

fn lock() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A lazy mount from an empty cache shows exactly the tree of the
/// extracted image, loop-mounted; `smr umount` removes every trace.
#[test]
fn lazy_mount_equals_extracted_image() {
    let _g = lock();
    let e = Env::new(None);
    let img = e.path("img");
    extract(&e.recipe, &e.store, &e.key, &img);
    let plain = LoopMount::new(&img);
    let mnt = e.path("mnt");
    std::fs::create_dir(&mnt).unwrap();
    assert!(!e.path("cache").exists());
    ok(e.smr("mount").arg(&mnt).args(["--readahead-kb", "64"]));
    trees_equal(&mnt, plain.dir.path());
    drop(plain);
    // Mounting again on the same point is refused and changes nothing.
    let err = fails(e.smr("mount").arg(&mnt));
    assert!(err.contains("already"), "{err}");
    // The serving process adds its counters to the cache's stats file
    // within a second (smr_node::cache::FLUSH_EVERY).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let v = loop {
        let stats = ok(smr()
            .args(["cache", "stats", "--json", "--cache-dir"])
            .arg(e.path("cache")));
        let v: serde_json::Value = serde_json::from_slice(&stats.stdout).unwrap();
        if v["fetches"].as_u64().unwrap() > 0 || std::time::Instant::now() > deadline {
            break v;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    assert!(v["fetches"].as_u64().unwrap() > 0, "{v}");
    ok(&mut e.umount(&mnt));
    e.assert_clean();
    let err = fails(&mut e.umount(&mnt));
    assert!(err.contains("no smr mount"), "{err}");
    ok(smr()
        .args(["cache", "prune", "--to", "0", "--cache-dir"])
        .arg(e.path("cache")));
    let stats = ok(smr()
        .args(["cache", "stats", "--json", "--cache-dir"])
        .arg(e.path("cache")));
    let v: serde_json::Value = serde_json::from_slice(&stats.stdout).unwrap();
    assert_eq!(v["total_bytes"].as_u64(), Some(0), "{v}");
}

/// `smr mount` and `smr umount` given relative paths (state directory,
/// cache, recipe, store, key, mount point) from the directory they name.
#[test]
fn relative_paths_mount_and_unmount() {
    let _g = lock();
    let e = Env::new(None);
    std::fs::create_dir(e.path("mnt")).unwrap();
    let rel = |p: &Path| p.strip_prefix(e.t.path()).unwrap().to_path_buf();
    let (recipe, store, key) = (rel(&e.recipe), rel(&e.store), rel(&e.key));
    let mut mount = smr();
    mount
        .current_dir(e.t.path())
        .args([
            "mount",
            "--cache-dir",
            "cache",
            "--state-dir",
            "state",
            "--store",
        ])
        .arg(&store)
        .arg("--key-file")
        .arg(&key)
        .arg(&recipe)
        .arg("mnt");
    ok(&mut mount);
    let entries = std::fs::read_dir(e.path("mnt")).unwrap().count();
    assert!(entries > 0, "the image's tree is not mounted");
    let mut umount = smr();
    umount
        .current_dir(e.t.path())
        .args(["umount", "--state-dir", "state", "mnt"]);
    ok(&mut umount);
    e.assert_clean();
}

/// Bad mount points, a missing store or key, and a killed server: each
/// fails (or, for the killed server, unmounts) leaving nothing behind.
#[test]
fn mount_failures_leave_nothing_behind() {
    let _g = lock();
    let e = Env::new(None);
    let mnt = e.path("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let file = e.path("file");
    std::fs::write(&file, "x").unwrap();
    for (what, mut cmd) in [
        ("missing mount point", e.smr("mount")),
        ("file as mount point", e.smr("mount")),
    ] {
        let target = if what.starts_with("missing") {
            e.path("nope")
        } else {
            file.clone()
        };
        let err = fails(cmd.arg(&target));
        eprintln!("{what}: {err}");
        e.assert_clean();
    }
    let err = fails(e.smr_with("mount", &e.path("no-store")).arg(&mnt));
    assert!(err.contains("does not exist"), "{err}");
    assert!(!e.path("no-store").exists());
    e.assert_clean();
    let mut no_key = smr();
    no_key
        .arg("mount")
        .arg(&e.recipe)
        .arg("--store")
        .arg(&e.store)
        .arg("--cache-dir")
        .arg(e.path("cache"))
        .arg(&mnt)
        .env("SMR_STATE_DIR", e.path("state"));
    let err = fails(&mut no_key);
    assert!(err.contains("key"), "{err}");
    e.assert_clean();
    let empty_store = e.path("empty-store");
    std::fs::create_dir(&empty_store).unwrap();
    let err = fails(e.smr_with("mount", &empty_store).arg(&mnt));
    assert!(err.contains("lacks chunk"), "{err}");
    e.assert_clean();

    // A server killed under a live mount: reads fail, umount still cleans up.
    ok(e.smr("mount").arg(&mnt));
    let state_dir = std::fs::read_dir(e.path("state"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let st: serde_json::Value =
        serde_json::from_slice(&std::fs::read(state_dir.join("state.json")).unwrap()).unwrap();
    let pid = st["server_pid"].as_u64().unwrap().to_string();
    ok(Command::new("kill").args(["-9", &pid]));
    std::thread::sleep(std::time::Duration::from_millis(200));
    ok(&mut e.umount(&mnt));
    e.assert_clean();
}

/// `smr run` on the synthetic image: the exit code comes back, failures to
/// start clean up, and `--stats` has the promised fields.
#[test]
fn run_passes_exit_codes_and_cleans_up() {
    let _g = lock();
    let e = Env::new(None);
    let stats = e.path("stats.json");
    let out = run(e.smr("run").arg("--stats").arg(&stats).args([
        "--",
        "/bin/sh",
        "-c",
        "echo hi; exit 7",
    ]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.code() != Some(7) {
        // The synthetic image may lack a shell: then runc fails to exec.
        assert!(
            stderr.contains("exec") || stderr.contains("no such file"),
            "{stderr}"
        );
    } else {
        assert_eq!(String::from_utf8_lossy(&out.stdout), "hi\n");
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&stats).unwrap()).unwrap();
        for k in [
            "start_seconds",
            "bytes_fetched",
            "chunks_fetched",
            "image_bytes",
            "fetched_fraction",
        ] {
            assert!(v[k].is_number(), "{k} missing in {v}");
        }
    }
    e.assert_clean();
    let out = run(e.smr("run").args(["--", "/no/such/program"]));
    assert!(!out.status.success());
    e.assert_clean();
}

/// The real Debian + python3 image: `import json, sqlite3` succeeds, a
/// failing command's code comes back, nothing is left behind.
#[test]
fn run_debian_python() {
    let Some(layout) = debian_layout() else {
        return;
    };
    let _g = lock();
    let e = Env::new(Some(&format!("oci:{}:debian-python", layout.display())));
    let stats = e.path("stats.json");
    let out = run(e.smr("run").arg("--stats").arg(&stats).args([
        "--",
        "python3",
        "-c",
        "import json, sqlite3, resource; print('ok', resource.getrlimit(resource.RLIMIT_NOFILE))",
    ]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    // The container's open-file limit is its spec's (containerd's
    // default), not the one smr raised for its cache.
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ok (1024, 1024)\n");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&stats).unwrap()).unwrap();
    eprintln!("cold run stats: {v}");
    let frac = v["fetched_fraction"].as_f64().unwrap();
    assert!(frac > 0.0 && frac < 0.5, "{v}");
    assert!(v["start_seconds"].as_f64().unwrap() > 0.0, "{v}");
    e.assert_clean();
    let out = run(e
        .smr("run")
        .args(["-e", "CODE=7", "--", "sh", "-c", "exit $CODE"]));
    assert_eq!(out.status.code(), Some(7));
    e.assert_clean();
}

/// A `smr run` killed with SIGKILL leaves its container, mounts, loop
/// device and FUSE connection behind; the next `smr run` removes them.
#[test]
fn the_next_run_cleans_up_after_a_killed_one() {
    let Some(layout) = debian_layout() else {
        return;
    };
    let _g = lock();
    let e = Env::new(Some(&format!("oci:{}:debian-python", layout.display())));
    let mut victim = e
        .smr("run")
        .args(["--", "sleep", "61.25"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = || {
        std::fs::read_dir(e.path("runs"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|d| d.path().join("started").exists())
    };
    let t = std::time::Instant::now();
    while !started() {
        assert!(t.elapsed().as_secs() < 60, "the container never started");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    victim.kill().unwrap(); // SIGKILL
    victim.wait().unwrap();
    let root = e.t.path().display().to_string();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        mounts.contains(&root),
        "the killed run left nothing to clean up"
    );

    let alive = || {
        run(Command::new("pgrep").args(["-f", "sleep 61.25"]))
            .status
            .success()
    };

    let out = run(e.smr("run").args(["--", "true"]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    e.assert_clean();
    assert!(!alive(), "the dead run's container was removed");
}

#[path = "node/isolation.rs"]
mod isolation;
