//! Rootless mode: vessel run by an ordinary user, as podman and buildah run
//! rootless (their `unshare` re-entry), with the user's subordinate ids.
//!
//! [`crate::init`] moves the whole process, before any thread starts, into
//! a user namespace of its own and a private mount namespace owned by it:
//!
//! ```text
//! uid_map: 0 <first subordinate uid> 65536     container ids 0..65536
//!          65536 <the user's uid> 1           the user, for its own files
//! ```
//!
//! (`newuidmap`/`newgidmap`, which check `/etc/subuid` and `/etc/subgid`;
//! root writes the maps itself.) The process keeps the user's own id
//! (65536 inside, so what it writes elsewhere stays the user's) and holds
//! every capability *in that namespace only*: it mounts overlays (kernel
//! overlayfs with `userxattr`), owns its files as container ids, and runs
//! containers, all without any privilege on the host. Its mounts live and
//! die with its mount namespace: a crash leaves none behind.
//!
//! Containers run in a further user namespace mapping container ids
//! `0..65536` to the same ids of the process's namespace: container root is
//! the first *subordinate* id on the host, never the user, so a process
//! that escapes its container still cannot act as the user (read
//! `~/.ssh`, signal the user's processes). All of a user's vessels share
//! that one range: without idmapped mounts (which an unprivileged user may
//! not make) a layer cache shared by vessels must hold one set of ids.

use std::fs;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::OnceLock;

use nix::libc;

use crate::IdMapping;

/// `1` (enter rootless mode, even as root), `0` (never); unset: rootless
/// for every user but root.
pub const ROOTLESS_ENV: &str = "VESSEL_ROOTLESS";

/// Set in a process that could not enter rootless mode (and inherited by
/// its children): why.
const REFUSED_ENV: &str = "VESSEL_ROOTLESS_REFUSED";

/// Set for the re-execution inside the namespace, which then takes the
/// user's own id (see [`finish`]).
const ENTERED_ENV: &str = "VESSEL_ROOTLESS_ENTERED";

/// The ids of the process's namespace that containers get: the whole range
/// below the user's own id.
pub const CONTAINER_IDS: u32 = 65536;

/// The user's own id inside the namespace.
pub const OWN_ID: u32 = CONTAINER_IDS;

/// The subordinate range root uses with `VESSEL_ROOTLESS=1` when
/// `/etc/subuid` gives it none: above vessel's rootful id pool (which ends
/// at 2^30 + 2^29), below 2^31.
pub const ROOT_DEFAULT_SUBORDINATE: u32 = 0x7000_0000;

/// How this process runs containers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// As root on the host.
    Rootful,
    /// In a rootless user namespace.
    Rootless,
    /// Rootless was asked for (or is the default) but cannot be entered:
    /// why.
    Unavailable(String),
}

impl Mode {
    /// Whether the process is in rootless mode.
    pub fn is_rootless(&self) -> bool {
        *self == Self::Rootless
    }
}

/// The process's mode: read once from its user namespace (a process in a
/// namespace mapping at least the container ids from 0 is rootless).
pub fn mode() -> &'static Mode {
    static MODE: OnceLock<Mode> = OnceLock::new();
    MODE.get_or_init(|| {
        if let Ok(why) = std::env::var(REFUSED_ENV) {
            return Mode::Unavailable(why);
        }
        match read_uid_map() {
            Some(map) if map == [(0, 0, u32::MAX)] => {
                if nix::unistd::geteuid().is_root() {
                    Mode::Rootful
                } else {
                    Mode::Unavailable(
                        "rootless mode is entered in vessel's init(), which this process did not call first".into(),
                    )
                }
            }
            Some(map) if map.iter().any(|&(inside, _, n)| inside == 0 && n >= CONTAINER_IDS) => Mode::Rootless,
            Some(_) => Mode::Unavailable(format!(
                "this process is in a user namespace that does not map container ids 0..{CONTAINER_IDS}"
            )),
            None => Mode::Unavailable("cannot read /proc/self/uid_map".into()),
        }
    })
}

/// The mapping of container ids in the process's namespace (rootless mode).
pub fn container_mapping() -> IdMapping {
    IdMapping { host_id: 0, size: CONTAINER_IDS }
}

/// The user's id on the host: in rootless mode, what the namespace maps
/// [`OWN_ID`] to; otherwise the real uid.
pub fn host_uid() -> u32 {
    read_uid_map()
        .and_then(|m| m.iter().find(|&&(inside, _, _)| inside == OWN_ID).map(|&(_, outside, _)| outside))
        .filter(|_| mode().is_rootless())
        .unwrap_or_else(|| nix::unistd::getuid().as_raw())
}

pub use crate::cgroups::{LIMIT_CONTROLLERS, delegated_cgroups, v1_mount};

/// `/proc/self/uid_map` as (inside, outside, count) lines.
fn read_uid_map() -> Option<Vec<(u32, u32, u32)>> {
    let text = fs::read_to_string("/proc/self/uid_map").ok()?;
    text.lines()
        .map(|l| {
            let mut f = l.split_whitespace().map(str::parse::<u32>);
            Some((f.next()?.ok()?, f.next()?.ok()?, f.next()?.ok()?))
        })
        .collect()
}

/// Whether this process is in a user namespace other than the initial one.
pub fn in_user_namespace() -> bool {
    read_uid_map().is_some_and(|m| m != [(0, 0, u32::MAX)])
}

/// The first subordinate id of `user` (name or numeric id) in `file` with
/// at least [`CONTAINER_IDS`] ids, as `newuidmap` reads it.
fn subordinate(file: &str, name: &str, id: u32) -> Result<u32, String> {
    let text = fs::read_to_string(file).map_err(|e| format!("cannot read {file}: {e}"))?;
    let id = id.to_string();
    for line in text.lines() {
        let mut f = line.trim().split(':');
        let (Some(who), Some(start), Some(count)) = (f.next(), f.next(), f.next()) else { continue };
        if who != name && who != id {
            continue;
        }
        if let (Ok(start), Ok(count)) = (start.parse::<u32>(), count.parse::<u32>())
            && count >= CONTAINER_IDS
        {
            return Ok(start);
        }
    }
    Err(format!(
        "{file} gives {name} no range of {CONTAINER_IDS} ids (add one with `usermod --add-subuids`/`--add-subgids`)"
    ))
}

/// Enters rootless mode if this process should (see [`ROOTLESS_ENV`]); a
/// failure leaves the process as it was and is what [`mode`] reports.
/// Must run while the process has one thread (joining a user namespace
/// requires it).
pub(crate) fn maybe_enter() {
    let wanted = match std::env::var(ROOTLESS_ENV).as_deref() {
        Ok("1") => true,
        Ok("0") => false,
        _ => !nix::unistd::geteuid().is_root(),
    };
    if std::env::var_os(ENTERED_ENV).is_some() {
        finish();
        return;
    }
    if !wanted || in_user_namespace() || std::env::var_os(REFUSED_ENV).is_some() {
        return;
    }
    if let Err(why) = enter() {
        // SAFETY: init runs before any thread exists (its documented
        // contract), so nothing reads the environment concurrently.
        unsafe { std::env::set_var(REFUSED_ENV, &why) };
    }
}

/// Kills and reaps the namespace's first holder.
struct Holder(nix::unistd::Pid);

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(self.0, nix::sys::signal::Signal::SIGKILL);
        let _ = nix::sys::wait::waitpid(self.0, None);
    }
}

fn enter() -> Result<(), String> {
    let uid = nix::unistd::getuid();
    let gid = nix::unistd::getgid();
    let name = nix::unistd::User::from_uid(uid).ok().flatten().map(|u| u.name).unwrap_or_else(|| uid.to_string());
    let root = uid.is_root();
    let (sub_uid, sub_gid) = if root {
        let or_default = |r: Result<u32, String>| r.unwrap_or(ROOT_DEFAULT_SUBORDINATE);
        (or_default(subordinate("/etc/subuid", &name, 0)), or_default(subordinate("/etc/subgid", &name, 0)))
    } else {
        (subordinate("/etc/subuid", &name, uid.as_raw())?, subordinate("/etc/subgid", &name, gid.as_raw())?)
    };
    // A child makes the namespace (so a failure to map it leaves this
    // process untouched); this process then joins it, which an unprivileged
    // user may do for a namespace it owns, and which grants every
    // capability in it.
    let (ready_r, ready_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
    let parent = nix::unistd::getpid();
    // SAFETY: the process has one thread (maybe_enter's contract); the
    // child only calls async-signal-safe functions and never returns.
    let child = match unsafe { nix::unistd::fork() }.map_err(|e| format!("fork: {e}"))? {
        nix::unistd::ForkResult::Child => {
            // Dies with this process, should it be killed before it kills the child.
            let _ = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL);
            if nix::unistd::getppid() != parent {
                // SAFETY: _exit ends the child at once, running nothing.
                unsafe { libc::_exit(0) };
            }
            let ok = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWUSER).is_ok();
            let _ = nix::unistd::write(&ready_w, if ok { b"y" } else { b"n" });
            loop {
                // SAFETY: pause touches no memory; the parent kills this child.
                unsafe { libc::pause() };
            }
        }
        nix::unistd::ForkResult::Parent { child } => Holder(child),
    };
    drop(ready_w);
    let mut b = [0u8; 1];
    if !matches!(nix::unistd::read(ready_r.as_fd(), &mut b), Ok(1) if b[0] == b'y') {
        return Err("cannot create a user namespace (unprivileged user namespaces disabled?)".into());
    }
    let pid = child.0.as_raw();
    let maps = [("uid", "newuidmap", sub_uid, uid.as_raw()), ("gid", "newgidmap", sub_gid, gid.as_raw())];
    for (kind, tool, sub, own) in maps {
        let args = [
            "0".to_string(),
            sub.to_string(),
            CONTAINER_IDS.to_string(),
            OWN_ID.to_string(),
            own.to_string(),
            "1".into(),
        ];
        if root {
            let line = format!("0 {sub} {CONTAINER_IDS}\n{OWN_ID} {own} 1\n");
            fs::write(format!("/proc/{pid}/{kind}_map"), line).map_err(|e| format!("writing the {kind} map: {e}"))?;
            continue;
        }
        let exe = find_tool(tool).ok_or_else(|| format!("{tool} not found (install Debian's `uidmap`)"))?;
        let out = std::process::Command::new(&exe)
            .arg(pid.to_string())
            .args(args)
            .output()
            .map_err(|e| format!("running {}: {e}", exe.display()))?;
        if !out.status.success() {
            return Err(format!("{tool} refused the map: {}", String::from_utf8_lossy(&out.stderr).trim()));
        }
    }
    let ns: OwnedFd =
        fs::File::open(format!("/proc/{pid}/ns/user")).map_err(|e| format!("open user namespace: {e}"))?.into();
    nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWUSER).map_err(|e| format!("join user namespace: {e}"))?;
    drop(child);
    // From here on the process is in the namespace: failing now would
    // leave it half there, so the rest must succeed or end the process.
    let private = (|| {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)?;
        nix::mount::mount(
            None::<&str>,
            "/",
            None::<&str>,
            nix::mount::MsFlags::MS_REC | nix::mount::MsFlags::MS_PRIVATE,
            None::<&str>,
        )
    })();
    if let Err(e) = private {
        half_entered(&format!("cannot make a private mount namespace in it: {e}"));
    }
    // Executed again inside, as the namespace's root: the kernel then counts
    // the process's memory as the namespace's, so its /proc files belong to
    // the namespace's root, not the host's (a process that changes ids
    // becomes undumpable, and the id maps of the user namespaces it makes
    // for containers must stay writable to it).
    if let Err(e) = nix::unistd::setresgid(0.into(), 0.into(), 0.into())
        .and_then(|()| nix::unistd::setresuid(0.into(), 0.into(), 0.into()))
    {
        half_entered(&format!("cannot become its root: {e}"));
    }
    use std::os::unix::process::CommandExt;
    let mut args = std::env::args_os();
    args.next();
    let err = std::process::Command::new("/proc/self/exe").args(args).env(ENTERED_ENV, "1").exec();
    half_entered(&format!("cannot execute the program again: {err}"))
}

/// A failure after joining the namespace: the process cannot go back.
fn half_entered(why: &str) -> ! {
    eprintln!("vessel: entered a rootless user namespace but {why}");
    std::process::exit(125)
}

/// In the re-execution: takes the user's own id (what the program writes
/// outside vessels stays the user's) and keeps every capability of the
/// namespace (what vessel's own work needs; an exec drops them for the
/// program's other children).
fn finish() {
    // SAFETY: init runs before any thread exists (see maybe_enter).
    unsafe { std::env::remove_var(ENTERED_ENV) };
    use rustix::thread::CapabilitiesSecureBits as B;
    let kept = rustix::thread::set_capabilities_secure_bits(B::KEEP_CAPS | B::NO_SETUID_FIXUP)
        .map_err(std::io::Error::from)
        .and_then(|()| Ok(nix::unistd::setresgid(OWN_ID.into(), OWN_ID.into(), OWN_ID.into())?))
        .and_then(|()| Ok(nix::unistd::setresuid(OWN_ID.into(), OWN_ID.into(), OWN_ID.into())?));
    if let Err(e) = kept {
        half_entered(&format!("cannot take the user's own id in it: {e}"));
    }
    // Programs this one starts keep the namespace's capabilities too (an
    // exec as a non-root id would drop them): a child that uses vessel (a
    // CLI, a test's agent) works as this process does. They are
    // capabilities over the user's own namespace only, nothing on the host.
    if let Err(e) = inherit_capabilities() {
        half_entered(&format!("cannot pass its capabilities on: {e}"));
    }
}

/// Makes every permitted capability inheritable and ambient.
fn inherit_capabilities() -> std::io::Result<()> {
    use rustix::thread::{CapabilitySet, capabilities, configure_capability_in_ambient_set, set_capabilities};
    let mut sets = capabilities(None)?;
    sets.inheritable = sets.permitted;
    set_capabilities(None, sets)?;
    for bit in 0..64 {
        let cap = CapabilitySet::from_bits_retain(1 << bit);
        if sets.permitted.contains(cap) {
            configure_capability_in_ambient_set(cap, true)?;
        }
    }
    Ok(())
}

/// `name` in `PATH` (or `/usr/bin`, where Debian's `uidmap` puts it).
/// The executable `name` on `PATH`, or in the system directories a
/// user's `PATH` may leave out (`newuidmap` is in `/usr/bin`, tools in
/// `/usr/sbin`).
pub(crate) fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/bin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subordinate_ranges_are_read_as_newuidmap_does() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("subuid");
        fs::write(&f, "alice:100000:65536\nbob:200000:1000\n1002:300000:131072\nbob:400000:65536\n").unwrap();
        let f = f.to_str().unwrap();
        assert_eq!(subordinate(f, "alice", 1000), Ok(100000));
        assert_eq!(subordinate(f, "bob", 1001), Ok(400000), "a range too small is skipped");
        assert_eq!(subordinate(f, "carol", 1002), Ok(300000), "by numeric id");
        assert!(subordinate(f, "dave", 1003).unwrap_err().contains("--add-subuids"));
    }
}
