//! The OCI runtime spec every backend runs: `oci-spec`'s runc-like defaults
//! (pid, ipc, uts, mount and network namespaces, `/proc`, `/dev`, `/sys`
//! mounts, masked and read-only paths) made stricter and vessel-specific:
//! a cgroup namespace, docker's default capability set, `no_new_privileges`,
//! the caller's argv/env/cwd/user/hostname and resource limits. The network
//! namespace is the backend's business (see `Network`).

use std::collections::HashSet;
use std::path::PathBuf;

use oci_spec::runtime::{
    Capability, LinuxCapabilitiesBuilder, LinuxCpuBuilder, LinuxMemoryBuilder, LinuxNamespace, LinuxNamespaceBuilder,
    LinuxNamespaceType, LinuxPidsBuilder, LinuxResourcesBuilder, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompBuilder,
    LinuxSyscallBuilder, MountBuilder, ProcessBuilder, RootBuilder, Spec, UserBuilder,
};

use crate::{RunRequest, RuntimeError};

/// Syscalls a workspace process never needs and that widen the kernel's
/// attack surface: kernel modules and keyrings, mounts and namespaces,
/// clocks, swap, reboot, BPF, perf, userfaultfd, handle-based opens (the
/// set docker's and podman's default profiles deny). They fail with EPERM.
/// Syscalls of other ABIs (32-bit on x86_64) are refused by the filter's
/// architecture check.
pub const DENIED_SYSCALLS: &[&str] = &[
    "acct",
    "add_key",
    "adjtimex",
    "bpf",
    "clock_adjtime",
    "clock_settime",
    "delete_module",
    "fanotify_init",
    "finit_module",
    "fsconfig",
    "fsmount",
    "fsopen",
    "fspick",
    "init_module",
    "kcmp",
    "kexec_file_load",
    "kexec_load",
    "keyctl",
    "lookup_dcookie",
    "mount",
    "mount_setattr",
    "move_mount",
    "name_to_handle_at",
    "open_by_handle_at",
    "open_tree",
    "perf_event_open",
    "pivot_root",
    "process_vm_readv",
    "process_vm_writev",
    "quotactl",
    "reboot",
    "request_key",
    "setns",
    "settimeofday",
    "swapoff",
    "swapon",
    "syslog",
    "umount2",
    "unshare",
    "userfaultfd",
];

/// Docker's default capability set (moby `oci/caps/defaults.go`).
pub const DEFAULT_CAPABILITIES: [Capability; 14] = [
    Capability::Chown,
    Capability::DacOverride,
    Capability::Fsetid,
    Capability::Fowner,
    Capability::Mknod,
    Capability::NetRaw,
    Capability::Setgid,
    Capability::Setuid,
    Capability::Setfcap,
    Capability::Setpcap,
    Capability::NetBindService,
    Capability::SysChroot,
    Capability::Kill,
    Capability::AuditWrite,
];

fn invalid(e: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::InvalidRequest(e.to_string())
}

/// Writes the container's `/etc/hosts`, `/etc/hostname` and
/// `/etc/resolv.conf` into `dir`, to be bind-mounted by [`build`] (as docker
/// does: the image's own files stay untouched).
pub fn write_etc_files(dir: &std::path::Path, req: &RunRequest<'_>) -> Result<(), RuntimeError> {
    let hostname = req.hostname.clone().unwrap_or_else(|| "vessel".into());
    let resolv = match req.network {
        crate::Network::Host => std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default(),
        crate::Network::None => "# no network: vessel Network::None\n".into(),
    };
    for (name, body) in [
        ("hosts", format!("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{hostname}\n")),
        ("hostname", format!("{hostname}\n")),
        ("resolv.conf", resolv),
    ] {
        let p = dir.join(name);
        std::fs::write(&p, body).map_err(RuntimeError::io("write", &p))?;
    }
    Ok(())
}

/// A bind mount of `source` at `dest`, `rw` or `ro`, without setuid or devices.
fn bind(source: PathBuf, dest: PathBuf, access: &str) -> Result<oci_spec::runtime::Mount, RuntimeError> {
    MountBuilder::default()
        .destination(dest)
        .typ("bind")
        .source(source)
        .options(vec!["rbind".into(), access.into(), "nosuid".into(), "nodev".into()])
        .build()
        .map_err(invalid)
}

/// The default seccomp filter: allow, except [`DENIED_SYSCALLS`].
fn seccomp() -> Result<LinuxSeccomp, RuntimeError> {
    let deny = LinuxSyscallBuilder::default()
        .names(DENIED_SYSCALLS.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .action(LinuxSeccompAction::ScmpActErrno)
        .errno_ret(nix::libc::EPERM as u32)
        .build()
        .map_err(invalid)?;
    LinuxSeccompBuilder::default()
        .default_action(LinuxSeccompAction::ScmpActAllow)
        .syscalls(vec![deny])
        .build()
        .map_err(invalid)
}

/// The spec for `req`, with its cgroup at `cgroups_path` (e.g. `/vessel/<id>`)
/// and, when given, the files of [`write_etc_files`] in `etc_dir`.
pub fn build(
    req: &RunRequest<'_>,
    cgroups_path: &str,
    etc_dir: Option<&std::path::Path>,
) -> Result<Spec, RuntimeError> {
    if req.args.is_empty() {
        return Err(RuntimeError::InvalidRequest("empty command".into()));
    }
    if !req.rootfs.is_absolute() {
        return Err(RuntimeError::InvalidRequest(format!("rootfs {} is not absolute", req.rootfs.display())));
    }
    let caps: HashSet<Capability> = DEFAULT_CAPABILITIES.into_iter().collect();
    let capabilities = LinuxCapabilitiesBuilder::default()
        .bounding(caps.clone())
        .effective(caps.clone())
        .permitted(caps)
        .inheritable(HashSet::new())
        .ambient(HashSet::new())
        .build()
        .map_err(invalid)?;
    let mut env = req.env.clone();
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.push("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    }
    let mut process = ProcessBuilder::default();
    if let Some(size) = req.tty {
        process = process.console_size(
            oci_spec::runtime::BoxBuilder::default()
                .height(u64::from(size.rows))
                .width(u64::from(size.cols))
                .build()
                .map_err(invalid)?,
        );
    }
    let process = process
        .terminal(req.tty.is_some())
        .args(req.args.clone())
        .env(env)
        .cwd(req.cwd.clone().unwrap_or_else(|| "/".into()))
        .user(UserBuilder::default().uid(req.uid).gid(req.gid).build().map_err(invalid)?)
        .capabilities(capabilities)
        .no_new_privileges(true)
        .build()
        .map_err(invalid)?;

    let mut spec = Spec::default();
    spec.set_process(Some(process));
    spec.set_hostname(Some(req.hostname.clone().unwrap_or_else(|| "vessel".into())));
    spec.set_root(Some(RootBuilder::default().path(req.rootfs.clone()).readonly(false).build().map_err(invalid)?));

    let mut mounts = spec.mounts().clone().unwrap_or_default();
    if let Some(dir) = etc_dir {
        for name in ["hosts", "hostname", "resolv.conf"] {
            mounts.push(bind(dir.join(name), PathBuf::from("/etc").join(name), "rw")?);
        }
    }
    for (host, dest) in &req.ro_binds {
        mounts.push(bind(host.clone(), PathBuf::from(dest), "ro")?);
    }
    spec.set_mounts(Some(mounts));

    let mut linux = spec.linux().clone().unwrap_or_default();
    let mut namespaces: Vec<LinuxNamespace> = linux.namespaces().clone().unwrap_or_default();
    // The container joins its runner's network namespace: the host's, or
    // (Network::None) a private one the runner made with loopback up, since
    // a namespace the runtime creates has `lo` down.
    namespaces.retain(|n| n.typ() != LinuxNamespaceType::Network);
    if !namespaces.iter().any(|n| n.typ() == LinuxNamespaceType::Cgroup) {
        namespaces.push(LinuxNamespaceBuilder::default().typ(LinuxNamespaceType::Cgroup).build().map_err(invalid)?);
    }
    linux.set_namespaces(Some(namespaces));
    linux.set_cgroups_path(Some(PathBuf::from(cgroups_path)));
    linux.set_seccomp(Some(seccomp()?));
    let mut resources = LinuxResourcesBuilder::default();
    if let Some(m) = req.limits.memory_bytes {
        // No swap on top: the limit is the limit.
        resources = resources.memory(LinuxMemoryBuilder::default().limit(m).swap(m).build().map_err(invalid)?);
    }
    if let Some(q) = req.limits.cpu_quota_us {
        resources = resources.cpu(LinuxCpuBuilder::default().quota(q).period(100_000u64).build().map_err(invalid)?);
    }
    if let Some(p) = req.limits.pids {
        resources = resources.pids(LinuxPidsBuilder::default().limit(p).build().map_err(invalid)?);
    }
    let mut built = resources.build().map_err(invalid)?;
    if let Some(defaults) = linux.resources() {
        built.set_devices(defaults.devices().clone());
    }
    linux.set_resources(Some(built));
    spec.set_linux(Some(linux));
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_a_strict_spec() {
        let req = RunRequest {
            rootfs: "/r".into(),
            args: vec!["true".into()],
            limits: crate::Limits { memory_bytes: Some(1 << 20), pids: Some(10), cpu_quota_us: None },
            ..Default::default()
        };
        let spec = build(&req, "/vessel/x", None).unwrap();
        let p = spec.process().as_ref().unwrap();
        assert_eq!(p.no_new_privileges(), Some(true));
        assert!(p.env().as_ref().unwrap().iter().any(|e| e.starts_with("PATH=")));
        let caps = p.capabilities().as_ref().unwrap().bounding().as_ref().unwrap();
        assert!(caps.contains(&Capability::Chown) && !caps.contains(&Capability::SysAdmin));
        let linux = spec.linux().as_ref().unwrap();
        let ns: Vec<_> = linux.namespaces().as_ref().unwrap().iter().map(|n| n.typ()).collect();
        for t in [
            LinuxNamespaceType::Pid,
            LinuxNamespaceType::Ipc,
            LinuxNamespaceType::Uts,
            LinuxNamespaceType::Mount,
            LinuxNamespaceType::Cgroup,
        ] {
            assert!(ns.contains(&t), "{t:?}");
        }
        assert!(!ns.contains(&LinuxNamespaceType::Network), "the backend provides the network namespace");
        assert!(!linux.masked_paths().as_ref().unwrap().is_empty());
        let r = linux.resources().as_ref().unwrap();
        assert_eq!(r.pids().as_ref().unwrap().limit(), 10);
        assert_eq!(r.memory().as_ref().unwrap().limit(), Some(1 << 20));
        assert!(build(&RunRequest::default(), "/x", None).is_err());
        assert!(linux.seccomp().is_some());
    }
}
