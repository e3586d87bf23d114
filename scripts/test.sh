#!/usr/bin/env bash
# The one test command of smr: CI (.ci/run) and the README both call this.
# Extra arguments go to cargo nextest (e.g. scripts/test.sh -E 'test(ext4)').
#
# Tests that need the real test images find them through SMR_IMAGE_CACHE
# (default /var/cache/smr-test-images, built by scripts/build-test-images.sh);
# with SMR_REQUIRE_IMAGES=1 (set by .ci/run) they fail instead of skipping
# when the images are missing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { printf '\n=== %s\n' "$*" >&2; }

step "treecmp self-test"
scripts/treecmp_selftest.py

step "cargo fmt --check"
cargo fmt --all --check

step "cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings

step "cargo nextest"
cargo nextest run --workspace --no-fail-fast "$@"
