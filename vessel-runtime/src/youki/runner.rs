//! The runner: a fresh, single-threaded process (the re-executed caller)
//! that creates, starts, waits for and deletes one container with
//! libcontainer, then reports the exit code on fd 4 and exits.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::PathBuf;

use libcontainer::container::builder::ContainerBuilder;
use libcontainer::syscall::syscall::SyscallType;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::Signal;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use serde_json::json;

use super::{BUNDLE_ENV, ID_ENV, LIFELINE_FD, NETWORK_ENV, RUNNER_ENV, STATE_ENV, STATUS_FD};
use crate::RuntimeError;

/// Runs the container and exits if this process is a runner.
pub(crate) fn maybe_run() {
    if std::env::var_os(RUNNER_ENV).is_none() {
        return;
    }
    let report = match run() {
        Ok(code) => json!({ "exit": code }),
        Err((kind, message)) => json!({ "error": message, "kind": kind }),
    };
    // SAFETY: the parent placed the status pipe's write end at STATUS_FD
    // (see YoukiRuntime::run) and nothing else in this process owns it.
    let mut status = File::from(unsafe { OwnedFd::from_raw_fd(STATUS_FD) });
    let _ = writeln!(status, "{report}");
    std::process::exit(0);
}

/// Brings `lo` up in the current network namespace (SIOCSIFFLAGS).
fn loopback_up() -> std::io::Result<()> {
    use nix::libc;
    // SAFETY: a plain datagram socket, closed by OwnedFd.
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if sock < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: sock is a fresh fd that nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(sock) };
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write `req`, a valid ifreq
    // naming `lo`, through a socket fd that lives across both calls.
    unsafe {
        use std::os::fd::AsRawFd;
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Turns the runner's report into the run's result.
pub(crate) fn parse_report(report: &str) -> Option<Result<i32, RuntimeError>> {
    let v: serde_json::Value = serde_json::from_str(report.trim()).ok()?;
    if let Some(code) = v["exit"].as_i64() {
        return Some(Ok(code as i32));
    }
    let message = v["error"].as_str()?.to_owned();
    Some(Err(match v["kind"].as_str() {
        Some("exec") => RuntimeError::Exec { command: v["command"].as_str().unwrap_or("").to_owned(), reason: message },
        _ => RuntimeError::Container(message),
    }))
}

type Failure = (&'static str, String);

fn env(name: &str) -> Result<String, Failure> {
    std::env::var(name).map_err(|_| ("container", format!("runner started without {name}")))
}

fn fail(e: impl std::fmt::Display) -> Failure {
    ("container", e.to_string())
}

fn run() -> Result<i32, Failure> {
    // SAFETY: fds 3 and 4 were placed by the parent for this process alone;
    // marking them close-on-exec keeps them out of the container.
    unsafe {
        nix::libc::fcntl(LIFELINE_FD, nix::libc::F_SETFD, nix::libc::FD_CLOEXEC);
        nix::libc::fcntl(STATUS_FD, nix::libc::F_SETFD, nix::libc::FD_CLOEXEC);
    }
    // SAFETY: as above, LIFELINE_FD is this process's and is owned once, here.
    let lifeline = unsafe { OwnedFd::from_raw_fd(LIFELINE_FD) };
    let (bundle, state, id) = (PathBuf::from(env(BUNDLE_ENV)?), PathBuf::from(env(STATE_ENV)?), env(ID_ENV)?);
    if env(NETWORK_ENV)? != "host" {
        // This runner serves one container, which shares its network
        // namespace: make it private, with loopback up.
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).map_err(fail)?;
        loopback_up().map_err(fail)?;
    }

    let dup = |fd: i32| -> Result<OwnedFd, Failure> {
        // SAFETY: 0, 1 and 2 are open for the whole life of this process.
        unsafe { BorrowedFd::borrow_raw(fd) }.try_clone_to_owned().map_err(fail)
    };
    let builder = ContainerBuilder::new(id.clone(), SyscallType::default())
        .with_root_path(&state)
        .map_err(fail)?
        .with_stdin(dup(0)?)
        .with_stdout(dup(1)?)
        .with_stderr(dup(2)?);
    let mut container = match builder.as_init(&bundle).with_systemd(false).build() {
        Ok(c) => c,
        Err(e) => {
            cleanup_cgroups(&id);
            let message = e.to_string();
            let kind =
                if message.contains("executable") || message.contains("not found") { "exec" } else { "container" };
            return Err((kind, message));
        }
    };
    if let Err(e) = container.start() {
        let _ = container.delete(true);
        cleanup_cgroups(&id);
        return Err(fail(e));
    }
    // libcontainer links its own nix version: cross over by raw pid.
    let pid = Pid::from_raw(container.pid().ok_or_else(|| fail("the container has no init pid"))?.as_raw());
    let code = wait(pid, &lifeline, &mut container);
    let deleted = container.delete(true);
    cleanup_cgroups(&id);
    deleted.map_err(fail)?;
    Ok(code)
}

/// A pidfd for `pid`: readable when it exits. (No signal mask games: a
/// blocked SIGCHLD would be inherited by the container's processes.)
fn pidfd(pid: Pid) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { nix::libc::syscall(nix::libc::SYS_pidfd_open, pid.as_raw(), 0) };
    // SAFETY: a non-negative return is a fresh fd that nothing else owns.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Waits for the init process; if the lifeline breaks first, kills
/// everything in the container and waits for that.
fn wait(pid: Pid, lifeline: &OwnedFd, container: &mut libcontainer::container::Container) -> i32 {
    let pidfd = pidfd(pid);
    loop {
        if let Some(code) = reap(pid) {
            return code;
        }
        let lifeline_broken = match &pidfd {
            Some(p) => {
                let mut fds =
                    [PollFd::new(p.as_fd(), PollFlags::POLLIN), PollFd::new(lifeline.as_fd(), PollFlags::POLLIN)];
                match poll(&mut fds, PollTimeout::NONE) {
                    Ok(_) => fds[1].revents().is_some_and(|r| !r.is_empty()),
                    Err(nix::errno::Errno::EINTR) => false,
                    Err(_) => return 255,
                }
            }
            None => {
                // No pidfd (kernel < 5.3): poll the lifeline with a short timeout.
                let mut fds = [PollFd::new(lifeline.as_fd(), PollFlags::POLLIN)];
                matches!(poll(&mut fds, PollTimeout::from(10u8)), Ok(n) if n > 0)
            }
        };
        if lifeline_broken {
            // The caller is gone (cancelled or dead): take the whole tree down.
            if let Ok(sig) = libcontainer::signal::Signal::try_from(Signal::SIGKILL as i32) {
                let _ = container.kill(sig, true);
            }
            loop {
                match waitpid(pid, None) {
                    Ok(status) => return exit_code(status).unwrap_or(137),
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(_) => return 137,
                }
            }
        }
    }
}

/// Reaps exited children; the init's exit code once it has exited.
fn reap(pid: Pid) -> Option<i32> {
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(_) => return None,
            Ok(status) if status.pid() == Some(pid) => return exit_code(status),
            Ok(_) => continue,
        }
    }
}

fn exit_code(status: WaitStatus) -> Option<i32> {
    match status {
        WaitStatus::Exited(_, code) => Some(code),
        WaitStatus::Signaled(_, sig, _) => Some(128 + sig as i32),
        _ => None,
    }
}

/// libcontainer leaves the per-container cgroup directories on some hosts
/// (cgroup v1 + unified hybrid): remove them, leaf first, if empty.
fn cleanup_cgroups(id: &str) {
    let Ok(roots) = std::fs::read_dir("/sys/fs/cgroup") else { return };
    let mut dirs: Vec<PathBuf> = roots.flatten().map(|e| e.path().join("vessel").join(id)).collect();
    dirs.push(PathBuf::from("/sys/fs/cgroup/vessel").join(id));
    for d in dirs {
        let _ = std::fs::remove_dir(&d);
    }
}
