//! A read-only chunk store over HTTP(S): any static file server or CDN that
//! serves a store directory, `BASE/chunks/<2 hex>/<64 hex>`. Ranges of an
//! object are read with `Range` requests, one per range, concurrently.
//!
//! Built on `reqwest` directly rather than `object_store`'s HTTP store:
//! that one targets WebDAV servers (PUT, PROPFIND listings) and keeps its
//! own retry policy, while a chunk store needs exactly two idempotent
//! requests (ranged GET and HEAD) whose statuses, `Retry-After` and
//! `Content-Length` we must see ourselves to apply the [`RemoteOptions`]
//! policy — the same one the S3 store uses. `reqwest` is already in the
//! build through `object_store`, so this costs no extra dependency.
//!
//! `https://user:password@host/prefix` sends HTTP basic auth; the
//! credentials never appear in [`ChunkStore::describe`] or errors.

use crate::error::{Op, StoreError, TransportKind};
use crate::location::{percent_decode, redact};
use crate::options::RemoteOptions;
use crate::retry::{parse_retry_after, Remote};
use crate::runtime::{block_on, cut, read_ranges, RangeRead};
use crate::{ByteRange, ChunkStore, ObjectName, PutOutcome, Result, Target};
use reqwest::{Method, Url};
use smr_format::ChunkId;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// A read-only store served over HTTP(S). See the module documentation.
#[derive(Clone)]
pub struct HttpStore {
    inner: Arc<Inner>,
}

/// Shows the location and options, never the credentials.
impl std::fmt::Debug for HttpStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpStore")
            .field("store", &self.inner.remote.store())
            .field("basic_auth", &self.inner.auth.is_some())
            .field("options", self.inner.remote.options())
            .finish()
    }
}

struct Inner {
    client: reqwest::Client,
    /// The store's URL, without userinfo, ending in `/`.
    base: Url,
    /// Basic-auth user and password from the location's userinfo.
    auth: Option<(String, String)>,
    remote: Remote,
}

/// What one answer to a request means.
enum Answer {
    /// 2xx: the response, body unread.
    Found(reqwest::Response),
    /// 404 or 410.
    Missing,
}

impl HttpStore {
    /// Opens the store at `location` (`http://host[:port][/prefix]` or
    /// `https://…`). Nothing is requested until the first operation.
    pub fn open(location: &str, options: RemoteOptions) -> Result<Self> {
        let invalid = |reason: &str| StoreError::InvalidLocation {
            location: redact(location),
            reason: reason.to_string(),
        };
        let mut base = Url::parse(location).map_err(|e| invalid(&e.to_string()))?;
        if !matches!(base.scheme(), "http" | "https") || base.host_str().is_none() {
            return Err(invalid("expected http://host[:port][/prefix] or https://…"));
        }
        if base.query().is_some() || base.fragment().is_some() {
            return Err(invalid("query strings and fragments are not supported"));
        }
        let auth = (!base.username().is_empty() || base.password().is_some()).then(|| {
            (
                percent_decode(base.username()),
                percent_decode(base.password().unwrap_or_default()),
            )
        });
        // Both fail only for URLs that cannot be a base (not http with a host).
        let _ = base.set_username("");
        let _ = base.set_password(None);
        if !base.path().ends_with('/') {
            let path = format!("{}/", base.path());
            base.set_path(&path);
        }
        let store = base.as_str().trim_end_matches('/').to_string();
        let client = reqwest::Client::builder()
            .connect_timeout(options.connect_timeout)
            .read_timeout(options.read_timeout)
            .pool_idle_timeout(Duration::from_secs(30))
            .user_agent(concat!("smr/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| StoreError::Client {
                store: store.clone(),
                cause: e.into(),
            })?;
        Ok(HttpStore {
            inner: Arc::new(Inner {
                client,
                base,
                auth,
                remote: Remote::new(store, options),
            }),
        })
    }
}

impl Inner {
    fn store(&self) -> String {
        self.remote.store().to_string()
    }

    fn object_url(&self, op: Op, object: &ObjectName) -> Result<Url> {
        self.base
            .join(object.as_str())
            .map_err(|e| StoreError::Remote {
                store: self.store(),
                what: Target::of(object, ByteRange::WHOLE),
                op,
                cause: e.into(),
            })
    }

    /// One request for `range` of `object` (a `Range` header unless the
    /// whole object is asked for), its status mapped: 2xx, missing, or an
    /// error.
    async fn request(
        &self,
        method: Method,
        op: Op,
        object: &ObjectName,
        range: ByteRange,
    ) -> Result<Answer> {
        let what = Target::of(object, range);
        let mut req = self.client.request(method, self.object_url(op, object)?);
        if let Some((user, password)) = &self.auth {
            req = req.basic_auth(user, Some(password));
        }
        if !range.is_whole() {
            let last = range.end().map(|e| (e - 1).to_string()).unwrap_or_default();
            req = req.header(
                reqwest::header::RANGE,
                format!("bytes={}-{last}", range.offset),
            );
        }
        let resp = req
            .send()
            .await
            .map_err(|e| self.transport(op, what.clone(), e))?;
        let status = resp.status().as_u16();
        match status {
            200..=299 => Ok(Answer::Found(resp)),
            404 | 410 => Ok(Answer::Missing),
            401 | 403 => Err(StoreError::Denied {
                store: self.store(),
                what,
                op,
                reason: format!("HTTP {}", resp.status()),
            }),
            _ => Err(StoreError::Status {
                store: self.store(),
                what,
                op,
                status,
                retry_after: resp
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| parse_retry_after(v, SystemTime::now())),
            }),
        }
    }

    /// One GET of `range` of `object`. A server that ignores `Range` and
    /// sends the whole object (200) is served by cutting the range out.
    async fn read_range(&self, object: &ObjectName, range: ByteRange) -> Result<Vec<u8>> {
        let what = Target::of(object, range);
        let mut resp = match self.request(Method::GET, Op::Get, object, range).await? {
            Answer::Found(resp) => resp,
            Answer::Missing => {
                return Err(StoreError::Missing {
                    what,
                    store: self.store(),
                })
            }
        };
        let whole_body = resp.status().as_u16() != 206;
        let limit = self.remote.options().max_object_bytes;
        let expected = resp.content_length();
        let too_large = |size| StoreError::TooLarge {
            store: self.store(),
            what: what.clone(),
            size,
            limit,
        };
        if let Some(n) = expected.filter(|&n| n > limit) {
            return Err(too_large(n));
        }
        let mut body = Vec::with_capacity(expected.unwrap_or(0) as usize);
        while let Some(piece) = resp
            .chunk()
            .await
            .map_err(|e| self.transport(Op::Get, what.clone(), e))?
        {
            let size = (body.len() + piece.len()) as u64;
            if size > limit {
                return Err(too_large(size));
            }
            body.extend_from_slice(&piece);
        }
        // hyper already fails a body cut short of its Content-Length; this
        // keeps the guarantee whatever the transport does.
        if let Some(n) = expected.filter(|&n| n != body.len() as u64) {
            return Err(StoreError::LengthMismatch {
                store: self.store(),
                what,
                expected: n,
                got: body.len() as u64,
            });
        }
        let got = body.len() as u64;
        let body = match (whole_body, range.is_whole()) {
            (true, false) => cut(body, range),
            _ => Some(body),
        };
        match body {
            Some(b) if range.len.is_none_or(|len| len == b.len() as u64) => Ok(b),
            _ => Err(StoreError::past_the_end(self.store(), what, got)),
        }
    }

    async fn exists_once(&self, id: ChunkId) -> Result<bool> {
        let object = ObjectName::of_chunk(&id);
        Ok(matches!(
            self.request(Method::HEAD, Op::Exists, &object, ByteRange::WHOLE)
                .await?,
            Answer::Found(_)
        ))
    }

    fn transport(&self, op: Op, what: Target, e: reqwest::Error) -> StoreError {
        StoreError::Transport {
            store: self.store(),
            what,
            op,
            kind: transport_kind(&e),
            // The store and chunk name the URL; keep the message short.
            cause: e.without_url().into(),
        }
    }
}

/// Classifies a reqwest failure. Connection failures, timeouts and broken
/// transfers are transient; a TLS failure (an `InvalidData` I/O error under
/// a connect error) and anything else is not.
fn transport_kind(e: &reqwest::Error) -> TransportKind {
    let io_kinds = || {
        let mut kinds = Vec::new();
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
        while let Some(err) = cur {
            if let Some(io) = err.downcast_ref::<std::io::Error>() {
                kinds.push(io.kind());
            }
            cur = err.source();
        }
        kinds
    };
    if e.is_timeout() || io_kinds().contains(&std::io::ErrorKind::TimedOut) {
        TransportKind::Timeout
    } else if e.is_connect() {
        if io_kinds().contains(&std::io::ErrorKind::InvalidData) {
            TransportKind::Other
        } else {
            TransportKind::Connect
        }
    } else if e.is_request() || e.is_body() || e.is_decode() {
        // No content decoding is enabled, so a decode error is a body that
        // broke off (reqwest reports body read errors as decode errors).
        TransportKind::Interrupted
    } else {
        TransportKind::Other
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

impl ChunkStore for HttpStore {
    fn describe(&self) -> String {
        self.inner.store()
    }

    fn read_ranges(&self, object: &ObjectName, ranges: &[ByteRange]) -> Result<Vec<Vec<u8>>> {
        read_ranges(&self.inner, object, ranges)
    }

    fn exists(&self, id: &ChunkId) -> Result<bool> {
        let (inner, id) = (self.inner.clone(), *id);
        block_on(async move {
            inner
                .remote
                .run(Op::Exists, id.into(), || inner.exists_once(id))
                .await
        })
    }

    /// Always fails: HTTP stores are read-only.
    fn put(&self, id: &ChunkId, _data: &[u8]) -> Result<PutOutcome> {
        Err(StoreError::ReadOnly {
            store: self.describe(),
            what: Target::Chunk(*id),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations() {
        let o = RemoteOptions::default;
        let s = HttpStore::open("https://user:p%40ss@cdn.example:8443/a/b/", o()).unwrap();
        assert_eq!(s.describe(), "https://cdn.example:8443/a/b");
        assert_eq!(s.inner.auth, Some(("user".to_string(), "p@ss".to_string())));
        let id = ChunkId([0xab; 32]);
        let url = s
            .inner
            .object_url(Op::Get, &ObjectName::of_chunk(&id))
            .unwrap();
        assert_eq!(
            url.as_str(),
            format!("https://cdn.example:8443/a/b/chunks/ab/{}", id.to_hex())
        );
        let s = HttpStore::open("http://127.0.0.1:8080", o()).unwrap();
        assert_eq!(s.describe(), "http://127.0.0.1:8080");
        assert!(s.inner.auth.is_none());
        let url = s
            .inner
            .object_url(Op::Get, &ObjectName::of_chunk(&id))
            .unwrap();
        assert_eq!(url.path(), format!("/chunks/ab/{}", id.to_hex()));

        for bad in ["http://", "http://h/p?token=1", "https://u:secret@/x"] {
            let e = HttpStore::open(bad, o()).unwrap_err();
            assert!(
                matches!(e, StoreError::InvalidLocation { .. }),
                "{bad}: {e}"
            );
            assert!(!e.to_string().contains("secret"), "{e}");
        }
    }

    #[test]
    fn put_is_refused() {
        let s =
            HttpStore::open("http://user:secret@127.0.0.1:9/s", RemoteOptions::default()).unwrap();
        let id = ChunkId([1; 32]);
        let e = s.put(&id, b"x").unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, StoreError::ReadOnly { .. }));
        assert!(
            msg.contains("read-only") && msg.contains(&id.to_hex()),
            "{msg}"
        );
        assert!(
            msg.contains("http://127.0.0.1:9/s") && !msg.contains("secret"),
            "{msg}"
        );
    }
}
