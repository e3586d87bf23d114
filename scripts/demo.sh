#!/usr/bin/env bash
# The README's demo: builds real Debian images (cached), converts them into an
# encrypted chunk store, shows the dedup between them, then runs python3 in a
# container started lazily from an empty node cache and prints how much of
# the image it fetched.
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
export SMR_KEY_FILE=$work/key SMR_STORE=$work/store SMR_CACHE_DIR=$work/node-cache
echo "== convert debian (minbase) and debian + python3 + numpy into one store"
"$smr" convert "oci:$cache/oci:debian" -o "$work/debian.recipe"
"$smr" convert "oci:$cache/oci:debian-python" -o "$work/debian-python.recipe"
echo "== dedup: base image chunks reused by the python image"
"$smr" inspect "$work/debian.recipe" --compare "$work/debian-python.recipe"
"$smr" verify "$work/debian-python.recipe"
echo "== run python3 lazily from an empty node cache"
sync; echo 3 > /proc/sys/vm/drop_caches
"$smr" run "$work/debian-python.recipe" --stats "$work/run.json" -- \
    python3 -c 'import json, sqlite3, numpy; print("hello from python3 with numpy", numpy.__version__)'
python3 - "$work/run.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
print(f"started in {s['start_seconds']:.2f} s; fetched {s['bytes_fetched'] / 1e6:.1f} MB "
      f"({s['chunks_fetched']} chunks) of {s['image_bytes'] / 1e6:.1f} MB "
      f"= {100 * s['fetched_fraction']:.1f}% of the image")
PY
"$smr" cache stats
