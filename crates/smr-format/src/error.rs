//! Errors of the format crate.

use crate::chunk::ChunkId;

/// Result alias for this crate.
pub type Result<T, E = FormatError> = std::result::Result<T, E>;

/// Everything that can be wrong with a chunk, a key or a recipe.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// A stored chunk's bytes do not hash to its name.
    #[error("chunk {id}: content hash mismatch (got {actual}): corrupted or wrong chunk")]
    ChunkHashMismatch {
        /// The name the chunk was fetched by.
        id: ChunkId,
        /// SHA-256 of the bytes actually received.
        actual: ChunkId,
    },
    /// A chunk decoded to the wrong length or failed to decompress.
    #[error("chunk {id}: {reason}")]
    ChunkDecode {
        /// The chunk.
        id: ChunkId,
        /// What went wrong.
        reason: String,
    },
    /// The recipe bytes are malformed.
    #[error("recipe: {0}")]
    Recipe(String),
    /// The recipe's trailing checksum does not match its content.
    #[error("recipe: checksum mismatch (truncated or corrupted recipe)")]
    RecipeChecksum,
    /// The recipe's key table could not be opened with the given key.
    #[error("recipe: key table does not open with this key (wrong key, or the recipe was tampered with)")]
    WrongKey,
    /// The recipe is encrypted and no owner key was given.
    #[error("recipe: chunks are encrypted and no key was given (use --key-file or SMR_KEY_FILE)")]
    KeyRequired,
    /// A key file is unreadable or malformed.
    #[error("key file {path}: {reason}")]
    KeyFile {
        /// The file.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A startup profile is malformed or belongs to another recipe.
    #[error("profile: {0}")]
    Profile(String),
    /// A chunk id string is not 64 hex digits.
    #[error("invalid chunk id `{0}`: expected 64 hex digits")]
    BadChunkId(String),
}
