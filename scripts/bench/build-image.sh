#!/usr/bin/env bash
# Builds an image for the benchmarks and the evaluation: the cached debian
# image (scripts/build-test-images.sh) plus one layer holding Debian
# packages installed with apt. Needs root, umoci, skopeo and the Debian
# mirror the debian image's sources name.
#
# Usage: scripts/bench/build-image.sh OUT_DIR TAG CMD PACKAGE...
#   The image is the OCI layout OUT_DIR/oci, tag TAG, with CMD as its
#   command; an existing one is reused (delete OUT_DIR/oci to rebuild).
set -euo pipefail

[[ $# -ge 4 ]] || { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 2; }
out=$(realpath -m -- "$1"); tag=$2; cmd=$3; shift 3
cache=${SMR_IMAGE_CACHE:-/var/cache/smr-test-images}
log() { printf '[build-image %s] %s\n' "$(date +%T)" "$*" >&2; }

if [[ -f $out/oci/index.json ]] && umoci stat --image "$out/oci:$tag" >/dev/null 2>&1; then
  log "$out/oci:$tag exists"
  exit 0
fi
[[ -f $cache/COMPLETE ]] || { log "no test image cache in $cache: run scripts/build-test-images.sh"; exit 1; }
mkdir -p "$out"
tmp=$(mktemp -d "$out/.image.XXXXXX")
cleanup() {
  mountpoint -q "$tmp/bundle/rootfs/proc" && umount "$tmp/bundle/rootfs/proc"
  rm -rf "$tmp"
}
trap cleanup EXIT
log "unpacking debian"
skopeo copy --quiet "oci:$cache/oci:debian" "oci:$tmp/oci:$tag"
umoci unpack --image "$tmp/oci:$tag" "$tmp/bundle" >/dev/null
root=$tmp/bundle/rootfs
log "installing $*"
mount -t proc proc "$root/proc"
cp /etc/resolv.conf "$root/etc/resolv.conf"
chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LC_ALL=C \
    DEBIAN_FRONTEND=noninteractive /bin/sh -euc '
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "$@" >/dev/null
        apt-get clean
        rm -rf /var/lib/apt/lists/*
    ' sh "$@" >"$tmp/apt.log" 2>&1 || { tail -30 "$tmp/apt.log" >&2; exit 1; }
rm -f "$root/etc/resolv.conf"
umount "$root/proc"
log "packing the layer"
umoci repack --image "$tmp/oci:$tag" "$tmp/bundle" >/dev/null
umoci config --image "$tmp/oci:$tag" --config.cmd "$cmd" >/dev/null
# Into OUT_DIR/oci next to the images already there.
if [[ -f $out/oci/index.json ]]; then
  skopeo copy --quiet "oci:$tmp/oci:$tag" "oci:$out/oci:$tag"
else
  mv "$tmp/oci" "$out/oci"
fi
log "built $out/oci:$tag"
