//! The part of containerd's filter language that snapshot listings use:
//! comma-separated conditions that must all hold, each `FIELD==VALUE`,
//! `FIELD!=VALUE` or a bare `FIELD` (present), on the fields `name`,
//! `parent`, `kind` and `labels.KEY` (`labels."KEY"` when the key has dots
//! or slashes). Values may be double-quoted. Regular-expression matches
//! (`~=`) are refused rather than guessed at.

use crate::meta::Kind;
use crate::snapshotter::Info;
use crate::SnapError;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    Present,
    Eq(String),
    Ne(String),
}

/// One filter string: a conjunction of conditions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    conds: Vec<(Vec<String>, Op)>,
}

fn unquote(s: &str) -> String {
    let s = s.trim();
    s.strip_prefix('"')
        .and_then(|x| x.strip_suffix('"'))
        .map(|x| x.replace("\\\"", "\""))
        .unwrap_or_else(|| s.to_string())
}

/// Splits `s` at `sep` outside double quotes.
fn split_unquoted(s: &str, sep: char) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, c) in s.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            c if c == sep && !quoted => {
                out.push(&s[start..i]);
                start = i + c.len_utf8();
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

fn field_path(s: &str) -> Vec<String> {
    split_unquoted(s.trim(), '.')
        .into_iter()
        .map(unquote)
        .collect()
}

impl Filter {
    /// Parses one filter string.
    pub fn parse(s: &str) -> Result<Filter, SnapError> {
        let bad = |why: &str| SnapError::InvalidArgument(format!("filter {s:?}: {why}"));
        let mut conds = Vec::new();
        for part in split_unquoted(s, ',') {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            if part.contains("~=") {
                return Err(bad("regular-expression matches are not supported"));
            }
            let (field, op) = if let Some((f, v)) = part.split_once("!=") {
                (f, Op::Ne(unquote(v)))
            } else if let Some((f, v)) = part.split_once("==") {
                (f, Op::Eq(unquote(v)))
            } else {
                (part, Op::Present)
            };
            let path = field_path(field);
            let known = match path.first().map(String::as_str) {
                Some("name" | "parent" | "kind") => path.len() == 1,
                Some("labels") => path.len() == 2,
                _ => false,
            };
            if !known {
                return Err(bad(&format!("unknown field {field:?}")));
            }
            conds.push((path, op));
        }
        Ok(Filter { conds })
    }

    /// Whether `info` meets every condition.
    pub fn matches(&self, info: &Info) -> bool {
        self.conds.iter().all(|(path, op)| {
            let value: Option<String> = match path[0].as_str() {
                "name" => Some(info.name.clone()),
                // containerd's Info has "" for no parent, and filters on it.
                "parent" => Some(info.rec.parent.clone().unwrap_or_default()),
                "kind" => Some(
                    match info.rec.kind {
                        Kind::View => "view",
                        Kind::Active => "active",
                        Kind::Committed => "committed",
                    }
                    .to_string(),
                ),
                _ => info.rec.labels.get(&path[1]).cloned(),
            };
            match op {
                Op::Present => value.is_some(),
                Op::Eq(v) => value.as_deref() == Some(v.as_str()),
                Op::Ne(v) => value.as_deref() != Some(v.as_str()),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::Record;

    fn info(name: &str, parent: Option<&str>, labels: &[(&str, &str)]) -> Info {
        Info {
            name: name.into(),
            rec: Record {
                id: 1,
                kind: Kind::Committed,
                parent: parent.map(str::to_string),
                labels: labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                created: 0,
                updated: 0,
                remote: None,
            },
        }
    }

    #[test]
    fn containerd_remote_snapshot_lookup() {
        // The filter containerd's metadata layer sends after AlreadyExists.
        let f =
            Filter::parse(r#"labels."containerd.io/snapshot.ref"==sha256:abc,parent=="sha256:p""#)
                .unwrap();
        let hit = info(
            "sha256:abc",
            Some("sha256:p"),
            &[("containerd.io/snapshot.ref", "sha256:abc")],
        );
        assert!(f.matches(&hit));
        assert!(!f.matches(&info("x", Some("sha256:p"), &[])));
        let other_parent = info(
            "sha256:abc",
            None,
            &[("containerd.io/snapshot.ref", "sha256:abc")],
        );
        assert!(!f.matches(&other_parent));
        // A bottom layer: containerd asks for parent=="".
        let f =
            Filter::parse(r#"labels."containerd.io/snapshot.ref"==sha256:abc,parent=="""#).unwrap();
        assert!(f.matches(&other_parent));
    }

    #[test]
    fn operators_and_errors() {
        let i = info("a", None, &[("x", "1")]);
        assert!(Filter::parse("labels.x").unwrap().matches(&i));
        assert!(Filter::parse("labels.x!=2,kind==committed")
            .unwrap()
            .matches(&i));
        assert!(!Filter::parse("name==b").unwrap().matches(&i));
        assert!(Filter::parse("").unwrap().matches(&i));
        assert!(Filter::parse("name~=a").is_err());
        assert!(Filter::parse("size==3").is_err());
    }
}
