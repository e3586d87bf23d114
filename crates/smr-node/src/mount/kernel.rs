//! Loop devices and mounts, through the standard tools (`losetup`,
//! `mount`, `umount`), so what smr does is what an administrator would
//! type, and their error messages reach the user unchanged.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use super::{MountError, Result};

/// Runs a tool, returning its trimmed stdout or its stderr as the error.
pub(crate) fn tool(cmd: &mut Command) -> Result<String> {
    let shown = format!("{cmd:?}").replace('"', "");
    let out = cmd.output().map_err(|source| MountError::Spawn {
        cmd: shown.clone(),
        source,
    })?;
    if !out.status.success() {
        return Err(MountError::Tool {
            cmd: shown,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

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

/// Attaches `file` read-only to a free loop device and returns its path.
pub fn attach_loop(file: &Path, direct_io: bool) -> Result<String> {
    let dio = if direct_io {
        "--direct-io=on"
    } else {
        "--direct-io=off"
    };
    tool(
        Command::new("losetup")
            .args(["--find", "--show", "--read-only", dio])
            .arg(file),
    )
}

/// Sets the loop device's (any block device's) `read_ahead_kb`.
pub fn set_read_ahead_kb(dev: &str, kb: u32) -> Result<()> {
    let name = Path::new(dev)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let path = PathBuf::from(format!("/sys/block/{name}/queue/read_ahead_kb"));
    std::fs::write(&path, format!("{kb}\n")).map_err(|source| MountError::Io { path, source })
}

/// The file behind loop device `dev`, if it is attached.
pub fn loop_backing_file(dev: &str) -> Option<PathBuf> {
    let name = Path::new(dev).file_name()?.to_string_lossy().into_owned();
    let s = std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file")).ok()?;
    Some(PathBuf::from(s.trim_end_matches('\n')))
}

/// Detaches loop device `dev` if it is still attached to `file` (a device
/// since reused for another file is left alone), and waits until the
/// kernel has let go of the file.
pub fn detach_loop(dev: &str, file: &Path) -> Result<()> {
    if loop_backing_file(dev).as_deref() != Some(file) {
        return Ok(());
    }
    tool(Command::new("losetup").arg("-d").arg(dev))?;
    let t = Instant::now();
    while loop_backing_file(dev).as_deref() == Some(file) {
        if t.elapsed() > Duration::from_secs(10) {
            return Err(MountError::Timeout(format!(
                "{dev} to release {}",
                file.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// Mounts ext4 from `dev` read-only on `dir`, without replaying a journal.
pub fn mount_ext4_ro(dev: &str, dir: &Path) -> Result<()> {
    tool(
        Command::new("mount")
            .args(["-t", "ext4", "-o", "ro,noload"])
            .arg(dev)
            .arg(dir),
    )
    .map(drop)
}

/// Mounts an overlay of writable `upper` (with `work`) over read-only
/// `lower` on `dir`.
pub fn mount_overlay(lower: &Path, upper: &Path, work: &Path, dir: &Path) -> Result<()> {
    for p in [lower, upper, work] {
        if p.to_string_lossy().contains([',', ':']) {
            return Err(MountError::BadPath(p.to_path_buf()));
        }
    }
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.display(),
        upper.display(),
        work.display()
    );
    tool(
        Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o", &opts])
            .arg(dir),
    )
    .map(drop)
}

/// Unmounts `dir` if it is a mount point, retrying a busy one for a
/// second; with `lazy`, a still-busy mount is then detached (`umount -l`).
pub fn umount(dir: &Path, lazy: bool) -> Result<()> {
    let t = Instant::now();
    loop {
        if !is_mountpoint(dir) {
            return Ok(());
        }
        match tool(Command::new("umount").arg(dir)) {
            Ok(_) => return Ok(()),
            Err(e) if t.elapsed() < Duration::from_secs(1) => {
                tracing::debug!(error = %e, "umount failed; retrying");
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(_) if lazy => return tool(Command::new("umount").arg("-l").arg(dir)).map(drop),
            Err(e) => return Err(e),
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoopOptions {
    /// The loop device's `read_ahead_kb`.
    pub readahead_kb: u32,
    /// Open the backing file with `O_DIRECT` (no second page cache).
    pub direct_io: bool,
}

impl Default for LoopOptions {
    fn default() -> Self {
        LoopOptions {
            readahead_kb: super::DEFAULT_READAHEAD_KB,
            direct_io: false,
        }
    }
}

impl ImageMount {
    /// Attaches `file` to a loop device, applies `opts` and mounts it on
    /// `dir`. On failure, nothing is left attached.
    pub fn attach(file: &Path, dir: &Path, opts: LoopOptions) -> Result<Self> {
        let loop_dev = attach_loop(file, opts.direct_io)?;
        let mut m = ImageMount {
            file: file.to_path_buf(),
            loop_dev,
            dir: dir.to_path_buf(),
            attached: true,
            mounted: false,
        };
        set_read_ahead_kb(&m.loop_dev, opts.readahead_kb)?;
        mount_ext4_ro(&m.loop_dev, dir)?;
        m.mounted = true;
        Ok(m)
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

    /// Unmounts and detaches the loop device.
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
