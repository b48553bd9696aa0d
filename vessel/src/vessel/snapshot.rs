//! A vessel's snapshots: sealing the upper dir as a layer, restoring and
//! deleting, under the exclusive state lock.

use std::io;

use vessel_core::{SnapshotId, SnapshotManifest};
use vessel_snapshot::{DiffOptions, LayerKey, vanished, write_diff_gone};

use super::process::StopReason;
use super::{MountState, Upper, Vessel, open_root, upper_dir};
use crate::error::{Result, VesselError};
use vessel_core::sync::Locked;

impl Vessel {
    /// Seals the changes since the current snapshot as a new snapshot (its
    /// parent: the current one) and makes it current. Waits for running
    /// execs; costs what changed, not the workspace's size.
    ///
    /// With background processes running ([`Vessel::spawn`]), they are
    /// frozen while the upper dir is read (a consistent point in time:
    /// the window is in the snapshot's `vessel.freeze-us` label), then run
    /// on, on the same upper dir; such a snapshot's layer holds every
    /// change since the vessel's mount (and deletes what earlier ones held
    /// and is gone), and is cached from what was stored. With none, the
    /// idle sandbox is stopped and the upper dir sealed in place, as always.
    pub async fn create_snapshot(&self, message: &str) -> Result<SnapshotManifest> {
        let inner = &self.inner;
        let mut state = inner.state.write().await;
        if state.closed {
            return Err(VesselError::Closed(inner.id.clone()));
        }
        let live = inner.sandbox_running().await && inner.background_running();
        if !live {
            // Nothing runs in it (execs hold the state lock): it restarts on demand.
            inner.stop_sandbox(StopReason::SandboxLost).await;
        }
        inner.freeze().await;
        let result = if live || !state.sealed.is_empty() {
            self.snapshot_copying(&mut state, message, live).await
        } else {
            self.snapshot_locked(&mut state, message).await
        };
        if state.mount.is_none() {
            // Failed before the new mount: back to the previous state.
            match inner.mount(&state.lowers, Upper::Keep) {
                Ok(m) => state.mount = Some(m),
                Err(e) => tracing::error!(id = %inner.id, error = %e, "could not remount after a failed snapshot"),
            }
        }
        let root = open_root(&inner.dir.join("rootfs")).ok();
        inner.gate.thaw_remounted(root);
        result
    }

    async fn snapshot_locked(&self, state: &mut MountState, message: &str) -> Result<SnapshotManifest> {
        let inner = &self.inner;
        let manager = &inner.manager;
        if let Some(m) = state.mount.take() {
            m.unmount()?;
        }
        let sid = manager.ids.snapshot_id();
        let upper = upper_dir(&inner.dir);
        // A diff that fails or panics drops the writer: storage then sees
        // an error, never the clean end of a truncated stream.
        let (writer, reader) = vessel_storage::pipe::pipe();
        let diff_upper = upper.clone();
        let diff = crate::task::blocking(move || {
            let out = io::BufWriter::with_capacity(vessel_storage::pipe::CHUNK, writer);
            let (w, stats) = write_diff_gone(&diff_upper, out, DiffOptions::default(), &[])?;
            let w = w.into_inner().map_err(|e| vessel_snapshot::SnapshotError::Stream("snapshot", e.into_error()))?;
            w.finish_blocking().map_err(|e| vessel_snapshot::SnapshotError::Stream("snapshot", e))?;
            Ok::<_, vessel_snapshot::SnapshotError>(stats)
        });
        let (saved, stats) = tokio::join!(manager.storage.save_snapshot(&inner.id, &sid, Box::new(reader)), diff);
        let stats = match (saved, stats?) {
            (Ok(()), Ok(stats)) => stats,
            // The storage's error says more than the diff's broken pipe.
            (Err(e), Ok(_) | Err(vessel_snapshot::SnapshotError::Stream(..))) => return Err(e.into()),
            (_, Err(e)) => return Err(e.into()),
        };
        let key = LayerKey::snapshot(inner.id.clone(), sid.clone(), &stats.digest)?;
        let ovl = inner.dir.join("ovl");
        if inner.bounds.disk.is_some() {
            // Sealed, it becomes a shared read-only layer: no longer the
            // vessel's to be bounded (and a full quota would refuse even
            // the renames that move it into the cache).
            vessel_runtime::quota::set_limit(&ovl, 0).map_err(VesselError::io("lift the quota of", &ovl))?;
        }
        let layer = manager.layers.cache.adopt(&key, inner.id.as_str(), &ovl)?;

        let mut manifest = inner.manifest();
        let snap = SnapshotManifest {
            id: sid.clone(),
            vessel_id: inner.id.clone(),
            parent_id: manifest.current_snapshot_id.clone(),
            message: message.into(),
            checksum: stats.digest,
            size: i64::try_from(stats.size).unwrap_or(i64::MAX),
            create_time: chrono::Utc::now(),
            labels: Default::default(),
        };
        manifest.snapshots.push(snap.clone());
        manifest.current_snapshot_id = Some(sid.clone());
        manifest.update_time = snap.create_time;
        if let Err(e) = inner.commit_manifest(&manifest).await {
            // Not committed: the sealed upper goes back to being the upper.
            let _ = manager.layers.cache.unadopt(&key, inner.id.as_str(), &ovl);
            if let Some(bytes) = inner.bounds.disk {
                let _ = vessel_runtime::quota::set_limit(&ovl, bytes);
            }
            let _ = manager.storage.delete_snapshot(&inner.id, &sid).await;
            return Err(e);
        }
        let lowers =
            match manager.layers.lowers(&inner.id, &manifest, Some(&sid), &inner.image_layers, &inner.dir).await {
                Ok(l) => l,
                Err(e) => {
                    // The snapshot is committed; only a flattening failed.
                    tracing::warn!(id = %inner.id, error = %e, "mounting the new snapshot on the unflattened chain");
                    state.lowers.iter().cloned().chain([layer]).collect()
                }
            };
        *inner.manifest.locked() = manifest;
        state.mount = Some(inner.mount(&lowers, Upper::Fresh)?);
        state.lowers = lowers;
        Ok(snap)
    }

    /// A snapshot of an upper dir that stays in use (see
    /// [`Vessel::create_snapshot`]): frozen processes (when `live`), the
    /// diff with deletions of what earlier such snapshots held, the layer
    /// cached from storage; the mount stays unless the sandbox is gone.
    async fn snapshot_copying(&self, state: &mut MountState, message: &str, live: bool) -> Result<SnapshotManifest> {
        let inner = &self.inner;
        let manager = &inner.manager;
        let sid = manager.ids.snapshot_id();
        let upper = upper_dir(&inner.dir);
        // The last sealed layer suffices: it holds, or whites out, every
        // path an earlier one held (each is a diff of the same upper dir).
        let sealed: Vec<_> = state.sealed.last().cloned().into_iter().collect();
        let started = std::time::Instant::now();
        let frozen = live && inner.freeze_sandbox().await?;
        let (writer, reader) = vessel_storage::pipe::pipe();
        let diff = crate::task::blocking(move || {
            let gone = vanished(&upper, &sealed)?;
            let out = io::BufWriter::with_capacity(vessel_storage::pipe::CHUNK, writer);
            let (w, stats) = write_diff_gone(&upper, out, DiffOptions::default(), &gone)?;
            let w = w.into_inner().map_err(|e| vessel_snapshot::SnapshotError::Stream("snapshot", e.into_error()))?;
            w.finish_blocking().map_err(|e| vessel_snapshot::SnapshotError::Stream("snapshot", e))?;
            Ok::<_, vessel_snapshot::SnapshotError>(stats)
        });
        // The processes run on as soon as the upper dir is read: storage's
        // compression, upload and sync happen after the window.
        let diff = async {
            let stats = diff.await;
            let window = started.elapsed();
            if frozen && !inner.is_paused() {
                inner.thaw_sandbox().await;
            }
            (stats, window)
        };
        let (saved, (stats, window)) =
            tokio::join!(manager.storage.save_snapshot(&inner.id, &sid, Box::new(reader)), diff);
        if frozen {
            tracing::info!(vessel = %inner.id, freeze_us = window.as_micros() as u64, "snapshot of a live vessel");
        }
        let stats = match (saved, stats?) {
            (Ok(()), Ok(stats)) => stats,
            (Err(e), Ok(_) | Err(vessel_snapshot::SnapshotError::Stream(..))) => return Err(e.into()),
            (_, Err(e)) => return Err(e.into()),
        };
        let layer = match manager.layers.snapshot_layer(&inner.id, &inner.id, &sid, &stats.digest).await {
            Ok(l) => l,
            Err(e) => {
                let _ = manager.storage.delete_snapshot(&inner.id, &sid).await;
                return Err(e);
            }
        };
        let mut manifest = inner.manifest();
        let mut labels = std::collections::BTreeMap::new();
        if frozen {
            labels.insert("vessel.freeze-us".to_owned(), window.as_micros().to_string());
        }
        let snap = SnapshotManifest {
            id: sid.clone(),
            vessel_id: inner.id.clone(),
            parent_id: manifest.current_snapshot_id.clone(),
            message: message.into(),
            checksum: stats.digest.clone(),
            size: i64::try_from(stats.size).unwrap_or(i64::MAX),
            create_time: chrono::Utc::now(),
            labels,
        };
        manifest.snapshots.push(snap.clone());
        manifest.current_snapshot_id = Some(sid.clone());
        manifest.update_time = snap.create_time;
        if let Err(e) = inner.commit_manifest(&manifest).await {
            if let Ok(key) = LayerKey::snapshot(inner.id.clone(), sid.clone(), &stats.digest) {
                let _ = manager.layers.cache.release(&key, inner.id.as_str());
                let _ = manager.layers.cache.gc();
            }
            let _ = manager.storage.delete_snapshot(&inner.id, &sid).await;
            return Err(e);
        }
        *inner.manifest.locked() = manifest.clone();
        if inner.sandbox_running().await {
            state.sealed.push(layer);
        } else {
            // The sandbox is gone (or never ran): the usual fresh upper on the new chain.
            let lowers =
                manager.layers.lowers(&inner.id, &manifest, Some(&sid), &inner.image_layers, &inner.dir).await?;
            if let Some(m) = state.mount.take() {
                m.unmount()?;
            }
            state.mount = Some(inner.mount(&lowers, Upper::Fresh)?);
            state.lowers = lowers;
            state.sealed.clear();
        }
        Ok(snap)
    }

    /// Makes snapshot `id`'s state the vessel's, dropping uncommitted
    /// changes; later snapshots take it as parent (history is a tree). A
    /// cached chain is remounted, not copied.
    ///
    /// The vessel's background processes are stopped first (a filesystem
    /// cannot change under running programs; each ends as
    /// [`StopReason::Restored`]); returns how many it stopped.
    pub async fn restore_snapshot(&self, id: &SnapshotId) -> Result<usize> {
        let inner = &self.inner;
        let mut state = inner.state.write().await;
        if state.closed {
            return Err(VesselError::Closed(inner.id.clone()));
        }
        if inner.manifest().snapshot(id).is_none() {
            return Err(VesselError::SnapshotNotFound { vessel: inner.id.clone(), snapshot: id.clone() });
        }
        let stopped = inner.stop_sandbox(StopReason::Restored).await;
        // Read under the lock: a snapshot that just finished is in it.
        let manifest = inner.manifest();
        if manifest.snapshot(id).is_none() {
            return Err(VesselError::SnapshotNotFound { vessel: inner.id.clone(), snapshot: id.clone() });
        }
        // Fetch (and flatten) what this host lacks before touching the mount.
        let lowers =
            inner.manager.layers.lowers(&inner.id, &manifest, Some(id), &inner.image_layers, &inner.dir).await?;
        let mut updated = manifest.clone();
        updated.current_snapshot_id = Some(id.clone());
        updated.update_time = chrono::Utc::now();
        inner.commit_manifest(&updated).await?;
        inner.freeze().await;
        let remounted = (|| {
            if let Some(m) = state.mount.take() {
                m.unmount()?;
            }
            state.mount = Some(inner.mount(&lowers, Upper::Fresh)?);
            Ok::<_, VesselError>(())
        })();
        if remounted.is_ok() {
            state.lowers = lowers;
            state.sealed.clear();
            *inner.manifest.locked() = updated;
        } else {
            // Back to the previous snapshot, in storage and on the mount.
            if let Err(e) = inner.commit_manifest(&manifest).await {
                tracing::error!(id = %inner.id, error = %e, "could not put the manifest back after a failed restore");
            }
            if state.mount.is_none()
                && let Ok(m) = inner.mount(&state.lowers, Upper::Keep)
            {
                state.mount = Some(m);
            }
        }
        inner.gate.thaw_remounted(open_root(&inner.dir.join("rootfs")).ok());
        remounted.map(|()| stopped)
    }

    /// Deletes a snapshot that is neither current nor a parent.
    pub async fn delete_snapshot(&self, id: &SnapshotId) -> Result<()> {
        let inner = &self.inner;
        let _state = inner.state.write().await;
        let mut manifest = inner.manifest();
        if manifest.snapshot(id).is_none() {
            return Err(VesselError::SnapshotNotFound { vessel: inner.id.clone(), snapshot: id.clone() });
        }
        if manifest.current_snapshot_id.as_ref() == Some(id) {
            return Err(VesselError::SnapshotInUse { snapshot: id.clone(), reason: "it is the current snapshot" });
        }
        if manifest.snapshots.iter().any(|s| s.parent_id.as_ref() == Some(id)) {
            return Err(VesselError::SnapshotInUse { snapshot: id.clone(), reason: "it is the parent of another" });
        }
        // Its cached layers: its own, and the flat layer its chain would have.
        let owner = manifest.snapshot(id).map(|s| s.vessel_id.clone()).unwrap_or_else(|| inner.id.clone());
        let doomed = {
            let mut chain = manifest.chain(id);
            chain.reverse();
            let checksum = chain.last().map(|s| s.checksum.as_str()).unwrap_or_default();
            [crate::layers::flat_key(&chain), LayerKey::snapshot(owner.clone(), id.clone(), checksum)?]
        };
        manifest.snapshots.retain(|s| &s.id != id);
        manifest.update_time = chrono::Utc::now();
        inner.commit_manifest(&manifest).await?;
        *inner.manifest.locked() = manifest;
        // Its blob goes unless a fork (or, for one this fork shares, its
        // source) still refers to it; then gc takes it later.
        inner.manager.free_blobs(&owner, std::slice::from_ref(id)).await?;
        for key in doomed {
            inner.manager.layers.cache.release(&key, inner.id.as_str())?;
        }
        inner.manager.layers.cache.gc()?;
        Ok(())
    }

    /// The vessel's snapshots, oldest first.
    pub fn list_snapshots(&self) -> Vec<SnapshotManifest> {
        self.inner.manifest().snapshots
    }
}
