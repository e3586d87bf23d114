//! What the command line (or a test) decides about talking to registries:
//! credentials, plain-HTTP hosts, timeouts, retries, upload strategy.

use crate::error::{RegistryError, Result};
use crate::reference::insecure_from_env;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// A user name and password (`--creds USER:PASS`). `Debug` hides the
/// password; it never appears in logs or errors.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The user name.
    pub username: String,
    /// The password or token.
    pub password: String,
}

impl Credentials {
    /// Parses `USER:PASS` (split at the first `:`; the password may contain
    /// more). The error does not echo the input.
    pub fn parse(s: &str) -> Result<Self> {
        match s.split_once(':') {
            Some((u, p)) if !u.is_empty() => Ok(Credentials {
                username: u.to_string(),
                password: p.to_string(),
            }),
            _ => Err(RegistryError::BadCredentials {
                reason: "expected USER:PASS".into(),
            }),
        }
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Retries of transient failures: `attempts` tries in all, waiting
/// `base * 2^n` (capped at `max`, with full jitter) between them, or what a
/// 429/503 `Retry-After` asked for (capped at `max_retry_after`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Tries in all (at least 1).
    pub attempts: u32,
    /// The first back-off.
    pub base: Duration,
    /// The longest back-off.
    pub max: Duration,
    /// The longest `Retry-After` we honour.
    pub max_retry_after: Duration,
}

impl Default for RetryPolicy {
    /// 4 tries, 250 ms doubling up to 5 s; `Retry-After` up to 60 s.
    fn default() -> Self {
        RetryPolicy {
            attempts: 4,
            base: Duration::from_millis(250),
            max: Duration::from_secs(5),
            max_retry_after: Duration::from_secs(60),
        }
    }
}

impl RetryPolicy {
    /// How long to wait before try `retry` (1 = the first retry).
    pub fn delay(&self, retry: u32, retry_after: Option<u64>) -> Duration {
        if let Some(s) = retry_after {
            return Duration::from_secs(s).min(self.max_retry_after);
        }
        smr_store::backoff(self.base, self.max, retry)
    }
}

/// How to reach registries. [`RegistryOptions::from_env`] is what the CLI
/// starts from; `Default` reads no environment (for tests).
#[derive(Debug, Clone)]
pub struct RegistryOptions {
    /// Explicit credentials (`--creds USER:PASS`); they win over the docker
    /// config.
    pub creds: Option<Credentials>,
    /// The directory holding docker's `config.json` (`auths`,
    /// `credHelpers`, `credsStore`), or `None` to not read one.
    pub docker_config: Option<PathBuf>,
    /// Registries (`host[:port]`, or `host` for every port) spoken to over
    /// plain HTTP besides loopback ones.
    pub insecure: Vec<String>,
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// Longest wait for the next bytes of a response.
    pub read_timeout: Duration,
    /// Retries of transient failures.
    pub retry: RetryPolicy,
    /// Blobs of at least this many bytes are uploaded in chunks (PATCH
    /// requests of 4 MiB); smaller ones in one PUT.
    pub chunked_upload_threshold: usize,
}

impl Default for RegistryOptions {
    fn default() -> Self {
        RegistryOptions {
            creds: None,
            docker_config: None,
            insecure: Vec::new(),
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(30),
            retry: RetryPolicy::default(),
            chunked_upload_threshold: 16 << 20,
        }
    }
}

impl RegistryOptions {
    /// Defaults plus the environment: `SMR_INSECURE_REGISTRIES`, and the
    /// docker config directory `$DOCKER_CONFIG`, else `$HOME/.docker`.
    pub fn from_env() -> Self {
        RegistryOptions {
            insecure: insecure_from_env(),
            docker_config: docker_config_dir(
                std::env::var_os("DOCKER_CONFIG"),
                std::env::var_os("HOME"),
            ),
            ..Default::default()
        }
    }
}

/// Docker's rule: `$DOCKER_CONFIG`, else `$HOME/.docker`.
pub(crate) fn docker_config_dir(
    docker_config: Option<std::ffi::OsString>,
    home: Option<std::ffi::OsString>,
) -> Option<PathBuf> {
    docker_config
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| home.map(|h| PathBuf::from(h).join(".docker")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creds_parse_and_hide() {
        let c = Credentials::parse("bob:se:cret").expect("parse");
        assert_eq!(c.username, "bob");
        assert_eq!(c.password, "se:cret");
        assert!(!format!("{c:?}").contains("se:cret"));
        let e = Credentials::parse("nopass").expect_err("no colon");
        assert!(!e.to_string().contains("nopass"));
        assert!(Credentials::parse(":x").is_err());
    }

    #[test]
    fn backoff_grows_is_capped_and_honours_retry_after() {
        let p = RetryPolicy::default();
        for _ in 0..50 {
            let d1 = p.delay(1, None);
            assert!(d1 >= Duration::from_millis(125) && d1 <= Duration::from_millis(250));
            let d3 = p.delay(3, None);
            assert!(d3 >= Duration::from_millis(500) && d3 <= Duration::from_secs(1));
            assert!(p.delay(30, None) <= Duration::from_secs(5));
        }
        assert_eq!(p.delay(1, Some(7)), Duration::from_secs(7));
        assert_eq!(p.delay(1, Some(7000)), Duration::from_secs(60));
    }

    #[test]
    fn docker_config_dir_follows_docker() {
        assert_eq!(
            docker_config_dir(Some("/cfg".into()), Some("/home/u".into())),
            Some(PathBuf::from("/cfg"))
        );
        assert_eq!(
            docker_config_dir(Some("".into()), Some("/home/u".into())),
            Some(PathBuf::from("/home/u/.docker"))
        );
        assert_eq!(docker_config_dir(None, None), None);
    }
}
