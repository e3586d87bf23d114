//! An `object_store` HTTP connector that reports retryable statuses.
//!
//! `object_store` keeps the status of a failed request in a type it does not
//! export, so with its retries off we could not tell a 503 from a 400. This
//! connector wraps the default reqwest one and turns 408, 429 and 5xx
//! answers (but 501 and 505) into an [`HttpError`] whose source is a
//! [`RetryableStatus`] carrying the status and `Retry-After`; the S3 store
//! finds it in the error chain.

use crate::error::is_transient_status;
use crate::retry::parse_retry_after;
use object_store::client::{
    HttpClient, HttpConnector, HttpError, HttpErrorKind, HttpRequest, HttpResponse, HttpService,
    ReqwestConnector,
};
use object_store::ClientOptions;
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, SystemTime};

/// A retryable HTTP status the server answered with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("server answered HTTP {status}")]
pub(crate) struct RetryableStatus {
    /// The status code.
    pub(crate) status: u16,
    /// The parsed `Retry-After`, if any.
    pub(crate) retry_after: Option<Duration>,
}

/// Connects like `ReqwestConnector`, wrapping the client in
/// [`StatusService`].
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct StatusConnector;

impl HttpConnector for StatusConnector {
    fn connect(&self, options: &ClientOptions) -> object_store::Result<HttpClient> {
        let inner = ReqwestConnector::default().connect(options)?;
        Ok(HttpClient::new(StatusService { inner }))
    }
}

#[derive(Debug)]
struct StatusService {
    inner: HttpClient,
}

type CallFuture<'a> = Pin<Box<dyn Future<Output = Result<HttpResponse, HttpError>> + Send + 'a>>;

// Written out instead of `#[async_trait]` (what the trait is declared with)
// to avoid a dependency for one method.
impl HttpService for StatusService {
    fn call<'s, 'f>(&'s self, req: HttpRequest) -> CallFuture<'f>
    where
        's: 'f,
        Self: 'f,
    {
        Box::pin(async move {
            let resp = self.inner.execute(req).await?;
            let status = resp.status().as_u16();
            if !is_transient_status(status) {
                return Ok(resp);
            }
            let retry_after = resp
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| parse_retry_after(v, SystemTime::now()));
            Err(HttpError::new(
                HttpErrorKind::Request,
                RetryableStatus {
                    status,
                    retry_after,
                },
            ))
        })
    }
}

/// The text of an error and its causes.
fn full_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = String::new();
    let mut cur = Some(e);
    while let Some(err) = cur {
        text.push_str(&err.to_string());
        cur = err.source();
    }
    text
}

/// The content of the first `<name>…</name>` in `text`.
fn tag<'t>(text: &'t str, name: &str) -> Option<&'t str> {
    let open = format!("<{name}>");
    let start = text.find(&open)? + open.len();
    let len = text.get(start..)?.find(&format!("</{name}>"))?;
    text.get(start..start + len)
        .map(str::trim)
        .filter(|s| !s.is_empty())
}

/// The S3 error code (`<Code>`) in an error's text, if any.
pub(crate) fn s3_code(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    tag(&full_text(e), "Code").map(str::to_string)
}

/// `fallback` with the S3 error code and message (`<Code>`, `<Message>`)
/// found in an error's text. Keeps the rest of the body (which may echo the
/// access key id and the string to sign) out of messages.
pub(crate) fn s3_reason(e: &(dyn std::error::Error + 'static), fallback: &str) -> String {
    let text = full_text(e);
    match (tag(&text, "Code"), tag(&text, "Message")) {
        (Some(code), Some(msg)) => format!("{fallback}: {code}: {msg}"),
        (Some(code), None) => format!("{fallback}: {code}"),
        _ => fallback.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s3_reasons() {
        let body = std::io::Error::other(
            "Server returned non-2xx status code: 403 Forbidden: <?xml version=\"1.0\"?>\
             <Error><Code>SignatureDoesNotMatch</Code><Message>The request signature we calculated does not match</Message>\
             <AWSAccessKeyId>AKIAEXAMPLE</AWSAccessKeyId><StringToSign>x</StringToSign></Error>",
        );
        let r = s3_reason(&body, "HTTP 403 Forbidden");
        assert_eq!(
            r,
            "HTTP 403 Forbidden: SignatureDoesNotMatch: The request signature we calculated does not match"
        );
        assert!(!r.contains("AKIA"));
        assert_eq!(s3_code(&body).as_deref(), Some("SignatureDoesNotMatch"));
        let bare = std::io::Error::other("no body");
        assert_eq!(
            s3_reason(&bare, "HTTP 401 Unauthorized"),
            "HTTP 401 Unauthorized"
        );
    }
}
