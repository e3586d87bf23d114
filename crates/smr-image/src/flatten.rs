//! Applying layers in order, with OCI whiteouts, into a [`crate::tree::Tree`].
//!
//! Nothing is written to the host filesystem: the tree is in-memory metadata
//! and file bytes go to a [`DataSink`]. The semantics follow containerd's
//! `apply` / `umoci unpack`, with these choices:
//!
//! - **Paths** are cleaned lexically: leading `/` and `./` are stripped (so
//!   `/etc/x` is `etc/x`, as tar tools do), `.` and empty components dropped,
//!   `..` pops a component; a `..` that would leave the root is an error.
//!   Non-UTF-8 names are kept as bytes.
//! - **Symlinks are never followed**: an entry (or hard link target) whose
//!   parent path contains a symlink is an error ([`ApplyError::SymlinkParent`])
//!   rather than resolved inside the root as containerd does. Layers written
//!   by docker/buildkit record real paths, so this only rejects crafted input.
//! - **Implicit parent directories** are created with mode 0755, uid/gid 0,
//!   mtime 0, no xattrs (containerd does the same, bar the mtime).
//! - **Root entries** (`./`) that are directories update the root's metadata;
//!   anything else at the root is an error.
//! - **Whiteouts** (`.wh.NAME`, `.wh..wh..opq`) apply to lower layers only:
//!   entries this layer wrote survive them regardless of tar order. Other
//!   `.wh..wh.*` names (AUFS metadata) are ignored. Whiteouts never appear in
//!   the tree. A whiteout of a missing path is ignored.
//! - **Replacement**: a later entry for the same path wins; a non-directory
//!   gets a new inode (hard links to the old one keep it); a directory entry
//!   over a directory replaces its metadata and keeps its children.
//! - **Hard links** resolve their target in the tree as it is when the entry
//!   is applied; missing targets and directories are errors.
//! - **Unsupported entry types** (volume labels, global PAX headers, …) are
//!   skipped with a warning and counted in [`LayerStats::skipped`].
//! - **Metadata**: `mode & 0o7777`, uid/gid (PAX over header, base-256
//!   headers allowed, must fit 32 bits), mtime (PAX with fractions over
//!   header), xattrs from PAX `SCHILY.xattr.*` and `LIBARCHIVE.xattr.*`.

mod apply;
mod meta;
mod path;

use crate::layer::{open_layer, Compression};
use crate::source::{ImageSource, ResolvedImage, SourceError};
use crate::tree::{DataSink, Tree};
use std::io::Read;

/// Longest name of a directory entry (ext4's limit, as Linux's NAME_MAX).
pub const MAX_NAME_LEN: usize = 255;

/// Counts for one applied layer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LayerStats {
    /// Tar entries seen (including whiteouts and skipped ones).
    pub entries: u64,
    /// Regular file bytes handed to the sink.
    pub file_bytes: u64,
    /// Uncompressed tar bytes read.
    pub tar_bytes: u64,
    /// Entries skipped because their type is not representable.
    pub skipped: u64,
}

/// Counts for a whole flatten.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlattenStats {
    /// Layers applied.
    pub layers: usize,
    /// Tar entries seen.
    pub entries: u64,
    /// Regular file bytes handed to the sink.
    pub file_bytes: u64,
    /// Uncompressed tar bytes read.
    pub tar_bytes: u64,
    /// Entries skipped (unsupported types).
    pub skipped: u64,
}

impl FlattenStats {
    fn add(&mut self, l: &LayerStats) {
        self.layers += 1;
        self.entries += l.entries;
        self.file_bytes += l.file_bytes;
        self.tar_bytes += l.tar_bytes;
        self.skipped += l.skipped;
    }
}

/// Where a flatten is, for progress bars.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Index of the current layer (0-based).
    pub layer_index: usize,
    /// Number of layers.
    pub layer_count: usize,
    /// Blob bytes of the current layer read so far.
    pub compressed_bytes: u64,
    /// Size of the current layer's blob.
    pub compressed_size: u64,
    /// Tar bytes of the current layer read so far.
    pub uncompressed_bytes: u64,
    /// Whether the current layer is finished.
    pub layer_done: bool,
}

/// What went wrong with one entry (or the stream) of a layer.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// A `..` component leads out of the root.
    #[error("path escapes the root")]
    PathEscapesRoot,
    /// A path component longer than ext4 allows in a directory entry.
    #[error("name `{name}…` is {len} bytes; ext4 allows at most {MAX_NAME_LEN}")]
    NameTooLong {
        /// The component's first 32 bytes (the entry names the whole path).
        name: String,
        /// Its length in bytes.
        len: usize,
    },
    /// A parent component is a symlink (never followed).
    #[error("parent `{parent}` is a symlink (path traversal via symlink)")]
    SymlinkParent {
        /// The symlink's path.
        parent: String,
    },
    /// A parent component is neither a directory nor a symlink.
    #[error("parent `{parent}` is not a directory")]
    NotADirectory {
        /// The offending path.
        parent: String,
    },
    /// A non-directory entry for the root itself.
    #[error("entry replaces the root directory with a non-directory")]
    RootNotDirectory,
    /// A whiteout with an empty or special name.
    #[error("invalid whiteout name")]
    InvalidWhiteout,
    /// A link entry without a link name.
    #[error("link entry has no link name")]
    MissingLinkName,
    /// A hard link whose target path escapes the root.
    #[error("hard link target `{target}` escapes the root")]
    LinkTargetEscapes {
        /// The link name as given.
        target: String,
    },
    /// A hard link to a path that does not exist (yet).
    #[error("hard link target `{target}` does not exist")]
    LinkTargetMissing {
        /// The link name as given.
        target: String,
    },
    /// A hard link to a directory.
    #[error("hard link target `{target}` is a directory")]
    LinkToDirectory {
        /// The link name as given.
        target: String,
    },
    /// A header field that does not parse or does not fit.
    #[error("invalid {field} in header: {detail}")]
    InvalidHeader {
        /// Which field (`mode`, `uid`, `mtime`, `pax`, …).
        field: &'static str,
        /// What was wrong.
        detail: String,
    },
    /// The stream ended inside the entry's data.
    #[error("truncated: data ends after {actual} of {expected} bytes")]
    Truncated {
        /// Size from the header.
        expected: u64,
        /// Bytes that were there.
        actual: u64,
    },
    /// Digest or size verification of the layer failed.
    #[error(transparent)]
    Verify(SourceError),
    /// Reading or decompressing the layer failed.
    #[error("reading layer: {0}")]
    Read(#[source] std::io::Error),
    /// The data sink failed.
    #[error("data sink: {0}")]
    Sink(#[source] std::io::Error),
}

impl ApplyError {
    /// Classifies a read error: verification failures keep their type.
    pub(crate) fn from_read(e: std::io::Error) -> Self {
        match crate::source::digest::source_error_in(e) {
            Ok(se) => ApplyError::Verify(se),
            Err(e) => ApplyError::Read(e),
        }
    }
}

/// Errors of [`flatten`] and [`apply_layer`].
#[derive(Debug, thiserror::Error)]
pub enum FlattenError {
    /// An entry could not be applied.
    #[error("layer {layer}: entry `{path}`: {source}")]
    Entry {
        /// The layer's blob digest.
        layer: String,
        /// The entry's path as found in the archive (lossy UTF-8).
        path: String,
        /// What went wrong.
        #[source]
        source: ApplyError,
    },
    /// The layer stream failed outside any entry (a header, the end).
    #[error("layer {layer}: {}{source}", after.as_ref().map(|p| format!("after entry `{p}`: ")).unwrap_or_default())]
    Stream {
        /// The layer's blob digest.
        layer: String,
        /// The last entry read before the failure, if any.
        after: Option<String>,
        /// What went wrong.
        #[source]
        source: ApplyError,
    },
    /// The layer could not be opened.
    #[error(transparent)]
    Source(#[from] SourceError),
}

impl FlattenError {
    /// The layer the error is about, when known.
    pub fn layer(&self) -> Option<&str> {
        match self {
            FlattenError::Entry { layer, .. } | FlattenError::Stream { layer, .. } => Some(layer),
            FlattenError::Source(_) => None,
        }
    }
}

/// Applies one layer's tar stream to `tree`, sending file data to `sink`
/// (`layer_digest` names the layer in errors). Reads `tar` to its end, so a
/// verifying stream from [`open_layer`] gets checked.
pub fn apply_layer(
    tree: &mut Tree,
    tar: impl Read,
    layer_digest: &str,
    sink: &mut dyn DataSink,
) -> Result<LayerStats, FlattenError> {
    apply::Applier::new(tree, layer_digest, sink).run(tar, &mut |_| {})
}

/// Flattens all layers of `image` into a new tree, in order.
///
/// Media types of all layers are checked before the first is read.
/// `on_progress` is called at the start and end of each layer and about
/// every 256 KiB of tar data in between.
pub fn flatten(
    src: &dyn ImageSource,
    image: &ResolvedImage,
    sink: &mut dyn DataSink,
    on_progress: &mut dyn FnMut(Progress),
) -> Result<(Tree, FlattenStats), FlattenError> {
    for layer in &image.layers {
        Compression::for_layer(layer)?;
    }
    let mut tree = Tree::new();
    let mut stats = FlattenStats::default();
    let layer_count = image.layers.len();
    for (layer_index, layer) in image.layers.iter().enumerate() {
        let _span =
            tracing::info_span!("layer", index = layer_index, digest = %layer.digest).entered();
        let stream = open_layer(src, layer)?;
        let counters = stream.counters();
        let mut report = |done: bool| {
            on_progress(Progress {
                layer_index,
                layer_count,
                compressed_bytes: counters.compressed_bytes(),
                compressed_size: layer.size,
                uncompressed_bytes: counters.uncompressed_bytes(),
                layer_done: done,
            })
        };
        report(false);
        // Decompression and the digests run a few MiB ahead on a thread of
        // their own, beside the tar parsing and the filesystem writes here.
        let ls = std::thread::scope(|s| {
            let ahead = crate::readahead::ReadAhead::spawn(s, stream);
            apply::Applier::new(&mut tree, &layer.digest, sink).run(ahead, &mut |_| report(false))
        })?;
        report(true);
        tracing::info!(
            entries = ls.entries,
            file_bytes = ls.file_bytes,
            skipped = ls.skipped,
            "layer applied"
        );
        stats.add(&ls);
    }
    Ok((tree, stats))
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_bad;
