//! The cache directory's files: entries, per-chunk lock files, temp files,
//! and the `flock`/timestamp primitives they use.
//!
//! ```text
//! DIR/chunks/<2 hex>/<64 hex>   entry: the chunk's stored bytes
//! DIR/fetch.lock                fetch locks: a byte per chunk (`fetch_lock`)
//! DIR/tmp/<64 hex>.<pid>.<n>    insert in progress where the filesystem has
//!                               no O_TMPFILE (LOCK_EX while alive)
//! DIR/lock                      global lock: eviction and pruning
//! DIR/stats                     shared counters (see `stats`)
//! ```
//!
//! Entries are read through a per-process cache of open handles
//! (`cache/handles.rs`): each is opened once, with `LOCK_SH` held while it
//! stays open, and read with one `pread` per load.
//!
//! # Checking entries on load
//! Bytes are hashed (SHA-256) against the chunk name before they are
//! inserted. The insert also records their CRC-32C in the entry's extended
//! attribute `user.smr.crc32c` (4 bytes, little-endian), set on the temp
//! file before the rename, so an entry never exists without its final
//! checksum. A load checks that CRC (hardware CRC-32C runs at several GB/s,
//! SHA-256 at about 1.5 GB/s and was the largest CPU cost of a warm read),
//! and falls back to SHA-256 when the entry has no such attribute (a
//! filesystem without user xattrs, or an entry written by an older smr).
//! The CRC catches what a cache must survive (bit rot, a torn or truncated
//! file, an entry overwritten by mistake); it is no defense against someone
//! who can write the cache directory on purpose, who could as well replace
//! the smr binary. Either way a mismatch deletes the entry and refetches.
//! The attribute is read once, when the entry is opened, and kept with the
//! handle: it never changes once the entry exists, while the bytes are read
//! (and checked) anew on every load.

use std::fs::{self, File, FileTimes, OpenOptions};
use std::io::{self, ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use std::os::fd::AsRawFd;

use rustix::fs::{AtFlags, FlockOperation, Mode, OFlags};
use rustix::io::Errno;
use smr_format::ChunkId;

use super::handles::{Handle, Handles};

/// Paths inside the cache directory.
#[derive(Debug)]
pub(crate) struct Layout {
    pub(crate) root: PathBuf,
    pub(crate) chunks: PathBuf,
    pub(crate) fetch_lock: PathBuf,
    pub(crate) tmp: PathBuf,
    tmp_counter: AtomicU64,
    /// This process's id, in temp file names.
    pid: u32,
    /// Bound on every wait for a lock in the cache.
    pub(crate) lock_timeout: Duration,
}

impl Layout {
    /// Creates the directories if needed; the cache directory itself is
    /// private to its owner (`0700`, see [`crate::dirs::private_dir`]).
    pub(crate) fn create(root: &Path, lock_timeout: Duration) -> io::Result<Self> {
        crate::dirs::private_dir(root)?;
        let l = Layout {
            root: root.to_path_buf(),
            chunks: root.join("chunks"),
            fetch_lock: root.join("fetch.lock"),
            tmp: root.join("tmp"),
            tmp_counter: AtomicU64::new(0),
            pid: std::process::id(),
            lock_timeout,
        };
        for d in [&l.chunks, &l.tmp] {
            fs::create_dir_all(d)?;
        }
        Ok(l)
    }

    /// A new temp file name for an insert of `id`: `tmp/<id>.<pid>.<n>`.
    fn tmp_name(&self, id: &ChunkId) -> PathBuf {
        let n = self.tmp_counter.fetch_add(1, Ordering::Relaxed);
        self.tmp.join(format!("{}.{}.{n}", id.to_hex(), self.pid))
    }

    /// Path of the entry for `id`.
    pub(crate) fn entry(&self, id: &ChunkId) -> PathBuf {
        fan_out(&self.chunks, id)
    }

    /// The global lock file.
    pub(crate) fn global_lock(&self) -> PathBuf {
        self.root.join("lock")
    }

    /// The shared counters file.
    pub(crate) fn stats(&self) -> PathBuf {
        self.root.join("stats")
    }
}

fn fan_out(base: &Path, id: &ChunkId) -> PathBuf {
    let hex = id.to_hex();
    base.join(&hex[..2]).join(hex)
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

/// The extended attribute holding an entry's CRC-32C.
const CRC_XATTR: &str = "user.smr.crc32c";

/// Records `data`'s CRC-32C on `file`; `false` if the filesystem refused.
/// Records the CRC-32C of `data` on `file`; returns it if it was recorded.
fn set_crc(file: &File, data: &[u8]) -> Option<u32> {
    let crc = crc32c(data);
    rustix::fs::fsetxattr(
        file,
        CRC_XATTR,
        &crc.to_le_bytes(),
        rustix::fs::XattrFlags::empty(),
    )
    .is_ok()
    .then_some(crc)
}

/// The CRC-32C recorded on `file`, if any.
fn get_crc(file: &File) -> Option<u32> {
    let mut b = [0u8; 4];
    match rustix::fs::fgetxattr(file, CRC_XATTR, &mut b) {
        Ok(4) => Some(u32::from_le_bytes(b)),
        _ => None,
    }
}

/// Whether `buf` is intact as the entry of `id`: by its recorded CRC-32C
/// `crc` when there is one, else by SHA-256.
/// CRC-32C (Castagnoli, as iSCSI and ext4 use it) of `data`. `crc-fast`
/// folds with carry-less multiplies (VPCLMULQDQ where there is AVX-512),
/// about 4x the `crc32` instruction's three-stream speed; the values are
/// the standard ones (the tests check them against the `crc32c` crate),
/// so entries written by earlier versions check the same.
pub(crate) fn crc32c(data: &[u8]) -> u32 {
    // A CRC-32 fits in 32 bits; the crate returns every width as a u64.
    crc_fast::checksum(crc_fast::CrcAlgorithm::Crc32Iscsi, data) as u32
}

fn intact(crc: Option<u32>, id: &ChunkId, buf: &[u8]) -> bool {
    match crc {
        Some(crc) => crc32c(buf) == crc,
        None => ChunkId::of(buf) == *id,
    }
}

/// What loading an entry found.
pub(crate) enum Load {
    /// The entry, verified.
    Hit(Vec<u8>),
    /// No entry (or an unreadable one, logged).
    Absent,
    /// The entry's bytes did not hash to its name; it has been deleted.
    Corrupt {
        /// Its length, to correct the cache total.
        len: u64,
    },
}

/// No entry is larger: the largest chunk, with room for compression that
/// did not pay (zstd adds a few bytes per block). Loads allocate an entry's
/// length up front; a file above this is not read.
const MAX_ENTRY_BYTES: u64 = 2 * smr_format::recipe::MAX_CHUNK_SIZE;

/// Opens an entry for reading. `O_NOATIME`: the entries' timestamps are
/// the LRU-K history this module writes itself; the kernel's own atime
/// updates (relatime updates it on the first read after each of ours,
/// since ours moves ctime) would be a metadata write for nothing.
/// `O_NOATIME` needs the file's owner (the cache's processes all run as
/// the same user); without it, a plain open.
fn open_entry(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOATIME)
        .open(path)
    {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => File::open(path),
        r => r,
    }
}

/// Opens the entry of `id` as a [`Handle`]: `LOCK_SH` (taken for the
/// handle's life, see `cache/handles.rs`), then its length, identity,
/// last recorded access and CRC. `None` if there is no entry, or if it was
/// evicted between our `open` and our lock (its link count is 0).
fn open_handle(layout: &Layout, id: &ChunkId) -> io::Result<Option<Handle>> {
    use std::os::unix::fs::MetadataExt;
    let file = match open_entry(&layout.entry(id)) {
        Ok(f) => f,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    lock_within(&file, false, layout.lock_timeout)?;
    let meta = file.metadata()?;
    if meta.nlink() == 0 {
        return Ok(None);
    }
    if meta.len() > MAX_ENTRY_BYTES {
        // Not an entry we wrote; it is replaced when the chunk is refetched.
        return Err(io::Error::new(
            ErrorKind::InvalidData,
            format!("{} bytes, larger than any chunk", meta.len()),
        ));
    }
    let crc = get_crc(&file);
    let atime = meta.accessed().unwrap_or(UNIX_EPOCH);
    Ok(Some(Handle::new(
        file,
        meta.len(),
        crc,
        (meta.dev(), meta.ino()),
        atime,
    )))
}

/// The handle of `id`: cached, else opened and cached. `Ok(None)`: no
/// entry. Out of file descriptors, closes the cached handles and tries
/// once more.
fn handle(layout: &Layout, handles: &Handles, id: &ChunkId) -> io::Result<Option<Arc<Handle>>> {
    if let Some(h) = handles.get(id) {
        return Ok(Some(h));
    }
    let opened = match open_handle(layout, id) {
        Err(e) if e.raw_os_error() == Some(libc::EMFILE) => {
            tracing::debug!(chunk = %id, "out of file descriptors: closing cached cache entries");
            handles.clear();
            open_handle(layout, id)
        }
        r => r,
    }?;
    Ok(opened.map(|h| handles.insert(*id, h)))
}

/// Loads and checks (see the module docs) the entry of `id` through its
/// cached handle (opening and caching one if needed; see
/// `cache/handles.rs`), and records the access for LRU-K unless the last
/// one recorded is less than `granularity` old.
pub(crate) fn load(
    layout: &Layout,
    handles: &Handles,
    id: &ChunkId,
    granularity: Duration,
) -> Load {
    let unreadable = |e: &io::Error| {
        tracing::warn!(chunk = %id, path = %layout.entry(id).display(), error = %e, "cache entry unreadable; refetching");
    };
    let h = match handle(layout, handles, id) {
        Ok(Some(h)) => h,
        Ok(None) => return Load::Absent,
        Err(e) => {
            unreadable(&e);
            return Load::Absent;
        }
    };
    let buf = match read_exact_len(&h.file, h.len, 0) {
        Ok(b) => b,
        Err(e) => {
            unreadable(&e);
            handles.remove(id, &h);
            return Load::Absent;
        }
    };
    if !intact(h.crc, id, &buf) {
        handles.remove(id, &h);
        let path = layout.entry(id);
        let actual = ChunkId::of(&buf);
        // Delete the entry only if its path still names the file we read
        // (not a good entry written since by someone else).
        let ours = {
            use std::os::unix::fs::MetadataExt;
            fs::metadata(&path).is_ok_and(|m| (m.dev(), m.ino()) == h.dev_ino)
        };
        if !ours {
            tracing::warn!(chunk = %id, actual = %actual, path = %path.display(), "corrupt cache entry, already replaced or deleted; refetching");
            return Load::Absent;
        }
        tracing::warn!(chunk = %id, actual = %actual, path = %path.display(), "corrupt cache entry deleted; refetching");
        if let Err(e) = fs::remove_file(&path) {
            tracing::warn!(path = %path.display(), error = %e, "cannot delete corrupt cache entry");
        }
        return Load::Corrupt {
            len: buf.len() as u64,
        };
    }
    record_access(&h, id, granularity);
    Load::Hit(buf)
}

/// Loads the entry of `id` only if that cannot wait: through a handle
/// already open (no path lookup) and with every byte already in the page
/// cache (`preadv2` with `RWF_NOWAIT` fails rather than start a disk read).
/// The bytes are checked as [`load`] checks them. `None` in every other
/// case (no open handle, not all cached, a short read, a checksum
/// mismatch): the caller then takes [`load`]'s path, which waits for the
/// disk and handles a bad entry. Lets an event loop serve the warm reads
/// itself and hand only the others to a thread.
pub(crate) fn load_now(handles: &Handles, id: &ChunkId, granularity: Duration) -> Option<Vec<u8>> {
    let h = handles.get(id)?;
    let buf = read_exact_len(&h.file, h.len, libc::RWF_NOWAIT).ok()?;
    if !intact(h.crc, id, &buf) {
        return None;
    }
    record_access(&h, id, granularity);
    Some(buf)
}

/// Reads the `len` bytes of an entry into a buffer of exactly that size,
/// with `preadv2(flags)`: usually one system call (`read_to_end` makes at
/// least two, plus an `fstat` and an `lseek`). A file shorter than `len`
/// (truncated meanwhile) yields what it has, which the checksum then
/// rejects. With `RWF_NOWAIT`, bytes not in the page cache are an error
/// (`EAGAIN`) instead of a wait for the disk.
fn read_exact_len(file: &File, len: u64, flags: libc::c_int) -> io::Result<Vec<u8>> {
    let len = usize::try_from(len).map_err(|_| io::Error::from(ErrorKind::OutOfMemory))?;
    let mut buf = Vec::with_capacity(len);
    while buf.len() < len {
        match pread_into(file, &mut buf, len, flags) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(buf)
}

/// One `preadv2(flags)` into the spare capacity of `buf`, up to `len`
/// bytes in all, at the file offset `buf.len()`; returns the bytes read
/// (0 at the end of the file).
#[allow(unsafe_code)]
fn pread_into(file: &File, buf: &mut Vec<u8>, len: usize, flags: libc::c_int) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    let at =
        libc::off_t::try_from(buf.len()).map_err(|_| io::Error::from(ErrorKind::InvalidInput))?;
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

/// Records an access for LRU-K (K = 2): mtime := previous atime (the
/// previous access), atime := now (this one); unless the previous access
/// is less than `granularity` old: then this access and that one count as
/// one (LRU-K's "correlated reference period"), and nothing is written. An
/// entry read a thousand times in a minute costs one metadata write, not
/// a thousand (each `futimens` is a journaled inode update), and, with a
/// cached handle, no system call at all: the handle remembers the last
/// access recorded, and only when that is old does it look at the inode
/// (another process may have recorded one since).
fn record_access(h: &Handle, id: &ChunkId, granularity: Duration) {
    let now = SystemTime::now();
    if !h.claim_record(now, granularity) {
        return;
    }
    if let Some(previous) = record_in_inode(&h.file, now, granularity, id) {
        h.set_recorded(previous);
    }
}

/// Records an access at `now` in `file`'s timestamps if the one recorded
/// there is at least `granularity` old; else returns that one.
fn record_in_inode(
    file: &File,
    now: SystemTime,
    granularity: Duration,
    id: &ChunkId,
) -> Option<SystemTime> {
    match file.metadata() {
        Ok(meta) => {
            let previous = meta.accessed().unwrap_or(UNIX_EPOCH);
            if due(previous, now, granularity) {
                write_access(file, previous, now, id);
                None
            } else {
                Some(previous)
            }
        }
        Err(e) => {
            tracing::debug!(chunk = %id, error = %e, "cannot record cache access");
            None
        }
    }
}

/// Writes the LRU-K history of an access at `now` after one at `previous`.
fn write_access(file: &File, previous: SystemTime, now: SystemTime, id: &ChunkId) {
    let times = FileTimes::new().set_modified(previous).set_accessed(now);
    if let Err(e) = file.set_times(times) {
        tracing::debug!(chunk = %id, error = %e, "cannot record cache access");
    }
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

/// Records an access to the entry of `id` without reading it (for hits
/// served from the memory tier), through its cached handle if it has one.
/// Errors are ignored: it is a hint.
pub(crate) fn touch(layout: &Layout, handles: &Handles, id: &ChunkId, granularity: Duration) {
    if let Some(job) = touch_now(layout, handles, id, granularity) {
        job();
    }
}

/// [`touch`] for a caller that must not wait (an event loop): records the
/// access through the cached handle if there is one (no path lookup), and
/// otherwise returns the rest (opening the entry by path, which may wait
/// for the disk) as a job for a thread that may.
pub(crate) fn touch_now(
    layout: &Layout,
    handles: &Handles,
    id: &ChunkId,
    granularity: Duration,
) -> Option<impl FnOnce() + Send + 'static> {
    if let Some(h) = handles.get(id) {
        record_access(&h, id, granularity);
        return None;
    }
    let (path, id) = (layout.entry(id), *id);
    Some(move || {
        if let Ok(f) = open_entry(&path) {
            record_in_inode(&f, SystemTime::now(), granularity, &id);
        }
    })
}

/// Whether an entry for `id` exists (unverified).
pub(crate) fn exists(layout: &Layout, handles: &Handles, id: &ChunkId) -> bool {
    handles.contains(id) || layout.entry(id).is_file()
}

/// Whether an entry for `id` exists; if so, opens (and caches) its handle
/// and asks the kernel to start reading it into the page cache
/// (`POSIX_FADV_WILLNEED`), so that a load soon after finds it there
/// instead of waiting for the disk.
pub(crate) fn exists_and_readahead(layout: &Layout, handles: &Handles, id: &ChunkId) -> bool {
    match handle(layout, handles, id) {
        Ok(Some(h)) => {
            let _ = rustix::fs::fadvise(&h.file, 0, None, rustix::fs::Advice::WillNeed);
            true
        }
        Ok(None) | Err(_) => false,
    }
}

/// Writes `data` as the entry of `id` (replacing any file in the way) and
/// returns its handle (its lock shared, like every reader's).
///
/// The entry is written as an unnamed file in its fan-out directory
/// (`O_TMPFILE`): bytes, CRC-32C attribute, timestamps for "seen once",
/// then linked under its name. A killed process leaves nothing behind
/// (the kernel frees an unnamed file with its last descriptor); a power
/// cut may leave a torn entry, which fails its check on load. Where the
/// filesystem has no `O_TMPFILE`, a named temp file in `DIR/tmp` is
/// renamed into place instead ([`insert_named`]).
pub(crate) fn insert(layout: &Layout, id: &ChunkId, data: &[u8]) -> io::Result<Handle> {
    let path = layout.entry(id);
    let Some(dir) = path.parent() else {
        return Err(io::Error::other("entry path without a directory"));
    };
    let unnamed = || {
        rustix::fs::openat(
            rustix::fs::CWD,
            dir,
            OFlags::TMPFILE | OFlags::RDWR | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o644),
        )
    };
    let fd = match unnamed() {
        Err(Errno::NOENT) => {
            // The fan-out directory is made on the first insert into it.
            fs::create_dir_all(dir)?;
            unnamed()
        }
        r => r,
    };
    let file = match fd {
        Ok(fd) => File::from(fd),
        Err(Errno::OPNOTSUPP | Errno::ISDIR | Errno::INVAL) => {
            return insert_named(layout, id, data);
        }
        Err(e) => return Err(e.into()),
    };
    let (file, crc, now) = write_entry(file, id, data)?;
    let proc_path = format!("/proc/self/fd/{}", file.as_raw_fd());
    let link = |to: &Path| {
        rustix::fs::linkat(
            rustix::fs::CWD,
            proc_path.as_str(),
            rustix::fs::CWD,
            to,
            AtFlags::SYMLINK_FOLLOW,
        )
    };
    match link(&path) {
        Ok(()) => {}
        // A file is in the way: another process's insert of the same
        // bytes, or something that failed its check on load. Replace it,
        // as a rename does.
        Err(Errno::EXIST) => {
            let tmp = layout.tmp_name(id);
            link(&tmp)?;
            if let Err(e) = fs::rename(&tmp, &path) {
                let _ = fs::remove_file(&tmp);
                return Err(e);
            }
        }
        Err(e) => return Err(e.into()),
    }
    entry_handle(file, data.len(), crc, now, layout.lock_timeout)
}

/// Writes an entry's bytes, CRC-32C attribute and "seen once" timestamps
/// to `file`; returns it with the CRC (if recorded) and the time written.
fn write_entry(
    mut file: File,
    id: &ChunkId,
    data: &[u8],
) -> io::Result<(File, Option<u32>, SystemTime)> {
    file.write_all(data)?;
    let crc = set_crc(&file, data);
    if crc.is_none() {
        tracing::debug!(chunk = %id, "no user xattrs here: the entry will be checked with SHA-256 on load");
    }
    let now = SystemTime::now();
    file.set_times(FileTimes::new().set_modified(UNIX_EPOCH).set_accessed(now))?;
    // No fsync: see "Crash safety" in the cache's module docs.
    Ok((file, crc, now))
}

/// The handle of a just-written entry: its lock turned shared, so that
/// the evictor skips it while this process keeps it.
fn entry_handle(
    file: File,
    len: usize,
    crc: Option<u32>,
    now: SystemTime,
    timeout: Duration,
) -> io::Result<Handle> {
    use std::os::unix::fs::MetadataExt;
    lock_within(&file, false, timeout)?;
    let meta = file.metadata()?;
    Ok(Handle::new(
        file,
        len as u64,
        crc,
        (meta.dev(), meta.ino()),
        now,
    ))
}

/// [`insert`] through a named temp file `DIR/tmp/<id>.<pid>.<n>` (locked
/// while we live, so that `clean` of other processes leaves it alone),
/// renamed into place.
pub(crate) fn insert_named(layout: &Layout, id: &ChunkId, data: &[u8]) -> io::Result<Handle> {
    let path = layout.entry(id);
    let tmp = layout.tmp_name(id);
    let result = (|| {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        try_lock_exclusive(&f)?;
        let (f, crc, now) = write_entry(f, id, data)?;
        if let Err(e) = fs::rename(&tmp, &path) {
            let Some(dir) = path.parent().filter(|_| e.kind() == ErrorKind::NotFound) else {
                return Err(e);
            };
            fs::create_dir_all(dir)?;
            fs::rename(&tmp, &path)?;
        }
        entry_handle(f, data.len(), crc, now, layout.lock_timeout)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Deletes temp files of dead inserts (those nobody holds a lock on);
/// returns how many.
pub(crate) fn clean(layout: &Layout) -> io::Result<u64> {
    let mut tmp_removed = 0;
    for e in fs::read_dir(&layout.tmp)? {
        if remove_if_unlocked(&e?.path())? {
            tmp_removed += 1;
        }
    }
    Ok(tmp_removed)
}

fn remove_if_unlocked(path: &Path) -> io::Result<bool> {
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    if !try_lock_exclusive(&f)? {
        return Ok(false);
    }
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}
