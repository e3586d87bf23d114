//! FUSE export: any [`BlockDevice`] as one regular file, read-only unless
//! the device is writable (a volume): then writes go to the device and
//! `fsync` flushes it.
//!
//! The mount holds a single file (`image` by default) whose bytes are the
//! device's. The kernel side is the point: a loop device turns the file
//! into a block device and the kernel's ext4 mounts it (see
//! [`crate::mount`]).
//!
//! - **Parallel reads.** The session runs [`FuseConfig::threads`] event
//!   loops, each on its own cloned `/dev/fuse` descriptor, and each blocks in
//!   [`BlockDevice::read_at`] for its request; so up to `threads` reads (and
//!   chunk fetches) are in flight. The kernel's `max_background` (how many
//!   readahead and loop-device requests it queues at once) is raised to
//!   match.
//! - **Large requests.** `max_read` is 1 MiB by default, and
//!   `FUSE_MAX_PAGES` lets the kernel send requests that large.
//! - **Caching.** Attributes and entries never change, so their TTL is a
//!   day, and files open with `FOPEN_KEEP_CACHE`: the page cache of the file
//!   survives opens (loop devices with `--direct-io=on` bypass it anyway).
//! - **Copies.** Reads go through [`BlockDevice::read_parts`]: a read
//!   inside one cached chunk is answered straight from the chunk; one
//!   spanning chunks is gathered once into the reply buffer (never
//!   zero-filled first).
//! - **Pages ahead of reads.** A read-only device is handed the file's
//!   page cache at its first open ([`BlockDevice::exported`]): bytes it
//!   stores there (`FUSE_NOTIFY_STORE`) are read by the kernel (a loop
//!   device reading the file through the page cache) with no request to
//!   this server. A lazy image stores there its startup pack's blocks,
//!   and, ahead of a reader going through it in order, the chunks the
//!   node holds.
//! - **Errors.** A failed read answers `EIO` and logs the device's error,
//!   which names the chunk and the store.
//!
//! Mounting is done by fuser itself: directly with mount(2) as root, else
//! through `fusermount3`.

use std::ffi::OsStr;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, LockOwner, MountOption, OpenAccMode, OpenFlags, ReplyAttr, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request,
    WriteFlags,
};

use crate::device::{BlockDevice, PageSink, ReadPart};

/// Attribute and entry lifetime in the kernel: nothing here ever changes.
const TTL: Duration = Duration::from_secs(24 * 3600);
const FILE_INO: INodeNo = INodeNo(2);
const BLOCK: u32 = 4096;

/// Errors of the FUSE export.
#[derive(Debug, thiserror::Error)]
pub enum FuseError {
    /// The file name is empty or has a `/` or NUL.
    #[error("bad file name {0:?}")]
    BadName(String),
    /// Mounting failed.
    #[error("mounting FUSE on {dir}: {source}")]
    Mount {
        /// The mount directory.
        dir: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The session failed or could not be stopped.
    #[error("FUSE session on {dir}: {source}")]
    Session {
        /// The mount directory.
        dir: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// Result of this module.
pub type Result<T> = std::result::Result<T, FuseError>;

/// How to export a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FuseConfig {
    /// Name of the file in the mount directory.
    pub file_name: String,
    /// Event loop threads: reads served at once.
    pub threads: usize,
    /// Largest read request in bytes (`max_read`).
    pub max_read: u32,
    /// Largest kernel readahead on the file, in bytes (`max_readahead`).
    /// Reads through a loop device are governed by the loop device's own
    /// `read_ahead_kb` instead.
    pub max_readahead: u32,
}

impl Default for FuseConfig {
    fn default() -> Self {
        FuseConfig {
            file_name: "image".into(),
            threads: 16,
            max_read: 1 << 20,
            max_readahead: 1 << 20,
        }
    }
}

/// The filesystem: a root directory holding one file.
struct ImageFs {
    dev: Arc<dyn BlockDevice>,
    cfg: FuseConfig,
    mtime: SystemTime,
    /// The session's notifier, set before the session serves a request.
    notifier: Arc<OnceLock<fuser::Notifier>>,
    /// Whether the file was opened (and the device handed its pages).
    opened: AtomicBool,
}

/// The page cache of the exported file, filled through the session's
/// notifier (`FUSE_NOTIFY_STORE`).
struct NotifySink(fuser::Notifier);

impl PageSink for NotifySink {
    fn store(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.0.store(FILE_INO, offset, data)
    }
}

impl ImageFs {
    fn attr(&self, ino: INodeNo) -> Option<FileAttr> {
        let (kind, size, perm, nlink) = match ino {
            INodeNo::ROOT => (FileType::Directory, 0, 0o555, 2),
            FILE_INO if self.dev.read_only() => (FileType::RegularFile, self.dev.size(), 0o444, 1),
            FILE_INO => (FileType::RegularFile, self.dev.size(), 0o644, 1),
            _ => return None,
        };
        Some(FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: self.mtime,
            mtime: self.mtime,
            ctime: self.mtime,
            crtime: self.mtime,
            kind,
            perm,
            nlink,
            uid: 0,
            gid: 0,
            rdev: 0,
            flags: 0,
            blksize: BLOCK,
        })
    }

    /// The parts of a read of at most `size` bytes at `offset` (short at
    /// the end).
    fn read_parts(&self, offset: u64, size: u32) -> io::Result<Vec<ReadPart>> {
        let end = self.dev.size();
        let len = end.saturating_sub(offset).min(u64::from(size)) as usize;
        if len == 0 {
            return Ok(Vec::new());
        }
        let parts = self.dev.read_parts(offset, len)?;
        if parts.iter().map(|p| p.len()).sum::<usize>() != len {
            return Err(io::Error::other(
                "device returned the wrong number of bytes",
            ));
        }
        Ok(parts)
    }
}

/// Answers a read with `parts`: straight from the device's buffer when one
/// part covers it (no copy), else gathered into one buffer.
fn reply_parts(reply: ReplyData, parts: &[ReadPart]) {
    if let [one] = parts {
        if let Some(d) = one.data() {
            return reply.data(d);
        }
    }
    let mut buf = Vec::with_capacity(parts.iter().map(|p| p.len()).sum());
    for p in parts {
        match p.data() {
            Some(d) => buf.extend_from_slice(d),
            None => buf.resize(buf.len() + p.len(), 0),
        }
    }
    reply.data(&buf)
}

impl Filesystem for ImageFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        if let Err(max) = config.set_max_readahead(self.cfg.max_readahead) {
            let _ = config.set_max_readahead(max);
        }
        let background = u16::try_from(self.cfg.threads.saturating_mul(2))
            .unwrap_or(u16::MAX)
            .max(16);
        let _ = config.set_max_background(background);
        // Let O_DIRECT readers (a loop device with --direct-io=on) have
        // many reads in flight, and splice large replies.
        let _ = config.add_capabilities(fuser::InitFlags::FUSE_ASYNC_DIO);
        let _ = config.set_congestion_threshold(background.saturating_mul(3) / 4);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.attr(FILE_INO) {
            Some(attr) if parent == INodeNo::ROOT && name == OsStr::new(&self.cfg.file_name) => {
                reply.entry(&TTL, &attr, Generation(0))
            }
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino) {
            Some(attr) => reply.attr(&TTL, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if ino != FILE_INO {
            reply.error(Errno::EISDIR);
        } else if flags.acc_mode() != OpenAccMode::O_RDONLY && self.dev.read_only() {
            reply.error(Errno::EROFS);
        } else {
            reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE);
            // Open now, the file's inode is known to the kernel: stores into
            // its page cache land (and keep, with KEEP_CACHE).
            if self.dev.read_only() && !self.opened.swap(true, Ordering::AcqRel) {
                if let Some(n) = self.notifier.get() {
                    self.dev.exported(Arc::new(NotifySink(n.clone())));
                }
            }
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        if ino != FILE_INO {
            return reply.error(Errno::EISDIR);
        }
        match self.read_parts(offset, size) {
            Ok(parts) => {
                let len = parts.iter().map(ReadPart::len).sum();
                reply_parts(reply, &parts);
                // The flags are the file's now (a loop device turns
                // O_DIRECT on and off on its descriptor).
                if flags.0 & libc::O_DIRECT == 0 {
                    self.dev.read_through_page_cache(offset, len);
                }
            }
            Err(e) => {
                tracing::error!(offset, size, error = %e, "FUSE read failed; answering EIO");
                reply.error(Errno::EIO)
            }
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok()
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.dev.flush() {
            Ok(()) => reply.ok(),
            Err(e) => {
                tracing::error!(error = %e, "FUSE fsync failed; answering EIO");
                reply.error(Errno::EIO)
            }
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if ino != FILE_INO {
            return reply.error(Errno::EISDIR);
        }
        if self.dev.read_only() {
            return reply.error(Errno::EROFS);
        }
        let end = offset.checked_add(data.len() as u64);
        if end.is_none_or(|e| e > self.dev.size()) {
            return reply.error(Errno::ENOSPC);
        }
        match self.dev.write_at(offset, data) {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => {
                tracing::error!(offset, len = data.len(), error = %e, "FUSE write failed; answering EIO");
                reply.error(Errno::EIO)
            }
        }
    }

    /// Punching a hole (`PUNCH_HOLE | KEEP_SIZE`, what a loop device's
    /// discard becomes) and zeroing a range (`ZERO_RANGE`) make the range
    /// read as zeros through [`BlockDevice::write_zeroes`] (a volume
    /// punches its COW file); plain allocation of a range inside the file
    /// has nothing to do. Anything else is `EOPNOTSUPP`.
    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        if ino != FILE_INO {
            return reply.error(Errno::EISDIR);
        }
        if self.dev.read_only() {
            return reply.error(Errno::EROFS);
        }
        let end = offset.checked_add(length);
        if end.is_none_or(|e| e > self.dev.size()) {
            return reply.error(Errno::ENOSPC);
        }
        let (punch, keep, zero) = (
            libc::FALLOC_FL_PUNCH_HOLE,
            libc::FALLOC_FL_KEEP_SIZE,
            libc::FALLOC_FL_ZERO_RANGE,
        );
        let zeroes = if mode == 0 || mode == keep {
            false
        } else if mode == punch | keep || mode == zero || mode == zero | keep {
            true
        } else {
            return reply.error(Errno::EOPNOTSUPP);
        };
        if !zeroes {
            return reply.ok();
        }
        match self.dev.write_zeroes(offset, length) {
            Ok(()) => reply.ok(),
            Err(e) => {
                tracing::error!(offset, length, mode, error = %e, "FUSE fallocate failed; answering EIO");
                reply.error(Errno::EIO)
            }
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino != INodeNo::ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let entries = [
            (INodeNo::ROOT, FileType::Directory, "."),
            (INodeNo::ROOT, FileType::Directory, ".."),
            (FILE_INO, FileType::RegularFile, self.cfg.file_name.as_str()),
        ];
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(*ino, i as u64 + 1, *kind, name) {
                break;
            }
        }
        reply.ok()
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let blocks = self.dev.size().div_ceil(u64::from(BLOCK));
        reply.statfs(blocks, 0, 0, 2, 0, BLOCK, 255, BLOCK)
    }
}

fn session_config(cfg: &FuseConfig, fsname: &str, writable: bool) -> fuser::Config {
    let mut c = fuser::Config::default();
    c.mount_options = vec![
        if writable {
            MountOption::RW
        } else {
            MountOption::RO
        },
        MountOption::FSName(fsname.to_string()),
        MountOption::Subtype("smr".into()),
        MountOption::NoDev,
        MountOption::NoSuid,
        MountOption::CUSTOM(format!("max_read={}", cfg.max_read)),
    ];
    c.n_threads = Some(cfg.threads.max(1));
    c.clone_fd = true;
    c
}

fn new_session(
    dev: Arc<dyn BlockDevice>,
    dir: &Path,
    cfg: &FuseConfig,
    fsname: &str,
) -> Result<fuser::Session<ImageFs>> {
    if cfg.file_name.is_empty()
        || cfg.file_name.contains(['/', '\0'])
        || cfg.file_name == "."
        || cfg.file_name == ".."
    {
        return Err(FuseError::BadName(cfg.file_name.clone()));
    }
    let writable = !dev.read_only();
    let notifier = Arc::new(OnceLock::new());
    let fs = ImageFs {
        dev,
        cfg: cfg.clone(),
        mtime: SystemTime::now(),
        notifier: notifier.clone(),
        opened: AtomicBool::new(false),
    };
    let session =
        fuser::Session::new(fs, dir, &session_config(cfg, fsname, writable)).map_err(|source| {
            FuseError::Mount {
                dir: dir.to_path_buf(),
                source,
            }
        })?;
    let _ = notifier.set(session.notifier());
    Ok(session)
}

/// Mounts `dev` on `dir` and serves it until the filesystem is unmounted
/// (by anyone, or through the returned closure's unmounter being called
/// from another thread: see [`serve_until`]).
pub fn serve(dev: Arc<dyn BlockDevice>, dir: &Path, cfg: &FuseConfig, fsname: &str) -> Result<()> {
    serve_until(dev, dir, cfg, fsname, |_| {})
}

/// Like [`serve`], but first hands a [`fuser::SessionUnmounter`] to
/// `on_mounted` (e.g. for a signal handler thread to unmount with).
pub fn serve_until(
    dev: Arc<dyn BlockDevice>,
    dir: &Path,
    cfg: &FuseConfig,
    fsname: &str,
    on_mounted: impl FnOnce(fuser::SessionUnmounter),
) -> Result<()> {
    let mut session = new_session(dev, dir, cfg, fsname)?;
    on_mounted(session.unmount_callable());
    session.run().map_err(|source| FuseError::Session {
        dir: dir.to_path_buf(),
        source,
    })
}

/// A FUSE export served by threads of this process.
#[derive(Debug)]
pub struct FuseMount {
    dir: PathBuf,
    file: PathBuf,
    session: Option<fuser::BackgroundSession>,
}

impl FuseMount {
    /// Mounts `dev` as `dir/<cfg.file_name>` and serves it in background
    /// threads. `fsname` shows as the source in `/proc/mounts`.
    pub fn spawn(
        dev: Arc<dyn BlockDevice>,
        dir: &Path,
        cfg: &FuseConfig,
        fsname: &str,
    ) -> Result<Self> {
        let session = new_session(dev, dir, cfg, fsname)?;
        let session = session.spawn().map_err(|source| FuseError::Session {
            dir: dir.to_path_buf(),
            source,
        })?;
        Ok(FuseMount {
            dir: dir.to_path_buf(),
            file: dir.join(&cfg.file_name),
            session: Some(session),
        })
    }

    /// The exported file.
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// The mount directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Unmounts and waits (at most `timeout`) for the session threads to
    /// end. Anything still holding the file open (a loop device) keeps the
    /// connection alive: detach it first.
    pub fn unmount(mut self, timeout: Duration) -> Result<()> {
        self.stop(timeout)
    }

    fn stop(&mut self, timeout: Duration) -> Result<()> {
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        let (tx, rx) = crossbeam_channel::bounded(1);
        std::thread::spawn(move || {
            let _ = tx.send(session.umount_and_join());
        });
        let err = |source| FuseError::Session {
            dir: self.dir.clone(),
            source,
        };
        match rx.recv_timeout(timeout) {
            // The kernel aborts the connection as the unmount completes;
            // a session loop that sees that abort has ended cleanly.
            Ok(Err(e)) if e.raw_os_error() == Some(libc::ECONNABORTED) => {
                tracing::debug!(dir = %self.dir.display(), "FUSE session ended by the unmount's connection abort");
                Ok(())
            }
            Ok(r) => r.map_err(err),
            Err(_) => Err(err(io::Error::new(
                io::ErrorKind::TimedOut,
                "session did not end after unmount (is the file still open?)",
            ))),
        }
    }
}

impl Drop for FuseMount {
    fn drop(&mut self) {
        if let Err(e) = self.stop(Duration::from_secs(5)) {
            tracing::warn!(error = %e, "FUSE export not cleanly stopped");
        }
    }
}

#[cfg(test)]
mod tests;
