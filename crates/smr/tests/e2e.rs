//! End-to-end tests of the `smr` binary against real tools: e2fsck, the
//! kernel's ext4 (loop mounts), umoci. They need root (loop mounts), as CI has.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod e2e {
    pub mod util;

    mod bad_input;
    mod debian;
    mod gc;
    mod nbd;
    mod outputs;
    mod packs;
    mod synthetic;
    mod volume;
}
