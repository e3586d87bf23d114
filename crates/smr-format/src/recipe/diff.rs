//! The first difference between two recipes, for `smr verify --reproduce`:
//! a recipe made again from the same source must be the same, entry by
//! entry; the first entry that is not names what differs.

use super::Recipe;
use crate::grid::ChunkGrid;

impl Recipe {
    /// The first way in which `other` (converted again) differs from this
    /// recipe: source and chunk size, the image config, the chunk list
    /// entry by entry (what a reader gets), then the image size, the file
    /// map and the sealed key table. `None` when they are the same.
    pub fn first_difference(&self, other: &Recipe) -> Option<String> {
        if self.source_digest != other.source_digest {
            return Some(format!(
                "source: {} here, {} converted again",
                self.source_digest, other.source_digest
            ));
        }
        if self.chunk_size != other.chunk_size {
            return Some(format!(
                "chunk size: {} here, {} converted again",
                self.chunk_size, other.chunk_size
            ));
        }
        if self.config != other.config {
            let json = |r: &Recipe| serde_json::to_string(&r.config).unwrap_or_default();
            return Some(format!(
                "image config: {} here, {} converted again",
                json(self),
                json(other)
            ));
        }
        if let Some(d) = grid_difference(&self.grid, &other.grid) {
            return Some(d);
        }
        let range = |index: u64| {
            let r = self.grid.range(index);
            format!("bytes {}..{} of the image", r.start, r.end)
        };
        for (a, b) in self.chunks.iter().zip(&other.chunks) {
            if a.index != b.index {
                let first = a.index.min(b.index);
                return Some(format!(
                    "chunk #{first} ({}): stored on one side, all zeros on the other",
                    range(first)
                ));
            }
            if a != b {
                return Some(format!(
                    "chunk #{} ({}): id {} ({} bytes{}) here, {} ({} bytes{}) converted again",
                    a.index,
                    range(a.index),
                    a.id,
                    a.stored_len,
                    if a.compressed { ", zstd" } else { "" },
                    b.id,
                    b.stored_len,
                    if b.compressed { ", zstd" } else { "" },
                ));
            }
        }
        if self.chunks.len() != other.chunks.len() {
            let (longer, n) = if self.chunks.len() > other.chunks.len() {
                ("here", other.chunks.len())
            } else {
                ("converted again", self.chunks.len())
            };
            let extra = self.chunks.get(n).or_else(|| other.chunks.get(n))?;
            return Some(format!(
                "chunk #{} ({}): stored only {longer}",
                extra.index,
                range(extra.index)
            ));
        }
        if self.image_size != other.image_size {
            return Some(format!(
                "image size: {} here, {} converted again",
                self.image_size, other.image_size
            ));
        }
        if self.file_map != other.file_map {
            return Some("file map: differs (same chunks, other file ranges)".to_string());
        }
        if self.sealed_keys != other.sealed_keys {
            return Some(
                "key table: sealed differently (another owner key, or encrypted on one side only)"
                    .to_string(),
            );
        }
        None
    }
}

/// How two chunk grids differ: their kind or CDC sizes, else the first
/// chunk whose bytes differ. `None` when the same (image sizes aside,
/// reported after the chunks).
fn grid_difference(a: &ChunkGrid, b: &ChunkGrid) -> Option<String> {
    let kind = |g: &ChunkGrid| match g.cdc_sizes() {
        None => "fixed".to_string(),
        Some(s) => format!("content-defined {s}"),
    };
    if a.cdc_sizes() != b.cdc_sizes() {
        return Some(format!(
            "chunking: {} here, {} converted again",
            kind(a),
            kind(b)
        ));
    }
    if !a.is_variable() {
        return None;
    }
    let first = (0..a.count().max(b.count())).find(|&i| a.range(i) != b.range(i))?;
    let show = |g: &ChunkGrid| {
        let r = g.range(first);
        format!("bytes {}..{}", r.start, r.end)
    };
    Some(format!(
        "chunk #{first}: {} here, {} converted again",
        show(a),
        show(b)
    ))
}

#[cfg(test)]
mod tests {
    use crate::chunk::ChunkId;
    use crate::config::ImageConfig;
    use crate::recipe::{ChunkEntry, Recipe};
    use crate::{ChunkGrid, OwnerKey};

    fn entry(index: u64, tag: u8) -> ChunkEntry {
        ChunkEntry {
            index,
            id: ChunkId([tag; 32]),
            stored_len: 65536,
            compressed: false,
        }
    }

    fn recipe(chunks: Vec<ChunkEntry>) -> Recipe {
        let config = ImageConfig {
            cmd: vec!["/bin/sh".into()],
            ..ImageConfig::default()
        };
        Recipe::new(
            ChunkGrid::fixed(1 << 20, 65536).unwrap(),
            "sha256:aa".into(),
            config,
            chunks,
            None,
            None,
        )
        .unwrap()
    }

    #[test]
    fn the_same_recipe_has_no_difference() {
        let r = recipe(vec![entry(0, 1), entry(3, 2)]);
        assert_eq!(r.first_difference(&r.clone()), None);
    }

    #[test]
    fn the_first_changed_chunk_is_named_with_its_bytes() {
        let a = recipe(vec![entry(0, 1), entry(3, 2), entry(4, 3)]);
        let b = recipe(vec![entry(0, 1), entry(3, 9), entry(4, 8)]);
        let d = a.first_difference(&b).unwrap();
        assert!(d.starts_with("chunk #3 (bytes 196608..262144"), "{d}");
        assert!(d.contains(&ChunkId([2; 32]).to_string()), "{d}");
        assert!(d.contains(&ChunkId([9; 32]).to_string()), "{d}");
    }

    #[test]
    fn a_chunk_stored_on_one_side_only_is_named() {
        let a = recipe(vec![entry(0, 1), entry(5, 2)]);
        let b = recipe(vec![entry(0, 1), entry(2, 7), entry(5, 2)]);
        let d = a.first_difference(&b).unwrap();
        assert!(d.starts_with("chunk #2 "), "{d}");
        let short = recipe(vec![entry(0, 1)]);
        let d = short.first_difference(&a).unwrap();
        assert!(
            d.starts_with("chunk #5 ") && d.contains("converted again"),
            "{d}"
        );
    }

    #[test]
    fn config_source_and_keys_are_compared() {
        let a = recipe(vec![entry(0, 1)]);
        let mut b = a.clone();
        b.config.env.push("X=1".into());
        assert!(a.first_difference(&b).unwrap().starts_with("image config"));
        let mut c = a.clone();
        c.source_digest = "sha256:bb".into();
        assert!(a.first_difference(&c).unwrap().starts_with("source"));
        let key = OwnerKey([7; 32]);
        let keys = [crate::ChunkKey([1; 32])];
        let sealed = Recipe::new(
            a.grid().clone(),
            a.source_digest.clone(),
            a.config.clone(),
            a.chunks.clone(),
            None,
            Some((&keys, &key)),
        )
        .unwrap();
        assert!(a
            .first_difference(&sealed)
            .unwrap()
            .starts_with("key table"));
    }
}
