//! vessel: containerized, snapshotting workspaces for AI agents.
//!
//! This is the facade crate. The `Manager`/`Vessel` API of the design lands
//! here as the layers below it are built; today it re-exports the domain
//! types, the storage layer and the snapshot engine.
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
