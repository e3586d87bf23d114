//! Real Debian images (debootstrap minbase, and minbase + python3 as a second
//! layer), built by scripts/build-test-images.sh.

use super::util::*;
use std::path::Path;

/// debian and debian-python converted with `extra` into one store; checks
/// that the python image reuses at least 90% of the base's chunks.
struct Pair {
    t: tempfile::TempDir,
    layout: std::path::PathBuf,
    store: std::path::PathBuf,
    key: std::path::PathBuf,
    base: std::path::PathBuf,
    py: std::path::PathBuf,
}

impl Pair {
    fn convert(extra: &[&str]) -> Option<Pair> {
        let layout = debian_layout()?;
        let t = tempfile::tempdir().unwrap();
        let store = t.path().join("store");
        let key = key_file(t.path());
        let (base, py) = (t.path().join("debian.recipe"), t.path().join("py.recipe"));
        let src = |tag: &str| format!("oci:{}:{tag}", layout.display());
        convert(&src("debian"), &store, &base, &key, extra);
        let out = convert(&src("debian-python"), &store, &py, &key, extra);
        let summary = String::from_utf8_lossy(&out.stderr);
        assert!(summary.contains("reused"), "{summary}");
        let cmp = ok(smr()
            .arg("inspect")
            .arg("--json")
            .arg(&base)
            .arg("--compare")
            .arg(&py));
        let v: serde_json::Value = serde_json::from_slice(&cmp.stdout).unwrap();
        let shared = v["shared_fraction"].as_f64().unwrap();
        eprintln!(
            "base chunks shared by base+python ({extra:?}): {:.1}%",
            shared * 100.0
        );
        assert!(
            shared >= 0.90,
            "only {:.1}% of the base image's chunks are shared ({extra:?})",
            shared * 100.0
        );
        Some(Pair {
            t,
            layout,
            store,
            key,
            base,
            py,
        })
    }

    /// Extracts `recipe` to `tag.img`, checks it with e2fsck and that its
    /// mounted tree equals `umoci unpack` of `tag`; returns the image.
    fn extract_and_compare(&self, recipe: &Path, tag: &str) -> std::path::PathBuf {
        let img = self.t.path().join(format!("{tag}.img"));
        extract(recipe, &self.store, &self.key, &img);
        fsck_clean(&img);
        let m = LoopMount::new(&img);
        let unpacked = tempfile::tempdir().unwrap();
        let rootfs = umoci_unpack(&self.layout, tag, unpacked.path());
        trees_equal(m.dir.path(), &rootfs);
        img
    }
}

/// Both images convert with fixed chunks, pass e2fsck, and their mounted
/// trees equal `umoci unpack`'s; the base image's chunks are shared by the
/// python image.
#[test]
fn debian_images_convert_mount_and_share_chunks() {
    let Some(p) = Pair::convert(&["--chunking", "fixed"]) else {
        return;
    };
    for (recipe, tag) in [(&p.base, "debian"), (&p.py, "debian-python")] {
        let img = p.extract_and_compare(recipe, tag);
        std::fs::remove_file(&img).unwrap();
    }
}

/// Content-defined chunks (the default): both images convert, the
/// python image reuses the base's chunks, its extracted image passes
/// e2fsck and mounts as `umoci unpack`'s tree, and a lazy NBD export of it
/// (every chunk fetched, verified and cut out at its own length) reads
/// back byte for byte.
#[test]
fn debian_images_with_content_defined_chunks() {
    let Some(p) = Pair::convert(&["--compress", "zstd"]) else {
        return;
    };
    let (t, store, key, py) = (&p.t, &p.store, &p.key, &p.py);
    let info = ok(smr().arg("inspect").arg("--json").arg(py));
    let v: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(v["format_version"], 3);
    assert_eq!(v["chunking"]["kind"], "cdc");
    let lens: std::collections::HashSet<u64> = v["chunks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["len"].as_u64().unwrap())
        .collect();
    assert!(lens.len() > 10, "chunk lengths vary: {lens:?}");
    let img = p.extract_and_compare(py, "debian-python");

    let mut args: Vec<std::ffi::OsString> = vec![py.clone().into()];
    for (flag, value) in [
        ("--store", store.as_path()),
        ("--key-file", key.as_path()),
        ("--cache-dir", &t.path().join("cache")),
    ] {
        args.push(flag.into());
        args.push(value.as_os_str().into());
    }
    args.extend(["--name", "img"].map(std::ffi::OsString::from));
    let srv = NbdServe::start(&args, t.path());
    let copy = t.path().join("copy");
    ok(std::process::Command::new("nbdcopy")
        .arg(srv.uri())
        .arg(&copy));
    assert!(
        std::fs::read(&copy).unwrap() == std::fs::read(&img).unwrap(),
        "the lazy export differs from the extracted image"
    );
}
