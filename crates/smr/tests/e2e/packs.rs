//! The packed layout of a local store: a store of chunk files migrated
//! into packs, conversions killed at random points, and conversions into
//! one store at the same time. What must hold: every recipe verifies, and
//! no index names bytes that are not there.

use super::util::*;
use smr_store::ChunkStore;
use std::path::Path;

/// Every chunk every index of the store names is there, whole: its bytes
/// hash to its name. Returns how many were checked.
fn indexes_name_only_stored_bytes(store: &Path) -> usize {
    let s = smr_store::LocalStore::open(store).unwrap();
    let packed = s.packed_chunks();
    for (id, _) in &packed {
        let bytes = s
            .get(id)
            .unwrap_or_else(|e| panic!("indexed chunk {id}: {e}"));
        assert_eq!(smr_format::ChunkId::of(&bytes), *id, "indexed chunk {id}");
    }
    packed.len()
}

/// A synthetic image with a layer of `mib` MiB of data no other image has
/// (so a conversion has something to write for a while).
fn image_with_data(dir: &Path, tag: &str, mib: usize) -> String {
    let mut img = smr_testkit::synthetic_image();
    let mut extra = smr_testkit::LayerBuilder::new();
    let mut data = vec![0u8; mib << 20];
    let mut x: u64 = tag.bytes().fold(0x9e37_79b9_7f4a_7c15, |h, b| {
        h.rotate_left(5) ^ u64::from(b)
    });
    for b in data.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    extra.file("opt/data", &data, 0o644);
    img.layer(extra.into_bytes(), smr_testkit::Compression::None);
    img.write_oci_layout(dir, Some(tag)).unwrap();
    format!("oci:{}:{tag}", dir.display())
}

#[test]
fn a_store_of_chunk_files_migrates_into_packs() {
    let s = Synthetic::new();
    convert(&s.src, &s.store, &s.recipe, &s.key, &[]);
    extract(&s.recipe, &s.store, &s.key, &s.img);
    assert!(s.store.join("packs").is_dir() && s.store.join("indexes").is_dir());
    let old = s.t.path().join("old");
    per_chunk_copy(&s.recipe, &s.store, &old);
    // The per-chunk layout is still read.
    let from_old = s.t.path().join("old.img");
    extract(&s.recipe, &old, &s.key, &from_old);
    assert!(std::fs::read(&from_old).unwrap() == std::fs::read(&s.img).unwrap());

    let new = s.t.path().join("new");
    let migrate = || {
        run(smr()
            .args(["store", "migrate"])
            .arg(&old)
            .arg(&new)
            .arg(&s.recipe))
    };
    let o = migrate();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let chunk_files = std::fs::read_dir(new.join("chunks")).unwrap().count();
    assert_eq!(chunk_files, 0, "no chunk files in the new store");
    let img = s.t.path().join("new.img");
    extract(&s.recipe, &new, &s.key, &img);
    assert!(std::fs::read(&img).unwrap() == std::fs::read(&s.img).unwrap());
    assert!(indexes_name_only_stored_bytes(&new) > 0);
    // Again: nothing new to write.
    let o = migrate();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && err.contains(" 0 chunks"), "{err}");

    // A corrupt chunk in the old store stops the migration, naming it,
    // and leaves no index and no temp file for that recipe.
    let ids: Vec<smr_format::ChunkId> =
        smr_format::Recipe::decode(&std::fs::read(&s.recipe).unwrap())
            .unwrap()
            .chunks
            .iter()
            .map(|c| c.id)
            .collect();
    let bad = ids[ids.len() / 2].to_hex();
    corrupt_chunk(&old, &bad, 3, 0x10);
    let third = s.t.path().join("third");
    let o = run(smr()
        .args(["store", "migrate"])
        .arg(&old)
        .arg(&third)
        .arg(&s.recipe));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains(&bad) && err.contains("corrupt"),
        "{err}"
    );
    assert!(find_named(&third, ".tmp").is_empty(), "temp packs removed");
    assert!(
        !third.join("indexes").exists()
            || std::fs::read_dir(third.join("indexes")).unwrap().count() == 0
    );
}

/// SIGKILL at random points of 50 conversions: the store is never left
/// with an index naming missing bytes, and the conversion run to its end
/// afterwards verifies.
#[test]
fn conversions_killed_at_random_points_leave_a_consistent_store() {
    let s = Synthetic::new();
    let src = image_with_data(&s.t.path().join("big"), "big", 24);
    let started = std::time::Instant::now();
    convert(&src, &s.t.path().join("timing"), &s.recipe, &s.key, &[]);
    let full = started.elapsed();
    let mut rng = fastrand::Rng::with_seed(7);
    for round in 0..50u32 {
        let mut child = smr()
            .arg("convert")
            .arg(&src)
            .arg("--store")
            .arg(&s.store)
            .arg("-o")
            .arg(&s.recipe)
            .arg("--key-file")
            .arg(&s.key)
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let at = full.mul_f64(rng.f64() * 1.2);
        std::thread::sleep(at);
        let _ = child.kill();
        let _ = child.wait();
        indexes_name_only_stored_bytes(&s.store);
        // A later run's pack may repeat chunks an earlier, killed one
        // committed: start over now and then so both cases come up.
        if round % 10 == 9 {
            std::fs::remove_dir_all(&s.store).unwrap();
        }
    }
    convert(&src, &s.store, &s.recipe, &s.key, &[]);
    verify_ok(&s.recipe, &s.store, &s.key);
    assert!(indexes_name_only_stored_bytes(&s.store) > 0);
}

/// Three conversions into one store at once (two of the same image): each
/// recipe verifies, and the shared chunks are readable through every index.
#[test]
fn concurrent_conversions_into_one_store() {
    let s = Synthetic::new();
    let srcs = [
        image_with_data(&s.t.path().join("a"), "a", 8),
        image_with_data(&s.t.path().join("a2"), "a", 8),
        image_with_data(&s.t.path().join("b"), "b", 8),
    ];
    let children: Vec<_> = srcs
        .iter()
        .enumerate()
        .map(|(i, src)| {
            smr()
                .arg("convert")
                .arg(src)
                .arg("--store")
                .arg(&s.store)
                .arg("-o")
                .arg(s.t.path().join(format!("{i}.recipe")))
                .arg("--key-file")
                .arg(&s.key)
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in children {
        let o = c.wait_with_output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    for i in 0..3 {
        ok(smr()
            .arg("verify")
            .arg(s.t.path().join(format!("{i}.recipe")))
            .arg("--store")
            .arg(&s.store)
            .arg("--key-file")
            .arg(&s.key));
    }
    assert!(indexes_name_only_stored_bytes(&s.store) > 0);
}
