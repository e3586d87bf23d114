//! Directories only their owner may enter.

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
}
