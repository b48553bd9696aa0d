use std::io;
use std::path::PathBuf;

/// Errors of the runtime layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RuntimeError {
    /// The backend cannot run here (feature off, not root, missing kernel support, …).
    #[error("runtime {backend} is not available: {reason}")]
    Unavailable {
        /// Which backend.
        backend: &'static str,
        /// Why, in words a user can act on.
        reason: String,
    },
    /// The request is malformed (empty argv, relative rootfs, …).
    #[error("invalid run request: {0}")]
    InvalidRequest(String),
    /// A filesystem or process operation failed.
    #[error("{op} {}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// The path or object it was done to.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Creating or starting the container failed (the backend's own message).
    #[error("container failed: {0}")]
    Container(String),
    /// The image is not in the backend's image store.
    #[error("image {0} not found")]
    ImageNotFound(String),
    /// The process could not be started inside the container (missing binary, …).
    #[error("cannot execute {command:?}: {reason}")]
    Exec {
        /// `argv[0]`.
        command: String,
        /// Why.
        reason: String,
    },
}

/// Coarse classification of [`RuntimeError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RuntimeErrorKind {
    /// The backend cannot run here.
    Unavailable,
    /// The request was malformed.
    InvalidRequest,
    /// The OS or the backend failed.
    Io,
    /// The container or its process could not start.
    Start,
    /// What was asked for does not exist.
    NotFound,
}

impl RuntimeError {
    /// The error's kind.
    pub fn kind(&self) -> RuntimeErrorKind {
        match self {
            Self::Unavailable { .. } => RuntimeErrorKind::Unavailable,
            Self::InvalidRequest(_) => RuntimeErrorKind::InvalidRequest,
            Self::Io { .. } => RuntimeErrorKind::Io,
            Self::Container(_) | Self::Exec { .. } => RuntimeErrorKind::Start,
            Self::ImageNotFound(_) => RuntimeErrorKind::NotFound,
        }
    }

    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io { op, path, source }
    }
}
