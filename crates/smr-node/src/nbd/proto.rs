//! NBD wire format: constants, parsing of client messages and encoding of
//! server messages.
//!
//! Everything here is pure (no I/O) so it can be unit-tested and fuzzed.
//! Every parser treats its input as hostile: lengths are checked against
//! the bytes actually present before anything is allocated, and all
//! arithmetic is checked.
//!
//! Layout: constants here, client message parsing in `parse`, request
//! validation in `validate`, server message encoding in `encode`.
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
/// Transmission flag: `NBD_CMD_TRIM` supported.
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
/// Transmission flag: `NBD_CMD_WRITE_ZEROES` supported.
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Transmission flag: `NBD_CMD_FLAG_DF` supported on reads.
pub const TFLAG_SEND_DF: u16 = 1 << 7;
/// Transmission flag: several connections may share the export safely.
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// Transmission flag: `NBD_CMD_CACHE` supported.
pub const TFLAG_SEND_CACHE: u16 = 1 << 10;
/// Transmission flag: `NBD_CMD_FLAG_FAST_ZERO` supported.
pub const TFLAG_SEND_FAST_ZERO: u16 = 1 << 11;

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

mod encode;
mod parse;
mod validate;

pub use encode::*;
pub use parse::*;
pub use validate::*;

#[cfg(test)]
mod tests;
