//! What every export serves (NBD, FUSE): the [`BlockDevice`] trait and the
//! [`ReadPart`]s of a read.

use std::io;
use std::ops::Range;
use std::sync::Arc;

/// The kernel's page cache of the file a FUSE export makes of a device
/// ([`BlockDevice::exported`]): bytes stored there are what the kernel
/// reads from then on, without asking the device (until it evicts them).
pub trait PageSink: Send + Sync {
    /// Stores `data` as the file's bytes at `offset` (a multiple of 4 KiB;
    /// whole 4 KiB pages only, except at the end of the file).
    fn store(&self, offset: u64, data: &[u8]) -> io::Result<()>;
}

/// A byte-addressable device served by the exports (NBD, FUSE).
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

    /// The bytes of `[offset, offset + len)` as consecutive [`ReadPart`]s
    /// covering exactly `len` bytes: what the NBD server sends for a
    /// `READ` (zero parts become hole chunks in structured replies). A
    /// device that keeps its data in shared buffers (a chunk cache) hands
    /// them out without copying. Default: the holes of
    /// [`BlockDevice::block_status`] as [`ReadPart::Zero`] (when there are
    /// few) and the rest read with [`BlockDevice::read_at`] into owned
    /// buffers.
    fn read_parts(&self, offset: u64, len: usize) -> io::Result<Vec<ReadPart>> {
        default_read_parts(self, offset, len)
    }

    /// [`BlockDevice::read_parts`] if it can be answered at once, without
    /// waiting for I/O; `None` if not. Called on the server's event loop
    /// (unlike the other methods): a warm read answered here is written
    /// back by the task that read the request, with no hand-off to a
    /// worker thread and back. Default: `None` (always hand off).
    fn read_parts_now(&self, offset: u64, len: usize) -> Option<io::Result<Vec<ReadPart>>> {
        let _ = (offset, len);
        None
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

    /// The device is exported as a file whose page cache `pages` fills
    /// (called by a FUSE export when the file is first opened). A device
    /// may store bytes there ahead of the reads, never any but what it
    /// would answer those reads with (verified, and not to change: only a
    /// read-only device may). Default: nothing.
    fn exported(&self, pages: Arc<dyn PageSink>) {
        let _ = pages;
    }

    /// Told by an export after it answered a read of `len` bytes at
    /// `offset` that will be read through the kernel's page cache of the
    /// exported file (a FUSE read without `O_DIRECT`): where a reader is,
    /// for a device that stores pages ahead of it ([`Self::exported`]).
    /// Default: nothing.
    fn read_through_page_cache(&self, offset: u64, len: usize) {
        let _ = (offset, len);
    }

    /// Make completed writes durable. Default: nothing to do.
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    /// `NBD_CMD_TRIM`: the range's contents are no longer needed (later
    /// reads may return anything). Default: nothing to do.
    fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        let _ = (offset, len);
        Ok(())
    }

    /// `NBD_CMD_WRITE_ZEROES`: the range reads as zeros afterwards.
    /// Default: zeros written with [`BlockDevice::write_at`], 1 MiB at a
    /// time.
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        let zeros = vec![0u8; len.min(1 << 20) as usize];
        let mut at = offset;
        while at < offset + len {
            let n = (offset + len - at).min(zeros.len() as u64) as usize;
            self.write_at(at, &zeros[..n])?;
            at += n as u64;
        }
        Ok(())
    }
}

/// A piece of the bytes of a read (see [`BlockDevice::read_parts`]).
#[derive(Clone)]
pub enum ReadPart {
    /// Bytes owned by this read.
    Owned(Vec<u8>),
    /// `range` of a buffer shared with others (e.g. a cached chunk); the
    /// buffer lives until the reply has been sent.
    Shared(Arc<Vec<u8>>, Range<usize>),
    /// This many zero bytes (a hole: nothing to read or copy).
    Zero(usize),
}

impl ReadPart {
    /// Length in bytes.
    pub fn len(&self) -> usize {
        match self {
            ReadPart::Owned(v) => v.len(),
            ReadPart::Shared(_, r) => r.len(),
            ReadPart::Zero(n) => *n,
        }
    }

    /// Whether the part is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes, `None` for a zero part.
    pub fn data(&self) -> Option<&[u8]> {
        match self {
            ReadPart::Owned(v) => Some(v),
            // An out-of-range `range` (a device bug) reads as empty, and the
            // length check of the caller catches it.
            ReadPart::Shared(b, r) => Some(b.get(r.clone()).unwrap_or(&[])),
            ReadPart::Zero(_) => None,
        }
    }
}

impl std::fmt::Debug for ReadPart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadPart::Owned(v) => write!(f, "Owned({})", v.len()),
            ReadPart::Shared(_, r) => write!(f, "Shared({r:?})"),
            ReadPart::Zero(n) => write!(f, "Zero({n})"),
        }
    }
}

/// Holes beyond this many in one read are not worth separate parts.
const MAX_HOLE_PARTS: usize = 64;

/// [`BlockDevice::read_parts`]'s default.
fn default_read_parts<D: BlockDevice + ?Sized>(
    d: &D,
    offset: u64,
    len: usize,
) -> io::Result<Vec<ReadPart>> {
    let mut runs = vec![(len, false)];
    match d.block_status(offset, len as u64) {
        Ok(r) => {
            let mut ex: Vec<(usize, bool)> = Vec::new();
            let mut left = len;
            for (l, hole) in r {
                let take = usize::try_from(l).unwrap_or(usize::MAX).min(left);
                if take == 0 {
                    continue;
                }
                left -= take;
                match ex.last_mut() {
                    Some(last) if last.1 == hole => last.0 += take,
                    _ => ex.push((take, hole)),
                }
            }
            if left == 0 && ex.len() <= 2 * MAX_HOLE_PARTS {
                runs = ex;
            }
        }
        Err(e) => {
            tracing::debug!(offset, len, error = %e, "block status for read failed; reading all")
        }
    }
    let mut parts = Vec::with_capacity(runs.len());
    let mut at = offset;
    for (l, hole) in runs {
        if hole {
            parts.push(ReadPart::Zero(l));
        } else {
            let mut buf = vec![0u8; l];
            d.read_at(at, &mut buf)?;
            parts.push(ReadPart::Owned(buf));
        }
        at += l as u64;
    }
    Ok(parts)
}

/// A read-only device over a file or block device (e.g. an image file
/// another process exports, such as the node daemon's FUSE file): reads
/// are `pread`s.
#[derive(Debug)]
pub struct FileDevice {
    file: std::fs::File,
    size: u64,
    path: std::path::PathBuf,
}

impl FileDevice {
    /// Opens `path` read-only; its size is fixed from now on.
    pub fn open(path: &std::path::Path) -> io::Result<FileDevice> {
        let file = std::fs::File::open(path)?;
        let size = file.metadata()?.len();
        Ok(FileDevice {
            file,
            size,
            path: path.to_path_buf(),
        })
    }
}

impl BlockDevice for FileDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(&self.file, buf, offset).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("reading {} at {offset}: {e}", self.path.display()),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_device_reads_its_file_and_names_it_in_errors() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("image");
        let bytes: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &bytes).unwrap();
        let dev = FileDevice::open(&path).unwrap();
        assert_eq!(dev.size(), 10_000);
        let mut buf = vec![0; 100];
        dev.read_at(5000, &mut buf).unwrap();
        assert_eq!(buf, bytes[5000..5100]);
        let e = dev.read_at(9950, &mut buf).unwrap_err();
        assert!(
            e.to_string().contains("image") && e.to_string().contains("9950"),
            "{e}"
        );
        assert!(dev.read_only());
    }
}
