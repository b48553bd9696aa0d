//! The MCP tools of background processes: started by `exec` with
//! `background: true`, then listed, read by offset, fed, signalled and
//! waited for (see `vessel::ProcessHandle`).

use std::time::Duration;

use base64::Engine;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::{tool, tool_router};
use serde_json::json;
use vessel::{OutputStream, ProcessHandle};

use super::args::{KillProcessArgs, ReadOutputArgs, WaitProcessArgs, WriteStdinArgs};
use super::{ToolResult, Tools, failure, invalid, ok};
use crate::view::ProcessView;

impl Tools {
    async fn process(
        &self,
        vessel_id: &str,
        process_id: u64,
    ) -> std::result::Result<ProcessHandle, rmcp::model::CallToolResult> {
        self.vessel(vessel_id).await?.process(process_id).map_err(failure)
    }
}

#[tool_router(router = process_router, vis = "pub(super)")]
impl Tools {
    #[tool(description = "A workspace's background processes (started by exec with background: true): \
        process_id, command, pid, status (running, exited, signalled, oom_killed, timed_out, stopped), \
        exit_code once ended, and bytes of output so far.")]
    async fn list_processes(&self, Parameters(a): Parameters<super::args::VesselArgs>) -> ToolResult {
        let v = self.vessel(&a.vessel_id).await?;
        let list: Vec<ProcessView> = v.processes().iter().map(ProcessView::of).collect();
        ok(json!({ "processes": list }))
    }

    #[tool(description = "Read a background process's output from an offset (0: its start; pass next_offset \
        to continue). wait_seconds waits for new output while it runs (as `tail -f`). The server keeps the \
        last 1 MiB of each stream; `dropped` counts older bytes that are gone.")]
    async fn read_process_output(&self, Parameters(a): Parameters<ReadOutputArgs>) -> ToolResult {
        let p = self.process(&a.vessel_id, a.process_id).await?;
        let stream = match a.stream.as_deref() {
            None | Some("stdout") => OutputStream::Stdout,
            Some("stderr") => OutputStream::Stderr,
            Some(s) => return Err(invalid(format!("stream must be stdout or stderr, not {s:?}"))),
        };
        let max = a.max_bytes.unwrap_or(self.state.options.max_output as u64).min(self.state.options.max_output as u64);
        let max = usize::try_from(max).unwrap_or(usize::MAX);
        let wait = match a.wait_seconds {
            None => Duration::ZERO,
            Some(s) if (0.0..=300.0).contains(&s) => Duration::from_secs_f64(s),
            Some(s) => return Err(invalid(format!("wait_seconds must be 0 to 300, not {s}"))),
        };
        let offset = a.offset.unwrap_or(0);
        let out = match tokio::time::timeout(wait, p.follow(stream, offset, max)).await {
            Ok(out) => out,
            Err(_) => p.read(stream, offset, max),
        };
        let (encoding, data) = match String::from_utf8(out.data) {
            Ok(text) => ("text", text),
            Err(e) => ("base64", base64::engine::general_purpose::STANDARD.encode(e.into_bytes())),
        };
        ok(json!({
            "process_id": a.process_id, "data": data, "encoding": encoding, "offset": out.offset,
            "next_offset": out.next, "dropped": out.dropped, "process": ProcessView::of(&p.info()),
        }))
    }

    #[tool(description = "Write text to a background process's stdin; close: true sends end-of-file after it.")]
    async fn write_process_stdin(&self, Parameters(a): Parameters<WriteStdinArgs>) -> ToolResult {
        let p = self.process(&a.vessel_id, a.process_id).await?;
        if !a.data.is_empty() {
            p.write_stdin(a.data.as_bytes()).await.map_err(failure)?;
        }
        if a.close {
            p.close_stdin().await.map_err(failure)?;
        }
        ok(json!({ "process_id": a.process_id, "bytes": a.data.len(), "closed": a.close }))
    }

    #[tool(description = "Send a signal to a background process and its process group: TERM (default), KILL, \
        INT, HUP, or a number.")]
    async fn kill_process(&self, Parameters(a): Parameters<KillProcessArgs>) -> ToolResult {
        let p = self.process(&a.vessel_id, a.process_id).await?;
        let signal = crate::live::parse_signal(a.signal.as_deref().unwrap_or("TERM")).map_err(invalid)?;
        p.signal(signal).await.map_err(failure)?;
        ok(json!({ "process_id": a.process_id, "signal": signal }))
    }

    #[tool(description = "Wait for a background process to end (at most timeout_seconds, default 30) and \
        return its status and exit code; status running means it still runs.")]
    async fn wait_process(&self, Parameters(a): Parameters<WaitProcessArgs>) -> ToolResult {
        let p = self.process(&a.vessel_id, a.process_id).await?;
        let wait = match a.timeout_seconds {
            None => Duration::from_secs(30),
            Some(s) if s > 0.0 && s <= 3600.0 => Duration::from_secs_f64(s),
            Some(s) => return Err(invalid(format!("timeout_seconds must be more than 0 and at most 3600, not {s}"))),
        };
        let _ = tokio::time::timeout(wait, p.wait()).await;
        ok(json!(ProcessView::of(&p.info())))
    }
}
