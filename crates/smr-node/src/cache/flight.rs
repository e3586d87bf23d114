//! In-process single flight: the first caller for a key runs the work, later
//! callers for the same key wait for its outcome instead of repeating it.
//!
//! This only dedupes threads of one process (so they do not even open lock
//! files); across processes the per-chunk `flock` in [`super::disk`] does it.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Condvar, Mutex, PoisonError};

use smr_format::ChunkId;

use super::error::{CacheError, Result};

/// A shared outcome: bytes, or the error every waiter reports.
type Outcome = std::result::Result<Arc<Vec<u8>>, Arc<CacheError>>;

#[derive(Default)]
struct Flight {
    done: Mutex<Option<Outcome>>,
    cv: Condvar,
}

/// Fetches in flight, keyed by `K`.
pub(crate) struct Flights<K> {
    map: Mutex<HashMap<K, Arc<Flight>>>,
}

impl<K: Hash + Eq + Clone> Flights<K> {
    pub(crate) fn new() -> Self {
        Flights {
            map: Mutex::new(HashMap::new()),
        }
    }

    /// Whether a run for `key` is under way.
    pub(crate) fn contains(&self, key: &K) -> bool {
        self.map
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains_key(key)
    }

    /// Runs `work` unless a run for `key` is already under way, in which case
    /// waits for that run and returns its outcome. `id` names the chunk in
    /// the error if the leader panics.
    pub(crate) fn run(
        &self,
        key: &K,
        id: ChunkId,
        work: impl FnOnce() -> Result<Arc<Vec<u8>>>,
    ) -> Result<Arc<Vec<u8>>> {
        let (flight, leader) = {
            let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
            match map.get(key) {
                Some(f) => (f.clone(), false),
                None => {
                    let f = Arc::new(Flight::default());
                    map.insert(key.clone(), f.clone());
                    (f, true)
                }
            }
        };
        if !leader {
            let mut done = flight.done.lock().unwrap_or_else(PoisonError::into_inner);
            loop {
                if let Some(outcome) = done.as_ref() {
                    return outcome.clone().map_err(CacheError::Shared);
                }
                done = flight.cv.wait(done).unwrap_or_else(PoisonError::into_inner);
            }
        }
        // Publishes a result even if `work` panics, so waiters never hang.
        let mut guard = Publish {
            flights: self,
            key,
            flight: &flight,
            id,
            outcome: None,
        };
        let outcome = work().map_err(Arc::new);
        guard.outcome = Some(outcome.clone());
        drop(guard);
        outcome.map_err(CacheError::Shared)
    }

    /// Number of keys in flight.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.map
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

struct Publish<'a, K: Hash + Eq> {
    flights: &'a Flights<K>,
    key: &'a K,
    flight: &'a Arc<Flight>,
    id: ChunkId,
    outcome: Option<Outcome>,
}

impl<K: Hash + Eq> Drop for Publish<'_, K> {
    fn drop(&mut self) {
        // Leave the map first: callers arriving from now on start a fresh run
        // (after a failure they retry rather than inherit a stale error).
        self.flights
            .map
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(self.key);
        let outcome = self
            .outcome
            .take()
            .unwrap_or_else(|| Err(Arc::new(CacheError::Panicked { id: self.id })));
        *self
            .flight
            .done
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(outcome);
        // Waiters clone the flight under the map's lock, and it has left
        // the map: if we hold the only reference, nobody waits and none
        // will. Skip the wake-up then (a condvar's `notify_all` is a system
        // call whether or not anyone waits: two per chunk loaded).
        if Arc::strong_count(self.flight) > 1 {
            self.flight.cv.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Barrier;
    use std::time::Duration;

    #[test]
    fn one_run_for_concurrent_callers_and_shared_errors() {
        let flights = Flights::<u32>::new();
        let runs = AtomicUsize::new(0);
        let barrier = Barrier::new(8);
        let id = ChunkId([1; 32]);
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    barrier.wait();
                    let r = flights.run(&7, id, || {
                        runs.fetch_add(1, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_millis(100));
                        Ok(Arc::new(vec![7u8; 3]))
                    });
                    assert_eq!(*r.expect("shared outcome"), vec![7u8; 3]);
                });
            }
        });
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert_eq!(flights.len(), 0, "finished runs leave the map");

        let err = flights
            .run(&8, id, || Err(CacheError::Panicked { id }))
            .expect_err("error propagates");
        assert_eq!(err.chunk(), Some(id));
        // A later call runs again instead of inheriting the old error.
        assert!(flights.run(&8, id, || Ok(Arc::new(vec![]))).is_ok());
    }

    #[test]
    fn a_panicking_leader_releases_waiters() {
        let flights = Arc::new(Flights::<u32>::new());
        let id = ChunkId([2; 32]);
        let f2 = flights.clone();
        let leader = std::thread::spawn(move || {
            let _ = f2.run(&1, id, || {
                std::thread::sleep(Duration::from_millis(100));
                panic!("boom")
            });
        });
        std::thread::sleep(Duration::from_millis(20));
        let r = flights.run(&1, id, || Ok(Arc::new(vec![1])));
        assert!(leader.join().is_err());
        // Either we waited on the panicking leader, or it had already gone.
        if let Err(e) = r {
            assert!(matches!(e.root(), CacheError::Panicked { .. }), "{e}");
        }
        assert_eq!(flights.len(), 0);
    }
}
