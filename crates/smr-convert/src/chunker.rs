//! Cuts the image byte stream into chunks and stores them.
//!
//! The ext4 writer streams bytes at increasing offsets, except for the header
//! region at the start of the image, which it writes last. [`ChunkingSink`]
//! keeps the header chunks (always of the nominal chunk size) in memory, and
//! cuts the rest either every chunk size (a fixed grid) or where
//! [`CdcStream`] finds content-defined boundaries (a variable grid). Every
//! chunk is handed, as soon as it is complete, to worker threads that seal it
//! (hash, encrypt, optionally compress), and then to put threads that store
//! it, so sealing runs in parallel with decompression and flattening.
//! All-zero chunks are never stored.
//!
//! Sealing is CPU work (one thread per core is enough); a put mostly waits
//! (a remote store's round trip, an immediate-mode local store's `fsync`s),
//! so there are more put threads than sealing threads ([`put_threads`]):
//! with many puts waiting at once, a remote store's requests overlap and
//! `fsync`s share journal commits. (`smr convert` opens a local store in
//! batched mode, where a put only writes a temp file: see
//! `smr_store::local`.) Memory is bounded by the queue depths
//! and thread counts times the chunk size (about 40 chunks; fewer put
//! threads for big chunks).

use crate::cdc::{CdcSizes, CdcStream};
use crossbeam_channel::{bounded, Receiver, Sender};
use smr_format::{ChunkCodec, ChunkEntry, ChunkGrid, ChunkKey, FormatError};
use smr_store::{ChunkStore, PutOutcome, StoreError};
use std::collections::BTreeMap;
use std::io;
use std::sync::Arc;
use std::thread::JoinHandle;

/// Counters of a chunking run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChunkStats {
    /// Chunks the image spans.
    pub total: u64,
    /// All-zero chunks (not stored).
    pub zero: u64,
    /// Chunks written to the store.
    pub new: u64,
    /// Chunks already present in the store.
    pub reused: u64,
    /// Plaintext bytes of the non-zero chunks.
    pub data_bytes: u64,
    /// Stored bytes of the non-zero chunks (after compression).
    pub stored_bytes: u64,
    /// Stored bytes actually written (new chunks only).
    pub written_bytes: u64,
}

/// The output of chunking: the chunk grid and table, keys and counters.
#[derive(Debug, Clone)]
pub struct Chunked {
    /// Where the chunks start and end.
    pub grid: ChunkGrid,
    /// Non-zero chunks in index order.
    pub entries: Vec<ChunkEntry>,
    /// Keys, parallel to `entries`, when the codec encrypts.
    pub keys: Option<Vec<ChunkKey>>,
    /// Counters.
    pub stats: ChunkStats,
}

/// Most threads putting chunks at once.
pub const MAX_PUT_THREADS: usize = 16;

/// Put threads for chunks of `chunk_size`: [`MAX_PUT_THREADS`], fewer for
/// chunks over 1 MiB so that chunks waiting to be stored stay within
/// about 16 MiB (at least 2).
pub fn put_threads(chunk_size: u64) -> usize {
    let by_memory = (16 << 20) / chunk_size.max(1);
    (by_memory as usize).clamp(2, MAX_PUT_THREADS)
}

/// What can go wrong chunking an image.
#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    /// Storing a chunk failed.
    #[error("storing a chunk: {0}")]
    Store(#[from] StoreError),
    /// The last chunks could not be handed to the workers.
    #[error("chunk pipeline: {0}")]
    Pipeline(#[source] io::Error),
    /// The chunk boundaries do not make a valid grid.
    #[error("chunk grid: {0}")]
    Grid(#[from] FormatError),
}

/// A sealed chunk on its way to the store.
struct ToPut {
    /// Its place in the order chunks were cut (not the image order: the
    /// header comes last).
    seq: u64,
    entry: ChunkEntry,
    key: Option<ChunkKey>,
    stored: Vec<u8>,
    plain_len: u64,
}

struct Sealed {
    entry: ChunkEntry,
    key: Option<ChunkKey>,
    outcome: PutOutcome,
    plain_len: u64,
}

/// The chunks `cut` hands to its output, copied.
fn collect(
    cut: impl FnOnce(&mut dyn FnMut(&[u8]) -> io::Result<()>) -> io::Result<()>,
) -> io::Result<Vec<Vec<u8>>> {
    let mut chunks = Vec::new();
    cut(&mut |c: &[u8]| {
        chunks.push(c.to_vec());
        Ok(())
    })?;
    Ok(chunks)
}

/// Bytes of a write handed to the CDC stream at a time.
const CDC_PIECE: usize = 1 << 20;

/// How the bytes after the header are cut.
enum Body {
    /// Every `chunk_size` from [`ChunkingSink::fixed_origin`]: the chunk
    /// being filled.
    Fixed(Option<(u64, Vec<u8>)>),
    /// Content-defined.
    Cdc {
        stream: CdcStream,
        /// Image offset of the next byte the stream takes.
        next: u64,
    },
}

/// A sink that chunks, seals and stores an image as it is written.
pub struct ChunkingSink {
    chunk_size: u64,
    encrypts: bool,
    header_chunks: u64,
    header: Vec<u8>,
    body: Body,
    /// Content-defined chunking: its sizes and the lengths of the chunks
    /// it cut so far, in order (they follow the header chunks).
    cdc: Option<(CdcSizes, Vec<u64>)>,
    /// Where fixed chunks start: image offset and chunk number (the image
    /// start for a fixed grid; the metadata region for a variable one).
    fixed_origin: (u64, u64),
    /// Chunks to seal: order cut, chunk index, bytes.
    tx: Option<Sender<(u64, u64, Vec<u8>)>>,
    /// Chunks handed to the sealing threads so far.
    seq: u64,
    results: Receiver<Result<Sealed, StoreError>>,
    workers: Vec<JoinHandle<()>>,
}

impl ChunkingSink {
    /// A sink writing chunks into `store`: of `chunk_size`, or where
    /// `cdc` cuts after the header; the first `header_len` bytes (rounded
    /// up to `chunk_size`) are held until [`ChunkingSink::finish`].
    pub fn new(
        chunk_size: u64,
        cdc: Option<CdcSizes>,
        header_len: u64,
        codec: ChunkCodec,
        store: Arc<dyn ChunkStore>,
        workers: usize,
    ) -> Self {
        let header_chunks = header_len.div_ceil(chunk_size);
        let encrypts = codec.encrypts();
        let workers = workers.max(1);
        // A store that appends to packs takes its chunks in the order they
        // were cut, from one thread (an append costs a copy, no wait).
        let ordered = store.ordered_puts();
        let puts = if ordered { 1 } else { put_threads(chunk_size) };
        let (tx, rx) = bounded::<(u64, u64, Vec<u8>)>(workers * 2);
        let (stx, srx) = bounded::<ToPut>(puts);
        let (rtx, results) = crossbeam_channel::unbounded();
        let mut threads: Vec<JoinHandle<()>> = (0..workers)
            .map(|_| {
                let (rx, stx, codec) = (rx.clone(), stx.clone(), codec.clone());
                std::thread::spawn(move || {
                    for (seq, index, buf) in rx {
                        let sealed = codec.seal(&buf);
                        let job = ToPut {
                            seq,
                            entry: ChunkEntry {
                                index,
                                id: sealed.id,
                                stored_len: sealed.stored.len() as u32,
                                compressed: sealed.compressed,
                            },
                            key: sealed.key,
                            stored: sealed.stored,
                            plain_len: buf.len() as u64,
                        };
                        // Fails only once the put threads stopped on an error.
                        if stx.send(job).is_err() {
                            return;
                        }
                    }
                })
            })
            .collect();
        drop(stx);
        threads.extend((0..puts).map(|_| {
            let (srx, rtx, store) = (srx.clone(), rtx.clone(), store.clone());
            std::thread::spawn(move || {
                let put = |job: ToPut| {
                    let res = store.put(&job.entry.id, &job.stored).map(|outcome| Sealed {
                        entry: job.entry,
                        key: job.key,
                        outcome,
                        plain_len: job.plain_len,
                    });
                    let failed = res.is_err();
                    rtx.send(res).is_ok() && !failed
                };
                if !ordered {
                    for job in srx {
                        if !put(job) {
                            return;
                        }
                    }
                    return;
                }
                // The sealing threads finish chunks a little out of order:
                // hold the early ones until their turn.
                let mut early = BTreeMap::new();
                let mut next = 0;
                for job in srx {
                    early.insert(job.seq, job);
                    while let Some(job) = early.remove(&next) {
                        next += 1;
                        if !put(job) {
                            return;
                        }
                    }
                }
            })
        }));
        let workers = threads;
        ChunkingSink {
            chunk_size,
            encrypts,
            header_chunks,
            header: vec![0; (header_chunks * chunk_size) as usize],
            body: match cdc {
                None => Body::Fixed(None),
                Some(sizes) => Body::Cdc {
                    stream: CdcStream::new(sizes),
                    next: header_chunks * chunk_size,
                },
            },
            cdc: cdc.map(|sizes| (sizes, Vec::new())),
            fixed_origin: (0, 0),
            tx: Some(tx),
            seq: 0,
            results,
            workers,
        }
    }

    /// Writes `data` at `offset` (see the module docs for the order rule).
    pub fn write_at(&mut self, mut offset: u64, mut data: &[u8]) -> io::Result<()> {
        let header_end = self.header_chunks * self.chunk_size;
        while !data.is_empty() {
            if offset < header_end {
                let n = data.len().min((header_end - offset) as usize);
                self.header[offset as usize..offset as usize + n].copy_from_slice(&data[..n]);
                (offset, data) = (offset + n as u64, &data[n..]);
                continue;
            }
            if let Body::Cdc { .. } = self.body {
                return self.write_cdc(offset, data);
            }
            let (origin, first) = self.fixed_origin;
            let Some(rel) = offset.checked_sub(origin) else {
                return Err(io::Error::other(format!(
                    "image write at offset {offset} goes back before {origin}"
                )));
            };
            let index = first + rel / self.chunk_size;
            let Body::Fixed(current) = &self.body else {
                unreachable!("checked above")
            };
            match current {
                Some((cur, _)) if *cur == index => {}
                Some((cur, _)) if *cur > index => {
                    return Err(io::Error::other(format!(
                        "image write at offset {offset} goes back before chunk {cur}"
                    )))
                }
                _ => {
                    if let Body::Fixed(Some((index, buf))) =
                        std::mem::replace(&mut self.body, Body::Fixed(None))
                    {
                        self.emit(index, buf)?;
                    }
                    self.body = Body::Fixed(Some((index, vec![0; self.chunk_size as usize])));
                }
            }
            let Body::Fixed(Some((_, buf))) = &mut self.body else {
                unreachable!("current chunk set above")
            };
            let at = (rel % self.chunk_size) as usize;
            let n = data.len().min(buf.len() - at);
            buf[at..at + n].copy_from_slice(&data[..n]);
            (offset, data) = (offset + n as u64, &data[n..]);
        }
        Ok(())
    }

    /// Hands `data`, written at body offset `offset`, to the CDC stream,
    /// and every chunk it cuts to the workers.
    fn write_cdc(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        let Body::Cdc { stream, next } = &mut self.body else {
            unreachable!("called for a CDC body")
        };
        if offset < *next {
            return Err(io::Error::other(format!(
                "image write at offset {offset} goes back before {next}"
            )));
        }
        let cut = collect(|out| stream.push_zeros(offset - *next, out))?;
        *next = offset;
        self.emit_cut(cut)?;
        // A piece at a time, so that the stream's buffer and the chunks
        // cut from it stay within about a piece plus the lookahead however
        // large the write.
        for piece in data.chunks(CDC_PIECE) {
            let Body::Cdc { stream, next, .. } = &mut self.body else {
                unreachable!("called for a CDC body")
            };
            let cut = collect(|out| stream.push(piece, out))?;
            *next += piece.len() as u64;
            self.emit_cut(cut)?;
        }
        Ok(())
    }

    /// Emits chunks the CDC stream cut, numbering them after those before.
    fn emit_cut(&mut self, cut: Vec<Vec<u8>>) -> io::Result<()> {
        for buf in cut {
            let Some((_, lens)) = &mut self.cdc else {
                unreachable!("called for content-defined chunking")
            };
            let index = self.header_chunks + lens.len() as u64;
            lens.push(buf.len() as u64);
            self.emit(index, buf)?;
        }
        Ok(())
    }

    /// Ends content-defined cutting at image offset `at` (zeros up to it
    /// if it was not written): the stream's last chunks are emitted, and
    /// from `at` on chunks are cut every `chunk_size`. A no-op unless
    /// the body is content-defined.
    fn close_cdc(&mut self, at: u64) -> io::Result<()> {
        if !matches!(self.body, Body::Cdc { .. }) {
            return Ok(());
        }
        let Body::Cdc { mut stream, next } = std::mem::replace(&mut self.body, Body::Fixed(None))
        else {
            unreachable!("checked above")
        };
        let Some(gap) = at.checked_sub(next) else {
            return Err(io::Error::other(format!(
                "metadata at offset {at} starts before the data written up to {next}"
            )));
        };
        let cut = collect(|out| {
            stream.push_zeros(gap, out)?;
            stream.finish(out)
        })?;
        self.emit_cut(cut)?;
        let cut_so_far = self.cdc.as_ref().map_or(0, |(_, lens)| lens.len() as u64);
        self.fixed_origin = (at, self.header_chunks + cut_so_far);
        Ok(())
    }

    fn emit(&mut self, index: u64, buf: Vec<u8>) -> io::Result<()> {
        if buf.iter().all(|&b| b == 0) {
            return Ok(());
        }
        let tx = self.tx.as_ref().expect("sink not finished");
        tx.send((self.seq, index, buf))
            .map_err(|_| self.worker_error())?;
        self.seq += 1;
        Ok(())
    }

    /// The error that stopped the workers: the first failed put's, which
    /// names the chunk and the store (the put threads send it before they
    /// stop, so it is waiting once every worker is gone).
    fn worker_error(&self) -> io::Error {
        match self.results.try_iter().find_map(Result::err) {
            Some(e) => io::Error::other(ChunkError::Store(e)),
            None => io::Error::other("chunk workers stopped"),
        }
    }

    /// Flushes everything for an image of `size` bytes and waits for the
    /// workers. Returns the chunk table.
    pub fn finish(mut self, size: u64) -> Result<Chunked, ChunkError> {
        let send_all = (|| -> io::Result<()> {
            // Content-defined to the end unless the metadata region began.
            self.close_cdc(size)?;
            if let Body::Fixed(Some((index, mut buf))) =
                std::mem::replace(&mut self.body, Body::Fixed(None))
            {
                let (origin, first) = self.fixed_origin;
                let start = origin + (index - first) * self.chunk_size;
                buf.truncate(size.saturating_sub(start).min(self.chunk_size) as usize);
                self.emit(index, buf)?;
            }
            let header = std::mem::take(&mut self.header);
            for (index, c) in header.chunks(self.chunk_size as usize).enumerate() {
                let index = index as u64;
                let len = size
                    .saturating_sub(index * self.chunk_size)
                    .min(self.chunk_size);
                if len > 0 {
                    self.emit(index, c[..len as usize].to_vec())?;
                }
            }
            Ok(())
        })();
        drop(self.tx.take());
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
        let mut by_index = BTreeMap::new();
        for r in self.results.try_iter() {
            let s = r?;
            by_index.insert(s.entry.index, s);
        }
        send_all.map_err(ChunkError::Pipeline)?;
        let cs = self.chunk_size;
        let grid = match &self.cdc {
            None => ChunkGrid::fixed(size, cs)?,
            Some((sizes, lens)) => {
                // Fixed chunks of the header, the content-defined ones, and
                // fixed chunks of the metadata region.
                let pieces = |from: u64, to: u64| {
                    (0..to.saturating_sub(from).div_ceil(cs))
                        .map(move |i| cs.min(to - from - i * cs))
                };
                let header = size.min(self.header_chunks * cs);
                let tail = pieces(self.fixed_origin.0.max(header), size);
                let all = pieces(0, header).chain(lens.iter().copied()).chain(tail);
                ChunkGrid::variable(cs, *sizes, all)?
            }
        };
        let total = grid.count();
        let mut stats = ChunkStats {
            total,
            ..ChunkStats::default()
        };
        let mut entries = Vec::with_capacity(by_index.len());
        let mut keys = Vec::with_capacity(by_index.len());
        for (_, s) in by_index {
            stats.data_bytes += s.plain_len;
            stats.stored_bytes += u64::from(s.entry.stored_len);
            match s.outcome {
                PutOutcome::Written => {
                    stats.new += 1;
                    stats.written_bytes += u64::from(s.entry.stored_len);
                }
                PutOutcome::Existed => stats.reused += 1,
            }
            entries.push(s.entry);
            keys.extend(s.key);
        }
        stats.zero = total - entries.len() as u64;
        let keys = self.encrypts.then_some(keys);
        Ok(Chunked {
            grid,
            entries,
            keys,
            stats,
        })
    }
}

impl smr_image::ext4::ImageSink for ChunkingSink {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        ChunkingSink::write_at(self, offset, data)
    }

    /// The metadata region is cut into fixed chunks even with
    /// content-defined chunking: it changes with any change of the tree
    /// (inode numbers, bitmaps), so content-defined cuts find little to
    /// share there, and a mount reads it first, in small pieces.
    fn metadata_starts(&mut self, offset: u64) -> io::Result<()> {
        self.close_cdc(offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use smr_format::chunk::{default_salt, open_chunk};
    use smr_store::LocalStore;

    #[test]
    fn chunks_stream_header_last_and_skips_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn ChunkStore> = Arc::new(LocalStore::open(dir.path()).unwrap());
        let cs = 65536u64;
        let codec = ChunkCodec::new(default_salt(), true, false);
        let mut sink = ChunkingSink::new(cs, None, 8192, codec, store.clone(), 2);
        let mut image = vec![0u8; (cs * 6 + 4096) as usize];
        let mut put = |sink: &mut ChunkingSink, off: u64, data: &[u8]| {
            image[off as usize..off as usize + data.len()].copy_from_slice(data);
            sink.write_at(off, data).unwrap();
        };
        put(&mut sink, cs, &[1u8; 100_000]); // spans chunks 1 and 2
        put(&mut sink, cs * 4 + 10, b"four"); // chunk 3 stays zero
        put(&mut sink, cs * 6, &[6u8; 4096]); // short last chunk
        put(&mut sink, 1024, b"superblock"); // header, last
        let size = image.len() as u64;
        let out = sink.finish(size).unwrap();
        let idx: Vec<u64> = out.entries.iter().map(|e| e.index).collect();
        assert_eq!(idx, vec![0, 1, 2, 4, 6]);
        assert_eq!(out.stats.total, 7);
        assert_eq!(out.stats.zero, 2);
        assert_eq!(out.stats.new, 5);
        let keys = out.keys.unwrap();
        for (e, k) in out.entries.iter().zip(&keys) {
            let start = (e.index * cs) as usize;
            let len = (cs as usize).min(image.len() - start);
            let plain =
                open_chunk(&e.id, Some(k), e.compressed, store.get(&e.id).unwrap(), len).unwrap();
            assert_eq!(plain, &image[start..start + len], "chunk {}", e.index);
        }
        assert_eq!(out.entries[4].stored_len, 4096);
    }

    #[test]
    fn reused_chunks_are_counted() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn ChunkStore> = Arc::new(LocalStore::open(dir.path()).unwrap());
        let run = || {
            let codec = ChunkCodec::new(default_salt(), false, true);
            let mut sink = ChunkingSink::new(65536, None, 4096, codec, store.clone(), 2);
            sink.write_at(65536, &[7u8; 200_000]).unwrap();
            sink.finish(65536 * 5).unwrap()
        };
        let a = run();
        let b = run();
        assert_eq!(a.entries, b.entries);
        assert!(a.keys.is_none());
        assert_eq!((b.stats.new, b.stats.reused), (0, a.entries.len() as u64));
        assert_eq!(a.stats.new + a.stats.reused, 4, "chunks 1..=4");
        assert!(
            a.stats.stored_bytes < a.stats.data_bytes,
            "zstd compressed the repeated bytes"
        );
    }

    #[test]
    fn a_failed_store_write_is_reported_with_its_cause() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn ChunkStore> = Arc::new(LocalStore::open(dir.path()).unwrap());
        // Every put fails: its chunk's directory cannot be made.
        std::fs::remove_dir_all(dir.path().join("chunks")).ok();
        std::fs::write(dir.path().join("chunks"), b"not a directory").unwrap();
        let codec = ChunkCodec::new(default_salt(), false, false);
        let mut sink = ChunkingSink::new(4096, None, 4096, codec, store, 1);
        // Enough chunks to fill every queue, so the failure surfaces in a
        // write; whichever call reports it must give the store's error.
        let mut err = None;
        for i in 1..=256u64 {
            if let Err(e) = sink.write_at(i * 4096, &i.to_le_bytes().repeat(512)) {
                err = Some(e.to_string());
                break;
            }
        }
        let msg = err.expect("a write failed once the put threads stopped");
        assert!(msg.contains("storing a chunk"), "{msg}");
        assert!(
            msg.contains("chunk ") && msg.contains("Not a directory"),
            "{msg}"
        );
    }

    #[test]
    fn writing_backwards_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn ChunkStore> = Arc::new(LocalStore::open(dir.path()).unwrap());
        let codec = ChunkCodec::new(default_salt(), false, false);
        let mut sink = ChunkingSink::new(65536, None, 4096, codec, store, 1);
        sink.write_at(65536 * 3, b"x").unwrap();
        assert!(sink.write_at(65536 * 2, b"y").is_err());
    }

    #[test]
    fn cdc_bodies_are_cut_by_content_and_reassemble() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn ChunkStore> = Arc::new(LocalStore::open(dir.path()).unwrap());
        let (cs, header) = (65536u64, 65536u64);
        let sizes = CdcSizes::default();
        let codec = ChunkCodec::new(default_salt(), true, true);
        let mut sink = ChunkingSink::new(cs, Some(sizes), header, codec, store.clone(), 2);
        // Data, a hole of 3 MiB, more data in odd-sized writes, a zero tail.
        let mut image = vec![0u8; (header + (8 << 20)) as usize];
        let mut x = 7u64;
        let mut fill = |from: usize, to: usize, image: &mut Vec<u8>| {
            for b in &mut image[from..to] {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
        };
        let h = header as usize;
        fill(h, h + (2 << 20), &mut image);
        fill(h + (5 << 20), h + (7 << 20) + 123, &mut image);
        fill(100, 4096, &mut image);
        let mut at = h;
        for n in [1usize << 20, (1 << 20) + 4096] {
            sink.write_at(at as u64, &image[at..at + n]).unwrap();
            at += n;
        }
        let mut at = h + (5 << 20);
        for n in [5000usize, 70_000, (2 << 20) + 123 - 75_000] {
            sink.write_at(at as u64, &image[at..at + n]).unwrap();
            at += n;
        }
        // The metadata region: fixed chunks from `meta` on.
        let meta = h + (7 << 20) + 2 * 65536;
        fill(meta + 100, meta + 70_000, &mut image);
        smr_image::ext4::ImageSink::metadata_starts(&mut sink, meta as u64).unwrap();
        sink.write_at(meta as u64 + 100, &image[meta + 100..meta + 70_000])
            .unwrap();
        assert!(
            sink.write_at(meta as u64 - 1, b"x").is_err(),
            "before the metadata"
        );
        sink.write_at(100, &image[100..4096]).unwrap();
        let out = sink.finish(image.len() as u64).unwrap();

        let grid = &out.grid;
        assert_eq!(grid.size(), image.len() as u64);
        assert_eq!(grid.cdc_sizes(), Some(sizes));
        assert_eq!(
            grid.range(0),
            0..cs,
            "the header is a chunk of the nominal size"
        );
        let mut body: Vec<u64> = crate::cdc::boundaries(&image[h..meta], sizes)
            .into_iter()
            .map(|e| header + e as u64)
            .collect();
        body.extend((1..=(image.len() - meta) as u64 / cs).map(|i| meta as u64 + i * cs));
        let ends: Vec<u64> = (1..grid.count()).map(|i| grid.range(i).end).collect();
        assert_eq!(ends, body, "cut as the whole body would be, metadata fixed");
        let keys = out.keys.unwrap();
        let mut rebuilt = vec![0u8; image.len()];
        for (e, k) in out.entries.iter().zip(&keys) {
            let r = grid.range(e.index);
            let len = (r.end - r.start) as usize;
            let plain =
                open_chunk(&e.id, Some(k), e.compressed, store.get(&e.id).unwrap(), len).unwrap();
            rebuilt[r.start as usize..r.end as usize].copy_from_slice(&plain);
        }
        assert!(rebuilt == image, "the chunks do not reassemble the image");
        assert!(
            out.stats.zero >= 12,
            "3 MiB and 1 MiB of zeros: {:?}",
            out.stats
        );
    }
}
