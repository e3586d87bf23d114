#!/usr/bin/env bash
# Build the real OCI test images that smr's tests convert, and cache them.
#
# Usage: scripts/build-test-images.sh [--force] [CACHE_DIR]
#   CACHE_DIR defaults to $SMR_IMAGE_CACHE, else /var/cache/smr-test-images.
#   --force rebuilds even when a complete cache is present.
#   Needs root (debootstrap, chroot, overlayfs), debootstrap, umoci, skopeo,
#   python3 and a Debian mirror: $SMR_DEBIAN_MIRROR, else the first `URIs:`
#   of the bookworm entry in /etc/apt/sources.list.d/debian.sources (or the
#   first `deb` line of /etc/apt/sources.list).
#
# Produces (all under CACHE_DIR):
#   oci/                         one OCI image layout with two tags
#     tag "debian"               debian bookworm, debootstrap --variant=minbase,
#                                one layer (entries named "./usr/...", like
#                                debuerreotype tarballs)
#     tag "debian-python"        the SAME first layer (same blob, same digest)
#                                plus a second layer with python3 and
#                                python3-numpy (entries named "usr/...", like
#                                docker/buildkit layers; holds a real whiteout,
#                                var/log/.wh.bootstrap.log, and a real opaque
#                                directory, var/lib/apt/lists/.wh..wh..opq)
#     (OCI tags cannot contain ':', hence "debian" for debian:bookworm and
#      "debian-python" for debian-python:bookworm.)
#   debian-python.docker.tar     docker-archive of debian-python
#                                (RepoTags: debian-python:bookworm)
#   rootfs/debian/               `umoci unpack` of each tag (reference trees
#   rootfs/debian-python/        for scripts/treecmp.py; read-only by convention)
#   SUMMARY.txt                  digests and sizes
#   COMPLETE                     written last; holds the recipe version
#
# The cache is built in a temporary directory next to CACHE_DIR and renamed
# into place at the end, so an interrupted build leaves no half-made cache.
# A lock (CACHE_DIR.lock) serialises concurrent callers.
#
# Determinism: layer tars are written with sorted names, numeric owners, no
# atime/ctime and fixed PAX header names; umoci's gzip is deterministic; all
# timestamps in configs and history come from SOURCE_DATE_EPOCH (default 0).
# The trees themselves carry real mtimes and whatever versions the mirror
# serves that day, so two builds on different days differ; the cache is what
# keeps the images stable for tests.
set -euo pipefail

RECIPE_VERSION=1
SUITE=bookworm
PY_PACKAGES=(python3 python3-numpy)
IMAGE_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

force=0
if [[ ${1:-} == --force ]]; then force=1; shift; fi
if [[ ${1:-} == -h || ${1:-} == --help ]]; then sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0; fi
CACHE_DIR=${1:-${SMR_IMAGE_CACHE:-/var/cache/smr-test-images}}
CACHE_DIR=$(realpath -m -- "$CACHE_DIR")
SCRIPTS=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

log() { printf '[build-test-images %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

print_paths() {
    cat <<EOF
SMR_IMAGE_CACHE=$CACHE_DIR
oci layout:       $CACHE_DIR/oci   (tags: debian, debian-python)
docker-archive:   $CACHE_DIR/debian-python.docker.tar   (debian-python:bookworm)
reference trees:  $CACHE_DIR/rootfs/debian/rootfs  $CACHE_DIR/rootfs/debian-python/rootfs
summary:          $CACHE_DIR/SUMMARY.txt
EOF
}

cache_complete() {
    [[ -f $CACHE_DIR/COMPLETE && $(cat "$CACHE_DIR/COMPLETE") == "recipe $RECIPE_VERSION" \
        && -f $CACHE_DIR/oci/index.json && -f $CACHE_DIR/debian-python.docker.tar ]]
}

if [[ $force == 0 ]] && cache_complete; then
    log "cache complete, nothing to do"
    print_paths
    exit 0
fi

[[ $(id -u) == 0 ]] || die "must run as root (debootstrap, chroot, overlayfs)"
for t in debootstrap umoci skopeo python3 tar jq chroot mount flock; do
    command -v "$t" >/dev/null || die "missing tool: $t"
done

mkdir -p "$(dirname "$CACHE_DIR")"
exec 9>"$CACHE_DIR.lock"
flock 9
# Someone else may have finished the build while we waited for the lock.
if [[ $force == 0 ]] && cache_complete; then
    log "cache completed by another process"
    print_paths
    exit 0
fi

find_mirror() {
    if [[ -n ${SMR_DEBIAN_MIRROR:-} ]]; then echo "$SMR_DEBIAN_MIRROR"; return; fi
    local m=""
    if [[ -f /etc/apt/sources.list.d/debian.sources ]]; then
        # deb822: first URIs of the first stanza whose Suites has plain "bookworm".
        m=$(awk -v suite="$SUITE" 'BEGIN { RS = ""; FS = "\n" }
            {
                uris = ""; ok = 0
                for (i = 1; i <= NF; i++) {
                    if ($i ~ /^URIs:/) { split($i, u, /[ \t]+/); uris = u[2] }
                    if ($i ~ /^Suites:/) {
                        n = split($i, s, /[ \t]+/)
                        for (j = 2; j <= n; j++) if (s[j] == suite) ok = 1
                    }
                }
                if (ok && uris != "") { print uris; exit }
            }' /etc/apt/sources.list.d/debian.sources)
    fi
    if [[ -z $m && -f /etc/apt/sources.list ]]; then
        m=$(awk -v suite="$SUITE" '$1 == "deb" && $3 == suite { print $2; exit }' /etc/apt/sources.list)
    fi
    [[ -n $m ]] || die "no Debian mirror found; set SMR_DEBIAN_MIRROR"
    echo "$m"
}
MIRROR=$(find_mirror)

SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-0}
export SOURCE_DATE_EPOCH
CREATED=$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y-%m-%dT%H:%M:%SZ)

T0=$(date +%s)
TMP=$(mktemp -d "$(dirname "$CACHE_DIR")/.$(basename "$CACHE_DIR").tmp.XXXXXX")
chmod 0755 "$TMP"
W=$TMP/work
mkdir -p "$W"
MOUNTS=()
cleanup() {
    local rc=$? i
    for ((i = ${#MOUNTS[@]} - 1; i >= 0; i--)); do
        umount "${MOUNTS[i]}" 2>/dev/null || umount -l "${MOUNTS[i]}" 2>/dev/null || true
    done
    if [[ -d $TMP ]]; then
        # Never rm -rf through a mount that failed to go away.
        if findmnt -rn -o TARGET | grep -qF -- "$TMP"; then
            log "mounts left under $TMP; not removing it"
        else
            rm -rf -- "$TMP"
        fi
    fi
    [[ $rc == 0 ]] || log "failed (exit $rc); cache at $CACHE_DIR untouched"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
do_mount() { mount "$@"; MOUNTS+=("${@: -1}"); }
do_umount() {
    umount "$1"
    local i
    for i in "${!MOUNTS[@]}"; do [[ ${MOUNTS[i]} == "$1" ]] && unset 'MOUNTS[i]'; done
    MOUNTS=("${MOUNTS[@]}")
}

# Deterministic uncompressed tar of a tree. $1 = output, $2 = dir,
# rest = members (relative to dir).
make_tar() {
    local out=$1 dir=$2; shift 2
    LC_ALL=C tar --create --file "$out" --directory "$dir" \
        --format=posix --sort=name --numeric-owner \
        --xattrs --xattrs-include='*' --xattrs-exclude='trusted.overlay.*' \
        --pax-option='exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime' \
        -- "$@"
}

# ---------------------------------------------------------------- base layer
log "debootstrap --variant=minbase $SUITE (mirror $MIRROR)"
BASE=$W/base
debootstrap --variant=minbase "$SUITE" "$BASE" "$MIRROR" >"$W/debootstrap.log" 2>&1 \
    || { tail -20 "$W/debootstrap.log" >&2; die "debootstrap failed"; }

# Make the tree an image rather than a copy of this host: drop downloaded
# packages and indexes, and host files that runtimes provide at run time.
rm -rf "$BASE"/var/cache/apt/archives/*.deb "$BASE"/var/cache/apt/*.bin
find "$BASE/var/lib/apt/lists" -mindepth 1 -maxdepth 1 ! -name partial -exec rm -rf {} +
rm -f "$BASE/etc/resolv.conf"
echo localhost >"$BASE/etc/hostname"
# debootstrap.log lives on in var/log/bootstrap.log; the python layer deletes
# it, which gives that layer a real whiteout.

log "packing base layer"
make_tar "$W/base.tar" "$BASE" .

# -------------------------------------------------------------- python layer
log "installing ${PY_PACKAGES[*]} on an overlay of the base"
UPPER=$W/upper OVW=$W/ovwork MERGED=$W/merged
mkdir -p "$UPPER" "$OVW" "$MERGED"
do_mount -t overlay overlay -o "lowerdir=$BASE,upperdir=$UPPER,workdir=$OVW" "$MERGED"
do_mount -t proc proc "$MERGED/proc"
cp /etc/resolv.conf "$MERGED/etc/resolv.conf"
chroot "$MERGED" /usr/bin/env -i \
    PATH="$IMAGE_PATH" HOME=/root LC_ALL=C DEBIAN_FRONTEND=noninteractive \
    /bin/sh -euc '
        apt-get update -qq
        apt-get install -y -qq "$@" >/dev/null
        apt-get clean
        # Like a Dockerfile: drop the indexes (recreating the directory makes
        # it opaque in the layer) and a log file of the base (a whiteout).
        rm -rf /var/lib/apt/lists
        mkdir -p /var/lib/apt/lists/partial
        chmod 0700 /var/lib/apt/lists/partial
        chown _apt:root /var/lib/apt/lists/partial
        rm -f /var/log/bootstrap.log
        rm -f /var/cache/debconf/*-old /var/lib/dpkg/*-old
        python3 -c "import numpy; print(\"numpy\", numpy.__version__)"
    ' sh "${PY_PACKAGES[@]}" >"$W/apt.log" 2>&1 \
    || { tail -30 "$W/apt.log" >&2; die "apt-get in chroot failed"; }
tail -1 "$W/apt.log" >&2
rm -f "$MERGED/etc/resolv.conf"
do_umount "$MERGED/proc"
do_umount "$MERGED"

# The upper directory holds exactly the changes, with overlayfs' own
# whiteouts (0:0 char devices) and opaque markers (xattr). Convert a copy to
# OCI form; keep the original for the check below.
log "converting overlay diff to an OCI layer"
LAYER2=$W/layer2
cp -a "$UPPER" "$LAYER2"
python3 - "$LAYER2" "$BASE" <<'EOF'
import os, stat, sys
root, lower = sys.argv[1:]
for d, dirs, files in os.walk(root):
    for n in list(files) + list(dirs):
        p = os.path.join(d, n)
        st = os.lstat(p)
        if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
            os.unlink(p)
            fd = os.open(os.path.join(d, ".wh." + n), os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o644)
            os.close(fd)
            print("whiteout:", os.path.relpath(p, root), file=sys.stderr)
            continue
        elif stat.S_ISDIR(st.st_mode):
            try:
                opaque = os.getxattr(p, "trusted.overlay.opaque", follow_symlinks=False)
            except OSError:
                opaque = None
            # overlayfs also marks directories that are new in the upper as
            # opaque; only a directory hiding one of the base matters.
            in_lower = os.path.isdir(os.path.join(lower, os.path.relpath(p, root)))
            if opaque == b"y" and in_lower:
                fd = os.open(os.path.join(p, ".wh..wh..opq"), os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o644)
                os.close(fd)
                os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
                print("opaque:", os.path.relpath(p, root), file=sys.stderr)
        if not stat.S_ISLNK(st.st_mode):
            for x in os.listxattr(p, follow_symlinks=False):
                if x.startswith("trusted.overlay."):
                    os.removexattr(p, x, follow_symlinks=False)
# the .wh. markers get a fixed mtime
for d, dirs, files in os.walk(root):
    for n in files:
        if n.startswith(".wh."):
            os.utime(os.path.join(d, n), ns=(0, 0), follow_symlinks=False)
EOF
# Restore directory mtimes that creating .wh. files bumped.
python3 - "$UPPER" "$LAYER2" <<'EOF'
import os, sys
src, dst = sys.argv[1:]
for d, dirs, files in os.walk(src):
    rel = os.path.relpath(d, src)
    st = os.lstat(d)
    os.utime(os.path.join(dst, rel), ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
EOF
mapfile -t TOP < <(cd "$LAYER2" && find . -mindepth 1 -maxdepth 1 -printf '%P\n' | LC_ALL=C sort)
make_tar "$W/python.tar" "$LAYER2" "${TOP[@]}"

# ---------------------------------------------------------------- OCI layout
log "writing OCI layout"
OCI=$TMP/oci
umoci init --layout "$OCI"
umoci new --image "$OCI:debian"
umoci raw add-layer --image "$OCI:debian" \
    --history.created "$CREATED" \
    --history.created_by "debootstrap --variant=minbase $SUITE" \
    "$W/base.tar"
umoci config --image "$OCI:debian" --created "$CREATED" \
    --history.created "$CREATED" --history.created_by 'ENV PATH; CMD ["bash"]' \
    --config.env "PATH=$IMAGE_PATH" --config.cmd bash
# debian-python starts from the tag "debian", so its first layer is the very
# same blob.
umoci raw add-layer --image "$OCI:debian" --tag debian-python \
    --history.created "$CREATED" \
    --history.created_by "apt-get install ${PY_PACKAGES[*]}" \
    "$W/python.tar"
umoci config --image "$OCI:debian-python" --created "$CREATED" \
    --history.created "$CREATED" --history.created_by 'CMD ["python3"]' \
    --config.cmd python3
umoci gc --layout "$OCI"
chmod 0644 "$OCI/index.json"

layers() { umoci stat --image "$OCI:$1" --json | jq -r '[.history[] | select(.layer != null) | .layer.digest] | join(" ")'; }
L_DEB=$(layers debian)
L_PY=$(layers debian-python)
[[ $L_DEB != *" "* && -n $L_DEB ]] || die "debian should have one layer, has: $L_DEB"
[[ ${L_PY%% *} == "$L_DEB" && $L_PY == *" "* ]] \
    || die "layer 1 of debian-python ($L_PY) is not debian's layer ($L_DEB)"

log "writing docker-archive"
skopeo copy --quiet "oci:$OCI:debian-python" \
    "docker-archive:$TMP/debian-python.docker.tar:debian-python:$SUITE"

# ------------------------------------------------------- unpack and verify
log "unpacking reference trees and checking them"
mkdir -p "$TMP/rootfs"
for tag in debian debian-python; do
    umoci unpack --image "$OCI:$tag" "$TMP/rootfs/$tag" >/dev/null
done
# umoci unpack of the layers must give back the trees they were made from.
"$SCRIPTS/treecmp.py" --mtime ns "$BASE" "$TMP/rootfs/debian/rootfs" \
    || die "unpacked debian differs from the debootstrap tree"
VIEW=$W/view
mkdir -p "$VIEW"
# overlayfs shows the upper root directory's own metadata: copy the base's.
chown --reference="$BASE" "$UPPER"; chmod --reference="$BASE" "$UPPER"; touch -r "$BASE" "$UPPER"
do_mount -t overlay overlay -o "ro,lowerdir=$UPPER:$BASE" "$VIEW"
"$SCRIPTS/treecmp.py" --mtime ns "$VIEW" "$TMP/rootfs/debian-python/rootfs" \
    || die "unpacked debian-python differs from the installed tree"
do_umount "$VIEW"

# ------------------------------------------------------------------ summary
{
    echo "smr test images, recipe $RECIPE_VERSION, built $(date -u +%FT%TZ) from $MIRROR"
    for tag in debian debian-python; do
        echo "== $tag"
        umoci stat --image "$OCI:$tag" --json | jq -r '.history[] | select(.layer != null)
            | "layer \(.layer.digest) gzip \(.layer.size) bytes, diff_id \(.diff_id)"'
        m=$(jq -r --arg t "$tag" '.manifests[] | select(.annotations["org.opencontainers.image.ref.name"] == $t) | .digest' "$OCI/index.json")
        echo "manifest $m"
    done
    echo "== uncompressed layer tars"
    echo "base.tar   $(stat -c %s "$W/base.tar") bytes"
    echo "python.tar $(stat -c %s "$W/python.tar") bytes"
    echo "== unpacked trees (du -s --apparent-size)"
    du -s --apparent-size --block-size=1 "$TMP/rootfs/debian/rootfs" "$TMP/rootfs/debian-python/rootfs" \
        | sed "s|$TMP/||"
    echo "== files"
    du -s --block-size=1 "$TMP/oci" "$TMP/debian-python.docker.tar" | sed "s|$TMP/||"
    echo "== packages in debian-python"
    grep -c '^Package:' "$TMP/rootfs/debian-python/rootfs/var/lib/dpkg/status" || true
} >"$TMP/SUMMARY.txt"

rm -rf -- "$W"
echo "recipe $RECIPE_VERSION" >"$TMP/COMPLETE"
if [[ -e $CACHE_DIR ]]; then
    old=$(mktemp -d "$(dirname "$CACHE_DIR")/.$(basename "$CACHE_DIR").old.XXXXXX")
    mv -- "$CACHE_DIR" "$old/"
    mv -- "$TMP" "$CACHE_DIR"
    rm -rf -- "$old"
else
    mv -- "$TMP" "$CACHE_DIR"
fi
log "built in $(( $(date +%s) - T0 )) s"
cat "$CACHE_DIR/SUMMARY.txt"
print_paths
