//! Fuzzing the NBD server's connection handler over an in-memory duplex:
//! random bytes, and random mutations of valid handshakes and request
//! streams. The rule: errors and hang-ups are fine; panics, hangs and
//! allocations sized by untrusted lengths are bugs.
//!
//! This is its own test binary because it installs a counting global
//! allocator that records the largest single allocation.

// The counting allocator must implement the unsafe `GlobalAlloc` trait; it
// only forwards to `System`.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use proptest::prelude::*;
use proptest::sample::Index;
use smr_node::nbd::proto::*;
use smr_node::nbd::{BlockDevice, Export, NbdServer, ServerConfig};
use tokio::io::AsyncWriteExt;

struct Counting;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every method forwards to `System` with the caller's arguments
// unchanged; the only addition is an atomic max of the requested size.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LARGEST.fetch_max(l.size(), Ordering::Relaxed);
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc(l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        LARGEST.fetch_max(l.size(), Ordering::Relaxed);
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LARGEST.fetch_max(new, Ordering::Relaxed);
        // SAFETY: same contract as our caller's.
        unsafe { System.realloc(p, l, new) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: same contract as our caller's.
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const RO_SIZE: u64 = 1 << 20;
const RW_SIZE: u64 = 256 << 10;
/// Largest legitimate allocation: one read of the whole 1 MiB export, plus
/// slack for the test's own buffers. Anything sized by a hostile length
/// (up to 4 GiB) blows through this.
const ALLOC_LIMIT: usize = (RO_SIZE as usize) + (128 << 10);

/// A small device: pattern data, [256 KiB, 512 KiB) a hole.
struct Dev {
    data: Mutex<Vec<u8>>,
    writable: bool,
}

impl BlockDevice for Dev {
    fn size(&self) -> u64 {
        self.data.lock().map(|d| d.len() as u64).unwrap_or(0)
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        if offset == 777 {
            return Err(io::Error::other("fuzz: broken chunk at 777"));
        }
        let d = self.data.lock().map_err(|_| io::Error::other("poisoned"))?;
        buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn block_status(&self, offset: u64, len: u64) -> io::Result<Vec<(u64, bool)>> {
        let (hs, he) = (256 << 10, 512 << 10);
        let end = offset + len;
        let mut runs = Vec::new();
        let mut at = offset;
        for (s, e, hole) in [(0, hs, false), (hs, he, true), (he, u64::MAX, false)] {
            let (a, b) = (at.max(s), end.min(e));
            if a < b {
                runs.push((b - a, hole));
                at = b;
            }
        }
        Ok(runs)
    }
    fn read_only(&self) -> bool {
        !self.writable
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut d = self.data.lock().map_err(|_| io::Error::other("poisoned"))?;
        d[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        Ok(())
    }
}

struct Fixture {
    rt: tokio::runtime::Runtime,
    server: NbdServer,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let mut ro: Vec<u8> = (0..RO_SIZE).map(|i| (i * 7 + i / 4096) as u8).collect();
        ro[256 << 10..512 << 10].fill(0);
        let ro = Dev {
            data: Mutex::new(ro),
            writable: false,
        };
        let rw = Dev {
            data: Mutex::new(vec![1; RW_SIZE as usize]),
            writable: true,
        };
        let exports = vec![
            Export::new("ro", Arc::new(ro)).with_description("read-only"),
            Export::new("rw", Arc::new(rw)),
        ];
        let config = ServerConfig {
            handshake_timeout: Duration::from_secs(5),
            ..ServerConfig::default()
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        Fixture {
            rt,
            server: NbdServer::with_config(exports, config).expect("server"),
        }
    })
}

/// Feed `input` as a client, drain the server's output, and check the
/// rules. Returns the number of bytes the server sent.
fn run_case(input: &[u8]) -> Result<u64, TestCaseError> {
    let f = fixture();
    let server = f.server.clone();
    let input = input.to_vec();
    let sent = f.rt.block_on(async move {
        let (client, server_io) = tokio::io::duplex(64 << 10);
        let conn = tokio::spawn(async move { server.serve_connection(server_io).await });
        let (mut rd, mut wr) = tokio::io::split(client);
        let write = async move {
            // The server may hang up early: write errors are expected.
            let _ = wr.write_all(&input).await;
            let _ = wr.shutdown().await;
        };
        let read = async move {
            tokio::io::copy(&mut rd, &mut tokio::io::sink())
                .await
                .unwrap_or(0)
        };
        let both = tokio::time::timeout(Duration::from_secs(20), async {
            tokio::join!(write, read).1
        });
        let sent = both
            .await
            .map_err(|_| TestCaseError::fail("client side hung"))?;
        match tokio::time::timeout(Duration::from_secs(20), conn).await {
            Err(_) => Err(TestCaseError::fail("connection handler hung")),
            Ok(Err(e)) if e.is_panic() => {
                Err(TestCaseError::fail(format!("handler panicked: {e}")))
            }
            Ok(_) => Ok(sent),
        }
    })?;
    let largest = LARGEST.load(Ordering::Relaxed);
    prop_assert!(largest <= ALLOC_LIMIT, "allocation of {largest} bytes");
    Ok(sent)
}

fn option(o: u32, data: &[u8]) -> Vec<u8> {
    let mut v = IHAVEOPT.to_be_bytes().to_vec();
    v.extend_from_slice(&o.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

fn name_prefixed(name: &str) -> Vec<u8> {
    let mut v = (name.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(name.as_bytes());
    v
}

/// A well-formed negotiation ending in GO (or EXPORT_NAME).
fn handshake(structured: bool, export: &str, export_name_opt: bool) -> Vec<u8> {
    let mut v = (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
        .to_be_bytes()
        .to_vec();
    v.extend(option(OPT_LIST, &[]));
    let mut info = name_prefixed(export);
    info.extend_from_slice(&3u16.to_be_bytes());
    for i in [INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE] {
        info.extend_from_slice(&i.to_be_bytes());
    }
    v.extend(option(OPT_INFO, &info));
    if structured {
        v.extend(option(OPT_STRUCTURED_REPLY, &[]));
        let mut list = name_prefixed(export);
        list.extend_from_slice(&0u32.to_be_bytes());
        v.extend(option(OPT_LIST_META_CONTEXT, &list));
        let mut set = name_prefixed(export);
        set.extend_from_slice(&1u32.to_be_bytes());
        set.extend(name_prefixed("base:allocation"));
        v.extend(option(OPT_SET_META_CONTEXT, &set));
    }
    if export_name_opt {
        v.extend(option(OPT_EXPORT_NAME, export.as_bytes()));
    } else {
        let mut go = name_prefixed(export);
        go.extend_from_slice(&0u16.to_be_bytes());
        v.extend(option(OPT_GO, &go));
    }
    v
}

/// One request: (kind, flags, offset, len); WRITE gets up to 8 KiB payload.
fn request_strategy() -> impl Strategy<Value = (u16, u16, u64, u32)> {
    let kind = prop_oneof![
        4 => Just(CMD_READ),
        2 => Just(CMD_BLOCK_STATUS),
        1 => Just(CMD_WRITE),
        1 => Just(CMD_CACHE),
        1 => Just(CMD_FLUSH),
        1 => Just(CMD_TRIM),
        1 => 0u16..12,
    ];
    let flags = prop_oneof![4 => Just(0u16), 1 => Just(CMD_FLAG_DF), 1 => Just(CMD_FLAG_REQ_ONE), 1 => any::<u16>()];
    let offset = prop_oneof![4 => 0u64..RO_SIZE, 1 => any::<u64>()];
    let len = prop_oneof![4 => 1u32..65536, 1 => 0u32..(2 << 20), 1 => any::<u32>()];
    (kind, flags, offset, len)
}

fn requests(reqs: &[(u16, u16, u64, u32)], disc: bool) -> Vec<u8> {
    let mut v = Vec::new();
    for (i, &(kind, flags, offset, len)) in reqs.iter().enumerate() {
        v.extend_from_slice(
            &Request {
                flags,
                kind,
                cookie: i as u64,
                offset,
                len,
            }
            .encode(),
        );
        if kind == CMD_WRITE {
            v.resize(v.len() + (len as usize).min(8192), 0x5a);
        }
    }
    if disc {
        v.extend_from_slice(
            &Request {
                flags: 0,
                kind: CMD_DISC,
                cookie: 0,
                offset: 0,
                len: 0,
            }
            .encode(),
        );
    }
    v
}

/// Apply byte overwrites, 32-bit "length" overwrites and a truncation.
fn mutate(
    mut v: Vec<u8>,
    from: usize,
    bytes: &[(Index, u8)],
    words: &[(Index, u32)],
    cut: Option<Index>,
) -> Vec<u8> {
    let span = v.len().saturating_sub(from);
    if span == 0 {
        return v;
    }
    for (i, b) in bytes {
        let at = from + i.index(span);
        v[at] = *b;
    }
    for (i, w) in words {
        let at = from + i.index(span);
        for (k, b) in w.to_be_bytes().into_iter().enumerate() {
            if let Some(x) = v.get_mut(at + k) {
                *x = b;
            }
        }
    }
    if let Some(c) = cut {
        v.truncate(from + c.index(span));
    }
    v
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1500, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes(tail in proptest::collection::vec(any::<u8>(), 0..4096), greet in any::<bool>()) {
        // Half the cases start with valid client flags, to reach option parsing.
        let mut input = if greet { FLAG_C_FIXED_NEWSTYLE.to_be_bytes().to_vec() } else { Vec::new() };
        input.extend(tail);
        run_case(&input)?;
    }

    #[test]
    fn mutated_handshakes(structured in any::<bool>(), rw in any::<bool>(), export_name in any::<bool>(),
                          reqs in proptest::collection::vec(request_strategy(), 0..4),
                          bytes in proptest::collection::vec((any::<Index>(), any::<u8>()), 0..6),
                          words in proptest::collection::vec((any::<Index>(), any::<u32>()), 0..3),
                          cut in proptest::option::of(any::<Index>())) {
        let mut v = handshake(structured, if rw { "rw" } else { "ro" }, export_name);
        v.extend(requests(&reqs, true));
        run_case(&mutate(v, 0, &bytes, &words, cut))?;
    }

    #[test]
    fn mutated_request_streams(structured in any::<bool>(), rw in any::<bool>(),
                               reqs in proptest::collection::vec(request_strategy(), 1..24),
                               disc in any::<bool>(),
                               bytes in proptest::collection::vec((any::<Index>(), any::<u8>()), 0..6),
                               words in proptest::collection::vec((any::<Index>(), any::<u32>()), 0..3),
                               cut in proptest::option::of(any::<Index>())) {
        let mut v = handshake(structured, if rw { "rw" } else { "" }, false);
        let from = v.len();
        v.extend(requests(&reqs, disc));
        run_case(&mutate(v, from, &bytes, &words, cut))?;
    }
}

/// Unmutated streams must get real answers (guards against a harness that
/// passes because the server rejects everything).
#[test]
fn valid_stream_gets_replies() {
    let mut v = handshake(true, "ro", false);
    let reqs = [
        (CMD_READ, 0, 0, 65536),
        (CMD_BLOCK_STATUS, 0, 0, RO_SIZE as u32),
        (CMD_READ, 0, 300 << 10, 4096),
    ];
    v.extend(requests(&reqs, true));
    let sent = run_case(&v).expect("case runs");
    assert!(sent > 65536 + 100, "server answered only {sent} bytes");
}
