//! Where credentials come from, and keeping them out of messages.
//!
//! Order: explicit `--creds`, then docker's `config.json` (`credHelpers`,
//! `auths` with `auth`/`username`+`password`, `credsStore`, read through the
//! `docker_credential` crate), then anonymous. The bearer-token dance itself
//! (challenge, token request with these credentials) is oci-client's.

use super::options::RegistryOptions;
use crate::error::{RegistryError, Result};
use crate::reference::DOCKER_HUB;
use docker_credential::{CredentialRetrievalError, DockerCredential};
use oci_client::secrets::RegistryAuth;
use std::path::Path;

/// The key docker uses for Docker Hub in `config.json`.
const DOCKER_HUB_KEY: &str = "https://index.docker.io/v1/";

/// Credentials for one registry and where they came from.
#[derive(Clone)]
pub(crate) struct ResolvedAuth {
    /// What oci-client sends.
    pub auth: RegistryAuth,
    /// Where the credentials came from, for messages (`--creds`,
    /// `docker config /path/config.json`, `no credentials`).
    pub source: String,
    /// Strings that must never appear in messages (the password).
    secrets: Vec<String>,
}

impl std::fmt::Debug for ResolvedAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // RegistryAuth's Debug redacts the password.
        f.debug_struct("ResolvedAuth")
            .field("auth", &self.auth)
            .field("source", &self.source)
            .finish()
    }
}

impl ResolvedAuth {
    /// No credentials.
    pub fn anonymous() -> Self {
        ResolvedAuth {
            auth: RegistryAuth::Anonymous,
            source: "no credentials".into(),
            secrets: Vec::new(),
        }
    }

    fn basic(username: String, password: String, source: String) -> Self {
        let secrets = if password.is_empty() {
            Vec::new()
        } else {
            vec![password.clone()]
        };
        ResolvedAuth {
            auth: RegistryAuth::Basic(username, password),
            source,
            secrets,
        }
    }

    /// Whether we have something to send.
    pub fn has_credentials(&self) -> bool {
        !matches!(self.auth, RegistryAuth::Anonymous)
    }

    /// The basic credentials, if any.
    pub fn basic_pair(&self) -> Option<(&str, &str)> {
        match &self.auth {
            RegistryAuth::Basic(u, p) => Some((u, p)),
            _ => None,
        }
    }

    /// `s` with every secret replaced by `***`.
    pub fn scrub(&self, s: &str) -> String {
        let mut out = s.to_string();
        for secret in &self.secrets {
            if out.contains(secret.as_str()) {
                out = out.replace(secret.as_str(), "***");
            }
        }
        out
    }

    /// Scrubs the free-text parts of `e`.
    pub fn scrub_error(&self, e: RegistryError) -> RegistryError {
        if self.secrets.is_empty() {
            return e;
        }
        match e {
            RegistryError::Auth { registry, reason } => RegistryError::Auth {
                registry,
                reason: self.scrub(&reason),
            },
            RegistryError::Protocol { repo, what, reason } => RegistryError::Protocol {
                repo,
                what,
                reason: self.scrub(&reason),
            },
            RegistryError::Transient {
                repo,
                what,
                reason,
                retry_after,
            } => RegistryError::Transient {
                repo,
                what,
                reason: self.scrub(&reason),
                retry_after,
            },
            other => other,
        }
    }
}

/// The credentials to use for `registry` (`host[:port]` as in references).
pub(crate) fn resolve(registry: &str, opts: &RegistryOptions) -> Result<ResolvedAuth> {
    if let Some(c) = &opts.creds {
        return Ok(ResolvedAuth::basic(
            c.username.clone(),
            c.password.clone(),
            "--creds".into(),
        ));
    }
    match &opts.docker_config {
        Some(dir) => from_docker_config(registry, &dir.join("config.json")),
        None => Ok(ResolvedAuth::anonymous()),
    }
}

/// Looks `registry` up in docker config file `path` (missing file: none).
pub(crate) fn from_docker_config(registry: &str, path: &Path) -> Result<ResolvedAuth> {
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            tracing::debug!(config = %path.display(), "no docker config");
            return Ok(ResolvedAuth::anonymous());
        }
        Err(source) => {
            return Err(RegistryError::Io {
                what: format!("reading docker config {}", path.display()),
                source,
            })
        }
    };
    let server = if registry == DOCKER_HUB {
        DOCKER_HUB_KEY
    } else {
        registry
    };
    let source = format!("docker config {}", path.display());
    let fail = |reason: String| RegistryError::Auth {
        registry: registry.to_string(),
        reason: format!("{source}: {reason}"),
    };
    match docker_credential::get_credential_from_reader(std::io::BufReader::new(file), server) {
        Ok(DockerCredential::UsernamePassword(u, p)) => {
            tracing::debug!(registry, %source, "using credentials");
            Ok(ResolvedAuth::basic(u, p, source))
        }
        Ok(DockerCredential::IdentityToken(_)) => {
            tracing::warn!(
                registry,
                %source,
                "the docker config holds an identity token (OAuth refresh token), which smr \
                 cannot use; continuing without credentials"
            );
            Ok(ResolvedAuth::anonymous())
        }
        Err(CredentialRetrievalError::NoCredentialConfigured) => Ok(ResolvedAuth::anonymous()),
        // Helpers answer "credentials not found" for hosts they do not know;
        // with a global credsStore that is the normal case.
        Err(CredentialRetrievalError::HelperFailure { stdout, .. })
            if stdout
                .to_ascii_lowercase()
                .contains("credentials not found") =>
        {
            Ok(ResolvedAuth::anonymous())
        }
        // Not the helper's stdout/stderr: they might echo secrets.
        Err(CredentialRetrievalError::HelperFailure { helper, .. }) => {
            Err(fail(format!("credential helper {helper} failed")))
        }
        Err(CredentialRetrievalError::HelperCommunicationError) => Err(fail(
            "cannot run the credential helper (docker-credential-* not on PATH?)".into(),
        )),
        Err(e) => Err(fail(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_config(json: &str) -> (tempfile::TempDir, std::path::PathBuf) {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("config.json");
        std::fs::write(&p, json).expect("write");
        (d, p)
    }

    #[test]
    fn auths_base64_and_plain() {
        // "alice:pa:ss" in base64.
        let (_d, p) = write_config(
            r#"{"auths":{"reg.example:5000":{"auth":"YWxpY2U6cGE6c3M="},
                "https://index.docker.io/v1/":{"username":"hub","password":"hubpw"}}}"#,
        );
        let a = from_docker_config("reg.example:5000", &p).expect("resolve");
        assert_eq!(a.basic_pair(), Some(("alice", "pa:ss")));
        assert!(a.source.contains("config.json"));
        let a = from_docker_config(DOCKER_HUB, &p).expect("resolve hub");
        assert_eq!(a.basic_pair(), Some(("hub", "hubpw")));
        let a = from_docker_config("other.example", &p).expect("resolve other");
        assert!(!a.has_credentials());
    }

    #[test]
    fn missing_config_is_anonymous_and_garbage_is_an_error() {
        let d = tempfile::tempdir().expect("tempdir");
        let a = from_docker_config("r.example", &d.path().join("config.json")).expect("none");
        assert!(!a.has_credentials());
        let (_d, p) = write_config("{not json");
        let e = from_docker_config("r.example", &p).expect_err("garbage");
        assert!(matches!(e, RegistryError::Auth { .. }), "{e}");
        assert!(e.to_string().contains("config.json"), "{e}");
    }

    #[test]
    fn missing_helper_is_an_auth_error() {
        let (_d, p) = write_config(r#"{"credHelpers":{"r.example":"smr-no-such-helper"}}"#);
        let e = from_docker_config("r.example", &p).expect_err("no helper");
        assert!(matches!(e, RegistryError::Auth { .. }), "{e}");
    }

    #[test]
    fn explicit_creds_win_and_are_scrubbed() {
        let (d, _p) = write_config(r#"{"auths":{"r.example":{"auth":"YWxpY2U6cGE6c3M="}}}"#);
        let opts = RegistryOptions {
            creds: Some(super::super::options::Credentials {
                username: "u".into(),
                password: "hunter2".into(),
            }),
            docker_config: Some(d.path().to_path_buf()),
            ..Default::default()
        };
        let a = resolve("r.example", &opts).expect("resolve");
        assert_eq!(a.basic_pair(), Some(("u", "hunter2")));
        assert_eq!(a.source, "--creds");
        assert_eq!(a.scrub("server said hunter2!"), "server said ***!");
        assert!(!format!("{a:?}").contains("hunter2"));
        let e = a.scrub_error(RegistryError::Auth {
            registry: "r".into(),
            reason: "bad hunter2".into(),
        });
        assert!(!e.to_string().contains("hunter2"));
    }
}
