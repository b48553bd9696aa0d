//! Snapshot blobs shared between vessels, and when one may be deleted.
//!
//! A fork's manifest lists the snapshots of its source's history that it
//! starts from; their blobs stay where they were stored, under the vessel
//! that took them (each `SnapshotManifest::vessel_id` says which: the
//! blob's *owner*). Nothing is copied. A blob may then be deleted only when
//! no manifest in storage refers to it, which hosts decide without a lock,
//! by a handshake where each side writes, then reads:
//!
//! - a fork writes `forks/<owner>/<fork>` for every owner of a blob it
//!   refers to, *then* reads `condemned/<owner>`: if it is there, the fork
//!   removes its records and fails ([`VesselError::ForkRaced`]);
//! - a deletion writes `condemned/<owner>`, *then* lists `forks/<owner>/`
//!   and reads each fork's manifest (a fork record without a manifest keeps
//!   every blob while it is younger than [`RECORD_GRACE`]: that fork's
//!   manifest may yet be written), deletes the blobs no manifest refers
//!   to, and removes its marker.
//!
//! On a storage with read-after-write consistency (S3, GCS, Azure, a local
//! dir), either the fork's read sees the marker or the deletion's listing
//! sees the fork's record, so a fork that reported success never loses a
//! blob. [`crate::Manager::gc`] runs the deletion for every owner, which
//! also removes what a crash in the middle of one left.

use std::collections::BTreeSet;
use std::time::Duration;

use vessel_core::{SnapshotId, VesselId, VesselManifest};
use vessel_storage::{RecordKey, StorageErrorKind, WriteIf};

use crate::error::{Result, VesselError};
use crate::manager::ManagerState;

/// How long a fork record without its fork's manifest keeps blobs: longer
/// than any fork takes between its record and its manifest.
pub(crate) const RECORD_GRACE: Duration = Duration::from_secs(600);

#[derive(serde::Serialize, serde::Deserialize)]
struct Stamp {
    #[serde(with = "chrono::serde::ts_milliseconds")]
    at: chrono::DateTime<chrono::Utc>,
}

fn stamp() -> Vec<u8> {
    serde_json::to_vec(&Stamp { at: chrono::Utc::now() }).expect("a stamp serialises")
}

/// The owners of the blobs `m` refers to, other than `m`'s vessel.
pub(crate) fn foreign_owners(m: &VesselManifest) -> BTreeSet<VesselId> {
    m.snapshots.iter().map(|s| s.vessel_id.clone()).filter(|o| *o != m.id).collect()
}

impl ManagerState {
    /// Records `fork` as referring to blobs of each of `owners`; fails,
    /// recording nothing, if a deletion of any of theirs is under way.
    pub(crate) async fn record_fork(&self, fork: &VesselId, owners: &BTreeSet<VesselId>) -> Result<()> {
        for owner in owners {
            let key = RecordKey::Fork { owner: owner.clone(), fork: fork.clone() };
            if let Err(e) = self.storage.save_record(&key, stamp(), &WriteIf::Absent).await {
                self.forget_fork(fork, owners).await;
                return Err(e.into());
            }
        }
        for owner in owners {
            let marker = self.storage.load_record(&RecordKey::Condemned(owner.clone())).await;
            if !matches!(marker, Ok(None)) {
                self.forget_fork(fork, owners).await;
                return match marker {
                    Err(e) => Err(e.into()),
                    _ => Err(VesselError::ForkRaced { owner: owner.clone() }),
                };
            }
        }
        Ok(())
    }

    /// Removes `fork`'s records on `owners` (it is deleted, or was never made).
    pub(crate) async fn forget_fork(&self, fork: &VesselId, owners: &BTreeSet<VesselId>) {
        for owner in owners {
            let key = RecordKey::Fork { owner: owner.clone(), fork: fork.clone() };
            if let Err(e) = self.storage.delete_record(&key).await {
                tracing::warn!(%fork, %owner, error = %e, "could not remove a fork record");
            }
        }
    }

    /// After the manifest `m` was deleted: its vessel's blobs go unless a
    /// fork refers to them (gc takes them once none does), and so do those
    /// of its sources that only it used.
    pub(crate) async fn free_vessel_blobs(&self, m: &VesselManifest) -> Result<()> {
        let own: Vec<_> = self.storage.list_snapshots(&m.id).await?.into_iter().map(|s| s.id).collect();
        self.free_blobs(&m.id, &own).await?;
        let sources = foreign_owners(m);
        self.forget_fork(&m.id, &sources).await;
        for owner in &sources {
            let used: Vec<_> = m.snapshots.iter().filter(|s| &s.vessel_id == owner).map(|s| s.id.clone()).collect();
            self.free_blobs(owner, &used).await?;
        }
        Ok(())
    }

    /// Deletes those of `candidates` (blobs stored under `owner`) that no
    /// manifest refers to; returns how many it deleted.
    pub(crate) async fn free_blobs(&self, owner: &VesselId, candidates: &[SnapshotId]) -> Result<usize> {
        if candidates.is_empty() {
            return Ok(0);
        }
        let marker = RecordKey::Condemned(owner.clone());
        self.put_marker(&marker).await?;
        let freed = self.free_marked(owner, candidates).await;
        if let Err(e) = self.storage.delete_record(&marker).await {
            tracing::warn!(%owner, error = %e, "could not remove a deletion marker; forks of it fail until gc");
        }
        freed
    }

    async fn put_marker(&self, marker: &RecordKey) -> Result<()> {
        match self.storage.save_record(marker, stamp(), &WriteIf::Absent).await {
            Err(e) if e.kind() == StorageErrorKind::Conflict => {
                // Another deletion's, live or left by a crash: either way
                // it is ours too now (removing it when done is right for both).
                let Some(r) = self.storage.load_record(marker).await? else {
                    return Box::pin(self.put_marker(marker)).await;
                };
                self.storage.save_record(marker, stamp(), &WriteIf::Matches(r.version)).await?;
                Ok(())
            }
            r => r.map(drop).map_err(Into::into),
        }
    }

    async fn free_marked(&self, owner: &VesselId, candidates: &[SnapshotId]) -> Result<usize> {
        let mut keep = BTreeSet::new();
        let mut refer = |m: &VesselManifest| {
            keep.extend(m.snapshots.iter().filter(|s| &s.vessel_id == owner).map(|s| s.id.clone()));
        };
        match self.storage.load_vessel_manifest(owner).await {
            Ok(m) => refer(&m),
            Err(e) if e.kind() == StorageErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        for fork in self.storage.list_forks(owner).await? {
            match self.storage.load_vessel_manifest(&fork).await {
                Ok(m) => refer(&m),
                Err(e) if e.kind() == StorageErrorKind::NotFound => {
                    let key = RecordKey::Fork { owner: owner.clone(), fork: fork.clone() };
                    let Some(r) = self.storage.load_record(&key).await? else { continue };
                    let young = serde_json::from_slice::<Stamp>(&r.data)
                        .is_ok_and(|s| (chrono::Utc::now() - s.at).to_std().map_or(true, |age| age < RECORD_GRACE));
                    if young {
                        // Its manifest may yet come, referring to any of them.
                        return Ok(0);
                    }
                    self.storage.delete_record(&key).await?;
                }
                Err(e) => return Err(e.into()),
            }
        }
        let mut freed = 0;
        for id in candidates.iter().filter(|c| !keep.contains(*c)) {
            self.storage.delete_snapshot(owner, id).await?;
            freed += 1;
        }
        Ok(freed)
    }
}
