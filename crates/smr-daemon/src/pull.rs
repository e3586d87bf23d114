//! `smr pull --containerd`: containerd's pull, driven over its gRPC API
//! with the labels a remote snapshotter needs (what stargz's
//! `ctr-remote image rpull` does with containerd's Go client).
//!
//! The manifest and config go into containerd's content store, the image
//! record names the manifest, and each layer is prepared through
//! containerd's snapshot service with the same `cri.*` labels containerd's
//! CRI plugin sets. The smr snapshotter answers `AlreadyExists` for the
//! layers of an image it mounts lazily, so no layer is downloaded; a layer
//! it does not (no trusted smr artifact) is downloaded into the content
//! store and unpacked by containerd's diff service, as `ctr image pull`
//! would. Everything runs under a lease, so containerd's garbage collector
//! cannot take half a pull; the config then references the top snapshot
//! (`containerd.io/gc.ref.snapshot.SNAPSHOTTER`), so `ctr image rm` frees
//! it.

use crate::snapshotter::{
    LABEL_IMAGE_REF, LABEL_LAYER, LABEL_LAYERS, LABEL_MANIFEST, LABEL_TARGET,
};
use containerd_client::services::v1 as api;
use containerd_client::types::Descriptor;
use sha2::{Digest, Sha256};
use smr_image::source::digest::JSON_BLOB_LIMIT;
use smr_image::source::{ImageSource, Platform, ResolvedImage, SourceError};
use smr_registry::client::RegistryOptions;
use smr_registry::source::RegistrySource;
use std::collections::HashMap;
use std::io::Read;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

/// Bytes per content-store write message.
const WRITE_CHUNK: usize = 1 << 20;
/// How long the pull's lease protects its content if the pull dies.
const LEASE_TTL: Duration = Duration::from_secs(3600);

/// Errors of a pull; each names the image, blob or call.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    /// The registry side failed.
    #[error("{0}")]
    Registry(String),
    /// containerd refused a call.
    #[error("containerd {what}: {status}", status = .status.message())]
    Containerd {
        /// The call, with what it was about.
        what: String,
        /// containerd's answer.
        status: Status,
    },
    /// No connection to containerd.
    #[error("connecting to containerd at {path}: {source}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The cause.
        source: tonic::transport::Error,
    },
}

/// What to pull into which containerd.
#[derive(Debug, Clone)]
pub struct PullOptions {
    /// containerd's socket.
    pub containerd: PathBuf,
    /// The containerd namespace (`default`, or `k8s.io` for CRI).
    pub namespace: String,
    /// The snapshotter to unpack with (the name of smr's proxy plugin).
    pub snapshotter: String,
    /// Registry access.
    pub registry: RegistryOptions,
    /// The platform to pick from an index.
    pub platform: Platform,
    /// The node daemon's control socket: told which image is coming once
    /// its manifest is known ([`expect_image`]), if a daemon answers there.
    pub daemon: Option<PathBuf>,
}

/// What a pull did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pulled {
    /// The image's name in containerd.
    pub name: String,
    /// The manifest digest.
    pub manifest: String,
    /// Layers the snapshotter serves lazily.
    pub remote: usize,
    /// Layers downloaded and unpacked by containerd.
    pub unpacked: usize,
    /// Layers that were already there.
    pub present: usize,
}

/// The `chainID` of a layer with `diff_id` on the chain `parent` (OCI
/// image spec): the diff id itself at the bottom, else
/// `sha256(parent + " " + diff_id)`.
pub fn chain_id(parent: Option<&str>, diff_id: &str) -> String {
    match parent {
        None => diff_id.to_string(),
        Some(p) => format!(
            "sha256:{}",
            hex::encode(Sha256::digest(format!("{p} {diff_id}").as_bytes()))
        ),
    }
}

/// `chainID`s of the layers with `diff_ids` (bottom first).
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let next = chain_id(out.last().map(String::as_str), d);
        out.push(next);
    }
    out
}

struct Ctd {
    ch: Channel,
    ns: String,
    lease: Option<String>,
}

impl Ctd {
    fn req<T>(&self, msg: T) -> Request<T> {
        let mut r = Request::new(msg);
        let md = r.metadata_mut();
        if let Ok(v) = self.ns.parse() {
            md.insert("containerd-namespace", v);
        }
        if let Some(l) = self.lease.as_ref().and_then(|l| l.parse().ok()) {
            md.insert("containerd-lease", l);
        }
        r
    }
}

fn ctd_err(what: impl Into<String>) -> impl FnOnce(Status) -> PullError {
    let what = what.into();
    move |status| PullError::Containerd { what, status }
}

/// The registry image being pulled, keeping whole every blob read through
/// it. Resolving reads only indexes, the manifest and its config (each at
/// most [`JSON_BLOB_LIMIT`]), which the pull then writes into containerd's
/// content store as they are, without fetching them again.
struct Kept<'a> {
    src: &'a RegistrySource,
    blobs: Mutex<HashMap<String, Vec<u8>>>,
}

impl<'a> Kept<'a> {
    fn new(src: &'a RegistrySource) -> Self {
        Kept {
            src,
            blobs: Mutex::new(HashMap::new()),
        }
    }

    /// Blob `digest`, which resolving read (and checked).
    fn read(&self, digest: &str) -> Result<Vec<u8>, PullError> {
        let kept = self
            .blobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(digest)
            .cloned();
        kept.ok_or_else(|| {
            PullError::Registry(format!(
                "{}: blob {digest} was not read while resolving",
                self.describe()
            ))
        })
    }
}

impl ImageSource for Kept<'_> {
    fn resolve(&self, platform: &Platform) -> Result<ResolvedImage, SourceError> {
        self.src.resolve_via(self, platform)
    }

    fn open_blob(&self, digest: &str) -> Result<Box<dyn Read + Send + '_>, SourceError> {
        let mut out = Vec::new();
        self.src
            .open_blob(digest)?
            .take(JSON_BLOB_LIMIT + 1)
            .read_to_end(&mut out)
            .map_err(|e| SourceError::Io {
                path: PathBuf::from(format!("blob {digest} of {}", self.describe())),
                source: e,
            })?;
        self.blobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(digest.to_string(), out.clone());
        Ok(Box::new(std::io::Cursor::new(out)))
    }

    fn describe(&self) -> String {
        self.src.describe()
    }
}

/// Writes `data` (digest `digest`) into containerd's content store with
/// `labels`; content already there gets the labels.
async fn put_content(
    c: &Ctd,
    digest: &str,
    data: Vec<u8>,
    labels: HashMap<String, String>,
) -> Result<(), PullError> {
    let mut content = api::content_client::ContentClient::new(c.ch.clone());
    let total = i64::try_from(data.len()).unwrap_or(i64::MAX);
    let msg = api::WriteContentRequest {
        action: api::WriteAction::Commit as i32,
        r#ref: format!("smr-pull-{digest}"),
        total,
        expected: digest.to_string(),
        offset: 0,
        data,
        labels: labels.clone(),
    };
    let res = content.write(c.req(futures::stream::iter(vec![msg]))).await;
    let written = finish_write(res, &format!("writing {digest}")).await?;
    if !written {
        label_content(c, digest, labels).await?;
    }
    Ok(())
}

/// Sets `labels` on content `digest`.
async fn label_content(
    c: &Ctd,
    digest: &str,
    labels: HashMap<String, String>,
) -> Result<(), PullError> {
    let mut content = api::content_client::ContentClient::new(c.ch.clone());
    let paths = labels.keys().map(|k| format!("labels.{k}")).collect();
    content
        .update(c.req(api::UpdateRequest {
            info: Some(api::Info {
                digest: digest.to_string(),
                labels,
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask { paths }),
        }))
        .await
        .map_err(ctd_err(format!("labelling {digest}")))?;
    Ok(())
}

/// Streams layer `digest` from the registry into containerd's content
/// store (unless it is there).
async fn fetch_layer(
    c: &Ctd,
    src: Arc<RegistrySource>,
    layer: &smr_image::source::LayerInfo,
) -> Result<(), PullError> {
    let mut content = api::content_client::ContentClient::new(c.ch.clone());
    let have = content
        .info(c.req(api::InfoRequest {
            digest: layer.digest.clone(),
        }))
        .await;
    if have.is_ok() {
        return Ok(());
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<api::WriteContentRequest>(4);
    let digest = layer.digest.clone();
    let total = i64::try_from(layer.size).unwrap_or(i64::MAX);
    let reader = tokio::task::spawn_blocking(move || -> Result<(), PullError> {
        let mut r = src
            .open_blob(&digest)
            .map_err(|e| PullError::Registry(format!("{}: layer {digest}: {e}", src.describe())))?;
        let mut offset = 0i64;
        loop {
            let mut buf = vec![0u8; WRITE_CHUNK];
            let n = r.read(&mut buf).map_err(|e| {
                PullError::Registry(format!("{}: layer {digest}: {e}", src.describe()))
            })?;
            buf.truncate(n);
            let last = n == 0;
            let msg = api::WriteContentRequest {
                action: if last {
                    api::WriteAction::Commit
                } else {
                    api::WriteAction::Write
                } as i32,
                r#ref: format!("smr-pull-{digest}"),
                total,
                expected: digest.clone(),
                offset,
                data: buf,
                labels: HashMap::new(),
            };
            offset += i64::try_from(n).unwrap_or(0);
            if tx.blocking_send(msg).is_err() || last {
                return Ok(());
            }
        }
    });
    let res = content
        .write(c.req(tokio_stream::wrappers::ReceiverStream::new(rx)))
        .await;
    let out = finish_write(res, &format!("writing layer {}", layer.digest)).await;
    let read = reader
        .await
        .map_err(|e| PullError::Registry(format!("layer {}: {e}", layer.digest)))?;
    read.and(out.map(|_| ()))
}

/// Reads containerd's answers to a content write to the end: whether the
/// content was written (`false`: it was already there).
async fn finish_write(
    res: Result<tonic::Response<tonic::Streaming<api::WriteContentResponse>>, Status>,
    what: &str,
) -> Result<bool, PullError> {
    match res {
        Ok(mut stream) => loop {
            match stream.get_mut().message().await {
                Ok(Some(_)) => continue,
                Ok(None) => return Ok(true),
                Err(s) if s.code() == Code::AlreadyExists => return Ok(false),
                Err(s) => return Err(ctd_err(what)(s)),
            }
        },
        Err(s) if s.code() == Code::AlreadyExists => Ok(false),
        Err(s) => Err(ctd_err(what)(s)),
    }
}

fn descriptor(media_type: &str, digest: &str, size: u64) -> Descriptor {
    Descriptor {
        media_type: media_type.to_string(),
        digest: digest.to_string(),
        size: i64::try_from(size).unwrap_or(i64::MAX),
        ..Default::default()
    }
}

/// The manifest's `mediaType` (OCI when it has none).
fn manifest_media_type(bytes: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(bytes)
        .ok()
        .and_then(|v| v.get("mediaType")?.as_str().map(str::to_string))
        .unwrap_or_else(|| "application/vnd.oci.image.manifest.v1+json".into())
}

/// Pulls `reference` into containerd.
pub async fn pull(reference: &str, opts: &PullOptions) -> Result<Pulled, PullError> {
    let src = RegistrySource::open(reference, &opts.registry)
        .map_err(|e| PullError::Registry(e.to_string()))?;
    let src = Arc::new(src);
    let platform = opts.platform.clone();
    let daemon = opts.daemon.clone();
    let s2 = src.clone();
    let (img, manifest, config) = tokio::task::spawn_blocking(
        move || -> Result<(ResolvedImage, Vec<u8>, Vec<u8>), PullError> {
            if let Some(sock) = &daemon {
                // Only the tag's (or index's) read: `resolve` below reuses it.
                match s2.resolve_manifest(&platform) {
                    Ok((digest, _)) => {
                        let r = s2.reference();
                        let pinned = format!("docker://{}/{}@{digest}", r.registry, r.repository);
                        expect_image(sock, &pinned);
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "not telling the daemon: no manifest yet")
                    }
                }
            }
            let kept = Kept::new(&s2);
            let img = kept
                .resolve(&platform)
                .map_err(|e| PullError::Registry(format!("{}: {e}", s2.describe())))?;
            let manifest = kept.read(&img.manifest_digest)?;
            let config = kept.read(&img.config_digest)?;
            Ok((img, manifest, config))
        },
    )
    .await
    .map_err(|e| PullError::Registry(format!("{reference}: {e}")))??;
    let r = src.reference();
    let name = match (&r.tag, &r.digest) {
        (Some(t), _) => format!("{}/{}:{t}", r.registry, r.repository),
        (None, Some(d)) => format!("{}/{}@{d}", r.registry, r.repository),
        (None, None) => format!("{}/{}", r.registry, r.repository),
    };
    let ch = containerd_client::connect(&opts.containerd)
        .await
        .map_err(|source| PullError::Connect {
            path: opts.containerd.clone(),
            source,
        })?;
    let mut c = Ctd {
        ch,
        ns: opts.namespace.clone(),
        lease: None,
    };
    let lease_id = format!("smr-pull-{}", fastrand::u64(..));
    let expire = humantime::format_rfc3339_seconds(SystemTime::now() + LEASE_TTL).to_string();
    let mut leases = api::leases_client::LeasesClient::new(c.ch.clone());
    leases
        .create(c.req(api::CreateRequest {
            id: lease_id.clone(),
            labels: HashMap::from([("containerd.io/gc.expire".to_string(), expire)]),
        }))
        .await
        .map_err(ctd_err("creating a lease"))?;
    c.lease = Some(lease_id.clone());
    let out = pull_leased(&c, src, &img, &name, manifest, config, opts).await;
    c.lease = None;
    if let Err(e) = leases
        .delete(c.req(api::DeleteRequest {
            id: lease_id,
            sync: false,
        }))
        .await
    {
        tracing::warn!(error = %e.message(), "deleting the pull's lease");
    }
    out
}

async fn pull_leased(
    c: &Ctd,
    src: Arc<RegistrySource>,
    img: &ResolvedImage,
    name: &str,
    manifest: Vec<u8>,
    config: Vec<u8>,
    opts: &PullOptions,
) -> Result<Pulled, PullError> {
    let r = src.reference();
    let source_label = (
        format!("containerd.io/distribution.source.{}", r.registry),
        r.repository.clone(),
    );
    let diff_ids: Vec<String> = img.layers.iter().map(|l| l.diff_id.clone()).collect();
    let chains = chain_ids(&diff_ids);
    let mut pulled = Pulled {
        name: name.to_string(),
        manifest: img.manifest_digest.clone(),
        remote: 0,
        unpacked: 0,
        present: 0,
    };
    let mut snaps = api::snapshots::snapshots_client::SnapshotsClient::new(c.ch.clone());
    for (i, (layer, chain)) in img.layers.iter().zip(&chains).enumerate() {
        let stat = snaps
            .stat(c.req(api::snapshots::StatSnapshotRequest {
                snapshotter: opts.snapshotter.clone(),
                key: chain.clone(),
            }))
            .await;
        if stat.is_ok() {
            pulled.present += 1;
            continue;
        }
        let parent = if i == 0 {
            String::new()
        } else {
            chains[i - 1].clone()
        };
        let above: Vec<&str> = img.layers[i..].iter().map(|l| l.digest.as_str()).collect();
        let labels = HashMap::from([
            (LABEL_TARGET.to_string(), chain.clone()),
            (LABEL_IMAGE_REF.to_string(), name.to_string()),
            (LABEL_MANIFEST.to_string(), img.manifest_digest.clone()),
            (LABEL_LAYER.to_string(), layer.digest.clone()),
            (LABEL_LAYERS.to_string(), above.join(",")),
        ]);
        let key = format!("extract-{}-{chain}", fastrand::u64(..));
        let prep = snaps
            .prepare(c.req(api::snapshots::PrepareSnapshotRequest {
                snapshotter: opts.snapshotter.clone(),
                key: key.clone(),
                parent: parent.clone(),
                labels,
            }))
            .await;
        let mounts = match prep {
            Err(s) if s.code() == Code::AlreadyExists => {
                pulled.remote += 1;
                continue;
            }
            Err(s) => return Err(ctd_err(format!("preparing layer {}", layer.digest))(s)),
            Ok(resp) => resp.into_inner().mounts,
        };
        tracing::info!(layer = layer.digest, "not served lazily; unpacking it");
        let unpacked = async {
            fetch_layer(c, src.clone(), layer).await?;
            let mut diff = api::diff_client::DiffClient::new(c.ch.clone());
            diff.apply(c.req(api::ApplyRequest {
                diff: Some(descriptor(&layer.media_type, &layer.digest, layer.size)),
                mounts,
                ..Default::default()
            }))
            .await
            .map_err(ctd_err(format!("applying layer {}", layer.digest)))?;
            snaps
                .clone()
                .commit(c.req(api::snapshots::CommitSnapshotRequest {
                    snapshotter: opts.snapshotter.clone(),
                    name: chain.clone(),
                    key: key.clone(),
                    labels: HashMap::new(),
                }))
                .await
                .map_err(ctd_err(format!("committing layer {}", layer.digest)))?;
            Ok::<(), PullError>(())
        }
        .await;
        if let Err(e) = unpacked {
            let _ = snaps
                .remove(c.req(api::snapshots::RemoveSnapshotRequest {
                    snapshotter: opts.snapshotter.clone(),
                    key,
                }))
                .await;
            return Err(e);
        }
        pulled.unpacked += 1;
    }
    let mut config_labels = HashMap::from([source_label.clone()]);
    if let Some(top) = chains.last() {
        config_labels.insert(
            format!("containerd.io/gc.ref.snapshot.{}", opts.snapshotter),
            top.clone(),
        );
    }
    put_content(c, &img.config_digest, config, config_labels).await?;
    let mut manifest_labels = HashMap::from([
        source_label,
        (
            "containerd.io/gc.ref.content.config".to_string(),
            img.config_digest.clone(),
        ),
    ]);
    for (i, l) in img.layers.iter().enumerate() {
        manifest_labels.insert(
            format!("containerd.io/gc.ref.content.l.{i}"),
            l.digest.clone(),
        );
    }
    let media_type = manifest_media_type(&manifest);
    let size = manifest.len() as u64;
    put_content(c, &img.manifest_digest, manifest, manifest_labels).await?;
    let image = api::Image {
        name: name.to_string(),
        target: Some(descriptor(&media_type, &img.manifest_digest, size)),
        ..Default::default()
    };
    let mut images = api::images_client::ImagesClient::new(c.ch.clone());
    let created = images
        .create(c.req(api::CreateImageRequest {
            image: Some(image.clone()),
            ..Default::default()
        }))
        .await;
    match created {
        Ok(_) => {}
        Err(s) if s.code() == Code::AlreadyExists => {
            images
                .update(c.req(api::UpdateImageRequest {
                    image: Some(image),
                    ..Default::default()
                }))
                .await
                .map_err(ctd_err(format!("updating image {name}")))?;
        }
        Err(s) => return Err(ctd_err(format!("creating image {name}"))(s)),
    }
    Ok(pulled)
}

/// Tells the node daemon on `socket` that containerd is about to pull
/// `image` (pinned by its manifest), so that it starts mounting it while
/// containerd records the pull (`POST /images`; the daemon answers at once
/// and mounts in the background). Best effort: no daemon, or one that says
/// no, changes nothing.
pub fn expect_image(socket: &std::path::Path, image: &str) {
    let body = serde_json::json!({ "image": image });
    // The daemon answers at once; a daemon that does not is not waited for
    // long, as the pull goes on either way.
    let timeout = Duration::from_secs(1);
    match crate::client::request(socket, "POST", "/images", Some(&body), timeout) {
        Ok(_) => tracing::debug!(image, "told the node daemon about the pull"),
        Err(e @ crate::client::ClientError::Connect { .. }) => {
            tracing::debug!(error = %e, "no node daemon to tell about the pull")
        }
        Err(e) => tracing::warn!(image, error = %e, "telling the node daemon about the pull"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_follow_the_image_spec() {
        // The image spec's rule: ChainID(L0) = DiffID(L0),
        // ChainID(L0|L1) = sha256(ChainID(L0) + " " + DiffID(L1)).
        let a = format!("sha256:{}", "a".repeat(64));
        let b = format!("sha256:{}", "b".repeat(64));
        let ids = chain_ids(&[a.clone(), b.clone()]);
        assert_eq!(ids[0], a);
        let want = format!(
            "sha256:{}",
            hex::encode(Sha256::digest(format!("{a} {b}").as_bytes()))
        );
        assert_eq!(ids[1], want);
        assert!(chain_ids(&[]).is_empty());
    }
}
