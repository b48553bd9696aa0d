//! `vessel rm -f`: stop what has a vessel open on this host, as `docker rm
//! -f` stops a running container.
//!
//! Between commands nothing of a vessel runs; while one runs (`vessel exec`
//! in another terminal), that process holds the vessel's lock file. Its
//! pid is in `/proc/locks`; it is sent SIGTERM, which ends it and, through
//! its runner, its container (no container outlives its caller). Only a
//! single-vessel `vessel` command is stopped this way: a `vessel mcp`
//! server, or any other program, holds many vessels or is not ours to end,
//! and is named instead.

use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use vessel::{Manager, VesselId};

/// How long the holder may take to end.
const GRACE: Duration = Duration::from_secs(10);

pub(crate) async fn stop_holders(mgr: &Manager, id: &VesselId) -> Result<()> {
    let lock = mgr.vessel_lock_file(id);
    let meta = std::fs::metadata(&lock).with_context(|| format!("reading {}", lock.display()))?;
    let me = std::env::current_exe().context("finding this program")?;
    let pids: Vec<i32> = procfs::locks()
        .context("reading /proc/locks")?
        .into_iter()
        .filter(|l| l.inode == meta.ino())
        .filter_map(|l| l.pid)
        .filter(|&p| p != std::process::id() as i32)
        .collect();
    for &pid in &pids {
        let proc = procfs::process::Process::new(pid).with_context(|| format!("process {pid}"))?;
        let exe = proc.exe().unwrap_or_default();
        let args = proc.cmdline().unwrap_or_default();
        if exe != me || args.iter().any(|a| a == "mcp") {
            bail!(
                "vessel {id} is held open by process {pid} ({}), which -f does not stop: end it first",
                args.join(" ")
            );
        }
    }
    for &pid in &pids {
        // Gone already is fine.
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM);
    }
    let deadline = Instant::now() + GRACE;
    while pids.iter().any(|&p| procfs::process::Process::new(p).is_ok_and(|p| p.stat().is_ok_and(|s| s.state != 'Z'))) {
        if Instant::now() > deadline {
            bail!("vessel {id}: process {pids:?} did not end within {GRACE:?} of SIGTERM");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}
