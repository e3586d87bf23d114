#!/usr/bin/env python3
"""Self-test of scripts/treecmp.py: equal copies compare equal, and each kind
of single change is reported (exit 1, with the expected message).

Run as root (device nodes, chown, trusted.* xattrs); as a normal user the
cases that need root are skipped with a note.
Usage: scripts/treecmp_selftest.py
"""

import os
import shutil
import stat
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
TREECMP = os.path.join(HERE, "treecmp.py")
ROOT = os.geteuid() == 0
MTIME = 1_600_000_000_123_456_789


def make_tree(d):
    os.makedirs(os.path.join(d, "sub/deeper"))
    os.makedirs(os.path.join(d, "lost+found"))
    with open(os.path.join(d, "file"), "wb") as f:
        f.write(b"hello\n")
    with open(os.path.join(d, "sub/big"), "wb") as f:
        f.write(os.urandom(3 << 20))
    with open(os.path.join(d, "lost+found/junk"), "wb") as f:
        f.write(b"x")
    open(os.path.join(d, "sub/empty"), "wb").close()
    os.link(os.path.join(d, "file"), os.path.join(d, "sub/hardlink"))
    with open(os.path.join(d, "sub/solo"), "wb") as f:
        f.write(b"hello\n")  # same content as "file", but not linked
    os.symlink("../file", os.path.join(d, "sub/link"))
    os.symlink("/nonexistent", os.path.join(d, "dangling"))
    os.mkfifo(os.path.join(d, "fifo"))
    with open(os.path.join(d, "suid"), "wb") as f:
        f.write(b"#!/bin/sh\n")
    os.chmod(os.path.join(d, "suid"), 0o4755)
    os.makedirs(os.path.join(d, "tmp"))
    os.chmod(os.path.join(d, "tmp"), 0o1777)
    os.setxattr(os.path.join(d, "file"), "user.test", b"v1")
    if ROOT:
        os.mknod(os.path.join(d, "null"), 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        os.mknod(os.path.join(d, "loop"), 0o660 | stat.S_IFBLK, os.makedev(7, 0))
        os.chown(os.path.join(d, "sub/deeper"), 1000, 1000)
        os.setxattr(os.path.join(d, "sub/big"), "trusted.smr", b"\x00\x01")
        os.setxattr(os.path.join(d, "sub/empty"), "security.capability",
                    bytes.fromhex("0100000200200000000000000000000000000000"))
    for dirpath, dirnames, filenames in os.walk(d, topdown=False):
        for n in filenames + dirnames:
            os.utime(os.path.join(dirpath, n), ns=(MTIME, MTIME), follow_symlinks=False)
    os.utime(d, ns=(MTIME, MTIME))


def run(a, b, *extra):
    p = subprocess.run([sys.executable, TREECMP, a, b, *extra],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return p.returncode, p.stdout


def keep_parent_mtime(path):
    """Undo the parent directory mtime bump of a structural change."""
    os.utime(os.path.dirname(path), ns=(MTIME, MTIME))


def main():
    failures = []
    work = tempfile.mkdtemp(prefix="treecmp-selftest.")
    try:
        a = os.path.join(work, "a")
        os.mkdir(a)
        make_tree(a)

        def fresh(name="b"):
            b = os.path.join(work, name)
            if os.path.exists(b):
                shutil.rmtree(b)
            subprocess.run(["cp", "-a", a, b], check=True)
            return b

        def expect(label, rc_want, out_want, *extra, b=None):
            rc, out = run(a, b, *extra)
            ok = rc == rc_want and all(w in out for w in out_want)
            print("%-34s %s" % (label, "ok" if ok else "FAIL"))
            if not ok:
                failures.append(label)
                print("  exit %d, output:\n  %s" % (rc, out.replace("\n", "\n  ")))

        b = fresh()
        expect("identical copy", 0, ["equal"], b=b)
        expect("identical copy, ns mtimes", 0, ["equal"], "--ns", b=b)

        cases = []

        def case(label, change, want, *extra, root_only=False):
            cases.append((label, change, want, extra, root_only))

        def p(b, rel):
            return os.path.join(b, rel)

        def write(b, rel, data):
            with open(p(b, rel), "r+b") as f:
                f.write(data)
            os.utime(p(b, rel), ns=(MTIME, MTIME))

        case("content, same size", lambda b: write(b, "sub/big", b"\xff"),
             ["sub/big: content: sha256"])
        case("size", lambda b: (os.truncate(p(b, "sub/solo"), 1),
                                os.utime(p(b, "sub/solo"), ns=(MTIME, MTIME))),
             ["sub/solo: size: 6 != 1"])
        case("mode", lambda b: os.chmod(p(b, "file"), 0o600), ["file: mode: 0644 != 0600"])
        case("setuid bit", lambda b: os.chmod(p(b, "suid"), 0o755), ["suid: mode: 4755 != 0755"])
        case("sticky bit", lambda b: os.chmod(p(b, "tmp"), 0o777), ["tmp: mode: 1777 != 0777"])
        case("mtime seconds", lambda b: os.utime(p(b, "file"), ns=(MTIME, MTIME + 2 * 10**9)),
             ["file: mtime: 1600000000 != 1600000002"])
        case("mtime ns only, default", lambda b: os.utime(p(b, "file"), ns=(MTIME, MTIME + 1)),
             ["equal"])
        case("mtime ns only, --ns", lambda b: os.utime(p(b, "file"), ns=(MTIME, MTIME + 1)),
             ["file: mtime: 1600000000.123456789 != 1600000000.123456790"], "--ns")
        case("mtime ignored", lambda b: os.utime(p(b, "file"), ns=(MTIME, 0)),
             ["equal"], "--mtime", "none")

        def retarget(b):
            os.unlink(p(b, "sub/link"))
            os.symlink("../other", p(b, "sub/link"))
            os.utime(p(b, "sub/link"), ns=(MTIME, MTIME), follow_symlinks=False)
            keep_parent_mtime(p(b, "sub/link"))
        case("symlink target", retarget, ["sub/link: symlink target: '../file' != '../other'"])

        def remove(b):
            os.unlink(p(b, "fifo"))
            keep_parent_mtime(p(b, "fifo"))
        case("missing in B", remove, ["fifo: only in A (fifo)"])

        def add(b):
            open(p(b, "sub/deeper/new"), "wb").close()
            keep_parent_mtime(p(b, "sub/deeper/new"))
            os.utime(p(b, "sub/deeper"), ns=(MTIME, MTIME))
        case("extra in B", add, ["sub/deeper/new: only in B (file)"])

        def retype(b):
            os.unlink(p(b, "fifo"))
            os.mkdir(p(b, "fifo"))
            os.utime(p(b, "fifo"), ns=(MTIME, MTIME))
            keep_parent_mtime(p(b, "fifo"))
        case("type", retype, ["fifo: type: fifo != dir"])

        case("xattr value", lambda b: os.setxattr(p(b, "file"), "user.test", b"v2"),
             ["file: xattr user.test: b'v1' != b'v2'"])
        case("xattr added", lambda b: os.setxattr(p(b, "sub/solo"), "user.new", b""),
             ["sub/solo: xattr user.new: only in B"])
        case("xattr removed", lambda b: os.removexattr(p(b, "file"), "user.test"),
             ["file: xattr user.test: only in A"])
        case("xattr excluded", lambda b: os.removexattr(p(b, "file"), "user.test"),
             ["equal"], "--xattr-exclude", "user.*")

        def unlink_hard(b):
            # Replace the hard link by an identical, separate file.
            os.unlink(p(b, "sub/hardlink"))
            shutil.copy2(p(b, "file"), p(b, "sub/hardlink"))
            keep_parent_mtime(p(b, "sub/hardlink"))
        case("hard link broken", unlink_hard, ["hard links: A groups ['file', 'sub/hardlink'], B groups"])

        def link_extra(b):
            os.unlink(p(b, "sub/solo"))
            os.link(p(b, "file"), p(b, "sub/solo"))
            keep_parent_mtime(p(b, "sub/solo"))
        case("hard link added", link_extra, ["hard links:", "'sub/solo'"])

        def ignore_lf(b):
            with open(p(b, "lost+found/junk"), "wb") as f:
                f.write(b"different")
            os.mkdir(p(b, "lost+found/x"))
        case("--ignore lost+found", ignore_lf, ["equal"], "--ignore", "lost+found")
        case("lost+found not ignored", ignore_lf, ["lost+found/junk: size", "lost+found/x: only in B"])

        case("owner", lambda b: os.lchown(p(b, "sub/deeper"), 1000, 1001),
             ["sub/deeper: owner: 1000:1000 != 1000:1001"], root_only=True)

        def redev(b):
            os.unlink(p(b, "null"))
            os.mknod(p(b, "null"), 0o666 | stat.S_IFCHR, os.makedev(1, 5))
            os.utime(p(b, "null"), ns=(MTIME, MTIME))
            keep_parent_mtime(p(b, "null"))
        case("device number", redev, ["null: device: 1,3 != 1,5"], root_only=True)
        case("trusted xattr", lambda b: os.setxattr(p(b, "sub/big"), "trusted.smr", b"\x00\x02"),
             ["sub/big: xattr trusted.smr"], root_only=True)
        case("capability xattr", lambda b: os.removexattr(p(b, "sub/empty"), "security.capability"),
             ["sub/empty: xattr security.capability: only in A"], root_only=True)

        for label, change, want, extra, root_only in cases:
            if root_only and not ROOT:
                print("%-34s skipped (needs root)" % label)
                continue
            b = fresh()
            change(b)
            if want == ["equal"]:
                expect(label, 0, want, *extra, b=b)
            else:
                expect(label, 1, want, *extra, b=b)

        # Many differences: output is capped, the summary counts all.
        b = fresh()
        for i in range(60):
            open(p(b, "sub/deeper/extra%02d" % i), "wb").close()
        rc, out = run(a, b, "--mtime", "none")
        ok = rc == 1 and "... and 10 more" in out and "60 difference(s)" in out
        print("%-34s %s" % ("output capped at 50", "ok" if ok else "FAIL"))
        if not ok:
            failures.append("cap")
            print(out)

        rc, out = run(a, os.path.join(work, "nonexistent"))
        ok = rc == 2
        print("%-34s %s" % ("missing tree -> exit 2", "ok" if ok else "FAIL"))
        if not ok:
            failures.append("exit 2")
    finally:
        shutil.rmtree(work)

    if failures:
        print("treecmp self-test: %d FAILED: %s" % (len(failures), ", ".join(failures)))
        return 1
    print("treecmp self-test: all passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
