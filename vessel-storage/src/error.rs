//! The storage layer's error: what is missing, corrupt or invalid, by name,
//! with a [`kind`](StorageError::kind) callers branch on.

use std::fmt;
use std::io;
use std::path::PathBuf;

use vessel_core::{CoreError, ImageRef, SnapshotId, VesselId};

/// The boxed error of a remote store (an `object_store::Error`).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

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
    /// A conditional write found the object changed (or present, or gone)
    /// since it was read: another host wrote it.
    #[error("{what} was changed by another writer")]
    Conflict {
        /// What was to be written (`manifest of vessel …`).
        what: String,
    },
    /// The vessel is open on another host whose lease is live.
    #[error("vessel {vessel} is open on host {holder} ({host}), whose lease runs until {expires_at}")]
    Busy {
        /// The vessel.
        vessel: VesselId,
        /// The holder's host name.
        holder: String,
        /// The holder's host id.
        host: crate::HostId,
        /// When the holder's lease expires unless renewed.
        expires_at: chrono::DateTime<chrono::Utc>,
    },
    /// The storage URL is malformed or names an unknown scheme.
    #[error("invalid storage URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The URL's scheme needs a cargo feature this build lacks.
    #[error("storage URL scheme {scheme}:// needs vessel built with feature `{feature}`")]
    NotCompiled {
        /// The scheme.
        scheme: String,
        /// The feature that provides it.
        feature: &'static str,
    },
    /// The bucket (or container) the URL names does not exist.
    #[error("bucket of {url} does not exist")]
    NoSuchBucket {
        /// The storage URL.
        url: String,
        /// The store's error.
        #[source]
        source: BoxError,
    },
    /// The store refused the credentials.
    #[error("{op} {key}: access denied")]
    Denied {
        /// What was being done.
        op: &'static str,
        /// The object key.
        key: String,
        /// The store's error.
        #[source]
        source: BoxError,
    },
    /// A remote store's request failed (after its retries).
    #[error("{op} {key}")]
    Remote {
        /// What was being done (`put`, `get`, `list`, …).
        op: &'static str,
        /// The object key or prefix.
        key: String,
        /// The store's error.
        #[source]
        source: BoxError,
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
    /// A conditional write lost to another writer.
    Conflict,
    /// The vessel is held by another live host.
    Busy,
    /// The store refused the credentials.
    Denied,
    /// The disk (or a quota on it) under local storage is full.
    NoSpace,
}

impl StorageError {
    /// The error's kind.
    pub fn kind(&self) -> StorageErrorKind {
        match self {
            Self::VesselNotFound(_) | Self::SnapshotNotFound { .. } | Self::ImageNotFound(_) => {
                StorageErrorKind::NotFound
            }
            // A missing bucket is the URL's fault, never a "vessel not found".
            Self::Invalid(_) | Self::InvalidUrl { .. } | Self::NotCompiled { .. } | Self::NoSuchBucket { .. } => {
                StorageErrorKind::InvalidInput
            }
            Self::Io { source, .. }
                if matches!(source.kind(), io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded) =>
            {
                StorageErrorKind::NoSpace
            }
            Self::Io { .. } | Self::Codec { .. } | Self::Remote { .. } => StorageErrorKind::Io,
            Self::Conflict { .. } => StorageErrorKind::Conflict,
            Self::Busy { .. } => StorageErrorKind::Busy,
            Self::Denied { .. } => StorageErrorKind::Denied,
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
            Self::Conflict => "conflicting write",
            Self::Busy => "held by another host",
            Self::Denied => "access denied",
            Self::NoSpace => "no space left",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_disk_is_no_space_other_io_is_io() {
        let err = |errno| StorageError::io("write", "/s/.tmp/x")(io::Error::from_raw_os_error(errno));
        assert_eq!(err(28).kind(), StorageErrorKind::NoSpace, "ENOSPC");
        assert_eq!(err(122).kind(), StorageErrorKind::NoSpace, "EDQUOT");
        assert_eq!(err(5).kind(), StorageErrorKind::Io, "EIO");
    }
}
