//! The runtime part of an OCI image config, kept in the recipe for `smr run`.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// What a runtime needs from the image config to start a container.
///
/// Serialized as canonical JSON (fields in declaration order, maps sorted),
/// so the same config always yields the same bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    /// `architecture` of the image config (e.g. `amd64`).
    pub architecture: String,
    /// `os` of the image config (e.g. `linux`).
    pub os: String,
    /// `config.Entrypoint`.
    #[serde(default)]
    pub entrypoint: Vec<String>,
    /// `config.Cmd`.
    #[serde(default)]
    pub cmd: Vec<String>,
    /// `config.Env`, `KEY=value` strings in image order.
    #[serde(default)]
    pub env: Vec<String>,
    /// `config.WorkingDir` (empty means `/`).
    #[serde(default)]
    pub working_dir: String,
    /// `config.User` (empty means root).
    #[serde(default)]
    pub user: String,
    /// `config.Labels`.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}
