use super::*;

fn open(location: &str) -> Result<S3Store> {
    S3Store::builder(location)?
        .endpoint("http://127.0.0.1:9")
        .allow_http(true)
        .region("us-east-1")
        .credentials("AKIDEXAMPLE", "secret")
        .build()
}

#[test]
fn locations_and_layout() {
    let id = ChunkId([0xcd; 32]);
    let hex = id.to_hex();
    let b = S3Store::builder("s3://bucket/some/prefix/")
        .unwrap()
        .credentials("AKIDEXAMPLE", "the-secret");
    assert!(!format!("{b:?}").contains("the-secret"), "{b:?}");
    let s = b.build().unwrap();
    assert!(!format!("{s:?}").contains("the-secret"), "{s:?}");
    let s = open("s3://bucket/some/prefix/").unwrap();
    assert_eq!(s.describe(), "s3://bucket/some/prefix");
    assert_eq!(
        s.inner.key(&ObjectName::of_chunk(&id)).as_ref(),
        format!("some/prefix/chunks/cd/{hex}")
    );
    let s = open("S3://bucket").unwrap();
    assert_eq!(s.describe(), "s3://bucket");
    assert_eq!(
        s.inner.key(&ObjectName::of_chunk(&id)).as_ref(),
        format!("chunks/cd/{hex}")
    );
    assert!(s.inner.conditional_put);

    for bad in [
        "s3://",
        "s3:///p",
        "s3://b/p?x=1",
        "s3://b/a//c",
        "s3://key:secret@bucket/p",
        "http://b/p",
    ] {
        let e = open(bad).unwrap_err();
        assert!(
            matches!(e, StoreError::InvalidLocation { .. }),
            "{bad}: {e}"
        );
        assert!(!e.to_string().contains("secret"), "{e}");
    }
}

#[test]
fn classifies_transport_errors() {
    let e = object_store::Error::Generic {
        store: "S3",
        source: Box::new(HttpError::new(
            HttpErrorKind::Connect,
            std::io::Error::other("refused"),
        )),
    };
    assert!(matches!(
        classify(&e),
        Class::Transport(TransportKind::Connect)
    ));
    let e = object_store::Error::Generic {
        store: "S3",
        source: Box::new(HttpError::new(
            HttpErrorKind::Request,
            status::RetryableStatus {
                status: 503,
                retry_after: Some(Duration::from_secs(2)),
            },
        )),
    };
    assert!(matches!(classify(&e), Class::Status(s) if s.status == 503));
    let e = object_store::Error::Generic {
        store: "S3",
        source: "bad request".into(),
    };
    assert!(matches!(classify(&e), Class::Other));
}

#[test]
fn maps_object_store_errors() {
    let s = open("s3://bucket/p").unwrap();
    let id = ChunkId([0x11; 32]);
    let not_found = |code: &str| {
        object_store::Error::NotFound {
        path: "p/chunks/11/1111".into(),
        source: format!("Server returned non-2xx status code: 404 Not Found: <Error><Code>{code}</Code></Error>").into(),
    }
    };
    let e = s.inner.error(Op::Get, id.into(), not_found("NoSuchKey"));
    assert!(matches!(e, StoreError::Missing { .. }), "{e}");
    // A missing bucket is a broken location, not a missing chunk (S3, MinIO;
    // s3s-fs answers NoSuchKey).
    let e = s.inner.error(Op::Get, id.into(), not_found("NoSuchBucket"));
    assert!(matches!(e, StoreError::Remote { .. }), "{e}");
    assert!(e.to_string().contains("bucket does not exist"), "{e}");
    let e = s.inner.error(
        Op::Put,
        id.into(),
        object_store::Error::Unauthenticated {
            path: "p".into(),
            source: "no body".into(),
        },
    );
    assert!(matches!(e, StoreError::Denied { op: Op::Put, .. }), "{e}");
    assert!(e.to_string().contains("HTTP 401"), "{e}");
}

#[test]
fn a_plain_http_endpoint_needs_allow_http() {
    let s = S3Store::builder("s3://bucket/p")
        .unwrap()
        .endpoint("http://127.0.0.1:9")
        .allow_http(false)
        .credentials("AKIDEXAMPLE", "secret")
        .options(RemoteOptions::default().with_deadline(Duration::from_secs(5)));
    let t = std::time::Instant::now();
    let e = match s.build() {
        Ok(s) => s.get(&ChunkId([3; 32])).unwrap_err(),
        Err(e) => e,
    };
    eprintln!("{e}");
    assert!(
        !e.is_transient() && !matches!(e, StoreError::GaveUp { .. }),
        "{e}"
    );
    assert!(t.elapsed() < Duration::from_secs(2), "{e}");
}
