//! Pages stored ahead of a sequential reader (`lazy/ahead.rs`).

use super::startup::Pages;
use super::*;
use crate::lazy::ahead::STORE_AHEAD;

/// A read as the FUSE export makes it through the exported file's page
/// cache: the parts, then the hint of where the reader is.
pub(super) fn cached_read(lazy: &LazyImage, at: u64, len: u64) -> Vec<ReadPart> {
    let parts = lazy.read_parts(at, len as usize).expect("read");
    BlockDevice::read_through_page_cache(lazy, at, len as usize);
    parts
}

/// The fixture's image with every chunk on the node, exported to a page
/// cache kept in memory.
fn held_and_exported(fx: &Fixture) -> (LazyImage, Arc<Pages>) {
    let lazy = fx.lazy(32 << 20, 1 << 30);
    lazy.prefetch(0, SIZE).expect("prefetch");
    let pages = Arc::new(Pages::default());
    lazy.seed_pages(pages.clone());
    (lazy, pages)
}

/// Waits until `lazy` has stored `bytes` ahead of its readers (or 10 s).
fn stored_ahead(lazy: &LazyImage, bytes: u64) -> u64 {
    let t = std::time::Instant::now();
    while lazy.stats().bytes_stored_ahead < bytes && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(5));
    }
    lazy.stats().bytes_stored_ahead
}

/// The stored pages, merged into `(start, end)` runs, each checked
/// against the image.
fn stored_runs(pages: &Pages, plain: &[u8]) -> Vec<(u64, u64)> {
    let mut stored = pages.0.lock().unwrap().clone();
    stored.sort_by_key(|(off, _)| *off);
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for (off, data) in stored {
        let end = off + data.len() as u64;
        assert_eq!(off % 4096, 0, "pages start on a page");
        assert!(
            data == plain[off as usize..end as usize],
            "the bytes stored at {off} are the image's"
        );
        match runs.last_mut() {
            Some(last) if last.1 == off => last.1 = end,
            _ => runs.push((off, end)),
        }
    }
    runs
}

#[test]
fn a_reader_in_order_finds_the_held_chunks_after_it_stored() {
    let fx = fixture(Duration::ZERO);
    // The node holds chunks 0..20 (1.25 MiB); 20.. are only in the store.
    fx.lazy(32 << 20, 1 << 30)
        .prefetch(0, 20 * CS)
        .expect("prefetch");
    let fetched = fx.store.total();
    let lazy = fx.lazy(32 << 20, 1 << 30);
    let pages = Arc::new(Pages::default());
    lazy.seed_pages(pages.clone());
    for at in [0, 2 * CS] {
        let parts = cached_read(&lazy, at, 2 * CS);
        assert!(flatten(&parts) == fx.plain[at as usize..(at + 2 * CS) as usize]);
    }
    // The first read (chunks 0 and 1) stored the MiB after it, chunks
    // 2..18, but for the zero chunks 2, 7, 12 and 17 (the kernel reads
    // them at no cost); the second leaves more than half of that ahead of
    // it, so nothing more.
    assert_eq!(STORE_AHEAD, 16 * CS);
    let want = (2..18).filter(|c| c % 5 != 2).count() as u64 * CS;
    assert_eq!(stored_ahead(&lazy, want), want);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(lazy.stats().bytes_stored_ahead, want, "nothing more");
    let runs = stored_runs(&pages, &fx.plain);
    assert_eq!(
        runs,
        [(3 * CS, 7 * CS), (8 * CS, 12 * CS), (13 * CS, 17 * CS)]
    );
    // Reading on moves the window into chunks the node lacks: they are
    // not fetched for it.
    for at in [4 * CS, 6 * CS, 8 * CS, 10 * CS] {
        let parts = cached_read(&lazy, at, 2 * CS);
        assert!(flatten(&parts) == fx.plain[at as usize..(at + 2 * CS) as usize]);
    }
    let want = want + 2 * CS;
    assert_eq!(stored_ahead(&lazy, want), want, "chunks 18 and 19");
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(lazy.stats().bytes_stored_ahead, want, "none of 20..");
    assert_eq!(fx.store.total(), fetched, "nothing fetched to store ahead");
    assert_eq!(
        lazy.stats().bytes_read,
        12 * CS,
        "stored pages are not reads"
    );
}

#[test]
fn reads_out_of_order_store_nothing_ahead() {
    let fx = fixture(Duration::ZERO);
    let (lazy, pages) = held_and_exported(&fx);
    for at in [30 * CS, 10 * CS, 40 * CS, 5 * CS] {
        let parts = cached_read(&lazy, at, CS);
        assert!(flatten(&parts) == fx.plain[at as usize..(at + CS) as usize]);
    }
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(lazy.stats().bytes_stored_ahead, 0);
    assert!(pages.0.lock().unwrap().is_empty());
    // Without a page cache (NBD), a reader in order stores nothing.
    let nbd = fx.lazy(32 << 20, 1 << 30);
    for at in [0, CS, 2 * CS] {
        cached_read(&nbd, at, CS);
    }
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(nbd.stats().bytes_stored_ahead, 0);
}

#[test]
fn the_window_moves_with_the_reader_and_stops_at_the_image_end() {
    let fx = fixture(Duration::ZERO);
    let (lazy, pages) = held_and_exported(&fx);
    // Read the whole image in order, 128 KiB at a time (the last read
    // shorter): the pages after the first read are all stored once.
    let mut at = 0;
    while at < SIZE {
        let len = (2 * CS).min(SIZE - at);
        let parts = cached_read(&lazy, at, len);
        assert!(flatten(&parts) == fx.plain[at as usize..(at + len) as usize]);
        at += len;
    }
    let zero: u64 = (2..SIZE.div_ceil(CS))
        .filter(|c| c % 5 == 2)
        .map(|c| CS.min(SIZE - c * CS))
        .sum();
    let want = SIZE - 2 * CS - zero;
    assert_eq!(stored_ahead(&lazy, want), want);
    std::thread::sleep(Duration::from_millis(50));
    let runs = stored_runs(&pages, &fx.plain);
    assert_eq!(runs.first().map(|r| r.0), Some(3 * CS), "chunk 2 is zeros");
    assert_eq!(runs.last().map(|r| r.1), Some(SIZE), "up to the image end");
    let total: u64 = runs.iter().map(|r| r.1 - r.0).sum();
    assert_eq!(total, want, "each page stored once");
}

#[test]
fn the_kernel_skipping_stored_pages_keeps_the_reader_in_order() {
    let fx = fixture(Duration::ZERO);
    let (lazy, _pages) = held_and_exported(&fx);
    let read = |at: u64, len: u64| {
        let parts = cached_read(&lazy, at, len);
        assert!(flatten(&parts) == fx.plain[at as usize..(at + len) as usize]);
    };
    // Chunks 2..18 stored; the kernel asks next for chunk 7 (zeros, not
    // stored), then for chunk 18, the first page it lacks after them.
    read(0, 2 * CS);
    let first = (2..18).filter(|c| c % 5 != 2).count() as u64 * CS;
    assert_eq!(stored_ahead(&lazy, first), first);
    read(7 * CS, CS);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(lazy.stats().bytes_stored_ahead, first, "still far ahead");
    read(18 * CS, 2 * CS);
    let second = first + (20..36).filter(|c| c % 5 != 2).count() as u64 * CS;
    assert_eq!(stored_ahead(&lazy, second), second);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(lazy.stats().bytes_stored_ahead, second, "each page once");
    // A new pass from the start (the page cache dropped) is a reader of
    // its own: from its second read on, it gets its pages stored again.
    read(0, 2 * CS);
    read(2 * CS, 2 * CS);
    let third = second + (4..20).filter(|c| c % 5 != 2).count() as u64 * CS;
    assert_eq!(stored_ahead(&lazy, third), third);
}
