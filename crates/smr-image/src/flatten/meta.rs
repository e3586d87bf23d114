//! Inode metadata from a tar header and its PAX records.

use super::ApplyError;
use crate::tree::Meta;
use std::collections::BTreeMap;
use std::io::Read;

/// Mode, owner, mtime and xattrs of `entry`. The tar crate already applies
/// PAX `uid`/`gid` to the header and decodes base-256 numbers.
pub(crate) fn entry_meta<R: Read>(entry: &mut tar::Entry<'_, R>) -> Result<Meta, ApplyError> {
    let h = entry.header();
    let bad = |field: &'static str| move |e: std::io::Error| invalid(field, e.to_string());
    let old = h.as_old();
    let mode = or_zero(&old.mode, h.mode().map(u64::from)).map_err(bad("mode"))? & 0o7777;
    let mode = mode as u32; // masked to 12 bits above
    let uid = or_zero(&old.uid, h.uid()).map_err(bad("uid"))?;
    let uid = fit_u32("uid", uid)?;
    let gid = fit_u32("gid", or_zero(&old.gid, h.gid()).map_err(bad("gid"))?)?;
    let header_mtime = or_zero(&old.mtime, h.mtime()).map_err(bad("mtime"))?;
    let mut mtime = (
        i64::try_from(header_mtime).map_err(|_| invalid("mtime", header_mtime.to_string()))?,
        0u32,
    );
    let mut xattrs = BTreeMap::new();
    let mut schily = Vec::new();
    if let Some(pax) = entry.pax_extensions().map_err(bad("pax"))? {
        for rec in pax {
            let rec = rec.map_err(|e| invalid("pax", e.to_string()))?;
            let key = rec.key_bytes();
            let value = rec.value_bytes();
            if key == b"mtime" {
                mtime = parse_pax_time(value)
                    .ok_or_else(|| invalid("mtime", String::from_utf8_lossy(value).into()))?;
            } else if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                schily.push((name.to_vec(), value.to_vec()));
            } else if let Some(name) = key.strip_prefix(b"LIBARCHIVE.xattr.") {
                let name = percent_decode(name)
                    .ok_or_else(|| invalid("pax", "bad LIBARCHIVE.xattr name".into()))?;
                let value = base64_decode(value)
                    .ok_or_else(|| invalid("pax", "bad LIBARCHIVE.xattr value".into()))?;
                xattrs.insert(name, value);
            }
        }
    }
    // SCHILY records win over LIBARCHIVE ones for the same name.
    xattrs.extend(schily);
    xattrs.retain(|k: &Vec<u8>, _| !k.is_empty());
    Ok(Meta {
        mode,
        uid,
        gid,
        mtime: mtime.0,
        mtime_nsec: mtime.1,
        xattrs,
    })
}

/// An empty (all NUL / space) numeric field reads as 0, as in Go's
/// archive/tar; anything else must parse.
fn or_zero(field: &[u8], parsed: std::io::Result<u64>) -> std::io::Result<u64> {
    if field.iter().all(|b| *b == 0 || *b == b' ') {
        return Ok(0);
    }
    parsed
}

fn invalid(field: &'static str, detail: String) -> ApplyError {
    ApplyError::InvalidHeader { field, detail }
}

fn fit_u32(field: &'static str, v: u64) -> Result<u32, ApplyError> {
    u32::try_from(v).map_err(|_| invalid(field, format!("{v} does not fit in 32 bits")))
}

/// Parses a PAX time (`-?digits[.digits]`) into seconds and nanoseconds
/// (nanoseconds always positive: -1.5 is (-2, 500000000)).
pub(crate) fn parse_pax_time(v: &[u8]) -> Option<(i64, u32)> {
    let s = std::str::from_utf8(v).ok()?;
    let (neg, s) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    if int.is_empty() || !int.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let secs: i64 = int.parse().ok()?;
    let mut nsec: u32 = 0;
    for (i, d) in frac.bytes().take(9).enumerate() {
        nsec += u32::from(d - b'0') * 10u32.pow(8 - i as u32);
    }
    if !neg {
        return Some((secs, nsec));
    }
    if nsec == 0 {
        Some((secs.checked_neg()?, 0))
    } else {
        Some((secs.checked_neg()?.checked_sub(1)?, 1_000_000_000 - nsec))
    }
}

/// Decodes `%XX` escapes (libarchive's xattr name encoding).
fn percent_decode(s: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while let Some(&b) = s.get(i) {
        if b == b'%' {
            let hex = std::str::from_utf8(s.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b);
            i += 1;
        }
    }
    Some(out)
}

/// Decodes standard base64, padding optional.
fn base64_decode(s: &[u8]) -> Option<Vec<u8>> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let s: Vec<u8> = s.iter().copied().filter(|c| *c != b'=').collect();
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    for chunk in s.chunks(4) {
        if chunk.len() == 1 {
            return None;
        }
        let mut acc = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            acc |= val(*c)? << (18 - 6 * i);
        }
        let bytes = acc.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_times() {
        assert_eq!(parse_pax_time(b"1700000000"), Some((1_700_000_000, 0)));
        assert_eq!(parse_pax_time(b"1.5"), Some((1, 500_000_000)));
        assert_eq!(parse_pax_time(b"1.123456789123"), Some((1, 123_456_789)));
        assert_eq!(parse_pax_time(b"-1.5"), Some((-2, 500_000_000)));
        assert_eq!(parse_pax_time(b"-3"), Some((-3, 0)));
        assert_eq!(parse_pax_time(b"x"), None);
        assert_eq!(parse_pax_time(b"1.x"), None);
        assert_eq!(parse_pax_time(b""), None);
    }

    #[test]
    fn libarchive_encodings() {
        assert_eq!(percent_decode(b"user.a%3Db"), Some(b"user.a=b".to_vec()));
        assert_eq!(percent_decode(b"bad%2"), None);
        assert_eq!(base64_decode(b"aGVsbG8="), Some(b"hello".to_vec()));
        assert_eq!(base64_decode(b"aGVsbG8"), Some(b"hello".to_vec()));
        assert_eq!(base64_decode(b"AAECAw=="), Some(vec![0, 1, 2, 3]));
        assert_eq!(base64_decode(b"a"), None);
        assert_eq!(base64_decode(b"a*=="), None);
    }
}
