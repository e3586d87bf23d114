//! Unpacks one OCI layer tar into an overlayfs layer directory, the way
//! containerd's overlay snapshotter lays layers out: whiteouts
//! (`.wh.NAME`) become 0/0 character devices and opaque markers
//! (`.wh..wh..opq`) the `trusted.overlay.opaque` xattr. Used when a layer
//! that is only part of a flattened smr image must exist on its own (an
//! image whose top layer is an inner layer of another lazily served image).
//!
//! Paths are confined to the directory: absolute names and `..` are
//! refused, and nothing is created through a symlink (the tar crate's
//! `unpack_in` checks regular entries; the entries handled here check the
//! canonical parent).

use std::io::Read;
use std::path::{Component, Path, PathBuf};

const WHITEOUT: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";

fn bad(entry: &Path, why: &str) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!("tar entry {}: {why}", entry.display()),
    )
}

/// `root/rel` for a relative path with only normal components, whose
/// parent directory exists (created) and lies under `root`.
fn confined(root: &Path, rel: &Path) -> std::io::Result<PathBuf> {
    let mut out = PathBuf::new();
    for c in rel.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            _ => return Err(bad(rel, "path leaves the layer")),
        }
    }
    let Some(name) = out.file_name().map(|n| n.to_os_string()) else {
        return Err(bad(rel, "empty path"));
    };
    let parent = root.join(out.parent().unwrap_or(Path::new("")));
    std::fs::create_dir_all(&parent)?;
    let canon = parent.canonicalize()?;
    if !canon.starts_with(root.canonicalize()?) {
        return Err(bad(rel, "parent directory is a symlink out of the layer"));
    }
    Ok(canon.join(name))
}

fn mknod(path: &Path, kind: rustix::fs::FileType, mode: u32, dev: u64) -> std::io::Result<()> {
    if std::fs::symlink_metadata(path).is_ok() {
        std::fs::remove_file(path)?;
    }
    rustix::fs::mknodat(
        rustix::fs::CWD,
        path,
        kind,
        rustix::fs::Mode::from_raw_mode(mode & 0o7777),
        dev,
    )?;
    Ok(())
}

/// Unpacks `tar` into `dir` (an empty layer directory).
pub fn unpack_layer(tar: impl Read, dir: &Path) -> std::io::Result<()> {
    let mut a = tar::Archive::new(tar);
    a.set_preserve_permissions(true);
    a.set_preserve_ownerships(true);
    a.set_preserve_mtime(true);
    a.set_unpack_xattrs(true);
    a.set_overwrite(true);
    for entry in a.entries()? {
        let mut e = entry?;
        let path = e.path()?.into_owned();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name == OPAQUE {
            let target = confined(dir, &path)?;
            let parent = target.parent().unwrap_or(dir);
            rustix::fs::lsetxattr(
                parent,
                "trusted.overlay.opaque",
                b"y",
                rustix::fs::XattrFlags::empty(),
            )?;
            continue;
        }
        if let Some(hidden) = name.strip_prefix(WHITEOUT) {
            let target = confined(dir, &path)?.with_file_name(hidden);
            if std::fs::symlink_metadata(&target).is_ok_and(|m| m.is_dir()) {
                std::fs::remove_dir_all(&target)?;
            }
            mknod(&target, rustix::fs::FileType::CharacterDevice, 0, 0)?;
            continue;
        }
        let h = e.header();
        let kind = h.entry_type();
        let node = if kind.is_character_special() {
            Some(rustix::fs::FileType::CharacterDevice)
        } else if kind.is_block_special() {
            Some(rustix::fs::FileType::BlockDevice)
        } else if kind.is_fifo() {
            Some(rustix::fs::FileType::Fifo)
        } else {
            None
        };
        if let Some(ft) = node {
            // Blank device fields (some writers leave them so for FIFOs) are 0.
            let major = h.device_major().ok().flatten().unwrap_or(0);
            let minor = h.device_minor().ok().flatten().unwrap_or(0);
            let mode = h.mode()?;
            let (uid, gid) = (h.uid()?, h.gid()?);
            let target = confined(dir, &path)?;
            mknod(&target, ft, mode, rustix::fs::makedev(major, minor))?;
            let owner = |id: u64| rustix::fs::Uid::from_raw(u32::try_from(id).unwrap_or(u32::MAX));
            let group = |id: u64| rustix::fs::Gid::from_raw(u32::try_from(id).unwrap_or(u32::MAX));
            rustix::fs::chownat(
                rustix::fs::CWD,
                &target,
                Some(owner(uid)),
                Some(group(gid)),
                rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
            )?;
            continue;
        }
        if !e.unpack_in(dir)? {
            return Err(bad(&path, "path leaves the layer"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};

    fn header(kind: tar::EntryType) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_mode(0o755);
        h.set_size(0);
        h
    }

    fn tar_of(entries: &[(&str, tar::EntryType, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, kind, data) in entries {
            let mut h = header(*kind);
            h.set_mode(0o755);
            h.set_size(data.len() as u64);
            h.set_path(path).unwrap();
            h.set_cksum();
            b.append(&h, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn whiteouts_become_overlay_whiteouts() {
        let t = tempfile::tempdir().unwrap();
        let tar = tar_of(&[
            ("d/", tar::EntryType::Directory, b""),
            ("d/f", tar::EntryType::Regular, b"hi"),
            ("d/.wh.gone", tar::EntryType::Regular, b""),
            ("o/.wh..wh..opq", tar::EntryType::Regular, b""),
            ("p", tar::EntryType::Fifo, b""),
        ]);
        unpack_layer(tar.as_slice(), t.path()).unwrap();
        assert_eq!(std::fs::read(t.path().join("d/f")).unwrap(), b"hi");
        let w = std::fs::symlink_metadata(t.path().join("d/gone")).unwrap();
        assert!(w.file_type().is_char_device());
        assert_eq!(w.rdev(), 0);
        assert!(!t.path().join("d/.wh.gone").exists());
        let opq = rustix::fs::getxattr(t.path().join("o"), "trusted.overlay.opaque", &mut [0u8; 4]);
        assert_eq!(opq.unwrap(), 1);
        assert!(std::fs::symlink_metadata(t.path().join("p"))
            .unwrap()
            .file_type()
            .is_fifo());
    }

    #[test]
    fn refuses_escapes_through_symlinks() {
        let t = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let mut b = tar::Builder::new(Vec::new());
        let mut h = header(tar::EntryType::Symlink);
        b.append_link(&mut h, "l", outside.path()).unwrap();
        let mut h = header(tar::EntryType::Regular);
        h.set_path("l/.wh.x").unwrap();
        h.set_cksum();
        b.append(&h, &b""[..]).unwrap();
        let tar = b.into_inner().unwrap();
        let err = unpack_layer(tar.as_slice(), t.path()).unwrap_err();
        assert!(err.to_string().contains("l/.wh.x"), "{err}");
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
    }
}
