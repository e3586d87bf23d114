//! Store locations as text: scheme detection and credential redaction.

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
