//! Whole-image operations: rebuild the image file (`smr extract`) and check
//! every chunk (`smr verify`).

use crate::chunks::{ChunkError, ImageChunks};
use crossbeam_channel::unbounded;
use smr_store::ChunkStore;
use std::fs::File;
use std::io::Write;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Result of checking every chunk of an image.
#[derive(Debug, Default)]
pub struct VerifyReport {
    /// Chunks checked.
    pub checked: u64,
    /// Stored bytes read.
    pub bytes: u64,
    /// Chunks that failed, each with its error (naming the chunk).
    pub failures: Vec<(u64, ChunkError)>,
}

/// Runs `f` on every chunk-table position with `threads` workers; returns
/// the per-position results in order.
fn for_each_chunk<T: Send, E: Send>(
    img: &ImageChunks,
    threads: usize,
    f: impl Fn(usize) -> Result<T, E> + Sync,
) -> Vec<(usize, Result<T, E>)> {
    for_each_chunk_in(0..img.recipe.chunks.len(), threads, f)
}

/// Runs `f` on the chunk-table positions `positions` with `threads`
/// workers; returns the per-position results in order.
fn for_each_chunk_in<T: Send, E: Send>(
    positions: Range<usize>,
    threads: usize,
    f: impl Fn(usize) -> Result<T, E> + Sync,
) -> Vec<(usize, Result<T, E>)> {
    let (tx, rx) = unbounded();
    for pos in positions {
        let _ = tx.send(pos);
    }
    drop(tx);
    let mut out: Vec<(usize, Result<T, E>)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads.max(1))
            .map(|_| {
                let (rx, f) = (rx.clone(), &f);
                s.spawn(move || rx.iter().map(|pos| (pos, f(pos))).collect::<Vec<_>>())
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("chunk worker panicked"))
            .collect()
    });
    out.sort_by_key(|(pos, _)| *pos);
    out
}

/// Checks that every chunk is present and intact (hash, and decryption and
/// length when keys are available).
pub fn verify(img: &ImageChunks, store: &dyn ChunkStore, threads: usize) -> VerifyReport {
    let mut report = VerifyReport::default();
    for (pos, r) in for_each_chunk(img, threads, |pos| img.fetch(store, pos)) {
        report.checked += 1;
        match r {
            Ok((e, _)) => report.bytes += u64::from(e.stored_len),
            Err(e) => report.failures.push((img.recipe.chunks[pos].index, e)),
        }
    }
    report
}

/// Errors of [`extract`].
#[derive(Debug, thiserror::Error)]
pub enum ExtractError {
    /// A chunk could not be fetched or verified.
    #[error(transparent)]
    Chunk(#[from] ChunkError),
    /// Writing the output failed.
    #[error("{path}: {source}")]
    Io {
        /// The output path.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// The recipe is encrypted and no key was given.
    #[error(transparent)]
    Format(#[from] smr_format::FormatError),
}

/// Refuses an encrypted recipe given without its keys: its chunks could be
/// checked but not decrypted.
fn keys_present(img: &ImageChunks) -> Result<(), ExtractError> {
    if img.keys_missing() {
        return Err(smr_format::FormatError::KeyRequired.into());
    }
    Ok(())
}

/// Rebuilds the image into `out`, verifying every chunk. Writes a sparse
/// temp file next to `out` and renames it into place only when complete.
pub fn extract(
    img: &ImageChunks,
    store: &dyn ChunkStore,
    out: &Path,
    threads: usize,
) -> Result<u64, ExtractError> {
    keys_present(img)?;
    let io_err = |source| ExtractError::Io {
        path: out.display().to_string(),
        source,
    };
    let dir = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.smr-tmp-{}", std::process::id()));
    let result = (|| {
        let file = File::create(&tmp).map_err(io_err)?;
        file.set_len(img.recipe.image_size).map_err(io_err)?;
        for (_, r) in for_each_chunk(img, threads, |pos| {
            let (e, plain) = img.fetch(store, pos)?;
            file.write_all_at(&plain, img.recipe.chunk_start(e.index))
                .map_err(io_err)
        }) {
            r?;
        }
        file.sync_all().map_err(io_err)?;
        std::fs::rename(&tmp, out).map_err(io_err)?;
        Ok(img.recipe.image_size)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Chunks fetched ahead of the writer per worker by [`extract_stream`]:
/// bounds its memory to about `threads * STREAM_AHEAD` chunks.
const STREAM_AHEAD: usize = 4;

/// Writes the image to `out` front to back, verifying every chunk, for
/// outputs that cannot be written out of order or replaced (a pipe, a FIFO,
/// a character device). Holes (chunks the recipe omits because they are
/// zero) are written as zeros. `name` names the output in errors. Chunks
/// are fetched `threads` at a time in windows, and written in order.
pub fn extract_stream(
    img: &ImageChunks,
    store: &dyn ChunkStore,
    out: &mut dyn Write,
    name: &str,
    threads: usize,
) -> Result<u64, ExtractError> {
    keys_present(img)?;
    let io_err = |source| ExtractError::Io {
        path: name.to_string(),
        source,
    };
    let size = img.recipe.image_size;
    let mut written = 0u64;
    let zeros = vec![0u8; 1 << 16];
    let fill = |out: &mut dyn Write, written: &mut u64, to: u64| -> Result<(), ExtractError> {
        while *written < to {
            let n = (to - *written).min(zeros.len() as u64) as usize;
            out.write_all(&zeros[..n]).map_err(io_err)?;
            *written += n as u64;
        }
        Ok(())
    };
    let total = img.recipe.chunks.len();
    let window = threads.max(1) * STREAM_AHEAD;
    let mut start = 0;
    while start < total {
        let end = (start + window).min(total);
        for (_, r) in for_each_chunk_in(start..end, threads, |pos| img.fetch(store, pos)) {
            let (e, plain) = r?;
            fill(out, &mut written, img.recipe.chunk_start(e.index))?;
            out.write_all(&plain).map_err(io_err)?;
            written += plain.len() as u64;
        }
        start = end;
    }
    fill(out, &mut written, size)?;
    out.flush().map_err(io_err)?;
    Ok(size)
}
