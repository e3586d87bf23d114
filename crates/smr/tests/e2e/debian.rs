//! Real Debian images (debootstrap minbase, and minbase + python3 as a second
//! layer), built by scripts/build-test-images.sh.

use super::util::*;

/// Both images convert, pass e2fsck, and debian-python's mounted tree equals
/// `umoci unpack`; the base image's chunks are shared by the python image.
#[test]
fn debian_images_convert_mount_and_share_chunks() {
    let Some(layout) = debian_layout() else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let store = t.path().join("store");
    let key = key_file(t.path());
    let (base, py) = (t.path().join("debian.recipe"), t.path().join("py.recipe"));
    convert(
        &format!("oci:{}:debian", layout.display()),
        &store,
        &base,
        &key,
        &[],
    );
    let out = convert(
        &format!("oci:{}:debian-python", layout.display()),
        &store,
        &py,
        &key,
        &[],
    );
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
    eprintln!("base chunks shared by base+python: {:.1}%", shared * 100.0);
    assert!(
        shared >= 0.90,
        "only {:.1}% of the base image's chunks are shared",
        shared * 100.0
    );

    for (recipe, tag) in [(&base, "debian"), (&py, "debian-python")] {
        let img = t.path().join(format!("{tag}.img"));
        extract(recipe, &store, &key, &img);
        fsck_clean(&img);
        let m = LoopMount::new(&img);
        let unpacked = tempfile::tempdir().unwrap();
        let rootfs = umoci_unpack(&layout, tag, unpacked.path());
        trees_equal(m.dir.path(), &rootfs);
        drop(m);
        std::fs::remove_file(&img).unwrap();
    }
}

/// Content-defined chunks (`--chunking cdc`): both images convert, the
/// python image reuses the base's chunks, its extracted image passes
/// e2fsck and mounts as `umoci unpack`'s tree, and a lazy NBD export of it
/// (every chunk fetched, verified and cut out at its own length) reads
/// back byte for byte.
#[test]
fn debian_images_with_content_defined_chunks() {
    let Some(layout) = debian_layout() else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let store = t.path().join("store");
    let key = key_file(t.path());
    let (base, py) = (t.path().join("debian.recipe"), t.path().join("py.recipe"));
    let cdc = ["--chunking", "cdc", "--compress", "zstd"];
    convert(
        &format!("oci:{}:debian", layout.display()),
        &store,
        &base,
        &key,
        &cdc,
    );
    let out = convert(
        &format!("oci:{}:debian-python", layout.display()),
        &store,
        &py,
        &key,
        &cdc,
    );
    let summary = String::from_utf8_lossy(&out.stderr);
    assert!(summary.contains("reused"), "{summary}");
    let info = ok(smr().arg("inspect").arg("--json").arg(&py));
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
    let cmp = ok(smr()
        .arg("inspect")
        .arg("--json")
        .arg(&base)
        .arg("--compare")
        .arg(&py));
    let v: serde_json::Value = serde_json::from_slice(&cmp.stdout).unwrap();
    let shared = v["shared_fraction"].as_f64().unwrap();
    assert!(
        shared >= 0.90,
        "only {:.1}% of the base's chunks are shared",
        shared * 100.0
    );

    let img = t.path().join("py.img");
    extract(&py, &store, &key, &img);
    fsck_clean(&img);
    let m = LoopMount::new(&img);
    let unpacked = tempfile::tempdir().unwrap();
    let rootfs = umoci_unpack(&layout, "debian-python", unpacked.path());
    trees_equal(m.dir.path(), &rootfs);
    drop(m);

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
