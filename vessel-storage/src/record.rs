//! Small records written with conditional writes: the coordination state
//! of hosts sharing one storage (see [`crate::lease`]).
//!
//! ```text
//! leases/hosts/<host-id>.json      a host's heartbeat
//! leases/vessels/<vessel-id>.json  which host has a vessel open
//! names/<name>.json                which vessel a name is (created if absent: names are unique)
//! forks/<owner>/<fork>.json        a vessel whose history holds snapshots stored under another's
//! condemned/<owner>.json           a deletion of `owner`'s snapshot blobs is under way
//! ```

use std::fmt;

use vessel_core::{CoreError, VesselId, VesselName};

/// Identifies one running [`crate::lease::HostLease`] (one process's
/// manager): 16 lowercase hex digits, like vessel ids, so it is a safe
/// file and key name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct HostId(String);

impl HostId {
    /// Parses a host id.
    pub fn new(s: &str) -> Result<Self, CoreError> {
        let ok = s.len() == 16 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if ok { Ok(Self(s.to_owned())) } else { Err(CoreError::InvalidId { what: "host", value: s.to_owned() }) }
    }

    /// A fresh random id (64 bits, hex).
    pub fn generate() -> Self {
        Self(format!("{:016x}", rand::random::<u64>()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for HostId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for HostId {
    type Error = CoreError;
    fn try_from(s: String) -> Result<Self, CoreError> {
        Self::new(&s)
    }
}

impl From<HostId> for String {
    fn from(h: HostId) -> String {
        h.0
    }
}

/// Names a record.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RecordKey {
    /// A host's heartbeat.
    Host(HostId),
    /// The claim on a vessel: which host has it open.
    Claim(VesselId),
    /// A vessel's name: the id it stands for.
    Name(VesselName),
    /// Vessel `fork` refers to snapshots whose blobs are stored under vessel
    /// `owner` (written before the fork's manifest; see `vessel`'s fork).
    Fork {
        /// Whose blobs.
        owner: VesselId,
        /// The vessel that refers to them.
        fork: VesselId,
    },
    /// Some of `owner`'s snapshot blobs are being deleted: a fork that
    /// finds this after recording itself gives up.
    Condemned(VesselId),
}

impl RecordKey {
    /// The key's path under the storage root, `/`-separated.
    pub fn path(&self) -> String {
        match self {
            Self::Host(h) => format!("{HOSTS}/{h}.json"),
            Self::Claim(v) => format!("{CLAIMS}/{v}.json"),
            Self::Name(n) => format!("{NAMES}/{n}.json"),
            Self::Fork { owner, fork } => format!("{FORKS}/{owner}/{fork}.json"),
            Self::Condemned(v) => format!("{CONDEMNED}/{v}.json"),
        }
    }
}

impl fmt::Display for RecordKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Host(h) => write!(f, "lease of host {h}"),
            Self::Claim(v) => write!(f, "claim on vessel {v}"),
            Self::Name(n) => write!(f, "vessel name {n:?}", n = n.as_str()),
            Self::Fork { owner, fork } => write!(f, "fork record of {fork} on {owner}"),
            Self::Condemned(v) => write!(f, "deletion record of {v}'s snapshots"),
        }
    }
}

pub(crate) const HOSTS: &str = "leases/hosts";
pub(crate) const CLAIMS: &str = "leases/vessels";
pub(crate) const NAMES: &str = "names";
pub(crate) const FORKS: &str = "forks";
pub(crate) const CONDEMNED: &str = "condemned";

/// The version a record or manifest was read or written at, as the
/// storage knows it (an ETag and object version, a content hash): what a
/// conditional write compares. Opaque to callers.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Version {
    pub(crate) e_tag: Option<String>,
    pub(crate) version: Option<String>,
}

impl Version {
    pub(crate) fn tag(e_tag: impl Into<String>) -> Self {
        Self { e_tag: Some(e_tag.into()), version: None }
    }

    /// The version of locally stored `bytes`: their sha256.
    pub(crate) fn of_bytes(bytes: &[u8]) -> Self {
        use sha2::Digest;
        Self::tag(format!("{:x}", sha2::Sha256::digest(bytes)))
    }
}

/// The condition of a conditional write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteIf {
    /// Nothing is stored under the key (create-if-absent).
    Absent,
    /// What is stored is still at this version (update-if-version).
    Matches(Version),
}

impl WriteIf {
    /// Whether a stored object at `current` (`None`: absent) satisfies the condition.
    pub(crate) fn holds(&self, current: Option<&Version>) -> bool {
        match (self, current) {
            (Self::Absent, None) => true,
            (Self::Matches(want), Some(have)) => want == have,
            _ => false,
        }
    }
}

/// A record's bytes and the version they were read at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The bytes (JSON, for the records vessel writes).
    pub data: Vec<u8>,
    /// What a conditional write of the next version compares.
    pub version: Version,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_ids_are_safe_names() {
        assert!(HostId::new("0123456789abcdef").is_ok());
        for bad in ["", "0123456789ABCDEF", "0123456789abcde/", "..", "0123456789abcdefa", "0123456789abcdeg"] {
            assert!(HostId::new(bad).is_err(), "{bad:?}");
        }
        assert_eq!(HostId::generate().as_str().len(), 16);
    }

    #[test]
    fn conditions() {
        let v = Version::of_bytes(b"x");
        assert!(WriteIf::Absent.holds(None));
        assert!(!WriteIf::Absent.holds(Some(&v)));
        assert!(WriteIf::Matches(v.clone()).holds(Some(&v)));
        assert!(!WriteIf::Matches(v.clone()).holds(Some(&Version::of_bytes(b"y"))));
        assert!(!WriteIf::Matches(v).holds(None));
    }
}
