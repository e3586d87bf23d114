//! OCI image input, layer flattening and the deterministic ext4 writer.
//!
//! The pipeline inside this crate: an [`source::ImageSource`] yields the image
//! config and its layers as streams; [`flatten`] applies them in order (with
//! OCI whiteouts) into a [`tree::Tree`], handing every regular file's bytes to a
//! [`tree::DataSink`] as it goes; the [`ext4::Ext4Writer`] is that data sink
//! and, once all layers are applied, writes the filesystem metadata.

pub mod ext4;
pub mod flatten;
pub mod layer;
pub mod media_types;
mod readahead;
pub mod source;
pub mod tree;

#[cfg(test)]
mod test_support;
