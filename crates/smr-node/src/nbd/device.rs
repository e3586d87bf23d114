//! What the NBD server exports: the [`BlockDevice`] trait and [`Export`].

use std::io;
use std::sync::Arc;

use super::proto::MAX_STRING_LEN;
use super::{NbdError, Result};

/// A byte-addressable device served over NBD.
///
/// Methods are called from blocking worker threads, possibly many at once:
/// an implementation may block (e.g. on a network fetch) and must be safe
/// to call concurrently. Only `size` and `read_at` are required; the rest
/// have defaults for a read-only device without allocation information.
pub trait BlockDevice: Send + Sync + 'static {
    /// Size of the device in bytes; constant for the life of the export.
    fn size(&self) -> u64;

    /// Fill `buf` with the bytes at `offset`. The server only asks for
    /// ranges inside `[0, size)`. An error becomes NBD `EIO` for that
    /// request alone; the error is logged, so it should name what failed
    /// (the chunk, the store).
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;

    /// Allocation status of `[offset, offset + len)` as consecutive runs of
    /// `(length, is_hole)`, starting at `offset`. A hole reads as zeroes.
    /// Runs may cover less than `len` (the client asks again) or more (the
    /// excess is ignored). Default: everything is data.
    fn block_status(&self, offset: u64, len: u64) -> io::Result<Vec<(u64, bool)>> {
        let _ = offset;
        Ok(vec![(len, false)])
    }

    /// `NBD_CMD_CACHE`: bring the range into the local cache without
    /// returning it. Default: nothing to do.
    fn prefetch(&self, offset: u64, len: u64) -> io::Result<()> {
        let _ = (offset, len);
        Ok(())
    }

    /// Whether the export refuses writes. Default: read-only.
    fn read_only(&self) -> bool {
        true
    }

    /// Write `data` at `offset` (only called when `read_only()` is false,
    /// for ranges inside the device). Default: permission denied.
    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let _ = (offset, data);
        Err(io::Error::from(io::ErrorKind::PermissionDenied))
    }

    /// Make completed writes durable. Default: nothing to do.
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
}

/// One named export of an [`NbdServer`](super::NbdServer).
#[derive(Clone)]
pub struct Export {
    /// Name clients select it by; the first export is also the default
    /// (selected by the empty name).
    pub name: String,
    /// Free text shown by `nbdinfo` and `NBD_OPT_LIST`.
    pub description: String,
    /// The bytes served.
    pub device: Arc<dyn BlockDevice>,
}

impl Export {
    /// An export with an empty description.
    pub fn new(name: impl Into<String>, device: Arc<dyn BlockDevice>) -> Self {
        Self {
            name: name.into(),
            description: String::new(),
            device,
        }
    }

    /// Set the description.
    pub fn with_description(mut self, description: impl Into<String>) -> Self {
        self.description = description.into();
        self
    }

    pub(crate) fn check(&self) -> Result<()> {
        for s in [&self.name, &self.description] {
            if s.len() > MAX_STRING_LEN || s.contains('\0') {
                return Err(NbdError::BadExportString(s.chars().take(64).collect()));
            }
        }
        Ok(())
    }
}

impl std::fmt::Debug for Export {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Export")
            .field("name", &self.name)
            .field("description", &self.description)
            .field("size", &self.device.size())
            .field("read_only", &self.device.read_only())
            .finish()
    }
}
