//! A small, bounded pool of fetch threads, one per cache (so per process):
//! it bounds the store fetches that prefetching and multi-chunk reads add,
//! whatever the number of images served.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::OnceLock;

use crossbeam_channel::{unbounded, Sender};

/// Work for the pool.
pub(crate) type Job = Box<dyn FnOnce() + Send + 'static>;

/// Threads started on first use; they exit when the pool is dropped.
pub(crate) struct FetchPool {
    threads: usize,
    tx: OnceLock<Option<Sender<Job>>>,
}

impl FetchPool {
    pub(crate) fn new(threads: usize) -> Self {
        FetchPool {
            threads: threads.max(1),
            tx: OnceLock::new(),
        }
    }

    /// Runs `job` on a pool thread (or inline if no thread can be started).
    pub(crate) fn spawn(&self, job: Job) {
        let tx = self.tx.get_or_init(|| self.start());
        let job = match tx {
            Some(tx) => match tx.send(job) {
                Ok(()) => return,
                Err(e) => e.into_inner(),
            },
            None => job,
        };
        job();
    }

    fn start(&self) -> Option<Sender<Job>> {
        let (tx, rx) = unbounded::<Job>();
        let mut started = 0;
        for i in 0..self.threads {
            let rx = rx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("smr-fetch-{i}"))
                .spawn(move || {
                    for job in rx.iter() {
                        // A panicking job (a bug) must not shrink the pool; the
                        // single-flight guard already reported it to waiters.
                        let _ = catch_unwind(AssertUnwindSafe(job));
                    }
                });
            match spawned {
                Ok(_) => started += 1,
                Err(e) => tracing::warn!(error = %e, "cannot start fetch thread"),
            }
        }
        (started > 0).then_some(tx)
    }
}
