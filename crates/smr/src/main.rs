//! `smr`: Stream My Root. Thin command line over the smr libraries.

/// `println!` that ends the process quietly with status 141 (what a shell
/// reports for SIGPIPE) when standard output is a closed pipe, as other Unix
/// tools do, instead of panicking.
macro_rules! outln {
    () => {
        $crate::write_stdout(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::write_stdout(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `eprintln!` that ignores a closed or failing standard error: status
/// lines are not worth failing (or panicking) the work they describe.
macro_rules! errln {
    ($($arg:tt)*) => {
        $crate::write_stderr(format_args!("{}\n", format_args!($($arg)*)))
    };
}

mod cmd;
mod keys;
mod policy;
mod progress;
mod remote;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// Start containers without pulling their images.
#[derive(Parser)]
#[command(name = "smr", version, about)]
struct Cli {
    /// Log filter (also RUST_LOG), e.g. `debug` or `smr_image=trace`.
    #[arg(long, global = true, env = "SMR_LOG", default_value = "warn")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Convert an OCI image into chunks in a store and write its recipe.
    Convert(cmd::convert::Args),
    /// Show a recipe: image, chunks, config (`--json` for scripts).
    Inspect(cmd::inspect::Args),
    /// Rebuild the ext4 image from its chunks, verifying every chunk.
    Extract(cmd::extract::ExtractArgs),
    /// Check that every chunk of a recipe is present and intact.
    Verify(cmd::extract::VerifyArgs),
    /// Write a new random 32-byte owner key file (mode 0600).
    Keygen(cmd::keygen::Args),
    /// Serve an image over NBD (TCP or a UNIX socket), fetching chunks lazily.
    ServeNbd(cmd::serve::NbdArgs),
    /// Mount an image lazily, read-only (FUSE file + loop device + ext4).
    Mount(cmd::mount::MountArgs),
    /// Unmount what `smr mount` mounted and stop its server.
    Umount(cmd::mount::UmountArgs),
    /// Run a container from an image, fetching only the chunks it reads.
    Run(cmd::run::Args),
    /// Show or prune the node's chunk cache.
    Cache(cmd::cache::Args),
    /// Push or show startup profiles (recorded by `smr run --record-profile`).
    Profile(cmd::profile::Args),
    /// The node daemon: containerd's remote snapshotter over lazy images.
    Daemon(cmd::daemon::DaemonArgs),
    /// Show what the node daemon serves: snapshots, images, cache.
    Status(cmd::daemon::StatusArgs),
    /// Writable volumes: a base image plus a COW file and its map.
    Volume(cmd::volume::Args),
    /// Make a volume into a new image: only written chunks are stored.
    Commit(cmd::commit::Args),
    /// Delete the packs and chunks of a local store that no root recipe names.
    Gc(cmd::gc::Args),
    /// Chunk stores: `smr store migrate` packs a store of chunk files.
    Store(cmd::store::Args),
    /// The node's trust policy: which smr artifacts it runs.
    Policy(policy::Args),
    /// Pull an image into containerd, its layers served lazily by the
    /// smr snapshotter (like `ctr-remote image rpull`).
    Pull(cmd::daemon::PullArgs),
    /// The FUSE server behind `smr mount` (internal).
    #[command(name = "__serve-fuse", hide = true)]
    ServeFuse(cmd::serve::FuseArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cli.log));
    // Colours only on a terminal: logs written to files stay plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .init();
    let result = match cli.command {
        Command::Convert(a) => cmd::convert::run(a),
        Command::Inspect(a) => cmd::inspect::run(a),
        Command::Extract(a) => cmd::extract::run_extract(a),
        Command::Verify(a) => cmd::extract::run_verify(a),
        Command::Keygen(a) => cmd::keygen::run(a),
        Command::ServeNbd(a) => cmd::serve::run_nbd(a),
        Command::Mount(a) => cmd::mount::run_mount(a),
        Command::Umount(a) => cmd::mount::run_umount(a),
        Command::Run(a) => cmd::run::run(a),
        Command::Cache(a) => cmd::cache::run(a),
        Command::Profile(a) => cmd::profile::run(a),
        Command::Daemon(a) => cmd::daemon::run(a),
        Command::Pull(a) => cmd::daemon::run_pull(a),
        Command::Policy(a) => policy::run(a),
        Command::Volume(a) => cmd::volume::run(a),
        Command::Commit(a) => cmd::commit::run(a),
        Command::Gc(a) => cmd::gc::run(a),
        Command::Store(a) => cmd::store::run(a),
        Command::Status(a) => cmd::daemon::run_status(a),
        Command::ServeFuse(a) => cmd::serve::run_fuse(a),
    };
    match result {
        Ok(code) => code,
        Err(e) if broken_pipe(&e) => ExitCode::from(EXIT_BROKEN_PIPE),
        Err(e) => {
            errln!("smr: error: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes joined by `: `, skipping a cause whose text the
/// previous message already ends with (errors that print their source).
fn error_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.ends_with(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

/// Exit status for a closed standard output: 128 + SIGPIPE, what a shell
/// reports for a tool killed by the signal.
const EXIT_BROKEN_PIPE: u8 = 141;

/// Writes to standard output; a closed pipe ends the process quietly with
/// [`EXIT_BROKEN_PIPE`], any other failure with an error.
fn write_stdout(args: std::fmt::Arguments) {
    use std::io::Write;
    if let Err(e) = std::io::stdout().lock().write_fmt(args) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(EXIT_BROKEN_PIPE.into());
        }
        write_stderr(format_args!("smr: error: writing standard output: {e}\n"));
        std::process::exit(1);
    }
}

/// Writes to standard error, ignoring failure.
fn write_stderr(args: std::fmt::Arguments) {
    use std::io::Write;
    let _ = std::io::stderr().lock().write_fmt(args);
}

/// Whether `e` comes from writing to a closed pipe.
fn broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
