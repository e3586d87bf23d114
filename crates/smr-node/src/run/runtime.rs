//! The OCI runtime (`runc` by default) as a run drives it: every command
//! with the run's own state root (`--root RUN_DIR/runtime`, a global
//! option of runc, crun and youki), so that the run knows where its
//! container's state lives.
//!
//! That is what lets a run skip `runc delete`: `runc run` in the
//! foreground deletes its container once the container's process has
//! exited, and `delete` then only execs the runtime to hear that there
//! is nothing left (about 4 ms of every run's teardown: a node start's
//! time from the container's exit to smr's went from 51 to 47 ms). A
//! container whose state is still there (the runtime was killed, or a
//! runtime that keeps it) is deleted as before. Runs of an older smr,
//! whose runtime kept their state in its default root, are still swept
//! ([`super::sweep`]).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Where a run keeps its runtime's state: this directory under the run
/// directory.
pub(crate) const STATE_ROOT: &str = "runtime";

/// An OCI runtime binary with a state root.
#[derive(Debug, Clone)]
pub(crate) struct Runtime {
    /// The binary (a name looked up in `PATH`, or a path).
    pub bin: String,
    /// Its `--root`; `None`: the runtime's default, where this process
    /// cannot tell whether a container's state is there.
    pub root: Option<PathBuf>,
}

impl Runtime {
    /// `bin` keeping its state in run directory `dir`.
    pub(crate) fn in_run_dir(bin: &str, dir: &Path) -> Self {
        Runtime {
            bin: bin.to_string(),
            root: Some(dir.join(STATE_ROOT)),
        }
    }

    /// `bin` with its default state root (how an older smr ran it).
    pub(crate) fn default_root(bin: &str) -> Self {
        Runtime {
            bin: bin.to_string(),
            root: None,
        }
    }

    /// A command of the runtime (`run`, `kill`, `delete`, ...).
    pub(crate) fn command(&self) -> Command {
        let mut c = Command::new(&self.bin);
        if let Some(root) = &self.root {
            c.arg("--root").arg(root);
        }
        c
    }

    /// Whether the runtime may still keep container `id`'s state (always,
    /// with the default root).
    pub(crate) fn holds(&self, id: &str) -> bool {
        self.root.as_ref().is_none_or(|r| r.join(id).exists())
    }

    /// Sends `signal` (a number or name) to container `id`; best effort.
    pub(crate) fn kill(&self, id: &str, signal: &str) {
        let _ = self.command().args(["kill", id, signal]).status();
    }

    /// Deletes container `id` (`delete --force`) if the runtime still
    /// keeps it; best effort, quiet.
    pub(crate) fn delete(&self, id: &str) {
        if !self.holds(id) {
            return;
        }
        let _ = self
            .command()
            .args(["delete", "--force", id])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in runtime: a shell script that logs its arguments.
    fn logging_runtime(dir: &Path) -> (Runtime, PathBuf) {
        use std::os::unix::fs::PermissionsExt;
        let log = dir.join("calls");
        let bin = dir.join("fake-runc");
        std::fs::write(
            &bin,
            format!("#!/bin/sh\necho \"$@\" >> {}\n", log.display()),
        )
        .expect("write script");
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let rt = Runtime::in_run_dir(bin.to_str().expect("utf-8 path"), dir);
        (rt, log)
    }

    #[test]
    fn delete_runs_only_while_the_state_is_there() {
        let d = tempfile::tempdir().expect("tempdir");
        let (rt, log) = logging_runtime(d.path());
        rt.delete("c1");
        assert!(!log.exists(), "no state: no delete");

        let root = d.path().join(STATE_ROOT);
        std::fs::create_dir_all(root.join("c1")).expect("state dir");
        assert!(rt.holds("c1"));
        rt.delete("c1");
        let calls = std::fs::read_to_string(&log).expect("log");
        assert_eq!(
            calls.trim(),
            format!("--root {} delete --force c1", root.display())
        );
    }

    #[test]
    fn every_command_names_the_root() {
        let d = tempfile::tempdir().expect("tempdir");
        let (rt, log) = logging_runtime(d.path());
        rt.kill("c2", "15");
        let calls = std::fs::read_to_string(&log).expect("log");
        assert_eq!(
            calls.trim(),
            format!("--root {} kill c2 15", d.path().join(STATE_ROOT).display())
        );
    }

    #[test]
    fn with_the_default_root_delete_always_runs() {
        let d = tempfile::tempdir().expect("tempdir");
        let (rt, log) = logging_runtime(d.path());
        let rt = Runtime::default_root(&rt.bin);
        assert!(rt.holds("c3"));
        rt.delete("c3");
        let calls = std::fs::read_to_string(&log).expect("log");
        assert_eq!(calls.trim(), "delete --force c3");
    }
}
