//! Failures: a registry that dies mid-transfer, refuses connections,
//! answers 429/5xx, or serves garbage.

use super::fake::{FakeServer, Req, Resp};
use super::util::*;
use smr_image::source::{ImageSource, Platform, SourceError};
use smr_registry::client::Registry;
use smr_registry::source::RegistrySource;
use smr_registry::{Blobs, RegistryError};
use std::io::Read;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The `RegistryError` inside an `io::Error` from a blob stream.
fn registry_error(e: &std::io::Error) -> &RegistryError {
    e.get_ref()
        .and_then(|i| i.downcast_ref::<RegistryError>())
        .unwrap_or_else(|| panic!("not a registry error: {e}"))
}

#[test]
fn registry_stopped_mid_read_is_transient() {
    let Some(mut reg) = TestRegistry::start(None) else {
        return;
    };
    let repo = reg.repo("smr/big");
    let data = random_bytes(64 << 20, 9);
    let d = digest(&data);
    repo.push_blob(&d, &data).expect("push");
    drop(data);

    let src = RegistrySource::open(&reg.docker_ref("smr/big:x"), &fast_options()).expect("src");
    let mut r = src.open_blob(&d).expect("open");
    let mut buf = vec![0u8; 1 << 20];
    r.read_exact(&mut buf).expect("first MiB");
    reg.stop();
    let start = Instant::now();
    let mut sink = Vec::new();
    let e = r.read_to_end(&mut sink).expect_err("registry gone");
    let re = registry_error(&e);
    assert!(re.is_transient(), "{re}");
    let msg = re.to_string();
    assert!(msg.contains("smr/big") && msg.contains(&d), "{msg}");
    assert!(start.elapsed() < Duration::from_secs(30), "gave up in time");

    // Later requests: connection refused, also transient.
    let e = repo.get_blob(&d, LIMIT).expect_err("stopped");
    assert!(e.is_transient(), "{e}");
    let e = repo.blob_size(&d).expect_err("stopped");
    assert!(e.is_transient(), "{e}");
}

#[test]
fn connection_refused_is_transient_after_retries() {
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let repo = Registry::new(&format!("127.0.0.1:{port}"), &fast_options())
        .expect("client")
        .repository("x")
        .expect("repo");
    let e = repo.get_manifest("latest").expect_err("refused");
    assert!(e.is_transient(), "{e}");
    assert!(
        e.to_string().contains(&format!("127.0.0.1:{port}/x")),
        "{e}"
    );
}

#[test]
fn retries_429_with_retry_after_and_5xx() {
    let body = b"hello".to_vec();
    let d = digest(&body);
    let heads = Arc::new(AtomicUsize::new(0));
    let gets = Arc::new(AtomicUsize::new(0));
    let (h, g, b, dd) = (heads.clone(), gets.clone(), body.clone(), d.clone());
    let blob_path = format!("/v2/smr/x/blobs/{d}");
    let fail_path = format!("/v2/smr/fail/blobs/{d}");
    let srv = FakeServer::start(move |req: &Req| {
        if req.path() == "/v2/" {
            return Resp::new(200, "{}");
        }
        if req.path() == fail_path {
            return Resp::new(500, "always broken");
        }
        if req.path() != blob_path {
            return Resp::new(404, r#"{"errors":[{"code":"NOT_FOUND","message":"no"}]}"#);
        }
        match req.method.as_str() {
            "HEAD" if h.fetch_add(1, Ordering::SeqCst) == 0 => {
                Resp::new(429, "").header("Retry-After", "1")
            }
            "GET" if g.fetch_add(1, Ordering::SeqCst) < 2 => Resp::new(503, "busy"),
            _ => Resp::new(200, b.clone()).header("Docker-Content-Digest", &dd),
        }
    });
    let repo = Registry::new(&srv.addr, &fast_options())
        .expect("client")
        .repository("smr/x")
        .expect("repo");
    let start = Instant::now();
    assert_eq!(repo.blob_size(&d).expect("after 429"), Some(5));
    assert!(
        start.elapsed() >= Duration::from_secs(1),
        "Retry-After honoured"
    );
    assert_eq!(heads.load(Ordering::SeqCst), 2);
    assert_eq!(repo.get_blob(&d, LIMIT).expect("after two 503"), body);
    assert_eq!(gets.load(Ordering::SeqCst), 3);

    let fail = Registry::new(&srv.addr, &fast_options())
        .expect("client")
        .repository("smr/fail")
        .expect("repo");
    let e = fail.get_blob(&d, LIMIT).expect_err("always 500");
    assert!(e.is_transient(), "{e}");
    assert!(e.to_string().contains("always broken"), "{e}");
}

#[test]
fn garbage_manifests_are_errors_naming_them() {
    let srv = FakeServer::start(|req: &Req| match req.path() {
        "/v2/" => Resp::new(200, "{}"),
        "/v2/smr/bad/manifests/garbage" => Resp::new(200, "this is not json")
            .header("Content-Type", "application/vnd.oci.image.manifest.v1+json"),
        "/v2/smr/bad/manifests/shapeless" => Resp::new(
            200,
            r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}"#,
        )
        .header("Content-Type", "application/vnd.oci.image.manifest.v1+json"),
        _ => Resp::new(
            404,
            r#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"no"}]}"#,
        ),
    });
    let repo = Registry::new(&srv.addr, &fast_options())
        .expect("client")
        .repository("smr/bad")
        .expect("repo");
    let e = repo.get_manifest("garbage").expect_err("garbage");
    assert!(matches!(e, RegistryError::Json { .. }), "{e}");
    assert!(e.to_string().contains("smr/bad: manifest garbage"), "{e}");
    assert_eq!(repo.get_manifest("missing").expect("404"), None);

    let src = RegistrySource::open(
        &format!("docker://{}/smr/bad:garbage", srv.addr),
        &fast_options(),
    )
    .expect("source");
    let e = src.resolve(&Platform::default()).expect_err("garbage");
    assert!(matches!(e, SourceError::Json { .. }), "{e}");
    assert!(e.to_string().contains("manifest garbage"), "{e}");

    let src = RegistrySource::open(
        &format!("docker://{}/smr/bad:shapeless", srv.addr),
        &fast_options(),
    )
    .expect("source");
    let e = src.resolve(&Platform::default()).expect_err("no config");
    assert!(matches!(e, SourceError::Json { .. }), "{e}");
    assert!(e.to_string().contains("manifest sha256:"), "{e}");
}
