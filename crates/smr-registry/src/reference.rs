//! Registry image references: `[docker://]host[:port]/name[:tag][@sha256:…]`.
//!
//! The grammar is Docker's (distribution's `reference` package): the first
//! path component is the registry host when it contains a `.` or a `:`, is
//! `localhost`, or is a bracketed IPv6 address; otherwise the image is on
//! Docker Hub (`docker.io`, with `library/` for one-component names). A
//! missing tag means `latest` unless a digest pins the image; when both are
//! given the digest wins and the tag is only kept for display.
//!
//! Written here rather than taken from `oci_client::Reference` (oci-spec's
//! parser) because that one rejects IPv6 hosts and reports only "invalid
//! reference format"; we name the part that is wrong and only accept the
//! digests the rest of smr can verify (sha256).
//!
//! Which scheme a registry is spoken to with is decided by [`scheme_for`]:
//! plain HTTP for loopback hosts (as Docker treats them as insecure
//! registries) and for hosts listed in `SMR_INSECURE_REGISTRIES`, HTTPS
//! otherwise.

use crate::error::{RegistryError, Result};
use smr_image::source::digest::parse_digest;
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

/// The transport prefix of registry references.
pub const DOCKER_PREFIX: &str = "docker://";

/// Docker Hub as written in references.
pub const DOCKER_HUB: &str = "docker.io";

/// Environment variable listing extra plain-HTTP registries
/// (`host[:port],…`).
pub const INSECURE_ENV: &str = "SMR_INSECURE_REGISTRIES";

/// Longest repository name the distribution spec allows.
const NAME_MAX: usize = 255;

/// A parsed registry image reference.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ImageRef {
    /// `host[:port]` as written (`[v6]:port` for IPv6), `docker.io` for
    /// Docker Hub.
    pub registry: String,
    /// The repository name, e.g. `library/debian`.
    pub repository: String,
    /// The tag, if given (or `latest` when neither tag nor digest was).
    pub tag: Option<String>,
    /// The pinned manifest digest (`sha256:…`), if given.
    pub digest: Option<String>,
}

impl ImageRef {
    /// Parses `[docker://]host[:port]/name[:tag][@sha256:…]`. Errors name the
    /// reference and the part that is wrong.
    pub fn parse(reference: &str) -> Result<Self> {
        let bad = |reason: String| RegistryError::BadReference {
            reference: reference.to_string(),
            reason,
        };
        let s = reference.strip_prefix(DOCKER_PREFIX).unwrap_or(reference);
        if s.is_empty() {
            return Err(bad("empty reference".into()));
        }
        if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(bad("contains whitespace or control characters".into()));
        }
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => {
                parse_digest(d).map_err(|_| {
                    bad(format!(
                        "digest `{d}` is not sha256:<64 lowercase hex digits>"
                    ))
                })?;
                (r, Some(d.to_string()))
            }
            None => (s, None),
        };
        let (registry, path) = split_host(rest);
        let registry = match registry {
            Some(h) => {
                check_host(h).map_err(bad)?;
                if h == "index.docker.io" {
                    DOCKER_HUB.to_string()
                } else {
                    h.to_string()
                }
            }
            None => DOCKER_HUB.to_string(),
        };
        // A tag is a `:` after the last `/` of the path.
        let last_slash = path.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match path[last_slash..].rfind(':') {
            Some(i) => {
                let at = last_slash + i;
                (&path[..at], Some(&path[at + 1..]))
            }
            None => (path, None),
        };
        check_name(name).map_err(bad)?;
        if let Some(t) = tag {
            check_tag(t).map_err(bad)?;
        }
        let mut repository = name.to_string();
        if registry == DOCKER_HUB && !repository.contains('/') {
            repository = format!("library/{repository}");
        }
        if repository.len() > NAME_MAX {
            return Err(bad(format!(
                "repository name is longer than {NAME_MAX} characters"
            )));
        }
        let tag = match (tag, &digest) {
            (Some(t), _) => Some(t.to_string()),
            (None, Some(_)) => None,
            (None, None) => Some("latest".to_string()),
        };
        Ok(ImageRef {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// What to ask the registry for: the digest if pinned, else the tag.
    pub fn manifest_reference(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .unwrap_or("latest")
    }

    /// `host/name` of the repository.
    pub fn repo_name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// Whether the registry is a loopback host (spoken to over plain HTTP).
    pub fn is_loopback(&self) -> bool {
        is_loopback(&self.registry)
    }
}

impl fmt::Display for ImageRef {
    /// `docker://host/name[:tag][@digest]`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{DOCKER_PREFIX}{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for ImageRef {
    type Err = RegistryError;

    fn from_str(s: &str) -> Result<Self> {
        ImageRef::parse(s)
    }
}

/// Splits off the registry host, if the first component names one.
fn split_host(s: &str) -> (Option<&str>, &str) {
    match s.split_once('/') {
        Some((first, rest))
            if first.contains('.')
                || first.contains(':')
                || first.starts_with('[')
                || first == "localhost" =>
        {
            (Some(first), rest)
        }
        _ => (None, s),
    }
}

/// `hostname[:port]` or `[ipv6][:port]`.
pub(crate) fn check_host(h: &str) -> std::result::Result<(), String> {
    let (host, port) = if let Some(v6) = h.strip_prefix('[') {
        let (addr, after) = v6
            .split_once(']')
            .ok_or_else(|| format!("registry `{h}`: unterminated `[`"))?;
        addr.parse::<Ipv6Addr>()
            .map_err(|_| format!("registry `{h}`: `{addr}` is not an IPv6 address"))?;
        match after {
            "" => (None, None),
            p => match p.strip_prefix(':') {
                Some(port) => (None, Some(port)),
                None => return Err(format!("registry `{h}`: junk after `]`")),
            },
        }
    } else {
        match h.rsplit_once(':') {
            Some((host, port)) => (Some(host), Some(port)),
            None => (Some(h), None),
        }
    };
    if let Some(host) = host {
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        if host.is_empty() || !host.split('.').all(label_ok) {
            return Err(format!("registry `{h}`: `{host}` is not a host name"));
        }
    }
    if let Some(p) = port {
        if !p.bytes().all(|b| b.is_ascii_digit()) || !matches!(p.parse::<u16>(), Ok(1..)) {
            return Err(format!("registry `{h}`: bad port `{p}`"));
        }
    }
    Ok(())
}

/// Path components `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*` joined by `/`.
fn check_name(name: &str) -> std::result::Result<(), String> {
    if name.is_empty() {
        return Err("missing repository name".into());
    }
    for comp in name.split('/') {
        if !component_ok(comp) {
            return Err(format!(
                "repository name component `{comp}` must be lowercase letters and digits, \
                 separated by `.`, `_`, `__` or dashes"
            ));
        }
    }
    Ok(())
}

fn component_ok(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: &u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.first().is_none_or(|x| !alnum(x)) || b.last().is_none_or(|x| !alnum(x)) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(&b[i]) {
            i += 1;
            continue;
        }
        // A separator run: `.`, `_`, `__` or one or more `-`.
        let start = i;
        while i < b.len() && !alnum(&b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        if !(sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-')) {
            return false;
        }
    }
    true
}

/// `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`.
fn check_tag(t: &str) -> std::result::Result<(), String> {
    let ok = !t.is_empty()
        && t.len() <= 128
        && !t.starts_with(['.', '-'])
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "tag `{t}` must be 1-128 letters, digits, `_`, `.` or `-`, not starting with `.` or `-`"
        ))
    }
}

/// The host part of `host[:port]` / `[v6]:port`, without brackets.
fn host_only(registry: &str) -> &str {
    if let Some(v6) = registry.strip_prefix('[') {
        return v6.split(']').next().unwrap_or(v6);
    }
    match registry.rsplit_once(':') {
        // A bare IPv6 address (not valid in references, but in env lists).
        Some(_) if registry.parse::<Ipv6Addr>().is_ok() => registry,
        Some((h, _)) => h,
        None => registry,
    }
}

/// Whether `registry` (`host[:port]`) is `localhost`, in 127.0.0.0/8 or `::1`.
pub fn is_loopback(registry: &str) -> bool {
    let host = host_only(registry);
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<Ipv4Addr>().is_ok_and(|a| a.is_loopback())
        || host.parse::<Ipv6Addr>().is_ok_and(|a| a.is_loopback())
}

/// How a registry is spoken to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// Plain HTTP (loopback and explicitly insecure registries).
    Http,
    /// HTTPS with certificate verification.
    Https,
}

impl Scheme {
    /// `http` or `https`.
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }
}

/// Plain HTTP for loopback registries and for those in `insecure` (entries
/// `host:port` match exactly, a bare `host` matches every port); HTTPS
/// otherwise.
pub fn scheme_for(registry: &str, insecure: &[String]) -> Scheme {
    let listed = insecure.iter().any(|e| {
        let e = e.trim();
        e.eq_ignore_ascii_case(registry)
            || (!e.is_empty() && e == host_only(e) && e.eq_ignore_ascii_case(host_only(registry)))
    });
    if listed || is_loopback(registry) {
        Scheme::Http
    } else {
        Scheme::Https
    }
}

/// Parses a `host[:port],…` list (the format of `SMR_INSECURE_REGISTRIES`).
pub fn parse_insecure_list(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// The registries listed in `SMR_INSECURE_REGISTRIES` (empty if unset).
pub fn insecure_from_env() -> Vec<String> {
    std::env::var(INSECURE_ENV)
        .map(|v| parse_insecure_list(&v))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn p(s: &str) -> ImageRef {
        ImageRef::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn parses_host_port_name_tag() {
        let r = p("docker://127.0.0.1:5000/smr/test:v1");
        assert_eq!(r.registry, "127.0.0.1:5000");
        assert_eq!(r.repository, "smr/test");
        assert_eq!(r.tag.as_deref(), Some("v1"));
        assert_eq!(r.digest, None);
        assert_eq!(r.manifest_reference(), "v1");
        assert_eq!(r.to_string(), "docker://127.0.0.1:5000/smr/test:v1");
        assert_eq!(r, p("127.0.0.1:5000/smr/test:v1"));
    }

    #[test]
    fn default_tag_and_digest_pinning() {
        let r = p("docker://localhost/a");
        assert_eq!(r.tag.as_deref(), Some("latest"));
        let r = p(&format!("docker://reg.example:443/a@{D}"));
        assert_eq!(r.tag, None);
        assert_eq!(r.manifest_reference(), D);
        assert_eq!(r.to_string(), format!("docker://reg.example:443/a@{D}"));
        let r = p(&format!("reg.example/a:t@{D}"));
        assert_eq!(r.tag.as_deref(), Some("t"));
        assert_eq!(r.manifest_reference(), D);
    }

    #[test]
    fn docker_hub_defaults() {
        let r = p("docker://debian:12");
        assert_eq!(r.registry, "docker.io");
        assert_eq!(r.repository, "library/debian");
        let r = p("index.docker.io/foo/bar");
        assert_eq!(r.registry, "docker.io");
        assert_eq!(r.repository, "foo/bar");
        assert_eq!(p("docker://user/img").repository, "user/img");
    }

    #[test]
    fn ipv6_hosts() {
        let r = p("docker://[::1]:5000/x:y");
        assert_eq!(r.registry, "[::1]:5000");
        assert!(r.is_loopback());
        assert!(ImageRef::parse("docker://[::1/x").is_err());
        assert!(ImageRef::parse("docker://[zz]:1/x").is_err());
    }

    #[test]
    fn errors_name_the_reference_and_part() {
        for (s, part) in [
            ("docker://", "empty"),
            ("docker://h.example/Upper", "Upper"),
            ("docker://h.example/a:", "tag ``"),
            ("docker://h.example/a:-x", "tag `-x`"),
            ("docker://h.example/a@sha256:12", "digest"),
            (
                "docker://h.example/a@md5:d41d8cd98f00b204e9800998ecf8427e",
                "digest",
            ),
            ("docker://h.example:99999/a", "port"),
            ("docker://h_x.example/a", "host name"),
            ("docker://h.example/a//b", "component ``"),
            ("docker://h.example/a--", "a--"),
            ("docker://h.example/a b", "whitespace"),
            ("docker://h.example/", "missing repository"),
        ] {
            let e = ImageRef::parse(s).expect_err(s).to_string();
            assert!(e.contains(s), "{e}");
            assert!(e.contains(part), "{s}: {e}");
        }
    }

    #[test]
    fn name_components() {
        for ok in ["a", "a.b", "a_b", "a__b", "a-b", "a---b", "0x"] {
            assert!(component_ok(ok), "{ok}");
        }
        for bad in ["", "-a", "a-", "a..b", "a___b", "a.-b", "A"] {
            assert!(!component_ok(bad), "{bad}");
        }
    }

    #[test]
    fn loopback_and_insecure() {
        for h in [
            "localhost",
            "localhost:5000",
            "127.0.0.1:5000",
            "127.9.9.9",
            "[::1]:80",
        ] {
            assert!(is_loopback(h), "{h}");
            assert_eq!(scheme_for(h, &[]), Scheme::Http, "{h}");
        }
        for h in [
            "reg.example",
            "10.0.0.1:5000",
            "[::2]:5000",
            "localhost.example",
        ] {
            assert!(!is_loopback(h), "{h}");
            assert_eq!(scheme_for(h, &[]), Scheme::Https, "{h}");
        }
        let list = parse_insecure_list(" reg.example:5000, ,10.0.0.1 ");
        assert_eq!(list, ["reg.example:5000", "10.0.0.1"]);
        assert_eq!(scheme_for("reg.example:5000", &list), Scheme::Http);
        assert_eq!(scheme_for("reg.example:5001", &list), Scheme::Https);
        assert_eq!(scheme_for("reg.example", &list), Scheme::Https);
        assert_eq!(scheme_for("10.0.0.1:443", &list), Scheme::Http);
    }
}
