//! Real servers for the remote tests, started through the repository's
//! scripts on 127.0.0.1 and stopped on drop.

use crate::util::repo_root;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub use smr_testkit::env::{debian_layout, require_tools as have};

/// Runs `scripts/NAME ARGS[0] DIR ARGS[1..]`; returns its stdout.
fn script(name: &str, args: &[&str], dir: &Path) -> String {
    let out = Command::new(repo_root().join("scripts").join(name))
        .arg(args[0])
        .arg(dir)
        .args(&args[1..])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{name} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A docker-registry (distribution 2.8) with its data in a temp dir.
pub struct Registry {
    /// Config, data and log.
    pub dir: tempfile::TempDir,
    /// `127.0.0.1:PORT`.
    pub addr: String,
    htpasswd: Option<String>,
    running: bool,
}

impl Registry {
    /// Starts one (`htpasswd` = `USER:PASS` requires basic auth).
    pub fn start(htpasswd: Option<&str>) -> Option<Registry> {
        let mut tools = vec!["docker-registry", "skopeo", "curl"];
        if htpasswd.is_some() {
            tools.push("htpasswd");
        }
        if !have(&tools) {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let mut r = Registry {
            dir,
            addr: String::new(),
            htpasswd: htpasswd.map(str::to_string),
            running: false,
        };
        r.restart("0");
        Some(r)
    }

    fn restart(&mut self, port: &str) {
        let reg = self.dir.path().join("reg");
        // Info logs every request: what `blob_gets` counts.
        let mut args = vec!["start", port, "--log-level", "info"];
        if let Some(a) = &self.htpasswd {
            args.extend(["--htpasswd", a]);
        }
        self.addr = script("registry.sh", &args, &reg);
        self.running = true;
    }

    /// Blob GETs the registry has answered so far (from its request log).
    pub fn blob_gets(&self) -> usize {
        self.gets_of("/blobs/")
    }

    /// GETs of URLs containing `part` the registry has answered so far.
    pub fn gets_of(&self, part: &str) -> usize {
        let log = std::fs::read(self.dir.path().join("reg/registry.log")).unwrap_or_default();
        String::from_utf8_lossy(&log)
            .lines()
            .filter(|l| {
                l.contains("response completed")
                    && l.contains("http.request.method=GET")
                    && l.contains(part)
            })
            .count()
    }

    /// Stops it; the data stays.
    pub fn stop(&mut self) {
        if self.running {
            script("registry.sh", &["stop"], &self.dir.path().join("reg"));
            self.running = false;
        }
    }

    /// Starts it again on the same port with the same data.
    pub fn start_again(&mut self) {
        let port = self.addr.rsplit(':').next().unwrap().to_string();
        self.restart(&port);
    }

    /// `docker://ADDR/name_tag`.
    pub fn image(&self, name_tag: &str) -> String {
        format!("docker://{}/{name_tag}", self.addr)
    }

    /// `skopeo copy` of `oci:LAYOUT:TAG` to `name_tag`, digests kept.
    pub fn push_layout(&self, layout: &Path, tag: &str, name_tag: &str, creds: Option<&str>) {
        let mut c = Command::new("skopeo");
        c.args([
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
            "--preserve-digests",
        ]);
        if let Some(cr) = creds {
            c.arg("--dest-creds").arg(cr);
        }
        let out = c
            .arg(format!("oci:{}:{tag}", layout.display()))
            .arg(self.image(name_tag))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "skopeo copy failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// s3s-fs with one bucket `smr`, anonymous.
pub struct S3 {
    dir: tempfile::TempDir,
    /// `127.0.0.1:PORT`.
    pub addr: String,
}

impl S3 {
    /// Starts one.
    pub fn start() -> Option<S3> {
        if !have(&["s3s-fs"]) {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let addr = script(
            "s3.sh",
            &[
                "start",
                "0",
                "--keys",
                "smrtest:smrtestsecret",
                "--bucket",
                "smr",
            ],
            &dir.path().join("s3"),
        );
        Some(S3 { dir, addr })
    }

    /// Where s3s-fs keeps object `key` of bucket `smr`.
    pub fn object_path(&self, key: &str) -> std::path::PathBuf {
        self.dir.path().join("s3/data/smr").join(key)
    }

    /// The environment a client needs.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", format!("http://{}", self.addr)),
            ("AWS_ALLOW_HTTP", "true".into()),
            ("AWS_ACCESS_KEY_ID", "smrtest".into()),
            ("AWS_SECRET_ACCESS_KEY", "smrtestsecret".into()),
            ("AWS_REGION", "us-east-1".into()),
        ]
    }
}

impl Drop for S3 {
    fn drop(&mut self) {
        script("s3.sh", &["stop"], &self.dir.path().join("s3"));
    }
}

/// `scripts/lib/range-http.py` (a static server answering Range requests
/// with 206, as nginx or a CDN does) over a directory.
pub struct FileServer {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
}

impl FileServer {
    /// Serves `dir` (read-only, whole files).
    pub fn start(dir: &Path) -> Option<FileServer> {
        if !have(&["python3"]) {
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/lib/range-http.py");
        let child = Command::new("python3")
            .arg(script)
            .arg(port.to_string())
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let t = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "http.server did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(FileServer {
            child,
            url: format!("http://127.0.0.1:{port}"),
        })
    }
}

impl Drop for FileServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
