//! Bearer tokens for real: docker-registry configured with `auth: token`,
//! trusting a self-signed certificate, and a token service (a
//! [`FakeServer`]) that checks basic credentials and issues RS256 JWTs
//! signed with openssl, granting what the `scope` asks for.

use super::fake::{base64, FakeServer, Req, Resp};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The `service` and `issuer` the registry expects.
pub const SERVICE: &str = "smr-test-registry";
const ISSUER: &str = "smr-test-issuer";

/// A self-signed RSA key and certificate that sign tokens.
pub struct Signer {
    key: PathBuf,
    /// The certificate, PEM (the registry's `rootcertbundle`).
    pub cert: PathBuf,
    /// The certificate, base64 DER (the JWT's `x5c`).
    x5c: String,
}

impl Signer {
    /// Makes a key and certificate named `name` in `dir`.
    pub fn new(dir: &Path, name: &str) -> Signer {
        let key = dir.join(format!("{name}.key"));
        let cert = dir.join(format!("{name}.pem"));
        let ok = Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            ])
            .arg("-subj")
            .arg(format!("/CN={name}"))
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .stderr(Stdio::null())
            .status()
            .expect("openssl req");
        assert!(ok.success(), "openssl req failed");
        let der = Command::new("openssl")
            .args(["x509", "-outform", "DER", "-in"])
            .arg(&cert)
            .output()
            .expect("openssl x509");
        assert!(der.status.success(), "openssl x509 failed");
        Signer {
            key,
            cert,
            x5c: base64(&der.stdout, false),
        }
    }

    /// A JWT for `account` granting the actions of `scope`
    /// (`repository:NAME:ACTIONS`, space-separated).
    pub fn token(&self, account: &str, scope: &str, ttl: u64) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_secs();
        let access: Vec<serde_json::Value> = scope
            .split(' ')
            .filter_map(|s| {
                let mut it = s.splitn(3, ':');
                let (t, n, a) = (it.next()?, it.next()?, it.next()?);
                Some(serde_json::json!({"type": t, "name": n, "actions": a.split(',').collect::<Vec<_>>()}))
            })
            .collect();
        let header = serde_json::json!({"typ": "JWT", "alg": "RS256", "x5c": [self.x5c]});
        let claims = serde_json::json!({
            "iss": ISSUER, "sub": account, "aud": SERVICE,
            "exp": now + ttl, "nbf": now - 10, "iat": now,
            "jti": format!("{now}-{}", fastrand::u64(..)),
            "access": access,
        });
        let signing_input = format!(
            "{}.{}",
            base64(header.to_string().as_bytes(), true),
            base64(claims.to_string().as_bytes(), true)
        );
        let mut child = Command::new("openssl")
            .args(["dgst", "-sha256", "-sign"])
            .arg(&self.key)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("openssl dgst");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(signing_input.as_bytes())
            .expect("write");
        let out = child.wait_with_output().expect("openssl dgst");
        assert!(out.status.success(), "openssl dgst failed");
        format!("{signing_input}.{}", base64(&out.stdout, true))
    }
}

/// A token service: checks `USER:PASS`, signs with the current signer,
/// counts the tokens it issued.
pub struct TokenService {
    /// The server.
    pub server: FakeServer,
    /// Which signer signs.
    pub signer: Arc<Mutex<Arc<Signer>>>,
    /// Tokens issued.
    pub issued: Arc<AtomicUsize>,
}

impl TokenService {
    /// Starts a service accepting `user:pass` (basic) and signing with
    /// `signer`.
    pub fn start(signer: Signer, user: &str, pass: &str) -> TokenService {
        let expected = format!(
            "Basic {}",
            base64(format!("{user}:{pass}").as_bytes(), false)
        );
        let signer = Arc::new(Mutex::new(Arc::new(signer)));
        let issued = Arc::new(AtomicUsize::new(0));
        let (s, n) = (signer.clone(), issued.clone());
        let user = user.to_string();
        let server = FakeServer::start(move |req: &Req| {
            if req.path() != "/token" {
                return Resp::new(404, "not found");
            }
            if req.header("authorization") != Some(expected.as_str()) {
                return Resp::new(401, r#"{"details":"incorrect username or password"}"#);
            }
            if req.query("service").as_deref() != Some(SERVICE) {
                return Resp::new(400, "wrong service");
            }
            let scope = req.query("scope").unwrap_or_default();
            let signer = s.lock().expect("lock").clone();
            let token = signer.token(&user, &scope, 300);
            n.fetch_add(1, Ordering::SeqCst);
            Resp::new(
                200,
                serde_json::json!({"token": token, "expires_in": 300}).to_string(),
            )
            .header("Content-Type", "application/json")
        });
        TokenService {
            server,
            signer,
            issued,
        }
    }
}

/// docker-registry with token auth (started directly: registry.sh only
/// knows htpasswd), killed on drop.
pub struct TokenRegistry {
    dir: PathBuf,
    /// `127.0.0.1:PORT`.
    pub addr: String,
    realm: String,
    child: Option<Child>,
}

impl TokenRegistry {
    /// Starts a registry in `dir` trusting `root` (PEM) for tokens from
    /// `realm`.
    pub fn start(dir: &Path, realm: &str, root: &Path) -> TokenRegistry {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let mut r = TokenRegistry {
            dir: dir.to_path_buf(),
            addr: format!("127.0.0.1:{port}"),
            realm: realm.to_string(),
            child: None,
        };
        r.restart(root);
        r
    }

    /// (Re)starts the registry on the same address, trusting `root`.
    pub fn restart(&mut self, root: &Path) {
        self.kill();
        let config = format!(
            "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\n\
             storage:\n  filesystem:\n    rootdirectory: {data}\n\
             http:\n  addr: {addr}\n\
             auth:\n  token:\n    realm: {realm}\n    service: {SERVICE}\n    issuer: {ISSUER}\n    rootcertbundle: {root}\n",
            data = self.dir.join("data").display(),
            addr = self.addr,
            realm = self.realm,
            root = root.display(),
        );
        let cfg = self.dir.join("config.yml");
        std::fs::write(&cfg, config).expect("config");
        let log = std::fs::File::create(self.dir.join("registry.log")).expect("log");
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&cfg)
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("docker-registry");
        self.child = Some(child);
        // Ready when /v2/ answers (401: a token is needed).
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(mut s) = TcpStream::connect(&self.addr) {
                let _ = s.write_all(b"GET /v2/ HTTP/1.0\r\n\r\n");
                let mut buf = [0u8; 12];
                if s.read_exact(&mut buf).is_ok() && buf.starts_with(b"HTTP/1.") {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "token registry did not start: {}",
                std::fs::read_to_string(self.dir.join("registry.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for TokenRegistry {
    fn drop(&mut self) {
        self.kill();
    }
}
