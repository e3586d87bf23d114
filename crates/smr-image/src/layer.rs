//! Layer blobs as verified tar streams: media type check, decompression, and
//! digest verification of both the stored and the uncompressed bytes.
//!
//! [`open_layer`] stacks: blob bytes -> [`VerifyingReader`] (blob digest and
//! size) -> gzip / zstd decoder -> diff_id hash. Both checks happen when the
//! tar stream reaches its end: the reader that sees the decompressed end
//! drains the rest of the blob (trailing bytes included), then compares. A
//! mismatch is an `io::Error` of kind `InvalidData` carrying a
//! [`SourceError::DigestMismatch`] / [`SourceError::DiffIdMismatch`] (get it
//! back with [`crate::source::digest::source_error_in`]). So the consumer
//! must read to EOF ([`crate::flatten`] does) for the bytes to count as
//! verified.

use crate::media_types::{
    DOCKER_ARCHIVE_LAYER, DOCKER_FOREIGN_LAYER_GZIP, DOCKER_LAYER_GZIP, OCI_LAYER, OCI_LAYER_GZIP,
    OCI_LAYER_ZSTD, OCI_NONDIST_LAYER, OCI_NONDIST_LAYER_GZIP, OCI_NONDIST_LAYER_ZSTD,
};
use crate::source::digest::VerifyingReader;
use crate::source::{ImageSource, LayerInfo, SourceError};
use sha2::{Digest as _, Sha256};
use std::io::{self, BufRead, BufReader, Read};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// A plain tar.
    None,
    /// gzip (possibly several members).
    Gzip,
    /// zstd (possibly several frames).
    Zstd,
    /// Decided from the first bytes of the blob (docker-archive layers).
    Detect,
}

impl Compression {
    /// The compression a layer media type declares. Rejects Docker foreign
    /// layers and anything unknown, naming the layer.
    pub fn for_layer(layer: &LayerInfo) -> Result<Self, SourceError> {
        Ok(match layer.media_type.as_str() {
            OCI_LAYER | OCI_NONDIST_LAYER => Compression::None,
            OCI_LAYER_GZIP | OCI_NONDIST_LAYER_GZIP | DOCKER_LAYER_GZIP => Compression::Gzip,
            OCI_LAYER_ZSTD | OCI_NONDIST_LAYER_ZSTD => Compression::Zstd,
            DOCKER_ARCHIVE_LAYER => Compression::Detect,
            mt @ DOCKER_FOREIGN_LAYER_GZIP => {
                return Err(SourceError::ForeignLayer {
                    digest: layer.digest.clone(),
                    media_type: mt.to_string(),
                })
            }
            mt => {
                return Err(SourceError::UnsupportedMediaType {
                    digest: layer.digest.clone(),
                    media_type: mt.to_string(),
                })
            }
        })
    }

    /// The compression named by a blob's first bytes (plain tar otherwise).
    pub fn sniff(magic: &[u8]) -> Sniffed {
        if magic.starts_with(&[0x1f, 0x8b]) {
            Sniffed::Known(Compression::Gzip)
        } else if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Sniffed::Known(Compression::Zstd)
        } else if magic.starts_with(b"BZh") {
            Sniffed::Unsupported("bzip2")
        } else if magic.starts_with(&[0xfd, b'7', b'z', b'X', b'Z']) {
            Sniffed::Unsupported("xz")
        } else {
            Sniffed::Known(Compression::None)
        }
    }
}

/// The result of [`Compression::sniff`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sniffed {
    /// A compression we read (or none).
    Known(Compression),
    /// A compression we recognise but do not read.
    Unsupported(&'static str),
}

impl Sniffed {
    /// Whether the bytes are compressed (by anything).
    pub fn is_compressed(self) -> bool {
        self != Sniffed::Known(Compression::None)
    }
}

type Raw<'a> = BufReader<VerifyingReader<Box<dyn Read + Send + 'a>>>;

enum Decoder<'a> {
    Plain(Raw<'a>),
    Gzip(Box<flate2::bufread::MultiGzDecoder<Raw<'a>>>),
    Zstd(zstd::stream::read::Decoder<'static, Raw<'a>>),
}

impl<'a> Decoder<'a> {
    fn raw(&mut self) -> &mut Raw<'a> {
        match self {
            Decoder::Plain(r) => r,
            Decoder::Gzip(d) => d.get_mut(),
            Decoder::Zstd(d) => d.get_mut(),
        }
    }

    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Decoder::Plain(r) => r.read(buf),
            Decoder::Gzip(d) => d.read(buf),
            Decoder::Zstd(d) => d.read(buf),
        }
    }
}

/// Byte counters of a [`LayerStream`], readable while it is being consumed.
#[derive(Debug, Clone)]
pub struct LayerCounters {
    compressed: Arc<AtomicU64>,
    uncompressed: Arc<AtomicU64>,
}

impl LayerCounters {
    /// Blob bytes read so far.
    pub fn compressed_bytes(&self) -> u64 {
        self.compressed.load(Ordering::Relaxed)
    }

    /// Tar bytes produced so far.
    pub fn uncompressed_bytes(&self) -> u64 {
        self.uncompressed.load(Ordering::Relaxed)
    }
}

/// A layer's uncompressed tar stream, verified at EOF (see module docs).
pub struct LayerStream<'a> {
    decoder: Decoder<'a>,
    hasher: Sha256,
    layer: String,
    diff_id: String,
    counters: LayerCounters,
    done: bool,
}

impl LayerStream<'_> {
    /// Counters for progress reports.
    pub fn counters(&self) -> LayerCounters {
        self.counters.clone()
    }
}

impl Read for LayerStream<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() || self.done {
            return Ok(0);
        }
        let n = self.decoder.read(buf)?;
        if n > 0 {
            self.hasher.update(&buf[..n]);
            self.counters
                .uncompressed
                .fetch_add(n as u64, Ordering::Relaxed);
            return Ok(n);
        }
        // End of the tar: drain the blob (verifies digest and size), then
        // check the diff_id.
        io::copy(self.decoder.raw(), &mut io::sink())?;
        self.done = true;
        let actual = format!("sha256:{}", hex::encode(self.hasher.clone().finalize()));
        if actual != self.diff_id {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                SourceError::DiffIdMismatch {
                    layer: self.layer.clone(),
                    expected: self.diff_id.clone(),
                    actual,
                },
            ));
        }
        Ok(0)
    }
}

/// Opens `layer` of `src` as a tar byte stream (see module docs).
///
/// Fails at once for an unsupported media type or compression, a missing
/// blob, or a blob whose first bytes cannot be read; digest mismatches and
/// decompression errors surface as read errors.
pub fn open_layer<'a>(
    src: &'a dyn ImageSource,
    layer: &LayerInfo,
) -> Result<LayerStream<'a>, SourceError> {
    let declared = Compression::for_layer(layer)?;
    crate::source::digest::parse_digest(&layer.diff_id)?;
    let blob = src.open_blob(&layer.digest)?;
    let verifying = VerifyingReader::new(blob, &layer.digest, Some(layer.size));
    let compressed = verifying.counter();
    let mut raw = BufReader::with_capacity(256 << 10, verifying);
    let compression = match declared {
        Compression::Detect => {
            let head = raw.fill_buf().map_err(|source| SourceError::Io {
                path: format!("layer {}", layer.digest).into(),
                source,
            })?;
            match Compression::sniff(head) {
                Sniffed::Known(c) => c,
                Sniffed::Unsupported(name) => {
                    return Err(SourceError::UnsupportedCompression {
                        digest: layer.digest.clone(),
                        compression: name,
                    })
                }
            }
        }
        c => c,
    };
    let decoder = match compression {
        Compression::Gzip => Decoder::Gzip(Box::new(flate2::bufread::MultiGzDecoder::new(raw))),
        Compression::Zstd => Decoder::Zstd(zstd::stream::read::Decoder::with_buffer(raw).map_err(
            |source| SourceError::Io {
                path: format!("layer {}", layer.digest).into(),
                source,
            },
        )?),
        Compression::None | Compression::Detect => Decoder::Plain(raw),
    };
    tracing::debug!(layer = %layer.digest, ?compression, "opened layer");
    Ok(LayerStream {
        decoder,
        hasher: Sha256::new(),
        layer: layer.digest.clone(),
        diff_id: layer.diff_id.clone(),
        counters: LayerCounters {
            compressed,
            uncompressed: Arc::new(AtomicU64::new(0)),
        },
        done: false,
    })
}
