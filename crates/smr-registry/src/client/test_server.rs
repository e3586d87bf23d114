//! Test-only: a bare HTTP server on 127.0.0.1 for the client's own
//! requests (redirects), where the real registry cannot be
//! made to misbehave.

use super::core::Core;
use super::options::RegistryOptions;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::Arc;

/// Answers each connection's first request with `answer(path)` (the raw
/// response, given `Connection: close`), and sends each connection's first bytes to the returned
/// channel. Returns `host:port`.
pub fn serve(answer: impl Fn(&str) -> Vec<u8> + Send + 'static) -> (String, Receiver<Vec<u8>>) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr").to_string();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            let mut buf = vec![0u8; 4096];
            let n = s.read(&mut buf).unwrap_or(0);
            buf.truncate(n);
            let req = String::from_utf8_lossy(&buf).to_string();
            let path = req.split(' ').nth(1).unwrap_or("").to_string();
            let _ = tx.send(buf);
            let _ = s.write_all(&closing(answer(&path)));
        }
    });
    (addr, rx)
}

/// Answers every request on every connection with `200 OK` and `body`
/// after `delay` (so that requests sent together overlap), keeping
/// connections open (HTTP/1.1 keep-alive). Returns `host:port`, the
/// connections accepted and the requests answered so far.
pub fn serve_keep_alive(
    body: &'static str,
    delay: std::time::Duration,
) -> (String, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr").to_string();
    let (accepted, answered) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (acc, ans) = (accepted.clone(), answered.clone());
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            acc.fetch_add(1, Ordering::SeqCst);
            let ans = ans.clone();
            std::thread::spawn(move || {
                let mut pending = Vec::new();
                let mut buf = [0u8; 4096];
                while let Ok(n @ 1..) = s.read(&mut buf) {
                    pending.extend_from_slice(&buf[..n]);
                    // Requests without bodies: each ends at a blank line.
                    while let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                        pending.drain(..end + 4);
                        std::thread::sleep(delay);
                        let reply = format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        if s.write_all(reply.as_bytes()).is_err() {
                            return;
                        }
                        ans.fetch_add(1, Ordering::SeqCst);
                    }
                }
            });
        }
    });
    (addr, accepted, answered)
}

/// `response` with `Connection: close` after its status line: each
/// connection answers one request, and says so (else the client may send
/// the next one on it and see it closed).
fn closing(response: Vec<u8>) -> Vec<u8> {
    match response.windows(2).position(|w| w == b"\r\n") {
        Some(at) => [
            &response[..at + 2],
            b"Connection: close\r\n",
            &response[at + 2..],
        ]
        .concat(),
        None => response,
    }
}

/// A client of the registry at `addr` (plain HTTP: a loopback address).
pub fn core_for(addr: &str) -> Arc<Core> {
    let opts = RegistryOptions::default();
    let auth = super::auth::resolve(addr, &opts).expect("auth");
    Arc::new(Core::new(addr, auth, &opts).expect("client"))
}
