//! A node for the tests: a registry with the Debian test images, `smr
//! daemon` and a containerd that uses it as the `smr` snapshotter.

use crate::servers::{debian_layout, have, Registry};
use crate::util::{ok, repo_root, smr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Registry, daemon and containerd; torn down on drop.
pub struct Node {
    pub reg: Registry,
    pub dir: tempfile::TempDir,
    pub key: PathBuf,
    daemon: Option<Child>,
    pub containerd: PathBuf,
    /// Extra arguments of the next `smr daemon` started.
    pub daemon_args: Vec<String>,
}

/// `debian-python` as `py:1` (converted, with an smr artifact) and `debian`
/// as `deb:1` (converted only when `convert_debian`); with `creds`
/// (`USER:PASS`), the registry requires them.
pub fn registry_with_images(
    key: &Path,
    convert_debian: bool,
    creds: Option<&str>,
) -> Option<Registry> {
    let layout = debian_layout()?;
    let reg = Registry::start(creds)?;
    reg.push_layout(&layout, "debian-python", "py:1", creds);
    reg.push_layout(&layout, "debian", "deb:1", creds);
    let mut names = vec!["py:1"];
    if convert_debian {
        names.push("deb:1");
    }
    for n in names {
        ok(smr()
            .arg("convert")
            .arg(reg.image(n))
            .arg("--push")
            .arg("--no-optimize")
            .arg("--key-file")
            .arg(key)
            .env("SMR_REGISTRY_CREDS", creds.unwrap_or("")));
    }
    Some(reg)
}

impl Node {
    /// Starts a node, or `None` (test skipped) without the tools or images.
    pub fn start(convert_debian: bool) -> Option<Node> {
        Self::start_with(convert_debian, false)
    }

    /// With `cri`, containerd's CRI plugin is on, with a pause image built
    /// here and pushed to the registry.
    pub fn start_with(convert_debian: bool, cri: bool) -> Option<Node> {
        Self::start_full(convert_debian, cri, None)
    }

    /// With `creds` (`USER:PASS`), a registry that requires them: nothing
    /// on the node knows them (the pause image is not pushed; pulls only).
    pub fn start_full(convert_debian: bool, cri: bool, creds: Option<&str>) -> Option<Node> {
        let mut tools = vec!["containerd", "ctr", "runc", "containerd-shim-runc-v2"];
        if cri {
            tools.extend(["gcc", "umoci"]);
        }
        if !have(&tools) {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("owner.key");
        ok(smr().arg("keygen").arg("--out").arg(&key));
        let reg = registry_with_images(&key, convert_debian, creds)?;
        let mut n = Node {
            reg,
            key,
            daemon: None,
            containerd: PathBuf::new(),
            daemon_args: Vec::new(),
            dir,
        };
        n.start_daemon();
        let mut c = Command::new(repo_root().join("scripts/containerd.sh"));
        c.arg("start")
            .arg(n.dir.path().join("ctd"))
            .arg(n.snapshotter_socket());
        if cri {
            if creds.is_none() {
                push_pause_image(&n.reg, n.dir.path());
            }
            c.arg("--cri")
                .arg(format!("{}/pause:1", n.reg.addr))
                .arg("--plain-http")
                .arg(&n.reg.addr);
        }
        let out = ok(&mut c);
        n.containerd = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        Some(n)
    }

    pub fn root(&self) -> PathBuf {
        self.dir.path().join("smr")
    }

    pub fn cache(&self) -> PathBuf {
        self.dir.path().join("cache")
    }

    pub fn control_socket(&self) -> PathBuf {
        self.dir.path().join("smr.sock")
    }

    pub fn snapshotter_socket(&self) -> PathBuf {
        self.dir.path().join("snapshotter.sock")
    }

    /// Starts `smr daemon` and waits for its socket to answer. A daemon
    /// that runs hands its socket over to the new one and exits.
    pub fn start_daemon(&mut self) {
        let sock = self.snapshotter_socket();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("daemon.log"))
            .unwrap();
        let child = smr()
            .arg("--log")
            .arg("info")
            .arg("daemon")
            .arg("--root")
            .arg(self.root())
            .arg("--snapshotter-socket")
            .arg(&sock)
            .arg("--socket")
            .arg(self.control_socket())
            .arg("--cache-dir")
            .arg(self.cache())
            .arg("--key-file")
            .arg(&self.key)
            .args(&self.daemon_args)
            // As on a node where the daemon has the default socket: the
            // smr commands it runs would ask it, and must not.
            .env("SMR_DAEMON_SOCKET", self.control_socket())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        if let Some(mut old) = self.daemon.replace(child) {
            let t = Instant::now();
            while old.try_wait().unwrap().is_none() {
                assert!(
                    t.elapsed() < Duration::from_secs(30),
                    "old daemon did not hand over:\n{}",
                    self.daemon_log()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let t = Instant::now();
        while std::os::unix::net::UnixStream::connect(&sock).is_err() {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "daemon did not start:\n{}",
                self.daemon_log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the daemon with `signal` (`TERM` or `KILL`) and waits for it.
    pub fn stop_daemon(&mut self, signal: &str) {
        if let Some(mut c) = self.daemon.take() {
            let _ = Command::new("kill")
                .arg(format!("-{signal}"))
                .arg(c.id().to_string())
                .status();
            let _ = c.wait();
        }
    }

    /// Waits until containerd reaches the snapshotter again (after the
    /// socket went away, its client backs off up to 3 s).
    pub fn wait_for_containerd(&self) {
        let t = Instant::now();
        let ok = || {
            self.ctr()
                .args(["snapshot", "--snapshotter", "smr", "ls"])
                .output()
                .is_ok_and(|o| o.status.success())
        };
        while !ok() {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "containerd did not reconnect"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn daemon_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    /// `ctr -a SOCK ARGS...`.
    pub fn ctr(&self) -> Command {
        let mut c = Command::new("ctr");
        c.arg("-a").arg(&self.containerd);
        c
    }

    /// `smr pull --containerd SOCK IMAGE`: its stdout.
    pub fn pull(&self, name: &str) -> String {
        let out = ok(smr()
            // It tells the node daemon which image is coming.
            .env("SMR_DAEMON_SOCKET", self.control_socket())
            .arg("pull")
            .arg("--containerd")
            .arg(&self.containerd)
            .arg(self.reg.image(name)));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A container id unique on the machine (runc's state directory is
    /// shared by every containerd of the tests).
    pub fn id(&self, id: &str) -> String {
        let tag = self.dir.path().file_name().unwrap().to_string_lossy();
        format!("{id}{tag}")
    }

    /// `ctr run --rm --snapshotter smr IMAGE ID ARGS...`.
    pub fn run(&self, name: &str, id: &str, args: &[&str]) -> Output {
        let image = format!("{}/{name}", self.reg.addr);
        let out = self
            .ctr()
            .args(["run", "--rm", "--snapshotter", "smr"])
            .arg(image)
            .arg(self.id(id))
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ctr run {name} {args:?} failed: {}\ndaemon log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.daemon_log()
        );
        out
    }

    /// Names of the snapshots containerd has in the smr snapshotter.
    pub fn snapshots(&self) -> Vec<String> {
        let out = ok(self.ctr().args(["snapshot", "--snapshotter", "smr", "ls"]));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .skip(1)
            .filter_map(|l| l.split_whitespace().next().map(str::to_string))
            .collect()
    }

    /// Image mounts of the daemon that are live.
    pub fn image_mounts(&self) -> usize {
        let root = self.root().join("images");
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
        mounts
            .lines()
            .filter(|l| {
                l.split_whitespace()
                    .nth(1)
                    .is_some_and(|m| Path::new(m).starts_with(&root))
            })
            .count()
    }

    /// Removes every image and runs containerd's garbage collection.
    pub fn remove_all_images(&self) {
        let out = ok(self.ctr().args(["image", "ls", "-q"]));
        let names: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect();
        if !names.is_empty() {
            ok(self.ctr().args(["image", "rm", "--sync"]).args(&names));
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = Command::new(repo_root().join("scripts/containerd.sh"))
            .arg("stop")
            .arg(self.dir.path().join("ctd"))
            .status();
        self.stop_daemon("TERM");
        let images = self.root().join("images");
        for e in std::fs::read_dir(&images).into_iter().flatten().flatten() {
            let _ = smr()
                .arg("umount")
                .arg(e.path().join("rootfs"))
                .arg("--state-dir")
                .arg(self.root().join("mount-state"))
                .status();
        }
    }
}

/// Bytes of regular files under `dir`.
pub fn bytes_under(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let Ok(md) = e.metadata() else { continue };
            if md.is_dir() {
                stack.push(e.path());
            } else {
                total += md.len();
            }
        }
    }
    total
}

/// Builds a pause image (a static binary that waits for a signal) with gcc
/// and umoci and pushes it as `pause:1`.
fn push_pause_image(reg: &Registry, dir: &Path) {
    let src = dir.join("pause.c");
    std::fs::write(
        &src,
        "#include <signal.h>\n#include <unistd.h>\n#include <stdlib.h>\n\
         static void done(int s) { (void)s; exit(0); }\n\
         int main(void) { signal(SIGTERM, done); signal(SIGINT, done); for (;;) pause(); }\n",
    )
    .unwrap();
    let layout = dir.join("pause-layout");
    let bundle = dir.join("pause-bundle");
    let image = format!("{}:pause", layout.display());
    ok(Command::new("umoci")
        .arg("init")
        .arg("--layout")
        .arg(&layout));
    ok(Command::new("umoci").args(["new", "--image"]).arg(&image));
    ok(Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(&image)
        .arg(&bundle));
    ok(Command::new("gcc")
        .args(["-static", "-O2", "-o"])
        .arg(bundle.join("rootfs/pause"))
        .arg(&src));
    ok(Command::new("umoci")
        .args(["repack", "--image"])
        .arg(&image)
        .arg(&bundle));
    ok(Command::new("umoci")
        .args(["config", "--image"])
        .arg(&image)
        .args(["--config.entrypoint", "/pause"]));
    reg.push_layout(&layout, "pause", "pause:1", None);
}
