//! Snapshot metadata in an embedded, crash-safe store (redb: copy-on-write
//! B-trees with checksummed commits, so a kill at any point leaves either
//! the last committed state or the one before it, never a torn one).
//!
//! One table maps a snapshot's name (containerd's key or committed name) to
//! its [`Record`] as JSON; a second holds the id sequence that names the
//! snapshots' directories.

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

const SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshots");
const SEQUENCE: TableDefinition<&str, u64> = TableDefinition::new("sequence");
const NEXT_ID: &str = "next_id";

/// Errors of the metadata store.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    /// The database failed (I/O, corruption, lock).
    #[error("snapshot metadata {what}: {source}")]
    Db {
        /// The operation.
        what: &'static str,
        /// The cause.
        source: redb::Error,
    },
    /// A record did not decode.
    #[error("snapshot metadata record {name:?} is corrupt: {source}")]
    Record {
        /// The snapshot.
        name: String,
        /// The cause.
        source: serde_json::Error,
    },
}

fn db_err<E: Into<redb::Error>>(what: &'static str) -> impl FnOnce(E) -> MetaError {
    move |e| MetaError::Db {
        what,
        source: e.into(),
    }
}

/// What a snapshot is (containerd's `snapshots.Kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    /// Read-only, made by `View`.
    View,
    /// Writable, made by `Prepare`.
    Active,
    /// Immutable, made by `Commit` (or a remote layer).
    Committed,
}

/// A layer that is part of a lazily mounted smr image rather than a
/// directory on disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteLayer {
    /// `docker://host/repo@sha256:…` of the image manifest.
    pub image: String,
    /// The manifest digest.
    pub manifest: String,
    /// The layer blob's digest.
    pub layer: String,
    /// Whether this is the image's top layer: its snapshot is the whole
    /// flattened image.
    pub top: bool,
}

/// One snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Names the snapshot's directory `snapshots/<id>`.
    pub id: u64,
    /// Its kind.
    pub kind: Kind,
    /// The parent's name, if any.
    pub parent: Option<String>,
    /// containerd's labels.
    pub labels: BTreeMap<String, String>,
    /// Creation time, nanoseconds since the epoch.
    pub created: u128,
    /// Last update, nanoseconds since the epoch.
    pub updated: u128,
    /// Set for a layer served from an smr image.
    pub remote: Option<RemoteLayer>,
}

/// Nanoseconds since the epoch, now.
pub fn now_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// The store.
pub struct Meta {
    db: Database,
}

/// A write transaction: every change in it lands together or not at all.
pub struct Tx<'a> {
    table: redb::Table<'a, &'static str, &'static [u8]>,
    seq: redb::Table<'a, &'static str, u64>,
}

fn decode(name: &str, bytes: &[u8]) -> Result<Record, MetaError> {
    serde_json::from_slice(bytes).map_err(|source| MetaError::Record {
        name: name.to_string(),
        source,
    })
}

impl Tx<'_> {
    /// The record of `name`.
    pub fn get(&self, name: &str) -> Result<Option<Record>, MetaError> {
        match self.table.get(name).map_err(db_err("read"))? {
            Some(v) => decode(name, v.value()).map(Some),
            None => Ok(None),
        }
    }

    /// Stores `rec` under `name`.
    pub fn put(&mut self, name: &str, rec: &Record) -> Result<(), MetaError> {
        let bytes = serde_json::to_vec(rec).map_err(|source| MetaError::Record {
            name: name.to_string(),
            source,
        })?;
        self.table
            .insert(name, bytes.as_slice())
            .map_err(db_err("write"))?;
        Ok(())
    }

    /// Deletes `name`.
    pub fn delete(&mut self, name: &str) -> Result<(), MetaError> {
        self.table.remove(name).map_err(db_err("delete"))?;
        Ok(())
    }

    /// A fresh directory id.
    pub fn next_id(&mut self) -> Result<u64, MetaError> {
        let id = self
            .seq
            .get(NEXT_ID)
            .map_err(db_err("read"))?
            .map_or(1, |v| v.value());
        self.seq.insert(NEXT_ID, id + 1).map_err(db_err("write"))?;
        Ok(id)
    }

    /// Whether some snapshot has `name` as its parent.
    pub fn has_children(&self, name: &str) -> Result<bool, MetaError> {
        for item in self.table.iter().map_err(db_err("scan"))? {
            let (k, v) = item.map_err(db_err("scan"))?;
            if decode(k.value(), v.value())?.parent.as_deref() == Some(name) {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

impl Meta {
    /// Opens (or creates) the store at `path`.
    pub fn open(path: &Path) -> Result<Meta, MetaError> {
        let db = Database::create(path).map_err(db_err("open"))?;
        // Create the tables so that readers always find them.
        let wtx = db.begin_write().map_err(db_err("begin"))?;
        wtx.open_table(SNAPSHOTS).map_err(db_err("open table"))?;
        wtx.open_table(SEQUENCE).map_err(db_err("open table"))?;
        wtx.commit().map_err(db_err("commit"))?;
        Ok(Meta { db })
    }

    /// Runs `f` in one write transaction, committed if it returns `Ok`.
    pub fn update<T>(
        &self,
        f: impl FnOnce(&mut Tx<'_>) -> Result<T, crate::SnapError>,
    ) -> Result<T, crate::SnapError> {
        let wtx = self.db.begin_write().map_err(db_err("begin"))?;
        let out = {
            let mut tx = Tx {
                table: wtx.open_table(SNAPSHOTS).map_err(db_err("open table"))?,
                seq: wtx.open_table(SEQUENCE).map_err(db_err("open table"))?,
            };
            f(&mut tx)?
        };
        wtx.commit().map_err(db_err("commit"))?;
        Ok(out)
    }

    /// The record of `name`.
    pub fn get(&self, name: &str) -> Result<Option<Record>, MetaError> {
        let rtx = self.db.begin_read().map_err(db_err("begin"))?;
        let t = rtx.open_table(SNAPSHOTS).map_err(db_err("open table"))?;
        match t.get(name).map_err(db_err("read"))? {
            Some(v) => decode(name, v.value()).map(Some),
            None => Ok(None),
        }
    }

    /// Every snapshot, by name, and the next directory id, read together:
    /// a directory with a smaller id that no snapshot owns is not being
    /// created by a transaction in progress.
    pub fn all_and_next_id(&self) -> Result<(Vec<(String, Record)>, u64), MetaError> {
        let rtx = self.db.begin_read().map_err(db_err("begin"))?;
        let t = rtx.open_table(SNAPSHOTS).map_err(db_err("open table"))?;
        let seq = rtx.open_table(SEQUENCE).map_err(db_err("open table"))?;
        let next = seq
            .get(NEXT_ID)
            .map_err(db_err("read"))?
            .map_or(1, |v| v.value());
        let mut out = Vec::new();
        for item in t.iter().map_err(db_err("scan"))? {
            let (k, v) = item.map_err(db_err("scan"))?;
            out.push((k.value().to_string(), decode(k.value(), v.value())?));
        }
        Ok((out, next))
    }

    /// Every snapshot, by name.
    pub fn all(&self) -> Result<Vec<(String, Record)>, MetaError> {
        let rtx = self.db.begin_read().map_err(db_err("begin"))?;
        let t = rtx.open_table(SNAPSHOTS).map_err(db_err("open table"))?;
        let mut out = Vec::new();
        for item in t.iter().map_err(db_err("scan"))? {
            let (k, v) = item.map_err(db_err("scan"))?;
            out.push((k.value().to_string(), decode(k.value(), v.value())?));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: u64, parent: Option<&str>) -> Record {
        Record {
            id,
            kind: Kind::Committed,
            parent: parent.map(str::to_string),
            labels: BTreeMap::new(),
            created: 1,
            updated: 1,
            remote: None,
        }
    }

    #[test]
    fn survives_reopen_and_rolls_back_failed_transactions() {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("meta.redb");
        {
            let m = Meta::open(&path).unwrap();
            m.update(|tx| {
                let id = tx.next_id()?;
                tx.put("a", &rec(id, None))?;
                let id = tx.next_id()?;
                Ok(tx.put("b", &rec(id, Some("a")))?)
            })
            .unwrap();
            // A failing transaction changes nothing.
            let r: Result<(), _> = m.update(|tx| {
                tx.delete("a")?;
                Err(crate::SnapError::NotFound("x".into()))
            });
            assert!(r.is_err());
        }
        let m = Meta::open(&path).unwrap();
        assert_eq!(m.get("a").unwrap(), Some(rec(1, None)));
        assert_eq!(m.get("b").unwrap(), Some(rec(2, Some("a"))));
        assert_eq!(m.all().unwrap().len(), 2);
        let (children, id) = m
            .update(|tx| Ok((tx.has_children("a")?, tx.next_id()?)))
            .unwrap();
        assert!(children);
        assert_eq!(id, 3);
    }
}
