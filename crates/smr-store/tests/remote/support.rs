//! Servers for the tests: a static file server, a scripted HTTP responder
//! and an S3 server.

use smr_format::ChunkId;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Random bytes and their chunk id.
pub fn chunk(len: usize) -> (ChunkId, Vec<u8>) {
    let data: Vec<u8> = std::iter::repeat_with(|| fastrand::u8(..))
        .take(len)
        .collect();
    (ChunkId::of(&data), data)
}

/// A free TCP port on 127.0.0.1 (free when asked; good enough for tests).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_listening(port: u16, what: &str) {
    let t = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{what} on port {port} did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `python3 -m http.server` (whole files only: a Range request gets the
/// whole file) or `scripts/lib/range-http.py` (206 answers to Range
/// requests) serving a directory; killed on drop.
pub struct FileServer {
    child: Option<Child>,
    dir: PathBuf,
    ranges: bool,
    pub port: u16,
}

impl FileServer {
    /// Serves `dir` with `python3 -m http.server` on `port` (0: a free
    /// one) and waits until it listens.
    pub fn start(dir: &Path, port: u16) -> FileServer {
        FileServer::spawn(dir, port, false)
    }

    /// Serves `dir` with Range support.
    pub fn start_with_ranges(dir: &Path) -> FileServer {
        FileServer::spawn(dir, 0, true)
    }

    fn spawn(dir: &Path, port: u16, ranges: bool) -> FileServer {
        let port = if port == 0 { free_port() } else { port };
        let mut cmd = Command::new("python3");
        if ranges {
            let script =
                Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/lib/range-http.py");
            cmd.arg(script).arg(port.to_string()).arg(dir);
        } else {
            cmd.args([
                "-m",
                "http.server",
                "--bind",
                "127.0.0.1",
                &port.to_string(),
                "--directory",
            ])
            .arg(dir);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 (for the test HTTP server)");
        wait_listening(port, "the test HTTP server");
        FileServer {
            child: Some(child),
            dir: dir.to_path_buf(),
            ranges,
            port,
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Kills the server (connections are then refused).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port.
    pub fn restart(&mut self) {
        self.stop();
        *self = FileServer::spawn(&self.dir.clone(), self.port, self.ranges);
    }
}

impl Drop for FileServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One scripted answer.
#[derive(Clone, Debug)]
pub enum Reply {
    /// A status with extra header lines and an empty body.
    Status(u16, &'static str),
    /// 200 with this body.
    Body(Vec<u8>),
    /// 200 announcing `Content-Length: announced` but sending `body`, then
    /// closing.
    Truncated { announced: usize, body: Vec<u8> },
    /// Reads the request and never answers.
    Hang,
    /// 200 with this body after a pause.
    Slow(Duration, Vec<u8>),
}

/// A std::net HTTP/1.1 responder answering request `n` with `script[n]`
/// (the last reply repeats). Counts requests and the peak in flight.
pub struct Scripted {
    pub addr: SocketAddr,
    pub hits: Arc<AtomicUsize>,
    pub peak: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl Scripted {
    pub fn start(script: Vec<Reply>) -> Scripted {
        assert!(!script.is_empty());
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let now = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (h, p, s) = (hits.clone(), peak.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let (script, h, p, now, s) =
                    (script.clone(), h.clone(), p.clone(), now.clone(), s.clone());
                std::thread::spawn(move || serve(conn, &script, &h, &p, &now, &s));
            }
        });
        Scripted {
            addr,
            hits,
            peak,
            stop,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}/store", self.addr)
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

impl Drop for Scripted {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
    }
}

fn serve(
    mut conn: TcpStream,
    script: &[Reply],
    hits: &AtomicUsize,
    peak: &AtomicUsize,
    now: &AtomicUsize,
    stop: &AtomicBool,
) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    if stop.load(Ordering::SeqCst) {
        return;
    }
    let n = hits.fetch_add(1, Ordering::SeqCst);
    let reply = script[n.min(script.len() - 1)].clone();
    let ok = |body: &[u8]| {
        let mut r = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .into_bytes();
        r.extend_from_slice(body);
        r
    };
    let bytes = match reply {
        Reply::Status(code, headers) => format!(
            "HTTP/1.1 {code} Scripted\r\nContent-Length: 0\r\nConnection: close\r\n{headers}\r\n"
        )
        .into_bytes(),
        Reply::Body(body) => ok(&body),
        Reply::Truncated { announced, body } => {
            let mut r = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {announced}\r\nConnection: close\r\n\r\n"
            )
            .into_bytes();
            r.extend_from_slice(&body);
            r
        }
        Reply::Hang => {
            std::thread::sleep(Duration::from_secs(30));
            return;
        }
        Reply::Slow(pause, body) => {
            let in_flight = now.fetch_add(1, Ordering::SeqCst) + 1;
            peak.fetch_max(in_flight, Ordering::SeqCst);
            std::thread::sleep(pause);
            now.fetch_sub(1, Ordering::SeqCst);
            ok(&body)
        }
    };
    let _ = conn.write_all(&bytes);
    let _ = conn.flush();
}

/// `scripts/s3.sh` running s3s-fs with key pair `ACCESS_KEY`/`SECRET_KEY`
/// and bucket `BUCKET`; stopped on drop.
pub struct S3Server {
    pub dir: tempfile::TempDir,
    pub endpoint: String,
    port: u16,
}

pub const ACCESS_KEY: &str = "smr-test-access";
pub const SECRET_KEY: &str = "smr-test-secret-key";
pub const BUCKET: &str = "smr-test";

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/s3.sh")
}

impl S3Server {
    /// Starts a server, or returns `None` (after saying so) when s3s-fs is
    /// not installed, unless SMR_REQUIRE_IMAGES is set (CI): then it panics.
    pub fn start() -> Option<S3Server> {
        if !smr_testkit::env::require_tools(&["s3s-fs"]) {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let port = S3Server::run(dir.path(), 0);
        Some(S3Server {
            dir,
            endpoint: format!("http://127.0.0.1:{port}"),
            port,
        })
    }

    fn run(dir: &Path, port: u16) -> u16 {
        let out = Command::new(script())
            .arg("start")
            .arg(dir)
            .arg(port.to_string())
            .args([
                "--keys",
                &format!("{ACCESS_KEY}:{SECRET_KEY}"),
                "--bucket",
                BUCKET,
            ])
            .stderr(Stdio::inherit())
            .output()
            .expect("running scripts/s3.sh");
        assert!(out.status.success(), "scripts/s3.sh start failed");
        let addr = String::from_utf8(out.stdout).unwrap();
        addr.trim().rsplit_once(':').unwrap().1.parse().unwrap()
    }

    pub fn stop(&self) {
        let _ = Command::new(script())
            .arg("stop")
            .arg(self.dir.path())
            .status();
    }

    /// Starts it again on the same port with the same data.
    pub fn restart(&self) {
        self.stop();
        S3Server::run(self.dir.path(), self.port);
    }

    /// Where s3s-fs keeps object `key` of the bucket.
    pub fn object_path(&self, key: &str) -> PathBuf {
        self.dir.path().join("data").join(BUCKET).join(key)
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}
