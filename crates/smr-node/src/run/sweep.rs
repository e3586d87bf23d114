//! Cleaning up after `smr run`s that died without undoing their setup
//! (SIGKILL, the OOM killer): their container, overlay, ext4 mount, loop
//! device, FUSE mount and run directory.
//!
//! Every run holds `LOCK_EX` on `RUN_DIR/lock` while it lives (the kernel
//! drops it when the process dies, however it dies). Each `smr run` first
//! sweeps the work root: a `run-*` directory whose lock it can take belongs
//! to a dead run. A directory without a lock file is a run being set up
//! right now (the lock is created just after the directory), unless it is
//! older than [`UNLOCKED_GRACE`].

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::cache::disk as disk_lock;
use crate::mount;

/// The lock file of a run directory.
pub(crate) const LOCK: &str = "lock";

/// Age after which a run directory without a lock file is a leftover.
pub const UNLOCKED_GRACE: Duration = Duration::from_secs(60);

/// Creates and locks `dir/lock` for the life of the returned file.
pub(crate) fn hold(dir: &Path) -> std::io::Result<File> {
    let f = File::create(dir.join(LOCK))?;
    disk_lock::lock_exclusive(&f)?;
    Ok(f)
}

/// The container id of the run in `dir` (as [`super::run`] names it).
pub(crate) fn container_id(dir: &Path) -> String {
    format!(
        "smr-{}",
        dir.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    )
}

/// Tears down the leftovers of dead runs under `work_root` (see the module
/// docs); returns the run directories removed. Failures are logged and the
/// directory is left for the next sweep.
pub fn sweep(work_root: &Path, runc: &str) -> usize {
    let Ok(entries) = std::fs::read_dir(work_root) else {
        return 0;
    };
    let mut removed = 0;
    for e in entries.flatten() {
        let dir = e.path();
        let is_run = e.file_name().to_string_lossy().starts_with("run-");
        if !is_run || !dir.is_dir() {
            continue;
        }
        // Held until the directory is gone: a dead run's lock is ours now.
        let _lock = match File::open(dir.join(LOCK)) {
            Ok(f) => match disk_lock::try_lock_exclusive(&f) {
                Ok(true) => Some(f),
                _ => continue, // alive
            },
            Err(_) => {
                let old = e
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age > UNLOCKED_GRACE);
                if !old {
                    continue; // being set up
                }
                None
            }
        };
        match tear_down(&dir, runc) {
            Ok(()) => {
                tracing::info!(dir = %dir.display(), "removed the leftovers of a dead smr run");
                removed += 1;
            }
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot clean up a dead smr run")
            }
        }
    }
    removed
}

fn tear_down(dir: &Path, runc: &str) -> Result<(), String> {
    let _ = Command::new(runc)
        .args(["delete", "--force", &container_id(dir)])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    let err = |what: &str, e: &dyn std::fmt::Display| format!("{what}: {e}");
    mount::umount(&dir.join("rootfs"), true).map_err(|e| err("overlay", &e))?;
    mount::umount(&dir.join("lower"), true).map_err(|e| err("image mount", &e))?;
    for (dev, file) in loops_under(dir) {
        mount::detach_loop(&dev, &file).map_err(|e| err(&dev, &e))?;
    }
    mount::umount(&dir.join("fuse"), true).map_err(|e| err("FUSE mount", &e))?;
    std::fs::remove_dir_all(dir).map_err(|e| err("removing it", &e))
}

/// Loop devices whose backing file is under `dir`.
fn loops_under(dir: &Path) -> Vec<(String, PathBuf)> {
    let Ok(devs) = std::fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    devs.flatten()
        .filter_map(|d| {
            let name = d.file_name().to_string_lossy().into_owned();
            let dev = format!("/dev/{name}");
            let file = mount::loop_backing_file(&dev)?;
            file.starts_with(dir).then_some((dev, file))
        })
        .collect()
}
