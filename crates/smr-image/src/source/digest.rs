//! Digest parsing and verification of blob bytes as they stream by.

use super::{ImageSource, Result, SourceError};
use sha2::{Digest as _, Sha256};
use std::io::{self, Read};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Checks that `digest` is `sha256:<64 lowercase hex>` and returns the hex.
///
/// Sources use the hex as a file name, so this is also what keeps a hostile
/// digest (`sha256:../../x`) from naming a path outside the blob store.
pub fn parse_digest(digest: &str) -> Result<&str> {
    match digest.strip_prefix("sha256:") {
        Some(hex)
            if hex.len() == 64
                && hex
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) =>
        {
            Ok(hex)
        }
        _ => Err(SourceError::InvalidDigest {
            digest: digest.to_string(),
        }),
    }
}

/// `sha256:<hex>` of `data`.
pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// A reader that hashes what passes through it and, at end of stream, fails
/// with [`SourceError::DigestMismatch`] (or [`SourceError::SizeMismatch`])
/// wrapped in an `io::Error` of kind `InvalidData` if the bytes are not the
/// expected ones. Reading more than the expected size fails at once.
pub struct VerifyingReader<R> {
    inner: R,
    hasher: Sha256,
    digest: String,
    size: Option<u64>,
    read: u64,
    counter: Arc<AtomicU64>,
    verified: bool,
}

impl<R: Read> VerifyingReader<R> {
    /// Verifies `inner` against `digest` and, if given, `size`.
    pub fn new(inner: R, digest: &str, size: Option<u64>) -> Self {
        VerifyingReader {
            inner,
            hasher: Sha256::new(),
            digest: digest.to_string(),
            size,
            read: 0,
            counter: Arc::new(AtomicU64::new(0)),
            verified: false,
        }
    }

    /// A shared counter of the bytes read so far (for progress reports).
    pub fn counter(&self) -> Arc<AtomicU64> {
        self.counter.clone()
    }

    fn fail(&self, e: SourceError) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }
}

impl<R: Read> Read for VerifyingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let n = self.inner.read(buf)?;
        if n > 0 {
            self.read += n as u64;
            self.counter.fetch_add(n as u64, Ordering::Relaxed);
            if let Some(size) = self.size.filter(|s| self.read > *s) {
                return Err(self.fail(SourceError::SizeMismatch {
                    digest: self.digest.clone(),
                    expected: size,
                    actual: self.read,
                }));
            }
            self.hasher.update(&buf[..n]);
            return Ok(n);
        }
        if !self.verified {
            self.verified = true;
            if let Some(size) = self.size.filter(|s| self.read != *s) {
                return Err(self.fail(SourceError::SizeMismatch {
                    digest: self.digest.clone(),
                    expected: size,
                    actual: self.read,
                }));
            }
            let actual = format!("sha256:{}", hex::encode(self.hasher.clone().finalize()));
            if actual != self.digest {
                return Err(self.fail(SourceError::DigestMismatch {
                    digest: self.digest.clone(),
                    actual,
                }));
            }
        }
        Ok(0)
    }
}

/// The [`SourceError`] carried inside an `io::Error` made by this module (or
/// by [`crate::layer`]), if there is one.
pub fn source_error_in(e: io::Error) -> std::result::Result<SourceError, io::Error> {
    if !e.get_ref().is_some_and(|inner| inner.is::<SourceError>()) {
        return Err(e);
    }
    let kind = e.kind();
    match e.into_inner().map(|inner| inner.downcast::<SourceError>()) {
        Some(Ok(se)) => Ok(*se),
        Some(Err(other)) => Err(io::Error::new(kind, other)),
        None => Err(io::Error::from(kind)),
    }
}

/// Largest manifest, index or config blob we read into memory.
pub const JSON_BLOB_LIMIT: u64 = 32 << 20;

/// Reads a whole small blob (manifest, index, config), verifying digest and
/// size; refuses blobs over [`JSON_BLOB_LIMIT`].
pub fn read_verified(src: &dyn ImageSource, digest: &str, size: Option<u64>) -> Result<Vec<u8>> {
    parse_digest(digest)?;
    let too_large = || SourceError::TooLarge {
        what: format!("blob {digest}"),
        limit: JSON_BLOB_LIMIT,
    };
    if size.is_some_and(|s| s > JSON_BLOB_LIMIT) {
        return Err(too_large());
    }
    let blob = src.open_blob(digest)?;
    let mut r = VerifyingReader::new(blob.take(JSON_BLOB_LIMIT + 1), digest, size);
    let mut out = Vec::new();
    if let Err(e) = r.read_to_end(&mut out) {
        return Err(match source_error_in(e) {
            Ok(se) => se,
            Err(e) => SourceError::Io {
                path: format!("blob {digest} of {}", src.describe()).into(),
                source: e,
            },
        });
    }
    if out.len() as u64 > JSON_BLOB_LIMIT {
        return Err(too_large());
    }
    Ok(out)
}
