//! A rootless vessel's uplink: `pasta` (Debian's passt, podman's default
//! rootless network) attached to the vessel's namespace. It gives the
//! namespace a tap interface carrying the host's address and forwards its
//! connections through ordinary sockets of the user, so nothing needs
//! root. `--no-map-gw` keeps the gateway from reaching the host's loopback,
//! and no port is forwarded (pasta's default splices loopback ports both
//! ways); the vessel's filter, in its namespace, refuses the rest by policy.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{in_ns, run_dir};
use crate::RuntimeError;

/// The `pasta` executable, if installed.
pub(super) fn binary() -> Option<PathBuf> {
    crate::rootless::find_tool("pasta")
}

fn pid_file(n: u32) -> PathBuf {
    run_dir().join(format!("pasta-{n}.pid"))
}

/// Starts pasta on `netns` (IPv6 too if `ipv6`) and waits until the
/// namespace has its addresses.
pub(super) fn start(n: u32, netns: &Path, ipv6: bool) -> Result<Child, RuntimeError> {
    let bin = binary()
        .ok_or_else(|| RuntimeError::Unavailable { backend: "network", reason: "pasta is not installed".into() })?;
    let mut cmd = Command::new(&bin);
    cmd.args(["--foreground", "--quiet", "--no-map-gw", "--config-net", "--no-dhcp", "--no-ra", "--no-dhcpv6"]);
    // Addresses and routes come from --config-net; pasta answers neighbour
    // solicitations for its gateway only when IPv6 is on.
    cmd.args(if ipv6 { &[][..] } else { &["--ipv4-only", "--no-ndp"][..] });
    let mut child = cmd
        // No port forwarding either way: pasta's default splices the
        // namespace's loopback ports to the host's (its services, other
        // vessels' published ports), and inbound is only published ports.
        .args(["-t", "none", "-u", "none", "-T", "none", "-U", "none"])
        .arg("--pid")
        .arg(pid_file(n))
        .arg("--netns")
        .arg(netns)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(RuntimeError::io("run", &bin))?;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if has_address(netns, false) && (!ipv6 || has_address(netns, true)) {
            return Ok(child);
        }
        if let Ok(Some(status)) = child.try_wait() {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            return Err(RuntimeError::Call {
                backend: "pasta",
                op: "connect the vessel's namespace",
                source: format!("{status}: {}", err.trim()).into(),
            });
        }
        if Instant::now() > deadline {
            stop(n, child);
            return Err(RuntimeError::Call {
                backend: "pasta",
                op: "connect the vessel's namespace",
                source: "no address within 5 s".into(),
            });
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Whether an interface of `netns` other than loopback has an IPv4 (or,
/// with `v6`, a global IPv6) address.
fn has_address(netns: &Path, v6: bool) -> bool {
    in_ns(Some(netns), || {
        nix::ifaddrs::getifaddrs()
            .map(|mut a| {
                a.any(|i| {
                    let addr = i.address.as_ref();
                    i.interface_name != "lo"
                        && if v6 {
                            addr.and_then(|s| s.as_sockaddr_in6()).is_some_and(|s| !s.ip().is_unicast_link_local())
                        } else {
                            addr.and_then(|s| s.as_sockaddr_in()).is_some()
                        }
                })
            })
            .unwrap_or(false)
    })
    .unwrap_or(false)
}

/// Stops a pasta this process started.
pub(super) fn stop(n: u32, mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_file(pid_file(n));
}

/// Kills the pasta a dead process left on slot `n`, if it still runs.
pub(super) fn remove(n: u32) {
    let file = pid_file(n);
    if let Some(pid) = std::fs::read_to_string(&file).ok().and_then(|p| p.trim().parse::<i32>().ok()) {
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.trim() == "pasta" || comm.trim() == "passt" {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
    }
    let _ = std::fs::remove_file(file);
}

/// Whether slot `n`'s pasta (its pid file) is still there.
pub(super) fn running(n: u32) -> bool {
    pid_file(n).exists()
}
