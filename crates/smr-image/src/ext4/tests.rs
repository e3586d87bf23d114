//! End-to-end tests: write images, then check them with e2fsprogs.
