//! `smr keygen`: create an owner key file, or (`--cosign`) a signing key
//! pair in cosign's format.

use anyhow::{Context, Result};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Environment variable holding the password of a cosign private key
/// (cosign's own; empty when unset, as with `cosign generate-key-pair`).
pub const COSIGN_PASSWORD_ENV: &str = "COSIGN_PASSWORD";

/// Arguments of `smr keygen`.
#[derive(clap::Args)]
pub struct Args {
    /// Where to write the key (refuses to overwrite). With `--cosign`: the
    /// prefix of `PREFIX.key` and `PREFIX.pub`.
    #[arg(short = 'o', long)]
    out: PathBuf,
    /// Write an ECDSA P-256 signing key pair as `cosign generate-key-pair`
    /// does: `PREFIX.key` encrypted with `$COSIGN_PASSWORD`, `PREFIX.pub`.
    #[arg(long)]
    cosign: bool,
}

/// Writes 32 random bytes from the kernel's CSPRNG as 64 hex digits, or a
/// cosign key pair.
pub fn run(a: Args) -> Result<ExitCode> {
    if a.cosign {
        return cosign_pair(&a.out);
    }
    let mut key = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut key))
        .context("reading /dev/urandom")?;
    write_new(&a.out, format!("{}\n", hex::encode(key)).as_bytes(), 0o600)?;
    Ok(ExitCode::SUCCESS)
}

fn cosign_pair(prefix: &Path) -> Result<ExitCode> {
    let with = |ext: &str| {
        let mut p = prefix.as_os_str().to_owned();
        p.push(ext);
        PathBuf::from(p)
    };
    let key = smr_registry::signature::SigningKey::generate()?;
    let password = std::env::var(COSIGN_PASSWORD_ENV).unwrap_or_default();
    let (private, public) = key.to_cosign_pem(password.as_bytes())?;
    let (key_path, pub_path) = (with(".key"), with(".pub"));
    if pub_path.exists() {
        anyhow::bail!("{} exists; not overwriting it", pub_path.display());
    }
    write_new(&key_path, private.as_bytes(), 0o600)?;
    write_new(&pub_path, public.as_bytes(), 0o644)?;
    errln!(
        "wrote {} (private, encrypted with ${COSIGN_PASSWORD_ENV}) and {} (public, key id {})",
        key_path.display(),
        pub_path.display(),
        key.id
    );
    Ok(ExitCode::SUCCESS)
}

/// Creates `path` (never overwriting) with `mode` and writes `bytes`.
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("creating key file {}", path.display()))?;
    f.write_all(bytes)
        .with_context(|| format!("writing {}", path.display()))
}

/// Reads the cosign private key at `path`, decrypted with
/// `$COSIGN_PASSWORD` (empty when unset).
pub fn load_signing_key(path: &Path) -> Result<smr_registry::signature::SigningKey> {
    let pem = smr_format::read_bounded(path, 64 << 10)
        .with_context(|| format!("reading signing key {}", path.display()))?;
    let password = std::env::var(COSIGN_PASSWORD_ENV).unwrap_or_default();
    Ok(smr_registry::signature::SigningKey::from_cosign_pem(
        &pem,
        password.as_bytes(),
        &format!(
            "signing key {} (password from ${COSIGN_PASSWORD_ENV})",
            path.display()
        ),
    )?)
}
