//! containerd's snapshotter model over overlayfs, with remote layers.
//!
//! Ordinary snapshots are directories `ROOT/snapshots/<id>/{fs,work}`,
//! stacked with overlayfs as containerd's own overlay snapshotter does.
//! A `Prepare` that carries the remote-snapshot labels (the target chain id
//! in `containerd.io/snapshot.ref`, the image reference, manifest and layer
//! digests as containerd's CRI plugin or `smr pull` set them) of an image
//! the node can mount lazily is answered by committing the layer as a
//! *remote* snapshot and returning `AlreadyExists`, so containerd downloads
//! nothing. The image's top layer stands for the whole flattened image: a
//! snapshot on top of it gets the lazily mounted image as its overlay
//! lower directory. Anything else (no smr artifact, an untrusted one, a
//! registry that cannot be reached) falls back to an ordinary snapshot,
//! which containerd fills by unpacking the layer itself.

use crate::images::Images;
use crate::meta::{now_nanos, Kind, Meta, Record, RemoteLayer};
use crate::metrics::Metrics;
use crate::SnapError;
use std::collections::{BTreeMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

/// The chain id a `Prepare` is asked to produce (remote snapshots).
pub const LABEL_TARGET: &str = "containerd.io/snapshot.ref";
/// The image reference, as containerd's CRI plugin labels layers.
pub const LABEL_IMAGE_REF: &str = "containerd.io/snapshot/cri.image-ref";
/// The image manifest's digest.
pub const LABEL_MANIFEST: &str = "containerd.io/snapshot/cri.manifest-digest";
/// The layer blob's digest.
pub const LABEL_LAYER: &str = "containerd.io/snapshot/cri.layer-digest";
/// The digests of this layer and every layer above it, comma-separated.
pub const LABEL_LAYERS: &str = "containerd.io/snapshot/cri.image-layers";
/// Marks a remote snapshot made by smr.
pub const LABEL_REMOTE: &str = "containerd.io/snapshot/remote";

/// One mount for containerd (`containerd.types.Mount`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountSpec {
    /// `bind` or `overlay`.
    pub kind: String,
    /// The source.
    pub source: String,
    /// fstab-style options.
    pub options: Vec<String>,
}

/// A snapshot as `Stat` and `List` report it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Info {
    /// Key or committed name.
    pub name: String,
    /// The record.
    pub rec: Record,
}

/// The snapshotter's state: metadata, directories, image mounts.
pub struct Snapshotter {
    root: PathBuf,
    meta: Meta,
    images: Arc<Images>,
    /// Held while an inner remote layer is unpacked on its own.
    materializing: Mutex<()>,
    metrics: Arc<Metrics>,
    binds: crate::binds::Binds,
}

fn io(what: &str, path: &Path) -> impl FnOnce(std::io::Error) -> SnapError {
    let what = format!("{what} {}", path.display());
    move |e| SnapError::Internal(format!("{what}: {e}"))
}

/// The answer containerd expects when target `target` exists.
fn target_exists(target: &str) -> SnapError {
    SnapError::AlreadyExists(format!("target snapshot {target:?}"))
}

fn valid_digest(label: &str, value: &str) -> Result<(), SnapError> {
    smr_image::source::digest::parse_digest(value)
        .map(|_| ())
        .map_err(|_| SnapError::InvalidArgument(format!("label {label}={value:?} is not a digest")))
}

impl Snapshotter {
    /// Opens the snapshotter under `root` (created 0700 if missing).
    pub fn open(root: &Path, images: Images) -> Result<Snapshotter, SnapError> {
        smr_node::dirs::private_dir(root).map_err(io("creating", root))?;
        let snaps = root.join("snapshots");
        std::fs::create_dir_all(&snaps).map_err(io("creating", &snaps))?;
        let meta = Meta::open(&root.join("metadata.redb"))?;
        Ok(Snapshotter {
            root: root.to_path_buf(),
            meta,
            images: Arc::new(images),
            materializing: Mutex::new(()),
            metrics: Arc::default(),
            binds: crate::binds::Binds::new(root),
        })
    }

    /// Images bound on mount points by `smr mount` through the daemon.
    pub fn binds(&self) -> &crate::binds::Binds {
        &self.binds
    }

    /// The daemon's counters.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The image mounts.
    pub fn images(&self) -> &Arc<Images> {
        &self.images
    }

    fn dir(&self, id: u64) -> PathBuf {
        self.root.join("snapshots").join(id.to_string())
    }

    fn need(&self, name: &str) -> Result<Record, SnapError> {
        self.meta
            .get(name)?
            .ok_or_else(|| SnapError::NotFound(format!("snapshot {name:?}")))
    }

    /// The remote layer `labels` describe, if they carry the remote-snapshot
    /// labels; garbage in them is an error naming the label.
    fn remote_target(labels: &BTreeMap<String, String>) -> Result<Option<RemoteLayer>, SnapError> {
        let (Some(r), Some(m), Some(l)) = (
            labels.get(LABEL_IMAGE_REF),
            labels.get(LABEL_MANIFEST),
            labels.get(LABEL_LAYER),
        ) else {
            return Ok(None);
        };
        valid_digest(LABEL_MANIFEST, m)?;
        valid_digest(LABEL_LAYER, l)?;
        let parsed = smr_registry::reference::ImageRef::parse(r).map_err(|e| {
            SnapError::InvalidArgument(format!("label {LABEL_IMAGE_REF}={r:?}: {e}"))
        })?;
        let above: Vec<&str> = labels
            .get(LABEL_LAYERS)
            .map(|s| s.split(',').filter(|x| !x.is_empty()).collect())
            .unwrap_or_default();
        Ok(Some(RemoteLayer {
            image: format!("docker://{}/{}@{m}", parsed.registry, parsed.repository),
            manifest: m.clone(),
            layer: l.clone(),
            top: above.as_slice() == [l.as_str()],
        }))
    }

    /// `Prepare` (`kind` Active) or `View` (`kind` View) of `key` on
    /// `parent`.
    pub fn prepare(
        &self,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
        kind: Kind,
    ) -> Result<Vec<MountSpec>, SnapError> {
        if key.is_empty() {
            return Err(SnapError::InvalidArgument("empty snapshot key".into()));
        }
        let parent = (!parent.is_empty()).then(|| parent.to_string());
        if kind == Kind::Active {
            if let Some(target) = labels.get(LABEL_TARGET).cloned() {
                if let Some(remote) = Self::remote_target(&labels)? {
                    if self.try_remote(&target, parent.as_deref(), &labels, remote)? {
                        return Err(target_exists(&target));
                    }
                }
            }
        }
        let now = now_nanos();
        let id = self.meta.update(|tx| {
            if tx.get(key)?.is_some() {
                return Err(SnapError::AlreadyExists(format!("snapshot {key:?}")));
            }
            if let Some(p) = &parent {
                let pr = tx
                    .get(p)?
                    .ok_or_else(|| SnapError::NotFound(format!("parent snapshot {p:?}")))?;
                if pr.kind != Kind::Committed {
                    return Err(SnapError::FailedPrecondition(format!(
                        "parent {p:?} is not committed"
                    )));
                }
            }
            let id = tx.next_id()?;
            let dir = self.dir(id);
            for d in [dir.join("fs"), dir.join("work")] {
                std::fs::create_dir_all(&d).map_err(io("creating", &d))?;
            }
            let rec = Record {
                id,
                kind,
                parent: parent.clone(),
                labels,
                created: now,
                updated: now,
                remote: None,
            };
            tx.put(key, &rec)?;
            Ok(id)
        });
        let id = id?;
        match self.mounts(key) {
            Ok(m) => Ok(m),
            Err(e) => {
                // Not usable (e.g. a lazy image below that cannot be
                // mounted, or an inner layer that cannot be unpacked): undo.
                let _ = self.meta.update(|tx| Ok(tx.delete(key)?));
                let _ = std::fs::remove_dir_all(self.dir(id));
                Err(e)
            }
        }
    }

    /// Commits `target` as a remote layer if its image mounts; `false` to
    /// fall back to an ordinary snapshot.
    fn try_remote(
        &self,
        target: &str,
        parent: Option<&str>,
        labels: &BTreeMap<String, String>,
        remote: RemoteLayer,
    ) -> Result<bool, SnapError> {
        if self.meta.get(target)?.is_some() {
            return Err(target_exists(target));
        }
        if let Some(p) = parent {
            self.need(p)?;
        }
        if let Err(why) = self.images.ensure_accepted(&remote.image, &remote.manifest) {
            tracing::warn!(
                image = remote.image,
                layer = remote.layer,
                reason = why,
                "no lazy image; containerd unpacks this layer"
            );
            self.metrics.fallbacks.fetch_add(1, Ordering::Relaxed);
            return Ok(false);
        }
        let now = now_nanos();
        let mut labels = labels.clone();
        labels.insert(LABEL_REMOTE.into(), "smr".into());
        let rec = Record {
            id: 0,
            kind: Kind::Committed,
            parent: parent.map(str::to_string),
            labels,
            created: now,
            updated: now,
            remote: Some(remote.clone()),
        };
        self.meta.update(|tx| {
            if tx.get(target)?.is_some() {
                return Err(target_exists(target));
            }
            Ok(tx.put(target, &rec)?)
        })?;
        tracing::info!(
            image = remote.image,
            layer = remote.layer,
            top = remote.top,
            target,
            "remote snapshot"
        );
        self.metrics.remote_layers.fetch_add(1, Ordering::Relaxed);
        Ok(true)
    }

    /// The lower directories of a snapshot whose parent is `parent`, top
    /// first.
    fn lowers(&self, mut parent: Option<String>) -> Result<Vec<PathBuf>, SnapError> {
        let mut out = Vec::new();
        let mut seen = HashSet::new();
        while let Some(p) = parent {
            if !seen.insert(p.clone()) {
                return Err(SnapError::Internal(format!("parent loop at {p:?}")));
            }
            let rec = self.need(&p)?;
            let rec = match &rec.remote {
                Some(r) if !r.top => self.materialize(&p)?,
                _ => rec,
            };
            if let Some(r) = &rec.remote {
                let dir = self
                    .images
                    .ensure(&r.image, &r.manifest)
                    .map_err(|e| SnapError::Unavailable(format!("snapshot {p:?}: {e}")))?;
                out.push(dir);
                break;
            }
            out.push(self.dir(rec.id).join("fs"));
            parent = rec.parent;
        }
        Ok(out)
    }

    /// Turns remote layer `name`, an inner layer of a flattened smr image,
    /// into an ordinary layer directory: its blob is fetched from the
    /// image's repository and unpacked, verified against the blob digest,
    /// the config's diff id and the chain id that names the snapshot. Needed
    /// when another image's top layer is this layer (a base image pulled
    /// after an image built on it).
    fn materialize(&self, name: &str) -> Result<Record, SnapError> {
        let _one = self.materializing.lock().unwrap_or_else(|e| e.into_inner());
        let rec = self.need(name)?;
        let Some(r) = rec.remote.clone().filter(|r| !r.top) else {
            return Ok(rec);
        };
        let unavailable =
            |e: String| SnapError::Unavailable(format!("layer {} of {}: {e}", r.layer, r.image));
        let opts = self.images.keychain().options_for(&r.image);
        let src = smr_registry::source::RegistrySource::open(&r.image, &opts)
            .map_err(|e| unavailable(e.to_string()))?;
        use smr_image::source::ImageSource;
        let img = src
            .resolve(&smr_image::source::Platform::default())
            .map_err(|e| unavailable(e.to_string()))?;
        let layer = img
            .layers
            .iter()
            .find(|l| l.digest == r.layer)
            .ok_or_else(|| unavailable("the manifest does not list the layer".into()))?;
        let chain = crate::pull::chain_id(rec.parent.as_deref(), &layer.diff_id);
        if chain != name {
            return Err(SnapError::FailedPrecondition(format!(
                "snapshot {name:?}: layer {} with diff id {} on parent {:?} gives chain id {chain}",
                r.layer, layer.diff_id, rec.parent
            )));
        }
        let id = self.meta.update(|tx| Ok(tx.next_id()?))?;
        let fs = self.dir(id).join("fs");
        std::fs::create_dir_all(&fs).map_err(io("creating", &fs))?;
        let t = std::time::Instant::now();
        let unpacked = smr_image::layer::open_layer(&src, layer)
            .map_err(|e| unavailable(e.to_string()))
            .and_then(|stream| {
                crate::unpack::unpack_layer(stream, &fs).map_err(|e| unavailable(e.to_string()))
            });
        if let Err(e) = unpacked {
            let _ = std::fs::remove_dir_all(self.dir(id));
            return Err(e);
        }
        let rec = self.meta.update(|tx| {
            let mut cur = tx
                .get(name)?
                .ok_or_else(|| SnapError::NotFound(format!("snapshot {name:?}")))?;
            cur.remote = None;
            cur.id = id;
            cur.labels.remove(LABEL_REMOTE);
            tx.put(name, &cur)?;
            Ok(cur)
        })?;
        tracing::info!(snapshot = name, layer = r.layer, took = ?t.elapsed(), "inner layer of a lazy image unpacked on its own");
        self.metrics.materialized.fetch_add(1, Ordering::Relaxed);
        self.release_unused(Some(&r.manifest));
        Ok(rec)
    }

    /// The mounts of active or view snapshot `key`.
    pub fn mounts(&self, key: &str) -> Result<Vec<MountSpec>, SnapError> {
        let rec = self.need(key)?;
        if rec.kind == Kind::Committed {
            return Err(SnapError::FailedPrecondition(format!(
                "snapshot {key:?} is committed; only active and view snapshots are mounted"
            )));
        }
        let dir = self.dir(rec.id);
        let lowers = self.lowers(rec.parent.clone())?;
        let s = |p: &Path| p.display().to_string();
        let bind = |src: &Path, rw: bool| MountSpec {
            kind: "bind".into(),
            source: s(src),
            options: vec![if rw { "rw" } else { "ro" }.into(), "rbind".into()],
        };
        let lowerdir = || {
            let v: Vec<String> = lowers.iter().map(|p| s(p)).collect();
            format!("lowerdir={}", v.join(":"))
        };
        Ok(match (rec.kind, lowers.len()) {
            (Kind::Active, 0) => vec![bind(&dir.join("fs"), true)],
            (Kind::Active, _) => vec![MountSpec {
                kind: "overlay".into(),
                source: "overlay".into(),
                options: vec![
                    "index=off".into(),
                    format!("workdir={}", s(&dir.join("work"))),
                    format!("upperdir={}", s(&dir.join("fs"))),
                    lowerdir(),
                ],
            }],
            (_, 0) => vec![bind(&dir.join("fs"), false)],
            (_, 1) => vec![bind(&lowers[0], false)],
            _ => vec![MountSpec {
                kind: "overlay".into(),
                source: "overlay".into(),
                options: vec!["index=off".into(), lowerdir()],
            }],
        })
    }

    /// Commits active snapshot `key` as `name`.
    pub fn commit(
        &self,
        name: &str,
        key: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<(), SnapError> {
        if name.is_empty() {
            return Err(SnapError::InvalidArgument("empty snapshot name".into()));
        }
        self.meta.update(|tx| {
            let mut rec = tx
                .get(key)?
                .ok_or_else(|| SnapError::NotFound(format!("active snapshot {key:?}")))?;
            if rec.kind != Kind::Active {
                return Err(SnapError::FailedPrecondition(format!(
                    "snapshot {key:?} is not active"
                )));
            }
            if tx.get(name)?.is_some() {
                return Err(SnapError::AlreadyExists(format!("snapshot {name:?}")));
            }
            rec.kind = Kind::Committed;
            rec.labels = labels;
            rec.updated = now_nanos();
            tx.delete(key)?;
            Ok(tx.put(name, &rec)?)
        })?;
        let work = self.dir(self.need(name)?.id).join("work");
        let _ = std::fs::remove_dir_all(&work);
        Ok(())
    }

    /// Removes snapshot `key` (which no other snapshot may have as parent).
    pub fn remove(&self, key: &str) -> Result<(), SnapError> {
        let rec = self.meta.update(|tx| {
            let rec = tx
                .get(key)?
                .ok_or_else(|| SnapError::NotFound(format!("snapshot {key:?}")))?;
            if tx.has_children(key)? {
                return Err(SnapError::FailedPrecondition(format!(
                    "snapshot {key:?} has children"
                )));
            }
            tx.delete(key)?;
            Ok(rec)
        })?;
        match &rec.remote {
            Some(r) => self.release_unused(Some(&r.manifest)),
            None => {
                let dir = self.dir(rec.id);
                std::fs::remove_dir_all(&dir).map_err(io("removing", &dir))?;
            }
        }
        Ok(())
    }

    /// Unmounts images no remote snapshot refers to (only `only` when
    /// given); busy ones stay for the next cleanup.
    fn release_unused(&self, only: Option<&str>) {
        let Ok(all) = self.meta.all() else { return };
        let mut used: HashSet<String> = all
            .iter()
            .filter_map(|(_, r)| r.remote.as_ref().map(|x| x.manifest.clone()))
            .collect();
        used.extend(self.binds.live().into_iter().map(|b| b.manifest));
        let candidates = match only {
            Some(m) => vec![m.to_string()],
            None => self.images.known(),
        };
        for m in candidates {
            if !used.contains(&m) {
                if let Err(e) = self.images.release(&m) {
                    tracing::warn!(manifest = m, error = e, "image still in use; kept");
                }
            }
        }
    }

    /// Unmounts images that no active or view snapshot stands on and that
    /// nobody asked for in `idle`; their remote snapshots stay, and the
    /// next container on one mounts it again. Returns the manifests
    /// released.
    pub fn release_idle(&self, idle: std::time::Duration) -> Vec<String> {
        let Ok(all) = self.meta.all() else {
            return Vec::new();
        };
        let by_name: std::collections::HashMap<&str, &Record> =
            all.iter().map(|(n, r)| (n.as_str(), r)).collect();
        // Images under a live (active or view) snapshot.
        let mut used = HashSet::new();
        for (_, r) in all.iter().filter(|(_, r)| r.kind != Kind::Committed) {
            let mut p = r.parent.as_deref();
            let mut hops = 0;
            while let Some(rec) = p.and_then(|n| by_name.get(n)) {
                if let Some(x) = rec.remote.as_ref().filter(|x| x.top) {
                    used.insert(x.manifest.clone());
                    break;
                }
                hops += 1;
                if hops > all.len() {
                    break;
                }
                p = rec.parent.as_deref();
            }
        }
        used.extend(self.binds.live().into_iter().map(|b| b.manifest));
        let mut released = Vec::new();
        for m in self.images.known() {
            if used.contains(&m) || !self.images.is_mounted(&m) {
                continue;
            }
            if self.images.idle_for(&m).is_some_and(|d| d < idle) {
                continue;
            }
            if self.images.idle_for(&m).is_none() {
                // Not asked for since this daemon started: start the clock.
                self.images.touch(&m);
                continue;
            }
            match self.images.release(&m) {
                Ok(()) => released.push(m),
                Err(e) => tracing::debug!(manifest = m, error = e, "idle image still busy"),
            }
        }
        released
    }

    /// `Stat`.
    pub fn stat(&self, key: &str) -> Result<Info, SnapError> {
        Ok(Info {
            name: key.to_string(),
            rec: self.need(key)?,
        })
    }

    /// `Update`: sets the labels (all of them, or the `labels.KEY` paths
    /// named in `mask`; an empty value deletes a key).
    pub fn update(
        &self,
        key: &str,
        labels: BTreeMap<String, String>,
        mask: &[String],
    ) -> Result<Info, SnapError> {
        let rec = self.meta.update(|tx| {
            let mut rec = tx
                .get(key)?
                .ok_or_else(|| SnapError::NotFound(format!("snapshot {key:?}")))?;
            if mask.is_empty() || mask.iter().any(|m| m == "labels") {
                rec.labels = labels.clone();
            } else {
                for path in mask {
                    let Some(k) = path.strip_prefix("labels.") else {
                        return Err(SnapError::InvalidArgument(format!(
                            "cannot update field {path:?} of snapshot {key:?}"
                        )));
                    };
                    match labels.get(k) {
                        Some(v) if !v.is_empty() => {
                            rec.labels.insert(k.to_string(), v.clone());
                        }
                        _ => {
                            rec.labels.remove(k);
                        }
                    }
                }
            }
            rec.updated = now_nanos();
            tx.put(key, &rec)?;
            Ok(rec)
        })?;
        Ok(Info {
            name: key.to_string(),
            rec,
        })
    }

    /// `Usage`: bytes and inodes the snapshot's own directory holds (zero
    /// for a remote layer, whose data is in the node cache).
    pub fn usage(&self, key: &str) -> Result<(u64, u64), SnapError> {
        let rec = self.need(key)?;
        if rec.remote.is_some() {
            return Ok((0, 0));
        }
        let dir = self.dir(rec.id).join("fs");
        disk_usage(&dir).map_err(io("measuring", &dir))
    }

    /// Every snapshot matching `filters` (any of them; all when empty).
    pub fn list(&self, filters: &[String]) -> Result<Vec<Info>, SnapError> {
        let filters: Vec<crate::filter::Filter> = filters
            .iter()
            .map(|f| crate::filter::Filter::parse(f))
            .collect::<Result<_, _>>()?;
        Ok(self
            .meta
            .all()?
            .into_iter()
            .map(|(name, rec)| Info { name, rec })
            .filter(|i| filters.is_empty() || filters.iter().any(|f| f.matches(i)))
            .collect())
    }

    /// `Cleanup`: removes directories no snapshot owns and unmounts images
    /// no snapshot uses.
    pub fn cleanup(&self) -> Result<(), SnapError> {
        // No inner layer is being unpacked meanwhile (its directory is
        // owned only once it is done).
        let _one = self.materializing.lock().unwrap_or_else(|e| e.into_inner());
        let (all, next_id) = self.meta.all_and_next_id()?;
        let ids: HashSet<u64> = all
            .into_iter()
            .filter(|(_, r)| r.remote.is_none())
            .map(|(_, r)| r.id)
            .collect();
        let snaps = self.root.join("snapshots");
        for e in std::fs::read_dir(&snaps)
            .map_err(io("reading", &snaps))?
            .flatten()
        {
            // Directories of Prepares in progress have ids from next_id up.
            let owned = e
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u64>().ok())
                .is_some_and(|id| ids.contains(&id) || id >= next_id);
            if !owned {
                tracing::info!(dir = %e.path().display(), "removing unowned snapshot directory");
                std::fs::remove_dir_all(e.path()).map_err(io("removing", &e.path()))?;
            }
        }
        self.release_unused(None);
        Ok(())
    }
}

/// Bytes (allocated blocks) and distinct inodes under `dir`.
fn disk_usage(dir: &Path) -> std::io::Result<(u64, u64)> {
    let mut seen = HashSet::new();
    let mut bytes = 0u64;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let md = std::fs::symlink_metadata(&d)?;
        if seen.insert((md.dev(), md.ino())) {
            bytes += md.blocks() * 512;
        }
        if md.is_dir() {
            for e in std::fs::read_dir(&d)? {
                stack.push(e?.path());
            }
        }
    }
    Ok((bytes, seen.len() as u64))
}
