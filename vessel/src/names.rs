//! Vessel names: unique per storage, usable wherever an id is.
//!
//! A name is a record `names/<name>.json` holding the vessel's id, written
//! create-if-absent (the conditional write leases use), so two hosts that
//! race for one name cannot both win; it is also pinned in the manifest's
//! labels ([`NAME_LABEL`]), so `list_vessels` shows it without a lookup.
//! A record left by a create that died before committing its manifest
//! (no manifest, no live claim) is taken over with update-if-version.

use vessel_core::{VesselId, VesselName};
use vessel_storage::{RecordKey, StorageErrorKind, WriteIf};

use crate::manager::ManagerState;
use crate::{Result, VesselError};

/// The manifest label that holds a vessel's name.
pub const NAME_LABEL: &str = "vessel.name";

#[derive(serde::Serialize, serde::Deserialize)]
struct NameRecord {
    id: VesselId,
}

impl ManagerState {
    /// Gives `name` to vessel `id`, which this host has claimed; or
    /// [`VesselError::NameInUse`].
    pub(crate) async fn take_name(&self, name: &VesselName, id: &VesselId) -> Result<()> {
        let key = RecordKey::Name(name.clone());
        let data = serde_json::to_vec(&NameRecord { id: id.clone() }).expect("a name record serialises");
        let mut cond = WriteIf::Absent;
        // Twice at most: once as asked, once over a dead create's record.
        for _ in 0..2 {
            match self.storage.save_record(&key, data.clone(), &cond).await {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == StorageErrorKind::Conflict => {}
                Err(e) => return Err(e.into()),
            }
            let Some(record) = self.storage.load_record(&key).await? else {
                cond = WriteIf::Absent;
                continue;
            };
            let Ok(holder) = serde_json::from_slice::<NameRecord>(&record.data) else {
                // Unreadable: not a vessel's; replace it.
                cond = WriteIf::Matches(record.version);
                continue;
            };
            let in_use = || VesselError::NameInUse { name: name.to_string(), vessel: holder.id.clone() };
            if self.has_manifest(&holder.id).await? {
                return Err(in_use());
            }
            // No manifest: being created by a live host, or left by a dead one.
            if self.lease.holder(&holder.id).await?.is_some_and(|h| h.live) {
                return Err(in_use());
            }
            cond = WriteIf::Matches(record.version);
        }
        Err(VesselError::NameInUse { name: name.to_string(), vessel: id.clone() })
    }

    /// Takes `name` from vessel `id` (a record naming another vessel stays).
    pub(crate) async fn drop_name(&self, name: &VesselName, id: &VesselId) {
        let key = RecordKey::Name(name.clone());
        let ours = match self.storage.load_record(&key).await {
            Ok(Some(r)) => serde_json::from_slice::<NameRecord>(&r.data).is_ok_and(|n| n.id == *id),
            _ => false,
        };
        if ours && let Err(e) = self.storage.delete_record(&key).await {
            tracing::warn!(%name, vessel = %id, error = %e, "could not remove the vessel's name");
        }
    }

    /// The vessel that `name_or_id` names: an id as it is (names never have
    /// an id's shape), a name through its record.
    pub(crate) async fn resolve(&self, name_or_id: &str) -> Result<VesselId> {
        if let Ok(id) = VesselId::new(name_or_id) {
            return Ok(id);
        }
        let name = VesselName::new(name_or_id)?;
        let not_found = || VesselError::NameNotFound(name_or_id.to_owned());
        let record = self.storage.load_record(&RecordKey::Name(name)).await?.ok_or_else(not_found)?;
        let holder: NameRecord = serde_json::from_slice(&record.data).map_err(|_| not_found())?;
        // A record whose vessel is gone (or not yet committed) names nothing.
        if !self.has_manifest(&holder.id).await? {
            return Err(not_found());
        }
        Ok(holder.id)
    }

    async fn has_manifest(&self, id: &VesselId) -> Result<bool> {
        match self.storage.load_vessel_manifest(id).await {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == StorageErrorKind::NotFound => Ok(false),
            Err(e) => Err(e.into()),
        }
    }
}

/// The name pinned in a manifest's labels.
pub(crate) fn name_of(labels: &std::collections::BTreeMap<String, String>) -> Option<&str> {
    labels.get(NAME_LABEL).map(String::as_str)
}

impl crate::Manager {
    /// The id of the vessel named `id_or_name` (an id is taken as it is,
    /// a name is looked up in storage), as [`crate::Manager::open_vessel`] takes it.
    pub async fn resolve_vessel(&self, id_or_name: &str) -> Result<VesselId> {
        self.state.resolve(id_or_name).await
    }
}
