//! The snapshot engine.
//!
//! - [`write_diff`]: an overlayfs upper dir -> an OCI layer tar (whiteouts,
//!   opaque dirs, xattrs, hardlinks), with its sha256 and size, streamed.
//!   Cost is proportional to what changed: only the upper dir is read.
//! - [`apply_layer`]: a layer tar -> a directory, either as an overlay lower
//!   (`ApplyMode::Overlay`) or merged into a tree (`ApplyMode::Merged`),
//!   verifying its digest and refusing entries that would leave the target;
//!   the tar is parsed as GNU tar, Go's archive/tar and Python's tarfile
//!   agree on, and refused where they would not.
//! - Sparse files are archived as GNU's PAX 1.0 sparse entries and restored
//!   with their holes: a snapshot costs what was written.
//! - [`LayerCache`]: unpacked layers shared by every vessel on a host.
//! - [`changes`]: what differs between two stacks of layers (`docker
//!   diff`), walking only the layers they do not share.
//! - [`image`]: docker-save and OCI image-layout archives into the cache
//!   ([`image::unpack_image`]).
//!
//! Everything here is synchronous, blocking filesystem work: async callers
//! run it on a blocking thread.
#![warn(missing_docs)]
#![forbid(unsafe_code)]

mod apply;
mod cache;
mod changes;
mod codec;
mod diff;
mod error;
pub mod image;
mod tar_reader;

/// Where overlay keeps its bookkeeping on this process's mounts:
/// `trusted.overlay.` as root, `user.overlay.` in a user namespace
/// (rootless vessels mount with `userxattr`; `trusted.*` needs host
/// privilege). Layers never carry either (see `diff` and `apply`).
pub fn overlay_xattr_prefix() -> &'static str {
    static PREFIX: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();
    PREFIX.get_or_init(|| {
        let initial = std::fs::read_to_string("/proc/self/uid_map")
            .is_ok_and(|m| m.split_whitespace().collect::<Vec<_>>() == ["0", "0", "4294967295"]);
        if initial { "trusted.overlay." } else { "user.overlay." }
    })
}

/// The opaque-directory marker of this process's overlays.
pub(crate) fn opaque_xattr() -> &'static str {
    static NAME: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    NAME.get_or_init(|| format!("{}opaque", overlay_xattr_prefix()))
}

pub use apply::{ApplyMode, ApplyOptions, LayerBounds, apply_layer};
pub use cache::{LayerCache, LayerKey};
pub use changes::{Change, ChangeKind, Modified, changes};
pub use diff::{DiffOptions, DiffStats, vanished, write_diff, write_diff_gone, write_diff_with};
pub use error::{SnapshotError, SnapshotErrorKind};
