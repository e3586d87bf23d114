//! Warming a mounted image for its program's start: the dynamic loader's
//! first reads, made ahead of the container.
//!
//! A container's first reads are the loader's: the program's ELF header,
//! then each library it needs, one after another, each a miss and a round
//! trip on a lazy image without a profile. Between the mount and the
//! container's first read (containerd's pull and task creation, runc's
//! setup) the link is idle. [`warm_program`] reads, through the mounted
//! filesystem, the header and `DT_NEEDED` names of the program and of every
//! library it needs (the closure, as the loader resolves it: `RUNPATH`,
//! then the multiarch directories), the libraries of one level in parallel.
//! Each header read also has the image prefetch the file's writable
//! segment (see [`crate::lazy`]'s prefetch). Everything read stays in the
//! page cache for the loader.
//!
//! Paths are resolved inside the mount root: symbolic links, absolute or
//! relative, never leave it (an image's links are its own business).

use std::collections::{HashSet, VecDeque};
use std::ffi::OsString;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Component, Path, PathBuf};

/// Most files warmed for one program.
const MAX_FILES: usize = 64;
/// Most symbolic links followed resolving one path (as the kernel's 40).
const MAX_LINKS: usize = 40;
/// Bytes read for an ELF header and its program headers.
const HEAD: usize = 4096;
/// Largest dynamic segment read.
const MAX_DYNAMIC: u64 = 64 << 10;
/// Longest library name read.
const MAX_NAME: usize = 256;

/// What [`warm_program`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Warmed {
    /// The files read (the program first), as paths inside the root.
    pub files: Vec<PathBuf>,
}

/// `path` resolved inside `root` as if `root` were `/`: every symbolic
/// link followed and re-rooted, `..` stopping at the root. `None` if a
/// component is missing or there are more than 40 links (as the kernel).
pub fn resolve_in_root(root: &Path, path: &Path) -> Option<PathBuf> {
    let mut todo: VecDeque<OsString> = parts(path);
    let mut cur = PathBuf::new();
    let mut links = 0;
    while let Some(part) = todo.pop_front() {
        if part == ".." {
            cur.pop();
            continue;
        }
        let next = cur.join(&part);
        let meta = std::fs::symlink_metadata(root.join(&next)).ok()?;
        if !meta.file_type().is_symlink() {
            cur = next;
            continue;
        }
        links += 1;
        if links > MAX_LINKS {
            return None;
        }
        let target = std::fs::read_link(root.join(&next)).ok()?;
        if target.is_absolute() {
            cur = PathBuf::new();
        }
        let mut ahead = parts(&target);
        ahead.extend(todo.drain(..));
        todo = ahead;
    }
    Some(cur)
}

/// The normal and `..` components of `p`.
fn parts(p: &Path) -> VecDeque<OsString> {
    p.components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            Component::ParentDir => Some("..".into()),
            _ => None,
        })
        .collect()
}

/// `program` found in `root` as `execvp` would: itself if it has a `/`,
/// else in the directories of `path` (a `PATH` value), in order. The
/// regular file's path inside the root.
pub fn find_program(root: &Path, program: &str, path: &str) -> Option<PathBuf> {
    let is_file = |p: &PathBuf| root.join(p).is_file();
    if program.contains('/') {
        return resolve_in_root(root, Path::new(program)).filter(is_file);
    }
    path.split(':')
        .filter(|d| !d.is_empty())
        .find_map(|d| resolve_in_root(root, &Path::new(d).join(program)).filter(is_file))
}

/// Reads the loader's way through `program` and its libraries in the
/// image mounted at `root`, with `path` to find it. Best effort: what
/// cannot be read or parsed is skipped.
pub fn warm_program(root: &Path, program: &str, path: &str) -> Warmed {
    let mut out = Warmed::default();
    let Some(first) = find_program(root, program, path) else {
        return out;
    };
    let mut seen: HashSet<PathBuf> = HashSet::from([first.clone()]);
    let mut level = vec![first];
    while !level.is_empty() && out.files.len() < MAX_FILES {
        let found: Vec<Vec<PathBuf>> = std::thread::scope(|s| {
            let workers: Vec<_> = level
                .iter()
                .map(|f| s.spawn(move || libraries_of(root, f)))
                .collect();
            workers
                .into_iter()
                .map(|w| w.join().unwrap_or_default())
                .collect()
        });
        out.files.append(&mut level);
        for lib in found.into_iter().flatten() {
            if out.files.len() + level.len() < MAX_FILES && seen.insert(lib.clone()) {
                level.push(lib);
            }
        }
    }
    out
}

/// The libraries ELF file `file` (a path inside `root`) needs, resolved
/// inside `root`; reading its header and names is the warming.
fn libraries_of(root: &Path, file: &Path) -> Vec<PathBuf> {
    let Ok(f) = File::open(root.join(file)) else {
        return Vec::new();
    };
    let Some(dynamic) = read_dynamic(&f) else {
        return Vec::new();
    };
    let origin = file.parent().unwrap_or(Path::new(""));
    let mut dirs: Vec<PathBuf> = dynamic
        .runpath
        .iter()
        .flat_map(|r| r.split(':'))
        .filter(|d| !d.is_empty())
        .map(|d| PathBuf::from(d.replace("$ORIGIN", &format!("/{}", origin.display()))))
        .collect();
    let multiarch = format!("{}-linux-gnu", std::env::consts::ARCH);
    for d in ["/lib", "/usr/lib"] {
        dirs.push(Path::new(d).join(&multiarch));
    }
    dirs.extend(["/lib64", "/usr/lib64", "/lib", "/usr/lib"].map(PathBuf::from));
    dynamic
        .needed
        .iter()
        .filter_map(|name| {
            if name.contains('/') {
                return resolve_in_root(root, Path::new(name));
            }
            dirs.iter().find_map(|d| {
                resolve_in_root(root, &d.join(name)).filter(|p| root.join(p).is_file())
            })
        })
        .collect()
}

/// The names an ELF file's dynamic section gives.
#[derive(Debug, Default, PartialEq, Eq)]
struct Dynamic {
    /// `DT_NEEDED`.
    needed: Vec<String>,
    /// `DT_RUNPATH` or `DT_RPATH`.
    runpath: Vec<String>,
}

/// Reads `f`'s dynamic section and the names it lists. `None` for a file
/// that is not a 64-bit little-endian ELF file with one.
fn read_dynamic(f: &File) -> Option<Dynamic> {
    let mut head = vec![0u8; HEAD];
    let n = read_at_most(f, &mut head, 0)?;
    head.truncate(n);
    let phdrs = crate::elf::program_headers(&head);
    let dynseg = phdrs.iter().find(|p| p.kind == crate::elf::PT_DYNAMIC)?;
    let mut dynamic = vec![0u8; dynseg.filesz.min(MAX_DYNAMIC) as usize];
    let n = read_at_most(f, &mut dynamic, dynseg.offset)?;
    dynamic.truncate(n);
    let entries = crate::elf::dynamic_entries(&dynamic);
    let strtab = entries
        .iter()
        .find(|(tag, _)| *tag == crate::elf::DT_STRTAB)
        .and_then(|&(_, vaddr)| crate::elf::file_offset(&phdrs, vaddr))?;
    let name = |off: u64| -> Option<String> {
        let mut buf = vec![0u8; MAX_NAME];
        let n = read_at_most(f, &mut buf, strtab.checked_add(off)?)?;
        let end = buf[..n].iter().position(|&b| b == 0)?;
        String::from_utf8(buf[..end].to_vec()).ok()
    };
    let mut out = Dynamic::default();
    for &(tag, val) in &entries {
        match tag {
            crate::elf::DT_NEEDED => out.needed.extend(name(val)),
            crate::elf::DT_RUNPATH | crate::elf::DT_RPATH => out.runpath.extend(name(val)),
            _ => {}
        }
    }
    Some(out)
}

/// Reads into `buf` at `offset` until it is full or the file ends; the
/// bytes read, `None` on an error.
fn read_at_most(f: &File, buf: &mut [u8], offset: u64) -> Option<usize> {
    let mut got = 0;
    while got < buf.len() {
        match f.read_at(&mut buf[got..], offset + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
    Some(got)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn paths_resolve_inside_the_root() {
        let t = tempfile::tempdir().expect("tempdir");
        let r = t.path();
        std::fs::create_dir_all(r.join("usr/bin")).expect("mkdir");
        std::fs::write(r.join("usr/bin/python3.11"), b"x").expect("write");
        symlink("python3.11", r.join("usr/bin/python3")).expect("symlink");
        symlink("usr/bin", r.join("bin")).expect("symlink");
        // Absolute and escaping links stay inside.
        symlink("/usr/bin/python3", r.join("abs")).expect("symlink");
        symlink("../../../../usr/bin/python3", r.join("usr/bin/up")).expect("symlink");
        symlink("loop", r.join("loop")).expect("symlink");
        let want = Some(PathBuf::from("usr/bin/python3.11"));
        assert_eq!(resolve_in_root(r, Path::new("/bin/python3")), want);
        assert_eq!(resolve_in_root(r, Path::new("abs")), want);
        assert_eq!(resolve_in_root(r, Path::new("/usr/bin/up")), want);
        assert_eq!(resolve_in_root(r, Path::new("/../../bin/python3")), want);
        assert_eq!(resolve_in_root(r, Path::new("/loop")), None);
        assert_eq!(resolve_in_root(r, Path::new("/nothing")), None);
        assert_eq!(find_program(r, "python3", "/sbin:/bin"), want);
        assert_eq!(find_program(r, "/bin/python3", ""), want);
        assert_eq!(find_program(r, "bin", "/"), None, "a directory");
        assert_eq!(find_program(r, "python4", "/bin"), None);
    }

    /// The host's `/bin/sh` and the libraries it needs, copied into a root
    /// the way a Debian image lays them out.
    #[test]
    fn a_programs_library_closure_is_read() {
        let host = Path::new("/");
        let Some(sh) = find_program(host, "sh", "/usr/bin:/bin") else {
            return; // no shell on this machine
        };
        let t = tempfile::tempdir().expect("tempdir");
        let r = t.path();
        let copy = |p: &Path| {
            let to = r.join(p);
            std::fs::create_dir_all(to.parent().expect("parent")).expect("mkdir");
            std::fs::copy(host.join(p), to).expect("copy");
        };
        copy(&sh);
        let libs = libraries_of(host, &sh);
        assert!(
            libs.iter().any(|l| l.ends_with("libc.so.6")),
            "{sh:?} needs libc: {libs:?}"
        );
        for l in &libs {
            copy(l);
            for l2 in libraries_of(host, l) {
                copy(&l2);
            }
        }
        let name = sh.file_name().and_then(|n| n.to_str()).expect("name");
        let dir = format!("/{}", sh.parent().expect("dir").display());
        let w = warm_program(r, name, &dir);
        assert_eq!(w.files.first(), Some(&sh));
        for l in &libs {
            assert!(w.files.contains(l), "{l:?} not warmed: {w:?}");
        }
        // Not ELF, or missing: nothing beyond the program.
        std::fs::write(r.join("script"), b"#!/bin/sh\n").expect("write");
        assert_eq!(warm_program(r, "/script", "").files.len(), 1);
        assert!(warm_program(r, "/absent", "").files.is_empty());
    }
}
