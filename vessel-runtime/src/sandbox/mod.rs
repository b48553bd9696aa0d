//! Live sandboxes: one long-lived container per open vessel that commands
//! join, instead of a container per command.
//!
//! The container's init is vessel's agent (`sandbox/agent.c`, a static
//! program built with this crate and bind-mounted read-only at
//! [`AGENT_PATH`]). It is an ordinary run of the backend ([`Runtime::run_outcome`])
//! whose stdin and stdout are the control channel, so every backend
//! (youki's runner, containerd's task) and every guarantee of a run (the
//! same spec: user namespace, seccomp, capabilities, device rules, masked
//! paths, limits; the runner's or watchdog's cleanup when the caller dies)
//! hold unchanged. A command is a fork and exec of the agent: it inherits
//! the container's isolation and costs no container creation.
//!
//! Who holds what: the [`Sandbox`] value (in the facade, one per open
//! vessel) owns the run's task; dropping it drops the run, which kills the
//! container's whole process tree as dropping any run does, and a dead
//! caller is cleaned up by the backend exactly as for any run. The agent
//! also ends the sandbox when its control channel closes.

mod protocol;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncWriteExt, DuplexStream};
use tokio::sync::{mpsc, oneshot};

pub use protocol::ProcessSpec;
use protocol::{Event, Request};

use crate::{RunOutcome, RunRequest, Runtime, RuntimeError};

/// Where the agent is mounted in the container: on `/dev`, a tmpfs of the
/// runtime's, so its mount point never reaches the vessel's upper dir.
pub const AGENT_PATH: &str = "/dev/.vessel-agent";

/// The agent program.
static AGENT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/vessel-agent"));

/// How long a sandbox may take to start before it is given up.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Events queued per process before the reader waits for its consumer.
const EVENTS_QUEUED: usize = 256;

/// Writes the agent into `dir` (once per build: its name carries a hash of
/// its bytes) and returns its path.
pub fn install_agent(dir: &Path) -> Result<PathBuf, RuntimeError> {
    use sha2::Digest;
    let hash = format!("{:x}", sha2::Sha256::digest(AGENT));
    let path = dir.join(format!("vessel-agent-{}", &hash[..16]));
    if path.exists() {
        return Ok(path);
    }
    // Written unnamed (O_TMPFILE) and linked in whole: a process killed
    // part way leaves nothing in `dir`.
    use rustix::fs::{AtFlags, CWD, Mode, OFlags};
    let io = |op| RuntimeError::io(op, dir);
    let fd = rustix::fs::open(dir, OFlags::TMPFILE | OFlags::WRONLY | OFlags::CLOEXEC, Mode::from_raw_mode(0o755))
        .map_err(|e| io("create")(e.into()))?;
    let mut f = std::fs::File::from(fd);
    std::io::Write::write_all(&mut f, AGENT).map_err(io("write"))?;
    f.sync_all().map_err(io("sync"))?;
    match rustix::fs::linkat(CWD, crate::idmap::fd_path(&f).as_str(), CWD, &path, AtFlags::SYMLINK_FOLLOW) {
        // Another process installed the same bytes first.
        Ok(()) | Err(rustix::io::Errno::EXIST) => {}
        Err(e) => return Err(RuntimeError::io("link", &path)(e.into())),
    }
    Ok(path)
}

/// How a process in a sandbox ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessExit {
    /// Its exit code; `128 + N` when signal `N` ended it.
    pub code: i32,
    /// The signal that ended it, if one did.
    pub signal: Option<i32>,
    /// Whether the OOM killer killed a process of the sandbox while it ran.
    pub oom_killed: bool,
    /// The sandbox ended under it (closed, or its container died): killed.
    pub sandbox_ended: bool,
}

/// What a process in a sandbox produced.
#[derive(Debug, PartialEq, Eq)]
pub enum ProcessEvent {
    /// Bytes of its stdout (or its terminal).
    Stdout(Vec<u8>),
    /// Bytes of its stderr.
    Stderr(Vec<u8>),
    /// It ended; no event follows.
    Exited(ProcessExit),
}

/// Where the reader sends one process's events.
struct Route {
    events: mpsc::Sender<ProcessEvent>,
    acks: mpsc::UnboundedSender<()>,
    oom_at_start: u64,
    started: Option<oneshot::Sender<Result<u32, i32>>>,
}

/// What the sandbox's handles share.
struct Shared {
    /// The agent's control channel; `None` once the sandbox ended.
    to_agent: tokio::sync::Mutex<Option<DuplexStream>>,
    routes: Mutex<HashMap<u32, Route>>,
    /// Who waits for a freeze or thaw to be done.
    control: Mutex<Option<oneshot::Sender<()>>>,
    next_id: AtomicU32,
    ended: tokio::sync::watch::Sender<bool>,
    /// The run, as the backend told it: OOM kills counted on the host
    /// (the agent's own count is the fallback).
    run: Option<crate::RunInfo>,
}

impl Shared {
    async fn send(&self, req: Request<'_>) -> Result<(), RuntimeError> {
        let bytes = req.encode()?;
        let mut to = self.to_agent.lock().await;
        let Some(w) = to.as_mut() else { return Err(ended()) };
        w.write_all(&bytes).await.map_err(|_| ended())
    }

    /// The sandbox is gone: every process still running ends as killed.
    fn end(&self) {
        let routes: Vec<Route> =
            self.routes.lock().unwrap_or_else(|p| p.into_inner()).drain().map(|(_, r)| r).collect();
        for r in routes {
            let exit = ProcessExit { code: 137, signal: Some(9), oom_killed: false, sandbox_ended: true };
            if let Err(mpsc::error::TrySendError::Full(last)) = r.events.try_send(ProcessEvent::Exited(exit)) {
                // Its consumer lags: the end follows the output queued before it.
                if let Ok(rt) = tokio::runtime::Handle::try_current() {
                    let tx = r.events.clone();
                    rt.spawn(async move { tx.send(last).await });
                }
            }
            if let Some(s) = r.started {
                let _ = s.send(Err(nix::libc::ECHILD));
            }
        }
        if let Some(c) = self.control.lock().unwrap_or_else(|p| p.into_inner()).take() {
            drop(c);
        }
        self.ended.send_replace(true);
    }
}

fn ended() -> RuntimeError {
    RuntimeError::SandboxEnded
}

/// A live sandbox; see the module docs.
pub struct Sandbox {
    shared: Arc<Shared>,
    run: tokio::task::JoinHandle<Result<RunOutcome, RuntimeError>>,
    reader: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandbox").field("ended", &*self.shared.ended.borrow()).finish_non_exhaustive()
    }
}

impl Sandbox {
    /// Starts a sandbox: `req` as for any run (rootfs, ids, limits, binds),
    /// its command, stdio and terminal set here; `agent` from [`install_agent`].
    pub async fn start(
        runtime: Arc<dyn Runtime>,
        mut req: RunRequest<'static>,
        agent: &Path,
    ) -> Result<Self, RuntimeError> {
        let (host_w, agent_in) = tokio::io::duplex(256 << 10);
        let (agent_out, mut host_r) = tokio::io::duplex(256 << 10);
        req.args = vec![AGENT_PATH.into()];
        req.ro_binds.push((agent.to_path_buf(), AGENT_PATH.into()));
        req.tty = None;
        req.stdin = Some(Box::new(agent_in));
        req.stdout = Some(Box::new(agent_out));
        req.stderr = None;
        let (tell, mut told) = oneshot::channel();
        req.on_start = Some(tell);
        // The agent runs as the container's root: it becomes each command's user.
        (req.uid, req.gid, req.additional_gids) = (0, 0, Vec::new());
        let run = tokio::spawn(async move { runtime.run_outcome(req).await });
        let hello = tokio::time::timeout(START_TIMEOUT, protocol::read_event(&mut host_r)).await;
        let version = match hello {
            Ok(Ok(Some(Event::Hello { version }))) => version,
            other => {
                // The run's own error explains a sandbox that never spoke best.
                run.abort();
                let outcome = run.await;
                return Err(match (outcome, other) {
                    (Ok(Err(e)), _) => e,
                    (_, Err(_)) => RuntimeError::SandboxStart("the agent did not start in time".into()),
                    (_, Ok(r)) => RuntimeError::SandboxStart(format!("the agent's first word was {r:?}")),
                });
            }
        };
        if version != protocol::AGENT_VERSION {
            run.abort();
            return Err(RuntimeError::SandboxStart(format!(
                "the agent speaks version {version}, this build {}",
                protocol::AGENT_VERSION
            )));
        }
        let shared = Arc::new(Shared {
            to_agent: tokio::sync::Mutex::new(Some(host_w)),
            routes: Mutex::new(HashMap::new()),
            control: Mutex::new(None),
            next_id: AtomicU32::new(1),
            ended: tokio::sync::watch::channel(false).0,
            run: told.try_recv().ok(),
        });
        let reader = tokio::spawn(read_events(host_r, shared.clone()));
        Ok(Self { shared, run, reader })
    }

    /// Whether the sandbox still runs.
    pub fn is_running(&self) -> bool {
        !*self.shared.ended.borrow()
    }

    /// Starts `spec` in the sandbox.
    pub async fn spawn(&self, spec: &ProcessSpec) -> Result<SandboxProcess, RuntimeError> {
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let (events_tx, events) = mpsc::channel(EVENTS_QUEUED);
        let (acks_tx, acks) = mpsc::unbounded_channel();
        let (started_tx, started) = oneshot::channel();
        self.shared
            .routes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, Route { events: events_tx, acks: acks_tx, oom_at_start: 0, started: Some(started_tx) });
        if let Err(e) = self.shared.send(Request::Spawn(id, spec)).await {
            self.shared.routes.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
            return Err(e);
        }
        match started.await {
            Ok(Ok(pid)) => {
                let control = ProcessControl { id, shared: self.shared.clone() };
                Ok(SandboxProcess { pid, events, stdin: StdinWriter { control: control.clone(), acks }, control })
            }
            Ok(Err(errno)) if errno == nix::libc::ECHILD => Err(ended()),
            Ok(Err(errno)) => {
                let command = spec.args.first().cloned().unwrap_or_default();
                let message = nix::errno::Errno::from_raw(errno).desc();
                Err(crate::error::start_failure(&command, &format!("exec {command}: {message}")))
            }
            Err(_) => Err(ended()),
        }
    }

    /// Stops every process but the agent (`SIGSTOP`, then waits until each
    /// is stopped), so the filesystem holds still.
    pub async fn freeze(&self) -> Result<(), RuntimeError> {
        self.control(Request::Freeze).await
    }

    /// Lets the processes [`Sandbox::freeze`] stopped run again.
    pub async fn thaw(&self) -> Result<(), RuntimeError> {
        self.control(Request::Thaw).await
    }

    async fn control(&self, req: Request<'_>) -> Result<(), RuntimeError> {
        let (tx, rx) = oneshot::channel();
        *self.shared.control.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
        self.shared.send(req).await?;
        rx.await.map_err(|_| ended())
    }

    /// Ends the sandbox: every process is killed (each reported as ended
    /// with the sandbox), the container removed; returns when it is gone.
    pub async fn stop(&mut self) -> Result<(), RuntimeError> {
        let _ = self.shared.send(Request::Quit).await;
        // The agent exits; its end of the channel closes, the run finishes.
        let run = &mut self.run;
        let outcome = match tokio::time::timeout(Duration::from_secs(10), &mut *run).await {
            Ok(joined) => joined.map_err(|e| RuntimeError::SandboxStart(format!("the sandbox task: {e}")))?,
            Err(_) => {
                run.abort();
                let _ = (&mut *run).await;
                Err(ended())
            }
        };
        let _ = (&mut self.reader).await;
        self.shared.end();
        outcome.map(drop).or_else(|e| if matches!(e, RuntimeError::SandboxEnded) { Ok(()) } else { Err(e) })
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        // Dropping the run kills the container's whole tree.
        self.run.abort();
        self.reader.abort();
        self.shared.end();
    }
}

/// Reads the agent's events and routes them until it is gone.
async fn read_events(mut from: DuplexStream, shared: Arc<Shared>) {
    loop {
        let event = match protocol::read_event(&mut from).await {
            Ok(Some(e)) => e,
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(error = %e, "the sandbox agent sent a bad frame: ending the sandbox");
                break;
            }
        };
        match event {
            Event::Hello { .. } => {}
            Event::Started { id, pid, oom_kills } => {
                let oom_kills = shared.run.as_ref().map_or(oom_kills, crate::RunInfo::oom_kills);
                let mut routes = shared.routes.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(r) = routes.get_mut(&id) {
                    r.oom_at_start = oom_kills;
                    if let Some(s) = r.started.take() {
                        let _ = s.send(Ok(pid));
                    }
                }
            }
            Event::StartFailed { id, errno } => {
                let route = shared.routes.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
                if let Some(s) = route.and_then(|mut r| r.started.take()) {
                    let _ = s.send(Err(errno));
                }
            }
            Event::Output { id, stderr, data } => {
                if data.is_empty() {
                    continue;
                }
                let tx = shared.routes.lock().unwrap_or_else(|p| p.into_inner()).get(&id).map(|r| r.events.clone());
                if let Some(tx) = tx {
                    let _ = tx.send(if stderr { ProcessEvent::Stderr(data) } else { ProcessEvent::Stdout(data) }).await;
                }
            }
            Event::Exited { id, wait_status, oom_kills } => {
                let oom_kills = shared.run.as_ref().map_or(oom_kills, crate::RunInfo::oom_kills);
                let route = shared.routes.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
                if let Some(r) = route {
                    let (code, signal) = decode_wait_status(wait_status);
                    let exit =
                        ProcessExit { code, signal, oom_killed: oom_kills > r.oom_at_start, sandbox_ended: false };
                    let _ = r.events.send(ProcessEvent::Exited(exit)).await;
                }
            }
            Event::Ack { id } => {
                if let Some(r) = shared.routes.lock().unwrap_or_else(|p| p.into_inner()).get(&id) {
                    let _ = r.acks.send(());
                }
            }
            Event::Frozen | Event::Thawed => {
                if let Some(c) = shared.control.lock().unwrap_or_else(|p| p.into_inner()).take() {
                    let _ = c.send(());
                }
            }
        }
    }
    // The agent is gone: its input closes (so the run can finish).
    shared.to_agent.lock().await.take();
    shared.end();
}

/// A wait(2) status as an exit code (`128 + N` for signal `N`) and the signal.
fn decode_wait_status(status: i32) -> (i32, Option<i32>) {
    let (code, signal) = (status >> 8 & 0xff, status & 0x7f);
    if signal == 0 { (code, None) } else { (128 + signal, Some(signal)) }
}

/// Signals one process of a sandbox (its whole process group).
#[derive(Clone)]
pub struct ProcessControl {
    id: u32,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for ProcessControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessControl").field("id", &self.id).finish_non_exhaustive()
    }
}

impl ProcessControl {
    /// Sends `signal` to the process and its process group.
    pub async fn signal(&self, signal: i32) -> Result<(), RuntimeError> {
        self.shared.send(Request::Signal(self.id, signal)).await
    }
}

/// Feeds a sandbox process's stdin, one chunk in flight.
#[derive(Debug)]
pub struct StdinWriter {
    control: ProcessControl,
    acks: mpsc::UnboundedReceiver<()>,
}

impl StdinWriter {
    /// Writes `data`, waiting until the process took each chunk (or
    /// stopped reading: then the rest is dropped, as a pipe would).
    pub async fn write(&mut self, data: &[u8]) -> Result<(), RuntimeError> {
        for chunk in data.chunks(protocol::STDIN_CHUNK) {
            self.control.shared.send(Request::Stdin(self.control.id, chunk)).await?;
            if self.acks.recv().await.is_none() {
                return Err(ended());
            }
        }
        Ok(())
    }

    /// Closes the process's stdin (end of file).
    pub async fn close(&mut self) -> Result<(), RuntimeError> {
        self.control.shared.send(Request::CloseStdin(self.control.id)).await
    }
}

/// A process started in a sandbox.
#[derive(Debug)]
pub struct SandboxProcess {
    /// Its pid in the sandbox.
    pub pid: u32,
    /// Its output, then its end.
    pub events: mpsc::Receiver<ProcessEvent>,
    /// Its stdin (when asked for).
    pub stdin: StdinWriter,
    /// Signals it.
    pub control: ProcessControl,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_statuses_read_as_a_shell_reports_them() {
        assert_eq!(decode_wait_status(0), (0, None));
        assert_eq!(decode_wait_status(3 << 8), (3, None));
        assert_eq!(decode_wait_status(9), (137, Some(9)));
        assert_eq!(decode_wait_status(15 | 0x80), (143, Some(15)));
    }

    #[test]
    fn the_agent_is_installed_once_per_build() {
        let dir = tempfile::tempdir().unwrap();
        let a = install_agent(dir.path()).unwrap();
        let b = install_agent(dir.path()).unwrap();
        assert_eq!(a, b);
        assert_eq!(std::fs::read(&a).unwrap(), AGENT);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
