//! End-to-end tests of remote stores through the `smr` binary: images
//! converted and pushed to a real registry (Debian's docker-registry) as
//! smr artifacts and mounted or run lazily from it, registry outages, wrong
//! credentials, startup profiles, and chunk stores on S3 (s3s-fs) and
//! plain HTTP.
//!
//! Servers are started on 127.0.0.1 by the tests. Without them the tests
//! print a note and pass, unless `SMR_REQUIRE_IMAGES=1` (CI), where a
//! missing tool is a failure.

#![allow(clippy::unwrap_used)]

#[path = "e2e/util.rs"]
#[allow(dead_code)]
mod util;

#[path = "remote/servers.rs"]
mod servers;

#[path = "remote/registry.rs"]
mod registry;

#[path = "remote/stores.rs"]
mod stores;

#[path = "remote/profile.rs"]
mod profile;

#[path = "remote/optimize.rs"]
mod optimize;

#[path = "remote/trust.rs"]
mod trust;

#[path = "remote/commit.rs"]
mod commit;
