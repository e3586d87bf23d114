//! A blob read started before anyone asks for it.
//!
//! A cold start learns the startup pack's digest from the referrers
//! listing (the profile manifest's annotations, see
//! [`ANNOTATION_PROFILE_PACK`](crate::profile::ANNOTATION_PROFILE_PACK)),
//! one round trip before the profile that makes the pack usable has
//! arrived and been checked. [`HeadStart`] begins the pack's request
//! there, keeps what arrives, and hands it to the first reader of that
//! very range ([`crate::store::RegistryStore`]): the link carries the
//! pack while the lookup finishes, rather than sitting idle for the round
//! trips between. Nothing is trusted for having been read early: the
//! reader verifies every chunk it cuts out of the bytes, as for any read.
//! A head start nobody takes is aborted when dropped (an artifact the
//! policy refused, a profile that turned out unusable).

use crate::error::{RegistryError, Result};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// Longest [`HeadStart::spawn`] waits for its request to be sent.
const FIRST_POLL_WAIT: std::time::Duration = std::time::Duration::from_millis(10);

/// A ranged blob read running in the background, taken at most once.
pub struct HeadStart {
    digest: String,
    offset: u64,
    len: u64,
    shared: Arc<Shared>,
    task: tokio::task::AbortHandle,
}

impl std::fmt::Debug for HeadStart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeadStart")
            .field("digest", &self.digest)
            .field("offset", &self.offset)
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

/// What the request has brought so far, shared with its task.
#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Default)]
struct State {
    /// The answer's prefix received so far (the whole answer once `end`
    /// is `Some(Ok)`).
    bytes: Vec<u8>,
    /// Bumped when a retried request starts its prefix again.
    restarts: u64,
    /// How the request ended, once it has (until the reader takes it).
    end: Option<Result<()>>,
    /// Whether the request has ended.
    ended: bool,
    /// Whether the request's future has been polled once.
    polled: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain bytes behind: usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The request's progress: `prefix` is what arrived so far.
    fn arrived(&self, prefix: &[u8]) {
        let mut s = self.lock();
        if prefix.len() < s.bytes.len() {
            s.bytes.clear();
            s.restarts += 1;
        }
        let have = s.bytes.len();
        s.bytes.extend_from_slice(&prefix[have..]);
        drop(s);
        self.changed.notify_all();
    }

    fn ended(&self, end: Result<Vec<u8>>) {
        let mut s = self.lock();
        s.end = Some(end.map(|bytes| s.bytes = bytes));
        s.ended = true;
        drop(s);
        self.changed.notify_all();
    }
}

/// Ends a read whose task stopped without an answer (it panicked).
struct EndGuard {
    shared: Arc<Shared>,
    what: String,
    repo: String,
}

impl Drop for EndGuard {
    fn drop(&mut self) {
        if !self.shared.lock().ended {
            self.shared.ended(Err(RegistryError::Protocol {
                repo: std::mem::take(&mut self.repo),
                what: std::mem::take(&mut self.what),
                reason: "the read stopped without an answer".to_string(),
            }));
        }
    }
}

impl HeadStart {
    /// Starts `read` (in repository `repo`: a ranged read of `len` bytes
    /// of blob `digest` from `offset`, reporting its prefix to the
    /// progress callback it is given) as a task of the stores' runtime.
    pub fn spawn<F, Fut>(repo: &str, digest: &str, offset: u64, len: u64, read: F) -> HeadStart
    where
        F: FnOnce(smr_store::Progress) -> Fut,
        Fut: std::future::Future<Output = Result<Vec<u8>>> + Send + 'static,
    {
        let shared = Arc::new(Shared::default());
        let progress: smr_store::Progress = {
            let shared = shared.clone();
            Arc::new(move |prefix: &[u8]| shared.arrived(prefix))
        };
        let fut = read(progress);
        // Ends the read for its reader even if the task panics.
        let guard = EndGuard {
            shared: shared.clone(),
            what: format!("GET blob {digest} bytes {offset}+{len}, started ahead"),
            repo: repo.to_string(),
        };
        let task = smr_store::runtime::handle()
            .spawn(async move {
                let mut fut = std::pin::pin!(fut);
                let mut first = true;
                let end = std::future::poll_fn(|cx| {
                    let r = fut.as_mut().poll(cx);
                    if std::mem::take(&mut first) {
                        guard.shared.lock().polled = true;
                        guard.shared.changed.notify_all();
                    }
                    r
                })
                .await;
                guard.shared.ended(end);
            })
            .abort_handle();
        // The first poll sends the request: on a connection of the pool
        // when one is idle, which the requests the caller makes next would
        // otherwise take first, leaving the largest read of the start to
        // wait for a new connection's set-up (a round trip, more with
        // TLS). So wait for it, briefly, unless on the runtime itself.
        if tokio::runtime::Handle::try_current().is_err() {
            let s = shared.lock();
            let _s = shared
                .changed
                .wait_timeout_while(s, FIRST_POLL_WAIT, |s| !s.polled && !s.ended);
        }
        tracing::debug!(blob = %digest, offset, len, "read started ahead");
        HeadStart {
            digest: digest.to_string(),
            offset,
            len,
            shared,
            task,
        }
    }

    /// Whether this is the read of `len` bytes of `digest` from `offset`.
    pub fn is(&self, digest: &str, offset: u64, len: u64) -> bool {
        self.digest == digest && self.offset == offset && self.len == len
    }

    /// Waits for the read's answer, handing `progress` (if given) the
    /// prefix received so far each time more arrives, from what had
    /// arrived before this call on (from empty again if the read was
    /// retried). The answer's length is the caller's to check.
    pub fn finish(self, progress: Option<&smr_store::Progress>) -> Result<Vec<u8>> {
        let mut mine = Vec::new();
        let mut restarts = 0;
        loop {
            let mut s = self.shared.lock();
            while s.end.is_none() && s.restarts == restarts && s.bytes.len() == mine.len() {
                s = self
                    .shared
                    .changed
                    .wait(s)
                    .unwrap_or_else(|p| p.into_inner());
            }
            if let Some(end) = s.end.take() {
                return end.map(|()| std::mem::take(&mut s.bytes));
            }
            if s.restarts != restarts {
                (mine, restarts) = (Vec::new(), s.restarts);
            }
            mine.extend_from_slice(&s.bytes[mine.len()..]);
            drop(s);
            if let Some(p) = progress {
                p(&mine);
            }
        }
    }
}

impl Drop for HeadStart {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A [`HeadStart`] that one reader takes (the others read as usual).
#[derive(Debug, Clone, Default)]
pub struct HeadStartSlot(Arc<Mutex<Option<HeadStart>>>);

impl HeadStartSlot {
    /// A slot holding `head`.
    pub fn new(head: HeadStart) -> Self {
        HeadStartSlot(Arc::new(Mutex::new(Some(head))))
    }

    /// The head start, if it is the read of `len` bytes of `digest` from
    /// `offset` and nobody has taken it yet.
    pub fn take(&self, digest: &str, offset: u64, len: u64) -> Option<HeadStart> {
        let mut slot = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match &*slot {
            Some(h) if h.is(digest, offset, len) => slot.take(),
            _ => None,
        }
    }

    /// Drops the head start if nobody took it (aborting its read): for a
    /// caller that will not read the range after all.
    pub fn clear(&self) {
        let head = self.0.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(h) = head {
            tracing::debug!(blob = %h.digest, "read started ahead dropped unused");
        }
    }

    /// Whether a head start waits in the slot.
    pub fn is_set(&self) -> bool {
        self.0.lock().map(|s| s.is_some()).unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};

    fn err(reason: &str) -> RegistryError {
        RegistryError::Protocol {
            repo: "r".into(),
            what: "w".into(),
            reason: reason.into(),
        }
    }

    /// Every prefix `finish` hands its progress callback, in order.
    fn finish_seeing(head: HeadStart) -> (Result<Vec<u8>>, Vec<Vec<u8>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let progress: smr_store::Progress =
            Arc::new(move |p: &[u8]| s.lock().unwrap().push(p.to_vec()));
        let got = head.finish(Some(&progress));
        let seen = seen.lock().unwrap().clone();
        (got, seen)
    }

    #[test]
    fn the_reader_gets_the_answer_and_every_prefix_as_it_grows() {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<usize>();
        let head = HeadStart::spawn("r", "sha256:b", 0, 6, move |progress| async move {
            let mut rx = rx;
            let all = b"abcdef".to_vec();
            // Sends what the test releases, one prefix at a time.
            while let Some(n) = rx.recv().await {
                progress(&all[..n]);
                if n == all.len() {
                    break;
                }
            }
            Ok(all)
        });
        assert!(head.is("sha256:b", 0, 6) && !head.is("sha256:b", 1, 5));
        tx.send(2).unwrap();
        let reader = std::thread::spawn(move || finish_seeing(head));
        std::thread::sleep(Duration::from_millis(50));
        tx.send(4).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        tx.send(6).unwrap();
        let (got, seen) = reader.join().unwrap();
        assert_eq!(got.unwrap(), b"abcdef");
        assert_eq!(
            seen.first().map(Vec::as_slice),
            Some(&b"ab"[..]),
            "{seen:?}"
        );
        assert!(
            seen.windows(2)
                .all(|w| w[1].starts_with(&w[0]) && w[1].len() > w[0].len()),
            "{seen:?}"
        );
        assert!(seen.iter().all(|p| b"abcdef".starts_with(p)), "{seen:?}");
    }

    #[test]
    fn a_retried_read_starts_the_readers_prefix_again() {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let head = HeadStart::spawn("r", "sha256:b", 0, 4, move |progress| async move {
            progress(b"xy");
            // The first try failed; the retry starts from empty.
            let _ = tokio::task::spawn_blocking(move || rx.recv()).await;
            progress(b"a");
            progress(b"abcd");
            Ok(b"abcd".to_vec())
        });
        let reader = std::thread::spawn(move || finish_seeing(head));
        std::thread::sleep(Duration::from_millis(50));
        tx.send(()).unwrap();
        let (got, seen) = reader.join().unwrap();
        assert_eq!(got.unwrap(), b"abcd");
        assert_eq!(seen[0], b"xy");
        let after: Vec<&[u8]> = seen[1..].iter().map(Vec::as_slice).collect();
        assert!(after.iter().all(|p| b"abcd".starts_with(p)), "{seen:?}");
    }

    #[test]
    fn a_failed_or_panicking_read_is_an_error_for_its_reader() {
        let failed = HeadStart::spawn("r", "sha256:b", 0, 4, |progress| async move {
            progress(b"ab");
            Err(err("connection reset"))
        });
        let e = failed.finish(None).unwrap_err().to_string();
        assert!(e.contains("connection reset"), "{e}");
        let panicked = HeadStart::spawn("r", "sha256:b", 0, 4, |_| async move {
            if Instant::now().elapsed() < Duration::from_secs(3600) {
                panic!("the read panicked");
            }
            Ok(Vec::new())
        });
        let e = panicked.finish(None).unwrap_err().to_string();
        assert!(
            e.contains("sha256:b") && e.contains("without an answer"),
            "{e}"
        );
    }

    #[test]
    fn spawning_returns_once_the_request_is_sent() {
        // The runtime's workers are busy for a moment: spawn waits for the
        // first poll (where a request takes an idle pooled connection).
        let sent = Arc::new(AtomicBool::new(false));
        let busy = smr_store::runtime::handle().spawn(async {
            std::thread::sleep(Duration::from_millis(3));
        });
        let flag = sent.clone();
        let head = HeadStart::spawn("r", "sha256:b", 0, 1, move |_| async move {
            flag.store(true, Ordering::SeqCst);
            Ok(vec![7])
        });
        assert!(
            sent.load(Ordering::SeqCst),
            "the request went out before spawn returned"
        );
        assert_eq!(head.finish(None).unwrap(), vec![7]);
        drop(busy);
    }

    #[test]
    fn a_head_start_nobody_takes_is_aborted_when_dropped() {
        /// Set when the read's future is dropped (the task aborted).
        struct Dropped(Arc<AtomicBool>);
        impl Drop for Dropped {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let dropped = Arc::new(AtomicBool::new(false));
        let flag = Dropped(dropped.clone());
        let head = HeadStart::spawn("r", "sha256:b", 0, 4, move |_| async move {
            let _flag = flag;
            std::future::pending::<()>().await;
            Ok(Vec::new())
        });
        let slot = HeadStartSlot::new(head);
        assert!(slot.take("sha256:other", 0, 4).is_none(), "another blob");
        assert!(slot.take("sha256:b", 0, 3).is_none(), "another range");
        assert!(slot.is_set());
        let other = slot.clone();
        other.clear();
        assert!(!slot.is_set(), "the slot is shared");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !dropped.load(Ordering::SeqCst) {
            assert!(Instant::now() < deadline, "the read is still running");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn a_slot_gives_its_head_start_once() {
        let slot = HeadStartSlot::new(HeadStart::spawn("r", "sha256:b", 0, 2, |_| async {
            Ok(b"ab".to_vec())
        }));
        let head = slot.take("sha256:b", 0, 2).expect("the range it reads");
        assert!(slot.take("sha256:b", 0, 2).is_none(), "taken already");
        assert_eq!(head.finish(None).unwrap(), b"ab");
        assert!(!HeadStartSlot::default().is_set());
    }
}
