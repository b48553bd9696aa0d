//! The commands of background processes: `exec -d`, `ps`, `logs`, `kill`,
//! `wait`, `pause`, `resume` and `stop`, all answered by the vessel's
//! keeper (see `keeper`), which `exec -d` starts.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use crate::args::ExecArgs;
use crate::commands::{keeper, unexpected, wire_command};
use crate::keeper::client::{call, connect_or_start};
use crate::keeper::wire::{Call, Conn, Reply};
use crate::view::ProcessView;
use vessel::Manager;

/// A signal by name (`TERM`, `SIGTERM`) or number, as `kill` takes it.
pub(crate) fn parse_signal(s: &str) -> std::result::Result<i32, String> {
    if let Ok(n) = s.parse::<i32>() {
        return Ok(n);
    }
    let name = s.to_ascii_uppercase();
    let name = if name.starts_with("SIG") { name } else { format!("SIG{name}") };
    name.parse::<nix::sys::signal::Signal>().map(|s| s as i32).map_err(|_| format!("unknown signal {s:?}"))
}

/// The keeper of `id`, which background processes need.
async fn keeper_of(mgr: &Manager, id: &str) -> Result<Conn> {
    match keeper(mgr, id).await? {
        Some(c) => Ok(c),
        None => bail!(
            "vessel {id} runs no background processes (none was started with `vessel exec -d`, or its keeper \
             has ended and closed it)"
        ),
    }
}

/// `vessel exec -d`: starts the command in the background and prints its
/// process id.
pub(crate) async fn exec_detached(
    mgr: &Manager,
    a: &ExecArgs,
    globals: &[String],
    linger: Duration,
    json: bool,
) -> Result<()> {
    let id = mgr.resolve_vessel(&a.id).await?;
    let conn = connect_or_start(mgr, &id, globals, linger).await?;
    let process = match call(conn, Call::Spawn { command: wire_command(a) }).await? {
        Reply::Spawned { process } => process,
        r => return Err(unexpected(r)),
    };
    if json {
        crate::commands::print_json(&serde_json::json!({ "vessel_id": id, "process_id": process }))
    } else {
        println!("{process}");
        Ok(())
    }
}

pub(crate) async fn ps(mgr: &Manager, id: &str, json: bool) -> Result<()> {
    let processes = match keeper(mgr, id).await? {
        None => Vec::new(),
        Some(conn) => match call(conn, Call::Processes).await? {
            Reply::Processes { processes } => processes,
            r => return Err(unexpected(r)),
        },
    };
    if json {
        return crate::commands::print_json(&processes);
    }
    println!("{:<6} {:<8} {:<22} {:<25}  COMMAND", "PROC", "PID", "STATUS", "STARTED");
    for p in &processes {
        println!("{:<6} {:<8} {:<22} {:<25}  {}", p.process_id, p.pid, status(p), p.started, p.command.join(" "));
    }
    Ok(())
}

/// A process's status in a word or two.
fn status(p: &ProcessView) -> String {
    match (p.status.as_str(), p.exit_code, p.signal, &p.stopped_by) {
        ("exited", Some(c), ..) => format!("exited ({c})"),
        ("signalled", _, Some(s), _) => format!("signalled ({s})"),
        ("stopped", _, _, Some(by)) => format!("stopped ({by})"),
        (s, ..) => s.to_owned(),
    }
}

pub(crate) async fn logs(mgr: &Manager, id: &str, process: u64, follow: bool) -> Result<()> {
    let conn = keeper_of(mgr, id).await?;
    let c = Call::Output { process, stdout_offset: 0, stderr_offset: 0, follow };
    match call(conn, c).await? {
        Reply::Process { dropped, .. } => {
            if dropped.iter().any(|&d| d > 0) {
                eprintln!(
                    "vessel: the oldest output is gone: {} bytes of stdout and {} of stderr (the last {} of each are kept)",
                    dropped[0],
                    dropped[1],
                    vessel::OUTPUT_RING
                );
            }
            Ok(())
        }
        r => Err(unexpected(r)),
    }
}

pub(crate) async fn kill(mgr: &Manager, id: &str, process: u64, signal: i32) -> Result<()> {
    match call(keeper_of(mgr, id).await?, Call::Signal { process, signal }).await? {
        Reply::Done => Ok(()),
        r => Err(unexpected(r)),
    }
}

/// `vessel wait`: prints the process's exit code (128 + N for a signal),
/// as `docker wait` does.
pub(crate) async fn wait(mgr: &Manager, id: &str, process: u64, json: bool) -> Result<ExitCode> {
    let p = match call(keeper_of(mgr, id).await?, Call::Wait { process }).await? {
        Reply::Process { process, .. } => process,
        r => return Err(unexpected(r)),
    };
    if json {
        crate::commands::print_json(&p)?;
    } else {
        println!("{}", p.exit_code.unwrap_or(128 + p.signal.unwrap_or(9)));
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn pause(mgr: &Manager, id: &str, pause: bool) -> Result<()> {
    let c = if pause { Call::Pause } else { Call::Resume };
    match call(keeper_of(mgr, id).await?, c).await? {
        Reply::Done => Ok(()),
        r => Err(unexpected(r)),
    }
}

/// `vessel stop`: ends the vessel's processes and its keeper, and returns
/// once the vessel is free; a vessel without a keeper has nothing to stop.
pub(crate) async fn stop(mgr: &Manager, id: &str) -> Result<()> {
    let Some(conn) = keeper(mgr, id).await? else { return Ok(()) };
    match call(conn, Call::Stop).await? {
        Reply::Done => {}
        r => return Err(unexpected(r)),
    }
    let vid = mgr.resolve_vessel(id).await?;
    let lock = mgr.vessel_lock_file(&vid);
    let deadline = Instant::now() + Duration::from_secs(60);
    // Free once the keeper has closed it (its lock is released last).
    loop {
        let f = std::fs::OpenOptions::new().write(true).open(&lock)?;
        if nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock).is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the keeper of vessel {id} did not close it within a minute");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
