//! The disk tier: cache entries appended to large segment files, in the
//! order they were fetched, and found through the segments' journals
//! (`cache/journal.rs`).
//!
//! ```text
//! DIR/segments/<16 hex id>       entries' stored bytes, back to back
//! DIR/segments/<16 hex id>.idx   its journal: which chunk is where
//! ```
//!
//! # Why segments
//! A file per entry costs an inode, a directory entry and an `open` per
//! chunk, and the disk cannot read ahead across files: a warm image read
//! with the page cache dropped waited for one small read per chunk. In a
//! segment, chunks fetched together (an image's start, a scan) sit
//! together, and the kernel's readahead of the segment file serves the
//! next ones.
//!
//! # Writers
//! Each process appends to a segment of its own (its journal held
//! `LOCK_EX` while it writes): the entry's bytes, then its journal record.
//! A segment is sealed (a last record) when it holds the segment size, or
//! when its process drops the cache; the segment of a process that died
//! is sealed by the next process that opens the cache or evicts
//! ([`Segments::seal_abandoned`]): a journal is locked from the moment it
//! appears until its writer seals it or dies. Segment ids come from the clock
//! (microseconds), above every id the writer has seen, and are created
//! with `O_EXCL`: newer segments have larger ids, and an id is not reused
//! (were one ever reused, a stale location would fail its CRC and be
//! refetched: never a wrong byte).
//!
//! # Readers
//! Every process keeps an index (chunk id → segment, offset, length,
//! CRC-32C) built from all journals and brought up to date by
//! [`Segments::refresh`]: after taking a chunk's fetch lock (another
//! process may have just fetched it), and once a second. A refresh lists
//! the directory only when it changed, and reads only what the journals
//! of live writers appended since. Loads are one `pread` on the segment,
//! kept open, and check the entry's CRC-32C (see `cache/disk.rs` for why
//! a CRC). A mismatch writes a tombstone (so no process loads that entry
//! again), counts a `corrupt` event, and refetches that chunk alone: the
//! rest of the segment stays in use.
//!
//! # Eviction without reader locks
//! Segments are evicted whole (`cache/evict.rs`), by unlinking them. A
//! segment is never written once sealed, so a process that has it open
//! reads correct bytes until it notices (its next refresh, within a
//! second) and closes it; only then is the space free. The budget counts
//! the bytes as freed at the unlink.
//!
//! # Durability
//! Nothing is fsynced (a cache needs no durability, only never to serve a
//! wrong byte): after a power cut a journal may end in a torn record (the
//! journal ends there) or name bytes that were lost (their CRC fails on
//! load, the chunk is refetched).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File, FileTimes, OpenOptions};
use std::io::{self, ErrorKind};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use smr_format::ChunkId;

use super::disk::{crc32c, due, read_at, try_lock_exclusive};
use super::journal::{self, Loc, Record};

/// No entry is larger: the largest chunk, with room for compression that
/// did not pay. A record naming a larger one is ignored.
const MAX_ENTRY_BYTES: u32 = 2 * smr_format::recipe::MAX_CHUNK_SIZE as u32;
/// Largest segment: 64 MiB (segments are a sixteenth of the budget, at
/// least [`MIN_SEGMENT`]).
const MAX_SEGMENT: u64 = 64 << 20;
/// Smallest segment size.
const MIN_SEGMENT: u64 = 256 << 10;

/// What loading an entry found.
pub(crate) enum Load {
    /// The entry, verified.
    Hit(Vec<u8>),
    /// No entry (or an unreadable one, logged).
    Absent,
    /// The entry failed its check; a tombstone now names it.
    Corrupt {
        /// Its length, to correct the cache total.
        len: u64,
    },
}

/// One segment file, open for reading.
#[derive(Debug)]
pub(crate) struct SegFile {
    file: File,
    /// When an access was last recorded in its timestamps (ms since the
    /// epoch; 0 = not yet known).
    recorded_ms: AtomicU64,
}

impl SegFile {
    fn new(file: File) -> Self {
        SegFile {
            file,
            recorded_ms: AtomicU64::new(0),
        }
    }
}

/// A segment's journal as this process follows it.
#[derive(Debug)]
struct Journal {
    /// Open while more records may come; `None` once ended, and for this
    /// process's own segment (its records are applied as written).
    file: Option<File>,
    /// Bytes read so far.
    read: u64,
}

/// The index built from the journals.
#[derive(Debug, Default)]
struct State {
    index: HashMap<ChunkId, Loc>,
    /// Entries named by tombstones: (segment, offset).
    dead: HashSet<(u64, u64)>,
    journals: BTreeMap<u64, Journal>,
    /// This process's segment being written.
    own: Option<u64>,
    /// The directory's mtime when last listed.
    listed: Option<(i64, i64)>,
}

/// This process's segment being written.
#[derive(Debug)]
struct Writer {
    seg: u64,
    data: File,
    journal: File,
    data_len: u64,
    journal_len: u64,
    /// When the last entry was appended.
    last_insert: std::time::Instant,
}

/// A segment as seen by a survey (for eviction and totals).
#[derive(Debug)]
pub(crate) struct SegInfo {
    pub(crate) id: u64,
    pub(crate) len: u64,
    pub(crate) atime: SystemTime,
    pub(crate) mtime: SystemTime,
    /// Sealed: no writer appends to it.
    pub(crate) sealed: bool,
    /// Live entries the index places in it.
    pub(crate) entries: u64,
    /// It holds a pinned chunk.
    pub(crate) pinned: bool,
}

/// The segments of one cache directory (see the module docs).
#[derive(Debug)]
pub(crate) struct Segments {
    dir: PathBuf,
    segment_bytes: u64,
    state: RwLock<State>,
    files: Mutex<HashMap<u64, Arc<SegFile>>>,
    writer: Mutex<Option<Writer>>,
}

impl Segments {
    /// Opens `dir` (created if needed) with segments of a sixteenth of
    /// `budget`, and reads every journal.
    pub(crate) fn open(dir: &Path, budget: u64) -> io::Result<Segments> {
        fs::create_dir_all(dir)?;
        let s = Segments {
            dir: dir.to_path_buf(),
            segment_bytes: (budget / 16).clamp(MIN_SEGMENT, MAX_SEGMENT),
            state: RwLock::default(),
            files: Mutex::default(),
            writer: Mutex::default(),
        };
        s.refresh()?;
        Ok(s)
    }

    /// Where chunk `id`'s entry is: its segment file and place in it.
    #[cfg(test)]
    pub(crate) fn place(&self, id: &ChunkId) -> Option<(PathBuf, Loc)> {
        self.lookup(id).map(|l| (self.data_path(l.seg), l))
    }

    /// The segment file `seg`.
    pub(crate) fn data_path(&self, seg: u64) -> PathBuf {
        self.dir.join(format!("{seg:016x}"))
    }

    fn journal_path(&self, seg: u64) -> PathBuf {
        self.dir.join(format!("{seg:016x}.idx"))
    }

    fn state(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn state_mut(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Where chunk `id` is, as far as this process knows.
    pub(crate) fn lookup(&self, id: &ChunkId) -> Option<Loc> {
        self.state().index.get(id).copied()
    }

    /// Whether the index has an entry for `id` (not verified).
    pub(crate) fn contains(&self, id: &ChunkId) -> bool {
        self.state().index.contains_key(id)
    }

    /// Live entries in the index.
    pub(crate) fn entries(&self) -> u64 {
        self.state().index.len() as u64
    }

    /// Brings the index up to date: lists the directory if it changed
    /// (new segments, evicted ones), then reads what the journals still
    /// being written gained.
    pub(crate) fn refresh(&self) -> io::Result<()> {
        let mut st = self.state_mut();
        let meta = fs::metadata(&self.dir)?;
        let mtime = (meta.mtime(), meta.mtime_nsec());
        let recent = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(true, |now| {
                now.as_secs().saturating_sub(2) <= u64::try_from(mtime.0).unwrap_or(0)
            });
        if st.listed != Some(mtime) || recent {
            self.relist(&mut st)?;
            st.listed = Some(mtime);
        }
        let mut updates = Vec::new();
        for (&seg, j) in st.journals.iter_mut() {
            let Some(f) = &j.file else { continue };
            let len = f.metadata()?.len();
            if len <= j.read {
                continue;
            }
            let want = usize::try_from(len - j.read)
                .map_err(|_| io::Error::from(ErrorKind::OutOfMemory))?;
            let buf = read_at(f, j.read, want, 0)?;
            let tail = journal::parse(&buf, j.read);
            j.read += tail.consumed as u64;
            if tail.damaged {
                tracing::warn!(journal = %self.journal_path(seg).display(), at = j.read, "damaged cache journal: the entries after this point are not used");
            }
            if tail.ended {
                j.file = None;
            }
            updates.push((seg, tail.records));
        }
        for (seg, records) in updates {
            for r in records {
                st.apply(seg, r);
            }
        }
        Ok(())
    }

    /// Lists the directory: follows new journals, forgets segments gone.
    fn relist(&self, st: &mut State) -> io::Result<()> {
        let listed: HashSet<u64> = self.list()?.into_iter().collect();
        let own = st.own;
        let gone: HashSet<u64> = st
            .journals
            .keys()
            .copied()
            .filter(|s| !listed.contains(s) && Some(*s) != own)
            .collect();
        if !gone.is_empty() {
            st.forget(&gone);
            self.lock_files().retain(|s, _| !gone.contains(s));
        }
        for seg in listed {
            if st.journals.contains_key(&seg) {
                continue;
            }
            match File::open(self.journal_path(seg)) {
                Ok(f) => {
                    st.journals.insert(
                        seg,
                        Journal {
                            file: Some(f),
                            read: 0,
                        },
                    );
                }
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// The segment ids that have a journal in the directory.
    fn list(&self) -> io::Result<Vec<u64>> {
        let mut out = Vec::new();
        for e in fs::read_dir(&self.dir)? {
            let name = e?.file_name();
            let Some(hex) = name.to_str().and_then(|n| n.strip_suffix(".idx")) else {
                continue;
            };
            if hex.len() == 16 {
                if let Ok(seg) = u64::from_str_radix(hex, 16) {
                    out.push(seg);
                }
            }
        }
        out.sort_unstable();
        Ok(out)
    }

    fn lock_writer(&self) -> std::sync::MutexGuard<'_, Option<Writer>> {
        self.writer.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn lock_files(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<SegFile>>> {
        self.files.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The open segment `seg`, opening it if needed; `None` if it is gone.
    fn file(&self, seg: u64) -> io::Result<Option<Arc<SegFile>>> {
        let mut files = self.lock_files();
        if let Some(f) = files.get(&seg) {
            return Ok(Some(f.clone()));
        }
        let f = match open_noatime(&self.data_path(seg)) {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let f = Arc::new(SegFile::new(f));
        files.insert(seg, f.clone());
        Ok(Some(f))
    }

    /// Segments this process has open, and their bytes.
    pub(crate) fn open_files(&self) -> (u64, u64) {
        let files = self.lock_files();
        let bytes = files
            .values()
            .map(|f| f.file.metadata().map_or(0, |m| m.len()))
            .sum();
        (files.len() as u64, bytes)
    }

    /// Loads and checks the entry of `id`, recording the access for LRU-K
    /// (see `cache/evict.rs`) unless the last one recorded in its segment
    /// is less than `granularity` old.
    pub(crate) fn load(&self, id: &ChunkId, granularity: Duration) -> Load {
        let Some(loc) = self.lookup(id) else {
            return Load::Absent;
        };
        let unreadable = |e: &io::Error| {
            tracing::warn!(chunk = %id, segment = %self.data_path(loc.seg).display(), error = %e, "cache entry unreadable; refetching");
        };
        let f = match self.file(loc.seg) {
            Ok(Some(f)) => f,
            Ok(None) => {
                // Evicted since the index was read.
                self.drop_loc(id, loc);
                return Load::Absent;
            }
            Err(e) => {
                unreadable(&e);
                return Load::Absent;
            }
        };
        let buf = match read_at(&f.file, loc.off, loc.len as usize, 0) {
            Ok(b) => b,
            Err(e) => {
                unreadable(&e);
                return Load::Absent;
            }
        };
        if !loc.holds(&buf) {
            self.condemn(id, loc);
            return Load::Corrupt {
                len: u64::from(loc.len),
            };
        }
        record_access(&f, granularity);
        Load::Hit(buf)
    }

    /// [`Segments::load`] only if it cannot wait: the segment already
    /// open, and every byte of the entry in the page cache (`preadv2` with
    /// `RWF_NOWAIT`). `None` otherwise, or if the check fails (the caller
    /// then takes `load`'s path, which handles a bad entry).
    pub(crate) fn load_now(&self, id: &ChunkId, granularity: Duration) -> Option<Vec<u8>> {
        let loc = self.lookup(id)?;
        let f = self.lock_files().get(&loc.seg).cloned()?;
        let buf = read_at(&f.file, loc.off, loc.len as usize, libc::RWF_NOWAIT).ok()?;
        if !loc.holds(&buf) {
            return None;
        }
        record_access(&f, granularity);
        Some(buf)
    }

    /// Whether there is an entry for `id`; if so, asks the kernel to read
    /// its bytes into the page cache (`POSIX_FADV_WILLNEED`).
    pub(crate) fn readahead(&self, id: &ChunkId) -> bool {
        let Some(loc) = self.lookup(id) else {
            return false;
        };
        let Ok(Some(f)) = self.file(loc.seg) else {
            return false;
        };
        let len = std::num::NonZeroU64::new(u64::from(loc.len));
        let _ = rustix::fs::fadvise(&f.file, loc.off, len, rustix::fs::Advice::WillNeed);
        true
    }

    /// Records an access to the entry of `id` without reading it (a hit
    /// in the memory tier). A hint: errors are ignored.
    pub(crate) fn touch(&self, id: &ChunkId, granularity: Duration) {
        if let Some(Ok(Some(f))) = self.lookup(id).map(|l| self.file(l.seg)) {
            record_access(&f, granularity);
        }
    }

    /// [`Segments::touch`] for a caller that must not wait: done now if
    /// the segment is open, else returned as a job for a thread that may
    /// wait for the disk.
    pub(crate) fn touch_now(
        &self,
        id: &ChunkId,
        granularity: Duration,
    ) -> Option<impl FnOnce() + Send + 'static> {
        let loc = self.lookup(id)?;
        if let Some(f) = self.lock_files().get(&loc.seg).cloned() {
            record_access(&f, granularity);
            return None;
        }
        let path = self.data_path(loc.seg);
        Some(move || {
            if let Ok(file) = open_noatime(&path) {
                record_access(&SegFile::new(file), granularity);
            }
        })
    }

    /// Forgets `loc` for `id` (its segment is gone).
    fn drop_loc(&self, id: &ChunkId, loc: Loc) {
        let mut st = self.state_mut();
        if st.index.get(id) == Some(&loc) {
            st.index.remove(id);
        }
    }

    /// Marks the entry of `id` at `loc` damaged: out of the index, and a
    /// tombstone in this process's journal so that no process loads it.
    fn condemn(&self, id: &ChunkId, loc: Loc) {
        tracing::warn!(chunk = %id, segment = %self.data_path(loc.seg).display(), offset = loc.off, "corrupt cache entry; refetching");
        let r = Record::Tombstone { id: *id, loc };
        self.state_mut().apply(loc.seg, r);
        let mut w = self.lock_writer();
        if let Err(e) = self.writer_for(&mut w).and_then(|w| w.write_record(&r)) {
            tracing::warn!(chunk = %id, error = %e, "cannot record the corrupt cache entry");
        }
    }

    /// Appends `data` as the entry of `id` to this process's segment.
    pub(crate) fn insert(&self, id: &ChunkId, data: &[u8]) -> io::Result<()> {
        let len = u32::try_from(data.len())
            .ok()
            .filter(|l| *l <= MAX_ENTRY_BYTES)
            .ok_or_else(|| io::Error::new(ErrorKind::InvalidInput, "larger than any chunk"))?;
        let mut guard = self.lock_writer();
        let w = self.writer_for(&mut guard)?;
        let loc = Loc {
            seg: w.seg,
            off: w.data_len,
            len,
            crc: crc32c(data),
        };
        let r = Record::Entry { id: *id, loc };
        let written = w.data.write_all_at(data, loc.off).and_then(|()| {
            w.data_len += u64::from(len);
            w.last_insert = std::time::Instant::now();
            w.write_record(&r)
        });
        if let Err(e) = written {
            // Whatever the segment holds stays valid; start a new one.
            if let Some(w) = guard.take() {
                self.seal(w);
            }
            return Err(e);
        }
        drop(guard);
        self.state_mut().apply(loc.seg, r);
        // The chunk is likely read again soon (the kernel reads a chunk in
        // several requests): have its segment open for that.
        let _ = self.file(loc.seg);
        Ok(())
    }

    /// This process's writer: a new segment when there is none or the
    /// current one is full (then sealed).
    fn writer_for<'w>(&self, w: &'w mut Option<Writer>) -> io::Result<&'w mut Writer> {
        if w.as_ref().is_some_and(|w| w.data_len >= self.segment_bytes) {
            if let Some(full) = w.take() {
                self.seal(full);
            }
        }
        match w {
            Some(w) => Ok(w),
            None => Ok(w.insert(self.start_writer()?)),
        }
    }

    /// Creates a segment for this process: an id above every one known
    /// (and at least the clock in microseconds), its data file created
    /// with `O_EXCL` (which settles races between writers), then its
    /// journal written and locked under a temporary name and linked into
    /// place: a journal is locked from the moment it can be seen until its
    /// writer seals it or dies.
    fn start_writer(&self) -> io::Result<Writer> {
        self.refresh()?;
        let above = self
            .state()
            .journals
            .keys()
            .next_back()
            .map_or(0, |m| m.saturating_add(1));
        let mut seg = above.max(micros(SystemTime::now()));
        let create = |path: &Path, new: bool| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(new)
                .create(true)
                .truncate(!new)
                .mode(0o600)
                .open(path)
        };
        loop {
            let data = match create(&self.data_path(seg), true) {
                Ok(f) => f,
                Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                    seg += 1;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let tmp = self.dir.join(format!(
                ".{seg:016x}.idx.{}{TEMP_SUFFIX}",
                std::process::id()
            ));
            let placed = create(&tmp, false).and_then(|journal| {
                if !try_lock_exclusive(&journal)? {
                    return Err(io::Error::from(ErrorKind::WouldBlock));
                }
                journal.write_all_at(journal::MAGIC, 0)?;
                fs::hard_link(&tmp, self.journal_path(seg))?;
                Ok(journal)
            });
            let _ = fs::remove_file(&tmp);
            let journal = match placed {
                Ok(j) => j,
                Err(e) => {
                    let _ = fs::remove_file(self.data_path(seg));
                    if e.kind() == ErrorKind::AlreadyExists {
                        seg += 1;
                        continue;
                    }
                    return Err(e);
                }
            };
            let mut st = self.state_mut();
            st.own = Some(seg);
            st.journals.insert(
                seg,
                Journal {
                    file: None,
                    read: 0,
                },
            );
            tracing::debug!(segment = %self.data_path(seg).display(), "new cache segment");
            return Ok(Writer {
                seg,
                data,
                journal,
                data_len: 0,
                journal_len: journal::MAGIC.len() as u64,
                last_insert: std::time::Instant::now(),
            });
        }
    }

    /// Seals this process's segment if nothing was appended to it for
    /// `idle`, so that eviction may take it (a segment being written is
    /// never evicted); the next insert starts a new one. Returns whether
    /// it sealed one.
    pub(crate) fn seal_if_idle(&self, idle: Duration) -> bool {
        let mut guard = self.lock_writer();
        let idle_for = guard.as_ref().map(|w| w.last_insert.elapsed());
        match guard.take_if(|_| idle_for.is_some_and(|t| t >= idle)) {
            Some(w) => {
                self.seal(w);
                true
            }
            None => false,
        }
    }

    /// Seals this process's segment: its last record, and the timestamps
    /// of a segment accessed once (now).
    fn seal(&self, mut w: Writer) {
        if let Err(e) = w.write_record(&Record::Sealed) {
            tracing::debug!(segment = %self.data_path(w.seg).display(), error = %e, "cannot seal cache segment");
        }
        let times = FileTimes::new()
            .set_accessed(SystemTime::now())
            .set_modified(UNIX_EPOCH);
        let _ = w.data.set_times(times);
        let mut st = self.state_mut();
        if st.own == Some(w.seg) {
            st.own = None;
        }
    }

    /// Seals the segments of writers that died (journal unlocked and not
    /// sealed): truncated to their last whole record, then sealed. Removes
    /// journals without a segment, and segments without a journal and
    /// temporary journals older than [`ORPHAN_AFTER`] (a writer creates
    /// its segment and places its journal in the same instant). Returns
    /// how many segments it sealed or removed.
    pub(crate) fn seal_abandoned(&self) -> io::Result<u64> {
        let own = self.state().own;
        let mut n = 0;
        let now = SystemTime::now();
        let old = |m: &fs::Metadata| {
            m.modified()
                .is_ok_and(|t| now.duration_since(t).is_ok_and(|a| a >= ORPHAN_AFTER))
        };
        let journals: HashSet<u64> = self.list()?.into_iter().collect();
        for e in fs::read_dir(&self.dir)? {
            let e = e?;
            let name = e.file_name();
            let Some(name) = name.to_str() else { continue };
            let orphan = if name.ends_with(TEMP_SUFFIX) {
                true
            } else if name.len() == 16 {
                u64::from_str_radix(name, 16).is_ok_and(|seg| !journals.contains(&seg))
            } else {
                false
            };
            if orphan && e.metadata().is_ok_and(|m| old(&m)) {
                remove_if_there(&e.path())?;
                n += 1;
            }
        }
        for seg in journals {
            if Some(seg) == own {
                continue;
            }
            let path = self.journal_path(seg);
            let f = match OpenOptions::new().read(true).write(true).open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            if !try_lock_exclusive(&f)? {
                continue;
            }
            let len = usize::try_from(f.metadata()?.len())
                .map_err(|_| io::Error::from(ErrorKind::OutOfMemory))?;
            let tail = journal::parse(&read_at(&f, 0, len, 0)?, 0);
            if tail.ended {
                continue;
            }
            if !self.data_path(seg).exists() {
                remove_if_there(&path)?;
                n += 1;
                continue;
            }
            let mut end = tail.consumed as u64;
            if end == 0 {
                f.write_all_at(journal::MAGIC, 0)?;
                end = journal::MAGIC.len() as u64;
            }
            f.set_len(end)?;
            f.write_all_at(&Record::Sealed.encode(), end)?;
            tracing::info!(segment = %self.data_path(seg).display(), "sealed the cache segment of a process that died");
            n += 1;
        }
        Ok(n)
    }

    /// Every segment known after a refresh, with its size, timestamps and
    /// how many live entries (pinned or not) the index places in it.
    pub(crate) fn survey(&self, pinned: &HashSet<ChunkId>) -> io::Result<Vec<SegInfo>> {
        self.refresh()?;
        let st = self.state();
        let mut per: HashMap<u64, (u64, bool)> = HashMap::new();
        for (id, loc) in &st.index {
            let e = per.entry(loc.seg).or_default();
            e.0 += 1;
            e.1 |= pinned.contains(id);
        }
        let mut out = Vec::with_capacity(st.journals.len());
        for (&seg, j) in &st.journals {
            let (len, atime, mtime) = match fs::metadata(self.data_path(seg)) {
                Ok(m) => (
                    m.len(),
                    m.accessed().unwrap_or(UNIX_EPOCH),
                    m.modified().unwrap_or(UNIX_EPOCH),
                ),
                Err(e) if e.kind() == ErrorKind::NotFound => (0, UNIX_EPOCH, UNIX_EPOCH),
                Err(e) => return Err(e),
            };
            let (entries, pinned) = per.get(&seg).copied().unwrap_or_default();
            out.push(SegInfo {
                id: seg,
                len,
                atime,
                mtime,
                sealed: j.file.is_none() && st.own != Some(seg),
                entries,
                pinned,
            });
        }
        Ok(out)
    }

    /// Deletes segment `seg` (its bytes, then its journal) and forgets it.
    /// Processes that have it open read it until they notice.
    pub(crate) fn remove(&self, seg: u64) -> io::Result<()> {
        remove_if_there(&self.data_path(seg))?;
        remove_if_there(&self.journal_path(seg))?;
        let gone = HashSet::from([seg]);
        self.state_mut().forget(&gone);
        self.lock_files().remove(&seg);
        Ok(())
    }
}

impl Drop for Segments {
    fn drop(&mut self) {
        if let Some(w) = self.lock_writer().take() {
            self.seal(w);
        }
    }
}

impl Writer {
    fn write_record(&mut self, r: &Record) -> io::Result<()> {
        self.journal.write_all_at(&r.encode(), self.journal_len)?;
        self.journal_len += journal::RECORD as u64;
        Ok(())
    }
}

/// A segment without a journal, or a temporary journal, this old belongs
/// to a writer that died between creating one and placing the other.
const ORPHAN_AFTER: Duration = Duration::from_secs(10);
/// Ends the names of journals being created.
const TEMP_SUFFIX: &str = ".tmp";

fn remove_if_there(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn micros(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

impl State {
    fn apply(&mut self, seg: u64, r: Record) {
        match r {
            Record::Entry { id, loc } => {
                if loc.seg != seg
                    || loc.len > MAX_ENTRY_BYTES
                    || self.dead.contains(&(loc.seg, loc.off))
                {
                    return;
                }
                match self.index.get(&id) {
                    Some(old) if (old.seg, old.off) >= (loc.seg, loc.off) => {}
                    _ => {
                        self.index.insert(id, loc);
                    }
                }
            }
            Record::Tombstone { id, loc } => {
                self.dead.insert((loc.seg, loc.off));
                if self.index.get(&id) == Some(&loc) {
                    self.index.remove(&id);
                }
            }
            Record::Sealed => {}
        }
    }

    fn forget(&mut self, gone: &HashSet<u64>) {
        for s in gone {
            self.journals.remove(s);
        }
        self.index.retain(|_, l| !gone.contains(&l.seg));
        self.dead.retain(|(s, _)| !gone.contains(s));
    }
}

/// Opens a segment for reading with `O_NOATIME` (its timestamps are the
/// LRU-K history written by [`record_access`]); a plain open where the
/// flag is refused (a file of another owner).
fn open_noatime(path: &Path) -> io::Result<File> {
    match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOATIME)
        .open(path)
    {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => File::open(path),
        r => r,
    }
}

fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Records an access for LRU-K (K = 2) in the segment's timestamps:
/// mtime := the previous access (atime), atime := now; unless the previous
/// access is less than `granularity` old (LRU-K's correlated reference
/// period: the two count as one, and nothing is written). The segment
/// file remembers the last access recorded, so that most accesses cost no
/// system call at all.
fn record_access(f: &SegFile, granularity: Duration) {
    let now = SystemTime::now();
    let last = f.recorded_ms.load(Ordering::Relaxed);
    if last != 0 && millis(now).saturating_sub(last) < granularity.as_millis() as u64 {
        return;
    }
    if f.recorded_ms
        .compare_exchange(last, millis(now), Ordering::Relaxed, Ordering::Relaxed)
        .is_err()
    {
        return;
    }
    let Ok(meta) = f.file.metadata() else { return };
    let previous = meta.accessed().unwrap_or(UNIX_EPOCH);
    if !due(previous, now, granularity) {
        // Another process recorded one meanwhile.
        f.recorded_ms
            .store(millis(previous).max(1), Ordering::Relaxed);
        return;
    }
    let times = FileTimes::new().set_modified(previous).set_accessed(now);
    if let Err(e) = f.file.set_times(times) {
        tracing::debug!(error = %e, "cannot record cache access");
    }
}
