//! End-to-end tests: build trees, write images, check them with e2fsprogs
//! (`e2fsck -fn`, `debugfs`) and, when running as root, a kernel mount.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use super::*;
use crate::tree::{DataSink, Inode, InodeId, Kind, Meta, Tree};
use smr_testkit::noise;

const CHUNK: u64 = 64 * 1024;

fn options(chunk_size: u64) -> Options {
    Options {
        chunk_size,
        uuid: *b"smr-ext4-test-id",
        hash_seed: [0x5a; 16],
    }
}

fn meta(mode: u32) -> Meta {
    Meta {
        mode,
        mtime: 1_700_000_000,
        mtime_nsec: 250_000_000,
        ..Meta::default()
    }
}

/// A tree under construction plus the writer its file data goes to; keeps
/// the expected contents of every file.
struct Fixture<S: ImageSink> {
    tree: Tree,
    w: Ext4Writer<S>,
    contents: BTreeMap<InodeId, Vec<u8>>,
}

impl<S: ImageSink> Fixture<S> {
    fn new(sink: S, chunk_size: u64) -> Self {
        Fixture {
            tree: Tree::new(),
            w: Ext4Writer::new(sink, options(chunk_size)),
            contents: BTreeMap::new(),
        }
    }

    fn root(&self) -> InodeId {
        self.tree.root
    }

    fn link(&mut self, parent: InodeId, name: &[u8], id: InodeId) {
        match &mut self.tree.get_mut(parent).kind {
            Kind::Dir { entries } => entries.insert(name.to_vec(), id),
            _ => panic!("parent is not a directory"),
        };
    }

    fn add(&mut self, parent: InodeId, name: &str, kind: Kind, meta: Meta) -> InodeId {
        let id = self.tree.push(Inode { kind, meta });
        self.link(parent, name.as_bytes(), id);
        id
    }

    fn dir(&mut self, parent: InodeId, name: &str) -> InodeId {
        let kind = Kind::Dir {
            entries: BTreeMap::new(),
        };
        self.add(parent, name, kind, meta(0o755))
    }

    fn file_meta(&mut self, parent: InodeId, name: &str, data: &[u8], m: Meta) -> InodeId {
        let extents = self
            .w
            .write_file(&mut &data[..], data.len() as u64)
            .expect("write_file");
        let kind = Kind::File {
            size: data.len() as u64,
            extents,
        };
        let id = self.add(parent, name, kind, m);
        self.contents.insert(id, data.to_vec());
        id
    }

    fn file(&mut self, parent: InodeId, name: &str, data: &[u8]) -> InodeId {
        self.file_meta(parent, name, data, meta(0o644))
    }

    fn finish(self) -> (S, Ext4Stats, Tree, BTreeMap<InodeId, Vec<u8>>) {
        let (sink, stats) = self.w.finish(&self.tree).expect("finish");
        (sink, stats, self.tree, self.contents)
    }
}

fn new_image() -> (tempfile::TempDir, PathBuf, File) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("img");
    let file = File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .expect("create image");
    (dir, path, file)
}

/// `e2fsck -fn` must exit 0 and print nothing but its pass lines and summary.
fn e2fsck(img: &Path) {
    let out = Command::new("e2fsck")
        .arg("-fn")
        .arg(img)
        .output()
        .expect("run e2fsck");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let complaints: Vec<&str> = stdout
        .lines()
        .filter(|l| !l.starts_with("Pass ") && !l.contains(" files ("))
        .chain(stderr.lines().filter(|l| !l.starts_with("e2fsck ")))
        .collect();
    assert!(
        out.status.success() && complaints.is_empty(),
        "e2fsck {:?}:\n{stdout}\n{stderr}",
        out.status
    );
}

fn debugfs(img: &Path, request: &str) -> String {
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(request)
        .arg(img)
        .output()
        .expect("run debugfs");
    assert!(out.status.success(), "debugfs {request} failed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn debugfs_cat(img: &Path, path: &str) -> Vec<u8> {
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(format!("cat {path}"))
        .arg(img)
        .output()
        .expect("run debugfs");
    out.stdout
}

/// A read-only loop mount, unmounted on drop.
struct Mount {
    dir: tempfile::TempDir,
}

impl Mount {
    /// `None` (with a note) when not root or loop mounts are unavailable.
    fn new(img: &Path) -> Option<Mount> {
        Self::with_options(img, "loop,ro")
    }

    fn with_options(img: &Path, options: &str) -> Option<Mount> {
        let dir = tempfile::tempdir().ok()?;
        let ok = Command::new("mount")
            .args(["-o", options, "-t", "ext4"])
            .arg(img)
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("note: skipping kernel mount checks (not root or no loop devices)");
            return None;
        }
        Some(Mount { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(self.dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if !ok && !std::thread::panicking() {
            panic!("umount {} failed", self.dir.path().display());
        }
    }
}

/// Names per non-directory inode, subdirectories per directory.
fn link_counts(tree: &Tree) -> BTreeMap<InodeId, u64> {
    let mut counts = BTreeMap::new();
    let mut stack = vec![tree.root];
    // The writer adds lost+found when the tree has none.
    let made_up_lost_found = match &tree.get(tree.root).kind {
        Kind::Dir { entries } => !entries.contains_key(&b"lost+found"[..]),
        _ => false,
    };
    counts.insert(tree.root, 2 + u64::from(made_up_lost_found));
    while let Some(d) = stack.pop() {
        if let Kind::Dir { entries } = &tree.get(d).kind {
            for &child in entries.values() {
                if matches!(tree.get(child).kind, Kind::Dir { .. }) {
                    *counts.entry(d).or_insert(2) += 1;
                    counts.insert(child, 2);
                    stack.push(child);
                } else {
                    *counts.entry(child).or_insert(0) += 1;
                }
            }
        }
    }
    counts
}

fn xattrs_on_disk(path: &Path) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let out = Command::new("getfattr")
        .args(["-d", "-m", "-", "-e", "hex", "--absolute-names", "-h"])
        .arg(path)
        .output()
        .expect("run getfattr");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut map = BTreeMap::new();
    for line in text.lines() {
        if let Some((name, hexval)) = line.split_once("=0x") {
            let bytes = (0..hexval.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hexval[i..i + 2], 16).expect("hex"))
                .collect();
            map.insert(name.as_bytes().to_vec(), bytes);
        } else if !line.is_empty() && !line.starts_with('#') {
            let name = line.split('=').next().unwrap_or(line);
            map.insert(name.as_bytes().to_vec(), Vec::new());
        }
    }
    map
}

/// Compares everything reachable in `tree` with the mounted filesystem.
fn compare_mounted(tree: &Tree, contents: &BTreeMap<InodeId, Vec<u8>>, root: &Path) {
    let links = link_counts(tree);
    let mut stack = vec![(tree.root, root.to_path_buf())];
    let mut checked = 0;
    while let Some((id, path)) = stack.pop() {
        let inode = tree.get(id);
        let md = std::fs::symlink_metadata(&path).expect("lstat");
        let what = path.display();
        let m = &inode.meta;
        if id != tree.root {
            assert_eq!(md.mode() & 0o7777, m.mode, "{what} mode");
            assert_eq!((md.uid(), md.gid()), (m.uid, m.gid), "{what} owner");
            assert_eq!(
                (md.mtime(), md.mtime_nsec()),
                (m.mtime, i64::from(m.mtime_nsec)),
                "{what} mtime"
            );
            let xattrs = xattrs_on_disk(&path);
            assert_eq!(xattrs, m.xattrs, "{what} xattrs");
        }
        if !matches!(inode.kind, Kind::Dir { .. }) || id == tree.root {
            assert_eq!(md.nlink(), links[&id], "{what} links");
        }
        match &inode.kind {
            Kind::Dir { entries } => {
                assert!(md.is_dir(), "{what} is a dir");
                assert_eq!(md.nlink(), links[&id], "{what} links");
                let mut names: Vec<Vec<u8>> = std::fs::read_dir(&path)
                    .expect("readdir")
                    .map(|e| {
                        use std::os::unix::ffi::OsStrExt;
                        e.expect("entry").file_name().as_bytes().to_vec()
                    })
                    .filter(|n| !(id == tree.root && n == b"lost+found"))
                    .collect();
                names.sort();
                let expected: Vec<Vec<u8>> = entries
                    .keys()
                    .filter(|n| !(id == tree.root && *n == b"lost+found"))
                    .cloned()
                    .collect();
                assert_eq!(names, expected, "{what} entries");
                for (name, &child) in entries {
                    use std::os::unix::ffi::OsStrExt;
                    stack.push((child, path.join(std::ffi::OsStr::from_bytes(name))));
                }
            }
            Kind::File { size, .. } => {
                assert!(md.is_file(), "{what} is a file");
                assert_eq!(md.size(), *size, "{what} size");
                let data = std::fs::read(&path).expect("read");
                assert!(data == contents[&id], "{what} content differs");
                // Holes stay holes: allocated blocks are the non-zero ones
                // plus a few extent tree or xattr blocks.
                let nonzero = data
                    .chunks(4096)
                    .filter(|b| b.iter().any(|&c| c != 0))
                    .count();
                let sectors = nonzero as u64 * 8;
                assert!(
                    md.blocks() >= sectors && md.blocks() < sectors + 64,
                    "{what} allocated blocks"
                );
            }
            Kind::Symlink { target } => {
                use std::os::unix::ffi::OsStrExt;
                let t = std::fs::read_link(&path).expect("readlink");
                assert_eq!(t.as_os_str().as_bytes(), &target[..], "{what} target");
            }
            Kind::CharDev { major, minor } | Kind::BlockDev { major, minor } => {
                let char_dev = matches!(inode.kind, Kind::CharDev { .. });
                assert_eq!(md.file_type().is_char_device(), char_dev, "{what} type");
                assert_eq!(md.file_type().is_block_device(), !char_dev, "{what} type");
                let rdev = md.rdev();
                let (maj, min) = (
                    ((rdev >> 8) & 0xfff) | ((rdev >> 32) & !0xfff),
                    (rdev & 0xff) | ((rdev >> 12) & !0xff),
                );
                assert_eq!(
                    (maj, min),
                    (u64::from(*major), u64::from(*minor)),
                    "{what} rdev"
                );
            }
            Kind::Fifo => assert!(md.file_type().is_fifo(), "{what} is a fifo"),
        }
        checked += 1;
    }
    assert!(checked > 1);
}

#[test]
fn empty_tree_is_clean_and_has_lost_found() {
    let (_dir, path, file) = new_image();
    let (_, stats, _, _) = Fixture::new(file, CHUNK).finish();
    e2fsck(&path);
    let ls = debugfs(&path, "ls -l /");
    assert!(ls.contains("lost+found"), "{ls}");
    let lf = debugfs(&path, "stat /lost+found");
    assert!(
        lf.contains("Size: 16384") && lf.contains("Mode:  0700"),
        "{lf}"
    );
    assert_eq!(stats.inodes_used, 11);
    assert!(stats.inodes_total >= 11 + 1024);
    assert!(stats.free_blocks * 4096 >= 16 << 20);
    assert_eq!(
        stats.image_size,
        std::fs::metadata(&path).expect("md").len()
    );
    assert_eq!(stats.blocks_total * 4096, stats.image_size);
    assert_eq!(stats.header_len, header_len());
}

/// Every inode kind and the awkward cases; see the module docs.
fn build_everything<S: ImageSink>(f: &mut Fixture<S>) {
    let root = f.root();
    f.file(root, "empty", b"");
    let small = f.file(root, "small", b"hello\n");
    f.file(root, "exact4096", &noise(4096, 1));
    f.file(root, "big", &noise(300 * 1024 + 17, 2));
    // Holes: data, 8 MiB of zeros, data, zero tail.
    let mut sparse = noise(5000, 3);
    sparse.resize(5000 + (8 << 20), 0);
    sparse.extend_from_slice(&noise(4096 * 3, 4));
    sparse.resize(sparse.len() + 10_000, 0);
    f.file(root, "sparse", &sparse);
    // 1400 extents (data, hole, data, ...): a depth-2 extent tree.
    let mut frag = Vec::new();
    for i in 0..1400 {
        frag.extend_from_slice(&noise(4096, 100 + i));
        frag.extend_from_slice(&[0u8; 4096]);
    }
    frag.extend_from_slice(b"tail");
    f.file(root, "fragmented", &frag);
    // 12 extents: a depth-1 tree.
    let mut few = Vec::new();
    for i in 0..12 {
        few.extend_from_slice(&noise(4096, 5000 + i));
        few.extend_from_slice(&[0u8; 4096]);
    }
    f.file(root, "few-extents", &few);

    let many = f.dir(root, "many");
    for i in 0..3000 {
        f.file(many, &format!("entry-with-a-longish-name-{i:05}"), b"");
    }
    let mut deep = root;
    for i in 0..40 {
        deep = f.dir(deep, &format!("d{i}"));
    }
    f.file(deep, "bottom", b"deep\n");

    let link = |len: usize| Kind::Symlink {
        target: (0..len).map(|i| b'a' + (i % 26) as u8).collect(),
    };
    f.add(root, "link59", link(59), meta(0o777));
    f.add(root, "link60", link(60), meta(0o777));
    f.add(root, "link4000", link(4000), meta(0o777));
    f.add(
        root,
        "link-rel",
        Kind::Symlink {
            target: b"small".to_vec(),
        },
        meta(0o777),
    );
    let dev = f.dir(root, "dev");
    f.add(
        dev,
        "null",
        Kind::CharDev { major: 1, minor: 3 },
        meta(0o666),
    );
    f.add(
        dev,
        "bigchar",
        Kind::CharDev {
            major: 300,
            minor: 70000,
        },
        meta(0o600),
    );
    f.add(
        dev,
        "sda1",
        Kind::BlockDev { major: 8, minor: 1 },
        meta(0o660),
    );
    f.add(
        dev,
        "nvme",
        Kind::BlockDev {
            major: 259,
            minor: 0xf_ffff,
        },
        meta(0o660),
    );
    f.add(dev, "fifo", Kind::Fifo, meta(0o644));

    // Hard links: three names for "small".
    let d0 = f.dir(root, "links");
    f.link(d0, b"small-again", small);
    f.link(root, b"small-third", small);

    f.file_meta(root, "setuid", b"#!/bin/sh\n", meta(0o4755));
    let sgid = f.dir(root, "setgid");
    f.tree.get_mut(sgid).meta.mode = 0o2775;
    let tmp = f.dir(root, "tmp");
    f.tree.get_mut(tmp).meta.mode = 0o1777;
    let owned = Meta {
        uid: 100_000,
        gid: 200_000,
        ..meta(0o640)
    };
    f.file_meta(root, "owned", b"x", owned);
    let future = Meta {
        mtime: 1 << 33,
        mtime_nsec: 123_456_789,
        ..meta(0o644)
    };
    f.file_meta(root, "future", b"2242", future);
    let past = Meta {
        mtime: -1_000_000_000,
        mtime_nsec: 999_999_999,
        ..meta(0o644)
    };
    f.file_meta(root, "past", b"1938", past);

    // security.capability v2: cap_net_bind_service (bit 10), effective.
    let mut cap = Vec::new();
    for word in [0x0200_0001u32, 1 << 10, 0, 0, 0] {
        cap.extend_from_slice(&word.to_le_bytes());
    }
    let mut m = meta(0o755);
    m.xattrs.insert(b"security.capability".to_vec(), cap);
    f.file_meta(root, "capable", b"\x7fELF", m);
    let mut m = meta(0o644);
    m.xattrs.insert(b"user.big".to_vec(), noise(2000, 9));
    m.xattrs.insert(b"user.small".to_vec(), b"v".to_vec());
    m.xattrs.insert(b"user.empty".to_vec(), Vec::new());
    m.xattrs
        .insert(b"trusted.t".to_vec(), b"trusted value".to_vec());
    f.file_meta(root, "xattr-block", b"data", m);
    // POSIX ACL: user::rw- user:1000:r-- group::r-- mask::r-- other::---
    let mut acl = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in [
        (1u16, 6u16, u32::MAX),
        (2, 4, 1000),
        (4, 4, u32::MAX),
        (0x10, 4, u32::MAX),
        (0x20, 0, u32::MAX),
    ] {
        acl.extend_from_slice(&tag.to_le_bytes());
        acl.extend_from_slice(&perm.to_le_bytes());
        acl.extend_from_slice(&id.to_le_bytes());
    }
    let mut m = meta(0o640);
    m.xattrs.insert(b"system.posix_acl_access".to_vec(), acl);
    f.file_meta(root, "acl", b"acl", m);

    let long = "n".repeat(255);
    f.file(root, &long, b"long name");
    // An unreachable inode with data: dead blocks, not in the image's files.
    let extents =
        f.w.write_file(&mut &noise(8192, 77)[..], 8192)
            .expect("write");
    f.tree.push(Inode {
        kind: Kind::File {
            size: 8192,
            extents,
        },
        meta: meta(0o644),
    });
}

#[test]
fn every_kind_is_clean_and_reads_back() {
    let (_dir, path, file) = new_image();
    let mut f = Fixture::new(file, CHUNK);
    build_everything(&mut f);
    let (_, stats, tree, contents) = f.finish();
    e2fsck(&path);
    assert_eq!(stats.data_blocks_written, stats.live_data_blocks + 2);

    let st = debugfs(&path, "stat /small");
    assert!(st.contains("Links: 3"), "{st}");
    let st = debugfs(&path, "stat /owned");
    assert!(
        st.contains("User: 100000") && st.contains("Group: 200000"),
        "{st}"
    );
    let st = debugfs(&path, "stat /setuid");
    assert!(st.contains("Mode:  04755"), "{st}");
    let st = debugfs(&path, "stat /link59");
    assert!(st.contains("Fast link dest: \"abcdefghij"), "{st}");
    let st = debugfs(&path, "stat /dev/bigchar");
    assert!(st.contains("Device major/minor number: 300:70000"), "{st}");
    let st = debugfs(&path, "stat /fragmented");
    assert!(st.contains("Size: 11468804"), "{st}");
    let st = debugfs(&path, "stat /many");
    assert!(st.contains("Links: 2"), "{st}");
    let st = debugfs(&path, "stat /");
    // 6 subdirectories plus lost+found.
    assert!(st.contains("Links: 9"), "{st}");
    let ea = debugfs(&path, "ea_list /xattr-block");
    assert!(
        ea.contains("user.small (1) = \"v\"") && ea.contains("user.big (2000)"),
        "{ea}"
    );
    let ea = debugfs(&path, "ea_list /capable");
    assert!(ea.contains("security.capability (20)"), "{ea}");
    assert_eq!(debugfs_cat(&path, "/small"), b"hello\n");
    assert_eq!(debugfs_cat(&path, "/d0/d1/d2/d3/d4/d5/d6/d7/d8/d9/d10/d11/d12/d13/d14/d15/d16/d17/d18/d19/d20/d21/d22/d23/d24/d25/d26/d27/d28/d29/d30/d31/d32/d33/d34/d35/d36/d37/d38/d39/bottom"), b"deep\n");
    let ls = debugfs(&path, "ls -l /many");
    assert_eq!(ls.matches("entry-with-a-longish-name-").count(), 3000);

    if let Some(m) = Mount::new(&path) {
        compare_mounted(&tree, &contents, m.path());
    }
}

#[test]
fn file_ranges_and_metadata_offset_describe_the_image() {
    let mut f = Fixture::new(Vec::new(), CHUNK);
    build_everything(&mut f);
    let (img, stats, tree, contents) = f.finish();
    // One range per reachable file with data, disjoint, inside the data.
    let files: Vec<&Vec<u8>> = contents
        .iter()
        .filter(|(id, data)| {
            matches!(tree.get(**id).kind, Kind::File { .. }) && data.iter().any(|&b| b != 0)
        })
        .map(|(_, d)| d)
        .collect();
    assert_eq!(stats.files.len(), files.len());
    let mut sorted = stats.files.clone();
    sorted.sort_by_key(|r| r.start);
    for w in sorted.windows(2) {
        assert!(w[0].end <= w[1].start, "{w:?} overlap");
    }
    assert!(sorted.first().unwrap().start >= data_offset(CHUNK));
    assert!(sorted.last().unwrap().end <= stats.metadata_offset);
    // Groups: disjoint, in image order, each file inside exactly one.
    for w in stats.groups.windows(2) {
        assert!(w[0].end <= w[1].start, "groups {w:?} overlap");
    }
    for f in &stats.files {
        let n = stats
            .groups
            .iter()
            .filter(|g| g.start <= f.start && f.end <= g.end)
            .count();
        assert_eq!(n, 1, "file {f:?} in {n} groups");
    }
    assert!(stats.groups.len() <= stats.files.len());
    assert_eq!(stats.metadata_offset % CHUNK, 0);
    // Each range starts with the first non-zero block of some file.
    for r in &stats.files {
        let block = &img[r.start as usize..r.start as usize + 4096];
        assert!(
            files.iter().any(|d| d
                .chunks(4096)
                .find(|b| b.iter().any(|&x| x != 0))
                .is_some_and(|b| block.starts_with(b))),
            "range {r:?} does not start a file's data"
        );
    }
    // The metadata region starts after every data block written (the
    // dead ones too) and holds the inode tables.
    let data_end = data_offset(CHUNK) + stats.data_blocks_written * 4096;
    assert!(stats.metadata_offset >= data_end);
    assert!(stats.metadata_offset - data_end < CHUNK);
    assert!(img[stats.metadata_offset as usize..]
        .iter()
        .any(|&b| b != 0));
}

#[test]
fn tree_lost_found_is_used_as_inode_11() {
    let (_dir, path, file) = new_image();
    let mut f = Fixture::new(file, CHUNK);
    let root = f.root();
    let lf = f.dir(root, "lost+found");
    f.tree.get_mut(lf).meta.mode = 0o700;
    f.file(lf, "#1234", b"recovered");
    f.file(root, "a", b"a");
    let (_, stats, _, _) = f.finish();
    e2fsck(&path);
    let ls = debugfs(&path, "ls -l /lost+found");
    assert!(ls.contains("#1234"), "{ls}");
    let st = debugfs(&path, "stat /lost+found");
    assert!(st.contains("Inode: 11 "), "{st}");
    assert_eq!(stats.inodes_used, 13);
}

#[test]
fn same_tree_gives_identical_bytes() {
    let image = |chunk| {
        let mut f = Fixture::new(Vec::new(), chunk);
        build_everything(&mut f);
        f.finish()
    };
    let (a, sa, _, _) = image(CHUNK);
    let (b, _, _, _) = image(CHUNK);
    assert!(a == b, "two writes of the same tree differ");
    // Another chunk size moves the data region and nothing inside it.
    let (c, sc, _, _) = image(1 << 20);
    let data_len = (sa.data_blocks_written * 4096) as usize;
    let (oa, oc) = (data_offset(CHUNK) as usize, data_offset(1 << 20) as usize);
    assert_eq!(oc, 1 << 20);
    assert!(a[oa..oa + data_len] == c[oc..oc + data_len]);
    assert_eq!(sa.live_data_blocks, sc.live_data_blocks);
    assert_eq!(sa.inodes_used, sc.inodes_used);
}

#[test]
fn first_layer_data_does_not_depend_on_later_layers() {
    let image = |second: bool| {
        let mut f = Fixture::new(Vec::new(), CHUNK);
        let root = f.root();
        f.w.start_layer().expect("layer");
        f.file(root, "one", &noise(100_000, 1));
        f.file(root, "two", &noise(5000, 2));
        if second {
            f.w.start_layer().expect("layer");
            f.file(root, "three", &noise(300_000, 3));
            // The upper layer deletes "two".
            if let Kind::Dir { entries } = &mut f.tree.get_mut(root).kind {
                entries.remove(&b"two"[..]);
            }
        }
        let root_entries = match &f.tree.get(root).kind {
            Kind::Dir { entries } => entries.clone(),
            _ => unreachable!(),
        };
        let one = root_entries[&b"one"[..]];
        let extents = match &f.tree.get(one).kind {
            Kind::File { extents, .. } => extents.clone(),
            _ => unreachable!(),
        };
        let (img, stats, _, _) = f.finish();
        (img, stats, extents)
    };
    let (a, _, ea) = image(false);
    let (b, sb, eb) = image(true);
    assert_eq!(ea, eb);
    let start = data_offset(CHUNK) as usize;
    let layer1_end = start + 27 * 4096;
    assert!(a[start..layer1_end] == b[start..layer1_end]);
    // The second layer starts on the next chunk boundary.
    assert_eq!(sb.data_blocks_written, 25 + 2 + 74);
    for img in [a, b] {
        let (_dir, path, mut file) = new_image();
        io::Write::write_all(&mut file, &img).expect("write");
        e2fsck(&path);
    }
}

#[test]
fn file_over_4_gib_is_sparse_and_clean() {
    let (_dir, path, file) = new_image();
    let mut f = Fixture::new(file, CHUNK);
    let root = f.root();
    let size: u64 = (5 << 30) + 123;
    let data = noise(8192, 42);
    let mut extents = f.w.write_file(&mut &data[..], 8192).expect("write");
    // Place the two data blocks at the end of a 5 GiB file.
    extents[0].logical = size.div_ceil(4096) - 2;
    f.add(root, "huge", Kind::File { size, extents }, meta(0o644));
    let (_, stats, _, _) = f.finish();
    e2fsck(&path);
    let st = debugfs(&path, "stat /huge");
    assert!(st.contains(&format!("Size: {size}")), "{st}");
    assert!(st.contains("Blockcount: 16"), "{st}");
    assert!(stats.image_size < 64 << 20);
    if let Some(m) = Mount::new(&path) {
        let md = std::fs::metadata(m.path().join("huge")).expect("stat");
        assert_eq!(md.len(), size);
        let mut fh = File::open(m.path().join("huge")).expect("open");
        let mut tail = Vec::new();
        io::Seek::seek(
            &mut fh,
            io::SeekFrom::Start(size.div_ceil(4096) * 4096 - 8192),
        )
        .expect("seek");
        fh.read_to_end(&mut tail).expect("read");
        assert!(tail[..] == data[..tail.len()]);
    }
}

/// A reader that yields `good` bytes, then fails (or ends).
struct Failing {
    good: usize,
    fail: bool,
}

impl Read for Failing {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.good == 0 {
            return if self.fail {
                Err(io::Error::other("disk on fire"))
            } else {
                Ok(0)
            };
        }
        let n = buf.len().min(self.good).min(3000);
        buf[..n].fill(0xab);
        self.good -= n;
        Ok(n)
    }
}

#[test]
fn short_or_failing_data_is_an_error_and_leaves_a_usable_writer() {
    let (_dir, path, file) = new_image();
    let mut f = Fixture::new(file, CHUNK);
    let root = f.root();
    let short = f.w.write_file(
        &mut Failing {
            good: 3 << 20,
            fail: false,
        },
        4 << 20,
    );
    let err = short.expect_err("short data must fail");
    assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    assert!(err.to_string().contains("of 4194304 bytes"), "{err}");
    let failed = f.w.write_file(
        &mut Failing {
            good: 10_000,
            fail: true,
        },
        20_000,
    );
    assert_eq!(failed.expect_err("must fail").to_string(), "disk on fire");
    f.file(root, "after", b"still fine");
    let (_, stats, _, _) = f.finish();
    assert_eq!(stats.live_data_blocks, 1);
    assert!(stats.data_blocks_written > 768);
    e2fsck(&path);
    assert_eq!(debugfs_cat(&path, "/after"), b"still fine");
}

#[test]
fn invalid_trees_are_typed_errors() {
    // An xattr that fits nowhere.
    let mut f = Fixture::new(Vec::new(), CHUNK);
    let root = f.root();
    let mut m = meta(0o644);
    m.xattrs.insert(b"user.huge".to_vec(), vec![1; 5000]);
    f.file_meta(root, "x", b"", m);
    let err = f.w.finish(&f.tree).map(|_| ()).expect_err("too large");
    assert!(
        matches!(&err, Ext4Error::Xattr { path, source: XattrError::TooLarge { .. } } if path == "/x"),
        "{err}"
    );

    // Two files sharing data blocks.
    let mut f = Fixture::new(Vec::new(), CHUNK);
    let root = f.root();
    let a = f.file(root, "a", b"shared");
    let kind = f.tree.get(a).kind.clone();
    f.add(root, "b", kind, meta(0o644));
    let err = f.w.finish(&f.tree).map(|_| ()).expect_err("shared");
    assert!(
        matches!(&err, Ext4Error::SharedBlock { path, .. } if path == "/b"),
        "{err}"
    );

    // A directory with two names.
    let mut f = Fixture::new(Vec::new(), CHUNK);
    let root = f.root();
    let d = f.dir(root, "d");
    f.link(root, b"e", d);
    let err = f.w.finish(&f.tree).map(|_| ()).expect_err("dir twice");
    assert!(
        matches!(&err, Ext4Error::DirLinkedTwice { path } if path == "/e"),
        "{err}"
    );

    // Bad chunk size.
    let f = Fixture::new(Vec::new(), 5000);
    let err = f.w.finish(&f.tree).map(|_| ()).expect_err("chunk");
    assert!(matches!(err, Ext4Error::ChunkSize(5000)));

    // Extents that point outside the written data.
    let mut f = Fixture::new(Vec::new(), CHUNK);
    let root = f.root();
    let bogus = crate::tree::Extent {
        logical: 0,
        physical: 3,
        len: 1,
    };
    f.add(
        root,
        "bogus",
        Kind::File {
            size: 4096,
            extents: vec![bogus],
        },
        meta(0o644),
    );
    let err = f.w.finish(&f.tree).map(|_| ()).expect_err("extents");
    assert!(
        matches!(&err, Ext4Error::BadExtents { path, .. } if path == "/bogus"),
        "{err}"
    );
}

#[test]
fn image_mounts_read_write_and_stays_clean() {
    let (_dir, path, file) = new_image();
    let mut f = Fixture::new(file, CHUNK);
    let root = f.root();
    let d = f.dir(root, "etc");
    f.file(d, "passwd", b"root:x:0:0::/root:/bin/sh\n");
    f.file(root, "big", &noise(1 << 20, 8));
    f.finish();
    let Some(m) = Mount::with_options(&path, "loop") else {
        return;
    };
    let p = m.path();
    std::fs::write(p.join("etc/new"), noise(3 << 20, 9)).expect("write new file");
    std::fs::create_dir(p.join("newdir")).expect("mkdir");
    for i in 0..200 {
        std::fs::write(p.join(format!("newdir/f{i}")), b"x").expect("write");
    }
    std::fs::remove_file(p.join("big")).expect("unlink");
    std::fs::write(p.join("etc/passwd"), b"changed\n").expect("rewrite");
    drop(m);
    e2fsck(&path);
    assert_eq!(debugfs_cat(&path, "/etc/passwd"), b"changed\n");
}

/// Pins the bytes of a small fixed image: any change to the on-disk format
/// (and so to every image's chunks) must update this digest deliberately.
#[test]
fn golden_digest() {
    use sha2::{Digest, Sha256};
    let mut f = Fixture::new(Vec::new(), CHUNK);
    let root = f.root();
    let etc = f.dir(root, "etc");
    f.file(etc, "hostname", b"smr\n");
    f.file(root, "data", &noise(70_000, 7));
    f.add(
        root,
        "sh",
        Kind::Symlink {
            target: b"/bin/dash".to_vec(),
        },
        meta(0o777),
    );
    let mut m = meta(0o755);
    m.xattrs.insert(b"user.k".to_vec(), b"v".to_vec());
    f.file_meta(root, "x", b"#!", m);
    let (img, stats, _, _) = f.finish();
    assert_eq!(stats.image_size, img.len() as u64);
    let digest = hex::encode(Sha256::digest(&img));
    assert_eq!(
        digest,
        "7a6198987f5e105c5ccf4706adc3aa8ffccae78c9f6a3bff5096722578c815e8"
    );
}
