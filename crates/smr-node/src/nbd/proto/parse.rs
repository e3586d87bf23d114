//! Parsing of client messages (option data, request headers).

use super::*;

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
        Ok(Self {
            option: be_u32(b, 8),
            len: be_u32(b, 12),
        })
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
