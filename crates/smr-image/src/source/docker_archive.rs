//! `docker-archive:FILE[:REPO:TAG]`: a `docker save` tarball.
//!
//! Reads the archive's `manifest.json` (both the legacy layout,
//! `<id>/layer.tar` + `<hex>.json`, and the Docker 25+ layout with
//! `blobs/sha256/<hex>` members). Members are indexed once by offset; blobs
//! are then read in place with a seek. Layer members carry no media type:
//! they get [`DOCKER_ARCHIVE_LAYER`], whose compression is detected from the
//! magic bytes. A legacy layer's blob digest is its diff_id when it is an
//! uncompressed tar (what `docker save` writes); a compressed one is hashed
//! once at resolve time.

use super::digest::{parse_digest, sha256_digest, JSON_BLOB_LIMIT};
use super::resolve::layer_infos;
use super::spec::{parse_json, ConfigFile, Descriptor};
use super::{ImageSource, Platform, ResolvedImage, Result, SourceError};
use crate::media_types::DOCKER_ARCHIVE_LAYER;
use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// How many symlink / hard link hops a member name may take.
const MAX_LINK_HOPS: usize = 8;

#[derive(Debug, Clone)]
enum Member {
    File { offset: u64, size: u64 },
    Link(String),
}

/// One image in `manifest.json`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ArchiveManifest {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    #[serde(default)]
    layers: Vec<String>,
}

/// A `docker save` tarball on the local filesystem.
#[derive(Debug)]
pub struct DockerArchive {
    path: PathBuf,
    name: Option<String>,
    members: BTreeMap<String, Member>,
    manifests: Vec<ArchiveManifest>,
    manifest_digest: String,
    /// Blob digest -> member name, filled as digests become known.
    digests: Mutex<BTreeMap<String, String>>,
}

impl DockerArchive {
    /// Indexes the tarball at `path`; `name` (`repo:tag`) selects an image
    /// by its `RepoTags`.
    pub fn open(path: &Path, name: Option<&str>) -> Result<Self> {
        let io_err = |source| SourceError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io_err)?;
        let mut archive = tar::Archive::new(BufReader::new(file));
        let mut members = BTreeMap::new();
        for entry in archive.entries_with_seek().map_err(io_err)? {
            let entry = entry.map_err(io_err)?;
            let Ok(name) = std::str::from_utf8(&entry.path_bytes()).map(clean) else {
                continue;
            };
            let link = entry
                .link_name_bytes()
                .and_then(|l| std::str::from_utf8(&l).ok().map(str::to_string));
            let member = match (entry.header().entry_type(), link) {
                (tar::EntryType::Regular | tar::EntryType::Continuous, _) => Member::File {
                    offset: entry.raw_file_position(),
                    size: entry.size(),
                },
                (tar::EntryType::Symlink, Some(t)) => {
                    let dir = name.rsplit_once('/').map_or("", |(d, _)| d);
                    Member::Link(clean(&format!("{dir}/{t}")))
                }
                (tar::EntryType::Link, Some(t)) => Member::Link(clean(&t)),
                _ => continue,
            };
            members.insert(name, member);
        }
        let mut me = DockerArchive {
            path: path.to_path_buf(),
            name: name.map(str::to_string),
            members,
            manifests: Vec::new(),
            manifest_digest: String::new(),
            digests: Mutex::new(BTreeMap::new()),
        };
        let bytes = me.read_member("manifest.json")?;
        me.manifest_digest = sha256_digest(&bytes);
        me.manifests = parse_json(&bytes, &format!("{}: manifest.json", path.display()))?;
        Ok(me)
    }

    /// The member `name`, links followed.
    fn locate(&self, name: &str) -> Option<(u64, u64)> {
        let mut name = clean(name);
        for _ in 0..=MAX_LINK_HOPS {
            match self.members.get(&name)? {
                Member::File { offset, size } => return Some((*offset, *size)),
                Member::Link(t) => name = t.clone(),
            }
        }
        None
    }

    fn open_member(&self, name: &str) -> Result<Option<(io::Take<File>, u64)>> {
        let Some((offset, size)) = self.locate(name) else {
            return Ok(None);
        };
        let io_err = |source| SourceError::Io {
            path: self.path.clone(),
            source,
        };
        let mut f = File::open(&self.path).map_err(io_err)?;
        f.seek(SeekFrom::Start(offset)).map_err(io_err)?;
        Ok(Some((f.take(size), size)))
    }

    fn read_member(&self, name: &str) -> Result<Vec<u8>> {
        let (r, size) = self.open_member(name)?.ok_or_else(|| self.missing(name))?;
        if size > JSON_BLOB_LIMIT {
            return Err(SourceError::TooLarge {
                what: format!("{}: {name}", self.path.display()),
                limit: JSON_BLOB_LIMIT,
            });
        }
        let mut out = Vec::new();
        let mut r = r;
        r.read_to_end(&mut out).map_err(|source| SourceError::Io {
            path: self.path.clone(),
            source,
        })?;
        Ok(out)
    }

    fn missing(&self, name: &str) -> SourceError {
        SourceError::Invalid {
            what: self.describe(),
            problem: format!("member `{name}` named in manifest.json is missing"),
        }
    }

    fn select(&self) -> Result<&ArchiveManifest> {
        let tags_of = |m: &ArchiveManifest| m.repo_tags.clone().unwrap_or_default();
        let all_tags = || self.manifests.iter().flat_map(tags_of).collect::<Vec<_>>();
        match &self.name {
            Some(n) => {
                let with_latest = format!("{n}:latest");
                let wanted = |t: &String| t == n || (!n.contains(':') && *t == with_latest);
                self.manifests
                    .iter()
                    .find(|m| tags_of(m).iter().any(wanted))
                    .ok_or_else(|| SourceError::TagNotFound {
                        tag: n.clone(),
                        available: all_tags(),
                    })
            }
            None => match self.manifests.as_slice() {
                [only] => Ok(only),
                [] => Err(SourceError::Invalid {
                    what: self.describe(),
                    problem: "manifest.json lists no images".into(),
                }),
                many => Err(SourceError::AmbiguousImage {
                    available: many
                        .iter()
                        .map(|m| tags_of(m).first().cloned().unwrap_or(m.config.clone()))
                        .collect(),
                }),
            },
        }
    }

    /// The blob digest of layer member `name` whose diff_id is `diff_id`.
    fn layer_digest(&self, name: &str, diff_id: &str) -> Result<String> {
        if let Some(d) = digest_in_name(name) {
            return Ok(d);
        }
        let (mut r, _) = self.open_member(name)?.ok_or_else(|| self.missing(name))?;
        let io_err = |source| SourceError::Io {
            path: self.path.clone(),
            source,
        };
        let mut magic = [0u8; 4];
        let n = read_up_to(&mut r, &mut magic).map_err(io_err)?;
        if !crate::layer::Compression::sniff(&magic[..n]).is_compressed() {
            return Ok(diff_id.to_string());
        }
        let mut h = Sha256::new();
        h.update(&magic[..n]);
        io::copy(&mut r, &mut h).map_err(io_err)?;
        Ok(format!("sha256:{}", hex::encode(h.finalize())))
    }

    fn remember(&self, digest: &str, member: &str) {
        if let Ok(mut m) = self.digests.lock() {
            m.insert(digest.to_string(), member.to_string());
        }
    }
}

impl ImageSource for DockerArchive {
    fn resolve(&self, platform: &Platform) -> Result<ResolvedImage> {
        let m = self.select()?;
        let config_bytes = self.read_member(&m.config)?;
        let config_digest = sha256_digest(&config_bytes);
        if let Some(named) = digest_in_name(&m.config) {
            if named != config_digest {
                return Err(SourceError::DigestMismatch {
                    digest: named,
                    actual: config_digest,
                });
            }
        }
        self.remember(&config_digest, &m.config);
        let config = ConfigFile::parse(&config_bytes, &format!("config {config_digest}"))?;
        if !config.matches(platform) {
            tracing::warn!(
                source = %self.describe(),
                "image is for {}/{}, not the requested {platform}; using it anyway",
                config.os,
                config.architecture
            );
        }
        let diff_ids = &config.rootfs.diff_ids;
        let mut descs = Vec::new();
        for (i, name) in m.layers.iter().enumerate() {
            let (_, size) = self.locate(name).ok_or_else(|| self.missing(name))?;
            let diff_id = diff_ids.get(i).map_or("", String::as_str);
            let digest = self.layer_digest(name, diff_id)?;
            self.remember(&digest, name);
            descs.push(Descriptor {
                media_type: DOCKER_ARCHIVE_LAYER.to_string(),
                digest,
                size,
                platform: None,
                annotations: None,
            });
        }
        let layers = layer_infos(
            &descs,
            diff_ids,
            &format!("{}: manifest.json", self.describe()),
        )?;
        Ok(ResolvedImage {
            manifest_digest: self.manifest_digest.clone(),
            config_digest,
            config: config.image_config(),
            layers,
        })
    }

    fn open_blob(&self, digest: &str) -> Result<Box<dyn Read + Send + '_>> {
        let hex = parse_digest(digest)?;
        let known = self
            .digests
            .lock()
            .ok()
            .and_then(|m| m.get(digest).cloned());
        let name = known.unwrap_or_else(|| format!("blobs/sha256/{hex}"));
        match self.open_member(&name)? {
            Some((r, _)) => Ok(Box::new(r)),
            None => Err(SourceError::BlobNotFound {
                digest: digest.to_string(),
                source_name: self.describe(),
            }),
        }
    }

    fn describe(&self) -> String {
        match &self.name {
            Some(n) => format!("docker-archive:{}:{n}", self.path.display()),
            None => format!("docker-archive:{}", self.path.display()),
        }
    }
}

/// Strips `./` and `/` prefixes and resolves `.`/`..` lexically (archive
/// member names only; never touches the filesystem).
fn clean(name: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    for c in name.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    out.join("/")
}

/// `sha256:HEX` for members named `blobs/sha256/HEX` or `HEX.json`.
fn digest_in_name(name: &str) -> Option<String> {
    let name = clean(name);
    let hex = name
        .strip_prefix("blobs/sha256/")
        .or_else(|| name.strip_suffix(".json"))?;
    let d = format!("sha256:{hex}");
    parse_digest(&d).ok()?;
    Some(d)
}

fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}
