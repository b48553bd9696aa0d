//! The runner: a fresh, single-threaded process (the re-executed caller)
//! that creates, starts, waits for and deletes one container with
//! libcontainer, then reports how it ended on its status fd and exits
//! (what it is told and what it says: `protocol`). SIGTERM, SIGINT and
//! SIGHUP (a service manager stopping the caller's process group) make it
//! kill and delete the container before it exits, as the end of its
//! lifeline does. A `cleanup` runner removes the container of a runner that
//! died. Its parts: `wait` (the init, the lifeline, the stop signals), `tty`
//! (the console socket and the pty), `net` (loopback); its cgroups are
//! `crate::cgroups`.

mod net;
mod tty;
mod wait;

use std::fs::File;
use std::io::Write;
use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd};
use std::path::Path;

use libcontainer::container::builder::ContainerBuilder;
use libcontainer::syscall::syscall::SyscallType;
use nix::sys::signal::Signal;
use nix::sys::wait::waitpid;
use nix::unistd::Pid;

use super::protocol::{
    FailureKind, GO_FD, JOIN_USERNS_FD, LIFELINE_FD, LOCK_FD, Report, Run, RunnerConfig, STATUS_FD, Task,
};
use crate::cgroups::{RunCgroups, cleanup_run, without_cgroups};
use net::{container_loopback_up, loopback_up};
use tty::{bind_short, receive_master};
use wait::{exit_code, signalled, stop_signals, wait};

/// Runs the container and exits if this process is a runner.
pub(crate) fn maybe_run() {
    let config = match RunnerConfig::from_env() {
        None => return,
        Some(Ok(c)) => c,
        Some(Err(message)) => {
            eprintln!("vessel runner: {message}");
            std::process::exit(1);
        }
    };
    let report = match &config.task {
        Task::Cleanup { id } => {
            std::process::exit(match without_cgroups().map_err(fail).and_then(|()| cleanup(&config.state, id)) {
                Ok(()) => 0,
                Err((_, message)) => {
                    eprintln!("vessel runner cleanup: {message}");
                    1
                }
            });
        }
        Task::Run(r) => match run(&config.state, r) {
            Ok((code, oom)) => Report::Exited { code, oom },
            Err((kind, message)) => Report::Failed { kind, message },
        },
    };
    // SAFETY: the parent placed the status pipe's write end at STATUS_FD
    // (see YoukiRuntime::run) and nothing else in this process owns it.
    let mut status = File::from(unsafe { OwnedFd::from_raw_fd(STATUS_FD) });
    let _ = writeln!(status, "{}", report.to_line());
    std::process::exit(0);
}

type Failure = (FailureKind, String);

/// An error with its sources ("io error" alone tells nothing).
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

fn fail(e: impl std::fmt::Display) -> Failure {
    (FailureKind::Container, e.to_string())
}

fn run(state: &Path, r: &Run) -> Result<(i32, bool), Failure> {
    // Close-on-exec keeps the parent's fds out of the container.
    for fd in [LIFELINE_FD, STATUS_FD, LOCK_FD] {
        // SAFETY: the parent placed these fds for this process alone; they
        // stay open for its whole life (owned below or by `maybe_run`).
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::CLOEXEC).map_err(fail)?;
    }
    // SAFETY: as above, LIFELINE_FD is this process's and is owned once, here.
    let lifeline = unsafe { OwnedFd::from_raw_fd(LIFELINE_FD) };
    // SAFETY: as above; the lock is held (shared with the caller) for as
    // long as this process lives, so it is owned here and never closed early.
    let _lock = unsafe { OwnedFd::from_raw_fd(LOCK_FD) };
    let go = match r.gated {
        true => {
            // SAFETY: the parent placed the go pipe's read end at GO_FD for
            // a gated run, for this process alone; it is owned once, here.
            let go = unsafe { OwnedFd::from_raw_fd(GO_FD) };
            rustix::io::fcntl_setfd(&go, rustix::io::FdFlags::CLOEXEC).map_err(fail)?;
            Some(go)
        }
        false => None,
    };
    let stop = stop_signals().map_err(fail)?;
    let (bundle, id) = (&r.bundle, &r.id);
    // A vessel's network first: joining it takes a capability over its
    // owner, which this runner holds until it enters the container's user
    // namespace (rootless) or always has (host root).
    if let Some(netns) = &r.join_network {
        let ns = std::fs::File::open(netns).map_err(fail)?;
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(fail)?;
    }
    let mut limited = None;
    if crate::rootless::mode().is_rootless() {
        if let Some(c) = &r.cgroups {
            // Still in the process's namespace, where the user's subtree
            // is writable: the run's cgroups, made as container root.
            let l = RunCgroups::make(c, id).map_err(fail)?;
            // The container's processes inherit them from this runner: it
            // cannot move them in later once they run as a user not its
            // own (cgroup v1 lets only root or the same uid move a task).
            l.join().map_err(fail)?;
            limited = Some(l);
        }
        // SAFETY: the parent placed the namespace fd here for this process
        // alone; it is owned (and closed) once, here.
        let ns = unsafe { OwnedFd::from_raw_fd(JOIN_USERNS_FD) };
        // This process has one thread, as joining a user namespace requires.
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWUSER).map_err(fail)?;
        without_cgroups().map_err(fail)?;
    }
    let (private_net, userns) = (r.private_network, r.userns);
    // Rootless, this runner is already in the container's user namespace:
    // a network namespace it makes is that namespace's, as it must be for
    // the container to mount sysfs.
    let joined = crate::rootless::mode().is_rootless();
    if private_net && (!userns || joined) {
        // This runner serves one container, which shares its network
        // namespace: make it private, with loopback up. (With a user
        // namespace, libcontainer creates it inside, see below.)
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).map_err(fail)?;
        loopback_up().map_err(fail)?;
    }

    let dup = |fd: i32| -> Result<OwnedFd, Failure> {
        // SAFETY: 0, 1 and 2 are open for the whole life of this process.
        unsafe { BorrowedFd::borrow_raw(fd) }.try_clone_to_owned().map_err(fail)
    };
    let console = bundle.join("console.sock");
    let listener = match r.tty {
        Some(_) => Some(bind_short(bundle, "console.sock").map_err(fail)?),
        None => None,
    };
    let builder = ContainerBuilder::new(id.clone(), SyscallType::default())
        .with_console_socket(listener.as_ref().map(|_| console.clone()))
        .with_root_path(state)
        .map_err(fail)?
        .with_stdin(dup(0)?)
        .with_stdout(dup(1)?)
        .with_stderr(dup(2)?);
    let built = builder.as_init(bundle).with_systemd(false).build();
    // The runner itself leaves the run's cgroups: its memory and task are
    // not the container's to pay for.
    let left = limited.as_ref().map_or(Ok(()), RunCgroups::leave);
    let mut container = match built {
        Ok(c) => c,
        Err(e) => {
            cleanup_run(id);
            let message = chain(&e);
            let exec = message.contains("executable") || message.contains("not found");
            return Err((if exec { FailureKind::Exec } else { FailureKind::Container }, message));
        }
    };
    let code = match left.map_err(fail).and_then(|()| {
        match (private_net && userns && !joined).then(|| container_loopback_up(&container)) {
            Some(Err(e)) => Err(e),
            _ => Ok(()),
        }
    }) {
        Err(e) => Err(e),
        Ok(()) => supervise(&mut container, listener.as_ref(), r.tty, &lifeline, &stop, go.as_ref()),
    };
    // Read before the teardown removes the cgroup.
    let oom = match &limited {
        Some(l) => l.oom_kills() > 0,
        None => crate::cgroups::oom_kills(&format!("/vessel/{id}")) > 0,
    };
    // One teardown for every outcome once the container exists.
    kill_all(&mut container);
    let deleted = container.delete(true);
    cleanup_run(id);
    // The caller removes these too, unless a signal just ended it.
    let _ = std::fs::remove_dir_all(bundle);
    if let Some(root) = state.parent() {
        let _ = std::fs::remove_file(super::lock_file(root, id));
    }
    let code = code?;
    deleted.map_err(fail)?;
    Ok((code, oom))
}

/// Starts the created container and waits for its init (with a terminal, the
/// init first sends the pty master over the console socket).
fn supervise(
    container: &mut libcontainer::container::Container,
    listener: Option<&std::os::unix::net::UnixListener>,
    tty: Option<(u16, u16)>,
    lifeline: &OwnedFd,
    stop: &OwnedFd,
    go: Option<&OwnedFd>,
) -> Result<i32, Failure> {
    let master = match (listener, tty) {
        (Some(l), Some(size)) => Some(receive_master(l, size).map_err(fail)?),
        _ => None,
    };
    // libcontainer links its own nix version: cross over by raw pid.
    let pid = Pid::from_raw(container.pid().ok_or_else(|| fail("the container has no init pid"))?.as_raw());
    if signalled(stop) || go.is_some_and(|g| !go_given(g)) {
        // Told to stop (or not to go) before the command started: it never runs.
        return Ok(kill_and_wait(pid, container));
    }
    container.start().map_err(fail)?;
    Ok(wait(pid, lifeline, stop, container, master.as_ref()))
}

/// Waits for the caller's go: a byte on `go`. End of file (the caller
/// refused, gave up or died) or an error is no go.
fn go_given(go: &OwnedFd) -> bool {
    let mut byte = [0u8; 1];
    loop {
        match nix::unistd::read(go, &mut byte) {
            Ok(n) => return n == 1,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return false,
        }
    }
}

/// SIGKILL to every process of the container (best effort: what is
/// already gone is fine).
fn kill_all(container: &mut libcontainer::container::Container) {
    if let Ok(sig) = libcontainer::signal::Signal::try_from(Signal::SIGKILL as i32) {
        let _ = container.kill(sig, true);
    }
    // libcontainer finds "all" through the cgroup, which a rootless
    // container lacks: the end of its pid namespace's init ends them all.
    if let Some(pid) = container.pid() {
        let _ = nix::sys::signal::kill(Pid::from_raw(pid.as_raw()), Signal::SIGKILL);
    }
}

/// Kills everything in the container and waits for its init.
fn kill_and_wait(pid: Pid, container: &mut libcontainer::container::Container) -> i32 {
    kill_all(container);
    loop {
        match waitpid(pid, None) {
            Ok(status) => return exit_code(status).unwrap_or(137),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return 137,
        }
    }
}

/// `cleanup` mode: removes the container `id` of a runner that died.
fn cleanup(state: &Path, id: &str) -> Result<(), Failure> {
    let dir = state.join(id);
    if dir.exists() {
        let mut container = libcontainer::container::Container::load(dir.clone()).map_err(fail)?;
        kill_all(&mut container);
        if let Err(e) = container.delete(true) {
            // A container that died half-made may not load its cgroup: its
            // state is all that is left.
            let _ = std::fs::remove_dir_all(&dir);
            if dir.exists() {
                return Err(fail(e));
            }
        }
    }
    cleanup_run(id);
    Ok(())
}
