//! A blob as a `std::io::Read`: an async task on the shared network runtime
//! pulls the blob's byte stream and hands chunks through a small bounded
//! channel to the reading thread, so at most a few chunks are in memory
//! whatever the blob's size. A transient failure mid-stream resumes with an
//! HTTP Range request at the first missing byte; the reader sees an error
//! only when retries are exhausted.
//!
//! The requests are the client's own (its connection pool and cached
//! credentials, as for manifests and ranged reads), so opening a blob
//! costs one round trip on a warm connection. The bytes are not verified
//! here: callers verify the digest (`VerifyingReader`).

use super::classify::{from_reqwest, from_status, retry_after};
use super::core::{Core, Step};
use crate::error::RegistryError;
use bytes::{Buf, Bytes};
use futures::StreamExt;
use oci_client::RegistryOperation::Pull;
use reqwest::header::{HeaderMap, HeaderValue, RANGE};
use reqwest::{Method, StatusCode};
use std::io::{self, Read};
use std::sync::Arc;
use tokio::sync::mpsc;

/// Chunks buffered between the network task and the reader (reqwest
/// chunks are at most a few tens of KiB).
const CHANNEL_CHUNKS: usize = 16;

/// What the network task sends: bytes, the end, or the error that ended it.
type Msg = Result<Option<Bytes>, RegistryError>;

/// A blob being streamed from a registry. Reading must happen outside the
/// network runtime (a plain or `spawn_blocking` thread), as for every
/// other sync entry point of this crate. Dropping it stops the transfer.
pub struct BlobReader {
    rx: mpsc::Receiver<Msg>,
    cur: Bytes,
    done: bool,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for BlobReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobReader")
            .field("buffered", &self.cur.len())
            .field("done", &self.done)
            .finish()
    }
}

impl BlobReader {
    /// Starts streaming blob `digest` of `repo`.
    pub(crate) fn start(core: Arc<Core>, repo: String, digest: String) -> BlobReader {
        let (tx, rx) = mpsc::channel(CHANNEL_CHUNKS);
        let task = smr_store::runtime::handle().spawn(pump(core, repo, digest, tx));
        BlobReader {
            rx,
            cur: Bytes::new(),
            done: false,
            task,
        }
    }

    /// Waits for the first chunk (or the end, or the error that ended the
    /// transfer before any bytes came).
    pub(crate) fn prime(&mut self) -> Result<(), RegistryError> {
        match self.rx.blocking_recv() {
            Some(Ok(Some(b))) => self.cur = b,
            Some(Ok(None)) => self.done = true,
            Some(Err(e)) => {
                self.done = true;
                return Err(e);
            }
            None => {
                self.done = true;
                return Err(RegistryError::Io {
                    what: "registry stream".into(),
                    source: io::Error::other("stream task ended without a result"),
                });
            }
        }
        Ok(())
    }
}

impl Read for BlobReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            if !self.cur.is_empty() {
                let n = buf.len().min(self.cur.len());
                buf[..n].copy_from_slice(&self.cur[..n]);
                self.cur.advance(n);
                return Ok(n);
            }
            if self.done {
                return Ok(0);
            }
            match self.rx.blocking_recv() {
                Some(Ok(Some(b))) => self.cur = b,
                Some(Ok(None)) => {
                    self.done = true;
                    return Ok(0);
                }
                Some(Err(e)) => {
                    self.done = true;
                    return Err(to_io(e));
                }
                None => {
                    self.done = true;
                    return Err(io::Error::other(
                        "registry stream task ended without a result",
                    ));
                }
            }
        }
    }
}

impl Drop for BlobReader {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A [`RegistryError`] as an `io::Error` (downcast the inner error to get
/// it back): `InvalidData` for digest mismatches, `TimedOut` for transient
/// failures, `NotFound`, `PermissionDenied`, else `Other`. Never
/// `Interrupted`, which readers would silently retry.
pub fn to_io(e: RegistryError) -> io::Error {
    let kind = match &e {
        RegistryError::DigestMismatch { .. } => io::ErrorKind::InvalidData,
        RegistryError::Transient { .. } => io::ErrorKind::TimedOut,
        RegistryError::NotFound { .. } => io::ErrorKind::NotFound,
        RegistryError::Auth { .. } => io::ErrorKind::PermissionDenied,
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, e)
}

/// The network side: fetch, forward, resume after transient failures.
async fn pump(core: Arc<Core>, repo: String, digest: String, tx: mpsc::Sender<Msg>) {
    let ctx = core.ctx(&repo, format!("GET blob {digest}"));
    let rest = format!("blobs/{digest}");
    let mut offset = 0u64;
    let mut tries = 0u32;
    let mut refreshed = false;
    loop {
        tries += 1;
        let mut headers = HeaderMap::new();
        if offset > 0 {
            if let Ok(v) = HeaderValue::from_str(&format!("bytes={offset}-")) {
                headers.insert(RANGE, v);
            }
        }
        let opened = core
            .raw_with(Method::GET, &repo, &rest, headers, Pull, &ctx)
            .await
            .and_then(|resp| match resp.status() {
                StatusCode::PARTIAL_CONTENT if offset > 0 => Ok((resp, 0)),
                // From the start, or the server ignored the range: skip
                // what we have.
                StatusCode::OK => Ok((resp, offset)),
                s => Err(from_status(s, retry_after(resp.headers()), b"", &ctx)),
            });
        let err = match opened {
            Err(e) => e,
            Ok((resp, mut skip)) => {
                let mut stream = resp.bytes_stream();
                let mut failed = None;
                while let Some(item) = stream.next().await {
                    match item {
                        Ok(mut b) => {
                            let drop_n = skip.min(b.len() as u64) as usize;
                            b.advance(drop_n);
                            skip -= drop_n as u64;
                            if b.is_empty() {
                                continue;
                            }
                            offset += b.len() as u64;
                            // Progress: the next failure starts a new count
                            // (and may refresh an expired token again).
                            tries = 0;
                            refreshed = false;
                            if tx.send(Ok(Some(b))).await.is_err() {
                                return; // the reader is gone
                            }
                        }
                        Err(e) => {
                            failed = Some(from_reqwest(&e, &ctx));
                            break;
                        }
                    }
                }
                match failed {
                    None => {
                        let _ = tx.send(Ok(None)).await;
                        return;
                    }
                    Some(e) => e,
                }
            }
        };
        match core
            .next_step(&repo, Pull, &ctx, &err, tries.max(1), &mut refreshed)
            .await
        {
            Step::Retry => {
                tracing::debug!(repo = %ctx.repo, %digest, offset, "resuming blob stream");
            }
            Step::RetryAfterRefresh => tries = tries.saturating_sub(1),
            Step::Fail(e) => {
                let _ = tx.send(Err(core.finish(e.unwrap_or(err)))).await;
                return;
            }
        }
    }
}
