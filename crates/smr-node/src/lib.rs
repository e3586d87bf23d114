//! The node side of smr: fetching verified chunks, rebuilding and checking
//! images, and (growing) the lazy image, cache and exports.

pub mod cache;
pub mod chunks;
pub mod fetch;
pub mod fuse;
pub mod lazy;
pub mod malloc;
pub mod mount;
pub mod nbd;
pub mod restore;
pub mod run;
