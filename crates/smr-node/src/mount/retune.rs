//! Back to the normal loop settings once a start served from a startup
//! pack is over.
//!
//! A start that is served from a startup pack reads with a small
//! readahead (see [`super::STARTUP_READAHEAD_KB`]), so that it asks for
//! the blocks the pack holds. Later reads are another workload: a program
//! that reads large files does better with the normal settings (a larger
//! readahead). The start counts as over once, after it got under way (the
//! caller says when: for a startup pack, once the kernel has read a
//! quarter of the pack's bytes from the device, [`pack_start_under_way`],
//! which mounting the filesystem alone never does, however long the
//! container takes to come), the image has gone [`START_QUIET`] without a
//! read, or [`START_MAX`] after it got under way, whichever comes first.
//! Files opened before then keep the readahead they were opened with (the
//! kernel takes it at open).

use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::kernel::{loop_backing_file, set_read_ahead_kb, LoopOptions};
use super::{loopdev, Result};

/// How long the image must go without a read for its start to be over.
pub const START_QUIET: Duration = Duration::from_secs(1);
/// How long after it got under way the start is over at the latest.
pub const START_MAX: Duration = Duration::from_secs(30);
/// How often the watcher looks at the read counter.
const POLL: Duration = Duration::from_millis(100);

/// Sets loop device `dev`'s readahead and direct I/O to `opts`'. Returns
/// `false`, changing nothing, unless `file` is still behind `dev` (a
/// device freed meanwhile may serve another image by now).
pub fn retune_loop(dev: &str, file: &std::path::Path, opts: LoopOptions) -> Result<bool> {
    // Held open, the device keeps its file until both settings are made,
    // so the check below still holds when they are.
    let Some(fd) = loopdev::open_loop(dev, file)? else {
        return Ok(false);
    };
    if loop_backing_file(dev).as_deref() != Some(file) {
        return Ok(false);
    }
    set_read_ahead_kb(dev, opts.readahead_kb)?;
    loopdev::set_direct_io(fd.as_fd(), dev, file, opts.direct_io)?;
    Ok(true)
}

/// Bytes the kernel has read from block device `dev` (`/dev/loop3`, say),
/// from its `stat` in sysfs; `None` if that cannot be read.
pub fn device_read_bytes(dev: &str) -> Option<u64> {
    let name = std::path::Path::new(dev).file_name()?.to_str()?;
    let stat = std::fs::read_to_string(format!("/sys/block/{name}/stat")).ok()?;
    // Reads completed, reads merged, sectors read (of 512 bytes), ...
    let sectors: u64 = stat.split_whitespace().nth(2)?.parse().ok()?;
    Some(sectors.saturating_mul(512))
}

/// The bytes read from loop device `dev` since its counter stood at
/// `since` ([`device_read_bytes`]; a device's counters outlive its
/// attachments) once a start served from a startup pack of `pack_bytes`
/// is under way: the kernel has read a quarter of the pack's bytes from
/// the device (far more than mounting the filesystem reads), however they
/// were served (from the pack, from the page cache the pack was stored in,
/// from a warm cache). `None` before then, and without a pack.
pub fn pack_start_under_way(dev: &str, since: u64, pack_bytes: u64) -> Option<u64> {
    let read = device_read_bytes(dev)?.saturating_sub(since);
    (pack_bytes > 0 && read.saturating_mul(4) >= pack_bytes).then_some(read)
}

/// When to retune: the image's read counter and how long to wait.
#[derive(Debug, Clone, Copy)]
pub struct StartEnd {
    /// The start is over after this long without a read.
    pub quiet: Duration,
    /// ... or this long after it got under way, whichever comes first.
    pub max: Duration,
}

impl Default for StartEnd {
    fn default() -> Self {
        StartEnd {
            quiet: START_QUIET,
            max: START_MAX,
        }
    }
}

/// A running [`retune_after_start`]: dropping it stops the watch and waits
/// for its thread, which then changes nothing more (a retune under way is
/// finished first).
#[derive(Debug)]
pub struct RetuneWatch {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl RetuneWatch {
    /// Waits until the watch has retuned the device, or given up.
    pub fn join(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for RetuneWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

/// Watches `reads` (a counter of the image's reads, `None` while the
/// start is not under way) in a thread; once the start is over (see
/// `end`), retunes the loop device that `target` names (with the options
/// to set; `None` while it is not known yet) if `file` is still behind
/// it. Logs the outcome.
pub fn retune_after_start(
    reads: impl Fn() -> Option<u64> + Send + 'static,
    file: PathBuf,
    target: impl Fn() -> Option<(String, LoopOptions)> + Send + 'static,
    end: StartEnd,
) -> std::io::Result<RetuneWatch> {
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = stop.clone();
    let thread = std::thread::Builder::new()
        .name("smr-retune".into())
        .spawn(move || {
            // (reads so far, when they last changed, when the start got
            // under way)
            let mut seen: Option<(u64, Instant, Instant)> = None;
            loop {
                std::thread::park_timeout(POLL);
                if stopped.load(Ordering::Relaxed) {
                    return;
                }
                let Some(now) = reads() else {
                    continue;
                };
                let (last, since, began) =
                    seen.get_or_insert((now, Instant::now(), Instant::now()));
                if now != *last {
                    (*last, *since) = (now, Instant::now());
                }
                if since.elapsed() < end.quiet && began.elapsed() < end.max {
                    continue;
                }
                let began = *began;
                let Some((dev, opts)) = target() else {
                    continue;
                };
                match retune_loop(&dev, &file, opts) {
                    Ok(true) => tracing::info!(
                        dev,
                        readahead_kb = opts.readahead_kb,
                        direct_io = opts.direct_io,
                        after = ?began.elapsed(),
                        "start over: loop device back to its normal settings"
                    ),
                    Ok(false) => tracing::debug!(dev, "loop device gone before its retune"),
                    Err(e) => tracing::warn!(dev, error = %e, "retuning the loop device"),
                }
                return;
            }
        })?;
    Ok(RetuneWatch {
        stop,
        thread: Some(thread),
    })
}
