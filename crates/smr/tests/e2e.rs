//! End-to-end tests of the `smr` binary against real tools: e2fsck, the
//! kernel's ext4 (loop mounts), umoci. They need root (loop mounts), as CI has.

mod e2e {
    pub mod util;

    mod bad_input;
    mod debian;
    mod nbd;
    mod synthetic;
}
