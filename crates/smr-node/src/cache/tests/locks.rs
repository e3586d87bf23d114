//! Nobody can hang a read by holding a cache lock: the directory is
//! private to its owner, and every wait for a lock has a bound.

use super::*;
use std::os::unix::fs::PermissionsExt;
use std::time::Instant;

fn short(dir: &Path) -> CacheConfig {
    CacheConfig {
        lock_timeout: Duration::from_millis(300),
        ..config(dir, 1 << 30)
    }
}

/// The cache directory is created `0700`; one with wider permissions is
/// made `0700` on open.
#[test]
fn the_cache_directory_is_private() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("cache");
    drop(Cache::open(config(&dir, 1 << 30)).expect("open"));
    let mode = || fs::metadata(&dir).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode(), 0o700);
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).expect("chmod");
    drop(Cache::open(config(&dir, 1 << 30)).expect("reopen"));
    assert_eq!(mode(), 0o700);
}

/// A fetch lock held forever (by another open file description, as
/// another process would) delays a miss by the bound, then the chunk is
/// fetched without it; a stats record locked forever makes `stats` fail
/// with an error naming the file instead of hanging.
#[test]
fn lock_waits_have_a_bound() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (store, ids) = store_with(&tmp.path().join("store"), 1, 4096);
    let f = Fetcher::new(store, Duration::ZERO);
    let dir = tmp.path().join("cache");
    let cache = Cache::open(short(&dir)).expect("open");
    let id = ids[0];
    let held = fetch_lock::lock(&cache.layout.fetch_lock, &id, Duration::from_secs(1))
        .expect("hold the fetch lock");
    let t = Instant::now();
    let got = cache
        .get_or_fetch(&id, || f.get(&id))
        .expect("fetched anyway");
    assert_eq!(ChunkId::of(&got), id);
    let waited = t.elapsed();
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_secs(10),
        "{waited:?}"
    );
    drop(held);

    let stats_path = cache.layout.stats();
    let holder = fs::File::open(&stats_path).expect("open stats");
    disk::lock_exclusive(&holder).expect("hold the stats lock");
    let t = Instant::now();
    let e = cache.stats().expect_err("stats locked");
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    let msg = e.to_string();
    assert!(
        msg.contains(&stats_path.display().to_string()) && msg.contains("more than"),
        "{msg}"
    );
    drop(holder);
    cache.stats().expect("stats once released");
}
