//! vessel: containerized, snapshotting workspaces for AI agents.
//!
//! This is the facade crate. The `Manager`/`Vessel` API of the design lands
//! here as the layers below it are built; today it re-exports the domain
//! types, the storage layer, the snapshot engine and the runtime.
//!
//! With the `youki` backend (default feature), call [`runtime::init`] first
//! thing in `main`, before any thread starts: each container runs in a
//! re-executed, single-threaded copy of the program (see [`runtime`]).
#![forbid(unsafe_code)]

pub use vessel_core::{
    CoreError, CoreErrorKind, ExecOptions, ExecResult, IdGenerator, ImageRef, SnapshotId, SnapshotManifest,
    UniqueIdGenerator, VesselId, VesselManifest,
};
pub use vessel_storage::{
    BlobEncoding, BlobReader, CompressedStorage, LocalStorage, Storage, StorageError, StorageErrorKind,
};

/// The snapshot engine: layer diffs, safe apply, layer cache, image archives.
pub use vessel_snapshot as snapshot;

/// The runtime layer: containers on a prepared rootfs, overlay mounting.
pub use vessel_runtime as runtime;
