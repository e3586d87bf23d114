//! The smr artifact: an OCI image manifest whose `subject` is the source
//! image's manifest, so it is found through the referrers API (or its
//! `sha256-<hex>` tag fallback) while the source image stays untouched.
//! An image with no OCI source (one made by `smr commit`) is an artifact
//! without a `subject`, reached through its own tag.
//!
//! ```text
//! { "schemaVersion": 2,
//!   "mediaType": "application/vnd.oci.image.manifest.v1+json",
//!   "artifactType": "application/vnd.smr.image.v1",
//!   "config": <the OCI empty descriptor, "{}">,
//!   "layers": [ recipe, pack index, pack, pack, ... ],
//!   "subject": <source platform manifest>,
//!   "annotations": { "vnd.smr.chunk-size": "524288", ... } }
//! ```
//! Serialized compactly with fields in the order above and annotations
//! sorted, so the same recipe and packs always give the same manifest
//! digest (no timestamps). Layout and rules: `docs/FORMAT.md` §5.

use crate::error::{RegistryError, Result};
use crate::media_types::{SMR_ARTIFACT, SMR_PACK, SMR_PACK_INDEX, SMR_RECIPE};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use smr_image::media_types::{OCI_EMPTY, OCI_INDEX, OCI_MANIFEST};
use std::collections::BTreeMap;

/// The content of the OCI empty blob.
pub const EMPTY_BLOB: &[u8] = b"{}";
/// Digest of [`EMPTY_BLOB`].
pub const EMPTY_DIGEST: &str =
    "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a";

/// Annotation: the recipe's chunk size in bytes (decimal).
pub const ANNOTATION_CHUNK_SIZE: &str = "vnd.smr.chunk-size";
/// Annotation: how the chunks are cut: `fixed`, or `cdc MIN:AVG:MAX`
/// (e.g. `cdc 16K:64K:256K`).
pub const ANNOTATION_CHUNKING: &str = "vnd.smr.chunking";
/// Annotation: the filesystem image size in bytes (decimal).
pub const ANNOTATION_IMAGE_SIZE: &str = "vnd.smr.image-size";
/// Annotation: number of stored chunks in the recipe (decimal).
pub const ANNOTATION_CHUNKS: &str = "vnd.smr.chunks";
/// Annotation: `true` when chunks are encrypted, else `false`.
pub const ANNOTATION_ENCRYPTED: &str = "vnd.smr.encrypted";
/// Annotation: the converter's layout version (`smr_convert::LAYOUT_VERSION`)
/// that made the recipe: the same source converts to the same recipe only
/// under the same layout.
pub const ANNOTATION_LAYOUT: &str = "vnd.smr.layout";
/// Annotation: the zstd level of compressed chunks (decimal), when any.
pub const ANNOTATION_ZSTD_LEVEL: &str = "vnd.smr.zstd-level";
/// Annotation: the pack target, in chunks per pack (decimal).
pub const ANNOTATION_CHUNKS_PER_PACK: &str = "vnd.smr.chunks-per-pack";

/// Annotation prefix naming the manifest's recipe blob: `PREFIX.digest`
/// and `PREFIX.size` ([`blob_annotations`]). A referrers entry carries its
/// manifest's annotations, so a lookup can fetch the blob beside the
/// manifest (checked against it once it arrives).
pub const ANNOTATION_RECIPE: &str = "vnd.smr.recipe";
/// Annotation prefix naming the manifest's pack index blob, as
/// [`ANNOTATION_RECIPE`] does the recipe.
pub const ANNOTATION_PACK_INDEX: &str = "vnd.smr.pack-index";

/// The annotations `PREFIX.digest` and `PREFIX.size` that name blob `d`.
pub fn blob_annotations(prefix: &str, d: &Descriptor) -> [(String, String); 2] {
    [
        (format!("{prefix}.digest"), d.digest.clone()),
        (format!("{prefix}.size"), d.size.to_string()),
    ]
}

/// `sha256:<hex>` of `bytes`.
pub fn digest_of(bytes: &[u8]) -> String {
    digest_of_hex(&hex::encode(Sha256::digest(bytes)))
}

/// `sha256:<hex>` from 64 hex digits.
pub(crate) fn digest_of_hex(hex: &str) -> String {
    format!("sha256:{hex}")
}

/// The 32 bytes of a `sha256:<64 lowercase hex>` digest, or `None` if
/// `digest` is not one (other algorithms are not used by smr).
pub fn parse_digest(digest: &str) -> Option<[u8; 32]> {
    let hex = digest.strip_prefix("sha256:")?;
    if hex.len() != 64 || hex.bytes().any(|b| b.is_ascii_uppercase()) {
        return None;
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex, &mut out).ok()?;
    Some(out)
}

/// The tag of the referrers tag-schema fallback for `subject`:
/// `sha256-<hex>`. `None` if `subject` is not a sha256 digest.
pub fn fallback_tag(subject: &str) -> Option<String> {
    parse_digest(subject)?;
    subject
        .strip_prefix("sha256:")
        .map(|h| format!("sha256-{h}"))
}

/// An OCI content descriptor (the fields smr writes, in this order).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// Media type of the referenced content.
    pub media_type: String,
    /// `sha256:<hex>` of the content.
    pub digest: String,
    /// Size of the content in bytes.
    pub size: u64,
    /// Artifact type (referrers index entries only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    /// Annotations, sorted by key.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// The content itself, base64 (OCI 1.1's embedded `data`), so that a
    /// reader of a small blob needs no request; checked against `digest`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
}

impl Descriptor {
    /// A descriptor of `bytes` with `media_type`.
    pub fn of(media_type: &str, bytes: &[u8]) -> Self {
        Descriptor::new(media_type, digest_of(bytes), bytes.len() as u64)
    }

    /// A descriptor without artifact type or annotations.
    pub fn new(media_type: &str, digest: String, size: u64) -> Self {
        Descriptor {
            media_type: media_type.to_string(),
            digest,
            size,
            artifact_type: None,
            annotations: BTreeMap::new(),
            data: None,
        }
    }

    /// The OCI empty descriptor (`{}`), the config of every smr artifact.
    pub fn empty() -> Self {
        Descriptor::new(OCI_EMPTY, EMPTY_DIGEST.to_string(), 2)
    }
}

/// The manifest of an smr artifact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ArtifactManifest {
    /// Always 2.
    pub schema_version: u32,
    /// Always [`OCI_MANIFEST`].
    pub media_type: String,
    /// Always [`SMR_ARTIFACT`].
    pub artifact_type: String,
    /// The empty descriptor.
    pub config: Descriptor,
    /// Recipe, pack index, then the packs in pack index order.
    pub layers: Vec<Descriptor>,
    /// The source image's platform manifest; `None` for an image that has
    /// no OCI source (committed from a volume), reached by its tag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<Descriptor>,
    /// Summary annotations (`vnd.smr.*`), sorted by key.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl ArtifactManifest {
    /// The manifest of an artifact made of `recipe`, `pack_index` and
    /// `packs` (descriptors of those blobs), converted from `subject`
    /// (`None`: an image with no OCI source).
    pub fn new(
        subject: Option<Descriptor>,
        recipe: Descriptor,
        pack_index: Descriptor,
        packs: Vec<Descriptor>,
        annotations: BTreeMap<String, String>,
    ) -> Self {
        let mut layers = Vec::with_capacity(packs.len() + 2);
        layers.push(recipe);
        layers.push(pack_index);
        layers.extend(packs);
        ArtifactManifest {
            schema_version: 2,
            media_type: OCI_MANIFEST.to_string(),
            artifact_type: SMR_ARTIFACT.to_string(),
            config: Descriptor::empty(),
            layers,
            subject: subject.map(|subject| Descriptor {
                artifact_type: None,
                annotations: BTreeMap::new(),
                ..subject
            }),
            annotations,
        }
    }

    /// The canonical bytes (compact JSON, fixed field order).
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("plain structs, strings and maps always serialize")
    }

    /// Parses manifest `bytes` (named `manifest` in errors, of `repo`) and
    /// checks it is an smr artifact: see [`ArtifactManifest::validate`].
    pub fn parse(repo: &str, manifest: &str, bytes: &[u8]) -> Result<Self> {
        let m: ArtifactManifest =
            serde_json::from_slice(bytes).map_err(|source| RegistryError::Json {
                what: format!("{repo}: manifest {manifest}"),
                source,
            })?;
        m.validate().map_err(|reason| bad(repo, manifest, reason))?;
        Ok(m)
    }

    /// Checks the media types, the config, the layer order and every
    /// digest; returns what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        if self.schema_version != 2 {
            return Err(format!(
                "schemaVersion {} (expected 2)",
                self.schema_version
            ));
        }
        expect("mediaType", &self.media_type, OCI_MANIFEST)?;
        expect("artifactType", &self.artifact_type, SMR_ARTIFACT)?;
        expect("config mediaType", &self.config.media_type, OCI_EMPTY)?;
        if self.config.digest != EMPTY_DIGEST || self.config.size != 2 {
            return Err(format!(
                "config {} ({} bytes) is not the empty descriptor",
                self.config.digest, self.config.size
            ));
        }
        if self.layers.len() < 2 {
            return Err(format!(
                "{} layers (expected recipe, pack index, packs…)",
                self.layers.len()
            ));
        }
        for (i, l) in self.layers.iter().enumerate() {
            let want = match i {
                0 => SMR_RECIPE,
                1 => SMR_PACK_INDEX,
                _ => SMR_PACK,
            };
            expect(&format!("layer {i} mediaType"), &l.media_type, want)?;
            if parse_digest(&l.digest).is_none() {
                return Err(format!("layer {i} has a bad digest `{}`", l.digest));
            }
        }
        if let Some(subject) = &self.subject {
            if parse_digest(&subject.digest).is_none() {
                return Err(format!("subject has a bad digest `{}`", subject.digest));
            }
        }
        Ok(())
    }

    /// The recipe layer.
    pub fn recipe(&self) -> Option<&Descriptor> {
        self.layers.first()
    }

    /// The pack index layer.
    pub fn pack_index(&self) -> Option<&Descriptor> {
        self.layers.get(1)
    }

    /// The pack layers.
    pub fn packs(&self) -> &[Descriptor] {
        self.layers.get(2..).unwrap_or(&[])
    }

    /// The entry for this manifest (whose bytes are `bytes`) in a
    /// referrers index: media type, digest, size, artifact type and the
    /// manifest's annotations, as the referrers API lists it.
    pub fn referrer(&self, bytes: &[u8]) -> Descriptor {
        Descriptor {
            artifact_type: Some(self.artifact_type.clone()),
            annotations: self.annotations.clone(),
            ..Descriptor::of(&self.media_type, bytes)
        }
    }
}

fn expect(field: &str, got: &str, want: &str) -> Result<(), String> {
    if got == want {
        Ok(())
    } else {
        Err(format!("{field} is `{got}` (expected `{want}`)"))
    }
}

/// A [`RegistryError::BadArtifact`].
pub(crate) fn bad(repo: &str, manifest: &str, reason: impl Into<String>) -> RegistryError {
    RegistryError::BadArtifact {
        repo: repo.to_string(),
        manifest: manifest.to_string(),
        reason: reason.into(),
    }
}

/// The `manifests` of a referrers index (the referrers API answer or the
/// fallback tag's index), leniently: entries that are not descriptors are
/// skipped (other tools' business), a document that is not an image index
/// is an error.
pub fn parse_referrers(repo: &str, what: &str, bytes: &[u8]) -> Result<Vec<Descriptor>> {
    let doc: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|source| RegistryError::Json {
            what: format!("{repo}: {what}"),
            source,
        })?;
    let manifests = index_manifests(&doc).map_err(|reason| bad(repo, what, reason))?;
    Ok(manifests
        .iter()
        .filter_map(|v| serde_json::from_value::<Descriptor>(v.clone()).ok())
        .collect())
}

/// The `manifests` array of an image index document.
pub(crate) fn index_manifests(doc: &serde_json::Value) -> Result<&Vec<serde_json::Value>, String> {
    let obj = doc.as_object().ok_or("not a JSON object")?;
    match obj.get("mediaType").and_then(|v| v.as_str()) {
        None | Some(OCI_INDEX) => {}
        Some(other) => return Err(format!("mediaType `{other}` (expected `{OCI_INDEX}`)")),
    }
    obj.get("manifests")
        .and_then(|v| v.as_array())
        .ok_or_else(|| "no `manifests` array: not an image index".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> (ArtifactManifest, Vec<u8>) {
        let subject = Descriptor::of(OCI_MANIFEST, b"source manifest");
        let recipe = Descriptor::of(SMR_RECIPE, b"recipe");
        let index = Descriptor::of(SMR_PACK_INDEX, b"index");
        let packs = vec![
            Descriptor::of(SMR_PACK, b"p1"),
            Descriptor::of(SMR_PACK, b"p2"),
        ];
        let mut ann = BTreeMap::new();
        ann.insert(ANNOTATION_CHUNK_SIZE.to_string(), "65536".to_string());
        ann.insert(ANNOTATION_ENCRYPTED.to_string(), "true".to_string());
        let m = ArtifactManifest::new(Some(subject), recipe, index, packs, ann);
        let b = m.to_bytes();
        (m, b)
    }

    #[test]
    fn an_image_without_a_source_has_no_subject_field() {
        let (mut m, _) = sample();
        m.subject = None;
        let b = m.to_bytes();
        let text = String::from_utf8(b.clone()).unwrap();
        assert!(!text.contains("subject"), "{text}");
        assert_eq!(ArtifactManifest::parse("r", "m", &b).unwrap(), m);
    }

    #[test]
    fn empty_digest_is_the_digest_of_empty_json() {
        assert_eq!(digest_of(EMPTY_BLOB), EMPTY_DIGEST);
    }

    #[test]
    fn manifest_round_trips_with_fixed_field_order() {
        let (m, b) = sample();
        let text = String::from_utf8(b.clone()).unwrap();
        let order = [
            "\"schemaVersion\":2",
            "\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\"",
            "\"artifactType\":\"application/vnd.smr.image.v1\"",
            "\"config\":{\"mediaType\":\"application/vnd.oci.empty.v1+json\"",
            "\"layers\":[",
            "\"subject\":",
            "\"annotations\":{\"vnd.smr.chunk-size\":\"65536\",\"vnd.smr.encrypted\":\"true\"}",
        ];
        let mut at = 0;
        for f in order {
            let pos = text[at..]
                .find(f)
                .unwrap_or_else(|| panic!("{f} after {at} in {text}"));
            at += pos;
        }
        let back = ArtifactManifest::parse("r", "m", &b).unwrap();
        assert_eq!(back, m);
        assert_eq!(back.to_bytes(), b);
        assert_eq!(back.packs().len(), 2);
        let entry = m.referrer(&b);
        assert_eq!(entry.digest, digest_of(&b));
        assert_eq!(entry.artifact_type.as_deref(), Some(SMR_ARTIFACT));
    }

    #[test]
    fn rejects_what_is_not_an_smr_artifact() {
        let (m, _) = sample();
        type Mutation = Box<dyn Fn(&mut ArtifactManifest)>;
        let cases: Vec<(Mutation, &str)> = vec![
            (Box::new(|m| m.artifact_type = "x".into()), "artifactType"),
            (Box::new(|m| m.media_type = OCI_INDEX.into()), "mediaType"),
            (Box::new(|m| m.config.digest = digest_of(b"x")), "config"),
            (Box::new(|m| m.layers.swap(0, 1)), "layer 0 mediaType"),
            (Box::new(|m| m.layers.truncate(1)), "1 layers"),
            (
                Box::new(|m| m.layers[2].digest = "sha256:AB".into()),
                "layer 2 has a bad digest",
            ),
            (
                Box::new(|m| {
                    if let Some(s) = &mut m.subject {
                        s.digest = "md5:1".into()
                    }
                }),
                "subject",
            ),
        ];
        for (mutate, needle) in cases {
            let mut bad = m.clone();
            mutate(&mut bad);
            let err = ArtifactManifest::parse("reg/repo", "sha256:feed", &bad.to_bytes())
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle) && err.contains("sha256:feed"), "{err}");
        }
        let err = ArtifactManifest::parse("reg/repo", "sha256:feed", b"{").unwrap_err();
        assert!(err.to_string().contains("manifest sha256:feed"), "{err}");
    }

    #[test]
    fn digests_and_fallback_tags() {
        let d = digest_of(b"abc");
        assert!(parse_digest(&d).is_some());
        assert!(parse_digest(&d.to_uppercase()).is_none());
        assert!(parse_digest("sha512:00").is_none());
        assert_eq!(fallback_tag(&d).unwrap(), d.replace("sha256:", "sha256-"));
        assert_eq!(fallback_tag("latest"), None);
    }

    #[test]
    fn referrers_parse_leniently_but_reject_non_indexes() {
        let (m, b) = sample();
        let doc = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [m.referrer(&b), {"weird": true}],
        });
        let v = parse_referrers("r", "t", &serde_json::to_vec(&doc).unwrap()).unwrap();
        assert_eq!(v, vec![m.referrer(&b)]);
        let not = serde_json::json!({"mediaType": OCI_MANIFEST, "layers": []});
        let err = parse_referrers("r", "tag x", &serde_json::to_vec(&not).unwrap()).unwrap_err();
        assert!(err.to_string().contains("tag x"), "{err}");
    }
}
