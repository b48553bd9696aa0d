//! The snapshot engine's error: I/O with the path it was about, a layer
//! refused as hostile or malformed (with where and why), or a bad cache key.

use std::io;
use std::path::PathBuf;

/// Errors of the snapshot engine.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotError {
    /// A filesystem operation failed.
    #[error("{op} {}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// The path it was done to.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Writing the diff stream or reading a layer stream failed.
    #[error("{0} stream failed")]
    Stream(&'static str, #[source] io::Error),
    /// The upper dir uses an overlay feature whose on-disk form a layer diff
    /// cannot express (`redirect_dir`, `metacopy`).
    #[error("{} uses overlay {feature}, which a layer diff cannot express; mount with {feature}=off", path.display())]
    UnsupportedOverlayFeature {
        /// `redirect_dir` or `metacopy`.
        feature: &'static str,
        /// The entry that carries it.
        path: PathBuf,
    },
    /// The upper dir holds a device node, which no snapshot may carry: a
    /// vessel reopened elsewhere would get a host device. Refused before
    /// anything is committed; delete it (or snapshot without it).
    #[error("{} is a device node; snapshots cannot hold device nodes (delete it and snapshot again)", path.display())]
    DeviceNode {
        /// The node, in the upper dir.
        path: PathBuf,
    },
    /// A file changed size while it was being archived.
    #[error("{} changed while it was being archived", path.display())]
    Changed {
        /// The file.
        path: PathBuf,
    },
    /// A layer's bytes do not hash to the expected digest.
    #[error("layer digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch {
        /// The digest the caller expected.
        expected: String,
        /// The digest of what was read.
        actual: String,
    },
    /// A tar entry would escape the target or is otherwise not allowed.
    #[error("refused tar entry {entry:?}: {reason}")]
    UnsafeEntry {
        /// The entry's path as written in the archive.
        entry: String,
        /// Why it is refused.
        reason: &'static str,
    },
    /// The archive is malformed.
    #[error("malformed layer archive: {0}")]
    Malformed(String),
    /// An image archive holds several images and none is the reference asked for.
    #[error("the archive holds no image {reference:?}")]
    ImageNotInArchive {
        /// The reference asked for.
        reference: String,
    },
}

/// Coarse classification of [`SnapshotError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SnapshotErrorKind {
    /// The operating system failed.
    Io,
    /// The tree cannot be diffed as it is.
    Unsupported,
    /// Input failed verification: digest mismatch, hostile or malformed archive.
    InvalidData,
    /// What was asked for is not there.
    NotFound,
}

impl SnapshotError {
    /// The error's kind.
    pub fn kind(&self) -> SnapshotErrorKind {
        match self {
            // A stream that ends early or does not decode is bad data (a
            // truncated or tampered blob), not a failing disk or network.
            Self::Stream(_, e) if matches!(e.kind(), io::ErrorKind::InvalidData | io::ErrorKind::UnexpectedEof) => {
                SnapshotErrorKind::InvalidData
            }
            Self::Io { .. } | Self::Stream(..) => SnapshotErrorKind::Io,
            Self::UnsupportedOverlayFeature { .. } | Self::Changed { .. } | Self::DeviceNode { .. } => {
                SnapshotErrorKind::Unsupported
            }
            Self::DigestMismatch { .. } | Self::UnsafeEntry { .. } | Self::Malformed(_) => {
                SnapshotErrorKind::InvalidData
            }
            Self::ImageNotInArchive { .. } => SnapshotErrorKind::NotFound,
        }
    }

    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io { op, path, source }
    }
}
