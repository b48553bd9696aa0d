//! The watchdog: a re-executed copy of the program, started with a
//! connection's first run, that outlives its caller to remove the caller's
//! containers when the caller dies without doing so (SIGKILL, or SIGTERM,
//! SIGINT or SIGHUP from a service manager stopping the process group:
//! containerd keeps a task running whatever happens to its client).
//!
//! It ignores those three signals and waits for the end of a lifeline pipe
//! that only the caller holds; once the caller is gone it connects, removes
//! the containers of dead owners (the caller's among them, by their owner
//! label) and exits. When the caller just dropped its runtime, the caller
//! is alive and nothing is removed. A watchdog killed together with its
//! caller leaves the work to the next connection (see `owner`).

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use super::{ContainerdConfig, ContainerdRuntime, owner};
use crate::RuntimeError;

const WATCHDOG_ENV: &str = "VESSEL_CONTAINERD_WATCHDOG";
const ADDRESS_ENV: &str = "VESSEL_CONTAINERD_WATCHDOG_ADDRESS";
const NAMESPACE_ENV: &str = "VESSEL_CONTAINERD_WATCHDOG_NAMESPACE";
const ROOT_ENV: &str = "VESSEL_CONTAINERD_WATCHDOG_ROOT";
const OWNER_ENV: &str = "VESSEL_CONTAINERD_WATCHDOG_OWNER";
/// In the watchdog: the read end of the lifeline.
const LIFELINE_FD: i32 = 3;

/// The caller's side: the lifeline's write end (dropped with the last clone
/// of the runtime) and the child.
#[derive(Debug)]
pub(crate) struct Watchdog {
    _lifeline: OwnedFd,
    _child: tokio::process::Child,
}

/// Starts a watchdog for the connection `config` whose containers carry `owner`.
pub(crate) fn spawn(config: &ContainerdConfig, owner: &str) -> Result<Watchdog, RuntimeError> {
    let (r, w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| RuntimeError::io("create pipe", "")(e.into()))?;
    let mut cmd = tokio::process::Command::new("/proc/self/exe");
    cmd.env(WATCHDOG_ENV, "1")
        .env(ADDRESS_ENV, &config.address)
        .env(NAMESPACE_ENV, &config.namespace)
        .env(ROOT_ENV, &config.root)
        .env(OWNER_ENV, owner)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    crate::child::hand_over(&mut cmd, &[(r.as_raw_fd(), LIFELINE_FD)]);
    let child = cmd.spawn().map_err(RuntimeError::io("start watchdog", "/proc/self/exe"))?;
    drop(r);
    Ok(Watchdog { _lifeline: w, _child: child })
}

/// Runs the watchdog and exits if this process is one.
pub(crate) fn maybe_run() {
    if std::env::var_os(WATCHDOG_ENV).is_none() {
        return;
    }
    std::process::exit(match watch() {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("vessel containerd watchdog: {e}");
            1
        }
    });
}

fn watch() -> Result<(), RuntimeError> {
    use nix::sys::signal::{SigHandler, Signal, signal};
    for sig in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        // SAFETY: SIG_IGN installs no handler code.
        unsafe { signal(sig, SigHandler::SigIgn) }.map_err(|e| RuntimeError::io("ignore signal", "")(e.into()))?;
    }
    // SAFETY: the caller placed the lifeline at fd 3 for this process alone.
    let lifeline = unsafe { OwnedFd::from_raw_fd(LIFELINE_FD) };
    let var = |k: &str| std::env::var(k).map_err(|_| RuntimeError::InvalidRequest(format!("watchdog without {k}")));
    let config = ContainerdConfig {
        address: PathBuf::from(var(ADDRESS_ENV)?),
        namespace: var(NAMESPACE_ENV)?,
        root: PathBuf::from(var(ROOT_ENV)?),
    };
    let owner = var(OWNER_ENV)?;
    loop {
        let mut fds = [nix::poll::PollFd::new(lifeline.as_fd(), nix::poll::PollFlags::POLLIN)];
        match nix::poll::poll(&mut fds, nix::poll::PollTimeout::NONE) {
            Ok(_) => break,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(RuntimeError::io("poll lifeline", "")(e.into())),
        }
    }
    // The lifeline ends a moment before the caller's exit is complete.
    let deadline = Instant::now() + Duration::from_secs(5);
    while owner::is_alive(&owner) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    if owner::is_alive(&owner) {
        // The caller dropped its runtime and lives on: nothing of its is ours.
        return Ok(());
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(RuntimeError::io("start tokio", ""))?;
    // Connecting removes the containers of dead owners, the caller's too.
    rt.block_on(ContainerdRuntime::connect(config)).map(drop)
}
