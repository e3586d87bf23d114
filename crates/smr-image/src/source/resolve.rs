//! From a descriptor (index or manifest) to a [`ResolvedImage`]: platform
//! selection through nested indexes, manifest and config reading.
//! Shared by every source (and by registry sources to come).

use super::digest::{parse_digest, read_verified};
use super::spec::{parse_json, ConfigFile, Descriptor, Index, Manifest, ManifestKind};
use super::{ImageSource, LayerInfo, Platform, ResolvedImage, Result, SourceError};
use crate::media_types::{DOCKER_CONFIG, OCI_CONFIG};

/// How deep indexes may nest before we call the image malformed.
const MAX_INDEX_DEPTH: usize = 8;

/// Follows `desc` (an index or a manifest) to the manifest for `platform`,
/// then reads and verifies the manifest and config blobs.
///
/// In an index, a manifest whose `platform` matches wins; among several, one
/// whose variant equals the requested one (or has none when none was asked
/// for) is preferred, then the first. Nested indexes are searched in order
/// when no manifest of the index itself matches. A manifest reached directly
/// (not through an index) is used whatever its platform, with a warning if
/// its config says another one.
pub fn resolve_descriptor(
    src: &dyn ImageSource,
    desc: &Descriptor,
    platform: &Platform,
) -> Result<ResolvedImage> {
    let (manifest, direct) = select_manifest(src, desc, platform)?;
    build_image(src, &manifest, platform, direct)
}

/// The first half of [`resolve_descriptor`]: the descriptor of the manifest
/// for `platform` that `desc` leads to, and whether `desc` is that
/// manifest itself (no index on the way). Reads indexes only, never the
/// manifest or its config.
pub fn select_manifest(
    src: &dyn ImageSource,
    desc: &Descriptor,
    platform: &Platform,
) -> Result<(Descriptor, bool)> {
    parse_digest(&desc.digest)?;
    match ManifestKind::of(&desc.media_type) {
        Some(ManifestKind::Manifest) => Ok((desc.clone(), true)),
        Some(ManifestKind::Index) => {
            let mut available = Vec::new();
            match select(src, desc, platform, 0, &mut available)? {
                Some(m) => Ok((m, false)),
                None => {
                    available.sort();
                    available.dedup();
                    Err(SourceError::NoMatchingPlatform {
                        wanted: platform.to_string(),
                        available,
                    })
                }
            }
        }
        None => Err(SourceError::UnsupportedMediaType {
            digest: desc.digest.clone(),
            media_type: desc.media_type.clone(),
        }),
    }
}

/// Picks the manifest for `platform` in the index `desc` (recursively).
fn select(
    src: &dyn ImageSource,
    desc: &Descriptor,
    platform: &Platform,
    depth: usize,
    available: &mut Vec<String>,
) -> Result<Option<Descriptor>> {
    let what = format!("index {}", desc.digest);
    if depth > MAX_INDEX_DEPTH {
        return Err(SourceError::Invalid {
            what,
            problem: format!("indexes nested more than {MAX_INDEX_DEPTH} deep"),
        });
    }
    let bytes = read_verified(src, &desc.digest, Some(desc.size))?;
    let index: Index = parse_json(&bytes, &what)?;
    check_schema(index.schema_version, &what)?;
    check_declared(index.media_type.as_deref(), ManifestKind::Index, &what)?;

    let mut best: Option<(u8, &Descriptor)> = None;
    let single = index.manifests.len() == 1;
    for child in &index.manifests {
        if ManifestKind::of(&child.media_type) != Some(ManifestKind::Manifest) {
            continue;
        }
        let rank = match &child.platform {
            Some(p) => {
                if p.os != "unknown" {
                    available.push(p.display());
                }
                if !p.matches(platform) {
                    continue;
                }
                u8::from(p.variant != platform.variant)
            }
            // A lone manifest without a platform is the image.
            None if single => 2,
            None => continue,
        };
        if best.is_none_or(|(r, _)| rank < r) {
            best = Some((rank, child));
        }
    }
    if let Some((_, d)) = best {
        return Ok(Some(d.clone()));
    }
    for child in &index.manifests {
        if ManifestKind::of(&child.media_type) != Some(ManifestKind::Index) {
            continue;
        }
        if child
            .platform
            .as_ref()
            .is_some_and(|p| !p.matches(platform))
        {
            continue;
        }
        if let Some(found) = select(src, child, platform, depth + 1, available)? {
            return Ok(Some(found));
        }
    }
    Ok(None)
}

/// Reads the manifest `desc` and its config.
fn build_image(
    src: &dyn ImageSource,
    desc: &Descriptor,
    platform: &Platform,
    direct: bool,
) -> Result<ResolvedImage> {
    let what = format!("manifest {}", desc.digest);
    let bytes = read_verified(src, &desc.digest, Some(desc.size))?;
    let manifest: Manifest = parse_json(&bytes, &what)?;
    check_schema(manifest.schema_version, &what)?;
    check_declared(
        manifest.media_type.as_deref(),
        ManifestKind::Manifest,
        &what,
    )?;

    let cdesc = &manifest.config;
    if cdesc.media_type != OCI_CONFIG && cdesc.media_type != DOCKER_CONFIG {
        return Err(SourceError::UnsupportedMediaType {
            digest: cdesc.digest.clone(),
            media_type: cdesc.media_type.clone(),
        });
    }
    let cbytes = read_verified(src, &cdesc.digest, Some(cdesc.size))?;
    let config = ConfigFile::parse(&cbytes, &format!("config {}", cdesc.digest))?;
    if direct && !config.matches(platform) {
        tracing::warn!(
            manifest = %desc.digest,
            "image is for {}/{}, not the requested {platform}; using it anyway",
            config.os,
            config.architecture
        );
    }
    let layers = layer_infos(&manifest.layers, &config.rootfs.diff_ids, &what)?;
    Ok(ResolvedImage {
        manifest_digest: desc.digest.clone(),
        config_digest: cdesc.digest.clone(),
        config: config.image_config(),
        layers,
    })
}

/// Pairs layer descriptors with diff_ids (their counts must agree).
pub(crate) fn layer_infos(
    layers: &[Descriptor],
    diff_ids: &[String],
    what: &str,
) -> Result<Vec<LayerInfo>> {
    if layers.len() != diff_ids.len() {
        return Err(SourceError::Invalid {
            what: what.to_string(),
            problem: format!(
                "{} layers but the config lists {} diff_ids",
                layers.len(),
                diff_ids.len()
            ),
        });
    }
    layers
        .iter()
        .zip(diff_ids)
        .map(|(l, d)| {
            parse_digest(&l.digest)?;
            Ok(LayerInfo {
                digest: l.digest.clone(),
                media_type: l.media_type.clone(),
                size: l.size,
                diff_id: d.clone(),
            })
        })
        .collect()
}

fn check_schema(v: u32, what: &str) -> Result<()> {
    if v != 2 {
        return Err(SourceError::Invalid {
            what: what.to_string(),
            problem: format!("schemaVersion {v}, expected 2"),
        });
    }
    Ok(())
}

/// A document's own `mediaType`, when set, must agree with how we reached it.
fn check_declared(media_type: Option<&str>, want: ManifestKind, what: &str) -> Result<()> {
    match media_type {
        Some(mt) if ManifestKind::of(mt) != Some(want) => Err(SourceError::Invalid {
            what: what.to_string(),
            problem: format!("declares media type `{mt}`, expected an {want:?}"),
        }),
        _ => Ok(()),
    }
}
