#!/usr/bin/env bash
# Builds a second runtime image for the cold-start benchmarks, debian-node:
# the cached debian image (scripts/build-test-images.sh) plus Debian's
# nodejs, whose start maps libnode (tens of MB) and faults it in page by
# page (scripts/bench/build-image.sh does the work).
#
# Usage: scripts/bench/build-node-image.sh [OUT_DIR]
#   OUT_DIR defaults to /var/cache/smr-bench-images; the image is the OCI
#   layout OUT_DIR/oci, tag debian-node (kept between runs: an existing one
#   is reused). Measure it with
#   SMR_BENCH_IMAGE=OUT_DIR/oci:debian-node \
#   SMR_BENCH_CMD="node -e 'require(\"http\"); require(\"crypto\").createHash(\"sha256\")'" \
#   scripts/bench-registry.sh
set -euo pipefail
exec "$(dirname "${BASH_SOURCE[0]}")/build-image.sh" "${1:-/var/cache/smr-bench-images}" debian-node node nodejs
