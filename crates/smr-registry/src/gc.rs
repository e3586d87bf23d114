//! Garbage collection of smr's referrers in a repository: smr artifacts,
//! startup profiles and signatures whose subject manifest no longer exists
//! (the image was deleted). Once their manifests are gone, the registry's
//! own garbage collection frees their blobs (packs, recipes).
//!
//! Orphans are found through the referrers fallback tags (`sha256-<hex>`,
//! and cosign's `sha256-<hex>.sig`), which name their subject: a tag whose
//! subject manifest is missing lists orphans. Each smr referrer listed
//! there is deleted, then the tag's index (or, when other tools' referrers
//! are listed too, the index is rewritten without smr's). Deleting an
//! artifact orphans its signatures, so this repeats until a pass deletes
//! nothing.

use crate::artifact::{parse_digest, parse_referrers};
use crate::blobs::Blobs;
use crate::client::Repository;
use crate::error::Result;
use crate::media_types::{SMR_ARTIFACT, SMR_PROFILE};
use crate::signature::COSIGN_SIGNATURE;
use smr_image::media_types::OCI_INDEX;

/// Passes at most (artifact, then its signatures, then theirs).
const MAX_PASSES: usize = 4;

/// What [`collect`] found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct GcReport {
    /// Subject manifests found missing.
    pub subjects_gone: Vec<String>,
    /// Referrer manifests deleted (or, in a dry run, to delete).
    pub deleted: Vec<String>,
    /// Fallback tags removed or rewritten.
    pub tags: Vec<String>,
}

fn is_smr(artifact_type: Option<&str>) -> bool {
    matches!(
        artifact_type,
        Some(SMR_ARTIFACT | SMR_PROFILE | COSIGN_SIGNATURE)
    )
}

/// The subject digest a fallback tag names, if it is one.
fn subject_of(tag: &str) -> Option<String> {
    let hex = tag.strip_prefix("sha256-")?;
    let hex = hex.strip_suffix(".sig").unwrap_or(hex);
    let digest = format!("sha256:{hex}");
    parse_digest(&digest).map(|_| digest)
}

/// Deletes (unless `dry_run`) smr's referrers whose subject is gone.
pub fn collect(repo: &Repository, dry_run: bool) -> Result<GcReport> {
    let mut report = GcReport::default();
    let name = repo.describe();
    for _ in 0..MAX_PASSES {
        let before = report.deleted.len() + report.tags.len();
        for tag in repo.list_tags()? {
            let Some(subject) = subject_of(&tag) else {
                continue;
            };
            if report.tags.contains(&tag) || repo.get_manifest(&subject)?.is_some() {
                continue;
            }
            let Some((media_type, bytes)) = repo.get_manifest(&tag)? else {
                continue;
            };
            if !report.subjects_gone.contains(&subject) {
                report.subjects_gone.push(subject.clone());
            }
            let tag_digest = crate::artifact::digest_of(&bytes);
            if tag.ends_with(".sig") {
                // cosign's tag holds the signature manifest itself.
                if !dry_run {
                    repo.delete_manifest(&tag_digest)?;
                }
                report.deleted.push(tag_digest);
                report.tags.push(tag);
                continue;
            }
            if media_type != OCI_INDEX {
                tracing::warn!(%name, %tag, %media_type, "a referrers tag that is not an index; left alone");
                continue;
            }
            let listed = parse_referrers(&name, &format!("referrers tag {tag}"), &bytes)?;
            let (ours, theirs): (Vec<_>, Vec<_>) = listed
                .into_iter()
                .partition(|d| is_smr(d.artifact_type.as_deref()));
            for d in &ours {
                if !dry_run {
                    repo.delete_manifest(&d.digest)?;
                }
                tracing::info!(%name, %subject, manifest = %d.digest, "deleted an smr referrer of a missing manifest");
                report.deleted.push(d.digest.clone());
            }
            if !dry_run {
                if theirs.is_empty() {
                    repo.delete_manifest(&tag_digest)?;
                } else {
                    let doc = serde_json::json!({
                        "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": theirs });
                    let out = serde_json::to_vec(&doc).map_err(|source| {
                        crate::error::RegistryError::Json {
                            what: format!("referrers index {tag}"),
                            source,
                        }
                    })?;
                    repo.put_manifest(&tag, OCI_INDEX, &out)?;
                }
            }
            report.tags.push(tag);
        }
        if dry_run || report.deleted.len() + report.tags.len() == before {
            break;
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fallback_tags_name_their_subject() {
        let hex = "ab".repeat(32);
        assert_eq!(
            subject_of(&format!("sha256-{hex}")),
            Some(format!("sha256:{hex}"))
        );
        assert_eq!(
            subject_of(&format!("sha256-{hex}.sig")),
            Some(format!("sha256:{hex}"))
        );
        assert_eq!(subject_of("v1"), None);
        assert_eq!(subject_of("sha256-short"), None);
        assert_eq!(subject_of(&format!("sha256-{}", "AB".repeat(32))), None);
    }
}
