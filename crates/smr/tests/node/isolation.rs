//! What an image and its container can reach on the host: setuid files
//! and device nodes of a mounted image, the host's loopback, new
//! namespaces through seccomp, the run directory and the bundle.

use super::*;
use std::os::unix::fs::PermissionsExt;

/// A layout holding a setuid-root copy of the host's `id` and a node of
/// the host's `/dev/null` open to everyone.
fn hostile_layout(dir: &Path) -> String {
    use smr_testkit::{Compression, Entry, EntryKind, ImageBuilder, LayerBuilder};
    let id = std::fs::read("/usr/bin/id").unwrap();
    let mut l = LayerBuilder::new();
    l.dir("usr/", 0o755)
        .dir("usr/bin/", 0o755)
        .entry(
            Entry::new("usr/bin/id-suid", EntryKind::File(id))
                .mode(0o4755)
                .owner(0, 0),
        )
        .dir("dev/", 0o755)
        .entry(
            Entry::new("dev/open-null", EntryKind::CharDev(1, 3))
                .mode(0o666)
                .owner(0, 0),
        );
    let mut img = ImageBuilder::new();
    img.layer(l.into_bytes(), Compression::Gzip);
    img.cmd = vec!["/usr/bin/id-suid".into()];
    img.write_oci_layout(dir, Some("hostile")).unwrap();
    format!("oci:{}:hostile", dir.display())
}

/// After `smr mount`, an unprivileged host user does not get euid 0 from
/// the image's setuid-root binary, and nobody opens a host device through
/// the image's device node.
#[test]
fn mounted_images_keep_setuid_and_devices_inert() {
    if !smr_testkit::env::require_tools(&["setpriv"]) {
        return;
    }
    let _g = lock();
    let t = tempfile::tempdir().unwrap();
    let src = hostile_layout(&t.path().join("layout"));
    let e = Env::new(Some(&src));
    let mnt = e.path("mnt");
    std::fs::create_dir(&mnt).unwrap();
    // The test's temp directories must let `nobody` reach the mount.
    for d in [e.t.path(), &mnt] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    ok(e.smr("mount").arg(&mnt));
    let suid = mnt.join("usr/bin/id-suid");
    assert_eq!(mode(&suid), 0o4755, "the image keeps its mode bits");
    let out = run(Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&suid)
        .arg("-u"));
    let euid = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let dev = std::fs::OpenOptions::new()
        .write(true)
        .open(mnt.join("dev/open-null"));
    let state_mode = std::fs::metadata(e.path("state"))
        .unwrap()
        .permissions()
        .mode();
    // The node cache is root's: another user cannot open its lock files
    // (and so cannot hold a lock that would hang a start).
    let cache_lock = e.path("cache").join("fetch.lock");
    assert!(cache_lock.exists());
    let locker = run(Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "flock",
            "-n",
        ])
        .arg(&cache_lock)
        .arg("true"));
    ok(&mut e.umount(&mnt));
    e.assert_clean();
    assert!(!locker.status.success(), "another user took a cache lock");
    assert_eq!(mode(&e.path("cache")), 0o700, "cache directory mode");
    assert_eq!(
        euid,
        "65534",
        "setuid-root image binary ran as euid {euid:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = dev.expect_err("a device node of the image opened");
    assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied, "{err}");
    assert_eq!(state_mode & 0o777, 0o700, "state directory mode");
}

/// Waits for the only run directory under `runs` to have started its
/// container; returns it.
fn started_run(runs: &Path) -> PathBuf {
    let t = std::time::Instant::now();
    loop {
        let found = std::fs::read_dir(runs)
            .into_iter()
            .flatten()
            .flatten()
            .map(|d| d.path())
            .find(|p| p.join("started").exists());
        if let Some(p) = found {
            return p;
        }
        assert!(t.elapsed().as_secs() < 60, "the container never started");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

/// The container's own network namespace by default (the host's loopback
/// is out of reach), the host's with `--net host`; `unshare -Ur` is
/// refused unless `--security-opt seccomp=unconfined`; the run directory
/// is 0700 and the bundle's `config.json` (with `-e` secrets) 0600 while
/// the container runs; powercap is masked and the cgroup namespace is the
/// container's.
#[test]
fn run_keeps_the_container_away_from_the_host() {
    let Some(layout) = debian_layout() else {
        return;
    };
    let _g = lock();
    let e = Env::new(Some(&format!("oci:{}:debian-python", layout.display())));
    let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = server.local_addr().unwrap().port();
    let probe = format!(
        "import socket\ntry:\n  socket.create_connection(('127.0.0.1', {port}), 2); print('reached')\nexcept OSError as e: print('refused', e)"
    );
    let out = ok(e.smr("run").args(["--", "python3", "-c", &probe]));
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("refused"),
        "default network: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = ok(e
        .smr("run")
        .args(["--net", "none", "--", "python3", "-c", &probe]));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("refused"));
    let out = ok(e
        .smr("run")
        .args(["--net", "host", "--", "python3", "-c", &probe]));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "reached\n");
    if smr_testkit::env::require_tools(&["slirp4netns"]) {
        // Outbound traffic goes through slirp4netns's tap device.
        let out = ok(e
            .smr("run")
            .args(["--", "sh", "-c", "grep -c '^tap0' /proc/net/route"]));
        assert_eq!(String::from_utf8_lossy(&out.stdout), "2\n");
        assert!(
            !run(Command::new("pgrep").arg("-x").arg("slirp4netns"))
                .status
                .success(),
            "slirp4netns outlived its run"
        );
    }
    e.assert_clean();

    let out = run(e.smr("run").args(["--", "unshare", "-Ur", "id", "-u"]));
    assert!(!out.status.success(), "unshare -Ur worked under seccomp");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Operation not permitted"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = ok(e.smr("run").args([
        "--security-opt",
        "seccomp=unconfined",
        "--",
        "unshare",
        "-Ur",
        "id",
        "-u",
    ]));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "0\n");
    let err = fails(
        e.smr("run")
            .args(["--security-opt", "seccomp=/no/such.json", "--", "true"]),
    );
    assert!(err.contains("/no/such.json"), "{err}");
    e.assert_clean();

    let host_cgroup_ns = std::fs::read_link("/proc/self/ns/cgroup").unwrap();
    let child = e
        .smr("run")
        .args(["-e", "SECRET=s3cret", "--", "sh", "-c"])
        .arg("readlink /proc/self/ns/cgroup; ls -A /sys/devices/virtual/powercap 2>/dev/null | wc -l; sleep 2")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let dir = started_run(&e.path("runs"));
    let (runs_mode, dir_mode, cfg_mode) = (
        mode(&e.path("runs")),
        mode(&dir),
        mode(&dir.join("bundle/config.json")),
    );
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!((runs_mode, dir_mode, cfg_mode), (0o700, 0o700, 0o600));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut lines = stdout.lines();
    let ns = lines.next().unwrap_or_default();
    assert!(ns.starts_with("cgroup:["), "{stdout}");
    assert_ne!(Path::new(ns), host_cgroup_ns, "the host's cgroup namespace");
    let powercap = lines.next();
    let host_powercap = std::fs::read_dir("/sys/devices/virtual/powercap").map_or(0, |d| d.count());
    if host_powercap > 0 {
        assert_eq!(powercap, Some("0"), "powercap is not masked: {stdout}");
    }
    e.assert_clean();
}
