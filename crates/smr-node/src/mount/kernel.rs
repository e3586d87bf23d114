//! Loop devices and mounts through the kernel's own interfaces: the loop
//! driver's ioctls ([`super::loopdev`]), mount(2) and umount2(2); and
//! `/proc/self/mountinfo` and sysfs to see what is there. Errors show the
//! equivalent command (`mount -t ext4 -o ro,noload,nosuid,nodev /dev/loop3 /mnt: ...`).

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::mount::{MountFlags, UnmountFlags};

use super::loopdev::{self, LoopDevice};
use super::{MountError, Result};

/// How long [`detach_loop`] (and a failed [`ImageMount::attach`]) wait
/// for the kernel to let go of a loop device's backing file.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(10);

/// The kernel reads at most one page of mount(2) data: 4 KiB on most
/// machines, the smallest page size. With the NUL.
const MAX_MOUNT_DATA: usize = 4096;

/// Undoes the octal escapes (`\040` for a space) of `/proc/*/mountinfo`.
fn unescape(field: &str) -> PathBuf {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let oct = b
            .get(i + 1..i + 4)
            .filter(|o| o.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (b[i], oct) {
            (b'\\', Some(o)) => {
                out.push(
                    o.iter()
                        .fold(0u8, |acc, c| acc.wrapping_mul(8).wrapping_add(c - b'0')),
                );
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    PathBuf::from(<std::ffi::OsString as std::os::unix::ffi::OsStringExt>::from_vec(out))
}

/// Mount points of this mount namespace, with their filesystem types,
/// from `/proc/self/mountinfo`.
pub fn mounts() -> Vec<(PathBuf, String)> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let dash = f.iter().position(|x| *x == "-")?;
            Some((unescape(f.get(4)?), (*f.get(dash + 1)?).to_string()))
        })
        .collect()
}

/// Whether something is mounted on `path` (compared as given: pass a
/// canonical path).
pub fn is_mountpoint(path: &Path) -> bool {
    mounts().iter().any(|(p, _)| p == path)
}

/// Attaches `file` read-only to a free loop device, with direct I/O if
/// `direct_io`, and with autoclear: the device stays attached while the
/// returned [`LoopDevice`] is open and then while something else (a
/// mount) holds it.
pub fn attach_loop(file: &Path, direct_io: bool) -> Result<LoopDevice> {
    loopdev::attach(file, direct_io, false, false)
}

/// Sets the loop device's (any block device's) `read_ahead_kb`.
pub fn set_read_ahead_kb(dev: &str, kb: u32) -> Result<()> {
    let name = Path::new(dev)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    write_read_ahead_kb(format!("/sys/block/{name}/queue/read_ahead_kb"), kb)
}

/// Sets the `read_ahead_kb` of the filesystem holding `file` (its bdi,
/// `/sys/class/bdi/MAJOR:MINOR`): the readahead of files opened on it
/// from then on.
pub fn set_backing_read_ahead_kb(file: &Path, kb: u32) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(file).map_err(super::io_err(file))?.dev();
    let (major, minor) = (rustix::fs::major(dev), rustix::fs::minor(dev));
    write_read_ahead_kb(format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb"), kb)
}

/// Writes `kb` to the sysfs `read_ahead_kb` file `path`.
fn write_read_ahead_kb(path: String, kb: u32) -> Result<()> {
    let path = PathBuf::from(path);
    std::fs::write(&path, format!("{kb}\n")).map_err(|source| MountError::Io { path, source })
}

/// The file behind loop device `dev`, if it is attached.
pub fn loop_backing_file(dev: &str) -> Option<PathBuf> {
    let name = Path::new(dev).file_name()?.to_string_lossy().into_owned();
    let s = std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file")).ok()?;
    Some(PathBuf::from(s.trim_end_matches('\n')))
}

/// Waits until loop device `dev` no longer has `file` behind it.
fn wait_released(dev: &str, file: &Path, timeout: Duration) -> Result<()> {
    let t = Instant::now();
    while loop_backing_file(dev).as_deref() == Some(file) {
        if t.elapsed() > timeout {
            return Err(MountError::Timeout(format!(
                "{dev} to release {}",
                file.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// Detaches loop device `dev` if it is still attached to `file` (a device
/// since freed, or reused for another file, is left alone), and waits
/// until the kernel has let go of the file. A device smr attached is
/// freed by the kernel when its filesystem is unmounted (autoclear), so
/// this is for one that is not mounted, or was attached without
/// autoclear; a device still mounted is not freed (this then times out).
pub fn detach_loop(dev: &str, file: &Path) -> Result<()> {
    if loop_backing_file(dev).as_deref() != Some(file) {
        return Ok(());
    }
    // `false`: freed (or being freed) meanwhile; wait for it all the same.
    loopdev::clear(dev, file)?;
    wait_released(dev, file, RELEASE_TIMEOUT)
}

/// Mounts ext4 from `dev` read-only on `dir`, without replaying a journal,
/// and with the image's setuid bits and device nodes inert
/// (`mount -t ext4 -o ro,noload,nosuid,nodev DEV DIR`): the mount is a
/// path every host user can reach (`smr mount`'s mount point), and an
/// image may hold a setuid-root binary or a node of a host device.
pub fn mount_ext4_ro(dev: &str, dir: &Path) -> Result<()> {
    rustix::mount::mount(
        dev,
        dir,
        "ext4",
        MountFlags::RDONLY | MountFlags::NOSUID | MountFlags::NODEV,
        c"noload",
    )
    .map_err(|e| MountError::Mount {
        cmd: format!(
            "mount -t ext4 -o ro,noload,nosuid,nodev {dev} {}",
            dir.display()
        ),
        source: e.into(),
    })
}

/// Mounts ext4 from `dev` read-write on `dir` (a volume), with setuid
/// bits and device nodes inert (`mount -t ext4 -o nosuid,nodev DEV DIR`).
pub fn mount_ext4_rw(dev: &str, dir: &Path) -> Result<()> {
    rustix::mount::mount(
        dev,
        dir,
        "ext4",
        MountFlags::NOSUID | MountFlags::NODEV,
        c"",
    )
    .map_err(|e| MountError::Mount {
        cmd: format!("mount -t ext4 -o nosuid,nodev {dev} {}", dir.display()),
        source: e.into(),
    })
}

/// `path` for overlayfs options: `\`, `,` and `:` escaped with a
/// backslash (the kernel splits options at `,` and `lowerdir` at `:`, and
/// undoes the escapes).
fn overlay_escape(path: &Path) -> Result<Vec<u8>> {
    let bytes = path.as_os_str().as_bytes();
    if bytes.contains(&0) {
        return Err(MountError::BadPath(path.to_path_buf()));
    }
    let mut out = Vec::with_capacity(bytes.len());
    for &b in bytes {
        if matches!(b, b'\\' | b',' | b':') {
            out.push(b'\\');
        }
        out.push(b);
    }
    Ok(out)
}

/// Mounts an overlay of writable `upper` (with `work`) over read-only
/// `lower` on `dir` (`mount -t overlay overlay -o
/// lowerdir=L,upperdir=U,workdir=W DIR`). Any path works, but the options
/// must fit in a page.
pub fn mount_overlay(lower: &Path, upper: &Path, work: &Path, dir: &Path) -> Result<()> {
    let mut data = Vec::new();
    for (key, path) in [
        ("lowerdir=", lower),
        ("upperdir=", upper),
        ("workdir=", work),
    ] {
        if !data.is_empty() {
            data.push(b',');
        }
        data.extend_from_slice(key.as_bytes());
        data.extend(overlay_escape(path)?);
    }
    let cmd = format!(
        "mount -t overlay overlay -o {} {}",
        String::from_utf8_lossy(&data),
        dir.display()
    );
    if data.len() >= MAX_MOUNT_DATA {
        return Err(MountError::OptionsTooLong {
            cmd,
            len: data.len(),
            max: MAX_MOUNT_DATA - 1,
        });
    }
    // No NUL in `data`: overlay_escape refused paths with one.
    let data = CString::new(data).map_err(|e| {
        MountError::BadPath(PathBuf::from(std::ffi::OsStr::from_bytes(&e.into_vec())))
    })?;
    rustix::mount::mount(
        "overlay",
        dir,
        "overlay",
        MountFlags::empty(),
        data.as_c_str(),
    )
    .map_err(|e| MountError::Mount {
        cmd,
        source: e.into(),
    })
}

fn unmount_err(dir: &Path, lazy: bool) -> impl FnOnce(rustix::io::Errno) -> MountError + '_ {
    move |e| MountError::Unmount {
        dir: dir.to_path_buf(),
        lazy,
        source: e.into(),
    }
}

/// Unmounts `dir` if it is a mount point, retrying a busy one for a
/// second; with `lazy`, a still-busy mount is then detached (`umount -l`,
/// `MNT_DETACH`: gone from the tree now, torn down when no longer used).
pub fn umount(dir: &Path, lazy: bool) -> Result<()> {
    let t = Instant::now();
    loop {
        if !is_mountpoint(dir) {
            return Ok(());
        }
        match rustix::mount::unmount(dir, UnmountFlags::NOFOLLOW) {
            Ok(()) => return Ok(()),
            Err(e) if t.elapsed() < Duration::from_secs(1) => {
                tracing::debug!(error = %e, dir = %dir.display(), "umount failed; retrying");
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(_) if lazy => {
                return rustix::mount::unmount(dir, UnmountFlags::NOFOLLOW | UnmountFlags::DETACH)
                    .map_err(unmount_err(dir, true))
            }
            Err(e) => return Err(unmount_err(dir, false)(e)),
        }
    }
}

/// An ext4 filesystem from an image file, mounted read-only through a loop
/// device. Torn down (unmount, detach) by [`ImageMount::teardown`] or,
/// best effort, on drop.
#[derive(Debug)]
pub struct ImageMount {
    file: PathBuf,
    loop_dev: String,
    dir: PathBuf,
    attached: bool,
    mounted: bool,
}

/// Loop device settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LoopOptions {
    /// The loop device's `read_ahead_kb`.
    pub readahead_kb: u32,
    /// Open the backing file with `O_DIRECT` (no second page cache).
    pub direct_io: bool,
    /// Attach and mount read-write (a volume); else read-only.
    pub writable: bool,
    /// The `read_ahead_kb` of the filesystem holding the backing file (its
    /// bdi: for a FUSE file, the FUSE mount's), set before the loop device
    /// opens the file, which takes its readahead from it then. `Some(0)`:
    /// no readahead on the file at all, its bdi untouched (the loop
    /// device's descriptor advised `POSIX_FADV_RANDOM`: a read asks for
    /// exactly the pages it misses, where a bdi of 0 would have them read
    /// one page per request). `None` leaves the kernel's (128 for FUSE).
    pub backing_readahead_kb: Option<u32>,
}

impl Default for LoopOptions {
    fn default() -> Self {
        LoopOptions {
            readahead_kb: super::DEFAULT_READAHEAD_KB,
            direct_io: false,
            writable: false,
            backing_readahead_kb: None,
        }
    }
}

impl ImageMount {
    /// Attaches `file` to a loop device, applies `opts` and mounts it on
    /// `dir`. On failure, nothing is left attached. The device is attached
    /// with autoclear: once this returns, it is the mount that holds it,
    /// and unmounting frees it (even if this process is gone by then).
    pub fn attach(file: &Path, dir: &Path, opts: LoopOptions) -> Result<Self> {
        let random = opts.backing_readahead_kb == Some(0);
        if let Some(kb) = opts.backing_readahead_kb.filter(|&kb| kb > 0) {
            set_backing_read_ahead_kb(file, kb)?;
        }
        let dev = loopdev::attach(file, opts.direct_io, opts.writable, random)?;
        let loop_dev = dev.path().to_string();
        let mounted = set_read_ahead_kb(&loop_dev, opts.readahead_kb).and_then(|()| {
            if opts.writable {
                mount_ext4_rw(&loop_dev, dir)
            } else {
                mount_ext4_ro(&loop_dev, dir)
            }
        });
        // Mounted, the filesystem holds the device; else nothing does, and
        // closing ours lets autoclear free it.
        drop(dev);
        if let Err(e) = mounted {
            if let Err(w) = wait_released(&loop_dev, file, RELEASE_TIMEOUT) {
                tracing::warn!(error = %w, "loop device not freed after a failed mount");
            }
            return Err(e);
        }
        Ok(ImageMount {
            file: file.to_path_buf(),
            loop_dev,
            dir: dir.to_path_buf(),
            attached: true,
            mounted: true,
        })
    }

    /// Takes over an existing mount (from saved state).
    pub fn adopt(file: PathBuf, loop_dev: String, dir: PathBuf) -> Self {
        ImageMount {
            file,
            loop_dev,
            dir,
            attached: true,
            mounted: true,
        }
    }

    /// Leaves the mount in place: dropping it no longer tears it down.
    pub fn keep(mut self) {
        self.attached = false;
        self.mounted = false;
    }

    /// The loop device.
    pub fn loop_dev(&self) -> &str {
        &self.loop_dev
    }

    /// Where the filesystem is mounted.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Unmounts, and detaches the loop device (usually freed by the
    /// unmount already: autoclear).
    pub fn teardown(mut self) -> Result<()> {
        self.stop()
    }

    fn stop(&mut self) -> Result<()> {
        if self.mounted {
            umount(&self.dir, false)?;
            self.mounted = false;
        }
        if self.attached {
            detach_loop(&self.loop_dev, &self.file)?;
            self.attached = false;
        }
        Ok(())
    }
}

impl Drop for ImageMount {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            tracing::warn!(error = %e, dir = %self.dir.display(), "image mount not cleanly torn down");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape("/a\\040b"), PathBuf::from("/a b"));
        assert_eq!(unescape("/a\\\\b\\12"), PathBuf::from("/a\\\\b\\12"));
        assert!(mounts().iter().any(|(p, _)| p == Path::new("/")));
    }
}
