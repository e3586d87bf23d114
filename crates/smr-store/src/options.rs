//! Settings shared by the remote stores: timeouts, the per-operation
//! deadline, retry backoff and the bound on requests in flight.

use crate::{Result, StoreError};
use std::time::Duration;

/// Environment variable: seconds a remote `get`/`exists`/`put` may take,
/// retries included, before it fails (default 30; fractions allowed).
pub const DEADLINE_ENV: &str = "SMR_STORE_DEADLINE";

/// Environment variable: requests in flight per remote store (default 32).
pub const MAX_IN_FLIGHT_ENV: &str = "SMR_STORE_MAX_IN_FLIGHT";

/// How a remote store behaves when the network or the server misbehaves.
///
/// Every operation retries transient failures (see
/// [`StoreError::is_transient`]) with exponential backoff and jitter until it
/// succeeds, fails permanently, or [`deadline`](Self::deadline) passes.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RemoteOptions {
    /// Longest time one operation may take, waiting for a request slot,
    /// retries and backoff included (default 30 s).
    pub deadline: Duration,
    /// Timeout of establishing a connection, TLS included (default 5 s).
    pub connect_timeout: Duration,
    /// Longest silence while waiting for response bytes (default 10 s).
    pub read_timeout: Duration,
    /// Requests in flight per store, at least 1 (default 32).
    pub max_in_flight: usize,
    /// Backoff before the first retry (default 100 ms); doubles per retry.
    pub backoff_initial: Duration,
    /// Longest backoff between two attempts (default 2 s).
    pub backoff_max: Duration,
    /// Largest object a `get` accepts (default 64 MiB; smr chunks are at
    /// most 4 MiB), so a broken server cannot exhaust memory.
    pub max_object_bytes: u64,
}

impl Default for RemoteOptions {
    fn default() -> Self {
        RemoteOptions {
            deadline: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            read_timeout: Duration::from_secs(10),
            max_in_flight: 32,
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(2),
            max_object_bytes: 64 << 20,
        }
    }
}

impl RemoteOptions {
    /// The defaults, overridden by [`DEADLINE_ENV`] and
    /// [`MAX_IN_FLIGHT_ENV`] when set.
    pub fn from_env() -> Result<Self> {
        let var = |name| std::env::var(name).ok();
        Self::from_vars(
            var(DEADLINE_ENV).as_deref(),
            var(MAX_IN_FLIGHT_ENV).as_deref(),
        )
    }

    /// [`from_env`](Self::from_env) with the variables' values given.
    fn from_vars(deadline: Option<&str>, max_in_flight: Option<&str>) -> Result<Self> {
        let mut o = RemoteOptions::default();
        if let Some(v) = deadline {
            let secs: f64 = v
                .trim()
                .parse()
                .map_err(|_| invalid(DEADLINE_ENV, v, "not a number of seconds"))?;
            if secs.is_nan() || secs <= 0.0 {
                return Err(invalid(DEADLINE_ENV, v, "must be more than 0 seconds"));
            }
            o.deadline = Duration::try_from_secs_f64(secs)
                .map_err(|_| invalid(DEADLINE_ENV, v, "too large"))?;
        }
        if let Some(v) = max_in_flight {
            let n: usize = v
                .trim()
                .parse()
                .map_err(|_| invalid(MAX_IN_FLIGHT_ENV, v, "not a whole number"))?;
            if n == 0 {
                return Err(invalid(MAX_IN_FLIGHT_ENV, v, "must be at least 1"));
            }
            o.max_in_flight = n;
        }
        Ok(o)
    }

    /// Sets [`deadline`](Self::deadline).
    pub fn with_deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }

    /// Sets [`connect_timeout`](Self::connect_timeout).
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Sets [`read_timeout`](Self::read_timeout).
    pub fn with_read_timeout(mut self, timeout: Duration) -> Self {
        self.read_timeout = timeout;
        self
    }

    /// Sets [`max_in_flight`](Self::max_in_flight) (0 counts as 1).
    pub fn with_max_in_flight(mut self, n: usize) -> Self {
        self.max_in_flight = n.max(1);
        self
    }

    /// Sets [`backoff_initial`](Self::backoff_initial) and
    /// [`backoff_max`](Self::backoff_max).
    pub fn with_backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.backoff_initial = initial;
        self.backoff_max = max;
        self
    }

    /// Sets [`max_object_bytes`](Self::max_object_bytes).
    pub fn with_max_object_bytes(mut self, limit: u64) -> Self {
        self.max_object_bytes = limit;
        self
    }
}

fn invalid(name: &'static str, value: &str, reason: &str) -> StoreError {
    StoreError::InvalidSetting {
        name,
        value: value.to_string(),
        reason: reason.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_values() {
        let o = RemoteOptions::from_vars(None, None).unwrap();
        assert_eq!(o, RemoteOptions::default());
        assert_eq!(o.deadline, Duration::from_secs(30));
        assert_eq!(o.max_in_flight, 32);
        let o = RemoteOptions::from_vars(Some(" 2.5 "), Some("4")).unwrap();
        assert_eq!(o.deadline, Duration::from_millis(2500));
        assert_eq!(o.max_in_flight, 4);
        for bad in ["", "x", "0", "-1", "NaN", "1e300"] {
            let e = RemoteOptions::from_vars(Some(bad), None).unwrap_err();
            assert!(e.to_string().contains(DEADLINE_ENV), "{e}");
        }
        for bad in ["0", "-3", "1.5"] {
            let e = RemoteOptions::from_vars(None, Some(bad)).unwrap_err();
            assert!(e.to_string().contains(MAX_IN_FLIGHT_ENV), "{e}");
        }
        assert_eq!(
            RemoteOptions::default().with_max_in_flight(0).max_in_flight,
            1
        );
    }
}
