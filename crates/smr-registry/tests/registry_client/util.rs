//! Real registries for the tests: Debian's docker-registry (distribution
//! 2.8) through `scripts/registry.sh`, skopeo to push OCI layouts, and the
//! synthetic and Debian test images.

use smr_registry::client::{Registry, RegistryOptions, Repository, RetryPolicy};
use smr_registry::Blobs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Root of the source tree.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub use smr_testkit::env::{debian_layout, require_tools as tools};

/// A docker-registry started by `scripts/registry.sh` in a temp dir,
/// stopped on drop.
pub struct TestRegistry {
    /// Holds config, data, log.
    pub dir: tempfile::TempDir,
    /// `127.0.0.1:PORT`.
    pub addr: String,
    stopped: bool,
}

impl TestRegistry {
    /// Starts a registry; with `htpasswd` (`USER:PASS`) it requires basic
    /// auth. `None` (with a note) when docker-registry is missing.
    pub fn start(htpasswd: Option<&str>) -> Option<TestRegistry> {
        let mut needed = vec!["docker-registry", "curl", "python3"];
        if htpasswd.is_some() {
            needed.push("htpasswd");
        }
        if !tools(&needed) {
            return None;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cmd = Command::new(repo_root().join("scripts/registry.sh"));
        cmd.arg("start").arg(dir.path().join("reg")).arg("0");
        if let Some(a) = htpasswd {
            cmd.arg("--htpasswd").arg(a);
        }
        let out = cmd.output().expect("run registry.sh");
        assert!(
            out.status.success(),
            "registry.sh start failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let addr = String::from_utf8_lossy(&out.stdout).trim().to_string();
        Some(TestRegistry {
            dir,
            addr,
            stopped: false,
        })
    }

    /// Stops the registry (its data stays until drop).
    pub fn stop(&mut self) {
        if !self.stopped {
            self.stopped = true;
            let _ = Command::new(repo_root().join("scripts/registry.sh"))
                .arg("stop")
                .arg(self.dir.path().join("reg"))
                .output();
        }
    }

    /// `docker://ADDR/name:tag`.
    pub fn docker_ref(&self, name_tag: &str) -> String {
        format!("docker://{}/{name_tag}", self.addr)
    }

    /// A client for repository `name`, anonymous, with quick retries.
    pub fn repo(&self, name: &str) -> Repository {
        Registry::new(&self.addr, &fast_options())
            .expect("registry client")
            .repository(name)
            .expect("repository")
    }
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Options with short back-offs, so failure tests stay quick.
pub fn fast_options() -> RegistryOptions {
    RegistryOptions {
        retry: RetryPolicy {
            attempts: 3,
            base: Duration::from_millis(50),
            max: Duration::from_millis(200),
            max_retry_after: Duration::from_secs(5),
        },
        ..Default::default()
    }
}

/// `skopeo copy` of `oci:LAYOUT:TAG` to `dest` (`docker://…`), keeping
/// digests. Extra args (e.g. `--dest-creds`) go before the images.
pub fn skopeo_push(layout: &Path, tag: &str, dest: &str, extra: &[&str]) {
    let out = Command::new("skopeo")
        .args([
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
            "--preserve-digests",
        ])
        .args(extra)
        .arg(format!("oci:{}:{tag}", layout.display()))
        .arg(dest)
        .output()
        .expect("run skopeo");
    assert!(
        out.status.success(),
        "skopeo copy to {dest} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Pushes the image tagged `tag` in OCI layout `layout` to `repo` with our
/// client: every blob, then the manifest bytes unchanged, under `tag`.
/// Returns the manifest digest.
pub fn client_push(layout: &Path, tag: &str, repo: &Repository) -> String {
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).expect("index.json"))
            .expect("index json");
    let desc = index["manifests"]
        .as_array()
        .expect("manifests")
        .iter()
        .find(|d| d["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .expect("tag in index.json")
        .clone();
    let blob = |d: &str| std::fs::read(smr_testkit::blob_path(layout, d)).expect("blob");
    let digest = desc["digest"].as_str().expect("digest").to_string();
    let mbytes = blob(&digest);
    let manifest: serde_json::Value = serde_json::from_slice(&mbytes).expect("manifest");
    let mut blobs = vec![manifest["config"]["digest"].as_str().expect("config")];
    for l in manifest["layers"].as_array().expect("layers") {
        blobs.push(l["digest"].as_str().expect("layer digest"));
    }
    for d in blobs {
        repo.push_blob(d, &blob(d)).expect("push blob");
    }
    let mt = desc["mediaType"].as_str().expect("media type");
    let pushed = repo.put_manifest(tag, mt, &mbytes).expect("put manifest");
    assert_eq!(pushed, digest);
    digest
}

/// `n` pseudo-random bytes (fixed seed).
pub fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut v = vec![0u8; n];
    rng.fill(&mut v);
    v
}

/// `sha256:<hex>` of `data`.
pub fn digest(data: &[u8]) -> String {
    smr_testkit::sha256_digest(data)
}

/// The read limit the tests give whole-blob reads.
pub const LIMIT: u64 = 1 << 30;
