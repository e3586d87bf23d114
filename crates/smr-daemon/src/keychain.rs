//! Registry credentials that kubelet hands to containerd's CRI plugin with
//! each `PullImage` (an image pull secret): the node daemon's CRI image
//! proxy ([`crate::cri`]) records them per registry host, so that the
//! image mounts and layer fetches the pull then causes can read the same
//! private repositories. Kept in memory only, for the daemon's life; the
//! node's docker config still applies where nothing was recorded.

use smr_registry::client::{Credentials, RegistryOptions};
use smr_registry::reference::ImageRef;
use std::collections::HashMap;
use std::sync::Mutex;

/// The environment variable that hands `USER:PASS` to an `smr` child
/// process (the image mounts), never its command line.
pub const CREDS_ENV: &str = "SMR_REGISTRY_CREDS";

/// Credentials by registry host (`host[:port]`), as `USER:PASS`.
#[derive(Default)]
pub struct Keychain {
    by_host: Mutex<HashMap<String, String>>,
}

impl std::fmt::Debug for Keychain {
    /// Hosts only, never a secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hosts: Vec<String> = self.lock().keys().cloned().collect();
        f.debug_struct("Keychain").field("hosts", &hosts).finish()
    }
}

impl Keychain {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        self.by_host.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records `user`/`password` (or `auth`, base64 of `USER:PASS`, as in
    /// a docker config) for the registry of `image` (a CRI image name,
    /// `host/repo:tag`); returns whether anything was recorded.
    pub fn record(&self, image: &str, user: &str, password: &str, auth: &str) -> bool {
        let Ok(r) = ImageRef::parse(image) else {
            return false;
        };
        let creds = if !user.is_empty() {
            format!("{user}:{password}")
        } else {
            use base64::Engine;
            match base64::engine::general_purpose::STANDARD.decode(auth.trim()) {
                Ok(b) if !b.is_empty() => String::from_utf8_lossy(&b).into_owned(),
                _ => return false,
            }
        };
        if Credentials::parse(&creds).is_err() {
            return false;
        }
        tracing::info!(registry = %r.registry, "registry credentials recorded from a CRI pull");
        self.lock().insert(r.registry, creds);
        true
    }

    /// `USER:PASS` recorded for the registry of `image` (`docker://…`).
    pub fn creds_for(&self, image: &str) -> Option<String> {
        let r = ImageRef::parse(image).ok()?;
        self.lock().get(&r.registry).cloned()
    }

    /// The registry options for `image`: the environment's (docker
    /// config), with the recorded credentials of its registry if any.
    pub fn options_for(&self, image: &str) -> RegistryOptions {
        let mut o = RegistryOptions::from_env();
        if let Some(c) = self
            .creds_for(image)
            .and_then(|c| Credentials::parse(&c).ok())
        {
            o.creds = Some(c);
        }
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_kept_per_registry_and_never_shown() {
        let k = Keychain::default();
        assert!(k.record("127.0.0.1:5000/team/py:1", "alice", "s3cret", ""));
        let auth = {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD.encode("bob:hunter2")
        };
        assert!(k.record("registry.example/app:v2", "", "", &auth));
        assert!(!k.record("registry.example/app:v2", "", "", "not base64!"));
        assert!(!k.record("no such ref@@", "x", "y", ""));
        assert_eq!(
            k.creds_for("docker://127.0.0.1:5000/other/image:2")
                .as_deref(),
            Some("alice:s3cret")
        );
        assert_eq!(
            k.creds_for(&format!(
                "docker://registry.example/app@sha256:{}",
                "0".repeat(64)
            ))
            .as_deref(),
            Some("bob:hunter2")
        );
        assert_eq!(k.creds_for("docker://elsewhere.example/app:1"), None);
        let shown = format!("{k:?}");
        assert!(
            !shown.contains("s3cret") && !shown.contains("hunter2"),
            "{shown}"
        );
    }
}
