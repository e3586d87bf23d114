//! Reading the small files smr's formats live in (key files, recipes,
//! profiles) with a bound, so that a path naming `/dev/zero` or a huge file
//! fails at once instead of exhausting memory.

use std::io::Read;
use std::path::Path;

/// Reads `path` whole, failing with [`std::io::ErrorKind::InvalidData`] as
/// soon as it holds more than `limit` bytes (never reading more than
/// `limit + 1`).
pub fn read_bounded(path: &Path, limit: u64) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    std::fs::File::open(path)?
        .take(limit.saturating_add(1))
        .read_to_end(&mut out)?;
    if out.len() as u64 > limit {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("larger than the {limit}-byte limit"),
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endless_and_oversized_files_are_refused() {
        let e = read_bounded(Path::new("/dev/zero"), 1 << 20).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
        assert!(e.to_string().contains("1048576-byte limit"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, [1u8; 10]).unwrap();
        assert_eq!(read_bounded(&p, 10).unwrap(), [1u8; 10]);
        assert!(read_bounded(&p, 9).is_err());
    }
}
