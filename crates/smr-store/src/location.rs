//! Store locations: parsed once into a [`StoreLocation`], and credential
//! redaction for messages.

use crate::{ChunkStore, HttpStore, LocalStore, RemoteOptions, Result, S3Store, StoreError};
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// Where a chunk store is, parsed from its location text: a directory
/// path or `file://` URL, `s3://bucket[/prefix]`, or `http(s)://…`
/// (schemes are case-insensitive). [`std::fmt::Display`] shows it without
/// credentials.
#[derive(Clone, PartialEq, Eq)]
pub enum StoreLocation {
    /// A local directory.
    Local(PathBuf),
    /// An S3-compatible bucket (the location as given).
    S3(String),
    /// A read-only HTTP(S) server (the location as given).
    Http(String),
}

impl FromStr for StoreLocation {
    type Err = StoreError;

    fn from_str(location: &str) -> Result<Self> {
        Ok(match scheme(location) {
            Scheme::Local => StoreLocation::Local(PathBuf::from(
                location
                    .split_once("://")
                    .map_or(location, |(_, path)| path),
            )),
            Scheme::S3 => StoreLocation::S3(location.to_string()),
            Scheme::Http => StoreLocation::Http(location.to_string()),
            Scheme::Other => return Err(StoreError::Unsupported(redact(location))),
        })
    }
}

impl StoreLocation {
    /// The directory of a local store.
    pub fn local_dir(&self) -> Option<&Path> {
        match self {
            StoreLocation::Local(dir) => Some(dir),
            _ => None,
        }
    }

    /// Opens the store; remote ones with `options`.
    pub fn open_with(&self, options: RemoteOptions) -> Result<Box<dyn ChunkStore>> {
        Ok(match self {
            StoreLocation::Local(dir) => Box::new(LocalStore::open(dir)?),
            StoreLocation::S3(l) => Box::new(S3Store::open(l, options)?),
            StoreLocation::Http(l) => Box::new(HttpStore::open(l, options)?),
        })
    }

    /// Opens the store; remote ones with [`RemoteOptions::from_env`].
    pub fn open(&self) -> Result<Box<dyn ChunkStore>> {
        let options = match self {
            StoreLocation::Local(_) => RemoteOptions::default(),
            _ => RemoteOptions::from_env()?,
        };
        self.open_with(options)
    }
}

impl std::fmt::Display for StoreLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreLocation::Local(dir) => write!(f, "{}", dir.display()),
            StoreLocation::S3(l) | StoreLocation::Http(l) => f.write_str(&redact(l)),
        }
    }
}

impl std::fmt::Debug for StoreLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StoreLocation({self})")
    }
}

/// The kind of store a location names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scheme {
    /// A directory path or `file://` URL.
    Local,
    /// `s3://bucket/prefix`.
    S3,
    /// `http://` or `https://`.
    Http,
    /// Any other `scheme://`.
    Other,
}

/// What kind of store `location` names (schemes are case-insensitive).
pub(crate) fn scheme(location: &str) -> Scheme {
    match location.split_once("://") {
        None => Scheme::Local,
        Some((s, _)) => match s.to_ascii_lowercase().as_str() {
            "file" => Scheme::Local,
            "s3" => Scheme::S3,
            "http" | "https" => Scheme::Http,
            _ => Scheme::Other,
        },
    }
}

/// `location` without the userinfo (`user:password@`) of its authority, so
/// it can appear in messages and logs.
pub(crate) fn redact(location: &str) -> String {
    let Some((scheme, rest)) = location.split_once("://") else {
        return location.to_string();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let host = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    format!("{scheme}://{host}{tail}")
}

/// Decodes `%XX` escapes (as in URL userinfo); invalid escapes stay as they
/// are, invalid UTF-8 is replaced.
pub(crate) fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (b, hex) {
            (b'%', Some(v)) => {
                out.push(v);
                i += 3;
            }
            _ => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_parse_once() {
        let local = |l: &str| {
            l.parse::<StoreLocation>()
                .unwrap()
                .local_dir()
                .map(Path::to_path_buf)
        };
        assert_eq!(local("./store"), Some(PathBuf::from("./store")));
        assert_eq!(local("file:///s"), Some(PathBuf::from("/s")));
        assert_eq!(local("FILE:///s"), Some(PathBuf::from("/s")));
        assert_eq!(local("s3://b/p"), None);
        assert_eq!(local("https://cdn/p"), None);
        let http: StoreLocation = "https://u:secret@cdn/p".parse().unwrap();
        assert_eq!(http.to_string(), "https://cdn/p");
        assert!(!format!("{http:?}").contains("secret"));
        let e = "gs://k:secret@b".parse::<StoreLocation>().unwrap_err();
        assert!(matches!(e, StoreError::Unsupported(_)), "{e}");
    }

    #[test]
    fn schemes() {
        assert_eq!(scheme("/var/store"), Scheme::Local);
        assert_eq!(scheme("rel/store"), Scheme::Local);
        assert_eq!(scheme("file:///var/store"), Scheme::Local);
        assert_eq!(scheme("S3://bucket/p"), Scheme::S3);
        assert_eq!(scheme("http://h/p"), Scheme::Http);
        assert_eq!(scheme("HTTPS://h"), Scheme::Http);
        assert_eq!(scheme("gs://bucket"), Scheme::Other);
    }

    #[test]
    fn redaction() {
        assert_eq!(
            redact("https://u:p%40ss@cdn.example:8443/a/b"),
            "https://cdn.example:8443/a/b"
        );
        assert_eq!(redact("http://u@h"), "http://h");
        assert_eq!(redact("http://h/p@q"), "http://h/p@q");
        assert_eq!(redact("gs://key:secret@bucket?x=1"), "gs://bucket?x=1");
        assert_eq!(redact("/plain/path"), "/plain/path");
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("p%40ss%3A1"), "p@ss:1");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
        assert_eq!(percent_decode("%C3%A9"), "é");
    }
}
