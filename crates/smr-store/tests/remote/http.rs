//! The HTTP store against `python3 -m http.server` and scripted responders.

use crate::contract;
use crate::support::{chunk, FileServer, Reply, Scripted};
use smr_store::{ChunkStore, HttpStore, LocalStore, RemoteOptions, StoreError, TransportKind};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn options(deadline_secs: f64) -> RemoteOptions {
    RemoteOptions::default().with_deadline(Duration::from_secs_f64(deadline_secs))
}

fn seeded() -> (tempfile::TempDir, LocalStore) {
    let dir = tempfile::tempdir().unwrap();
    let seed = LocalStore::open(dir.path().join("store")).unwrap();
    (dir, seed)
}

#[test]
fn serves_a_store_directory() {
    let (dir, seed) = seeded();
    let server = FileServer::start(dir.path(), 0);
    let location = format!("{}/store", server.url());
    let store = smr_store::open_store(&location).unwrap();
    assert_eq!(store.describe(), location);
    contract::read_only(&*store, &seed);

    let (absent, _) = chunk(10);
    let msg = store.get(&absent).unwrap_err().to_string();
    eprintln!("{msg}");
    assert!(
        msg.contains(&absent.to_hex()) && msg.contains(&location),
        "{msg}"
    );
}

#[test]
fn ranged_reads_with_and_without_range_support() {
    let (dir, _seed) = seeded();
    let (object, data) = contract::pack_object(&dir.path().join("store"), 100_000);
    for server in [
        FileServer::start_with_ranges(dir.path()),
        FileServer::start(dir.path(), 0),
    ] {
        let store = HttpStore::open(&format!("{}/store", server.url()), options(5.0)).unwrap();
        contract::ranged(&store, &object, &data);
    }
}

#[test]
fn a_ranged_read_that_fails_twice_then_answers_succeeds() {
    let (_, data) = chunk(100_000);
    let server = Scripted::start(vec![
        Reply::Status(503, ""),
        Reply::Status(502, ""),
        Reply::Body(data.clone()),
    ]);
    let store = HttpStore::open(&server.url(), options(10.0)).unwrap();
    let object = smr_store::ObjectName::new("packs/p");
    let got = store
        .read_ranges(&object, &[smr_store::ByteRange::new(100, 900)])
        .unwrap();
    assert!(got[0] == data[100..1000]);
    assert_eq!(server.hits(), 3);
}

#[test]
fn a_get_blocked_on_a_stopped_server_succeeds_after_restart() {
    let (dir, seed) = seeded();
    let (id, data) = chunk(50_000);
    seed.put(&id, &data).unwrap();
    let mut server = FileServer::start(dir.path(), 0);
    let store =
        Arc::new(HttpStore::open(&format!("{}/store", server.url()), options(20.0)).unwrap());
    assert_eq!(store.get(&id).unwrap(), data, "warm the connection pool");

    server.stop();
    let t = Instant::now();
    let getter = {
        let store = store.clone();
        std::thread::spawn(move || store.get(&id))
    };
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        !getter.is_finished(),
        "get returned while the server was down"
    );
    server.restart();
    assert_eq!(getter.join().unwrap().unwrap(), data);
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
}

#[test]
fn a_server_down_past_the_deadline_fails_in_time_then_recovers() {
    let (dir, seed) = seeded();
    let (id, data) = chunk(1000);
    seed.put(&id, &data).unwrap();
    let mut server = FileServer::start(dir.path(), 0);
    let location = format!("{}/store", server.url());
    let store = HttpStore::open(&location, options(2.0)).unwrap();
    server.stop();

    let t = Instant::now();
    let e = store.get(&id).unwrap_err();
    let elapsed = t.elapsed();
    let msg = e.to_string();
    eprintln!("{msg}");
    assert!(
        elapsed >= Duration::from_secs(2) && elapsed < Duration::from_millis(3500),
        "{elapsed:?}"
    );
    assert!(
        matches!(&e, StoreError::GaveUp { last, .. }
        if matches!(**last, StoreError::Transport { kind: TransportKind::Connect, .. })),
        "{msg}"
    );
    assert!(
        msg.contains(&location) && msg.contains(&id.to_hex()),
        "{msg}"
    );
    assert!(msg.contains("gave up after 2."), "{msg}");

    server.restart();
    assert_eq!(
        store.get(&id).unwrap(),
        data,
        "no state stuck after the outage"
    );
}

#[test]
fn server_errors_are_retried() {
    let (id, data) = chunk(3000);
    let server = Scripted::start(vec![
        Reply::Status(500, ""),
        Reply::Status(502, ""),
        Reply::Status(503, ""),
        Reply::Body(data.clone()),
    ]);
    let store = HttpStore::open(&server.url(), options(10.0)).unwrap();
    assert_eq!(store.get(&id).unwrap(), data);
    assert_eq!(server.hits(), 4);
}

#[test]
fn too_many_requests_honors_retry_after() {
    let (id, data) = chunk(3000);
    let server = Scripted::start(vec![
        Reply::Status(429, "Retry-After: 1\r\n"),
        Reply::Body(data.clone()),
    ]);
    let store = HttpStore::open(&server.url(), options(10.0)).unwrap();
    let t = Instant::now();
    assert_eq!(store.get(&id).unwrap(), data);
    assert!(t.elapsed() >= Duration::from_secs(1), "{:?}", t.elapsed());
    assert_eq!(server.hits(), 2);

    // Asked to wait beyond the deadline: fail now, saying why.
    let server = Scripted::start(vec![Reply::Status(429, "Retry-After: 120\r\n")]);
    let store = HttpStore::open(&server.url(), options(5.0)).unwrap();
    let t = Instant::now();
    let msg = store.get(&id).unwrap_err().to_string();
    eprintln!("{msg}");
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert!(
        msg.contains("HTTP 429") && msg.contains("retry after 120 s"),
        "{msg}"
    );
    assert_eq!(server.hits(), 1);
}

#[test]
fn truncated_bodies_are_errors() {
    let (id, data) = chunk(3000);
    let cut = Reply::Truncated {
        announced: data.len(),
        body: data[..1000].to_vec(),
    };
    let server = Scripted::start(vec![cut.clone(), Reply::Body(data.clone())]);
    let store = HttpStore::open(&server.url(), options(10.0)).unwrap();
    assert_eq!(store.get(&id).unwrap(), data, "the cut answer is retried");
    assert_eq!(server.hits(), 2);

    let server = Scripted::start(vec![cut]);
    let store = HttpStore::open(&server.url(), options(1.0)).unwrap();
    let e = store.get(&id).unwrap_err();
    let msg = e.to_string();
    eprintln!("{msg}");
    assert!(
        matches!(&e, StoreError::GaveUp { last, .. }
        if matches!(**last, StoreError::Transport { kind: TransportKind::Interrupted, .. }
            | StoreError::LengthMismatch { .. })),
        "{msg}"
    );
    assert!(msg.contains(&id.to_hex()), "{msg}");
}

#[test]
fn permanent_answers_are_not_retried() {
    let (id, _) = chunk(10);
    for (code, check) in [
        (
            404,
            (|e: &StoreError| matches!(e, StoreError::Missing { .. })) as fn(&StoreError) -> bool,
        ),
        (403, |e| matches!(e, StoreError::Denied { .. })),
        (400, |e| matches!(e, StoreError::Status { status: 400, .. })),
    ] {
        let server = Scripted::start(vec![Reply::Status(code, "")]);
        let store = HttpStore::open(&server.url(), options(10.0)).unwrap();
        let t = Instant::now();
        let e = store.get(&id).unwrap_err();
        assert!(check(&e), "{code}: {e}");
        assert!(!e.is_transient());
        assert!(e.to_string().contains(&server.url()), "{e}");
        assert_eq!(server.hits(), 1, "{code}");
        assert!(t.elapsed() < Duration::from_secs(1));
    }
}

#[test]
fn a_hung_server_is_cut_at_the_deadline() {
    let (id, _) = chunk(10);
    let server = Scripted::start(vec![Reply::Hang]);
    let store = HttpStore::open(&server.url(), options(1.0)).unwrap();
    let t = Instant::now();
    let msg = store.get(&id).unwrap_err().to_string();
    eprintln!("{msg}");
    assert!(
        t.elapsed() < Duration::from_millis(1800),
        "{:?}",
        t.elapsed()
    );
    assert!(
        msg.contains("gave up after 1.") && msg.contains(&id.to_hex()),
        "{msg}"
    );
}

#[test]
fn requests_in_flight_are_bounded() {
    let (id, data) = chunk(2000);
    let server = Scripted::start(vec![Reply::Slow(Duration::from_millis(200), data.clone())]);
    let store =
        Arc::new(HttpStore::open(&server.url(), options(20.0).with_max_in_flight(2)).unwrap());
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let store = store.clone();
            std::thread::spawn(move || store.get(&id))
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap().unwrap(), data);
    }
    assert_eq!(server.hits(), 8);
    assert_eq!(server.peak.load(std::sync::atomic::Ordering::SeqCst), 2);
}
