//! The MCP tools of forks and changes: `fork_vessel` (a snapshot or the
//! live state, one or many ways) and `list_changes` (`docker diff`).

use std::sync::Arc;

use rmcp::handler::server::wrapper::Parameters;
use rmcp::{tool, tool_router};
use serde_json::json;
use vessel::SnapshotId;

use super::args::{ChangesArgs, ForkArgs};
use super::{ToolResult, Tools, failure, invalid, ok};
use crate::view::{ChangeView, VesselView};

#[tool_router(router = fork_router, vis = "pub(super)")]
impl Tools {
    #[tool(description = "Fork a workspace: new workspaces starting from one of its snapshots, or (no \
        snapshot_id) from its current state, which is snapshotted first. Forks share the source's layers \
        (nothing is copied) and are opened here; the source's processes keep running and are not copied. \
        Returns the new vessel_ids.")]
    async fn fork_vessel(&self, Parameters(a): Parameters<ForkArgs>) -> ToolResult {
        let count = a.count.unwrap_or(1);
        let opts = vessel::VesselOptions::new();
        let forks = match &a.snapshot_id {
            Some(s) => {
                let snapshot = SnapshotId::new(s).map_err(|e| invalid(e.to_string()))?;
                self.state.mgr.fork_vessels(&a.vessel_id, &snapshot, count, &opts).await.map_err(failure)?
            }
            None => self.vessel(&a.vessel_id).await?.fork(count, &opts).await.map_err(failure)?,
        };
        let mut open = self.state.open.lock().await;
        let mut views = Vec::with_capacity(forks.len());
        for v in forks {
            let m = v.manifest();
            views.push(json!(VesselView::of(&m)));
            open.insert(v.id().to_string(), Arc::new(v));
        }
        ok(json!({ "vessels": views }))
    }

    #[tool(description = "What changed in a workspace, as `docker diff`: every path added, modified (what: \
        content, mode, owner, xattrs, type, opaque) or deleted since a snapshot (default: the current one), \
        or between two snapshots (since and to).")]
    async fn list_changes(&self, Parameters(a): Parameters<ChangesArgs>) -> ToolResult {
        let v = self.vessel(&a.vessel_id).await?;
        let id = |s: &str| SnapshotId::new(s).map_err(|e| invalid(e.to_string()));
        let changes = match (&a.since, &a.to) {
            (Some(from), Some(to)) => v.changes_between(&id(from)?, &id(to)?).await,
            (since, None) => v.changes(since.as_deref().map(id).transpose()?.as_ref()).await,
            (None, Some(_)) => return Err(invalid("to needs since")),
        }
        .map_err(failure)?;
        let max = a.max_changes.unwrap_or(1000);
        let total = changes.len();
        let shown: Vec<ChangeView> = changes.iter().take(max).map(ChangeView::of).collect();
        ok(json!({ "changes": shown, "total": total, "truncated": total > max }))
    }
}
