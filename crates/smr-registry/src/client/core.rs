//! The async heart of the client: one registry's oci-client, the retry
//! loop, credential refresh, and the few requests oci-client cannot make.
//!
//! Written by hand (with reqwest, which oci-client uses too):
//! - `HEAD /v2/<name>/blobs/<digest>` for a blob's size: oci-client's
//!   `blob_exists` only says yes or no.
//! - `GET /v2/<name>/referrers/<digest>`: oci-client's `pull_referrers`
//!   silently falls back to the tag schema on 404, and our callers must
//!   know whether the registry supports the API (they maintain the
//!   fallback tag when it does not).
//!
//! These requests carry the same credentials: a bearer token obtained
//! through oci-client's `auth` (which also refreshes oci-client's own token
//! cache), or basic credentials when the registry asks for them.

use super::auth::ResolvedAuth;
use super::classify::{from_oci, from_reqwest, Ctx};
use super::options::RegistryOptions;
use crate::error::{RegistryError, Result};
use crate::reference::{scheme_for, Scheme, DOCKER_HUB};
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::{Reference, RegistryOperation};
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Mutex;

/// `User-Agent` of every request.
const USER_AGENT: &str = concat!("smr/", env!("CARGO_PKG_VERSION"));

/// Credentials attached to our own (non-oci-client) requests.
#[derive(Clone)]
enum RawAuth {
    /// Basic credentials (the registry challenged with `Basic`).
    Basic,
    /// A bearer token from the token service.
    Bearer(String),
}

/// One registry: clients, credentials, policy.
pub(crate) struct Core {
    /// The registry as written in references (`host[:port]`, `docker.io`).
    pub registry: String,
    /// The host requests go to (`index.docker.io` for `docker.io`).
    host: String,
    /// HTTP or HTTPS.
    pub scheme: Scheme,
    /// oci-client, configured for monolithic uploads (chunked ones use
    /// `push_blob_stream_chunked`, which always sends PATCHes).
    pub oci: oci_client::Client,
    /// For the requests oci-client cannot make.
    http: reqwest::Client,
    /// Credentials and where they came from.
    pub auth: ResolvedAuth,
    /// Timeouts, retries, upload strategy.
    pub opts: RegistryOptions,
    /// Credentials for our own requests, per (repository, operation).
    raw_auth: Mutex<BTreeMap<(String, RegistryOperation), RawAuth>>,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("registry", &self.registry)
            .field("scheme", &self.scheme)
            .field("credentials", &self.auth.source)
            .finish_non_exhaustive()
    }
}

impl Core {
    /// Sets up clients for `registry` with `auth`.
    pub fn new(registry: &str, auth: ResolvedAuth, opts: &RegistryOptions) -> Result<Core> {
        let scheme = scheme_for(registry, &opts.insecure);
        let setup = |reason: String| RegistryError::ClientSetup {
            registry: registry.to_string(),
            reason,
        };
        let config = ClientConfig {
            protocol: match scheme {
                Scheme::Http => ClientProtocol::Http,
                Scheme::Https => ClientProtocol::Https,
            },
            use_monolithic_push: true,
            // We select platforms ourselves (smr_image's resolver).
            platform_resolver: None,
            read_timeout: Some(opts.read_timeout),
            connect_timeout: Some(opts.connect_timeout),
            user_agent: USER_AGENT,
            ..Default::default()
        };
        let oci = oci_client::Client::try_from(config).map_err(|e| setup(e.to_string()))?;
        let http = reqwest::Client::builder()
            .connect_timeout(opts.connect_timeout)
            .read_timeout(opts.read_timeout)
            .user_agent(USER_AGENT)
            .build()
            .map_err(|e| setup(super::classify::chain(&e)))?;
        let host = Reference::with_tag(registry.to_string(), "x".into(), "x".into())
            .resolve_registry()
            .to_string();
        if registry == DOCKER_HUB {
            tracing::debug!(%host, "Docker Hub");
        }
        Ok(Core {
            registry: registry.to_string(),
            host,
            scheme,
            oci,
            http,
            auth,
            opts: opts.clone(),
            raw_auth: Mutex::new(BTreeMap::new()),
        })
    }

    /// Hands the credentials to oci-client (it looks them up per registry).
    pub async fn install_auth(&self) {
        self.oci
            .store_auth_if_needed(&self.host, &self.auth.auth)
            .await;
    }

    /// `host/name` of `repo`.
    pub fn repo_name(&self, repo: &str) -> String {
        format!("{}/{repo}", self.registry)
    }

    /// A message context.
    pub fn ctx(&self, repo: &str, what: impl Into<String>) -> Ctx {
        Ctx {
            registry: self.registry.clone(),
            repo: self.repo_name(repo),
            what: what.into(),
        }
    }

    /// An oci-client reference to `repo` at tag or digest `at`.
    pub fn reference(&self, repo: &str, at: &str) -> Reference {
        if at.starts_with("sha256:") {
            Reference::with_digest(self.registry.clone(), repo.to_string(), at.to_string())
        } else {
            Reference::with_tag(self.registry.clone(), repo.to_string(), at.to_string())
        }
    }

    /// `scheme://host/v2/<repo>/<rest>`.
    fn url(&self, repo: &str, rest: &str) -> String {
        format!("{}://{}/v2/{repo}/{rest}", self.scheme.as_str(), self.host)
    }

    /// The final form of an error leaving the client: secrets scrubbed,
    /// authentication failures saying which credentials were used.
    pub fn finish(&self, e: RegistryError) -> RegistryError {
        let e = match e {
            RegistryError::Auth { registry, reason } => {
                let hint = if self.auth.has_credentials() {
                    format!("credentials from {}", self.auth.source)
                } else {
                    "no credentials; use --creds USER:PASS or docker login".into()
                };
                RegistryError::Auth {
                    registry,
                    reason: format!("{reason} ({hint})"),
                }
            }
            other => other,
        };
        self.auth.scrub_error(e)
    }

    /// Asks for fresh credentials for `repo` and `op` after a 401: a new
    /// bearer token (oci-client caches it for its own requests as well), or
    /// basic credentials when the registry does not use tokens.
    pub async fn refresh(&self, repo: &str, op: RegistryOperation) -> Result<()> {
        let reference = self.reference(repo, "latest");
        let ctx = self.ctx(repo, "authenticating");
        let raw = match self.oci.auth(&reference, &self.auth.auth, op).await {
            Ok(Some(token)) => Some(RawAuth::Bearer(token)),
            Ok(None) if self.auth.basic_pair().is_some() => Some(RawAuth::Basic),
            Ok(None) => None,
            Err(e) => return Err(from_oci(e, &ctx)),
        };
        tracing::debug!(repo = %ctx.repo, ?op, bearer = matches!(raw, Some(RawAuth::Bearer(_))), "credentials refreshed");
        let mut map = self.raw_auth.lock().unwrap_or_else(|p| p.into_inner());
        match raw {
            Some(r) => map.insert((repo.to_string(), op), r),
            None => map.remove(&(repo.to_string(), op)),
        };
        Ok(())
    }

    /// Runs `attempt` until it succeeds, retrying transient failures with
    /// back-off and refreshing credentials once after an authentication
    /// failure (an expired token).
    pub async fn retry<T, F, Fut>(
        &self,
        repo: &str,
        op: RegistryOperation,
        ctx: &Ctx,
        mut attempt: F,
    ) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let mut tries = 0u32;
        let mut refreshed = false;
        loop {
            tries += 1;
            let err = match attempt().await {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            match self
                .next_step(repo, op, ctx, &err, tries, &mut refreshed)
                .await
            {
                Step::Retry => continue,
                Step::RetryAfterRefresh => {
                    tries -= 1;
                    continue;
                }
                Step::Fail(e) => return Err(self.finish(e.unwrap_or(err))),
            }
        }
    }

    /// What to do after failure `err` of try number `tries`: wait and
    /// retry, refresh credentials and retry, or give up (with `err` or the
    /// refresh's error).
    pub async fn next_step(
        &self,
        repo: &str,
        op: RegistryOperation,
        ctx: &Ctx,
        err: &RegistryError,
        tries: u32,
        refreshed: &mut bool,
    ) -> Step {
        match err {
            RegistryError::Auth { .. } if !*refreshed => {
                *refreshed = true;
                tracing::debug!(repo = %ctx.repo, what = %ctx.what, "unauthorized: refreshing credentials");
                match self.refresh(repo, op).await {
                    Ok(()) => Step::RetryAfterRefresh,
                    // The token service refused: its reason is the news.
                    Err(e @ RegistryError::Auth { .. }) => Step::Fail(Some(e)),
                    // It could not be reached: back off and try again.
                    Err(e) if e.is_transient() && tries < self.opts.retry.attempts.max(1) => {
                        *refreshed = false;
                        self.back_off(ctx, &e, tries).await;
                        Step::Retry
                    }
                    Err(e) if e.is_transient() => Step::Fail(Some(e)),
                    Err(_) => Step::Fail(None),
                }
            }
            e if e.is_transient() && tries < self.opts.retry.attempts.max(1) => {
                self.back_off(ctx, e, tries).await;
                Step::Retry
            }
            _ => Step::Fail(None),
        }
    }

    /// Logs transient failure `e` of try `tries` and sleeps the back-off.
    async fn back_off(&self, ctx: &Ctx, e: &RegistryError, tries: u32) {
        let delay = self.opts.retry.delay(tries, e.retry_after());
        tracing::warn!(
            repo = %ctx.repo,
            what = %ctx.what,
            attempt = tries,
            delay_ms = delay.as_millis() as u64,
            error = %self.auth.scrub(&e.to_string()),
            "registry request failed; retrying"
        );
        tokio::time::sleep(delay).await;
    }

    /// Sends one of our own requests to `repo` (`rest` after
    /// `/v2/<repo>/`) with the credentials we hold for `op`. Any status is
    /// returned; only failures to get a response are errors.
    pub async fn raw(
        &self,
        method: reqwest::Method,
        repo: &str,
        rest: &str,
        accept: Option<&str>,
        op: RegistryOperation,
        ctx: &Ctx,
    ) -> Result<reqwest::Response> {
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(a) = accept.and_then(|a| reqwest::header::HeaderValue::from_str(a).ok()) {
            headers.insert(reqwest::header::ACCEPT, a);
        }
        self.raw_with(method, repo, rest, headers, op, ctx).await
    }

    /// [`Core::raw`] with extra request headers (e.g. `Range`).
    pub async fn raw_with(
        &self,
        method: reqwest::Method,
        repo: &str,
        rest: &str,
        headers: reqwest::header::HeaderMap,
        op: RegistryOperation,
        ctx: &Ctx,
    ) -> Result<reqwest::Response> {
        let mut req = self
            .http
            .request(method, self.url(repo, rest))
            .headers(headers);
        let cred = self
            .raw_auth
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(repo.to_string(), op))
            .cloned();
        req = match (cred, self.auth.basic_pair()) {
            (Some(RawAuth::Bearer(t)), _) => req.bearer_auth(t),
            (Some(RawAuth::Basic), Some((u, p))) => req.basic_auth(u, Some(p)),
            _ => req,
        };
        req.send().await.map_err(|e| from_reqwest(&e, ctx))
    }
}

/// The retry loop's decision.
pub(crate) enum Step {
    /// Try again (after the back-off already slept).
    Retry,
    /// Try again at once with refreshed credentials (does not count).
    RetryAfterRefresh,
    /// Give up, with this error or (`None`) the one that ended the try.
    Fail(Option<RegistryError>),
}
