//! Where `smr` writes: `extract -o` writes through what the path names, and
//! a closed standard output ends a command quietly.

use super::util::*;
use std::os::unix::fs::FileTypeExt;
use std::process::{Command, Stdio};

/// Runs `cmd` with standard output a pipe whose reader is already closed;
/// returns its exit code and standard error.
fn into_closed_pipe(cmd: &mut Command) -> (Option<i32>, String) {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = cmd.stdout(writer).stderr(Stdio::piped()).output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `smr inspect R | head -1` and `smr extract R -o - | head -c 1`: the
/// command ends with status 141 (as if killed by SIGPIPE) and says nothing.
#[test]
fn a_closed_stdout_ends_quietly() {
    let s = Synthetic::new();
    convert(&s.src, &s.store, &s.recipe, &s.key, &[]);
    let (code, err) = into_closed_pipe(smr().arg("inspect").arg(&s.recipe));
    assert_eq!(code, Some(141), "inspect: {err}");
    assert!(err.is_empty(), "inspect says nothing: {err}");
    let (code, err) = into_closed_pipe(
        smr()
            .arg("extract")
            .arg(&s.recipe)
            .arg("--store")
            .arg(&s.store)
            .arg("--key-file")
            .arg(&s.key)
            .args(["-o", "-"]),
    );
    assert_eq!(code, Some(141), "extract: {err}");
    assert!(!err.contains("panicked") && !err.contains("error"), "{err}");
}

/// A symlink is followed (the link stays, its target gets the image), `-`
/// and a FIFO receive the image as a stream, a character device is written
/// through; a block device, a directory and a dangling symlink are refused,
/// left as they were, and named in the error.
#[test]
fn extract_writes_through_what_the_path_names() {
    let s = Synthetic::new();
    let d = s.t.path();
    convert(&s.src, &s.store, &s.recipe, &s.key, &[]);
    extract(&s.recipe, &s.store, &s.key, &s.img);
    let want = std::fs::read(&s.img).unwrap();
    let extract_to = |out: &std::path::Path| {
        let mut c = smr();
        c.arg("extract")
            .arg(&s.recipe)
            .arg("--store")
            .arg(&s.store)
            .arg("--key-file")
            .arg(&s.key)
            .arg("-o")
            .arg(out);
        c
    };

    let target = d.join("target.img");
    std::fs::write(&target, b"old").unwrap();
    let link = d.join("link.img");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    ok(&mut extract_to(&link));
    assert!(link.symlink_metadata().unwrap().file_type().is_symlink());
    assert!(
        std::fs::read(&target).unwrap() == want,
        "the target holds the image"
    );

    let out = ok(&mut extract_to("-".as_ref()));
    assert!(out.stdout == want, "`-o -` writes the image to stdout");

    let fifo = d.join("fifo");
    ok(Command::new("mkfifo").arg(&fifo));
    let got = d.join("from-fifo");
    let mut cat = Command::new("sh")
        .arg("-c")
        .arg(format!("cat '{}' > '{}'", fifo.display(), got.display()))
        .spawn()
        .unwrap();
    let r = run(&mut extract_to(&fifo));
    if !r.status.success() {
        let _ = cat.kill();
        panic!("extract to a FIFO: {}", String::from_utf8_lossy(&r.stderr));
    }
    assert!(cat.wait().unwrap().success());
    assert!(
        std::fs::read(&got).unwrap() == want,
        "the FIFO's reader got the image"
    );
    assert!(fifo.symlink_metadata().unwrap().file_type().is_fifo());

    ok(&mut extract_to("/dev/null".as_ref()));
    assert!(std::fs::metadata("/dev/null")
        .unwrap()
        .file_type()
        .is_char_device());

    let blk = d.join("blk");
    ok(Command::new("mknod").arg(&blk).args(["b", "7", "250"]));
    let err = fails(&mut extract_to(&blk));
    assert!(err.contains("block device") && err.contains("blk"), "{err}");
    assert!(blk
        .symlink_metadata()
        .unwrap()
        .file_type()
        .is_block_device());

    let err = fails(&mut extract_to(d));
    assert!(err.contains("is a directory"), "{err}");

    let dangling = d.join("dangling.img");
    std::os::unix::fs::symlink(d.join("nowhere/x.img"), &dangling).unwrap();
    let err = fails(&mut extract_to(&dangling));
    assert!(
        err.contains("dangling.img") && err.contains("symlink"),
        "{err}"
    );
    assert!(!d.join("nowhere").exists());
    assert!(find_named(d, "smr-tmp").is_empty(), "no temp output left");
}
