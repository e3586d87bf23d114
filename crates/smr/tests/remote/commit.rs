//! `smr commit --push`: a volume on a registry image committed as a tagged
//! smr image into the base's repository (its packs reused) and into another
//! repository of the registry (the packs mounted, not uploaded), then
//! served lazily from there.

use crate::servers::Registry;
use crate::util::*;
use std::path::Path;
use std::process::Command;

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `smr extract IMAGE` into `DIR/NAME.img`, checked by e2fsck; returns the
/// contents of `/etc/committed` in it.
fn committed_file(image: &str, key: &Path, dir: &Path, name: &str) -> String {
    let img = dir.join(format!("{name}.img"));
    ok(smr()
        .args(["extract", image, "-o"])
        .arg(&img)
        .arg("--key-file")
        .arg(key));
    ok(Command::new("e2fsck").arg("-fn").arg(&img));
    let m = LoopMount::new(&img);
    std::fs::read_to_string(m.dir.path().join("etc/committed")).unwrap()
}

#[test]
fn a_committed_volume_is_pushed_by_tag_reusing_and_mounting_the_base_packs() {
    let Some(reg) = Registry::start(None) else {
        return;
    };
    let s = Synthetic::new();
    reg.push_layout(
        &s.t.path().join("layout"),
        smr_testkit::SYNTHETIC_TAG,
        "base/synth:v1",
        None,
    );
    let base = reg.image("base/synth:v1");
    let d = s.t.path();
    let node = |args: &[&str]| {
        let mut c = smr();
        c.args(args)
            .env("SMR_ROOT", d.join("root"))
            .env("SMR_KEY_FILE", &s.key)
            .env("SMR_CACHE_DIR", d.join("cache"));
        c
    };
    // One chunk per pack: the committed image shares whole packs.
    ok(&mut node(&[
        "convert",
        &base,
        "--push",
        "--no-optimize",
        "--pack-chunks",
        "1",
    ]));
    ok(&mut node(&["volume", "create", "vm", "--from", &base]));
    let (mnt, state) = (d.join("mnt"), d.join("state"));
    std::fs::create_dir_all(&mnt).unwrap();
    ok(node(&["mount", "--volume", "vm"])
        .arg(&mnt)
        .arg("--state-dir")
        .arg(&state));
    std::fs::write(mnt.join("etc/committed"), "committed and pushed\n").unwrap();
    ok(node(&["umount"]).arg(&mnt).arg("--state-dir").arg(&state));

    // Into the base's repository: the packs it shares with the base are
    // already there.
    let same = reg.image("base/synth:v2");
    let out = ok(&mut node(&["commit", "vm", "--push", &same]));
    let err = stderr(&out);
    assert!(err.contains(&format!("pushed {same}")), "{err}");
    assert!(!err.contains("mounted from"), "{err}");
    // "pushed REF (smr image D): uploaded N of M blobs …"
    let counts: Vec<u64> = err
        .split("): uploaded ")
        .nth(1)
        .unwrap_or_else(|| panic!("no upload counts in {err}"))
        .split_whitespace()
        .take(3)
        .filter_map(|w| w.parse().ok())
        .collect();
    let [uploaded, total] = counts[..] else {
        panic!("no upload counts in {err}")
    };
    let stored: u64 = err
        .split(" stored,")
        .next()
        .and_then(|t| t.rsplit('(').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no stored count in {err}"));
    // New packs (one chunk each), the pack index and the recipe; every
    // pack of unchanged chunks is the base's.
    assert_eq!(uploaded, stored + 2, "{err}");
    assert!(total > uploaded + 1, "{err}");
    assert_eq!(
        committed_file(&same, &s.key, d, "same"),
        "committed and pushed\n"
    );

    // Into another repository of the registry: mounted from the base's.
    let other = reg.image("team/synth:v2");
    let err = stderr(&ok(&mut node(&["commit", "vm", "--push", &other])));
    assert!(err.contains("mounted from other repositories"), "{err}");
    assert_eq!(
        committed_file(&other, &s.key, d, "other"),
        "committed and pushed\n"
    );
    // A second volume on the pushed image sees the change too, and the
    // pushed image is also what `smr verify` checks.
    ok(&mut node(&["volume", "create", "vm2", "--from", &other]));
    ok(&mut node(&["verify", &other]));

    // `smr convert --push --mount-from`: the same image in a third
    // repository gets its packs by mounts.
    reg.push_layout(
        &s.t.path().join("layout"),
        smr_testkit::SYNTHETIC_TAG,
        "mirror/synth:v1",
        None,
    );
    let mirror = reg.image("mirror/synth:v1");
    let convert = |from: &str| {
        node(&["convert", &mirror, "--push", "--no-optimize"])
            .args(["--pack-chunks", "1", "--mount-from", from])
            .output()
            .unwrap()
    };
    let elsewhere = convert("docker://other.example:5000/base/synth");
    assert!(!elsewhere.status.success());
    assert!(
        stderr(&elsewhere).contains("one registry"),
        "{}",
        stderr(&elsewhere)
    );
    let out = convert(&reg.image("base/synth"));
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("uploaded 1 of ") && err.contains("mounted from"),
        "{err}"
    );

    // Bad input: a digest instead of a tag, no output at all.
    let at_digest = format!("{}@sha256:{}", reg.image("team/synth"), "0".repeat(64));
    let e = fails(&mut node(&["commit", "vm", "--push", &at_digest]));
    assert!(e.contains("tag"), "{e}");
    let e = fails(&mut node(&["commit", "vm"]));
    assert!(e.contains("--out") || e.contains("--push"), "{e}");
}
