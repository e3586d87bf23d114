//! What the machine offers the tests: tools on PATH and the cached Debian
//! images. Missing ones make a test print a note and return early, except
//! when `SMR_REQUIRE_IMAGES` is set (CI), where they fail it.

use std::path::PathBuf;
use std::process::{Command, Stdio};

/// Whether the tests must fail rather than skip on a missing tool or image.
pub fn required() -> bool {
    std::env::var_os("SMR_REQUIRE_IMAGES").is_some()
}

/// Whether every program in `needed` is on PATH. If not: a panic when
/// [`required`], else a note, and `false` (the test returns early).
pub fn require_tools(needed: &[&str]) -> bool {
    let missing: Vec<&str> = needed
        .iter()
        .copied()
        .filter(|t| {
            !Command::new("sh")
                .arg("-c")
                .arg(format!("command -v {t}"))
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .collect();
    if missing.is_empty() {
        return true;
    }
    assert!(
        !required(),
        "missing tools {missing:?} but SMR_REQUIRE_IMAGES is set: run scripts/install-deps.sh"
    );
    eprintln!("note: skipping: missing tools {missing:?} (scripts/install-deps.sh installs them)");
    false
}

/// The OCI layout of the real Debian test images (tags `debian`,
/// `debian-python`) under `SMR_IMAGE_CACHE` (default
/// /var/cache/smr-test-images), built by scripts/build-test-images.sh. If
/// missing: a panic when [`required`], else a note and `None`.
pub fn debian_layout() -> Option<PathBuf> {
    let cache = std::env::var_os("SMR_IMAGE_CACHE").map_or_else(
        || PathBuf::from("/var/cache/smr-test-images"),
        PathBuf::from,
    );
    let layout = cache.join("oci");
    if layout.join("index.json").is_file() {
        return Some(layout);
    }
    assert!(
        !required(),
        "test images missing at {}: run scripts/build-test-images.sh",
        layout.display()
    );
    eprintln!(
        "note: skipping: {} missing; run scripts/build-test-images.sh",
        layout.display()
    );
    None
}
