//! Owner key and salt options shared by the subcommands.

use anyhow::{Context, Result};
use clap::Args;
use smr_format::OwnerKey;
use std::path::PathBuf;

/// `--key-file` (or `SMR_KEY_FILE`).
#[derive(Args, Debug, Clone)]
pub struct KeyArgs {
    /// The owner's 32-byte key (raw or 64 hex digits) that seals the recipe's key table.
    #[arg(long, env = "SMR_KEY_FILE")]
    pub key_file: Option<PathBuf>,
}

impl KeyArgs {
    /// Loads the key if one was named.
    pub fn load(&self) -> Result<Option<OwnerKey>> {
        self.key_file
            .as_deref()
            .map(|p| OwnerKey::from_file(p).context("loading the owner key"))
            .transpose()
    }
}

/// The convergent-encryption salt: the 32-byte key file `file` (as
/// `--salt-file` names it), else the documented public salt.
pub fn load_salt(file: Option<&std::path::Path>) -> Result<[u8; 32]> {
    match file {
        Some(p) => Ok(OwnerKey::from_file(p).context("loading the salt")?.0),
        None => Ok(smr_format::chunk::default_salt()),
    }
}

/// Reads a recipe file.
pub fn read_recipe(path: &std::path::Path) -> Result<smr_format::Recipe> {
    read_recipe_bytes(path).map(|(recipe, _)| recipe)
}

/// Reads a recipe file; returns it with its bytes (what a startup profile
/// is bound to).
pub fn read_recipe_bytes(path: &std::path::Path) -> Result<(smr_format::Recipe, Vec<u8>)> {
    let bytes = smr_format::read_bounded(path, smr_format::recipe::MAX_RECIPE_BYTES)
        .with_context(|| format!("reading recipe {}", path.display()))?;
    let recipe =
        smr_format::Recipe::decode(&bytes).with_context(|| format!("recipe {}", path.display()))?;
    Ok((recipe, bytes))
}

/// `recipe`'s chunks with its keys (keys required when `need_keys`);
/// `label` names the recipe in errors.
pub fn image_chunks(
    recipe: smr_format::Recipe,
    key: &KeyArgs,
    need_keys: bool,
    label: &str,
) -> Result<smr_node::chunks::ImageChunks> {
    let owner = key.load()?;
    let keys = if owner.is_none() && !need_keys {
        None
    } else {
        recipe
            .keys(owner.as_ref())
            .with_context(|| format!("recipe {label}"))?
    };
    Ok(smr_node::chunks::ImageChunks::new(recipe, keys))
}
