//! The tools: one method per tool, each a vessel call whose failure comes
//! back as a tool error.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use base64::Engine as _;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{Implementation, ServerCapabilities, ServerConfig};
use rmcp::{ServerHandler, tool, tool_handler, tool_router};
use serde_json::{Value, json};
use tokio::io::AsyncWrite;
use tokio_util::sync::CancellationToken;
use vessel::{ExecOptions, FileInfo, FileType, OpenFlags, SnapshotId, Vessel, VesselError};

use super::args::*;
use super::{ToolResult, Tools, failure, invalid, ok};
use crate::view::{ExecView, OutputView, SnapshotView, VesselView};

fn info_json(i: &FileInfo) -> Value {
    let modified = chrono::DateTime::<chrono::Utc>::from(i.modified).to_rfc3339();
    json!({
        "name": i.name,
        "type": match i.file_type { FileType::File => "file", FileType::Dir => "dir", FileType::Symlink => "symlink", _ => "other" },
        "size": i.size,
        "mode": format!("{:o}", i.mode),
        "uid": i.uid,
        "gid": i.gid,
        "modified": modified,
    })
}

#[tool_router(vis = "pub(super)")]
impl Tools {
    #[tool(description = "Create a workspace (a vessel) from an image and open it. Returns its vessel_id, which \
        every other tool takes. The new vessel's first snapshot is its initial state.")]
    async fn create_vessel(&self, Parameters(a): Parameters<CreateVesselArgs>) -> ToolResult {
        let mut opts = crate::vessel_options(
            a.name.as_deref(),
            size_arg("memory", &a.memory)?,
            a.cpus,
            a.pids,
            size_arg("disk", &a.disk)?,
        );
        if let Some(p) = super::network::policy_arg(a.network.clone(), &a.allow)? {
            opts = opts.network(p);
        }
        let v = self.state.mgr.create_vessel_with(&a.image, &a.work_dir, &opts).await.map_err(failure)?;
        let snap = match v.create_snapshot("create").await {
            Ok(s) => s,
            Err(e) => {
                let id = v.id().to_string();
                let _ = v.close().await;
                let _ = self.state.mgr.delete_vessel(&id).await;
                return Err(failure(e));
            }
        };
        let m = v.manifest();
        self.state.open.lock().await.insert(v.id().to_string(), Arc::new(v));
        let mut view = json!(VesselView::of(&m));
        view["snapshot_id"] = snap.id.as_str().into();
        ok(view)
    }

    #[tool(description = "List the workspaces in storage: id, image, current snapshot, snapshot count, and \
        whether this server has it open.")]
    async fn list_vessels(&self) -> ToolResult {
        let all = self.state.mgr.list_vessels().await.map_err(failure)?;
        let open = self.state.open.lock().await;
        ok(
            json!({ "vessels": all.iter().map(|m| VesselView { open_here: Some(open.contains_key(m.id.as_str())), ..VesselView::of(m) }).collect::<Vec<_>>() }),
        )
    }

    #[tool(description = "List the images vessels can be created from.")]
    async fn list_images(&self) -> ToolResult {
        let images = self.state.mgr.storage().list_images().await.map_err(failure)?;
        ok(json!({ "images": images.iter().map(|i| i.to_string()).collect::<Vec<_>>() }))
    }

    #[tool(description = "Delete a workspace and all its snapshots, for good.")]
    async fn delete_vessel(&self, Parameters(a): Parameters<VesselArgs>) -> ToolResult {
        if let Some(v) = self.state.open.lock().await.remove(&a.vessel_id) {
            v.close().await.map_err(failure)?;
        }
        self.state.mgr.delete_vessel(&a.vessel_id).await.map_err(failure)?;
        ok(json!({ "deleted": a.vessel_id }))
    }

    #[tool(description = "Run a command in a workspace and wait for it. Give `command` (argv) or `shell` (a \
        /bin/sh command line). Returns exit_code (127: not found, 137: killed), timed_out, oom_killed, \
        duration_ms, stdout and stderr; output beyond the server's cap keeps its start and end around a \
        `[vessel: ... truncated ...]` marker. File changes are kept unless persist is false; snapshot to make \
        them durable. With background: true it starts and returns a process_id at once (servers, watchers): \
        see list_processes, read_process_output, write_process_stdin, kill_process, wait_process; it runs \
        until it ends, is killed, or the workspace is restored or closed.")]
    async fn exec(&self, Parameters(a): Parameters<ExecArgs>, ct: CancellationToken) -> ToolResult {
        let command = match (a.command, a.shell) {
            (Some(c), None) if !c.is_empty() => c,
            (None, Some(s)) => vec!["/bin/sh".into(), "-c".into(), s],
            (Some(_), None) => return Err(invalid("command is empty")),
            (Some(_), Some(_)) => return Err(invalid("give command or shell, not both")),
            (None, None) => return Err(invalid("give command (argv) or shell (a command line)")),
        };
        let timeout = match a.timeout_seconds {
            None => self.state.options.exec_timeout,
            Some(s) if s > 0.0 && s.is_finite() => {
                Duration::try_from_secs_f64(s).map_err(|e| invalid(format!("timeout_seconds: {e}")))?
            }
            Some(s) => return Err(invalid(format!("timeout_seconds must be more than 0, not {s}"))),
        };
        let env = a
            .env
            .into_iter()
            .map(|(k, v)| {
                if k.is_empty() || k.contains('=') {
                    Err(invalid(format!("bad env name {k:?}")))
                } else {
                    Ok(format!("{k}={v}"))
                }
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let v = self.vessel(&a.vessel_id).await?;
        if a.background {
            if !a.persist {
                return Err(invalid("a background process keeps its changes: persist must be true"));
            }
            let p = v
                .spawn(ExecOptions {
                    command,
                    work_dir: a.cwd,
                    env,
                    persist_result: true,
                    timeout: a.timeout_seconds.map(|_| timeout),
                    ..Default::default()
                })
                .await
                .map_err(failure)?;
            if let Some(text) = a.stdin {
                p.write_stdin(text.as_bytes()).await.map_err(failure)?;
                p.close_stdin().await.map_err(failure)?;
            }
            return ok(json!(crate::view::ProcessView::of(&p.info())));
        }
        let cap = self.state.options.max_output;
        let (mut out, mut err) = (Capture::new(cap), Capture::new(cap));
        let stdin = a
            .stdin
            .map(|s| Box::new(std::io::Cursor::new(s.into_bytes())) as Box<dyn tokio::io::AsyncRead + Send + Unpin>);
        let started = Instant::now();
        let run = v.exec(ExecOptions {
            command,
            work_dir: a.cwd,
            env,
            stdin,
            stdout: Some(Box::new(&mut out)),
            stderr: Some(Box::new(&mut err)),
            persist_result: a.persist,
            timeout: Some(timeout),
            ..Default::default()
        });
        // A cancelled call drops the exec, which kills its process tree.
        let res = tokio::select! {
            r = run => r.map_err(failure)?,
            () = ct.cancelled() => return Err(invalid("cancelled: the command was killed")),
        };
        let output = OutputView {
            stdout: out.text(),
            stderr: err.text(),
            stdout_bytes: out.total,
            stderr_bytes: err.total,
            truncated: out.truncated() || err.truncated(),
        };
        ok(json!(ExecView { output: Some(output), ..ExecView::of(&res, started.elapsed()) }))
    }

    #[tool(description = "Read a file of a workspace. Text comes back as is; other bytes as base64 (see `encoding`). \
        Large files: read a window with offset and length.")]
    async fn read_file(&self, Parameters(a): Parameters<ReadFileArgs>) -> ToolResult {
        let v = self.vessel(&a.vessel_id).await?;
        let max = self.state.options.max_read;
        let want = a.length.unwrap_or(max).min(max);
        let f = v.open_file(&a.path, OpenFlags::O_RDONLY, 0).map_err(failure)?;
        let size = f.stat().map_err(failure)?.size;
        let mut data = vec![0u8; usize::try_from(want.min(size.saturating_sub(a.offset))).unwrap_or(0)];
        let mut got = 0;
        while got < data.len() {
            let n = f.read_at(&mut data[got..], a.offset + got as u64).map_err(failure)?;
            if n == 0 {
                break;
            }
            got += n;
        }
        data.truncate(got);
        let (encoding, content) = match (a.encoding, String::from_utf8(data)) {
            (Some(Encoding::Base64), Ok(s)) => ("base64", base64::engine::general_purpose::STANDARD.encode(s)),
            (Some(Encoding::Base64) | None, Err(e)) => {
                ("base64", base64::engine::general_purpose::STANDARD.encode(e.into_bytes()))
            }
            (Some(Encoding::Text), Err(e)) => {
                return Err(invalid(format!(
                    "{} is not UTF-8 text (at byte {}): read it with encoding base64",
                    a.path,
                    a.offset + e.utf8_error().valid_up_to() as u64
                )));
            }
            (_, Ok(s)) => ("text", s),
        };
        let end = a.offset + got as u64;
        ok(json!({ "path": a.path, "size": size, "offset": a.offset, "length": got, "encoding": encoding,
                   "content": content, "more": end < size }))
    }

    #[tool(description = "Create or replace a file of a workspace (missing parent directories are created). \
        Content is text, or base64 with encoding base64.")]
    async fn write_file(&self, Parameters(a): Parameters<WriteFileArgs>) -> ToolResult {
        let data = match a.encoding {
            Some(Encoding::Base64) => base64::engine::general_purpose::STANDARD
                .decode(a.content.as_bytes())
                .map_err(|e| invalid(format!("content is not base64: {e}")))?,
            _ => a.content.into_bytes(),
        };
        let mode = match a.mode.as_deref() {
            None => 0o644,
            Some(m) => match u32::from_str_radix(m, 8) {
                Ok(b) if b <= 0o7777 => b,
                _ => return Err(invalid(format!("mode {m:?} is not octal permission bits such as 644"))),
            },
        };
        let v = self.vessel(&a.vessel_id).await?;
        if let Some((parent, _)) = a.path.trim_end_matches('/').rsplit_once('/')
            && !parent.is_empty()
        {
            v.make_dir_all(parent, 0o755).map_err(failure)?;
        }
        v.write_file(&a.path, &data, mode).map_err(failure)?;
        ok(json!({ "path": a.path, "bytes": data.len() }))
    }

    #[tool(description = "List a directory of a workspace: each entry's name, type, size, mode (octal), owner \
        and modification time. Symlinks are listed, not followed.")]
    async fn list_dir(&self, Parameters(a): Parameters<PathArgs>) -> ToolResult {
        let v = self.vessel(&a.vessel_id).await?;
        let entries = v.read_dir(&a.path).map_err(failure)?;
        ok(json!({ "path": a.path, "entries": entries.iter().map(info_json).collect::<Vec<_>>() }))
    }

    #[tool(description = "A file's metadata in a workspace (following symlinks inside it): type, size, mode, \
        owner, modification time.")]
    async fn stat(&self, Parameters(a): Parameters<PathArgs>) -> ToolResult {
        let v = self.vessel(&a.vessel_id).await?;
        ok(info_json(&v.stat(&a.path).map_err(failure)?))
    }

    #[tool(description = "Delete a file, symlink or empty directory of a workspace; a directory with its \
        contents with recursive true.")]
    async fn delete_file(&self, Parameters(a): Parameters<DeleteFileArgs>) -> ToolResult {
        let v = self.vessel(&a.vessel_id).await?;
        if a.recursive {
            delete_tree(&v, &a.path).map_err(failure)?;
        } else {
            v.delete_file(&a.path).map_err(failure)?;
        }
        ok(json!({ "deleted": a.path }))
    }

    #[tool(description = "Move or rename a file or directory within a workspace.")]
    async fn move_file(&self, Parameters(a): Parameters<MoveFileArgs>) -> ToolResult {
        let v = self.vessel(&a.vessel_id).await?;
        v.rename_file(&a.from, &a.to).map_err(failure)?;
        ok(json!({ "from": a.from, "to": a.to }))
    }

    #[tool(description = "Snapshot a workspace's files as they are now (durable; costs what changed since the \
        last snapshot). Returns the snapshot_id to restore later. Snapshot before risky steps.")]
    async fn create_snapshot(&self, Parameters(a): Parameters<CreateSnapshotArgs>) -> ToolResult {
        let v = self.vessel(&a.vessel_id).await?;
        let s = v.create_snapshot(&a.message).await.map_err(failure)?;
        ok(json!(SnapshotView::of(&s)))
    }

    #[tool(description = "A workspace's snapshots as a tree (each with its parent, message, size and time), and \
        which one is current.")]
    async fn list_snapshots(&self, Parameters(a): Parameters<VesselArgs>) -> ToolResult {
        let v = self.vessel(&a.vessel_id).await?;
        let m = v.manifest();
        let current = m.current_snapshot_id.clone();
        let mut tree = String::new();
        for (depth, s) in m.tree() {
            let here = current.as_ref() == Some(&s.id);
            tree.push_str(&format!(
                "{}{} {:?}{}\n",
                "  ".repeat(depth),
                s.id,
                s.message,
                if here { "  <- current" } else { "" }
            ));
        }
        let list = SnapshotView::tree(&m);
        ok(json!({ "current_snapshot_id": current.as_ref().map(|s| s.as_str()), "tree": tree, "snapshots": list }))
    }

    #[tool(description = "Put a workspace's files back to a snapshot's state; changes since the current snapshot \
        are dropped. The snapshot becomes current, and later snapshots branch from it.")]
    async fn restore_snapshot(&self, Parameters(a): Parameters<SnapshotArgs>) -> ToolResult {
        let id = SnapshotId::new(&a.snapshot_id).map_err(|e| failure(VesselError::from(e)))?;
        let v = self.vessel(&a.vessel_id).await?;
        v.restore_snapshot(&id).await.map_err(failure)?;
        ok(json!({ "vessel_id": a.vessel_id, "current_snapshot_id": a.snapshot_id }))
    }

    #[tool(description = "Delete a snapshot that is neither current nor the parent of another.")]
    async fn delete_snapshot(&self, Parameters(a): Parameters<SnapshotArgs>) -> ToolResult {
        let id = SnapshotId::new(&a.snapshot_id).map_err(|e| failure(VesselError::from(e)))?;
        let v = self.vessel(&a.vessel_id).await?;
        v.delete_snapshot(&id).await.map_err(failure)?;
        ok(json!({ "deleted": a.snapshot_id }))
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for Tools {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("vessel", env!("CARGO_PKG_VERSION")))
            .with_instructions(
                "vessel gives you Linux workspaces (containers from OCI images) with cheap snapshots. \
                 create_vessel, then exec commands and use the file tools in it; create_snapshot before a risky \
                 step and restore_snapshot when it went wrong. Paths are inside the workspace; relative ones \
                 start at its work dir.",
            )
    }
}

/// Deletes `path` and, for a directory, everything under it, through the
/// vessel's confined file API (symlinks are removed, never followed).
fn delete_tree(v: &Vessel, path: &str) -> vessel::Result<()> {
    let info = v.read_dir(path);
    if let Ok(entries) = info {
        for e in entries {
            let child = format!("{}/{}", path.trim_end_matches('/'), e.name);
            if e.is_dir() { delete_tree(v, &child)? } else { v.delete_file(&child)? }
        }
    }
    v.delete_file(path)
}

/// Output kept for the model: the first and the last `cap / 2` bytes, and
/// the count of everything, so 100 MB of output costs `cap` of memory.
struct Capture {
    head: Vec<u8>,
    tail: Vec<u8>,
    half: usize,
    total: u64,
}

impl Capture {
    fn new(cap: usize) -> Self {
        Self { head: Vec::new(), tail: Vec::new(), half: cap / 2, total: 0 }
    }

    /// The last bytes kept, at most `half` (`tail` runs up to twice that).
    fn end(&self) -> &[u8] {
        &self.tail[self.tail.len().saturating_sub(self.half)..]
    }

    fn truncated(&self) -> bool {
        self.total > (self.head.len() + self.end().len()) as u64
    }

    fn text(&self) -> String {
        let mut s = String::from_utf8_lossy(&self.head).into_owned();
        if self.truncated() {
            s.push_str(&format!(
                "\n[vessel: output truncated: {} bytes in all; the first {} and the last {} are shown]\n",
                self.total,
                self.head.len(),
                self.end().len()
            ));
        }
        s.push_str(&String::from_utf8_lossy(self.end()));
        s
    }

    fn keep(&mut self, mut data: &[u8]) {
        self.total += data.len() as u64;
        let room = self.half.saturating_sub(self.head.len());
        let n = room.min(data.len());
        self.head.extend_from_slice(&data[..n]);
        data = &data[n..];
        if data.is_empty() {
            return;
        }
        if data.len() >= self.half {
            self.tail.clear();
            self.tail.extend_from_slice(&data[data.len() - self.half..]);
        } else {
            self.tail.extend_from_slice(data);
            // Trim in batches: amortised O(1) per byte.
            if self.tail.len() > 2 * self.half.max(1) {
                let cut = self.tail.len() - self.half;
                self.tail.drain(..cut);
            }
        }
    }
}

impl AsyncWrite for Capture {
    fn poll_write(mut self: Pin<&mut Self>, _: &mut TaskContext<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        self.keep(buf);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capture_keeps_the_start_and_the_end() {
        let mut c = Capture::new(8);
        for chunk in [&b"abc"[..], b"defgh", b"ijklmnop", b"qr"] {
            c.keep(chunk);
        }
        assert_eq!(c.total, 18);
        assert_eq!((c.head.as_slice(), c.end()), (&b"abcd"[..], &b"opqr"[..]));
        assert!(c.text().starts_with("abcd\n[vessel: output truncated: 18 bytes in all"));
        assert!(c.text().ends_with("]\nopqr"));
        let mut small = Capture::new(8);
        small.keep(b"hello");
        assert_eq!(small.text(), "hello");
        assert!(!small.truncated());
    }
}
