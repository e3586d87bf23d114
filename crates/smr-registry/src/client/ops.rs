//! The registry operations, async, each wrapped in the retry loop. The
//! sync [`super::Repository`] runs them on the shared network runtime.

use super::classify::{from_oci, from_status, retry_after, Ctx};
use super::core::Core;
use crate::error::{RegistryError, Result};
use bytes::Bytes;
use futures::StreamExt;
use oci_client::RegistryOperation::{Pull, Push};
use reqwest::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use reqwest::{Method, StatusCode};
use sha2::{Digest as _, Sha256};
use smr_image::media_types::{DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST};
use smr_image::source::digest::sha256_digest;

/// The manifest media types we ask for (and accept).
pub(crate) const MANIFEST_TYPES: &[&str] = &[OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST];

/// Largest manifest, index or referrers list read: 4 MiB, the limit
/// containerd applies to manifests and the size the distribution spec
/// asks registries to accept at least.
pub const MANIFEST_LIMIT: u64 = 4 << 20;

/// Tags asked for per page of `tags/list`.
const TAGS_PAGE: usize = 1000;

impl Core {
    /// `HEAD` of a blob: its size, or `None` if absent.
    pub async fn blob_size(&self, repo: &str, digest: &str) -> Result<Option<u64>> {
        let ctx = self.ctx(repo, format!("HEAD blob {digest}"));
        check_digest(digest, &ctx)?;
        let rest = format!("blobs/{digest}");
        self.retry(repo, Pull, &ctx, || async {
            let resp = self
                .raw(Method::HEAD, repo, &rest, None, Pull, &ctx)
                .await?;
            match resp.status() {
                StatusCode::OK => {
                    // Not `content_length()`: for HEAD that is the (empty)
                    // body's length.
                    let len = resp
                        .headers()
                        .get(CONTENT_LENGTH)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<u64>().ok())
                        .ok_or_else(|| ctx.protocol("no Content-Length in the answer"))?;
                    Ok(Some(len))
                }
                StatusCode::NOT_FOUND => Ok(None),
                s => Err(from_status(s, retry_after(resp.headers()), b"", &ctx)),
            }
        })
        .await
    }

    /// The whole blob, verified against its digest. The body is read up to
    /// `limit` bytes: a longer one fails while it is read (and is not
    /// retried).
    pub async fn get_blob(&self, repo: &str, digest: &str, limit: u64) -> Result<Vec<u8>> {
        let ctx = self.ctx(repo, format!("GET blob {digest}"));
        check_digest(digest, &ctx)?;
        let rest = format!("blobs/{digest}");
        self.retry(repo, Pull, &ctx, || async {
            let resp = self.raw(Method::GET, repo, &rest, None, Pull, &ctx).await?;
            let status = resp.status();
            if status != StatusCode::OK {
                let ra = retry_after(resp.headers());
                let body = read_capped(resp, &ctx, ERROR_BODY_LIMIT)
                    .await
                    .unwrap_or_default();
                return Err(from_status(status, ra, &body, &ctx));
            }
            let body = read_capped(resp, &ctx, limit).await?;
            let actual = sha256_digest(&body);
            if actual != digest {
                return Err(ctx.mismatch(actual));
            }
            Ok(body)
        })
        .await
    }

    /// `len` bytes of a blob from `offset` (HTTP Range; a server that
    /// ignores the range gets the rest skipped); `progress`, if given, sees
    /// the bytes received so far after each piece that arrives (from empty
    /// again when the request is retried).
    pub async fn get_blob_range(
        &self,
        repo: &str,
        digest: &str,
        offset: u64,
        len: u64,
        progress: Option<smr_store::Progress>,
    ) -> Result<Vec<u8>> {
        let ctx = self.ctx(repo, format!("GET blob {digest} bytes {offset}+{len}"));
        check_digest(digest, &ctx)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        if offset.checked_add(len).is_none() {
            return Err(ctx.protocol("range end overflows"));
        }
        let cap = usize::try_from(len).map_err(|_| ctx.protocol("range too large"))?;
        // Our own request, not oci-client's pull_blob_stream_partial: that
        // one first asks `GET /v2/` for auth on every call, doubling the
        // round trips of a lazy read. Credentials come from the cache the
        // retry loop refreshes after a 401.
        let rest = format!("blobs/{digest}");
        let range = format!("bytes={offset}-{}", offset + len - 1);
        self.retry(repo, Pull, &ctx, || async {
            let mut headers = reqwest::header::HeaderMap::new();
            headers.insert(
                reqwest::header::RANGE,
                HeaderValue::from_str(&range).map_err(|_| ctx.protocol("bad range header"))?,
            );
            let resp = self
                .raw_with(Method::GET, repo, &rest, headers, Pull, &ctx)
                .await?;
            let mut skip = match resp.status() {
                StatusCode::PARTIAL_CONTENT => 0u64,
                StatusCode::OK => {
                    tracing::debug!(repo = %ctx.repo, %digest, "server ignored Range");
                    offset
                }
                s => return Err(from_status(s, retry_after(resp.headers()), b"", &ctx)),
            };
            let mut stream = resp.bytes_stream();
            let mut out = Vec::with_capacity(cap.min(16 << 20));
            while out.len() < cap {
                let Some(chunk) = stream.next().await else {
                    break;
                };
                let chunk = chunk.map_err(|e| super::classify::from_reqwest(&e, &ctx))?;
                let mut c = &chunk[..];
                let drop_n = skip.min(c.len() as u64) as usize;
                c = &c[drop_n..];
                skip -= drop_n as u64;
                let want = cap - out.len();
                out.extend_from_slice(&c[..c.len().min(want)]);
                if let (Some(p), false) = (&progress, c.is_empty()) {
                    p(&out);
                }
            }
            if out.len() != cap {
                return Err(ctx.protocol(format!(
                    "short read: got {} of {len} bytes (range past the end of the blob?)",
                    out.len()
                )));
            }
            Ok(out)
        })
        .await
    }

    /// Uploads `data` as blob `digest` unless present; mounts it from
    /// repository `from` of the same registry when that works. Returns
    /// whether bytes were uploaded.
    pub async fn push_blob(
        &self,
        repo: &str,
        digest: &str,
        data: Bytes,
        from: Option<&str>,
    ) -> Result<bool> {
        let ctx = self.ctx(repo, format!("upload of blob {digest}"));
        check_digest(digest, &ctx)?;
        if let Some(size) = self.blob_size(repo, digest).await? {
            if size != data.len() as u64 {
                tracing::warn!(repo = %ctx.repo, %digest, size, len = data.len(), "blob present with another size");
            }
            tracing::debug!(repo = %ctx.repo, %digest, "blob already present");
            return Ok(false);
        }
        let actual = format!("sha256:{}", hex::encode(Sha256::digest(&data)));
        if actual != digest {
            return Err(ctx.mismatch(actual));
        }
        if let Some(from) = from.filter(|f| *f != repo) {
            if self.mount_blob(repo, digest, from).await? {
                return Ok(false);
            }
        }
        if data.is_empty() {
            return Err(ctx.protocol("cannot upload an empty blob"));
        }
        let r = self.reference(repo, "latest");
        let chunked = data.len() >= self.opts.chunked_upload_threshold;
        self.retry(repo, Push, &ctx, || async {
            if chunked {
                let body = data.clone();
                let stream = futures::stream::once(async move { Ok(body) });
                let resp = self
                    .oci()
                    .await?
                    .push_blob_stream_chunked(&r, stream)
                    .await
                    .map_err(|e| from_oci(e, &ctx))?;
                if resp.blob_digest != digest {
                    return Err(ctx.mismatch(resp.blob_digest));
                }
            } else {
                self.oci()
                    .await?
                    .push_blob(&r, data.clone(), digest)
                    .await
                    .map_err(|e| from_oci(e, &ctx))?;
            }
            Ok(())
        })
        .await?;
        tracing::debug!(repo = %ctx.repo, %digest, bytes = data.len(), chunked, "blob uploaded");
        Ok(true)
    }

    /// Cross-repository mount of `digest` from `from`; `false` when the
    /// registry would not (then it answered 202 and we upload instead).
    pub async fn mount_blob(&self, repo: &str, digest: &str, from: &str) -> Result<bool> {
        let ctx = self.ctx(repo, format!("mount of blob {digest} from {from}"));
        check_digest(digest, &ctx)?;
        let r = self.reference(repo, "latest");
        let src = self.reference(from, "latest");
        let res = self
            .retry(repo, Push, &ctx, || async {
                self.oci()
                    .await?
                    .mount_blob(&r, &src, digest)
                    .await
                    .map_err(|e| from_oci(e, &ctx))
            })
            .await;
        match res {
            Ok(()) => {
                tracing::debug!(repo = %ctx.repo, %digest, %from, "blob mounted");
                Ok(true)
            }
            Err(e) if e.is_transient() => Err(e),
            // 202 (oci-client: "expected 201"), a token without pull on
            // `from`, or `from` lacking the blob: upload instead.
            Err(e) => {
                tracing::debug!(repo = %ctx.repo, %digest, %from, error = %e, "mount refused; uploading");
                Ok(false)
            }
        }
    }

    /// The manifest at tag or digest `at` as `(media type, bytes)`, `None`
    /// when absent. The body is read up to [`MANIFEST_LIMIT`] bytes (a
    /// longer one fails while it is read, and is not retried); bytes
    /// fetched by digest are verified, and by tag checked against the
    /// `Docker-Content-Digest` the registry sends.
    pub async fn get_manifest(&self, repo: &str, at: &str) -> Result<Option<(String, Vec<u8>)>> {
        let ctx = self.ctx(repo, format!("manifest {at}"));
        check_tag_or_digest(at, &ctx)?;
        let rest = format!("manifests/{at}");
        let accept = MANIFEST_TYPES.join(", ");
        let res = self
            .retry(repo, Pull, &ctx, || async {
                let resp = self
                    .raw(Method::GET, repo, &rest, Some(&accept), Pull, &ctx)
                    .await?;
                let status = resp.status();
                let ra = retry_after(resp.headers());
                let sent_digest = resp
                    .headers()
                    .get("docker-content-digest")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                if status != StatusCode::OK {
                    let body = read_capped(resp, &ctx, ERROR_BODY_LIMIT)
                        .await
                        .unwrap_or_default();
                    return Err(from_status(status, ra, &body, &ctx));
                }
                let body = read_capped(resp, &ctx, MANIFEST_LIMIT).await?;
                Ok((body, sent_digest))
            })
            .await;
        let (bytes, sent_digest) = match res {
            Ok(v) => v,
            Err(RegistryError::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        let actual = sha256_digest(&bytes);
        let expected = if at.starts_with("sha256:") {
            Some(at)
        } else {
            sent_digest.as_deref().filter(|d| d.starts_with("sha256:"))
        };
        if expected.is_some_and(|d| d != actual) {
            return Err(ctx.mismatch(actual));
        }
        let media_type = media_type_of(&bytes, &ctx)?;
        Ok(Some((media_type, bytes)))
    }

    /// Pushes manifest `bytes` under tag or digest `at`; returns its digest.
    pub async fn put_manifest(
        &self,
        repo: &str,
        at: &str,
        media_type: &str,
        bytes: Bytes,
    ) -> Result<String> {
        let ctx = self.ctx(repo, format!("PUT manifest {at}"));
        check_tag_or_digest(at, &ctx)?;
        let digest = sha256_digest(&bytes);
        if at.starts_with("sha256:") && at != digest {
            return Err(ctx.mismatch(digest));
        }
        let content_type = HeaderValue::from_str(media_type)
            .map_err(|_| ctx.protocol(format!("bad media type `{media_type}`")))?;
        let r = self.reference(repo, at);
        self.retry(repo, Push, &ctx, || async {
            self.oci()
                .await?
                .push_manifest_raw(&r, bytes.clone(), content_type.clone())
                .await
                .map_err(|e| from_oci(e, &ctx))
        })
        .await?;
        tracing::debug!(repo = %ctx.repo, %at, %digest, "manifest pushed");
        Ok(digest)
    }

    /// `DELETE /v2/<repo>/manifests/<digest>`: `true` if it was deleted,
    /// `false` if there was no such manifest. A registry that does not
    /// allow deletes answers 405, an error naming the manifest.
    pub async fn delete_manifest(&self, repo: &str, digest: &str) -> Result<bool> {
        let ctx = self.ctx(repo, format!("DELETE manifest {digest}"));
        check_digest(digest, &ctx)?;
        let rest = format!("manifests/{digest}");
        self.retry(repo, Push, &ctx, || async {
            let resp = self
                .raw(Method::DELETE, repo, &rest, None, Push, &ctx)
                .await?;
            let status = resp.status();
            let ra = retry_after(resp.headers());
            let body = read_capped(resp, &ctx, MANIFEST_LIMIT).await?;
            match status {
                StatusCode::ACCEPTED | StatusCode::OK => Ok(true),
                StatusCode::NOT_FOUND => Ok(false),
                s => Err(from_status(s, ra, &body, &ctx)),
            }
        })
        .await
    }

    /// `GET /v2/<repo>/referrers/<digest>`: the index bytes, or `None`
    /// when the registry does not implement the API (404, or an answer
    /// that is not an OCI index, as the spec tells clients to treat it).
    pub async fn referrers(&self, repo: &str, digest: &str) -> Result<Option<Vec<u8>>> {
        let ctx = self.ctx(repo, format!("referrers of {digest}"));
        check_digest(digest, &ctx)?;
        let rest = format!("referrers/{digest}");
        self.retry(repo, Pull, &ctx, || async {
            let resp = self
                .raw(Method::GET, repo, &rest, Some(OCI_INDEX), Pull, &ctx)
                .await?;
            let status = resp.status();
            let ra = retry_after(resp.headers());
            let ctype = resp
                .headers()
                .get(CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            let body = read_capped(resp, &ctx, MANIFEST_LIMIT).await?;
            match status {
                StatusCode::OK if ctype.starts_with(OCI_INDEX) => Ok(Some(body)),
                StatusCode::OK => {
                    tracing::debug!(repo = %ctx.repo, content_type = %ctype, "referrers answer is not an OCI index; treating the API as unsupported");
                    Ok(None)
                }
                StatusCode::NOT_FOUND => Ok(None),
                s => Err(from_status(s, ra, &body, &ctx)),
            }
        })
        .await
    }

    /// Every tag of `repo` (following `last` pages); empty when the
    /// repository does not exist.
    pub async fn list_tags(&self, repo: &str) -> Result<Vec<String>> {
        let ctx = self.ctx(repo, "tags");
        let r = self.reference(repo, "latest");
        let mut all: Vec<String> = Vec::new();
        loop {
            let last = all.last().cloned();
            let page = self
                .retry(repo, Pull, &ctx, || async {
                    self.oci()
                        .await?
                        .list_tags(&r, &self.auth.auth, Some(TAGS_PAGE), last.as_deref())
                        .await
                        .map_err(|e| from_oci(e, &ctx))
                })
                .await;
            let page = match page {
                Ok(p) => p.tags,
                Err(RegistryError::NotFound { .. }) => return Ok(all),
                Err(e) => return Err(e),
            };
            // Stop on an empty page, or one that does not move past `last`
            // (a registry ignoring the parameter).
            let before = all.len();
            for t in page {
                if last.as_ref().is_none_or(|l| t > *l) && !all.contains(&t) {
                    all.push(t);
                }
            }
            if all.len() == before {
                return Ok(all);
            }
            all.sort();
        }
    }
}

/// Refuses a digest that is not `sha256:<64 lowercase hex>` before it
/// goes into a URL (a referrers list or index could name
/// `sha256:../../x`).
fn check_digest(digest: &str, ctx: &Ctx) -> Result<()> {
    smr_image::source::digest::parse_digest(digest).map_err(|_| {
        ctx.protocol(format!(
            "digest {digest:?} is not sha256:<64 lowercase hex digits>; not requested"
        ))
    })?;
    Ok(())
}

/// [`check_digest`] for a digest (it has a `:`), else the tag grammar of
/// the distribution spec: `[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`.
fn check_tag_or_digest(at: &str, ctx: &Ctx) -> Result<()> {
    if at.contains(':') {
        return check_digest(at, ctx);
    }
    let ok = at.len() <= 128
        && at
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_')
        && at
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ctx.protocol(format!("tag {at:?} is not a valid tag; not requested")))
    }
}

/// Largest error body read (it only feeds the error message).
const ERROR_BODY_LIMIT: u64 = 64 << 10;

/// Reads a response body of at most `limit` bytes, failing as soon as it
/// grows past it (or announces more in `Content-Length`) with an error
/// naming the URL and the limit. The error is not transient: a registry
/// that sent too much once is not asked again.
async fn read_capped(mut resp: reqwest::Response, ctx: &Ctx, limit: u64) -> Result<Vec<u8>> {
    let url = resp.url().clone();
    let too_large = |what: String| {
        ctx.protocol(format!(
            "{url}: {what}, more than the {limit}-byte limit; not read"
        ))
    };
    if let Some(n) = resp.content_length().filter(|&n| n > limit) {
        return Err(too_large(format!("body of {n} bytes")));
    }
    let mut out = Vec::with_capacity(resp.content_length().unwrap_or(0) as usize);
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| super::classify::from_reqwest(&e, ctx))?
    {
        if (out.len() + chunk.len()) as u64 > limit {
            return Err(too_large("body still growing".into()));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// The media type of manifest `bytes`: its `mediaType`, else judged by its
/// shape (`manifests` → OCI index, `config` → OCI manifest), as
/// oci-client does not hand us the `Content-Type`.
fn media_type_of(bytes: &[u8], ctx: &Ctx) -> Result<String> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Probe {
        schema_version: Option<i64>,
        media_type: Option<String>,
        manifests: Option<serde_json::Value>,
        config: Option<serde_json::Value>,
    }
    let p: Probe = serde_json::from_slice(bytes).map_err(|source| RegistryError::Json {
        what: format!("{}: {}", ctx.repo, ctx.what),
        source,
    })?;
    if p.schema_version != Some(2) {
        return Err(ctx.protocol(format!(
            "schemaVersion {:?}, expected 2 (schema 1 manifests are not supported)",
            p.schema_version
        )));
    }
    match (p.media_type, p.manifests, p.config) {
        (Some(mt), _, _) => Ok(mt),
        (None, Some(_), _) => Ok(OCI_INDEX.to_string()),
        (None, None, Some(_)) => Ok(OCI_MANIFEST.to_string()),
        (None, None, None) => Err(ctx.protocol("neither mediaType, manifests nor config")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> Ctx {
        Ctx {
            registry: "r".into(),
            repo: "r/a".into(),
            what: "manifest v1".into(),
        }
    }

    #[test]
    fn media_types_from_bodies() {
        let c = ctx();
        let mt = |b: &str| media_type_of(b.as_bytes(), &c);
        assert_eq!(
            mt(r#"{"schemaVersion":2,"mediaType":"application/x","config":{}}"#).expect("mt"),
            "application/x"
        );
        assert_eq!(
            mt(r#"{"schemaVersion":2,"manifests":[]}"#).expect("idx"),
            OCI_INDEX
        );
        assert_eq!(
            mt(r#"{"schemaVersion":2,"config":{}}"#).expect("m"),
            OCI_MANIFEST
        );
        let e = mt("not json").expect_err("garbage");
        assert!(matches!(e, RegistryError::Json { .. }));
        assert!(e.to_string().contains("r/a: manifest v1"), "{e}");
        assert!(mt(r#"{"schemaVersion":1,"fsLayers":[]}"#).is_err());
        assert!(mt(r#"{"schemaVersion":2}"#).is_err());
    }
}
