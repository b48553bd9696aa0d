//! The runner's network: a private namespace's loopback brought up (a
//! namespace the runtime creates has `lo` down).

use std::fs::File;
use std::os::fd::{FromRawFd, OwnedFd};

use super::{Failure, fail};

/// Brings `lo` up in the current network namespace (SIOCSIFFLAGS).
pub(super) fn loopback_up() -> std::io::Result<()> {
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

/// Brings `lo` up in the network namespace libcontainer made for the
/// created (not yet started) container, then returns to the runner's own.
pub(super) fn container_loopback_up(container: &libcontainer::container::Container) -> Result<(), Failure> {
    use nix::sched::{CloneFlags, setns};
    let pid = container.pid().ok_or_else(|| fail("the container has no init pid"))?.as_raw();
    let own = File::open("/proc/self/ns/net").map_err(fail)?;
    let theirs = File::open(format!("/proc/{pid}/ns/net")).map_err(fail)?;
    setns(&theirs, CloneFlags::CLONE_NEWNET).map_err(fail)?;
    let up = loopback_up();
    setns(&own, CloneFlags::CLONE_NEWNET).map_err(fail)?;
    up.map_err(fail)
}
