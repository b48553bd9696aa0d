//! Where vessel keeps its data: vessel manifests, snapshot layer diffs and
//! image archives.
//!
//! [`Storage`] is the one trait every backend implements. It is async and
//! object safe (the facade keeps an `Arc<dyn Storage>`), and it streams:
//! snapshots and images pass through as [`BlobReader`]s and are never held
//! in memory whole. Backends:
//!
//! - [`LocalStorage`]: a directory, in the Go original's layout, with atomic,
//!   durable writes;
//! - [`CompressedStorage`]: a decorator that zstd-compresses blobs on the way
//!   in and, on the way out, decodes whatever it finds (zstd, the Go
//!   original's gzip, or plain) by its magic bytes.
//!
//! ```no_run
//! # async fn demo() -> Result<(), vessel_storage::StorageError> {
//! use vessel_storage::{CompressedStorage, LocalStorage, Storage};
//! let storage = CompressedStorage::new(LocalStorage::new("/var/lib/vessel/data")?);
//! for id in storage.list_vessels().await? {
//!     let manifest = storage.load_vessel_manifest(&id).await?;
//!     println!("{id}: {} snapshots", manifest.snapshots.len());
//! }
//! # Ok(()) }
//! ```
#![warn(missing_docs)]
#![forbid(unsafe_code)]

mod compressed;
mod durable;
mod error;
pub mod lease;
mod local;
#[cfg(feature = "object-store")]
mod object;
#[cfg(feature = "object-store")]
mod object_errors;
pub mod pipe;
mod record;
#[cfg(feature = "object-store")]
mod upload;
mod url;

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use tokio::io::AsyncRead;

pub use compressed::CompressedStorage;
pub use error::{BoxError, StorageError, StorageErrorKind};
pub use local::LocalStorage;
#[cfg(feature = "object-store")]
pub use object::ObjectStorage;
pub use record::{HostId, Record, RecordKey, Version, WriteIf};
pub use url::open_url;
pub use vessel_core::{ImageRef, SnapshotId, VesselId, VesselManifest};

/// A stream of blob bytes handed to or returned by a [`Storage`].
///
/// A reader returned by a storage yields an error, never a clean end of
/// file, if the blob could not be read whole.
pub type BlobReader = Box<dyn AsyncRead + Send + Unpin>;

/// How a stored blob is encoded, which decides its file name extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum BlobEncoding {
    /// Stored as given (`.tar`).
    Plain,
    /// gzip, the Go original's format (`.tar.gz`).
    Gzip,
    /// zstd (`.tar.zst`).
    Zstd,
}

impl BlobEncoding {
    /// Every encoding, in the order a reader should look for them when it has no preference.
    pub const ALL: [BlobEncoding; 3] = [BlobEncoding::Zstd, BlobEncoding::Gzip, BlobEncoding::Plain];

    /// The file name suffix the Go original's layout uses for a tar blob in this encoding.
    pub fn extension(self) -> &'static str {
        match self {
            Self::Plain => ".tar",
            Self::Gzip => ".tar.gz",
            Self::Zstd => ".tar.zst",
        }
    }
}

/// Persistence for vessel manifests, snapshot diffs and images.
///
/// Semantics every implementation keeps (the conformance suite checks them):
/// - a save is atomic: until it returns `Ok`, readers see the previous
///   content (or nothing); a failed, cancelled or crashed save leaves no
///   partial blob behind under the key;
/// - a load of something absent is a `NotFound` error naming it;
/// - deletes are idempotent: deleting what is absent succeeds, so an
///   interrupted delete can simply be retried;
/// - blobs stream in both directions with bounded memory;
/// - conditional writes (manifests, [`Record`]s) are linearizable: of two
///   writers that read the same version, one wins and the other gets
///   `Conflict`, across processes and hosts sharing the storage.
#[async_trait]
pub trait Storage: Send + Sync + fmt::Debug {
    /// Writes (or replaces) the manifest of `manifest.id`, unconditionally.
    async fn save_vessel_manifest(&self, manifest: &VesselManifest) -> Result<(), StorageError>;

    /// Reads the manifest of vessel `id`; `Corrupt` if it does not parse or names another vessel.
    async fn load_vessel_manifest(&self, id: &VesselId) -> Result<VesselManifest, StorageError> {
        Ok(self.load_vessel_manifest_versioned(id).await?.0)
    }

    /// [`Storage::load_vessel_manifest`], with the version it was read at.
    async fn load_vessel_manifest_versioned(&self, id: &VesselId) -> Result<(VesselManifest, Version), StorageError>;

    /// Writes the manifest of `manifest.id` only if `cond` holds (the
    /// fencing of commits: a host writes over the version it read);
    /// `Conflict` otherwise, and nothing changes. Returns the new version.
    async fn save_vessel_manifest_if(&self, manifest: &VesselManifest, cond: &WriteIf)
    -> Result<Version, StorageError>;

    /// A coordination record, or `None` when absent.
    async fn load_record(&self, key: &RecordKey) -> Result<Option<Record>, StorageError>;

    /// Writes a record only if `cond` holds; `Conflict` otherwise. Returns the new version.
    async fn save_record(&self, key: &RecordKey, data: Vec<u8>, cond: &WriteIf) -> Result<Version, StorageError>;

    /// Removes a record (absent is fine).
    async fn delete_record(&self, key: &RecordKey) -> Result<(), StorageError>;

    /// The hosts that have a heartbeat record, sorted.
    async fn list_hosts(&self) -> Result<Vec<HostId>, StorageError>;

    /// The ids of all vessels that have a manifest, sorted.
    async fn list_vessels(&self) -> Result<Vec<VesselId>, StorageError>;

    /// Removes a vessel's manifest and all its snapshots.
    async fn delete_vessel(&self, id: &VesselId) -> Result<(), StorageError>;

    /// Removes a vessel's manifest only: its snapshots' blobs stay (forks
    /// may refer to them) until deleted one by one.
    async fn delete_vessel_manifest(&self, id: &VesselId) -> Result<(), StorageError>;

    /// The snapshot blobs stored under `vessel` (with or without its
    /// manifest), with when each was written, sorted by id.
    async fn list_snapshots(&self, vessel: &VesselId) -> Result<Vec<StoredSnapshot>, StorageError>;

    /// Every vessel id that has snapshot blobs or a manifest, sorted.
    async fn list_snapshot_owners(&self) -> Result<Vec<VesselId>, StorageError>;

    /// The vessels with a fork record on `owner` ([`RecordKey::Fork`]), sorted.
    async fn list_forks(&self, owner: &VesselId) -> Result<Vec<VesselId>, StorageError>;

    /// Streams a snapshot's layer diff into storage, replacing any previous one.
    async fn save_snapshot(
        &self,
        vessel: &VesselId,
        snapshot: &SnapshotId,
        data: BlobReader,
    ) -> Result<(), StorageError>;

    /// Streams a snapshot's layer diff out of storage.
    async fn load_snapshot(&self, vessel: &VesselId, snapshot: &SnapshotId) -> Result<BlobReader, StorageError>;

    /// Removes one snapshot's layer diff.
    async fn delete_snapshot(&self, vessel: &VesselId, snapshot: &SnapshotId) -> Result<(), StorageError>;

    /// Streams an image archive (docker-save or OCI layout tar) into storage.
    async fn save_image(&self, image: &ImageRef, data: BlobReader) -> Result<(), StorageError>;

    /// Streams an image archive out of storage.
    async fn load_image(&self, image: &ImageRef) -> Result<BlobReader, StorageError>;

    /// The references of all stored images, sorted.
    async fn list_images(&self) -> Result<Vec<ImageRef>, StorageError>;

    /// Writes (or replaces) a small summary kept beside `image`'s archive
    /// (vessel writes what it verified, so a host whose cache holds the
    /// layers need not read the archive). The default keeps none.
    async fn save_image_index(&self, image: &ImageRef, data: Vec<u8>) -> Result<(), StorageError> {
        let _ = (image, data);
        Ok(())
    }

    /// The summary of `image`, or `NotFound`.
    async fn load_image_index(&self, image: &ImageRef) -> Result<Vec<u8>, StorageError> {
        Err(StorageError::ImageNotFound(image.clone()))
    }

    /// Removes `image`'s summary (absent is fine).
    async fn delete_image_index(&self, image: &ImageRef) -> Result<(), StorageError> {
        let _ = image;
        Ok(())
    }

    /// Aborts the blob uploads that were started at least `older_than`
    /// ago and never finished (their process died), so no stored parts
    /// linger; returns how many. The default has none: a local write is
    /// a temp file, swept at start.
    async fn abort_stale_uploads(&self, older_than: std::time::Duration) -> Result<u64, StorageError> {
        let _ = older_than;
        Ok(0)
    }

    /// Tells a backend how the blobs handed to it are encoded, so it can name
    /// them truthfully (`.tar.zst`); decorators such as [`CompressedStorage`]
    /// call it on the storage they wrap. The default ignores it.
    fn set_blob_encoding(&mut self, encoding: BlobEncoding) {
        let _ = encoding;
    }
}

/// A snapshot blob as storage lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredSnapshot {
    /// The snapshot's id.
    pub id: SnapshotId,
    /// When the blob was written.
    pub modified: chrono::DateTime<chrono::Utc>,
}

macro_rules! forward_storage {
    ($ty:ty) => {
        #[async_trait]
        impl<S: Storage + ?Sized> Storage for $ty {
            async fn save_vessel_manifest(&self, m: &VesselManifest) -> Result<(), StorageError> {
                (**self).save_vessel_manifest(m).await
            }
            async fn load_vessel_manifest(&self, id: &VesselId) -> Result<VesselManifest, StorageError> {
                (**self).load_vessel_manifest(id).await
            }
            async fn load_vessel_manifest_versioned(
                &self,
                id: &VesselId,
            ) -> Result<(VesselManifest, Version), StorageError> {
                (**self).load_vessel_manifest_versioned(id).await
            }
            async fn save_vessel_manifest_if(&self, m: &VesselManifest, c: &WriteIf) -> Result<Version, StorageError> {
                (**self).save_vessel_manifest_if(m, c).await
            }
            async fn load_record(&self, key: &RecordKey) -> Result<Option<Record>, StorageError> {
                (**self).load_record(key).await
            }
            async fn save_record(&self, key: &RecordKey, data: Vec<u8>, c: &WriteIf) -> Result<Version, StorageError> {
                (**self).save_record(key, data, c).await
            }
            async fn delete_record(&self, key: &RecordKey) -> Result<(), StorageError> {
                (**self).delete_record(key).await
            }
            async fn list_hosts(&self) -> Result<Vec<HostId>, StorageError> {
                (**self).list_hosts().await
            }
            async fn list_vessels(&self) -> Result<Vec<VesselId>, StorageError> {
                (**self).list_vessels().await
            }
            async fn delete_vessel_manifest(&self, id: &VesselId) -> Result<(), StorageError> {
                (**self).delete_vessel_manifest(id).await
            }
            async fn list_snapshots(&self, v: &VesselId) -> Result<Vec<StoredSnapshot>, StorageError> {
                (**self).list_snapshots(v).await
            }
            async fn list_snapshot_owners(&self) -> Result<Vec<VesselId>, StorageError> {
                (**self).list_snapshot_owners().await
            }
            async fn list_forks(&self, owner: &VesselId) -> Result<Vec<VesselId>, StorageError> {
                (**self).list_forks(owner).await
            }
            async fn delete_vessel(&self, id: &VesselId) -> Result<(), StorageError> {
                (**self).delete_vessel(id).await
            }
            async fn save_snapshot(&self, v: &VesselId, s: &SnapshotId, data: BlobReader) -> Result<(), StorageError> {
                (**self).save_snapshot(v, s, data).await
            }
            async fn load_snapshot(&self, v: &VesselId, s: &SnapshotId) -> Result<BlobReader, StorageError> {
                (**self).load_snapshot(v, s).await
            }
            async fn delete_snapshot(&self, v: &VesselId, s: &SnapshotId) -> Result<(), StorageError> {
                (**self).delete_snapshot(v, s).await
            }
            async fn save_image(&self, image: &ImageRef, data: BlobReader) -> Result<(), StorageError> {
                (**self).save_image(image, data).await
            }
            async fn load_image(&self, image: &ImageRef) -> Result<BlobReader, StorageError> {
                (**self).load_image(image).await
            }
            async fn list_images(&self) -> Result<Vec<ImageRef>, StorageError> {
                (**self).list_images().await
            }
            async fn save_image_index(&self, image: &ImageRef, data: Vec<u8>) -> Result<(), StorageError> {
                (**self).save_image_index(image, data).await
            }
            async fn load_image_index(&self, image: &ImageRef) -> Result<Vec<u8>, StorageError> {
                (**self).load_image_index(image).await
            }
            async fn delete_image_index(&self, image: &ImageRef) -> Result<(), StorageError> {
                (**self).delete_image_index(image).await
            }
            async fn abort_stale_uploads(&self, older_than: std::time::Duration) -> Result<u64, StorageError> {
                (**self).abort_stale_uploads(older_than).await
            }
        }
    };
}

forward_storage!(Arc<S>);
forward_storage!(Box<S>);
