#!/usr/bin/env bash
# The one test command of smr: CI (.ci/run) and the README both call this.
# Extra arguments go to cargo nextest (e.g. scripts/test.sh -E 'test(ext4)').
#
# Steps: treecmp self-test, cargo fmt --check, cargo clippy -D warnings,
# cargo doc -D warnings (broken doc links), cargo nextest run --workspace
# --no-fail-fast. Every step runs even when an
# earlier one failed (a formatting slip should not hide test results); the
# exit status is non-zero if any step failed.
#
# Tests that need the real test images find them through SMR_IMAGE_CACHE
# (default /var/cache/smr-test-images, built by scripts/build-test-images.sh);
# with SMR_REQUIRE_IMAGES=1 (set by .ci/run) they fail instead of skipping
# when the images are missing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

failed=()
step() {
    local name=$1; shift
    printf '\n=== %s\n' "$name" >&2
    if ! "$@"; then
        failed+=("$name")
        printf '=== FAILED: %s\n' "$name" >&2
    fi
}

step "treecmp self-test" scripts/treecmp_selftest.py
step "cargo fmt" cargo fmt --all --check
step "cargo clippy" cargo clippy --workspace --all-targets -- -D warnings
step "cargo doc" env RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --quiet
step "cargo nextest" cargo nextest run --workspace --no-fail-fast "$@"

if ((${#failed[@]})); then
    printf '\nscripts/test.sh: failed steps: %s\n' "$(IFS=,; echo "${failed[*]}")" >&2
    exit 1
fi
printf '\nscripts/test.sh: all steps passed\n' >&2
