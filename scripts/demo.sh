#!/usr/bin/env bash
# The README's demo: builds real Debian images (cached), converts them into an
# encrypted chunk store, shows the dedup between them, rebuilds the image from
# its chunks and checks it with e2fsck and the kernel's ext4.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cache=${SMR_IMAGE_CACHE:-/var/cache/smr-test-images}
work=${SMR_DEMO_DIR:-/var/tmp/smr-demo}
"$here/scripts/install-deps.sh"
(cd "$here" && cargo build --release -q -p smr)
smr=$here/target/release/smr
"$here/scripts/build-test-images.sh" "$cache"
rm -rf "$work"; mkdir -p "$work"
"$smr" keygen -o "$work/key"
export SMR_KEY_FILE=$work/key SMR_STORE=$work/store
echo "== convert debian (minbase) and debian + python3 into one store"
"$smr" convert "oci:$cache/oci:debian" -o "$work/debian.recipe"
"$smr" convert "oci:$cache/oci:debian-python" -o "$work/debian-python.recipe"
echo "== dedup: base image chunks reused by the python image"
"$smr" inspect "$work/debian.recipe" --compare "$work/debian-python.recipe"
"$smr" inspect "$work/debian-python.recipe"
echo "== verify every chunk, rebuild the image, check it"
"$smr" verify "$work/debian-python.recipe"
"$smr" extract "$work/debian-python.recipe" -o "$work/debian-python.img"
e2fsck -fn "$work/debian-python.img"
mkdir -p "$work/mnt"
mount -o loop,ro "$work/debian-python.img" "$work/mnt"
trap 'umount "$work/mnt" 2>/dev/null || true' EXIT
chroot "$work/mnt" /usr/bin/python3 -c 'import json, sqlite3, numpy; print("python3 runs from the rebuilt image, numpy", numpy.__version__)'
