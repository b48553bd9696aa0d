//! Handing fds to a re-executed child (the youki runner, the containerd
//! watchdog) at the fixed numbers it expects.

use std::os::fd::RawFd;

/// At most this many fds are handed over (a rootless youki run gated on
/// its network takes five: lifeline, status, lock, user namespace, go).
const MAX: usize = 5;

/// Arranges for `cmd`'s child to find each `(fd, at)` pair's `fd` at number
/// `at`, without `FD_CLOEXEC`, whatever number it has in this process
/// (even where a source and a target number collide).
pub(crate) fn hand_over(cmd: &mut tokio::process::Command, fds: &[(RawFd, RawFd)]) {
    assert!(fds.len() <= MAX, "hand_over takes at most {MAX} fds");
    let mut pairs = [(-1, -1); MAX];
    pairs[..fds.len()].copy_from_slice(fds);
    let n = fds.len();
    // SAFETY: runs in the forked child before exec, where only
    // async-signal-safe calls are allowed: fcntl, dup2 and close are, and
    // nothing here allocates. Every source is first duplicated above 10, so
    // a dup2 onto a target can never clobber a source still to be placed.
    unsafe {
        cmd.pre_exec(move || {
            let mut high = [-1; MAX];
            for (h, (fd, _)) in high.iter_mut().zip(&pairs[..n]) {
                *h = nix::libc::fcntl(*fd, nix::libc::F_DUPFD, 10);
                if *h < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            for (h, (_, at)) in high.iter().zip(&pairs[..n]) {
                if nix::libc::dup2(*h, *at) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                nix::libc::close(*h);
            }
            Ok(())
        });
    }
}
