//! The disk's floor for a warm NBD copy with the page cache dropped: how
//! long it takes just to read every file under a directory (a chunk
//! cache's segments), with `pread`, from many threads at once, doing
//! nothing with the bytes. `scripts/bench-lazy.sh` times it next to the
//! servers' copies.
//!
//! Usage: `read_floor DIR [THREADS]` (default 48, the NBD server's
//! request limit); prints `files bytes seconds`. Drop the page cache
//! first to measure the disk.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

fn files_under(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        if e.file_type()?.is_dir() {
            files_under(&e.path(), out)?;
        } else {
            out.push(e.path());
        }
    }
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(args.next().ok_or("usage: read_floor DIR [THREADS]")?);
    let threads: usize = match args.next() {
        Some(t) => t.parse()?,
        None => 48,
    };
    let mut paths = Vec::new();
    files_under(&dir, &mut paths)?;
    // Opened up front, as the server's open-file cache has them.
    let files = paths
        .iter()
        .map(|p| File::open(p).map_err(|e| format!("{}: {e}", p.display())))
        .collect::<Result<Vec<_>, _>>()?;
    let (next, bytes) = (AtomicUsize::new(0), AtomicU64::new(0));
    let started = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(|| {
                let mut buf = vec![0u8; 1 << 20];
                while let Some(f) = files.get(next.fetch_add(1, Ordering::Relaxed)) {
                    let mut at = 0u64;
                    while let Ok(n @ 1..) = f.read_at(&mut buf, at) {
                        at += n as u64;
                    }
                    bytes.fetch_add(at, Ordering::Relaxed);
                }
            });
        }
    });
    println!(
        "{} {} {:.3}",
        files.len(),
        bytes.load(Ordering::Relaxed),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
