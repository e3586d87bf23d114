//! The smr artifacts' media types, each defined once. OCI and Docker media
//! types are in [`smr_image::media_types`].

/// `artifactType` of an smr artifact.
pub const SMR_ARTIFACT: &str = "application/vnd.smr.image.v1";
/// Media type of the recipe layer (`docs/FORMAT.md` §3).
pub const SMR_RECIPE: &str = "application/vnd.smr.recipe.v1";
/// Media type of the pack index layer (`docs/FORMAT.md` §5).
pub const SMR_PACK_INDEX: &str = "application/vnd.smr.pack-index.v1";
/// Media type of a pack layer (concatenated stored chunks).
pub const SMR_PACK: &str = "application/vnd.smr.pack.v1";
/// A startup profile: both the `artifactType` of its manifest and the
/// media type of its one layer (the `SMRPROF1` bytes).
pub const SMR_PROFILE: &str = "application/vnd.smr.profile.v1";
/// A startup pack: the sealed blocks a profile lists (a second layer of
/// the profile's manifest).
pub const SMR_STARTUP_PACK: &str = "application/vnd.smr.startup-pack.v1";
