//! Transmission phase: read requests, run them concurrently (a read the
//! device answers at once in the request's task, the rest on the blocking
//! pool), send replies (possibly out of order) through one serialized
//! writer.

use std::io::{self, IoSlice};
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Mutex, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use super::conns::{Activity, Busy};
use super::handshake::Session;
use super::proto::*;
use super::server::{wait_shutdown, Budget, ServerConfig, Shutdown};
use super::{NbdError, Result};
use crate::device::{BlockDevice, ReadPart};

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
    /// Write one complete reply (any number of parts) without interleaving,
    /// with as few system calls as the socket takes (vectored writes).
    async fn send(&self, parts: &[&[u8]]) {
        let mut slices: Vec<IoSlice<'_>> = parts.iter().map(|p| IoSlice::new(p)).collect();
        let mut w = self.writer.lock().await;
        let res = write_all_vectored(&mut *w, &mut slices).await;
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

/// Writes all of `bufs` (the slices are consumed).
async fn write_all_vectored<W: AsyncWrite + Unpin + ?Sized>(
    w: &mut W,
    mut bufs: &mut [IoSlice<'_>],
) -> io::Result<()> {
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        let n = w.write_vectored(bufs).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut bufs, n);
    }
    Ok(())
}

/// Bytes of requests read from the socket at a time.
const REQUEST_BUFFER: usize = 8 << 10;

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
    reader: R,
    writer: W,
    session: Session,
    config: &ServerConfig,
    budget: &Budget,
    mut shutdown: Shutdown,
    activity: Arc<Activity>,
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
    // Clients send requests back to back: read them a buffer at a time
    // rather than with one system call per 28-byte header.
    let mut reader = tokio::io::BufReader::with_capacity(REQUEST_BUFFER, reader);
    let requests = Arc::new(Semaphore::new(config.max_in_flight.max(1)));
    // Bytes of READ/WRITE buffers in flight; a request larger than the
    // whole budget waits for all of it.
    let conn_budget = config.max_in_flight_bytes.clamp(1, Semaphore::MAX_PERMITS);
    let bytes = Arc::new(Semaphore::new(conn_budget));
    let mut tasks = JoinSet::new();
    let result = loop {
        while let Some(done) = tasks.try_join_next() {
            log_task_end(done);
        }
        let mut head = [0u8; REQUEST_LEN];
        let got = tokio::select! {
            r = reader.read_exact(&mut head) => r,
            _ = wait_shutdown(&mut shutdown) => break Ok(()),
            _ = activity.closed() => break Ok(()),
            _ = idle_expired(&activity, config.idle_timeout) => {
                tracing::debug!(export = %ctx.export, "NBD connection idle too long; closing");
                break Ok(());
            }
        };
        activity.touch();
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
        // This connection's share first, then the server's: a connection
        // waiting for its own budget never holds server-wide permits.
        let permits = Permits {
            _busy: activity.begin(),
            _request: acquire(&requests, 1).await,
            _bytes: acquire(&bytes, buffer.min(conn_budget)).await,
            _server_request: acquire(&budget.requests, 1).await,
            _server_bytes: acquire(&budget.bytes, buffer.min(budget.max_bytes)).await,
        };
        let ctx = ctx.clone();
        let cookie = req.cookie;
        match command {
            // Handled above, before taking permits.
            Command::Disconnect => break Ok(()),
            Command::Read { offset, len, df } => {
                tasks.spawn(async move { read(ctx, cookie, offset, len, df, permits).await });
            }
            Command::Write { offset, len, fua } => {
                // `len` was checked against MAX_BLOCK_SIZE by `validate`.
                let mut data = vec![0u8; len as usize];
                if let Err(e) = reader.read_exact(&mut data).await {
                    break Err(NbdError::Io(e));
                }
                tasks.spawn(async move {
                    let r = blocking(&ctx.device, move |d| {
                        d.write_at(offset, &data)?;
                        durable(d, fua)
                    })
                    .await;
                    reply_status(&ctx, cookie, r.map_err(|e| (write_errno(&e), e)), "write").await;
                    drop(permits);
                });
            }
            Command::Trim { offset, len, fua } | Command::WriteZeroes { offset, len, fua } => {
                let zero = matches!(command, Command::WriteZeroes { .. });
                tasks.spawn(async move {
                    let len = u64::from(len);
                    let r = blocking(&ctx.device, move |d| {
                        if zero {
                            d.write_zeroes(offset, len)?;
                        } else {
                            d.trim(offset, len)?;
                        }
                        durable(d, fua)
                    })
                    .await;
                    let what = if zero { "write zeroes" } else { "trim" };
                    reply_status(&ctx, cookie, r.map_err(|e| (write_errno(&e), e)), what).await;
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

/// With `fua` (`NBD_CMD_FLAG_FUA`), makes the request's effect durable
/// before it is answered.
fn durable(d: &dyn BlockDevice, fua: bool) -> io::Result<()> {
    if fua {
        d.flush()?;
    }
    Ok(())
}

/// Resolves once the connection has been idle (nothing in flight, nothing
/// received) for `timeout`; never without one.
async fn idle_expired(activity: &Activity, timeout: Option<std::time::Duration>) {
    let Some(timeout) = timeout else {
        return std::future::pending().await;
    };
    loop {
        let wait = match activity.idle_for() {
            Some(idle) if idle >= timeout => return,
            Some(idle) => timeout - idle,
            None => timeout,
        };
        tokio::time::sleep(wait).await;
    }
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

/// What a request holds while it runs and until its reply is written.
struct Permits {
    _busy: Busy,
    _request: Option<OwnedSemaphorePermit>,
    _bytes: Option<OwnedSemaphorePermit>,
    _server_request: Option<OwnedSemaphorePermit>,
    _server_bytes: Option<OwnedSemaphorePermit>,
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

/// Zeros for simple replies and `DF` reads of holes.
static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

/// `n` zero bytes as slices of [`ZEROS`].
fn zero_slices(mut n: usize, out: &mut Vec<IoSlice<'static>>) {
    while n > 0 {
        let take = n.min(ZEROS.len());
        out.push(IoSlice::new(&ZEROS[..take]));
        n -= take;
    }
}

/// Whether the parts cover exactly `len` bytes.
fn parts_cover(parts: &[ReadPart], len: u32) -> bool {
    parts.iter().map(|p| p.len() as u64).sum::<u64>() == u64::from(len)
}

/// How a read's reply is framed: runs of data parts (one data chunk each)
/// and zero parts (one hole chunk each), or everything as data.
fn reply_runs(parts: &[ReadPart], holes: bool) -> Vec<(usize, bool, std::ops::Range<usize>)> {
    // (byte length, is_hole, range of parts)
    let mut runs: Vec<(usize, bool, std::ops::Range<usize>)> = Vec::new();
    for (i, p) in parts.iter().enumerate() {
        if p.is_empty() {
            continue;
        }
        let hole = holes && matches!(p, ReadPart::Zero(_));
        match runs.last_mut() {
            Some(last) if last.1 == hole => {
                last.0 += p.len();
                last.2.end = i + 1;
            }
            _ => runs.push((p.len(), hole, i..i + 1)),
        }
    }
    runs
}

async fn read<W: AsyncWrite + Unpin>(
    ctx: Ctx<W>,
    cookie: u64,
    offset: u64,
    len: u32,
    df: bool,
    permits: Permits,
) {
    let r = match ctx.device.read_parts_now(offset, len as usize) {
        Some(r) => r,
        None => blocking(&ctx.device, move |d| d.read_parts(offset, len as usize)).await,
    };
    let parts = match r {
        Ok(p) if parts_cover(&p, len) => p,
        Ok(p) => {
            let got: u64 = p.iter().map(|p| p.len() as u64).sum();
            tracing::error!(export = %ctx.export, offset, len, got, "device returned the wrong number of bytes");
            ctx.send_error(cookie, EIO, "read failed").await;
            return;
        }
        Err(e) => {
            tracing::warn!(export = %ctx.export, offset, len, error = %e, "NBD read failed");
            ctx.send_error(cookie, EIO, "read failed").await;
            return;
        }
    };
    let holes = ctx.structured && !df;
    let runs = reply_runs(&parts, holes);
    let mut heads: Vec<u8> = Vec::with_capacity(32 * runs.len().max(1));
    if !ctx.structured {
        heads.extend_from_slice(&simple_reply(cookie, 0));
    } else {
        let mut at = offset;
        for (i, (l, hole, _)) in runs.iter().enumerate() {
            let flags = if i + 1 == runs.len() {
                REPLY_FLAG_DONE
            } else {
                0
            };
            // `l` <= `len`, a u32.
            let l32 = u32::try_from(*l).unwrap_or(u32::MAX);
            if *hole {
                heads.extend_from_slice(&structured_hole(flags, cookie, at, l32));
            } else {
                heads.extend_from_slice(&structured_data_header(flags, cookie, at, l32));
            }
            at += *l as u64;
        }
    }
    // Interleave headers and data as IoSlices; header sizes are fixed per kind.
    let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(2 * runs.len() + parts.len());
    let mut h = 0usize;
    if !ctx.structured {
        slices.push(IoSlice::new(&heads[..16]));
    }
    for (_, hole, range) in &runs {
        if ctx.structured {
            let n = if *hole { 32 } else { 28 };
            slices.push(IoSlice::new(&heads[h..h + n]));
            h += n;
        }
        if *hole {
            continue;
        }
        for p in &parts[range.clone()] {
            match p.data() {
                Some(d) => slices.push(IoSlice::new(d)),
                None => {
                    let mut z = Vec::new();
                    zero_slices(p.len(), &mut z);
                    slices.extend(z);
                }
            }
        }
    }
    {
        let mut w = ctx.writer.lock().await;
        let res = write_all_vectored(&mut *w, &mut slices).await;
        if let Err(e) = res.and(w.flush().await) {
            tracing::debug!(export = %ctx.export, error = %e, "NBD reply not delivered");
        }
    }
    drop(parts);
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
