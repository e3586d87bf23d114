//! What `smr convert --push` does after pushing the artifact: signing it
//! (`--sign-key`) and writing the image index of `--index`.

use anyhow::{bail, Context, Result};
use smr_image::media_types::{OCI_INDEX, OCI_MANIFEST};
use smr_image::source::Platform;
use smr_registry::artifact::{digest_of, Descriptor};
use smr_registry::source::RegistrySource;
use smr_registry::Blobs;
use std::path::PathBuf;

/// Signing and index options of `smr convert --push`.
#[derive(clap::Args, Debug, Default)]
pub struct PublishArgs {
    /// Sign the pushed artifact (and the `--index` index) with this cosign
    /// private key (`cosign generate-key-pair` or `smr keygen --cosign`;
    /// password in `$COSIGN_PASSWORD`): a signature cosign verifies,
    /// pushed as a referrer of what it signs.
    #[arg(long, value_name = "FILE", env = "SMR_SIGN_KEY")]
    pub sign_key: Option<PathBuf>,
    /// Also write an image index holding the source's platform manifests
    /// untouched plus the smr artifact (and its startup profile), pushed to
    /// the source's tag (or `--index-tag`): nodes find the artifact in the
    /// tag itself, other tools still pull the original image from it.
    #[arg(long)]
    pub index: bool,
    /// The tag the `--index` index is pushed to (default: the source's).
    #[arg(long, value_name = "TAG", requires = "index")]
    pub index_tag: Option<String>,
}

impl PublishArgs {
    /// Refuses options that need `--push` or a tag.
    pub fn check(&self, push: bool, source: &str) -> Result<()> {
        if !push && (self.index || self.sign_key.is_some()) {
            bail!("--index and --sign-key publish the artifact that --push pushes");
        }
        if self.index && self.index_tag.is_none() {
            let r = smr_registry::reference::ImageRef::parse(source)?;
            if r.tag.is_none() {
                bail!("--index pushes to the source's tag, and {source} names none: give --index-tag TAG");
            }
        }
        Ok(())
    }
}

/// Signs the artifact `artifact` of platform manifest `subject`, then
/// writes and signs the `--index` index (with the artifact's startup
/// profile `profile`, if one was pushed).
pub fn publish(
    a: &PublishArgs,
    reg: &RegistrySource,
    platform: &Platform,
    subject: &str,
    artifact: &Descriptor,
    profile: Option<&Descriptor>,
) -> Result<()> {
    let key = a
        .sign_key
        .as_deref()
        .map(super::keygen::load_signing_key)
        .transpose()?;
    let repo = reg.repository();
    if let Some(key) = &key {
        let target = Descriptor::new(OCI_MANIFEST, artifact.digest.clone(), artifact.size);
        let s = smr_registry::signature::sign_manifest(repo, &target, key)
            .with_context(|| format!("signing smr artifact {}", artifact.digest))?;
        errln!(
            "signed smr artifact {} with key {}: signature {} ({:?})",
            artifact.digest,
            s.key_id,
            s.manifest_digest,
            s.referrers
        );
    }
    if !a.index {
        return Ok(());
    }
    let tag = match (&a.index_tag, &reg.reference().tag) {
        (Some(t), _) | (None, Some(t)) => t.clone(),
        (None, None) => bail!("--index needs a tag: give --index-tag TAG"),
    };
    let (media_type, top) = reg
        .top()
        .context("the source was never resolved: no manifest to put in the index")?;
    let mut entries = vec![artifact.clone()];
    entries.extend(profile.cloned());
    let bytes = smr_registry::index::build_index(
        &repo.describe(),
        (&media_type, &top),
        platform,
        subject,
        &entries,
    )?;
    let digest = repo
        .put_manifest(&tag, OCI_INDEX, &bytes)
        .with_context(|| format!("pushing the image index to {}:{tag}", repo.describe()))?;
    errln!(
        "pushed image index {digest} to {}:{tag}: the source's manifests, the smr artifact{}",
        repo.describe(),
        if profile.is_some() {
            " and its startup profile"
        } else {
            ""
        }
    );
    if let Some(key) = &key {
        let target = Descriptor::new(OCI_INDEX, digest_of(&bytes), bytes.len() as u64);
        let s = smr_registry::signature::sign_manifest(repo, &target, key)
            .with_context(|| format!("signing image index {digest}"))?;
        errln!(
            "signed image index {digest}: signature {}",
            s.manifest_digest
        );
    }
    Ok(())
}
