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
