//! What changed in a vessel: since a snapshot, or between two (as `docker
//! diff`), read from its layers and upper dir (see `vessel_snapshot::changes`).

use vessel_core::SnapshotId;
use vessel_snapshot::Change;

use super::Vessel;
use crate::error::{Result, VesselError};

impl Vessel {
    /// Every path added, modified (content, mode, owner, xattrs, type, a
    /// directory made opaque) or deleted since snapshot `since` (default:
    /// the current one; with no snapshot yet, the image), sorted by path.
    /// Reads the upper dir and the layers only (no mount); costs what
    /// changed. Files being written meanwhile are read as they are.
    pub async fn changes(&self, since: Option<&SnapshotId>) -> Result<Vec<Change>> {
        let inner = &self.inner;
        let state = inner.state.read().await;
        if state.closed {
            return Err(VesselError::Closed(inner.id.clone()));
        }
        let manifest = inner.manifest();
        let since = since.or(manifest.current_snapshot_id.as_ref());
        let from = self.stack(since).await?;
        let mut to = state.lowers.clone();
        to.push(super::upper_dir(&inner.dir));
        let changes = crate::task::blocking(move || vessel_snapshot::changes(&from, &to)).await??;
        drop(state);
        Ok(changes)
    }

    /// The changes from snapshot `from` to snapshot `to` of this vessel,
    /// from their layers.
    pub async fn changes_between(&self, from: &SnapshotId, to: &SnapshotId) -> Result<Vec<Change>> {
        let state = self.inner.state.read().await;
        if state.closed {
            return Err(VesselError::Closed(self.inner.id.clone()));
        }
        let (a, b) = (self.stack(Some(from)).await?, self.stack(Some(to)).await?);
        drop(state);
        Ok(crate::task::blocking(move || vessel_snapshot::changes(&a, &b)).await??)
    }

    /// The layers of the tree at snapshot `at` (`None`: the image's),
    /// fetched into the cache if this host lacks them.
    async fn stack(&self, at: Option<&SnapshotId>) -> Result<Vec<std::path::PathBuf>> {
        let inner = &self.inner;
        let manifest = inner.manifest();
        let Some(s) = at else { return Ok(inner.image_layers.clone()) };
        if manifest.snapshot(s).is_none() {
            return Err(VesselError::SnapshotNotFound { vessel: inner.id.clone(), snapshot: s.clone() });
        }
        inner.manager.layers.lowers(&inner.id, &manifest, Some(s), &inner.image_layers, &inner.dir).await
    }
}
