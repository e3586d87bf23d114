//! Chunk stores: where sealed chunks live, named by their SHA-256.
//!
//! One small trait, [`ChunkStore`], and its backends: a local directory
//! ([`LocalStore`]), an S3-compatible bucket ([`S3Store`]) and a read-only
//! HTTP(S) server or CDN ([`HttpStore`]), all with the layouts of
//! [`packed`]: packs with an index per recipe, or a file per chunk. A backend reads byte ranges of its objects
//! ([`ChunkStore::read_ranges`]) and says where a chunk is
//! ([`ChunkStore::locate`]); what to read, and when, is decided above the
//! stores (smr-node's fetcher). Stores deal in stored (sealed) bytes only;
//! verification against the name happens in the reader
//! (`smr_format::chunk::open_chunk`), so a store can never serve bad bytes
//! unnoticed.
//!
//! The remote stores share one resilience policy ([`Remote`] with
//! [`RemoteOptions`]): timeouts, retries with backoff on transient errors, a
//! deadline per operation and a bound on requests in flight.

pub mod error;
pub mod gc;
pub mod http;
pub mod layered;
pub mod local;
mod location;
pub mod object;
pub mod options;
pub mod packed;
mod retry;
pub mod runtime;
pub mod s3;

pub use error::{Op, Result, StoreError, TransportKind};
pub use http::HttpStore;
pub use layered::Layered;
pub use local::LocalStore;
pub use object::{ByteRange, Extent, ObjectName, Target};
pub use options::{RemoteOptions, DEADLINE_ENV, MAX_IN_FLIGHT_ENV};
pub use packed::BatchStore;
pub use retry::{backoff, Outage, Remote};
pub use s3::{S3Store, S3StoreBuilder};

pub use location::StoreLocation;
use smr_format::ChunkId;

/// What a `put` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    /// The chunk was new and has been written.
    Written,
    /// The chunk was already present; nothing was written.
    Existed,
}

/// Called with the bytes of a read received so far (see
/// [`ChunkStore::read_range_progressive`]).
pub type Progress = std::sync::Arc<dyn Fn(&[u8]) + Send + Sync>;

/// A content-addressed store of sealed chunks.
///
/// A backend implements [`ChunkStore::read_ranges`] (and, if its chunks
/// do not each live in their own object, [`ChunkStore::locate`]);
/// [`ChunkStore::get`] is provided.
pub trait ChunkStore: Send + Sync {
    /// A human-readable location (path or URL, never credentials).
    fn describe(&self) -> String;
    /// Where chunk `id`'s stored bytes are. By default its own object,
    /// `chunks/<2 hex>/<64 hex>`, whole. [`StoreError::Missing`] if the
    /// store knows without asking that it lacks the chunk.
    fn locate(&self, id: &ChunkId) -> Result<Extent> {
        Ok(Extent::own_object(id))
    }
    /// The bytes of each of `ranges` of `object`, in order (unverified:
    /// callers verify). A remote backend issues one request per range
    /// (concurrently), each under the store's retry policy; a range past
    /// the object's end is an error, not a short read.
    fn read_ranges(&self, object: &ObjectName, ranges: &[ByteRange]) -> Result<Vec<Vec<u8>>>;
    /// The bytes of one `range` of `object`, as [`ChunkStore::read_ranges`]
    /// gives them, handing `progress` the bytes received so far (a prefix
    /// of the answer) while they arrive, so that a caller can use the front
    /// of a long read before its end. A retried request starts its prefix
    /// again from empty. By default the answer comes whole and `progress`
    /// is never called.
    fn read_range_progressive(
        &self,
        object: &ObjectName,
        range: ByteRange,
        progress: &Progress,
    ) -> Result<Vec<u8>> {
        let _ = progress;
        self.read_ranges(object, &[range])?
            .pop()
            .ok_or_else(|| StoreError::ChunkIo {
                what: Target::of(object, range),
                store: self.describe(),
                source: std::io::Error::other("the store returned no bytes"),
            })
    }
    /// The stored bytes of chunk `id` (unverified: callers verify): one
    /// [`ChunkStore::read_ranges`] of its [`ChunkStore::locate`]. An error
    /// names the chunk (and the pack holding it).
    fn get(&self, id: &ChunkId) -> Result<Vec<u8>> {
        let extent = self.locate(id)?;
        self.read_ranges(&extent.object, &[extent.range])
            .map_err(|e| match extent.object.chunk() {
                Some(_) => e,
                None => e.about(Target::ChunkIn {
                    id: Box::new(*id),
                    object: extent.object.clone(),
                }),
            })?
            .pop()
            .ok_or_else(|| StoreError::ChunkIo {
                what: Target::Chunk(*id),
                store: self.describe(),
                source: std::io::Error::other("the store returned no bytes for the chunk"),
            })
    }
    /// Whether the store wants its puts in the order of the image (from
    /// one thread) rather than as fast as possible: a store appending to
    /// packs. Default `false`.
    fn ordered_puts(&self) -> bool {
        false
    }
    /// Stores `data` under `id` unless present. `id` must be SHA-256 of `data`.
    fn put(&self, id: &ChunkId, data: &[u8]) -> Result<PutOutcome>;
    /// Whether chunk `id` is present.
    fn exists(&self, id: &ChunkId) -> Result<bool>;
}

/// Opens a store from a location (see [`StoreLocation`]):
///
/// - a directory path or `file://` URL: [`LocalStore`];
/// - `s3://bucket[/prefix]`: [`S3Store`], credentials and endpoint from the
///   `AWS_*` environment;
/// - `http://host[:port][/prefix]`, `https://…`: [`HttpStore`] (read-only).
///
/// Remote stores take [`RemoteOptions::from_env`] (`SMR_STORE_DEADLINE`,
/// `SMR_STORE_MAX_IN_FLIGHT`); anything else is [`StoreError::Unsupported`].
pub fn open_store(location: &str) -> Result<Box<dyn ChunkStore>> {
    location.parse::<StoreLocation>()?.open()
}

/// [`open_store`] with explicit options for remote stores.
pub fn open_store_with(location: &str, options: RemoteOptions) -> Result<Box<dyn ChunkStore>> {
    location.parse::<StoreLocation>()?.open_with(options)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_store_dispatches() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let s = open_store(path.to_str().unwrap()).unwrap();
        assert_eq!(s.describe(), path.display().to_string());
        let s = open_store(&format!("file://{}", path.display())).unwrap();
        assert_eq!(s.describe(), path.display().to_string());
        let s = open_store("https://u:secret@cdn.example/p").unwrap();
        assert_eq!(s.describe(), "https://cdn.example/p");
        let s = open_store_with(
            "s3://bucket/p",
            RemoteOptions::default().with_deadline(std::time::Duration::from_secs(1)),
        )
        .unwrap();
        assert_eq!(s.describe(), "s3://bucket/p");

        let Err(e) = open_store("gs://key:secret@bucket/p") else {
            panic!("gs:// opened")
        };
        let msg = e.to_string();
        assert!(matches!(e, StoreError::Unsupported(_)), "{msg}");
        assert!(!msg.contains("secret"), "{msg}");
        for form in ["file://", "s3://", "http://", "https://"] {
            assert!(msg.contains(form), "{msg}");
        }
    }
}
