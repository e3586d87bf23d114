//! A client of the daemon's control API ([`crate::control`]): HTTP/1.0
//! with JSON bodies over the control socket, one request per connection.
//! What the CLI (`smr status`, `smr mount`, `smr run`) and `smr pull` use.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Largest answer read (a status of many images is tens of KiB).
const MAX_ANSWER: u64 = 16 << 20;

/// Why a control request failed; each names the socket.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing answers on the socket.
    #[error("connecting to the smr daemon at {} (is `smr daemon` running?): {source}", socket.display())]
    Connect {
        /// The control socket.
        socket: PathBuf,
        /// What `connect` said.
        source: std::io::Error,
    },
    /// The request could not be sent or its answer read.
    #[error("talking to the smr daemon at {}: {source}", socket.display())]
    Io {
        /// The control socket.
        socket: PathBuf,
        /// The I/O error (a timeout among them).
        source: std::io::Error,
    },
    /// The answer is not HTTP.
    #[error("the smr daemon at {}: not an HTTP answer: {head:?}", socket.display())]
    Garbled {
        /// The control socket.
        socket: PathBuf,
        /// The start of what came back.
        head: String,
    },
    /// The daemon answered with an error status.
    #[error("the smr daemon ({}): {message}", socket.display())]
    Refused {
        /// The control socket.
        socket: PathBuf,
        /// The HTTP status.
        status: u16,
        /// The daemon's `error` field, else the status line and body.
        message: String,
    },
}

/// Whether a daemon answers on `socket`.
pub fn daemon_runs(socket: &Path) -> bool {
    UnixStream::connect(socket).is_ok()
}

/// `METHOD path` with a JSON `body` on the control socket `socket`,
/// waiting at most `timeout` for each read or write: the body of a 2xx
/// answer; any other status is [`ClientError::Refused`] with the daemon's
/// message.
pub fn request(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
    timeout: Duration,
) -> Result<String, ClientError> {
    let io = |source| ClientError::Io {
        socket: socket.to_path_buf(),
        source,
    };
    let mut s = UnixStream::connect(socket).map_err(|source| ClientError::Connect {
        socket: socket.to_path_buf(),
        source,
    })?;
    s.set_read_timeout(Some(timeout)).map_err(io)?;
    s.set_write_timeout(Some(timeout)).map_err(io)?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.0\r\nHost: smr\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).map_err(io)?;
    s.write_all(body.as_bytes()).map_err(io)?;
    let mut raw = Vec::new();
    s.take(MAX_ANSWER).read_to_end(&mut raw).map_err(io)?;
    answer_body(socket, &raw)
}

/// The body of the HTTP answer `raw`, if its status is 2xx.
fn answer_body(socket: &Path, raw: &[u8]) -> Result<String, ClientError> {
    let text = String::from_utf8_lossy(raw);
    let garbled = || ClientError::Garbled {
        socket: socket.to_path_buf(),
        head: text.chars().take(80).collect(),
    };
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(garbled)?;
    let status_line = head.lines().next().unwrap_or_default();
    let status: u16 = match status_line.split_whitespace().collect::<Vec<_>>()[..] {
        [version, code, ..] if version.starts_with("HTTP/") => {
            code.parse().map_err(|_| garbled())?
        }
        _ => return Err(garbled()),
    };
    if (200..300).contains(&status) {
        return Ok(body.to_string());
    }
    let message = serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_string))
        .unwrap_or_else(|| format!("{status_line}: {body}"));
    Err(ClientError::Refused {
        socket: socket.to_path_buf(),
        status,
        message,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A server that answers one connection with `answer` after reading
    /// the whole request (its head, then the `Content-Length` bytes of its
    /// body, which the client may send in another write); returns the
    /// socket and what it was sent.
    fn one_answer(
        answer: &'static [u8],
    ) -> (tempfile::TempDir, PathBuf, std::thread::JoinHandle<String>) {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("c.sock");
        let l = UnixListener::bind(&sock).unwrap();
        let h = std::thread::spawn(move || {
            let (mut c, _) = l.accept().unwrap();
            let mut got = Vec::new();
            let mut buf = vec![0u8; 4096];
            loop {
                let text = String::from_utf8_lossy(&got);
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let len = head
                        .lines()
                        .find_map(|l| l.strip_prefix("Content-Length: "))
                        .map_or(0, |n| n.trim().parse::<usize>().unwrap());
                    if body.len() >= len {
                        break;
                    }
                }
                let n = c.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
            c.write_all(answer).unwrap();
            String::from_utf8_lossy(&got).into_owned()
        });
        (dir, sock, h)
    }

    #[test]
    fn a_2xx_answer_gives_its_body() {
        let (_d, sock, h) = one_answer(b"HTTP/1.1 202 Accepted\r\ncontent-length: 2\r\n\r\n{}");
        let body = serde_json::json!({ "image": "docker://r/x@sha256:00" });
        let got = request(
            &sock,
            "POST",
            "/images",
            Some(&body),
            Duration::from_secs(5),
        )
        .unwrap();
        assert_eq!(got, "{}");
        let sent = h.join().unwrap();
        assert!(sent.starts_with("POST /images HTTP/1.0\r\n"), "{sent}");
        assert!(sent.ends_with(&body.to_string()), "{sent}");
    }

    #[test]
    fn an_error_answer_gives_the_daemons_message() {
        let (_d, sock, _h) = one_answer(
            b"HTTP/1.1 404 Not Found\r\n\r\n{\"error\":\"/mnt/x is not bound by the daemon\"}",
        );
        let e = request(&sock, "DELETE", "/mounts", None, Duration::from_secs(5)).unwrap_err();
        assert!(
            matches!(e, ClientError::Refused { status: 404, .. }),
            "{e:?}"
        );
        assert!(
            e.to_string()
                .ends_with(": /mnt/x is not bound by the daemon"),
            "{e}"
        );
    }

    #[test]
    fn garbage_and_silence_are_errors_naming_the_socket() {
        let (_d, sock, _h) = one_answer(b"\x00\x01garbage\r\n\r\nbody");
        let e = request(&sock, "GET", "/status", None, Duration::from_secs(5)).unwrap_err();
        assert!(matches!(e, ClientError::Garbled { .. }), "{e:?}");
        assert!(e.to_string().contains(&sock.display().to_string()), "{e}");

        let dir = tempfile::tempdir().unwrap();
        let silent = dir.path().join("s.sock");
        let _l = UnixListener::bind(&silent).unwrap();
        let e = request(&silent, "GET", "/status", None, Duration::from_millis(100)).unwrap_err();
        assert!(matches!(e, ClientError::Io { .. }), "{e:?}");

        let e = request(
            &dir.path().join("none.sock"),
            "GET",
            "/status",
            None,
            Duration::from_secs(1),
        )
        .unwrap_err();
        assert!(matches!(e, ClientError::Connect { .. }), "{e:?}");
        assert!(e.to_string().contains("is `smr daemon` running?"), "{e}");
    }
}
