//! The per-layer state machine behind [`super::apply_layer`].

use super::meta::entry_meta;
use super::path::{components, display};
use super::{ApplyError, FlattenError, LayerStats, MAX_NAME_LEN};
use crate::tree::{DataSink, Inode, InodeId, Kind, Meta, Tree};
use std::cell::Cell;
use std::collections::{BTreeMap, HashSet};
use std::io::{self, Read};

/// Name of the opaque-directory marker.
const OPAQUE: &[u8] = b".wh..wh..opq";
/// Prefix of whiteout names.
const WH: &[u8] = b".wh.";
/// Prefix of AUFS metadata names (ignored, except [`OPAQUE`]).
const WH_META: &[u8] = b".wh..wh.";
/// Report progress after this many tar bytes.
const PROGRESS_STEP: u64 = 256 << 10;

/// What a (non-whiteout) entry will become.
#[derive(Debug, Clone, Copy)]
enum What {
    File,
    Dir,
    Symlink,
    Hardlink,
    CharDev,
    BlockDev,
    Fifo,
}

/// Applies one layer. `written` holds every (directory, name) this layer
/// has set; `touched` every directory this layer wrote something under.
/// Together they let whiteouts spare same-layer entries in any tar order.
pub(super) struct Applier<'a> {
    tree: &'a mut Tree,
    layer: &'a str,
    sink: &'a mut dyn DataSink,
    written: HashSet<(InodeId, Vec<u8>)>,
    touched: HashSet<InodeId>,
    stats: LayerStats,
}

impl<'a> Applier<'a> {
    pub(super) fn new(tree: &'a mut Tree, layer: &'a str, sink: &'a mut dyn DataSink) -> Self {
        Applier {
            tree,
            layer,
            sink,
            written: HashSet::new(),
            touched: HashSet::new(),
            stats: LayerStats::default(),
        }
    }

    fn stream_err(&self, after: Option<String>, source: ApplyError) -> FlattenError {
        FlattenError::Stream {
            layer: self.layer.to_string(),
            after,
            source,
        }
    }

    /// Reads every entry of `tar`, then the stream to its end.
    /// `progress` gets the tar bytes read, about every [`PROGRESS_STEP`].
    pub(super) fn run(
        mut self,
        tar: impl Read,
        progress: &mut dyn FnMut(u64),
    ) -> Result<LayerStats, FlattenError> {
        self.sink
            .start_layer()
            .map_err(|e| self.stream_err(None, ApplyError::Sink(e)))?;
        let count = Cell::new(0u64);
        let mut counting = Counting {
            inner: tar,
            count: &count,
        };
        let mut last: Option<String> = None;
        let mut reported = 0u64;
        {
            let mut archive = tar::Archive::new(&mut counting);
            let entries = archive
                .entries()
                .map_err(|e| self.stream_err(None, ApplyError::from_read(e)))?;
            for entry in entries {
                let mut entry =
                    entry.map_err(|e| self.stream_err(last.clone(), ApplyError::from_read(e)))?;
                let raw = entry.path_bytes().into_owned();
                let shown = String::from_utf8_lossy(&raw).into_owned();
                if let Err(source) = self.apply_entry(&mut entry, &raw) {
                    return Err(FlattenError::Entry {
                        layer: self.layer.to_string(),
                        path: shown,
                        source,
                    });
                }
                last = Some(shown);
                if count.get() - reported >= PROGRESS_STEP {
                    reported = count.get();
                    progress(reported);
                }
            }
        }
        // Past the end-of-archive blocks: read on, so verification runs.
        io::copy(&mut counting, &mut io::sink())
            .map_err(|e| self.stream_err(last, ApplyError::from_read(e)))?;
        self.stats.tar_bytes = count.get();
        Ok(self.stats)
    }

    fn apply_entry<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        raw: &[u8],
    ) -> Result<(), ApplyError> {
        use tar::EntryType as T;
        self.stats.entries += 1;
        let comps = components(raw).ok_or(ApplyError::PathEscapesRoot)?;
        if let Some(long) = comps.iter().find(|c| c.len() > MAX_NAME_LEN) {
            return Err(ApplyError::NameTooLong {
                name: String::from_utf8_lossy(&long[..32]).into_owned(),
                len: long.len(),
            });
        }
        if comps.last().is_some_and(|n| n.starts_with(WH)) {
            return self.whiteout(&comps);
        }
        let et = entry.header().entry_type();
        let what = match et {
            // Old (v7) archives mark directories with a trailing slash only.
            T::Regular if raw.ends_with(b"/") => What::Dir,
            T::Regular | T::Continuous | T::GNUSparse => What::File,
            T::Directory => What::Dir,
            T::Symlink => What::Symlink,
            T::Link => What::Hardlink,
            T::Char => What::CharDev,
            T::Block => What::BlockDev,
            T::Fifo => What::Fifo,
            other => {
                tracing::warn!(
                    layer = self.layer,
                    path = %String::from_utf8_lossy(raw),
                    entry_type = ?other,
                    "skipping tar entry of unsupported type"
                );
                self.stats.skipped += 1;
                return Ok(());
            }
        };
        let Some((name, parents)) = comps.split_last() else {
            return self.apply_root(entry, what);
        };
        if let What::Hardlink = what {
            let id = self.hardlink_target(entry)?;
            let dir = self.parent_dir(parents)?;
            self.insert(dir, name, id);
            return Ok(());
        }
        let meta = entry_meta(entry)?;
        let dir = self.parent_dir(parents)?;
        let kind = match what {
            What::Dir => {
                if let Some(id) = self.lookup(dir, name).filter(|id| self.is_dir(*id)) {
                    // Existing directory: new metadata, children kept.
                    self.tree.get_mut(id).meta = meta;
                    self.insert(dir, name, id);
                    self.touched.insert(id);
                    return Ok(());
                }
                Kind::Dir {
                    entries: BTreeMap::new(),
                }
            }
            What::File => {
                let size = entry.size();
                let extents = self.write_data(entry, size)?;
                Kind::File { size, extents }
            }
            What::Symlink => Kind::Symlink {
                target: entry
                    .link_name_bytes()
                    .ok_or(ApplyError::MissingLinkName)?
                    .into_owned(),
            },
            What::CharDev | What::BlockDev => {
                let (major, minor) = device(entry.header())?;
                if let What::CharDev = what {
                    Kind::CharDev { major, minor }
                } else {
                    Kind::BlockDev { major, minor }
                }
            }
            What::Fifo => Kind::Fifo,
            What::Hardlink => unreachable!("handled above"),
        };
        let id = self.tree.push(Inode { kind, meta });
        self.insert(dir, name, id);
        if self.is_dir(id) {
            self.touched.insert(id);
        }
        Ok(())
    }

    /// An entry for the root itself (`./`).
    fn apply_root<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        what: What,
    ) -> Result<(), ApplyError> {
        match what {
            What::Dir => {
                let meta = entry_meta(entry)?;
                let root = self.tree.root;
                self.tree.get_mut(root).meta = meta;
                Ok(())
            }
            _ => Err(ApplyError::RootNotDirectory),
        }
    }

    /// Streams the entry's data into the sink.
    fn write_data(
        &mut self,
        entry: &mut dyn Read,
        size: u64,
    ) -> Result<Vec<crate::tree::Extent>, ApplyError> {
        let mut data = EntryData {
            inner: entry,
            size,
            remaining: size,
            failure: None,
        };
        let res = self.sink.write_file(&mut data, size);
        if let Some(f) = data.failure.take() {
            return Err(f);
        }
        let extents = res.map_err(ApplyError::Sink)?;
        if data.remaining != 0 {
            return Err(ApplyError::Sink(io::Error::other(format!(
                "sink consumed {} of {size} bytes",
                size - data.remaining
            ))));
        }
        self.stats.file_bytes += size;
        Ok(extents)
    }

    /// The inode a hard link entry points at.
    fn hardlink_target<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
    ) -> Result<InodeId, ApplyError> {
        let raw = entry
            .link_name_bytes()
            .ok_or(ApplyError::MissingLinkName)?
            .into_owned();
        let target = String::from_utf8_lossy(&raw).into_owned();
        let comps = components(&raw).ok_or_else(|| ApplyError::LinkTargetEscapes {
            target: target.clone(),
        })?;
        match self.find(&comps)? {
            None => Err(ApplyError::LinkTargetMissing { target }),
            Some(id) if self.is_dir(id) => Err(ApplyError::LinkToDirectory { target }),
            Some(id) => Ok(id),
        }
    }

    /// Applies a `.wh.*` entry (the last component of `comps` has the prefix).
    fn whiteout(&mut self, comps: &[Vec<u8>]) -> Result<(), ApplyError> {
        let Some((name, parents)) = comps.split_last() else {
            return Ok(());
        };
        let opaque = name.as_slice() == OPAQUE;
        if !opaque && name.starts_with(WH_META) {
            tracing::debug!(layer = self.layer, "ignoring whiteout metadata entry");
            return Ok(());
        }
        let target = &name[WH.len()..];
        if target.is_empty() || target == b"." || target == b".." {
            return Err(ApplyError::InvalidWhiteout);
        }
        let Some(dir) = self.find(parents)?.filter(|id| self.is_dir(*id)) else {
            return Ok(()); // nothing below a missing parent to delete
        };
        if opaque {
            self.prune(dir);
            return Ok(());
        }
        if self.written.contains(&(dir, target.to_vec())) {
            return Ok(()); // same-layer entry: whiteouts only hide lower layers
        }
        match self.lookup(dir, target) {
            Some(id) if self.is_dir(id) && self.touched.contains(&id) => self.prune(id),
            Some(_) => self.remove(dir, target),
            None => {}
        }
        Ok(())
    }

    /// Removes from `dir`, recursively, everything this layer did not write.
    fn prune(&mut self, dir: InodeId) {
        let mut stack = vec![dir];
        while let Some(d) = stack.pop() {
            let Kind::Dir { entries } = &self.tree.get(d).kind else {
                continue;
            };
            let children: Vec<(Vec<u8>, InodeId)> =
                entries.iter().map(|(k, v)| (k.clone(), *v)).collect();
            for (name, id) in children {
                let is_dir = self.is_dir(id);
                let keep = self.written.contains(&(d, name.clone()))
                    || (is_dir && self.touched.contains(&id));
                if !keep {
                    self.remove(d, &name);
                } else if is_dir {
                    stack.push(id);
                }
            }
        }
    }

    /// Walks to the directory `comps`, creating missing ones (implicit
    /// parents: 0755, root-owned, mtime 0).
    fn parent_dir(&mut self, comps: &[Vec<u8>]) -> Result<InodeId, ApplyError> {
        let mut cur = self.tree.root;
        self.touched.insert(cur);
        for (i, c) in comps.iter().enumerate() {
            cur = match self.lookup(cur, c) {
                Some(id) => match self.tree.get(id).kind {
                    Kind::Dir { .. } => id,
                    Kind::Symlink { .. } => {
                        return Err(ApplyError::SymlinkParent {
                            parent: display(&comps[..=i]),
                        })
                    }
                    _ => {
                        return Err(ApplyError::NotADirectory {
                            parent: display(&comps[..=i]),
                        })
                    }
                },
                None => {
                    let id = self.tree.push(implicit_dir());
                    self.insert(cur, c, id);
                    id
                }
            };
            self.touched.insert(cur);
        }
        Ok(cur)
    }

    /// The inode at `comps`, without creating anything. Symlinks in the
    /// middle are errors; a missing component or a non-directory parent
    /// means "not found".
    fn find(&self, comps: &[Vec<u8>]) -> Result<Option<InodeId>, ApplyError> {
        let mut cur = self.tree.root;
        for (i, c) in comps.iter().enumerate() {
            let Some(id) = self.lookup(cur, c) else {
                return Ok(None);
            };
            if i + 1 == comps.len() {
                return Ok(Some(id));
            }
            match self.tree.get(id).kind {
                Kind::Dir { .. } => cur = id,
                Kind::Symlink { .. } => {
                    return Err(ApplyError::SymlinkParent {
                        parent: display(&comps[..=i]),
                    })
                }
                _ => return Ok(None),
            }
        }
        Ok(Some(cur))
    }

    fn is_dir(&self, id: InodeId) -> bool {
        matches!(self.tree.get(id).kind, Kind::Dir { .. })
    }

    fn lookup(&self, dir: InodeId, name: &[u8]) -> Option<InodeId> {
        match &self.tree.get(dir).kind {
            Kind::Dir { entries } => entries.get(name).copied(),
            _ => None,
        }
    }

    fn insert(&mut self, dir: InodeId, name: &[u8], id: InodeId) {
        if let Kind::Dir { entries } = &mut self.tree.get_mut(dir).kind {
            entries.insert(name.to_vec(), id);
        }
        self.written.insert((dir, name.to_vec()));
    }

    fn remove(&mut self, dir: InodeId, name: &[u8]) {
        if let Kind::Dir { entries } = &mut self.tree.get_mut(dir).kind {
            entries.remove(name);
        }
    }
}

fn implicit_dir() -> Inode {
    Inode {
        kind: Kind::Dir {
            entries: BTreeMap::new(),
        },
        meta: Meta {
            mode: 0o755,
            ..Meta::default()
        },
    }
}

fn device(h: &tar::Header) -> Result<(u32, u32), ApplyError> {
    let bad = |field: &'static str| {
        move |e: io::Error| ApplyError::InvalidHeader {
            field,
            detail: e.to_string(),
        }
    };
    let major = h.device_major().map_err(bad("device major"))?.unwrap_or(0);
    let minor = h.device_minor().map_err(bad("device minor"))?.unwrap_or(0);
    Ok((major, minor))
}

/// Counts bytes read from the layer stream.
struct Counting<'c, R> {
    inner: R,
    count: &'c Cell<u64>,
}

impl<R: Read> Read for Counting<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.set(self.count.get() + n as u64);
        Ok(n)
    }
}

/// One file's data as handed to the sink: exactly `size` bytes, or an error
/// that is kept typed in `failure` (the sink only sees an `io::Error`).
struct EntryData<'e> {
    inner: &'e mut dyn Read,
    size: u64,
    remaining: u64,
    failure: Option<ApplyError>,
}

impl Read for EntryData<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 || buf.is_empty() {
            return Ok(0);
        }
        let max = buf
            .len()
            .min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
        match self.inner.read(&mut buf[..max]) {
            Ok(0) => {
                let e = ApplyError::Truncated {
                    expected: self.size,
                    actual: self.size - self.remaining,
                };
                let msg = e.to_string();
                self.failure = Some(e);
                Err(io::Error::new(io::ErrorKind::UnexpectedEof, msg))
            }
            Ok(n) => {
                self.remaining -= n as u64;
                Ok(n)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Err(e),
            Err(e) => {
                let out = io::Error::new(e.kind(), e.to_string());
                self.failure = Some(ApplyError::from_read(e));
                Err(out)
            }
        }
    }
}
