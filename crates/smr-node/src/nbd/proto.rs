//! NBD wire format: constants, parsing of client messages and encoding of
//! server messages.
//!
//! Everything here is pure (no I/O) so it can be unit-tested and fuzzed.
//! Every parser treats its input as hostile: lengths are checked against
//! the bytes actually present before anything is allocated, and all
//! arithmetic is checked.
//!
//! Reference: the NBD protocol document (`doc/proto.md` of the
//! NetworkBlockDevice/nbd project). All integers are big-endian.

/// `NBDMAGIC`, first 8 bytes the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`, newstyle magic; also prefixes every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every fixed-newstyle option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flag: fixed newstyle negotiation.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: the 124 bytes of zeroes after `NBD_OPT_EXPORT_NAME` may be omitted.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: client understands fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: omit the 124 zero bytes.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Transmission flag: always set.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag: export is read-only.
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
/// Transmission flag: `NBD_CMD_FLUSH` supported.
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag: `NBD_CMD_FLAG_FUA` supported.
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
/// Transmission flag: `NBD_CMD_FLAG_DF` supported on reads.
pub const TFLAG_SEND_DF: u16 = 1 << 7;
/// Transmission flag: several connections may share the export safely.
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// Transmission flag: `NBD_CMD_CACHE` supported.
pub const TFLAG_SEND_CACHE: u16 = 1 << 10;

/// Option: pick an export and enter transmission (no error reply possible).
pub const OPT_EXPORT_NAME: u32 = 1;
/// Option: client gives up.
pub const OPT_ABORT: u32 = 2;
/// Option: list exports.
pub const OPT_LIST: u32 = 3;
/// Option: TLS upgrade (unsupported here).
pub const OPT_STARTTLS: u32 = 5;
/// Option: describe an export.
pub const OPT_INFO: u32 = 6;
/// Option: describe an export and enter transmission.
pub const OPT_GO: u32 = 7;
/// Option: use structured replies.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// Option: list metadata contexts.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// Option: select metadata contexts.
pub const OPT_SET_META_CONTEXT: u32 = 10;

/// Option reply: success / end of list.
pub const REP_ACK: u32 = 1;
/// Option reply: one export of a list.
pub const REP_SERVER: u32 = 2;
/// Option reply: one item of export information.
pub const REP_INFO: u32 = 3;
/// Option reply: one metadata context.
pub const REP_META_CONTEXT: u32 = 4;
/// Option error: option unknown.
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
/// Option error: forbidden by policy.
pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
/// Option error: syntactically or semantically invalid.
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
/// Option error: unknown export.
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
/// Option error: server shutting down.
pub const REP_ERR_SHUTDOWN: u32 = (1 << 31) + 7;
/// Option error: request or reply too large.
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

/// `NBD_INFO_EXPORT`: size and transmission flags.
pub const INFO_EXPORT: u16 = 0;
/// `NBD_INFO_NAME`: canonical export name.
pub const INFO_NAME: u16 = 1;
/// `NBD_INFO_DESCRIPTION`: human readable description.
pub const INFO_DESCRIPTION: u16 = 2;
/// `NBD_INFO_BLOCK_SIZE`: minimum, preferred and maximum block sizes.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Command: read.
pub const CMD_READ: u16 = 0;
/// Command: write (followed by a payload).
pub const CMD_WRITE: u16 = 1;
/// Command: soft disconnect.
pub const CMD_DISC: u16 = 2;
/// Command: flush.
pub const CMD_FLUSH: u16 = 3;
/// Command: trim.
pub const CMD_TRIM: u16 = 4;
/// Command: cache (prefetch).
pub const CMD_CACHE: u16 = 5;
/// Command: write zeroes.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// Command: block status.
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Command flag: force unit access.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag: write zeroes without punching holes.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Command flag: don't fragment a structured read reply.
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// Command flag: one block status descriptor only.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// Command flag: fail write zeroes unless fast.
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

/// Structured reply flag: last chunk of the reply.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// Structured chunk: no payload.
pub const REPLY_TYPE_NONE: u16 = 0;
/// Structured chunk: data at an offset.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Structured chunk: zeroes at an offset.
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Structured chunk: block status descriptors.
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Structured chunk: error for the whole request.
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

/// `base:allocation` state bit: not allocated.
pub const STATE_HOLE: u32 = 1 << 0;
/// `base:allocation` state bit: reads as zeroes.
pub const STATE_ZERO: u32 = 1 << 1;

/// Error: operation not permitted.
pub const EPERM: u32 = 1;
/// Error: I/O error.
pub const EIO: u32 = 5;
/// Error: invalid argument.
pub const EINVAL: u32 = 22;
/// Error: no space left (write beyond the end).
pub const ENOSPC: u32 = 28;
/// Error: value too large.
pub const EOVERFLOW: u32 = 75;
/// Error: server shutting down.
pub const ESHUTDOWN: u32 = 108;

/// The only metadata context this server knows.
pub const BASE_ALLOCATION: &[u8] = b"base:allocation";
/// Context id we hand out for `base:allocation`.
pub const BASE_ALLOCATION_ID: u32 = 1;

/// Minimum block size advertised.
pub const MIN_BLOCK_SIZE: u32 = 1;
/// Preferred block size advertised.
pub const PREFERRED_BLOCK_SIZE: u32 = 4096;
/// Maximum payload of one READ or WRITE (32 MiB).
pub const MAX_BLOCK_SIZE: u32 = 32 << 20;
/// Longest option payload we accept; larger ones end the session.
pub const MAX_OPTION_LEN: u32 = 64 << 10;
/// Longest string (export name, query) the spec allows.
pub const MAX_STRING_LEN: usize = 4096;
/// Most block status descriptors sent in one reply.
pub const MAX_DESCRIPTORS: usize = 1 << 16;

/// Size of a transmission request header.
pub const REQUEST_LEN: usize = 28;
/// Size of a client option header (magic, option, length).
pub const OPTION_HEADER_LEN: usize = 16;

/// A malformed client message that cannot be answered with an error code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// A request did not start with `NBD_REQUEST_MAGIC`.
    #[error("bad request magic {0:#010x}")]
    BadRequestMagic(u32),
    /// An option did not start with `IHAVEOPT`.
    #[error("bad option magic {0:#018x}")]
    BadOptionMagic(u64),
    /// Option data is not well formed (lengths disagree, string too long).
    #[error("malformed option data: {0}")]
    Malformed(&'static str),
}

/// Cursor over untrusted bytes; every read is bounds-checked.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], WireError> {
        if n > self.buf.len() {
            return Err(WireError::Malformed(what));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, WireError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, WireError> {
        let b = self.take(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A u32-length-prefixed string of at most [`MAX_STRING_LEN`] bytes.
    fn string(&mut self, what: &'static str) -> Result<&'a [u8], WireError> {
        let len = self.u32(what)? as usize;
        if len > MAX_STRING_LEN {
            return Err(WireError::Malformed(what));
        }
        self.take(len, what)
    }
}

fn be_u16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be_u64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(x)
}

/// The fixed part of a client option: option code and data length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// `NBD_OPT_*` code.
    pub option: u32,
    /// Length of the option data that follows.
    pub len: u32,
}

impl OptionHeader {
    /// Parse the 16-byte option header.
    pub fn parse(b: &[u8; OPTION_HEADER_LEN]) -> Result<Self, WireError> {
        let magic = be_u64(b, 0);
        if magic != IHAVEOPT {
            return Err(WireError::BadOptionMagic(magic));
        }
        Ok(Self { option: be_u32(b, 8), len: be_u32(b, 12) })
    }
}

/// Data of `NBD_OPT_INFO` / `NBD_OPT_GO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest<'a> {
    /// Requested export name (empty selects the default export).
    pub name: &'a [u8],
    /// Requested `NBD_INFO_*` items.
    pub items: Vec<u16>,
}

/// Parse the data of `NBD_OPT_INFO` / `NBD_OPT_GO`.
pub fn parse_info_request(data: &[u8]) -> Result<InfoRequest<'_>, WireError> {
    let mut r = Reader { buf: data };
    let name = r.string("export name")?;
    let count = r.u16("info count")?;
    let mut items = Vec::new();
    for _ in 0..count {
        items.push(r.u16("info item")?);
    }
    if !r.buf.is_empty() {
        return Err(WireError::Malformed("trailing bytes after info requests"));
    }
    Ok(InfoRequest { name, items })
}

/// Data of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest<'a> {
    /// Export the contexts are for.
    pub name: &'a [u8],
    /// Query strings.
    pub queries: Vec<&'a [u8]>,
}

/// Parse the data of the two meta context options.
pub fn parse_meta_context_request(data: &[u8]) -> Result<MetaContextRequest<'_>, WireError> {
    let mut r = Reader { buf: data };
    let name = r.string("export name")?;
    let count = r.u32("query count")?;
    // No capacity from `count`: each query needs at least 4 bytes, so the
    // loop below fails long before an absurd count could matter.
    let mut queries = Vec::new();
    for _ in 0..count {
        queries.push(r.string("query")?);
    }
    if !r.buf.is_empty() {
        return Err(WireError::Malformed("trailing bytes after queries"));
    }
    Ok(MetaContextRequest { name, queries })
}

/// How a meta context query matches `base:allocation`.
pub fn query_selects_base_allocation(query: &[u8], listing: bool) -> bool {
    query == BASE_ALLOCATION || (listing && query == b"base:")
}

/// A transmission request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags (`NBD_CMD_FLAG_*`).
    pub flags: u16,
    /// Command type (`NBD_CMD_*`).
    pub kind: u16,
    /// Opaque handle echoed in the reply.
    pub cookie: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte length.
    pub len: u32,
}

impl Request {
    /// Parse a 28-byte request header.
    pub fn parse(b: &[u8; REQUEST_LEN]) -> Result<Self, WireError> {
        let magic = be_u32(b, 0);
        if magic != REQUEST_MAGIC {
            return Err(WireError::BadRequestMagic(magic));
        }
        Ok(Self {
            flags: be_u16(b, 4),
            kind: be_u16(b, 6),
            cookie: be_u64(b, 8),
            offset: be_u64(b, 16),
            len: be_u32(b, 24),
        })
    }

    /// Encode (used by tests and clients).
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.len.to_be_bytes());
        b
    }
}

/// What the connection negotiated and what the export allows; input of
/// [`validate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Export size in bytes.
    pub size: u64,
    /// Export refuses writes.
    pub read_only: bool,
    /// Structured replies negotiated.
    pub structured: bool,
    /// `base:allocation` selected for this export.
    pub block_status: bool,
}

/// A request that passed validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Read `len` bytes at `offset`; `df` forbids fragmenting the reply.
    Read {
        /// Start offset.
        offset: u64,
        /// Length, 1..=MAX_BLOCK_SIZE.
        len: u32,
        /// Don't fragment.
        df: bool,
    },
    /// Write the payload that follows the header.
    Write {
        /// Start offset.
        offset: u64,
        /// Payload length.
        len: u32,
    },
    /// Soft disconnect.
    Disconnect,
    /// Flush.
    Flush,
    /// Prefetch a range.
    Cache {
        /// Start offset.
        offset: u64,
        /// Length.
        len: u32,
    },
    /// Report `base:allocation` for a range.
    BlockStatus {
        /// Start offset.
        offset: u64,
        /// Length, at least 1.
        len: u32,
        /// Report a single descriptor.
        req_one: bool,
    },
}

/// Outcome of validating a request that must be answered with an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejected {
    /// NBD error code for the reply.
    pub errno: u32,
    /// Payload bytes that follow the header on the wire and must be
    /// skipped to stay in sync (only WRITE carries a payload).
    pub skip: u32,
}

/// Length of the payload that follows a request header on the wire.
pub fn payload_len(req: &Request) -> u32 {
    if req.kind == CMD_WRITE {
        req.len
    } else {
        0
    }
}

fn in_bounds(offset: u64, len: u32, size: u64) -> bool {
    offset.checked_add(u64::from(len)).is_some_and(|end| end <= size)
}

/// Check a request against the export and the negotiated options.
///
/// Pure: decides the command or the error code, never touches the device.
pub fn validate(req: &Request, lim: &Limits) -> Result<Command, Rejected> {
    let skip = payload_len(req);
    let reject = |errno| Err(Rejected { errno, skip });
    // FUA is tolerated on every command (clients are known to set it) and
    // ignored: nothing here is write-back cached beyond the device's flush.
    let allowed = CMD_FLAG_FUA
        | match req.kind {
            CMD_READ if lim.structured => CMD_FLAG_DF,
            CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
            CMD_WRITE_ZEROES => CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
            _ => 0,
        };
    if req.flags & !allowed != 0 {
        return reject(EINVAL);
    }
    let (offset, len) = (req.offset, req.len);
    match req.kind {
        CMD_READ => {
            if len > MAX_BLOCK_SIZE {
                return reject(EOVERFLOW);
            }
            if len == 0 || !in_bounds(offset, len, lim.size) {
                return reject(EINVAL);
            }
            Ok(Command::Read { offset, len, df: req.flags & CMD_FLAG_DF != 0 })
        }
        CMD_WRITE => {
            if lim.read_only {
                return reject(EPERM);
            }
            if len > MAX_BLOCK_SIZE {
                return reject(EOVERFLOW);
            }
            if !in_bounds(offset, len, lim.size) {
                return reject(ENOSPC);
            }
            Ok(Command::Write { offset, len })
        }
        CMD_DISC => Ok(Command::Disconnect),
        CMD_FLUSH => Ok(Command::Flush),
        CMD_TRIM | CMD_WRITE_ZEROES => reject(if lim.read_only { EPERM } else { EINVAL }),
        CMD_CACHE => {
            if !in_bounds(offset, len, lim.size) {
                return reject(EINVAL);
            }
            Ok(Command::Cache { offset, len })
        }
        CMD_BLOCK_STATUS => {
            if !lim.structured || !lim.block_status || len == 0 || !in_bounds(offset, len, lim.size)
            {
                return reject(EINVAL);
            }
            Ok(Command::BlockStatus { offset, len, req_one: req.flags & CMD_FLAG_REQ_ONE != 0 })
        }
        _ => reject(EINVAL),
    }
}

/// Encode an option reply header followed by `data`.
pub fn option_reply(option: u32, reply: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(20 + data.len());
    v.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&reply.to_be_bytes());
    // Callers only pass server-built data (names, descriptions) whose length
    // was checked at export creation.
    let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
    v.extend_from_slice(&len.to_be_bytes());
    v.extend_from_slice(data);
    v
}

/// Encode a simple reply header (the data of a READ follows it).
pub fn simple_reply(cookie: u64, error: u32) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// Encode a structured reply chunk header.
pub fn structured_header(flags: u16, kind: u16, cookie: u64, len: u32) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&kind.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..20].copy_from_slice(&len.to_be_bytes());
    b
}

/// Encode a complete `NBD_REPLY_TYPE_ERROR` chunk (final).
pub fn structured_error(cookie: u64, errno: u32, message: &str) -> Vec<u8> {
    let msg = &message.as_bytes()[..message.len().min(1024)];
    // `msg` is at most 1024 bytes, so both casts are lossless.
    let mut v = Vec::with_capacity(26 + msg.len());
    v.extend_from_slice(&structured_header(
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        cookie,
        6 + msg.len() as u32,
    ));
    v.extend_from_slice(&errno.to_be_bytes());
    v.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    v.extend_from_slice(msg);
    v
}

/// Encode a complete `NBD_REPLY_TYPE_OFFSET_HOLE` chunk.
pub fn structured_hole(flags: u16, cookie: u64, offset: u64, len: u32) -> [u8; 32] {
    let mut b = [0u8; 32];
    b[..20].copy_from_slice(&structured_header(flags, REPLY_TYPE_OFFSET_HOLE, cookie, 12));
    b[20..28].copy_from_slice(&offset.to_be_bytes());
    b[28..32].copy_from_slice(&len.to_be_bytes());
    b
}

/// Encode the header of an `NBD_REPLY_TYPE_OFFSET_DATA` chunk (header plus
/// offset); `data_len` bytes of data follow it.
pub fn structured_data_header(flags: u16, cookie: u64, offset: u64, data_len: u32) -> [u8; 28] {
    let mut b = [0u8; 28];
    let len = data_len.saturating_add(8);
    b[..20].copy_from_slice(&structured_header(flags, REPLY_TYPE_OFFSET_DATA, cookie, len));
    b[20..28].copy_from_slice(&offset.to_be_bytes());
    b
}

/// Encode a complete final `NBD_REPLY_TYPE_BLOCK_STATUS` chunk.
pub fn structured_block_status(cookie: u64, context: u32, extents: &[(u32, u32)]) -> Vec<u8> {
    let payload = 4 + 8 * extents.len();
    let mut v = Vec::with_capacity(20 + payload);
    let len = u32::try_from(payload).unwrap_or(u32::MAX);
    v.extend_from_slice(&structured_header(REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, cookie, len));
    v.extend_from_slice(&context.to_be_bytes());
    for &(length, flags) in extents {
        v.extend_from_slice(&length.to_be_bytes());
        v.extend_from_slice(&flags.to_be_bytes());
    }
    v
}

/// Turn a device's allocation runs into `base:allocation` descriptors for
/// `[0, len)`: zero-length runs dropped, neighbours of equal state merged,
/// the total clipped to `len`, at most `max` descriptors. Never empty: a
/// device that reports nothing yields one data descriptor for the range.
pub fn extents_from_runs(runs: &[(u64, bool)], len: u32, max: usize) -> Vec<(u32, u32)> {
    let mut out: Vec<(u32, u32)> = Vec::new();
    let mut left = len;
    for &(run, hole) in runs {
        if left == 0 {
            break;
        }
        let take = u32::try_from(run.min(u64::from(left))).unwrap_or(left);
        if take == 0 {
            continue;
        }
        left -= take;
        let flags = if hole { STATE_HOLE | STATE_ZERO } else { 0 };
        if let Some(last) = out.last_mut().filter(|l| l.1 == flags) {
            last.0 += take;
        } else if out.len() == max {
            break;
        } else {
            out.push((take, flags));
        }
    }
    if out.is_empty() {
        out.push((len, 0));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn info_bytes(name: &[u8], items: &[u16]) -> Vec<u8> {
        let mut v = (name.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(name);
        v.extend_from_slice(&(items.len() as u16).to_be_bytes());
        for i in items {
            v.extend_from_slice(&i.to_be_bytes());
        }
        v
    }

    #[test]
    fn info_request_round_trip_and_truncation() {
        let b = info_bytes(b"root", &[INFO_NAME, INFO_BLOCK_SIZE]);
        let r = parse_info_request(&b).expect("valid");
        assert_eq!(r.name, b"root");
        assert_eq!(r.items, vec![INFO_NAME, INFO_BLOCK_SIZE]);
        for cut in 0..b.len() {
            assert!(parse_info_request(&b[..cut]).is_err(), "cut at {cut}");
        }
        let mut long = b.clone();
        long.push(0);
        assert!(parse_info_request(&long).is_err());
    }

    #[test]
    fn meta_context_rejects_huge_counts_without_allocating() {
        let mut b = 0u32.to_be_bytes().to_vec();
        b.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_meta_context_request(&b).is_err());
        let mut b = 0u32.to_be_bytes().to_vec();
        b.extend_from_slice(&1u32.to_be_bytes());
        b.extend_from_slice(&(BASE_ALLOCATION.len() as u32).to_be_bytes());
        b.extend_from_slice(BASE_ALLOCATION);
        let r = parse_meta_context_request(&b).expect("valid");
        assert_eq!(r.queries, vec![BASE_ALLOCATION]);
    }

    #[test]
    fn string_longer_than_spec_limit_is_rejected() {
        let name = vec![b'a'; MAX_STRING_LEN + 1];
        assert!(parse_info_request(&info_bytes(&name, &[])).is_err());
    }

    const LIM: Limits = Limits { size: 1 << 20, read_only: true, structured: true, block_status: true };

    fn req(kind: u16, flags: u16, offset: u64, len: u32) -> Request {
        Request { flags, kind, cookie: 7, offset, len }
    }

    #[test]
    fn validation_error_codes() {
        let e = |r: &Request| validate(r, &LIM).err().map(|x| (x.errno, x.skip));
        assert_eq!(e(&req(CMD_READ, 0, 0, 0)), Some((EINVAL, 0)));
        assert_eq!(e(&req(CMD_READ, 0, 0, MAX_BLOCK_SIZE + 1)), Some((EOVERFLOW, 0)));
        assert_eq!(e(&req(CMD_READ, 0, (1 << 20) - 1, 2)), Some((EINVAL, 0)));
        assert_eq!(e(&req(CMD_READ, 0, u64::MAX, 1)), Some((EINVAL, 0)));
        assert_eq!(e(&req(CMD_READ, 1 << 9, 0, 1)), Some((EINVAL, 0)));
        assert_eq!(e(&req(CMD_WRITE, 0, 0, 100)), Some((EPERM, 100)));
        assert_eq!(e(&req(CMD_TRIM, 0, 0, 100)), Some((EPERM, 0)));
        assert_eq!(e(&req(CMD_WRITE_ZEROES, 0, 0, 100)), Some((EPERM, 0)));
        assert_eq!(e(&req(99, 0, 0, 0)), Some((EINVAL, 0)));
        assert_eq!(e(&req(CMD_BLOCK_STATUS, 0, 0, 0)), Some((EINVAL, 0)));
        let rw = Limits { read_only: false, ..LIM };
        let w = validate(&req(CMD_WRITE, 0, 1 << 20, 1), &rw).err();
        assert_eq!(w, Some(Rejected { errno: ENOSPC, skip: 1 }));
        let no_meta = Limits { block_status: false, ..LIM };
        assert!(validate(&req(CMD_BLOCK_STATUS, 0, 0, 1), &no_meta).is_err());
        let simple = Limits { structured: false, ..LIM };
        assert!(validate(&req(CMD_READ, CMD_FLAG_DF, 0, 1), &simple).is_err());
        assert_eq!(
            validate(&req(CMD_READ, CMD_FLAG_DF, 10, 5), &LIM),
            Ok(Command::Read { offset: 10, len: 5, df: true })
        );
    }

    #[test]
    fn extents_merge_clip_and_cap() {
        let runs = [(10, false), (0, true), (5, false), (100, true), (7, false)];
        assert_eq!(extents_from_runs(&runs, 50, 16), vec![(15, 0), (35, STATE_HOLE | STATE_ZERO)]);
        assert_eq!(extents_from_runs(&runs, 50, 1), vec![(15, 0)]);
        assert_eq!(extents_from_runs(&[], 9, 16), vec![(9, 0)]);
        assert_eq!(extents_from_runs(&[(u64::MAX, true)], 9, 16), vec![(9, 3)]);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]

        #[test]
        fn parsers_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse_info_request(&data);
            let _ = parse_meta_context_request(&data);
            if data.len() >= REQUEST_LEN {
                let mut h = [0u8; REQUEST_LEN];
                h.copy_from_slice(&data[..REQUEST_LEN]);
                if let Ok(r) = Request::parse(&h) {
                    prop_assert_eq!(r.encode(), h);
                    let _ = validate(&r, &LIM);
                }
            }
        }

        #[test]
        fn validated_ranges_are_in_bounds(kind in 0u16..10, flags in any::<u16>(),
                                          offset in any::<u64>(), len in any::<u32>(),
                                          ro in any::<bool>(), st in any::<bool>()) {
            let lim = Limits { read_only: ro, structured: st, ..LIM };
            let r = req(kind, flags, offset, len);
            match validate(&r, &lim) {
                Ok(Command::Read { offset, len, .. })
                | Ok(Command::Write { offset, len })
                | Ok(Command::Cache { offset, len })
                | Ok(Command::BlockStatus { offset, len, .. }) => {
                    prop_assert!(offset + u64::from(len) <= lim.size);
                    prop_assert!(len <= MAX_BLOCK_SIZE || kind == CMD_CACHE);
                }
                Ok(_) => {}
                Err(rej) => prop_assert_eq!(rej.skip, payload_len(&r)),
            }
        }

        #[test]
        fn extents_cover_at_most_len(runs in proptest::collection::vec((any::<u64>(), any::<bool>()), 0..40),
                                     len in 1u32.., max in 1usize..8) {
            let ex = extents_from_runs(&runs, len, max);
            prop_assert!(!ex.is_empty() && ex.len() <= max);
            let total: u64 = ex.iter().map(|e| u64::from(e.0)).sum();
            prop_assert!(total <= u64::from(len));
            prop_assert!(ex.iter().all(|e| e.0 > 0));
        }
    }
}
