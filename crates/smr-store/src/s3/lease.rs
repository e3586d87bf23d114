//! Leases that keep the writers of an S3 store and its garbage collector
//! apart.
//!
//! The local store's argument (a writer refreshes a reused chunk's
//! modification time; the collector renames a file aside before looking
//! at its time, `crate::gc`) has no S3 counterpart: an object's time
//! cannot be refreshed, and a DELETE cannot be made conditional. So on S3
//! a writer and the collector never run at the same time, by mutual
//! exclusion over S3's strongly consistent PUT, HEAD and LIST, in
//! Dekker's manner:
//!
//! - a writer, before its first `put`, writes `leases/writer-<id>`, then
//!   looks for `leases/gc`; if a live one is there it removes its own
//!   lease, waits and tries again;
//! - the collector writes `leases/gc` (`If-None-Match: *`), then lists
//!   `leases/`; if a live writer lease is there it removes its own and
//!   gives up.
//!
//! Each looks *after* announcing itself, so of a writer and a collector
//! that start together at least one sees the other and steps back: they
//! never both proceed. A writer keeps its lease until the store is
//! dropped, after its recipe is written, so a collection that starts
//! later reads that recipe as a root.
//!
//! A lease is live while its object was written less than the TTL ago
//! (`SMR_S3_LEASE_TTL` seconds, 10 minutes by default); its holder rewrites it
//! every TTL/5 from a thread, and removes it when done. A holder that dies
//! leaves a lease that goes stale; a collector removes stale writer
//! leases. A holder paused for longer than the TTL (SIGSTOP, a frozen VM)
//! loses the exclusion: that is the limit of any lease.

use crate::error::{Op, StoreError};
use crate::runtime::block_on;
use crate::{ObjectName, Result, Target};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

/// Environment variable: how long a lease lives without being rewritten.
pub const LEASE_TTL_ENV: &str = "SMR_S3_LEASE_TTL";

/// Default lease TTL.
const DEFAULT_TTL: Duration = Duration::from_secs(600);

/// How long a writer waits for a collection to end before failing.
const MAX_WAIT: Duration = Duration::from_secs(3600);

/// The collector's lease object, under the store's prefix.
const GC_LEASE: &str = "leases/gc";

/// Prefix of writers' lease objects.
const WRITER_LEASE: &str = "leases/writer-";

/// The lease TTL: `SMR_S3_LEASE_TTL` (seconds) or 10 minutes.
pub(crate) fn ttl() -> Result<Duration> {
    let Ok(v) = std::env::var(LEASE_TTL_ENV) else {
        return Ok(DEFAULT_TTL);
    };
    v.trim()
        .parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s > 0.0 && *s < 1e9)
        .map(Duration::from_secs_f64)
        .ok_or_else(|| StoreError::InvalidSetting {
            name: LEASE_TTL_ENV,
            value: v.clone(),
            reason: "not a positive number of seconds".into(),
        })
}

/// The lease objects of one store.
#[derive(Clone)]
pub(crate) struct Leases {
    pub(crate) s3: object_store::aws::AmazonS3,
    /// The store's key prefix.
    pub(crate) prefix: Path,
    /// The store's location, for messages.
    pub(crate) store: String,
    /// Whether the store takes `If-None-Match: *`.
    pub(crate) conditional_put: bool,
}

/// A held lease: rewritten in the background, removed on drop.
pub struct Lease {
    key: Path,
    inner: Leases,
    stop: Arc<(Mutex<bool>, Condvar)>,
    refresher: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease").field("key", &self.key).finish()
    }
}

/// Who holds a lease: the object's content.
fn holder() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("pid {} on {}", std::process::id(), host.trim())
}

impl Leases {
    fn store(&self) -> String {
        self.store.clone()
    }

    fn lease_key(&self, name: &str) -> Path {
        name.split('/')
            .fold(self.prefix.clone(), |path, part| path.join(part))
    }

    fn lease_error(&self, e: object_store::Error) -> StoreError {
        let what = Target::of(&ObjectName::new("leases/"), crate::ByteRange::WHOLE);
        super::map_error(self.store(), Op::Put, what, e)
    }

    /// Writes lease `key` (with `mode`); `Ok(false)` when `Create` found
    /// one there.
    fn write_lease(&self, key: &Path, mode: PutMode) -> Result<bool> {
        let (s3, key) = (self.s3.clone(), key.clone());
        let body = PutPayload::from(holder().into_bytes());
        let put = block_on(async move { s3.put_opts(&key, body, PutOptions::from(mode)).await });
        match put {
            Ok(_) => Ok(true),
            Err(
                object_store::Error::AlreadyExists { .. }
                | object_store::Error::Precondition { .. },
            ) => Ok(false),
            Err(e) => Err(self.lease_error(e)),
        }
    }

    fn remove_lease(&self, key: &Path) -> Result<()> {
        let (s3, key) = (self.s3.clone(), key.clone());
        match block_on(async move { s3.delete(&key).await }) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.lease_error(e)),
        }
    }

    /// Every lease under `leases/`: key and age (one LIST).
    fn leases(&self) -> Result<Vec<(Path, Duration)>> {
        let listed = super::list_objects(&self.s3, self.lease_key("leases"))
            .map_err(|e| self.lease_error(e))?;
        Ok(listed
            .into_iter()
            .map(|meta| {
                let age = SystemTime::now()
                    .duration_since(SystemTime::from(meta.last_modified))
                    .unwrap_or_default();
                (meta.location, age)
            })
            .collect())
    }

    /// Who holds lease `key` (its content), for messages.
    fn holder(&self, key: &Path) -> String {
        let (s3, key) = (self.s3.clone(), key.clone());
        block_on(async move { s3.get(&key).await?.bytes().await })
            .map(|b| String::from_utf8_lossy(b.as_ref()).into_owned())
            .unwrap_or_else(|_| "a holder gone meanwhile".into())
    }

    /// The live collector lease, as `(holder, age)`.
    fn live_gc(&self, ttl: Duration) -> Result<Option<(String, Duration)>> {
        let gc = self.lease_key(GC_LEASE);
        Ok(self
            .leases()?
            .into_iter()
            .find(|(k, age)| *k == gc && *age < ttl)
            .map(|(k, age)| (self.holder(&k), age)))
    }
}

impl Lease {
    /// Starts rewriting lease `key` of `inner` every `ttl / 5`.
    fn hold(inner: Leases, key: Path, ttl: Duration) -> Lease {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let (s, k, i) = (stop.clone(), key.clone(), inner.clone());
        let refresher = std::thread::Builder::new()
            .name("smr-s3-lease".into())
            .spawn(move || {
                let (lock, cv) = &*s;
                let mut stopped = lock.lock().unwrap_or_else(PoisonError::into_inner);
                while !*stopped {
                    let (g, timeout) = cv
                        .wait_timeout(stopped, ttl / 5)
                        .unwrap_or_else(PoisonError::into_inner);
                    stopped = g;
                    if *stopped || !timeout.timed_out() {
                        continue;
                    }
                    if let Err(e) = i.write_lease(&k, PutMode::Overwrite) {
                        tracing::warn!(lease = %k, error = %e, "lease not rewritten; retrying");
                    }
                }
            })
            .ok();
        Lease {
            key,
            inner,
            stop,
            refresher,
        }
    }

    /// Takes a writer's lease, waiting while a collection runs.
    pub(crate) fn writer(inner: &Leases) -> Result<Lease> {
        let ttl = ttl()?;
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let key = inner.lease_key(&format!("{WRITER_LEASE}{}-{nanos:x}", std::process::id()));
        let started = Instant::now();
        loop {
            inner.write_lease(&key, PutMode::Overwrite)?;
            let Some((who, age)) = inner.live_gc(ttl)? else {
                return Ok(Lease::hold(inner.clone(), key, ttl));
            };
            inner.remove_lease(&key)?;
            if started.elapsed() > MAX_WAIT {
                return Err(StoreError::Busy {
                    store: inner.store(),
                    reason: format!("garbage-collected by {who} for {}s", age.as_secs()),
                });
            }
            tracing::warn!(store = %inner.store(), collector = %who, "the store is being garbage-collected; waiting");
            std::thread::sleep(Duration::from_secs(2));
        }
    }

    /// Takes the collector's lease, or fails if a collection or a writer
    /// is running. Stale writer leases are removed.
    pub(crate) fn collector(inner: &Leases) -> Result<Lease> {
        let ttl = ttl()?;
        let key = inner.lease_key(GC_LEASE);
        let mode = match inner.conditional_put {
            true => PutMode::Create,
            false => PutMode::Overwrite,
        };
        if !inner.write_lease(&key, mode)? {
            if let Some((who, age)) = inner.live_gc(ttl)? {
                return Err(StoreError::Busy {
                    store: inner.store(),
                    reason: format!(
                        "another collection by {who} is running ({}s old)",
                        age.as_secs()
                    ),
                });
            }
            // A collector that died: its lease is stale.
            inner.write_lease(&key, PutMode::Overwrite)?;
        }
        let mut writers = Vec::new();
        for (k, age) in inner.leases()? {
            if k == key || !k.as_ref().contains(WRITER_LEASE) {
                continue;
            }
            let who = inner.holder(&k);
            if age < ttl {
                writers.push(format!("{who} ({}s)", age.as_secs()));
            } else {
                tracing::info!(lease = %k, holder = %who, age_s = age.as_secs(), "removing a stale writer lease");
                inner.remove_lease(&k)?;
            }
        }
        if !writers.is_empty() {
            inner.remove_lease(&key)?;
            return Err(StoreError::Busy {
                store: inner.store(),
                reason: format!(
                    "being written by {}; collect when the writers are done",
                    writers.join(", ")
                ),
            });
        }
        Ok(Lease::hold(inner.clone(), key, ttl))
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let (lock, cv) = &*self.stop;
        *lock.lock().unwrap_or_else(PoisonError::into_inner) = true;
        cv.notify_all();
        if let Some(t) = self.refresher.take() {
            let _ = t.join();
        }
        if let Err(e) = self.inner.remove_lease(&self.key) {
            tracing::warn!(lease = %self.key, error = %e, "lease not removed; it goes stale");
        }
    }
}
