//! One named export of the NBD server: a [`BlockDevice`] and its name.

use std::sync::Arc;

use super::proto::MAX_STRING_LEN;
use super::{NbdError, Result};
use crate::device::BlockDevice;

/// One named export of an [`NbdServer`](super::NbdServer).
#[derive(Clone)]
pub struct Export {
    /// Name clients select it by; the first export is also the default
    /// (selected by the empty name).
    pub name: String,
    /// Free text shown by `nbdinfo` and `NBD_OPT_LIST`.
    pub description: String,
    /// The bytes served.
    pub device: Arc<dyn BlockDevice>,
}

impl Export {
    /// An export with an empty description.
    pub fn new(name: impl Into<String>, device: Arc<dyn BlockDevice>) -> Self {
        Self {
            name: name.into(),
            description: String::new(),
            device,
        }
    }

    /// Set the description.
    pub fn with_description(mut self, description: impl Into<String>) -> Self {
        self.description = description.into();
        self
    }

    pub(crate) fn check(&self) -> Result<()> {
        for s in [&self.name, &self.description] {
            if s.len() > MAX_STRING_LEN || s.contains('\0') {
                return Err(NbdError::BadExportString(s.chars().take(64).collect()));
            }
        }
        Ok(())
    }
}

impl std::fmt::Debug for Export {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Export")
            .field("name", &self.name)
            .field("description", &self.description)
            .field("size", &self.device.size())
            .field("read_only", &self.device.read_only())
            .finish()
    }
}
