//! Credentials: basic auth (htpasswd), docker config files and credential
//! helpers, bearer tokens with a refresh after a 401.

use super::fake::base64;
use super::token::{Signer, TokenRegistry, TokenService};
use super::util::*;
use smr_registry::client::{Credentials, Registry, RegistryOptions, Repository};
use smr_registry::{Blobs, RegistryError};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

const USER: &str = "alice";
const PASS: &str = "s3cret-Pa55";

fn repo_with(addr: &str, opts: RegistryOptions) -> Repository {
    Registry::new(addr, &opts)
        .expect("client")
        .repository("smr/auth")
        .expect("repo")
}

fn with_creds(user: &str, pass: &str) -> RegistryOptions {
    RegistryOptions {
        creds: Some(Credentials {
            username: user.into(),
            password: pass.into(),
        }),
        ..fast_options()
    }
}

/// Pushes a blob and a manifest and reads them back.
fn round_trip(repo: &Repository, seed: u64) {
    let data = random_bytes(10_000, seed);
    let d = digest(&data);
    repo.push_blob(&d, &data).expect("push");
    assert_eq!(repo.blob_size(&d).expect("head"), Some(10_000));
    assert!(repo.get_blob(&d, LIMIT).expect("get") == data);
    assert!(repo.get_blob_range(&d, 10, 10).expect("range") == data[10..20]);
    assert_eq!(repo.referrers(&d).expect("referrers"), None);
}

/// `e` is an authentication error that does not leak `secret`.
fn assert_auth_error(e: &RegistryError, secret: &str) {
    assert!(matches!(e, RegistryError::Auth { .. }), "{e}");
    for text in [e.to_string(), format!("{e:?}")] {
        assert!(!text.contains(secret), "secret leaked: {text}");
    }
}

#[test]
fn basic_auth_with_htpasswd() {
    let Some(reg) = TestRegistry::start(Some(&format!("{USER}:{PASS}"))) else {
        return;
    };
    let good = repo_with(&reg.addr, with_creds(USER, PASS));
    round_trip(&good, 1);
    assert!(!format!("{good:?}").contains(PASS));
    assert_eq!(good.registry().credential_source(), "--creds");

    let wrong_pass = "wrong-Pa55word";
    let bad = repo_with(&reg.addr, with_creds(USER, wrong_pass));
    let e = bad.get_manifest("latest").expect_err("wrong password");
    assert_auth_error(&e, wrong_pass);
    assert!(e.to_string().contains(&reg.addr), "{e}");
    assert!(e.to_string().contains("--creds"), "{e}");
    let e = bad
        .push_blob(&digest(b"x"), b"x")
        .expect_err("wrong password");
    assert_auth_error(&e, wrong_pass);

    let anon = repo_with(&reg.addr, fast_options());
    let e = anon.get_blob(&digest(b"x"), LIMIT).expect_err("anonymous");
    assert_auth_error(&e, PASS);
    assert!(e.to_string().contains("no credentials"), "{e}");
}

/// Writes `config.json` into a new temp dir.
fn docker_config(json: &str) -> tempfile::TempDir {
    let d = tempfile::tempdir().expect("tempdir");
    std::fs::write(d.path().join("config.json"), json).expect("config.json");
    d
}

#[test]
fn credentials_from_docker_config() {
    let Some(reg) = TestRegistry::start(Some(&format!("{USER}:{PASS}"))) else {
        return;
    };
    let auth = base64(format!("{USER}:{PASS}").as_bytes(), false);
    let cfg = docker_config(&format!(
        r#"{{"auths":{{"{}":{{"auth":"{auth}"}}}}}}"#,
        reg.addr
    ));
    let opts = RegistryOptions {
        docker_config: Some(cfg.path().to_path_buf()),
        ..fast_options()
    };
    let repo = repo_with(&reg.addr, opts);
    assert!(repo.registry().credential_source().contains("config.json"));
    round_trip(&repo, 2);

    // DOCKER_CONFIG is what from_env reads (this process's env is ours:
    // nextest runs each test in its own process).
    std::env::set_var("DOCKER_CONFIG", cfg.path());
    let opts = RegistryOptions {
        retry: fast_options().retry,
        ..RegistryOptions::from_env()
    };
    assert_eq!(opts.docker_config.as_deref(), Some(cfg.path()));
    round_trip(&repo_with(&reg.addr, opts), 3);
}

#[test]
fn credentials_from_a_credential_helper() {
    let Some(reg) = TestRegistry::start(Some(&format!("{USER}:{PASS}"))) else {
        return;
    };
    // docker-credential-smrtest on PATH, answering for our registry only.
    let bin = tempfile::tempdir().expect("tempdir");
    let helper = bin.path().join("docker-credential-smrtest");
    std::fs::write(
        &helper,
        format!(
            "#!/bin/sh\nread server\nif [ \"$server\" = \"{}\" ]; then\n  printf '{{\"ServerURL\":\"%s\",\"Username\":\"{USER}\",\"Secret\":\"{PASS}\"}}' \"$server\"\nelse\n  echo 'credentials not found in native keychain'; exit 1\nfi\n",
            reg.addr
        ),
    )
    .expect("helper");
    make_executable(&helper);
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs = vec![bin.path().to_path_buf()];
    dirs.extend(std::env::split_paths(&path));
    std::env::set_var("PATH", std::env::join_paths(dirs).expect("PATH"));

    for cfg in [
        format!(r#"{{"credHelpers":{{"{}":"smrtest"}}}}"#, reg.addr),
        r#"{"credsStore":"smrtest"}"#.to_string(),
    ] {
        let cfg = docker_config(&cfg);
        let opts = RegistryOptions {
            docker_config: Some(cfg.path().to_path_buf()),
            ..fast_options()
        };
        round_trip(&repo_with(&reg.addr, opts), 4);
    }
    // A credsStore that knows nothing about a host: anonymous.
    let cfg = docker_config(r#"{"credsStore":"smrtest"}"#);
    let opts = RegistryOptions {
        docker_config: Some(cfg.path().to_path_buf()),
        ..fast_options()
    };
    let other = Registry::new("other.example:5000", &opts).expect("anonymous fallback");
    assert_eq!(other.credential_source(), "no credentials");
}

fn make_executable(p: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let mut perm = std::fs::metadata(p).expect("stat").permissions();
    perm.set_mode(0o755);
    std::fs::set_permissions(p, perm).expect("chmod");
}

#[test]
fn bearer_tokens_and_refresh_after_401() {
    if !tools(&["docker-registry", "openssl"]) {
        return;
    }
    let t = tempfile::tempdir().expect("tempdir");
    let a = Signer::new(t.path(), "key-a");
    let b = Arc::new(Signer::new(t.path(), "key-b"));
    let a_cert = a.cert.clone();
    let svc = TokenService::start(a, USER, PASS);
    let realm = format!("http://{}/token", svc.server.addr);
    let mut reg = TokenRegistry::start(t.path(), &realm, &a_cert);

    let repo = repo_with(&reg.addr, with_creds(USER, PASS));
    round_trip(&repo, 5);
    let after_first = svc.issued.load(Ordering::SeqCst);
    assert!(
        after_first >= 2,
        "pull and push tokens issued: {after_first}"
    );

    // Wrong password: the token service refuses; the error says so
    // without the password.
    let wrong = "not-the-Pa55";
    let e = repo_with(&reg.addr, with_creds(USER, wrong))
        .get_blob(&digest(b"x"), LIMIT)
        .expect_err("wrong password");
    assert_auth_error(&e, wrong);
    assert!(e.to_string().contains("token service"), "{e}");
    let e = repo_with(&reg.addr, fast_options())
        .blob_size(&digest(b"x"))
        .expect_err("anonymous");
    assert_auth_error(&e, PASS);

    // Key rotation: the registry now rejects the cached tokens with 401;
    // the client gets new ones and carries on.
    *svc.signer.lock().expect("lock") = b.clone();
    reg.restart(&b.cert);
    let data = random_bytes(10_000, 5);
    let d = digest(&data);
    let before = svc.issued.load(Ordering::SeqCst);
    assert!(repo.get_blob(&d, LIMIT).expect("get after rotation") == data);
    assert_eq!(
        svc.issued.load(Ordering::SeqCst),
        before + 1,
        "the 401 made the client fetch one new pull token"
    );
    assert_eq!(
        repo.blob_size(&d).expect("head after rotation"),
        Some(10_000)
    );
    round_trip(&repo, 6);
}
