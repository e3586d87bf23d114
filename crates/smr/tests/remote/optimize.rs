//! Startup profiles made at conversion: `smr convert --push` runs the new
//! image (its Cmd, or `--optimize-cmd`), records what each start read and
//! pushes the merged profile; later starts from an empty cache replay it.
//! Start commands that fail, hang or try the network never fail the
//! conversion.

use crate::servers::{debian_layout, Registry};
use crate::util::*;
use std::path::Path;

fn convert(image: &str, key: &Path, extra: &[&str]) -> String {
    let out = ok(smr()
        .arg("convert")
        .arg(image)
        .arg("--push")
        .arg("--key-file")
        .arg(key)
        .args(extra));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn run(image: &str, dir: &Path, key: &Path, cmd: &[&str]) -> (serde_json::Value, String) {
    let stats = dir.join("stats.json");
    let out = ok(smr()
        .arg("run")
        .arg(image)
        .arg("--cache-dir")
        .arg(dir.join("cache"))
        .arg("--key-file")
        .arg(key)
        .arg("--stats")
        .arg(&stats)
        .arg("--")
        .args(cmd));
    let v = serde_json::from_slice(&std::fs::read(&stats).unwrap()).unwrap();
    (v, String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `smr mount` of an image whose profile has a startup pack: the loop
/// device is attached with the startup settings (8 KiB readahead, through
/// the page cache of the FUSE file, which the server fills with the pack's
/// blocks before the start reads them) and put back to the normal ones
/// once the start the profile was made of has run and reads stopped.
fn mounted_from_the_pack(image: &str, dir: &Path, key: &Path) {
    let (mnt, state) = (dir.join("mnt"), dir.join("state"));
    let m = crate::registry::Mounted::new(image, &mnt, &state, &dir.join("mc"), key, &[]);
    let sub: Vec<_> = std::fs::read_dir(&state).unwrap().flatten().collect();
    let json = std::fs::read(sub[0].path().join("state.json")).unwrap();
    let st: serde_json::Value = serde_json::from_slice(&json).unwrap();
    assert_eq!(st["readahead_kb"].as_u64(), Some(8), "{st}");
    assert_eq!(st["direct_io"].as_bool(), Some(false), "{st}");
    assert_eq!(
        st["after_start"]["readahead_kb"].as_u64(),
        Some(128),
        "{st}"
    );
    let version = std::fs::read_to_string(mnt.join("etc/debian_version")).unwrap();
    assert!(version.starts_with("12"), "{version}");
    let dev = st["loop_dev"].as_str().unwrap().trim_start_matches("/dev/");
    let sys = |a: &str| std::fs::read_to_string(format!("/sys/block/{dev}/{a}")).unwrap();
    // A mounted image nothing starts from keeps the startup settings
    // (longer than the second of quiet that ends a start).
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert_eq!(sys("queue/read_ahead_kb").trim(), "8");
    // Meanwhile the pack's blocks went to the FUSE file's page cache: far
    // more than mounting read (superblock, group descriptors, root: tens
    // of KiB with an 8 KiB readahead).
    let file = st["file"].as_str().unwrap();
    let resident = std::process::Command::new("fincore")
        .args(["--bytes", "--noheadings", "--output", "RES", file])
        .output()
        .unwrap();
    let resident: u64 = String::from_utf8_lossy(&resident.stdout)
        .trim()
        .parse()
        .unwrap();
    assert!(
        resident >= 1 << 20,
        "{resident} bytes of the FUSE file cached"
    );
    // The start the profile was made of, run on the mount.
    let out = std::process::Command::new("chroot")
        .arg(&mnt)
        .args(["python3", "-c", "import json, sqlite3"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while (sys("queue/read_ahead_kb").trim(), sys("loop/dio").trim()) != ("128", "0") {
        assert!(std::time::Instant::now() < deadline, "not retuned: {st}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(
        std::fs::read_to_string(mnt.join("etc/debian_version")).unwrap(),
        version
    );
    drop(m);
}

/// The startup pack blob named by the profile manifest whose push `log`
/// reports ("pushed startup profile sha256:…").
fn startup_pack_of(reg: &Registry, log: &str) -> String {
    let manifest = log
        .split("pushed startup profile ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no profile push in {log}"));
    let url = format!("http://{}/v2/py/manifests/{manifest}", reg.addr);
    let out = ok(std::process::Command::new("curl").args([
        "-fsS",
        "-H",
        "Accept: application/vnd.oci.image.manifest.v1+json",
        &url,
    ]));
    let m: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let pack = m["layers"][1]["digest"]
        .as_str()
        .unwrap_or_else(|| panic!("{m}"));
    pack.to_string()
}

/// A registry holding debian-python as `py:v1`, and an owner key.
struct Setup {
    layout: std::path::PathBuf,
    reg: Registry,
    t: tempfile::TempDir,
    key: std::path::PathBuf,
    image: String,
}

/// `None` (test skipped) without the tools or images.
fn setup() -> Option<Setup> {
    let layout = debian_layout()?;
    let reg = Registry::start(None)?;
    let t = tempfile::tempdir().unwrap();
    let key = key_file(t.path());
    reg.push_layout(&layout, "debian-python", "py:v1", None);
    let image = reg.image("py:v1");
    Some(Setup {
        layout,
        reg,
        t,
        key,
        image,
    })
}

#[test]
fn convert_push_records_a_profile_that_later_starts_replay() {
    // The registry runs as long as `_reg` lives.
    let Some(Setup {
        layout: _,
        reg,
        t,
        key,
        image,
    }) = setup()
    else {
        return;
    };
    // No flag: the image's own Cmd (python3, stdin empty) is run.
    let log = convert(&image, &key, &[]);
    assert!(
        log.contains("startup profile: the image's Entrypoint + Cmd exited 0"),
        "{log}"
    );
    // A start that exits 0 is recorded twice, the reads merged.
    assert!(
        log.contains("Entrypoint + Cmd, run 2 of 2, exited 0; read ")
            && log.contains("blocks the runs before did not"),
        "{log}"
    );
    let (s, _) = run(&image, &t.path().join("a"), &key, &["true"]);
    let default_chunks = s["profile"]["chunks"].as_u64().unwrap();
    assert!(default_chunks > 0, "{s}");

    // A given command replaces it; the newer profile is the one found.
    let log = convert(
        &image,
        &key,
        &["--optimize-cmd", "python3 -c 'import json, sqlite3'"],
    );
    assert!(
        log.contains("python3 -c 'import json, sqlite3' exited 0"),
        "{log}"
    );
    let pack = startup_pack_of(&reg, &log);
    let (s, out) = run(
        &image,
        &t.path().join("b"),
        &key,
        &[
            "python3",
            "-c",
            "import json, sqlite3; print(sqlite3.sqlite_version)",
        ],
    );
    assert!(out.trim().starts_with('3'), "{out}");
    let p = &s["profile"];
    assert!(log.contains("startup pack of"), "{log}");
    assert_eq!(p["startup_pack"].as_bool(), Some(true), "{s}");
    assert!(p["chunks"].as_u64().unwrap() > 0, "{s}");
    assert_eq!(p["failed"].as_u64(), Some(0), "{s}");
    // Read once, from the referrers listing on (the lookup begins it).
    assert_eq!(reg.gets_of(&pack), 1, "GETs of the startup pack {pack}");
    mounted_from_the_pack(&image, t.path(), &key);
    // Read once more, by the image server (not by the `smr mount` that
    // looked the image up for it).
    assert_eq!(reg.gets_of(&pack), 2, "GETs of the startup pack {pack}");
    // A start the profile was not made for still runs correctly.
    let (_, out) = run(
        &image,
        &t.path().join("c"),
        &key,
        &["sh", "-c", "wc -c < /etc/debian_version"],
    );
    assert!(out.trim().parse::<u64>().unwrap() > 0, "{out}");
}

#[test]
fn start_commands_that_fail_hang_or_use_the_network_never_fail_the_conversion() {
    let Some(Setup {
        layout,
        reg,
        t,
        key,
        image,
    }) = setup()
    else {
        return;
    };
    let network =
        format!(
        "python3 -c 'import urllib.request; urllib.request.urlopen(\"http://{}/v2/\", timeout=3)'",
        image.trim_start_matches("docker://").split('/').next().unwrap()
    );
    let log = convert(
        &image,
        &key,
        &[
            "--optimize-period",
            "3s",
            "--optimize-cmd",
            "sh -c 'cat /etc/os-release; exit 3'",
            "--optimize-cmd",
            "sleep 1000",
            "--optimize-cmd",
            &network,
            "--optimize-cmd",
            "/no/such/binary",
            "--optimize-cmd",
            "'unbalanced",
        ],
    );
    assert!(log.contains("exit 3' failed with exit code 3"), "{log}");
    assert!(
        log.contains("sleep 1000 ran for the whole 3s and was stopped"),
        "{log}"
    );
    // No network in the recording container: the request fails.
    assert!(
        log.contains("urlopen") && log.contains("failed with exit code 1"),
        "{log}"
    );
    assert!(log.contains("/no/such/binary failed"), "{log}");
    assert!(
        !log.contains("run 2 of 2"),
        "a start that fails or hangs is not run again: {log}"
    );
    assert!(
        log.contains("'unbalanced") && log.contains("not a valid shell command line"),
        "{log}"
    );
    assert!(log.contains("startup profile of "), "{log}");
    // What they read was pushed and serves a correct start.
    let (s, out) = run(
        &image,
        &t.path().join("a"),
        &key,
        &["cat", "/etc/debian_version"],
    );
    assert!(s["profile"]["chunks"].as_u64().unwrap() > 0, "{s}");
    assert!(out.trim().starts_with("12"), "{out}");

    // --no-optimize pushes none; --optimize-cmd without --push is refused.
    let other = tempfile::tempdir().unwrap();
    let key2 = key_file(other.path());
    reg.push_layout(&layout, "debian-python", "py2:v1", None);
    let image2 = reg.image("py2:v1");
    let log = convert(&image2, &key2, &["--no-optimize"]);
    assert!(!log.contains("startup profile"), "{log}");
    let (s, _) = run(&image2, &other.path().join("a"), &key2, &["true"]);
    assert!(s["profile"].is_null(), "{s}");
    let err = fails(
        smr()
            .args(["convert", "oci:/nonexistent:x", "--store", "s", "-o", "r"])
            .args(["--optimize-cmd", "true"]),
    );
    assert!(
        err.contains("--optimize-cmd records a startup profile"),
        "{err}"
    );
}
