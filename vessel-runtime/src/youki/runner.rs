//! The runner: a fresh, single-threaded process (the re-executed caller)
//! that creates, starts, waits for and deletes one container with
//! libcontainer, then reports the exit code on fd 4 and exits. SIGTERM,
//! SIGINT and SIGHUP (a service manager stopping the caller's process
//! group) make it kill and delete the container before it exits, as the end
//! of its lifeline does. In `cleanup` mode it removes the container of a
//! runner that died.

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

use super::{
    BUNDLE_ENV, CGROUP_PARENT_ENV, ID_ENV, JOIN_USERNS_FD, LIFELINE_FD, LIMITS_ENV, LOCK_FD, MODE_ENV, NETWORK_ENV,
    RUNNER_ENV, STATE_ENV, STATUS_FD, TTY_ENV, USERNS_ENV,
};
use crate::RuntimeError;

/// Runs the container and exits if this process is a runner.
pub(crate) fn maybe_run() {
    if std::env::var_os(RUNNER_ENV).is_none() {
        return;
    }
    if std::env::var(MODE_ENV).as_deref() == Ok("cleanup") {
        std::process::exit(match without_cgroups().map_err(fail).and_then(|()| cleanup()) {
            Ok(()) => 0,
            Err((_, message)) => {
                eprintln!("vessel runner cleanup: {message}");
                1
            }
        });
    }
    let report = match run() {
        Ok((code, oom)) => json!({ "exit": code, "oom": oom }),
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

/// Binds a unix socket `name` in `dir` by a relative path, so a `dir` of
/// any length fits `sun_path` (108 bytes). The runner is single-threaded:
/// changing its working directory for the call is safe.
fn bind_short(dir: &std::path::Path, name: &str) -> std::io::Result<std::os::unix::net::UnixListener> {
    let back = std::env::current_dir()?;
    std::env::set_current_dir(dir)?;
    let bound = std::os::unix::net::UnixListener::bind(name);
    std::env::set_current_dir(back)?;
    bound
}

/// Turns the runner's report into the run's result; `command` is argv[0].
pub(crate) fn parse_report(report: &str, command: &str) -> Option<Result<crate::RunOutcome, RuntimeError>> {
    let v: serde_json::Value = serde_json::from_str(report.trim()).ok()?;
    if let Some(code) = v["exit"].as_i64() {
        return Some(Ok(crate::RunOutcome::new(code as i32, v["oom"].as_bool().unwrap_or(false))));
    }
    let message = v["error"].as_str()?.to_owned();
    Some(Err(match v["kind"].as_str() {
        Some("exec") => crate::error::start_failure(command, &message),
        _ => RuntimeError::Runner(message),
    }))
}

type Failure = (&'static str, String);

fn env(name: &str) -> Result<String, Failure> {
    std::env::var(name).map_err(|_| ("container", format!("runner started without {name}")))
}

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
    ("container", e.to_string())
}

fn run() -> Result<(i32, bool), Failure> {
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
    let stop = stop_signals().map_err(fail)?;
    let (bundle, state, id) = (PathBuf::from(env(BUNDLE_ENV)?), PathBuf::from(env(STATE_ENV)?), env(ID_ENV)?);
    let mut limited = None;
    if crate::rootless::mode().is_rootless() {
        if let Ok(p) = std::env::var(CGROUP_PARENT_ENV) {
            // Still in the process's namespace, where the user's subtree
            // is writable: the run's cgroups, made as container root.
            let l = DelegatedCgroups::make(&p, &id, &env(LIMITS_ENV)?).map_err(fail)?;
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
    let private_net = env(NETWORK_ENV)? != "host";
    let userns = std::env::var_os(USERNS_ENV).is_some();
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
    let tty = std::env::var(TTY_ENV).ok();
    let console = bundle.join("console.sock");
    let listener = match tty {
        Some(_) => Some(bind_short(&bundle, "console.sock").map_err(fail)?),
        None => None,
    };
    let builder = ContainerBuilder::new(id.clone(), SyscallType::default())
        .with_console_socket(listener.as_ref().map(|_| console.clone()))
        .with_root_path(&state)
        .map_err(fail)?
        .with_stdin(dup(0)?)
        .with_stdout(dup(1)?)
        .with_stderr(dup(2)?);
    let built = builder.as_init(&bundle).with_systemd(false).build();
    // The runner itself leaves the run's cgroups: its memory and task are
    // not the container's to pay for.
    let left = limited.as_ref().map_or(Ok(()), DelegatedCgroups::leave);
    let mut container = match built {
        Ok(c) => c,
        Err(e) => {
            cleanup_cgroups(&id);
            let message = chain(&e);
            let kind =
                if message.contains("executable") || message.contains("not found") { "exec" } else { "container" };
            return Err((kind, message));
        }
    };
    let code = match left.map_err(fail).and_then(|()| {
        match (private_net && userns && !joined).then(|| container_loopback_up(&container)) {
            Some(Err(e)) => Err(e),
            _ => Ok(()),
        }
    }) {
        Err(e) => Err(e),
        Ok(()) => supervise(&mut container, listener.as_ref(), tty.as_deref(), &lifeline, &stop),
    };
    // Read before the teardown removes the cgroup.
    let oom = match &limited {
        Some(l) => l.oom_kills() > 0,
        None => crate::oom_kills(&format!("/vessel/{id}")) > 0,
    };
    // One teardown for every outcome once the container exists.
    kill_all(&mut container);
    let deleted = container.delete(true);
    cleanup_cgroups(&id);
    // The caller removes these too, unless a signal just ended it.
    let _ = std::fs::remove_dir_all(&bundle);
    if let Some(root) = state.parent() {
        let _ = std::fs::remove_file(super::lock_file(root, &id));
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
    tty: Option<&str>,
    lifeline: &OwnedFd,
    stop: &OwnedFd,
) -> Result<i32, Failure> {
    let master = match (listener, tty) {
        (Some(l), Some(size)) => Some(receive_master(l, size).map_err(fail)?),
        _ => None,
    };
    // libcontainer links its own nix version: cross over by raw pid.
    let pid = Pid::from_raw(container.pid().ok_or_else(|| fail("the container has no init pid"))?.as_raw());
    if signalled(stop) {
        // Told to stop before the command started: it never runs.
        return Ok(kill_and_wait(pid, container));
    }
    container.start().map_err(fail)?;
    Ok(wait(pid, lifeline, stop, container, master.as_ref()))
}

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
fn stop_signals() -> nix::Result<OwnedFd> {
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

fn signalled(stop: &OwnedFd) -> bool {
    let mut fds = [PollFd::new(stop.as_fd(), PollFlags::POLLIN)];
    matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0)
}

/// Brings `lo` up in the network namespace libcontainer made for the
/// created (not yet started) container, then returns to the runner's own.
fn container_loopback_up(container: &libcontainer::container::Container) -> Result<(), Failure> {
    use nix::sched::{CloneFlags, setns};
    let pid = container.pid().ok_or_else(|| fail("the container has no init pid"))?.as_raw();
    let own = File::open("/proc/self/ns/net").map_err(fail)?;
    let theirs = File::open(format!("/proc/{pid}/ns/net")).map_err(fail)?;
    setns(&theirs, CloneFlags::CLONE_NEWNET).map_err(fail)?;
    let up = loopback_up();
    setns(&own, CloneFlags::CLONE_NEWNET).map_err(fail)?;
    up.map_err(fail)
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

/// `cleanup` mode: removes the container `ID` of a runner that died.
fn cleanup() -> Result<(), Failure> {
    let (state, id) = (PathBuf::from(env(STATE_ENV)?), env(ID_ENV)?);
    let dir = state.join(&id);
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
    cleanup_cgroups(&id);
    Ok(())
}

/// A pidfd for `pid`: readable when it exits. (No signal mask games: a
/// blocked SIGCHLD would be inherited by the container's processes.)
fn pidfd(pid: Pid) -> Option<OwnedFd> {
    let pid = rustix::process::Pid::from_raw(pid.as_raw())?;
    rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()).ok()
}

/// Waits for the init process; if the lifeline breaks first, kills
/// everything in the container and waits for that.
fn wait(
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

/// Receives the pty master from the console socket and sizes the terminal.
fn receive_master(listener: &std::os::unix::net::UnixListener, size: &str) -> std::io::Result<OwnedFd> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    use std::os::fd::AsRawFd;
    let (stream, _) = listener.accept()?;
    let mut buf = [0u8; 256];
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let msg = recvmsg::<()>(stream.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)?;
    let fd = msg
        .cmsgs()?
        .find_map(|c| match c {
            ControlMessageOwned::ScmRights(fds) => fds.first().copied(),
            _ => None,
        })
        .ok_or_else(|| std::io::Error::other("no pty master on the console socket"))?;
    // SAFETY: SCM_RIGHTS handed this process a fresh fd that nothing else owns.
    let master = unsafe { OwnedFd::from_raw_fd(fd) };
    let (rows, cols) = size.split_once(',').unwrap_or(("24", "80"));
    let ws = rustix::termios::Winsize {
        ws_row: rows.parse().unwrap_or(24),
        ws_col: cols.parse().unwrap_or(80),
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    rustix::termios::tcsetwinsize(&master, ws)?;
    Ok(master)
}

/// Copies between the pty master and the runner's stdio (the caller's pipes).
struct TtyProxy<'a> {
    master: &'a OwnedFd,
    /// False once the terminal hung up (no process holds it any more).
    master_open: bool,
    stdin_open: bool,
}

impl<'a> TtyProxy<'a> {
    fn new(master: &'a OwnedFd) -> Self {
        Self { master, master_open: true, stdin_open: true }
    }

    fn stdin(&self) -> BorrowedFd<'static> {
        // SAFETY: fd 0 is open for the whole life of this process.
        unsafe { BorrowedFd::borrow_raw(0) }
    }

    /// The master (while open), then stdin (while open), in this order.
    fn poll_fds(&self) -> Vec<PollFd<'_>> {
        let mut v = Vec::new();
        if self.master_open {
            v.push(PollFd::new(self.master.as_fd(), PollFlags::POLLIN));
        }
        if self.stdin_open {
            v.push(PollFd::new(self.stdin(), PollFlags::POLLIN));
        }
        v
    }

    /// Moves whatever is ready: `ready` follows `poll_fds`' order.
    fn pump(&mut self, ready: &[bool]) {
        let mut buf = [0u8; 64 * 1024];
        let mut ready = ready.iter();
        if self.master_open && ready.next() == Some(&true) {
            match nix::unistd::read(self.master, &mut buf) {
                Ok(n) if n > 0 => write_all(1, &buf[..n]),
                // EIO: every slave fd is closed.
                _ => self.master_open = false,
            }
        }
        if self.stdin_open && ready.next() == Some(&true) {
            match nix::unistd::read(self.stdin(), &mut buf) {
                Ok(0) | Err(_) => self.stdin_open = false,
                Ok(n) => write_all_fd(self.master.as_fd(), &buf[..n]),
            }
        }
    }

    /// After the init exited: what is still buffered in the terminal.
    fn drain(&mut self) {
        let mut buf = [0u8; 64 * 1024];
        while self.master_open {
            let mut fds = [PollFd::new(self.master.as_fd(), PollFlags::POLLIN)];
            if !matches!(poll(&mut fds, PollTimeout::from(50u8)), Ok(n) if n > 0) {
                return;
            }
            match nix::unistd::read(self.master, &mut buf) {
                Ok(n) if n > 0 => write_all(1, &buf[..n]),
                _ => self.master_open = false,
            }
        }
    }
}

fn write_all(fd: i32, data: &[u8]) {
    // SAFETY: fds 0-2 are open for the whole life of this process.
    write_all_fd(unsafe { BorrowedFd::borrow_raw(fd) }, data);
}

fn write_all_fd(fd: BorrowedFd<'_>, mut data: &[u8]) {
    while !data.is_empty() {
        match nix::unistd::write(fd, data) {
            Ok(n) => data = &data[n..],
            Err(nix::errno::Errno::EINTR) => {}
            Err(_) => return,
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

/// Rootless with a delegated subtree: run `id`'s memory, cpu and pids
/// cgroups (v1), made and limited by the runner itself, held by dir fds so
/// they stay reachable once `/sys/fs/cgroup` is hidden from libcontainer.
/// They live in the subtree's `runs` cgroup, made by a runner as container
/// root, so that the runner may still remove them once it is in the
/// container's user namespace (the subtree itself is the user's, whose id
/// is not mapped there); dropped, they are removed. The caller removes them
/// too if the runner dies (see `rootless::remove_delegated`).
struct DelegatedCgroups {
    id: String,
    dirs: Vec<(&'static str, File)>,
    /// `runs` in each.
    runs: Vec<File>,
    /// The subtree's own `cgroup.procs` in each, opened for writing while
    /// the runner may (before it joins the container's user namespace).
    parents: Vec<File>,
}

impl DelegatedCgroups {
    /// `limits`: `memory,cpu quota,pids`, each empty for none.
    fn make(parent: &str, id: &str, limits: &str) -> std::io::Result<Self> {
        let mut l = limits.split(',').map(|v| v.parse::<i64>().ok());
        let (memory, cpu, pids) = (l.next().flatten(), l.next().flatten(), l.next().flatten());
        let mut this = Self { id: id.to_owned(), dirs: Vec::new(), runs: Vec::new(), parents: Vec::new() };
        for c in crate::rootless::LIMIT_CONTROLLERS {
            let m = crate::rootless::v1_mount(c).ok_or_else(|| std::io::Error::other(format!("no {c} cgroup")))?;
            this.parents.push(std::fs::OpenOptions::new().write(true).open(m.join(parent).join("cgroup.procs"))?);
            let runs = m.join(parent).join(crate::rootless::RUNS_CGROUP);
            match std::fs::create_dir(&runs) {
                Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(e),
                _ => this.runs.push(File::open(&runs)?),
            }
            let dir = runs.join(id);
            std::fs::create_dir(&dir)?;
            let write = |f: &str, v: String| std::fs::write(dir.join(f), v);
            match c {
                "memory" => {
                    if let Some(b) = memory {
                        write("memory.limit_in_bytes", b.to_string())?;
                        // No swap on top, where swap is accounted.
                        let swap = dir.join("memory.memsw.limit_in_bytes");
                        if swap.exists() {
                            std::fs::write(swap, b.to_string())?;
                        }
                    }
                }
                "cpu" => {
                    if let Some(q) = cpu {
                        write("cpu.cfs_period_us", "100000".into())?;
                        write("cpu.cfs_quota_us", q.to_string())?;
                    }
                }
                _ => {
                    if let Some(p) = pids {
                        write("pids.max", p.to_string())?;
                    }
                }
            }
            this.dirs.push((c, File::open(&dir)?));
        }
        Ok(this)
    }

    fn file(dir: &File, name: &str) -> PathBuf {
        use std::os::fd::AsRawFd;
        PathBuf::from(format!("/proc/self/fd/{}/{name}", dir.as_raw_fd()))
    }

    /// Moves this process into every one of them.
    fn join(&self) -> std::io::Result<()> {
        for (_, d) in &self.dirs {
            std::fs::write(Self::file(d, "cgroup.procs"), std::process::id().to_string())?;
        }
        Ok(())
    }

    /// Moves this process back up into the delegated subtree.
    fn leave(&self) -> std::io::Result<()> {
        for mut f in &self.parents {
            f.write_all(std::process::id().to_string().as_bytes())?;
        }
        Ok(())
    }

    /// Removes the run's cgroups; false while one still has a task.
    fn remove(&self) -> bool {
        crate::rootless::remove_cgroups(self.runs.iter().map(|r| Self::file(r, &self.id)))
    }

    /// How many processes the OOM killer killed in the memory cgroup.
    fn oom_kills(&self) -> u64 {
        let Some((_, d)) = self.dirs.iter().find(|(c, _)| *c == "memory") else { return 0 };
        let text = std::fs::read_to_string(Self::file(d, "memory.oom_control")).unwrap_or_default();
        text.lines().find_map(|l| l.strip_prefix("oom_kill ")?.trim().parse().ok()).unwrap_or(0)
    }
}

impl Drop for DelegatedCgroups {
    fn drop(&mut self) {
        // The container's last tasks may still be exiting after its init.
        for _ in 0..100 {
            if self.remove() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}

/// Rootless: shows libcontainer a cgroup2 tree of a cgroup namespace of
/// this runner's own (mounted in a mount namespace of its own), so it
/// takes the cgroup v2 path, where a cgroup this user may not create is
/// skipped, not fatal (on the host's v1 controllers it would fail
/// outright). The limits are then reported unavailable, not applied.
fn without_cgroups() -> nix::Result<()> {
    if !crate::rootless::mode().is_rootless() {
        return Ok(());
    }
    use nix::mount::{MsFlags, mount};
    use nix::sched::CloneFlags;
    nix::sched::unshare(CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWCGROUP)?;
    mount(
        Some("cgroup2"),
        "/sys/fs/cgroup",
        Some("cgroup2"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
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
