//! The storage layer's error: what is missing, corrupt or invalid, by name,
//! with a [`kind`](StorageError::kind) callers branch on.

use std::fmt;
use std::io;
use std::path::PathBuf;

use vessel_core::{CoreError, ImageRef, SnapshotId, VesselId};

/// Errors of the storage layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// The vessel has no manifest in storage.
    #[error("vessel {0} not found in storage")]
    VesselNotFound(VesselId),
    /// The snapshot's diff is not in storage.
    #[error("snapshot {snapshot} of vessel {vessel} not found in storage")]
    SnapshotNotFound {
        /// The vessel.
        vessel: VesselId,
        /// The missing snapshot.
        snapshot: SnapshotId,
    },
    /// No archive is stored for the image.
    #[error("image {0} not found in storage")]
    ImageNotFound(ImageRef),
    /// An id or reference given to the storage was malformed.
    #[error(transparent)]
    Invalid(#[from] CoreError),
    /// A filesystem operation failed.
    #[error("{op} {}", path.display())]
    Io {
        /// What was being done (`create`, `rename`, …).
        op: &'static str,
        /// The path it was done to.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Reading the stream handed to a save failed; nothing was stored.
    #[error("reading the data to store failed")]
    Source(#[source] io::Error),
    /// Stored data is unreadable: unparsable manifest, bad compression, …
    #[error("corrupt {what}: {reason}")]
    Corrupt {
        /// What is corrupt (`manifest of vessel …`).
        what: String,
        /// Why it is considered corrupt.
        reason: String,
    },
    /// Compressing or decompressing a blob failed.
    #[error("{op} failed")]
    Codec {
        /// `compress` or `decompress`.
        op: &'static str,
        /// The codec's error.
        #[source]
        source: io::Error,
    },
}

/// Coarse classification of [`StorageError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StorageErrorKind {
    /// A vessel, snapshot or image does not exist.
    NotFound,
    /// An id or reference was malformed.
    InvalidInput,
    /// The operating system or the backend failed.
    Io,
    /// The caller's stream failed.
    Source,
    /// Stored data failed validation.
    Corrupt,
}

impl StorageError {
    /// The error's kind.
    pub fn kind(&self) -> StorageErrorKind {
        match self {
            Self::VesselNotFound(_) | Self::SnapshotNotFound { .. } | Self::ImageNotFound(_) => {
                StorageErrorKind::NotFound
            }
            Self::Invalid(_) => StorageErrorKind::InvalidInput,
            Self::Io { .. } | Self::Codec { .. } => StorageErrorKind::Io,
            Self::Source(_) => StorageErrorKind::Source,
            Self::Corrupt { .. } => StorageErrorKind::Corrupt,
        }
    }

    /// Whether this is one of the not-found errors.
    pub fn is_not_found(&self) -> bool {
        self.kind() == StorageErrorKind::NotFound
    }

    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io { op, path, source }
    }
}

impl fmt::Display for StorageErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::NotFound => "not found",
            Self::InvalidInput => "invalid input",
            Self::Io => "I/O error",
            Self::Source => "source stream failed",
            Self::Corrupt => "corrupt data",
        })
    }
}
