//! The canonical synthetic image: every entry type and whiteout case.

use crate::image::{Compression, ImageBuilder};
use crate::layer::{Entry, EntryKind, LayerBuilder, LongNames, FIXED_MTIME};
use std::path::Path;

/// The tag of the canonical image in its OCI layout.
pub const SYNTHETIC_TAG: &str = "latest";

/// The `security.capability` value on `usr/bin/tool` (cap_net_bind_service+ep, v2).
pub const SYNTHETIC_CAPABILITY: &[u8] = &[
    0x00, 0x00, 0x00, 0x02, 0x00, 0x04, 0x00, 0x00, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
];

/// The path of the long (> 100 bytes) PAX name in layer 1.
pub fn synthetic_long_name() -> String {
    format!("long/{}/file", "d".repeat(120))
}

/// The target of the `long-link` symlink (> 100 bytes).
pub fn synthetic_long_target() -> String {
    format!("/{}", "t".repeat(150))
}

/// The path of the GNU long name in layer 1.
pub fn synthetic_gnu_long_name() -> String {
    format!("gnu/{}", "g".repeat(110))
}

/// The canonical synthetic image. Three layers, gzip / gzip / plain (not
/// zstd: the umoci the end-to-end tests compare with rejects zstd layers;
/// tests that want zstd change a layer's `compression`).
///
/// Resulting tree (after flattening):
/// - `etc/` 0750 (layer 2 dir entry updates layer 1's 0755, children kept):
///   `passwd` (0644), `passwd-link` (hard link, layer 2, to layer 1's
///   `etc/passwd`), `motd` = `second` (duplicate entry, last wins),
///   `localtime -> /usr/share/zoneinfo/UTC`; `etc/hostname` whited out.
/// - `usr/bin/tool` 0755 uid/gid 1000, xattrs `security.capability` and
///   `user.comment`; `usr/bin/tool-link` hard link to it (same layer);
///   `usr/bin/suid` whited out in layer 3; `bin -> usr/bin`.
/// - `dev/` implicit (0755, 0:0, mtime 0): `null` char 1:3, `sda` block 8:0;
///   `run/fifo` fifo (implicit `run/`).
/// - `opt/` kept, `opt/old/` whited out (dir whiteout).
/// - `data/` opaque in layer 2: only `c` (before the marker) and `d` (after).
/// - `srv/a/b/file` with implicit parents.
/// - `var/lib/target` = `v3` (layer 3); `var/lib/link` hard link made in
///   layer 2 to the `v1` inode, which it keeps.
/// - `replace/dir-to-file` a file (was a dir with a child);
///   `replace/file-to-dir/` a dir with `child` (was a file).
/// - the long PAX name [`synthetic_long_name`], the GNU long name
///   [`synthetic_gnu_long_name`], `long-link -> ` [`synthetic_long_target`].
/// - `frac` with PAX mtime 1700000000.5; `empty` (0 bytes);
///   `zeros` (8192 zero bytes then `tail`).
///
/// No entry types that `umoci unpack` rejects (e.g. `V` volume labels): the
/// end-to-end tests compare the result with umoci's.
pub fn synthetic_image() -> ImageBuilder {
    let mut l1 = LayerBuilder::new();
    l1.dir("etc/", 0o755)
        .file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n", 0o644)
        .file("etc/hostname", b"synthetic\n", 0o644)
        .symlink("etc/localtime", "/usr/share/zoneinfo/UTC")
        .dir("usr/", 0o755)
        .dir("usr/bin/", 0o755)
        .entry(
            Entry::new(
                "usr/bin/tool",
                EntryKind::File(b"#!/bin/sh\necho tool\n".to_vec()),
            )
            .mode(0o755)
            .owner(1000, 1000)
            .xattr("security.capability", SYNTHETIC_CAPABILITY)
            .xattr("user.comment", b"hello"),
        )
        .file("usr/bin/suid", b"suid", 0o4755)
        .hardlink("usr/bin/tool-link", "usr/bin/tool")
        .symlink("bin", "usr/bin")
        .char_dev("dev/null", 1, 3)
        .block_dev("dev/sda", 8, 0)
        .fifo("run/fifo")
        .dir("opt/", 0o755)
        .dir("opt/old/", 0o755)
        .file("opt/old/file", b"old", 0o644)
        .dir("data/", 0o755)
        .file("data/a", b"a", 0o644)
        .file("data/b", b"b", 0o644)
        .file("var/lib/target", b"v1", 0o644)
        .dir("replace/dir-to-file/", 0o755)
        .file("replace/dir-to-file/child", b"child", 0o644)
        .file("replace/file-to-dir", b"file", 0o644)
        .file(&synthetic_long_name(), b"long", 0o644)
        .symlink("long-link", &synthetic_long_target())
        .entry({
            let mut e = Entry::new("frac", EntryKind::File(b"frac".to_vec()));
            e.pax.push(("mtime".into(), b"1700000000.5".to_vec()));
            e
        })
        .file("empty", b"", 0o644)
        .file(
            "zeros",
            &[vec![0u8; 8192], b"tail".to_vec()].concat(),
            0o644,
        )
        .long_names(LongNames::Gnu)
        .file(&synthetic_gnu_long_name(), b"gnu", 0o644);

    let mut l2 = LayerBuilder::new();
    l2.dir("etc/", 0o750)
        .whiteout("etc/hostname")
        .whiteout("opt/old")
        .whiteout("does/not/exist")
        .whiteout("etc/nonexistent")
        .file("data/c", b"c", 0o644)
        .opaque("data")
        .file("data/d", b"d", 0o644)
        .file("etc/motd", b"first", 0o644)
        .file("etc/motd", b"second", 0o644)
        .file("srv/a/b/file", b"deep", 0o644)
        .hardlink("etc/passwd-link", "etc/passwd")
        .hardlink("var/lib/link", "var/lib/target")
        .file("replace/dir-to-file", b"now a file", 0o644)
        .dir("replace/file-to-dir/", 0o755)
        .file("replace/file-to-dir/child", b"child", 0o644);

    let mut l3 = LayerBuilder::new();
    l3.add_file("var/lib/target", b"v3", 0o644, 0, 0, FIXED_MTIME + 3)
        .whiteout("usr/bin/suid");

    let mut img = ImageBuilder::new();
    img.layer(l1.into_bytes(), Compression::Gzip)
        .layer(l2.into_bytes(), Compression::Gzip)
        .layer(l3.into_bytes(), Compression::None);
    img.entrypoint = vec!["/usr/bin/tool".into()];
    img.cmd = vec!["--help".into()];
    img.working_dir = "/srv".into();
    img.user = "1000:1000".into();
    img.labels
        .insert("org.example.synthetic".into(), "true".into());
    img
}

/// Writes the canonical synthetic image as an OCI layout in `dir`, tagged
/// [`SYNTHETIC_TAG`]; returns the source reference `oci:DIR:latest`.
/// Byte-deterministic: the same bytes on every run and machine.
pub fn synthetic_everything(dir: &Path) -> std::io::Result<String> {
    synthetic_image().write_oci_layout(dir, Some(SYNTHETIC_TAG))?;
    Ok(format!("oci:{}:{SYNTHETIC_TAG}", dir.display()))
}
