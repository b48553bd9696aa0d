//! The live sandbox of an open vessel and the processes that run in it.
//!
//! A vessel starts its sandbox (`vessel_runtime::sandbox`: one container
//! on the vessel's rootfs, with the vessel's ids and limits) on its first
//! exec or spawn, and stops it when it closes, restores a snapshot, or
//! snapshots with nothing running in the background. Commands join it
//! (fork and exec of the sandbox's agent), so a server started by
//! [`Vessel::spawn`] is reachable from a later [`Vessel::exec`] on
//! `127.0.0.1`, and a command costs no container creation.
//!
//! Background processes are kept in the vessel's process table (see `process`).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{Notify, watch};
use vessel_core::ExecOptions;
use vessel_core::sync::Locked;
use vessel_runtime::sandbox::{ProcessControl, ProcessEvent, ProcessSpec, Sandbox};

use super::process::{ENDED_KEPT, LiveProcess, ProcessHandle, ProcessInfo, ProcessStatus, StopReason, pump};
use super::{OpenVessel, Vessel};
use crate::error::{Result, VesselError};

/// Kills a foreground command's process group if its exec is dropped
/// (cancelled) before it ended.
struct KillOnDrop(Option<ProcessControl>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(c) = self.0.take()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            rt.spawn(async move {
                let _ = c.signal(9).await;
            });
        }
    }
}

/// When a vessel's sandbox was last used, for the idle pause: a command
/// starting or ending, a background process's output, a signal or input.
#[derive(Debug)]
pub(crate) struct Activity {
    origin: Instant,
    /// Milliseconds from `origin` to the last use.
    last: AtomicU64,
    /// Commands running in the foreground.
    busy: AtomicUsize,
    /// Counts sandbox starts: a watcher ends with its sandbox.
    generation: AtomicU64,
}

impl Default for Activity {
    fn default() -> Self {
        Self {
            origin: Instant::now(),
            last: AtomicU64::new(0),
            busy: AtomicUsize::new(0),
            generation: AtomicU64::new(0),
        }
    }
}

impl Activity {
    pub(crate) fn touch(&self) {
        let now = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.fetch_max(now, Ordering::Relaxed);
    }

    fn idle_for(&self, idle: Duration) -> bool {
        let last = Duration::from_millis(self.last.load(Ordering::Relaxed));
        self.busy.load(Ordering::Acquire) == 0 && self.origin.elapsed().saturating_sub(last) >= idle
    }

    /// Marks a foreground command running until the guard drops.
    fn enter(self: &Arc<Self>) -> Busy {
        self.busy.fetch_add(1, Ordering::AcqRel);
        self.touch();
        Busy(self.clone())
    }
}

/// A foreground command in the sandbox (see [`Activity::enter`]).
struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.touch();
        self.0.busy.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Pauses the sandbox of `generation` whenever it has been idle for
/// `idle`; ends with the sandbox or the vessel.
async fn idle_watch(v: Weak<OpenVessel>, idle: Duration, generation: u64) {
    let tick = (idle / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
    loop {
        tokio::time::sleep(tick).await;
        let Some(v) = v.upgrade() else { return };
        if v.activity.generation.load(Ordering::Acquire) != generation {
            return;
        }
        if v.is_paused() || !v.activity.idle_for(idle) {
            continue;
        }
        // Decided under the sandbox's lock, which a command takes (after
        // marking itself busy) to join: it then finds the pause and ends it.
        let live = v.live.lock().await;
        match live.as_ref() {
            Some(s) if s.is_running() => {
                if v.activity.idle_for(idle) && s.freeze().await.is_ok() {
                    v.paused.store(true, Ordering::Release);
                    tracing::debug!(vessel = %v.id, "paused after {idle:?} idle");
                }
            }
            _ => return,
        }
    }
}

impl OpenVessel {
    /// Starts `spec` in the vessel's sandbox, starting the sandbox first
    /// if it is not running, and resuming it if it is paused.
    pub(super) async fn spawn_in_sandbox(
        self: &Arc<Self>,
        spec: &ProcessSpec,
    ) -> Result<vessel_runtime::sandbox::SandboxProcess> {
        self.activity.touch();
        let mut live = self.live.lock().await;
        if self.paused.swap(false, Ordering::AcqRel)
            && let Some(s) = live.as_ref()
            && let Err(e) = s.thaw().await
        {
            tracing::warn!(vessel = %self.id, error = %e, "could not thaw the sandbox");
        }
        if !live.as_ref().is_some_and(Sandbox::is_running) {
            if live.take().is_some() {
                self.end_processes(StopReason::SandboxLost);
            }
            let (network, before_start) = self.run_network().await?;
            let req = vessel_runtime::RunRequest {
                rootfs: self.dir.join("rootfs"),
                args: vec![],
                user_namespace: self.ids,
                limits: self.bounds.limits,
                network,
                before_start,
                ..Default::default()
            };
            let agent = self.manager.agent()?;
            *live = Some(Sandbox::start(self.manager.runtime.clone(), req, &agent).await?);
            let generation = self.activity.generation.fetch_add(1, Ordering::AcqRel) + 1;
            if let Some(idle) = self.manager.idle_pause {
                tokio::spawn(idle_watch(Arc::downgrade(self), idle, generation));
            }
        }
        let sandbox = live.as_ref().ok_or(VesselError::Runtime(vessel_runtime::RuntimeError::SandboxEnded))?;
        Ok(sandbox.spawn(spec).await?)
    }

    /// Whether a background process of the vessel is still running.
    pub(super) fn background_running(&self) -> bool {
        self.processes.locked().procs.values().any(|p| *p.status.borrow() == ProcessStatus::Running)
    }

    /// Whether the sandbox runs.
    pub(super) async fn sandbox_running(&self) -> bool {
        self.live.lock().await.as_ref().is_some_and(Sandbox::is_running)
    }

    /// Lets a paused sandbox run again (a call needs its processes).
    pub(crate) async fn unpause(&self) {
        self.activity.touch();
        if self.paused.swap(false, Ordering::AcqRel) {
            self.thaw_sandbox().await;
        }
    }

    /// Whether [`Vessel::pause`] holds the sandbox frozen.
    pub(super) fn is_paused(&self) -> bool {
        self.paused.load(Ordering::Acquire)
    }

    /// Stops the sandbox (if running) and every process in it, recording
    /// `reason` as their end; returns how many background processes it stopped.
    pub(super) async fn stop_sandbox(&self, reason: StopReason) -> usize {
        self.paused.store(false, Ordering::Release);
        let stopped = self.mark_stopping(reason);
        if let Some(mut s) = self.live.lock().await.take()
            && let Err(e) = s.stop().await
        {
            tracing::warn!(vessel = %self.id, error = %e, "the sandbox did not stop cleanly; it was killed");
        }
        self.end_processes(reason);
        stopped
    }

    /// Freezes the sandbox's processes (if it runs); `true` if it did.
    pub(super) async fn freeze_sandbox(&self) -> Result<bool> {
        match self.live.lock().await.as_ref() {
            Some(s) if s.is_running() => {
                s.freeze().await?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    pub(super) async fn thaw_sandbox(&self) {
        if let Some(s) = self.live.lock().await.as_ref()
            && let Err(e) = s.thaw().await
        {
            tracing::warn!(vessel = %self.id, error = %e, "could not thaw the sandbox");
        }
    }

    fn mark_stopping(&self, reason: StopReason) -> usize {
        let table = self.processes.locked();
        let running: Vec<_> =
            table.procs.values().filter(|p| *p.status.borrow() == ProcessStatus::Running).cloned().collect();
        for p in &running {
            *p.stopping.locked() = Some(reason);
        }
        running.len()
    }

    /// Records `reason` as the end of every process still marked running
    /// (their pumps may not have seen the sandbox go yet).
    fn end_processes(&self, reason: StopReason) {
        for p in self.processes.locked().procs.values() {
            p.status.send_if_modified(|s| {
                let running = *s == ProcessStatus::Running;
                if running {
                    *s = ProcessStatus::Stopped { reason };
                }
                running
            });
            p.changed.notify_waiters();
        }
    }
}

/// The sandbox spec of a command: the vessel's user, env and work dir.
fn spec_of(v: &Vessel, opts: &ExecOptions<'_>, keep_group: bool) -> Result<ProcessSpec> {
    let inner = &v.inner;
    let cwd = match &opts.work_dir {
        Some(w) => v.path(w)?,
        None => v.path(".")?,
    };
    Ok(ProcessSpec {
        args: opts.command.clone(),
        env: super::exec::merge_env(&inner.image_config.env, &opts.env),
        cwd,
        uid: inner.user.uid,
        gid: inner.user.gid,
        additional_gids: inner.user.additional_gids.clone(),
        tty: opts.tty.then_some(vessel_runtime::TtySize { rows: 24, cols: 80 }),
        stdin: opts.stdin.is_some() || keep_group,
        keep_group,
    })
}

impl Vessel {
    /// Runs a command in the vessel's sandbox (see [`Vessel::exec`]).
    pub(super) async fn exec_live(&self, opts: ExecOptions<'_>) -> Result<vessel_core::ExecResult> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let spec = spec_of(self, &opts, false)?;
        let _busy = self.inner.activity.enter();
        let p = self.inner.spawn_in_sandbox(&spec).await?;
        let mut guard = KillOnDrop(Some(p.control.clone()));
        let vessel_runtime::sandbox::SandboxProcess { mut events, mut stdin, control, .. } = p;
        let ExecOptions { stdin: source, stdout, stderr, timeout, .. } = opts;
        let mut out = stdout.unwrap_or_else(|| Box::new(tokio::io::sink()));
        let mut err = stderr.unwrap_or_else(|| Box::new(tokio::io::sink()));
        let feed = async {
            if let Some(mut src) = source {
                let mut buf = vec![0u8; 64 << 10];
                loop {
                    match src.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if stdin.write(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                }
                let _ = stdin.close().await;
            }
            std::future::pending::<()>().await
        };
        let mut timed_out = false;
        let drain = async {
            let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
            loop {
                let next = match deadline {
                    Some(d) if !timed_out => match tokio::time::timeout_at(d, events.recv()).await {
                        Ok(e) => e,
                        Err(_) => {
                            timed_out = true;
                            let _ = control.signal(9).await;
                            continue;
                        }
                    },
                    _ => events.recv().await,
                };
                match next {
                    // A caller's writer that fails loses the rest, as a closed pipe would.
                    Some(ProcessEvent::Stdout(d)) => {
                        let _ = out.write_all(&d).await;
                    }
                    Some(ProcessEvent::Stderr(d)) => {
                        let _ = err.write_all(&d).await;
                    }
                    Some(ProcessEvent::Exited(e)) => return Some(e),
                    None => return None,
                }
            }
        };
        let exit = tokio::select! {
            e = drain => e,
            () = feed => None,
        };
        guard.0 = None;
        let _ = out.flush().await;
        let _ = err.flush().await;
        if timed_out {
            return Ok(vessel_core::ExecResult::timed_out());
        }
        let exit = exit.ok_or(VesselError::Runtime(vessel_runtime::RuntimeError::SandboxEnded))?;
        Ok(vessel_core::ExecResult::new(exit.code).with_oom_killed(exit.oom_killed))
    }

    /// Starts a command that outlives the call, in the vessel's sandbox: a
    /// background process, as `docker exec -d` starts one. Its output is
    /// kept on the host (the last [`crate::OUTPUT_RING`] bytes of each stream),
    /// its stdin stays open for [`ProcessHandle::write_stdin`], and
    /// `opts.timeout`, if any, kills it when it passes. `opts.stdin`,
    /// `stdout` and `stderr` must be `None` (use the handle), and the
    /// process runs in the vessel's limits (`opts.limits` must be empty).
    /// Its changes to files are the vessel's, as an exec's with
    /// `persist_result`. Processes are stopped when the vessel closes or
    /// restores a snapshot; snapshots freeze them for a moment and they run on.
    pub async fn spawn(&self, opts: ExecOptions<'_>) -> Result<ProcessHandle> {
        if opts.command.is_empty() {
            return Err(VesselError::InvalidInput("empty command".into()));
        }
        if opts.stdin.is_some() || opts.stdout.is_some() || opts.stderr.is_some() {
            return Err(VesselError::InvalidInput(
                "a background process's stdio is the handle's: give no stdin, stdout or stderr".into(),
            ));
        }
        if opts.limits != vessel_core::Limits::default() {
            return Err(VesselError::InvalidInput(
                "a background process runs in the vessel's limits: per-command limits are for exec".into(),
            ));
        }
        if !opts.persist_result {
            return Err(VesselError::InvalidInput(
                "a background process's changes are the vessel's: persist_result must be true".into(),
            ));
        }
        let timeout = opts.timeout;
        if timeout.is_some_and(|t| t.is_zero()) {
            return Err(VesselError::InvalidInput("a zero timeout".into()));
        }
        let inner = &self.inner;
        let state = inner.state.read().await;
        if state.closed {
            return Err(VesselError::Closed(inner.id.clone()));
        }
        let spec = spec_of(self, &opts, true)?;
        let p = inner.spawn_in_sandbox(&spec).await?;
        let vessel_runtime::sandbox::SandboxProcess { pid, events, stdin, control } = p;
        let proc = {
            let mut table = inner.processes.locked();
            table.next += 1;
            let proc = Arc::new(LiveProcess {
                id: table.next,
                command: opts.command.clone(),
                started: SystemTime::now(),
                pid,
                out: Default::default(),
                err: Default::default(),
                status: watch::channel(ProcessStatus::Running).0,
                changed: Notify::new(),
                control,
                stdin: tokio::sync::Mutex::new(Some(stdin)),
                timed_out: AtomicBool::new(false),
                stopping: Default::default(),
                vessel: Arc::downgrade(&self.inner),
            });
            table.procs.insert(proc.id, proc.clone());
            // The oldest ended ones go past the bound.
            let ended: Vec<u64> =
                table.procs.values().filter(|p| *p.status.borrow() != ProcessStatus::Running).map(|p| p.id).collect();
            for id in ended.iter().take(ended.len().saturating_sub(ENDED_KEPT)) {
                table.procs.remove(id);
            }
            proc
        };
        tokio::spawn(pump(proc.clone(), events, timeout));
        drop(state);
        Ok(ProcessHandle { proc })
    }

    /// Freezes every process of the vessel (they keep their memory and use
    /// no CPU) until [`Vessel::resume`]; a vessel with no live sandbox has
    /// nothing to freeze. An exec or spawn into a paused vessel resumes it
    /// first; a snapshot keeps it paused; close and restore end it.
    pub async fn pause(&self) -> Result<()> {
        let state = self.inner.state.read().await;
        if state.closed {
            return Err(VesselError::Closed(self.inner.id.clone()));
        }
        if !self.inner.is_paused() && self.inner.freeze_sandbox().await? {
            self.inner.paused.store(true, Ordering::Release);
        }
        Ok(())
    }

    /// Lets the processes [`Vessel::pause`] froze run again.
    pub async fn resume(&self) -> Result<()> {
        let state = self.inner.state.read().await;
        if state.closed {
            return Err(VesselError::Closed(self.inner.id.clone()));
        }
        self.inner.unpause().await;
        Ok(())
    }

    /// Whether the vessel is paused.
    pub fn is_paused(&self) -> bool {
        self.inner.is_paused()
    }

    /// The vessel's background processes (running, and the last ended ones).
    pub fn processes(&self) -> Vec<ProcessInfo> {
        let procs: Vec<_> = self.inner.processes.locked().procs.values().cloned().collect();
        procs.into_iter().map(|proc| ProcessHandle { proc }.info()).collect()
    }

    /// A handle to background process `id` of this vessel.
    pub fn process(&self, id: u64) -> Result<ProcessHandle> {
        let proc = self.inner.processes.locked().procs.get(&id).cloned();
        proc.map(|proc| ProcessHandle { proc }).ok_or(VesselError::ProcessNotFound(id))
    }
}
