//! End-to-end tests of smr as containerd's remote snapshotter: real
//! containerd 1.6 and runc from Debian, started by the tests with their own
//! root, state and config (scripts/containerd.sh), `smr daemon` as the
//! proxy snapshotter, images in Debian's docker-registry.
//!
//! Without the tools or the Debian test images the tests print a note and
//! pass, unless `SMR_REQUIRE_IMAGES=1` (CI).

#![allow(clippy::unwrap_used)]

#[path = "e2e/util.rs"]
#[allow(dead_code)]
mod util;

#[path = "remote/servers.rs"]
#[allow(dead_code)]
mod servers;

#[path = "containerd/node.rs"]
mod node;

#[path = "containerd/snapshotter.rs"]
mod snapshotter;

#[path = "containerd/cri.rs"]
mod cri;
