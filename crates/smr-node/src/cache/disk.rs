//! The cache directory's files: entries, per-chunk lock files, temp files,
//! and the `flock`/timestamp primitives they use.
//!
//! ```text
//! DIR/chunks/<2 hex>/<64 hex>   entry: the chunk's stored bytes
//! DIR/locks/<2 hex>/<64 hex>    held (LOCK_EX) while fetching that chunk
//! DIR/tmp/<64 hex>.<pid>.<n>    insert in progress (LOCK_EX while alive)
//! DIR/lock                      global lock: eviction and pruning
//! DIR/stats                     shared counters (see `stats`)
//! ```
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

use std::fs::{self, File, FileTimes, OpenOptions};
use std::io::{self, ErrorKind, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use rustix::fs::FlockOperation;
use smr_format::ChunkId;

/// Paths inside the cache directory.
#[derive(Debug)]
pub(crate) struct Layout {
    pub(crate) root: PathBuf,
    pub(crate) chunks: PathBuf,
    pub(crate) locks: PathBuf,
    pub(crate) tmp: PathBuf,
    tmp_counter: AtomicU64,
}

impl Layout {
    /// Creates the directories if needed.
    pub(crate) fn create(root: &Path) -> io::Result<Self> {
        let l = Layout {
            root: root.to_path_buf(),
            chunks: root.join("chunks"),
            locks: root.join("locks"),
            tmp: root.join("tmp"),
            tmp_counter: AtomicU64::new(0),
        };
        for d in [&l.chunks, &l.locks, &l.tmp] {
            fs::create_dir_all(d)?;
        }
        Ok(l)
    }

    /// Path of the entry for `id`.
    pub(crate) fn entry(&self, id: &ChunkId) -> PathBuf {
        fan_out(&self.chunks, id)
    }

    fn lock(&self, id: &ChunkId) -> PathBuf {
        fan_out(&self.locks, id)
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

/// Releases a lock taken with [`lock_exclusive`].
pub(crate) fn unlock(file: &File) -> io::Result<()> {
    flock(file, FlockOperation::Unlock)
}

/// Opens (creating) a lock file and takes `LOCK_EX` on it, waiting.
pub(crate) fn open_locked(path: &Path) -> io::Result<File> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    lock_exclusive(&f)?;
    Ok(f)
}

/// The extended attribute holding an entry's CRC-32C.
const CRC_XATTR: &str = "user.smr.crc32c";

/// Records `data`'s CRC-32C on `file`; `false` if the filesystem refused.
fn set_crc(file: &File, data: &[u8]) -> bool {
    let crc = crc32c::crc32c(data).to_le_bytes();
    rustix::fs::fsetxattr(file, CRC_XATTR, &crc, rustix::fs::XattrFlags::empty()).is_ok()
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
/// when there is one, else by SHA-256.
fn intact(file: &File, id: &ChunkId, buf: &[u8]) -> bool {
    match get_crc(file) {
        Some(crc) => crc32c::crc32c(buf) == crc,
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

/// Loads and checks (see the module docs) the entry of `id`, holding `LOCK_SH` on it meanwhile
/// (so the evictor skips it), and records the access for LRU-K.
pub(crate) fn load(layout: &Layout, id: &ChunkId) -> Load {
    let path = layout.entry(id);
    let mut file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == ErrorKind::NotFound => return Load::Absent,
        Err(e) => {
            tracing::warn!(chunk = %id, path = %path.display(), error = %e, "cache entry unreadable; refetching");
            return Load::Absent;
        }
    };
    let read = (|| {
        flock(&file, FlockOperation::LockShared)?;
        // The previous access time, read before our read can move it.
        let meta = file.metadata()?;
        let mut buf = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
        file.read_to_end(&mut buf)?;
        Ok::<_, io::Error>((meta, buf))
    })();
    let (meta, buf) = match read {
        Ok(x) => x,
        Err(e) => {
            tracing::warn!(chunk = %id, path = %path.display(), error = %e, "cache entry unreadable; refetching");
            return Load::Absent;
        }
    };
    if !intact(&file, id, &buf) {
        let actual = ChunkId::of(&buf);
        tracing::warn!(chunk = %id, actual = %actual, path = %path.display(), "corrupt cache entry deleted; refetching");
        if let Err(e) = fs::remove_file(&path) {
            tracing::warn!(path = %path.display(), error = %e, "cannot delete corrupt cache entry");
        }
        return Load::Corrupt {
            len: buf.len() as u64,
        };
    }
    record_access(&file, &meta, id);
    Load::Hit(buf)
}

/// Records an access for LRU-K (K = 2): mtime := previous atime (the
/// previous access), atime := now (this one).
fn record_access(file: &File, meta: &fs::Metadata, id: &ChunkId) {
    let previous = meta.accessed().unwrap_or(UNIX_EPOCH);
    let times = FileTimes::new()
        .set_modified(previous)
        .set_accessed(SystemTime::now());
    if let Err(e) = file.set_times(times) {
        tracing::debug!(chunk = %id, error = %e, "cannot record cache access");
    }
}

/// Records an access to the entry of `id` without reading it (for hits
/// served from the memory tier). Errors are ignored: it is a hint.
pub(crate) fn touch(layout: &Layout, id: &ChunkId) {
    if let Ok(f) = File::open(layout.entry(id)) {
        if let Ok(meta) = f.metadata() {
            record_access(&f, &meta, id);
        }
    }
}

/// Whether an entry for `id` exists (unverified).
pub(crate) fn exists(layout: &Layout, id: &ChunkId) -> bool {
    layout.entry(id).is_file()
}

/// Whether an entry for `id` exists; if so, asks the kernel to start
/// reading it into the page cache (`POSIX_FADV_WILLNEED`), so that a load
/// soon after finds it there instead of waiting for the disk.
pub(crate) fn exists_and_readahead(layout: &Layout, id: &ChunkId) -> bool {
    match File::open(layout.entry(id)) {
        Ok(f) => {
            let _ = rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::WillNeed);
            true
        }
        Err(_) => false,
    }
}

/// Writes `data` as the entry of `id`: temp file (locked while we live),
/// fsync, timestamps for "seen once", rename into place. A crash at any
/// point leaves no entry or the whole entry.
pub(crate) fn insert(layout: &Layout, id: &ChunkId, data: &[u8]) -> io::Result<()> {
    let path = layout.entry(id);
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)?;
    }
    let n = layout.tmp_counter.fetch_add(1, Ordering::Relaxed);
    let tmp = layout
        .tmp
        .join(format!("{}.{}.{n}", id.to_hex(), std::process::id()));
    let result = (|| {
        let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        // Tells `clean_tmp` of other processes that this file is alive.
        try_lock_exclusive(&f)?;
        f.write_all(data)?;
        if !set_crc(&f, data) {
            tracing::debug!(chunk = %id, "no user xattrs here: the entry will be checked with SHA-256 on load");
        }
        f.set_times(
            FileTimes::new()
                .set_modified(UNIX_EPOCH)
                .set_accessed(SystemTime::now()),
        )?;
        f.sync_all()?;
        fs::rename(&tmp, &path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// The per-chunk fetch lock (see [`lock_chunk`]).
pub(crate) struct ChunkLock {
    path: PathBuf,
    _file: File,
}

impl ChunkLock {
    /// Releases the lock, first removing the lock file if the chunk is now
    /// in the cache (waiters then re-check, find it, and never fetch).
    pub(crate) fn release(self, remove: bool) {
        if remove {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Takes the cross-process fetch lock of `id`, waiting for any other holder
/// (a thread with its own open file description, or another process).
pub(crate) fn lock_chunk(layout: &Layout, id: &ChunkId) -> io::Result<ChunkLock> {
    let path = layout.lock(id);
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)?;
    }
    let file = open_locked(&path)?;
    Ok(ChunkLock { path, _file: file })
}

/// Deletes temp files of dead inserts (those nobody holds a lock on) and,
/// if `locks` is set, idle lock files. Returns (temp files, lock files)
/// removed.
pub(crate) fn clean(layout: &Layout, locks: bool) -> io::Result<(u64, u64)> {
    let mut tmp_removed = 0;
    for e in fs::read_dir(&layout.tmp)? {
        if remove_if_unlocked(&e?.path())? {
            tmp_removed += 1;
        }
    }
    let mut locks_removed = 0;
    if locks {
        for sub in fs::read_dir(&layout.locks)? {
            let sub = sub?.path();
            if !sub.is_dir() {
                continue;
            }
            for e in fs::read_dir(&sub)? {
                if remove_if_unlocked(&e?.path())? {
                    locks_removed += 1;
                }
            }
        }
    }
    Ok((tmp_removed, locks_removed))
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
