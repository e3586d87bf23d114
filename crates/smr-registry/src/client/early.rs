//! Blob ranges read before anyone asks for them: a startup pack's GET
//! starts as soon as the lookup has seen the profile manifest that lists
//! the pack, while the profile itself, the recipe and the pack index are
//! still on the way (a round trip or two on a cold start).
//!
//! [`EarlyReads::start`] issues the request in the background. The first
//! read of the same blob from the same offset, no longer than the early
//! one, takes it over ([`EarlyReads::take`]): it sees the bytes that have
//! arrived and waits for the rest. Any other read is made as usual. An
//! early read nobody takes within [`UNCLAIMED`] is dropped (its request
//! aborted), so a pack the node decides not to use costs at most that long
//! of the link. A failed early read is not an error: the taker then makes
//! its own request, with the usual retries.

use super::core::Core;
use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// How long an early read waits to be taken before it is aborted.
pub const UNCLAIMED: Duration = Duration::from_secs(10);

/// The early reads of one registry client, by repository and digest.
#[derive(Default)]
pub(crate) struct EarlyReads {
    reads: Mutex<HashMap<(String, String), Arc<Early>>>,
}

/// One early read.
struct Early {
    offset: u64,
    len: u64,
    state: Mutex<State>,
    changed: Condvar,
    task: Mutex<Option<tokio::task::AbortHandle>>,
}

#[derive(Default)]
struct State {
    /// The bytes received so far, from `offset`.
    got: Vec<u8>,
    /// `Some` once the request is over: whether it got every byte.
    done: Option<bool>,
}

impl Early {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn abort(&self) {
        if let Some(t) = self.task.lock().unwrap_or_else(|p| p.into_inner()).take() {
            t.abort();
        }
    }
}

impl EarlyReads {
    fn map(&self) -> MutexGuard<'_, HashMap<(String, String), Arc<Early>>> {
        self.reads.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts reading `len` bytes of blob `digest` of `repo` from `offset`
    /// on the network runtime, unless such a read is under way already.
    pub fn start(core: &Arc<Core>, repo: &str, digest: &str, offset: u64, len: u64) {
        Self::start_with(core, repo, digest, offset, len, UNCLAIMED);
    }

    /// [`EarlyReads::start`], dropped if not taken within `unclaimed`.
    fn start_with(
        core: &Arc<Core>,
        repo: &str,
        digest: &str,
        offset: u64,
        len: u64,
        unclaimed: Duration,
    ) {
        let key = (repo.to_string(), digest.to_string());
        let early = {
            let mut map = core.early.map();
            if len == 0 || map.contains_key(&key) {
                return;
            }
            let e = Arc::new(Early {
                offset,
                len,
                state: Mutex::default(),
                changed: Condvar::new(),
                task: Mutex::new(None),
            });
            map.insert(key.clone(), e.clone());
            e
        };
        tracing::debug!(repo, digest, offset, len, "early read started");
        let (c, e) = (core.clone(), early.clone());
        let read = async move {
            let fed = e.clone();
            let progress: smr_store::Progress = Arc::new(move |so_far: &[u8]| {
                let mut s = fed.lock();
                // A retried request starts from empty again.
                if so_far.len() < s.got.len() {
                    s.got.clear();
                }
                let from = s.got.len();
                s.got.extend_from_slice(&so_far[from..]);
                fed.changed.notify_all();
            });
            let (repo, digest) = (&key.0, &key.1);
            let r = c
                .get_blob_range(repo, digest, offset, len, Some(progress))
                .await;
            let mut s = e.lock();
            match r {
                Ok(bytes) => {
                    s.got = bytes;
                    s.done = Some(true);
                }
                Err(err) => {
                    tracing::debug!(repo, digest, error = %err, "early read failed; the reader will ask again");
                    s.done = Some(false);
                }
            }
            e.changed.notify_all();
        };
        let task = smr_store::runtime::handle().spawn(read);
        *early.task.lock().unwrap_or_else(|p| p.into_inner()) = Some(task.abort_handle());
        // Dropped if nobody takes it in time.
        let (c, key) = (core.clone(), (repo.to_string(), digest.to_string()));
        smr_store::runtime::handle().spawn(async move {
            tokio::time::sleep(unclaimed).await;
            let mut map = c.early.map();
            if map.get(&key).is_some_and(|e| Arc::ptr_eq(e, &early)) {
                map.remove(&key);
                drop(map);
                early.abort();
                tracing::debug!(repo = %key.0, digest = %key.1, "early read not taken; aborted");
            }
        });
    }

    /// Takes over the early read of blob `digest` of `repo` for `len` bytes
    /// from `offset`, if there is one that covers them from that offset:
    /// hands `progress` the bytes received so far as they arrive and
    /// returns them all, or `None` (the caller reads them itself) if there
    /// is no such read or it failed. Blocks: not for a runtime thread.
    pub fn take(
        &self,
        repo: &str,
        digest: &str,
        offset: u64,
        len: u64,
        progress: Option<&smr_store::Progress>,
    ) -> Option<Vec<u8>> {
        let e = {
            let mut map = self.map();
            let key = (repo.to_string(), digest.to_string());
            let e = map.get(&key)?;
            if e.offset != offset || len > e.len || len == 0 {
                return None;
            }
            map.remove(&key)?
        };
        let want = usize::try_from(len).ok()?;
        let mut shown = 0;
        let mut s = e.lock();
        loop {
            let have = s.got.len().min(want);
            if have != shown {
                if let Some(p) = progress {
                    p(&s.got[..have]);
                }
                shown = have;
            }
            if have == want {
                break;
            }
            if s.done.is_some() {
                // Over without the bytes: failed.
                return None;
            }
            s = e.changed.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        let over = s.done.is_some();
        let mut got = std::mem::take(&mut s.got);
        drop(s);
        if !over {
            // Whatever else it would bring goes unused.
            e.abort();
        }
        got.truncate(want);
        tracing::debug!(repo, digest, offset, len, "early read taken");
        Some(got)
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_server::{core_for, serve};
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const D: &str = "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

    /// A server answering every request with `body` as a 206.
    fn ranged(body: Vec<u8>) -> impl Fn(&str) -> Vec<u8> + Send + 'static {
        move |_| {
            let head = format!(
                "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\n\r\n",
                body.len()
            );
            [head.as_bytes(), &body].concat()
        }
    }

    fn waiting(core: &Core) -> usize {
        core.early.map().len()
    }

    #[test]
    fn an_early_read_is_taken_over_with_its_bytes_and_asked_for_once() {
        let body: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let (addr, seen) = serve(ranged(body.clone()));
        let core = core_for(&addr);
        let len = body.len() as u64;
        EarlyReads::start(&core, "r/a", D, 0, len);
        // Started once, however often asked.
        EarlyReads::start(&core, "r/a", D, 0, len);
        let calls = Arc::new(AtomicUsize::new(0));
        let (c, b) = (calls.clone(), body.clone());
        let progress: smr_store::Progress = Arc::new(move |so_far: &[u8]| {
            assert_eq!(so_far, &b[..so_far.len()]);
            c.fetch_add(1, Ordering::Relaxed);
        });
        let got = core.early.take("r/a", D, 0, len, Some(&progress));
        assert_eq!(got.as_deref(), Some(&body[..]));
        assert!(calls.load(Ordering::Relaxed) >= 1);
        let req = seen
            .recv_timeout(Duration::from_secs(5))
            .expect("a request");
        let req = String::from_utf8_lossy(&req).to_lowercase();
        assert!(
            req.contains(&format!("range: bytes=0-{}", len - 1)),
            "{req}"
        );
        assert!(seen.try_recv().is_err(), "one request");
        // Taken once: the next read asks the registry itself.
        assert!(core.early.take("r/a", D, 0, len, None).is_none());
        assert_eq!(waiting(&core), 0);
    }

    #[test]
    fn only_a_read_from_its_offset_and_within_it_takes_it() {
        let body = vec![7u8; 50_000];
        let (addr, _) = serve(ranged(body.clone()));
        let core = core_for(&addr);
        EarlyReads::start(&core, "r/a", D, 0, 50_000);
        let other = D.replace('a', "b");
        assert!(core.early.take("r/a", D, 1, 10, None).is_none());
        assert!(core.early.take("r/a", D, 0, 50_001, None).is_none());
        assert!(core.early.take("r/a", &other, 0, 10, None).is_none());
        assert!(core.early.take("r/b", D, 0, 10, None).is_none());
        assert_eq!(waiting(&core), 1);
        // A shorter read from the same offset gets the front.
        let got = core.early.take("r/a", D, 0, 1000, None);
        assert_eq!(got.as_deref(), Some(&body[..1000]));
        assert_eq!(waiting(&core), 0);
    }

    #[test]
    fn a_failed_early_read_leaves_the_read_to_its_reader() {
        let (addr, _) = serve(|_| b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_vec());
        let core = core_for(&addr);
        EarlyReads::start(&core, "r/a", D, 0, 100);
        assert!(core.early.take("r/a", D, 0, 100, None).is_none());
        assert_eq!(waiting(&core), 0);
    }

    #[test]
    fn an_early_read_nobody_takes_is_dropped() {
        let (addr, _) = serve(ranged(vec![1u8; 10]));
        let core = core_for(&addr);
        EarlyReads::start_with(&core, "r/a", D, 0, 10, Duration::from_millis(100));
        assert_eq!(waiting(&core), 1);
        let t = std::time::Instant::now();
        while waiting(&core) > 0 && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(waiting(&core), 0);
        assert!(core.early.take("r/a", D, 0, 10, None).is_none());
    }
}
