//! The container's network (`--net`, like `docker run --network`).
//!
//! - [`Network::Default`]: a network namespace of its own, so the
//!   container cannot reach services bound to the host's loopback (such
//!   as another image served by `smr serve-nbd`). When `slirp4netns` is
//!   installed it gives the namespace outbound connectivity (user-mode
//!   TCP/IP, the container's address 10.0.2.100, DNS at 10.0.2.3) with
//!   `--disable-host-loopback`, so the gateway does not lead to the host's
//!   127.0.0.1 either; without it the container has a loopback interface
//!   only, and smr says so in a log line.
//! - [`Network::None`]: a namespace of its own with a loopback interface
//!   only.
//! - [`Network::Host`]: the host's network namespace, asked for
//!   explicitly.
//!
//! For the default, the namespace is made before runc starts: a thread of
//! smr unshares its network namespace and parks, runc joins it by path
//! (`/proc/PID/task/TID/ns/net`), and `slirp4netns` is attached to it and
//! waited for (`--ready-fd`) before the container starts. `slirp4netns`
//! exits when the pipe given as its `--exit-fd` closes, which happens
//! when smr exits however it exits, so nothing outlives the run. pasta
//! (Debian's `passt`) was the other candidate; the bookworm version cannot
//! join a namespace when started as root, which `smr run` is.

#![allow(unsafe_code)] // unshare(2), gettid(2), and dup2(2) before exec: see each SAFETY

use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// How the container reaches the network.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Network {
    /// Its own namespace, outbound through `slirp4netns` when installed.
    #[default]
    Default,
    /// Its own namespace, loopback only.
    None,
    /// The host's namespace.
    Host,
}

impl std::str::FromStr for Network {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "default" | "slirp4netns" | "private" => Ok(Network::Default),
            "none" => Ok(Network::None),
            "host" => Ok(Network::Host),
            _ => Err(format!(
                "unknown network {s:?} (expected default, none or host)"
            )),
        }
    }
}

/// How long `slirp4netns` may take to configure the namespace.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// The thread whose network namespace the container joins; dropping it
/// releases the thread.
struct Holder {
    release: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Holder {
    fn drop(&mut self) {
        drop(self.release.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A network namespace made for the container, with `slirp4netns`
/// attached. Dropping it stops both.
pub struct PrivateNet {
    path: PathBuf,
    slirp: Child,
    _exit_pipe: OwnedFd,
    _holder: Holder,
}

impl PrivateNet {
    /// The namespace's path, for the spec's `network` namespace.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// Stops `slirp4netns` without waiting for it: its exit tears down
    /// its tap device, which takes the kernel 10-20 ms, so the caller
    /// undoes other things meanwhile; dropping the namespace waits for it.
    pub fn stop(&mut self) {
        let _ = self.slirp.kill();
    }
}

impl Drop for PrivateNet {
    fn drop(&mut self) {
        // Closing the exit pipe (just after this) would stop slirp4netns
        // too; kill it here so that it is reaped, so that nothing outlives
        // the run. The holder thread goes last (fields drop in order).
        let _ = self.slirp.kill();
        let _ = self.slirp.wait();
    }
}

/// `slirp4netns` on `PATH`, if any.
pub fn find_slirp4netns() -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| PathBuf::from(d).join("slirp4netns"))
        .find(|p| p.is_file())
}

/// Makes a network namespace and attaches `slirp` to it; see the module
/// docs.
pub fn private(slirp: &std::path::Path) -> std::io::Result<PrivateNet> {
    let (tx_path, rx_path) = mpsc::channel();
    let (release, rx_release) = mpsc::channel::<()>();
    let holder = std::thread::Builder::new()
        .name("smr-netns".into())
        .spawn(move || {
            // SAFETY: unshare(CLONE_NEWNET) takes no pointers; it moves
            // only this thread into a new network namespace (threads
            // have their own), which is what this thread exists for.
            let made = if unsafe { libc::unshare(libc::CLONE_NEWNET) } == 0 {
                // SAFETY: gettid has no arguments and cannot fail.
                let tid = unsafe { libc::gettid() };
                Ok(PathBuf::from(format!(
                    "/proc/{}/task/{tid}/ns/net",
                    std::process::id()
                )))
            } else {
                Err(std::io::Error::last_os_error())
            };
            let ok = made.is_ok();
            let _ = tx_path.send(made);
            if ok {
                // Parked until the run ends: the namespace lives as long
                // as this thread (or the container) is in it.
                let _ = rx_release.recv();
            }
        })?;
    let holder = Holder {
        release: Some(release),
        thread: Some(holder),
    };
    let path = match rx_path.recv() {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => {
            return Err(std::io::Error::new(
                e.kind(),
                format!("creating a network namespace: {e}"),
            ))
        }
        Err(_) => return Err(std::io::Error::other("network namespace thread died")),
    };

    let pipes = (|| {
        let flags = rustix::pipe::PipeFlags::CLOEXEC;
        Ok::<_, rustix::io::Errno>((
            rustix::pipe::pipe_with(flags)?,
            rustix::pipe::pipe_with(flags)?,
        ))
    })();
    let ((exit_r, exit_w), (ready_r, ready_w)) = pipes?;
    // The child's ends above 4, so that placing them on 3 and 4 cannot
    // overwrite one with the other.
    let exit_r = rustix::io::fcntl_dupfd_cloexec(&exit_r, 10)?;
    let ready_w = rustix::io::fcntl_dupfd_cloexec(&ready_w, 10)?;
    let mut cmd = Command::new(slirp);
    cmd.args([
        "--configure",
        "--mtu=65520",
        "--disable-host-loopback",
        "--netns-type=path",
        "--exit-fd=3",
        "--ready-fd=4",
    ])
    .arg(&path)
    .arg("tap0")
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    let (er, rw) = (exit_r.as_raw_fd(), ready_w.as_raw_fd());
    // SAFETY: the closure runs in the forked child before exec and only
    // calls dup2, which is async-signal-safe; the descriptors are plain
    // integers of pipe ends open in the parent until spawn returns, both
    // at 10 or above, so neither is 3 or 4. dup2 onto 3 and 4 clears
    // CLOEXEC there, so exactly these two pipe ends survive the exec.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(move || {
            for (from, to) in [(er, 3), (rw, 4)] {
                if libc::dup2(from, to) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let spawned = cmd.spawn();
    drop(exit_r);
    drop(ready_w);
    let slirp_child = spawned
        .map_err(|e| std::io::Error::new(e.kind(), format!("starting {}: {e}", slirp.display())))?;
    let net = PrivateNet {
        path,
        slirp: slirp_child,
        _exit_pipe: exit_w,
        _holder: holder,
    };
    wait_ready(ready_r)
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", slirp.display())))?;
    Ok(net)
}

/// Waits up to [`READY_TIMEOUT`] for `slirp4netns` to write to its ready
/// pipe. The reader thread ends when the pipe closes, which the caller's
/// drop of [`PrivateNet`] (killing slirp4netns) guarantees on timeout.
fn wait_ready(ready: OwnedFd) -> std::io::Result<()> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut f = std::fs::File::from(ready);
        let mut b = [0u8; 1];
        let _ = tx.send(f.read(&mut b));
    });
    match rx.recv_timeout(READY_TIMEOUT) {
        Ok(Ok(1)) => Ok(()),
        Ok(Ok(_)) => Err(std::io::Error::other(
            "exited before configuring the network namespace",
        )),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("did not configure the network namespace in {READY_TIMEOUT:?}"),
        )),
    }
}
