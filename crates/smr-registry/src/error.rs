//! Errors talking to a registry. Messages name the registry, repository and
//! digest or tag involved, and never contain credentials.

/// Result alias for this crate.
pub type Result<T, E = RegistryError> = std::result::Result<T, E>;

/// What went wrong talking to a registry.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// A reference that is not `[docker://]host[:port]/name[:tag][@digest]`.
    #[error("bad registry reference `{reference}`: {reason}")]
    BadReference {
        /// The reference as given.
        reference: String,
        /// Why it was rejected.
        reason: String,
    },
    /// The registry refused our credentials (or demanded some we lack).
    #[error("{registry}: authentication failed: {reason}")]
    Auth {
        /// The registry host.
        registry: String,
        /// What the registry or the token service said (no secrets).
        reason: String,
    },
    /// Smr artifacts exist for an image, but the caller's policy refused
    /// every one.
    #[error("{repo}: no trusted smr artifact for {subject}; refused: {refused}")]
    NoTrustedArtifact {
        /// `host/name` of the repository.
        repo: String,
        /// The image manifest digest.
        subject: String,
        /// Each candidate's digest and why it was refused.
        refused: String,
    },
    /// A manifest, tag or blob does not exist.
    #[error("{repo}: {what} not found")]
    NotFound {
        /// `host/name` of the repository.
        repo: String,
        /// What was looked up, e.g. `blob sha256:…` or `manifest bookworm`.
        what: String,
    },
    /// The registry answered, but not as the spec says it should.
    #[error("{repo}: {what}: {reason}")]
    Protocol {
        /// `host/name` of the repository.
        repo: String,
        /// What was being done, e.g. `GET blob sha256:…`.
        what: String,
        /// What was wrong with the answer.
        reason: String,
    },
    /// A network or server error that may go away: connection refused or
    /// reset, a timeout, 5xx, 429.
    #[error("{repo}: {what}: {reason}")]
    Transient {
        /// `host/name` of the repository.
        repo: String,
        /// What was being done.
        what: String,
        /// The underlying error.
        reason: String,
        /// Seconds the server asked us to wait (429/503 `Retry-After`).
        retry_after: Option<u64>,
    },
    /// Bytes that do not match their digest.
    #[error("{repo}: {what}: digest mismatch: got {actual}")]
    DigestMismatch {
        /// `host/name` of the repository.
        repo: String,
        /// What was fetched, e.g. `blob sha256:…`.
        what: String,
        /// The digest of what arrived.
        actual: String,
    },
    /// JSON that does not parse as the expected document.
    #[error("{what}: {source}")]
    Json {
        /// The document, e.g. `manifest sha256:…`.
        what: String,
        /// The parse error.
        source: serde_json::Error,
    },
    /// A local I/O error (reading docker config, a staging store).
    #[error("{what}: {source}")]
    Io {
        /// What was being read or written.
        what: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// `--creds` that are not `USER:PASS` (the input is not echoed).
    #[error("bad credentials: {reason}")]
    BadCredentials {
        /// What is wrong with them.
        reason: String,
    },
    /// The HTTP client for a registry could not be set up (TLS backend,
    /// bad option).
    #[error("{registry}: setting up the HTTP client: {reason}")]
    ClientSetup {
        /// The registry host.
        registry: String,
        /// The underlying error.
        reason: String,
    },
    /// A chunk store error while pushing or serving chunks.
    #[error(transparent)]
    Store(#[from] smr_store::StoreError),
    /// A pack layout that cannot be planned, or a pack index that does not
    /// decode.
    #[error("{what}: {source}")]
    Pack {
        /// What was being planned or decoded, e.g. `pack index sha256:…`.
        what: String,
        /// What is wrong with it.
        source: crate::pack::PackError,
    },
    /// A manifest or referrers entry that is not an smr artifact as smr
    /// writes it, or does not belong to the expected subject.
    #[error("{repo}: smr artifact {manifest}: {reason}")]
    BadArtifact {
        /// `host/name` of the repository.
        repo: String,
        /// Digest (or tag) of the manifest or index at fault.
        manifest: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A recipe or chunk that does not fit what it is pushed or served
    /// with (undecodable recipe, chunk hash or length mismatch).
    #[error("{what}: {source}")]
    Format {
        /// The recipe or chunk, e.g. `recipe sha256:…`, `chunk <id>`.
        what: String,
        /// What is wrong with it.
        source: smr_format::FormatError,
    },
}

impl RegistryError {
    /// Whether retrying the same request later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, RegistryError::Transient { .. })
    }

    /// Seconds the server asked us to wait before retrying, if it did.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            RegistryError::Transient { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}
