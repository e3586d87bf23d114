//! The deterministic, streaming ext4 writer.
//!
//! TODO(helper): implement.
