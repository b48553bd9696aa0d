//! The MCP tools of a workspace's network: `set_network`, `publish_port`
//! (returns the URL to open) and `network_info` (policy, address,
//! published ports, and what was refused: blocked names and destinations).

use rmcp::handler::server::wrapper::Parameters;
use rmcp::{tool, tool_router};
use serde_json::json;
use vessel::NetworkPolicy;

use super::args::{PublishArgs, SetNetworkArgs, VesselArgs};
use super::{ToolResult, Tools, failure, invalid, ok};
use crate::args::NetArgs;
use crate::view::NetworkView;

/// The policy `network` and `allow` ask for, if any; a bad rule is the caller's error.
pub(super) fn policy_arg(
    network: Option<String>,
    allow: &[String],
) -> Result<Option<NetworkPolicy>, rmcp::model::CallToolResult> {
    NetArgs { network, allow: allow.to_vec() }.policy().map_err(|e| invalid(e.to_string()))
}

#[tool_router(router = network_router, vis = "pub(super)")]
impl Tools {
    #[tool(description = "Change what a workspace's commands may reach: network `none` (loopback only), \
        `allow` (only the `allow` list: domains such as pypi.org or *.pythonhosted.org, addresses or CIDRs \
        with an optional :port) or `open` (public internet, never the host, private or link-local addresses \
        or other workspaces). Takes effect at once for new connections; running processes go on. Returns \
        the network as network_info does.")]
    async fn set_network(&self, Parameters(a): Parameters<SetNetworkArgs>) -> ToolResult {
        let Some(policy) = policy_arg(a.network, &a.allow)? else {
            return Err(invalid("give network (none, allow, open) or allow"));
        };
        let v = self.vessel(&a.vessel_id).await?;
        v.set_network(policy).await.map_err(failure)?;
        ok(json!(NetworkView::of(&v).await))
    }

    #[tool(description = "Publish a TCP port of a workspace (a dev server listening in it) on the host, and \
        return its URL to open from the host; remove: true stops publishing it.")]
    async fn publish_port(&self, Parameters(a): Parameters<PublishArgs>) -> ToolResult {
        let v = self.vessel(&a.vessel_id).await?;
        if a.remove {
            let was = v.unpublish(a.port).await;
            return ok(json!({ "port": a.port, "removed": was }));
        }
        let addr = v.publish(a.port).await.map_err(failure)?;
        ok(json!({ "port": a.port, "url": format!("http://{addr}") }))
    }

    #[tool(description = "A workspace's network: its policy, address, published ports, and what was \
        refused (names the resolver refused, destinations denied, packets dropped) — look here when a \
        download or a connection fails.")]
    async fn network_info(&self, Parameters(a): Parameters<VesselArgs>) -> ToolResult {
        let v = self.vessel(&a.vessel_id).await?;
        ok(json!(NetworkView::of(&v).await))
    }
}
