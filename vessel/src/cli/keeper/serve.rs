//! The keeper's side: holds one vessel and answers calls on its socket.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use vessel::{ExecOptions, Manager, OutputStream, ProcessStatus, SnapshotId, Vessel, VesselError};

use super::wire::{Bytes, CHUNK, Call, Command, Conn, Frame, Reply};
use crate::view::{ExecView, ProcessView};

/// The vessel a keeper holds and what it knows of its use.
struct Keeper {
    vessel: Vessel,
    /// Connections being served.
    clients: AtomicUsize,
    /// The last time a call ended or a process ran.
    active: std::sync::Mutex<Instant>,
    /// `vessel stop` asked the keeper to end.
    stop: tokio::sync::Notify,
    /// Ports published: the keeper serves them until stopped.
    published: AtomicUsize,
}

impl Keeper {
    fn touch(&self) {
        *self.active.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
    }

    /// Whether the keeper has had nothing to do for `linger`.
    fn idle_for(&self, linger: Duration) -> bool {
        if self.clients.load(Ordering::Acquire) > 0
            || self.published.load(Ordering::Acquire) > 0
            || self.vessel.processes().iter().any(|p| p.status == ProcessStatus::Running)
        {
            self.touch();
            return false;
        }
        self.active.lock().unwrap_or_else(|e| e.into_inner()).elapsed() >= linger
    }
}

/// `vessel keep ID`: opens vessel `id`, says `ready` (or why not) on
/// stdout, then serves until stopped or idle for `linger`.
pub(crate) async fn serve(mgr: &Arc<Manager>, id: &str, linger: Duration) -> Result<()> {
    let opened = open(mgr, id).await;
    let (vessel, listener, path) = match opened {
        Ok(o) => o,
        Err(e) => {
            println!("{e:#}");
            return Err(e);
        }
    };
    println!("ready");
    let _ = std::io::stdout().flush();
    // Nothing more goes to the command that started it.
    let null = std::fs::OpenOptions::new().write(true).open("/dev/null")?;
    nix::unistd::dup2_stdout(&null)?;
    let keeper = Arc::new(Keeper {
        vessel,
        clients: AtomicUsize::new(0),
        active: std::sync::Mutex::new(Instant::now()),
        stop: tokio::sync::Notify::new(),
        published: AtomicUsize::new(0),
    });
    let mut tick = tokio::time::interval(Duration::from_millis(250).min(linger));
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let k = keeper.clone();
                k.clients.fetch_add(1, Ordering::AcqRel);
                tokio::spawn(async move {
                    if let Err(e) = connection(&k, stream).await {
                        tracing::debug!(error = %e, "a keeper connection ended early");
                    }
                    k.touch();
                    k.clients.fetch_sub(1, Ordering::AcqRel);
                });
            }
            _ = keeper.stop.notified() => break,
            _ = crate::terminated(false) => break,
            _ = tick.tick() => if keeper.idle_for(linger) { break },
        }
    }
    // No new caller reaches it from here on; then the vessel closes,
    // stopping its processes (their ends are recorded as `vessel_closed`).
    let _ = std::fs::remove_file(&path);
    keeper.vessel.close().await?;
    // Its log, kept only when something went wrong.
    let log = path.with_extension("log");
    if std::fs::metadata(&log).is_ok_and(|m| m.len() == 0) {
        let _ = std::fs::remove_file(&log);
    }
    Ok(())
}

async fn open(mgr: &Arc<Manager>, id: &str) -> Result<(Vessel, UnixListener, std::path::PathBuf)> {
    let v = mgr.open_vessel(id).await.with_context(|| format!("cannot open vessel {id}"))?;
    let dir = super::keepers_dir(mgr);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
    let path = super::socket_path(mgr, v.id());
    // A dead keeper's socket (this process holds the vessel's lock now).
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).with_context(|| format!("listening on {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok((v, listener, path))
}

/// Serves one connection: one call.
async fn connection(k: &Keeper, stream: UnixStream) -> std::io::Result<()> {
    // The socket's modes keep others out; the peer's credentials are
    // checked too, so a mode loosened by mistake serves no one else.
    let me = nix::unistd::geteuid().as_raw();
    let peer = stream.peer_cred()?.uid();
    let mut conn = Conn::new(stream);
    if peer != me && peer != 0 {
        let message = format!("refused: the caller's uid {peer} is not this keeper's user ({me})");
        return conn.send(&Frame::Reply(Reply::Failed { message, exit_code: None })).await;
    }
    let Some(Frame::Call(call)) = conn.recv().await? else { return Ok(()) };
    let reply = match answer(k, &mut conn, call).await {
        Ok(Some(r)) => r,
        // The caller went away.
        Ok(None) => return Ok(()),
        Err(e) => failed(&e),
    };
    conn.send(&Frame::Reply(reply)).await
}

fn failed(e: &VesselError) -> Reply {
    let exit_code = match e {
        VesselError::Runtime(vessel::runtime::RuntimeError::Exec { failure, .. }) => {
            u8::try_from(failure.exit_code()).ok()
        }
        _ => None,
    };
    Reply::Failed { message: e.to_string(), exit_code }
}

fn options(c: Command) -> ExecOptions<'static> {
    ExecOptions {
        command: c.argv,
        work_dir: c.work_dir,
        env: c.env,
        timeout: c.timeout_ms.map(Duration::from_millis),
        persist_result: true,
        ..Default::default()
    }
}

/// The reply to `call`; `None` when the caller left before it.
async fn answer(k: &Keeper, conn: &mut Conn, call: Call) -> vessel::Result<Option<Reply>> {
    let v = &k.vessel;
    Ok(Some(match call {
        Call::Exec { command, tty, stdin, persist, snapshot } => {
            let opts = ExecOptions { tty, persist_result: persist, ..options(command) };
            let started = Instant::now();
            let Some(result) = exec(v, conn, opts, stdin).await? else { return Ok(None) };
            let snapshot = match snapshot {
                Some(message) => Some(Box::new(v.create_snapshot(&message).await?)),
                None => None,
            };
            Reply::Exec { result: ExecView::of(&result, started.elapsed()), snapshot }
        }
        Call::Spawn { command } => Reply::Spawned { process: v.spawn(options(command)).await?.id() },
        Call::Processes => Reply::Processes { processes: v.processes().iter().map(ProcessView::of).collect() },
        Call::Output { process, stdout_offset, stderr_offset, follow } => {
            let p = v.process(process)?;
            let (mut o, mut e) = (stdout_offset, stderr_offset);
            let mut dropped;
            loop {
                let ended = p.info().status != ProcessStatus::Running;
                let a = p.read(OutputStream::Stdout, o, CHUNK);
                let b = p.read(OutputStream::Stderr, e, CHUNK);
                (o, e, dropped) = (a.next, b.next, [a.dropped, b.dropped]);
                let idle = a.data.is_empty() && b.data.is_empty();
                if !a.data.is_empty() {
                    send(conn, Frame::Stdout { data: Bytes(a.data) }).await?;
                }
                if !b.data.is_empty() {
                    send(conn, Frame::Stderr { data: Bytes(b.data) }).await?;
                }
                if idle && (ended || !follow) {
                    break;
                }
                if idle {
                    tokio::select! {
                        _ = p.follow(OutputStream::Stdout, o, 1) => {}
                        _ = p.follow(OutputStream::Stderr, e, 1) => {}
                        // The caller leaves (`logs -f` ended with ^C).
                        _ = conn.recv() => return Ok(None),
                    }
                }
            }
            Reply::Process { process: ProcessView::of(&p.info()), dropped }
        }
        Call::Signal { process, signal } => {
            v.process(process)?.signal(signal).await?;
            Reply::Done
        }
        Call::Wait { process } => {
            let p = v.process(process)?;
            tokio::select! {
                _ = p.wait() => {}
                _ = conn.recv() => return Ok(None),
            }
            Reply::Process { process: ProcessView::of(&p.info()), dropped: [0, 0] }
        }
        Call::Pause => {
            v.pause().await?;
            Reply::Done
        }
        Call::Resume => {
            v.resume().await?;
            Reply::Done
        }
        Call::Read { path } => {
            let data = v.read_file(&path)?;
            conn.send_data(&data, |data| Frame::Stdout { data }).await.map_err(gone)?;
            Reply::Done
        }
        Call::Write { path, mode, snapshot } => {
            let mut data = Vec::new();
            loop {
                match conn.recv().await {
                    Ok(Some(Frame::Stdin { data: Bytes(d) })) => data.extend_from_slice(&d),
                    Ok(Some(Frame::StdinEnd)) => break,
                    _ => return Ok(None),
                }
            }
            v.write_file(&path, &data, mode)?;
            Reply::Snapshot { snapshot: Box::new(v.create_snapshot(&snapshot).await?) }
        }
        Call::Snapshot { message } => Reply::Snapshot { snapshot: Box::new(v.create_snapshot(&message).await?) },
        Call::Manifest => Reply::Manifest { manifest: Box::new(v.manifest()) },
        Call::Restore { snapshot } => {
            Reply::Restored { stopped: v.restore_snapshot(&SnapshotId::new(&snapshot)?).await? }
        }
        Call::DeleteSnapshot { snapshot } => {
            v.delete_snapshot(&SnapshotId::new(&snapshot)?).await?;
            Reply::Done
        }
        Call::Changes { since, to } => {
            let changes = match (since, to) {
                (Some(a), Some(b)) => v.changes_between(&SnapshotId::new(&a)?, &SnapshotId::new(&b)?).await?,
                (since, _) => v.changes(since.map(|s| SnapshotId::new(&s)).transpose()?.as_ref()).await?,
            };
            Reply::Changes { changes: changes.iter().map(crate::view::ChangeView::of).collect() }
        }
        Call::Network { set } => {
            if let Some(p) = set {
                v.set_network(p.parse()?).await?;
            }
            Reply::Network { network: crate::view::NetworkView::of(v).await }
        }
        Call::Publish { port, remove } => {
            if remove {
                v.unpublish(port).await;
            } else {
                v.publish(port).await?;
            }
            let network = crate::view::NetworkView::of(v).await;
            k.published.store(network.published.len(), Ordering::Release);
            Reply::Network { network }
        }
        Call::Stop => {
            k.stop.notify_one();
            Reply::Done
        }
    }))
}

/// A caller that went away, as an error of the call it made.
fn gone(e: std::io::Error) -> VesselError {
    VesselError::Io { op: "answer the caller", path: "keeper socket".into(), source: e }
}

async fn send(conn: &mut Conn, f: Frame) -> vessel::Result<()> {
    conn.send(&f).await.map_err(gone)
}

/// Runs a foreground command with its stdio on the connection; `None`
/// when the caller left (which cancels it: its process tree is killed).
async fn exec(
    v: &Vessel,
    conn: &mut Conn,
    mut opts: ExecOptions<'static>,
    stdin: bool,
) -> vessel::Result<Option<vessel::ExecResult>> {
    let (out_w, mut out_r) = tokio::io::duplex(64 << 10);
    let (err_w, mut err_r) = tokio::io::duplex(64 << 10);
    opts.stdout = Some(Box::new(out_w));
    opts.stderr = Some(Box::new(err_w));
    // The caller's input is fed by a task, so a command that reads none
    // never holds up its output.
    let (input, mut queued) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
    let mut input = Some(input);
    if stdin {
        let (mut in_w, in_r) = tokio::io::duplex(64 << 10);
        opts.stdin = Some(Box::new(in_r));
        tokio::spawn(async move {
            while let Some(d) = queued.recv().await {
                if in_w.write_all(&d).await.is_err() {
                    break;
                }
            }
        });
    } else {
        input = None;
    }
    let run = v.exec(opts);
    tokio::pin!(run);
    let mut result = None;
    let (mut out_open, mut err_open) = (true, true);
    let (mut ob, mut eb) = (vec![0u8; 64 << 10], vec![0u8; 64 << 10]);
    while result.is_none() || out_open || err_open {
        tokio::select! {
            r = &mut run, if result.is_none() => result = Some(r?),
            n = out_r.read(&mut ob), if out_open => match n {
                Ok(n) if n > 0 => send(conn, Frame::Stdout { data: Bytes(ob[..n].to_vec()) }).await?,
                _ => out_open = false,
            },
            n = err_r.read(&mut eb), if err_open => match n {
                Ok(n) if n > 0 => send(conn, Frame::Stderr { data: Bytes(eb[..n].to_vec()) }).await?,
                _ => err_open = false,
            },
            f = conn.recv(), if result.is_none() => match f {
                Ok(Some(Frame::Stdin { data })) => {
                    if let Some(i) = &input {
                        let _ = i.send(data.0);
                    }
                }
                Ok(Some(Frame::StdinEnd)) => input = None,
                // The caller left (or sent nonsense): the command is cancelled.
                _ => return Ok(None),
            },
        }
    }
    Ok(result)
}
