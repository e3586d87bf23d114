//! Turning what went wrong (oci-client errors, reqwest errors, HTTP status
//! codes of our own requests, stream errors) into [`RegistryError`]
//! variants that name the registry, repository and what was being done.

use crate::error::RegistryError;
use oci_client::errors::{DigestError, OciDistributionError, OciEnvelope, OciErrorCode};
use reqwest::StatusCode;

/// What a request was about, for messages.
#[derive(Debug, Clone)]
pub(crate) struct Ctx {
    /// The registry host.
    pub registry: String,
    /// `host/name`.
    pub repo: String,
    /// E.g. `GET blob sha256:…`, `manifest v1`.
    pub what: String,
}

impl Ctx {
    pub fn not_found(&self) -> RegistryError {
        RegistryError::NotFound {
            repo: self.repo.clone(),
            what: self.what.clone(),
        }
    }

    pub fn protocol(&self, reason: impl Into<String>) -> RegistryError {
        RegistryError::Protocol {
            repo: self.repo.clone(),
            what: self.what.clone(),
            reason: reason.into(),
        }
    }

    pub fn transient(&self, reason: impl Into<String>, retry_after: Option<u64>) -> RegistryError {
        RegistryError::Transient {
            repo: self.repo.clone(),
            what: self.what.clone(),
            reason: reason.into(),
            retry_after,
        }
    }

    pub fn auth(&self, reason: impl std::fmt::Display) -> RegistryError {
        RegistryError::Auth {
            registry: self.registry.clone(),
            reason: format!("{}: {}: {reason}", self.repo, self.what),
        }
    }

    pub fn mismatch(&self, actual: impl Into<String>) -> RegistryError {
        RegistryError::DigestMismatch {
            repo: self.repo.clone(),
            what: self.what.clone(),
            actual: actual.into(),
        }
    }
}

/// An error and its sources, `: `-joined (reqwest hides the interesting
/// part, e.g. "connection refused", in the source chain).
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

/// A status code of a response that was not what we wanted.
pub(crate) fn from_status(
    status: StatusCode,
    retry_after: Option<u64>,
    body: &[u8],
    ctx: &Ctx,
) -> RegistryError {
    let detail = summarize_body(body);
    let reason = if detail.is_empty() {
        format!("HTTP {status}")
    } else {
        format!("HTTP {status}: {detail}")
    };
    match status.as_u16() {
        401 => ctx.auth(format!("unauthorized ({reason})")),
        403 => ctx.auth(format!("access denied ({reason})")),
        404 => ctx.not_found(),
        408 | 429 | 500..=599 => ctx.transient(reason, retry_after),
        _ => ctx.protocol(reason),
    }
}

/// The OCI error envelope as `CODE: message; …`, else the start of the body.
fn summarize_body(body: &[u8]) -> String {
    if let Ok(env) = serde_json::from_slice::<OciEnvelope>(body) {
        return env
            .errors
            .iter()
            .map(|e| format!("{}: {}", code_name(&e.code), e.message))
            .collect::<Vec<_>>()
            .join("; ");
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    match text.char_indices().nth(200) {
        Some((i, _)) => format!("{}…", &text[..i]),
        None => text.to_string(),
    }
}

fn code_name(c: &OciErrorCode) -> String {
    match c {
        OciErrorCode::Other(s) => s.clone(),
        // The serde names (SCREAMING_SNAKE_CASE) are the spec's names.
        other => serde_json::to_value(other)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_else(|| format!("{other:?}")),
    }
}

/// A reqwest error (no response, or a broken body).
pub(crate) fn from_reqwest(e: &reqwest::Error, ctx: &Ctx) -> RegistryError {
    if let Some(status) = e.status() {
        return from_status(status, None, b"", ctx);
    }
    if e.is_builder() {
        return ctx.protocol(chain(e));
    }
    // Connect, timeout, reset, truncated body, redirect loops: the network
    // or the server may recover.
    ctx.transient(chain(e), None)
}

/// An I/O error out of an oci-client byte stream.
pub(crate) fn from_stream_io(e: std::io::Error, ctx: &Ctx) -> RegistryError {
    if let Some(inner) = e.get_ref() {
        if let Some(d) = inner.downcast_ref::<DigestError>() {
            return from_digest_error(d, ctx);
        }
        if let Some(r) = inner.downcast_ref::<reqwest::Error>() {
            return from_reqwest(r, ctx);
        }
    }
    ctx.transient(chain(&e), None)
}

fn from_digest_error(d: &DigestError, ctx: &Ctx) -> RegistryError {
    match d {
        DigestError::VerificationError { actual, .. } => ctx.mismatch(actual.clone()),
        other => ctx.protocol(other.to_string()),
    }
}

/// An oci-client error.
pub(crate) fn from_oci(e: OciDistributionError, ctx: &Ctx) -> RegistryError {
    use OciDistributionError as E;
    match e {
        E::RequestError(r) => from_reqwest(&r, ctx),
        E::IoError(io) => from_stream_io(io, ctx),
        E::DigestError(d) => from_digest_error(&d, ctx),
        E::UnauthorizedError { .. } => ctx.auth("unauthorized (HTTP 401)"),
        E::AuthenticationFailure(reason) => {
            ctx.auth(format!("the token service refused: {}", reason.trim()))
        }
        E::RegistryTokenDecodeError(reason) => {
            ctx.auth(format!("unreadable token from the token service: {reason}"))
        }
        E::ServerError { code, message, .. } => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_GATEWAY);
            from_status(status, None, message.as_bytes(), ctx)
        }
        E::RegistryError { envelope, .. } => from_envelope(&envelope, ctx),
        other => ctx.protocol(chain(&other)),
    }
}

/// A 4xx answer with an OCI error body.
fn from_envelope(env: &OciEnvelope, ctx: &Ctx) -> RegistryError {
    let reason = env
        .errors
        .iter()
        .map(|e| format!("{}: {}", code_name(&e.code), e.message))
        .collect::<Vec<_>>()
        .join("; ");
    let first = env.errors.first().map(|e| &e.code);
    match first {
        Some(
            OciErrorCode::BlobUnknown
            | OciErrorCode::ManifestUnknown
            | OciErrorCode::NameUnknown
            | OciErrorCode::NotFound,
        ) => ctx.not_found(),
        Some(OciErrorCode::Unauthorized) => ctx.auth(format!("unauthorized ({reason})")),
        Some(OciErrorCode::Denied) => ctx.auth(format!("access denied ({reason})")),
        Some(OciErrorCode::Toomanyrequests) => ctx.transient(reason, None),
        _ => ctx.protocol(reason),
    }
}

/// `Retry-After` in seconds (the HTTP-date form is treated as absent).
pub(crate) fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<u64> {
    headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> Ctx {
        Ctx {
            registry: "r.example".into(),
            repo: "r.example/a".into(),
            what: "GET blob sha256:x".into(),
        }
    }

    #[test]
    fn statuses() {
        let c = ctx();
        assert!(matches!(
            from_status(StatusCode::NOT_FOUND, None, b"", &c),
            RegistryError::NotFound { .. }
        ));
        let e = from_status(StatusCode::TOO_MANY_REQUESTS, Some(3), b"slow down", &c);
        assert!(e.is_transient());
        assert_eq!(e.retry_after(), Some(3));
        assert!(e.to_string().contains("slow down"), "{e}");
        assert!(from_status(StatusCode::BAD_GATEWAY, None, b"", &c).is_transient());
        let e = from_status(StatusCode::UNAUTHORIZED, None, b"", &c);
        assert!(matches!(e, RegistryError::Auth { .. }));
        assert!(
            e.to_string().contains("r.example/a: GET blob sha256:x"),
            "{e}"
        );
        let e = from_status(
            StatusCode::BAD_REQUEST,
            None,
            br#"{"errors":[{"code":"MANIFEST_INVALID","message":"manifest invalid"}]}"#,
            &c,
        );
        assert!(matches!(e, RegistryError::Protocol { .. }));
        assert!(
            e.to_string().contains("MANIFEST_INVALID: manifest invalid"),
            "{e}"
        );
    }

    #[test]
    fn oci_errors() {
        let c = ctx();
        let env: OciEnvelope = serde_json::from_str(
            r#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}"#,
        )
        .expect("envelope");
        let e = from_oci(
            OciDistributionError::RegistryError {
                envelope: env,
                url: "u".into(),
            },
            &c,
        );
        assert!(matches!(e, RegistryError::NotFound { .. }), "{e}");
        let e = from_oci(
            OciDistributionError::ServerError {
                code: 503,
                url: "u".into(),
                message: "busy".into(),
            },
            &c,
        );
        assert!(e.is_transient(), "{e}");
        let e = from_oci(
            OciDistributionError::DigestError(DigestError::VerificationError {
                expected: "sha256:a".into(),
                actual: "sha256:b".into(),
            }),
            &c,
        );
        assert!(matches!(e, RegistryError::DigestMismatch { .. }), "{e}");
        let e = from_oci(OciDistributionError::SpecViolationError("x".into()), &c);
        assert!(matches!(e, RegistryError::Protocol { .. }), "{e}");
    }

    #[test]
    fn long_bodies_are_cut() {
        let body = "x".repeat(1000);
        assert!(summarize_body(body.as_bytes()).chars().count() <= 201);
    }
}
