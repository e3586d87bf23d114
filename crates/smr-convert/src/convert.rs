//! The whole conversion: image source -> flattened tree -> ext4 -> chunks ->
//! store, and the recipe that ties them together.

use crate::chunker::{ChunkError, ChunkStats, ChunkingSink};
use sha2::{Digest, Sha256};
use smr_format::{CdcSizes, ChunkCodec, FileMap, OwnerKey, Recipe};
use smr_image::ext4::{self, Ext4Stats, Ext4Writer};
use smr_image::flatten::{self, FlattenStats, Progress};
use smr_image::source::{ImageSource, Platform, ResolvedImage, SourceError};
use smr_store::ChunkStore;
use std::sync::Arc;

/// The default chunk size: 64 KiB. Chosen by measurement (docs/BENCHMARKS.md,
/// "Lazy serving"): a cold start fetches whole chunks around what the kernel
/// reads, and for `python3 -c 'import numpy'` on Debian that is 12-15% of
/// the image at 64 KiB, 15-17% at 128 KiB and 24% at 512 KiB.
pub const DEFAULT_CHUNK_SIZE: u64 = 64 << 10;

/// How to convert.
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    /// Chunk size (power of two, 64 KiB..4 MiB; default [`DEFAULT_CHUNK_SIZE`]):
    /// every chunk's with fixed chunking, the header's and the ext4 layout
    /// unit with content-defined chunking.
    pub chunk_size: u64,
    /// Content-defined chunking with these sizes; `None` cuts every
    /// `chunk_size`.
    pub cdc: Option<CdcSizes>,
    /// How chunks are sealed.
    pub codec: ChunkCodec,
    /// Which platform to pick from a multi-platform index.
    pub platform: Platform,
    /// The owner key sealing the key table (required when the codec encrypts).
    pub owner: Option<OwnerKey>,
    /// Threads sealing chunks (one per core); storing them has threads of
    /// its own ([`crate::chunker::put_threads`]).
    pub workers: usize,
}

/// What a conversion produced.
#[derive(Debug)]
pub struct ConvertOutput {
    /// The recipe (not yet written anywhere).
    pub recipe: Recipe,
    /// The resolved source image.
    pub image: ResolvedImage,
    /// Chunking counters.
    pub chunks: ChunkStats,
    /// Filesystem counters.
    pub ext4: Ext4Stats,
    /// Flattening counters.
    pub flatten: FlattenStats,
}

/// Errors of a conversion; each names what was wrong.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    /// Reading the image failed.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// A layer could not be applied.
    #[error(transparent)]
    Flatten(Box<flatten::FlattenError>),
    /// The filesystem could not be written.
    #[error(transparent)]
    Ext4(#[from] ext4::Ext4Error),
    /// Chunking the image or storing its chunks failed.
    #[error(transparent)]
    Chunk(#[from] ChunkError),
    /// Building the recipe failed.
    #[error(transparent)]
    Format(#[from] smr_format::FormatError),
}

impl From<flatten::FlattenError> for ConvertError {
    fn from(e: flatten::FlattenError) -> Self {
        ConvertError::Flatten(Box::new(e))
    }
}

/// A 16-byte value derived from the image digest, for filesystem UUIDs and
/// hash seeds: deterministic, yet different per image.
fn derive16(label: &str, digest: &str) -> [u8; 16] {
    let mut h = Sha256::new();
    h.update(label.as_bytes());
    h.update(digest.as_bytes());
    let d = h.finalize();
    let mut out = [0u8; 16];
    out.copy_from_slice(&d[..16]);
    out
}

/// Converts the image `src` into chunks in `store` and returns its recipe.
pub fn convert(
    src: &dyn ImageSource,
    store: Arc<dyn ChunkStore>,
    opts: &ConvertOptions,
    on_progress: &mut dyn FnMut(Progress),
) -> Result<ConvertOutput, ConvertError> {
    smr_format::recipe::check_chunk_size(opts.chunk_size)?;
    if opts.codec.encrypts() && opts.owner.is_none() {
        return Err(smr_format::FormatError::KeyRequired.into());
    }
    let image = src.resolve(&opts.platform)?;
    if let Some(sizes) = &opts.cdc {
        sizes
            .validate()
            .map_err(|e| smr_format::FormatError::Recipe(format!("CDC sizes {e}")))?;
    }
    let sink = ChunkingSink::new(
        opts.chunk_size,
        opts.cdc,
        ext4::header_len(),
        opts.codec.clone(),
        store,
        opts.workers,
    );
    let mut writer = Ext4Writer::new(
        sink,
        ext4::Options {
            chunk_size: opts.chunk_size,
            uuid: derive16("smr ext4 uuid v1", &image.manifest_digest),
            hash_seed: derive16("smr ext4 hash seed v1", &image.manifest_digest),
        },
    );
    let (tree, flatten) = flatten::flatten(src, &image, &mut writer, on_progress)?;
    let (sink, ext4) = writer.finish(&tree)?;
    let chunked = sink.finish(ext4.image_size)?;
    let keys = chunked.keys.as_deref().zip(opts.owner.as_ref());
    let file_map = FileMap::with_groups(
        &chunked.grid,
        ext4.metadata_offset,
        ext4.files.iter().cloned(),
        ext4.groups.iter().cloned(),
    )?;
    let recipe = Recipe::new(
        chunked.grid.clone(),
        image.manifest_digest.clone(),
        image.config.clone(),
        chunked.entries,
        Some(file_map),
        keys,
    )?;
    Ok(ConvertOutput {
        recipe,
        image,
        chunks: chunked.stats,
        ext4,
        flatten,
    })
}
