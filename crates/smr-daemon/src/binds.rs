//! `smr mount` through the daemon: the image is mounted once under
//! `ROOT/images` (shared with containerd's snapshots) and bound read-only
//! onto the user's mount point. Each bind is recorded in `ROOT/binds`, so
//! the image is not released while a bind uses it, and survives a restart
//! of the daemon.

use crate::images::Images;
use rustix::mount::{MountFlags, UnmountFlags};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use smr_image::source::{ImageSource, Platform};
use std::path::{Path, PathBuf};

/// One bind of an image onto a mount point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bind {
    /// The mount point (canonical).
    pub mountpoint: PathBuf,
    /// `docker://host/repo@manifest`.
    pub image: String,
    /// The manifest digest.
    pub manifest: String,
    /// The flattened image as a file, exported by the daemon's server of
    /// the image (for `smr serve-nbd` through the daemon).
    #[serde(default)]
    pub file: Option<PathBuf>,
    /// The process the bind was made for (`smr run`, `smr serve-nbd`):
    /// once it is gone the bind is removed ([`Binds::reap`]). `None` for
    /// `smr mount`'s binds, which stay until `smr umount`.
    #[serde(default)]
    pub owner: Option<Owner>,
}

/// A process, told apart from a later one with the same pid by its start
/// time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    /// Its pid.
    pub pid: u32,
    /// Its start time (`/proc/PID/stat` field 22, clock ticks after boot).
    pub start: u64,
}

impl Owner {
    /// Process `pid` as it is now, if it exists.
    pub fn of(pid: u32) -> Option<Owner> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Fields after the command (which may hold spaces), from its ')'.
        let rest = &stat[stat.rfind(')')? + 1..];
        let start = rest.split_whitespace().nth(19)?.parse().ok()?;
        Some(Owner { pid, start })
    }

    /// Whether the process still runs.
    pub fn alive(&self) -> bool {
        Owner::of(self.pid) == Some(*self)
    }
}

/// Errors of binds, each naming the image or mount point.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// The request is wrong (not a registry image, not a directory, ...).
    #[error("{0}")]
    BadRequest(String),
    /// No such bind.
    #[error("{0} is not mounted by the smr daemon")]
    NotFound(String),
    /// The image cannot be mounted now.
    #[error("{0}")]
    Unavailable(String),
    /// A system call failed.
    #[error("{0}")]
    Io(String),
}

/// The binds under `ROOT/binds`.
pub struct Binds {
    dir: PathBuf,
}

fn record_name(mnt: &Path) -> String {
    hex::encode(Sha256::digest(mnt.as_os_str().as_encoded_bytes()))
}

impl Binds {
    /// Binds recorded under `root/binds`.
    pub fn new(root: &Path) -> Binds {
        Binds {
            dir: root.join("binds"),
        }
    }

    /// Every record: its file and the bind.
    fn records(&self) -> Vec<(PathBuf, Bind)> {
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        rd.flatten()
            .filter_map(|e| {
                let b = serde_json::from_slice::<Bind>(&std::fs::read(e.path()).ok()?).ok()?;
                Some((e.path(), b))
            })
            .collect()
    }

    /// Every recorded bind whose mount point is still mounted.
    pub fn live(&self) -> Vec<Bind> {
        self.records()
            .into_iter()
            .map(|(_, b)| b)
            .filter(|b| smr_node::mount::is_mountpoint(&b.mountpoint))
            .collect()
    }

    /// Mounts `image` (`docker://…`, a tag or a digest) through `images`
    /// and binds it read-only on `mountpoint`.
    pub fn bind(
        &self,
        images: &Images,
        image: &str,
        mountpoint: &Path,
        owner: Option<u32>,
    ) -> Result<Bind, BindError> {
        let owner = match owner {
            Some(pid) => Some(Owner::of(pid).ok_or_else(|| {
                BindError::BadRequest(format!("process {pid} (the bind's owner) does not exist"))
            })?),
            None => None,
        };
        let opts = images.keychain().options_for(image);
        let src = smr_registry::source::RegistrySource::open(image, &opts)
            .map_err(|e| BindError::BadRequest(e.to_string()))?;
        let resolved = src
            .resolve(&Platform::default())
            .map_err(|e| BindError::Unavailable(format!("{image}: {e}")))?;
        let r = src.reference();
        let pinned = format!(
            "docker://{}/{}@{}",
            r.registry, r.repository, resolved.manifest_digest
        );
        let mnt = smr_node::mount::check_mountpoint(mountpoint)
            .map_err(|e| BindError::BadRequest(e.to_string()))?;
        let rootfs = images
            .ensure(&pinned, &resolved.manifest_digest)
            .map_err(BindError::Unavailable)?;
        let io = |what: &str, e: rustix::io::Errno| {
            BindError::Io(format!(
                "{what} {} on {}: {e}",
                rootfs.display(),
                mnt.display()
            ))
        };
        rustix::mount::mount_bind(&rootfs, &mnt).map_err(|e| io("binding", e))?;
        let ro = MountFlags::BIND | MountFlags::RDONLY | MountFlags::NOSUID | MountFlags::NODEV;
        if let Err(e) = rustix::mount::mount_remount(&mnt, ro, "") {
            let _ = rustix::mount::unmount(&mnt, UnmountFlags::DETACH);
            return Err(io("making read-only the bind of", e));
        }
        let b = Bind {
            mountpoint: mnt.clone(),
            image: pinned,
            file: images.image_file(&resolved.manifest_digest),
            manifest: resolved.manifest_digest,
            owner,
        };
        let write = || -> std::io::Result<()> {
            std::fs::create_dir_all(&self.dir)?;
            let path = self.dir.join(record_name(&mnt));
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, serde_json::to_vec(&b)?)?;
            std::fs::rename(&tmp, &path)
        };
        if let Err(e) = write() {
            let _ = rustix::mount::unmount(&mnt, UnmountFlags::DETACH);
            return Err(BindError::Io(format!(
                "recording the bind on {}: {e}",
                mnt.display()
            )));
        }
        tracing::info!(image = b.image, mountpoint = %mnt.display(), "image bound");
        Ok(b)
    }

    /// Removes the binds whose owner process is gone (killed before it
    /// could unbind): the mount is detached (a dead run's overlay may still
    /// hold it), the record and the mount point directory removed. Returns
    /// the binds removed.
    pub fn reap(&self) -> Vec<Bind> {
        let mut gone = Vec::new();
        for (path, b) in self.records() {
            if b.owner.is_none_or(|o| o.alive()) {
                continue;
            }
            if smr_node::mount::is_mountpoint(&b.mountpoint) {
                if let Err(e) = rustix::mount::unmount(&b.mountpoint, UnmountFlags::DETACH) {
                    tracing::warn!(mountpoint = %b.mountpoint.display(), error = %e, "cannot detach the bind of a process that is gone");
                    continue;
                }
            }
            let _ = std::fs::remove_dir(&b.mountpoint);
            let _ = std::fs::remove_file(&path);
            tracing::info!(image = b.image, mountpoint = %b.mountpoint.display(), owner = ?b.owner, "bind of a process that is gone removed");
            gone.push(b);
        }
        gone
    }

    /// Undoes [`Binds::bind`] of `mountpoint` (failing, with nothing
    /// changed, while it is busy).
    pub fn unbind(&self, mountpoint: &Path) -> Result<Bind, BindError> {
        let mnt = mountpoint
            .canonicalize()
            .map_err(|e| BindError::BadRequest(format!("{}: {e}", mountpoint.display())))?;
        let path = self.dir.join(record_name(&mnt));
        let b: Bind = std::fs::read(&path)
            .ok()
            .and_then(|v| serde_json::from_slice(&v).ok())
            .ok_or_else(|| BindError::NotFound(mnt.display().to_string()))?;
        if smr_node::mount::is_mountpoint(&mnt) {
            rustix::mount::unmount(&mnt, UnmountFlags::empty())
                .map_err(|e| BindError::Io(format!("unmounting {}: {e}", mnt.display())))?;
        }
        std::fs::remove_file(&path)
            .map_err(|e| BindError::Io(format!("removing {}: {e}", path.display())))?;
        tracing::info!(image = b.image, mountpoint = %mnt.display(), "image unbound");
        Ok(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_owner_is_alive_until_it_exits() {
        let me = Owner::of(std::process::id()).unwrap();
        assert!(me.alive());
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let owner = Owner::of(child.id()).unwrap();
        assert!(owner.alive());
        // Another process with this pid would have another start time.
        assert!(!Owner {
            start: owner.start + 1,
            ..owner
        }
        .alive());
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(!owner.alive());
        assert_eq!(Owner::of(u32::MAX), None);
    }
}
