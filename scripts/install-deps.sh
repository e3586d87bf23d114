#!/usr/bin/env bash
# Installs the Debian packages smr's tests, benchmarks and demo use. Run as
# root on Debian 12. Skips apt entirely when everything is already there.
# --demo: only what scripts/demo.sh uses (no s3s-fs, which only the S3
# store tests start).
set -euo pipefail
demo=0
[[ ${1:-} == --demo ]] && demo=1
pkgs=(ca-certificates curl jq openssl python3 gcc libc6-dev pkg-config time attr
      e2fsprogs erofs-utils qemu-utils
      umoci skopeo debootstrap docker-registry apache2-utils
      runc containerd casync slirp4netns
      libnbd-bin python3-libnbd nbdkit
      fuse3 libfuse3-dev protobuf-compiler)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update
    apt-get install -y --no-install-recommends "${missing[@]}"
fi
# s3s-fs: the S3-compatible server of the S3 store tests (scripts/s3.sh).
if ((demo == 0)) && ! command -v s3s-fs >/dev/null; then
    cargo install s3s-fs@0.14.1 --features binary --locked
fi
