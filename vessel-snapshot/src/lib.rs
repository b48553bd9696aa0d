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
//! - [`image`]: docker-save and OCI image-layout archives into the cache
//!   ([`image::unpack_image`]).
//!
//! Everything here is synchronous, blocking filesystem work: async callers
//! run it on a blocking thread.
#![forbid(unsafe_code)]

mod apply;
mod cache;
mod codec;
mod diff;
mod error;
pub mod image;
mod tar_reader;

pub use apply::{ApplyMode, ApplyOptions, apply_layer};
pub use cache::{LayerCache, LayerKey};
pub use diff::{DiffOptions, DiffStats, write_diff, write_diff_with};
pub use error::{SnapshotError, SnapshotErrorKind};
