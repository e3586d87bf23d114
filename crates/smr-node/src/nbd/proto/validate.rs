//! Checking a transmission request against the export and the negotiation.

use super::*;

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
        /// Durable before the reply (`NBD_CMD_FLAG_FUA`).
        fua: bool,
    },
    /// The range's contents are no longer needed.
    Trim {
        /// Start offset.
        offset: u64,
        /// Length.
        len: u32,
        /// Durable before the reply.
        fua: bool,
    },
    /// The range reads as zeros afterwards.
    WriteZeroes {
        /// Start offset.
        offset: u64,
        /// Length.
        len: u32,
        /// Durable before the reply.
        fua: bool,
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
    offset
        .checked_add(u64::from(len))
        .is_some_and(|end| end <= size)
}

/// Check a request against the export and the negotiated options.
///
/// Pure: decides the command or the error code, never touches the device.
pub fn validate(req: &Request, lim: &Limits) -> Result<Command, Rejected> {
    let skip = payload_len(req);
    let reject = |errno| Err(Rejected { errno, skip });
    // FUA is tolerated on every command (clients are known to set it); it
    // makes writes, trims and zeroings durable before their reply.
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
    let fua = req.flags & CMD_FLAG_FUA != 0;
    match req.kind {
        CMD_READ => {
            if len > MAX_BLOCK_SIZE {
                return reject(EOVERFLOW);
            }
            if len == 0 || !in_bounds(offset, len, lim.size) {
                return reject(EINVAL);
            }
            Ok(Command::Read {
                offset,
                len,
                df: req.flags & CMD_FLAG_DF != 0,
            })
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
            Ok(Command::Write { offset, len, fua })
        }
        CMD_DISC => Ok(Command::Disconnect),
        CMD_FLUSH => Ok(Command::Flush),
        CMD_TRIM | CMD_WRITE_ZEROES => {
            if lim.read_only {
                return reject(EPERM);
            }
            if len == 0 {
                return reject(EINVAL);
            }
            if !in_bounds(offset, len, lim.size) {
                return reject(ENOSPC);
            }
            Ok(if req.kind == CMD_TRIM {
                Command::Trim { offset, len, fua }
            } else {
                Command::WriteZeroes { offset, len, fua }
            })
        }
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
            Ok(Command::BlockStatus {
                offset,
                len,
                req_one: req.flags & CMD_FLAG_REQ_ONE != 0,
            })
        }
        _ => reject(EINVAL),
    }
}
