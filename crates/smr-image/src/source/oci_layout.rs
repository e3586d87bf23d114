//! `oci:DIR[:TAG]`: an OCI image layout directory (`oci-layout`,
//! `index.json`, `blobs/sha256/…`).

use super::digest::{parse_digest, JSON_BLOB_LIMIT};
use super::spec::{parse_json, Descriptor, Index};
use super::{resolve_descriptor, ImageSource, Platform, ResolvedImage, Result, SourceError};
use std::io::Read;
use std::path::{Path, PathBuf};

/// An OCI image layout on the local filesystem.
#[derive(Debug, Clone)]
pub struct OciLayout {
    dir: PathBuf,
    tag: Option<String>,
}

impl OciLayout {
    /// Opens the layout at `dir`; `tag` is matched against the
    /// `org.opencontainers.image.ref.name` annotations of `index.json`.
    /// Checks that `oci-layout` exists and names version 1.x.
    pub fn open(dir: &Path, tag: Option<&str>) -> Result<Self> {
        let layout_file = dir.join("oci-layout");
        let bytes = read_small(&layout_file)?;
        let v: serde_json::Value = parse_json(&bytes, &layout_file.display().to_string())?;
        let version = v.get("imageLayoutVersion").and_then(|v| v.as_str());
        if !version.is_some_and(|v| v.starts_with("1.")) {
            return Err(SourceError::Invalid {
                what: layout_file.display().to_string(),
                problem: format!("unsupported imageLayoutVersion {version:?}"),
            });
        }
        Ok(OciLayout {
            dir: dir.to_path_buf(),
            tag: tag.map(str::to_string),
        })
    }

    /// The `index.json` descriptor selected by the tag (or the only one).
    fn top_descriptor(&self) -> Result<Descriptor> {
        let path = self.dir.join("index.json");
        let what = path.display().to_string();
        let index: Index = parse_json(&read_small(&path)?, &what)?;
        if index.schema_version != 2 {
            return Err(SourceError::Invalid {
                what,
                problem: format!("schemaVersion {}, expected 2", index.schema_version),
            });
        }
        let tags: Vec<String> = index
            .manifests
            .iter()
            .filter_map(|d| d.ref_name().map(str::to_string))
            .collect();
        match &self.tag {
            Some(tag) => index
                .manifests
                .iter()
                .find(|d| d.ref_name() == Some(tag.as_str()))
                .cloned()
                .ok_or_else(|| SourceError::TagNotFound {
                    tag: tag.clone(),
                    available: tags,
                }),
            None => match index.manifests.as_slice() {
                [only] => Ok(only.clone()),
                [] => Err(SourceError::Invalid {
                    what,
                    problem: "lists no manifests".into(),
                }),
                many => Err(SourceError::AmbiguousImage {
                    available: many
                        .iter()
                        .map(|d| d.ref_name().unwrap_or(&d.digest).to_string())
                        .collect(),
                }),
            },
        }
    }
}

impl ImageSource for OciLayout {
    fn resolve(&self, platform: &Platform) -> Result<ResolvedImage> {
        let desc = self.top_descriptor()?;
        tracing::debug!(source = %self.describe(), manifest = %desc.digest, "resolving");
        resolve_descriptor(self, &desc, platform)
    }

    fn open_blob(&self, digest: &str) -> Result<Box<dyn Read + Send + '_>> {
        let hex = parse_digest(digest)?;
        let path = self.dir.join("blobs").join("sha256").join(hex);
        match std::fs::File::open(&path) {
            Ok(f) => Ok(Box::new(f)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(SourceError::BlobNotFound {
                digest: digest.to_string(),
                source_name: self.describe(),
            }),
            Err(source) => Err(SourceError::Io { path, source }),
        }
    }

    fn describe(&self) -> String {
        match &self.tag {
            Some(t) => format!("oci:{}:{t}", self.dir.display()),
            None => format!("oci:{}", self.dir.display()),
        }
    }
}

/// Reads a small metadata file, refusing more than [`JSON_BLOB_LIMIT`] bytes.
fn read_small(path: &Path) -> Result<Vec<u8>> {
    let io_err = |source| SourceError::Io {
        path: path.to_path_buf(),
        source,
    };
    let f = std::fs::File::open(path).map_err(io_err)?;
    let mut out = Vec::new();
    f.take(JSON_BLOB_LIMIT + 1)
        .read_to_end(&mut out)
        .map_err(io_err)?;
    if out.len() as u64 > JSON_BLOB_LIMIT {
        return Err(SourceError::TooLarge {
            what: path.display().to_string(),
            limit: JSON_BLOB_LIMIT,
        });
    }
    Ok(out)
}
