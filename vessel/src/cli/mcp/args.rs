//! The tools' arguments: each a JSON schema the model sees, its doc
//! comments the descriptions.

use std::collections::BTreeMap;

use rmcp::model::CallToolResult;
use rmcp::schemars;
use serde::Deserialize;

use super::invalid;

fn default_work_dir() -> String {
    "/work".into()
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub(super) struct CreateVesselArgs {
    /// The image to build the workspace from, as `list_images` shows it (e.g. `local/busybox:latest`).
    pub(super) image: String,
    /// The directory relative paths and commands start in; created when missing.
    #[serde(default = "default_work_dir")]
    pub(super) work_dir: String,
    /// Memory of each command, e.g. `512m` or `2g`.
    pub(super) memory: Option<String>,
    /// CPUs of each command, e.g. 0.5 or 2.
    pub(super) cpus: Option<f64>,
    /// Processes and threads of each command.
    pub(super) pids: Option<i64>,
    /// What the workspace may write to disk, e.g. `2g`.
    pub(super) disk: Option<String>,
    /// A name for it (letters, digits, `_.-`; unique), shown by `list_vessels`.
    pub(super) name: Option<String>,
    /// What its commands may reach: `none` (loopback only; the default),
    /// `allow` (only what `allow` lists) or `open` (public internet; never
    /// the host, private or link-local addresses or other workspaces).
    pub(super) network: Option<String>,
    /// Allowed destinations: domains (`pypi.org`, `*.pythonhosted.org`),
    /// addresses or CIDRs, optionally with a port (`10.1.2.0/24:443`).
    #[serde(default)]
    pub(super) allow: Vec<String>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub(super) struct SetNetworkArgs {
    /// The vessel's id.
    pub(super) vessel_id: String,
    /// `none`, `allow` or `open` (default `allow` when `allow` is given).
    pub(super) network: Option<String>,
    /// Allowed destinations, as `create_vessel` takes them.
    #[serde(default)]
    pub(super) allow: Vec<String>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub(super) struct PublishArgs {
    /// The vessel's id.
    pub(super) vessel_id: String,
    /// The TCP port a server listens on inside the workspace.
    pub(super) port: u16,
    /// Stop publishing it instead.
    #[serde(default)]
    pub(super) remove: bool,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub(super) struct VesselArgs {
    /// The vessel's id, as `create_vessel` or `list_vessels` gave it.
    pub(super) vessel_id: String,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub(super) struct ExecArgs {
    /// The vessel's id.
    pub(super) vessel_id: String,
    /// The program and its arguments, e.g. `["ls", "-la"]`. Give this or `shell`.
    pub(super) command: Option<Vec<String>>,
    /// A shell command line run with `/bin/sh -c`, e.g. `make test 2>&1 | tail`. Give this or `command`.
    pub(super) shell: Option<String>,
    /// The directory to run in (default: the vessel's work dir).
    pub(super) cwd: Option<String>,
    /// Extra environment variables.
    #[serde(default)]
    pub(super) env: BTreeMap<String, String>,
    /// Text given to the command's standard input (it sees end-of-file after it).
    pub(super) stdin: Option<String>,
    /// Kill the command after this many seconds (default: the server's, 300 unless set).
    pub(super) timeout_seconds: Option<f64>,
    /// Keep the command's file changes (default true). With false it runs on a throwaway copy.
    #[serde(default = "yes")]
    pub(super) persist: bool,
    /// Start it in the background and return its process_id at once (a server, a watcher):
    /// read its output with read_process_output. No timeout unless timeout_seconds is given.
    #[serde(default)]
    pub(super) background: bool,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub(super) enum Encoding {
    /// UTF-8 text.
    Text,
    /// Bytes as standard base64.
    Base64,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub(super) struct ReadFileArgs {
    /// The vessel's id.
    pub(super) vessel_id: String,
    /// The file, absolute or relative to the work dir.
    pub(super) path: String,
    /// How to return the content: `text`, `base64`; by default text when it is UTF-8, else base64.
    pub(super) encoding: Option<Encoding>,
    /// Start at this byte (default 0).
    #[serde(default)]
    pub(super) offset: u64,
    /// Read at most this many bytes (default and maximum: the server's limit, 1 MiB unless set).
    pub(super) length: Option<u64>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub(super) struct WriteFileArgs {
    /// The vessel's id.
    pub(super) vessel_id: String,
    /// The file, absolute or relative to the work dir; missing parent directories are created.
    pub(super) path: String,
    /// The new content (replaces the file's).
    pub(super) content: String,
    /// How `content` is encoded: `text` (default) or `base64`.
    pub(super) encoding: Option<Encoding>,
    /// Permission bits of a new file, octal, e.g. `644` or `755` (default 644).
    pub(super) mode: Option<String>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub(super) struct PathArgs {
    /// The vessel's id.
    pub(super) vessel_id: String,
    /// The path, absolute or relative to the work dir (default: the work dir).
    #[serde(default)]
    pub(super) path: String,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub(super) struct DeleteFileArgs {
    /// The vessel's id.
    pub(super) vessel_id: String,
    /// The file, symlink or directory to delete.
    pub(super) path: String,
    /// Delete a directory with everything in it (default: only empty ones).
    #[serde(default)]
    pub(super) recursive: bool,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub(super) struct MoveFileArgs {
    /// The vessel's id.
    pub(super) vessel_id: String,
    /// What to move.
    pub(super) from: String,
    /// Where to; replaces a file there.
    pub(super) to: String,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub(super) struct CreateSnapshotArgs {
    /// The vessel's id.
    pub(super) vessel_id: String,
    /// What the snapshot holds, e.g. `tests pass`.
    #[serde(default)]
    pub(super) message: String,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub(super) struct SnapshotArgs {
    /// The vessel's id.
    pub(super) vessel_id: String,
    /// The snapshot's id, as `create_snapshot` or `list_snapshots` gave it.
    pub(super) snapshot_id: String,
}

pub(super) fn size_arg(name: &str, v: &Option<String>) -> std::result::Result<Option<u64>, CallToolResult> {
    v.as_deref().map(|s| crate::parse_size(s).map_err(|e| invalid(format!("{name}: {e}")))).transpose()
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub(super) struct ReadOutputArgs {
    /// The vessel's id.
    pub(super) vessel_id: String,
    /// The process, as `exec` with `background: true` or `list_processes` gave it.
    pub(super) process_id: u64,
    /// `stdout` (default) or `stderr`.
    pub(super) stream: Option<String>,
    /// Where to read from (default 0; pass the last `next_offset` to continue).
    pub(super) offset: Option<u64>,
    /// Bytes to return at most (default and most: the server's output cap).
    pub(super) max_bytes: Option<u64>,
    /// Wait up to this many seconds for output past `offset` while the process runs (default 0).
    pub(super) wait_seconds: Option<f64>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub(super) struct WriteStdinArgs {
    /// The vessel's id.
    pub(super) vessel_id: String,
    /// The process.
    pub(super) process_id: u64,
    /// Text to write.
    #[serde(default)]
    pub(super) data: String,
    /// Close its stdin after the text (end-of-file).
    #[serde(default)]
    pub(super) close: bool,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub(super) struct KillProcessArgs {
    /// The vessel's id.
    pub(super) vessel_id: String,
    /// The process.
    pub(super) process_id: u64,
    /// `TERM` (default), `KILL`, `INT`, `HUP`, `QUIT`, `USR1`, `USR2` or a number.
    pub(super) signal: Option<String>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub(super) struct WaitProcessArgs {
    /// The vessel's id.
    pub(super) vessel_id: String,
    /// The process.
    pub(super) process_id: u64,
    /// Wait at most this many seconds (default 30).
    pub(super) timeout_seconds: Option<f64>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub(super) struct ForkArgs {
    /// The vessel to fork.
    pub(super) vessel_id: String,
    /// Fork this snapshot of it; without, its current state (snapshotted
    /// first, running processes keep running; they are not copied).
    pub(super) snapshot_id: Option<String>,
    /// How many vessels to make (1 to 100; default 1).
    pub(super) count: Option<usize>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub(super) struct ChangesArgs {
    /// The vessel.
    pub(super) vessel_id: String,
    /// Changes since this snapshot (default: the current one).
    pub(super) since: Option<String>,
    /// Up to this snapshot instead of the vessel's present state (needs `since`).
    pub(super) to: Option<String>,
    /// Return at most this many changes (default 1000).
    pub(super) max_changes: Option<usize>,
}
