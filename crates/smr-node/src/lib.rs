//! The node side of smr, one module per concern:
//!
//! - chunks and fetching: [`chunks`] (verify and decrypt one chunk),
//!   [`fetch`] (misses into store requests), [`cache`] (the node cache:
//!   memory tier, disk tier, fetches in flight), [`restore`] (extract and
//!   verify whole images);
//! - block devices and exports: [`device`] (the trait every export
//!   serves), [`lazy`] (the lazy image, startup profiles), [`volume`]
//!   (writable volumes: a base image, a COW file and its map), [`nbd`],
//!   [`fuse`];
//! - the runtime side: [`mount`] (loop devices and mounts through the
//!   kernel's interfaces), [`run`] (containers with runc: the OCI spec, run
//!   directories and their sweep), [`dirs`] (private directories),
//!   [`malloc`].

pub mod cache;
pub mod chunks;
pub mod device;
pub mod dirs;
mod elf;
pub mod fetch;
pub mod fuse;
pub mod lazy;
pub mod malloc;
pub mod mount;
pub mod nbd;
pub mod restore;
pub mod run;
pub mod startup;
pub mod volume;
pub mod warm;
