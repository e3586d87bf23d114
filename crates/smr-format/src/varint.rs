//! Canonical unsigned LEB128 varints (overlong encodings are rejected).

use crate::error::{FormatError, Result};

/// Appends `v` as LEB128.
pub fn put(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// Reads a canonical LEB128 value from the front of `buf`, advancing it.
/// The error says what is wrong with the bytes (truncated, overlong, too
/// big for 64 bits).
pub fn take(buf: &mut &[u8]) -> std::result::Result<u64, &'static str> {
    let mut v: u64 = 0;
    for i in 0..10 {
        let (&byte, rest) = buf.split_first().ok_or("truncated varint")?;
        *buf = rest;
        let bits = u64::from(byte & 0x7f);
        if i == 9 && bits > 1 {
            return Err("varint overflow");
        }
        v |= bits << (7 * i);
        if byte & 0x80 == 0 {
            if byte == 0 && i > 0 {
                return Err("overlong varint");
            }
            return Ok(v);
        }
    }
    Err("varint too long")
}

/// [`take`] for the recipe: errors name the field `what`.
pub(crate) fn get(buf: &mut &[u8], what: &str) -> Result<u64> {
    take(buf).map_err(|reason| FormatError::Recipe(format!("{reason} ({what})")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn roundtrip(v: u64) {
            let mut out = Vec::new();
            put(&mut out, v);
            let mut s = &out[..];
            prop_assert_eq!(get(&mut s, "t").unwrap(), v);
            prop_assert!(s.is_empty());
        }
    }

    #[test]
    fn rejects_overlong_and_truncated() {
        assert!(get(&mut &[0x80, 0x00][..], "t").is_err());
        assert!(get(&mut &[0x80][..], "t").is_err());
        assert!(get(&mut &[0xff; 11][..], "t").is_err());
        assert!(get(
            &mut &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02][..],
            "t"
        )
        .is_err());
        assert_eq!(get(&mut &[0x7f][..], "t").unwrap(), 127);
    }
}
