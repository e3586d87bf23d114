//! Lazily mounted smr images, one mount per image manifest however many
//! snapshots and containers use it.
//!
//! A mount is made by `smr mount` (the same code path, policy and cache as
//! on the command line): its FUSE server runs in a session of its own, so
//! the mount and every read through it survive a restart or a SIGKILL of
//! the daemon; the daemon finds the mounts again by their directories.
//! The snapshotter's remote layers need only the artifact accepted
//! ([`Images::ensure_accepted`]); a container's snapshot needs the mount
//! ([`Images::ensure`]).

use smr_node::mount::is_mountpoint;
use std::collections::HashMap;
use std::io::{BufRead, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How long an image that could not be mounted is not tried again: the
/// layers of one pull all ask within this time, and one refusal is enough.
pub const NEGATIVE_TTL: Duration = Duration::from_secs(30);

/// How the daemon runs `smr mount`.
#[derive(Debug, Clone)]
pub struct MountConfig {
    /// The smr binary.
    pub smr: PathBuf,
    /// Node cache directory (`--cache-dir`).
    pub cache_dir: PathBuf,
    /// The owner key, if the node has one (`--key-file`).
    pub key_file: Option<PathBuf>,
    /// Each image server's memory tier (`--cache-memory`, bytes).
    pub cache_memory: Option<u64>,
}

/// The node's image mounts under `ROOT/images`.
pub struct Images {
    dir: PathBuf,
    state: PathBuf,
    /// The node's trust policy directory (`ROOT/policy`), unless
    /// `SMR_POLICY_DIR` names another.
    policy: PathBuf,
    cfg: MountConfig,
    /// Manifests being mounted or unmounted right now (others wait for
    /// them), and whether a mount's artifact was accepted already.
    busy: Mutex<HashMap<String, bool>>,
    done: Condvar,
    /// Manifests that could not be mounted, and when.
    refused: Mutex<HashMap<String, (Instant, String)>>,
    /// When each image was last asked for.
    last_used: Mutex<HashMap<String, Instant>>,
    /// Registry credentials from CRI pulls ([`crate::cri`]).
    keychain: std::sync::Arc<crate::keychain::Keychain>,
    /// Threads warming a newly mounted image for its program's start
    /// ([`smr_node::warm`]), joined before the image is unmounted.
    warming: Mutex<HashMap<String, std::thread::JoinHandle<()>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// An image being mounted or unmounted (see [`Images::claim`]), by
/// reference or, for a mount that goes on in the background, owned.
struct Claim<I: std::ops::Deref<Target = Images>> {
    images: I,
    manifest: String,
}

impl<I: std::ops::Deref<Target = Images>> Drop for Claim<I> {
    fn drop(&mut self) {
        lock(&self.images.busy).remove(&self.manifest);
        self.images.done.notify_all();
    }
}

/// `smr mount` running: its artifact found, trusted and opened, its
/// FUSE server, loop device and ext4 mount on their way.
struct Mounting {
    child: Child,
    /// Reads its stderr (its error message) to the end.
    stderr: std::thread::JoinHandle<String>,
    image: String,
    dir: PathBuf,
    started: Instant,
}

impl Mounting {
    /// Waits for the mount to end: an error with smr's message if it
    /// failed.
    fn finish(mut self) -> Result<(), String> {
        let status = self.child.wait();
        let err = self.stderr.join().unwrap_or_default();
        let (image, took) = (&self.image, self.started.elapsed());
        match status {
            Ok(s) if s.success() => {
                tracing::info!(image, dir = %self.dir.display(), ?took, "image mounted");
                Ok(())
            }
            Ok(_) => Err(format!("smr mount {image}: {}", err.trim())),
            Err(e) => Err(format!("smr mount {image}: waiting for it: {e}")),
        }
    }
}

impl Images {
    /// Image mounts under `root/images`, their `smr mount` state under
    /// `root/mount-state`.
    pub fn new(root: &Path, cfg: MountConfig) -> Images {
        Images {
            dir: root.join("images"),
            state: root.join("mount-state"),
            policy: std::env::var_os("SMR_POLICY_DIR")
                .map_or_else(|| root.join("policy"), PathBuf::from),
            cfg,
            busy: Mutex::new(HashMap::new()),
            done: Condvar::new(),
            refused: Mutex::new(HashMap::new()),
            last_used: Mutex::new(HashMap::new()),
            keychain: Default::default(),
            warming: Mutex::new(HashMap::new()),
        }
    }

    /// The registry credentials recorded from CRI pulls, used for every
    /// registry access the daemon makes for an image.
    pub fn keychain(&self) -> &std::sync::Arc<crate::keychain::Keychain> {
        &self.keychain
    }

    /// How long ago the image was last asked for (since this daemon
    /// started: a restarted daemon counts from its start).
    pub fn idle_for(&self, manifest: &str) -> Option<std::time::Duration> {
        lock(&self.last_used).get(manifest).map(Instant::elapsed)
    }

    /// Notes that the image is used now.
    pub fn touch(&self, manifest: &str) {
        lock(&self.last_used).insert(manifest.to_string(), Instant::now());
    }

    /// Where the image with manifest `digest` is mounted.
    pub fn rootfs(&self, manifest: &str) -> PathBuf {
        let name = manifest.replace(':', "-");
        self.dir.join(name).join("rootfs")
    }

    /// The counters its FUSE server publishes (`stats.json` in the mount's
    /// state directory; see `smr __serve-fuse`), if any.
    pub fn server_stats(&self, manifest: &str) -> Option<serde_json::Value> {
        let mnt = self.rootfs(manifest).canonicalize().ok()?;
        let path = smr_node::mount::state_dir(&self.state, &mnt).join("stats.json");
        let bytes = std::fs::read(path).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// The flattened image as the file its FUSE server exports, while it
    /// is mounted.
    pub fn image_file(&self, manifest: &str) -> Option<PathBuf> {
        let mnt = self.rootfs(manifest).canonicalize().ok()?;
        let file = smr_node::mount::state_dir(&self.state, &mnt)
            .join("fuse")
            .join(smr_node::fuse::FuseConfig::default().file_name);
        file.is_file().then_some(file)
    }

    /// Whether the image is mounted now.
    pub fn is_mounted(&self, manifest: &str) -> bool {
        is_mountpoint(&self.rootfs(manifest))
    }

    /// Mounts `image` (`docker://host/repo@manifest`) unless it already
    /// is; returns its root directory. Concurrent callers for one image
    /// wait for the first.
    pub fn ensure(&self, image: &str, manifest: &str) -> Result<PathBuf, String> {
        let dir = self.rootfs(manifest);
        self.touch(manifest);
        let _claim = {
            let busy = self.wait_turn(manifest);
            match self.may_mount(manifest, &dir) {
                Err(Some(why)) => return Err(why),
                Err(None) => return Ok(dir),
                Ok(()) => self.claim(busy, manifest),
            }
        };
        let out = self.begin_mount(image, &dir).and_then(Mounting::finish);
        self.mounted(out.clone(), image, manifest, &dir);
        out.map(|()| dir)
    }

    /// [`Images::ensure`], returning as soon as `smr mount` has found,
    /// trusted and opened the image's artifact: the rest of the mount (its
    /// FUSE server, loop device and ext4 mount, a few round trips) goes on
    /// in the background while containerd finishes its pull and creates
    /// the container, and whoever needs the mount ([`Images::ensure`],
    /// [`Images::release`]) waits for it. A mount that fails after that is
    /// refused like any other ([`NEGATIVE_TTL`]).
    pub fn ensure_accepted(self: &Arc<Self>, image: &str, manifest: &str) -> Result<(), String> {
        let dir = self.rootfs(manifest);
        self.touch(manifest);
        let owned = {
            let mut busy = lock(&self.busy);
            loop {
                match busy.get(manifest) {
                    Some(true) => return Ok(()),
                    Some(false) => busy = self.done.wait(busy).unwrap_or_else(|e| e.into_inner()),
                    None => break,
                }
            }
            match self.may_mount(manifest, &dir) {
                Err(Some(why)) => return Err(why),
                Err(None) => return Ok(()),
                Ok(()) => {}
            }
            // Owned: it goes with the mount to the thread that finishes it.
            busy.insert(manifest.to_string(), false);
            Claim {
                images: self.clone(),
                manifest: manifest.to_string(),
            }
        };
        let mounting = match self.begin_mount(image, &dir) {
            Ok(m) => m,
            Err(why) => {
                self.mounted(Err(why.clone()), image, manifest, &dir);
                return Err(why);
            }
        };
        lock(&self.busy).insert(manifest.to_string(), true);
        self.done.notify_all();
        // Kept here too, to be finished here if no thread can be started.
        let job = Arc::new(Mutex::new(Some((mounting, owned))));
        let (image2, dir2, job2) = (image.to_string(), dir.clone(), job.clone());
        let spawned = std::thread::Builder::new()
            .name("smr-mount".into())
            .spawn(move || {
                if let Some((mounting, owned)) = lock(&job2).take() {
                    owned
                        .images
                        .mounted(mounting.finish(), &image2, &owned.manifest, &dir2);
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(image, error = %e, "cannot start a thread to finish a mount; finishing it here");
            if let Some((mounting, _owned)) = lock(&job).take() {
                let out = mounting.finish();
                self.mounted(out.clone(), image, manifest, &dir);
                return out;
            }
        }
        Ok(())
    }

    /// Whether `manifest` is to be mounted now (its turn taken): `Err(None)`
    /// if it is mounted, `Err(Some(why))` if it was refused lately.
    fn may_mount(&self, manifest: &str, dir: &Path) -> Result<(), Option<String>> {
        if is_mountpoint(dir) {
            return Err(None);
        }
        match lock(&self.refused).get(manifest) {
            Some((at, why)) if at.elapsed() < NEGATIVE_TTL => Err(Some(why.clone())),
            _ => Ok(()),
        }
    }

    /// Records how the mount of `image` on `dir` ended, and warms it if
    /// it is mounted.
    fn mounted(&self, out: Result<(), String>, image: &str, manifest: &str, dir: &Path) {
        match out {
            Ok(()) => {
                lock(&self.refused).remove(manifest);
                self.warm(image, manifest, dir);
            }
            Err(why) => {
                let _ = std::fs::remove_dir(dir);
                lock(&self.refused).insert(manifest.to_string(), (Instant::now(), why));
            }
        }
    }

    /// Waits until nobody mounts or unmounts `manifest`; returns the busy
    /// set, still locked.
    fn wait_turn(&self, manifest: &str) -> MutexGuard<'_, HashMap<String, bool>> {
        let mut busy = lock(&self.busy);
        while busy.contains_key(manifest) {
            busy = self.done.wait(busy).unwrap_or_else(|e| e.into_inner());
        }
        busy
    }

    /// Marks `manifest` busy until the returned claim is dropped (also when
    /// the work panics, so waiters never hang).
    fn claim<'a>(
        &'a self,
        mut busy: MutexGuard<'_, HashMap<String, bool>>,
        manifest: &str,
    ) -> Claim<&'a Images> {
        busy.insert(manifest.to_string(), false);
        Claim {
            images: self,
            manifest: manifest.to_string(),
        }
    }

    /// The node's `smr`, with the node's trust policy.
    fn smr(&self) -> Command {
        let mut c = Command::new(&self.cfg.smr);
        c.env("SMR_POLICY_DIR", &self.policy);
        c
    }

    /// Runs `smr` with the arguments `args` adds; a failure is an error
    /// with smr's message, starting with `what`.
    fn run_smr(&self, what: &str, args: impl FnOnce(&mut Command)) -> Result<(), String> {
        let mut c = self.smr();
        args(&mut c);
        let out = c
            .output()
            .map_err(|e| format!("running {}: {e}", self.cfg.smr.display()))?;
        if out.status.success() {
            return Ok(());
        }
        let err = String::from_utf8_lossy(&out.stderr);
        Err(format!("{what}: {}", err.trim()))
    }

    /// Starts `smr mount` of `image` on `dir` and waits until it has
    /// found, trusted and opened the image's artifact; an error with its
    /// message if it could not (the caller hands every outcome to
    /// [`Images::mounted`], which removes `dir` after a failure).
    fn begin_mount(&self, image: &str, dir: &Path) -> Result<Mounting, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let mut c = self.smr();
        if let Some(creds) = self.keychain.creds_for(image) {
            c.env(crate::keychain::CREDS_ENV, creds);
        }
        // Its own FUSE server: `smr mount` of a registry image would
        // otherwise ask the node daemon, this one, to mount it.
        c.arg("mount")
            .arg("--standalone")
            .arg("--print-accepted")
            .arg(image)
            .arg(dir)
            .arg("--cache-dir")
            .arg(&self.cfg.cache_dir)
            .arg("--state-dir")
            .arg(&self.state);
        if let Some(k) = &self.cfg.key_file {
            c.arg("--key-file").arg(k);
        }
        if let Some(m) = self.cfg.cache_memory {
            c.arg("--cache-memory").arg(m.to_string());
        }
        c.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let started = Instant::now();
        let mut child = c
            .spawn()
            .map_err(|e| format!("running {}: {e}", self.cfg.smr.display()))?;
        let mut err = child.stderr.take();
        let stderr = std::thread::spawn(move || {
            let mut text = String::new();
            if let Some(e) = err.as_mut() {
                let _ = e.read_to_string(&mut text);
            }
            text
        });
        let mut line = String::new();
        if let Some(out) = child.stdout.take() {
            let _ = std::io::BufReader::new(out).read_line(&mut line);
        }
        let m = Mounting {
            child,
            stderr,
            image: image.to_string(),
            dir: dir.to_path_buf(),
            started,
        };
        if line.trim_end() == smr_node::mount::ACCEPTED {
            return Ok(m);
        }
        // It ended (or said something else) before accepting the image.
        match m.finish() {
            Err(why) => Err(why),
            Ok(()) => Err(format!(
                "smr mount {image}: ended without opening the image"
            )),
        }
    }

    /// Starts reading, in the background, what the dynamic loader will
    /// read first when the image's program starts (its entrypoint, or its
    /// command, found with the config's `PATH`), through the mount at
    /// `dir`: on a lazy image without a profile those are misses one after
    /// another, made here while containerd still pulls and creates the
    /// container. Not for an image served from a startup pack, whose
    /// profile knows the start better. Best effort: a failure is logged.
    fn warm(&self, image: &str, manifest: &str, dir: &Path) {
        if smr_node::mount::serves_startup_pack(&self.state, dir) {
            return;
        }
        // The config `smr mount` kept from the recipe; the registry only
        // for a mount made without it.
        let kept = smr_node::mount::read_state(&self.state, dir)
            .ok()
            .and_then(|(_, st)| st.config);
        let (keychain, image, dir) = (self.keychain.clone(), image.to_string(), dir.to_path_buf());
        let spawned = std::thread::Builder::new()
            .name("smr-warm".into())
            .spawn(move || {
                let t = Instant::now();
                let config = match kept.map_or_else(|| config_from_registry(&keychain, &image), Ok) {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(image, error = e, "cannot read the image config; its program is not warmed");
                        return;
                    }
                };
                use smr_node::run::spec;
                let Some(program) = spec::process_args(&config, &[])
                    .ok()
                    .and_then(|args| args.into_iter().next())
                else {
                    return;
                };
                let path = config
                    .env
                    .iter()
                    .find_map(|e| e.strip_prefix("PATH="))
                    .unwrap_or(spec::DEFAULT_PATH);
                let w = smr_node::warm::warm_program(&dir, &program, path);
                tracing::info!(image, program, files = w.files.len(), took = ?t.elapsed(), "warmed the start of the image's program");
            });
        match spawned {
            Ok(h) => {
                lock(&self.warming).insert(manifest.to_string(), h);
            }
            Err(e) => tracing::warn!(error = %e, "cannot start the thread that warms an image"),
        }
    }

    /// Unmounts the image with manifest `digest`; a busy mount (a container
    /// still uses it) stays and the error says so.
    pub fn release(&self, manifest: &str) -> Result<(), String> {
        let _claim = self.claim(self.wait_turn(manifest), manifest);
        // Its files open, the warming would keep the mount busy.
        if let Some(h) = lock(&self.warming).remove(manifest) {
            let _ = h.join();
        }
        let dir = self.rootfs(manifest);
        if !is_mountpoint(&dir) {
            return Ok(());
        }
        self.run_smr(&format!("smr umount {}", dir.display()), |c| {
            c.arg("umount")
                .arg(&dir)
                .arg("--state-dir")
                .arg(&self.state);
        })?;
        if let Some(parent) = dir.parent() {
            let _ = std::fs::remove_dir_all(parent);
        }
        tracing::info!(manifest, "image released");
        Ok(())
    }

    /// Manifests with a directory under `images/` (mounted or not).
    pub fn known(&self) -> Vec<String> {
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        rd.flatten()
            .filter_map(|e| e.file_name().to_str().map(|n| n.replacen('-', ":", 1)))
            .collect()
    }
}

/// The runtime config of `image`, read from its registry with the
/// credentials the keychain holds for it.
fn config_from_registry(
    keychain: &crate::keychain::Keychain,
    image: &str,
) -> Result<smr_format::config::ImageConfig, String> {
    use smr_image::source::ImageSource;
    let opts = keychain.options_for(image);
    let src =
        smr_registry::source::RegistrySource::open(image, &opts).map_err(|e| e.to_string())?;
    src.resolve(&smr_image::source::Platform::default())
        .map(|img| img.config)
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const IMAGE: &str = "docker://r.example/x@sha256:1111";
    const MANIFEST: &str = "sha256:1111";

    /// Images whose `smr` is the shell script `body` (standing in for a
    /// `smr mount` that fails in a given way); each run appends a line to
    /// `runs` in the returned directory.
    fn images_running(body: &str) -> (tempfile::TempDir, Arc<Images>) {
        let t = tempfile::tempdir().expect("tempdir");
        let smr = t.path().join("smr");
        let runs = t.path().join("runs");
        let script = format!("#!/bin/sh\necho run >> {}\n{body}\n", runs.display());
        std::fs::write(&smr, script).expect("script");
        std::fs::set_permissions(&smr, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let cfg = MountConfig {
            smr,
            cache_dir: t.path().join("cache"),
            key_file: None,
            cache_memory: None,
        };
        let images = Arc::new(Images::new(&t.path().join("root"), cfg));
        (t, images)
    }

    fn runs(t: &tempfile::TempDir) -> usize {
        std::fs::read_to_string(t.path().join("runs"))
            .map(|s| s.lines().count())
            .unwrap_or(0)
    }

    #[test]
    fn a_mount_refused_before_acceptance_is_an_error_at_once_and_remembered() {
        let (t, images) = images_running("echo 'no smr artifact for the image' >&2; exit 1");
        let err = images
            .ensure_accepted(IMAGE, MANIFEST)
            .expect_err("refused");
        assert!(err.contains("no smr artifact for the image"), "{err}");
        assert!(!images.rootfs(MANIFEST).exists());
        // Within NEGATIVE_TTL the answer is the same, without a new run.
        let again = images
            .ensure_accepted(IMAGE, MANIFEST)
            .expect_err("refused");
        assert_eq!(again, err);
        assert_eq!(images.ensure(IMAGE, MANIFEST).expect_err("refused"), err);
        assert_eq!(runs(&t), 1);
    }

    #[test]
    fn a_mount_failing_after_acceptance_fails_whoever_waits_for_it() {
        let (t, images) = images_running(
            "echo accepted; sleep 0.5; echo 'attaching a loop device: no free device' >&2; exit 1",
        );
        let t0 = Instant::now();
        images.ensure_accepted(IMAGE, MANIFEST).expect("accepted");
        assert!(
            t0.elapsed() < Duration::from_millis(400),
            "{:?}",
            t0.elapsed()
        );
        // A second layer of the image: accepted, no second mount.
        images.ensure_accepted(IMAGE, MANIFEST).expect("accepted");
        // A container's snapshot waits for the mount and gets its error.
        let err = images.ensure(IMAGE, MANIFEST).expect_err("failed");
        assert!(t0.elapsed() >= Duration::from_millis(500));
        assert!(err.contains("no free device"), "{err}");
        assert!(!images.rootfs(MANIFEST).exists());
        assert_eq!(runs(&t), 1);
        // Refused from then on, for NEGATIVE_TTL.
        assert_eq!(
            images
                .ensure_accepted(IMAGE, MANIFEST)
                .expect_err("refused"),
            err
        );
    }
}
