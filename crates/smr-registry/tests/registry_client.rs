//! End-to-end tests of the registry client and the `docker://` image source
//! against real registries started by the tests on 127.0.0.1: Debian's
//! docker-registry (distribution 2.8, anonymous, htpasswd and token auth),
//! with images pushed by skopeo and by the client itself, plus a scripted
//! HTTP server for failures a real registry will not produce on demand.
//!
//! Without docker-registry or skopeo the tests print a note and pass,
//! unless `SMR_REQUIRE_IMAGES` is set (CI), where they fail.

mod registry_client {
    pub mod fake;
    pub mod token;
    pub mod util;

    mod auth;
    mod blobs;
    mod faults;
    mod hostile;
    mod source;
}
