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
    /// A layer's tar stream does not parse: where, and why.
    #[error("malformed tar archive at byte {at}: {reason}")]
    Tar {
        /// Offset in the uncompressed stream of the header or block at fault.
        at: u64,
        /// What is wrong there.
        reason: String,
    },
    /// An image archive could not be read or written as a tar.
    #[error("image archive: {op}")]
    Archive {
        /// What was being done.
        op: &'static str,
        /// The tar reader's or writer's error.
        #[source]
        source: io::Error,
    },
    /// An image archive is neither an OCI image layout nor a docker-save archive.
    #[error("malformed image archive: neither an OCI image layout nor a docker-save archive")]
    NotAnImageArchive,
    /// An image archive lacks a member its documents name.
    #[error("malformed image archive: it lacks {0}")]
    MissingMember(String),
    /// An image document (index, manifest, config) does not parse.
    #[error("malformed image {what}")]
    ImageDocument {
        /// Which document.
        what: &'static str,
        /// What oci-spec found wrong.
        #[source]
        source: oci_spec::OciSpecError,
    },
    /// A docker-save `manifest.json` does not parse.
    #[error("malformed image archive: manifest.json")]
    DockerManifest(#[source] serde_json::Error),
    /// A digest whose algorithm vessel does not verify (only sha256 is).
    #[error("unsupported digest {0}")]
    UnsupportedDigest(String),
    /// A blob's size differs from its descriptor's.
    #[error("blob {digest} has {actual} bytes, its descriptor says {declared}")]
    SizeMismatch {
        /// The blob's digest.
        digest: String,
        /// Its bytes.
        actual: u64,
        /// What the descriptor says.
        declared: u64,
    },
    /// A manifest lists another number of layers than its config's diff ids.
    #[error("malformed image: {what} lists {layers} layers, the config {diff_ids} diff ids")]
    LayerCount {
        /// `manifest` or `manifest.json`.
        what: &'static str,
        /// Layers in the manifest.
        layers: usize,
        /// Diff ids in the config.
        diff_ids: usize,
    },
    /// An image has no manifest for this platform, or an archive no image at all.
    #[error("malformed image: no image for {0}")]
    NoImage(String),
    /// A cache key part (layer digest, snapshot checksum, holder name) is malformed.
    #[error("invalid {what} {value:?}")]
    InvalidKey {
        /// Which part.
        what: &'static str,
        /// The value given.
        value: String,
    },
    /// The thread decoding a layer panicked.
    #[error("the layer decoder panicked")]
    DecoderPanicked,
    /// A layer was to be applied onto a path that names no directory entry.
    #[error("cannot apply a layer onto {}", .0.display())]
    BadTarget(PathBuf),
    /// An image archive holds several images and none is the reference asked for.
    #[error("the archive holds no image {reference:?}")]
    ImageNotInArchive {
        /// The reference asked for.
        reference: String,
    },
    /// A layer expands past a bound of [`crate::LayerBounds`] (bytes,
    /// entries or path depth): refused before it could fill the disk.
    #[error("the layer expands past its bound: more than {limit} {what}")]
    TooLarge {
        /// Which bound: `bytes`, `entries` or `directory levels`.
        what: &'static str,
        /// The bound.
        limit: u64,
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
    /// Input past a bound ([`crate::LayerBounds`]).
    TooLarge,
    /// The disk, or a quota on it, is full (`ENOSPC`, `EDQUOT`).
    NoSpace,
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
            Self::Io { source: e, .. } | Self::Stream(_, e)
                if matches!(e.raw_os_error(), Some(nix::libc::ENOSPC | nix::libc::EDQUOT)) =>
            {
                SnapshotErrorKind::NoSpace
            }
            Self::Io { .. } | Self::Stream(..) => SnapshotErrorKind::Io,
            Self::UnsupportedOverlayFeature { .. } | Self::Changed { .. } | Self::DeviceNode { .. } => {
                SnapshotErrorKind::Unsupported
            }
            Self::DigestMismatch { .. }
            | Self::UnsafeEntry { .. }
            | Self::Tar { .. }
            | Self::Archive { .. }
            | Self::NotAnImageArchive
            | Self::MissingMember(_)
            | Self::ImageDocument { .. }
            | Self::DockerManifest(_)
            | Self::UnsupportedDigest(_)
            | Self::SizeMismatch { .. }
            | Self::LayerCount { .. }
            | Self::NoImage(_)
            | Self::InvalidKey { .. }
            | Self::DecoderPanicked
            | Self::BadTarget(_) => SnapshotErrorKind::InvalidData,
            Self::ImageNotInArchive { .. } => SnapshotErrorKind::NotFound,
            Self::TooLarge { .. } => SnapshotErrorKind::TooLarge,
        }
    }

    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io { op, path, source }
    }
}
