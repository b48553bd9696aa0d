//! A vessel's limits, resolved from its options, its manifest and the
//! manager's defaults, and pinned in its manifest's labels (so a vessel
//! keeps them on any host; the Go original ignores unknown labels).

use std::collections::BTreeMap;

use vessel_core::{Limits, NetworkPolicy};

use crate::config::VesselOptions;
use crate::{Result, VesselError};

const MEMORY: &str = "vessel.limits.memory";
const CPU: &str = "vessel.limits.cpu-quota-us";
const PIDS: &str = "vessel.limits.pids";
const DISK: &str = "vessel.limits.disk";
/// The network policy, in its text form ([`NetworkPolicy`]'s `Display`).
const NETWORK: &str = "vessel.network";
/// Written for "no limit".
const NONE: &str = "none";

/// The smallest and largest disk quota: 1 MiB, 1 PiB.
const DISK_RANGE: (u64, u64) = (1 << 20, 1 << 50);

/// A limit a vessel can have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Limit {
    /// Memory of each command ([`Limits::memory_bytes`]).
    Memory,
    /// CPU of each command ([`Limits::cpu_quota_us`]).
    Cpu,
    /// Processes of each command ([`Limits::pids`]).
    Pids,
    /// What the vessel may write to disk ([`crate::VesselOptions::disk_bytes`]).
    Disk,
}

/// A limit this host cannot apply ([`crate::Manager::unavailable_limits`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnavailableLimit {
    /// Which.
    pub limit: Limit,
    /// Why not.
    pub reason: String,
}

/// What a vessel's commands run under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Bounds {
    pub(crate) limits: Limits,
    /// Bytes it may write; `None`: unbounded.
    pub(crate) disk: Option<u64>,
}

pub(crate) fn check_disk(bytes: u64) -> Result<()> {
    if bytes < DISK_RANGE.0 || bytes > DISK_RANGE.1 {
        return Err(VesselError::InvalidInput(format!(
            "invalid disk quota {bytes}: expected {} to {}",
            DISK_RANGE.0, DISK_RANGE.1
        )));
    }
    Ok(())
}

fn parse(labels: &BTreeMap<String, String>, key: &str) -> Result<Option<Option<i64>>> {
    match labels.get(key).map(String::as_str) {
        None => Ok(None),
        Some(NONE) => Ok(Some(None)),
        Some(v) => v
            .parse()
            .map(|n| Some(Some(n)))
            .map_err(|_| VesselError::InvalidInput(format!("label {key}={v:?} is not a number"))),
    }
}

/// Writes `opts`' explicit values as labels (validated), for
/// [`Bounds::resolve`] to pick up.
pub(crate) fn label_options(opts: &VesselOptions, labels: &mut BTreeMap<String, String>) -> Result<()> {
    opts.limits.validate()?;
    let l = opts.limits;
    for (key, v) in [(MEMORY, l.memory_bytes), (CPU, l.cpu_quota_us), (PIDS, l.pids)] {
        if let Some(v) = v {
            labels.insert(key.into(), v.to_string());
        }
    }
    if let Some(d) = opts.disk_bytes {
        check_disk(d)?;
        labels.insert(DISK.into(), d.to_string());
    }
    if let Some(p) = &opts.network {
        p.validate()?;
        set_network_label(labels, p);
    }
    Ok(())
}

/// The network policy pinned in `labels` (none pinned: loopback only).
pub(crate) fn network_policy(labels: &BTreeMap<String, String>) -> Result<NetworkPolicy> {
    match labels.get(NETWORK) {
        None => Ok(NetworkPolicy::None),
        Some(v) => Ok(v.parse()?),
    }
}

/// Pins `policy` in `labels`.
pub(crate) fn set_network_label(labels: &mut BTreeMap<String, String>, policy: &NetworkPolicy) {
    labels.insert(NETWORK.into(), policy.to_string());
}

/// A fork's limit labels: its source's (as pinned there), each narrowed by
/// a value `opts` sets; a value wider than the source's is refused.
pub(crate) fn fork_labels(
    source: &BTreeMap<String, String>,
    opts: &VesselOptions,
    out: &mut BTreeMap<String, String>,
) -> Result<()> {
    let mut asked = BTreeMap::new();
    label_options(opts, &mut asked)?;
    // The network: the fork's own if asked, else its source's.
    if let Some(policy) = asked.get(NETWORK).or_else(|| source.get(NETWORK)) {
        out.insert(NETWORK.into(), policy.clone());
    }
    for key in [MEMORY, CPU, PIDS, DISK] {
        let from = parse(source, key)?;
        let value = match (asked.get(key), from) {
            (Some(v), Some(Some(limit))) if v.parse::<i64>().map_or(true, |n| n > limit) => {
                return Err(VesselError::InvalidInput(format!(
                    "a fork may narrow its source's limits, not widen them: {key}={v} is above the source's {limit}"
                )));
            }
            (Some(v), _) => v.clone(),
            (None, _) => match source.get(key) {
                Some(v) => v.clone(),
                None => continue,
            },
        };
        out.insert(key.into(), value);
    }
    Ok(())
}

impl Bounds {
    /// The vessel's bounds: its labels, else the manager's defaults; then
    /// pinned in `labels`.
    pub(crate) fn resolve(
        labels: &mut BTreeMap<String, String>,
        defaults: Limits,
        disk_default: Option<u64>,
        quotas: bool,
    ) -> Result<Self> {
        let limits = Limits {
            memory_bytes: parse(labels, MEMORY)?.unwrap_or(defaults.memory_bytes),
            cpu_quota_us: parse(labels, CPU)?.unwrap_or(defaults.cpu_quota_us),
            pids: parse(labels, PIDS)?.unwrap_or(defaults.pids),
        };
        limits.validate()?;
        let disk = match parse(labels, DISK)? {
            Some(d) => d.map(|d| u64::try_from(d).unwrap_or(0)),
            None => disk_default,
        };
        if let Some(d) = disk {
            check_disk(d)?;
        }
        let disk = if quotas {
            disk
        } else {
            if disk.is_some() && labels.contains_key(DISK) {
                tracing::warn!("this manager runs without disk quotas: the vessel's is not enforced");
            }
            None
        };
        let show = |v: Option<i64>| v.map_or_else(|| NONE.to_owned(), |v| v.to_string());
        labels.insert(MEMORY.into(), show(limits.memory_bytes));
        labels.insert(CPU.into(), show(limits.cpu_quota_us));
        labels.insert(PIDS.into(), show(limits.pids));
        if quotas {
            labels.insert(DISK.into(), show(disk.map(|d| d as i64)));
        }
        Ok(Self { limits, disk })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_pin_what_was_resolved() {
        let mut labels = BTreeMap::new();
        label_options(&VesselOptions::new().pids(64).disk_bytes(64 << 20), &mut labels).unwrap();
        let b = Bounds::resolve(&mut labels, Limits::sandbox(), Some(1 << 30), true).unwrap();
        assert_eq!(b.limits, Limits { pids: Some(64), ..Limits::sandbox() });
        assert_eq!(b.disk, Some(64 << 20));
        assert_eq!(labels[PIDS], "64");
        // Reopened under other defaults: the pinned values hold.
        let again = Bounds::resolve(&mut labels, Limits::unlimited(), None, true).unwrap();
        assert_eq!(again, b);
        let mut unlimited = BTreeMap::new();
        let u = Bounds::resolve(&mut unlimited, Limits::unlimited(), None, true).unwrap();
        assert_eq!(unlimited[MEMORY], NONE);
        assert_eq!(Bounds::resolve(&mut unlimited, Limits::sandbox(), Some(1 << 30), true).unwrap(), u);
    }

    #[test]
    fn bad_options_are_refused() {
        let mut labels = BTreeMap::new();
        assert!(label_options(&VesselOptions::new().memory_bytes(0), &mut labels).is_err());
        assert!(label_options(&VesselOptions::new().disk_bytes(10), &mut labels).is_err());
        assert!(labels.is_empty(), "nothing written for refused options");
        labels.insert(PIDS.into(), "lots".into());
        assert!(Bounds::resolve(&mut labels, Limits::sandbox(), None, true).is_err());
    }
}
