//! Layer supply: where a vessel's read-only layers come from.
//!
//! [`Layers`] owns everything that yields a layer on this host: the layer
//! cache (shared by all vessels of the mount root), storage (image archives
//! and snapshot diffs), the backend's image store (containerd) and
//! registries. An image comes from storage through its stored index when
//! the cache already holds its layers ([`index`]), else from its archive,
//! else from containerd's store or a registry ([`images`], [`registry`]);
//! a snapshot's layer from the cache or storage; a deep chain of snapshots
//! as one flat layer built here ([`flat`]). The manager (host layout,
//! locks, ids, leases, lifecycle) holds one and never touches a layer
//! itself.

mod flat;
pub(crate) mod images;
mod index;
pub mod registry;

use std::path::PathBuf;
use std::sync::Arc;

use vessel_core::{SnapshotId, VesselId};
use vessel_runtime::ImageStore;
use vessel_snapshot::{LayerCache, LayerKey};
use vessel_storage::Storage;

pub(crate) use flat::flat_key;

use crate::error::{Result, VesselError};

/// Where layers come from on this host; see the module doc.
pub(crate) struct Layers {
    pub(crate) storage: Arc<dyn Storage>,
    pub(crate) cache: LayerCache,
    /// The backend's image store (containerd), read where storage lacks an image.
    images: Option<Arc<dyn ImageStore>>,
    registries: registry::Registries,
    /// Where imports and pulls spool, on the mount root's disk.
    spool: PathBuf,
}

impl Layers {
    pub(crate) fn new(
        storage: Arc<dyn Storage>,
        cache: LayerCache,
        images: Option<Arc<dyn ImageStore>>,
        registries: registry::Registries,
        spool: PathBuf,
    ) -> Self {
        Self { storage, cache, images, registries, spool }
    }

    /// The layer of snapshot `id`, stored under vessel `owner`, for vessel
    /// `holder` (a fork holds its source's layers): fetched from storage
    /// and verified against `checksum` if this host's cache lacks it.
    pub(crate) async fn snapshot_layer(
        &self,
        holder: &VesselId,
        owner: &VesselId,
        id: &SnapshotId,
        checksum: &str,
    ) -> Result<PathBuf> {
        let key = LayerKey::snapshot(owner.clone(), id.clone(), checksum)?;
        if self.cache.retain(&key, holder.as_str())? {
            return Ok(self.cache.path(&key));
        }
        let blob = self.storage.load_snapshot(owner, id).await?;
        let (cache, holder, checksum) = (self.cache.clone(), holder.to_string(), checksum.to_owned());
        crate::task::blocking(move || {
            let reader = tokio_util::io::SyncIoBridge::new(blob);
            cache.get_or_unpack(&key, &holder, Some(&checksum), || Ok(reader))
        })
        .await?
        .map_err(VesselError::from)
    }

    /// Drops every reference `holder` has in the cache (image and snapshot
    /// layers) and removes the layers nobody holds any more.
    pub(crate) fn release(&self, holder: &VesselId) {
        if let Err(e) = self.cache.release_all(holder.as_str()).and_then(|_| self.cache.gc()) {
            tracing::warn!(%holder, error = %e, "could not release cached layers");
        }
    }
}
