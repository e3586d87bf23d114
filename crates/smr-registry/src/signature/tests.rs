use super::*;
use crate::discover::{discover, DiscoverOptions};
use crate::push::{push, PushOptions};
use crate::testing::{tags, test_image, DirBlobs};
use smr_store::LocalStore;
use std::sync::Arc;

/// A signature cosign made (sigstore-rs's verification test vector): the
/// public key, and the signature of cosign's payload for
/// `registry-testing.svc.lan/busybox@sha256:f3cfc9d0…`.
const COSIGN_PUBLIC_KEY: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAENptdY/l3nB0yqkXLBWkZWQwo6+cu
OSWS1X9vPavpiQOoTTGC0xX57OojUadxF1cdQmrsiReWg2Wn4FneJfa8xw==
-----END PUBLIC KEY-----";
const COSIGN_SIGNATURE: &str = "MEUCIQD6q/COgzOyW0YH1Dk+CCYSt4uAhm3FDHUwvPI55zwnlwIgE0ZK58ZOWpZw8YVmBapJhBqCfdPekIknimuO0xH8Jh8=";
const COSIGN_PAYLOAD: &str = r#"{"critical":{"identity":{"docker-reference":"registry-testing.svc.lan/busybox"},"image":{"docker-manifest-digest":"sha256:f3cfc9d0dbf931d3db4685ec659b7ac68e2a578219da4aae65427886e649b06b"},"type":"cosign container image signature"},"optional":null}"#;

#[test]
fn the_payload_is_byte_for_byte_cosigns_and_a_cosign_signature_verifies() {
    let ours = SimpleSigning::new(
        "registry-testing.svc.lan/busybox",
        "sha256:f3cfc9d0dbf931d3db4685ec659b7ac68e2a578219da4aae65427886e649b06b",
    );
    assert_eq!(ours.to_bytes(), COSIGN_PAYLOAD.as_bytes());
    let key = VerifyKey::from_pem(COSIGN_PUBLIC_KEY.as_bytes(), "cosign.pub").unwrap();
    assert_eq!(key.algorithm(), "ecdsa-p256");
    assert!(key.verifies(COSIGN_SIGNATURE, COSIGN_PAYLOAD.as_bytes()));
    let other = SimpleSigning::new("registry-testing.svc.lan/busybox", &digest_of(b"x"));
    assert!(!key.verifies(COSIGN_SIGNATURE, &other.to_bytes()));
    assert!(!key.verifies("not base64!", COSIGN_PAYLOAD.as_bytes()));
}

#[test]
fn key_files_round_trip_and_a_wrong_password_is_refused() {
    let key = SigningKey::generate().unwrap();
    let (private, public) = key.to_cosign_pem(b"pw").unwrap();
    assert!(private.starts_with("-----BEGIN ENCRYPTED SIGSTORE PRIVATE KEY-----"));
    let again = SigningKey::from_cosign_pem(private.as_bytes(), b"pw", "k").unwrap();
    assert_eq!(again.id, key.id);
    let verify = VerifyKey::from_pem(public.as_bytes(), "k.pub").unwrap();
    assert_eq!(verify.id, key.id);
    let sig = again.sign(b"payload").unwrap();
    assert!(verify.verifies(&sig, b"payload"));
    let e = SigningKey::from_cosign_pem(private.as_bytes(), b"wrong", "k.key").unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("k.key") && msg.contains("wrong password"),
        "{msg}"
    );
    assert!(
        !msg.contains("pw\"") && !msg.contains(&private[40..80]),
        "{msg}"
    );
    assert!(VerifyKey::from_pem(b"garbage", "g.pub").is_err());
}

/// A pushed test artifact: (dir, blobs, its digest and descriptor).
fn pushed(api: bool) -> (tempfile::TempDir, DirBlobs, Descriptor) {
    let dir = tempfile::tempdir().unwrap();
    let blobs = DirBlobs::new(dir.path().join("registry"), api);
    let store = LocalStore::open(dir.path().join("store")).unwrap();
    let img = test_image(&store, "app", &tags("app-", 0..4));
    let r = push(
        &blobs,
        &img.subject,
        &img.recipe_bytes,
        &store,
        &PushOptions::default(),
    )
    .unwrap();
    let target = Descriptor::new(OCI_MANIFEST, r.manifest_digest.clone(), r.descriptor.size);
    (dir, blobs, target)
}

fn keys(k: &[&SigningKey]) -> Vec<Arc<VerifyKey>> {
    k.iter()
        .map(|k| Arc::new(k.verify_key("test.pub").unwrap()))
        .collect()
}

#[test]
fn a_signed_artifact_verifies_through_the_referrers() {
    for api in [false, true] {
        let (_d, blobs, target) = pushed(api);
        let (good, other) = (
            SigningKey::generate().unwrap(),
            SigningKey::generate().unwrap(),
        );
        let none = find_signature(&blobs, &target.digest, &keys(&[&good])).unwrap();
        assert_eq!(none, Err("no signature".into()));
        let s = sign_manifest(&blobs, &target, &good).unwrap();
        let found = find_signature(&blobs, &target.digest, &keys(&[&other, &good])).unwrap();
        assert_eq!(found.unwrap().signature, s.manifest_digest);
        let refused = find_signature(&blobs, &target.digest, &keys(&[&other])).unwrap();
        assert!(refused.unwrap_err().contains("by no trusted key"));
        // Discovery checks it alongside the artifact.
        let opts = DiscoverOptions {
            verify_keys: keys(&[&good]),
            ..DiscoverOptions::default()
        };
        let subject = blobs.get_manifest(&target.digest).unwrap().unwrap().1;
        let subject: ArtifactManifest = serde_json::from_slice(&subject).unwrap();
        let a = discover(&blobs, &subject.subject.unwrap().digest, &opts).unwrap();
        assert!(a.signature.unwrap().is_ok());
        // Signing again with the same key replaces the entry (in the tag).
        sign_manifest(&blobs, &target, &good).unwrap();
        let listed =
            crate::discover::list_referrers_of(&blobs, &target.digest, COSIGN_SIGNATURE).unwrap();
        if !api {
            assert_eq!(listed.len(), 1, "{listed:?}");
        }
        assert!(blobs
            .manifest_puts
            .lock()
            .unwrap()
            .iter()
            .any(|p| p.contains(".sig ")));
    }
}

/// Pushes `m` as a signature of `target` (as an attacker would).
fn attach(blobs: &DirBlobs, m: &ArtifactManifest) {
    let bytes = m.to_bytes();
    let digest = digest_of(&bytes);
    blobs.put_manifest(&digest, OCI_MANIFEST, &bytes).unwrap();
    update_referrers(blobs, m, &bytes, &digest, &|_| false).unwrap();
}

/// Why no signature of `target` verified.
fn refusal(blobs: &DirBlobs, target: &Descriptor, trusted: &[Arc<VerifyKey>]) -> String {
    find_signature(blobs, &target.digest, trusted)
        .unwrap()
        .unwrap_err()
}

#[test]
fn tampered_signatures_and_payloads_are_refused() {
    let (_d, blobs, target) = pushed(false);
    let key = SigningKey::generate().unwrap();
    let trusted = keys(&[&key]);
    let payload = SimpleSigning::new("test", &target.digest).to_bytes();
    let good = key.sign(&payload).unwrap();

    // A signature with one character changed.
    let mut bad = good.clone().into_bytes();
    bad[10] = if bad[10] == b'A' { b'B' } else { b'A' };
    let bad = String::from_utf8(bad).unwrap();
    attach(
        &blobs,
        &signature_manifest(&target, &payload, &bad, &key.id),
    );
    let why = refusal(&blobs, &target, &trusted);
    assert!(why.contains("by no trusted key (or tampered)"), "{why}");

    // A genuine signature of another manifest, attached to this one.
    let elsewhere = SimpleSigning::new("test", &digest_of(b"other")).to_bytes();
    let sig = key.sign(&elsewhere).unwrap();
    attach(
        &blobs,
        &signature_manifest(&target, &elsewhere, &sig, &key.id),
    );
    let why = refusal(&blobs, &target, &trusted);
    assert!(why.contains("payload claims"), "{why}");

    // Embedded data that is not the payload its digest names.
    let mut m = signature_manifest(&target, &payload, &good, &key.id);
    m.layers[0].data = Some(base64::engine::general_purpose::STANDARD.encode(b"forged"));
    attach(&blobs, &m);
    let why = refusal(&blobs, &target, &trusted);
    assert!(why.contains("does not match its digest"), "{why}");

    // The genuine one, next to all of those, verifies.
    attach(
        &blobs,
        &signature_manifest(&target, &payload, &good, &key.id),
    );
    assert!(find_signature(&blobs, &target.digest, &trusted)
        .unwrap()
        .is_ok());
}
