//! Mount plumbing against the real kernel (root, /dev/fuse, loop devices).

use super::*;
use crate::device::BlockDevice;
use crate::fuse::{FuseConfig, FuseMount};
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

/// Root with loop devices (no FUSE needed).
fn loop_root() -> bool {
    let ok = rustix::process::geteuid().is_root() && Path::new(LOOP_CONTROL).exists();
    if !ok {
        eprintln!("note: loop test skipped (needs root and {LOOP_CONTROL})");
    }
    ok
}

/// A small ext4 image file in `dir` holding `hello` = "hi there\n".
fn ext4_file(dir: &Path) -> PathBuf {
    let bytes = ext4_image(dir);
    let file = dir.join("ext4.img");
    std::fs::write(&file, bytes).expect("write image");
    file
}

/// `/sys/block/loopN/<attr>` of device `dev`, trimmed.
fn sys_attr(dev: &str, attr: &str) -> Option<String> {
    let name = dev.trim_start_matches("/dev/");
    std::fs::read_to_string(format!("/sys/block/{name}/{attr}"))
        .ok()
        .map(|s| s.trim().to_string())
}

/// Waits (up to 10 s) until loop device `dev` has no `file` behind it.
fn freed(dev: &str, file: &Path) -> bool {
    let t = Instant::now();
    while loop_backing_file(dev).as_deref() == Some(file) {
        if t.elapsed() > Duration::from_secs(10) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
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
    // A relative root is taken from the current directory.
    let cwd = std::env::current_dir().unwrap();
    assert_eq!(
        state_dir(Path::new("st"), Path::new("/m")),
        cwd.join("st/%2Fm")
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
        writable: false,
        backing_readahead_kb: Some(512),
    };
    let image = ImageMount::attach(fuse.file(), &mnt, opts).expect("attach");
    let ra = std::fs::read_to_string(format!(
        "/sys/block/{}/queue/read_ahead_kb",
        image.loop_dev().trim_start_matches("/dev/")
    ))
    .expect("read_ahead_kb");
    assert_eq!(ra.trim(), "16");
    let bdi = {
        use std::os::unix::fs::MetadataExt;
        let dev = std::fs::metadata(fuse.file()).expect("stat").dev();
        (rustix::fs::major(dev), rustix::fs::minor(dev))
    };
    let fuse_ra =
        std::fs::read_to_string(format!("/sys/class/bdi/{}:{}/read_ahead_kb", bdi.0, bdi.1))
            .expect("the FUSE mount's read_ahead_kb");
    assert_eq!(
        fuse_ra.trim(),
        "512",
        "set before the loop device opened the file"
    );
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
    let loop_dev = image.loop_dev().to_string();
    assert_eq!(
        loop_backing_file(&loop_dev).as_deref(),
        Some(file.as_path())
    );
    image.teardown().expect("teardown");
    assert!(!is_mountpoint(&canon));
    assert_ne!(
        loop_backing_file(&loop_dev).as_deref(),
        Some(file.as_path())
    );
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
    assert!(matches!(err, MountError::Mount { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("mount -t ext4 -o ro,noload,nosuid,nodev /dev/loop")
            && msg.contains("wrong filesystem"),
        "{msg}"
    );
    assert!(!losetup_mentions(&file));
    assert!(!is_mountpoint(&mnt.canonicalize().expect("canon")));
}

#[test]
fn a_loop_device_is_read_only_with_autoclear_and_freed_by_the_unmount() {
    if !loop_root() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let file = ext4_file(tmp.path());
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir_all(&mnt).expect("mkdir");

    let dev = attach_loop(&file, true).expect("attach");
    let path = dev.path().to_string();
    assert_eq!(loop_backing_file(&path).as_deref(), Some(file.as_path()));
    assert_eq!(sys_attr(&path, "ro").as_deref(), Some("1"));
    assert_eq!(sys_attr(&path, "loop/autoclear").as_deref(), Some("1"));
    // /tmp's ext4 does direct I/O (the kernel falls back where it cannot).
    assert_eq!(sys_attr(&path, "loop/dio").as_deref(), Some("1"));
    set_read_ahead_kb(&path, 32).expect("read_ahead_kb");
    assert_eq!(
        sys_attr(&path, "queue/read_ahead_kb").as_deref(),
        Some("32")
    );
    mount_ext4_ro(&path, &mnt).expect("mount");
    drop(dev); // the mount holds it now
    assert_eq!(
        std::fs::read_to_string(mnt.join("hello")).expect("read"),
        "hi there\n"
    );
    assert_eq!(loop_backing_file(&path).as_deref(), Some(file.as_path()));
    let canon = mnt.canonicalize().expect("canon");
    umount(&canon, false).expect("umount");
    assert!(!is_mountpoint(&canon));
    assert!(freed(&path, &file), "autoclear frees {path} on unmount");
    // Nothing left to detach: a no-op.
    detach_loop(&path, &file).expect("detach a freed device");
}

#[test]
fn a_dropped_loop_device_is_freed_and_without_autoclear_detached() {
    if !loop_root() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let file = tmp.path().join("data");
    std::fs::write(&file, vec![7u8; 1 << 20]).expect("write");
    // Not mounted: closing the only descriptor frees it.
    let dev = attach_loop(&file, false).expect("attach");
    let path = dev.path().to_string();
    assert_eq!(sys_attr(&path, "loop/dio").as_deref(), Some("0"));
    drop(dev);
    assert!(freed(&path, &file));

    // A device attached without autoclear (by an older smr, say) is
    // detached with LOOP_CLR_FD.
    let out = Command::new("losetup")
        .args(["--find", "--show", "--read-only"])
        .arg(&file)
        .output()
        .expect("losetup");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_eq!(sys_attr(&path, "loop/autoclear").as_deref(), Some("0"));
    detach_loop(&path, &file).expect("detach");
    assert_ne!(loop_backing_file(&path).as_deref(), Some(file.as_path()));
    detach_loop(&path, &file).expect("detach again: nothing to do");
}

#[test]
fn concurrent_attaches_get_distinct_devices() {
    if !loop_root() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let files: Vec<PathBuf> = (0..6)
        .map(|i| {
            let f = tmp.path().join(format!("f{i}"));
            std::fs::write(&f, vec![0u8; 64 << 10]).expect("write");
            f
        })
        .collect();
    let devs: Vec<LoopDevice> = std::thread::scope(|s| {
        let handles: Vec<_> = files
            .iter()
            .map(|f| s.spawn(move || attach_loop(f, false).expect("attach")))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("join"))
            .collect()
    });
    let pairs: Vec<(String, &PathBuf)> = devs
        .iter()
        .map(|d| d.path().to_string())
        .zip(&files)
        .collect();
    for (d, f) in &pairs {
        assert_eq!(loop_backing_file(d).as_deref(), Some(f.as_path()));
    }
    let mut paths: Vec<&String> = pairs.iter().map(|(d, _)| d).collect();
    paths.sort();
    paths.dedup();
    assert_eq!(paths.len(), files.len());
    drop(devs);
    for (d, f) in &pairs {
        assert!(freed(d, f), "{d} freed");
    }
}

#[test]
fn a_lazy_unmount_of_a_busy_mount_frees_the_device_when_it_is_let_go() {
    if !loop_root() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let file = ext4_file(tmp.path());
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir_all(&mnt).expect("mkdir");
    let image = ImageMount::attach(&file, &mnt, LoopOptions::default()).expect("attach");
    let dev = image.loop_dev().to_string();
    image.keep();
    let canon = mnt.canonicalize().expect("canon");
    let busy = std::fs::File::open(canon.join("hello")).expect("open");
    let err = umount(&canon, false).expect_err("busy");
    assert!(
        matches!(err, MountError::Unmount { lazy: false, .. }),
        "{err}"
    );
    umount(&canon, true).expect("lazy umount");
    assert!(!is_mountpoint(&canon));
    // Still in use through `busy`: the filesystem, and so the device, live on.
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(loop_backing_file(&dev).as_deref(), Some(file.as_path()));
    drop(busy);
    assert!(freed(&dev, &file), "freed once the last file is closed");
}

#[test]
fn overlay_paths_with_commas_and_colons_are_escaped() {
    if !loop_root() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let base = tmp.path().join("a,b:c\\d");
    let [lower, upper, work, root] = ["lo,wer", "up:per", "wo\\rk", "ro,o:t"].map(|n| {
        let p = base.join(n);
        std::fs::create_dir_all(&p).expect("mkdir");
        p
    });
    std::fs::write(lower.join("f"), "lower\n").expect("write");
    mount_overlay(&lower, &upper, &work, &root).expect("overlay");
    assert_eq!(
        std::fs::read_to_string(root.join("f")).expect("read"),
        "lower\n"
    );
    std::fs::write(root.join("g"), "upper\n").expect("write");
    assert_eq!(
        std::fs::read_to_string(upper.join("g")).expect("read"),
        "upper\n"
    );
    umount(&root, false).expect("umount");
    assert!(!is_mountpoint(&root));
}

#[test]
fn overlay_options_too_long_are_refused_up_front() {
    let long = PathBuf::from(format!("/{}", "x".repeat(5000)));
    let err = mount_overlay(&long, &long, &long, Path::new("/nonexistent")).expect_err("long");
    assert!(matches!(err, MountError::OptionsTooLong { .. }), "{err}");
    let nul = PathBuf::from(
        <std::ffi::OsString as std::os::unix::ffi::OsStringExt>::from_vec(b"/a\0b".to_vec()),
    );
    let err = mount_overlay(&nul, &long, &long, Path::new("/x")).expect_err("nul");
    assert!(matches!(err, MountError::BadPath(_)), "{err}");
}

/// Environment variable that makes [`sigkill_child`] run (see
/// [`a_killed_process_leaks_no_loop_device`]): `MODE FILE MNT`.
const CHILD_ENV: &str = "SMR_TEST_LOOP_CHILD";

/// The child of [`a_killed_process_leaks_no_loop_device`]: attaches (mode
/// `fd`) or attaches and mounts (mode `mount`), says `READY /dev/loopN`
/// and waits to be killed.
#[test]
#[ignore = "run by a_killed_process_leaks_no_loop_device"]
fn sigkill_child() {
    let Ok(args) = std::env::var(CHILD_ENV) else {
        return;
    };
    let mut it = args.split('\n');
    let (Some(mode), Some(file), Some(mnt)) = (it.next(), it.next(), it.next()) else {
        panic!("bad {CHILD_ENV}: {args:?}");
    };
    let dev = match mode {
        "fd" => {
            let dev = attach_loop(Path::new(file), false).expect("attach");
            let path = dev.path().to_string();
            std::mem::forget(dev); // held until the process dies
            path
        }
        _ => {
            let m = ImageMount::attach(Path::new(file), Path::new(mnt), LoopOptions::default())
                .expect("mount");
            let path = m.loop_dev().to_string();
            m.keep();
            path
        }
    };
    println!("READY {dev}");
    std::thread::sleep(Duration::from_secs(60));
}

/// A child process that is SIGKILLed while holding a loop device leaks
/// nothing: before mounting, the device goes with the process; after, it
/// goes with the (here lazy) unmount.
#[test]
fn a_killed_process_leaks_no_loop_device() {
    use std::io::BufRead;
    if !loop_root() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let file = ext4_file(tmp.path());
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir_all(&mnt).expect("mkdir");
    let canon = mnt.canonicalize().expect("canon");
    for mode in ["fd", "mount"] {
        let mut child = Command::new(std::env::current_exe().expect("exe"))
            .args([
                "--exact",
                "mount::tests::sigkill_child",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(
                CHILD_ENV,
                format!("{mode}\n{}\n{}", file.display(), canon.display()),
            )
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("spawn child");
        let stdout = child.stdout.take().expect("stdout");
        let dev = std::io::BufReader::new(stdout)
            .lines()
            .map_while(std::result::Result::ok)
            // After libtest's "test ... " on the same line.
            .find_map(|l| l.split_once("READY ").map(|(_, d)| d.trim().to_string()));
        child.kill().expect("SIGKILL");
        child.wait().expect("wait");
        let dev = dev.expect("child said READY");
        if mode == "mount" {
            assert!(is_mountpoint(&canon), "the mount outlives its process");
            assert_eq!(loop_backing_file(&dev).as_deref(), Some(file.as_path()));
            umount(&canon, true).expect("lazy umount");
        }
        assert!(freed(&dev, &file), "{mode}: {dev} freed");
    }
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
        startup_opts: None,
        config: None,
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

/// Mounts the small ext4 image through [`mount_with_server`] with a
/// "server" that marks a startup pack if `mark` (the export itself is
/// served from this process), after a mount killed before it was done
/// left a mark if `stale`; returns the state, then unmounts.
fn mount_marked(mark: bool, stale: bool) -> MountState {
    let tmp = tempfile::tempdir().expect("tempdir");
    let bytes = ext4_image(tmp.path());
    let size = bytes.len() as u64;
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir_all(&mnt).expect("mkdir");
    let startup = LoopOptions {
        readahead_kb: STARTUP_READAHEAD_KB,
        direct_io: true,
        ..LoopOptions::default()
    };
    let req = MountRequest {
        state_root: tmp.path().join("state"),
        mountpoint: mnt.clone(),
        image_size: size,
        loop_opts: LoopOptions::default(),
        startup_opts: Some(startup),
        config: Some(smr_format::config::ImageConfig {
            cmd: vec!["python3".into()],
            ..Default::default()
        }),
    };
    if stale {
        let state = state_dir(
            &req.state_root,
            &check_mountpoint(&mnt).expect("mountpoint"),
        );
        std::fs::create_dir_all(&state).expect("mkdir");
        std::fs::write(state.join(STARTUP_PACK_MARK), "").expect("stale mark");
    }
    let mut fuse = None;
    let st = mount_with_server(&req, |dir, out, errout| {
        let state = dir.parent().expect("state dir");
        if mark {
            std::fs::write(state.join(STARTUP_PACK_MARK), "").expect("mark");
        }
        let dev: Arc<dyn BlockDevice> = Arc::new(Mem(bytes.clone()));
        fuse = Some(FuseMount::spawn(dev, dir, &FuseConfig::default(), "smr-test").expect("fuse"));
        Command::new("sleep")
            .arg("60")
            .stdout(out)
            .stderr(errout)
            .spawn()
    })
    .expect("mount");
    assert_eq!(
        sys_attr(&st.loop_dev, "queue/read_ahead_kb").as_deref(),
        Some(st.readahead_kb.to_string().as_str())
    );
    assert_eq!(
        std::fs::read_to_string(mnt.join("hello")).expect("read"),
        "hi there\n"
    );
    // The image's config is kept with the mount's state.
    let (_, saved) = read_state(&req.state_root, &mnt).expect("state");
    assert_eq!(saved.config, req.config);
    unmount(&req.state_root, &mnt).expect("unmount");
    drop(fuse);
    st
}

#[test]
fn a_server_serving_a_startup_pack_gets_the_startup_loop_options() {
    if !root() {
        return;
    }
    let marked = mount_marked(true, false);
    assert_eq!(
        (marked.readahead_kb, marked.direct_io),
        (STARTUP_READAHEAD_KB, true)
    );
    for stale in [false, true] {
        let plain = mount_marked(false, stale);
        assert_eq!(
            (plain.readahead_kb, plain.direct_io),
            (DEFAULT_READAHEAD_KB, false),
            "a mark left by a killed mount: {stale}"
        );
    }
}

/// A mounted ext4 file on a loop device attached with the startup
/// settings: (temp dir, file, mount, device).
fn startup_mount() -> (tempfile::TempDir, PathBuf, ImageMount) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let file = ext4_file(tmp.path());
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir_all(&mnt).expect("mkdir");
    let opts = LoopOptions {
        readahead_kb: STARTUP_READAHEAD_KB,
        direct_io: true,
        ..LoopOptions::default()
    };
    let image = ImageMount::attach(&file, &mnt, opts).expect("attach");
    assert_eq!(sys_attr(image.loop_dev(), "loop/dio").as_deref(), Some("1"));
    (tmp, file, image)
}

/// `(read_ahead_kb, dio)` of loop device `dev`.
fn loop_settings(dev: &str) -> (String, String) {
    let get = |a| sys_attr(dev, a).expect("sysfs attribute");
    (get("queue/read_ahead_kb"), get("loop/dio"))
}

#[test]
fn the_loop_device_is_retuned_once_reads_stop_or_at_the_latest_after_max() {
    if !loop_root() {
        return;
    }
    let normal = LoopOptions::default();
    for (label, reads_stop) in [("reads stop", true), ("reads go on", false)] {
        let (_tmp, file, image) = startup_mount();
        let dev = image.loop_dev().to_string();
        let reads = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = reads.clone();
        let target = dev.clone();
        let end = StartEnd {
            quiet: if reads_stop {
                Duration::from_millis(200)
            } else {
                Duration::from_secs(3600)
            },
            max: if reads_stop {
                Duration::from_secs(3600)
            } else {
                Duration::from_millis(300)
            },
        };
        let watch = retune_after_start(
            move || {
                // Reads that never stop: the counter moves at every look.
                Some(if reads_stop {
                    counter.load(std::sync::atomic::Ordering::Relaxed)
                } else {
                    counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                })
            },
            file.clone(),
            move || Some((target.clone(), normal)),
            end,
        )
        .expect("watch");
        watch.join();
        assert_eq!(
            loop_settings(&dev),
            (DEFAULT_READAHEAD_KB.to_string(), "0".to_string()),
            "{label}"
        );
        assert_eq!(
            std::fs::read_to_string(image.dir().join("hello")).expect("read after the retune"),
            "hi there\n",
            "{label}"
        );
        image.teardown().expect("teardown");
    }
}

#[test]
fn a_loop_device_serving_another_file_is_not_retuned() {
    if !loop_root() {
        return;
    }
    let (tmp, _file, image) = startup_mount();
    let dev = image.loop_dev();
    let before = loop_settings(dev);
    let other = tmp.path().join("other.img");
    assert!(!retune_loop(dev, &other, LoopOptions::default()).expect("retune"));
    assert_eq!(loop_settings(dev), before);
    image.teardown().expect("teardown");
    assert!(
        !retune_loop("/dev/loop-smr-none", &other, LoopOptions::default()).expect("retune"),
        "a device that is gone"
    );
    let err = retune_loop("/dev/null", &other, LoopOptions::default()).expect_err("not a loop");
    let msg = err.to_string();
    assert!(
        msg.contains("/dev/null") && msg.contains("not a loop device"),
        "{msg}"
    );
}

#[test]
fn a_start_is_under_way_by_the_kernels_reads_of_the_device() {
    if !loop_root() {
        return;
    }
    let (_tmp, _file, image) = startup_mount();
    let dev = image.loop_dev().to_string();
    let read = device_read_bytes(&dev).expect("stat");
    assert!(read > 0, "mounting read the superblock");
    assert_eq!(pack_start_under_way(&dev, 0, 0), None, "no pack");
    assert_eq!(pack_start_under_way(&dev, 0, read * 4), Some(read));
    assert_eq!(pack_start_under_way(&dev, 0, read * 4 + 4), None);
    assert_eq!(
        pack_start_under_way(&dev, read, 4),
        None,
        "nothing read since"
    );
    assert_eq!(
        pack_start_under_way(&dev, read / 2, read * 2),
        Some(read - read / 2)
    );
    assert_eq!(device_read_bytes("/dev/loop-smr-none"), None);
    image.teardown().expect("teardown");
}

#[test]
fn a_dropped_watch_changes_nothing() {
    if !loop_root() {
        return;
    }
    let (_tmp, file, image) = startup_mount();
    let dev = image.loop_dev().to_string();
    let before = loop_settings(&dev);
    let target = dev.clone();
    let end = StartEnd {
        quiet: Duration::from_millis(300),
        max: Duration::from_millis(300),
    };
    let watch = retune_after_start(
        || Some(0),
        file,
        move || Some((target.clone(), LoopOptions::default())),
        end,
    )
    .expect("watch");
    drop(watch);
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(loop_settings(&dev), before);
    image.teardown().expect("teardown");
}

#[test]
fn a_start_not_under_way_is_never_cut_short() {
    if !loop_root() {
        return;
    }
    let (_tmp, file, image) = startup_mount();
    let dev = image.loop_dev().to_string();
    let before = loop_settings(&dev);
    let under_way = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = under_way.clone();
    let target = dev.clone();
    let end = StartEnd {
        quiet: Duration::from_millis(100),
        max: Duration::from_millis(100),
    };
    let watch = retune_after_start(
        move || flag.load(std::sync::atomic::Ordering::Relaxed).then_some(7),
        file,
        move || Some((target.clone(), LoopOptions::default())),
        end,
    )
    .expect("watch");
    // The mounted, idle image: however long the container takes to come.
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(loop_settings(&dev), before, "not under way: kept");
    under_way.store(true, std::sync::atomic::Ordering::Relaxed);
    watch.join();
    assert_eq!(
        loop_settings(&dev),
        (DEFAULT_READAHEAD_KB.to_string(), "0".to_string())
    );
    image.teardown().expect("teardown");
}

#[test]
fn the_startup_mark_names_the_readahead_of_the_recorded_start() {
    let d = tempfile::tempdir().unwrap();
    assert_eq!(startup_mark(d.path()), None, "no mark: no startup pack");
    write_startup_mark(d.path(), 8).unwrap();
    assert_eq!(startup_mark(d.path()), Some(Some(8)));
    let mark = d.path().join(STARTUP_PACK_MARK);
    // A mark without a readahead (or garbage) keeps the asked-for one.
    for text in ["", "lots\n"] {
        std::fs::write(&mark, text).unwrap();
        assert_eq!(startup_mark(d.path()), Some(None), "{text:?}");
    }
}

/// Zeros, recording the size of every read the kernel asks for.
struct Sizes(std::sync::Mutex<Vec<(u64, usize)>>);

impl BlockDevice for Sizes {
    fn size(&self) -> u64 {
        8 << 20
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.0.lock().unwrap().push((offset, buf.len()));
        buf.fill(0);
        Ok(())
    }
}

#[test]
fn a_loop_device_told_random_asks_the_file_for_exactly_what_it_misses() {
    if !root() || !loop_root() {
        return;
    }
    for random in [true, false] {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dev = Arc::new(Sizes(std::sync::Mutex::new(Vec::new())));
        let fuse = FuseMount::spawn(dev.clone(), tmp.path(), &FuseConfig::default(), "smr-test")
            .expect("fuse");
        let lo = loopdev::attach(fuse.file(), false, false, random).expect("attach");
        set_read_ahead_kb(lo.path(), 4).expect("read_ahead_kb");
        let f = std::fs::File::open(lo.path()).expect("open the loop device");
        let mut buf = [0u8; 4096];
        // A sequential reader: the case the file's readahead is for.
        for k in 0..4 {
            rustix::io::pread(&f, &mut buf, (1 << 20) + k * 4096).expect("read");
        }
        let asked: Vec<usize> = dev
            .0
            .lock()
            .unwrap()
            .iter()
            .filter(|(o, _)| *o >= 1 << 20)
            .map(|&(_, n)| n)
            .collect();
        if random {
            assert_eq!(asked, vec![4096; 4], "the pages missed, and no more");
        } else {
            assert!(
                asked.iter().sum::<usize>() > 4 * 4096,
                "the FUSE file's readahead asks for more: {asked:?}"
            );
        }
        drop(f);
        let path = lo.path().to_string();
        drop(lo);
        loopdev::clear(&path, fuse.file()).expect("detach");
        let t = std::time::Instant::now();
        while loop_backing_file(&path).as_deref() == Some(fuse.file()) {
            assert!(t.elapsed() < Duration::from_secs(5), "{path} not released");
            std::thread::sleep(Duration::from_millis(20));
        }
        fuse.unmount(Duration::from_secs(5)).expect("unmount");
    }
}
