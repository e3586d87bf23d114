//! Pins: the chunks of the images in use on the node, kept through an
//! eviction for as long as the budget allows.
//!
//! A process serving an image (a mount's FUSE server, `smr run`, `smr
//! serve-nbd`, a volume's base) writes `DIR/pins/<pid>-<n>`: the image's
//! chunk ids, 32 bytes each, and holds `LOCK_SH` on it while it serves the
//! image; dropping the [`Pin`] removes it. An eviction reads the pin files
//! whose lock is held (one it can lock exclusively belongs to a process
//! that died: it is removed) and takes pinned entries only after every
//! other one, and only while the cache is still over its target. An entry
//! being read is never evicted (its reader's lock, `evict`), pinned or not.

use super::disk::{try_lock_exclusive, Layout};
use smr_format::ChunkId;
use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{self, ErrorKind, Read, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

static NEXT: AtomicU64 = AtomicU64::new(0);
/// Largest pin file read (an image of 1M chunks).
const MAX_PIN_BYTES: u64 = 32 << 20;

/// The chunks of one image in use, pinned until dropped.
#[derive(Debug)]
pub struct Pin {
    path: PathBuf,
    _file: File,
}

impl Drop for Pin {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

fn pins_dir(layout: &Layout) -> PathBuf {
    layout.root.join("pins")
}

/// Pins `ids` for as long as the returned [`Pin`] lives.
pub(crate) fn pin(layout: &Layout, ids: impl IntoIterator<Item = ChunkId>) -> io::Result<Pin> {
    let dir = pins_dir(layout);
    fs::create_dir_all(&dir)?;
    let path = dir.join(format!(
        "{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)?;
    rustix::fs::flock(&file, rustix::fs::FlockOperation::LockShared)?;
    let bytes: Vec<u8> = ids.into_iter().flat_map(|id| id.0).collect();
    file.write_all(&bytes)?;
    Ok(Pin { path, _file: file })
}

/// The chunk ids pinned by live processes; stale pin files are removed.
pub(crate) fn pinned(layout: &Layout) -> io::Result<HashSet<ChunkId>> {
    let mut out = HashSet::new();
    let rd = match fs::read_dir(pins_dir(layout)) {
        Ok(rd) => rd,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for e in rd {
        let path = e?.path();
        let f = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        if try_lock_exclusive(&f)? {
            // Nobody holds it: its process is gone.
            let _ = fs::remove_file(&path);
            continue;
        }
        let mut bytes = Vec::new();
        f.take(MAX_PIN_BYTES).read_to_end(&mut bytes)?;
        for c in bytes.chunks_exact(32) {
            let mut id = [0u8; 32];
            id.copy_from_slice(c);
            out.insert(ChunkId(id));
        }
    }
    Ok(out)
}
