//! Chunk stores on S3 (s3s-fs) and plain HTTP through the `smr` binary:
//! the same image converted into them extracts to the same bytes as from a
//! local store.

use crate::servers::{FileServer, S3};
use crate::util::*;

#[test]
fn s3_store_round_trip() {
    let Some(s3) = S3::start() else {
        return;
    };
    let s = Synthetic::new();
    convert(&s.src, &s.store, &s.recipe, &s.key, &[]);
    extract(&s.recipe, &s.store, &s.key, &s.img);

    let env = s3.env();
    let remote = "s3://smr/images";
    let recipe = s.t.path().join("s3.recipe");
    ok(smr()
        .arg("convert")
        .arg(&s.src)
        .arg("--store")
        .arg(remote)
        .arg("-o")
        .arg(&recipe)
        .arg("--key-file")
        .arg(&s.key)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str()))));
    assert_eq!(
        std::fs::read(&recipe).unwrap(),
        std::fs::read(&s.recipe).unwrap()
    );
    let img = s.t.path().join("s3.img");
    extract_with(&recipe, remote, &s.key, &img, &env);
    assert!(std::fs::read(&img).unwrap() == std::fs::read(&s.img).unwrap());

    // Wrong credentials: a clear error naming the store, no secret.
    let mut bad = env.clone();
    bad.retain(|(k, _)| *k != "AWS_SECRET_ACCESS_KEY");
    bad.push(("AWS_SECRET_ACCESS_KEY", "not-the-secret-123".into()));
    let err = fails(
        smr()
            .arg("verify")
            .arg(&recipe)
            .arg("--store")
            .arg(remote)
            .envs(bad.iter().map(|(k, v)| (*k, v.as_str()))),
    );
    assert!(err.contains("s3://smr/images"), "{err}");
    assert!(!err.contains("not-the-secret-123"), "{err}");
}

#[test]
fn http_store_serves_a_local_store_read_only() {
    let s = Synthetic::new();
    convert(&s.src, &s.store, &s.recipe, &s.key, &[]);
    extract(&s.recipe, &s.store, &s.key, &s.img);
    let Some(http) = FileServer::start(&s.store) else {
        return;
    };
    let img = s.t.path().join("http.img");
    extract_with(&s.recipe, &http.url, &s.key, &img, &[]);
    assert!(std::fs::read(&img).unwrap() == std::fs::read(&s.img).unwrap());
    // Converting into it is refused: it is read-only.
    let err = fails(
        smr()
            .arg("convert")
            .arg(&s.src)
            .arg("--store")
            .arg(&http.url)
            .arg("-o")
            .arg(s.t.path().join("x.recipe"))
            .arg("--key-file")
            .arg(&s.key),
    );
    assert!(err.contains("read-only"), "{err}");
    assert!(!s.t.path().join("x.recipe").exists());
}
