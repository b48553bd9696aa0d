//! vessel: containerized, snapshotting workspaces for AI agents.
//!
//! This is the facade crate: [`Manager`] creates, opens and deletes
//! workspaces ([`Vessel`]s) built from OCI images; a vessel has a confined
//! file API, runs commands in containers ([`Vessel::exec`]), and snapshots,
//! restores and forks its filesystem, kept in any [`Storage`].
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use vessel::{CompressedStorage, ExecOptions, LocalStorage, Manager, ManagerConfig};
//!
//! let storage = CompressedStorage::new(LocalStorage::new("/var/lib/vessel/data")?);
//! let mgr = Manager::new(ManagerConfig::default().storage(storage).mount_root("/var/lib/vessel/mounts")).await?;
//! let v = mgr.create_vessel("local/busybox:latest", "/work").await?;
//! v.write_file("hello.txt", b"hi\n", 0o644)?;
//! let res = v
//!     .exec(ExecOptions { command: vec!["cat".into(), "hello.txt".into()], persist_result: true, ..Default::default() })
//!     .await?;
//! assert_eq!(res.exit_code, 0);
//! let snap = v.create_snapshot("hello").await?;
//! v.delete_file("hello.txt")?;
//! v.restore_snapshot(&snap.id).await?;
//! v.close().await?;
//! mgr.close().await?;
//! # Ok(()) }
//! ```
//!
//! Call [`init`] first thing in `main`, before any thread starts:
//! each youki container runs in a re-executed, single-threaded copy of the
//! program, and the containerd backend's watchdog is another (see [`runtime`]).
//!
//! Vessels are isolated by default: each open vessel's containers run in a
//! user namespace of its own host id range, on an overlay over idmapped
//! layers, under docker's seccomp semantics and device rules (see
//! [`ManagerConfig::user_namespaces`] and the README's "Isolation").
#![warn(missing_docs)]
#![forbid(unsafe_code)]

mod config;
mod error;
mod fork;
mod fs;
mod host;
mod layers;
mod limits;
mod manager;
mod names;
mod quota;
mod sharing;
mod task;
mod user;
mod vessel;

pub use config::{Backend, DEFAULT_DISK_QUOTA, IdRanges, ManagerConfig, QuotaMode, VesselOptions, default_mount_root};
pub use error::{Result, VesselError, VesselErrorKind};
pub use fork::{FORKED_AT_LABEL, FORKED_FROM_LABEL, ForkOrigin, GcReport, MAX_FORKS};
pub use fs::{File, FileInfo, FileType, OVERFLOW_ID, OpenFlags};
pub use layers::registry;
pub use limits::{Limit, UnavailableLimit};
pub use manager::Manager;
pub use names::NAME_LABEL;
pub use quota::{
    DEFAULT_QUOTA_FS_SIZE, QuotaSetup, QuotaSetupOutcome, QuotaSetupReport, default_quota_image, remove_quota_setup,
    setup_quota,
};
pub use registry::{PullFailure, PullProgress, PulledImage, RegistryAuth};
pub use vessel::Vessel;
pub use vessel::network::{NetworkInfo, network_policy};
pub use vessel::process::{OUTPUT_RING, Output, OutputStream, ProcessHandle, ProcessInfo, ProcessStatus, StopReason};
pub use vessel_core::MAX_RULES as MAX_NETWORK_RULES;
pub use vessel_runtime::net::{NetConfig, NetworkStats, RefusedName};
pub use vessel_snapshot::{Change, ChangeKind, Modified};

/// Must be the first call in `main` of a program that uses vessel, before
/// any thread starts: in rootless mode it moves the process into its user
/// namespace, and in a youki runner or a containerd watchdog (both
/// re-executions of the program) it does that job and exits; otherwise it
/// returns at once (see [`runtime::init`]).
pub fn init() {
    vessel_runtime::init();
}

pub use vessel_core::{
    AllowRule, CoreError, CoreErrorKind, DomainPattern, ExecOptions, ExecResult, IdGenerator, ImageRef, Limits,
    NetworkPolicy, SnapshotId, SnapshotManifest, UniqueIdGenerator, VesselId, VesselManifest, VesselName,
};
pub use vessel_storage::lease::Holder;
pub use vessel_storage::{
    BlobEncoding, BlobReader, CompressedStorage, HostId, LocalStorage, Record, RecordKey, Storage, StorageError,
    StorageErrorKind, Version, WriteIf, open_url,
};

/// The storage layer: backends (`ObjectStorage` with the `s3`, `gcs` and
/// `azure` features), leases, conditional writes.
pub use vessel_storage as storage;

/// The snapshot engine: layer diffs, safe apply, layer cache, image archives.
pub use vessel_snapshot as snapshot;

/// The runtime layer: containers on a prepared rootfs, overlay mounting.
pub use vessel_runtime as runtime;
