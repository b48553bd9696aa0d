//! How the runner waits: for its container's init (a pidfd), its caller's
//! lifeline and the stop signals, killing the whole container when either
//! of the latter comes first.

use std::os::fd::{AsFd, OwnedFd};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::Signal;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

use super::kill_and_wait;
use super::tty::TtyProxy;

/// The write end of the stop pipe, for the signal handler.
static STOP_FD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

extern "C" fn on_stop_signal(_: nix::libc::c_int) {
    let fd = STOP_FD.load(std::sync::atomic::Ordering::Relaxed);
    // SAFETY: write(2) is async-signal-safe; fd is the stop pipe's write
    // end, open for the life of the process (a full pipe just drops the byte).
    unsafe {
        nix::libc::write(fd, [1u8].as_ptr().cast(), 1);
    }
}

/// Makes SIGTERM, SIGINT and SIGHUP readable on the returned pipe instead
/// of killing this process outright (which would leave the container
/// running). Handlers, unlike a blocked mask, do not reach the container:
/// exec resets them to the default.
pub(super) fn stop_signals() -> nix::Result<OwnedFd> {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, sigaction};
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)?;
    STOP_FD.store(std::os::fd::IntoRawFd::into_raw_fd(w), std::sync::atomic::Ordering::Relaxed);
    let action = SigAction::new(SigHandler::Handler(on_stop_signal), SaFlags::SA_RESTART, SigSet::empty());
    for sig in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        // SAFETY: the handler only makes an async-signal-safe write.
        unsafe { sigaction(sig, &action) }?;
    }
    Ok(r)
}

pub(super) fn signalled(stop: &OwnedFd) -> bool {
    let mut fds = [PollFd::new(stop.as_fd(), PollFlags::POLLIN)];
    matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0)
}

/// A pidfd for `pid`: readable when it exits. (No signal mask games: a
/// blocked SIGCHLD would be inherited by the container's processes.)
fn pidfd(pid: Pid) -> Option<OwnedFd> {
    let pid = rustix::process::Pid::from_raw(pid.as_raw())?;
    rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()).ok()
}

/// Waits for the init process; if the lifeline breaks first, kills
/// everything in the container and waits for that.
pub(super) fn wait(
    pid: Pid,
    lifeline: &OwnedFd,
    stop: &OwnedFd,
    container: &mut libcontainer::container::Container,
    master: Option<&OwnedFd>,
) -> i32 {
    let pidfd = pidfd(pid);
    let mut tty = master.map(TtyProxy::new);
    loop {
        if let Some(code) = reap(pid) {
            if let Some(t) = &mut tty {
                t.drain();
            }
            return code;
        }
        let lifeline_broken = match &pidfd {
            Some(p) => {
                let mut fds = vec![
                    PollFd::new(p.as_fd(), PollFlags::POLLIN),
                    PollFd::new(lifeline.as_fd(), PollFlags::POLLIN),
                    PollFd::new(stop.as_fd(), PollFlags::POLLIN),
                ];
                if let Some(t) = &tty {
                    fds.extend(t.poll_fds());
                }
                match poll(&mut fds, PollTimeout::NONE) {
                    Ok(_) => {
                        let broken = fds[1..3].iter().any(|f| f.revents().is_some_and(|r| !r.is_empty()));
                        let ready: Vec<bool> =
                            fds[3..].iter().map(|f| f.revents().is_some_and(|r| !r.is_empty())).collect();
                        drop(fds);
                        if let Some(t) = &mut tty {
                            t.pump(&ready);
                        }
                        broken
                    }
                    Err(nix::errno::Errno::EINTR) => false,
                    Err(_) => return 255,
                }
            }
            None => {
                // No pidfd (kernel < 5.3): poll the lifeline with a short timeout.
                let mut fds =
                    [PollFd::new(lifeline.as_fd(), PollFlags::POLLIN), PollFd::new(stop.as_fd(), PollFlags::POLLIN)];
                let broken = matches!(poll(&mut fds, PollTimeout::from(10u8)), Ok(n) if n > 0);
                if let Some(t) = &mut tty {
                    t.drain();
                }
                broken
            }
        };
        if lifeline_broken {
            // The caller is gone (cancelled or dead) or we were told to
            // stop: take the whole tree down.
            return kill_and_wait(pid, container);
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

pub(super) fn exit_code(status: WaitStatus) -> Option<i32> {
    match status {
        WaitStatus::Exited(_, code) => Some(code),
        WaitStatus::Signaled(_, sig, _) => Some(128 + sig as i32),
        _ => None,
    }
}
