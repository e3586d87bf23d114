//! Cosign-compatible signatures of smr artifacts.
//!
//! A signature is what `cosign sign --key` makes, in the layout of its OCI
//! 1.1 mode (`--registry-referrers-mode=oci-1-1`): a manifest whose
//! `subject` is the signed smr artifact, found among the artifact's
//! referrers (API or `sha256-<hex>` fallback tag), and also tagged
//! `sha256-<hex>.sig` where cosign's default mode looks:
//!
//! ```text
//! { "schemaVersion": 2,
//!   "mediaType": "application/vnd.oci.image.manifest.v1+json",
//!   "artifactType": "application/vnd.dev.cosign.artifact.sig.v1+json",
//!   "config": <the OCI empty descriptor>,
//!   "layers": [ { "mediaType": "application/vnd.dev.cosign.simplesigning.v1+json",
//!                 "digest": <payload>, "size": …,
//!                 "annotations": { "dev.cosignproject.cosign/signature": <base64 signature> },
//!                 "data": <the payload, base64> } ],
//!   "subject": <the smr artifact manifest>,
//!   "annotations": { "vnd.smr.signer": <key id> } }
//! ```
//!
//! The payload is cosign's "simple signing" document naming the artifact's
//! repository and manifest digest; the signature is ECDSA P-256 / SHA-256
//! (ASN.1 DER, base64) by a cosign key pair (`cosign generate-key-pair`'s
//! files, or `smr keygen --cosign`). The payload is also embedded in the
//! layer descriptor (`data`), so that a node checks a signature with two
//! requests (referrers, signature manifest) and no blob fetch; cosign reads
//! the same payload from the blob. The crypto (key files, signing,
//! verification) is sigstore-rs's.

use crate::artifact::{digest_of, ArtifactManifest, Descriptor};
use crate::blobs::Blobs;
use crate::discover::list_referrers_of;
use crate::error::{RegistryError, Result};
use crate::push::{push_small_referrer, update_referrers, ReferrersUpdate};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use sigstore::crypto::{
    signing_key::SigStoreKeyPair, CosignVerificationKey, SigStoreSigner, Signature, SigningScheme,
};
use smr_image::media_types::OCI_MANIFEST;
use std::collections::BTreeMap;

/// `artifactType` of a cosign signature manifest (OCI 1.1 mode).
pub const COSIGN_SIGNATURE: &str = "application/vnd.dev.cosign.artifact.sig.v1+json";
/// Media type of the signed payload layer.
pub const SIMPLE_SIGNING: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
/// Layer annotation holding the base64 signature.
pub const SIGNATURE_ANNOTATION: &str = "dev.cosignproject.cosign/signature";
/// Manifest annotation: id of the key that signed ([`key_id`]).
pub const ANNOTATION_SIGNER: &str = "vnd.smr.signer";
/// The `type` of a simple-signing payload for a container image.
const PAYLOAD_TYPE: &str = "cosign container image signature";
/// Largest payload read (a simple-signing document is a few hundred bytes).
const MAX_PAYLOAD: u64 = 64 << 10;
/// Signature manifests of one artifact checked at most (each is a request).
const MAX_SIGNATURES: usize = 8;

/// Cosign's simple-signing payload, fields in cosign's order (its bytes
/// are what is signed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimpleSigning {
    /// What is signed.
    pub critical: Critical,
    /// Free-form claims (cosign's `-a key=value`), `null` when none.
    pub optional: Option<BTreeMap<String, serde_json::Value>>,
}

/// The signed claims.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Critical {
    /// The repository signed for.
    pub identity: Identity,
    /// The manifest signed.
    pub image: Image,
    /// Always `cosign container image signature`.
    #[serde(rename = "type")]
    pub kind: String,
}

/// `critical.identity`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// `host/name` of the repository.
    #[serde(rename = "docker-reference")]
    pub docker_reference: String,
}

/// `critical.image`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Image {
    /// The signed manifest's digest.
    #[serde(rename = "docker-manifest-digest")]
    pub docker_manifest_digest: String,
}

impl SimpleSigning {
    /// The payload signing manifest `digest` of repository `repo`.
    pub fn new(repo: &str, digest: &str) -> Self {
        SimpleSigning {
            critical: Critical {
                identity: Identity {
                    docker_reference: repo.to_string(),
                },
                image: Image {
                    docker_manifest_digest: digest.to_string(),
                },
                kind: PAYLOAD_TYPE.to_string(),
            },
            optional: None,
        }
    }

    /// The bytes that are signed (compact JSON, as cosign writes them).
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a simple-signing payload always serializes")
    }
}

/// Errors of key files and signatures (never carrying key material).
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// A key file that sigstore could not read (wrong password, not a key).
    #[error("{what}: {reason}")]
    Key {
        /// The key file or what it was used for.
        what: String,
        /// Why.
        reason: String,
    },
}

/// The short id of a public key: the first 16 hex digits of the SHA-256 of
/// its DER (SubjectPublicKeyInfo) encoding.
pub fn key_id(public_der: &[u8]) -> String {
    digest_of(public_der)["sha256:".len()..][..16].to_string()
}

/// A private key that signs artifacts.
pub struct SigningKey {
    signer: SigStoreSigner,
    /// [`key_id`] of its public key.
    pub id: String,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey").field("id", &self.id).finish()
    }
}

fn key_error(what: &str, e: impl std::fmt::Display) -> KeyError {
    KeyError::Key {
        what: what.to_string(),
        reason: e.to_string(),
    }
}

impl SigningKey {
    /// A key from a cosign private key file (`ENCRYPTED SIGSTORE PRIVATE
    /// KEY` or `ENCRYPTED COSIGN PRIVATE KEY`) and its password. ECDSA
    /// P-256 (cosign's default) and Ed25519 keys sign.
    pub fn from_cosign_pem(pem: &[u8], password: &[u8], what: &str) -> Result<Self, KeyError> {
        let pair = SigStoreKeyPair::from_encrypted_pem(pem, password).map_err(|e| {
            key_error(
                what,
                format!("not a cosign private key, or the wrong password ({e})"),
            )
        })?;
        let scheme = match &pair {
            SigStoreKeyPair::ECDSA(_) => SigningScheme::ECDSA_P256_SHA256_ASN1,
            SigStoreKeyPair::ED25519(_) => SigningScheme::ED25519,
            SigStoreKeyPair::RSA(_) => {
                return Err(key_error(what, "RSA keys are not supported; use `cosign generate-key-pair` or `smr keygen --cosign`"))
            }
        };
        let signer = pair
            .to_sigstore_signer(&scheme)
            .map_err(|e| key_error(what, e))?;
        Self::from_signer(signer, what)
    }

    /// A new random ECDSA P-256 key.
    pub fn generate() -> Result<Self, KeyError> {
        let signer = SigningScheme::ECDSA_P256_SHA256_ASN1
            .create_signer()
            .map_err(|e| key_error("generating a key", e))?;
        Self::from_signer(signer, "generated key")
    }

    fn from_signer(signer: SigStoreSigner, what: &str) -> Result<Self, KeyError> {
        let pair = signer
            .to_sigstore_keypair()
            .map_err(|e| key_error(what, e))?;
        let der = pair.public_key_to_der().map_err(|e| key_error(what, e))?;
        Ok(SigningKey {
            signer,
            id: key_id(&der),
        })
    }

    /// The private key as a cosign key file encrypted with `password`, and
    /// the public key as PEM (what `cosign generate-key-pair` writes).
    pub fn to_cosign_pem(&self, password: &[u8]) -> Result<(String, String), KeyError> {
        let pair = self
            .signer
            .to_sigstore_keypair()
            .map_err(|e| key_error("exporting the key", e))?;
        let private = pair
            .private_key_to_encrypted_pem(password)
            .map_err(|e| key_error("exporting the key", e))?;
        let public = pair
            .public_key_to_pem()
            .map_err(|e| key_error("exporting the key", e))?;
        Ok((private.to_string(), public))
    }

    /// The public half.
    pub fn verify_key(&self, name: &str) -> Result<VerifyKey, KeyError> {
        let key = self
            .signer
            .to_verification_key()
            .map_err(|e| key_error(name, e))?;
        Ok(VerifyKey {
            key,
            name: name.to_string(),
            id: self.id.clone(),
        })
    }

    /// The base64 signature of `payload`.
    pub fn sign(&self, payload: &[u8]) -> Result<String, KeyError> {
        let sig = self
            .signer
            .sign(payload)
            .map_err(|e| key_error("signing", e))?;
        Ok(base64::engine::general_purpose::STANDARD.encode(sig))
    }
}

/// A public key the node trusts to sign artifacts.
pub struct VerifyKey {
    key: CosignVerificationKey,
    /// Where it came from (file name), for messages.
    pub name: String,
    /// [`key_id`].
    pub id: String,
}

impl std::fmt::Debug for VerifyKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifyKey")
            .field("name", &self.name)
            .field("id", &self.id)
            .finish()
    }
}

impl PartialEq for VerifyKey {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
    }
}
impl Eq for VerifyKey {}

impl VerifyKey {
    /// A key from a `PUBLIC KEY` PEM (cosign.pub), named `name`.
    pub fn from_pem(pem: &[u8], name: &str) -> Result<Self, KeyError> {
        let key = CosignVerificationKey::try_from_pem(pem)
            .map_err(|e| key_error(name, format!("not a public key PEM ({e})")))?;
        let der = pem_der(pem).ok_or_else(|| key_error(name, "not a PEM public key"))?;
        Ok(VerifyKey {
            key,
            name: name.to_string(),
            id: key_id(&der),
        })
    }

    /// The key's algorithm, for display.
    pub fn algorithm(&self) -> &'static str {
        match &self.key {
            CosignVerificationKey::ECDSA_P256_SHA256_ASN1(_) => "ecdsa-p256",
            CosignVerificationKey::ECDSA_P384_SHA384_ASN1(_) => "ecdsa-p384",
            CosignVerificationKey::ED25519(_) => "ed25519",
            _ => "rsa",
        }
    }

    /// Whether `signature` (base64) signs `payload` under this key.
    pub fn verifies(&self, signature: &str, payload: &[u8]) -> bool {
        self.key
            .verify_signature(Signature::Base64Encoded(signature.as_bytes()), payload)
            .is_ok()
    }
}

/// The DER of the first PEM block in `pem`.
fn pem_der(pem: &[u8]) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(pem).ok()?;
    let body: String = text
        .lines()
        .skip_while(|l| !l.starts_with("-----BEGIN "))
        .skip(1)
        .take_while(|l| !l.starts_with("-----END "))
        .collect();
    base64::engine::general_purpose::STANDARD.decode(body).ok()
}

/// What [`sign_manifest`] pushed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SignaturePush {
    /// Digest of the signature manifest.
    pub manifest_digest: String,
    /// The key's id.
    pub key_id: String,
    /// How the signature was made findable from the artifact.
    pub referrers: ReferrersUpdate,
}

/// The manifest of `signature` over `payload` for `subject`, by `key_id`.
pub fn signature_manifest(
    subject: &Descriptor,
    payload: &[u8],
    signature: &str,
    key_id: &str,
) -> ArtifactManifest {
    let mut layer = Descriptor::of(SIMPLE_SIGNING, payload);
    layer
        .annotations
        .insert(SIGNATURE_ANNOTATION.to_string(), signature.to_string());
    layer.data = Some(base64::engine::general_purpose::STANDARD.encode(payload));
    ArtifactManifest {
        schema_version: 2,
        media_type: OCI_MANIFEST.to_string(),
        artifact_type: COSIGN_SIGNATURE.to_string(),
        config: Descriptor::empty(),
        layers: vec![layer],
        subject: Some(Descriptor::new(
            &subject.media_type,
            subject.digest.clone(),
            subject.size,
        )),
        annotations: BTreeMap::from([(ANNOTATION_SIGNER.to_string(), key_id.to_string())]),
    }
}

/// Signs manifest `subject` (an smr artifact, or an image index of
/// `--index`) of this repository with `key` and pushes the signature: the
/// payload blob, the manifest, the referrers entry (replacing an older
/// signature by the same key) and the `sha256-<hex>.sig` tag.
pub fn sign_manifest(
    blobs: &dyn Blobs,
    subject: &Descriptor,
    key: &SigningKey,
) -> Result<SignaturePush> {
    let repo = blobs.describe();
    let payload = SimpleSigning::new(&repo, &subject.digest).to_bytes();
    let signature = key.sign(&payload).map_err(|e| RegistryError::Protocol {
        repo: repo.clone(),
        what: format!("signing {}", subject.digest),
        reason: e.to_string(),
    })?;
    let manifest = signature_manifest(subject, &payload, &signature, &key.id);
    let (digest, bytes) = push_small_referrer(blobs, &manifest, &payload, "signature")?;
    let same_key = |d: &Descriptor| {
        d.artifact_type.as_deref() == Some(COSIGN_SIGNATURE)
            && d.annotations.get(ANNOTATION_SIGNER) == Some(&key.id)
    };
    let referrers = update_referrers(blobs, &manifest, &bytes, &digest, &same_key)?;
    if let Some(tag) = crate::artifact::fallback_tag(&subject.digest) {
        blobs.put_manifest(&format!("{tag}.sig"), OCI_MANIFEST, &bytes)?;
    }
    tracing::info!(%repo, signed = %subject.digest, signature = %digest, key = %key.id, "pushed signature");
    Ok(SignaturePush {
        manifest_digest: digest,
        key_id: key.id.clone(),
        referrers,
    })
}

/// Who signed: the trusted key whose signature verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedBy {
    /// The key's name ([`VerifyKey::name`]).
    pub key: String,
    /// The signature manifest.
    pub signature: String,
}

/// Looks for a signature of manifest `digest` by one of `keys` among its
/// referrers. `Ok(Err(why))`: none verified (no signature, untrusted keys,
/// tampered ones), each reason given; `Err`: the registry failed.
pub fn find_signature(
    blobs: &dyn Blobs,
    digest: &str,
    keys: &[std::sync::Arc<VerifyKey>],
) -> Result<std::result::Result<SignedBy, String>> {
    let repo = blobs.describe();
    let listed: Vec<Descriptor> = list_referrers_of(blobs, digest, COSIGN_SIGNATURE)?
        .into_iter()
        .filter(|d| d.artifact_type.as_deref() == Some(COSIGN_SIGNATURE))
        .take(MAX_SIGNATURES)
        .collect();
    if listed.is_empty() {
        return Ok(Err("no signature".to_string()));
    }
    let mut why = Vec::new();
    for d in &listed {
        match check_signature(blobs, &repo, &d.digest, digest, keys) {
            Ok(key) => {
                tracing::info!(signed = %digest, signature = %d.digest, key = %key, "signature verified");
                return Ok(Ok(SignedBy {
                    key,
                    signature: d.digest.clone(),
                }));
            }
            Err(e) => why.push(format!("signature {}: {e}", d.digest)),
        }
    }
    Ok(Err(why.join("; ")))
}

/// Checks signature manifest `sig` of `digest`; returns the name of the key
/// that verified it, or why none did.
fn check_signature(
    blobs: &dyn Blobs,
    repo: &str,
    sig: &str,
    digest: &str,
    keys: &[std::sync::Arc<VerifyKey>],
) -> std::result::Result<String, String> {
    let (_, bytes) = blobs
        .get_manifest(sig)
        .map_err(|e| e.to_string())?
        .ok_or("listed, but not in the repository")?;
    crate::discover::verify(repo, sig, sig, &bytes).map_err(|e| e.to_string())?;
    let m: ArtifactManifest =
        serde_json::from_slice(&bytes).map_err(|e| format!("not a signature manifest: {e}"))?;
    let signs = m.subject.as_ref().map_or("nothing", |s| s.digest.as_str());
    if signs != digest {
        return Err(format!("signs {signs}, not {digest}"));
    }
    let mut why = Vec::new();
    for layer in m.layers.iter().filter(|l| l.media_type == SIMPLE_SIGNING) {
        let Some(sig_b64) = layer.annotations.get(SIGNATURE_ANNOTATION) else {
            why.push("a layer without a signature".to_string());
            continue;
        };
        let payload = match payload_of(blobs, layer) {
            Ok(p) => p,
            Err(e) => {
                why.push(e);
                continue;
            }
        };
        let claims: SimpleSigning = match serde_json::from_slice(&payload) {
            Ok(c) => c,
            Err(e) => {
                why.push(format!(
                    "payload {} is not simple signing: {e}",
                    layer.digest
                ));
                continue;
            }
        };
        if claims.critical.image.docker_manifest_digest != digest
            || claims.critical.kind != PAYLOAD_TYPE
        {
            why.push(format!(
                "payload claims {} ({}), not {digest}",
                claims.critical.image.docker_manifest_digest, claims.critical.kind
            ));
            continue;
        }
        match keys.iter().find(|k| k.verifies(sig_b64, &payload)) {
            Some(k) => return Ok(k.name.clone()),
            None => why.push("by no trusted key (or tampered)".to_string()),
        }
    }
    if why.is_empty() {
        why.push("no simple-signing layer".to_string());
    }
    Err(why.join(", "))
}

/// The payload of `layer`: its embedded `data`, else the blob (bounded),
/// checked against the layer's digest and size either way.
fn payload_of(blobs: &dyn Blobs, layer: &Descriptor) -> std::result::Result<Vec<u8>, String> {
    if layer.size > MAX_PAYLOAD {
        return Err(format!(
            "payload {} of {} bytes (limit {MAX_PAYLOAD})",
            layer.digest, layer.size
        ));
    }
    let bytes = match &layer.data {
        Some(b64) => base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|e| format!("payload {} data is not base64: {e}", layer.digest))?,
        None => blobs
            .get_blob(&layer.digest, layer.size)
            .map_err(|e| e.to_string())?,
    };
    if digest_of(&bytes) != layer.digest || bytes.len() as u64 != layer.size {
        return Err(format!(
            "payload does not match its digest {}",
            layer.digest
        ));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests;
