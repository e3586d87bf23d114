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
    /// `push_blob_stream_chunked`, which always sends PATCHes). Built on
    /// first use ([`Core::oci`]): reads never need it unless the registry
    /// asks for a token, and building it loads the system's TLS roots.
    oci: tokio::sync::OnceCell<oci_client::Client>,
    /// For the requests oci-client cannot make.
    http: reqwest::Client,
    /// With plain HTTP, `http` has no TLS roots and stops at redirects to
    /// HTTPS (a registry handing blobs to its storage): they are followed
    /// by this client, which has the system's roots, built on first use.
    tls: std::sync::OnceLock<reqwest::Client>,
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
        // Plain HTTP needs no TLS roots; loading the system's takes tens
        // of milliseconds of every start.
        let builder = match scheme {
            Scheme::Http => http_builder(opts)
                .tls_certs_only([])
                .redirect(reqwest::redirect::Policy::custom(stop_at_https)),
            Scheme::Https => http_builder(opts),
        };
        let http = builder
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
            oci: tokio::sync::OnceCell::new(),
            http,
            tls: std::sync::OnceLock::new(),
            auth,
            opts: opts.clone(),
            raw_auth: Mutex::new(BTreeMap::new()),
        })
    }

    /// oci-client, built on first use and given the credentials (it looks
    /// them up per registry).
    pub async fn oci(&self) -> Result<&oci_client::Client> {
        self.oci
            .get_or_try_init(|| async {
                let config = ClientConfig {
                    protocol: match self.scheme {
                        Scheme::Http => ClientProtocol::Http,
                        Scheme::Https => ClientProtocol::Https,
                    },
                    use_monolithic_push: true,
                    // We select platforms ourselves (smr_image's resolver).
                    platform_resolver: None,
                    read_timeout: Some(self.opts.read_timeout),
                    connect_timeout: Some(self.opts.connect_timeout),
                    user_agent: USER_AGENT,
                    ..Default::default()
                };
                let oci = oci_client::Client::try_from(config).map_err(|e| {
                    RegistryError::ClientSetup {
                        registry: self.registry.clone(),
                        reason: e.to_string(),
                    }
                })?;
                oci.store_auth_if_needed(&self.host, &self.auth.auth).await;
                Ok(oci)
            })
            .await
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

    /// Opens `n` connections to the registry in the background, each with
    /// a `GET /v2/` whose answer is read and dropped, so that the requests
    /// sent at once a little later (the referrers API beside the fallback
    /// tag; manifests beside the blobs they list) find connections open rather than
    /// each paying a handshake: a round trip, three with TLS. The client
    /// keeps them for its later requests; a failure is only logged.
    pub fn warm_up(&self, n: usize) {
        let url = self.v2();
        for _ in 0..n {
            let (http, url) = (self.http.clone(), url.clone());
            smr_store::runtime::handle().spawn(async move {
                let answer = match http.get(&url).send().await {
                    Ok(r) => r.bytes().await.map(|_| ()),
                    Err(e) => Err(e),
                };
                if let Err(e) = answer {
                    tracing::debug!(%url, error = %e, "warming a registry connection failed");
                }
            });
        }
    }

    /// `scheme://host/v2/`: the API's base, which answers `GET` itself.
    fn v2(&self) -> String {
        format!("{}://{}/v2/", self.scheme.as_str(), self.host)
    }

    /// `scheme://host/v2/<repo>/<rest>`.
    fn url(&self, repo: &str, rest: &str) -> String {
        format!("{}{repo}/{rest}", self.v2())
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
        let raw = match self
            .oci()
            .await?
            .auth(&reference, &self.auth.auth, op)
            .await
        {
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
            .request(method.clone(), self.url(repo, rest))
            .headers(headers.clone());
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
        let resp = req.send().await.map_err(|e| from_reqwest(&e, ctx))?;
        let Some(to) = https_redirect(&resp) else {
            return Ok(resp);
        };
        // Credentials stay with the registry (as reqwest does for a
        // redirect to another host); the target's URL carries its own.
        let tls = match self.tls.get() {
            Some(c) => c,
            None => {
                let c = http_builder(&self.opts)
                    .build()
                    .map_err(|e| from_reqwest(&e, ctx))?;
                self.tls.get_or_init(|| c)
            }
        };
        tracing::debug!(repo = %ctx.repo, what = %ctx.what, %to, "following a redirect to HTTPS");
        tls.request(method, to)
            .headers(headers)
            .send()
            .await
            .map_err(|e| from_reqwest(&e, ctx))
    }
}

/// A client builder with our timeouts and `User-Agent`.
fn http_builder(opts: &RegistryOptions) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .connect_timeout(opts.connect_timeout)
        .read_timeout(opts.read_timeout)
        .user_agent(USER_AGENT)
}

/// Redirect policy of the plain-HTTP client: follows plain-HTTP
/// redirects as reqwest does (at most 10), stops at one to HTTPS
/// ([`https_redirect`] then takes it).
fn stop_at_https(a: reqwest::redirect::Attempt) -> reqwest::redirect::Action {
    if a.url().scheme() == "https" {
        a.stop()
    } else if a.previous().len() >= 10 {
        a.error("too many redirects")
    } else {
        a.follow()
    }
}

/// The HTTPS URL `resp` redirects to, if it is such a redirect.
fn https_redirect(resp: &reqwest::Response) -> Option<reqwest::Url> {
    if !resp.status().is_redirection() {
        return None;
    }
    let loc = resp
        .headers()
        .get(reqwest::header::LOCATION)?
        .to_str()
        .ok()?;
    resp.url().join(loc).ok().filter(|u| u.scheme() == "https")
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

#[cfg(test)]
mod tests {
    use super::super::test_server::{core_for, serve, serve_keep_alive};
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::{Duration, Instant};

    fn get(core: &std::sync::Arc<Core>, rest: &str) -> Result<(u16, String)> {
        let (core, rest) = (core.clone(), rest.to_string());
        smr_store::runtime::block_on(async move {
            let ctx = core.ctx("r/a", "test blob");
            let r = core
                .raw(
                    reqwest::Method::GET,
                    "r/a",
                    &rest,
                    None,
                    RegistryOperation::Pull,
                    &ctx,
                )
                .await?;
            let status = r.status().as_u16();
            Ok((status, r.text().await.unwrap_or_default()))
        })
    }

    #[test]
    fn plain_http_follows_http_redirects_and_takes_https_ones_with_tls() {
        // The HTTPS target: whatever connects to it must open with a TLS
        // handshake record (0x16).
        let (tls_addr, tls_seen) = serve(|_| Vec::new());
        let (addr, _) = serve(move |path| {
            match path {
            "/v2/r/a/blobs/moved" => {
                "HTTP/1.1 307 Temporary Redirect\r\nLocation: /v2/r/a/blobs/here\r\nContent-Length: 0\r\n\r\n".to_string()
            }
            "/v2/r/a/blobs/storage" => format!(
                "HTTP/1.1 307 Temporary Redirect\r\nLocation: https://{tls_addr}/bucket/x?sig=1\r\nContent-Length: 0\r\n\r\n"
            ),
            _ => "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello".to_string(),
        }
        .into_bytes()
        });
        let core = core_for(&addr);
        assert_eq!(core.scheme, Scheme::Http);
        assert_eq!(
            get(&core, "blobs/moved").expect("followed"),
            (200, "hello".into())
        );
        let err = get(&core, "blobs/storage").expect_err("no TLS server there");
        let first = tls_seen
            .recv_timeout(Duration::from_secs(5))
            .expect("connected");
        assert_eq!(first.first(), Some(&0x16), "a TLS handshake, got {first:?}");
        assert!(err.to_string().contains("r/a"), "{err}");
        assert!(core.tls.get().is_some());
    }

    /// Two requests sent at once, as a lookup's steps send them; returns
    /// their answers.
    fn two_at_once(core: &std::sync::Arc<Core>) -> Vec<(u16, String)> {
        let (a, b) = (core.clone(), core.clone());
        let first = std::thread::spawn(move || get(&a, "manifests/x"));
        let second = get(&b, "blobs/y").expect("second");
        vec![first.join().expect("thread").expect("first"), second]
    }

    fn wait_for(n: &AtomicUsize, want: usize) {
        let t = Instant::now();
        while n.load(Ordering::SeqCst) < want && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(n.load(Ordering::SeqCst), want);
    }

    #[test]
    fn warmed_connections_serve_the_requests_sent_at_once() {
        // Answers take long enough that requests sent together overlap.
        let slow = Duration::from_millis(300);
        // Without warming, two requests at once open two connections.
        let (addr, accepted, _) = serve_keep_alive("{}", slow);
        let cold = core_for(&addr);
        assert_eq!(two_at_once(&cold), vec![(200, "{}".into()); 2]);
        assert_eq!(accepted.load(Ordering::SeqCst), 2);

        let (addr, accepted, answered) = serve_keep_alive("{}", slow);
        let core = core_for(&addr);
        core.warm_up(2);
        wait_for(&answered, 2);
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        // The client pools a connection once it has read the answer: give
        // it a moment after the server wrote it.
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(two_at_once(&core), vec![(200, "{}".into()); 2]);
        // The server counts an answer after writing it: the client can
        // have read both before the second is counted.
        wait_for(&answered, 4);
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            2,
            "the requests took the warmed connections"
        );
    }
}
