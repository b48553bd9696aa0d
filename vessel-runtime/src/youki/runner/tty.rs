//! The runner's terminal: the pty master received over the console
//! socket, sized, and copied to and from the caller's pipes.

use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

/// Binds a unix socket `name` in `dir` by a relative path, so a `dir` of
/// any length fits `sun_path` (108 bytes). The runner is single-threaded:
/// changing its working directory for the call is safe.
pub(super) fn bind_short(dir: &std::path::Path, name: &str) -> std::io::Result<std::os::unix::net::UnixListener> {
    let back = std::env::current_dir()?;
    std::env::set_current_dir(dir)?;
    let bound = std::os::unix::net::UnixListener::bind(name);
    std::env::set_current_dir(back)?;
    bound
}

/// Receives the pty master from the console socket and sizes the terminal.
pub(super) fn receive_master(
    listener: &std::os::unix::net::UnixListener,
    (rows, cols): (u16, u16),
) -> std::io::Result<OwnedFd> {
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
    let ws = rustix::termios::Winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
    rustix::termios::tcsetwinsize(&master, ws)?;
    Ok(master)
}

/// Copies between the pty master and the runner's stdio (the caller's pipes).
pub(super) struct TtyProxy<'a> {
    master: &'a OwnedFd,
    /// False once the terminal hung up (no process holds it any more).
    master_open: bool,
    stdin_open: bool,
}

impl<'a> TtyProxy<'a> {
    pub(super) fn new(master: &'a OwnedFd) -> Self {
        Self { master, master_open: true, stdin_open: true }
    }

    fn stdin(&self) -> BorrowedFd<'static> {
        // SAFETY: fd 0 is open for the whole life of this process.
        unsafe { BorrowedFd::borrow_raw(0) }
    }

    /// The master (while open), then stdin (while open), in this order.
    pub(super) fn poll_fds(&self) -> Vec<PollFd<'_>> {
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
    pub(super) fn pump(&mut self, ready: &[bool]) {
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
    pub(super) fn drain(&mut self) {
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
