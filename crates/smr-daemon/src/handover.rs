//! Restarting the daemon without refusing a connection: the new process
//! takes the listening snapshotter socket from the old one.
//!
//! A running daemon listens on `ROOT/handover.sock` (0600). A new daemon
//! started on the same root connects to it; the old one sends its
//! listening socket over it (`SCM_RIGHTS`), stops accepting, finishes the
//! calls in flight, closes its metadata store and exits, which closes the
//! handover connection. The new daemon waits for that, opens the store and
//! accepts on the same socket. Connections that arrive in between wait in
//! the socket's backlog instead of being refused, and containerd's client
//! never sees the socket go away. (The image mounts need nothing: their
//! FUSE servers are processes of their own.) After a SIGKILL there is no
//! one to hand over; the new daemon binds the socket afresh.

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use std::io::{IoSlice, IoSliceMut, Read};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The byte that asks for the socket.
const REQUEST: u8 = b'H';
/// How long the new daemon waits for the old one to finish.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);

/// The handover socket of the daemon with root `root`.
pub fn socket_path(root: &Path) -> PathBuf {
    root.join("handover.sock")
}

fn err(path: &Path, what: &str, e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(format!("{what} {}: {e}", path.display()))
}

/// Sockets handed over at most.
const MAX_FDS: usize = 4;

/// New side: takes the listening sockets (snapshotter first, then the
/// control API) from a daemon running on `path`; `None` when none
/// answers. Returns after the old daemon has exited.
pub fn take_over(path: &Path) -> std::io::Result<Option<Vec<OwnedFd>>> {
    let mut s = match UnixStream::connect(path) {
        Ok(s) => s,
        Err(_) => return Ok(None),
    };
    rustix::io::write(&s, &[REQUEST]).map_err(|e| err(path, "asking", e))?;
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut cmsg = RecvAncillaryBuffer::new(&mut space);
    let mut byte = [0u8; 1];
    rustix::net::recvmsg(
        &s,
        &mut [IoSliceMut::new(&mut byte)],
        &mut cmsg,
        RecvFlags::CMSG_CLOEXEC,
    )
    .map_err(|e| err(path, "receiving the socket from", e))?;
    let mut fds = Vec::new();
    for m in cmsg.drain() {
        if let RecvAncillaryMessage::ScmRights(got) = m {
            fds.extend(got);
        }
    }
    if fds.is_empty() {
        return Err(err(path, "no socket received from", "empty message"));
    }
    // Wait for the old daemon to finish (the connection closes as it exits).
    s.set_read_timeout(Some(DRAIN_TIMEOUT))?;
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    tracing::info!(handover = %path.display(), sockets = fds.len(), "took the snapshotter socket over");
    Ok(Some(fds))
}

/// Old side: the handover socket, bound.
pub struct Offer {
    path: PathBuf,
    listener: UnixListener,
    closing: Arc<AtomicBool>,
}

/// Stops an [`Offer`] waiting in [`Offer::wait`] (when the daemon stops
/// without a handover).
#[derive(Clone)]
pub struct Withdraw {
    path: PathBuf,
    closing: Arc<AtomicBool>,
}

impl Withdraw {
    /// Makes `wait` return `None` and removes the socket.
    pub fn withdraw(&self) {
        self.closing.store(true, Ordering::SeqCst);
        let _ = UnixStream::connect(&self.path);
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Offer {
    /// Binds `path` (0600), replacing a stale socket file.
    pub fn bind(path: &Path) -> std::io::Result<(Offer, Withdraw)> {
        let listener =
            smr_node::dirs::listen_unix(path, 0o600).map_err(|e| err(path, "binding", e))?;
        let closing = Arc::new(AtomicBool::new(false));
        let w = Withdraw {
            path: path.to_path_buf(),
            closing: closing.clone(),
        };
        Ok((
            Offer {
                path: path.to_path_buf(),
                listener,
                closing,
            },
            w,
        ))
    }

    /// Waits for a new daemon to ask, sends it `listeners` and returns the
    /// connection, to be closed once this daemon has stopped; `None` once
    /// withdrawn.
    pub fn wait(self, listeners: &[OwnedFd]) -> std::io::Result<Option<UnixStream>> {
        let path = &self.path;
        loop {
            let (mut s, _) = self
                .listener
                .accept()
                .map_err(|e| err(path, "accepting on", e))?;
            if self.closing.load(Ordering::SeqCst) {
                return Ok(None);
            }
            let mut b = [0u8; 1];
            if s.read_exact(&mut b).is_err() || b[0] != REQUEST {
                continue;
            }
            let fds: Vec<_> = listeners.iter().take(MAX_FDS).map(|l| l.as_fd()).collect();
            let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
            let mut cmsg = SendAncillaryBuffer::new(&mut space);
            if !cmsg.push(SendAncillaryMessage::ScmRights(&fds)) {
                return Err(err(path, "building the message for", "no space"));
            }
            rustix::net::sendmsg(
                &s,
                &[IoSlice::new(&[REQUEST])],
                &mut cmsg,
                SendFlags::empty(),
            )
            .map_err(|e| err(path, "sending the socket over", e))?;
            let _ = std::fs::remove_file(path);
            return Ok(Some(s));
        }
    }
}
