use super::*;
use crate::artifact::digest_of;
use crate::media_types::{SMR_ARTIFACT, SMR_PROFILE};
use smr_image::media_types::{DOCKER_LIST, OCI_MANIFEST};

fn smr_entry(digest: &str, kind: &str) -> Descriptor {
    Descriptor {
        artifact_type: Some(kind.into()),
        ..Descriptor::new(OCI_MANIFEST, digest.into(), 100)
    }
}

fn platform() -> Platform {
    "linux/arm64/v8".parse().unwrap()
}

#[test]
fn a_single_manifest_becomes_an_index_with_its_platform() {
    let manifest = br#"{"schemaVersion":2}"#;
    let subject = digest_of(manifest);
    let entries = [
        smr_entry("sha256:aa", SMR_ARTIFACT),
        smr_entry("sha256:bb", SMR_PROFILE),
    ];
    let bytes = build_index(
        "r",
        (OCI_MANIFEST, manifest),
        &platform(),
        &subject,
        &entries,
    )
    .unwrap();
    let doc: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(doc["mediaType"], OCI_INDEX);
    let m = doc["manifests"].as_array().unwrap();
    assert_eq!(m.len(), 3);
    assert_eq!(m[0]["digest"], subject.as_str());
    assert_eq!(m[0]["platform"]["architecture"], "arm64");
    assert_eq!(m[0]["platform"]["variant"], "v8");
    assert!(
        m[1].get("platform").is_none(),
        "smr entries have no platform"
    );
    let found = entries_for(&bytes, &subject);
    assert_eq!(found.len(), 2);
    assert_eq!(found[0].artifact_type.as_deref(), Some(SMR_ARTIFACT));
    assert!(entries_for(&bytes, "sha256:other").is_empty());
}

#[test]
fn an_index_keeps_its_entries_and_older_smr_entries_are_replaced() {
    let amd = "sha256:0000000000000000000000000000000000000000000000000000000000000001";
    let arm = "sha256:0000000000000000000000000000000000000000000000000000000000000002";
    let source = serde_json::json!({
        "schemaVersion": 2, "mediaType": DOCKER_LIST,
        "manifests": [
            {"mediaType": "application/vnd.docker.distribution.manifest.v2+json", "digest": amd, "size": 1,
             "platform": {"architecture": "amd64", "os": "linux"}},
            {"mediaType": "application/vnd.docker.distribution.manifest.v2+json", "digest": arm, "size": 1,
             "platform": {"architecture": "arm64", "os": "linux"}}]});
    let source = serde_json::to_vec(&source).unwrap();
    // Each step adds one artifact for one platform manifest.
    let add = |top: (&str, &[u8]), subject: &str, artifact: &str| {
        let entry = [smr_entry(artifact, SMR_ARTIFACT)];
        build_index("r", top, &platform(), subject, &entry).unwrap()
    };
    let first = add((DOCKER_LIST, &source), amd, "sha256:a1");
    let second = add((OCI_INDEX, &first), amd, "sha256:a2");
    let third = add((OCI_INDEX, &second), arm, "sha256:b1");
    let doc: serde_json::Value = serde_json::from_slice(&third).unwrap();
    assert_eq!(doc["mediaType"], OCI_INDEX);
    let digests: Vec<&str> = doc["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["digest"].as_str().unwrap())
        .collect();
    assert_eq!(digests, [amd, arm, "sha256:a2", "sha256:b1"]);
    assert_eq!(entries_for(&third, amd)[0].digest, "sha256:a2");
    assert_eq!(entries_for(&third, arm)[0].digest, "sha256:b1");
}

#[test]
fn malformed_indexes_name_nothing_and_build_refuses_them() {
    assert!(entries_for(b"not json", "sha256:aa").is_empty());
    assert!(entries_for(br#"{"manifests": 3}"#, "sha256:aa").is_empty());
    let e = build_index("r", (OCI_INDEX, b"{"), &platform(), "sha256:aa", &[]).unwrap_err();
    assert!(e.to_string().contains("top manifest"), "{e}");
}
