//! Helpers shared by the end-to-end tests.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The smr binary under test.
pub fn smr() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_smr"));
    c.env_remove("SMR_KEY_FILE").env_remove("SMR_STORE");
    // No node policy but what a test configures.
    c.env("SMR_POLICY_DIR", "/nonexistent/smr-policy");
    c
}

/// Runs a command, returning its output; panics if it cannot start.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Runs a command and panics with its stderr unless it succeeds.
pub fn ok(cmd: &mut Command) -> Output {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs a command that must fail; returns its stderr.
pub fn fails(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(!out.status.success(), "{cmd:?} unexpectedly succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Root of the repository.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Writes a fixed owner key to `dir/key` and returns its path.
pub fn key_file(dir: &Path) -> PathBuf {
    let p = dir.join("key");
    std::fs::write(&p, format!("{}\n", "ab".repeat(32))).expect("write key");
    p
}

/// Converts `source` into `store`, writing `recipe`.
pub fn convert(source: &str, store: &Path, recipe: &Path, key: &Path, extra: &[&str]) -> Output {
    ok(smr()
        .arg("convert")
        .arg(source)
        .arg("--store")
        .arg(store)
        .arg("-o")
        .arg(recipe)
        .arg("--key-file")
        .arg(key)
        .args(extra))
}

/// Extracts `recipe` into `img`.
pub fn extract(recipe: &Path, store: &Path, key: &Path, img: &Path) {
    extract_with(recipe, store, key, img, &[]);
}

/// Extracts `recipe` from `store` (a path or URL) into `img`, with `env`.
pub fn extract_with(
    recipe: &Path,
    store: impl AsRef<std::ffi::OsStr>,
    key: &Path,
    img: &Path,
    env: &[(&str, String)],
) {
    ok(smr()
        .arg("extract")
        .arg(recipe)
        .arg("--store")
        .arg(store)
        .arg("--key-file")
        .arg(key)
        .arg("-o")
        .arg(img)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str()))));
}

/// `e2fsck -fn` must exit 0.
pub fn fsck_clean(img: &Path) {
    ok(Command::new("e2fsck").arg("-fn").arg(img));
}

/// A read-only loop mount, unmounted on drop.
pub struct LoopMount {
    /// Where it is mounted.
    pub dir: tempfile::TempDir,
}

impl LoopMount {
    /// Mounts `img` read-only.
    pub fn new(img: &Path) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        ok(Command::new("mount")
            .args(["-t", "ext4", "-o", "loop,ro"])
            .arg(img)
            .arg(dir.path()));
        LoopMount { dir }
    }
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

/// Unpacks `layout:tag` with umoci into `dir` and returns the rootfs path.
pub fn umoci_unpack(layout: &Path, tag: &str, dir: &Path) -> PathBuf {
    let bundle = dir.join("bundle");
    ok(Command::new("umoci")
        .arg("unpack")
        .arg("--image")
        .arg(format!("{}:{tag}", layout.display()))
        .arg(&bundle));
    bundle.join("rootfs")
}

/// Compares two trees with scripts/treecmp.py (everything: types, contents,
/// modes, owners, xattrs, link targets, devices, hard link groups).
pub fn trees_equal(a: &Path, b: &Path) {
    trees_equal_except_mtimes(a, b, &[]);
}

/// Like [`trees_equal`], but mtimes of paths matching `patterns` are not
/// compared (umoci gives implicit parent directories the current time).
pub fn trees_equal_except_mtimes(a: &Path, b: &Path, patterns: &[&str]) {
    let mut cmd = Command::new("python3");
    cmd.arg(repo_root().join("scripts/treecmp.py"))
        .arg(a)
        .arg(b)
        .args(["--ignore", "lost+found"]);
    for p in patterns {
        cmd.arg("--mtime-ignore").arg(p);
    }
    ok(&mut cmd);
}

/// Files in `dir` (recursively) whose name contains `pat`.
pub fn find_named(dir: &Path, pat: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p.clone());
            }
            if e.file_name().to_string_lossy().contains(pat) {
                out.push(p);
            }
        }
    }
    out
}

// Not every test binary that includes this file uses it.
#[allow(unused_imports)]
pub use smr_testkit::env::debian_layout;

/// A temp dir holding the synthetic OCI layout (see smr-testkit), an owner
/// key, and the paths tests convert and extract into.
pub struct Synthetic {
    /// The temp dir (removed on drop).
    pub t: tempfile::TempDir,
    /// `oci:DIR:TAG` of the synthetic layout.
    pub src: String,
    /// The chunk store.
    pub store: PathBuf,
    /// Where the recipe goes.
    pub recipe: PathBuf,
    /// Where an extracted image goes.
    pub img: PathBuf,
    /// The owner key file.
    pub key: PathBuf,
}

impl Synthetic {
    /// Writes the layout and key into a new temp dir.
    pub fn new() -> Self {
        let t = tempfile::tempdir().expect("tempdir");
        let dir = t.path().join("layout");
        smr_testkit::synthetic_everything(&dir).expect("write synthetic layout");
        let src = format!("oci:{}:{}", dir.display(), smr_testkit::SYNTHETIC_TAG);
        let p = |n: &str| t.path().join(n);
        let (store, recipe, img, key) = (p("store"), p("r"), p("img"), key_file(t.path()));
        Synthetic {
            t,
            src,
            store,
            recipe,
            img,
            key,
        }
    }
}

/// A running `smr serve-nbd` on a UNIX socket; killed on drop.
pub struct NbdServe {
    child: std::process::Child,
    socket: PathBuf,
    log: PathBuf,
}

impl NbdServe {
    /// `smr serve-nbd ARGS... --socket dir/nbd.sock`, logging to
    /// `dir/server.log`; returns once the socket is there.
    pub fn start(args: &[std::ffi::OsString], dir: &Path) -> Self {
        let socket = dir.join("nbd.sock");
        let log = dir.join("server.log");
        // A killed server leaves its socket: wait for this one's, not that.
        let _ = std::fs::remove_file(&socket);
        let child = smr()
            .arg("serve-nbd")
            .args(args)
            .arg("--socket")
            .arg(&socket)
            .env("SMR_LOG", "warn")
            .stderr(std::process::Stdio::from(
                std::fs::File::create(&log).unwrap(),
            ))
            .spawn()
            .unwrap();
        let s = NbdServe { child, socket, log };
        let t = std::time::Instant::now();
        while !s.socket.exists() {
            assert!(
                t.elapsed() < std::time::Duration::from_secs(20),
                "server did not start: {}",
                s.log()
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        s
    }

    /// The URI of `export`.
    pub fn uri_of(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }

    /// The URI of the export named `img`.
    pub fn uri(&self) -> String {
        self.uri_of("img")
    }

    /// What the server logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for NbdServe {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Copies the chunks of `recipe` from the store `from` into `to` in the
/// per-chunk layout (`chunks/<2 hex>/<64 hex>`, one file each): a store as
/// smr wrote them before packs.
pub fn per_chunk_copy(recipe: &Path, from: &Path, to: &Path) {
    use smr_store::ChunkStore;
    let r = smr_format::Recipe::decode(&std::fs::read(recipe).unwrap()).unwrap();
    let (src, dst) = (
        smr_store::LocalStore::open(from).unwrap(),
        smr_store::LocalStore::open(to).unwrap(),
    );
    for c in &r.chunks {
        dst.put(&c.id, &src.get(&c.id).unwrap()).unwrap();
    }
    assert!(!to.join("packs").exists());
}

/// Flips the bits `mask` of byte `at` of chunk `id` (hex) in the store at
/// `store`, wherever it lies (its own file, or a range of a pack).
pub fn corrupt_chunk(store: &Path, id: &str, at: u64, mask: u8) {
    use smr_store::ChunkStore;
    use std::os::unix::fs::FileExt;
    let s = smr_store::LocalStore::open(store).unwrap();
    let extent = s.locate(&id.parse().unwrap()).unwrap();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(store.join(extent.object.as_str()))
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, extent.range.offset + at).unwrap();
    b[0] ^= mask;
    f.write_all_at(&b, extent.range.offset + at).unwrap();
}

/// Removes chunk `id` from the store at `store`: its own file, or its
/// pack with every other chunk in it. Returns the chunks gone (hex).
pub fn remove_chunk(store: &Path, id: &smr_format::ChunkId) -> Vec<String> {
    use smr_store::ChunkStore;
    let s = smr_store::LocalStore::open(store).unwrap();
    let extent = s.locate(id).unwrap();
    std::fs::remove_file(store.join(extent.object.as_str())).unwrap();
    let mut gone: Vec<String> = s
        .packed_chunks()
        .into_iter()
        .filter(|(_, e)| e.object == extent.object)
        .map(|(c, _)| c.to_hex())
        .collect();
    if gone.is_empty() {
        gone.push(id.to_hex());
    }
    gone
}

/// `smr verify RECIPE --store STORE --key-file KEY` must succeed.
pub fn verify_ok(recipe: &Path, store: &Path, key: &Path) {
    ok(smr()
        .arg("verify")
        .arg(recipe)
        .arg("--store")
        .arg(store)
        .arg("--key-file")
        .arg(key));
}
