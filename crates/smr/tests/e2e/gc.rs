//! `smr gc` of a local store: roots kept, the unreferenced old packs (and
//! chunk files of the per-chunk layout) deleted and nothing else, a dry run
//! that deletes nothing, a bad root that stops it, and conversions running
//! while it runs.

use super::util::*;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// The synthetic image with one more layer (its own chunks), as an OCI
/// layout in `dir`, and its source name.
fn other_image(dir: &Path, tag: &str, motd: &str) -> String {
    let mut img = smr_testkit::synthetic_image();
    let mut extra = smr_testkit::LayerBuilder::new();
    extra.file("etc/motd", motd.as_bytes(), 0o644);
    extra.file("opt/blob", &vec![tag.as_bytes()[0]; 3 << 20], 0o644);
    img.layer(extra.into_bytes(), smr_testkit::Compression::None);
    img.write_oci_layout(dir, Some(tag)).unwrap();
    format!("oci:{}:{tag}", dir.display())
}

/// Every chunk file and pack of the store, by name.
fn stored_names(store: &Path) -> Vec<String> {
    let mut out: Vec<String> = walk(&store.join("chunks"))
        .into_iter()
        .chain(walk(&store.join("packs")))
        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .filter(|n| !n.starts_with('.'))
        .collect();
    out.sort();
    out
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Makes every chunk file, pack and index of the store an hour old.
fn age(store: &Path) {
    let old = SystemTime::now() - Duration::from_secs(3600);
    let files = ["chunks", "packs", "indexes"].map(|d| walk(&store.join(d)));
    for p in files.into_iter().flatten() {
        let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        f.set_modified(old).unwrap();
    }
}

fn gc(store: &Path, args: &[&str]) -> std::process::Output {
    run(smr()
        .arg("gc")
        .arg("--store")
        .arg(store)
        .args(["--grace", "10m", "--json"])
        .args(args))
}

fn ids_of(recipe: &Path) -> Vec<String> {
    let out = ok(smr().arg("inspect").arg(recipe).arg("--json"));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut ids: Vec<String> = v["chunks"]
        .as_array()
        .unwrap_or_else(|| panic!("no chunks in {v}"))
        .iter()
        .map(|c| c["id"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    ids.dedup();
    ids
}

#[test]
fn gc_deletes_exactly_the_old_unreferenced_chunks() {
    let s = Synthetic::new();
    let d = s.t.path();
    convert(&s.src, &s.store, &s.recipe, &s.key, &[]);
    let garbage = d.join("garbage.recipe");
    let kept = stored_names(&s.store);
    assert!(!kept.is_empty());
    convert(
        &other_image(&d.join("g"), "g", "gone\n"),
        &s.store,
        &garbage,
        &s.key,
        &[],
    );
    let all = stored_names(&s.store);
    assert!(all.len() > kept.len());
    assert!(
        kept.iter().all(|k| all.contains(k)),
        "the second image's chunks already stored were not stored again"
    );
    std::fs::remove_file(&garbage).unwrap();

    // Young packs are within the grace: nothing goes.
    let o = gc(&s.store, &["--keep", s.recipe.to_str().unwrap()]);
    assert!(o.status.success());
    assert_eq!(stored_names(&s.store), all);
    age(&s.store);
    // A dry run reports and deletes nothing.
    let o = gc(
        &s.store,
        &["--keep", s.recipe.to_str().unwrap(), "--dry-run"],
    );
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        r["packs"]["deleted"]["packs"].as_u64().unwrap() as usize,
        all.len() - kept.len(),
        "{r} {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(r["packs"]["indexes_deleted"].as_u64(), Some(1), "{r}");
    assert_eq!(stored_names(&s.store), all);
    // A root that cannot be read stops it: nothing deleted.
    let bad = d.join("bad.recipe");
    std::fs::write(&bad, b"not a recipe").unwrap();
    for root in [bad.to_str().unwrap(), "/nonexistent/x.recipe"] {
        let o = gc(
            &s.store,
            &["--keep", s.recipe.to_str().unwrap(), "--keep", root],
        );
        assert!(!o.status.success());
        assert!(String::from_utf8_lossy(&o.stderr).contains(root), "{o:?}");
        assert_eq!(stored_names(&s.store), all);
    }
    // The real thing: what is left is exactly the packs the root uses.
    let o = gc(&s.store, &["--keep", s.recipe.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(stored_names(&s.store), kept);
    assert_eq!(walk(&s.store.join("indexes")).len(), 1, "the root's index");
    verify_ok(&s.recipe, &s.store, &s.key);
}

/// The per-chunk layout of stores made before packs: its unreferenced old
/// chunk files go, the root's stay.
#[test]
fn gc_of_a_store_of_chunk_files() {
    let s = Synthetic::new();
    convert(&s.src, &s.store, &s.recipe, &s.key, &[]);
    let old = s.t.path().join("old-store");
    per_chunk_copy(&s.recipe, &s.store, &old);
    let dead = b"a chunk no recipe names".to_vec();
    let dead_id = smr_format::ChunkId::of(&dead);
    {
        use smr_store::ChunkStore;
        let o = smr_store::LocalStore::open(&old).unwrap();
        o.put(&dead_id, &dead).unwrap();
    }
    let keep = ids_of(&s.recipe);
    let mut all = keep.clone();
    all.push(dead_id.to_hex());
    all.sort();
    assert_eq!(stored_names(&old), all);
    age(&old);
    let o = gc(&old, &["--keep", s.recipe.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["deleted"]["chunks"].as_u64(), Some(1), "{r}");
    assert_eq!(stored_names(&old), keep);
    verify_ok(&s.recipe, &old, &s.key);
}

#[test]
fn conversions_running_during_gc_complete_and_verify() {
    let s = Synthetic::new();
    let d = s.t.path();
    convert(&s.src, &s.store, &s.recipe, &s.key, &[]);
    let images: Vec<String> = (0..3)
        .map(|i| other_image(&d.join(format!("img{i}")), &format!("t{i}"), "same\n"))
        .collect();
    for round in 0..6 {
        // Unreferenced, old chunks that the next conversions reuse.
        for (i, src) in images.iter().enumerate() {
            let r = d.join(format!("r{i}.recipe"));
            convert(src, &s.store, &r, &s.key, &[]);
            std::fs::remove_file(&r).unwrap();
        }
        age(&s.store);
        let collector = smr()
            .arg("gc")
            .arg("--store")
            .arg(&s.store)
            .arg("--keep")
            .arg(&s.recipe)
            .arg("--grace")
            .arg("10m")
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(round * 7));
        let new: Vec<PathBuf> = images
            .iter()
            .enumerate()
            .map(|(i, src)| {
                let r = d.join(format!("new{i}.recipe"));
                convert(src, &s.store, &r, &s.key, &[]);
                r
            })
            .collect();
        let out = collector.wait_with_output().unwrap();
        assert!(out.status.success(), "round {round}");
        for r in new.iter().chain([&s.recipe]) {
            verify_ok(r, &s.store, &s.key);
        }
        for r in new {
            std::fs::remove_file(r).unwrap();
        }
    }
}
