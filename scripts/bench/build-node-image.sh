#!/usr/bin/env bash
# Builds a second runtime image for the cold-start benchmarks, debian-node:
# the cached debian image (scripts/build-test-images.sh) plus Debian's
# nodejs, whose start maps libnode (tens of MB) and faults it in page by
# page. Needs root, umoci and a Debian mirror (as build-test-images.sh:
# $SMR_DEBIAN_MIRROR, else the first `URIs:` of
# /etc/apt/sources.list.d/debian.sources).
#
# Usage: scripts/bench/build-node-image.sh [OUT_DIR]
#   OUT_DIR defaults to /var/cache/smr-bench-images; the image is the OCI
#   layout OUT_DIR/oci, tag debian-node (kept between runs: an existing one
#   is reused). Measure it with
#   SMR_BENCH_IMAGE=OUT_DIR/oci:debian-node \
#   SMR_BENCH_CMD="node -e 'require(\"http\"); require(\"crypto\").createHash(\"sha256\")'" \
#   scripts/bench-registry.sh
set -euo pipefail

out=$(realpath -m -- "${1:-/var/cache/smr-bench-images}")
cache=${SMR_IMAGE_CACHE:-/var/cache/smr-test-images}
log() { printf '[build-node-image %s] %s\n' "$(date +%T)" "$*" >&2; }

if [[ -f $out/oci/index.json ]] && umoci stat --image "$out/oci:debian-node" >/dev/null 2>&1; then
  log "$out/oci:debian-node exists"
  exit 0
fi
[[ -f $cache/COMPLETE ]] || { log "no test image cache in $cache: run scripts/build-test-images.sh"; exit 1; }
tmp=$(mktemp -d "${out%/*}/.node-image.XXXXXX")
cleanup() {
  mountpoint -q "$tmp/bundle/rootfs/proc" && umount "$tmp/bundle/rootfs/proc"
  rm -rf "$tmp"
}
trap cleanup EXIT
log "unpacking debian"
skopeo copy --quiet "oci:$cache/oci:debian" "oci:$tmp/oci:debian-node"
umoci unpack --image "$tmp/oci:debian-node" "$tmp/bundle" >/dev/null
root=$tmp/bundle/rootfs
log "installing nodejs"
mount -t proc proc "$root/proc"
cp /etc/resolv.conf "$root/etc/resolv.conf"
chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LC_ALL=C \
    DEBIAN_FRONTEND=noninteractive /bin/sh -euc '
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends nodejs >/dev/null
        apt-get clean
        rm -rf /var/lib/apt/lists/*
        node -e "console.log(\"node\", process.version)"
    ' >"$tmp/apt.log" 2>&1 || { tail -30 "$tmp/apt.log" >&2; exit 1; }
tail -1 "$tmp/apt.log" >&2
rm -f "$root/etc/resolv.conf"
umount "$root/proc"
log "packing the layer"
umoci repack --image "$tmp/oci:debian-node" "$tmp/bundle" >/dev/null
umoci config --image "$tmp/oci:debian-node" --config.cmd node >/dev/null
mkdir -p "$out"
rm -rf "$out/oci"
mv "$tmp/oci" "$out/oci"
log "built $out/oci:debian-node"
