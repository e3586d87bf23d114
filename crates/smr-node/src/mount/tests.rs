//! Mount plumbing against the real kernel (root, /dev/fuse, loop devices).

use super::*;
use crate::fuse::{FuseConfig, FuseMount};
use crate::nbd::BlockDevice;
use std::process::Command;
use std::sync::Arc;

/// An image held in memory.
struct Mem(Vec<u8>);

impl BlockDevice for Mem {
    fn size(&self) -> u64 {
        self.0.len() as u64
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let start = usize::try_from(offset).map_err(std::io::Error::other)?;
        let src = self
            .0
            .get(start..start + buf.len())
            .ok_or_else(|| std::io::Error::other("out of range"))?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

fn root() -> bool {
    let ok = rustix::process::geteuid().is_root() && Path::new("/dev/fuse").exists();
    if !ok {
        eprintln!("note: mount test skipped (needs root and /dev/fuse)");
    }
    ok
}

/// A small ext4 image holding `hello` = "hi there\n".
fn ext4_image(dir: &Path) -> Vec<u8> {
    let tree = dir.join("tree");
    std::fs::create_dir_all(&tree).expect("mkdir");
    std::fs::write(tree.join("hello"), "hi there\n").expect("write");
    let img = dir.join("img");
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&tree)
        .arg(&img)
        .arg("4M")
        .output()
        .expect("mkfs.ext4");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read(img).expect("read img")
}

fn losetup_mentions(file: &Path) -> bool {
    let out = Command::new("losetup").arg("-a").output().expect("losetup");
    String::from_utf8_lossy(&out.stdout).contains(&file.display().to_string())
}

#[test]
fn state_dir_escapes_every_path_uniquely() {
    let r = Path::new("/run/x");
    assert_eq!(
        state_dir(r, Path::new("/mnt/a b")),
        Path::new("/run/x/%2Fmnt%2Fa%20b")
    );
    assert_ne!(
        state_dir(r, Path::new("/a-b")),
        state_dir(r, Path::new("/a/b"))
    );
}

#[test]
fn fuse_loop_ext4_stack_mounts_and_tears_down() {
    if !root() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let dev: Arc<dyn BlockDevice> = Arc::new(Mem(ext4_image(tmp.path())));
    let fuse_dir = tmp.path().join("fuse");
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir_all(&fuse_dir).expect("mkdir");
    std::fs::create_dir_all(&mnt).expect("mkdir");
    let fuse = FuseMount::spawn(dev, &fuse_dir, &FuseConfig::default(), "smr-test").expect("fuse");
    let opts = LoopOptions {
        readahead_kb: 16,
        direct_io: true,
    };
    let image = ImageMount::attach(fuse.file(), &mnt, opts).expect("attach");
    let ra = std::fs::read_to_string(format!(
        "/sys/block/{}/queue/read_ahead_kb",
        image.loop_dev().trim_start_matches("/dev/")
    ))
    .expect("read_ahead_kb");
    assert_eq!(ra.trim(), "16");
    assert_eq!(
        std::fs::read_to_string(mnt.join("hello")).expect("read"),
        "hi there\n"
    );
    // A second mount on the same point is refused before anything happens.
    let canon = mnt.canonicalize().expect("canon");
    assert!(matches!(
        check_mountpoint(&mnt),
        Err(MountError::AlreadyMounted(_))
    ));
    let file = fuse.file().to_path_buf();
    image.teardown().expect("teardown");
    assert!(!is_mountpoint(&canon));
    assert!(!losetup_mentions(&file));
    fuse.unmount(Duration::from_secs(5)).expect("fuse unmount");
    assert!(!is_mountpoint(&fuse_dir.canonicalize().expect("canon")));
}

#[test]
fn a_failing_loop_step_leaves_nothing_attached() {
    if !root() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    // Not ext4: the mount step fails after the loop device was attached.
    let file = tmp.path().join("zeros");
    std::fs::write(&file, vec![0u8; 1 << 20]).expect("write");
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir_all(&mnt).expect("mkdir");
    let err = ImageMount::attach(&file, &mnt, LoopOptions::default()).expect_err("must fail");
    assert!(matches!(err, MountError::Tool { .. }), "{err}");
    assert!(!losetup_mentions(&file));
}

#[test]
fn a_server_that_dies_at_start_leaves_no_state() {
    if !root() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir_all(&mnt).expect("mkdir");
    let req = MountRequest {
        state_root: tmp.path().join("state"),
        mountpoint: mnt.clone(),
        image_size: 4096,
        loop_opts: LoopOptions::default(),
    };
    let err = mount_with_server(&req, |_dir, out, errout| {
        Command::new("sh")
            .args(["-c", "echo boom >&2; exit 3"])
            .stdout(out)
            .stderr(errout)
            .spawn()
    })
    .expect_err("must fail");
    let msg = err.to_string();
    assert!(msg.contains("boom") && msg.contains("exited"), "{msg}");
    let left: Vec<_> = std::fs::read_dir(tmp.path().join("state"))
        .expect("state root")
        .collect();
    assert!(left.is_empty(), "state left: {left:?}");
}
