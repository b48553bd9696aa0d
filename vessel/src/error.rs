//! The facade's error: one type over the layers' errors (kept as sources),
//! with a [`kind`](VesselError::kind) callers branch on.

use std::io;
use std::path::PathBuf;

use vessel_core::{CoreError, SnapshotId, VesselId};
use vessel_runtime::RuntimeError;
use vessel_snapshot::SnapshotError;
use vessel_storage::StorageError;

/// Errors of the vessel facade.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VesselError {
    /// An id, image reference or other value is malformed.
    #[error(transparent)]
    Core(#[from] CoreError),
    /// The storage failed (missing vessel, snapshot or image; corrupt blob; I/O).
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// A layer could not be written, read or verified.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// The container runtime failed.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// A filesystem operation on the host failed.
    #[error("{op} {}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// On what.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A file operation inside the vessel failed (the path is the vessel's).
    #[error("{op} {path}")]
    File {
        /// What was being done.
        op: &'static str,
        /// The path inside the vessel.
        path: String,
        /// The OS error (`NotFound`, `AlreadyExists`, …).
        #[source]
        source: io::Error,
    },
    /// A path leads outside the vessel's root (`..` above `/`) or is unusable.
    #[error("invalid path {path:?}: {reason}")]
    InvalidPath {
        /// The path as given.
        path: String,
        /// Why.
        reason: &'static str,
    },
    /// The vessel does not exist in storage.
    #[error("vessel {0} not found")]
    VesselNotFound(VesselId),
    /// No vessel has this name.
    #[error("no vessel is named {0:?}")]
    NameNotFound(String),
    /// The vessel has no background process with this id (or it ended
    /// long enough ago that its status was dropped).
    #[error("no process {0} in this vessel")]
    ProcessNotFound(u64),
    /// Another vessel has this name (names are unique per storage).
    #[error("the name {name:?} is already in use by vessel {vessel}")]
    NameInUse {
        /// The name.
        name: String,
        /// The vessel that has it.
        vessel: VesselId,
    },
    /// The snapshot is not one of this vessel's.
    #[error("snapshot {snapshot} not found in vessel {vessel}")]
    SnapshotNotFound {
        /// The vessel.
        vessel: VesselId,
        /// The snapshot asked for.
        snapshot: SnapshotId,
    },
    /// The snapshot cannot be deleted.
    #[error("snapshot {snapshot} cannot be deleted: {reason}")]
    SnapshotInUse {
        /// The snapshot.
        snapshot: SnapshotId,
        /// It is current, or the parent of another.
        reason: &'static str,
    },
    /// The image is in neither the storage nor the backend's image store.
    #[error("image {0} not found")]
    ImageNotFound(String),
    /// The image behind the vessel's reference is not the one it was created from.
    #[error("image {reference} changed: the vessel was created from {pinned}, the image is now {found}")]
    ImageChanged {
        /// The reference.
        reference: String,
        /// The config digest pinned at creation.
        pinned: String,
        /// The config digest found now.
        found: String,
    },
    /// Another process (or another handle in this one) has the vessel open.
    #[error("vessel {0} is open elsewhere")]
    Locked(VesselId),
    /// Another host has the vessel open and its lease is live.
    #[error("vessel {vessel} is open on host {holder}; its lease runs until {expires_at} unless renewed")]
    Busy {
        /// The vessel.
        vessel: VesselId,
        /// The holder's host name.
        holder: String,
        /// The holder's host id.
        host: vessel_storage::HostId,
        /// When the holder's lease expires unless renewed.
        expires_at: chrono::DateTime<chrono::Utc>,
    },
    /// This host lost its lease on the vessel (another took it over, e.g.
    /// after this process was paused past its TTL): nothing it does is
    /// committed any more. Close the vessel; reopening it is refused while
    /// the new holder lives.
    #[error("vessel {0}: this host's lease was taken over; the change was not committed")]
    LeaseLost(VesselId),
    /// The vessel (or its manager) was closed, or the vessel deleted.
    #[error("vessel {0} is closed")]
    Closed(VesselId),
    /// A fork was not made: snapshots it would share, stored under
    /// `owner`, are being deleted (by this or another host). Nothing was
    /// created; a retry after the deletion sees what is left.
    #[error("the fork was not made: snapshots of vessel {owner} are being deleted")]
    ForkRaced {
        /// The vessel whose snapshot blobs are being deleted.
        owner: VesselId,
    },
    /// A `File` opened before a snapshot or restore remounted the vessel.
    #[error("file handle in vessel {0} is stale (a snapshot or restore remounted the vessel)")]
    StaleFile(VesselId),
    /// A command was empty or options contradict each other.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// This host cannot isolate vessels as configured: user namespaces over
    /// idmapped layers are missing. `ManagerConfig::user_namespaces(false)`
    /// runs without them (unsafe for untrusted code).
    #[error(
        "vessel isolation is not supported on this host; ManagerConfig::user_namespaces(false) turns it off (unsafe for untrusted code)"
    )]
    IsolationUnsupported(#[source] RuntimeError),
    /// Rootless mode (the default for a user other than root) cannot run
    /// here: no subordinate ids, no `newuidmap`, no user namespaces, or the
    /// program did not call `vessel::init()` first in `main`.
    #[error("rootless mode is unavailable: {0}")]
    RootlessUnavailable(String),
    /// `ManagerConfig::rootless` asks for the mode this process is not in
    /// (the mode is chosen once, in `vessel::init()`).
    #[error("{0}")]
    RootlessMismatch(String),
    /// Pulling an image from a registry failed.
    #[error("cannot pull {reference}: {failure}")]
    Pull {
        /// The reference.
        reference: String,
        /// Why, for matching.
        failure: crate::PullFailure,
        /// The registry client's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Disk quotas are required ([`crate::QuotaMode::Require`]) but this
    /// host's mount root cannot enforce them. [`crate::QuotaMode::Auto`]
    /// runs without them (and lists the disk limit in
    /// `Manager::unavailable_limits`); [`crate::setup_quota`] gives a root
    /// user a mount root that can.
    #[error("disk quotas cannot be enforced under {}: {reason}", path.display())]
    QuotaUnsupported {
        /// The mount root's vessels directory.
        path: std::path::PathBuf,
        /// What the host lacks.
        reason: String,
    },
    /// Setting up a quota-capable mount root ([`crate::setup_quota`]) failed.
    #[error("cannot set up disk quotas at {}: {reason}", path.display())]
    QuotaSetup {
        /// The mount root.
        path: std::path::PathBuf,
        /// What failed.
        reason: String,
        /// The OS or tool error, where there is one.
        #[source]
        source: Option<io::Error>,
    },
    /// Every host id range of the configured pool is in use by an open vessel.
    #[error("all {0} id ranges are in use by open vessels (ManagerConfig::id_ranges)")]
    IdRangesExhausted(u32),
    /// The image's `USER` names a user or group its `/etc/passwd` or `/etc/group` lacks.
    #[error("image user {user:?}: {reason}")]
    UnknownUser {
        /// The `USER` value.
        user: String,
        /// What is missing.
        reason: String,
    },
}

/// Coarse classification of [`VesselError`], for matching.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum VesselErrorKind {
    /// Bad input: ids, paths, references, options.
    InvalidInput,
    /// What was asked for does not exist.
    NotFound,
    /// The operation conflicts with the vessel's state (locked, closed, in use, stale).
    Conflict,
    /// Stored data failed verification or is malformed.
    Corrupt,
    /// The OS, runtime or storage failed.
    Io,
    /// The backend is unavailable or not compiled in.
    Unavailable,
    /// The vessel's disk quota (or the disk) is full: `EDQUOT`/`ENOSPC`.
    QuotaExceeded,
    /// A registry or the storage refused the credentials.
    Unauthorized,
}

impl VesselError {
    /// The error's kind.
    pub fn kind(&self) -> VesselErrorKind {
        use VesselErrorKind as K;
        match self {
            Self::Core(_) | Self::InvalidPath { .. } | Self::InvalidInput(_) | Self::UnknownUser { .. } => {
                K::InvalidInput
            }
            Self::IsolationUnsupported(_)
            | Self::QuotaUnsupported { .. }
            | Self::QuotaSetup { .. }
            | Self::RootlessUnavailable(_)
            | Self::RootlessMismatch(_) => K::Unavailable,
            Self::Pull { failure, .. } => match failure {
                crate::PullFailure::NotFound => K::NotFound,
                crate::PullFailure::Unauthorized => K::Unauthorized,
                crate::PullFailure::Unreachable => K::Unavailable,
                crate::PullFailure::Corrupt => K::Corrupt,
                _ => K::Io,
            },
            Self::IdRangesExhausted(_) => K::Conflict,
            Self::Storage(e) => match e.kind() {
                vessel_storage::StorageErrorKind::NotFound => K::NotFound,
                vessel_storage::StorageErrorKind::Corrupt => K::Corrupt,
                vessel_storage::StorageErrorKind::InvalidInput => K::InvalidInput,
                vessel_storage::StorageErrorKind::Conflict | vessel_storage::StorageErrorKind::Busy => K::Conflict,
                vessel_storage::StorageErrorKind::Denied => K::Unauthorized,
                vessel_storage::StorageErrorKind::NoSpace => K::QuotaExceeded,
                _ => K::Io,
            },
            Self::Snapshot(e) => match e.kind() {
                vessel_snapshot::SnapshotErrorKind::InvalidData => K::Corrupt,
                // What the workspace holds cannot be snapshotted (a device node).
                vessel_snapshot::SnapshotErrorKind::Unsupported => K::InvalidInput,
                vessel_snapshot::SnapshotErrorKind::NotFound => K::NotFound,
                // A layer past its bound: refused as a quota refuses a write.
                vessel_snapshot::SnapshotErrorKind::TooLarge | vessel_snapshot::SnapshotErrorKind::NoSpace => {
                    K::QuotaExceeded
                }
                _ => K::Io,
            },
            // As a shell's 127 and 126: the command is missing, or not a program.
            Self::Runtime(vessel_runtime::RuntimeError::Exec { failure, .. }) => match failure {
                vessel_runtime::ExecFailure::NotFound => K::NotFound,
                _ => K::InvalidInput,
            },
            Self::Runtime(e) => match e.kind() {
                vessel_runtime::RuntimeErrorKind::Unavailable => K::Unavailable,
                vessel_runtime::RuntimeErrorKind::InvalidRequest => K::InvalidInput,
                _ => K::Io,
            },
            Self::File { source, .. } if source.kind() == io::ErrorKind::NotFound => K::NotFound,
            Self::Io { source, .. } | Self::File { source, .. }
                if matches!(source.raw_os_error(), Some(nix::libc::EDQUOT | nix::libc::ENOSPC)) =>
            {
                K::QuotaExceeded
            }
            Self::Io { .. } | Self::File { .. } => K::Io,
            Self::VesselNotFound(_)
            | Self::NameNotFound(_)
            | Self::ProcessNotFound(_)
            | Self::SnapshotNotFound { .. }
            | Self::ImageNotFound(_) => K::NotFound,
            Self::NameInUse { .. } => K::Conflict,
            Self::SnapshotInUse { .. } | Self::Locked(_) | Self::Closed(_) | Self::StaleFile(_) => K::Conflict,
            Self::Busy { .. } | Self::LeaseLost(_) | Self::ForkRaced { .. } => K::Conflict,
            Self::ImageChanged { .. } => K::Corrupt,
        }
    }

    /// A storage error of a lease: `Busy` as [`VesselError::Busy`].
    pub(crate) fn lease(e: StorageError) -> Self {
        match e {
            StorageError::Busy { vessel, holder, host, expires_at } => Self::Busy { vessel, holder, host, expires_at },
            e => Self::Storage(e),
        }
    }

    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io { op, path, source }
    }
}

/// The facade's result type.
pub type Result<T, E = VesselError> = std::result::Result<T, E>;
