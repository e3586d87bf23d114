//! Image sources: where an OCI image's manifest, config and layers come from.
//!
//! An [`ImageSource`] resolves a reference to one platform's manifest
//! ([`ImageSource::resolve`]) and hands out blobs as byte streams
//! ([`ImageSource::open_blob`]). [`open_source`] parses the user-facing
//! reference syntax:
//!
//! - `oci:DIR[:TAG]` — an OCI image layout directory ([`oci_layout`]).
//! - `docker-archive:FILE[:REPO:TAG]` — a `docker save` tarball
//!   ([`docker_archive`]).
//! - `docker://…` — registries; not supported yet ([`SourceError::Unsupported`]).
//!
//! As in containers/image, the path ends at the first `:` unless the whole
//! remainder names an existing file or directory.

pub mod digest;
pub mod docker_archive;
pub mod oci_layout;
mod resolve;
pub mod spec;

use smr_format::config::ImageConfig;
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::str::FromStr;

pub use resolve::{resolve_descriptor, select_manifest};

/// An OS/architecture/variant triple, as in OCI `platform` objects.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Platform {
    /// `os`, e.g. `linux`.
    pub os: String,
    /// `architecture` in GOARCH spelling, e.g. `amd64`, `arm64`.
    pub architecture: String,
    /// `variant`, e.g. `v8`; `None` matches any variant.
    pub variant: Option<String>,
}

impl Default for Platform {
    /// `linux/amd64`.
    fn default() -> Self {
        Platform {
            os: "linux".into(),
            architecture: "amd64".into(),
            variant: None,
        }
    }
}

impl FromStr for Platform {
    type Err = SourceError;

    /// Parses `os/arch[/variant]`; `x86_64` and `aarch64` are accepted as
    /// aliases of `amd64` and `arm64`.
    fn from_str(s: &str) -> Result<Self, SourceError> {
        let parts: Vec<&str> = s.split('/').collect();
        let bad = || SourceError::BadPlatform {
            spec: s.to_string(),
        };
        if !(2..=3).contains(&parts.len()) || parts.iter().any(|p| p.is_empty()) {
            return Err(bad());
        }
        let architecture = match parts[1] {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            a => a,
        };
        Ok(Platform {
            os: parts[0].to_string(),
            architecture: architecture.to_string(),
            variant: parts.get(2).map(|v| v.to_string()),
        })
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// One layer of a resolved image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerInfo {
    /// Digest of the layer blob as stored (`sha256:…`, compressed bytes).
    pub digest: String,
    /// The layer's media type (decides decompression).
    pub media_type: String,
    /// Size of the blob in bytes.
    pub size: u64,
    /// Digest of the uncompressed tar, from the config's `rootfs.diff_ids`.
    pub diff_id: String,
}

/// One platform's image: manifest and config digests, runtime config, layers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedImage {
    /// Digest of the manifest blob. For docker-archive sources (which have no
    /// manifest blob) the digest of the archive's `manifest.json`.
    pub manifest_digest: String,
    /// Digest of the config blob.
    pub config_digest: String,
    /// The parts of the config a runtime needs.
    pub config: ImageConfig,
    /// Layers, bottom first.
    pub layers: Vec<LayerInfo>,
}

/// Where an image comes from. Registry sources slot in by implementing this.
pub trait ImageSource: Send + Sync {
    /// Picks the manifest for `platform` and reads (and verifies) the
    /// manifest and config blobs.
    fn resolve(&self, platform: &Platform) -> Result<ResolvedImage, SourceError>;

    /// The raw (possibly compressed) bytes of blob `digest`. The caller
    /// verifies them (see [`digest::VerifyingReader`]).
    fn open_blob(&self, digest: &str) -> Result<Box<dyn Read + Send + '_>, SourceError>;

    /// A human-readable name of the source, e.g. `oci:./layout:tag`.
    fn describe(&self) -> String;
}

/// Errors reading an image source. Every variant names what was wrong.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The reference does not have a known transport prefix.
    #[error("bad image reference `{reference}`: expected oci:DIR[:TAG] or docker-archive:FILE[:REPO:TAG]")]
    BadReference {
        /// The reference as given.
        reference: String,
    },
    /// A known transport that is not implemented yet.
    #[error("image reference `{reference}`: {transport} sources are not supported yet (use oci: or docker-archive:)")]
    Unsupported {
        /// The reference as given.
        reference: String,
        /// The transport, e.g. `docker://`.
        transport: String,
    },
    /// A platform string that is not `os/arch[/variant]`.
    #[error("bad platform `{spec}`: expected os/arch[/variant], e.g. linux/amd64")]
    BadPlatform {
        /// The string as given.
        spec: String,
    },
    /// A file of the source could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A referenced blob is not in the source.
    #[error("blob {digest} not found in {source_name}")]
    BlobNotFound {
        /// The missing blob.
        digest: String,
        /// [`ImageSource::describe`] of the source.
        source_name: String,
    },
    /// A digest string that is not `sha256:<64 lowercase hex>`.
    #[error("invalid or unsupported digest `{digest}` (only sha256 is supported)")]
    InvalidDigest {
        /// The digest as found.
        digest: String,
    },
    /// Blob bytes whose digest is not the one they were asked for by.
    #[error("blob {digest}: content digest mismatch: expected {digest}, got {actual}")]
    DigestMismatch {
        /// The expected digest (the blob's name).
        digest: String,
        /// The digest of the bytes read.
        actual: String,
    },
    /// A layer whose uncompressed bytes do not match its diff_id.
    #[error("layer {layer}: diff_id mismatch: expected {expected}, got {actual}")]
    DiffIdMismatch {
        /// The layer's blob digest.
        layer: String,
        /// diff_id from the config.
        expected: String,
        /// Digest of the uncompressed bytes read.
        actual: String,
    },
    /// A blob whose length differs from its descriptor's size.
    #[error("blob {digest}: size mismatch: descriptor says {expected} bytes, read {actual}")]
    SizeMismatch {
        /// The blob.
        digest: String,
        /// Size from the descriptor.
        expected: u64,
        /// Bytes read (may stop early once over `expected`).
        actual: u64,
    },
    /// A JSON blob larger than we are willing to read into memory.
    #[error("{what} is larger than the {limit}-byte limit")]
    TooLarge {
        /// What was being read, e.g. `config blob sha256:…`.
        what: String,
        /// The limit in bytes.
        limit: u64,
    },
    /// A JSON document that does not parse or has the wrong shape.
    #[error("parsing {what}: {source}")]
    Json {
        /// What was being parsed, e.g. `index.json`.
        what: String,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// A document that parses but violates the spec.
    #[error("{what}: {problem}")]
    Invalid {
        /// What was being read.
        what: String,
        /// What is wrong with it.
        problem: String,
    },
    /// A blob with a media type we cannot handle.
    #[error("blob {digest}: unsupported media type `{media_type}`")]
    UnsupportedMediaType {
        /// The blob.
        digest: String,
        /// Its media type.
        media_type: String,
    },
    /// A Docker foreign (non-distributable) layer, whose bytes live elsewhere.
    #[error("layer {digest}: foreign layer (`{media_type}`) is not supported: its content is not in the image")]
    ForeignLayer {
        /// The layer.
        digest: String,
        /// Its media type.
        media_type: String,
    },
    /// A layer compressed with an algorithm we do not read.
    #[error("layer {digest}: unsupported compression {compression}")]
    UnsupportedCompression {
        /// The layer.
        digest: String,
        /// What the magic bytes say (e.g. `bzip2`).
        compression: &'static str,
    },
    /// The requested tag is not in the source.
    #[error("tag `{tag}` not found; available: {}", list(available))]
    TagNotFound {
        /// The tag asked for.
        tag: String,
        /// Tags the source has.
        available: Vec<String>,
    },
    /// No tag was given and the source holds several images.
    #[error("the source holds {} images; choose one of: {}", available.len(), list(available))]
    AmbiguousImage {
        /// Tags (or descriptions) of the images.
        available: Vec<String>,
    },
    /// No manifest for the requested platform.
    #[error("no manifest for platform {wanted}; available: {}", list(available))]
    NoMatchingPlatform {
        /// The platform asked for.
        wanted: String,
        /// Platforms the index offers.
        available: Vec<String>,
    },
}

fn list(items: &[String]) -> String {
    if items.is_empty() {
        "(none)".to_string()
    } else {
        items.join(", ")
    }
}

/// A `Result` with [`SourceError`].
pub type Result<T, E = SourceError> = std::result::Result<T, E>;

/// Opens the source named by `reference` (see the module docs for syntax).
pub fn open_source(reference: &str) -> Result<Box<dyn ImageSource>> {
    if let Some(rest) = reference.strip_prefix("oci:") {
        let (dir, tag) = split_path(rest);
        return Ok(Box::new(oci_layout::OciLayout::open(dir, tag)?));
    }
    if let Some(rest) = reference.strip_prefix("docker-archive:") {
        let (file, name) = split_path(rest);
        return Ok(Box::new(docker_archive::DockerArchive::open(file, name)?));
    }
    for transport in [
        "docker://",
        "registry:",
        "oci-archive:",
        "containers-storage:",
    ] {
        if reference.starts_with(transport) {
            return Err(SourceError::Unsupported {
                reference: reference.to_string(),
                transport: transport.to_string(),
            });
        }
    }
    Err(SourceError::BadReference {
        reference: reference.to_string(),
    })
}

/// Splits `PATH[:NAME]` at the first `:`, unless all of it is an existing path.
fn split_path(rest: &str) -> (&Path, Option<&str>) {
    if Path::new(rest).exists() {
        return (Path::new(rest), None);
    }
    match rest.split_once(':') {
        Some((p, name)) if !name.is_empty() => (Path::new(p), Some(name)),
        Some((p, _)) => (Path::new(p), None),
        None => (Path::new(rest), None),
    }
}

#[cfg(test)]
mod tests;
