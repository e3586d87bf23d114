//! Image sources: where an OCI image's manifest, config and layers come from.
//!
//! TODO(helper): implement. Public API below is the contract used by the CLI.
