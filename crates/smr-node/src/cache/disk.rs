//! The cache directory's layout, and the `flock`, checksum and read
//! primitives the cache uses.
//!
//! ```text
//! DIR/segments/          entries, in segment files (`cache/segments.rs`)
//! DIR/fetch.lock         fetch locks: a byte per chunk (`fetch_lock`)
//! DIR/lock               global lock: eviction and pruning
//! DIR/stats              shared counters (see `stats`)
//! DIR/pins/              chunks of the images in use (`pins`)
//! ```
//!
//! # Checking entries on load
//! Bytes are hashed (SHA-256) against the chunk name before they are
//! inserted. The insert records their CRC-32C in the segment's journal
//! with the entry's place, and a load checks it (hardware CRC-32C runs at
//! several GB/s, SHA-256 at about 1.5 GB/s and was the largest CPU cost of
//! a warm read). The CRC catches what a cache must survive (bit rot, a
//! torn or truncated file, bytes overwritten by mistake); it is no defense
//! against someone who can write the cache directory on purpose, who could
//! as well replace the smr binary. A mismatch condemns the entry and
//! refetches the chunk.

use std::fs::{self, File};
use std::io::{self, ErrorKind};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rustix::fs::FlockOperation;

/// Paths inside the cache directory.
#[derive(Debug)]
pub(crate) struct Layout {
    pub(crate) root: PathBuf,
    pub(crate) segments: PathBuf,
    pub(crate) fetch_lock: PathBuf,
}

impl Layout {
    /// Creates the cache directory if needed: private to its owner
    /// (`0700`, see [`crate::dirs::private_dir`]).
    pub(crate) fn create(root: &Path) -> io::Result<Self> {
        crate::dirs::private_dir(root)?;
        Ok(Layout {
            root: root.to_path_buf(),
            segments: root.join("segments"),
            fetch_lock: root.join("fetch.lock"),
        })
    }

    /// The global lock file.
    pub(crate) fn global_lock(&self) -> PathBuf {
        self.root.join("lock")
    }

    /// The shared counters file.
    pub(crate) fn stats(&self) -> PathBuf {
        self.root.join("stats")
    }

    /// Removes what an smr with a file per entry left (`DIR/chunks`,
    /// `DIR/tmp`): those entries are not read any more. Returns whether
    /// there was anything.
    pub(crate) fn remove_per_entry_files(&self) -> io::Result<bool> {
        let mut found = false;
        for d in ["chunks", "tmp"] {
            match fs::remove_dir_all(self.root.join(d)) {
                Ok(()) => found = true,
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(found)
    }
}

fn flock(file: &File, op: FlockOperation) -> io::Result<()> {
    loop {
        match rustix::fs::flock(file, op) {
            Err(rustix::io::Errno::INTR) => continue,
            r => return r.map_err(io::Error::from),
        }
    }
}

/// Takes `LOCK_EX` without waiting; `Ok(false)` if someone else holds a lock.
pub(crate) fn try_lock_exclusive(file: &File) -> io::Result<bool> {
    match flock(file, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == ErrorKind::WouldBlock => Ok(false),
        Err(e) => Err(e),
    }
}

/// Takes `LOCK_EX`, waiting for it.
pub(crate) fn lock_exclusive(file: &File) -> io::Result<()> {
    flock(file, FlockOperation::LockExclusive)
}

/// Takes `LOCK_EX` (or `LOCK_SH`), waiting at most `timeout`: non-blocking
/// attempts with pauses growing from 0.2 to 20 ms (a lock in the cache is
/// held for a file write at most, so waits are short; a holder that never
/// lets go makes this a `TimedOut` error, not a hang).
pub(crate) fn lock_within(file: &File, exclusive: bool, timeout: Duration) -> io::Result<()> {
    let op = if exclusive {
        FlockOperation::NonBlockingLockExclusive
    } else {
        FlockOperation::NonBlockingLockShared
    };
    retry_within(timeout, || match flock(file, op) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == ErrorKind::WouldBlock => Ok(false),
        Err(e) => Err(e),
    })
}

/// Calls `attempt` until it returns `Ok(true)` or `timeout` has passed
/// (then a `TimedOut` error), pausing 0.2 ms, doubling up to 20 ms.
pub(crate) fn retry_within(
    timeout: Duration,
    mut attempt: impl FnMut() -> io::Result<bool>,
) -> io::Result<()> {
    let start = std::time::Instant::now();
    let mut pause = Duration::from_micros(200);
    loop {
        if attempt()? {
            return Ok(());
        }
        let left = timeout.saturating_sub(start.elapsed());
        if left.is_zero() {
            return Err(io::Error::new(
                ErrorKind::TimedOut,
                format!("lock held by another process for more than {timeout:?}"),
            ));
        }
        std::thread::sleep(pause.min(left));
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

/// Releases a lock taken with [`lock_exclusive`].
pub(crate) fn unlock(file: &File) -> io::Result<()> {
    flock(file, FlockOperation::Unlock)
}

/// CRC-32C (Castagnoli, as iSCSI and ext4 use it) of `data`. `crc-fast`
/// folds with carry-less multiplies (VPCLMULQDQ where there is AVX-512),
/// about 4x the `crc32` instruction's three-stream speed; the values are
/// the standard ones (the tests check them against the `crc32c` crate),
/// so entries written by earlier versions check the same.
pub(crate) fn crc32c(data: &[u8]) -> u32 {
    // A CRC-32 fits in 32 bits; the crate returns every width as a u64.
    crc_fast::checksum(crc_fast::CrcAlgorithm::Crc32Iscsi, data) as u32
}

/// Reads `len` bytes at offset `off` into a buffer of exactly that size,
/// with `preadv2(flags)`: usually one system call. A file that ends
/// before yields what it has (the caller's checksum rejects it). With
/// `RWF_NOWAIT`, bytes not in the page cache are an error (`EAGAIN`)
/// instead of a wait for the disk.
pub(crate) fn read_at(
    file: &File,
    off: u64,
    len: usize,
    flags: libc::c_int,
) -> io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(len);
    while buf.len() < len {
        match pread_into(file, &mut buf, off, len, flags) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(buf)
}

/// One `preadv2(flags)` into the spare capacity of `buf`, up to `len`
/// bytes in all, at the file offset `off + buf.len()`; returns the bytes
/// read (0 at the end of the file).
#[allow(unsafe_code)]
fn pread_into(
    file: &File,
    buf: &mut Vec<u8>,
    off: u64,
    len: usize,
    flags: libc::c_int,
) -> io::Result<usize> {
    let at = off
        .checked_add(buf.len() as u64)
        .and_then(|a| libc::off_t::try_from(a).ok())
        .ok_or_else(|| io::Error::from(ErrorKind::InvalidInput))?;
    let want = len
        .saturating_sub(buf.len())
        .min(buf.capacity() - buf.len());
    let spare = buf.spare_capacity_mut();
    let iov = libc::iovec {
        iov_base: spare.as_mut_ptr().cast(),
        iov_len: want,
    };
    // SAFETY: `iov` describes `want` bytes of `buf`'s spare capacity, which
    // `buf` owns and nothing else references while we hold `&mut buf`
    // (`want` <= the spare capacity's length). The kernel writes at most
    // `iov_len` bytes there and returns how many it wrote (or -1, writing
    // nothing we use), and `file`'s descriptor is open for the whole call.
    let n = unsafe { libc::preadv2(file.as_raw_fd(), &iov, 1, at, flags) };
    let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
    // SAFETY: the kernel initialized the first `n` (<= `want`) bytes of the
    // spare capacity, so `buf.len() + n` bytes are initialized, within the
    // capacity.
    unsafe { buf.set_len(buf.len() + n.min(want)) };
    Ok(n)
}

/// Whether an access at `now` must be recorded, the last recorded one
/// being at `previous`. A `previous` in the future (clock set back) is
/// recorded over, so that it cannot freeze the history.
pub(crate) fn due(previous: SystemTime, now: SystemTime, granularity: Duration) -> bool {
    match now.duration_since(previous) {
        Ok(age) => age >= granularity,
        Err(_) => true,
    }
}
