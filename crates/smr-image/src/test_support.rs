//! Test helpers: an in-memory [`DataSink`] and tree lookups.

use crate::tree::{DataSink, Extent, Inode, InodeId, Kind, Tree, BLOCK_SIZE};
use std::io::{self, Read};

/// Records every file's bytes; extents are one run per file, laid out
/// back to back (no holes). Reads through a small buffer: never allocates
/// by the declared size.
#[derive(Debug, Default)]
pub struct MemSink {
    /// File contents in write order.
    pub files: Vec<Vec<u8>>,
    /// `start_layer` calls.
    pub layers: usize,
    next_block: u64,
}

impl DataSink for MemSink {
    fn start_layer(&mut self) -> io::Result<()> {
        self.layers += 1;
        Ok(())
    }

    fn write_file(&mut self, data: &mut dyn Read, size: u64) -> io::Result<Vec<Extent>> {
        let mut out = Vec::new();
        let mut buf = [0u8; 8192];
        let mut left = size;
        while left > 0 {
            let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            let n = data.read(&mut buf[..want])?;
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "short file"));
            }
            out.extend_from_slice(&buf[..n]);
            left -= n as u64;
        }
        let blocks = size.div_ceil(BLOCK_SIZE);
        let extents = if blocks == 0 {
            Vec::new()
        } else {
            // Encode the file index in `physical` so tests can find the bytes.
            vec![Extent {
                logical: 0,
                physical: self.next_block,
                len: blocks,
            }]
        };
        self.next_block += blocks.max(1);
        self.files.push(out);
        Ok(extents)
    }
}

impl MemSink {
    /// The bytes of a file inode.
    pub fn contents(&self, inode: &Inode) -> Vec<u8> {
        let Kind::File { size, extents } = &inode.kind else {
            panic!("not a file: {inode:?}");
        };
        if *size == 0 {
            return Vec::new();
        }
        let mut block = 0;
        for f in &self.files {
            if block == extents[0].physical {
                return f.clone();
            }
            block += (f.len() as u64).div_ceil(BLOCK_SIZE).max(1);
        }
        panic!("no data for {inode:?}");
    }
}

/// The inode id at `path` (`a/b/c`), or `None`.
pub fn lookup(tree: &Tree, path: &str) -> Option<InodeId> {
    let mut cur = tree.root;
    for c in path.split('/').filter(|c| !c.is_empty()) {
        let Kind::Dir { entries } = &tree.get(cur).kind else {
            return None;
        };
        cur = *entries.get(c.as_bytes())?;
    }
    Some(cur)
}

/// The inode at `path`; panics if missing.
pub fn at<'t>(tree: &'t Tree, path: &str) -> &'t Inode {
    tree.get(lookup(tree, path).unwrap_or_else(|| panic!("{path} missing")))
}

/// Names in directory `path`.
pub fn names(tree: &Tree, path: &str) -> Vec<String> {
    let Kind::Dir { entries } = &at(tree, path).kind else {
        panic!("{path} is not a dir");
    };
    entries
        .keys()
        .map(|k| String::from_utf8_lossy(k).into_owned())
        .collect()
}
