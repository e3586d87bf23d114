//! `smr keygen`: create an owner key file.

use anyhow::{Context, Result};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::process::ExitCode;

/// Arguments of `smr keygen`.
#[derive(clap::Args)]
pub struct Args {
    /// Where to write the key (refuses to overwrite).
    #[arg(short = 'o', long)]
    out: PathBuf,
}

/// Writes 32 random bytes from the kernel's CSPRNG as 64 hex digits.
pub fn run(a: Args) -> Result<ExitCode> {
    let mut key = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut key))
        .context("reading /dev/urandom")?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&a.out)
        .with_context(|| format!("creating key file {}", a.out.display()))?;
    writeln!(f, "{}", hex::encode(key)).with_context(|| format!("writing {}", a.out.display()))?;
    Ok(ExitCode::SUCCESS)
}
