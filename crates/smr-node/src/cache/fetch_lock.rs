//! The cross-process fetch lock of a chunk: a one-byte open-file-description
//! lock (`F_OFD_SETLK`, retried until a bound) in the single file `DIR/fetch.lock`, at an offset
//! taken from the chunk's name.
//!
//! One file for every chunk, so that a cold fetch creates and deletes no
//! lock file (each create and unlink is an inode allocation and a journal
//! entry, a large part of a cold read's system time). OFD locks belong to
//! the open file description: each acquisition opens the file anew, so
//! threads of one process exclude each other like processes do, and
//! closing the file (also when a process dies) releases the lock. Two
//! chunks whose offsets collide (2^-40 per pair) merely wait for each other.
#![allow(unsafe_code)] // one fcntl(2) call with a pointer to a local struct

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::Duration;

use smr_format::ChunkId;

/// Offsets are below 2^40 (a sparse, empty file: locks need no bytes).
const SLOT_BITS: u32 = 40;

/// A held fetch lock; released when dropped.
pub(crate) struct FetchLock {
    _file: File,
}

/// Takes the fetch lock of `id` in the lock file at `path` (created if
/// needed), waiting for any other holder at most `timeout` (then a
/// `TimedOut` error: the caller fetches without the lock rather than
/// hang behind a holder that never lets go).
pub(crate) fn lock(path: &Path, id: &ChunkId, timeout: Duration) -> io::Result<FetchLock> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    let mut head = [0u8; 8];
    head.copy_from_slice(&id.0[..8]);
    let slot = u64::from_le_bytes(head) >> (64 - SLOT_BITS);
    let lock = libc::flock {
        l_type: libc::F_WRLCK as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: slot as libc::off_t,
        l_len: 1,
        // Must be 0 for OFD locks.
        l_pid: 0,
    };
    super::disk::retry_within(timeout, || {
        // SAFETY: `file` is an open descriptor for the whole call, and
        // F_OFD_SETLK reads one `struct flock` through the pointer, which
        // points to `lock`, a live, initialized `libc::flock` on our stack;
        // the kernel does not keep the pointer.
        let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &lock) };
        if r == 0 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EACCES) | Some(libc::EINTR) => Ok(false),
            _ => Err(e),
        }
    })?;
    Ok(FetchLock { _file: file })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    #[test]
    fn one_holder_per_chunk_others_run() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("fetch.lock");
        let (a, b) = (ChunkId([1; 32]), ChunkId([2; 32]));
        let held = lock(&path, &a, T).expect("lock a");
        // Another chunk is not held up.
        drop(lock(&path, &b, T).expect("lock b"));
        let released = Arc::new(AtomicBool::new(false));
        let waiter = {
            let (path, released) = (path.clone(), released.clone());
            std::thread::spawn(move || {
                let _l = lock(&path, &a, T).expect("lock a again");
                assert!(released.load(Ordering::SeqCst), "got the lock while held");
            })
        };
        std::thread::sleep(Duration::from_millis(100));
        released.store(true, Ordering::SeqCst);
        drop(held);
        waiter.join().expect("waiter");
        assert_eq!(std::fs::metadata(&path).expect("lock file").len(), 0);
    }

    const T: Duration = Duration::from_secs(10);

    /// A holder that never lets go delays a waiter by the bound, no more.
    #[test]
    fn a_wait_has_a_bound() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("fetch.lock");
        let id = ChunkId([7; 32]);
        let _held = lock(&path, &id, T).expect("lock");
        let t = std::time::Instant::now();
        let e = lock(&path, &id, Duration::from_millis(200))
            .map(|_| ())
            .expect_err("held");
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        assert!(t.elapsed() >= Duration::from_millis(200));
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    }
}
