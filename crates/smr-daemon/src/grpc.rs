//! containerd's snapshots gRPC service over [`Snapshotter`]. Each call runs
//! on the blocking pool (metadata transactions, directory work and image
//! mounts block); errors map to the gRPC codes containerd turns back into
//! its `errdefs` (NotFound, AlreadyExists, FailedPrecondition, ...).

use crate::meta::Kind;
use crate::proto::snapshots_server::Snapshots;
use crate::snapshotter::{Info, MountSpec, Snapshotter};
use crate::SnapError;
use containerd_client::services::v1::snapshots as pb;
use containerd_client::types::Mount;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// The service.
#[derive(Clone)]
pub struct SnapshotService {
    sn: Arc<Snapshotter>,
}

impl SnapshotService {
    /// Serves `sn`.
    pub fn new(sn: Arc<Snapshotter>) -> Self {
        SnapshotService { sn }
    }

    async fn call<T: Send + 'static>(
        &self,
        op: &'static str,
        f: impl FnOnce(&Snapshotter) -> Result<T, SnapError> + Send + 'static,
    ) -> Result<T, Status> {
        let sn = self.sn.clone();
        let t = std::time::Instant::now();
        let out = tokio::task::spawn_blocking(move || f(&sn))
            .await
            .map_err(|e| Status::internal(format!("{op}: {e}")))?;
        let code = match &out {
            Ok(_) => "Ok",
            Err(SnapError::NotFound(_)) => "NotFound",
            Err(SnapError::AlreadyExists(_)) => "AlreadyExists",
            Err(SnapError::FailedPrecondition(_)) => "FailedPrecondition",
            Err(SnapError::InvalidArgument(_)) => "InvalidArgument",
            Err(SnapError::Unavailable(_)) => "Unavailable",
            Err(_) => "Internal",
        };
        self.sn.metrics().observe(op, code, t.elapsed());
        tracing::debug!(op, code, took = ?t.elapsed(), "snapshots call");
        out.map_err(|e| {
            match &e {
                SnapError::AlreadyExists(_) | SnapError::NotFound(_) => {
                    tracing::debug!(op, error = %e)
                }
                _ => tracing::warn!(op, error = %e),
            }
            Status::from(e)
        })
    }
}

impl From<SnapError> for Status {
    fn from(e: SnapError) -> Status {
        let msg = e.to_string();
        match e {
            SnapError::NotFound(_) => Status::not_found(msg),
            SnapError::AlreadyExists(_) => Status::already_exists(msg),
            SnapError::FailedPrecondition(_) => Status::failed_precondition(msg),
            SnapError::InvalidArgument(_) => Status::invalid_argument(msg),
            SnapError::Unavailable(_) => Status::unavailable(msg),
            SnapError::Internal(_) | SnapError::Meta(_) => Status::internal(msg),
        }
    }
}

fn mounts(v: Vec<MountSpec>) -> Vec<Mount> {
    v.into_iter()
        .map(|m| Mount {
            r#type: m.kind,
            source: m.source,
            options: m.options,
            ..Default::default()
        })
        .collect()
}

fn timestamp(nanos: u128) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: i64::try_from(nanos / 1_000_000_000).unwrap_or(i64::MAX),
        nanos: i32::try_from(nanos % 1_000_000_000).unwrap_or(0),
    }
}

fn info(i: Info) -> pb::Info {
    let kind = match i.rec.kind {
        Kind::View => pb::Kind::View,
        Kind::Active => pb::Kind::Active,
        Kind::Committed => pb::Kind::Committed,
    };
    pb::Info {
        name: i.name,
        parent: i.rec.parent.unwrap_or_default(),
        kind: kind as i32,
        created_at: Some(timestamp(i.rec.created)),
        updated_at: Some(timestamp(i.rec.updated)),
        labels: i.rec.labels.into_iter().collect(),
    }
}

fn labels(m: HashMap<String, String>) -> BTreeMap<String, String> {
    m.into_iter().collect()
}

type ListStream =
    futures::stream::Iter<std::vec::IntoIter<Result<pb::ListSnapshotsResponse, Status>>>;

/// Snapshots per `List` response message.
const LIST_BATCH: usize = 100;

#[tonic::async_trait]
impl Snapshots for SnapshotService {
    async fn prepare(
        &self,
        r: Request<pb::PrepareSnapshotRequest>,
    ) -> Result<Response<pb::PrepareSnapshotResponse>, Status> {
        let r = r.into_inner();
        let m = self
            .call("prepare", move |s| {
                s.prepare(&r.key, &r.parent, labels(r.labels), Kind::Active)
            })
            .await?;
        Ok(Response::new(pb::PrepareSnapshotResponse {
            mounts: mounts(m),
        }))
    }

    async fn view(
        &self,
        r: Request<pb::ViewSnapshotRequest>,
    ) -> Result<Response<pb::ViewSnapshotResponse>, Status> {
        let r = r.into_inner();
        let m = self
            .call("view", move |s| {
                s.prepare(&r.key, &r.parent, labels(r.labels), Kind::View)
            })
            .await?;
        Ok(Response::new(pb::ViewSnapshotResponse {
            mounts: mounts(m),
        }))
    }

    async fn mounts(
        &self,
        r: Request<pb::MountsRequest>,
    ) -> Result<Response<pb::MountsResponse>, Status> {
        let r = r.into_inner();
        let m = self.call("mounts", move |s| s.mounts(&r.key)).await?;
        Ok(Response::new(pb::MountsResponse { mounts: mounts(m) }))
    }

    async fn commit(&self, r: Request<pb::CommitSnapshotRequest>) -> Result<Response<()>, Status> {
        let r = r.into_inner();
        self.call("commit", move |s| {
            s.commit(&r.name, &r.key, labels(r.labels))
        })
        .await?;
        Ok(Response::new(()))
    }

    async fn remove(&self, r: Request<pb::RemoveSnapshotRequest>) -> Result<Response<()>, Status> {
        let r = r.into_inner();
        self.call("remove", move |s| s.remove(&r.key)).await?;
        Ok(Response::new(()))
    }

    async fn stat(
        &self,
        r: Request<pb::StatSnapshotRequest>,
    ) -> Result<Response<pb::StatSnapshotResponse>, Status> {
        let r = r.into_inner();
        let i = self.call("stat", move |s| s.stat(&r.key)).await?;
        Ok(Response::new(pb::StatSnapshotResponse {
            info: Some(info(i)),
        }))
    }

    async fn update(
        &self,
        r: Request<pb::UpdateSnapshotRequest>,
    ) -> Result<Response<pb::UpdateSnapshotResponse>, Status> {
        let r = r.into_inner();
        let Some(i) = r.info else {
            return Err(Status::invalid_argument("update without snapshot info"));
        };
        let mask = r.update_mask.map(|m| m.paths).unwrap_or_default();
        let i = self
            .call("update", move |s| {
                s.update(&i.name, labels(i.labels), &mask)
            })
            .await?;
        Ok(Response::new(pb::UpdateSnapshotResponse {
            info: Some(info(i)),
        }))
    }

    type ListStream = ListStream;

    async fn list(
        &self,
        r: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<Self::ListStream>, Status> {
        let r = r.into_inner();
        let all = self.call("list", move |s| s.list(&r.filters)).await?;
        let mut batches = Vec::new();
        let mut all = all.into_iter().map(info).peekable();
        while all.peek().is_some() {
            let info: Vec<pb::Info> = all.by_ref().take(LIST_BATCH).collect();
            batches.push(Ok(pb::ListSnapshotsResponse { info }));
        }
        Ok(Response::new(futures::stream::iter(batches)))
    }

    async fn usage(
        &self,
        r: Request<pb::UsageRequest>,
    ) -> Result<Response<pb::UsageResponse>, Status> {
        let r = r.into_inner();
        let (size, inodes) = self.call("usage", move |s| s.usage(&r.key)).await?;
        Ok(Response::new(pb::UsageResponse {
            size: i64::try_from(size).unwrap_or(i64::MAX),
            inodes: i64::try_from(inodes).unwrap_or(i64::MAX),
        }))
    }

    async fn cleanup(&self, _r: Request<pb::CleanupRequest>) -> Result<Response<()>, Status> {
        self.call("cleanup", |s| s.cleanup()).await?;
        Ok(Response::new(()))
    }
}
