//! Single flight across real processes: the test binary runs itself as
//! children (the `child_*` test, ignored unless asked for by name).

use super::*;
use std::process::{Command, Stdio};

const ENV: &str = "SMR_CACHE_TEST_CHILD";

/// Run by the children: reads every chunk listed in `$SMR_CACHE_TEST_CHILD`
/// (`cache_dir|store_dir|start|id,id,...`) and prints how many it fetched.
#[test]
#[ignore = "child process of processes_sharing_a_cache_fetch_each_chunk_once"]
fn child_reads_chunks() {
    let spec = std::env::var(ENV).expect("run by the parent test only");
    let parts: Vec<&str> = spec.split('|').collect();
    let [dir, store, start, ids] = parts[..] else {
        panic!("bad spec {spec}")
    };
    let ids: Vec<ChunkId> = ids.split(',').map(|h| h.parse().expect("id")).collect();
    let start: usize = start.parse().expect("start");
    let f = Fetcher::new(
        LocalStore::open(store).expect("store"),
        Duration::from_millis(40),
    );
    let cache = Cache::open(config(Path::new(dir), 1 << 30)).expect("open");
    for k in 0..ids.len() {
        let id = &ids[(k + start) % ids.len()];
        let got = cache.get_or_fetch(id, || f.get(id)).expect("chunk");
        assert_eq!(ChunkId::of(&got), *id);
    }
    println!("FETCHED {}", f.calls());
}

#[test]
fn processes_sharing_a_cache_fetch_each_chunk_once() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store_dir = tmp.path().join("store");
    let (_, ids) = store_with(&store_dir, 12, 32 * 1024);
    let dir = tmp.path().join("cache");
    let list: Vec<String> = ids.iter().map(ChunkId::to_hex).collect();
    let exe = std::env::current_exe().expect("test binary");
    let children: Vec<_> = (0..4)
        .map(|i| {
            let spec = format!(
                "{}|{}|{}|{}",
                dir.display(),
                store_dir.display(),
                i * 3,
                list.join(",")
            );
            Command::new(&exe)
                .args([
                    "--exact",
                    "cache::tests::procs::child_reads_chunks",
                    "--ignored",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env(ENV, spec)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn child")
        })
        .collect::<Vec<_>>();
    let mut total = 0;
    for child in children {
        let out = child.wait_with_output().expect("child output");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "child failed: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let n: u64 = stdout
            .lines()
            .find_map(|l| l.split("FETCHED ").nth(1))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("no count in {stdout}"));
        total += n;
    }
    assert_eq!(total, 12, "each chunk fetched by exactly one process");
    let cache = Cache::open(config(&dir, 1 << 30)).expect("open");
    let s = cache.stats().expect("stats");
    assert_eq!((s.counters.fetches, s.counters.entries), (12, 12));
    assert_eq!(
        s.counters.hits + s.counters.misses,
        48,
        "every child looked up every chunk once"
    );
}

/// Run by the child of `a_killed_writers_segment_is_sealed_and_kept`:
/// caches the chunks listed in `$SMR_CACHE_TEST_CHILD` and dies without
/// sealing its segment.
#[test]
#[ignore = "child process of a_killed_writers_segment_is_sealed_and_kept"]
fn child_caches_and_dies() {
    let spec = std::env::var(ENV).expect("run by the parent test only");
    let parts: Vec<&str> = spec.split('|').collect();
    let [dir, store, ids] = parts[..] else {
        panic!("bad spec {spec}")
    };
    let f = Fetcher::new(LocalStore::open(store).expect("store"), Duration::ZERO);
    let cache = Cache::open(config(Path::new(dir), 1 << 30)).expect("open");
    for id in ids.split(',').map(|h| h.parse::<ChunkId>().expect("id")) {
        cache.get_or_fetch(&id, || f.get(&id)).expect("chunk");
    }
    std::process::abort();
}

#[test]
fn a_killed_writers_segment_is_sealed_and_kept() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store_dir = tmp.path().join("store");
    let (_, ids) = store_with(&store_dir, 5, 8 * 1024);
    let dir = tmp.path().join("cache");
    let list: Vec<String> = ids.iter().map(ChunkId::to_hex).collect();
    let out = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "cache::tests::procs::child_caches_and_dies",
            "--ignored",
            "--test-threads=1",
        ])
        .env(
            ENV,
            format!(
                "{}|{}|{}",
                dir.display(),
                store_dir.display(),
                list.join(",")
            ),
        )
        .output()
        .expect("run child");
    assert!(!out.status.success(), "the child dies");
    let journal = fs::read_dir(dir.join("segments"))
        .expect("segments")
        .map(|e| e.expect("entry").path())
        .find(|p| p.extension().is_some_and(|x| x == "idx"))
        .expect("the child's journal");
    // Half a record at the end (killed mid-append).
    let mut f = fs::OpenOptions::new()
        .append(true)
        .open(&journal)
        .expect("journal");
    std::io::Write::write_all(&mut f, &[0xa5; 20]).expect("torn tail");
    drop(f);
    let cache = Cache::open(config(&dir, 1 << 30)).expect("open");
    for id in &ids {
        let got = cache.get_or_fetch(id, never).expect("kept");
        assert_eq!(ChunkId::of(&got), *id);
    }
    let j = fs::read(&journal).expect("journal");
    assert_eq!(j.len(), 8 + 6 * 64, "torn tail cut, then sealed");
    assert!(j.ends_with(&super::super::journal::Record::Sealed.encode()));
    let r = cache.prune(0).expect("prune");
    assert_eq!((r.evicted_segments, r.remaining_bytes), (1, 0), "{r:?}");
}
