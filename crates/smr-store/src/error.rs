//! Errors of chunk stores.

use crate::object::Target;
use std::fmt;
use std::time::Duration;

/// Result alias for this crate.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// A boxed error from a client library (reqwest, object_store).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The store operation an error happened in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// [`crate::ChunkStore::get`].
    Get,
    /// [`crate::ChunkStore::exists`].
    Exists,
    /// [`crate::ChunkStore::put`].
    Put,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::Get => "get",
            Op::Exists => "exists",
            Op::Put => "put",
        })
    }
}

/// Why a request failed below HTTP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportKind {
    /// Connecting failed: refused, unreachable, DNS (transient).
    Connect,
    /// The connect or read timeout expired (transient).
    Timeout,
    /// The connection broke while sending or receiving: reset, closed,
    /// body cut short (transient).
    Interrupted,
    /// Anything else, e.g. a TLS certificate rejected (permanent).
    Other,
}

impl fmt::Display for TransportKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TransportKind::Connect => "cannot connect",
            TransportKind::Timeout => "timed out",
            TransportKind::Interrupted => "connection interrupted",
            TransportKind::Other => "request failed",
        })
    }
}

/// What went wrong talking to a store.
///
/// Messages name the store (URLs without credentials) and the chunk.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The chunk is not in the store (permanent: never retried).
    #[error("{what} is missing from store {store}")]
    Missing {
        /// What the operation was about (a chunk, or a range of an object).
        what: Target,
        /// The store's location.
        store: String,
    },
    /// An I/O error on a chunk or object.
    #[error("store {store}: {what}: {source}")]
    ChunkIo {
        /// What the operation was about (a chunk, or a range of an object).
        what: Target,
        /// The store's location.
        store: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// An I/O error on the store itself.
    #[error("store {store}: {source}")]
    Io {
        /// The store's location.
        store: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The location names a backend this build does not support.
    #[error(
        "unsupported store location `{0}` (expected a directory path, file:///path, \
         s3://bucket[/prefix], http://host[:port][/prefix] or https://host[:port][/prefix])"
    )]
    Unsupported(String),
    /// The location has a supported scheme but cannot be used.
    #[error("invalid store location `{location}`: {reason}")]
    InvalidLocation {
        /// The location, without credentials.
        location: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A setting (environment variable or option) has an unusable value.
    #[error("invalid setting {name}={value:?}: {reason}")]
    InvalidSetting {
        /// The variable or option name.
        name: &'static str,
        /// Its value.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The store's client could not be set up.
    #[error("store {store}: cannot set up the client: {}", chain(&**cause))]
    Client {
        /// The store's location.
        store: String,
        /// The client library's error (its chain is part of the message).
        cause: BoxError,
    },
    /// A writer and the garbage collector of one store exclude each other
    /// ([`crate::s3::lease`]): this one could not start.
    #[error("store {store} is busy: {reason}")]
    Busy {
        /// The store's location.
        store: String,
        /// Who holds it, since when.
        reason: String,
    },
    /// `put` on a store that only serves chunks (HTTP).
    #[error(
        "store {store} is a read-only store: cannot put {what} \
         (write to a directory or s3:// store and serve that over HTTP)"
    )]
    ReadOnly {
        /// The store's location.
        store: String,
        /// What the operation was about (a chunk, or a range of an object).
        what: Target,
    },
    /// The server rejected the credentials or the request's authorization
    /// (HTTP 401/403; permanent).
    #[error("store {store}: {what}: {op} denied: {reason} (check the store's credentials)")]
    Denied {
        /// The store's location.
        store: String,
        /// What the operation was about (a chunk, or a range of an object).
        what: Target,
        /// The operation.
        op: Op,
        /// The server's reason (e.g. an S3 error code and message).
        reason: String,
    },
    /// The server answered with an unexpected HTTP status. Transient for
    /// 408, 429 and 5xx except 501 and 505.
    #[error("store {store}: {what}: {op} answered HTTP {status}{}",
        retry_after.map(|d| format!(" (retry after {} s)", d.as_secs_f64())).unwrap_or_default())]
    Status {
        /// The store's location.
        store: String,
        /// What the operation was about (a chunk, or a range of an object).
        what: Target,
        /// The operation.
        op: Op,
        /// The HTTP status code.
        status: u16,
        /// The server's `Retry-After`, when it sent one.
        retry_after: Option<Duration>,
    },
    /// The request failed below HTTP (see [`TransportKind`]).
    #[error("store {store}: {what}: {op}: {kind}: {}", chain(&**cause))]
    Transport {
        /// The store's location.
        store: String,
        /// What the operation was about (a chunk, or a range of an object).
        what: Target,
        /// The operation.
        op: Op,
        /// What kind of failure.
        kind: TransportKind,
        /// The client library's error (its chain is part of the message).
        cause: BoxError,
    },
    /// The body was shorter or longer than its announced length (transient).
    #[error("store {store}: {what}: received {got} bytes but Content-Length announced {expected}")]
    LengthMismatch {
        /// The store's location.
        store: String,
        /// What the operation was about (a chunk, or a range of an object).
        what: Target,
        /// The announced length.
        expected: u64,
        /// The bytes received.
        got: u64,
    },
    /// The chunk is larger than any chunk smr writes (permanent).
    #[error("store {store}: {what}: object of {size} bytes exceeds the {limit}-byte limit")]
    TooLarge {
        /// The store's location.
        store: String,
        /// What the operation was about (a chunk, or a range of an object).
        what: Target,
        /// Its size (or the bytes read so far).
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// Any other error of a remote store's client (permanent).
    #[error("store {store}: {what}: {op}: {}", chain(&**cause))]
    Remote {
        /// The store's location.
        store: String,
        /// What the operation was about (a chunk, or a range of an object).
        what: Target,
        /// The operation.
        op: Op,
        /// The client library's error (its chain is part of the message).
        cause: BoxError,
    },
    /// Transient failures lasted until the deadline. Not itself transient:
    /// the retry budget is spent. The message ends with the last error's.
    #[error(
        "store {store}: {what}: {op} gave up after {:.1} s ({attempts} attempt{}, deadline {:.1} s); last error: {last}",
        elapsed.as_secs_f64(), if *attempts == 1 { "" } else { "s" }, deadline.as_secs_f64()
    )]
    GaveUp {
        /// The store's location.
        store: String,
        /// What the operation was about (a chunk, or a range of an object).
        what: Target,
        /// The operation.
        op: Op,
        /// Time spent.
        elapsed: Duration,
        /// The deadline.
        deadline: Duration,
        /// Attempts made (including one cut by the deadline).
        attempts: u32,
        /// The last failure.
        last: Box<StoreError>,
    },
}

impl StoreError {
    /// The errno a reader should see for this error.
    pub fn to_errno(&self) -> i32 {
        libc::EIO
    }

    /// Whether retrying the same request may succeed: connection failures,
    /// timeouts, interrupted transfers, HTTP 408, 429 and 5xx (but 501 and
    /// 505). Missing chunks, denied credentials and bad requests are
    /// permanent.
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Status { status, .. } => is_transient_status(*status),
            StoreError::Transport { kind, .. } => *kind != TransportKind::Other,
            StoreError::LengthMismatch { .. } => true,
            _ => false,
        }
    }

    /// A range read answered with fewer bytes than asked for (`got`): the
    /// range ends past the end of the object. Permanent.
    pub fn past_the_end(store: String, what: Target, got: u64) -> StoreError {
        StoreError::ChunkIo {
            what,
            store,
            source: std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("the range ends past the end of the object (got {got} bytes)"),
            ),
        }
    }

    /// The same error, about `what` instead (e.g. the chunk whose put
    /// needed the failed step).
    pub fn about(mut self, target: Target) -> StoreError {
        match &mut self {
            StoreError::Missing { what, .. }
            | StoreError::ChunkIo { what, .. }
            | StoreError::ReadOnly { what, .. }
            | StoreError::Denied { what, .. }
            | StoreError::Status { what, .. }
            | StoreError::Transport { what, .. }
            | StoreError::LengthMismatch { what, .. }
            | StoreError::TooLarge { what, .. }
            | StoreError::Remote { what, .. }
            | StoreError::GaveUp { what, .. } => *what = target,
            _ => {}
        }
        self
    }

    /// What the failed operation was about.
    pub fn target(&self) -> Option<&Target> {
        match self {
            StoreError::Missing { what, .. }
            | StoreError::ChunkIo { what, .. }
            | StoreError::ReadOnly { what, .. }
            | StoreError::Denied { what, .. }
            | StoreError::Status { what, .. }
            | StoreError::Transport { what, .. }
            | StoreError::LengthMismatch { what, .. }
            | StoreError::TooLarge { what, .. }
            | StoreError::Remote { what, .. }
            | StoreError::GaveUp { what, .. } => Some(what),
            _ => None,
        }
    }

    /// The delay the server asked for (HTTP `Retry-After`), if any.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            StoreError::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// An error and its causes joined by `: `, skipping a cause whose text the
/// message so far already ends with (errors that print their source). Client
/// library errors are rendered this way into our messages, so that logs
/// printing only `{}` still show the root cause ("Connection refused").
pub(crate) fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = String::new();
    let mut cur = Some(e);
    while let Some(err) = cur {
        let text = err.to_string();
        if !out.ends_with(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
        cur = err.source();
    }
    out
}

/// Whether an HTTP status is worth retrying.
pub(crate) fn is_transient_status(status: u16) -> bool {
    matches!(status, 408 | 429) || ((500..600).contains(&status) && !matches!(status, 501 | 505))
}

#[cfg(test)]
mod tests {
    use super::*;
    use smr_format::ChunkId;

    fn status(status: u16) -> StoreError {
        StoreError::Status {
            store: "http://h/p".into(),
            what: ChunkId([1; 32]).into(),
            op: Op::Get,
            status,
            retry_after: None,
        }
    }

    #[test]
    fn transient_statuses() {
        for s in [408, 429, 500, 502, 503, 504, 599] {
            assert!(status(s).is_transient(), "{s}");
        }
        for s in [400, 401, 403, 404, 416, 501, 505] {
            assert!(!status(s).is_transient(), "{s}");
        }
        let missing = StoreError::Missing {
            what: ChunkId([1; 32]).into(),
            store: "s".into(),
        };
        assert!(!missing.is_transient());
    }

    #[test]
    fn gave_up_names_store_chunk_and_time() {
        let id = ChunkId([7; 32]);
        let e = StoreError::GaveUp {
            store: "https://cdn.example/p".into(),
            what: id.into(),
            op: Op::Get,
            elapsed: Duration::from_millis(2040),
            deadline: Duration::from_secs(2),
            attempts: 5,
            last: Box::new(status(503)),
        };
        let msg = e.to_string();
        assert!(msg.contains("https://cdn.example/p"), "{msg}");
        assert!(msg.contains(&id.to_hex()), "{msg}");
        assert!(msg.contains("gave up after 2.0 s"), "{msg}");
        assert!(msg.contains("HTTP 503"), "{msg}");
        assert!(!e.is_transient());
    }

    #[derive(Debug, thiserror::Error)]
    #[error("outer: {0}")]
    struct Repeats(#[source] std::io::Error);

    #[derive(Debug, thiserror::Error)]
    #[error("wrapper")]
    struct Wraps(#[source] Repeats);

    #[test]
    fn chains_show_root_causes_once() {
        let io = || std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        assert_eq!(chain(&Repeats(io())), "outer: refused");
        assert_eq!(chain(&Wraps(Repeats(io()))), "wrapper: outer: refused");
        let e = StoreError::Transport {
            store: "http://h/p".into(),
            what: ChunkId([2; 32]).into(),
            op: Op::Exists,
            kind: TransportKind::Connect,
            cause: Box::new(Wraps(Repeats(io()))),
        };
        assert!(e.is_transient());
        assert!(
            e.to_string()
                .ends_with("exists: cannot connect: wrapper: outer: refused"),
            "{e}"
        );
    }
}
