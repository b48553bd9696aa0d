//! Forks: new vessels that start from a snapshot of another, sharing its
//! layers (in storage and in the layer cache) instead of copying them; and
//! the collection of blobs nothing refers to any more (see `sharing`).

use std::collections::BTreeMap;

use vessel_core::{SnapshotId, SnapshotManifest, VesselManifest, VesselName};

use crate::error::{Result, VesselError};
use crate::host::scrub;
use crate::manager::{HOLDER_LABEL, IMAGE_CONFIG_LABEL, IMAGE_MANIFEST_LABEL, Manager, ManagerState};
use crate::vessel::{OpenVessel, Vessel};

/// The label of a fork's manifest naming the vessel it was forked from.
pub const FORKED_FROM_LABEL: &str = "vessel.fork.vessel";
/// The label of a fork's manifest naming the snapshot it started from.
pub const FORKED_AT_LABEL: &str = "vessel.fork.snapshot";

/// Where a vessel was forked from, as its manifest records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForkOrigin {
    /// The source vessel.
    pub vessel_id: vessel_core::VesselId,
    /// The source's snapshot the fork started from.
    pub snapshot_id: SnapshotId,
}

impl ForkOrigin {
    /// The origin recorded in `m`'s labels, if `m` is a fork's.
    pub fn of(m: &VesselManifest) -> Option<Self> {
        let vessel_id = vessel_core::VesselId::new(m.labels.get(FORKED_FROM_LABEL)?).ok()?;
        let snapshot_id = SnapshotId::new(m.labels.get(FORKED_AT_LABEL)?).ok()?;
        Some(Self { vessel_id, snapshot_id })
    }
}

/// What [`Manager::gc`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct GcReport {
    /// Vessel ids whose stored blobs were looked at.
    pub owners: usize,
    /// Snapshot blobs deleted (no manifest referred to them).
    pub blobs_deleted: usize,
    /// Blob uploads a dead process left unfinished, aborted (their parts freed).
    pub uploads_aborted: u64,
    /// Heartbeats of hosts that will not renew them, removed.
    pub heartbeats_removed: usize,
}

impl Manager {
    /// A new vessel whose current state is snapshot `snapshot` of vessel
    /// `source` (an id or name): its history starts with that snapshot's
    /// chain, whose layers it shares with the source (nothing is copied or
    /// uploaded; a host that has them cached uses them). It gets its own
    /// id, lease, name (`opts.name`) and limits: the source's, each
    /// narrowed by a value `opts` sets (a wider one is refused). Reads the
    /// source's manifest only, so the source may be closed or held by
    /// another host. Its manifest names the source ([`ForkOrigin`]).
    /// Deleting the source, or the snapshot, never breaks a fork: the blobs
    /// a fork refers to stay until nothing does ([`Manager::gc`]). A fork
    /// racing a deletion of the blobs it needs fails with
    /// [`VesselError::ForkRaced`] and leaves nothing.
    pub async fn fork_vessel(
        &self,
        source: &str,
        snapshot: &SnapshotId,
        opts: &crate::VesselOptions,
    ) -> Result<Vessel> {
        let source_id = self.state.resolve(source).await?;
        let src = self.load_manifest(&source_id).await?;
        if src.snapshot(snapshot).is_none() {
            return Err(VesselError::SnapshotNotFound { vessel: source_id, snapshot: snapshot.clone() });
        }
        let mut chain: Vec<SnapshotManifest> = src.chain(snapshot).into_iter().cloned().collect();
        chain.reverse();
        let mut labels = BTreeMap::new();
        for key in [IMAGE_CONFIG_LABEL, IMAGE_MANIFEST_LABEL] {
            if let Some(v) = src.labels.get(key) {
                labels.insert(key.to_owned(), v.clone());
            }
        }
        crate::limits::fork_labels(&src.labels, opts, &mut labels)?;
        if opts.disk_bytes.is_some() && self.state.disk_quota.is_none() {
            return Err(VesselError::InvalidInput(
                "a disk quota was asked for, but this manager runs without disk quotas".into(),
            ));
        }
        labels.insert(FORKED_FROM_LABEL.into(), source_id.to_string());
        labels.insert(FORKED_AT_LABEL.into(), snapshot.to_string());
        let name = opts.name.as_deref().map(VesselName::new).transpose()?;
        let id = self.state.ids.vessel_id();
        let lock = self.state.lock(&id)?;
        let claim = self.state.claim(&id).await?;
        let owners = chain.iter().map(|s| s.vessel_id.clone()).collect();
        let undo = async |state: &ManagerState, recorded: bool| {
            if let Some(n) = &name {
                state.drop_name(n, &id).await;
            }
            if recorded {
                state.forget_fork(&id, &owners).await;
            }
            state.layers.release(&id);
            state.forget_claim(&id).await;
        };
        if let Some(n) = &name {
            if let Err(e) = self.state.take_name(n, &id).await {
                self.state.forget_claim(&id).await;
                return Err(e);
            }
            labels.insert(crate::names::NAME_LABEL.into(), n.to_string());
        }
        if let Err(e) = self.state.record_fork(&id, &owners).await {
            undo(&self.state, false).await;
            return Err(e);
        }
        let image = match self.state.layers.image(&src.base_image_ref, &id).await {
            Ok(i) if labels.get(IMAGE_CONFIG_LABEL).is_some_and(|p| *p != i.config_digest) => {
                undo(&self.state, true).await;
                return Err(VesselError::ImageChanged {
                    reference: src.base_image_ref.to_string(),
                    pinned: labels[IMAGE_CONFIG_LABEL].clone(),
                    found: i.config_digest,
                });
            }
            Ok(i) => i,
            Err(e) => {
                undo(&self.state, true).await;
                return Err(e);
            }
        };
        labels.insert(HOLDER_LABEL.into(), self.state.lease.id().to_string());
        let now = chrono::Utc::now();
        let manifest = VesselManifest {
            id: id.clone(),
            base_image_ref: src.base_image_ref.clone(),
            current_snapshot_id: Some(snapshot.clone()),
            work_dir: src.work_dir.clone(),
            create_time: now,
            update_time: now,
            labels,
            snapshots: chain,
        };
        let vessel = match OpenVessel::start(self.state.clone(), manifest, &image, lock, claim, None).await {
            Ok(v) => v,
            Err(e) => {
                let _ = scrub(&self.state.vessel_dir(&id));
                undo(&self.state, true).await;
                return Err(e);
            }
        };
        if let Err(e) = vessel.commit_manifest(&vessel.manifest()).await {
            let _ = vessel.close().await;
            undo(&self.state, true).await;
            return Err(e);
        }
        Ok(self.register(vessel))
    }

    /// Deletes every snapshot blob in storage that no manifest refers to
    /// and that is older than `ManagerConfig::gc_grace` (default an hour:
    /// a snapshot being taken stores its blob before its manifest), as the
    /// deletion handshake decides it (see `sharing`), so it is safe while
    /// other hosts fork, snapshot and delete on the same storage. Deleting
    /// a vessel or a snapshot already frees what only it referred to; gc
    /// frees what those could not (blobs a fork still used then) and what
    /// a crash left: uploads a killed process never finished (older than
    /// the same grace) and the heartbeats of hosts that are gone (see
    /// `HostLease::sweep`).
    pub async fn gc(&self) -> Result<GcReport> {
        let storage = &self.state.storage;
        let mut report = GcReport::default();
        let now = chrono::Utc::now();
        for owner in storage.list_snapshot_owners().await? {
            report.owners += 1;
            let old: Vec<SnapshotId> = storage
                .list_snapshots(&owner)
                .await?
                .into_iter()
                .filter(|s| (now - s.modified).to_std().is_ok_and(|age| age >= self.state.gc_grace))
                .map(|s| s.id)
                .collect();
            report.blobs_deleted += self.state.free_blobs(&owner, &old).await?;
        }
        report.uploads_aborted = storage.abort_stale_uploads(self.state.gc_grace).await?;
        report.heartbeats_removed = self.state.lease.sweep().await?;
        Ok(report)
    }
}

/// The most vessels one [`Vessel::fork`] makes.
pub const MAX_FORKS: usize = 100;

/// How many forks one call may make, and a name only for one.
fn check_count(n: usize, opts: &crate::VesselOptions) -> Result<()> {
    if n == 0 || n > MAX_FORKS {
        return Err(VesselError::InvalidInput(format!("a fork makes 1 to {MAX_FORKS} vessels, not {n}")));
    }
    if opts.name.is_some() && n > 1 {
        return Err(VesselError::InvalidInput("a name is unique: give one only when forking one vessel".into()));
    }
    Ok(())
}

impl Manager {
    /// `n` forks (1 to [`MAX_FORKS`]) of snapshot `snapshot` of vessel
    /// `source`, made concurrently, each as [`Manager::fork_vessel`] makes
    /// one (a name only when `n` is 1). If one fails, those made are
    /// deleted and its error returned: all or none.
    pub async fn fork_vessels(
        &self,
        source: &str,
        snapshot: &SnapshotId,
        n: usize,
        opts: &crate::VesselOptions,
    ) -> Result<Vec<Vessel>> {
        check_count(n, opts)?;
        let made = futures::future::join_all((0..n).map(|_| self.fork_vessel(source, snapshot, opts))).await;
        let mut out = Vec::with_capacity(n);
        let mut first_error = None;
        for r in made {
            match r {
                Ok(v) => out.push(v),
                Err(e) => first_error = first_error.or(Some(e)),
            }
        }
        if let Some(e) = first_error {
            for v in out {
                let _ = v.close().await;
                let _ = self.delete_vessel(v.id().as_str()).await;
            }
            return Err(e);
        }
        Ok(out)
    }
}

impl Vessel {
    /// `n` new vessels whose current state is this vessel's current state,
    /// including what is not yet snapshotted: a snapshot of it is taken
    /// first (labelled `fork`; running processes are frozen only while the
    /// upper dir is read, and keep running), then [`Manager::fork_vessels`]
    /// forks it `n` ways, each sharing its layers under a fresh upper dir
    /// of its own. Processes are not copied: a fork starts with none.
    pub async fn fork(&self, n: usize, opts: &crate::VesselOptions) -> Result<Vec<Vessel>> {
        // Refused before the snapshot, which would otherwise stay.
        check_count(n, opts)?;
        let snap = self.create_snapshot("fork").await?;
        let mgr = Manager { state: self.inner_state().clone() };
        mgr.fork_vessels(self.id().as_str(), &snap.id, n, opts).await
    }
}
