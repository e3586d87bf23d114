//! Tests of the NBD server: real clients (libnbd's nbdinfo/nbdcopy, qemu-img)
//! and hand-written hostile clients.
//!
//! The real-client tests need `nbdinfo`, `nbdcopy` (Debian: libnbd-bin) and
//! `qemu-img` (qemu-utils) on PATH.

use std::io;
use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{BlockDevice, Export, NbdServer, ServerConfig, ServerHandle};

mod clients;
mod hostile;
mod raw;

const MIB: u64 = 1 << 20;

/// An in-memory device: deterministic pseudo-random data with some zeroed
/// ranges reported as holes, optional failing and slow ranges.
pub(crate) struct MemDevice {
    data: Mutex<Vec<u8>>,
    holes: Vec<(u64, u64)>,
    /// Reads overlapping this range fail with EIO.
    fail: Option<(u64, u64)>,
    /// Reads starting at this offset sleep first.
    slow: Option<(u64, Duration)>,
    writable: bool,
    pub prefetched: AtomicU64,
}

fn overlaps(a: (u64, u64), off: u64, len: u64) -> bool {
    off < a.0 + a.1 && a.0 < off + len
}

impl MemDevice {
    /// `size` bytes of pattern data; `holes` (offset, len) zeroed.
    pub fn new(size: u64, holes: &[(u64, u64)]) -> Self {
        let mut data = Vec::with_capacity(size as usize);
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        while (data.len() as u64) < size {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            data.extend_from_slice(&x.to_le_bytes());
        }
        data.truncate(size as usize);
        for &(o, l) in holes {
            data[o as usize..(o + l) as usize].fill(0);
        }
        Self {
            data: Mutex::new(data),
            holes: holes.to_vec(),
            fail: None,
            slow: None,
            writable: false,
            prefetched: AtomicU64::new(0),
        }
    }

    pub fn failing(mut self, off: u64, len: u64) -> Self {
        self.fail = Some((off, len));
        self
    }

    pub fn slow_at(mut self, off: u64, delay: Duration) -> Self {
        self.slow = Some((off, delay));
        self
    }

    pub fn writable(mut self) -> Self {
        self.writable = true;
        self
    }

    pub fn bytes(&self) -> Vec<u8> {
        self.data.lock().expect("lock").clone()
    }
}

impl BlockDevice for MemDevice {
    fn size(&self) -> u64 {
        self.data.lock().expect("lock").len() as u64
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        if let Some((o, d)) = self.slow {
            if o == offset {
                std::thread::sleep(d);
            }
        }
        if let Some(f) = self.fail {
            if overlaps(f, offset, buf.len() as u64) {
                return Err(io::Error::other(format!("test chunk at {} is broken", f.0)));
            }
        }
        let data = self.data.lock().expect("lock");
        let o = offset as usize;
        buf.copy_from_slice(&data[o..o + buf.len()]);
        Ok(())
    }

    fn block_status(&self, offset: u64, len: u64) -> io::Result<Vec<(u64, bool)>> {
        let end = offset + len;
        let mut runs = Vec::new();
        let mut at = offset;
        let mut holes = self.holes.clone();
        holes.sort_unstable();
        for (o, l) in holes {
            let (hs, he) = (o.max(at), (o + l).min(end));
            if hs >= he {
                continue;
            }
            if hs > at {
                runs.push((hs - at, false));
            }
            runs.push((he - hs, true));
            at = he;
        }
        if at < end {
            runs.push((end - at, false));
        }
        Ok(runs)
    }

    fn prefetch(&self, _offset: u64, len: u64) -> io::Result<()> {
        self.prefetched.fetch_add(len, Ordering::Relaxed);
        Ok(())
    }

    fn read_only(&self) -> bool {
        !self.writable
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut d = self.data.lock().expect("lock");
        d[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        Ok(())
    }
}

/// The standard test device: 4 MiB + 12 KiB, holes at [1 MiB, 2 MiB) and
/// [3 MiB + 4 KiB, 3 MiB + 12 KiB); [2 MiB, 2 MiB + 64 KiB) is zero data.
pub(crate) fn std_device() -> MemDevice {
    let d = MemDevice::new(4 * MIB + 12288, &[(MIB, MIB), (3 * MIB + 4096, 8192)]);
    d.data.lock().expect("lock")[2 * MIB as usize..(2 * MIB + 65536) as usize].fill(0);
    d
}

/// A running server and how to reach it.
pub(crate) struct Running {
    pub handle: Option<ServerHandle>,
    pub addr: String,
    pub uri: String,
    _dir: Option<tempfile::TempDir>,
}

impl Running {
    pub fn stop(mut self) {
        if let Some(h) = self.handle.take() {
            h.stop().expect("server stops cleanly");
        }
    }
}

pub(crate) fn serve_tcp(exports: Vec<Export>) -> Running {
    serve_tcp_with(exports, ServerConfig::default())
}

pub(crate) fn serve_tcp_with(exports: Vec<Export>, config: ServerConfig) -> Running {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let server = NbdServer::with_config(exports, config).expect("server");
    let handle = server.spawn_tcp(listener).expect("spawn");
    Running {
        handle: Some(handle),
        uri: format!("nbd://{addr}"),
        addr,
        _dir: None,
    }
}

pub(crate) fn serve_unix(exports: Vec<Export>) -> Running {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("nbd.sock");
    let listener = UnixListener::bind(&path).expect("bind unix");
    let server = NbdServer::new(exports).expect("server");
    let handle = server.spawn_unix(listener).expect("spawn");
    Running {
        handle: Some(handle),
        uri: format!("nbd+unix:///?socket={}", path.display()),
        addr: String::new(),
        _dir: Some(dir),
    }
}

pub(crate) fn export(name: &str, dev: MemDevice) -> (Export, Arc<MemDevice>) {
    let dev = Arc::new(dev);
    (
        Export::new(name, dev.clone()).with_description(format!("test export {name}")),
        dev,
    )
}

/// Run an external tool with a hard time limit.
pub(crate) fn run(tool: &str, args: &[&str]) -> Output {
    let out = Command::new("timeout")
        .arg("120")
        .arg(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {tool} (is it installed?): {e}"));
    assert_ne!(out.status.code(), Some(124), "{tool} {args:?} timed out");
    out
}

/// Run a tool that must succeed; returns stdout.
pub(crate) fn run_ok(tool: &str, args: &[&str]) -> String {
    let out = run(tool, args);
    assert!(
        out.status.success(),
        "{tool} {args:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub(crate) fn read_file(p: &Path) -> Vec<u8> {
    std::fs::read(p).expect("read output")
}
