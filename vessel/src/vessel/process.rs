//! A vessel's background processes: the table every handle of the vessel
//! shares, each process's output in a bounded ring buffer per stream
//! ([`OUTPUT_RING`] bytes; what was dropped is counted) and its end as a
//! [`ProcessStatus`], kept until the vessel closes (the last
//! [`ENDED_KEPT`] ended ones).

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use tokio::sync::{Notify, watch};
use vessel_core::sync::Locked;
use vessel_runtime::sandbox::{ProcessControl, ProcessEvent, ProcessExit, StdinWriter};

use crate::error::{Result, VesselError};

/// Bytes of each output stream a background process keeps on the host.
pub const OUTPUT_RING: usize = 1 << 20;

/// How many ended processes a vessel keeps the status of (oldest go first).
pub(crate) const ENDED_KEPT: usize = 256;

/// How a process is, or how it ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProcessStatus {
    /// Still running.
    Running,
    /// It exited with this code.
    Exited {
        /// The code.
        code: i32,
    },
    /// A signal ended it (sent with [`ProcessHandle::signal`], or by
    /// anything in the vessel).
    Signalled {
        /// The signal.
        signal: i32,
    },
    /// The OOM killer ended it (the vessel's memory limit).
    OomKilled,
    /// Its timeout passed: it was killed.
    TimedOut,
    /// The vessel stopped it: closed, restored or its sandbox lost.
    Stopped {
        /// Why.
        reason: StopReason,
    },
}

/// Why the vessel stopped a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StopReason {
    /// The vessel was closed.
    VesselClosed,
    /// A snapshot was restored (a filesystem cannot change under running programs).
    Restored,
    /// The sandbox died under it (for example, killed from the host).
    SandboxLost,
}

impl ProcessStatus {
    /// The exit code a shell would report (`128 + N` for signal `N`; 137
    /// for a process killed for any reason); `None` while it runs.
    pub fn exit_code(self) -> Option<i32> {
        match self {
            Self::Running => None,
            Self::Exited { code } => Some(code),
            Self::Signalled { signal } => Some(128 + signal),
            Self::OomKilled | Self::TimedOut | Self::Stopped { .. } => Some(137),
        }
    }

    pub(crate) fn of(exit: ProcessExit, timed_out: bool, stopping: Option<StopReason>) -> Self {
        match (exit, timed_out, stopping) {
            (e, _, _) if e.oom_killed && e.signal == Some(9) => Self::OomKilled,
            (_, true, _) => Self::TimedOut,
            (e, _, Some(reason)) if e.sandbox_ended || e.signal.is_some() => Self::Stopped { reason },
            (e, _, None) if e.sandbox_ended => Self::Stopped { reason: StopReason::SandboxLost },
            (ProcessExit { signal: Some(signal), .. }, _, _) => Self::Signalled { signal },
            (ProcessExit { code, .. }, _, _) => Self::Exited { code },
        }
    }
}

/// One of a process's output streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputStream {
    /// Its stdout (or, with a terminal, everything it printed).
    Stdout,
    /// Its stderr.
    Stderr,
}

/// Bytes read from a process's output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    /// The bytes, which start at `offset`.
    pub data: Vec<u8>,
    /// The offset of `data` in the stream: the one asked for, or later
    /// when the ring buffer dropped what was asked for.
    pub offset: u64,
    /// Where the next read continues.
    pub next: u64,
    /// Bytes the stream has dropped so far (its oldest, past the ring).
    pub dropped: u64,
}

/// A stream's last [`OUTPUT_RING`] bytes, addressed by offset from its start.
#[derive(Debug, Default)]
pub(crate) struct Ring {
    buf: VecDeque<u8>,
    /// Offset of `buf[0]`: also how many bytes were dropped.
    start: u64,
}

impl Ring {
    fn push(&mut self, data: &[u8]) {
        self.buf.extend(data);
        let over = self.buf.len().saturating_sub(OUTPUT_RING);
        self.buf.drain(..over);
        self.start += over as u64;
    }

    fn end(&self) -> u64 {
        self.start + self.buf.len() as u64
    }

    fn read(&self, offset: u64, max: usize) -> Output {
        let from = offset.clamp(self.start, self.end());
        let skip = (from - self.start) as usize;
        let data: Vec<u8> = self.buf.iter().skip(skip).take(max).copied().collect();
        Output { offset: from, next: from + data.len() as u64, data, dropped: self.start }
    }
}

/// A background process, as the table keeps it.
#[derive(Debug)]
pub(crate) struct LiveProcess {
    pub(crate) id: u64,
    pub(crate) command: Vec<String>,
    pub(crate) started: SystemTime,
    pub(crate) pid: u32,
    pub(crate) out: std::sync::Mutex<Ring>,
    pub(crate) err: std::sync::Mutex<Ring>,
    pub(crate) status: watch::Sender<ProcessStatus>,
    /// New output or the end.
    pub(crate) changed: Notify,
    pub(crate) control: ProcessControl,
    pub(crate) stdin: tokio::sync::Mutex<Option<StdinWriter>>,
    pub(crate) timed_out: AtomicBool,
    /// Set before the vessel stops the sandbox under it.
    pub(crate) stopping: std::sync::Mutex<Option<StopReason>>,
    /// Its vessel, which a signal or input resumes if paused.
    pub(crate) vessel: std::sync::Weak<super::OpenVessel>,
}

/// What a process is, for listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessInfo {
    /// Its id, unique in the vessel while it is open.
    pub id: u64,
    /// Its argv.
    pub command: Vec<String>,
    /// When it started.
    pub started: SystemTime,
    /// Its pid inside the vessel.
    pub pid: u32,
    /// How it is.
    pub status: ProcessStatus,
    /// Bytes it has written to stdout and stderr so far.
    pub output_bytes: (u64, u64),
}

/// The vessel's background processes.
#[derive(Debug, Default)]
pub(crate) struct ProcessTable {
    pub(crate) next: u64,
    pub(crate) procs: BTreeMap<u64, Arc<LiveProcess>>,
}

/// A background process of a vessel; any handle of the vessel can get one
/// again by id ([`crate::Vessel::process`]).
#[derive(Debug, Clone)]
pub struct ProcessHandle {
    pub(crate) proc: Arc<LiveProcess>,
}

impl ProcessHandle {
    /// Its id in the vessel.
    pub fn id(&self) -> u64 {
        self.proc.id
    }

    /// What it is and how it is.
    pub fn info(&self) -> ProcessInfo {
        let p = &self.proc;
        ProcessInfo {
            id: p.id,
            command: p.command.clone(),
            started: p.started,
            pid: p.pid,
            status: *p.status.borrow(),
            output_bytes: (p.out.locked().end(), p.err.locked().end()),
        }
    }

    /// Up to `max` bytes of `stream` from `offset` (what the ring still
    /// holds: see [`Output::offset`] and [`Output::dropped`]); at once.
    pub fn read(&self, stream: OutputStream, offset: u64, max: usize) -> Output {
        match stream {
            OutputStream::Stdout => self.proc.out.locked().read(offset, max),
            OutputStream::Stderr => self.proc.err.locked().read(offset, max),
        }
    }

    /// [`ProcessHandle::read`], waiting until there is output past `offset`
    /// or the process ended (then the data may be empty): follows the
    /// stream, as `docker logs -f` does.
    pub async fn follow(&self, stream: OutputStream, offset: u64, max: usize) -> Output {
        loop {
            let changed = self.proc.changed.notified();
            let out = self.read(stream, offset, max);
            if !out.data.is_empty() || *self.proc.status.borrow() != ProcessStatus::Running {
                return out;
            }
            changed.await;
        }
    }

    /// Resumes its vessel if paused: the call needs the process running.
    async fn wake(&self) {
        if let Some(v) = self.proc.vessel.upgrade() {
            v.unpause().await;
        }
    }

    /// Writes `data` to its stdin (waiting while the process does not
    /// read); a paused vessel is resumed first.
    pub async fn write_stdin(&self, data: &[u8]) -> Result<()> {
        self.wake().await;
        let mut stdin = self.proc.stdin.lock().await;
        let w = stdin.as_mut().ok_or_else(|| VesselError::InvalidInput("the process's stdin is closed".into()))?;
        Ok(w.write(data).await?)
    }

    /// Closes its stdin (end of file).
    pub async fn close_stdin(&self) -> Result<()> {
        if let Some(mut w) = self.proc.stdin.lock().await.take() {
            w.close().await?;
        }
        Ok(())
    }

    /// Sends `signal` (e.g. 15, SIGTERM) to it and its process group; a
    /// process that already ended is left as it is. A paused vessel is
    /// resumed first (a stopped process would not act on it).
    pub async fn signal(&self, signal: i32) -> Result<()> {
        if !(1..=64).contains(&signal) {
            return Err(VesselError::InvalidInput(format!("signal {signal} is not a signal")));
        }
        if *self.proc.status.borrow() != ProcessStatus::Running {
            return Ok(());
        }
        self.wake().await;
        match self.proc.control.signal(signal).await {
            Err(vessel_runtime::RuntimeError::SandboxEnded) => Ok(()),
            r => Ok(r?),
        }
    }

    /// Waits for it to end; how it ended.
    pub async fn wait(&self) -> ProcessStatus {
        let mut rx = self.proc.status.subscribe();
        let status = rx.wait_for(|s| *s != ProcessStatus::Running).await.map(|s| *s);
        status.unwrap_or(ProcessStatus::Stopped { reason: StopReason::SandboxLost })
    }
}

/// Moves a background process's events into its table entry.
pub(crate) async fn pump(
    proc: Arc<LiveProcess>,
    mut events: tokio::sync::mpsc::Receiver<ProcessEvent>,
    timeout: Option<Duration>,
) {
    let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
    loop {
        let next = match deadline {
            Some(d) if !proc.timed_out.load(Ordering::Relaxed) => {
                match tokio::time::timeout_at(d, events.recv()).await {
                    Ok(e) => e,
                    Err(_) => {
                        proc.timed_out.store(true, Ordering::Relaxed);
                        let _ = proc.control.signal(9).await;
                        continue;
                    }
                }
            }
            _ => events.recv().await,
        };
        if let Some(v) = proc.vessel.upgrade() {
            v.activity.touch();
        }
        match next {
            Some(ProcessEvent::Stdout(d)) => proc.out.locked().push(&d),
            Some(ProcessEvent::Stderr(d)) => proc.err.locked().push(&d),
            Some(ProcessEvent::Exited(e)) => {
                let stopping = *proc.stopping.locked();
                let status = ProcessStatus::of(e, proc.timed_out.load(Ordering::Relaxed), stopping);
                proc.status.send_if_modified(|s| {
                    let running = *s == ProcessStatus::Running;
                    if running {
                        *s = status;
                    }
                    running
                });
                break;
            }
            None => {
                let reason = proc.stopping.locked().unwrap_or(StopReason::SandboxLost);
                proc.status.send_if_modified(|s| {
                    let running = *s == ProcessStatus::Running;
                    if running {
                        *s = ProcessStatus::Stopped { reason };
                    }
                    running
                });
                break;
            }
        }
        proc.changed.notify_waiters();
    }
    proc.changed.notify_waiters();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_keeps_the_last_bytes_and_counts_the_rest() {
        let mut r = Ring::default();
        r.push(b"hello ");
        assert_eq!(r.read(0, 3), Output { data: b"hel".to_vec(), offset: 0, next: 3, dropped: 0 });
        r.push(&vec![b'x'; OUTPUT_RING]);
        let o = r.read(0, 4);
        assert_eq!((o.offset, o.dropped, o.data.as_slice()), (6, 6, &b"xxxx"[..]));
        assert_eq!(r.read(r.end(), 10).data, b"");
        assert_eq!(r.read(u64::MAX, 10).next, r.end());
        assert!(r.buf.len() <= OUTPUT_RING);
    }

    #[test]
    fn each_end_says_why() {
        let e = |code, signal, oom, lost| ProcessExit { code, signal, oom_killed: oom, sandbox_ended: lost };
        assert_eq!(ProcessStatus::of(e(3, None, false, false), false, None), ProcessStatus::Exited { code: 3 });
        assert_eq!(
            ProcessStatus::of(e(143, Some(15), false, false), false, None),
            ProcessStatus::Signalled { signal: 15 }
        );
        assert_eq!(ProcessStatus::of(e(137, Some(9), true, false), false, None), ProcessStatus::OomKilled);
        assert_eq!(ProcessStatus::of(e(137, Some(9), false, false), true, None), ProcessStatus::TimedOut);
        assert_eq!(
            ProcessStatus::of(e(137, Some(9), false, true), false, Some(StopReason::Restored)),
            ProcessStatus::Stopped { reason: StopReason::Restored }
        );
        assert_eq!(
            ProcessStatus::of(e(137, Some(9), false, true), false, None),
            ProcessStatus::Stopped { reason: StopReason::SandboxLost }
        );
        assert_eq!(ProcessStatus::TimedOut.exit_code(), Some(137));
        assert_eq!(ProcessStatus::Running.exit_code(), None);
    }
}
