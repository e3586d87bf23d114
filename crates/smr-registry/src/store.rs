//! [`RegistryStore`]: a read-only [`ChunkStore`] over an smr artifact's
//! packs in a registry.
//!
//! `get(id)` finds the chunk's pack and byte range in the [`PackIndex`] and
//! reads it with one HTTP Range request, through a dispatcher that
//! coalesces concurrent requests:
//!
//! - Every `get` queues its chunk and lingers briefly
//!   ([`StoreOptions::linger`]) so that the chunks of one read, asked for by
//!   several threads nearly at once, can meet in the queue.
//! - Then, if fewer than [`StoreOptions::max_in_flight`] requests are
//!   running, the calling thread takes its chunk *and every queued chunk
//!   next to it in the same pack* (gaps up to [`StoreOptions::max_gap`] are
//!   read and discarded, a request spans at most
//!   [`StoreOptions::max_request`] bytes), issues one ranged request, and
//!   hands each waiter its slice. Otherwise it waits for a slot.
//! - A failed request fails every chunk it was to serve; each waiter gets
//!   an error naming its chunk, the pack and the byte range.
//!
//! There are no dispatcher threads: callers do the fetching, so the
//! concurrency is that of the callers, capped at `max_in_flight`. Bytes are
//! not verified here (the node cache hashes every chunk once, against its
//! name, as for any store).

use crate::blobs::Blobs;
use crate::error::RegistryError;
use crate::pack::PackIndex;
use smr_format::ChunkId;
use smr_store::{
    backoff, ChunkStore, Op, Outage, PutOutcome, RemoteOptions, StoreError, TransportKind,
};
use std::collections::{BTreeMap, HashMap};
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

mod ahead;
#[cfg(test)]
mod tests;

use ahead::{Ahead, AheadChunk};

/// Tuning of a [`RegistryStore`]'s dispatcher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreOptions {
    /// Ranged requests running at once (default 16).
    pub max_in_flight: usize,
    /// Largest hole between two queued chunks of a pack that is read and
    /// thrown away to serve both with one request (default 64 KiB).
    pub max_gap: u64,
    /// Largest span of one request (default 8 MiB).
    pub max_request: u64,
    /// How long a `get` waits for neighbours before its request is issued
    /// (default 1 ms: small next to a registry round trip, long enough for
    /// the fetch pool to queue the other chunks of the same read).
    pub linger: Duration,
    /// How long a `get` keeps retrying transient failures (registry down,
    /// 5xx, 429) before it gives up with [`StoreError::GaveUp`] (default
    /// 30 s, as for every remote store; see `SMR_STORE_DEADLINE`).
    pub deadline: Duration,
    /// Most bytes read ahead of a sequential reader per request (default
    /// 1 MiB; 0 disables; see the `ahead` module).
    pub readahead: u64,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            max_in_flight: 16,
            max_gap: 64 << 10,
            max_request: 8 << 20,
            linger: Duration::from_millis(1),
            deadline: Duration::from_secs(30),
            readahead: 1 << 20,
        }
    }
}

/// Counters of a [`RegistryStore`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct RegistryStoreStats {
    /// Ranged requests issued (including failed ones).
    pub requests: u64,
    /// Ranged requests that failed.
    pub failed_requests: u64,
    /// Chunks handed to callers.
    pub chunks_served: u64,
    /// Bytes received from the registry.
    pub bytes_transferred: u64,
    /// Received bytes that were gaps between wanted chunks.
    pub bytes_discarded: u64,
    /// Most requests that were running at the same time.
    pub max_in_flight: u64,
    /// Bytes read ahead of sequential readers.
    pub readahead_bytes: u64,
    /// `get`s served from what was read ahead (no request).
    pub readahead_hits: u64,
}

/// A ranged read that failed; shared by every chunk it was to serve.
#[derive(Debug, thiserror::Error)]
#[error("pack {pack} bytes {start}..{end} ({chunks} chunks): {source}")]
pub struct RangeError {
    /// The pack's digest.
    pub pack: String,
    /// First byte asked for.
    pub start: u64,
    /// End of the range (exclusive).
    pub end: u64,
    /// Chunks the request was to serve.
    pub chunks: usize,
    /// What the registry client said.
    #[source]
    pub source: RegistryError,
}

/// A read-only chunk store serving an smr artifact's packs.
pub struct RegistryStore {
    blobs: Arc<dyn Blobs>,
    index: Arc<PackIndex>,
    opts: StoreOptions,
    desc: String,
    queue: Mutex<Queue>,
    wake: Condvar,
    requests: AtomicU64,
    failed: AtomicU64,
    /// While down, `get`s try once and fail at once.
    down: Outage,
    served: AtomicU64,
    transferred: AtomicU64,
    discarded: AtomicU64,
    read_ahead: AtomicU64,
    ahead_hits: AtomicU64,
}

/// Queue key: pack position, offset in the pack, ticket (arrival order).
type Key = (usize, u64, u64);
type Outcome = Result<Vec<u8>, Arc<RangeError>>;

#[derive(Default)]
struct Queue {
    pending: BTreeMap<Key, Pending>,
    done: HashMap<u64, Outcome>,
    in_flight: usize,
    max_in_flight: usize,
    next_ticket: u64,
    ahead: Ahead,
}

struct Pending {
    id: ChunkId,
    len: u32,
}

/// Chunks served by one ranged request.
struct Batch {
    pack: usize,
    start: u64,
    end: u64,
    /// `(ticket, id, offset, len)`, in offset order.
    members: Vec<(u64, ChunkId, u64, u32)>,
    /// Chunks read ahead after the members, in offset order.
    ahead: Vec<AheadChunk>,
}

impl RegistryStore {
    /// A store serving the chunks of `index` from the packs in `blobs`.
    pub fn new(blobs: Arc<dyn Blobs>, index: Arc<PackIndex>, opts: StoreOptions) -> Self {
        let desc = blobs.describe();
        RegistryStore {
            blobs,
            index,
            opts: StoreOptions {
                max_in_flight: opts.max_in_flight.max(1),
                ..opts
            },
            desc,
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            requests: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            down: Outage::default(),
            served: AtomicU64::new(0),
            transferred: AtomicU64::new(0),
            discarded: AtomicU64::new(0),
            read_ahead: AtomicU64::new(0),
            ahead_hits: AtomicU64::new(0),
        }
    }

    /// The pack index this store serves.
    pub fn index(&self) -> &Arc<PackIndex> {
        &self.index
    }

    /// The dispatcher's counters so far.
    pub fn stats(&self) -> RegistryStoreStats {
        RegistryStoreStats {
            requests: self.requests.load(Ordering::Relaxed),
            failed_requests: self.failed.load(Ordering::Relaxed),
            chunks_served: self.served.load(Ordering::Relaxed),
            bytes_transferred: self.transferred.load(Ordering::Relaxed),
            bytes_discarded: self.discarded.load(Ordering::Relaxed),
            max_in_flight: self.lock().max_in_flight as u64,
            readahead_bytes: self.read_ahead.load(Ordering::Relaxed),
            readahead_hits: self.ahead_hits.load(Ordering::Relaxed),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        // The queue's invariants hold between statements: a panicking
        // holder leaves nothing half-done.
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn fetch(&self, id: &ChunkId) -> Result<Vec<u8>, StoreError> {
        let loc = self.index.locate(id).ok_or_else(|| StoreError::Missing {
            id: *id,
            store: self.desc.clone(),
        })?;
        let since = Instant::now();
        let mut q = self.lock();
        if let Some(bytes) = q.ahead.take(id) {
            self.ahead_hits.fetch_add(1, Ordering::Relaxed);
            self.served.fetch_add(1, Ordering::Relaxed);
            return Ok(bytes);
        }
        let ticket = q.next_ticket;
        q.next_ticket += 1;
        let key = (loc.pack, loc.offset, ticket);
        q.pending.insert(
            key,
            Pending {
                id: *id,
                len: loc.len,
            },
        );
        loop {
            if let Some(out) = q.done.remove(&ticket) {
                return self.finish(id, out);
            }
            if q.pending.contains_key(&key) {
                let ripe = since + self.opts.linger;
                let now = Instant::now();
                if now < ripe {
                    q = self
                        .wake
                        .wait_timeout(q, ripe - now)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0;
                    continue;
                }
                if q.in_flight < self.opts.max_in_flight {
                    let batch = self.take_batch(&mut q, key);
                    q.in_flight += 1;
                    q.max_in_flight = q.max_in_flight.max(q.in_flight);
                    drop(q);
                    let out = self.run(batch, ticket);
                    return self.finish(id, out);
                }
            }
            q = self.wake.wait(q).unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Removes from the queue the chunk at `key` and its queued neighbours
    /// in the same pack.
    fn take_batch(&self, q: &mut Queue, key: Key) -> Batch {
        let (pack, offset, _) = key;
        let len = q.pending.get(&key).map_or(0, |p| u64::from(p.len));
        let (mut start, mut end) = (offset, offset + len);
        let mut keys = vec![key];
        for (k, p) in q.pending.range((pack, offset, key.2 + 1)..) {
            let k_end = k.1 + u64::from(p.len);
            let new_end = end.max(k_end);
            if k.0 != pack
                || k.1 > end + self.opts.max_gap
                || new_end - start > self.opts.max_request
            {
                break;
            }
            end = new_end;
            keys.push(*k);
        }
        for (k, p) in q.pending.range(..key).rev() {
            let k_end = k.1 + u64::from(p.len);
            if k.0 != pack
                || k_end + self.opts.max_gap < start
                || end - k.1.min(start) > self.opts.max_request
            {
                break;
            }
            start = start.min(k.1);
            keys.push(*k);
        }
        keys.sort_unstable_by_key(|k| (k.1, k.2));
        let members = keys
            .iter()
            .filter_map(|k| {
                let p = q.pending.remove(k)?;
                Some((k.2, p.id, k.1, p.len))
            })
            .collect();
        let ahead = q.ahead.plan(
            &self.index,
            pack,
            (start, end),
            self.opts.readahead,
            self.opts.max_request,
        );
        let end = ahead.last().map_or(end, |&(_, o, l)| o + u64::from(l));
        Batch {
            pack,
            start,
            end,
            members,
            ahead,
        }
    }

    /// Issues `batch`'s request, posts the other members' outcomes, and
    /// returns the outcome of ticket `own`.
    fn run(&self, batch: Batch, own: u64) -> Outcome {
        let mut slot = InFlight {
            store: self,
            tickets: batch
                .members
                .iter()
                .map(|m| m.0)
                .filter(|&t| t != own)
                .collect(),
            posted: false,
        };
        let digest = self
            .index
            .packs()
            .get(batch.pack)
            .map(|p| p.digest.clone())
            .unwrap_or_default();
        let len = batch.end - batch.start;
        self.requests.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(pack = %digest, offset = batch.start, len, chunks = batch.members.len(), "ranged pack read");
        let result = self
            .blobs
            .get_blob_range(&digest, batch.start, len)
            .and_then(|bytes| {
                if bytes.len() as u64 == len {
                    Ok(bytes)
                } else {
                    Err(RegistryError::Protocol {
                        repo: self.desc.clone(),
                        what: format!("GET blob {digest} bytes {}..{}", batch.start, batch.end),
                        reason: format!("got {} bytes, asked for {len}", bytes.len()),
                    })
                }
            });
        let mut outcomes: Vec<(u64, Outcome)> = Vec::with_capacity(batch.members.len());
        let mut read_ahead: Vec<(ChunkId, Vec<u8>)> = Vec::new();
        match result {
            Ok(bytes) => {
                self.transferred.fetch_add(len, Ordering::Relaxed);
                for &(id, offset, clen) in &batch.ahead {
                    let from = (offset - batch.start) as usize;
                    if let Some(piece) = bytes.get(from..from + clen as usize) {
                        read_ahead.push((id, piece.to_vec()));
                    }
                }
                let ahead_bytes: u64 = read_ahead.iter().map(|(_, b)| b.len() as u64).sum();
                self.read_ahead.fetch_add(ahead_bytes, Ordering::Relaxed);
                let mut wanted = 0;
                let mut last_offset = None;
                for &(ticket, _, offset, clen) in &batch.members {
                    let from = (offset - batch.start) as usize;
                    let piece = bytes.get(from..from + clen as usize).unwrap_or_default();
                    if last_offset != Some(offset) {
                        wanted += u64::from(clen);
                        last_offset = Some(offset);
                    }
                    outcomes.push((ticket, Ok(piece.to_vec())));
                }
                self.discarded
                    .fetch_add(len - wanted - ahead_bytes, Ordering::Relaxed);
                self.served
                    .fetch_add(batch.members.len() as u64, Ordering::Relaxed);
            }
            Err(source) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                let err = Arc::new(RangeError {
                    pack: digest,
                    start: batch.start,
                    end: batch.end,
                    chunks: batch.members.len(),
                    source,
                });
                tracing::warn!(store = %self.desc, error = %err, "ranged pack read failed");
                outcomes.extend(batch.members.iter().map(|m| (m.0, Err(err.clone()))));
            }
        }
        let mut mine = None;
        let mut q = self.lock();
        q.in_flight -= 1;
        let cap = 4 * self.opts.readahead;
        for (id, bytes) in read_ahead {
            q.ahead.keep(id, bytes, cap);
        }
        for (ticket, out) in outcomes {
            if ticket == own {
                mine = Some(out);
            } else {
                q.done.insert(ticket, out);
            }
        }
        slot.posted = true;
        drop(q);
        self.wake.notify_all();
        mine.unwrap_or_else(|| {
            Err(Arc::new(RangeError {
                pack: String::new(),
                start: batch.start,
                end: batch.end,
                chunks: 0,
                source: RegistryError::Protocol {
                    repo: self.desc.clone(),
                    what: "ranged pack read".into(),
                    reason: "the caller's own chunk was not in its batch".into(),
                },
            }))
        })
    }

    /// [`ChunkStore::get`]: [`RegistryStore::fetch`] until it succeeds,
    /// fails for good, or transient failures outlast the deadline. Backs
    /// off exponentially with jitter, at least as long as a `Retry-After`.
    fn get_with_deadline(&self, id: &ChunkId) -> Result<Vec<u8>, StoreError> {
        let start = Instant::now();
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let err = match self.fetch(id) {
                Ok(bytes) => {
                    self.down.up(&self.desc);
                    return Ok(bytes);
                }
                Err(e) if !e.is_transient() => return Err(e),
                Err(e) => e,
            };
            // The remote stores' backoff (100 ms doubling to 2 s, jittered).
            let policy = RemoteOptions::default();
            let wait = backoff(policy.backoff_initial, policy.backoff_max, attempts)
                .max(err.retry_after().unwrap_or_default());
            let elapsed = start.elapsed();
            if self.down.is_down() || elapsed + wait >= self.opts.deadline {
                self.down.down(&self.desc);
                return Err(StoreError::GaveUp {
                    store: self.desc.clone(),
                    id: *id,
                    op: Op::Get,
                    elapsed,
                    deadline: self.opts.deadline,
                    attempts,
                    last: Box::new(err),
                });
            }
            tracing::warn!(store = %self.desc, chunk = %id, attempts, error = %err, "retrying in {:.1} s", wait.as_secs_f64());
            std::thread::sleep(wait);
        }
    }

    fn finish(&self, id: &ChunkId, out: Outcome) -> Result<Vec<u8>, StoreError> {
        out.map_err(|err| {
            if err.source.is_transient() {
                // The client has already honoured any Retry-After.
                return StoreError::Transport {
                    store: self.desc.clone(),
                    id: *id,
                    op: Op::Get,
                    kind: TransportKind::Interrupted,
                    cause: Box::new(io::Error::other(err.to_string())),
                };
            }
            let kind = match err.source {
                RegistryError::NotFound { .. } => io::ErrorKind::NotFound,
                _ => io::ErrorKind::Other,
            };
            StoreError::ChunkIo {
                id: *id,
                store: self.desc.clone(),
                source: io::Error::new(kind, err),
            }
        })
    }
}

/// Frees a request slot and fails the other waiters if the request never
/// posted outcomes (the registry client panicked), so nobody waits forever.
struct InFlight<'a> {
    store: &'a RegistryStore,
    tickets: Vec<u64>,
    posted: bool,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if self.posted {
            return;
        }
        let err = Arc::new(RangeError {
            pack: String::new(),
            start: 0,
            end: 0,
            chunks: self.tickets.len(),
            source: RegistryError::Protocol {
                repo: self.store.desc.clone(),
                what: "ranged pack read".into(),
                reason: "the registry client panicked".into(),
            },
        });
        let mut q = self.store.lock();
        q.in_flight = q.in_flight.saturating_sub(1);
        for &t in &self.tickets {
            q.done.insert(t, Err(err.clone()));
        }
        drop(q);
        self.store.wake.notify_all();
    }
}

impl ChunkStore for RegistryStore {
    fn describe(&self) -> String {
        self.desc.clone()
    }

    fn get(&self, id: &ChunkId) -> smr_store::Result<Vec<u8>> {
        self.get_with_deadline(id)
    }

    fn put(&self, id: &ChunkId, _data: &[u8]) -> smr_store::Result<PutOutcome> {
        Err(StoreError::ChunkIo {
            id: *id,
            store: self.desc.clone(),
            source: io::Error::new(
                io::ErrorKind::Unsupported,
                "a registry store is read-only (chunks reach a registry by pushing an smr artifact)",
            ),
        })
    }

    /// Whether the pack index lists `id` (no network request).
    fn exists(&self, id: &ChunkId) -> smr_store::Result<bool> {
        Ok(self.index.locate(id).is_some())
    }
}
