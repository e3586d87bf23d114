//! A hostile registry: bodies that never end are bounded while they are
//! read (and not asked for again), and digests it names are validated
//! before they go into a URL.

use super::util::*;
use smr_registry::client::Registry;
use smr_registry::{Blobs, RegistryError};
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Answers `GET /v2/` with `{}` and every other request with a 200 whose
/// body (no `Content-Length`) never ends: `{"a":"xxxx…`. Counts the
/// endless answers it started.
fn endless_server() -> (String, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr").to_string();
    let started = Arc::new(AtomicUsize::new(0));
    let count = started.clone();
    std::thread::spawn(move || {
        for conn in l.incoming().flatten() {
            let count = count.clone();
            std::thread::spawn(move || {
                let mut r = BufReader::new(conn.try_clone().expect("clone"));
                let mut first = String::new();
                if r.read_line(&mut first).is_err() {
                    return;
                }
                loop {
                    let mut h = String::new();
                    if r.read_line(&mut h).map_or(true, |n| n == 0) || h == "\r\n" {
                        break;
                    }
                }
                let mut w = conn;
                if first.starts_with("GET /v2/ ") {
                    let _ = w.write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: application/json\r\n\r\n{}",
                    );
                    return;
                }
                count.fetch_add(1, Ordering::SeqCst);
                let _ = w.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/vnd.oci.image.manifest.v1+json\r\nConnection: close\r\n\r\n{\"a\":\"");
                let block = vec![b'x'; 64 << 10];
                while w.write_all(&block).is_ok() {}
            });
        }
    });
    (addr, started)
}

#[test]
fn endless_bodies_fail_at_the_limit_without_retry() {
    let (addr, started) = endless_server();
    let repo = Registry::new(&addr, &fast_options())
        .expect("client")
        .repository("smr/endless")
        .expect("repo");
    let t = Instant::now();
    let e = repo.get_manifest("latest").expect_err("endless manifest");
    assert!(matches!(e, RegistryError::Protocol { .. }), "{e}");
    assert!(!e.is_transient(), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains(&format!("http://{addr}/v2/smr/endless/manifests/latest"))
            && msg.contains("4194304-byte limit"),
        "{msg}"
    );
    assert_eq!(started.load(Ordering::SeqCst), 1, "retried: {msg}");
    assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());

    let d = format!("sha256:{}", "ab".repeat(32));
    let e = repo.get_blob(&d, 1 << 20).expect_err("endless blob");
    assert!(!e.is_transient(), "{e}");
    assert!(e.to_string().contains("1048576-byte limit"), "{e}");
    assert_eq!(started.load(Ordering::SeqCst), 2, "retried: {e}");

    let e = repo.referrers(&d).expect_err("endless referrers");
    assert!(e.to_string().contains("-byte limit"), "{e}");
    assert_eq!(started.load(Ordering::SeqCst), 3, "retried: {e}");
}

/// Digests and tags that are not what they claim never reach the server.
#[test]
fn hostile_digests_are_refused_before_any_request() {
    let (addr, started) = endless_server();
    let repo = Registry::new(&addr, &fast_options())
        .expect("client")
        .repository("smr/hostile")
        .expect("repo");
    for bad in [
        "sha256:../../x",
        "sha256:AB",
        &format!("sha256:{}", "AB".repeat(32)),
        &format!("sha256:{}/../x", "ab".repeat(32)),
        "md5:abc",
    ] {
        let name = format!("{bad:?}");
        for e in [
            repo.get_blob(bad, LIMIT).expect_err("blob"),
            repo.blob_size(bad).expect_err("size"),
            repo.get_blob_range(bad, 0, 1).expect_err("range"),
            repo.referrers(bad).expect_err("referrers"),
            repo.get_manifest(bad).expect_err("manifest"),
            repo.open_blob(bad).map(|_| ()).expect_err("stream"),
        ] {
            assert!(matches!(e, RegistryError::Protocol { .. }), "{e}");
            assert!(e.to_string().contains(&name), "{e}");
        }
    }
    let e = repo.get_manifest("../../v2/_catalog").expect_err("tag");
    assert!(e.to_string().contains("not a valid tag"), "{e}");
    assert_eq!(started.load(Ordering::SeqCst), 0, "a request was sent");
}
