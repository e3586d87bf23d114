#!/usr/bin/env python3
"""Compare two directory trees in full detail.

Typical use: an ext4 image written by smr, loop-mounted read-only, against
`umoci unpack` of the same OCI image:

    scripts/treecmp.py /mnt/img /tmp/bundle/rootfs --ignore lost+found

Compared for every path (relative to each root, the roots included):
  - presence on both sides and file type
  - permission bits including setuid/setgid/sticky (not for symlinks)
  - uid and gid
  - size and SHA-256 of regular files
  - symlink targets
  - device numbers of character and block devices
  - all extended attributes (not following symlinks)
  - hard link groups: paths sharing an inode in A must share one in B, with
    exactly the same members, and vice versa
  - mtime in whole seconds (default), nanoseconds (--mtime ns), or not at
    all (--mtime none)
Not compared: atime, ctime, directory sizes, link counts of directories.

Prints each difference (the first --max, default 50), then a summary line.
Exit status: 0 equal, 1 different, 2 usage or I/O error.
"""

import argparse
import fnmatch
import hashlib
import os
import stat
import sys

TYPE_NAMES = {
    stat.S_IFREG: "file",
    stat.S_IFDIR: "dir",
    stat.S_IFLNK: "symlink",
    stat.S_IFCHR: "chardev",
    stat.S_IFBLK: "blockdev",
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "socket",
}


def type_name(mode):
    return TYPE_NAMES.get(stat.S_IFMT(mode), "unknown(%o)" % stat.S_IFMT(mode))


class Tree:
    """lstat of every path under a root, keyed by relative path ('.' = root)."""

    def __init__(self, root, ignores):
        self.root = root
        self.ignores = ignores
        self.entries = {}
        self._walk()

    def ignored(self, rel):
        for pat in self.ignores:
            if fnmatch.fnmatchcase(rel, pat):
                return True
        return False

    def _walk(self):
        self.entries["."] = os.lstat(self.root)
        stack = [""]
        while stack:
            rel_dir = stack.pop()
            full_dir = os.path.join(self.root, rel_dir) if rel_dir else self.root
            with os.scandir(full_dir) as it:
                for ent in it:
                    rel = os.path.join(rel_dir, ent.name) if rel_dir else ent.name
                    if self.ignored(rel):
                        continue
                    st = os.lstat(ent.path)
                    self.entries[rel] = st
                    if stat.S_ISDIR(st.st_mode):
                        stack.append(rel)

    def path(self, rel):
        return self.root if rel == "." else os.path.join(self.root, rel)

    def sha256(self, rel):
        h = hashlib.sha256()
        with open(self.path(rel), "rb") as f:
            while True:
                b = f.read(1 << 20)
                if not b:
                    break
                h.update(b)
        return h.hexdigest()

    def xattrs(self, rel):
        p = self.path(rel)
        try:
            names = os.listxattr(p, follow_symlinks=False)
        except OSError as e:
            return {"<listxattr error>": str(e).encode()}
        out = {}
        for n in names:
            try:
                out[n] = os.getxattr(p, n, follow_symlinks=False)
            except OSError as e:
                out[n] = ("<getxattr error: %s>" % e).encode()
        return out

    def link_groups(self):
        """Map each non-directory path to the sorted tuple of paths sharing its inode."""
        by_inode = {}
        for rel, st in self.entries.items():
            if stat.S_ISDIR(st.st_mode):
                continue
            by_inode.setdefault((st.st_dev, st.st_ino), []).append(rel)
        groups = {}
        for paths in by_inode.values():
            t = tuple(sorted(paths))
            for p in t:
                groups[p] = t
        return groups


def fmt_mtime(st, ns):
    if ns:
        return "%d.%09d" % divmod(st.st_mtime_ns, 1_000_000_000)
    return "%d" % (st.st_mtime_ns // 1_000_000_000)


def compare(a, b, args, report):
    a_paths = set(a.entries)
    b_paths = set(b.entries)
    for rel in sorted(a_paths - b_paths):
        report(rel, "only in A (%s)" % type_name(a.entries[rel].st_mode))
    for rel in sorted(b_paths - a_paths):
        report(rel, "only in B (%s)" % type_name(b.entries[rel].st_mode))

    xattr_excl = args.xattr_exclude
    for rel in sorted(a_paths & b_paths):
        sa, sb = a.entries[rel], b.entries[rel]
        ta, tb = stat.S_IFMT(sa.st_mode), stat.S_IFMT(sb.st_mode)
        if ta != tb:
            report(rel, "type: %s != %s" % (type_name(sa.st_mode), type_name(sb.st_mode)))
            continue
        if ta != stat.S_IFLNK and stat.S_IMODE(sa.st_mode) != stat.S_IMODE(sb.st_mode):
            report(rel, "mode: %04o != %04o" % (stat.S_IMODE(sa.st_mode), stat.S_IMODE(sb.st_mode)))
        if (sa.st_uid, sa.st_gid) != (sb.st_uid, sb.st_gid):
            report(rel, "owner: %d:%d != %d:%d" % (sa.st_uid, sa.st_gid, sb.st_uid, sb.st_gid))
        if ta == stat.S_IFREG:
            if sa.st_size != sb.st_size:
                report(rel, "size: %d != %d" % (sa.st_size, sb.st_size))
            else:
                ha, hb = a.sha256(rel), b.sha256(rel)
                if ha != hb:
                    report(rel, "content: sha256 %s != %s" % (ha, hb))
        elif ta == stat.S_IFLNK:
            la, lb = os.readlink(a.path(rel)), os.readlink(b.path(rel))
            if la != lb:
                report(rel, "symlink target: %r != %r" % (la, lb))
        elif ta in (stat.S_IFCHR, stat.S_IFBLK):
            if sa.st_rdev != sb.st_rdev:
                report(rel, "device: %d,%d != %d,%d" % (
                    os.major(sa.st_rdev), os.minor(sa.st_rdev),
                    os.major(sb.st_rdev), os.minor(sb.st_rdev)))
        if args.mtime != "none" and not any(
                fnmatch.fnmatchcase(rel, p) for p in args.mtime_ignore):
            ns = args.mtime == "ns"
            ma, mb = fmt_mtime(sa, ns), fmt_mtime(sb, ns)
            if ma != mb:
                report(rel, "mtime: %s != %s" % (ma, mb))
        xa = {k: v for k, v in a.xattrs(rel).items()
              if not any(fnmatch.fnmatchcase(k, p) for p in xattr_excl)}
        xb = {k: v for k, v in b.xattrs(rel).items()
              if not any(fnmatch.fnmatchcase(k, p) for p in xattr_excl)}
        if xa != xb:
            for k in sorted(set(xa) | set(xb)):
                if k not in xb:
                    report(rel, "xattr %s: only in A (%r)" % (k, xa[k]))
                elif k not in xa:
                    report(rel, "xattr %s: only in B (%r)" % (k, xb[k]))
                elif xa[k] != xb[k]:
                    report(rel, "xattr %s: %r != %r" % (k, xa[k], xb[k]))

    # Hard links: compare the group of every path present on both sides,
    # restricted to the common paths (missing paths are reported above).
    common = a_paths & b_paths
    ga, gb = a.link_groups(), b.link_groups()
    seen = set()
    for rel in sorted(common):
        if rel not in ga or rel not in gb:
            continue
        xa = tuple(p for p in ga[rel] if p in common)
        xb = tuple(p for p in gb[rel] if p in common)
        if xa != xb and (xa, xb) not in seen:
            seen.add((xa, xb))
            report(rel, "hard links: A groups %s, B groups %s" % (list(xa), list(xb)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("a", help="first tree (A)")
    ap.add_argument("b", help="second tree (B)")
    ap.add_argument("--ignore", action="append", default=[], metavar="PATTERN",
                    help="skip paths (relative, fnmatch pattern; the subtree of a "
                         "matching directory is skipped too) on both sides; repeatable, "
                         "e.g. --ignore lost+found")
    ap.add_argument("--mtime", choices=("sec", "ns", "none"), default="sec",
                    help="how to compare mtimes (default: whole seconds)")
    ap.add_argument("--mtime-ignore", action="append", default=[], metavar="PATTERN",
                    help="do not compare mtimes of paths matching (fnmatch), e.g. "
                         "implicit parent directories, whose mtime umoci sets to now")
    ap.add_argument("--ns", dest="mtime", action="store_const", const="ns",
                    help="same as --mtime ns")
    ap.add_argument("--xattr-exclude", action="append", default=[], metavar="PATTERN",
                    help="ignore xattrs whose name matches (fnmatch), e.g. 'security.selinux'")
    ap.add_argument("--max", type=int, default=50, help="print at most this many differences")
    ap.add_argument("-q", "--quiet", action="store_true", help="print only the summary")
    args = ap.parse_args()

    for p in (args.a, args.b):
        if not os.path.isdir(p) or os.path.islink(p):
            print("treecmp: not a directory: %s" % p, file=sys.stderr)
            return 2

    try:
        a = Tree(args.a, args.ignore)
        b = Tree(args.b, args.ignore)
        diffs = []

        def report(rel, msg):
            diffs.append((rel, msg))
            if not args.quiet and len(diffs) <= args.max:
                print("%s: %s" % (rel, msg))

        compare(a, b, args, report)
    except OSError as e:
        print("treecmp: %s" % e, file=sys.stderr)
        return 2

    if diffs:
        more = len(diffs) - args.max
        if more > 0 and not args.quiet:
            print("... and %d more" % more)
        print("treecmp: %d difference(s) between %s (A) and %s (B), %d/%d entries"
              % (len(diffs), args.a, args.b, len(a.entries), len(b.entries)))
        return 1
    print("treecmp: equal, %d entries" % len(a.entries))
    return 0


if __name__ == "__main__":
    sys.exit(main())
