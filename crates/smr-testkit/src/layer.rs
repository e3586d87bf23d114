//! [`LayerBuilder`]: layer tarballs written entry by entry, byte-deterministic.
//!
//! Paths are written verbatim (no normalization, no `..` checks), so tests can
//! build hostile archives (`../x`, `/etc/x`) as easily as good ones.

use std::io::Write;
use tar::{EntryType, Header};

/// The mtime every entry gets unless a test asks for another one.
pub const FIXED_MTIME: u64 = 1_700_000_000;

/// How names longer than the 100-byte ustar field are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LongNames {
    /// PAX `path` / `linkpath` records (what Go's archive/tar and buildkit write).
    #[default]
    Pax,
    /// GNU `L` / `K` pseudo-entries (what GNU tar writes).
    Gnu,
}

/// What an [`Entry`] is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    /// A regular file with these contents.
    File(Vec<u8>),
    /// A directory.
    Dir,
    /// A symbolic link to this target.
    Symlink(String),
    /// A hard link to this archive path.
    Hardlink(String),
    /// A character device (major, minor).
    CharDev(u32, u32),
    /// A block device (major, minor).
    BlockDev(u32, u32),
    /// A named pipe.
    Fifo,
    /// Any other tar type flag with these data bytes (e.g. `V`, `7`).
    Other(u8, Vec<u8>),
}

/// A full description of one tar entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Archive path, written as given.
    pub path: String,
    /// Type and payload.
    pub kind: EntryKind,
    /// Mode bits (the type bits are not added).
    pub mode: u32,
    /// Owner uid in the header (values over 2^21 use base-256).
    pub uid: u64,
    /// Owner gid in the header.
    pub gid: u64,
    /// Header mtime (seconds).
    pub mtime: u64,
    /// Extra PAX records for this entry, e.g. `("SCHILY.xattr.user.a", b"v")`
    /// or `("mtime", b"1.5")`.
    pub pax: Vec<(String, Vec<u8>)>,
}

impl Entry {
    /// An entry with mode 0644 (0755 for directories), root-owned, [`FIXED_MTIME`].
    pub fn new(path: &str, kind: EntryKind) -> Self {
        let mode = if kind == EntryKind::Dir { 0o755 } else { 0o644 };
        Entry {
            path: path.to_string(),
            kind,
            mode,
            uid: 0,
            gid: 0,
            mtime: FIXED_MTIME,
            pax: Vec::new(),
        }
    }

    /// Adds an extended attribute as a PAX `SCHILY.xattr.` record.
    pub fn xattr(mut self, name: &str, value: &[u8]) -> Self {
        self.pax
            .push((format!("SCHILY.xattr.{name}"), value.to_vec()));
        self
    }

    /// Sets the mode bits.
    pub fn mode(mut self, mode: u32) -> Self {
        self.mode = mode;
        self
    }

    /// Sets uid and gid in the header.
    pub fn owner(mut self, uid: u64, gid: u64) -> Self {
        self.uid = uid;
        self.gid = gid;
        self
    }
}

/// Builds one layer tarball in memory.
pub struct LayerBuilder {
    out: tar::Builder<Vec<u8>>,
    long_names: LongNames,
}

impl Default for LayerBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl LayerBuilder {
    /// An empty layer that writes long names as PAX records.
    pub fn new() -> Self {
        LayerBuilder {
            out: tar::Builder::new(Vec::new()),
            long_names: LongNames::Pax,
        }
    }

    /// Chooses how later long names are written.
    pub fn long_names(&mut self, style: LongNames) -> &mut Self {
        self.long_names = style;
        self
    }

    /// A root-owned regular file with mode `mode`.
    pub fn file(&mut self, path: &str, data: &[u8], mode: u32) -> &mut Self {
        self.entry(Entry::new(path, EntryKind::File(data.to_vec())).mode(mode))
    }

    /// A regular file with every header field chosen.
    pub fn add_file(
        &mut self,
        path: &str,
        data: &[u8],
        mode: u32,
        uid: u64,
        gid: u64,
        mtime: u64,
    ) -> &mut Self {
        let mut e = Entry::new(path, EntryKind::File(data.to_vec()))
            .mode(mode)
            .owner(uid, gid);
        e.mtime = mtime;
        self.entry(e)
    }

    /// A root-owned directory with mode `mode`.
    pub fn dir(&mut self, path: &str, mode: u32) -> &mut Self {
        self.entry(Entry::new(path, EntryKind::Dir).mode(mode))
    }

    /// A symlink `path -> target` (mode 0777).
    pub fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.entry(Entry::new(path, EntryKind::Symlink(target.to_string())).mode(0o777))
    }

    /// A hard link `path` to the archive path `target`.
    pub fn hardlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.entry(Entry::new(path, EntryKind::Hardlink(target.to_string())))
    }

    /// A character device.
    pub fn char_dev(&mut self, path: &str, major: u32, minor: u32) -> &mut Self {
        self.entry(Entry::new(path, EntryKind::CharDev(major, minor)).mode(0o666))
    }

    /// A block device.
    pub fn block_dev(&mut self, path: &str, major: u32, minor: u32) -> &mut Self {
        self.entry(Entry::new(path, EntryKind::BlockDev(major, minor)).mode(0o660))
    }

    /// A named pipe.
    pub fn fifo(&mut self, path: &str) -> &mut Self {
        self.entry(Entry::new(path, EntryKind::Fifo))
    }

    /// The whiteout `DIR/.wh.NAME` that deletes `path` (= `DIR/NAME`).
    pub fn whiteout(&mut self, path: &str) -> &mut Self {
        let (dir, name) = match path.rsplit_once('/') {
            Some((d, n)) => (format!("{d}/"), n),
            None => (String::new(), path),
        };
        self.file(&format!("{dir}.wh.{name}"), b"", 0o644)
    }

    /// The opaque marker `dir/.wh..wh..opq`.
    pub fn opaque(&mut self, dir: &str) -> &mut Self {
        let dir = dir.trim_end_matches('/');
        self.file(&format!("{dir}/.wh..wh..opq"), b"", 0o644)
    }

    /// Appends a fully described entry.
    pub fn entry(&mut self, e: Entry) -> &mut Self {
        self.try_entry(e).expect("writing to a Vec cannot fail");
        self
    }

    /// Appends a header and data exactly as given (checksum not recomputed),
    /// e.g. a header claiming 1 TiB followed by 10 bytes.
    pub fn raw_header(&mut self, header: &Header, data: &[u8]) -> &mut Self {
        self.out
            .append(header, data)
            .expect("writing to a Vec cannot fail");
        self
    }

    /// Appends raw bytes to the archive stream.
    pub fn raw_bytes(&mut self, bytes: &[u8]) -> &mut Self {
        self.out.get_mut().extend_from_slice(bytes);
        self
    }

    /// The tar bytes, terminated by the two zero blocks.
    pub fn into_bytes(self) -> Vec<u8> {
        self.out.into_inner().expect("writing to a Vec cannot fail")
    }

    /// The tar bytes without the end-of-archive blocks.
    pub fn into_bytes_unterminated(mut self) -> Vec<u8> {
        std::mem::take(self.out.get_mut())
    }

    fn try_entry(&mut self, e: Entry) -> std::io::Result<()> {
        let (flag, data, link): (u8, &[u8], Option<&str>) = match &e.kind {
            EntryKind::File(d) => (b'0', d, None),
            EntryKind::Dir => (b'5', &[], None),
            EntryKind::Symlink(t) => (b'2', &[], Some(t)),
            EntryKind::Hardlink(t) => (b'1', &[], Some(t)),
            EntryKind::CharDev(..) => (b'3', &[], None),
            EntryKind::BlockDev(..) => (b'4', &[], None),
            EntryKind::Fifo => (b'6', &[], None),
            EntryKind::Other(f, d) => (*f, d, None),
        };
        let mut h = match self.long_names {
            LongNames::Pax => Header::new_ustar(),
            LongNames::Gnu => Header::new_gnu(),
        };
        h.set_entry_type(EntryType::new(flag));
        h.set_mode(e.mode);
        h.set_uid(e.uid);
        h.set_gid(e.gid);
        h.set_mtime(e.mtime);
        h.set_size(data.len() as u64);
        if let EntryKind::CharDev(ma, mi) | EntryKind::BlockDev(ma, mi) = e.kind {
            h.set_device_major(ma)?;
            h.set_device_minor(mi)?;
        }
        let mut pax: Vec<(String, Vec<u8>)> = e.pax.clone();
        self.put_name(&mut h, &mut pax, e.path.as_bytes(), false)?;
        if let Some(link) = link {
            self.put_name(&mut h, &mut pax, link.as_bytes(), true)?;
        }
        if !pax.is_empty() {
            self.out
                .append_pax_extensions(pax.iter().map(|(k, v)| (k.as_str(), v.as_slice())))?;
        }
        h.set_cksum();
        self.out.append(&h, data)
    }

    /// Stores `name` in the header, or as a PAX record / GNU pseudo-entry.
    fn put_name(
        &mut self,
        h: &mut Header,
        pax: &mut Vec<(String, Vec<u8>)>,
        name: &[u8],
        link: bool,
    ) -> std::io::Result<()> {
        let field: &mut [u8; 100] = if link {
            &mut h.as_old_mut().linkname
        } else {
            &mut h.as_old_mut().name
        };
        let n = name.len().min(100);
        field[..n].copy_from_slice(&name[..n]);
        if name.len() <= 100 {
            return Ok(());
        }
        match self.long_names {
            LongNames::Pax => {
                let key = if link { "linkpath" } else { "path" };
                pax.push((key.to_string(), name.to_vec()));
            }
            LongNames::Gnu => {
                let mut lh = Header::new_gnu();
                lh.as_old_mut().name[..13].copy_from_slice(b"././@LongLink");
                lh.set_entry_type(EntryType::new(if link { b'K' } else { b'L' }));
                lh.set_mode(0o644);
                let mut data = name.to_vec();
                data.push(0);
                lh.set_size(data.len() as u64);
                lh.set_cksum();
                self.out.append(&lh, data.as_slice())?;
            }
        }
        Ok(())
    }
}

/// Writes `data` into `w` as the contents of a single-file tar (helper for
/// docker-archive members).
pub(crate) fn append_member(
    out: &mut tar::Builder<impl Write>,
    path: &str,
    data: &[u8],
) -> std::io::Result<()> {
    let mut h = Header::new_ustar();
    h.set_entry_type(EntryType::Regular);
    h.set_mode(0o644);
    h.set_mtime(0);
    h.set_size(data.len() as u64);
    h.set_path(path)?;
    h.set_cksum();
    out.append(&h, data)
}
