//! The node's trust policy: which smr artifacts a node runs.
//!
//! An artifact found for an image is used only when
//! - (a) its recipe's key table opens with the node's owner key
//!   (`--key-file`, `SMR_KEY_FILE`),
//! - (b) it carries a valid signature by a key the node trusts (cosign
//!   public keys in `POLICY_DIR/keys/*.pub` and `--verify-key`), or
//! - (c) its manifest digest is pinned (`POLICY_DIR/pinned`, one digest per
//!   line, `#` comments; and `--pin`).
//!
//! A node that configures none of them runs any artifact (the first in
//! digest order) and says so at `smr policy show`; one with an owner key
//! and nothing else has policy (a). Candidates that fail are skipped and
//! logged; none trusted is an error naming each and why.

use anyhow::{Context, Result};
use smr_format::OwnerKey;
use smr_registry::discover::Artifact;
use smr_registry::signature::VerifyKey;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

/// The policy directory of a node whose root is the default `/var/lib/smr`.
pub const DEFAULT_POLICY_DIR: &str = "/var/lib/smr/policy";
/// Largest public key or pinned-list file read.
const MAX_POLICY_FILE: u64 = 1 << 20;

/// Where the node's trust comes from.
#[derive(clap::Args, Clone, Debug)]
pub struct PolicyArgs {
    /// The node's policy directory: `keys/*.pub` (cosign public keys whose
    /// signatures are trusted) and `pinned` (trusted artifact manifest
    /// digests, one per line). A missing directory configures nothing.
    #[arg(long, env = "SMR_POLICY_DIR", default_value = DEFAULT_POLICY_DIR)]
    pub policy_dir: PathBuf,
    /// Also trust artifacts signed by this cosign public key (repeatable).
    #[arg(long = "verify-key", value_name = "PUB")]
    pub verify_keys: Vec<PathBuf>,
    /// Also trust this smr artifact manifest digest (repeatable).
    #[arg(long = "pin", value_name = "DIGEST")]
    pub pins: Vec<String>,
}

impl Default for PolicyArgs {
    fn default() -> Self {
        PolicyArgs {
            policy_dir: std::env::var_os("SMR_POLICY_DIR")
                .map_or_else(|| PathBuf::from(DEFAULT_POLICY_DIR), PathBuf::from),
            verify_keys: Vec::new(),
            pins: Vec::new(),
        }
    }
}

/// The loaded policy.
#[derive(Debug, Default)]
pub struct NodePolicy {
    /// (a): the owner key.
    pub owner: Option<OwnerKey>,
    /// (b): trusted signing keys.
    pub keys: Vec<Arc<VerifyKey>>,
    /// (c): pinned artifact digests.
    pub pinned: BTreeSet<String>,
    /// The policy directory read.
    pub dir: PathBuf,
}

impl NodePolicy {
    /// Reads the policy directory and the flags; `owner` is the node's
    /// owner key, if any.
    pub fn load(args: &PolicyArgs, owner: Option<OwnerKey>) -> Result<Self> {
        let dir = args.policy_dir.clone();
        let mut key_files: Vec<PathBuf> = Vec::new();
        let keys_dir = dir.join("keys");
        match std::fs::read_dir(&keys_dir) {
            Ok(entries) => {
                for e in entries {
                    let path = e
                        .with_context(|| format!("listing {}", keys_dir.display()))?
                        .path();
                    if path.extension().is_some_and(|x| x == "pub") {
                        key_files.push(path);
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(e).with_context(|| format!("listing {}", keys_dir.display()));
            }
        }
        key_files.sort();
        key_files.extend(args.verify_keys.iter().cloned());
        let mut keys: Vec<Arc<VerifyKey>> = Vec::new();
        for path in &key_files {
            let key = load_verify_key(path)?;
            if !keys.iter().any(|k| k.id == key.id) {
                keys.push(Arc::new(key));
            }
        }
        let mut pinned = BTreeSet::new();
        let pinned_file = dir.join("pinned");
        match smr_format::read_bounded(&pinned_file, MAX_POLICY_FILE) {
            Ok(bytes) => {
                let text = String::from_utf8(bytes)
                    .with_context(|| format!("{} is not UTF-8", pinned_file.display()))?;
                for (n, line) in text.lines().enumerate() {
                    let line = line.split('#').next().unwrap_or("").trim();
                    if !line.is_empty() {
                        pinned.insert(check_digest(line).with_context(|| {
                            format!("{} line {}", pinned_file.display(), n + 1)
                        })?);
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("reading {}", pinned_file.display())),
        }
        for p in &args.pins {
            pinned.insert(check_digest(p).context("--pin")?);
        }
        Ok(NodePolicy {
            owner,
            keys,
            pinned,
            dir,
        })
    }

    /// Whether nothing is configured (any artifact is used).
    pub fn is_open(&self) -> bool {
        self.owner.is_none() && self.keys.is_empty() && self.pinned.is_empty()
    }

    /// Whether the policy accepts `a`, or why not. Signatures are checked
    /// by discovery (with [`NodePolicy::keys`]); this reads the outcome.
    pub fn accept(&self, a: &Artifact) -> std::result::Result<(), String> {
        if self.is_open() {
            return Ok(());
        }
        if self.pinned.contains(&a.digest) {
            tracing::info!(artifact = %a.digest, "trusted: pinned");
            return Ok(());
        }
        let mut why = Vec::new();
        if let Some(owner) = &self.owner {
            match a.recipe.keys(Some(owner)) {
                Ok(Some(_)) => return Ok(()),
                Ok(None) => why.push(
                    "its recipe is not encrypted, so nothing binds it to the owner key".to_string(),
                ),
                Err(e) => why.push(format!(
                    "its key table does not open with the owner key: {e}"
                )),
            }
        }
        if !self.keys.is_empty() {
            match &a.signature {
                Some(Ok(s)) => {
                    tracing::info!(artifact = %a.digest, key = %s.key, signature = %s.signature, "trusted: signed");
                    return Ok(());
                }
                Some(Err(e)) => why.push(format!("no valid signature by a trusted key ({e})")),
                None => why.push("its signature was not checked".to_string()),
            }
        }
        if !self.pinned.is_empty() {
            why.push("not pinned".to_string());
        }
        Err(why.join("; "))
    }
}

/// Reads a cosign public key file.
pub fn load_verify_key(path: &Path) -> Result<VerifyKey> {
    let pem = smr_format::read_bounded(path, MAX_POLICY_FILE)
        .with_context(|| format!("reading public key {}", path.display()))?;
    let name = path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    VerifyKey::from_pem(&pem, &name).with_context(|| format!("public key {}", path.display()))
}

/// `s` if it is a `sha256:<64 lowercase hex>` digest.
fn check_digest(s: &str) -> Result<String> {
    anyhow::ensure!(
        smr_registry::artifact::parse_digest(s).is_some(),
        "`{s}` is not a sha256:<64 hex> digest"
    );
    Ok(s.to_string())
}

/// `smr policy show`.
#[derive(clap::Args)]
pub struct ShowArgs {
    #[command(flatten)]
    policy: PolicyArgs,
    #[command(flatten)]
    key: crate::keys::KeyArgs,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
}

/// `smr policy`.
#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Subcommand)]
enum Cmd {
    /// Where trust comes from: owner key, signing keys, pinned artifacts.
    Show(ShowArgs),
}

/// Runs `smr policy`.
pub fn run(a: Args) -> Result<ExitCode> {
    let Cmd::Show(a) = a.cmd;
    let policy = NodePolicy::load(&a.policy, a.key.load()?)?;
    // The owner key is shown by the id of its public use (never the key).
    let owner = policy
        .owner
        .as_ref()
        .map(|k| smr_registry::signature::key_id(&k.0));
    let rule = if policy.is_open() {
        "any artifact (no owner key, signing key or pin configured)".to_string()
    } else {
        let mut r = Vec::new();
        if owner.is_some() {
            r.push("(a) its key table opens with the owner key");
        }
        if !policy.keys.is_empty() {
            r.push("(b) it is signed by a trusted key");
        }
        if !policy.pinned.is_empty() {
            r.push("(c) its digest is pinned");
        }
        format!("an artifact is used when {}", r.join(", or "))
    };
    if a.json {
        let owner_key = owner.as_ref().map(|id| {
            let file = a.key.key_file.as_ref().map(|p| p.display().to_string());
            serde_json::json!({ "file": file, "id": id })
        });
        let keys: Vec<serde_json::Value> = policy
            .keys
            .iter()
            .map(|k| serde_json::json!({ "name": k.name, "id": k.id, "algorithm": k.algorithm() }))
            .collect();
        let v = serde_json::json!({
            "policy_dir": policy.dir,
            "owner_key": owner_key,
            "signing_keys": keys,
            "pinned": policy.pinned,
            "rule": rule,
        });
        outln!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    outln!("policy directory: {}", policy.dir.display());
    match (&owner, &a.key.key_file) {
        (Some(id), Some(file)) => println!("owner key: {} (id {id})", file.display()),
        _ => println!("owner key: none"),
    }
    outln!("signing keys: {}", policy.keys.len());
    for k in &policy.keys {
        outln!("  {} {} (id {})", k.name, k.algorithm(), k.id);
    }
    outln!("pinned artifacts: {}", policy.pinned.len());
    for p in &policy.pinned {
        outln!("  {p}");
    }
    outln!("rule: {rule}");
    Ok(ExitCode::SUCCESS)
}
