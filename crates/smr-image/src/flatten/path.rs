//! Lexical cleaning of archive paths.

/// Splits an archive path into components: leading `/` and `./` stripped,
/// empty and `.` components dropped, `..` pops. `None` if a `..` would leave
/// the root. An empty result is the root itself.
pub(crate) fn components(path: &[u8]) -> Option<Vec<Vec<u8>>> {
    let mut out: Vec<Vec<u8>> = Vec::new();
    for c in path.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                out.pop()?;
            }
            c => out.push(c.to_vec()),
        }
    }
    Some(out)
}

/// `a/b/c` for display in errors.
pub(crate) fn display(components: &[Vec<u8>]) -> String {
    let joined: Vec<u8> = components.join(&b'/');
    String::from_utf8_lossy(&joined).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(p: &str) -> Option<Vec<String>> {
        components(p.as_bytes()).map(|v| {
            v.into_iter()
                .map(|c| String::from_utf8(c).expect("utf8"))
                .collect()
        })
    }

    #[test]
    fn cleans_lexically() {
        assert_eq!(c("./etc/passwd"), Some(vec!["etc".into(), "passwd".into()]));
        assert_eq!(c("/etc//x/"), Some(vec!["etc".into(), "x".into()]));
        assert_eq!(c("a/./b/../c"), Some(vec!["a".into(), "c".into()]));
        assert_eq!(c("./"), Some(vec![]));
        assert_eq!(c("a/.."), Some(vec![]));
    }

    #[test]
    fn rejects_escapes() {
        assert_eq!(c("../x"), None);
        assert_eq!(c("a/../../x"), None);
        assert_eq!(c("/../x"), None);
    }
}
