//! [`ImageBuilder`] and [`OciLayout`]: images written as OCI layouts or
//! docker-archive tarballs, byte-deterministic.

use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// OCI image manifest media type.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index media type.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// OCI image config media type.
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// Docker schema2 manifest media type.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list media type.
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Docker image config media type.
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Plain tar.
    None,
    /// gzip, level 6, header mtime 0, no file name.
    Gzip,
    /// zstd level 3, one frame.
    Zstd,
}

impl Compression {
    /// The OCI layer media type for this compression.
    pub fn oci_media_type(self) -> &'static str {
        match self {
            Compression::None => "application/vnd.oci.image.layer.v1.tar",
            Compression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            Compression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
        }
    }
}

/// Compresses `data` deterministically.
pub fn compress(data: &[u8], c: Compression) -> Vec<u8> {
    match c {
        Compression::None => data.to_vec(),
        Compression::Gzip => {
            let mut enc = flate2::GzBuilder::new()
                .mtime(0)
                .write(Vec::new(), flate2::Compression::new(6));
            enc.write_all(data).expect("writing to a Vec");
            enc.finish().expect("writing to a Vec")
        }
        Compression::Zstd => zstd::encode_all(data, 3).expect("zstd into a Vec"),
    }
}

/// `sha256:<hex>` of `data`.
pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// Where the blob `digest` lives in the OCI layout `dir`.
pub fn blob_path(dir: &Path, digest: &str) -> PathBuf {
    let (alg, hex) = digest.split_once(':').unwrap_or(("sha256", digest));
    dir.join("blobs").join(alg).join(hex)
}

/// One layer of an [`ImageBuilder`].
#[derive(Debug, Clone)]
pub struct LayerSpec {
    /// Uncompressed tar bytes.
    pub tar: Vec<u8>,
    /// Blob compression.
    pub compression: Compression,
    /// Media type to declare instead of the one matching `compression`.
    pub media_type: Option<String>,
    /// diff_id to declare instead of the real one.
    pub diff_id: Option<String>,
}

impl LayerSpec {
    /// The compressed blob.
    pub fn blob(&self) -> Vec<u8> {
        compress(&self.tar, self.compression)
    }

    /// The declared diff_id.
    pub fn diff_id(&self) -> String {
        self.diff_id
            .clone()
            .unwrap_or_else(|| sha256_digest(&self.tar))
    }
}

/// A content descriptor, as written into indexes and manifests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptor {
    /// `mediaType`.
    pub media_type: String,
    /// `digest`.
    pub digest: String,
    /// `size`.
    pub size: u64,
    /// `platform` as (os, architecture, variant).
    pub platform: Option<(String, String, Option<String>)>,
    /// `annotations`.
    pub annotations: BTreeMap<String, String>,
}

impl Descriptor {
    /// The descriptor as JSON.
    pub fn to_json(&self) -> Value {
        let mut v = json!({"mediaType": self.media_type, "digest": self.digest, "size": self.size});
        if let Some((os, arch, variant)) = &self.platform {
            let mut p = json!({"architecture": arch, "os": os});
            if let Some(var) = variant {
                p["variant"] = json!(var);
            }
            v["platform"] = p;
        }
        if !self.annotations.is_empty() {
            v["annotations"] = json!(self.annotations);
        }
        v
    }
}

/// A single-platform image: config fields and layers.
#[derive(Debug, Clone)]
pub struct ImageBuilder {
    /// Layers, bottom first.
    pub layers: Vec<LayerSpec>,
    /// Config `os`.
    pub os: String,
    /// Config `architecture`.
    pub architecture: String,
    /// Config `variant`.
    pub variant: Option<String>,
    /// `config.Entrypoint`.
    pub entrypoint: Vec<String>,
    /// `config.Cmd`.
    pub cmd: Vec<String>,
    /// `config.Env`.
    pub env: Vec<String>,
    /// `config.WorkingDir`.
    pub working_dir: String,
    /// `config.User`.
    pub user: String,
    /// `config.Labels`.
    pub labels: BTreeMap<String, String>,
    /// Write Docker schema2 media types instead of OCI ones.
    pub docker_media_types: bool,
}

impl Default for ImageBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl ImageBuilder {
    /// A linux/amd64 image with no layers and a PATH in its env.
    pub fn new() -> Self {
        ImageBuilder {
            layers: Vec::new(),
            os: "linux".into(),
            architecture: "amd64".into(),
            variant: None,
            entrypoint: Vec::new(),
            cmd: vec!["/bin/sh".into()],
            env: vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()],
            working_dir: String::new(),
            user: String::new(),
            labels: BTreeMap::new(),
            docker_media_types: false,
        }
    }

    /// Adds a layer.
    pub fn layer(&mut self, tar: Vec<u8>, compression: Compression) -> &mut Self {
        self.layers.push(LayerSpec {
            tar,
            compression,
            media_type: None,
            diff_id: None,
        });
        self
    }

    /// Sets the platform.
    pub fn platform(&mut self, os: &str, arch: &str, variant: Option<&str>) -> &mut Self {
        self.os = os.into();
        self.architecture = arch.into();
        self.variant = variant.map(Into::into);
        self
    }

    /// The config blob.
    pub fn config_json(&self) -> Vec<u8> {
        let diff_ids: Vec<String> = self.layers.iter().map(LayerSpec::diff_id).collect();
        let mut v = json!({
            "architecture": self.architecture,
            "os": self.os,
            "config": {
                "Entrypoint": self.entrypoint,
                "Cmd": self.cmd,
                "Env": self.env,
                "WorkingDir": self.working_dir,
                "User": self.user,
                "Labels": self.labels,
            },
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        });
        if let Some(var) = &self.variant {
            v["variant"] = json!(var);
        }
        serde_json::to_vec(&v).expect("JSON of plain values")
    }

    /// The layer descriptor of layer `i`.
    fn layer_descriptor(&self, i: usize, blob: &[u8]) -> Descriptor {
        let l = &self.layers[i];
        let media_type = l.media_type.clone().unwrap_or_else(|| {
            match (self.docker_media_types, l.compression) {
                (true, Compression::Gzip) => {
                    "application/vnd.docker.image.rootfs.diff.tar.gzip".to_string()
                }
                (_, c) => c.oci_media_type().to_string(),
            }
        });
        Descriptor {
            media_type,
            digest: sha256_digest(blob),
            size: blob.len() as u64,
            platform: None,
            annotations: BTreeMap::new(),
        }
    }

    /// Writes this image as a single tagged manifest into a new OCI layout.
    pub fn write_oci_layout(&self, dir: &Path, tag: Option<&str>) -> std::io::Result<Descriptor> {
        let mut layout = OciLayout::new();
        let desc = layout.add_image(self);
        layout.tag(desc.clone(), tag);
        layout.write(dir)?;
        Ok(desc)
    }
}

/// An OCI layout being assembled: blobs plus the entries of `index.json`.
#[derive(Debug, Clone, Default)]
pub struct OciLayout {
    /// Blobs by digest.
    pub blobs: BTreeMap<String, Vec<u8>>,
    /// Descriptors listed in `index.json`.
    pub index: Vec<Descriptor>,
}

impl OciLayout {
    /// An empty layout.
    pub fn new() -> Self {
        Self::default()
    }

    /// Stores a blob and returns its digest.
    pub fn add_blob(&mut self, bytes: Vec<u8>) -> String {
        let d = sha256_digest(&bytes);
        self.blobs.insert(d.clone(), bytes);
        d
    }

    /// Stores an image's layers, config and manifest; returns the manifest's
    /// descriptor (with the image's platform).
    pub fn add_image(&mut self, img: &ImageBuilder) -> Descriptor {
        let mut layers = Vec::new();
        for i in 0..img.layers.len() {
            let blob = img.layers[i].blob();
            layers.push(img.layer_descriptor(i, &blob).to_json());
            self.add_blob(blob);
        }
        let config = img.config_json();
        let config_size = config.len();
        let config_digest = self.add_blob(config);
        let (mt, cmt) = if img.docker_media_types {
            (DOCKER_MANIFEST, DOCKER_CONFIG)
        } else {
            (OCI_MANIFEST, OCI_CONFIG)
        };
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": mt,
            "config": {"mediaType": cmt, "digest": config_digest, "size": config_size},
            "layers": layers,
        });
        let bytes = serde_json::to_vec(&manifest).expect("JSON of plain values");
        let size = bytes.len() as u64;
        Descriptor {
            media_type: mt.into(),
            digest: self.add_blob(bytes),
            size,
            platform: Some((
                img.os.clone(),
                img.architecture.clone(),
                img.variant.clone(),
            )),
            annotations: BTreeMap::new(),
        }
    }

    /// Stores an index (OCI, or a Docker manifest list if `docker`) over
    /// `children`; returns its descriptor (no platform).
    pub fn add_index(&mut self, children: &[Descriptor], docker: bool) -> Descriptor {
        let mt = if docker { DOCKER_LIST } else { OCI_INDEX };
        let v = json!({
            "schemaVersion": 2,
            "mediaType": mt,
            "manifests": children.iter().map(Descriptor::to_json).collect::<Vec<_>>(),
        });
        let bytes = serde_json::to_vec(&v).expect("JSON of plain values");
        let size = bytes.len() as u64;
        Descriptor {
            media_type: mt.into(),
            digest: self.add_blob(bytes),
            size,
            platform: None,
            annotations: BTreeMap::new(),
        }
    }

    /// Lists `desc` in `index.json`, with `org.opencontainers.image.ref.name`
    /// set to `tag` when given.
    pub fn tag(&mut self, mut desc: Descriptor, tag: Option<&str>) -> &mut Self {
        if let Some(t) = tag {
            desc.annotations
                .insert("org.opencontainers.image.ref.name".into(), t.into());
        }
        self.index.push(desc);
        self
    }

    /// The `index.json` bytes.
    pub fn index_json(&self) -> Vec<u8> {
        let v = json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": self.index.iter().map(Descriptor::to_json).collect::<Vec<_>>(),
        });
        serde_json::to_vec(&v).expect("JSON of plain values")
    }

    /// Writes `oci-layout`, `index.json` and `blobs/` under `dir`.
    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dir.join("blobs/sha256"))?;
        std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        std::fs::write(dir.join("index.json"), self.index_json())?;
        for (d, b) in &self.blobs {
            std::fs::write(blob_path(dir, d), b)?;
        }
        Ok(())
    }
}

/// How [`write_docker_archive`] names the members of the archive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DockerArchiveStyle {
    /// `docker save` before 25: `<id>/layer.tar`, `<config hex>.json`.
    Legacy,
    /// `docker save` 25+: `blobs/sha256/<hex>` members named in manifest.json.
    Blobs,
}

/// Writes a docker-archive tarball (`docker save` format) holding `images`,
/// each with its repo tags. Layer blobs are compressed as each layer says
/// (`docker save` itself writes them uncompressed).
pub fn write_docker_archive(
    path: &Path,
    images: &[(&ImageBuilder, &[&str])],
    style: DockerArchiveStyle,
) -> std::io::Result<()> {
    let mut out = tar::Builder::new(Vec::new());
    let mut manifest = Vec::new();
    let mut written = std::collections::BTreeSet::new();
    for (img, tags) in images {
        let config = img.config_json();
        let chex = hex::encode(Sha256::digest(&config));
        let config_name = match style {
            DockerArchiveStyle::Legacy => format!("{chex}.json"),
            DockerArchiveStyle::Blobs => format!("blobs/sha256/{chex}"),
        };
        let mut layer_names = Vec::new();
        for l in &img.layers {
            let blob = l.blob();
            let bhex = hex::encode(Sha256::digest(&blob));
            let name = match style {
                DockerArchiveStyle::Legacy => format!("{bhex}/layer.tar"),
                DockerArchiveStyle::Blobs => format!("blobs/sha256/{bhex}"),
            };
            if written.insert(name.clone()) {
                crate::layer::append_member(&mut out, &name, &blob)?;
            }
            layer_names.push(name);
        }
        if written.insert(config_name.clone()) {
            crate::layer::append_member(&mut out, &config_name, &config)?;
        }
        manifest.push(json!({"Config": config_name, "RepoTags": tags, "Layers": layer_names}));
    }
    let m = serde_json::to_vec(&manifest).expect("JSON of plain values");
    crate::layer::append_member(&mut out, "manifest.json", &m)?;
    std::fs::write(path, out.into_inner()?)
}
