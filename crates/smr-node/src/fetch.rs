//! The fetcher: the one place where chunk misses become store requests.
//!
//! Between the node cache and a [`ChunkStore`]. Callers ask for chunks
//! ([`Fetcher::get`] waits for one, [`Fetcher::plan`] queues chunks that a
//! read is about to want or that are worth reading ahead); a small pool of
//! request threads turns the queue into ranged reads:
//!
//! - **Coalescing.** A request takes the oldest queued chunk of the highest
//!   priority and every queued chunk of the same object next to it: holes
//!   up to [`FetchOptions::max_gap`] are read and dropped, a request spans
//!   at most [`FetchOptions::max_request`] bytes. Stores whose chunks each
//!   have their own object have nothing to merge; pack stores (registry
//!   packs) read many chunks per request.
//! - **Priorities.** The container's own misses ([`Priority::Demand`]) go
//!   before prefetches ([`Priority::Prefetch`]: profile replays, read-ahead),
//!   and prefetches never hold more than all but
//!   [`FetchOptions::reserved`] request threads, so a demand miss never
//!   queues behind them.
//! - **Read-ahead.** A reader going through an object in order gets the
//!   chunks after its read queued as prefetches ([`FetchOptions::readahead`]
//!   bytes); what arrives for nobody is kept in a small bounded buffer until
//!   asked for.
//! - **Single flight.** A chunk queued or being read is read once however
//!   many callers ask; they all get its bytes (or its error).
//! - **Early delivery.** A request that serves several chunks hands each
//!   one out as soon as its bytes have arrived (from stores that stream,
//!   [`ChunkStore::read_range_progressive`]), so a chunk at the front of a
//!   long read does not wait for its end.
//! - **Streams.** Chunks planned as a stream ([`Fetcher::plan_stream`]: a
//!   startup pack, in the order a start reads it) are read in requests of
//!   up to [`FetchOptions::max_stream`] bytes, one such request at a time,
//!   so that the link carries them in that order rather than several
//!   requests sharing it.
//!
//! Bytes are not verified here: the cache hashes every fetched chunk
//! against its name before anyone sees it. Retries, backoff and deadlines
//! are the store's ([`smr_store::Remote`]).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};

use smr_format::ChunkId;
use smr_store::{ByteRange, ChunkStore, Extent, ObjectName, StoreError};

mod early;
#[cfg(test)]
mod tests;

/// Tuning of a [`Fetcher`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FetchOptions {
    /// Requests in flight at once: the request threads (default 8 per
    /// image, which also bounds the memory of requests in flight).
    pub requests: usize,
    /// Request threads prefetches may not take (default 2).
    pub reserved: usize,
    /// Largest hole between two queued chunks of an object that is read and
    /// dropped to serve both with one request (default 64 KiB).
    pub max_gap: u64,
    /// Largest span of one request (default 2 MiB: enough to fill a
    /// long, fast link, small enough that requests in flight stay a few
    /// MiB of memory per image).
    pub max_request: u64,
    /// Bytes of an object queued after a sequential reader's miss (default
    /// 1 MiB; 0 disables).
    pub readahead: u64,
    /// Largest span of one request of a stream (default 16 MiB: a startup
    /// pack of a few tens of MiB in one or two requests, in order).
    pub max_stream: u64,
}

impl Default for FetchOptions {
    fn default() -> Self {
        FetchOptions {
            requests: 8,
            reserved: 2,
            max_gap: 64 << 10,
            max_request: 2 << 20,
            readahead: 1 << 20,
            max_stream: 16 << 20,
        }
    }
}

/// Who wants a chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Priority {
    /// A reader is waiting for it.
    Demand,
    /// Fetched ahead (profile replay, read-ahead): after every demand miss.
    Prefetch,
}

/// A request that failed; shared by every chunk it was to serve.
#[derive(Debug, thiserror::Error)]
#[error("{object} bytes {start}..{end} ({chunks} chunks): {source}")]
pub struct RangeError {
    /// The object read.
    pub object: ObjectName,
    /// First byte asked for.
    pub start: u64,
    /// End of the range (exclusive; `u64::MAX` for "to the object's end").
    pub end: u64,
    /// Chunks the request was to serve.
    pub chunks: usize,
    /// What the store said.
    #[source]
    pub source: StoreError,
}

/// Why a [`Fetcher::get`] failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The store could not say where the chunk is (unknown to it).
    #[error(transparent)]
    Locate(#[from] StoreError),
    /// The request that was to serve the chunk failed.
    #[error(transparent)]
    Range(Arc<RangeError>),
}

impl FetchError {
    /// The store error underneath.
    pub fn store_error(&self) -> &StoreError {
        match self {
            FetchError::Locate(e) => e,
            FetchError::Range(r) => &r.source,
        }
    }
}

/// Counters of a [`Fetcher`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct FetchStats {
    /// Requests issued (including failed ones).
    pub requests: u64,
    /// Requests that failed.
    pub failed_requests: u64,
    /// Chunks the requests served.
    pub chunks: u64,
    /// Bytes received.
    pub bytes: u64,
    /// Received bytes that were holes between wanted chunks.
    pub bytes_discarded: u64,
    /// Most requests in flight at once.
    pub max_in_flight: u64,
    /// Bytes of chunks read for nobody yet (read-ahead, plans).
    pub ahead_bytes: u64,
    /// Chunks served from what was read ahead.
    pub ahead_hits: u64,
    /// Requests running now.
    pub in_flight: u64,
    /// Requests by how long they took: counts at or under each bound of
    /// [`LATENCY_BOUNDS_MS`] (cumulative, as Prometheus histograms count).
    pub latency_buckets: [u64; LATENCY_BOUNDS_MS.len()],
    /// Total time of all requests, microseconds.
    pub latency_sum_us: u64,
}

/// Upper bounds (ms) of the request latency histogram of [`FetchStats`].
pub const LATENCY_BOUNDS_MS: [u64; 12] = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000];

type Outcome = Result<Arc<Vec<u8>>, Arc<RangeError>>;

/// One queued or running chunk.
struct Slot {
    id: ChunkId,
    range: ByteRange,
    prio: Priority,
    seq: u64,
    /// Whether a caller waits for it (else its bytes go to `ahead`).
    wanted: bool,
    /// Planned as part of a stream (cleared if a reader asks for it).
    stream: bool,
    done: Arc<Done>,
}

#[derive(Default)]
struct Done {
    outcome: Mutex<Option<Outcome>>,
    cv: Condvar,
}

impl Done {
    fn wait(&self) -> Outcome {
        let mut o = self.outcome.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(out) = o.as_ref() {
                return out.clone();
            }
            o = self.cv.wait(o).unwrap_or_else(PoisonError::into_inner);
        }
    }

    fn post(&self, out: Outcome) {
        *self.outcome.lock().unwrap_or_else(PoisonError::into_inner) = Some(out);
        self.cv.notify_all();
    }

    /// The bytes posted already, if any.
    fn delivered(&self) -> Option<Arc<Vec<u8>>> {
        match &*self.outcome.lock().unwrap_or_else(PoisonError::into_inner) {
            Some(Ok(b)) => Some(b.clone()),
            _ => None,
        }
    }
}

/// Queue key: object, offset in it, chunk.
type Key = (ObjectName, u64, ChunkId);

#[derive(Default)]
struct State {
    /// Queued chunks in object order (what coalescing scans).
    queue: BTreeMap<Key, Slot>,
    /// Queued chunks per priority in arrival order.
    order: BTreeMap<(Priority, u64), Key>,
    /// Where each queued chunk is in `queue`.
    keys: HashMap<ChunkId, Key>,
    /// Queued and running chunks: where to wait for each.
    flights: HashMap<ChunkId, Arc<Done>>,
    /// Running chunks that nobody waits for yet.
    unwanted: HashSet<ChunkId>,
    ahead: Ahead,
    running: usize,
    running_prefetch: usize,
    running_stream: usize,
    max_running: usize,
    seq: u64,
    stop: bool,
}

impl State {
    /// Whether chunk `id` is queued, running or read ahead.
    fn known(&self, id: &ChunkId) -> bool {
        self.flights.contains_key(id) || self.ahead.has(id)
    }
}

/// Chunks one request serves.
struct Batch {
    object: ObjectName,
    start: u64,
    /// `None`: the whole object (a single chunk).
    end: Option<u64>,
    prio: Priority,
    /// Started by a stream's chunk (see [`Fetcher::plan_stream`]).
    stream: bool,
    slots: Vec<Slot>,
}

/// Turns chunk misses of one store into requests (see the module docs).
pub struct Fetcher {
    store: Arc<dyn ChunkStore>,
    opts: FetchOptions,
    state: Mutex<State>,
    work: Condvar,
    started: OnceLock<()>,
    requests: AtomicU64,
    failed: AtomicU64,
    chunks: AtomicU64,
    bytes: AtomicU64,
    discarded: AtomicU64,
    ahead_bytes: AtomicU64,
    ahead_hits: AtomicU64,
    latency: [AtomicU64; LATENCY_BOUNDS_MS.len()],
    latency_sum_us: AtomicU64,
}

impl std::fmt::Debug for Fetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fetcher")
            .field("store", &self.store.describe())
            .field("opts", &self.opts)
            .finish_non_exhaustive()
    }
}

impl Fetcher {
    /// A fetcher of `store`'s chunks. Its request threads start on first
    /// use and stop when it is dropped.
    pub fn new(store: Arc<dyn ChunkStore>, opts: FetchOptions) -> Arc<Self> {
        Arc::new(Fetcher {
            store,
            opts: FetchOptions {
                requests: opts.requests.max(1),
                reserved: opts.reserved.min(opts.requests.max(1) - 1),
                ..opts
            },
            state: Mutex::new(State::default()),
            work: Condvar::new(),
            started: OnceLock::new(),
            requests: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            chunks: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            discarded: AtomicU64::new(0),
            ahead_bytes: AtomicU64::new(0),
            ahead_hits: AtomicU64::new(0),
            latency: Default::default(),
            latency_sum_us: AtomicU64::new(0),
        })
    }

    /// The store it reads.
    pub fn store(&self) -> &Arc<dyn ChunkStore> {
        &self.store
    }

    /// The options in force.
    pub fn options(&self) -> &FetchOptions {
        &self.opts
    }

    /// Counters so far.
    pub fn stats(&self) -> FetchStats {
        let (max_running, running) = {
            let st = self.lock();
            (st.max_running as u64, st.running as u64)
        };
        FetchStats {
            requests: self.requests.load(Ordering::Relaxed),
            failed_requests: self.failed.load(Ordering::Relaxed),
            chunks: self.chunks.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            bytes_discarded: self.discarded.load(Ordering::Relaxed),
            max_in_flight: max_running,
            ahead_bytes: self.ahead_bytes.load(Ordering::Relaxed),
            ahead_hits: self.ahead_hits.load(Ordering::Relaxed),
            in_flight: running,
            latency_buckets: std::array::from_fn(|i| self.latency[i].load(Ordering::Relaxed)),
            latency_sum_us: self.latency_sum_us.load(Ordering::Relaxed),
        }
    }

    /// The stored bytes of chunk `id` (unverified), fetched with `prio`:
    /// from what was read ahead, by joining a queued or running request
    /// for it, or by queueing it.
    pub fn get(self: &Arc<Self>, id: &ChunkId, prio: Priority) -> Result<Vec<u8>, FetchError> {
        // Where the chunk is, asked of the store without holding the lock;
        // then the state is looked at again, so that a request another
        // caller queued meanwhile is joined, never replaced (its waiters
        // would hang).
        let mut extent = None;
        let (done, runnable) = loop {
            let mut st = self.lock();
            if let Some(bytes) = st.ahead.take(id) {
                self.ahead_hits.fetch_add(1, Ordering::Relaxed);
                return Ok(bytes);
            }
            if let Some(done) = st.flights.get(id).cloned() {
                st.unwanted.remove(id);
                let promoted = want(&mut st, id, prio, true);
                break (done, promoted);
            }
            match extent.take() {
                Some(e) => break (self.enqueue(&mut st, *id, e, prio, true, false), true),
                None => {
                    drop(st);
                    extent = Some(self.store.locate(id)?);
                }
            }
        };
        if runnable {
            self.wake(1);
        }
        let out = done.wait();
        out.map(|b| Arc::try_unwrap(b).unwrap_or_else(|shared| (*shared).clone()))
            .map_err(FetchError::Range)
    }

    /// Queues `chunks` (with where they are) to be fetched with `prio`
    /// unless queued, running or read ahead already, or `missing` says the
    /// caller has them after all; returns at once. What arrives before
    /// anyone asks is kept for a later [`Fetcher::get`].
    ///
    /// `missing` is asked after this fetcher has been checked, so a chunk
    /// that leaves the fetcher for the cache meanwhile is seen there: it
    /// must check where such a chunk goes (the cache's fetches in flight,
    /// then its disk), in that order.
    pub fn plan(
        self: &Arc<Self>,
        chunks: &[(ChunkId, Extent)],
        prio: Priority,
        missing: impl Fn(&ChunkId) -> bool,
    ) {
        self.plan_as(chunks, prio, false, missing);
    }

    /// [`Fetcher::plan`] of prefetches that are to arrive in the order
    /// given (a startup pack's chunks, consecutive in one object): read in
    /// requests of up to [`FetchOptions::max_stream`] bytes, one stream
    /// request running at a time. A chunk a reader asks for leaves the
    /// stream and goes as a demand miss.
    pub fn plan_stream(
        self: &Arc<Self>,
        chunks: &[(ChunkId, Extent)],
        missing: impl Fn(&ChunkId) -> bool,
    ) {
        self.plan_as(chunks, Priority::Prefetch, true, missing);
    }

    fn plan_as(
        self: &Arc<Self>,
        chunks: &[(ChunkId, Extent)],
        prio: Priority,
        stream: bool,
        missing: impl Fn(&ChunkId) -> bool,
    ) {
        if chunks.is_empty() {
            return;
        }
        let mut runnable = 0;
        let new: Vec<&(ChunkId, Extent)> = {
            let mut st = self.lock();
            chunks
                .iter()
                .filter(|(id, _)| {
                    let known = st.known(id);
                    if known && want(&mut st, id, prio, false) {
                        runnable += 1;
                    }
                    !known
                })
                .collect()
        };
        let new: Vec<_> = new.into_iter().filter(|(id, _)| missing(id)).collect();
        {
            let mut st = self.lock();
            for (id, extent) in new {
                // Another caller may have queued it since.
                if !st.known(id) {
                    self.enqueue(&mut st, *id, extent.clone(), prio, false, stream);
                    runnable += 1;
                }
            }
        }
        self.wake(runnable);
    }

    /// Wakes up to `n` request threads for newly runnable chunks (starting
    /// them on first use). One per chunk at most: a thread that wakes to
    /// an empty queue goes back to sleep, and every thread looks at the
    /// queue before it sleeps, so none is woken for nothing in bulk.
    fn wake(self: &Arc<Self>, n: usize) {
        if n == 0 {
            return;
        }
        self.start();
        for _ in 0..n.min(self.opts.requests) {
            self.work.notify_one();
        }
    }

    fn enqueue(
        &self,
        st: &mut State,
        id: ChunkId,
        extent: Extent,
        prio: Priority,
        wanted: bool,
        stream: bool,
    ) -> Arc<Done> {
        let done = Arc::new(Done::default());
        st.seq += 1;
        let seq = st.seq;
        let key = (extent.object, extent.range.offset, id);
        st.order.insert((prio, seq), key.clone());
        st.keys.insert(id, key.clone());
        st.queue.insert(
            key,
            Slot {
                id,
                range: extent.range,
                prio,
                seq,
                wanted,
                stream,
                done: done.clone(),
            },
        );
        st.flights.insert(id, done.clone());
        done
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state's invariants hold between statements.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts the request threads once.
    fn start(self: &Arc<Self>) {
        self.started.get_or_init(|| {
            for i in 0..self.opts.requests {
                let me = Arc::downgrade(self);
                let spawned = std::thread::Builder::new()
                    .name(format!("smr-fetch-{i}"))
                    .spawn(move || request_thread(me));
                if let Err(e) = spawned {
                    tracing::warn!(error = %e, "cannot start a fetch request thread");
                }
            }
        });
    }

    /// The next batch to run, waiting for one; `None` once stopping.
    fn next_batch(&self) -> Option<Batch> {
        let mut st = self.lock();
        loop {
            if st.stop {
                return None;
            }
            let prefetch_room = st.running_prefetch < self.opts.requests - self.opts.reserved;
            let stream_room = st.running_stream == 0;
            let first = st
                .order
                .iter()
                .find(|((p, _), key)| {
                    *p == Priority::Demand
                        || (prefetch_room
                            && (stream_room || st.queue.get(*key).is_none_or(|s| !s.stream)))
                })
                .map(|(k, key)| (*k, key.clone()));
            if let Some((order_key, key)) = first {
                let Some(batch) = self.take_batch(&mut st, order_key.0, key) else {
                    // An order entry without its chunk (never expected):
                    // drop it rather than look at it forever.
                    st.order.remove(&order_key);
                    continue;
                };
                st.running += 1;
                if batch.prio == Priority::Prefetch {
                    st.running_prefetch += 1;
                }
                if batch.stream {
                    st.running_stream += 1;
                }
                st.max_running = st.max_running.max(st.running);
                return Some(batch);
            }
            st = self.work.wait(st).unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Removes from the queue the chunk at `key` and its queued neighbours
    /// in the same object that one request can serve; `None` if `key` is
    /// not queued.
    fn take_batch(&self, st: &mut State, prio: Priority, key: Key) -> Option<Batch> {
        let object = key.0.clone();
        let first = remove(st, &key)?;
        let stream = first.stream;
        let span = match stream {
            true => self.opts.max_stream.max(self.opts.max_request),
            false => self.opts.max_request,
        };
        let Some(mut end) = first.range.end() else {
            // A whole object: one chunk, nothing to merge with.
            return Some(Batch {
                object,
                start: first.range.offset,
                end: None,
                prio,
                stream,
                slots: vec![first],
            });
        };
        let mut start = first.range.offset;
        let mut slots = vec![first];
        let after: Vec<Key> = st
            .queue
            .range(key.clone()..)
            .take_while(|(k, s)| {
                k.0 == object
                    && k.1 <= end.saturating_add(self.opts.max_gap)
                    && s.range.end().is_some_and(|e| {
                        let new_end = end.max(e);
                        let ok = new_end - start <= span;
                        if ok {
                            end = new_end;
                        }
                        ok
                    })
            })
            .map(|(k, _)| k.clone())
            .collect();
        let before: Vec<Key> = st
            .queue
            .range(..key)
            .rev()
            .take_while(|(k, s)| {
                k.0 == object
                    && s.range.end().is_some_and(|e| {
                        let ok = e.saturating_add(self.opts.max_gap) >= start
                            && end - k.1.min(start) <= span;
                        if ok {
                            start = start.min(k.1);
                        }
                        ok
                    })
            })
            .map(|(k, _)| k.clone())
            .collect();
        slots.extend(after.iter().chain(&before).filter_map(|k| remove(st, k)));
        slots.sort_unstable_by_key(|s| s.range.offset);
        Some(Batch {
            object,
            start,
            end: Some(end),
            prio,
            stream,
            slots,
        })
    }

    /// Issues `batch`'s request and posts every chunk's outcome.
    fn run(&self, batch: Batch) {
        let range = match batch.end {
            Some(end) => ByteRange::new(batch.start, end - batch.start),
            None => batch.slots.first().map_or(ByteRange::WHOLE, |s| s.range),
        };
        self.requests.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(object = %batch.object, %range, chunks = batch.slots.len(), prio = ?batch.prio, "store request");
        let fail = |why: &str| StoreError::ChunkIo {
            what: smr_store::Target::of(&batch.object, range),
            store: self.store.describe(),
            source: std::io::Error::other(why.to_string()),
        };
        // A store that panics (a bug) fails this request's chunks, not
        // every later reader of them.
        let read = || match early::Early::of(&batch) {
            Some(progress) => self
                .store
                .read_range_progressive(&batch.object, range, &progress),
            None => self
                .store
                .read_ranges(&batch.object, &[range])
                .and_then(|mut got| got.pop().ok_or_else(|| fail("the store returned no bytes"))),
        };
        let t = std::time::Instant::now();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(read));
        self.observe(t.elapsed());
        tracing::debug!(object = %batch.object, %range, took = ?t.elapsed(), prio = ?batch.prio, "store request done");
        let result = result.unwrap_or_else(|_| Err(fail("the store panicked")));
        let (prio, stream) = (batch.prio, batch.stream);
        let outcomes = match result {
            Ok(bytes) => self.cut(batch, range, bytes),
            Err(source) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                let err = Arc::new(RangeError {
                    object: batch.object.clone(),
                    start: range.offset,
                    end: range.end().unwrap_or(u64::MAX),
                    chunks: batch.slots.len(),
                    source,
                });
                tracing::warn!(store = %self.store.describe(), error = %err, "store request failed");
                // Chunks handed out before the failure keep their bytes.
                let failed = batch.slots.into_iter().map(|s| {
                    let out = s.done.delivered().ok_or_else(|| err.clone());
                    (s, out)
                });
                failed.collect()
            }
        };
        self.post(prio, stream, outcomes);
    }

    /// Counts one request that took `took`.
    fn observe(&self, took: std::time::Duration) {
        let ms = took.as_secs_f64() * 1000.0;
        for (b, n) in LATENCY_BOUNDS_MS.iter().zip(&self.latency) {
            if ms <= *b as f64 {
                n.fetch_add(1, Ordering::Relaxed);
            }
        }
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.latency_sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// Each chunk's bytes out of the answer `bytes` to `batch`'s request
    /// for `range`.
    fn cut(&self, batch: Batch, range: ByteRange, bytes: Vec<u8>) -> Vec<(Slot, Outcome)> {
        let total = bytes.len() as u64;
        self.bytes.fetch_add(total, Ordering::Relaxed);
        // One chunk that is the whole answer takes it as it is.
        let single = matches!(batch.slots.as_slice(),
            [s] if s.range.len.is_none_or(|l| l == total));
        let (mut whole, bytes) = match single {
            true => (Some(bytes), Vec::new()),
            false => (None, bytes),
        };
        let mut used = 0u64;
        let mut outcomes = Vec::with_capacity(batch.slots.len());
        for slot in batch.slots {
            let piece = match (whole.take(), slot.range.len) {
                (Some(all), _) => Some(Arc::new(all)),
                (None, None) => None,
                // Handed out early: the same bytes, not another copy.
                (None, Some(len)) => slot.done.delivered().or_else(|| {
                    let from = (slot.range.offset - batch.start) as usize;
                    let p = bytes.get(from..from + len as usize);
                    p.map(|p| Arc::new(p.to_vec()))
                }),
            };
            let out = match piece {
                Some(p) => {
                    used += p.len() as u64;
                    Ok(p)
                }
                None => Err(Arc::new(RangeError {
                    object: batch.object.clone(),
                    start: range.offset,
                    end: range.end().unwrap_or(u64::MAX),
                    chunks: 1,
                    source: StoreError::past_the_end(
                        self.store.describe(),
                        smr_store::Target::of(&batch.object, range),
                        total,
                    ),
                })),
            };
            outcomes.push((slot, out));
        }
        self.chunks
            .fetch_add(outcomes.len() as u64, Ordering::Relaxed);
        self.discarded
            .fetch_add(total.saturating_sub(used), Ordering::Relaxed);
        outcomes
    }

    /// Hands out the outcomes of a request of priority `prio`: to the
    /// callers waiting for them, and what nobody waits for yet to the
    /// read-ahead buffer.
    fn post(&self, prio: Priority, stream: bool, outcomes: Vec<(Slot, Outcome)>) {
        let mut st = self.lock();
        st.running -= 1;
        if prio == Priority::Prefetch {
            st.running_prefetch -= 1;
        }
        if stream {
            st.running_stream -= 1;
        }
        let cap = 2 * self.opts.readahead.max(self.opts.max_request);
        for (slot, out) in outcomes {
            st.flights.remove(&slot.id);
            let unwanted = st.unwanted.remove(&slot.id);
            if let (true, Ok(bytes)) = (unwanted, &out) {
                self.ahead_bytes
                    .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                st.ahead.keep(slot.id, bytes.clone(), cap);
            }
            slot.done.post(out);
        }
        drop(st);
        if prio == Priority::Prefetch || stream {
            // A thread waiting for room for a prefetch may take one now;
            // this thread looks at the queue itself before it sleeps.
            self.work.notify_one();
        }
    }
}

impl Drop for Fetcher {
    fn drop(&mut self) {
        self.lock().stop = true;
        self.work.notify_all();
    }
}

/// Request thread: runs batches until the fetcher is gone.
fn request_thread(fetcher: std::sync::Weak<Fetcher>) {
    loop {
        let Some(f) = fetcher.upgrade() else { return };
        let Some(batch) = f.next_batch() else { return };
        f.run(batch);
    }
}

/// Removes the queued chunk at `key`; a chunk nobody waits for is noted
/// in `unwanted` while it runs.
fn remove(st: &mut State, key: &Key) -> Option<Slot> {
    let slot = st.queue.remove(key)?;
    st.order.remove(&(slot.prio, slot.seq));
    st.keys.remove(&slot.id);
    if !slot.wanted {
        st.unwanted.insert(slot.id);
    }
    Some(slot)
}

/// Records, for a queued chunk, that it is wanted with `prio` (raising a
/// prefetch to a demand) and, if `waiter`, that a caller waits for it.
/// Returns whether it was raised (it may be runnable now).
fn want(st: &mut State, id: &ChunkId, prio: Priority, waiter: bool) -> bool {
    let Some(key) = st.keys.get(id).cloned() else {
        return false;
    };
    let Some(slot) = st.queue.get_mut(&key) else {
        return false;
    };
    slot.wanted |= waiter;
    if prio >= slot.prio {
        return false;
    }
    slot.stream = false;
    st.order.remove(&(slot.prio, slot.seq));
    slot.prio = prio;
    st.order.insert((prio, slot.seq), key);
    true
}

/// Chunks read for nobody yet, oldest dropped first beyond a byte cap.
#[derive(Default)]
struct Ahead {
    bytes: HashMap<ChunkId, Arc<Vec<u8>>>,
    order: VecDeque<ChunkId>,
    total: u64,
}

impl Ahead {
    fn has(&self, id: &ChunkId) -> bool {
        self.bytes.contains_key(id)
    }

    fn take(&mut self, id: &ChunkId) -> Option<Vec<u8>> {
        let b = self.bytes.remove(id)?;
        self.total -= b.len() as u64;
        Some(Arc::try_unwrap(b).unwrap_or_else(|shared| (*shared).clone()))
    }

    fn keep(&mut self, id: ChunkId, bytes: Arc<Vec<u8>>, cap: u64) {
        self.total += bytes.len() as u64;
        if let Some(old) = self.bytes.insert(id, bytes) {
            self.total -= old.len() as u64;
        } else {
            self.order.push_back(id);
        }
        while self.total > cap {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            if let Some(b) = self.bytes.remove(&old) {
                self.total -= b.len() as u64;
            }
        }
    }
}

/// Requests running now (tests: every slot is freed after a request).
#[cfg(test)]
pub(crate) fn tests_running(f: &Fetcher) -> usize {
    f.lock().running
}
