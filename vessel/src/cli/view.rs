//! One JSON view of a vessel, a snapshot, an exec result and a background
//! process, shared by the
//! CLI's `--json` output and the MCP server's tool results, so a script
//! and an agent read the same field names (snake_case, as MCP tools and
//! most agent APIs use).

use serde::{Deserialize, Serialize};
use vessel::{ExecResult, Holder, ProcessInfo, ProcessStatus, SnapshotManifest, StopReason, VesselManifest};

/// A vessel as listed.
#[derive(Debug, Serialize)]
pub(crate) struct VesselView<'a> {
    pub(crate) vessel_id: &'a str,
    pub(crate) name: Option<&'a str>,
    pub(crate) image: &'a str,
    pub(crate) work_dir: &'a str,
    pub(crate) current_snapshot_id: Option<&'a str>,
    /// How many snapshots it has.
    pub(crate) snapshots: usize,
    pub(crate) created: String,
    pub(crate) updated: String,
    /// Who holds it open (`None`: nobody; the CLI asks storage).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) holder: Option<Option<HolderView<'a>>>,
    /// Whether this MCP server has it open.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) open_here: Option<bool>,
    /// The vessel and snapshot it was forked from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) forked_from: Option<ForkView>,
    /// Its network policy, as `--network`/`--allow` spell it (`none`,
    /// `open`, `allow,github.com,...`).
    pub(crate) network: String,
}

/// Where a fork came from.
#[derive(Debug, Serialize)]
pub(crate) struct ForkView {
    pub(crate) vessel_id: String,
    pub(crate) snapshot_id: String,
}

/// The host holding a vessel open.
#[derive(Debug, Serialize)]
pub(crate) struct HolderView<'a> {
    pub(crate) host: &'a str,
    pub(crate) name: &'a str,
    pub(crate) expires_at: Option<String>,
}

impl<'a> VesselView<'a> {
    pub(crate) fn of(m: &'a VesselManifest) -> Self {
        Self {
            vessel_id: m.id.as_str(),
            name: m.labels.get(vessel::NAME_LABEL).map(String::as_str),
            image: m.base_image_ref.as_str(),
            work_dir: &m.work_dir,
            current_snapshot_id: m.current_snapshot_id.as_ref().map(|s| s.as_str()),
            snapshots: m.snapshots.len(),
            created: m.create_time.to_rfc3339(),
            updated: m.update_time.to_rfc3339(),
            holder: None,
            open_here: None,
            forked_from: vessel::ForkOrigin::of(m)
                .map(|o| ForkView { vessel_id: o.vessel_id.to_string(), snapshot_id: o.snapshot_id.to_string() }),
            network: vessel::network_policy(m).map_or_else(|e| format!("invalid: {e}"), |p| p.to_string()),
        }
    }

    /// With its holder, as storage says (`None`: nobody has it open).
    pub(crate) fn held_by(mut self, h: Option<&'a Holder>) -> Self {
        self.holder = Some(h.map(|h| HolderView {
            host: h.host.as_str(),
            name: &h.name,
            expires_at: h.expires_at.map(|t| t.to_rfc3339()),
        }));
        self
    }
}

/// A snapshot.
#[derive(Debug, Serialize)]
pub(crate) struct SnapshotView<'a> {
    pub(crate) snapshot_id: &'a str,
    pub(crate) parent_id: Option<&'a str>,
    pub(crate) message: &'a str,
    /// Bytes of its stored layer.
    pub(crate) size: i64,
    pub(crate) checksum: &'a str,
    pub(crate) created: String,
    /// Its depth in the tree, when listed as one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) depth: Option<usize>,
    /// Whether it is the vessel's current snapshot, when listed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) current: Option<bool>,
}

impl<'a> SnapshotView<'a> {
    pub(crate) fn of(s: &'a SnapshotManifest) -> Self {
        Self {
            snapshot_id: s.id.as_str(),
            parent_id: s.parent_id.as_ref().map(|p| p.as_str()),
            message: &s.message,
            size: s.size,
            checksum: &s.checksum,
            created: s.create_time.to_rfc3339(),
            depth: None,
            current: None,
        }
    }

    /// A vessel's snapshots as a tree, root first, with depth and current.
    pub(crate) fn tree(m: &'a VesselManifest) -> Vec<Self> {
        m.tree()
            .into_iter()
            .map(|(depth, s)| Self {
                depth: Some(depth),
                current: Some(m.current_snapshot_id.as_ref() == Some(&s.id)),
                ..Self::of(s)
            })
            .collect()
    }
}

/// How a command ended, and (MCP) its output.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct ExecView {
    pub(crate) exit_code: i32,
    pub(crate) timed_out: bool,
    pub(crate) oom_killed: bool,
    pub(crate) duration_ms: u64,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub(crate) output: Option<OutputView>,
}

/// A command's captured output, capped.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct OutputView {
    pub(crate) stdout: String,
    pub(crate) stderr: String,
    pub(crate) stdout_bytes: u64,
    pub(crate) stderr_bytes: u64,
    pub(crate) truncated: bool,
}

impl ExecView {
    pub(crate) fn of(r: &ExecResult, duration: std::time::Duration) -> Self {
        Self {
            exit_code: r.exit_code,
            timed_out: r.timed_out,
            oom_killed: r.oom_killed,
            duration_ms: u64::try_from(duration.as_millis()).unwrap_or(u64::MAX),
            output: None,
        }
    }
}

/// A background process.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct ProcessView {
    pub(crate) process_id: u64,
    pub(crate) command: Vec<String>,
    pub(crate) pid: u32,
    /// `running`, `exited`, `signalled`, `oom_killed`, `timed_out`, `stopped`.
    pub(crate) status: String,
    pub(crate) exit_code: Option<i32>,
    pub(crate) signal: Option<i32>,
    /// Why the vessel stopped it: `vessel_closed`, `restored`, `sandbox_lost`.
    pub(crate) stopped_by: Option<String>,
    pub(crate) started: String,
    pub(crate) stdout_bytes: u64,
    pub(crate) stderr_bytes: u64,
}

impl ProcessView {
    pub(crate) fn of(p: &ProcessInfo) -> Self {
        let (status, signal, stopped_by) = match p.status {
            ProcessStatus::Running => ("running", None, None),
            ProcessStatus::Exited { .. } => ("exited", None, None),
            ProcessStatus::Signalled { signal } => ("signalled", Some(signal), None),
            ProcessStatus::OomKilled => ("oom_killed", Some(9), None),
            ProcessStatus::TimedOut => ("timed_out", Some(9), None),
            ProcessStatus::Stopped { reason } => (
                "stopped",
                Some(9),
                Some(match reason {
                    StopReason::VesselClosed => "vessel_closed",
                    StopReason::Restored => "restored",
                    _ => "sandbox_lost",
                }),
            ),
            _ => ("unknown", None, None),
        };
        Self {
            process_id: p.id,
            command: p.command.clone(),
            pid: p.pid,
            status: status.to_owned(),
            exit_code: p.status.exit_code(),
            signal,
            stopped_by: stopped_by.map(str::to_owned),
            started: chrono::DateTime::<chrono::Utc>::from(p.started).to_rfc3339(),
            stdout_bytes: p.output_bytes.0,
            stderr_bytes: p.output_bytes.1,
        }
    }
}

/// A changed path, as `vessel diff --json` and `list_changes` show it.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct ChangeView {
    pub(crate) path: String,
    /// `added`, `modified`, `deleted`.
    pub(crate) kind: String,
    /// For `modified`: `content`, `mode`, `owner`, `xattrs`, `type`, `opaque`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) what: Vec<String>,
}

impl ChangeView {
    pub(crate) fn of(c: &vessel::Change) -> Self {
        let m = c.modified;
        let what = [
            (m.content, "content"),
            (m.mode, "mode"),
            (m.owner, "owner"),
            (m.xattrs, "xattrs"),
            (m.kind, "type"),
            (m.opaque, "opaque"),
        ];
        Self {
            path: c.path.to_string_lossy().into_owned(),
            kind: match c.kind {
                vessel::ChangeKind::Added => "added",
                vessel::ChangeKind::Modified => "modified",
                vessel::ChangeKind::Deleted => "deleted",
            }
            .into(),
            what: what.iter().filter(|(on, _)| *on).map(|(_, w)| (*w).to_owned()).collect(),
        }
    }

    /// docker diff's letter: `A`, `C`, `D`.
    pub(crate) fn letter(&self) -> char {
        match self.kind.as_str() {
            "added" => 'A',
            "deleted" => 'D',
            _ => 'C',
        }
    }
}

/// A vessel's network: its policy, address, published ports and refusals.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct NetworkView {
    /// `none`, `allow` or `open`.
    pub(crate) mode: String,
    /// Its rules, as `--allow` takes them.
    pub(crate) rules: Vec<String>,
    /// The vessel's address (once its network exists).
    pub(crate) address: Option<String>,
    /// Its IPv6 address (once its network exists, with IPv6 on).
    #[serde(default)]
    pub(crate) address6: Option<String>,
    /// Vessel port (as a string: JSON keys are) to host URL (`http://ADDR:PORT`).
    pub(crate) published: std::collections::BTreeMap<String, String>,
    /// Packets of refused connections.
    pub(crate) denied_packets: u64,
    /// Destinations refused recently.
    pub(crate) denied_destinations: Vec<String>,
    /// Names the resolver refused, with how often.
    pub(crate) refused_names: std::collections::BTreeMap<String, u64>,
}

impl NetworkView {
    /// The view of open vessel `v`'s network.
    pub(crate) async fn of(v: &vessel::Vessel) -> Self {
        let info = v.network_info().await;
        let stats = v.network_stats().await;
        let mut view = Self::new(&info.policy, info.address.map(|a| a.to_string()), &info.published, &stats);
        view.address6 = info.address6.map(|a| a.to_string());
        view
    }

    /// The view of a policy and what is known of its network.
    pub(crate) fn new(
        policy: &vessel::NetworkPolicy,
        address: Option<String>,
        published: &std::collections::BTreeMap<u16, std::net::SocketAddr>,
        stats: &vessel::NetworkStats,
    ) -> Self {
        Self {
            mode: policy.mode().into(),
            rules: policy.rules().iter().map(ToString::to_string).collect(),
            address,
            address6: None,
            published: published.iter().map(|(p, a)| (p.to_string(), format!("http://{a}"))).collect(),
            denied_packets: stats.denied_packets,
            denied_destinations: stats.denied_destinations.iter().map(ToString::to_string).collect(),
            refused_names: stats.refused_names.iter().map(|r| (r.name.clone(), r.count)).collect(),
        }
    }
}
