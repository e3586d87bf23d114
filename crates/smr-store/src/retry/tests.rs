use super::*;
use crate::runtime::block_on;
use smr_format::ChunkId;
use std::sync::atomic::AtomicU32;
use std::sync::Arc;

fn id() -> ChunkId {
    ChunkId([0x5a; 32])
}

fn status(code: u16, retry_after: Option<Duration>) -> StoreError {
    StoreError::Status {
        store: "http://test/p".into(),
        what: id().into(),
        op: Op::Get,
        status: code,
        retry_after,
    }
}

fn fast(deadline_ms: u64) -> RemoteOptions {
    RemoteOptions::default()
        .with_deadline(Duration::from_millis(deadline_ms))
        .with_backoff(Duration::from_millis(10), Duration::from_millis(40))
}

#[test]
fn backoff_grows_jitters_and_caps() {
    let o = RemoteOptions::default();
    for _ in 0..50 {
        let b1 = backoff(o.backoff_initial, o.backoff_max, 1);
        assert!(
            b1 >= Duration::from_millis(50) && b1 <= Duration::from_millis(100),
            "{b1:?}"
        );
        let b3 = backoff(o.backoff_initial, o.backoff_max, 3);
        assert!(
            b3 >= Duration::from_millis(200) && b3 <= Duration::from_millis(400),
            "{b3:?}"
        );
        let b40 = backoff(o.backoff_initial, o.backoff_max, 40);
        assert!(
            b40 >= Duration::from_secs(1) && b40 <= Duration::from_secs(2),
            "{b40:?}"
        );
    }
}

#[test]
fn retry_after_forms() {
    let now = UNIX_EPOCH + Duration::from_secs(784_111_777);
    assert_eq!(parse_retry_after(" 3 ", now), Some(Duration::from_secs(3)));
    assert_eq!(
        parse_retry_after("Sun, 06 Nov 1994 08:49:47 GMT", now),
        Some(Duration::from_secs(10))
    );
    assert_eq!(
        parse_retry_after("Sun, 06 Nov 1994 08:49:00 GMT", now),
        Some(Duration::ZERO)
    );
    assert_eq!(
        parse_imf_fixdate("Thu, 01 Jan 1970 00:00:10 GMT"),
        Some(UNIX_EPOCH + Duration::from_secs(10))
    );
    assert_eq!(
        parse_imf_fixdate("Tue, 29 Feb 2000 12:00:00 GMT"),
        Some(UNIX_EPOCH + Duration::from_secs(951_825_600))
    );
    for bad in [
        "",
        "-1",
        "soon",
        "Sun, 06 Nov 1994 08:49:37 UTC",
        "Sun, 06 Foo 1994 08:49:37 GMT",
        "Sun, 06 Nov 1994 25:00:00 GMT",
    ] {
        assert_eq!(parse_retry_after(bad, now), None, "{bad}");
    }
}

#[test]
fn transient_errors_are_retried_until_success() {
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let r = block_on(async move {
        let remote = Remote::new("http://test/p".into(), fast(5_000));
        remote
            .run(Op::Get, id().into(), || {
                let n = c.fetch_add(1, Ordering::SeqCst);
                async move {
                    if n < 3 {
                        Err(status(503, None))
                    } else {
                        Ok(n)
                    }
                }
            })
            .await
    });
    assert_eq!(r.unwrap(), 3);
    assert_eq!(calls.load(Ordering::SeqCst), 4);
}

#[test]
fn permanent_errors_are_not_retried() {
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let r: Result<()> = block_on(async move {
        let remote = Remote::new("http://test/p".into(), fast(5_000));
        remote
            .run(Op::Get, id().into(), || {
                c.fetch_add(1, Ordering::SeqCst);
                async {
                    Err(StoreError::Missing {
                        what: id().into(),
                        store: "http://test/p".into(),
                    })
                }
            })
            .await
    });
    assert!(matches!(r, Err(StoreError::Missing { .. })));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[test]
fn gives_up_at_the_deadline_with_the_last_error() {
    let t = Instant::now();
    let r: Result<()> = block_on(async move {
        let remote = Remote::new("http://test/p".into(), fast(300));
        remote
            .run(Op::Get, id().into(), || async { Err(status(502, None)) })
            .await
    });
    let elapsed = t.elapsed();
    let e = r.unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(&e, StoreError::GaveUp { attempts, .. } if *attempts > 3),
        "{msg}"
    );
    assert!(
        msg.contains("gave up after 0.3 s") && msg.contains("HTTP 502"),
        "{msg}"
    );
    assert!(
        elapsed >= Duration::from_millis(300) && elapsed < Duration::from_millis(1500),
        "{elapsed:?}"
    );
}

#[test]
fn a_hung_attempt_is_cut_at_the_deadline() {
    let t = Instant::now();
    let r: Result<()> = block_on(async move {
        let remote = Remote::new("http://test/p".into(), fast(200));
        remote
            .run(Op::Get, id().into(), || async {
                tokio::time::sleep(Duration::from_secs(60)).await;
                Ok(())
            })
            .await
    });
    assert!(t.elapsed() < Duration::from_millis(1500));
    let msg = r.unwrap_err().to_string();
    assert!(
        msg.contains("no complete answer before the deadline"),
        "{msg}"
    );
}

#[test]
fn retry_after_is_honored_or_beyond_the_deadline_gives_up_at_once() {
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let t = Instant::now();
    let r = block_on(async move {
        let remote = Remote::new("http://test/p".into(), fast(5_000));
        remote
            .run(Op::Get, id().into(), || {
                let n = c.fetch_add(1, Ordering::SeqCst);
                async move {
                    if n == 0 {
                        Err(status(429, Some(Duration::from_millis(400))))
                    } else {
                        Ok(())
                    }
                }
            })
            .await
    });
    r.unwrap();
    assert!(t.elapsed() >= Duration::from_millis(400));

    let t = Instant::now();
    let r: Result<()> = block_on(async move {
        let remote = Remote::new("http://test/p".into(), fast(1_000));
        remote
            .run(Op::Get, id().into(), || async {
                Err(status(429, Some(Duration::from_secs(60))))
            })
            .await
    });
    assert!(t.elapsed() < Duration::from_millis(500));
    let msg = r.unwrap_err().to_string();
    assert!(msg.contains("retry after 60 s"), "{msg}");
}

#[test]
fn requests_in_flight_are_bounded() {
    let (now, peak) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
    let remote = Arc::new(Remote::new(
        "http://test/p".into(),
        fast(10_000).with_max_in_flight(3),
    ));
    let threads: Vec<_> = (0..10)
        .map(|_| {
            let (remote, now, peak) = (remote.clone(), now.clone(), peak.clone());
            std::thread::spawn(move || {
                block_on(async move {
                    remote
                        .run(Op::Get, id().into(), || async {
                            let n = now.fetch_add(1, Ordering::SeqCst) + 1;
                            peak.fetch_max(n, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            now.fetch_sub(1, Ordering::SeqCst);
                            Ok(())
                        })
                        .await
                })
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap().unwrap();
    }
    assert_eq!(peak.load(Ordering::SeqCst), 3);
}
