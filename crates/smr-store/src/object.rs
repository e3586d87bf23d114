//! Where stored bytes live: objects of a store and byte ranges of them.
//!
//! A store holds objects (files, S3 objects, registry blobs). A chunk's
//! stored bytes are a byte range of one object ([`Extent`]): the whole of
//! its own object `chunks/<2 hex>/<64 hex>` in directory, HTTP(S) and S3
//! stores, a slice of a pack in a registry. Readers ask for ranges
//! ([`crate::ChunkStore::read_ranges`]); the layer above decides which.

use smr_format::ChunkId;
use std::fmt;
use std::sync::Arc;

/// The name of an object in a store, relative to the store's location
/// (`chunks/ab/ab12…`, or a pack's `sha256:…` digest). Cheap to clone.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectName(Arc<str>);

impl ObjectName {
    /// An object named `name`.
    pub fn new(name: impl Into<Arc<str>>) -> Self {
        ObjectName(name.into())
    }

    /// The object holding chunk `id` alone: `chunks/<2 hex>/<64 hex>`.
    pub fn of_chunk(id: &ChunkId) -> Self {
        let hex = id.to_hex();
        ObjectName::new(format!("chunks/{}/{hex}", &hex[..2]))
    }

    /// The chunk whose own object this is (`chunks/<2 hex>/<64 hex>`).
    pub fn chunk(&self) -> Option<ChunkId> {
        let hex = self.0.strip_prefix("chunks/")?;
        let (fanout, hex) = hex.split_once('/')?;
        let id: ChunkId = hex.parse().ok()?;
        (hex.get(..2) == Some(fanout)).then_some(id)
    }

    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ObjectName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ObjectName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

/// Bytes of an object: `len` bytes from `offset`, or everything from
/// `offset` to the object's end when `len` is `None`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct ByteRange {
    /// First byte.
    pub offset: u64,
    /// Length, `None` for "to the end".
    pub len: Option<u64>,
}

impl ByteRange {
    /// The whole object.
    pub const WHOLE: ByteRange = ByteRange {
        offset: 0,
        len: None,
    };

    /// `len` bytes from `offset`.
    pub fn new(offset: u64, len: u64) -> Self {
        ByteRange {
            offset,
            len: Some(len),
        }
    }

    /// The end (exclusive), when the length is known.
    pub fn end(&self) -> Option<u64> {
        self.len.map(|l| self.offset.saturating_add(l))
    }

    /// Whether this is the whole object.
    pub fn is_whole(&self) -> bool {
        *self == ByteRange::WHOLE
    }
}

impl fmt::Display for ByteRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.end() {
            Some(end) => write!(f, "bytes {}..{end}", self.offset),
            None if self.offset == 0 => f.write_str("whole"),
            None => write!(f, "bytes {}..", self.offset),
        }
    }
}

/// Where a chunk's stored bytes are: a range of one object.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct Extent {
    /// The object.
    pub object: ObjectName,
    /// The chunk's bytes in it.
    pub range: ByteRange,
}

impl Extent {
    /// The whole of chunk `id`'s own object (directory, HTTP, S3 stores).
    pub fn own_object(id: &ChunkId) -> Self {
        Extent {
            object: ObjectName::of_chunk(id),
            range: ByteRange::WHOLE,
        }
    }
}

/// What a store error is about: a chunk, or a range of an object.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Target {
    /// A chunk, by name.
    Chunk(ChunkId),
    /// A range of an object (e.g. several chunks of a pack at once).
    Range {
        /// The object.
        object: ObjectName,
        /// The bytes asked for.
        range: ByteRange,
    },
    /// A chunk stored as a range of a larger object (a pack).
    ChunkIn {
        /// The chunk (boxed: keeps every store error small).
        id: Box<ChunkId>,
        /// The object holding it.
        object: ObjectName,
    },
}

impl Target {
    /// What a read of `range` of `object` is about: the chunk, when the
    /// object is a chunk's own and the whole of it is read; else the range.
    pub fn of(object: &ObjectName, range: ByteRange) -> Self {
        match object.chunk() {
            Some(id) if range.is_whole() => Target::Chunk(id),
            _ => Target::Range {
                object: object.clone(),
                range,
            },
        }
    }

    /// The chunk, when the error is about one.
    pub fn chunk(&self) -> Option<ChunkId> {
        match self {
            Target::Chunk(id) => Some(*id),
            Target::ChunkIn { id, .. } => Some(**id),
            Target::Range { .. } => None,
        }
    }
}

impl From<ChunkId> for Target {
    fn from(id: ChunkId) -> Self {
        Target::Chunk(id)
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Chunk(id) => write!(f, "chunk {id}"),
            Target::Range { object, range } if range.is_whole() => write!(f, "object {object}"),
            Target::Range { object, range } => write!(f, "object {object} {range}"),
            Target::ChunkIn { id, object } => write!(f, "chunk {id} (in {object})"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_display() {
        let id = ChunkId([0xab; 32]);
        let name = ObjectName::of_chunk(&id);
        assert_eq!(name.as_str(), format!("chunks/ab/{}", id.to_hex()));
        assert_eq!(Target::from(id).to_string(), format!("chunk {id}"));
        let t = Target::Range {
            object: ObjectName::new("sha256:00"),
            range: ByteRange::new(10, 5),
        };
        assert_eq!(t.to_string(), "object sha256:00 bytes 10..15");
        assert_eq!(t.chunk(), None);
        assert_eq!(ByteRange::WHOLE.end(), None);
        assert!(Extent::own_object(&id).range.is_whole());
        assert_eq!(name.chunk(), Some(id));
        assert_eq!(Target::of(&name, ByteRange::WHOLE), Target::Chunk(id));
        assert!(matches!(
            Target::of(&name, ByteRange::new(0, 1)),
            Target::Range { .. }
        ));
        assert_eq!(ObjectName::new("chunks/00/zz").chunk(), None);
    }
}
