//! The resilience policy of the remote stores, in one place.
//!
//! A backend writes one attempt of an operation (`read_once`, ...) that maps
//! its client's failures to [`StoreError`]s; [`Remote::run`] (or
//! [`Remote::run_blocking`] for a blocking client) turns it into
//! an operation that waits for one of the store's request slots, retries
//! transient failures with exponential backoff and jitter (at least as long
//! as a `Retry-After` asks), and gives up at the deadline with an error that
//! names the store, the chunk and the time spent. Nothing persists between
//! operations except the connection pool, so when a server comes back the
//! next operation simply succeeds.

use crate::error::{Op, StoreError, TransportKind};
use crate::object::Target;
use crate::options::RemoteOptions;
use crate::Result;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::Semaphore;

/// The retry loop and request slots of one remote store: the one policy
/// every remote backend (HTTP, S3, registry) applies to each operation.
#[derive(Debug)]
pub struct Remote {
    store: String,
    options: RemoteOptions,
    slots: Semaphore,
    /// While down, operations make one attempt and do not retry.
    down: Outage,
}

impl Remote {
    /// A policy for the store described as `store` (no credentials).
    pub fn new(store: String, options: RemoteOptions) -> Self {
        let slots = Semaphore::new(options.max_in_flight.clamp(1, Semaphore::MAX_PERMITS));
        Remote {
            store,
            options,
            slots,
            down: Outage::default(),
        }
    }

    /// The store's description.
    pub fn store(&self) -> &str {
        &self.store
    }

    /// The options in force.
    pub fn options(&self) -> &RemoteOptions {
        &self.options
    }

    /// Whether the store is marked down (see [`Outage`]).
    pub fn is_down(&self) -> bool {
        self.down.is_down()
    }

    /// Runs `attempt` until it succeeds, fails permanently, or the deadline
    /// passes. Each attempt holds one request slot; backoff does not.
    pub async fn run<T, F, Fut>(&self, op: Op, what: Target, mut attempt: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let mut tries = Tries::new(self, op, what);
        loop {
            let remaining = tries.remaining()?;
            let got_slot = AtomicBool::new(false);
            let outcome = tokio::time::timeout(remaining, async {
                // The semaphore is never closed; without a permit we would
                // only exceed the bound, never hang.
                let _slot = self.slots.acquire().await;
                got_slot.store(true, Ordering::Relaxed);
                attempt().await
            })
            .await;
            let outcome = match outcome {
                Ok(r) => r,
                Err(_) => {
                    let cut = self.cut(op, &tries.what, got_slot.load(Ordering::Relaxed));
                    return Err(tries.give_up(cut));
                }
            };
            match tries.judge(outcome)? {
                Judged::Done(v) => return Ok(v),
                Judged::Wait(wait) => tokio::time::sleep(wait).await,
            }
        }
    }

    /// [`Remote::run`] for a blocking `attempt` (a client with its own
    /// runtime): the same retries, backoff and deadline, checked between
    /// attempts; the caller bounds how many run at once.
    pub fn run_blocking<T>(
        &self,
        op: Op,
        what: Target,
        mut attempt: impl FnMut() -> Result<T>,
    ) -> Result<T> {
        let mut tries = Tries::new(self, op, what);
        loop {
            tries.remaining()?;
            match tries.judge(attempt())? {
                Judged::Done(v) => return Ok(v),
                Judged::Wait(wait) => std::thread::sleep(wait),
            }
        }
    }

    /// The error of an attempt cut short by the deadline.
    fn cut(&self, op: Op, what: &Target, got_slot: bool) -> StoreError {
        let reason = if got_slot {
            "no complete answer before the deadline".to_string()
        } else {
            format!(
                "still waiting for one of {} request slots at the deadline",
                self.options.max_in_flight
            )
        };
        StoreError::Transport {
            store: self.store.clone(),
            what: what.clone(),
            op,
            kind: TransportKind::Timeout,
            cause: std::io::Error::new(std::io::ErrorKind::TimedOut, reason).into(),
        }
    }
}

/// The state of one operation's attempts: what [`Remote::run`] and
/// [`Remote::run_blocking`] share.
struct Tries<'a> {
    remote: &'a Remote,
    op: Op,
    what: Target,
    start: Instant,
    attempts: u32,
    last: Option<StoreError>,
}

/// What to do after an attempt.
enum Judged<T> {
    Done(T),
    Wait(Duration),
}

impl<'a> Tries<'a> {
    fn new(remote: &'a Remote, op: Op, what: Target) -> Self {
        Tries {
            remote,
            op,
            what,
            start: Instant::now(),
            attempts: 0,
            last: None,
        }
    }

    /// Time left before the deadline, counting the attempt about to start;
    /// the give-up error if there is none.
    fn remaining(&mut self) -> Result<Duration> {
        let remaining = self
            .remote
            .options
            .deadline
            .saturating_sub(self.start.elapsed());
        if remaining.is_zero() {
            let last = match self.last.take() {
                Some(last) => last,
                None => self.remote.cut(self.op, &self.what, false),
            };
            return Err(self.give_up(last));
        }
        self.attempts += 1;
        Ok(remaining)
    }

    /// Success, a permanent error, or how long to back off before retrying.
    fn judge<T>(&mut self, outcome: Result<T>) -> Result<Judged<T>> {
        let (remote, op, attempts) = (self.remote, self.op, self.attempts);
        let err = match outcome {
            Ok(v) => {
                remote.down.up(&remote.store);
                if attempts > 1 {
                    tracing::info!(store = %remote.store, what = %self.what, %op, attempts, "succeeded after retries");
                }
                return Ok(Judged::Done(v));
            }
            Err(e) if !e.is_transient() => return Err(e),
            Err(e) => e,
        };
        if remote.down.is_down() {
            return Err(self.give_up(err));
        }
        let remaining = remote.options.deadline.saturating_sub(self.start.elapsed());
        let backoff = backoff(
            remote.options.backoff_initial,
            remote.options.backoff_max,
            attempts,
        );
        let wait = match err.retry_after() {
            // The server will not serve us before the deadline.
            Some(asked) if asked >= remaining => return Err(self.give_up(err)),
            Some(asked) => asked.max(backoff),
            None => backoff,
        }
        .min(remaining);
        tracing::warn!(
            store = %remote.store,
            what = %self.what,
            %op,
            attempt = attempts,
            "{err}; attempt {attempts} failed, retrying in {} ms",
            wait.as_millis()
        );
        self.last = Some(err);
        Ok(Judged::Wait(wait))
    }

    fn give_up(&self, last: StoreError) -> StoreError {
        let remote = self.remote;
        let e = StoreError::GaveUp {
            store: remote.store.clone(),
            what: self.what.clone(),
            op: self.op,
            elapsed: self.start.elapsed(),
            deadline: remote.options.deadline,
            attempts: self.attempts,
            last: Box::new(last),
        };
        tracing::warn!(store = %remote.store, what = %self.what, op = %self.op, "{e}");
        remote.down.down(&remote.store);
        e
    }
}

/// Whether a store is down: set when an operation gave up, cleared by the
/// next success. While it is down, callers try once and do not retry, so a
/// store that is away fails new reads at once instead of making every read
/// (and the kernel's retries of it) wait out a whole deadline.
#[derive(Debug, Default)]
pub struct Outage(AtomicBool);

impl Outage {
    /// Whether the last operation that ended gave up.
    pub fn is_down(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    /// Records a success of `store` (logged if it was down).
    pub fn up(&self, store: &str) {
        if self.0.swap(false, Ordering::Relaxed) {
            tracing::info!(store, "store answers again");
        }
    }

    /// Records that an operation on `store` gave up (logged once).
    pub fn down(&self, store: &str) {
        if !self.0.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                store,
                "store marked down: until it answers again, operations try once and fail at once"
            );
        }
    }
}

/// The jittered backoff after the `failures`-th failure (1-based):
/// `initial * 2^(failures-1)`, capped at `max`, then a uniformly random
/// point in its upper half (so concurrent clients spread out while the
/// delay still grows and never retry at once). Every retry loop of smr
/// (remote stores, the registry client) backs off this way.
pub fn backoff(initial: Duration, max: Duration, failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(31);
    let full = initial.saturating_mul(1u32 << exp).min(max);
    full.mul_f64(0.5 + 0.5 * fastrand::f64())
}

/// Parses an HTTP `Retry-After` value: delay-seconds, or an IMF-fixdate
/// (`Sun, 06 Nov 1994 08:49:37 GMT`) taken relative to `now` (a date in
/// the past means "now"). Other forms yield `None` and plain backoff.
pub(crate) fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = parse_imf_fixdate(value)?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

fn parse_imf_fixdate(s: &str) -> Option<SystemTime> {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let (_weekday, rest) = s.split_once(", ")?;
    let fields: Vec<&str> = rest.split(' ').collect();
    let [day, month, year, time, "GMT"] = fields.as_slice() else {
        return None;
    };
    let day: i64 = day.parse().ok()?;
    let month = MONTHS.iter().position(|m| m == month)? as i64 + 1;
    let year: i64 = year.parse().ok()?;
    let hms: Vec<i64> = time
        .split(':')
        .map(|p| p.parse().ok())
        .collect::<Option<_>>()?;
    let [h, m, sec] = hms.as_slice() else {
        return None;
    };
    if !(1..=31).contains(&day) || *h > 23 || *m > 59 || *sec > 60 {
        return None;
    }
    let secs = days_from_civil(year, month, day) * 86_400 + h * 3600 + m * 60 + sec;
    Some(UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).ok()?))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests;
