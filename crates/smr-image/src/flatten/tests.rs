//! Flatten tests on good input: the canonical synthetic image end to end,
//! docker archives, and focused layer cases.

use super::*;
use crate::source::{open_source, Platform};
use crate::test_support::{at, lookup, names, MemSink};
use crate::tree::{Inode, Kind};
use smr_testkit::{
    synthetic_everything, synthetic_gnu_long_name, synthetic_image, synthetic_long_name,
    synthetic_long_target, write_docker_archive, Compression, DockerArchiveStyle, Entry, EntryKind,
    LayerBuilder, FIXED_MTIME, SYNTHETIC_CAPABILITY,
};

/// Applies raw layer tars in order (digests `layerN`).
pub(super) fn apply_all(layers: &[Vec<u8>]) -> Result<(Tree, MemSink), FlattenError> {
    let mut tree = Tree::new();
    let mut sink = MemSink::default();
    for (i, l) in layers.iter().enumerate() {
        apply_layer(&mut tree, l.as_slice(), &format!("layer{i}"), &mut sink)?;
    }
    Ok((tree, sink))
}

fn data(sink: &MemSink, tree: &Tree, path: &str) -> Vec<u8> {
    sink.contents(at(tree, path))
}

fn flatten_ref(reference: &str) -> (Tree, MemSink, FlattenStats, Vec<Progress>) {
    let src = open_source(reference).expect("open");
    let image = src.resolve(&Platform::default()).expect("resolve");
    let mut sink = MemSink::default();
    let mut progress = Vec::new();
    let (tree, stats) =
        flatten(src.as_ref(), &image, &mut sink, &mut |p| progress.push(p)).expect("flatten");
    (tree, sink, stats, progress)
}

/// Checks the tree documented on `smr_testkit::synthetic_image`.
fn check_synthetic(tree: &Tree, sink: &MemSink) {
    let root = names(tree, "");
    let want = [
        "bin",
        "data",
        "dev",
        "empty",
        "etc",
        "frac",
        "gnu",
        "long",
        "long-link",
        "opt",
        "replace",
        "run",
        "srv",
        "usr",
        "var",
        "zeros",
    ];
    assert_eq!(root, want);
    // etc: metadata updated by layer 2, children kept, whiteouts applied.
    assert_eq!(at(tree, "etc").meta.mode, 0o750);
    assert_eq!(
        names(tree, "etc"),
        ["localtime", "motd", "passwd", "passwd-link"]
    );
    assert_eq!(data(sink, tree, "etc/motd"), b"second");
    assert_eq!(lookup(tree, "etc/passwd"), lookup(tree, "etc/passwd-link"));
    assert_eq!(
        at(tree, "etc/localtime").kind,
        Kind::Symlink {
            target: b"/usr/share/zoneinfo/UTC".to_vec()
        }
    );
    // usr/bin: xattrs, owner, same-layer hard link, whiteout in layer 3.
    let tool = at(tree, "usr/bin/tool");
    assert_eq!(
        (tool.meta.mode, tool.meta.uid, tool.meta.gid),
        (0o755, 1000, 1000)
    );
    assert_eq!(
        tool.meta
            .xattrs
            .get(b"security.capability".as_slice())
            .map(Vec::as_slice),
        Some(SYNTHETIC_CAPABILITY)
    );
    assert_eq!(
        tool.meta
            .xattrs
            .get(b"user.comment".as_slice())
            .map(Vec::as_slice),
        Some(&b"hello"[..])
    );
    assert_eq!(
        lookup(tree, "usr/bin/tool"),
        lookup(tree, "usr/bin/tool-link")
    );
    assert_eq!(names(tree, "usr/bin"), ["tool", "tool-link"]);
    assert_eq!(
        at(tree, "bin").kind,
        Kind::Symlink {
            target: b"usr/bin".to_vec()
        }
    );
    // Devices, fifo, implicit parents.
    assert_eq!(
        at(tree, "dev/null").kind,
        Kind::CharDev { major: 1, minor: 3 }
    );
    assert_eq!(
        at(tree, "dev/sda").kind,
        Kind::BlockDev { major: 8, minor: 0 }
    );
    assert_eq!(at(tree, "run/fifo").kind, Kind::Fifo);
    for implicit in [
        "dev", "run", "srv", "srv/a", "srv/a/b", "var", "var/lib", "long",
    ] {
        let m = &at(tree, implicit).meta;
        assert_eq!(
            (m.mode, m.uid, m.gid, m.mtime),
            (0o755, 0, 0, 0),
            "{implicit}"
        );
    }
    assert_eq!(data(sink, tree, "srv/a/b/file"), b"deep");
    // Whiteouts: dir whiteout, opaque with same-layer siblings.
    assert!(names(tree, "opt").is_empty());
    assert_eq!(names(tree, "data"), ["c", "d"]);
    // Hard link to a file later replaced keeps the old inode.
    assert_eq!(data(sink, tree, "var/lib/target"), b"v3");
    assert_eq!(data(sink, tree, "var/lib/link"), b"v1");
    // Replacements.
    assert_eq!(data(sink, tree, "replace/dir-to-file"), b"now a file");
    assert_eq!(names(tree, "replace/file-to-dir"), ["child"]);
    // Long names.
    assert_eq!(data(sink, tree, &synthetic_long_name()), b"long");
    assert_eq!(data(sink, tree, &synthetic_gnu_long_name()), b"gnu");
    assert_eq!(
        at(tree, "long-link").kind,
        Kind::Symlink {
            target: synthetic_long_target().into_bytes()
        }
    );
    // Times and sizes.
    let frac = &at(tree, "frac").meta;
    assert_eq!((frac.mtime, frac.mtime_nsec), (1_700_000_000, 500_000_000));
    assert_eq!(at(tree, "etc/passwd").meta.mtime, FIXED_MTIME as i64);
    assert_eq!(
        at(tree, "empty").kind,
        Kind::File {
            size: 0,
            extents: vec![]
        }
    );
    let zeros = data(sink, tree, "zeros");
    assert_eq!(zeros.len(), 8196);
    assert!(zeros[..8192].iter().all(|b| *b == 0));
}

#[test]
fn synthetic_oci_layout_end_to_end() {
    let d = tempfile::tempdir().expect("tempdir");
    let reference = synthetic_everything(d.path()).expect("write");
    let (tree, sink, stats, progress) = flatten_ref(&reference);
    check_synthetic(&tree, &sink);
    assert_eq!(stats.layers, 3);
    assert_eq!(stats.skipped, 0);
    assert_eq!(sink.layers, 3);
    let done: Vec<usize> = progress
        .iter()
        .filter(|p| p.layer_done)
        .map(|p| p.layer_index)
        .collect();
    assert_eq!(done, [0, 1, 2]);
    let last = progress.last().expect("progress");
    assert_eq!(last.layer_count, 3);
    assert_eq!(last.compressed_bytes, last.compressed_size);
    // Deterministic: a second run yields the same tree.
    let (tree2, _, stats2, _) = flatten_ref(&reference);
    assert_eq!(tree, tree2);
    assert_eq!(stats, stats2);
}

#[test]
fn synthetic_with_zstd_and_plain_layers_gives_the_same_tree() {
    let d = tempfile::tempdir().expect("tempdir");
    let (want, _, _, _) = flatten_ref(&synthetic_everything(&d.path().join("a")).expect("w"));
    let mut img = synthetic_image();
    img.layers[0].compression = Compression::Zstd;
    img.layers[1].compression = Compression::None;
    img.layers[2].compression = Compression::Zstd;
    img.write_oci_layout(&d.path().join("b"), None)
        .expect("write");
    let (tree, sink, _, _) = flatten_ref(&format!("oci:{}", d.path().join("b").display()));
    check_synthetic(&tree, &sink);
    assert_eq!(tree, want);
}

#[test]
fn synthetic_docker_archive_matches_oci() {
    let d = tempfile::tempdir().expect("tempdir");
    let (oci_tree, _, _, _) = flatten_ref(&synthetic_everything(&d.path().join("oci")).expect("w"));
    let img = synthetic_image();
    for style in [DockerArchiveStyle::Legacy, DockerArchiveStyle::Blobs] {
        let path = d.path().join(format!("{style:?}.tar"));
        write_docker_archive(&path, &[(&img, &["synthetic:latest"])], style).expect("write");
        // Compressed and plain layers: exercises magic-byte detection.
        let (tree, sink, stats, _) = flatten_ref(&format!("docker-archive:{}", path.display()));
        check_synthetic(&tree, &sink);
        assert_eq!(stats.layers, 3);
        assert_eq!(tree, oci_tree, "{style:?}");
    }
}

#[test]
fn opaque_marker_keeps_same_layer_entries_in_any_order() {
    let mut l1 = LayerBuilder::new();
    l1.file("d/old", b"o", 0o644)
        .file("d/sub/old", b"o", 0o644)
        .file("d/keep-dir/x", b"x", 0o644);
    let mut l2 = LayerBuilder::new();
    l2.file("d/before", b"b", 0o644)
        .dir("d/sub/", 0o700)
        .file("d/keep-dir/new", b"n", 0o644)
        .opaque("d/")
        .file("d/after", b"a", 0o644);
    let (tree, _) = apply_all(&[l1.into_bytes(), l2.into_bytes()]).expect("apply");
    assert_eq!(names(&tree, "d"), ["after", "before", "keep-dir", "sub"]);
    // Lower content below same-layer directories is gone too.
    assert!(names(&tree, "d/sub").is_empty());
    assert_eq!(at(&tree, "d/sub").meta.mode, 0o700);
    assert_eq!(names(&tree, "d/keep-dir"), ["new"]);
}

#[test]
fn whiteout_spares_same_layer_entry_and_ignores_missing() {
    let mut l1 = LayerBuilder::new();
    l1.file("a", b"1", 0o644).file("b", b"1", 0o644);
    let mut l2 = LayerBuilder::new();
    l2.file("a", b"2", 0o644)
        .whiteout("a")
        .whiteout("b")
        .whiteout("nope")
        .whiteout("no/such/dir");
    let (tree, sink) = apply_all(&[l1.into_bytes(), l2.into_bytes()]).expect("apply");
    assert_eq!(names(&tree, ""), ["a"]);
    assert_eq!(data(&sink, &tree, "a"), b"2");
}

#[test]
fn duplicate_entries_last_wins() {
    let mut l = LayerBuilder::new();
    l.file("x", b"first", 0o600)
        .file("x", b"second", 0o644)
        .dir("d/", 0o700)
        .file("d/child", b"c", 0o644)
        .dir("d/", 0o755)
        .file("f", b"file", 0o644)
        .symlink("f", "x");
    let (tree, sink) = apply_all(&[l.into_bytes()]).expect("apply");
    assert_eq!(data(&sink, &tree, "x"), b"second");
    assert_eq!(at(&tree, "x").meta.mode, 0o644);
    assert_eq!(at(&tree, "d").meta.mode, 0o755);
    assert_eq!(names(&tree, "d"), ["child"]);
    assert_eq!(
        at(&tree, "f").kind,
        Kind::Symlink {
            target: b"x".to_vec()
        }
    );
}

#[test]
fn absolute_and_dot_paths_are_relative_to_root() {
    let mut l = LayerBuilder::new();
    l.file("/etc/x", b"abs", 0o644)
        .file("./etc/./y", b"dot", 0o644)
        .dir("./", 0o700);
    let (tree, sink) = apply_all(&[l.into_bytes()]).expect("apply");
    assert_eq!(data(&sink, &tree, "etc/x"), b"abs");
    assert_eq!(data(&sink, &tree, "etc/y"), b"dot");
    assert_eq!(tree.get(tree.root).meta.mode, 0o700, "./ updates the root");
}

#[test]
fn pax_owner_and_base256_owner() {
    let mut l = LayerBuilder::new();
    let mut pax_uid = Entry::new("pax", EntryKind::File(b"p".to_vec()));
    pax_uid.pax.push(("uid".into(), b"3000000000".to_vec()));
    pax_uid.pax.push(("gid".into(), b"70000".to_vec()));
    l.entry(pax_uid);
    // 2^31 does not fit the 7-digit octal field: the tar crate writes base-256.
    l.entry(Entry::new("b256", EntryKind::File(b"b".to_vec())).owner(1 << 31, 5));
    let (tree, _) = apply_all(&[l.into_bytes()]).expect("apply");
    let m = &at(&tree, "pax").meta;
    assert_eq!((m.uid, m.gid), (3_000_000_000, 70000));
    let m = &at(&tree, "b256").meta;
    assert_eq!((m.uid, m.gid), (1 << 31, 5));
}

#[test]
fn libarchive_xattrs_and_negative_fractional_mtime() {
    let mut e = Entry::new("f", EntryKind::File(b"x".to_vec()));
    e.pax
        .push(("LIBARCHIVE.xattr.user.a%3Db".into(), b"aGVsbG8=".to_vec()));
    e.pax
        .push(("LIBARCHIVE.xattr.user.both".into(), b"bGli".to_vec()));
    e.pax
        .push(("SCHILY.xattr.user.both".into(), b"schily".to_vec()));
    e.pax.push(("mtime".into(), b"-1.25".to_vec()));
    let mut l = LayerBuilder::new();
    l.entry(e);
    let (tree, _) = apply_all(&[l.into_bytes()]).expect("apply");
    let m = &at(&tree, "f").meta;
    assert_eq!(
        m.xattrs.get(b"user.a=b".as_slice()).map(Vec::as_slice),
        Some(&b"hello"[..])
    );
    assert_eq!(
        m.xattrs.get(b"user.both".as_slice()).map(Vec::as_slice),
        Some(&b"schily"[..])
    );
    assert_eq!((m.mtime, m.mtime_nsec), (-2, 750_000_000));
}

#[test]
fn setuid_sticky_kept_and_type_bits_dropped() {
    let mut l = LayerBuilder::new();
    l.entry(Entry::new("s", EntryKind::File(vec![])).mode(0o104755))
        .dir("tmp/", 0o41777);
    let (tree, _) = apply_all(&[l.into_bytes()]).expect("apply");
    assert_eq!(at(&tree, "s").meta.mode, 0o4755);
    assert_eq!(at(&tree, "tmp").meta.mode, 0o1777);
}

#[test]
fn hard_link_across_layers_survives_target_replacement() {
    let mut l1 = LayerBuilder::new();
    l1.file("a", b"old", 0o644);
    let mut l2 = LayerBuilder::new();
    l2.hardlink("b", "a")
        .file("a", b"new", 0o644)
        .hardlink("c", "./a");
    let (tree, sink) = apply_all(&[l1.into_bytes(), l2.into_bytes()]).expect("apply");
    assert_eq!(data(&sink, &tree, "b"), b"old");
    assert_eq!(data(&sink, &tree, "a"), b"new");
    assert_eq!(lookup(&tree, "a"), lookup(&tree, "c"));
}

#[test]
fn unknown_entry_types_are_skipped() {
    let mut l = LayerBuilder::new();
    l.entry(Entry::new("label", EntryKind::Other(b'V', vec![])))
        .entry(Entry::new(
            "contig",
            EntryKind::Other(b'7', b"contiguous".to_vec()),
        ))
        .entry(Entry::new("weird", EntryKind::Other(b'Z', b"zzz".to_vec())));
    let mut tree = Tree::new();
    let mut sink = MemSink::default();
    let stats = apply_layer(&mut tree, l.into_bytes().as_slice(), "l", &mut sink).expect("apply");
    assert_eq!(stats.skipped, 2);
    assert_eq!(stats.entries, 3);
    assert_eq!(names(&tree, ""), ["contig"]);
    assert_eq!(data(&sink, &tree, "contig"), b"contiguous");
}

#[test]
fn gnu_sparse_file_is_expanded() {
    // Real size 12 KiB: a hole, then one 4 KiB data block at 8 KiB. uid,
    // gid and mtime are left empty (NUL): they read as 0.
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::GNUSparse);
    h.set_path("sparse").expect("path");
    h.set_mode(0o644);
    h.set_size(4096);
    let gnu = h.as_gnu_mut().expect("gnu");
    gnu.sparse[0].set_offset(8192);
    gnu.sparse[0].set_length(4096);
    gnu.set_real_size(12288);
    h.set_cksum();
    let mut l = LayerBuilder::new();
    l.raw_header(&h, &[7u8; 4096]);
    let (tree, sink) = apply_all(&[l.into_bytes()]).expect("apply");
    let Inode {
        kind: Kind::File { size, .. },
        ..
    } = at(&tree, "sparse")
    else {
        panic!("not a file");
    };
    assert_eq!(*size, 12288);
    let d = data(&sink, &tree, "sparse");
    assert!(d[..8192].iter().all(|b| *b == 0));
    assert!(d[8192..].iter().all(|b| *b == 7));
}

/// A sink that only counts (for multi-GiB files).
struct CountSink(u64);

impl DataSink for CountSink {
    fn start_layer(&mut self) -> std::io::Result<()> {
        Ok(())
    }
    fn write_file(
        &mut self,
        data: &mut dyn Read,
        size: u64,
    ) -> std::io::Result<Vec<crate::tree::Extent>> {
        self.0 += std::io::copy(&mut data.take(size), &mut std::io::sink())?;
        Ok(Vec::new())
    }
}

#[test]
fn file_larger_than_4_gib() {
    let size = (4u64 << 30) + 1;
    let mut h = tar::Header::new_ustar();
    h.set_path("big").expect("path");
    h.set_size(size);
    h.set_mode(0o644);
    h.set_cksum();
    let pad = (512 - size % 512) % 512;
    let stream = std::io::Read::chain(
        std::io::Read::chain(h.as_bytes().as_slice(), std::io::repeat(1).take(size)),
        std::io::repeat(0).take(pad + 1024),
    );
    let mut tree = Tree::new();
    let mut sink = CountSink(0);
    apply_layer(&mut tree, stream, "big", &mut sink).expect("apply");
    assert_eq!(sink.0, size);
    assert!(matches!(at(&tree, "big").kind, Kind::File { size: s, .. } if s == size));
}
