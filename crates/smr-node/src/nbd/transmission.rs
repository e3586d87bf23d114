//! Transmission phase: read requests, run them concurrently on the blocking
//! pool, send replies (possibly out of order) through one serialized writer.

use std::io;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Mutex, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use super::device::BlockDevice;
use super::handshake::Session;
use super::proto::*;
use super::server::{wait_shutdown, ServerConfig, Shutdown};
use super::{NbdError, Result};

/// Everything a request task needs; cheap to clone.
struct Ctx<W> {
    writer: Arc<Mutex<W>>,
    device: Arc<dyn BlockDevice>,
    export: Arc<str>,
    structured: bool,
}

impl<W> Clone for Ctx<W> {
    fn clone(&self) -> Self {
        Self {
            writer: self.writer.clone(),
            device: self.device.clone(),
            export: self.export.clone(),
            structured: self.structured,
        }
    }
}

impl<W: AsyncWrite + Unpin> Ctx<W> {
    /// Write one complete reply (any number of parts) without interleaving.
    async fn send(&self, parts: &[&[u8]]) {
        let mut w = self.writer.lock().await;
        let mut res = Ok(());
        for p in parts {
            res = w.write_all(p).await;
            if res.is_err() {
                break;
            }
        }
        if let Err(e) = res.and(w.flush().await) {
            tracing::debug!(export = %self.export, error = %e, "NBD reply not delivered");
        }
    }

    /// Error reply: a structured error chunk when structured replies were
    /// negotiated (mandatory for READ, preferred for the rest), else a
    /// simple reply.
    async fn send_error(&self, cookie: u64, errno: u32, message: &str) {
        if self.structured {
            self.send(&[&structured_error(cookie, errno, message)])
                .await;
        } else {
            self.send(&[&simple_reply(cookie, errno)]).await;
        }
    }

    async fn send_ok(&self, cookie: u64) {
        self.send(&[&simple_reply(cookie, 0)]).await;
    }
}

/// Run `f` against the device on the blocking pool; a panic in the device
/// becomes an I/O error.
async fn blocking<T: Send + 'static>(
    device: &Arc<dyn BlockDevice>,
    f: impl FnOnce(&dyn BlockDevice) -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    let device = device.clone();
    match tokio::task::spawn_blocking(move || f(device.as_ref())).await {
        Ok(r) => r,
        Err(e) => Err(io::Error::other(format!("device task failed: {e}"))),
    }
}

/// NBD error code for a failed write or flush.
fn write_errno(e: &io::Error) -> u32 {
    match (e.kind(), e.raw_os_error()) {
        (io::ErrorKind::PermissionDenied, _) => EPERM,
        (_, Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG)) => ENOSPC,
        _ => EIO,
    }
}

/// Serve requests until the client disconnects, breaks the protocol, or the
/// server shuts down. In-flight requests are always answered first.
pub(crate) async fn serve<R, W>(
    mut reader: R,
    writer: W,
    session: Session,
    config: &ServerConfig,
    mut shutdown: Shutdown,
) -> Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Send + Unpin + 'static,
{
    let limits = Limits {
        size: session.export.device.size(),
        read_only: session.export.device.read_only(),
        structured: session.structured,
        block_status: session.block_status,
    };
    let ctx = Ctx {
        writer: Arc::new(Mutex::new(writer)),
        device: session.export.device.clone(),
        export: Arc::from(session.export.name.as_str()),
        structured: session.structured,
    };
    let requests = Arc::new(Semaphore::new(config.max_in_flight.max(1)));
    // Bytes of READ/WRITE buffers in flight; a single request may use the
    // whole budget (budget is at least one max-size request).
    let budget = config.max_in_flight_bytes.max(MAX_BLOCK_SIZE as usize);
    let bytes = Arc::new(Semaphore::new(budget));
    let mut tasks = JoinSet::new();
    let result = loop {
        while let Some(done) = tasks.try_join_next() {
            log_task_end(done);
        }
        let mut head = [0u8; REQUEST_LEN];
        let got = tokio::select! {
            r = reader.read_exact(&mut head) => r,
            _ = wait_shutdown(&mut shutdown) => break Ok(()),
        };
        match got {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break Ok(()),
            Err(e) => break Err(NbdError::Io(e)),
        }
        let req = match Request::parse(&head) {
            Ok(r) => r,
            Err(e) => break Err(e.into()),
        };
        let command = match validate(&req, &limits) {
            Ok(c) => c,
            Err(rej) => {
                if let Err(e) = skip_payload(&mut reader, rej.skip).await {
                    break Err(e);
                }
                tracing::debug!(export = %ctx.export, ?req, errno = rej.errno, "NBD request refused");
                ctx.send_error(req.cookie, rej.errno, refusal_message(rej.errno))
                    .await;
                continue;
            }
        };
        let buffer = match command {
            Command::Disconnect => break Ok(()),
            Command::Read { len, .. } | Command::Write { len, .. } => len as usize,
            _ => 0,
        };
        let permits = Permits {
            _request: acquire(&requests, 1).await,
            _bytes: acquire(&bytes, buffer.min(budget)).await,
        };
        let ctx = ctx.clone();
        let cookie = req.cookie;
        match command {
            // Handled above, before taking permits.
            Command::Disconnect => break Ok(()),
            Command::Read { offset, len, df } => {
                tasks.spawn(async move { read(ctx, cookie, offset, len, df, permits).await });
            }
            Command::Write { offset, len } => {
                // `len` was checked against MAX_BLOCK_SIZE by `validate`.
                let mut data = vec![0u8; len as usize];
                if let Err(e) = reader.read_exact(&mut data).await {
                    break Err(NbdError::Io(e));
                }
                tasks.spawn(async move {
                    let r = blocking(&ctx.device, move |d| d.write_at(offset, &data)).await;
                    reply_status(&ctx, cookie, r.map_err(|e| (write_errno(&e), e)), "write").await;
                    drop(permits);
                });
            }
            Command::Flush => {
                tasks.spawn(async move {
                    let r = blocking(&ctx.device, |d| d.flush()).await;
                    reply_status(&ctx, cookie, r.map_err(|e| (write_errno(&e), e)), "flush").await;
                    drop(permits);
                });
            }
            Command::Cache { offset, len } => {
                tasks.spawn(async move {
                    let r =
                        blocking(&ctx.device, move |d| d.prefetch(offset, u64::from(len))).await;
                    reply_status(&ctx, cookie, r.map_err(|e| (EIO, e)), "prefetch").await;
                    drop(permits);
                });
            }
            Command::BlockStatus {
                offset,
                len,
                req_one,
            } => {
                tasks.spawn(async move {
                    block_status(&ctx, cookie, offset, len, req_one).await;
                    drop(permits);
                });
            }
        }
    };
    // Answer everything already accepted, then close our side.
    while let Some(done) = tasks.join_next().await {
        log_task_end(done);
    }
    let _ = ctx.writer.lock().await.shutdown().await;
    result
}

/// Human-readable text for an error chunk refusing a request.
fn refusal_message(errno: u32) -> &'static str {
    match errno {
        EPERM => "export is read-only",
        EOVERFLOW => "request larger than the maximum block size",
        ENOSPC => "write beyond the end of the export",
        _ => "invalid request (flags, length or range)",
    }
}

struct Permits {
    _request: Option<OwnedSemaphorePermit>,
    _bytes: Option<OwnedSemaphorePermit>,
}

async fn acquire(sem: &Arc<Semaphore>, n: usize) -> Option<OwnedSemaphorePermit> {
    let n = u32::try_from(n).unwrap_or(u32::MAX);
    if n == 0 {
        return None;
    }
    // The semaphores are never closed, so this only fails if they were.
    sem.clone().acquire_many_owned(n).await.ok()
}

fn log_task_end(done: std::result::Result<(), tokio::task::JoinError>) {
    if let Err(e) = done {
        tracing::error!(error = %e, "NBD request task failed");
    }
}

/// Read and drop `n` payload bytes of a refused request, without buffering
/// them, so the next header is found where the client put it.
async fn skip_payload<R: AsyncRead + Unpin>(reader: &mut R, n: u32) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    if n > MAX_BLOCK_SIZE {
        return Err(NbdError::PayloadTooLarge(n));
    }
    let copied = tokio::io::copy(&mut reader.take(u64::from(n)), &mut tokio::io::sink()).await?;
    if copied < u64::from(n) {
        return Err(NbdError::Io(io::ErrorKind::UnexpectedEof.into()));
    }
    Ok(())
}

async fn reply_status<W: AsyncWrite + Unpin>(
    ctx: &Ctx<W>,
    cookie: u64,
    r: std::result::Result<(), (u32, io::Error)>,
    what: &str,
) {
    match r {
        Ok(()) => ctx.send_ok(cookie).await,
        Err((errno, e)) => {
            tracing::warn!(export = %ctx.export, error = %e, "NBD {what} failed");
            ctx.send_error(cookie, errno, &format!("{what} failed"))
                .await;
        }
    }
}

/// Data of a read: the bytes (holes already zero) and, for structured
/// replies, the hole map as `(length, is_hole)` runs covering the buffer.
struct ReadData {
    buf: Vec<u8>,
    runs: Vec<(u32, bool)>,
}

/// Runs beyond this many are not worth separate chunks: read it all.
const MAX_READ_RUNS: usize = 64;

fn read_blocking(
    d: &dyn BlockDevice,
    offset: u64,
    len: u32,
    want_holes: bool,
) -> io::Result<ReadData> {
    let mut runs = vec![(len, false)];
    if want_holes {
        match d.block_status(offset, u64::from(len)) {
            Ok(r) => {
                let ex = extents_from_runs(&r, len, MAX_READ_RUNS);
                let covered: u64 = ex.iter().map(|e| u64::from(e.0)).sum();
                if covered == u64::from(len) && ex.len() < MAX_READ_RUNS {
                    runs = ex
                        .into_iter()
                        .map(|(l, f)| (l, f & STATE_HOLE != 0))
                        .collect();
                }
            }
            Err(e) => {
                tracing::debug!(offset, len, error = %e, "block status for read failed; reading all")
            }
        }
    }
    // Zeroed allocation: holes need no read.
    let mut buf = vec![0u8; len as usize];
    let mut at = 0usize;
    for &(l, hole) in &runs {
        let end = at + l as usize;
        if !hole {
            d.read_at(offset + at as u64, &mut buf[at..end])?;
        }
        at = end;
    }
    Ok(ReadData { buf, runs })
}

async fn read<W: AsyncWrite + Unpin>(
    ctx: Ctx<W>,
    cookie: u64,
    offset: u64,
    len: u32,
    df: bool,
    permits: Permits,
) {
    let want_holes = ctx.structured && !df;
    let r = blocking(&ctx.device, move |d| {
        read_blocking(d, offset, len, want_holes)
    })
    .await;
    let data = match r {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(export = %ctx.export, offset, len, error = %e, "NBD read failed");
            ctx.send_error(cookie, EIO, "read failed").await;
            return;
        }
    };
    if !ctx.structured {
        ctx.send(&[&simple_reply(cookie, 0), &data.buf]).await;
        return;
    }
    // Build every chunk header first, then write them with their data under
    // one lock so the reply is contiguous on the wire.
    let mut heads: Vec<Vec<u8>> = Vec::with_capacity(data.runs.len());
    let mut at = 0u32;
    for (i, &(l, hole)) in data.runs.iter().enumerate() {
        let flags = if i + 1 == data.runs.len() {
            REPLY_FLAG_DONE
        } else {
            0
        };
        let off = offset + u64::from(at);
        heads.push(if hole {
            structured_hole(flags, cookie, off, l).to_vec()
        } else {
            structured_data_header(flags, cookie, off, l).to_vec()
        });
        at += l;
    }
    let mut parts: Vec<&[u8]> = Vec::with_capacity(2 * heads.len());
    let mut at = 0usize;
    for (h, &(l, hole)) in heads.iter().zip(&data.runs) {
        parts.push(h);
        if !hole {
            parts.push(&data.buf[at..at + l as usize]);
        }
        at += l as usize;
    }
    ctx.send(&parts).await;
    drop(permits);
}

async fn block_status<W: AsyncWrite + Unpin>(
    ctx: &Ctx<W>,
    cookie: u64,
    offset: u64,
    len: u32,
    req_one: bool,
) {
    let r = blocking(&ctx.device, move |d| d.block_status(offset, u64::from(len))).await;
    match r {
        Ok(runs) => {
            let max = if req_one { 1 } else { MAX_DESCRIPTORS };
            let extents = extents_from_runs(&runs, len, max);
            ctx.send(&[&structured_block_status(
                cookie,
                BASE_ALLOCATION_ID,
                &extents,
            )])
            .await;
        }
        Err(e) => {
            tracing::warn!(export = %ctx.export, offset, len, error = %e, "NBD block status failed");
            ctx.send_error(cookie, EIO, "block status failed").await;
        }
    }
}
