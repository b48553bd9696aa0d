//! `vessel mcp`: vessel's workspaces as Model Context Protocol tools, so an
//! agent can create, run, edit, snapshot and restore them directly.
//!
//! One [`Tools`] value serves every session (stdio has one; streamable HTTP
//! may have several): they share the manager and the vessels the server has
//! open. A vessel named by a tool call is opened on first use and stays open
//! until it is deleted or the server stops, when all are closed (changes not
//! snapshotted are then dropped, as everywhere in vessel). Failures of vessel
//! come back as tool errors (`isError`) carrying the typed message, so the
//! model can read and act on them; the server itself never stops on input.

//!
//! `server.rs` serves the tools (stdio, or streamable HTTP with a bearer
//! token); `tools.rs` holds the tools themselves, `processes.rs` those of
//! background processes (the server outlives every call, so they run on
//! between calls); `args.rs` their arguments (each a JSON schema the model
//! sees).

mod args;
mod forks;
mod network;
mod processes;
mod server;
mod tools;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::model::CallToolResult;
use serde_json::Value;
use vessel::{Manager, Vessel, VesselError};

pub(crate) use server::{serve, token};

/// What the server lets a call return and run.
#[derive(Debug, Clone)]
pub(crate) struct Options {
    /// Bytes of stdout, and of stderr, an `exec` returns (the first and last
    /// halves; the middle is replaced by a marker).
    pub(crate) max_output: usize,
    /// Bytes a `read_file` returns at most.
    pub(crate) max_read: u64,
    /// The timeout of an `exec` that names none.
    pub(crate) exec_timeout: Duration,
}

/// Where `vessel mcp` listens.
#[derive(Debug, Clone)]
pub(crate) enum Transport {
    /// Standard input and output (what agents spawn).
    Stdio,
    /// Streamable HTTP on a loopback address, with a bearer token.
    Http { addr: SocketAddr, token: String },
}

/// The MCP tools over one manager.
#[derive(Clone)]
pub(crate) struct Tools {
    state: Arc<State>,
    tool_router: ToolRouter<Self>,
}

struct State {
    mgr: Arc<Manager>,
    options: Options,
    /// The vessels this server opened, by id.
    open: tokio::sync::Mutex<HashMap<String, Arc<Vessel>>>,
}

/// A tool's failure as the model sees it: the error's kind, then its
/// message and causes.
fn failure(e: impl Into<anyhow::Error>) -> CallToolResult {
    let e: anyhow::Error = e.into();
    let kind = e.chain().find_map(|c| c.downcast_ref::<VesselError>()).map(|v| format!("{:?}: ", v.kind()));
    CallToolResult::error(vec![rmcp::model::ContentBlock::text(format!("{}{e:#}", kind.unwrap_or_default()))])
}

fn invalid(msg: impl Into<String>) -> CallToolResult {
    CallToolResult::error(vec![rmcp::model::ContentBlock::text(format!("InvalidInput: {}", msg.into()))])
}

type ToolResult = std::result::Result<CallToolResult, CallToolResult>;

fn ok(v: Value) -> ToolResult {
    Ok(CallToolResult::structured(v))
}

impl Tools {
    fn new(mgr: Arc<Manager>, options: Options) -> Self {
        Self {
            state: Arc::new(State { mgr, options, open: Default::default() }),
            tool_router: Self::tool_router() + Self::process_router() + Self::fork_router() + Self::network_router(),
        }
    }

    /// The vessel `id`, opened on first use.
    async fn vessel(&self, id: &str) -> std::result::Result<Arc<Vessel>, CallToolResult> {
        let mut open = self.state.open.lock().await;
        if let Some(v) = open.get(id) {
            return Ok(v.clone());
        }
        let v = Arc::new(self.state.mgr.open_vessel(id).await.map_err(failure)?);
        open.insert(id.to_owned(), v.clone());
        Ok(v)
    }

    /// Closes every vessel the server opened (the manager's are all its),
    /// while the map still holds them, then lets the handles go.
    async fn close_all(&self) -> Result<()> {
        let mut open = self.state.open.lock().await;
        let closed = self.state.mgr.close().await.context("closing the vessels");
        open.clear();
        closed
    }
}
