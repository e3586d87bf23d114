//! Applying layers in order, with OCI whiteouts, into a [`crate::tree::Tree`].
//!
//! TODO(helper): implement.
