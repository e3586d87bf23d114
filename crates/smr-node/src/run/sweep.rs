//! Cleaning up after `smr run`s that died without undoing their setup
//! (SIGKILL, the OOM killer): their container, overlay, ext4 mount (whose
//! unmount frees its loop device: it is attached with autoclear), FUSE
//! mount and run directory.
//!
//! Every run holds `LOCK_EX` on `RUN_DIR/lock` while it lives (the kernel
//! drops it when the process dies, however it dies). Each `smr run` first
//! sweeps the work root: a `run-*` directory whose lock it can take belongs
//! to a dead run. A directory without a lock file is a run being set up
//! right now (the lock is created just after the directory), unless it is
//! older than [`UNLOCKED_GRACE`].

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::cache::disk as disk_lock;
use crate::mount;

/// The lock file of a run directory.
pub(crate) const LOCK: &str = "lock";

/// Age after which a run directory without a lock file is a leftover.
pub const UNLOCKED_GRACE: Duration = Duration::from_secs(60);

/// A live run's directory (`WORK_ROOT/run-*`) and the lock on its
/// `lock` file that tells sweeps the run is alive.
///
/// Dropping it (an error path of [`super::run`]) removes the directory
/// first and only then releases the lock: fields drop in declaration
/// order. Released first, the lock would let another run's sweep take the
/// directory for a dead run's and race us to remove it.
pub(crate) struct RunDir {
    dir: tempfile::TempDir,
    _lock: File,
}

impl RunDir {
    /// Creates a new run directory under `work_root`, locked.
    pub(crate) fn create(work_root: &Path) -> std::io::Result<Self> {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::Builder::new()
            .prefix("run-")
            .permissions(std::fs::Permissions::from_mode(0o700))
            .tempdir_in(work_root)?;
        let lock = File::create(dir.path().join(LOCK))?;
        disk_lock::lock_exclusive(&lock)?;
        Ok(RunDir { dir, _lock: lock })
    }

    /// The directory.
    pub(crate) fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Removes the directory, then releases the lock.
    pub(crate) fn close(self) -> std::io::Result<()> {
        let RunDir { dir, _lock: lock } = self;
        let removed = dir.close();
        drop(lock);
        removed
    }
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
        if !dir.exists() {
            continue; // removed by its own run just before it let go of the lock
        }
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
    use super::runtime::{Runtime, STATE_ROOT};
    // A run of an older smr has no state root of its own: its runtime kept
    // the state in its default root.
    let runtime = if dir.join(STATE_ROOT).is_dir() {
        Runtime::in_run_dir(runc, dir)
    } else {
        Runtime::default_root(runc)
    };
    runtime.delete(&container_id(dir));
    let err = |what: &str, e: &dyn std::fmt::Display| format!("{what}: {e}");
    mount::umount(&dir.join("rootfs"), true).map_err(|e| err("overlay", &e))?;
    mount::umount(&dir.join("lower"), true).map_err(|e| err("image mount", &e))?;
    for (dev, file) in loops_under(dir) {
        mount::detach_loop(&dev, &file).map_err(|e| err(&dev, &e))?;
    }
    mount::umount(&dir.join("fuse"), true).map_err(|e| err("FUSE mount", &e))?;
    std::fs::remove_dir_all(dir).map_err(|e| err("removing it", &e))
}

/// Loop devices whose backing file is under `dir`: none once the ext4
/// mount is gone (autoclear), unless it is still busy after a lazy
/// unmount, or the device was attached without autoclear (an older smr).
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

#[cfg(test)]
mod tests {
    use super::*;

    /// `true` stands in for runc: the sweep's `runc delete` of a run with no
    /// container does nothing either way.
    const RUNC: &str = "true";

    #[test]
    fn a_live_run_directory_is_kept_and_a_dead_one_swept() {
        let root = tempfile::tempdir().expect("tempdir");
        let live = RunDir::create(root.path()).expect("run dir");
        std::fs::create_dir(live.path().join("rootfs")).expect("mkdir");
        assert_eq!(sweep(root.path(), RUNC), 0, "locked: alive");
        assert!(live.path().is_dir());

        // A dead run: its lock file is there, and nobody holds it.
        let dead = root.path().join("run-dead");
        std::fs::create_dir_all(dead.join("upper/etc")).expect("mkdir");
        File::create(dead.join(LOCK)).expect("lock file");
        assert_eq!(sweep(root.path(), RUNC), 1);
        assert!(!dead.exists(), "the dead run's directory is gone");
        assert!(live.path().is_dir(), "the live one is kept");

        let path = live.path().to_path_buf();
        live.close().expect("close");
        assert!(!path.exists());
    }

    #[test]
    fn dropping_a_run_directory_removes_it_and_frees_its_lock() {
        let root = tempfile::tempdir().expect("tempdir");
        let run = RunDir::create(root.path()).expect("run dir");
        let path = run.path().to_path_buf();
        // A sweep's view of the lock, opened while the directory exists.
        let sweeper = File::open(path.join(LOCK)).expect("open lock");
        assert!(
            !disk_lock::try_lock_exclusive(&sweeper).expect("try"),
            "held"
        );
        drop(run);
        assert!(!path.exists(), "removed");
        // Only now can the sweeper take it, and there is nothing left to sweep.
        assert!(disk_lock::try_lock_exclusive(&sweeper).expect("try"));
        assert_eq!(sweep(root.path(), RUNC), 0);
    }
}
