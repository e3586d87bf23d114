//! Hostile and unusual clients: the server answers with errors or hangs up,
//! never panics, and keeps serving everyone else.

use std::time::Instant;

use super::raw::{Raw, Reply};
use super::*;
use crate::nbd::proto::*;

/// After each abuse, a well-behaved client must still get correct data.
fn still_serves(addr: &str, dev: &MemDevice) {
    let mut c = Raw::go(addr, false);
    let got = c.read(99, 4096, 8192).expect("healthy read");
    assert!(got == dev.bytes()[4096..4096 + 8192]);
}

#[test]
fn bad_magic_gets_disconnected() {
    let (e, dev) = export("root", std_device());
    let srv = serve_tcp(vec![e]);
    // Bad option magic.
    let mut c = Raw::connect(&srv.addr);
    c.send(&FLAG_C_FIXED_NEWSTYLE.to_be_bytes());
    c.send(&[0xde; 16]);
    c.expect_closed();
    // Unknown client flags.
    let mut c = Raw::connect(&srv.addr);
    c.send(&0x8000_0000u32.to_be_bytes());
    c.expect_closed();
    // Bad request magic in transmission.
    let mut c = Raw::go(&srv.addr, false);
    c.send(&[0x55; REQUEST_LEN]);
    c.expect_closed();
    still_serves(&srv.addr, &dev);
    srv.stop();
}

#[test]
fn bad_lengths_offsets_and_commands_get_error_codes_on_one_connection() {
    let (e, dev) = export("root", std_device());
    let size = dev.size();
    let srv = serve_tcp(vec![e]);
    let mut c = Raw::go(&srv.addr, false);
    assert_eq!(c.read(1, 0, 0), Err(EINVAL));
    assert_eq!(c.read(2, 0, MAX_BLOCK_SIZE + 1), Err(EOVERFLOW));
    assert_eq!(c.read(3, 0, u32::MAX), Err(EOVERFLOW));
    assert_eq!(c.read(4, size, 1), Err(EINVAL));
    assert_eq!(c.read(5, size - 4096, 8192), Err(EINVAL));
    assert_eq!(c.read(6, u64::MAX - 10, 4096), Err(EINVAL));
    for (cookie, kind) in [(7, 42u16), (8, 0xffff), (9, 8)] {
        c.request(kind, 0, cookie, 0, 512);
        assert_eq!(
            c.reply(),
            Reply::Simple {
                cookie,
                error: EINVAL
            }
        );
    }
    // Unknown command flag on READ.
    c.request(CMD_READ, 1 << 12, 10, 0, 512);
    assert_eq!(
        c.reply(),
        Reply::Simple {
            cookie: 10,
            error: EINVAL
        }
    );
    // Block status without structured replies / meta context.
    c.request(CMD_BLOCK_STATUS, 0, 11, 0, 512);
    assert_eq!(
        c.reply(),
        Reply::Simple {
            cookie: 11,
            error: EINVAL
        }
    );
    // CACHE out of range, then in range (reaches the device).
    c.request(CMD_CACHE, 0, 12, size, 4096);
    assert_eq!(
        c.reply(),
        Reply::Simple {
            cookie: 12,
            error: EINVAL
        }
    );
    c.request(CMD_CACHE, 0, 13, 0, 65536);
    assert_eq!(
        c.reply(),
        Reply::Simple {
            cookie: 13,
            error: 0
        }
    );
    assert_eq!(dev.prefetched.load(Ordering::Relaxed), 65536);
    c.request(CMD_FLUSH, 0, 14, 0, 0);
    assert_eq!(
        c.reply(),
        Reply::Simple {
            cookie: 14,
            error: 0
        }
    );
    // The stream is still in sync.
    let got = c.read(15, size - 100, 100).expect("tail read");
    assert!(got == dev.bytes()[(size - 100) as usize..]);
    still_serves(&srv.addr, &dev);
    srv.stop();
}

#[test]
fn writes_to_read_only_export_get_eperm_and_stream_stays_in_sync() {
    let (e, dev) = export("root", std_device());
    let srv = serve_tcp(vec![e]);
    let mut c = Raw::go(&srv.addr, false);
    c.request(CMD_WRITE, 0, 1, 0, 4096);
    // A payload that looks like a request: if the server did not skip it,
    // it would read this as a READ and answer cookie 666.
    let mut payload = Request {
        flags: 0,
        kind: CMD_READ,
        cookie: 666,
        offset: 0,
        len: 16,
    }
    .encode()
    .to_vec();
    payload.resize(4096, 0xab);
    c.send(&payload);
    assert_eq!(
        c.reply(),
        Reply::Simple {
            cookie: 1,
            error: EPERM
        }
    );
    c.request(CMD_TRIM, 0, 2, 0, 4096);
    assert_eq!(
        c.reply(),
        Reply::Simple {
            cookie: 2,
            error: EPERM
        }
    );
    c.request(CMD_WRITE_ZEROES, 0, 3, 0, 4096);
    assert_eq!(
        c.reply(),
        Reply::Simple {
            cookie: 3,
            error: EPERM
        }
    );
    let got = c.read(4, 0, 4096).expect("read after write");
    assert!(
        got == dev.bytes()[..4096],
        "device unchanged, stream in sync"
    );
    // A write payload beyond the maximum is not skipped: hang up.
    c.request(CMD_WRITE, 0, 5, 0, u32::MAX);
    c.expect_closed();
    still_serves(&srv.addr, &dev);
    srv.stop();
}

#[test]
fn writable_export_accepts_writes() {
    let (e, dev) = export("rw", MemDevice::new(MIB, &[]).writable());
    let srv = serve_tcp(vec![e]);
    let mut c = Raw::go(&srv.addr, false);
    c.request(CMD_WRITE, 0, 1, 8192, 5);
    c.send(b"hello");
    assert_eq!(
        c.reply(),
        Reply::Simple {
            cookie: 1,
            error: 0
        }
    );
    c.request(CMD_WRITE, 0, 2, MIB - 2, 5);
    c.send(b"world");
    assert_eq!(
        c.reply(),
        Reply::Simple {
            cookie: 2,
            error: ENOSPC
        }
    );
    assert_eq!(c.read(3, 8192, 5), Ok(b"hello".to_vec()));
    assert_eq!(&dev.bytes()[8192..8197], b"hello");
    srv.stop();
}

#[test]
fn huge_or_unknown_options_and_truncated_requests() {
    let (e, dev) = export("root", std_device());
    let srv = serve_tcp(vec![e]);
    // Unknown option and STARTTLS are refused, negotiation continues.
    let mut c = Raw::connect(&srv.addr);
    c.send(&FLAG_C_FIXED_NEWSTYLE.to_be_bytes());
    c.option(4242, b"junk");
    assert_eq!(c.option_reply().1, REP_ERR_UNSUP);
    c.option(OPT_STARTTLS, &[]);
    assert_eq!(c.option_reply().1, REP_ERR_POLICY);
    c.option(OPT_LIST, b"x");
    assert_eq!(c.option_reply().1, REP_ERR_INVALID);
    c.option(OPT_GO, &[0, 0, 0, 9, b'x']);
    assert_eq!(c.option_reply().1, REP_ERR_INVALID);
    let mut go_missing = 4u32.to_be_bytes().to_vec();
    go_missing.extend_from_slice(b"nope\0\0");
    c.option(OPT_GO, &go_missing);
    assert_eq!(c.option_reply().1, REP_ERR_UNKNOWN);
    // Meta context before structured replies is invalid.
    c.option(OPT_SET_META_CONTEXT, &[0; 8]);
    assert_eq!(c.option_reply().1, REP_ERR_INVALID);
    // 4 GiB of option data announced: refused without reading it.
    let mut h = IHAVEOPT.to_be_bytes().to_vec();
    h.extend_from_slice(&OPT_INFO.to_be_bytes());
    h.extend_from_slice(&u32::MAX.to_be_bytes());
    c.send(&h);
    assert_eq!(c.option_reply().1, REP_ERR_TOO_BIG);
    c.expect_closed();
    // Unknown export via EXPORT_NAME: hang up (no error reply exists).
    let mut c = Raw::connect(&srv.addr);
    c.send(&FLAG_C_FIXED_NEWSTYLE.to_be_bytes());
    c.option(OPT_EXPORT_NAME, b"nope");
    c.expect_closed();
    // Truncated request, then gone.
    let mut c = Raw::go(&srv.addr, false);
    c.send(
        &Request {
            flags: 0,
            kind: CMD_READ,
            cookie: 1,
            offset: 0,
            len: 4096,
        }
        .encode()[..14],
    );
    drop(c);
    // Truncated write payload, then gone.
    let mut c = Raw::go(&srv.addr, false);
    c.request(CMD_WRITE, 0, 1, 0, 4096);
    c.send(&[1; 100]);
    drop(c);
    // Truncated handshake, then gone.
    let c = Raw::connect(&srv.addr);
    drop(c);
    still_serves(&srv.addr, &dev);
    srv.stop();
}

#[test]
fn export_name_option_without_zeroes() {
    let (e, dev) = export("root", std_device());
    let srv = serve_tcp(vec![e]);
    for no_zeroes in [false, true] {
        let mut c = Raw::connect(&srv.addr);
        let flags = FLAG_C_FIXED_NEWSTYLE | if no_zeroes { FLAG_C_NO_ZEROES } else { 0 };
        c.send(&flags.to_be_bytes());
        c.option(OPT_EXPORT_NAME, b"root");
        let head = c.read_exact(if no_zeroes { 10 } else { 134 });
        assert_eq!(
            u64::from_be_bytes(head[..8].try_into().expect("8")),
            dev.size()
        );
        let tflags = u16::from_be_bytes([head[8], head[9]]);
        assert_eq!(
            tflags & (TFLAG_READ_ONLY | TFLAG_CAN_MULTI_CONN),
            TFLAG_READ_ONLY | TFLAG_CAN_MULTI_CONN
        );
        assert!(head[10..].iter().all(|&b| b == 0));
        assert!(c.read(1, 0, 512).is_ok());
    }
    srv.stop();
}

#[test]
fn structured_reads_use_hole_chunks_and_errors_are_chunks() {
    let (e, dev) = export("root", std_device().failing(3 * MIB + 65536, 4096));
    let srv = serve_tcp(vec![e]);
    let mut c = Raw::go(&srv.addr, true);
    // [MIB - 4096, MIB + 4096): data then hole.
    c.request(CMD_READ, 0, 1, MIB - 4096, 8192);
    let first = c.reply();
    let second = c.reply();
    let Reply::Chunk {
        flags: 0,
        kind: REPLY_TYPE_OFFSET_DATA,
        cookie: 1,
        payload,
    } = first
    else {
        panic!("{first:?}")
    };
    assert_eq!(
        u64::from_be_bytes(payload[..8].try_into().expect("8")),
        MIB - 4096
    );
    assert!(payload[8..] == dev.bytes()[(MIB - 4096) as usize..MIB as usize]);
    let mut hole = MIB.to_be_bytes().to_vec();
    hole.extend_from_slice(&4096u32.to_be_bytes());
    assert_eq!(
        second,
        Reply::Chunk {
            flags: REPLY_FLAG_DONE,
            kind: REPLY_TYPE_OFFSET_HOLE,
            cookie: 1,
            payload: hole
        }
    );
    // DF: one data chunk, zeroes inline.
    c.request(CMD_READ, CMD_FLAG_DF, 2, MIB - 4096, 8192);
    match c.reply() {
        Reply::Chunk {
            flags: REPLY_FLAG_DONE,
            kind: REPLY_TYPE_OFFSET_DATA,
            cookie: 2,
            payload,
        } => {
            assert_eq!(payload.len(), 8 + 8192);
        }
        r => panic!("{r:?}"),
    }
    // Read error: one final error chunk with EIO.
    c.request(CMD_READ, 0, 3, 3 * MIB + 65536, 4096);
    match c.reply() {
        Reply::Chunk {
            flags: REPLY_FLAG_DONE,
            kind: REPLY_TYPE_ERROR,
            cookie: 3,
            payload,
        } => {
            assert_eq!(u32::from_be_bytes(payload[..4].try_into().expect("4")), EIO);
        }
        r => panic!("{r:?}"),
    }
    // Early refusal of a read is a structured error too.
    c.request(CMD_READ, 0, 4, 0, 0);
    assert!(matches!(
        c.reply(),
        Reply::Chunk {
            kind: REPLY_TYPE_ERROR,
            cookie: 4,
            ..
        }
    ));
    // Block status with REQ_ONE: exactly one descriptor.
    c.request(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 5, MIB - 4096, 8192);
    let mut want = BASE_ALLOCATION_ID.to_be_bytes().to_vec();
    want.extend_from_slice(&4096u32.to_be_bytes());
    want.extend_from_slice(&0u32.to_be_bytes());
    assert_eq!(
        c.reply(),
        Reply::Chunk {
            flags: REPLY_FLAG_DONE,
            kind: REPLY_TYPE_BLOCK_STATUS,
            cookie: 5,
            payload: want
        }
    );
    srv.stop();
}

#[test]
fn replies_come_out_of_order_when_a_read_is_slow() {
    let (e, dev) = export("root", std_device().slow_at(0, Duration::from_millis(500)));
    let srv = serve_tcp(vec![e]);
    let mut c = Raw::go(&srv.addr, false);
    let start = Instant::now();
    c.request(CMD_READ, 0, 1, 0, 4096);
    for cookie in 2..10u64 {
        c.request(CMD_READ, 0, cookie, cookie * 4096, 4096);
    }
    let mut order = Vec::new();
    for _ in 1..10 {
        let Reply::Simple { cookie, error: 0 } = c.reply() else {
            panic!("read failed")
        };
        let data = c.read_exact(4096);
        let at = if cookie == 1 {
            0
        } else {
            cookie as usize * 4096
        };
        assert!(data == dev.bytes()[at..at + 4096], "cookie {cookie} data");
        order.push(cookie);
    }
    assert_eq!(order.last(), Some(&1), "slow read answered last: {order:?}");
    assert!(start.elapsed() < Duration::from_secs(5));
    srv.stop();
}

#[test]
fn slow_handshake_times_out_and_stop_ends_open_connections() {
    let (e, dev) = export("root", std_device());
    let config = ServerConfig {
        handshake_timeout: Duration::from_millis(300),
        ..ServerConfig::default()
    };
    let srv = serve_tcp_with(vec![e], config);
    let mut idle = Raw::connect(&srv.addr);
    let start = Instant::now();
    idle.expect_closed();
    assert!(start.elapsed() < Duration::from_secs(5));
    let mut open = Raw::go(&srv.addr, false);
    assert!(open.read(1, 0, 512).is_ok());
    still_serves(&srv.addr, &dev);
    let start = Instant::now();
    srv.stop();
    open.expect_closed();
    assert!(start.elapsed() < Duration::from_secs(5));
}

/// Whether a new TCP client at `addr` is closed before any greeting.
fn refused(addr: &str) -> bool {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut b = [0u8; 18];
    matches!(s.read(&mut b), Ok(0) | Err(_))
}

#[test]
fn idle_connections_cannot_lock_out_new_clients() {
    let (e, dev) = export("root", std_device());
    let config = ServerConfig {
        max_connections_per_address: 3,
        evict_idle_after: Duration::from_millis(300),
        ..ServerConfig::default()
    };
    let srv = serve_tcp_with(vec![e], config);
    // A client holding every slot of its address, idle after the handshake.
    let mut idle: Vec<Raw> = (0..3).map(|_| Raw::go(&srv.addr, false)).collect();
    assert!(
        refused(&srv.addr),
        "over the limit while the others are fresh"
    );
    std::thread::sleep(Duration::from_millis(400));
    // Now the longest-idle one gives way, and the newcomer is served.
    let mut fresh = Raw::go(&srv.addr, false);
    let got = fresh.read(1, 4096, 4096).expect("served");
    assert!(got == dev.bytes()[4096..8192]);
    idle[0].expect_closed();
    // The others were not closed: they still answer.
    for (i, c) in idle.iter_mut().enumerate().skip(1) {
        assert!(c.read(i as u64, 0, 512).is_ok(), "connection {i} kept");
    }
    srv.stop();
}

#[test]
fn an_idle_timeout_closes_idle_connections_but_not_busy_ones() {
    let (e, dev) = export("root", std_device().slow_at(0, Duration::from_millis(600)));
    let config = ServerConfig {
        idle_timeout: Some(Duration::from_millis(200)),
        ..ServerConfig::default()
    };
    let srv = serve_tcp_with(vec![e], config);
    let mut idle = Raw::go(&srv.addr, false);
    let start = Instant::now();
    idle.expect_closed();
    assert!(start.elapsed() < Duration::from_secs(5));
    // A request slower than the timeout is answered: busy is not idle.
    let mut busy = Raw::go(&srv.addr, false);
    let got = busy.read(1, 0, 4096).expect("slow read answered");
    assert!(got == dev.bytes()[..4096]);
    srv.stop();
}
