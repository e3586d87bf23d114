//! A small shared async runtime for the network backends.
//!
//! smr's pipeline is synchronous (worker threads, FUSE threads, the NBD
//! server's blocking pool), while the HTTP, S3 and registry clients are
//! async. [`block_on`] runs a future on one process-wide tokio runtime and
//! waits for it on a plain channel, so it works from any thread that may
//! block: a worker thread, a `spawn_blocking` thread, or `main`. It must not
//! be called from a tokio worker thread (that would stall that runtime).

use crate::{ByteRange, ObjectName, Result};
use std::future::Future;
use std::sync::OnceLock;

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

/// Runs `read(object, range)` for each of `ranges` concurrently on the
/// network runtime and collects the results in order (the first error
/// wins). One range runs inline, without a task.
pub(crate) async fn each_range<F, Fut>(
    object: &ObjectName,
    ranges: &[ByteRange],
    read: F,
) -> Result<Vec<Vec<u8>>>
where
    F: Fn(ObjectName, ByteRange) -> Fut,
    Fut: Future<Output = Result<Vec<u8>>> + Send + 'static,
{
    if let [range] = ranges {
        return Ok(vec![read(object.clone(), *range).await?]);
    }
    let tasks: Vec<_> = ranges
        .iter()
        .map(|&r| tokio::spawn(read(object.clone(), r)))
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
