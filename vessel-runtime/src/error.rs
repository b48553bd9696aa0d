//! The runtime layer's error: a backend that cannot run here, a container
//! that could not start (classified as docker classifies it), or the OS.

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
    /// The runner (the re-executed process that runs a youki container)
    /// reports that creating, starting or removing the container failed;
    /// libcontainer's error, as the runner wrote it (it crossed a pipe).
    #[error("container failed: {0}")]
    Runner(String),
    /// The runner ended without a report (killed); the container was removed.
    #[error("the runner died ({0}); its container was removed")]
    RunnerDied(std::process::ExitStatus),
    /// Removing a container left by a dead runner failed.
    #[error("cleaning up container {id} failed ({status})")]
    Cleanup {
        /// The container.
        id: String,
        /// How the cleanup runner ended.
        status: std::process::ExitStatus,
    },
    /// A live sandbox could not start (its agent did not answer as it must).
    #[error("the vessel's sandbox did not start: {0}")]
    SandboxStart(String),
    /// The live sandbox ended (closed, or its container died) under a call.
    #[error("the vessel's sandbox ended")]
    SandboxEnded,
    /// A task's exit status is not a process's (out of `i32`).
    #[error("exit status {0} out of range")]
    ExitStatus(u32),
    /// A backend's record of an image is unusable.
    #[error("image {reference} in the backend's store: {reason}")]
    ImageRecord {
        /// The image.
        reference: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A blob in the backend's content store has another size than its descriptor's.
    #[error("blob {digest} has {read}+ bytes in the store, its descriptor says {declared}")]
    BlobSize {
        /// The blob.
        digest: String,
        /// Bytes read before stopping.
        read: u64,
        /// What the descriptor says.
        declared: u64,
    },
    /// A call to the backend's daemon failed (containerd's gRPC status is the source).
    #[error("{backend} {op}")]
    Call {
        /// Which backend.
        backend: &'static str,
        /// What was asked of it.
        op: &'static str,
        /// The daemon's answer (a `tonic::Status` for containerd).
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// An OCI runtime spec or image document could not be built or written.
    #[error("OCI spec")]
    Spec(#[source] oci_spec::OciSpecError),
    /// Encoding a JSON document failed.
    #[error("encode JSON")]
    Json(#[source] serde_json::Error),
    /// The process could not be started inside the container (missing
    /// binary, …). Said as docker and runc say it (`exec: "x": executable
    /// file not found in $PATH`); the backend's own words are in `reason`.
    #[error("exec: {command:?}: {}", failure.describe(command))]
    Exec {
        /// `argv[0]`.
        command: String,
        /// Why, in the backend's words.
        reason: String,
        /// Which way it failed.
        failure: ExecFailure,
    },
}

/// How starting a command failed, as a shell (and docker) tells it apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ExecFailure {
    /// No such command (exit status 127 in a shell or `docker run`).
    NotFound,
    /// It exists but cannot be executed (126).
    NotExecutable,
}

impl ExecFailure {
    /// What went wrong, in runc's words (what `docker exec` prints).
    pub fn describe(self, command: &str) -> &'static str {
        match self {
            // runc looks a bare name up in $PATH, and stats a path.
            Self::NotFound if command.contains('/') => "no such file or directory",
            Self::NotFound => "executable file not found in $PATH",
            Self::NotExecutable => "permission denied",
        }
    }

    /// The exit status a shell or docker reports for it.
    pub fn exit_code(self) -> i32 {
        match self {
            Self::NotFound => 127,
            Self::NotExecutable => 126,
        }
    }
}

/// Classifies a backend's message about a container that failed to start:
/// the command's own fault (missing, not executable) or the runtime's.
/// One function for every backend, so both say the same thing.
#[cfg_attr(not(any(feature = "youki", feature = "containerd")), allow(dead_code))]
pub(crate) fn start_failure(command: &str, message: &str) -> RuntimeError {
    let m = message.to_ascii_lowercase();
    let failure = if m.contains("permission denied")
        || m.contains("correct permission")
        || m.contains("exec format error")
        || m.contains("not executable")
    {
        Some(ExecFailure::NotExecutable)
    } else if m.contains("not found") || m.contains("no such file or directory") || m.contains("executable file") {
        Some(ExecFailure::NotFound)
    } else {
        None
    };
    match failure {
        Some(failure) => RuntimeError::Exec { command: command.into(), reason: message.into(), failure },
        None => RuntimeError::Runner(message.into()),
    }
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
}

impl RuntimeError {
    /// The error's kind.
    pub fn kind(&self) -> RuntimeErrorKind {
        match self {
            Self::Unavailable { .. } => RuntimeErrorKind::Unavailable,
            Self::InvalidRequest(_) => RuntimeErrorKind::InvalidRequest,
            Self::Io { .. } => RuntimeErrorKind::Io,
            Self::Runner(_) | Self::RunnerDied(_) | Self::Exec { .. } | Self::SandboxStart(_) => {
                RuntimeErrorKind::Start
            }
            Self::SandboxEnded => RuntimeErrorKind::Io,
            Self::Cleanup { .. } | Self::ExitStatus(_) | Self::BlobSize { .. } => RuntimeErrorKind::Io,
            Self::ImageRecord { .. } => RuntimeErrorKind::Io,
            Self::Call { .. } | Self::Json(_) => RuntimeErrorKind::Io,
            Self::Spec(_) => RuntimeErrorKind::InvalidRequest,
        }
    }

    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io { op, path, source }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_failures_are_classified_alike_for_every_backend() {
        let failure = |m: &str| match start_failure("x", m) {
            RuntimeError::Exec { failure, .. } => Some(failure),
            _ => None,
        };
        // youki's and runc's words.
        assert_eq!(failure("executable 'x' not found in $PATH"), Some(ExecFailure::NotFound));
        assert_eq!(failure("exec: \"x\": executable file not found in $PATH"), Some(ExecFailure::NotFound));
        assert_eq!(
            failure("executable 'x' at path '\"/etc/passwd\"' does not have correct permissions"),
            Some(ExecFailure::NotExecutable)
        );
        assert_eq!(failure("exec: \"/etc/passwd\": permission denied"), Some(ExecFailure::NotExecutable));
        assert_eq!(failure("cgroup setup failed"), None);
        assert_eq!(ExecFailure::NotFound.exit_code(), 127);
        // Said as docker says it, whatever the backend's words were.
        let e = start_failure("nosuchcmd", "exec process failed: executable 'nosuchcmd' not found in $PATH");
        assert_eq!(e.to_string(), r#"exec: "nosuchcmd": executable file not found in $PATH"#);
        let e = start_failure("/no/such", "No such file or directory (os error 2)");
        assert_eq!(e.to_string(), r#"exec: "/no/such": no such file or directory"#);
        let e = start_failure("/etc/passwd", "Permission denied (os error 13)");
        assert_eq!(e.to_string(), r#"exec: "/etc/passwd": permission denied"#);
        assert_eq!(ExecFailure::NotExecutable.exit_code(), 126);
    }
}
