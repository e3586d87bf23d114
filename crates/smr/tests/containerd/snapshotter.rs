//! `ctr run --snapshotter smr`: lazy images, the fallback to containerd's
//! own unpacking, garbage collection, daemon restarts and concurrency.

use crate::node::{bytes_under, Node};
use std::time::Duration;

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// Checks that `run` (a `ctr run` of `cat /etc/debian_version`) printed
/// Debian 12's. `ctr run` of a short-lived process can lose its output
/// (containerd/containerd#770): a run that succeeded with no output at all
/// is tried again, twice at most.
fn assert_debian_version(run: impl Fn() -> std::process::Output) {
    let mut o = run();
    for _ in 0..2 {
        if !o.stdout.is_empty() {
            break;
        }
        eprintln!("ctr run: no output, running it again");
        o = run();
    }
    assert!(
        stdout(&o).starts_with("12."),
        "{}: stdout {:?}, stderr {:?}",
        o.status,
        stdout(&o),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// The full image, for comparison: what `smr convert` stored.
const PY_STORED_BYTES: u64 = 200 << 20;

#[test]
fn lazy_run_fallback_and_gc() {
    let Some(node) = Node::start(false) else {
        return;
    };
    // debian has no smr artifact: smr pull falls back to containerd's
    // unpacking (content store + diff service) through the smr snapshotter.
    let out = node.pull("deb:1");
    assert!(out.contains("0 layers lazy, 1 unpacked"), "{out}");
    assert_debian_version(|| node.run("deb:1", "c-deb", &["cat", "/etc/debian_version"]));
    // debian-python shares the base layer (present) and is lazy above it.
    let out = node.pull("py:1");
    assert!(
        out.contains("1 layers lazy, 0 unpacked, 1 present"),
        "{out}"
    );
    let o = node.run(
        "py:1",
        "c-py",
        &["python3", "-c", "import json; print(json.dumps([1]))"],
    );
    assert_eq!(stdout(&o), "[1]");
    let fetched = bytes_under(&node.cache());
    eprintln!("debian-python via containerd: {fetched} bytes fetched into the node cache");
    assert!(fetched < PY_STORED_BYTES / 2, "{fetched} bytes fetched");
    assert_eq!(node.image_mounts(), 1);
    // Image removal and containerd's GC remove the snapshots, their
    // directories and the image mount.
    node.remove_all_images();
    assert!(node.snapshots().is_empty(), "{:?}", node.snapshots());
    assert_eq!(
        std::fs::read_dir(node.root().join("snapshots"))
            .unwrap()
            .count(),
        0
    );
    assert_eq!(node.image_mounts(), 0);

    // The other order: the lazy image first, then containerd's own pull of
    // the base image, whose only layer is an inner layer of the lazy one.
    let out = node.pull("py:1");
    assert!(out.contains("2 layers lazy"), "{out}");
    let image = format!("{}/deb:1", node.reg.addr);
    crate::util::ok(
        node.ctr()
            .args(["image", "pull", "--plain-http", "--snapshotter", "smr"])
            .arg(&image),
    );
    assert_debian_version(|| node.run("deb:1", "c-deb2", &["cat", "/etc/debian_version"]));
    assert!(
        node.daemon_log().contains("unpacked on its own"),
        "{}",
        node.daemon_log()
    );
    let o = node.run("py:1", "c-py2", &["python3", "-c", "print(6*7)"]);
    assert_eq!(stdout(&o), "42");
    node.remove_all_images();
    assert!(node.snapshots().is_empty());
    assert_eq!(node.image_mounts(), 0);
}

#[test]
fn daemon_restarts_do_not_break_running_containers() {
    let Some(mut node) = Node::start(false) else {
        return;
    };
    node.pull("py:1");
    // A container that reads the image in a loop for the whole test.
    let image = format!("{}/py:1", node.reg.addr);
    let script =
        "for i in $(seq 1 400); do cat /usr/lib/python3.11/*.py > /dev/null || echo READ-FAILED; \
                  sleep 0.02; done; echo LOOP-DONE";
    let reader = node
        .ctr()
        .args(["run", "--rm", "--snapshotter", "smr"])
        .arg(&image)
        .arg(node.id("reader"))
        .args(["sh", "-c", script])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    // Five upgrades: a new daemon takes the socket over from the running
    // one, while containerd keeps using it (a container starts each time).
    for i in 0..5 {
        node.start_daemon();
        let o = node.run(
            "py:1",
            &format!("during-{i}"),
            &["python3", "-c", "print('up')"],
        );
        assert_eq!(stdout(&o), "up");
    }
    assert_eq!(
        node.daemon_log()
            .matches("took the snapshotter socket over")
            .count(),
        5
    );
    // A SIGKILL: the socket is gone until the new daemon binds it again,
    // and containerd reconnects (its client backs off up to 3 s).
    node.stop_daemon("KILL");
    node.start_daemon();
    node.wait_for_containerd();
    // State restored from disk: new containers start on the same image.
    let o = node.run("py:1", "after", &["python3", "-c", "print('back')"]);
    assert_eq!(stdout(&o), "back");
    let out = reader.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("LOOP-DONE") && !text.contains("READ-FAILED"),
        "{text}"
    );
    // A registry that is down does not keep the daemon from starting, and
    // what it serves is still there.
    node.reg.stop();
    node.stop_daemon("TERM");
    node.start_daemon();
    node.wait_for_containerd();
    let out = crate::util::ok(
        crate::util::smr()
            .arg("status")
            .arg("--socket")
            .arg(node.control_socket()),
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("2 remote"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    node.reg.start_again();
    node.remove_all_images();
    assert_eq!(node.image_mounts(), 0, "{}", node.daemon_log());
}

#[test]
fn idle_images_are_unmounted_and_mounted_again() {
    let Some(mut node) = Node::start(false) else {
        return;
    };
    node.daemon_args = vec!["--release-after".into(), "1s".into()];
    node.start_daemon();
    node.pull("py:1");
    let o = node.run("py:1", "idle-1", &["python3", "-c", "print(1)"]);
    assert_eq!(stdout(&o), "1");
    // Released: unmounted, and the daemon says so (it logs once the
    // unmount returned, so the log line may trail the mount table).
    let t = std::time::Instant::now();
    while node.image_mounts() != 0 || !node.daemon_log().contains("idle image unmounted") {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "idle image not released:\n{}",
            node.daemon_log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Still pulled: the next container mounts it again.
    let o = node.run("py:1", "idle-2", &["python3", "-c", "print(2)"]);
    assert_eq!(stdout(&o), "2");
    node.remove_all_images();
    assert_eq!(node.image_mounts(), 0);
}

#[test]
fn ten_containers_of_two_images_at_once() {
    let Some(node) = Node::start(true) else {
        return;
    };
    // debian first: its layer is then the top of a lazy image of its own.
    node.pull("deb:1");
    node.pull("py:1");
    let node = &node;
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..10)
            .map(|i| {
                s.spawn(move || {
                    if i % 2 == 0 {
                        let o = node.run(
                            "py:1",
                            &format!("py-{i}"),
                            &["python3", "-c", &format!("print({i}*2)")],
                        );
                        assert_eq!(stdout(&o), (i * 2).to_string());
                    } else {
                        let o = node.run(
                            "deb:1",
                            &format!("deb-{i}"),
                            &["sh", "-c", &format!("echo {i}")],
                        );
                        assert_eq!(stdout(&o), i.to_string());
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
    });
    // One mount per image, however many containers.
    assert_eq!(node.image_mounts(), 2, "{}", node.daemon_log());
    control_api(node);
    node.remove_all_images();
    assert_eq!(node.image_mounts(), 0);
}

/// `smr status`, `/metrics`, and bad requests on the control socket.
fn control_api(node: &Node) {
    let sock = node.control_socket();
    let out = crate::util::ok(crate::util::smr().arg("status").arg("--socket").arg(&sock));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("images:    2"), "{text}");
    assert_eq!(text.matches(", mounted)").count(), 2, "{text}");
    let curl = |args: &[&str]| {
        let o = std::process::Command::new("curl")
            .args(["-s", "--unix-socket"])
            .arg(&sock)
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    // The images' FUSE servers publish their counters every second: wait
    // until both have (each image was read by its containers).
    let published = |m: &str| {
        let reads: Vec<&str> = m
            .lines()
            .filter(|l| l.starts_with("smr_image_reads_total{"))
            .collect();
        reads.len() == 2 && reads.iter().all(|l| !l.ends_with(" 0"))
    };
    let t = std::time::Instant::now();
    let mut m = curl(&["http://smr/metrics"]);
    while !published(&m) && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(250));
        m = curl(&["http://smr/metrics"]);
    }
    let value = |name: &str| -> u64 {
        m.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in\n{m}"))
    };
    assert!(value("smr_fetches_total") > 0, "{m}");
    // Per image, from the images' FUSE servers (published every second).
    let per_image: Vec<&str> = m
        .lines()
        .filter(|l| l.starts_with("smr_image_bytes_fetched_total{"))
        .collect();
    assert_eq!(per_image.len(), 2, "{m}");
    // Both images published what they read; what they fetched may all be
    // one's (the node cache is shared, and the images share chunks).
    assert!(published(&m), "{m}");
    assert!(per_image.iter().any(|l| !l.ends_with(" 0")), "{m}");
    assert!(
        m.contains("smr_fetch_seconds_bucket{image=\"sha256:"),
        "{m}"
    );
    assert_eq!(value("smr_image_mounts"), 2, "{m}");
    assert!(
        m.contains("smr_snapshotter_calls_total{op=\"prepare\",code=\"AlreadyExists\"}"),
        "{m}"
    );
    assert!(
        m.contains("smr_snapshotter_call_seconds_bucket{op=\"mounts\",le=\"+Inf\"}"),
        "{m}"
    );
    // Bad requests: clean HTTP errors, and the daemon goes on.
    let code = |args: &[&str]| curl(&[&["-o", "/dev/null", "-w", "%{http_code}"], args].concat());
    assert_eq!(code(&["http://smr/nope"]), "404");
    assert_eq!(code(&["-X", "POST", "http://smr/status"]), "405");
    let expect = |body: &str| {
        code(&[
            "-X",
            "POST",
            "-H",
            "Content-Type: application/json",
            "-d",
            body,
            "http://smr/images",
        ])
    };
    assert_eq!(expect(r#"{"image": "docker://r.example/x:tag"}"#), "400");
    assert_eq!(expect(r#"{"image": "/not/an/image@sha256:00"}"#), "400");
    assert_eq!(expect("garbage"), "400");
    let mut raw = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    std::io::Write::write_all(&mut raw, b"\x00\xffGARBAGE / HTTP/9\r\n\r\n").unwrap();
    drop(raw);
    let out = crate::util::ok(
        crate::util::smr()
            .arg("status")
            .arg("--socket")
            .arg(&sock)
            .arg("--json"),
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["snapshots"]["remote"], 2, "{v}");
}

#[test]
fn smr_mount_goes_through_the_daemon() {
    let Some(mut node) = Node::start(false) else {
        return;
    };
    node.daemon_args = vec!["--release-after".into(), "1s".into()];
    node.start_daemon();
    let sock = node.control_socket();
    let mnt = node.dir.path().join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let smr = || {
        let mut c = crate::util::smr();
        c.env("SMR_DAEMON_SOCKET", &sock);
        c
    };
    let out = crate::util::ok(smr().arg("mount").arg(node.reg.image("py:1")).arg(&mnt));
    assert!(String::from_utf8_lossy(&out.stderr).contains("through the smr daemon"));
    let py = std::fs::read(mnt.join("usr/lib/python3.11/json/__init__.py")).unwrap();
    assert!(!py.is_empty());
    assert_eq!(node.image_mounts(), 1);
    let out = crate::util::ok(smr().arg("status").arg("--socket").arg(&sock).arg("--json"));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["binds"].as_array().map(Vec::len), Some(1), "{v}");
    // Bound: idle release leaves the image alone.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(node.image_mounts(), 1, "{}", node.daemon_log());
    assert!(mnt.join("usr/bin").is_dir());
    // A missing image: an error naming it, nothing mounted.
    let other = node.dir.path().join("mnt2");
    std::fs::create_dir_all(&other).unwrap();
    let err = crate::util::fails(smr().arg("mount").arg(node.reg.image("nope:1")).arg(&other));
    assert!(err.contains("nope"), "{err}");
    assert_eq!(std::fs::read_dir(&other).unwrap().count(), 0);
    // Unmounted through the daemon; then the idle image goes.
    crate::util::ok(smr().arg("umount").arg(&mnt));
    assert!(!mnt.join("usr").exists());
    let t = std::time::Instant::now();
    while node.image_mounts() != 0 {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "{}",
            node.daemon_log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn smr_run_goes_through_the_daemon_unless_standalone() {
    let Some(mut node) = Node::start(false) else {
        return;
    };
    node.start_daemon();
    let sock = node.control_socket();
    let run = |extra: &[&str]| {
        let mut c = crate::util::smr();
        c.env("SMR_DAEMON_SOCKET", &sock)
            .arg("run")
            .arg(node.reg.image("py:1"))
            .args(["--net", "none"])
            .args(extra)
            .args(["--", "python3", "-c", "print(6 * 7)"]);
        crate::util::ok(&mut c)
    };
    let out = run(&[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "42\n", "{err}");
    assert!(err.contains("served by the smr daemon"), "{err}");
    // The daemon keeps the image mounted for the node; the run's bind is
    // gone.
    assert_eq!(node.image_mounts(), 1, "{}", node.daemon_log());
    let binds = || {
        let status = crate::util::ok(
            crate::util::smr()
                .arg("status")
                .arg("--socket")
                .arg(&sock)
                .arg("--json"),
        );
        let v: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
        v["binds"].as_array().cloned().unwrap_or_default()
    };
    assert!(binds().is_empty());
    // smr serve-nbd exports the daemon's image file, bound while it serves.
    let nbd_sock = node.dir.path().join("nbd.sock");
    // `smr serve-nbd` of py:1 as export "py", once its socket is there.
    let serve = || {
        let _ = std::fs::remove_file(&nbd_sock);
        let child = crate::util::smr()
            .env("SMR_DAEMON_SOCKET", &sock)
            .arg("serve-nbd")
            .arg(node.reg.image("py:1"))
            .args(["--name", "py", "--socket"])
            .arg(&nbd_sock)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let t = std::time::Instant::now();
        while !nbd_sock.exists() {
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "serve-nbd did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        child
    };
    let server = serve();
    let listed = binds();
    let file = listed.first().and_then(|b| b["file"].as_str());
    let file =
        std::path::PathBuf::from(file.unwrap_or_else(|| panic!("no image file in {listed:?}")));
    let served = node.dir.path().join("nbd.img");
    crate::util::ok(
        std::process::Command::new("nbdcopy")
            .arg(format!("nbd+unix:///py?socket={}", nbd_sock.display()))
            .arg(&served),
    );
    assert!(std::fs::read(&served).unwrap() == std::fs::read(&file).unwrap());
    // Stopped (SIGTERM): its bind goes.
    crate::util::ok(
        std::process::Command::new("kill")
            .arg("-TERM")
            .arg(server.id().to_string()),
    );
    let out = server.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("through the smr daemon"), "{err}");
    assert!(binds().is_empty(), "serve-nbd left its bind");
    // Killed before it could unbind: the daemon removes the bind once the
    // process is gone.
    let mut killed = serve();
    assert_eq!(binds().len(), 1);
    killed.kill().unwrap();
    killed.wait().unwrap();
    let t = std::time::Instant::now();
    while !binds().is_empty() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "{}",
            node.daemon_log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // --standalone serves the image in the run's own process.
    let key = node.key.display().to_string();
    let out = run(&["--standalone", "--key-file", &key]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "42\n", "{err}");
    assert!(
        err.contains("fetched") && !err.contains("smr daemon"),
        "{err}"
    );
}

#[test]
fn untrusted_artifacts_fall_back_and_index_tags_pull_everywhere() {
    let Some(mut node) = Node::start(false) else {
        return;
    };
    // Only an attacker's artifact for debian: unsealed, so a node with an
    // owner key refuses it and containerd unpacks the layers itself.
    crate::util::ok(crate::util::smr().args([
        "convert",
        &node.reg.image("deb:1"),
        "--push",
        "--no-optimize",
        "--no-encrypt",
    ]));
    let out = node.pull("deb:1");
    assert!(out.contains("0 layers lazy, 1 unpacked"), "{out}");
    let log = node.daemon_log();
    assert!(
        log.contains("not encrypted, so nothing binds it to the owner key"),
        "{log}"
    );
    assert_debian_version(|| node.run("deb:1", "c-untrusted", &["cat", "/etc/debian_version"]));
    node.remove_all_images();

    // The owner's artifact in index mode: the tag now names an index that
    // containerd's own pull (overlayfs) still runs, and smr serves lazily.
    crate::util::ok(
        crate::util::smr()
            .args([
                "convert",
                &node.reg.image("deb:1"),
                "--push",
                "--no-optimize",
                "--index",
            ])
            .arg("--key-file")
            .arg(&node.key),
    );
    // The artifact is exactly what the image converts to.
    let out = crate::util::ok(
        crate::util::smr()
            .args([
                "verify",
                "--reproduce",
                &node.reg.image("deb:1"),
                "--key-file",
            ])
            .arg(&node.key),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("reproduced:"), "{err}");
    let image = format!("{}/deb:1", node.reg.addr);
    crate::util::ok(
        node.ctr()
            .args(["image", "pull", "--plain-http"])
            .arg(&image),
    );
    assert_debian_version(|| {
        crate::util::ok(
            node.ctr()
                .args(["run", "--rm"])
                .arg(&image)
                .arg(node.id("c-plain"))
                .args(["cat", "/etc/debian_version"]),
        )
    });
    node.remove_all_images();
    // A new daemon (handover) forgets the refusal it keeps for a while.
    node.start_daemon();
    let out = node.pull("deb:1");
    assert!(out.contains("1 layers lazy"), "{out}");
    assert_debian_version(|| node.run("deb:1", "c-index", &["cat", "/etc/debian_version"]));
    assert!(
        node.daemon_log()
            .contains("smr artifact named by the image index")
            || std::fs::read_dir(node.root().join("images")).is_ok(),
        "{}",
        node.daemon_log()
    );
    node.remove_all_images();
}
