//! Test-only: a [`Blobs`] over a local directory, with counters and fault
//! hooks (failing range reads), standing in for a registry in unit
//! tests. The real registry is exercised by `tests/artifact.rs`.

use crate::artifact::{digest_of, parse_referrers, Descriptor};
use crate::blobs::Blobs;
use crate::error::{RegistryError, Result};
use smr_image::media_types::{OCI_INDEX, OCI_MANIFEST};
use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Blobs in `ROOT/blobs/<hex>`, manifests in `ROOT/manifests/<reference>`
/// (bytes) and `<reference>.type` (media type).
pub struct DirBlobs {
    root: PathBuf,
    /// Whether `referrers` answers (else it reports "no API", like
    /// distribution 2.8).
    pub referrers_api: bool,
    /// `get_blob_range` calls.
    pub range_requests: AtomicU64,
    /// `blob_size` calls.
    pub heads: AtomicU64,
    /// `push_blob` calls that wrote bytes.
    pub uploads: AtomicU64,
    /// `put_manifest` calls, as `(reference, media type)`.
    pub manifest_puts: Mutex<Vec<String>>,
    /// `referrers` calls.
    pub referrer_lists: AtomicU64,
    /// The digest of each `get_blob` call, in order.
    pub blob_gets: Mutex<Vec<String>>,
    fail: Mutex<HashSet<String>>,
}

impl DirBlobs {
    /// An empty repository in `root`.
    pub fn new(root: impl Into<PathBuf>, referrers_api: bool) -> Self {
        let root = root.into();
        fs::create_dir_all(root.join("blobs")).unwrap();
        fs::create_dir_all(root.join("manifests")).unwrap();
        DirBlobs {
            root,
            referrers_api,
            range_requests: AtomicU64::new(0),
            heads: AtomicU64::new(0),
            uploads: AtomicU64::new(0),
            manifest_puts: Mutex::new(Vec::new()),
            blob_gets: Mutex::new(Vec::new()),
            referrer_lists: AtomicU64::new(0),
            fail: Mutex::new(HashSet::new()),
        }
    }

    /// Makes range reads of blob `digest` fail.
    pub fn fail_ranges(&self, digest: &str) {
        self.fail.lock().unwrap().insert(digest.to_string());
    }

    /// Undoes [`DirBlobs::fail_ranges`].
    pub fn heal_ranges(&self, digest: &str) {
        self.fail.lock().unwrap().remove(digest);
    }

    /// Number of blob files.
    pub fn blob_count(&self) -> usize {
        fs::read_dir(self.root.join("blobs")).unwrap().count()
    }

    /// Overwrites blob `digest` (to simulate corruption).
    pub fn corrupt(&self, digest: &str, data: &[u8]) {
        fs::write(self.blob_path(digest), data).unwrap();
    }

    fn blob_path(&self, digest: &str) -> PathBuf {
        self.root
            .join("blobs")
            .join(digest.trim_start_matches("sha256:"))
    }

    fn not_found(&self, what: String) -> RegistryError {
        RegistryError::NotFound {
            repo: self.describe(),
            what,
        }
    }
}

impl Blobs for DirBlobs {
    fn describe(&self) -> String {
        format!("dir:{}", self.root.display())
    }

    fn blob_size(&self, digest: &str) -> Result<Option<u64>> {
        self.heads.fetch_add(1, Ordering::Relaxed);
        Ok(fs::metadata(self.blob_path(digest)).ok().map(|m| m.len()))
    }

    fn get_blob(&self, digest: &str, limit: u64) -> Result<Vec<u8>> {
        self.blob_gets.lock().unwrap().push(digest.to_string());
        let data = fs::read(self.blob_path(digest))
            .map_err(|_| self.not_found(format!("blob {digest}")))?;
        if data.len() as u64 > limit {
            return Err(RegistryError::Protocol {
                repo: self.describe(),
                what: format!("blob {digest}"),
                reason: format!("more than the {limit}-byte limit"),
            });
        }
        let actual = digest_of(&data);
        if actual != digest {
            return Err(RegistryError::DigestMismatch {
                repo: self.describe(),
                what: format!("blob {digest}"),
                actual,
            });
        }
        Ok(data)
    }

    fn get_blob_range(&self, digest: &str, offset: u64, len: u64) -> Result<Vec<u8>> {
        self.range_requests.fetch_add(1, Ordering::Relaxed);
        if self.fail.lock().unwrap().contains(digest) {
            return Err(RegistryError::Transient {
                repo: self.describe(),
                what: format!("GET blob {digest}"),
                reason: "injected failure".into(),
                retry_after: None,
            });
        }
        let data = fs::read(self.blob_path(digest))
            .map_err(|_| self.not_found(format!("blob {digest}")))?;
        let (from, to) = (offset as usize, (offset + len) as usize);
        Ok(data
            .get(from..to.min(data.len()))
            .unwrap_or_default()
            .to_vec())
    }

    fn push_blob(&self, digest: &str, data: &[u8]) -> Result<bool> {
        assert_eq!(digest_of(data), digest, "push_blob with a wrong digest");
        let path = self.blob_path(digest);
        if path.exists() {
            return Ok(false);
        }
        fs::write(path, data).unwrap();
        self.uploads.fetch_add(1, Ordering::Relaxed);
        Ok(true)
    }

    fn get_manifest(&self, reference: &str) -> Result<Option<(String, Vec<u8>)>> {
        let path = self.root.join("manifests").join(reference);
        let Ok(bytes) = fs::read(&path) else {
            return Ok(None);
        };
        let mt = fs::read_to_string(type_path(&path)).unwrap();
        Ok(Some((mt, bytes)))
    }

    fn put_manifest(&self, reference: &str, media_type: &str, bytes: &[u8]) -> Result<String> {
        let digest = digest_of(bytes);
        self.manifest_puts
            .lock()
            .unwrap()
            .push(format!("{reference} {media_type}"));
        for r in [reference, digest.as_str()] {
            let path = self.root.join("manifests").join(r);
            fs::write(&path, bytes).unwrap();
            fs::write(type_path(&path), media_type).unwrap();
        }
        Ok(digest)
    }

    fn referrers(&self, digest: &str) -> Result<Option<Vec<u8>>> {
        self.referrer_lists.fetch_add(1, Ordering::Relaxed);
        if !self.referrers_api {
            return Ok(None);
        }
        let mut found = BTreeMap::new();
        for e in fs::read_dir(self.root.join("manifests")).unwrap() {
            let path = e.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            if !name.starts_with("sha256:") || name.ends_with(".type") {
                continue;
            }
            let bytes = fs::read(&path).unwrap();
            let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
            if v["subject"]["digest"] != digest {
                continue;
            }
            let mut d = Descriptor::of(v["mediaType"].as_str().unwrap_or_default(), &bytes);
            d.artifact_type = v["artifactType"].as_str().map(str::to_string);
            if let Some(a) = v["annotations"].as_object() {
                for (k, val) in a {
                    d.annotations
                        .insert(k.clone(), val.as_str().unwrap_or_default().to_string());
                }
            }
            found.insert(name, d);
        }
        let doc = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": found.into_values().collect::<Vec<_>>(),
        });
        let bytes = serde_json::to_vec(&doc).unwrap();
        parse_referrers("test", "referrers", &bytes).unwrap();
        Ok(Some(bytes))
    }
}

/// Where the media type of the manifest at `path` is kept (`path.type`:
/// tags may contain dots, `sha256-<hex>.sig`).
fn type_path(path: &std::path::Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".type");
    PathBuf::from(p)
}

/// A converted image for tests: encrypted 64 KiB chunks in a local store.
pub struct TestImage {
    /// The recipe's bytes.
    pub recipe_bytes: Vec<u8>,
    /// The source manifest it claims to come from.
    pub subject: Descriptor,
    /// Plaintext of each stored chunk, by chunk index.
    pub plain: BTreeMap<u64, Vec<u8>>,
    /// The owner key sealing the recipe's key table.
    pub owner: smr_format::OwnerKey,
}

/// The plaintext of a 64 KiB chunk named `tag`.
pub fn plain_chunk(tag: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 << 10);
    let mut block = digest_of(tag.as_bytes()).into_bytes();
    while out.len() < 64 << 10 {
        out.extend_from_slice(&block);
        block = digest_of(&block).into_bytes();
    }
    out.truncate(64 << 10);
    out
}

/// Seals the chunks named `tags` (in image order; `None` = a zero chunk)
/// into `store` and builds their recipe, converted from a manifest named
/// `name`.
pub fn test_image(store: &smr_store::LocalStore, name: &str, tags: &[Option<String>]) -> TestImage {
    use smr_format::{ChunkCodec, ChunkEntry, OwnerKey, Recipe};
    use smr_store::ChunkStore;
    let codec = ChunkCodec::new(smr_format::chunk::default_salt(), true, false);
    let owner = OwnerKey([5; 32]);
    let subject = Descriptor::of(OCI_MANIFEST, format!("manifest {name}").as_bytes());
    let (mut entries, mut keys, mut plain) = (Vec::new(), Vec::new(), BTreeMap::new());
    for (index, tag) in tags.iter().enumerate() {
        let Some(tag) = tag else { continue };
        let p = plain_chunk(tag);
        let sealed = codec.seal(&p);
        store.put(&sealed.id, &sealed.stored).unwrap();
        entries.push(ChunkEntry {
            index: index as u64,
            id: sealed.id,
            stored_len: sealed.stored.len() as u32,
            compressed: false,
        });
        keys.push(sealed.key.unwrap());
        plain.insert(index as u64, p);
    }
    let recipe = Recipe::new(
        smr_format::ChunkGrid::fixed(tags.len() as u64 * (64 << 10), 64 << 10).unwrap(),
        subject.digest.clone(),
        Default::default(),
        entries,
        None,
        Some((&keys, &owner)),
    )
    .unwrap();
    TestImage {
        recipe_bytes: recipe.encode(),
        subject,
        plain,
        owner,
    }
}

/// `Some(format!("{prefix}{i}"))` for `i` in `range`.
pub fn tags(prefix: &str, range: std::ops::Range<usize>) -> Vec<Option<String>> {
    range.map(|i| Some(format!("{prefix}{i}"))).collect()
}
