//! Writable volumes through real clients: ext4 mounted read-write over the
//! NBD export (nbdfuse + a loop device), `e2fsck`, commit and the committed
//! image; raw writes, zeroes and trims with qemu-io; SIGKILL of the server
//! in the middle of a stream of writes and flushes.

use super::util::*;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A converted synthetic image and a volume `vm1` on it: its ext4 grown
/// by the default 1 GiB and given a journal, or (`raw`) the base's bytes
/// as they are.
struct Setup {
    s: Synthetic,
    root: PathBuf,
    cache: PathBuf,
}

impl Setup {
    fn new() -> Option<Setup> {
        Setup::with(&[])
    }

    fn raw() -> Option<Setup> {
        Setup::with(&["--size", "base", "--no-journal"])
    }

    fn with(extra: &[&str]) -> Option<Setup> {
        Setup::converted_with(&[], extra)
    }

    /// The synthetic image converted with `convert_args`, and volume `vm1`
    /// created from it with `extra`.
    fn converted_with(convert_args: &[&str], extra: &[&str]) -> Option<Setup> {
        if !have_tools(&["nbdfuse", "nbdcopy", "qemu-io", "e2fsck", "losetup"]) {
            return None;
        }
        let s = Synthetic::new();
        convert(&s.src, &s.store, &s.recipe, &s.key, convert_args);
        let (root, cache) = (s.t.path().join("root"), s.t.path().join("cache"));
        let v = Setup { s, root, cache };
        ok(v.smr(&["volume", "create", "vm1", "--from"])
            .arg(&v.s.recipe)
            .arg("--store")
            .arg(&v.s.store)
            .args(extra));
        Some(v)
    }

    /// `smr ARGS` with this node's root, key and cache.
    fn smr(&self, args: &[&str]) -> Command {
        let mut c = smr();
        c.args(args)
            .env("SMR_ROOT", &self.root)
            .env("SMR_KEY_FILE", &self.s.key)
            .env("SMR_CACHE_DIR", &self.cache);
        c
    }

    /// `recipe` (a commit of this volume) extracted to `name`, checked with
    /// `e2fsck -fn`, and loop-mounted read-only.
    fn mount_committed(&self, recipe: &Path, name: &str) -> LoopMount {
        let img = self.s.t.path().join(name);
        extract(recipe, &self.s.store, &self.s.key, &img);
        fsck_clean(&img);
        LoopMount::new(&img)
    }

    /// The base image's bytes (extracted).
    fn base_bytes(&self) -> Vec<u8> {
        let base = self.s.t.path().join("base.img");
        extract(&self.s.recipe, &self.s.store, &self.s.key, &base);
        std::fs::read(&base).unwrap()
    }

    /// `smr serve-nbd --volume vm1`.
    fn serve(&self) -> NbdServe {
        let args: Vec<OsString> = ["--volume", "vm1", "--root"]
            .iter()
            .map(OsString::from)
            .chain([self.root.clone().into_os_string()])
            .chain(["--key-file".into(), self.s.key.clone().into_os_string()])
            .chain(["--cache-dir".into(), self.cache.clone().into_os_string()])
            .collect();
        NbdServe::start(&args, self.s.t.path())
    }
}

/// Whether every tool is installed (else the test is skipped, or fails
/// under `SMR_REQUIRE_IMAGES=1`).
fn have_tools(tools: &[&str]) -> bool {
    smr_testkit::env::require_tools(tools)
}

/// The export as a file (nbdfuse) on a loop device, mounted read-write.
struct RwMount {
    fuse: PathBuf,
    nbdfuse: Child,
    dev: String,
    mnt: PathBuf,
}

impl RwMount {
    fn new(uri: &str, dir: &Path) -> RwMount {
        let (fuse, mnt) = (dir.join("fuse"), dir.join("mnt"));
        std::fs::create_dir_all(&fuse).unwrap();
        std::fs::create_dir_all(&mnt).unwrap();
        let nbdfuse = Command::new("nbdfuse")
            .arg(&fuse)
            .arg(uri)
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let file = fuse.join("nbd");
        let t = std::time::Instant::now();
        while !file.exists() {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "nbdfuse did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = ok(Command::new("losetup").args(["-f", "--show"]).arg(&file));
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
        ok(Command::new("mount").args(["-t", "ext4", &dev]).arg(&mnt));
        RwMount {
            fuse,
            nbdfuse,
            dev,
            mnt,
        }
    }

    /// Unmounts and checks the filesystem with `e2fsck -fn`.
    fn finish(mut self) -> String {
        ok(Command::new("umount").arg(&self.mnt));
        let out = run(Command::new("e2fsck").args(["-fn", &self.dev]));
        let report = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "e2fsck: {report}");
        self.teardown();
        report
    }

    fn teardown(&mut self) {
        if self.dev.is_empty() {
            return;
        }
        let quiet = |c: &mut Command| {
            let _ = c.stderr(Stdio::null()).status();
        };
        quiet(Command::new("umount").arg(&self.mnt));
        quiet(Command::new("losetup").args(["-d", &self.dev]));
        quiet(Command::new("umount").arg(&self.fuse));
        let _ = self.nbdfuse.wait();
        self.dev.clear();
    }
}

impl Drop for RwMount {
    fn drop(&mut self) {
        self.teardown();
    }
}

#[test]
fn ext4_written_through_the_volume_checks_clean_and_commits_only_dirty_chunks() {
    let Some(v) = Setup::new() else {
        return;
    };
    let d = v.s.t.path();
    let srv = v.serve();
    let m = RwMount::new(&srv.uri_of("vm1"), d);
    std::fs::write(m.mnt.join("etc/hello"), "written in a volume\n").unwrap();
    std::fs::remove_file(m.mnt.join("etc/passwd")).unwrap();
    std::fs::write(m.mnt.join("big"), vec![7u8; 3 << 20]).unwrap();
    let report = m.finish();
    assert!(report.contains("files"), "{report}");
    drop(srv);
    // In use: commit and rm refuse while a server holds the volume.
    let busy = v.serve();
    let e = fails(v.smr(&["commit", "vm1", "-o"]).arg(d.join("x.recipe")));
    assert!(e.contains("in use"), "{e}");
    let e = fails(&mut v.smr(&["volume", "rm", "vm1"]));
    assert!(e.contains("in use"), "{e}");
    drop(busy);

    let new = d.join("new.recipe");
    let out = ok(v.smr(&["commit", "vm1", "-o"]).arg(&new));
    let err = String::from_utf8_lossy(&out.stderr);
    // "… N of M chunks written (S stored, …": S follows what was written
    // (the new ext4 groups of the grown volume read as zeros and are not
    // stored).
    let stored: u64 = err
        .split(" stored,")
        .next()
        .and_then(|s| s.rsplit('(').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{err}"));
    assert!(stored > 0 && stored < 80, "chunks stored: {err}");
    // Deterministic: the same volume commits to the same bytes.
    let again = d.join("again.recipe");
    ok(v.smr(&["commit", "vm1", "-o"]).arg(&again));
    assert_eq!(std::fs::read(&new).unwrap(), std::fs::read(&again).unwrap());
    // The new image shares every clean chunk with the base.
    let cmp = ok(smr()
        .args(["inspect"])
        .arg(&v.s.recipe)
        .arg("--compare")
        .arg(&new)
        .arg("--json"));
    let c: serde_json::Value = serde_json::from_slice(&cmp.stdout).unwrap();
    eprintln!("shared: {c}");
    // The committed image, extracted and mounted, has the changes.
    let mounted = v.mount_committed(&new, "new.img");
    let root = mounted.dir.path();
    assert_eq!(
        std::fs::read_to_string(root.join("etc/hello")).unwrap(),
        "written in a volume\n"
    );
    assert!(!root.join("etc/passwd").exists());
    assert_eq!(std::fs::read(root.join("big")).unwrap(), vec![7u8; 3 << 20]);
    drop(mounted);
    let ls = ok(&mut v.smr(&["volume", "ls", "--json"]));
    let l: serde_json::Value = serde_json::from_slice(&ls.stdout).unwrap();
    assert_eq!(l[0]["volume"]["name"], "vm1", "{l}");
    assert!(l[0]["cow_bytes"].as_u64().unwrap() >= 3 << 20, "{l}");
    // Into another store: the unchanged chunks are copied along, so the
    // new image is whole there.
    let other = d.join("other-store");
    let moved = d.join("moved.recipe");
    ok(v.smr(&["commit", "vm1", "-o"])
        .arg(&moved)
        .arg("--to-store")
        .arg(&other));
    ok(smr()
        .arg("verify")
        .arg(&moved)
        .arg("--store")
        .arg(&other)
        .arg("--key-file")
        .arg(&v.s.key));
    // A base chunk missing from its store: a clear error naming it, and
    // no recipe written.
    let read = |p: &Path| smr_format::Recipe::decode(&std::fs::read(p).unwrap()).unwrap();
    let committed: std::collections::HashSet<_> = read(&new).chunks.iter().map(|c| c.id).collect();
    let kept = read(&v.s.recipe)
        .chunks
        .iter()
        .rev()
        .map(|c| c.id)
        .find(|id| committed.contains(id))
        .unwrap();
    let gone = remove_chunk(&v.s.store, &kept);
    let broken = d.join("broken.recipe");
    let e = fails(
        v.smr(&["commit", "vm1", "-o"])
            .arg(&broken)
            .arg("--to-store")
            .arg(d.join("third-store")),
    );
    assert!(
        gone.iter().any(|id| e.contains(id)) && e.contains("missing"),
        "{e}"
    );
    assert!(!broken.exists());
    ok(&mut v.smr(&["volume", "rm", "vm1"]));
    assert!(!v.root.join("volumes/vm1").exists());
}

/// A volume over an image of content-defined chunks, grown past its base:
/// the commit keeps the base's chunk boundaries (clean chunks shared), cuts
/// the grown part into nominal chunks, and the result checks clean and
/// holds the writes.
#[test]
fn a_volume_of_content_defined_chunks_commits_on_its_base_grid() {
    let Some(v) = Setup::converted_with(&["--chunking", "cdc"], &[]) else {
        return;
    };
    let d = v.s.t.path();
    let srv = v.serve();
    let m = RwMount::new(&srv.uri_of("vm1"), d);
    std::fs::write(m.mnt.join("etc/hello"), "cdc volume\n").unwrap();
    std::fs::write(m.mnt.join("big"), vec![9u8; 2 << 20]).unwrap();
    m.finish();
    drop(srv);
    let new = d.join("new.recipe");
    ok(v.smr(&["commit", "vm1", "-o"]).arg(&new));
    let read = |p: &Path| smr_format::Recipe::decode(&std::fs::read(p).unwrap()).unwrap();
    let (base, committed) = (read(&v.s.recipe), read(&new));
    assert_eq!(committed.version(), 3);
    assert!(committed.image_size > base.image_size, "the volume grew");
    for i in 0..base.chunk_count() - 1 {
        assert_eq!(base.grid().range(i), committed.grid().range(i), "chunk {i}");
    }
    let shared = base
        .chunks
        .iter()
        .filter(|c| committed.chunks.contains(c))
        .count();
    assert!(shared > 0, "clean chunks are kept");
    let mounted = v.mount_committed(&new, "new.img");
    let root = mounted.dir.path();
    assert_eq!(
        std::fs::read_to_string(root.join("etc/hello")).unwrap(),
        "cdc volume\n"
    );
    assert_eq!(std::fs::read(root.join("big")).unwrap(), vec![9u8; 2 << 20]);
}

/// `qemu-io -f raw -c CMD... URI`: its stdout.
fn qemu_io(uri: &str, cmds: &[String]) -> std::process::Output {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.arg("-c").arg(cmd);
    }
    run(c.arg(uri))
}

#[test]
fn raw_writes_zeroes_and_trims_read_back() {
    let Some(v) = Setup::raw() else {
        return;
    };
    let d = v.s.t.path();
    let mut model = v.base_bytes();
    let srv = v.serve();
    let uri = srv.uri_of("vm1");
    let cmds: Vec<String> = [
        "write -P 0xab 100 9000",
        "write -f -P 0x11 65536 4096",
        "write -z 131072 70000",
        "discard 262144 8192",
        "flush",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let out = qemu_io(&uri, &cmds);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    model[100..9100].fill(0xab);
    model[65536..69632].fill(0x11);
    model[131072..201072].fill(0);
    model[262144..270336].fill(0);
    let copy = d.join("copy.img");
    ok(Command::new("nbdcopy").arg(&uri).arg(&copy));
    assert!(
        std::fs::read(&copy).unwrap() == model,
        "the export differs from the model"
    );
    // Writes past the end are refused by the protocol, not applied.
    let size = model.len() as u64;
    let out = qemu_io(&uri, &[format!("write -P 1 {} 4096", size - 100)]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!text.contains("wrote 4096"), "{text}");
    // After a restart, everything flushed is there.
    drop(srv);
    let srv = v.serve();
    ok(Command::new("nbdcopy").arg(srv.uri_of("vm1")).arg(&copy));
    assert!(std::fs::read(&copy).unwrap() == model);
}

#[test]
fn flushed_writes_survive_sigkill_of_the_server_at_random_points() {
    let Some(v) = Setup::raw() else {
        return;
    };
    let d = v.s.t.path();
    let mut expected = v.base_bytes();
    let blocks = expected.len() as u64 / 4096;
    let kills = 50;
    for round in 0..kills {
        let srv = v.serve();
        let uri = srv.uri_of("vm1");
        // A stream of writes, each followed by a flush and a read that
        // shows (in the output) that the flush returned.
        let mut cmds = Vec::new();
        let mut writes = Vec::new();
        for k in 0..12u64 {
            let block = (round * 12 + k) * 7 % blocks;
            let pattern = ((round * 12 + k) % 250 + 1) as u8;
            cmds.push(format!("write -P {pattern} {} 4096", block * 4096));
            cmds.push("flush".into());
            cmds.push(format!("read -P {pattern} {} 4096", block * 4096));
            writes.push((block, pattern));
        }
        let mut c = Command::new("qemu-io");
        c.args(["-f", "raw"]);
        for cmd in &cmds {
            c.arg("-c").arg(cmd);
        }
        let child = c
            .arg(&uri)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(fastrand_ms(round)));
        drop(srv); // SIGKILL, wherever the stream is.
        let out = child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let confirmed = text.matches("read 4096/4096").count();
        for &(block, pattern) in &writes[..confirmed] {
            let at = (block * 4096) as usize;
            expected[at..at + 4096].fill(pattern);
        }
        // A write after the last confirmed flush may or may not be there:
        // take whatever the volume says for that one block.
        let srv = v.serve();
        let copy = d.join("copy.img");
        ok(Command::new("nbdcopy").arg(srv.uri_of("vm1")).arg(&copy));
        let got = std::fs::read(&copy).unwrap();
        if let Some(&(block, pattern)) = writes.get(confirmed) {
            let at = (block * 4096) as usize;
            let now = &got[at..at + 4096];
            assert!(
                now == &expected[at..at + 4096] || now.iter().all(|&b| b == pattern),
                "round {round}: block {block} is neither its old bytes nor the new write"
            );
            expected[at..at + 4096].copy_from_slice(now);
        }
        assert!(
            got == expected,
            "round {round}: a flushed write was lost ({confirmed} confirmed)"
        );
    }
}

/// A kill delay in 0..120 ms, varied by round.
fn fastrand_ms(round: u64) -> u64 {
    (round * 37 + 11) % 120
}

#[test]
fn smr_mount_volume_is_read_write_and_commits() {
    let Some(v) = Setup::new() else {
        return;
    };
    let d = v.s.t.path();
    let (mnt, state) = (d.join("vmnt"), d.join("state"));
    std::fs::create_dir_all(&mnt).unwrap();
    let mount = |extra: &[&str]| {
        let mut c = v.smr(&["mount", "--volume", "vm1"]);
        c.arg(&mnt).arg("--state-dir").arg(&state).args(extra);
        c
    };
    ok(&mut mount(&[]));
    std::fs::write(mnt.join("etc/mounted"), "through smr mount --volume\n").unwrap();
    // One process at a time: the export of a mounted volume is refused.
    let e = fails(
        v.smr(&["serve-nbd", "--volume", "vm1", "--socket"])
            .arg(d.join("s.sock")),
    );
    assert!(e.contains("in use"), "{e}");
    ok(v.smr(&["umount"]).arg(&mnt).arg("--state-dir").arg(&state));
    let new = d.join("m.recipe");
    ok(v.smr(&["commit", "vm1", "-o"]).arg(&new));
    let m = v.mount_committed(&new, "m.img");
    assert_eq!(
        std::fs::read_to_string(m.dir.path().join("etc/mounted")).unwrap(),
        "through smr mount --volume\n"
    );
}

#[test]
fn a_container_runs_on_a_volume_and_its_writes_are_committed() {
    let Some(layout) = debian_layout() else {
        return;
    };
    if !have_tools(&["runc"]) {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let (store, recipe, key) = (d.join("store"), d.join("debian.recipe"), key_file(d));
    convert(
        &format!("oci:{}:debian", layout.display()),
        &store,
        &recipe,
        &key,
        &[],
    );
    let with = |args: &[&str]| {
        let mut c = smr();
        c.args(args)
            .env("SMR_ROOT", d.join("root"))
            .env("SMR_KEY_FILE", &key)
            .env("SMR_CACHE_DIR", d.join("cache"));
        c
    };
    ok(with(&["volume", "create", "deb", "--from"])
        .arg(&recipe)
        .arg("--store")
        .arg(&store));
    let run_on = |cmd: &str| {
        ok(&mut with(&[
            "run", "--volume", "deb", "--net", "none", "--", "sh", "-c", cmd,
        ]))
    };
    run_on("echo kept > /etc/kept && rm /etc/debian_version");
    // The next container sees it: the root is the volume, not an overlay.
    let out = run_on("cat /etc/kept; test ! -e /etc/debian_version && echo gone");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "kept\ngone\n");
    let new = d.join("new.recipe");
    ok(with(&["commit", "deb", "-o"]).arg(&new));
    // The committed image runs lazily like any other.
    let out = ok(with(&["run"]).arg(&new).arg("--store").arg(&store).args([
        "--net",
        "none",
        "--",
        "cat",
        "/etc/kept",
    ]));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "kept\n");
}

#[test]
fn ext4_on_a_volume_survives_sigkill_of_the_server_with_its_journal() {
    let Some(v) = Setup::new() else {
        return;
    };
    let d = v.s.t.path();
    // Files whose fsync returned, over every round: (name, content).
    let mut durable: Vec<(String, String)> = Vec::new();
    for round in 0..6u64 {
        let dir = d.join(format!("round{round}"));
        let srv = v.serve();
        let m = RwMount::new(&srv.uri_of("vm1"), &dir);
        for (name, content) in &durable {
            let got = std::fs::read_to_string(m.mnt.join(name)).unwrap_or_default();
            assert_eq!(
                &got, content,
                "round {round}: {name}, fsynced before a kill"
            );
        }
        // Files written and fsynced one by one; each name is printed only
        // once its fsync returned.
        let script = format!(
            "i=0; while [ $i -lt 400 ]; do i=$((i+1)); \
             head -c $((i * 97 % 20000 + 1)) /dev/urandom | base64 > r{round}-$i && \
             sync r{round}-$i && echo r{round}-$i || exit 0; done"
        );
        let writer = Command::new("sh")
            .arg("-c")
            .arg(&script)
            .current_dir(&m.mnt)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(300 + fastrand_ms(round) * 5));
        drop(srv); // SIGKILL, in the middle of the stream.
        let out = writer.wait_with_output().unwrap();
        let names: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect();
        assert!(
            !names.is_empty(),
            "round {round}: nothing was written before the kill: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // The files' contents as written (the page cache still holds them).
        for n in &names {
            if let Ok(c) = std::fs::read_to_string(m.mnt.join(n)) {
                durable.push((n.clone(), c));
            }
        }
        drop(m); // unmount what the dead server leaves
    }
    // After a last journal replay, the filesystem checks clean and holds
    // every fsynced file.
    let srv = v.serve();
    let m = RwMount::new(&srv.uri_of("vm1"), &d.join("last"));
    for (name, content) in &durable {
        let got = std::fs::read_to_string(m.mnt.join(name)).unwrap_or_default();
        assert_eq!(&got, content, "{name}, fsynced before a kill");
    }
    let report = m.finish();
    assert!(
        report.contains("clean") || report.contains("files"),
        "{report}"
    );
}
