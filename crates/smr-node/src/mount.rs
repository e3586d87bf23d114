//! `smr mount` / `smr umount`: a lazy image mounted as read-only ext4.
//!
//! The stack, built bottom-up and torn down top-down:
//!
//! 1. a FUSE server process (the `smr` binary re-executed as a hidden
//!    subcommand, in its own session, logging to `STATE/serve.log`)
//!    exporting the [`LazyImage`](crate::lazy::LazyImage) as
//!    `STATE/fuse/image` ([`crate::fuse`]);
//! 2. a read-only loop device on that file, attached through the loop
//!    driver's ioctls with autoclear, whose `read_ahead_kb` is set from
//!    [`LoopOptions::readahead_kb`];
//! 3. the ext4 filesystem on it mounted read-only (mount(2), like
//!    `mount -t ext4 -o ro,noload,nosuid,nodev`) on the mount point; from then on the
//!    mount alone holds the loop device, and the kernel frees the device
//!    when it is unmounted.
//!
//! `STATE` is `ROOT/<escaped mount point>/` (ROOT defaults to
//! [`DEFAULT_STATE_ROOT`]), holding `state.json` ([`MountState`]), so that
//! `smr umount MNT` finds what to undo. A failure at any step undoes the
//! steps before it: no mount, loop device, FUSE connection or server is
//! left behind. `umount` also copes with a server that was killed (its
//! FUSE connection is then aborted and the ext4 mount reads fail with EIO
//! until unmounted).
//!
//! Readahead: the loop device's readahead decides how much the kernel
//! reads beyond what a program asked for, and so how many extra chunks are
//! fetched. The architecture brief measured 26 MB read at 0 KiB, 27 MB at
//! 16 KiB and 32 MB at 128 KiB for `import numpy`; [`DEFAULT_READAHEAD_KB`]
//! is the default until the benchmark picks one (`--readahead-kb`).
//!
//! A start that records a startup profile reads with
//! [`STARTUP_READAHEAD_KB`] and direct I/O instead: the pack then holds the
//! blocks the start uses rather than what two layers of readahead guessed
//! around them (a smaller pack, fetched sooner). The profile keeps that
//! readahead, and a start served from its pack reads with it, so that it
//! asks for the blocks the recorded one did (a larger one would read
//! blocks the pack lacks, each a round trip), through the page cache of
//! the FUSE file, where the server stores the pack's blocks as they
//! arrive ([`crate::lazy::LazyImage::seed_pages`]). A FUSE server
//! that serves a startup pack says so with the file [`STARTUP_PACK_MARK`]
//! in its state directory, holding that readahead, and
//! [`MountRequest::startup_opts`] then applies with it.

mod kernel;
mod loopdev;
mod retune;
#[cfg(test)]
mod tests;

pub use kernel::{
    attach_loop, detach_loop, is_mountpoint, loop_backing_file, mount_ext4_ro, mount_overlay,
    mounts, set_read_ahead_kb, umount, ImageMount, LoopOptions,
};
pub use loopdev::{LoopDevice, LOOP_CONTROL};
pub use retune::{
    device_read_bytes, pack_start_under_way, retune_after_start, retune_loop, RetuneWatch,
    StartEnd, START_MAX, START_QUIET,
};

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::fuse::FuseError;

/// Where `smr mount` keeps its state unless told otherwise.
pub const DEFAULT_STATE_ROOT: &str = "/run/smr/mounts";
/// Default `read_ahead_kb` of the loop device.
pub const DEFAULT_READAHEAD_KB: u32 = 128;
/// `read_ahead_kb` of a start that records a profile (see the module's
/// doc). Of 0, 4, 8, 16 and 32 KiB, 8 gave the fastest first starts (a
/// smaller pack; the sweep is in the message of commit ce081f4), at the
/// cost of more, smaller reads through FUSE when the pack is cached.
pub const STARTUP_READAHEAD_KB: u32 = 8;
/// The file a FUSE server creates in its state directory (the parent of
/// its export's directory) before exporting, when it serves a startup pack.
pub const STARTUP_PACK_MARK: &str = "startup-pack";
/// Whether the FUSE server in `state` serves a startup pack
/// ([`STARTUP_PACK_MARK`]), and with which readahead (KiB) the pack's
/// profile was recorded, if the mark says.
fn startup_mark(state: &Path) -> Option<Option<u32>> {
    let text = std::fs::read_to_string(state.join(STARTUP_PACK_MARK)).ok()?;
    Some(text.trim().parse().ok())
}

/// Whether the image `smr mount` mounted on `mnt` (with state under
/// `state_root`) is served from a startup pack: its start is the profile's
/// to prefetch.
pub fn serves_startup_pack(state_root: &Path, mnt: &Path) -> bool {
    state_dir(state_root, mnt).join(STARTUP_PACK_MARK).exists()
}

/// Writes the [`STARTUP_PACK_MARK`] of a FUSE server in `state` that
/// serves a startup pack recorded with `readahead_kb`: the mount then
/// attaches the loop device with [`MountRequest::startup_opts`] and that
/// readahead.
pub fn write_startup_mark(state: &Path, readahead_kb: u32) -> std::io::Result<()> {
    std::fs::write(state.join(STARTUP_PACK_MARK), format!("{readahead_kb}\n"))
}

/// What `smr mount --print-accepted` prints on its stdout once the image's
/// artifact is found, trusted and opened, before mounting it.
pub const ACCEPTED: &str = "accepted";

/// The file in a mount's state directory holding its [`MountState`].
pub const STATE_FILE: &str = "state.json";
/// How long the FUSE server may take to come up.
pub const SERVER_START_TIMEOUT: Duration = Duration::from_secs(20);

/// Errors of mounting and unmounting.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// A program (the FUSE server) could not be started.
    #[error("cannot run {cmd}: {source}")]
    Spawn {
        /// The command.
        cmd: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A loop device operation failed.
    #[error("loop device {dev} for {}: {op}: {source}", file.display())]
    Loop {
        /// The device (or `/dev/loop-control`).
        dev: String,
        /// The backing file.
        file: PathBuf,
        /// What was being done (an ioctl's name, `open`).
        op: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// mount(2) failed.
    #[error("{cmd}: {source}{}", mount_hint(source))]
    Mount {
        /// The equivalent `mount` command.
        cmd: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// umount2(2) failed.
    #[error("umount{} {}: {source}", if *lazy { " -l" } else { "" }, dir.display())]
    Unmount {
        /// The mount point.
        dir: PathBuf,
        /// Whether it was a lazy unmount (`MNT_DETACH`).
        lazy: bool,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Mount options longer than the kernel takes.
    #[error("{cmd}: options are {len} bytes, the kernel takes at most {max}")]
    OptionsTooLong {
        /// The equivalent `mount` command.
        cmd: String,
        /// Their length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A file operation failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The mount point is not a directory.
    #[error("mount point {} is not a directory", .0.display())]
    NotADirectory(PathBuf),
    /// Something is already mounted there.
    #[error("{} is already a mount point", .0.display())]
    AlreadyMounted(PathBuf),
    /// `umount` of a directory smr did not mount.
    #[error("no smr mount on {} (no state in {})", .0.display(), .1.display())]
    NotMounted(PathBuf, PathBuf),
    /// A path that mount options cannot carry (it holds a NUL byte).
    #[error("path {:?} cannot be used in mount options", .0)]
    BadPath(PathBuf),
    /// The FUSE server exited or did not come up.
    #[error("FUSE server {what}; its log {}:\n{tail}", log.display())]
    Server {
        /// What happened.
        what: String,
        /// Its log file.
        log: PathBuf,
        /// The end of its log.
        tail: String,
    },
    /// Waited too long.
    #[error("timed out waiting for {0}")]
    Timeout(String),
    /// The state file is unreadable.
    #[error("state file {}: {source}", path.display())]
    State {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// The in-process FUSE export failed.
    #[error(transparent)]
    Fuse(#[from] FuseError),
}

/// Result of this module.
pub type Result<T> = std::result::Result<T, MountError>;

/// What mount(8) would add to a mount(2) error.
fn mount_hint(e: &std::io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::EINVAL) => {
            " (wrong filesystem type, bad option or bad superblock; the kernel log may say more)"
        }
        Some(libc::ENODEV) => " (filesystem type not supported by the kernel)",
        Some(libc::ENOTBLK) => " (not a block device)",
        _ => "",
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> MountError + '_ {
    move |source| MountError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What `smr umount` needs to undo an `smr mount`; `STATE/state.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountState {
    /// The ext4 mount point (canonical).
    pub mountpoint: PathBuf,
    /// The FUSE mount directory.
    pub fuse_dir: PathBuf,
    /// The exported image file in it.
    pub file: PathBuf,
    /// The loop device.
    pub loop_dev: String,
    /// The FUSE server's process id.
    pub server_pid: u32,
    /// The FUSE server's log.
    pub log: PathBuf,
    /// The loop device's `read_ahead_kb`.
    pub readahead_kb: u32,
    /// Whether the loop device uses direct I/O.
    pub direct_io: bool,
    /// The settings the loop device gets once a start served from a
    /// startup pack is over (the server retunes it, [`retune_after_start`]);
    /// `None` when it was attached with them.
    #[serde(default)]
    pub after_start: Option<LoopOptions>,
    /// The runtime config of the image mounted (from its recipe), for a
    /// node service that starts the image's program; `None` when the
    /// mount was made without one.
    #[serde(default)]
    pub config: Option<smr_format::config::ImageConfig>,
}

/// The state directory of mount point `mnt` (canonical) under `root`
/// (made absolute: the mount's server, its state file and the mount table
/// name it by its full path): every byte other than `[A-Za-z0-9._-]` of
/// the path is `%XX`-escaped.
pub fn state_dir(root: &Path, mnt: &Path) -> PathBuf {
    let mut name = String::new();
    for b in mnt.as_os_str().as_encoded_bytes() {
        match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'.' | b'_' | b'-' => {
                name.push(char::from(*b))
            }
            _ => name.push_str(&format!("%{b:02X}")),
        }
    }
    std::path::absolute(root)
        .unwrap_or_else(|_| root.to_path_buf())
        .join(name)
}

/// Canonicalizes a mount point that must be an existing directory.
pub fn check_mountpoint(mnt: &Path) -> Result<PathBuf> {
    let canon = mnt.canonicalize().map_err(io_err(mnt))?;
    if !canon.is_dir() {
        return Err(MountError::NotADirectory(canon));
    }
    if is_mountpoint(&canon) {
        return Err(MountError::AlreadyMounted(canon));
    }
    Ok(canon)
}

fn log_tail(log: &Path) -> String {
    let Ok(mut f) = std::fs::File::open(log) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(2000)));
    let mut s = String::new();
    let _ = f.read_to_string(&mut s);
    s.trim().to_string()
}

/// Whether process `pid` is alive and still a FUSE server of `fuse_dir`
/// (its command line names the directory), so a reused pid is never killed.
fn is_our_server(pid: u32, fuse_dir: &Path) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let want = fuse_dir.as_os_str().as_encoded_bytes();
    cmdline.split(|b| *b == 0).any(|arg| arg == want)
}

/// Waits for the server to go away; asks it (SIGTERM) and then forces it
/// (SIGKILL) if it does not.
fn stop_server(pid: u32, fuse_dir: &Path) {
    let Some(p) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    else {
        return;
    };
    for (wait, sig) in [
        (Duration::from_secs(3), Some(rustix::process::Signal::TERM)),
        (Duration::from_secs(3), Some(rustix::process::Signal::KILL)),
        (Duration::from_secs(3), None),
    ] {
        let t = Instant::now();
        while is_our_server(pid, fuse_dir) && t.elapsed() < wait {
            std::thread::sleep(Duration::from_millis(20));
        }
        if !is_our_server(pid, fuse_dir) {
            return;
        }
        if let Some(sig) = sig {
            tracing::warn!(pid, ?sig, "FUSE server still running; signalling it");
            let _ = rustix::process::kill_process(p, sig);
        }
    }
}

/// A mount being built: undoes what was done if dropped before `finish`.
struct Building {
    fuse_dir: PathBuf,
    state: PathBuf,
    child: Option<Child>,
    image: Option<ImageMount>,
    done: bool,
}

impl Building {
    fn undo(&mut self) {
        if self.done {
            return;
        }
        drop(self.image.take());
        let _ = umount(&self.fuse_dir, true);
        if let Some(mut child) = self.child.take() {
            stop_server(child.id(), &self.fuse_dir);
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.state);
    }
}

impl Drop for Building {
    fn drop(&mut self) {
        self.undo();
    }
}

/// How to mount.
#[derive(Debug, Clone)]
pub struct MountRequest {
    /// The state root (see [`DEFAULT_STATE_ROOT`]).
    pub state_root: PathBuf,
    /// Where to mount the ext4 filesystem.
    pub mountpoint: PathBuf,
    /// The image's size in bytes (the server's file must reach it).
    pub image_size: u64,
    /// Loop device settings.
    pub loop_opts: LoopOptions,
    /// Loop device settings instead of `loop_opts` if the server serves a
    /// startup pack ([`STARTUP_PACK_MARK`]), with the readahead the mark
    /// names if it names one; `None` keeps `loop_opts`.
    pub startup_opts: Option<LoopOptions>,
    /// The image's runtime config, kept in the mount's state.
    pub config: Option<smr_format::config::ImageConfig>,
}

/// Mounts an image with a FUSE server started by `spawn(fuse_dir)` (its
/// stdout and stderr already go to the log file it is given). Returns the
/// saved state. Undoes every step on failure.
pub fn mount_with_server(
    req: &MountRequest,
    spawn: impl FnOnce(&Path, Stdio, Stdio) -> std::io::Result<Child>,
) -> Result<MountState> {
    let mnt = check_mountpoint(&req.mountpoint)?;
    crate::dirs::private_dir(&req.state_root).map_err(io_err(&req.state_root))?;
    let state = state_dir(&req.state_root, &mnt);
    if state.join(STATE_FILE).exists() {
        return Err(MountError::AlreadyMounted(mnt));
    }
    let fuse_dir = state.join("fuse");
    let log = state.join("serve.log");
    std::fs::create_dir_all(&fuse_dir).map_err(io_err(&fuse_dir))?;
    // Left by a mount killed before it was done: only this server says
    // whether it serves a startup pack.
    let mark = state.join(STARTUP_PACK_MARK);
    match std::fs::remove_file(&mark) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io_err(&mark)(e)),
        _ => {}
    }
    let mut b = Building {
        fuse_dir: fuse_dir.clone(),
        state: state.clone(),
        child: None,
        image: None,
        done: false,
    };
    let logf = std::fs::File::create(&log).map_err(io_err(&log))?;
    let logf2 = logf.try_clone().map_err(io_err(&log))?;
    let child =
        spawn(&fuse_dir, logf.into(), logf2.into()).map_err(|source| MountError::Spawn {
            cmd: "FUSE server".into(),
            source,
        })?;
    let server_pid = child.id();
    let child = b.child.insert(child);
    let file = fuse_dir.join(crate::fuse::FuseConfig::default().file_name);
    let t = Instant::now();
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(MountError::Server {
                what: format!("exited ({status})"),
                tail: log_tail(&log),
                log,
            });
        }
        if is_mountpoint(&fuse_dir)
            && std::fs::metadata(&file).is_ok_and(|m| m.len() == req.image_size)
        {
            break;
        }
        if t.elapsed() > SERVER_START_TIMEOUT {
            return Err(MountError::Server {
                what: format!(
                    "did not export {} in {SERVER_START_TIMEOUT:?}",
                    file.display()
                ),
                tail: log_tail(&log),
                log,
            });
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let (opts, after_start) = match (req.startup_opts, startup_mark(&state)) {
        (Some(o), Some(kb)) => (
            LoopOptions {
                readahead_kb: kb.unwrap_or(o.readahead_kb),
                ..o
            },
            Some(req.loop_opts),
        ),
        _ => (req.loop_opts, None),
    };
    let image = b.image.insert(ImageMount::attach(&file, &mnt, opts)?);
    let st = MountState {
        mountpoint: mnt,
        fuse_dir,
        file,
        loop_dev: image.loop_dev().to_string(),
        server_pid,
        log,
        readahead_kb: opts.readahead_kb,
        direct_io: opts.direct_io,
        after_start,
        config: req.config.clone(),
    };
    write_state(&state, &st)?;
    // Success: the mount stays; the server lives on in its own session.
    if let Some(image) = b.image.take() {
        image.keep();
    }
    b.done = true;
    Ok(st)
}

fn write_state(dir: &Path, st: &MountState) -> Result<()> {
    let path = dir.join(STATE_FILE);
    let tmp = dir.join("state.json.tmp");
    let json = serde_json::to_vec_pretty(st).map_err(|source| MountError::State {
        path: path.clone(),
        source,
    })?;
    std::fs::write(&tmp, json).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(io_err(&path))
}

/// Reads the state of the smr mount on `mnt` (as given or canonical).
pub fn read_state(state_root: &Path, mnt: &Path) -> Result<(PathBuf, MountState)> {
    let canon = mnt
        .canonicalize()
        .unwrap_or_else(|_| std::path::absolute(mnt).unwrap_or(mnt.to_path_buf()));
    let dir = state_dir(state_root, &canon);
    let path = dir.join(STATE_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(MountError::NotMounted(canon, path))
        }
        Err(e) => return Err(io_err(&path)(e)),
    };
    let st = serde_json::from_slice(&bytes).map_err(|source| MountError::State { path, source })?;
    Ok((dir, st))
}

/// Undoes `smr mount` of `mnt`: unmounts the ext4 filesystem (failing,
/// with nothing changed, if it is busy), detaches the loop device,
/// unmounts the FUSE directory, stops the server and removes the state.
pub fn unmount(state_root: &Path, mnt: &Path) -> Result<MountState> {
    let (dir, st) = read_state(state_root, mnt)?;
    ImageMount::adopt(st.file.clone(), st.loop_dev.clone(), st.mountpoint.clone()).teardown()?;
    umount(&st.fuse_dir, true)?;
    stop_server(st.server_pid, &st.fuse_dir);
    std::fs::remove_dir_all(&dir).map_err(io_err(&dir))?;
    Ok(st)
}

/// Body of the FUSE server process: serves `dev` on `fuse_dir` until it is
/// unmounted or the process gets SIGTERM, SIGINT or SIGHUP (then it
/// unmounts itself, and exits at the latest 3 s later if a loop device
/// still holds the file).
pub fn serve_fuse_process(
    dev: std::sync::Arc<dyn crate::nbd::BlockDevice>,
    fuse_dir: &Path,
    fsname: &str,
) -> Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals =
        signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP]).map_err(io_err(fuse_dir))?;
    let cfg = crate::fuse::FuseConfig::default();
    crate::fuse::serve_until(dev, fuse_dir, &cfg, fsname, move |mut unmounter| {
        std::thread::spawn(move || {
            if let Some(sig) = signals.forever().next() {
                tracing::info!(sig, "signal received; unmounting");
                let _ = unmounter.unmount();
                std::thread::sleep(Duration::from_secs(3));
                tracing::warn!("FUSE file still in use; exiting anyway");
                std::process::exit(1);
            }
        });
    })?;
    Ok(())
}
