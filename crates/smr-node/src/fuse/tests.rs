//! Tests of the FUSE export against the real kernel (need /dev/fuse and
//! root; skipped with a note otherwise).

use super::*;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

/// A device whose byte at `i` is `i % 251`; reads of `[bad, bad + 4096)`
/// fail, and every read sleeps `delay` while counting how many overlap.
struct Pattern {
    size: u64,
    bad: u64,
    delay: Duration,
    now: AtomicUsize,
    peak: AtomicUsize,
}

impl BlockDevice for Pattern {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let n = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(n, Ordering::SeqCst);
        std::thread::sleep(self.delay);
        self.now.fetch_sub(1, Ordering::SeqCst);
        let end = offset + buf.len() as u64;
        if offset < self.bad + 4096 && end > self.bad {
            return Err(io::Error::other(format!(
                "chunk at {} is corrupt",
                self.bad
            )));
        }
        for (i, b) in buf.iter_mut().enumerate() {
            *b = ((offset + i as u64) % 251) as u8;
        }
        Ok(())
    }
}

fn can_mount() -> bool {
    let ok = rustix::process::geteuid().is_root() && Path::new("/dev/fuse").exists();
    if !ok {
        eprintln!("note: FUSE test skipped (needs root and /dev/fuse)");
    }
    ok
}

fn pattern(size: u64, bad: u64, delay: Duration) -> Arc<Pattern> {
    Arc::new(Pattern {
        size,
        bad,
        delay,
        now: AtomicUsize::new(0),
        peak: AtomicUsize::new(0),
    })
}

#[test]
fn serves_bytes_errors_and_parallel_reads() {
    if !can_mount() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let size = (8 << 20) + 1000;
    let dev = pattern(size, 4 << 20, Duration::from_millis(150));
    let m = FuseMount::spawn(dev.clone(), dir.path(), &FuseConfig::default(), "smr-test")
        .expect("mount");
    let meta = std::fs::metadata(m.file()).expect("stat");
    assert_eq!(meta.len(), size);
    assert!(std::fs::OpenOptions::new()
        .write(true)
        .open(m.file())
        .is_err());
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .expect("readdir")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("image")]);

    // 8 readers of distinct 64 KiB ranges, O_DIRECT-free but far apart so
    // that the page cache does not merge them: they must overlap in time.
    let t = Instant::now();
    std::thread::scope(|s| {
        for k in 0..8u64 {
            let file = m.file().to_path_buf();
            s.spawn(move || {
                let mut f = std::fs::File::open(file).expect("open");
                let off = k * (512 << 10);
                f.seek(SeekFrom::Start(off)).expect("seek");
                let mut buf = vec![0u8; 4096];
                f.read_exact(&mut buf).expect("read");
                assert!(buf
                    .iter()
                    .enumerate()
                    .all(|(i, b)| *b == ((off + i as u64) % 251) as u8));
            });
        }
    });
    let peak = dev.peak.load(Ordering::SeqCst);
    assert!(
        peak >= 4,
        "reads did not run in parallel: peak {peak}, took {:?}",
        t.elapsed()
    );

    // The tail is short, the bad range fails with EIO, the rest still works.
    let mut f = std::fs::File::open(m.file()).expect("open");
    f.seek(SeekFrom::Start(size - 10)).expect("seek");
    let mut tail = Vec::new();
    f.read_to_end(&mut tail).expect("tail");
    assert_eq!(tail.len(), 10);
    f.seek(SeekFrom::Start(4 << 20)).expect("seek");
    let err = f
        .read_exact(&mut [0u8; 100])
        .expect_err("bad range must fail");
    assert_eq!(err.raw_os_error(), Some(libc::EIO));
    f.seek(SeekFrom::Start(1 << 20)).expect("seek");
    f.read_exact(&mut [0u8; 100])
        .expect("good range after error");
    drop(f);
    m.unmount(Duration::from_secs(5)).expect("unmount");
    let mounts = std::fs::read_to_string("/proc/self/mounts").expect("mounts");
    assert!(!mounts.contains(&dir.path().display().to_string()));
}

/// A writable device in memory.
struct Mem(std::sync::Mutex<Vec<u8>>);

impl BlockDevice for Mem {
    fn size(&self) -> u64 {
        self.0.lock().unwrap().len() as u64
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let m = self.0.lock().unwrap();
        buf.copy_from_slice(&m[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }

    fn read_only(&self) -> bool {
        false
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut m = self.0.lock().unwrap();
        m[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        Ok(())
    }
}

#[test]
fn fallocate_punches_and_zeroes_ranges_of_a_writable_file() {
    if !can_mount() {
        return;
    }
    use rustix::fs::FallocateFlags as F;
    let dev = Arc::new(Mem(std::sync::Mutex::new(vec![7u8; 64 << 10])));
    let dir = tempfile::tempdir().unwrap();
    let m = FuseMount::spawn(dev.clone(), dir.path(), &FuseConfig::default(), "t").unwrap();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.file())
        .unwrap();
    rustix::fs::fallocate(&f, F::PUNCH_HOLE | F::KEEP_SIZE, 4096, 8192).unwrap();
    rustix::fs::fallocate(&f, F::ZERO_RANGE, 20000, 100).unwrap();
    rustix::fs::fallocate(&f, F::empty(), 0, 4096).unwrap();
    let e = rustix::fs::fallocate(&f, F::COLLAPSE_RANGE, 0, 4096).unwrap_err();
    assert_eq!(e, rustix::io::Errno::OPNOTSUPP);
    let e = rustix::fs::fallocate(&f, F::ZERO_RANGE, 60 << 10, 8192).unwrap_err();
    assert_eq!(e, rustix::io::Errno::NOSPC);
    let got = dev.0.lock().unwrap().clone();
    let mut want = vec![7u8; 64 << 10];
    want[4096..12288].fill(0);
    want[20000..20100].fill(0);
    assert!(got == want, "exactly the ranges asked for read as zeros");
    drop(f);
}

/// A page-aligned buffer, as `O_DIRECT` reads need.
#[repr(C, align(4096))]
struct AlignedPage([u8; 4096]);

/// A read-only device of [`Pattern`]'s bytes that, once exported, stores
/// `[64 KiB, 128 KiB)` in the file's page cache and says so; it records
/// the offset of every read the kernel sends.
struct Seeding {
    reads: std::sync::Mutex<Vec<u64>>,
    /// Offsets of the reads the export said go through the page cache.
    hints: std::sync::Mutex<Vec<u64>>,
    stored: crossbeam_channel::Sender<io::Result<()>>,
}

const SEEDED: std::ops::Range<u64> = 64 << 10..128 << 10;

impl BlockDevice for Seeding {
    fn size(&self) -> u64 {
        1 << 20
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.reads.lock().unwrap().push(offset);
        for (i, b) in buf.iter_mut().enumerate() {
            *b = ((offset + i as u64) % 251) as u8;
        }
        Ok(())
    }

    fn exported(&self, pages: Arc<dyn PageSink>) {
        let bytes: Vec<u8> = SEEDED.map(|i| (i % 251) as u8).collect();
        let done = self.stored.clone();
        // Not from the FUSE thread answering the open.
        std::thread::spawn(move || done.send(pages.store(SEEDED.start, &bytes)));
    }

    fn read_through_page_cache(&self, offset: u64, _len: usize) {
        self.hints.lock().unwrap().push(offset);
    }
}

#[test]
fn a_read_only_device_fills_the_page_cache_the_kernel_reads() {
    if !can_mount() {
        return;
    }
    let (tx, rx) = crossbeam_channel::bounded(1);
    let dev = Arc::new(Seeding {
        reads: std::sync::Mutex::new(Vec::new()),
        hints: std::sync::Mutex::new(Vec::new()),
        stored: tx,
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let m = FuseMount::spawn(dev.clone(), dir.path(), &FuseConfig::default(), "smr-test")
        .expect("mount");
    let mut f = std::fs::File::open(m.file()).expect("open");
    rx.recv_timeout(Duration::from_secs(10))
        .expect("exported at the first open")
        .expect("stored");
    let mut buf = vec![0u8; 8192];
    let at = SEEDED.start + 4096;
    f.seek(SeekFrom::Start(at)).expect("seek");
    f.read_exact(&mut buf).expect("read");
    assert!(buf
        .iter()
        .enumerate()
        .all(|(i, b)| *b == ((at + i as u64) % 251) as u8));
    let reads = dev.reads.lock().unwrap().clone();
    assert!(
        reads.iter().all(|r| !SEEDED.contains(r)),
        "the stored pages were read from the page cache, not asked for: {reads:?}"
    );
    // Elsewhere the kernel asks the device.
    f.seek(SeekFrom::Start(512 << 10)).expect("seek");
    f.read_exact(&mut buf).expect("read");
    assert!(dev.reads.lock().unwrap().contains(&(512 << 10)));
    // Each read through the page cache is hinted (after its answer), an
    // O_DIRECT one not.
    let t = Instant::now();
    while !dev.hints.lock().unwrap().contains(&(512 << 10)) {
        assert!(t.elapsed() < Duration::from_secs(5), "no hint of the read");
        std::thread::sleep(Duration::from_millis(5));
    }
    drop(f);
    let direct = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(m.file())
        .expect("open O_DIRECT");
    let mut page = AlignedPage([0; 4096]);
    let at = 768 << 10;
    direct.read_exact_at(&mut page.0, at).expect("direct read");
    assert!(dev.reads.lock().unwrap().contains(&at));
    std::thread::sleep(Duration::from_millis(50));
    assert!(!dev.hints.lock().unwrap().contains(&at));
    drop(direct);
    m.unmount(Duration::from_secs(5)).expect("unmount");
}
