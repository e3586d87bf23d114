//! Directories only their owner may enter, and sockets that appear only
//! once they listen.

use std::path::Path;

/// Creates `dir` (and its parents) if missing, and makes it `0700`
/// owned by this user: refused if another user owns it.
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let meta = std::fs::symlink_metadata(dir)?;
    if !meta.is_dir() {
        return Err(std::io::Error::other("not a directory"));
    }
    if meta.uid() != rustix::process::geteuid().as_raw() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!("owned by uid {}, not by this user", meta.uid()),
        ));
    }
    if meta.mode() & 0o077 != 0 {
        tracing::info!(dir = %dir.display(), mode = format!("{:o}", meta.mode() & 0o7777), "making the directory private (0700)");
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// Binds a UNIX socket at `path` with permissions `mode`, replacing a
/// stale socket file there. The socket is bound and made listening under a
/// temporary name in the same directory and then renamed into place, so a
/// client that waits for `path` to exist never finds a socket that refuses
/// connections or has looser permissions than `mode`.
pub fn listen_unix(path: &Path, mode: u32) -> std::io::Result<std::os::unix::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    let name = path.file_name().ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "socket path has no file name",
        )
    })?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".{}.tmp", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let _ = std::fs::remove_file(&tmp);
    let listener = std::os::unix::net::UnixListener::bind(&tmp)?;
    let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn private_dirs_are_0700() {
        let t = tempfile::tempdir().expect("tmp");
        let d = t.path().join("a/b");
        private_dir(&d).expect("create");
        let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o7777;
        assert_eq!(mode(&d), 0o700);
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        private_dir(&d).expect("fix");
        assert_eq!(mode(&d), 0o700);
        let f = t.path().join("file");
        std::fs::write(&f, b"x").expect("write");
        assert!(private_dir(&f).is_err());
    }

    #[test]
    fn sockets_appear_listening_with_their_mode() {
        let t = tempfile::tempdir().expect("tmp");
        let path = t.path().join("s.sock");
        std::fs::write(&path, b"stale").expect("stale file");
        let l = listen_unix(&path, 0o600).expect("listen");
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode() & 0o7777;
        assert_eq!(mode, 0o600);
        let _c = std::os::unix::net::UnixStream::connect(&path).expect("connect");
        assert!(l.accept().is_ok());
        let names: Vec<_> = std::fs::read_dir(t.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("s.sock")]);
        let missing = t.path().join("no/such/dir/s.sock");
        assert!(listen_unix(&missing, 0o600).is_err());
    }
}
