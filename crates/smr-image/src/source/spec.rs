//! The parts of the OCI image spec (and Docker schema2) that we read, as
//! serde types.
//!
//! Own types rather than oci-spec's: they accept both OCI and Docker media
//! types, tolerate `null` where Docker writes it, and carry only what we use.

use super::{Platform, Result, SourceError};
use crate::media_types::{DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST};
use serde::Deserialize;
use smr_format::config::ImageConfig;
use std::collections::BTreeMap;

/// The annotation that holds a tag in an OCI layout's `index.json`.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// What a descriptor points at, judged by its media type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ManifestKind {
    /// An OCI index or Docker manifest list.
    Index,
    /// An OCI or Docker schema2 image manifest.
    Manifest,
}

impl ManifestKind {
    /// The kind of `media_type`, or `None` for anything else.
    pub fn of(media_type: &str) -> Option<Self> {
        match media_type {
            OCI_INDEX | DOCKER_LIST => Some(ManifestKind::Index),
            OCI_MANIFEST | DOCKER_MANIFEST => Some(ManifestKind::Manifest),
            _ => None,
        }
    }
}

/// An OCI content descriptor.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// `mediaType`.
    #[serde(default)]
    pub media_type: String,
    /// `digest`.
    pub digest: String,
    /// `size`.
    pub size: u64,
    /// `platform` (indexes only).
    #[serde(default)]
    pub platform: Option<PlatformSpec>,
    /// `annotations`.
    #[serde(default)]
    pub annotations: Option<BTreeMap<String, String>>,
}

impl Descriptor {
    /// The `org.opencontainers.image.ref.name` annotation.
    pub fn ref_name(&self) -> Option<&str> {
        self.annotations.as_ref()?.get(REF_NAME).map(String::as_str)
    }
}

/// A descriptor's `platform`.
#[derive(Debug, Clone, Deserialize)]
pub struct PlatformSpec {
    /// `os`.
    pub os: String,
    /// `architecture`.
    pub architecture: String,
    /// `variant`.
    #[serde(default)]
    pub variant: Option<String>,
}

impl PlatformSpec {
    /// `os/arch[/variant]`.
    pub fn display(&self) -> String {
        match &self.variant {
            Some(v) => format!("{}/{}/{v}", self.os, self.architecture),
            None => format!("{}/{}", self.os, self.architecture),
        }
    }

    /// Whether this platform satisfies `want` (variant: an absent arm64
    /// variant means `v8`; `want.variant == None` accepts any variant).
    pub fn matches(&self, want: &Platform) -> bool {
        if self.os != want.os || self.architecture != want.architecture {
            return false;
        }
        let Some(wv) = &want.variant else { return true };
        let have = match (&self.variant, self.architecture.as_str()) {
            (Some(v), _) => v.as_str(),
            (None, "arm64") => "v8",
            (None, _) => "",
        };
        have == wv
    }
}

/// An OCI image index / Docker manifest list.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Index {
    /// `schemaVersion` (must be 2).
    pub schema_version: u32,
    /// `mediaType`, if set.
    #[serde(default)]
    pub media_type: Option<String>,
    /// `manifests`.
    #[serde(default)]
    pub manifests: Vec<Descriptor>,
}

/// An OCI / Docker schema2 image manifest.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    /// `schemaVersion` (must be 2).
    pub schema_version: u32,
    /// `mediaType`, if set.
    #[serde(default)]
    pub media_type: Option<String>,
    /// `config`.
    pub config: Descriptor,
    /// `layers`, bottom first.
    #[serde(default)]
    pub layers: Vec<Descriptor>,
}

/// An image config (only the fields we use).
#[derive(Debug, Clone, Deserialize)]
pub struct ConfigFile {
    /// `architecture`.
    #[serde(default)]
    pub architecture: String,
    /// `os`.
    #[serde(default)]
    pub os: String,
    /// `variant`.
    #[serde(default)]
    pub variant: Option<String>,
    /// `config` (Docker writes `null` for none).
    #[serde(default)]
    pub config: Option<ExecConfig>,
    /// `rootfs`.
    pub rootfs: RootFs,
}

/// The `config` object of an image config.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ExecConfig {
    /// `Entrypoint`.
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    /// `Cmd`.
    #[serde(default)]
    pub cmd: Option<Vec<String>>,
    /// `Env`.
    #[serde(default)]
    pub env: Option<Vec<String>>,
    /// `WorkingDir`.
    #[serde(default)]
    pub working_dir: Option<String>,
    /// `User`.
    #[serde(default)]
    pub user: Option<String>,
    /// `Labels`.
    #[serde(default)]
    pub labels: Option<BTreeMap<String, String>>,
}

/// `rootfs` of an image config.
#[derive(Debug, Clone, Deserialize)]
pub struct RootFs {
    /// `type` (must be `layers`).
    #[serde(rename = "type")]
    pub kind: String,
    /// `diff_ids`, bottom first.
    #[serde(default)]
    pub diff_ids: Vec<String>,
}

impl ConfigFile {
    /// Parses and checks a config blob (`what` names it in errors).
    pub fn parse(bytes: &[u8], what: &str) -> Result<Self> {
        let c: ConfigFile = parse_json(bytes, what)?;
        if c.rootfs.kind != "layers" {
            return Err(SourceError::Invalid {
                what: what.to_string(),
                problem: format!("rootfs.type is `{}`, expected `layers`", c.rootfs.kind),
            });
        }
        for d in &c.rootfs.diff_ids {
            super::digest::parse_digest(d)?;
        }
        Ok(c)
    }

    /// The runtime part, as stored in the recipe.
    pub fn image_config(&self) -> ImageConfig {
        let c = self.config.clone().unwrap_or_default();
        ImageConfig {
            architecture: self.architecture.clone(),
            os: self.os.clone(),
            entrypoint: c.entrypoint.unwrap_or_default(),
            cmd: c.cmd.unwrap_or_default(),
            env: c.env.unwrap_or_default(),
            working_dir: c.working_dir.unwrap_or_default(),
            user: c.user.unwrap_or_default(),
            labels: c.labels.unwrap_or_default(),
        }
    }

    /// Whether the config's platform satisfies `want`.
    pub fn matches(&self, want: &Platform) -> bool {
        PlatformSpec {
            os: self.os.clone(),
            architecture: self.architecture.clone(),
            variant: self.variant.clone(),
        }
        .matches(want)
    }
}

/// Parses JSON, naming `what` in the error.
pub fn parse_json<T: serde::de::DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|source| SourceError::Json {
        what: what.to_string(),
        source,
    })
}
