//! The daemon's control API: HTTP/JSON on a UNIX socket (0600).
//!
//! HTTP/JSON rather than gRPC: `curl --unix-socket` reads it, Prometheus
//! scrapes `/metrics` from it (or from a TCP address, `--metrics`), and
//! the CLI needs no generated code to ask it. Routes:
//! - `GET /status`: snapshots, image mounts, the node cache (JSON);
//! - `GET /metrics`: Prometheus text format.
//!
//! Anything else is a 404 or 405 with a JSON error body.

use crate::meta::Kind;
use crate::metrics::{header, histogram};
use crate::Snapshotter;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use smr_node::cache::{Cache, CacheConfig, CacheStats};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

/// What the control API reads.
pub struct Control {
    /// The snapshotter (and its counters).
    pub sn: Arc<Snapshotter>,
    /// The node cache directory.
    pub cache_dir: PathBuf,
    /// The daemon's root.
    pub root: PathBuf,
    /// When the daemon started.
    pub started: Instant,
}

/// One lazily served image.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ImageStatus {
    /// `docker://host/repo@manifest`.
    pub image: String,
    /// The manifest digest.
    pub manifest: String,
    /// Whether its filesystem is mounted now.
    pub mounted: bool,
    /// Remote snapshots (layers) that stand for it.
    pub layers: usize,
    /// What its FUSE server reports: `lazy` (chunks and bytes fetched,
    /// reads) and `fetch` (store requests, latency histogram).
    pub server: Option<serde_json::Value>,
}

/// `GET /status`.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// The daemon's root.
    pub root: PathBuf,
    /// Seconds since the daemon started.
    pub uptime_seconds: u64,
    /// Snapshots by kind (`active`, `view`, `committed`, `remote`).
    pub snapshots: BTreeMap<&'static str, usize>,
    /// Images served lazily.
    pub images: Vec<ImageStatus>,
    /// The node cache (`null` if it cannot be read).
    pub cache: Option<CacheStats>,
    /// Images bound on mount points by `smr mount`.
    pub binds: Vec<crate::binds::Bind>,
}

fn error(code: StatusCode, msg: impl Into<String>) -> Response {
    (code, Json(serde_json::json!({ "error": msg.into() }))).into_response()
}

impl Control {
    fn image_status(&self, image: &str, manifest: &str) -> ImageStatus {
        ImageStatus {
            image: image.to_string(),
            manifest: manifest.to_string(),
            mounted: self.sn.images().is_mounted(manifest),
            layers: 0,
            server: self.sn.images().server_stats(manifest),
        }
    }

    /// The current status (blocking: reads the metadata store and cache).
    pub fn status(&self) -> Result<Status, crate::SnapError> {
        let all = self.sn.list(&[])?;
        let mut snapshots =
            BTreeMap::from([("active", 0), ("view", 0), ("committed", 0), ("remote", 0)]);
        let mut images: BTreeMap<String, ImageStatus> = BTreeMap::new();
        for i in &all {
            let k = match (&i.rec.remote, i.rec.kind) {
                (Some(_), _) => "remote",
                (None, Kind::Active) => "active",
                (None, Kind::View) => "view",
                (None, Kind::Committed) => "committed",
            };
            *snapshots.entry(k).or_default() += 1;
            if let Some(r) = &i.rec.remote {
                let e = images
                    .entry(r.manifest.clone())
                    .or_insert_with(|| self.image_status(&r.image, &r.manifest));
                e.layers += 1;
            }
        }
        let binds = self.sn.binds().live();
        for b in &binds {
            images
                .entry(b.manifest.clone())
                .or_insert_with(|| self.image_status(&b.image, &b.manifest));
        }
        let cache = Cache::open(CacheConfig::new(&self.cache_dir))
            .and_then(|c| c.stats())
            .map_err(|e| tracing::debug!(error = %e, "cache stats"))
            .ok();
        Ok(Status {
            root: self.root.clone(),
            uptime_seconds: self.started.elapsed().as_secs(),
            snapshots,
            images: images.into_values().collect(),
            cache,
            binds,
        })
    }

    /// Prometheus text of the status and the request metrics.
    pub fn metrics_text(&self, st: &Status) -> String {
        let mut o = String::new();
        let mut gauge = |name: &str, help: &str, kind: &str, samples: &[(String, u64)]| {
            header(&mut o, name, help, kind);
            for (labels, v) in samples {
                let _ = writeln!(o, "{name}{labels} {v}");
            }
        };
        let snaps: Vec<(String, u64)> = st
            .snapshots
            .iter()
            .map(|(k, v)| (format!("{{kind=\"{k}\"}}"), *v as u64))
            .collect();
        gauge("smr_snapshots", "Snapshots by kind.", "gauge", &snaps);
        let mounted = st.images.iter().filter(|i| i.mounted).count() as u64;
        gauge(
            "smr_image_mounts",
            "Lazily mounted images.",
            "gauge",
            &[(String::new(), mounted)],
        );
        if let Some(c) = &st.cache {
            let n = &c.counters;
            let rows: [(&str, &str, &str, u64); 10] = [
                (
                    "smr_cache_bytes",
                    "Bytes of chunks in the node cache.",
                    "gauge",
                    n.total_bytes,
                ),
                (
                    "smr_cache_entries",
                    "Chunks in the node cache.",
                    "gauge",
                    n.entries,
                ),
                (
                    "smr_cache_disk_hits_total",
                    "Chunks read from the disk tier.",
                    "counter",
                    n.hits,
                ),
                (
                    "smr_cache_memory_hits_total",
                    "Chunks read from a memory tier.",
                    "counter",
                    n.memory_hits,
                ),
                (
                    "smr_cache_misses_total",
                    "Chunks not in the cache at first look.",
                    "counter",
                    n.misses,
                ),
                (
                    "smr_fetches_total",
                    "Chunk fetches from stores.",
                    "counter",
                    n.fetches,
                ),
                (
                    "smr_fetched_bytes_total",
                    "Bytes fetched from stores.",
                    "counter",
                    n.fetched_bytes,
                ),
                (
                    "smr_fetch_errors_total",
                    "Fetches that failed.",
                    "counter",
                    n.fetch_errors,
                ),
                (
                    "smr_cache_evictions_total",
                    "Chunks evicted.",
                    "counter",
                    n.evictions,
                ),
                (
                    "smr_cache_corrupt_total",
                    "Cache entries found corrupt.",
                    "counter",
                    n.corrupt,
                ),
            ];
            for (name, help, kind, v) in rows {
                gauge(name, help, kind, &[(String::new(), v)]);
            }
        }
        write_image_metrics(&mut o, &st.images);
        self.sn.metrics().write_prometheus(&mut o);
        o
    }
}

/// Per-image counters from the images' FUSE servers.
fn write_image_metrics(o: &mut String, images: &[ImageStatus]) {
    let num = |v: &serde_json::Value, p: &str| v.pointer(p).and_then(|x| x.as_u64()).unwrap_or(0);
    let counters = [
        (
            "smr_image_bytes_fetched_total",
            "Stored bytes an image fetched.",
            "counter",
            "/lazy/bytes_fetched",
        ),
        (
            "smr_image_chunks_fetched_total",
            "Chunks an image fetched.",
            "counter",
            "/lazy/chunks_fetched",
        ),
        (
            "smr_image_reads_total",
            "Reads of an image's block file.",
            "counter",
            "/lazy/reads",
        ),
        (
            "smr_image_bytes_read_total",
            "Bytes the kernel read from an image's block file.",
            "counter",
            "/lazy/bytes_read",
        ),
        (
            "smr_image_bytes_prefetched_total",
            "Stored bytes fetched ahead of the reads (file map, profile).",
            "counter",
            "/lazy/bytes_prefetched",
        ),
        (
            "smr_image_prefetched_unread_bytes",
            "Stored bytes fetched ahead that no read has asked for yet.",
            "gauge",
            "/lazy/prefetched_unread_bytes",
        ),
        (
            "smr_image_read_errors_total",
            "Reads that failed.",
            "counter",
            "/lazy/read_errors",
        ),
        (
            "smr_store_requests_total",
            "Store requests of an image.",
            "counter",
            "/fetch/requests",
        ),
        (
            "smr_store_request_errors_total",
            "Store requests that failed.",
            "counter",
            "/fetch/failed_requests",
        ),
        (
            "smr_fetches_in_flight",
            "Store requests running now.",
            "gauge",
            "/fetch/in_flight",
        ),
    ];
    let served: Vec<(&ImageStatus, &serde_json::Value)> = images
        .iter()
        .filter_map(|i| i.server.as_ref().map(|s| (i, s)))
        .collect();
    for (name, help, kind, path) in counters {
        header(o, name, help, kind);
        for (i, s) in &served {
            let _ = writeln!(o, "{name}{{image=\"{}\"}} {}", i.manifest, num(s, path));
        }
    }
    let name = "smr_fetch_seconds";
    header(o, name, "Store request latency.", "histogram");
    for (i, s) in &served {
        let bounds = s["latency_bounds_ms"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let counts = s
            .pointer("/fetch/latency_buckets")
            .and_then(|x| x.as_array())
            .cloned()
            .unwrap_or_default();
        let buckets = bounds
            .iter()
            .zip(&counts)
            .map(|(b, n)| (b.as_f64().unwrap_or(0.0) / 1000.0, n.as_u64().unwrap_or(0)));
        let labels = format!("image=\"{}\"", i.manifest);
        let sum = num(s, "/fetch/latency_sum_us") as f64 / 1e6;
        histogram(o, name, &labels, buckets, num(s, "/fetch/requests"), sum);
    }
}

async fn blocking<T: Send + 'static>(
    c: &Arc<Control>,
    f: impl FnOnce(&Control) -> T + Send + 'static,
) -> Result<T, Response> {
    let c = c.clone();
    tokio::task::spawn_blocking(move || f(&c))
        .await
        .map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

async fn status(State(c): State<Arc<Control>>) -> Response {
    match blocking(&c, |c| c.status()).await {
        Ok(Ok(st)) => Json(st).into_response(),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Err(r) => r,
    }
}

async fn metrics(State(c): State<Arc<Control>>) -> Response {
    match blocking(&c, |c| c.status().map(|st| c.metrics_text(&st))).await {
        Ok(Ok(text)) => {
            ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
        }
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Err(r) => r,
    }
}

/// `POST /mounts` and `DELETE /mounts`.
#[derive(Debug, serde::Deserialize)]
pub struct MountRequest {
    /// The image (`docker://…`); not needed to unmount.
    #[serde(default)]
    pub image: String,
    /// The mount point.
    pub mountpoint: PathBuf,
    /// The pid of the process the bind is for: removed once it is gone
    /// (`smr run`, `smr serve-nbd`); none for `smr mount`.
    #[serde(default)]
    pub owner: Option<u32>,
}

fn bind_error(e: crate::binds::BindError) -> Response {
    use crate::binds::BindError as E;
    let code = match &e {
        E::BadRequest(_) => StatusCode::BAD_REQUEST,
        E::NotFound(_) => StatusCode::NOT_FOUND,
        E::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        E::Io(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    error(code, e.to_string())
}

async fn mount(State(c): State<Arc<Control>>, Json(r): Json<MountRequest>) -> Response {
    let out = blocking(&c, move |c| {
        c.sn.binds()
            .bind(c.sn.images(), &r.image, &r.mountpoint, r.owner)
    })
    .await;
    match out {
        Ok(Ok(b)) => Json(b).into_response(),
        Ok(Err(e)) => bind_error(e),
        Err(r) => r,
    }
}

async fn unmount(State(c): State<Arc<Control>>, Json(r): Json<MountRequest>) -> Response {
    match blocking(&c, move |c| c.sn.binds().unbind(&r.mountpoint)).await {
        Ok(Ok(b)) => Json(b).into_response(),
        Ok(Err(e)) => bind_error(e),
        Err(r) => r,
    }
}

/// `POST /images`: an image containerd is about to pull.
#[derive(Debug, serde::Deserialize)]
pub struct ImageRequest {
    /// The image pinned by its manifest, `docker://host/repo@sha256:…`.
    pub image: String,
}

/// Starts mounting an image in the background (`smr pull` sends it once
/// it knows the manifest, before containerd records the pull), so that
/// the snapshotter's `Prepare` of its layers finds the artifact accepted or
/// on its way. Answers `202 Accepted` at once; an image that cannot be
/// mounted is refused for its layers as it would be there.
async fn expect_image(State(c): State<Arc<Control>>, Json(r): Json<ImageRequest>) -> Response {
    let manifest = match smr_registry::reference::ImageRef::parse(&r.image) {
        Ok(rf) if r.image.starts_with("docker://") => rf.digest,
        _ => None,
    };
    let Some(manifest) = manifest else {
        return error(
            StatusCode::BAD_REQUEST,
            format!("{:?}: not docker://HOST/REPO@sha256:DIGEST", r.image),
        );
    };
    let images = c.sn.images().clone();
    let image = r.image.clone();
    // Not awaited: acceptance takes a few registry round trips, and the
    // mount goes on in a thread of its own after it.
    drop(tokio::task::spawn_blocking(move || {
        if let Err(why) = images.ensure_accepted(&image, &manifest) {
            tracing::info!(
                image,
                reason = why,
                "an expected image is not served lazily"
            );
        }
    }));
    (
        StatusCode::ACCEPTED,
        Json(serde_json::json!({ "image": r.image })),
    )
        .into_response()
}

/// The control API's routes.
pub fn router(c: Arc<Control>) -> Router {
    Router::new()
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .route("/mounts", axum::routing::post(mount).delete(unmount))
        .route("/images", axum::routing::post(expect_image))
        .fallback(|| async {
            error(
                StatusCode::NOT_FOUND,
                "no such route; try /status or /metrics",
            )
        })
        .with_state(c)
}
