//! User namespaces and idmapped mounts: how a vessel's container ids live
//! on an unprivileged host range while its layers keep the container's view.
//!
//! A vessel's containers run in a user namespace mapping container ids
//! `0..size` to host ids `host_id..host_id + size` ([`IdMapping`]). Its
//! rootfs is an overlay over *idmapped* layers: each lower layer, and the
//! directory holding the upper and work dirs, is cloned with `open_tree`
//! and marked `MOUNT_ATTR_IDMAP` with a user namespace of that mapping
//! ([`UserNamespace`]), so a file that is uid 0 on disk (in the layer
//! cache, in the upper dir, in a snapshot's tar) is uid `host_id` through
//! the mount, which the container sees as its root. Nothing is chowned.
//!
//! The host side acts through the same mount as the container's root would:
//! [`as_host_ids`] runs a closure with the thread's fsuid/fsgid set to the
//! mapped root (with `SECBIT_NO_SETUID_FIXUP`, so the thread keeps its
//! capabilities), because the kernel refuses to create a file through an
//! idmapped mount for an fsuid the mapping cannot express (`EOVERFLOW`).
//! The overlay itself is mounted that way too: overlayfs records its
//! mounter's credentials and uses them for its own work files.

use std::ffi::CString;
use std::fs;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;

use nix::libc;
use rustix::mount::{OpenTreeFlags, open_tree};
use rustix::thread::CapabilitiesSecureBits;

use crate::RuntimeError;

/// The size of a vessel's id range: the 16-bit ids every image uses.
pub const DEFAULT_RANGE_SIZE: u32 = 65536;

/// Container ids `0..size` are host ids `host_id..host_id + size` (uids and
/// gids alike).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IdMapping {
    /// The host id of container root.
    pub host_id: u32,
    /// How many ids are mapped.
    pub size: u32,
}

impl IdMapping {
    /// A mapping of `size` ids starting at host id `host_id`.
    pub fn new(host_id: u32, size: u32) -> Result<Self, RuntimeError> {
        if size == 0 || host_id.checked_add(size).is_none_or(|end| end > u32::MAX - 1) {
            return Err(RuntimeError::InvalidRequest(format!("invalid id range {host_id}+{size}")));
        }
        Ok(Self { host_id, size })
    }

    /// The host id of container id `id`, if mapped.
    pub fn to_host(&self, id: u32) -> Option<u32> {
        (id < self.size).then(|| self.host_id + id)
    }

    /// The container id of host id `host`, if mapped.
    pub fn to_container(&self, host: u32) -> Option<u32> {
        host.checked_sub(self.host_id).filter(|id| *id < self.size)
    }

    /// The `uid_map`/`gid_map` line.
    fn line(&self) -> String {
        format!("0 {} {}\n", self.host_id, self.size)
    }
}

/// A user namespace with one mapping, held by fd: what `MOUNT_ATTR_IDMAP`
/// takes. Creating one costs about 0.3 ms (a short-lived child process), so
/// a vessel keeps its own for as long as it is open.
#[derive(Debug)]
pub struct UserNamespace {
    fd: OwnedFd,
    mapping: IdMapping,
}

/// Kills and reaps the namespace's holder child. (Not an end-of-file on a
/// pipe: a child forked meanwhile by another thread holds a copy of it.)
struct Child {
    pid: libc::pid_t,
    /// The child's stack: it shares this address space (CLONE_VM), so its
    /// stack must outlive it; freed after the child is reaped.
    _stack: Vec<u8>,
}

impl Drop for Child {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.pid);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        let _ = nix::sys::wait::waitpid(pid, None);
    }
}

/// What the child runs: nothing, until it is killed, or its parent (the
/// pid `parent` carries) dies: a caller killed in the moment it holds the
/// namespace must not leave it paused forever (the soak found one).
extern "C" fn hold(parent: *mut libc::c_void) -> libc::c_int {
    // SAFETY: prctl, getppid and _exit are async-signal-safe system calls
    // touching no memory of the shared address space.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        if libc::getppid() != parent as libc::pid_t {
            libc::_exit(0);
        }
    }
    loop {
        // SAFETY: pause takes no arguments and touches no memory.
        unsafe { libc::pause() };
    }
}

impl std::os::fd::AsFd for UserNamespace {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl UserNamespace {
    /// A new user namespace mapping container `0..size` to `mapping`'s host range.
    pub fn new(mapping: IdMapping) -> Result<Self, RuntimeError> {
        // The child shares this address space (CLONE_VM: no page tables to
        // copy, which a fork of a large process pays for in milliseconds)
        // and runs `hold` on a stack of its own. It only owns the new user
        // namespace until the parent has written its maps and opened it;
        // then the parent kills and reaps it.
        let mut stack = vec![0u8; 64 << 10];
        // The stack grows down: its top, 16-byte aligned.
        let top = (stack.as_mut_ptr() as usize + stack.len()) & !15;
        // SAFETY: `hold` is a plain function that never returns, runs only
        // async-signal-safe code and uses nothing but its own stack, which
        // stays allocated until the child is reaped (Child's drop).
        let pid = unsafe {
            libc::clone(
                hold,
                top as *mut libc::c_void,
                libc::CLONE_NEWUSER | libc::CLONE_VM | libc::SIGCHLD,
                std::process::id() as usize as *mut libc::c_void,
            )
        };
        if pid < 0 {
            return Err(RuntimeError::Unavailable {
                backend: "userns",
                reason: format!("cannot create a user namespace: {}", std::io::Error::last_os_error()),
            });
        }
        let child = Child { pid, _stack: stack };
        for file in ["uid_map", "gid_map"] {
            let p = format!("/proc/{}/{file}", child.pid);
            fs::write(&p, mapping.line()).map_err(RuntimeError::io("write", &p))?;
        }
        let p = format!("/proc/{}/ns/user", child.pid);
        let fd = fs::File::open(&p).map_err(RuntimeError::io("open", &p))?;
        drop(child);
        Ok(Self { fd: fd.into(), mapping })
    }

    /// The mapping.
    pub fn mapping(&self) -> IdMapping {
        self.mapping
    }

    /// A detached clone of the mount tree at `dir`, idmapped through this
    /// namespace (an fd for `open_tree`'s result; it vanishes when closed
    /// unless something, like an overlay, holds it).
    pub fn idmapped_clone(&self, dir: &Path) -> Result<OwnedFd, RuntimeError> {
        let tree = open_tree(rustix::fs::CWD, dir, OpenTreeFlags::OPEN_TREE_CLONE | OpenTreeFlags::OPEN_TREE_CLOEXEC)
            .map_err(|e| RuntimeError::io("open_tree", dir)(e.into()))?;
        #[repr(C)]
        struct MountAttr {
            attr_set: u64,
            attr_clr: u64,
            propagation: u64,
            userns_fd: u64,
        }
        const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;
        let attr = MountAttr {
            attr_set: MOUNT_ATTR_IDMAP,
            attr_clr: 0,
            propagation: 0,
            userns_fd: self.fd.as_raw_fd() as u64,
        };
        let empty = CString::default();
        // SAFETY: mount_setattr reads `size` bytes of `attr`, a live,
        // properly laid out `struct mount_attr`, and the empty C string;
        // `tree` and the namespace fd are open for the whole call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_mount_setattr,
                tree.as_raw_fd(),
                empty.as_ptr(),
                libc::AT_EMPTY_PATH,
                &raw const attr,
                std::mem::size_of::<MountAttr>(),
            )
        };
        if rc != 0 {
            return Err(RuntimeError::io("idmap mount", dir)(std::io::Error::last_os_error()));
        }
        Ok(tree)
    }
}

/// Restores the thread's fs ids and securebits, even on unwind.
struct FsIds {
    uid: u32,
    gid: u32,
    bits: Option<CapabilitiesSecureBits>,
}

impl Drop for FsIds {
    fn drop(&mut self) {
        nix::unistd::setfsuid(nix::unistd::Uid::from_raw(self.uid));
        nix::unistd::setfsgid(nix::unistd::Gid::from_raw(self.gid));
        if let Some(bits) = self.bits {
            let _ = rustix::thread::set_capabilities_secure_bits(bits);
        }
    }
}

/// Runs `f` on this thread with fsuid `uid` and fsgid `gid`, keeping the
/// thread's capabilities, then restores both. For a process without
/// `CAP_SETUID` (in its user namespace), or with its own ids, it just runs `f`.
pub fn as_host_ids<T>(uid: u32, gid: u32, f: impl FnOnce() -> T) -> T {
    let own = (nix::unistd::geteuid().as_raw(), nix::unistd::getegid().as_raw());
    let privileged = own.0 == 0 || crate::rootless::mode().is_rootless();
    if (uid, gid) == own || !privileged {
        return f();
    }
    // Without NO_SETUID_FIXUP, a non-zero fsuid drops the fs capabilities
    // (CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_FOWNER, ...) from this thread.
    let bits = rustix::thread::capabilities_secure_bits().ok();
    if let Some(b) = bits {
        let _ = rustix::thread::set_capabilities_secure_bits(b | CapabilitiesSecureBits::NO_SETUID_FIXUP);
    }
    let old_gid = nix::unistd::setfsgid(nix::unistd::Gid::from_raw(gid)).as_raw();
    let old_uid = nix::unistd::setfsuid(nix::unistd::Uid::from_raw(uid)).as_raw();
    let _restore = FsIds { uid: old_uid, gid: old_gid, bits };
    f()
}

/// A name for a probe's scratch dir: `.probe-<pid>-<random>`, so what a
/// prober killed mid-probe leaves can be told from a live one's
/// ([`probe_owner`]) and scrubbed.
pub fn probe_name() -> String {
    format!(".probe-{}-{:016x}", std::process::id(), rand::random::<u64>())
}

/// The pid in a [`probe_name`], or `None` for any other name.
pub fn probe_owner(name: &str) -> Option<u32> {
    let (pid, rest) = name.strip_prefix(".probe-")?.split_once('-')?;
    (rest.len() == 16 && rest.bytes().all(|b| b.is_ascii_hexdigit())).then_some(())?;
    pid.parse().ok()
}

/// Whether this kernel and the filesystem at `dir` support what isolation
/// needs: a user namespace, an idmapped clone of `dir`, and an overlay over
/// idmapped layers that is writable with the mapped root's fsuid. Makes
/// and removes a small test tree under `dir`.
pub fn probe(dir: &Path) -> Result<(), RuntimeError> {
    if crate::rootless::mode().is_rootless() {
        return probe_rootless(dir);
    }
    let unsupported = |what: &str, e: &dyn std::fmt::Display| RuntimeError::Unavailable {
        backend: "userns",
        reason: format!("{what}: {e} (user namespaces with idmapped overlay layers need Linux 6.8 or later)"),
    };
    let base = dir.join(probe_name());
    let result = (|| {
        for d in ["lower", "ovl/upper", "ovl/work", "mnt"] {
            fs::create_dir_all(base.join(d)).map_err(RuntimeError::io("create", base.join(d)))?;
        }
        let ns = UserNamespace::new(IdMapping::new(DEFAULT_RANGE_SIZE * 16, DEFAULT_RANGE_SIZE)?)
            .map_err(|e| unsupported("creating a user namespace", &e))?;
        let mount = crate::overlay::OverlayMount::mount_idmapped(
            &base.join("mnt"),
            &[&base.join("lower")],
            &base.join("ovl"),
            &ns,
        )
        .map_err(|e| unsupported("mounting an overlay over idmapped layers", &e))?;
        let host_root = ns.mapping().host_id;
        let wrote = as_host_ids(host_root, host_root, || fs::write(base.join("mnt/probe"), b"x"));
        verdict(mount, wrote, &base.join("ovl/upper/probe"), unsupported)
    })();
    let _ = fs::remove_dir_all(&base);
    result
}

/// A probe's end: unmounts, then the write through the overlay must have
/// worked and landed in the upper (`stored`) as container root's.
fn verdict(
    mount: crate::overlay::OverlayMount,
    wrote: std::io::Result<()>,
    stored: &Path,
    unsupported: impl Fn(&str, &dyn std::fmt::Display) -> RuntimeError,
) -> Result<(), RuntimeError> {
    let owner = fs::metadata(stored).map(|m| std::os::unix::fs::MetadataExt::uid(&m));
    mount.unmount()?;
    wrote.map_err(|e| unsupported("writing through the overlay", &e))?;
    match owner {
        Ok(0) => Ok(()),
        Ok(uid) => Err(unsupported("the upper stored the wrong owner", &uid)),
        Err(e) => Err(unsupported("reading the upper", &e)),
    }
}

/// [`probe`] in rootless mode: an overlay (with `userxattr`) in the
/// process's own namespaces, written as container root.
fn probe_rootless(dir: &Path) -> Result<(), RuntimeError> {
    let unsupported = |what: &str, e: &dyn std::fmt::Display| RuntimeError::Unavailable {
        backend: "rootless",
        reason: format!(
            "{what}: {e} (rootless vessels need overlayfs with `userxattr` in a user namespace, Linux 5.11 or later)"
        ),
    };
    let base = dir.join(probe_name());
    let result = as_host_ids(0, 0, || {
        for d in ["lower", "upper", "work", "mnt"] {
            fs::create_dir_all(base.join(d)).map_err(RuntimeError::io("create", base.join(d)))?;
        }
        let mount = crate::overlay::OverlayMount::mount(
            &base.join("mnt"),
            &[&base.join("lower")],
            Some((&base.join("upper"), &base.join("work"))),
        )
        .map_err(|e| unsupported("mounting an overlay", &e))?;
        let wrote = fs::write(base.join("mnt/probe"), b"x");
        verdict(mount, wrote, &base.join("upper/probe"), unsupported)
    });
    let _ = fs::remove_dir_all(&base);
    result
}

/// An fd's `/proc/self/fd` path: how overlayfs options name a detached
/// mount, and how `linkat` names an unnamed (`O_TMPFILE`) file.
pub(crate) fn fd_path(fd: &impl AsRawFd) -> String {
    format!("/proc/self/fd/{}", fd.as_raw_fd())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_names_name_their_owner() {
        let name = probe_name();
        assert_eq!(probe_owner(&name), Some(std::process::id()));
        for other in ["0123456789abcdef", ".probe-12", ".probe-x-0123456789abcdef", ".probe-12-xyz", ".quota-probe-12"]
        {
            assert_eq!(probe_owner(other), None, "{other}");
        }
    }

    /// A process that starts a holder and dies before killing it (a caller
    /// killed -9 at that moment) leaves no holder behind.
    #[test]
    fn a_holder_dies_with_its_parent() {
        let (r, w) = nix::unistd::pipe().unwrap();
        let mut stack = vec![0u8; 64 << 10];
        let top = (stack.as_mut_ptr() as usize + stack.len()) & !15;
        // SAFETY: the forked child only makes system calls (clone, write,
        // _exit) on memory allocated before the fork.
        match unsafe { nix::unistd::fork() }.unwrap() {
            // SAFETY: as above; `hold` runs on `stack`, which the child never frees.
            nix::unistd::ForkResult::Child => unsafe {
                let me = libc::getpid();
                let pid = libc::clone(
                    hold,
                    top as *mut libc::c_void,
                    libc::CLONE_VM | libc::SIGCHLD,
                    me as usize as *mut libc::c_void,
                );
                libc::write(std::os::fd::AsRawFd::as_raw_fd(&w), (&raw const pid).cast(), 4);
                // Dies once the holder is past its start (pausing).
                libc::usleep(100_000);
                libc::_exit(0);
            },
            nix::unistd::ForkResult::Parent { child } => {
                drop(w);
                let mut b = [0u8; 4];
                assert_eq!(nix::unistd::read(&r, &mut b).unwrap(), 4);
                let holder = i32::from_ne_bytes(b);
                assert!(holder > 0);
                nix::sys::wait::waitpid(child, None).unwrap();
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
                loop {
                    let state = fs::read_to_string(format!("/proc/{holder}/stat"))
                        .ok()
                        .and_then(|s| s.rsplit_once(") ").and_then(|(_, rest)| rest.chars().next()));
                    if matches!(state, None | Some('Z' | 'X')) {
                        break;
                    }
                    assert!(std::time::Instant::now() < deadline, "holder {holder} outlived its parent: {state:?}");
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                drop(stack);
            }
        }
    }

    #[test]
    fn mappings_translate_both_ways() {
        let m = IdMapping::new(100_000, 65536).unwrap();
        assert_eq!(m.to_host(0), Some(100_000));
        assert_eq!(m.to_host(65535), Some(165_535));
        assert_eq!(m.to_host(65536), None);
        assert_eq!(m.to_container(100_000), Some(0));
        assert_eq!(m.to_container(99_999), None);
        assert_eq!(m.to_container(165_536), None);
        assert!(IdMapping::new(1, 0).is_err());
        assert!(IdMapping::new(u32::MAX - 10, 65536).is_err());
    }
}
