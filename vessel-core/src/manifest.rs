//! Persisted manifests, JSON-compatible with the Go original.
//!
//! Go writes nil maps and slices as `null` and an absent parent as `""`, and
//! times as RFC 3339 with nanoseconds and a local offset; all of that parses
//! here. What we write is RFC 3339 in UTC with `""` for "none", which the Go
//! original parses in turn.

use std::collections::BTreeMap;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::{ImageRef, SnapshotId, VesselId};

/// The persisted state of one vessel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VesselManifest {
    /// The vessel's id.
    pub id: VesselId,
    /// The image the vessel was created from, as the caller named it.
    pub base_image_ref: ImageRef,
    /// The snapshot the vessel's filesystem currently derives from; `None`
    /// (written `""`) until the first snapshot.
    #[serde(with = "empty_is_none")]
    pub current_snapshot_id: Option<SnapshotId>,
    /// Where relative paths and `exec` start inside the vessel.
    pub work_dir: String,
    /// When the vessel was created.
    #[serde(with = "rfc3339")]
    pub create_time: DateTime<Utc>,
    /// When the manifest last changed.
    #[serde(with = "rfc3339")]
    pub update_time: DateTime<Utc>,
    /// Free-form metadata (vessel uses `vessel.image.*` keys to pin the base image).
    #[serde(default, deserialize_with = "null_is_default")]
    pub labels: BTreeMap<String, String>,
    /// Every snapshot of the vessel, in creation order; history is a tree
    /// through `parent_id`.
    #[serde(default, deserialize_with = "null_is_default")]
    pub snapshots: Vec<SnapshotManifest>,
}

/// One immutable snapshot: a layer diff on top of its parent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotManifest {
    /// The snapshot's id.
    pub id: SnapshotId,
    /// The vessel it belongs to.
    pub vessel_id: VesselId,
    /// The snapshot this one is a diff against; `None` (written `""`) when it
    /// sits directly on the base image.
    #[serde(with = "empty_is_none")]
    pub parent_id: Option<SnapshotId>,
    /// The caller's description.
    pub message: String,
    /// `sha256:<hex>` of the uncompressed layer tar.
    pub checksum: String,
    /// Byte length of the uncompressed layer tar.
    pub size: i64,
    /// When the snapshot was taken.
    #[serde(with = "rfc3339")]
    pub create_time: DateTime<Utc>,
    /// Free-form metadata.
    #[serde(default, deserialize_with = "null_is_default")]
    pub labels: BTreeMap<String, String>,
}

impl VesselManifest {
    /// The snapshot with id `id`, if the vessel has it.
    pub fn snapshot(&self, id: &SnapshotId) -> Option<&SnapshotManifest> {
        self.snapshots.iter().find(|s| &s.id == id)
    }

    /// The chain from `id` back to the base image, newest first.
    ///
    /// Stops (rather than looping) if the manifest's parent links are cyclic or
    /// dangle, so a corrupt manifest cannot hang a caller; the caller can
    /// compare the chain's end with `None` to detect that.
    pub fn chain(&self, id: &SnapshotId) -> Vec<&SnapshotManifest> {
        let mut out = Vec::new();
        let mut next = self.snapshot(id);
        while let Some(s) = next {
            if out.len() >= self.snapshots.len() {
                break;
            }
            out.push(s);
            next = s.parent_id.as_ref().and_then(|p| self.snapshot(p));
        }
        out
    }

    /// The snapshot history as a tree, depth first: each snapshot with its
    /// depth (0 for roots), children in the order they were made. Snapshots
    /// whose parent is missing count as roots, so none is left out.
    pub fn tree(&self) -> Vec<(usize, &SnapshotManifest)> {
        let is_root = |s: &SnapshotManifest| s.parent_id.as_ref().is_none_or(|p| self.snapshot(p).is_none());
        let mut out = Vec::with_capacity(self.snapshots.len());
        let mut stack: Vec<(usize, &SnapshotManifest)> =
            self.snapshots.iter().filter(|s| is_root(s)).rev().map(|s| (0, s)).collect();
        while let Some((depth, s)) = stack.pop() {
            // A cyclic manifest cannot make this loop forever.
            if out.len() >= self.snapshots.len() {
                break;
            }
            out.push((depth, s));
            let children = self.snapshots.iter().filter(|c| c.parent_id.as_ref() == Some(&s.id));
            stack.extend(children.rev().map(|c| (depth + 1, c)));
        }
        out
    }
}

fn null_is_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

mod empty_is_none {
    use super::*;

    pub(super) fn serialize<S: Serializer>(v: &Option<SnapshotId>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(v.as_ref().map_or("", |id| id.as_str()))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SnapshotId>, D::Error> {
        match Option::<String>::deserialize(d)?.as_deref() {
            None | Some("") => Ok(None),
            Some(s) => SnapshotId::new(s).map(Some).map_err(serde::de::Error::custom),
        }
    }
}

mod rfc3339 {
    use super::*;

    pub(super) fn serialize<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&t.to_rfc3339_opts(SecondsFormat::AutoSi, true))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        let s = String::deserialize(d)?;
        DateTime::parse_from_rfc3339(&s)
            .map(|t| t.with_timezone(&Utc))
            .map_err(|e| serde::de::Error::custom(format!("invalid RFC 3339 time {s:?}: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Shaped exactly as Go's encoding/json writes the original's structs:
    /// field order, nil slices/maps as null, local offsets, trimmed nanos.
    const GO_MANIFEST: &str = r#"{"id":"0a1b2c3d4e5f6071","baseImageRef":"docker.io/library/ubuntu:20.04","currentSnapshotId":"00000a1b2c3d4e5f","workDir":"/workspace","createTime":"2025-03-01T10:11:12.123456789+08:00","updateTime":"2025-03-01T10:20:00.5+08:00","labels":null,"snapshots":[{"id":"0000000000000001","vesselId":"0a1b2c3d4e5f6071","parentId":"","message":"first","checksum":"sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855","size":10240,"createTime":"2025-03-01T10:15:00Z","labels":null},{"id":"00000a1b2c3d4e5f","vesselId":"0a1b2c3d4e5f6071","parentId":"0000000000000001","message":"second","checksum":"sha256:00","size":2048,"createTime":"0001-01-01T00:00:00Z","labels":{"k":"v"}}]}"#;

    #[test]
    fn parses_a_manifest_written_by_the_go_original() {
        let m: VesselManifest = serde_json::from_str(GO_MANIFEST).unwrap();
        assert_eq!(m.id, "0a1b2c3d4e5f6071");
        assert_eq!(m.base_image_ref.as_str(), "docker.io/library/ubuntu:20.04");
        assert_eq!(m.current_snapshot_id.as_ref().unwrap(), "00000a1b2c3d4e5f");
        assert_eq!(m.create_time.to_rfc3339_opts(SecondsFormat::Nanos, true), "2025-03-01T02:11:12.123456789Z");
        assert!(m.labels.is_empty());
        assert_eq!(m.snapshots.len(), 2);
        assert_eq!(m.snapshots[0].parent_id, None);
        assert_eq!(m.snapshots[1].labels["k"], "v");
        let chain: Vec<_> =
            m.chain(m.current_snapshot_id.as_ref().unwrap()).iter().map(|s| s.message.as_str()).collect();
        assert_eq!(chain, ["second", "first"]);
    }

    #[test]
    fn writes_exactly_the_original_field_names() {
        let m: VesselManifest = serde_json::from_str(GO_MANIFEST).unwrap();
        let v: serde_json::Value = serde_json::to_value(&m).unwrap();
        let mut keys: Vec<_> = v.as_object().unwrap().keys().cloned().collect();
        keys.sort();
        assert_eq!(
            keys,
            ["baseImageRef", "createTime", "currentSnapshotId", "id", "labels", "snapshots", "updateTime", "workDir"]
        );
        let mut skeys: Vec<_> = v["snapshots"][0].as_object().unwrap().keys().cloned().collect();
        skeys.sort();
        assert_eq!(skeys, ["checksum", "createTime", "id", "labels", "message", "parentId", "size", "vesselId"]);
        assert_eq!(v["snapshots"][0]["parentId"], "");
        assert_eq!(v["createTime"], "2025-03-01T02:11:12.123456789Z");
        assert_eq!(v["snapshots"][0]["createTime"], "2025-03-01T10:15:00Z");
        let back: VesselManifest = serde_json::from_value(v).unwrap();
        assert_eq!(back, m);
    }

    #[test]
    fn rejects_invalid_ids_and_times() {
        let bad_id = GO_MANIFEST.replace("\"0a1b2c3d4e5f6071\",\"baseImageRef\"", "\"../../x\",\"baseImageRef\"");
        assert!(serde_json::from_str::<VesselManifest>(&bad_id).is_err());
        let bad_parent = GO_MANIFEST.replace("\"parentId\":\"\"", "\"parentId\":\"zz\"");
        assert!(serde_json::from_str::<VesselManifest>(&bad_parent).is_err());
        let bad_time = GO_MANIFEST.replace("2025-03-01T10:15:00Z", "yesterday");
        assert!(serde_json::from_str::<VesselManifest>(&bad_time).is_err());
    }

    #[test]
    fn tree_is_depth_first_with_forks() {
        let mut m: VesselManifest = serde_json::from_str(GO_MANIFEST).unwrap();
        let root = m.snapshots[0].clone();
        let mut fork = m.snapshots[1].clone();
        fork.id = SnapshotId::new("00000000000000f0").unwrap();
        fork.message = "fork".into();
        let mut grandchild = m.snapshots[1].clone();
        grandchild.id = SnapshotId::new("00000000000000f1").unwrap();
        grandchild.parent_id = Some(m.snapshots[1].id.clone());
        grandchild.message = "third".into();
        let mut orphan = root.clone();
        orphan.id = SnapshotId::new("00000000000000f2").unwrap();
        orphan.parent_id = Some(SnapshotId::new("00000000000000ee").unwrap());
        orphan.message = "orphan".into();
        m.snapshots.extend([fork, grandchild, orphan]);
        let tree: Vec<(usize, &str)> = m.tree().into_iter().map(|(d, s)| (d, s.message.as_str())).collect();
        assert_eq!(tree, [(0, "first"), (1, "second"), (2, "third"), (1, "fork"), (0, "orphan")]);
        m.snapshots[0].parent_id = Some(m.snapshots[1].id.clone());
        assert!(m.tree().len() <= m.snapshots.len(), "a cycle cannot make it loop");
    }

    #[test]
    fn cyclic_parents_do_not_hang_chain() {
        let mut m: VesselManifest = serde_json::from_str(GO_MANIFEST).unwrap();
        m.snapshots[0].parent_id = Some(m.snapshots[1].id.clone());
        assert_eq!(m.chain(&m.snapshots[1].id).len(), m.snapshots.len());
    }
}
