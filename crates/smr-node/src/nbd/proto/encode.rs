//! Encoding of server messages (option replies, simple and structured
//! replies, block status descriptors).

use super::*;

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
    b[..20].copy_from_slice(&structured_header(
        flags,
        REPLY_TYPE_OFFSET_HOLE,
        cookie,
        12,
    ));
    b[20..28].copy_from_slice(&offset.to_be_bytes());
    b[28..32].copy_from_slice(&len.to_be_bytes());
    b
}

/// Encode the header of an `NBD_REPLY_TYPE_OFFSET_DATA` chunk (header plus
/// offset); `data_len` bytes of data follow it.
pub fn structured_data_header(flags: u16, cookie: u64, offset: u64, data_len: u32) -> [u8; 28] {
    let mut b = [0u8; 28];
    let len = data_len.saturating_add(8);
    b[..20].copy_from_slice(&structured_header(
        flags,
        REPLY_TYPE_OFFSET_DATA,
        cookie,
        len,
    ));
    b[20..28].copy_from_slice(&offset.to_be_bytes());
    b
}

/// Encode a complete final `NBD_REPLY_TYPE_BLOCK_STATUS` chunk.
pub fn structured_block_status(cookie: u64, context: u32, extents: &[(u32, u32)]) -> Vec<u8> {
    let payload = 4 + 8 * extents.len();
    let mut v = Vec::with_capacity(20 + payload);
    let len = u32::try_from(payload).unwrap_or(u32::MAX);
    v.extend_from_slice(&structured_header(
        REPLY_FLAG_DONE,
        REPLY_TYPE_BLOCK_STATUS,
        cookie,
        len,
    ));
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
