//! A small shared async runtime for the network backends.
//!
//! smr's pipeline is synchronous (worker threads, FUSE threads, the NBD
//! server's blocking pool), while the HTTP, S3 and registry clients are
//! async. [`block_on`] runs a future on one process-wide tokio runtime and
//! waits for it on a plain channel, so it works from any thread that may
//! block: a worker thread, a `spawn_blocking` thread, or `main`. It must not
//! be called from a tokio worker thread (that would stall that runtime).

use crate::error::Op;
use crate::retry::Remote;
use crate::{ByteRange, ObjectName, Result, Target};
use std::future::Future;
use std::sync::{Arc, OnceLock};

static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();

/// The process-wide network runtime (started on first use).
pub fn handle() -> &'static tokio::runtime::Runtime {
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("smr-net")
            .enable_all()
            .build()
            // Building a runtime fails only when the OS refuses threads or
            // an epoll instance; nothing can be served without them.
            .expect("starting the network runtime")
    })
}

/// Runs `fut` on the network runtime and blocks the calling thread until
/// it finishes. A panic inside `fut` is resumed on the caller.
pub fn block_on<F>(fut: F) -> F::Output
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let task = handle().spawn(fut);
    handle().spawn(async move {
        let _ = tx.send(task.await);
    });
    match rx.recv() {
        Ok(Ok(v)) => v,
        Ok(Err(e)) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        // The runtime is never shut down, so tasks are never cancelled.
        Ok(Err(e)) => panic!("network task cancelled: {e}"),
        Err(_) => panic!("network task vanished"),
    }
}

/// A remote backend's single ranged read, for [`read_ranges`].
pub(crate) trait RangeRead: Send + Sync + 'static {
    /// The backend's retry policy.
    fn remote(&self) -> &Remote;
    /// One attempt at reading `range` of `object`.
    fn read_once(
        &self,
        object: &ObjectName,
        range: ByteRange,
    ) -> impl Future<Output = Result<Vec<u8>>> + Send;
}

/// [`crate::ChunkStore::read_ranges`] of a remote backend: each of
/// `ranges` read concurrently on the network runtime, each under the
/// backend's retry policy, the results in order (the first error wins).
/// One range runs without a task of its own.
pub(crate) fn read_ranges<B: RangeRead>(
    backend: &Arc<B>,
    object: &ObjectName,
    ranges: &[ByteRange],
) -> Result<Vec<Vec<u8>>> {
    let backend = backend.clone();
    let (object, ranges) = (object.clone(), ranges.to_vec());
    block_on(async move {
        let one = |object: ObjectName, range: ByteRange| {
            let backend = backend.clone();
            async move {
                let what = Target::of(&object, range);
                let attempt = || backend.read_once(&object, range);
                backend.remote().run(Op::Get, what, attempt).await
            }
        };
        if let [range] = ranges.as_slice() {
            return Ok(vec![one(object.clone(), *range).await?]);
        }
        let tasks: Vec<_> = ranges
            .iter()
            .map(|&r| tokio::spawn(one(object.clone(), r)))
            .collect();
        let mut out = Vec::with_capacity(tasks.len());
        for task in tasks {
            match task.await {
                Ok(bytes) => out.push(bytes?),
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                Err(e) => panic!("network task cancelled: {e}"),
            }
        }
        Ok(out)
    })
}

/// `range` of a whole object's bytes, `None` if it ends past them.
pub(crate) fn cut(mut body: Vec<u8>, range: ByteRange) -> Option<Vec<u8>> {
    let start = usize::try_from(range.offset).ok()?;
    let end = match range.end() {
        Some(end) => usize::try_from(end).ok()?,
        None => body.len(),
    };
    if start > end || end > body.len() {
        return None;
    }
    body.truncate(end);
    body.drain(..start);
    Some(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_futures_from_plain_and_blocking_threads() {
        assert_eq!(block_on(async { 1 + 1 }), 2);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let v = rt.block_on(async {
            tokio::task::spawn_blocking(|| block_on(async { 7 }))
                .await
                .unwrap()
        });
        assert_eq!(v, 7);
    }

    #[test]
    fn cuts_ranges_of_a_body() {
        let body: Vec<u8> = (0..10).collect();
        assert_eq!(cut(body.clone(), ByteRange::new(2, 3)), Some(vec![2, 3, 4]));
        assert_eq!(cut(body.clone(), ByteRange::WHOLE), Some(body.clone()));
        assert_eq!(cut(body.clone(), ByteRange::new(8, 3)), None);
        assert_eq!(
            cut(
                body,
                ByteRange {
                    offset: 7,
                    len: None
                }
            ),
            Some(vec![7, 8, 9])
        );
    }

    #[test]
    fn resumes_panics() {
        let r = std::panic::catch_unwind(|| block_on(async { panic!("boom") }));
        assert!(r.is_err());
    }
}
