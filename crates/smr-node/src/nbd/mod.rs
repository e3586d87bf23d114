//! NBD (Network Block Device) server exporting [`BlockDevice`]s.
//!
//! Speaks fixed-newstyle negotiation (`NBD_OPT_GO`/`INFO`/`EXPORT_NAME`,
//! `LIST`, structured replies, the `base:allocation` metadata context) and
//! serves `READ`, `BLOCK_STATUS`, `CACHE`, `FLUSH`, `DISC` (plus `WRITE`
//! for writable devices). Requests of one connection run concurrently and
//! are answered out of order: a read the device can answer at once
//! ([`BlockDevice::read_parts_now`]: a warm chunk cache) on the event loop,
//! everything else on tokio's blocking pool; read-only exports
//! advertise `NBD_FLAG_CAN_MULTI_CONN`. Requests in flight are bounded per
//! connection and per server (count and bytes, [`ServerConfig`]), which
//! bounds the server's threads and memory whatever the clients do. A read
//! reply is written with vectored writes straight from the device's
//! [`ReadPart`]s (for the lazy image: the cached chunks), so no reply
//! buffer is allocated, zero-filled or copied into.
//!
//! Layout: [`proto`] is the pure wire format (fuzzable), `handshake` the
//! option haggling, `transmission` the request loop, `server` the
//! listeners and lifecycle.
//!
//! ```no_run
//! # use std::sync::Arc;
//! # use smr_node::nbd::{BlockDevice, Export, NbdServer};
//! # fn demo(dev: Arc<dyn BlockDevice>) -> smr_node::nbd::Result<()> {
//! let server = NbdServer::new(vec![Export::new("root", dev)])?;
//! let running = server.spawn_tcp(std::net::TcpListener::bind("127.0.0.1:10809")?)?;
//! // ... `nbdinfo nbd://127.0.0.1/root` ...
//! running.stop()?;
//! # Ok(()) }
//! ```

mod conns;
mod export;
mod handshake;
pub mod proto;
mod server;
mod transmission;

#[cfg(test)]
mod tests;

pub use crate::device::{BlockDevice, ReadPart};
pub use export::Export;
pub use server::{NbdServer, ServerConfig, ServerHandle};

/// Errors of the NBD server. Per-request device errors never surface here:
/// they become NBD error replies.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// Socket or runtime I/O failed.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    /// A server needs at least one export.
    #[error("no exports given")]
    NoExports,
    /// Two exports share a name.
    #[error("duplicate export name {0:?}")]
    DuplicateExport(String),
    /// An export name or description is longer than 4096 bytes or has NUL.
    #[error("export name or description not a valid NBD string: {0:?}")]
    BadExportString(String),
    /// The client sent bytes that are not NBD.
    #[error("protocol violation: {0}")]
    Wire(#[from] proto::WireError),
    /// The client set flags we did not offer.
    #[error("unknown client flags {0:#x}")]
    UnknownClientFlags(u32),
    /// The client announced absurdly long option data.
    #[error("option {option} with {len} bytes of data refused")]
    OptionTooLarge {
        /// Option code.
        option: u32,
        /// Announced data length.
        len: u32,
    },
    /// `NBD_OPT_EXPORT_NAME` named an export we do not have.
    #[error("client asked for unknown export {0:?}")]
    UnknownExport(String),
    /// The client kept negotiating without ever choosing an export.
    #[error("too many options")]
    TooManyOptions,
    /// The client did not finish negotiation in time.
    #[error("handshake timed out")]
    HandshakeTimeout,
    /// A refused WRITE announced a payload too large to skip.
    #[error("write payload of {0} bytes refused")]
    PayloadTooLarge(u32),
    /// The server thread panicked.
    #[error("NBD server thread panicked")]
    ServerPanicked,
}

/// Result with [`NbdError`].
pub type Result<T> = std::result::Result<T, NbdError>;
