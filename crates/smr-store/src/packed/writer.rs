//! [`PackWriter`]: appends sealed chunks, in the order they come, to pack
//! files under a store's `packs/` directory, cutting packs where
//! [`smr_format::pack`]'s content-defined rule says (and at
//! [`MAX_PACK_BYTES`]). Packs are written under temp names (`.tmp-*`) and
//! only named ([`super::pack_name`]) when the store commits them.

use crate::local::TEMP_PREFIX;
use crate::ObjectName;
use smr_format::pack::PackParams;
use smr_format::ChunkId;
use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// A pack is always closed once it holds this many bytes (16 MiB), however
/// large its chunks.
pub const MAX_PACK_BYTES: u64 = 4 * smr_format::pack::DEFAULT_PACK_BYTES;

/// One chunk in a pack: its id, offset and stored length.
pub type PackEntry = (ChunkId, u64, u32);

/// A pack being filled.
struct OpenPack {
    file: File,
    /// Its temp name, relative to the store root (`packs/.tmp-…`).
    name: ObjectName,
    chunks: Vec<PackEntry>,
    len: u64,
}

/// A complete pack, still under its temp name.
#[derive(Debug)]
pub struct SealedPack {
    /// Temp name relative to the store root.
    pub temp: ObjectName,
    /// Its name once committed ([`super::pack_name`]).
    pub digest: [u8; 32],
    /// Its chunks in order.
    pub chunks: Vec<PackEntry>,
    /// Its length.
    pub len: u64,
}

/// Appends chunks to packs (see the module docs).
pub struct PackWriter {
    root: PathBuf,
    params: PackParams,
    open: Option<OpenPack>,
    sealed: Vec<SealedPack>,
}

/// Temp names unique in this process (the pid makes them unique among
/// processes; `create_new` catches a stale file of a dead process).
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

impl PackWriter {
    /// A writer of packs under `root/packs`, cut with `params`.
    pub fn new(root: &Path, params: PackParams) -> Self {
        PackWriter {
            root: root.to_path_buf(),
            params,
            open: None,
            sealed: Vec::new(),
        }
    }

    /// Appends chunk `id` (its stored bytes `data`); returns the temp name
    /// of its pack and its offset there. Closes the pack after it where
    /// the cut rule says.
    pub fn append(&mut self, id: &ChunkId, data: &[u8]) -> std::io::Result<(ObjectName, u64)> {
        if self.open.is_none() {
            self.open = Some(self.create()?);
        }
        let Some(p) = self.open.as_mut() else {
            unreachable!("opened above")
        };
        p.file.write_all(data)?;
        let at = p.len;
        p.chunks.push((*id, at, data.len() as u32));
        p.len += data.len() as u64;
        let name = p.name.clone();
        if self.params.cut_after(id, p.chunks.len() as u32) || p.len >= MAX_PACK_BYTES {
            self.seal()?;
        }
        Ok((name, at))
    }

    /// Closes the pack being filled, if any.
    pub fn seal(&mut self) -> std::io::Result<()> {
        let Some(p) = self.open.take() else {
            return Ok(());
        };
        super::start_writeback(&p.file);
        self.sealed.push(SealedPack {
            temp: p.name,
            digest: super::pack_name(&p.chunks),
            chunks: p.chunks,
            len: p.len,
        });
        Ok(())
    }

    /// The sealed packs, handed over (the caller renames them into place).
    pub fn take_sealed(&mut self) -> Vec<SealedPack> {
        std::mem::take(&mut self.sealed)
    }

    /// Hands back sealed packs the caller could not rename (a later
    /// commit retries them).
    pub fn restore(&mut self, packs: Vec<SealedPack>) {
        self.sealed.splice(0..0, packs);
    }

    /// Temp names of every pack not yet handed over (to remove them).
    pub fn temp_names(&self) -> impl Iterator<Item = &ObjectName> {
        self.sealed
            .iter()
            .map(|p| &p.temp)
            .chain(self.open.as_ref().map(|p| &p.name))
    }

    fn create(&self) -> std::io::Result<OpenPack> {
        let dir = self.root.join(super::PACKS_DIR);
        std::fs::create_dir_all(&dir)?;
        loop {
            let name = format!(
                "{}/{TEMP_PREFIX}pack-{}-{}",
                super::PACKS_DIR,
                std::process::id(),
                TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
            );
            match OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(self.root.join(&name))
            {
                Ok(file) => {
                    return Ok(OpenPack {
                        file,
                        name: ObjectName::new(name),
                        chunks: Vec::new(),
                        len: 0,
                    })
                }
                Err(e) if e.kind() == ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
    }
}
