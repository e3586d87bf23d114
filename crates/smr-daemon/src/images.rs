//! Lazily mounted smr images, one mount per image manifest however many
//! snapshots and containers use it.
//!
//! A mount is made by `smr mount` (the same code path, policy and cache as
//! on the command line): its FUSE server runs in a session of its own, so
//! the mount and every read through it survive a restart or a SIGKILL of
//! the daemon; the daemon finds the mounts again by their directories.

use smr_node::mount::is_mountpoint;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Condvar, Mutex, MutexGuard};
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
    /// Manifests being mounted right now (others wait for them).
    busy: Mutex<HashSet<String>>,
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

/// An image being mounted or unmounted (see [`Images::claim`]).
struct Claim<'a> {
    images: &'a Images,
    manifest: String,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        lock(&self.images.busy).remove(&self.manifest);
        self.images.done.notify_all();
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
            busy: Mutex::new(HashSet::new()),
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
            if is_mountpoint(&dir) {
                return Ok(dir);
            }
            if let Some((at, why)) = lock(&self.refused).get(manifest) {
                if at.elapsed() < NEGATIVE_TTL {
                    return Err(why.clone());
                }
            }
            self.claim(busy, manifest)
        };
        let out = self.mount(image, &dir);
        match &out {
            Ok(()) => {
                lock(&self.refused).remove(manifest);
                self.warm(image, manifest, &dir);
            }
            Err(why) => {
                lock(&self.refused).insert(manifest.to_string(), (Instant::now(), why.clone()));
            }
        }
        out.map(|()| dir)
    }

    /// Waits until nobody mounts or unmounts `manifest`; returns the busy
    /// set, still locked.
    fn wait_turn(&self, manifest: &str) -> MutexGuard<'_, HashSet<String>> {
        let mut busy = lock(&self.busy);
        while busy.contains(manifest) {
            busy = self.done.wait(busy).unwrap_or_else(|e| e.into_inner());
        }
        busy
    }

    /// Marks `manifest` busy until the returned claim is dropped (also when
    /// the work panics, so waiters never hang).
    fn claim<'a>(&'a self, mut busy: MutexGuard<'_, HashSet<String>>, manifest: &str) -> Claim<'a> {
        busy.insert(manifest.to_string());
        Claim {
            images: self,
            manifest: manifest.to_string(),
        }
    }

    /// Runs `smr` with the arguments `args` adds; a failure is an error
    /// with smr's message, starting with `what`.
    fn run_smr(&self, what: &str, args: impl FnOnce(&mut Command)) -> Result<(), String> {
        let mut c = Command::new(&self.cfg.smr);
        c.env("SMR_POLICY_DIR", &self.policy);
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

    fn mount(&self, image: &str, dir: &Path) -> Result<(), String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let t = Instant::now();
        let mounted = self.run_smr(&format!("smr mount {image}"), |c| {
            if let Some(creds) = self.keychain.creds_for(image) {
                c.env(crate::keychain::CREDS_ENV, creds);
            }
            // Its own FUSE server: `smr mount` of a registry image would
            // otherwise ask the node daemon, this one, to mount it.
            c.arg("mount")
                .arg("--standalone")
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
        });
        if let Err(e) = mounted {
            let _ = std::fs::remove_dir(dir);
            return Err(e);
        }
        tracing::info!(image, dir = %dir.display(), took = ?t.elapsed(), "image mounted");
        Ok(())
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
