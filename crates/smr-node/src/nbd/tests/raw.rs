//! A minimal blocking NBD client speaking raw bytes, for hostile tests.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use crate::nbd::proto::*;

pub(crate) struct Raw {
    pub s: TcpStream,
}

/// A transmission reply as seen on the wire.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Reply {
    Simple {
        cookie: u64,
        error: u32,
    },
    Chunk {
        flags: u16,
        kind: u16,
        cookie: u64,
        payload: Vec<u8>,
    },
}

impl Raw {
    /// Connect and read the greeting.
    pub fn connect(addr: &str) -> Self {
        let s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        let mut r = Self { s };
        let mut g = [0u8; 18];
        r.s.read_exact(&mut g).expect("greeting");
        assert_eq!(&g[..8], &NBD_MAGIC.to_be_bytes());
        assert_eq!(&g[8..16], &IHAVEOPT.to_be_bytes());
        r
    }

    /// Connect, send client flags, optionally negotiate structured replies
    /// and base:allocation, then GO on the default export.
    pub fn go(addr: &str, structured: bool) -> Self {
        let mut r = Self::connect(addr);
        r.send(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes());
        if structured {
            r.option(OPT_STRUCTURED_REPLY, &[]);
            assert_eq!(r.option_reply().1, REP_ACK);
            let mut d = 0u32.to_be_bytes().to_vec();
            d.extend_from_slice(&1u32.to_be_bytes());
            d.extend_from_slice(&(BASE_ALLOCATION.len() as u32).to_be_bytes());
            d.extend_from_slice(BASE_ALLOCATION);
            r.option(OPT_SET_META_CONTEXT, &d);
            assert_eq!(r.option_reply().1, REP_META_CONTEXT);
            assert_eq!(r.option_reply().1, REP_ACK);
        }
        let mut d = 0u32.to_be_bytes().to_vec();
        d.extend_from_slice(&0u16.to_be_bytes());
        r.option(OPT_GO, &d);
        loop {
            let (_, kind, _) = r.option_reply();
            if kind == REP_ACK {
                break;
            }
            assert_eq!(kind, REP_INFO);
        }
        r
    }

    pub fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).expect("send");
    }

    pub fn option(&mut self, option: u32, data: &[u8]) {
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.send(&b);
    }

    /// (option, reply type, data)
    pub fn option_reply(&mut self) -> (u32, u32, Vec<u8>) {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h).expect("option reply");
        assert_eq!(&h[..8], &OPT_REPLY_MAGIC.to_be_bytes());
        let opt = u32::from_be_bytes(h[8..12].try_into().expect("4"));
        let kind = u32::from_be_bytes(h[12..16].try_into().expect("4"));
        let len = u32::from_be_bytes(h[16..20].try_into().expect("4"));
        let mut d = vec![0u8; len as usize];
        self.s.read_exact(&mut d).expect("option reply data");
        (opt, kind, d)
    }

    pub fn request(&mut self, kind: u16, flags: u16, cookie: u64, offset: u64, len: u32) {
        let r = Request {
            flags,
            kind,
            cookie,
            offset,
            len,
        };
        self.send(&r.encode());
    }

    /// Read one reply; a successful simple READ reply is followed by
    /// `data_len` bytes, which are returned in `Simple`'s place by `read_data`.
    pub fn reply(&mut self) -> Reply {
        let mut m = [0u8; 4];
        self.s.read_exact(&mut m).expect("reply magic");
        match u32::from_be_bytes(m) {
            SIMPLE_REPLY_MAGIC => {
                let mut h = [0u8; 12];
                self.s.read_exact(&mut h).expect("simple reply");
                Reply::Simple {
                    error: u32::from_be_bytes(h[..4].try_into().expect("4")),
                    cookie: u64::from_be_bytes(h[4..].try_into().expect("8")),
                }
            }
            STRUCTURED_REPLY_MAGIC => {
                let mut h = [0u8; 16];
                self.s.read_exact(&mut h).expect("chunk");
                let len = u32::from_be_bytes(h[12..16].try_into().expect("4"));
                let mut payload = vec![0u8; len as usize];
                self.s.read_exact(&mut payload).expect("chunk payload");
                Reply::Chunk {
                    flags: u16::from_be_bytes([h[0], h[1]]),
                    kind: u16::from_be_bytes([h[2], h[3]]),
                    cookie: u64::from_be_bytes(h[4..12].try_into().expect("8")),
                    payload,
                }
            }
            other => panic!("bad reply magic {other:#x}"),
        }
    }

    pub fn read_exact(&mut self, n: usize) -> Vec<u8> {
        let mut d = vec![0u8; n];
        self.s.read_exact(&mut d).expect("data");
        d
    }

    /// Simple-reply READ; returns the data or the error code.
    pub fn read(&mut self, cookie: u64, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        self.request(CMD_READ, 0, cookie, offset, len);
        match self.reply() {
            Reply::Simple {
                cookie: c,
                error: 0,
            } if c == cookie => Ok(self.read_exact(len as usize)),
            Reply::Simple { cookie: c, error } if c == cookie => Err(error),
            r => panic!("unexpected reply {r:?}"),
        }
    }

    /// Expect the server to close the connection (EOF or reset) soon.
    pub fn expect_closed(&mut self) {
        let mut b = [0u8; 256];
        loop {
            match self.s.read(&mut b) {
                Ok(0) => return,
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return,
                Err(e) => panic!("expected close, got {e}"),
            }
        }
    }
}
