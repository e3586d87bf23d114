//! A read-write chunk store in an S3-compatible bucket, through
//! `object_store`: `s3://bucket/prefix` holds the local store's layouts
//! under `prefix/` (`crate::packed`): packs and indexes, written by
//! [`packs::S3Packed`], and chunk objects `chunks/<2 hex>/<64 hex>`, which
//! this type's `put` writes one by one.
//!
//! Credentials, region and endpoint come from the environment as
//! `AmazonS3Builder::from_env` reads it (`AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION`,
//! `AWS_ENDPOINT_URL` / `AWS_ENDPOINT`, `AWS_ALLOW_HTTP`, ...), and can be
//! overridden with [`S3StoreBuilder`].
//!
//! A store's writers and its garbage collector exclude each other through
//! lease objects under `leases/` ([`lease`]): the first `put` takes a
//! writer's lease, held until the store is dropped.
//!
//! `put` asks with a HEAD first (most chunks of a new image already exist)
//! and then writes with `If-None-Match: *`, so concurrent writers never
//! overwrite each other. Stores without conditional writes can set
//! `AWS_CONDITIONAL_PUT=disabled`: the PUT then overwrites, which is
//! harmless for content-addressed chunks.
//!
//! `object_store`'s own retries are switched off: the [`RemoteOptions`]
//! policy applies, as for every remote store. So that it can see statuses,
//! a wrapping HTTP connector (`s3/status.rs`) reports retryable HTTP
//! statuses as typed transport errors.

pub mod lease;
pub mod packs;
mod status;

use crate::error::{Op, StoreError, TransportKind};
use crate::location::redact;
use crate::options::RemoteOptions;
use crate::retry::Remote;
use crate::runtime::{block_on, cut, read_ranges, RangeRead};
use crate::{ByteRange, ChunkStore, ObjectName, PutOutcome, Result, Target};
use object_store::aws::{AmazonS3, AmazonS3Builder, AmazonS3ConfigKey};
use object_store::client::{ClientConfigKey, HttpError, HttpErrorKind};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, RetryConfig};
use smr_format::ChunkId;
use std::sync::Arc;
use std::time::Duration;

/// A chunk store in an S3-compatible bucket. See the module documentation.
#[derive(Clone)]
pub struct S3Store {
    inner: Arc<Inner>,
}

/// Shows the location and options, never the credentials.
impl std::fmt::Debug for S3Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Store")
            .field("store", &self.inner.remote.store())
            .field("conditional_put", &self.inner.conditional_put)
            .field("options", self.inner.remote.options())
            .finish()
    }
}

struct Inner {
    s3: AmazonS3,
    /// The key prefix (no leading or trailing `/`; may be empty).
    prefix: Path,
    /// Whether writes use `If-None-Match: *`.
    conditional_put: bool,
    remote: Remote,
    /// The writer's lease, taken by the first `put`.
    writer: std::sync::Mutex<Option<lease::Lease>>,
}

/// Settings of an [`S3Store`] beyond its location; starts from the
/// environment (see the module documentation).
pub struct S3StoreBuilder {
    store: String,
    bucket: String,
    prefix: Path,
    s3: AmazonS3Builder,
    options: RemoteOptions,
}

impl S3Store {
    /// Opens `s3://bucket[/prefix]` with settings from the environment.
    /// Nothing is requested until the first operation.
    pub fn open(location: &str, options: RemoteOptions) -> Result<Self> {
        Self::builder(location)?.options(options).build()
    }

    /// A builder for `s3://bucket[/prefix]`, starting from the environment.
    pub fn builder(location: &str) -> Result<S3StoreBuilder> {
        let invalid = |reason: &str| StoreError::InvalidLocation {
            location: redact(location),
            reason: reason.to_string(),
        };
        let rest = location
            .split_once("://")
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("s3"))
            .map(|(_, rest)| rest)
            .ok_or_else(|| invalid("expected s3://bucket[/prefix]"))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.contains('@') {
            return Err(invalid(
                "credentials in s3:// locations are not supported; use AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
            ));
        }
        if bucket.is_empty() || bucket.contains(['?', '#']) || prefix.contains(['?', '#']) {
            return Err(invalid("expected s3://bucket[/prefix]"));
        }
        let prefix = prefix.trim_matches('/');
        let store = match prefix {
            "" => format!("s3://{bucket}"),
            p => format!("s3://{bucket}/{p}"),
        };
        let prefix = Path::parse(prefix).map_err(|e| invalid(&e.to_string()))?;
        Ok(S3StoreBuilder {
            store,
            bucket: bucket.to_string(),
            prefix,
            s3: AmazonS3Builder::from_env(),
            options: RemoteOptions::default(),
        })
    }
}

/// Shows the location and options, never the credentials.
impl std::fmt::Debug for S3StoreBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3StoreBuilder")
            .field("store", &self.store)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl S3StoreBuilder {
    /// Timeouts, deadline, retries and concurrency.
    pub fn options(mut self, options: RemoteOptions) -> Self {
        self.options = options;
        self
    }

    /// The S3 endpoint, e.g. `http://127.0.0.1:9000` (path-style requests).
    pub fn endpoint(mut self, endpoint: &str) -> Self {
        self.s3 = self.s3.with_endpoint(endpoint);
        self
    }

    /// Whether plain `http://` endpoints are allowed.
    pub fn allow_http(mut self, allow: bool) -> Self {
        self.s3 = self.s3.with_allow_http(allow);
        self
    }

    /// The region (default `us-east-1`).
    pub fn region(mut self, region: &str) -> Self {
        self.s3 = self.s3.with_region(region);
        self
    }

    /// Static credentials instead of the environment's.
    pub fn credentials(mut self, access_key_id: &str, secret_access_key: &str) -> Self {
        self.s3 = self
            .s3
            .with_access_key_id(access_key_id)
            .with_secret_access_key(secret_access_key);
        self
    }

    /// Builds the store (no request is made).
    pub fn build(self) -> Result<S3Store> {
        let o = &self.options;
        let ms = |d: Duration| format!("{}ms", d.as_millis().max(1));
        let conditional_put = !matches!(
            self.s3.get_config_value(&AmazonS3ConfigKey::ConditionalPut).as_deref(),
            Some(v) if v.trim().eq_ignore_ascii_case("disabled")
        );
        let client = |key| AmazonS3ConfigKey::Client(key);
        let s3 = self
            .s3
            .with_bucket_name(&self.bucket)
            .with_config(
                client(ClientConfigKey::ConnectTimeout),
                ms(o.connect_timeout),
            )
            .with_config(client(ClientConfigKey::ReadTimeout), ms(o.read_timeout))
            .with_config(client(ClientConfigKey::Timeout), ms(o.deadline))
            .with_retry(RetryConfig {
                max_retries: 0,
                retry_timeout: o.deadline,
                ..RetryConfig::default()
            })
            .with_http_connector(status::StatusConnector)
            .build()
            .map_err(|e| StoreError::Client {
                store: self.store.clone(),
                cause: e.into(),
            })?;
        Ok(S3Store {
            inner: Arc::new(Inner {
                s3,
                prefix: self.prefix,
                conditional_put,
                remote: Remote::new(self.store, self.options),
                writer: std::sync::Mutex::new(None),
            }),
        })
    }
}

impl Inner {
    fn store(&self) -> String {
        self.remote.store().to_string()
    }

    fn leases(&self) -> lease::Leases {
        lease::Leases {
            s3: self.s3.clone(),
            prefix: self.prefix.clone(),
            store: self.store(),
            conditional_put: self.conditional_put,
        }
    }

    fn key(&self, object: &ObjectName) -> Path {
        object
            .as_str()
            .split('/')
            .fold(self.prefix.clone(), |path, part| path.join(part))
    }

    /// One GET of `range` of `object`.
    async fn read_range(&self, object: &ObjectName, range: ByteRange) -> Result<Vec<u8>> {
        let what = Target::of(object, range);
        let limit = self.remote.options().max_object_bytes;
        let too_large = |size| StoreError::TooLarge {
            store: self.store(),
            what: what.clone(),
            size,
            limit,
        };
        let key = self.key(object);
        let (bytes, expected) = match range.end() {
            Some(end) => {
                let len = end - range.offset;
                if len > limit {
                    return Err(too_large(len));
                }
                let bytes = self
                    .s3
                    .get_range(&key, range.offset..end)
                    .await
                    .map_err(|e| self.error(Op::Get, what.clone(), e))?;
                (bytes, len)
            }
            None => {
                let got = self
                    .s3
                    .get(&key)
                    .await
                    .map_err(|e| self.error(Op::Get, what.clone(), e))?;
                let size = got.meta.size;
                if size > limit {
                    return Err(too_large(size));
                }
                let bytes = got
                    .bytes()
                    .await
                    .map_err(|e| self.error(Op::Get, what.clone(), e))?;
                if bytes.len() as u64 != size {
                    return Err(StoreError::LengthMismatch {
                        store: self.store(),
                        what,
                        expected: size,
                        got: bytes.len() as u64,
                    });
                }
                let got = bytes.len() as u64;
                let bytes = cut(Vec::from(bytes), range)
                    .ok_or_else(|| StoreError::past_the_end(self.store(), what.clone(), got))?;
                (bytes.into(), size.saturating_sub(range.offset))
            }
        };
        // A range is answered up to the object's end: fewer bytes than
        // asked means the range ends past it (not a transfer cut short,
        // which the client reports as an error).
        if bytes.len() as u64 != expected {
            return Err(StoreError::past_the_end(
                self.store(),
                what,
                bytes.len() as u64,
            ));
        }
        Ok(Vec::from(bytes))
    }

    async fn exists_once(&self, op: Op, id: ChunkId) -> Result<bool> {
        match self.s3.head(&self.key(&ObjectName::of_chunk(&id))).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.error(op, id.into(), e)),
        }
    }

    async fn put_once(&self, id: ChunkId, payload: PutPayload) -> Result<PutOutcome> {
        if self.exists_once(Op::Put, id).await? {
            return Ok(PutOutcome::Existed);
        }
        let mode = match self.conditional_put {
            true => PutMode::Create,
            false => PutMode::Overwrite,
        };
        match self
            .s3
            .put_opts(
                &self.key(&ObjectName::of_chunk(&id)),
                payload,
                PutOptions::from(mode),
            )
            .await
        {
            Ok(_) => Ok(PutOutcome::Written),
            // Someone wrote it since the HEAD (or a retried PUT had landed).
            Err(
                object_store::Error::AlreadyExists { .. }
                | object_store::Error::Precondition { .. },
            ) => Ok(PutOutcome::Existed),
            Err(e) => Err(self.error(Op::Put, id.into(), e)),
        }
    }

    /// Maps an `object_store` error of `op` on `what`.
    fn error(&self, op: Op, what: Target, e: object_store::Error) -> StoreError {
        map_error(self.store(), op, what, e)
    }
}

/// Every object under `prefix`.
pub(crate) fn list_objects(
    s3: &AmazonS3,
    prefix: Path,
) -> object_store::Result<Vec<object_store::ObjectMeta>> {
    let s3 = s3.clone();
    block_on(async move {
        use futures::StreamExt;
        s3.list(Some(&prefix))
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect()
    })
}

/// Maps an `object_store` error of `op` on `what` in `store`.
pub(crate) fn map_error(store: String, op: Op, what: Target, e: object_store::Error) -> StoreError {
    match e {
        // A missing bucket is a broken location, not a missing chunk.
        object_store::Error::NotFound { source, .. }
            if status::s3_code(&*source).as_deref() == Some("NoSuchBucket") =>
        {
            StoreError::Remote {
                store,
                what,
                op,
                cause: "the bucket does not exist (NoSuchBucket)".into(),
            }
        }
        object_store::Error::NotFound { .. } => StoreError::Missing { what, store },
        object_store::Error::PermissionDenied { source, .. } => StoreError::Denied {
            store,
            what,
            op,
            reason: status::s3_reason(&*source, "HTTP 403 Forbidden"),
        },
        object_store::Error::Unauthenticated { source, .. } => StoreError::Denied {
            store,
            what,
            op,
            reason: status::s3_reason(&*source, "HTTP 401 Unauthorized"),
        },
        e => match classify(&e) {
            Class::Status(s) => StoreError::Status {
                store,
                what,
                op,
                status: s.status,
                retry_after: s.retry_after,
            },
            Class::Transport(kind) => StoreError::Transport {
                store,
                what,
                op,
                kind,
                cause: e.into(),
            },
            Class::Other => StoreError::Remote {
                store,
                what,
                op,
                cause: e.into(),
            },
        },
    }
}

enum Class {
    Status(status::RetryableStatus),
    Transport(TransportKind),
    Other,
}

/// Finds what failed in an `object_store` error's chain: a retryable
/// status (from [`status::StatusConnector`]) or a transport error.
fn classify(e: &object_store::Error) -> Class {
    let mut class = Class::Other;
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(s) = err.downcast_ref::<status::RetryableStatus>() {
            return Class::Status(*s);
        }
        if let Some(h) = err.downcast_ref::<HttpError>() {
            class = Class::Transport(match h.kind() {
                HttpErrorKind::Connect => TransportKind::Connect,
                HttpErrorKind::Timeout => TransportKind::Timeout,
                HttpErrorKind::Request | HttpErrorKind::Interrupted => TransportKind::Interrupted,
                _ => TransportKind::Other,
            });
        }
        cur = err.source();
    }
    class
}

impl S3Store {
    /// Takes this store's writer lease unless it holds it already (errors
    /// are about `what`, the write that needed it).
    pub(crate) fn writer_lease(&self, what: Target) -> Result<()> {
        let mut writer = self
            .inner
            .writer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if writer.is_none() {
            let lease = lease::Lease::writer(&self.inner.leases()).map_err(|e| e.about(what))?;
            *writer = Some(lease);
        }
        Ok(())
    }

    /// Writes `object` (replacing it), under the retry policy.
    pub(crate) fn put_object(&self, object: &ObjectName, bytes: Vec<u8>) -> Result<()> {
        let (inner, object) = (self.inner.clone(), object.clone());
        let payload = PutPayload::from(bytes);
        block_on(async move {
            let what = Target::of(&object, ByteRange::WHOLE);
            let put = || async {
                let key = inner.key(&object);
                match inner.s3.put(&key, payload.clone()).await {
                    Ok(_) => Ok(()),
                    Err(e) => Err(inner.error(Op::Put, what.clone(), e)),
                }
            };
            inner.remote.run(Op::Put, what.clone(), put).await
        })
    }

    /// The objects under `dir/` (their names relative to the prefix).
    pub(crate) fn list_dir(
        &self,
        dir: &str,
    ) -> Result<Vec<(ObjectName, object_store::ObjectMeta)>> {
        let inner = &self.inner;
        let listed = list_objects(&inner.s3, inner.key(&ObjectName::new(dir))).map_err(|e| {
            let what = Target::of(&ObjectName::new(format!("{dir}/")), ByteRange::WHOLE);
            inner.error(Op::Get, what, e)
        })?;
        Ok(listed
            .into_iter()
            .filter_map(|m| {
                let name = m.location.filename()?.to_string();
                Some((ObjectName::new(format!("{dir}/{name}")), m))
            })
            .collect())
    }

    /// Deletes `object` (under the collector's lease); gone already is fine.
    pub(crate) fn delete_object(&self, object: &ObjectName) -> Result<()> {
        let (inner, object) = (self.inner.clone(), object.clone());
        block_on(async move {
            let what = Target::of(&object, ByteRange::WHOLE);
            let delete = || async {
                match inner.s3.delete(&inner.key(&object)).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                    Err(e) => Err(inner.error(Op::Put, what.clone(), e)),
                }
            };
            inner.remote.run(Op::Put, what.clone(), delete).await
        })
    }

    /// Takes the garbage collector's lease: fails with
    /// [`StoreError::Busy`] while a writer or another collection runs
    /// (see [`lease`]). Hold it for the whole collection.
    pub fn begin_collection(&self) -> Result<lease::Lease> {
        lease::Lease::collector(&self.inner.leases())
    }

    /// Every chunk object of the store (other keys skipped).
    pub fn chunk_objects(&self) -> Result<Vec<crate::gc::ChunkFile>> {
        let mut out: Vec<crate::gc::ChunkFile> = self
            .list_dir("chunks")?
            .into_iter()
            .filter_map(|(_, m)| {
                let id = m.location.filename()?.parse::<ChunkId>().ok()?;
                Some(crate::gc::ChunkFile {
                    id,
                    len: m.size,
                    modified: std::time::SystemTime::from(m.last_modified),
                })
            })
            .collect();
        out.sort_by_key(|f| f.id);
        Ok(out)
    }

    /// Deletes chunk `id` (under the collector's lease).
    pub fn delete_chunk(&self, id: &ChunkId) -> Result<()> {
        self.delete_object(&ObjectName::of_chunk(id))
    }
}

impl RangeRead for Inner {
    fn remote(&self) -> &Remote {
        &self.remote
    }

    fn read_once(
        &self,
        object: &ObjectName,
        range: ByteRange,
    ) -> impl std::future::Future<Output = Result<Vec<u8>>> + Send {
        self.read_range(object, range)
    }
}

impl ChunkStore for S3Store {
    fn describe(&self) -> String {
        self.inner.store()
    }

    fn read_ranges(&self, object: &ObjectName, ranges: &[ByteRange]) -> Result<Vec<Vec<u8>>> {
        read_ranges(&self.inner, object, ranges)
    }

    fn exists(&self, id: &ChunkId) -> Result<bool> {
        let (inner, id) = (self.inner.clone(), *id);
        block_on(async move {
            let exists = || inner.exists_once(Op::Exists, id);
            inner.remote.run(Op::Exists, id.into(), exists).await
        })
    }

    fn put(&self, id: &ChunkId, data: &[u8]) -> Result<PutOutcome> {
        self.writer_lease(Target::Chunk(*id))?;
        let (inner, id) = (self.inner.clone(), *id);
        let payload = PutPayload::from(data.to_vec());
        block_on(async move {
            let put = || inner.put_once(id, payload.clone());
            inner.remote.run(Op::Put, id.into(), put).await
        })
    }
}

#[cfg(test)]
mod tests;
