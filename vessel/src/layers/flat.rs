//! How a snapshot chain becomes the overlay's lower layers.
//!
//! Every snapshot adds a lower layer, and the kernel bounds an overlay's
//! lowers (by the mount-option page and its stack depth), while an agent may
//! snapshot after every step. So a chain of `2 * FLATTEN_EVERY` or more
//! snapshots mounts as one *flat* layer (the whole tree as of snapshot `k`,
//! `k` a multiple of `FLATTEN_EVERY`) plus the fewer than `FLATTEN_EVERY`
//! snapshots above it. Flat layers are made on this host from layers it
//! already has, each from the previous flat layer (or the image) and the
//! `FLATTEN_EVERY` snapshots above that, cached like any layer and never
//! stored: what is stored stays one diff per snapshot.

use std::fs;
use std::path::{Path, PathBuf};

use vessel_core::{SnapshotManifest, VesselId, VesselManifest};
use vessel_runtime::overlay::OverlayMount;
use vessel_snapshot::{DiffOptions, LayerKey, write_diff_with};

use super::Layers;
use crate::error::{Result, VesselError};

/// The cache key of the flat layer of `chain` (root first, non-empty):
/// bound to every checksum in it.
pub(crate) fn flat_key(chain: &[&SnapshotManifest]) -> LayerKey {
    let top = chain.last().map(|s| s.id.clone()).unwrap_or_else(|| vessel_core::SnapshotId::from_u64(0));
    LayerKey::flat(top, chain.iter().map(|s| s.checksum.as_str()))
}

/// How many missing layers are fetched at once.
const FETCH_AT_ONCE: usize = 4;

/// How many snapshots one flat layer step covers.
pub(crate) const FLATTEN_EVERY: usize = 32;

impl Layers {
    /// The lower layers, bottom first, of a vessel at snapshot `current`
    /// (`None`: the bare image), fetching and flattening as needed; `work`
    /// is a directory for temporary mount points.
    pub(crate) async fn lowers(
        &self,
        vessel: &VesselId,
        manifest: &VesselManifest,
        current: Option<&vessel_core::SnapshotId>,
        image: &[PathBuf],
        work: &Path,
    ) -> Result<Vec<PathBuf>> {
        let mut chain = current.map(|c| manifest.chain(c)).unwrap_or_default();
        chain.reverse();
        let k = if chain.len() >= 2 * FLATTEN_EVERY { chain.len() / FLATTEN_EVERY * FLATTEN_EVERY } else { 0 };
        let mut out = if k == 0 { image.to_vec() } else { vec![self.flat(vessel, &chain[..k], image, work).await?] };
        out.extend(self.snapshot_layers(vessel, &chain[k..]).await?);
        Ok(out)
    }

    /// The cached layers of `snapshots`, in order: those this host lacks
    /// are fetched, verified and unpacked [`FETCH_AT_ONCE`] at a time (an
    /// object store serves parallel GETs; applying is per-layer CPU work).
    async fn snapshot_layers(&self, vessel: &VesselId, snapshots: &[&SnapshotManifest]) -> Result<Vec<PathBuf>> {
        let mut out = Vec::with_capacity(snapshots.len());
        for batch in snapshots.chunks(FETCH_AT_ONCE) {
            let fetches: Vec<_> =
                batch.iter().map(|s| self.snapshot_layer(vessel, &s.vessel_id, &s.id, &s.checksum)).collect();
            out.extend(futures::future::try_join_all(fetches).await?);
        }
        Ok(out)
    }

    /// The flat layer of `chain` (root first; its length a multiple of
    /// [`FLATTEN_EVERY`]): from the highest flat layer this host has cached,
    /// one step of `FLATTEN_EVERY` snapshots at a time.
    async fn flat(
        &self,
        vessel: &VesselId,
        chain: &[&SnapshotManifest],
        image: &[PathBuf],
        work: &Path,
    ) -> Result<PathBuf> {
        let key_at = |j: usize| flat_key(&chain[..j]);
        let mut j = chain.len();
        while j > 0 && !self.cache.retain(&key_at(j), vessel.as_str())? {
            j -= FLATTEN_EVERY;
        }
        let mut below = if j == 0 { image.to_vec() } else { vec![self.cache.path(&key_at(j))] };
        while j < chain.len() {
            below.extend(self.snapshot_layers(vessel, &chain[j..j + FLATTEN_EVERY]).await?);
            j += FLATTEN_EVERY;
            below = vec![self.build_flat(vessel, key_at(j), below, work).await?];
        }
        below.pop().ok_or_else(|| VesselError::InvalidInput("flattening an empty chain".into()))
    }

    /// Mounts `lowers` read-only and copies the merged tree into the cache
    /// as `key` (with our own diff writer and applier: owners, modes,
    /// mtimes, xattrs, hardlinks kept).
    async fn build_flat(&self, vessel: &VesselId, key: LayerKey, lowers: Vec<PathBuf>, work: &Path) -> Result<PathBuf> {
        let (cache, holder) = (self.cache.clone(), vessel.to_string());
        let mnt = work.join(format!("flatten-{:016x}", rand::random::<u64>()));
        tracing::info!(%vessel, ?key, layers = lowers.len(), "flattening a deep snapshot chain");
        crate::task::blocking(move || {
            fs::create_dir_all(&mnt).map_err(VesselError::io("create", &mnt))?;
            let top_first: Vec<&Path> = lowers.iter().rev().map(PathBuf::as_path).collect();
            let mount = OverlayMount::mount(&mnt, &top_first, None)?;
            let (reader, writer) = std::io::pipe().map_err(VesselError::io("create pipe", &mnt))?;
            let src = mnt.clone();
            // The merged view of trusted layers: image device nodes copy over.
            let opts = DiffOptions { allow_devices: true };
            let producer = std::thread::spawn(move || write_diff_with(&src, writer, opts).map(drop));
            let made = cache.get_or_unpack(&key, &holder, None, || Ok(reader));
            let produced = producer.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            let unmounted = mount.unmount();
            let _ = fs::remove_dir(&mnt);
            let path = made?;
            if let Err(e) = produced {
                // A failed writer may have ended the stream early: not a layer to keep.
                let _ = cache.release(&key, &holder);
                let _ = cache.gc();
                return Err(e.into());
            }
            unmounted?;
            Ok(path)
        })
        .await?
    }
}
