//! The OCI runtime spec every backend runs: `oci-spec`'s runc-like defaults
//! (pid, ipc, uts, mount and network namespaces, `/proc`, `/dev`, `/sys`
//! mounts) made stricter and vessel-specific, as docker's defaults:
//! a user namespace for the request's [`IdMapping`], a cgroup namespace,
//! docker's default capability set (for root; a non-root user gets only the
//! bounding set), `no_new_privileges`, the default seccomp profile (see
//! `seccomp`), a device cgroup that denies everything but runc's standard
//! devices, docker's masked and read-only paths, a read-only cgroupfs, and
//! the caller's argv/env/cwd/user/hostname and resource limits. The network
//! namespace is the backend's business (see `Network`).

use std::collections::HashSet;
use std::path::PathBuf;

use oci_spec::runtime::{
    Capability, LinuxCapabilitiesBuilder, LinuxCpuBuilder, LinuxDeviceCgroup, LinuxDeviceCgroupBuilder,
    LinuxDeviceType, LinuxIdMappingBuilder, LinuxMemoryBuilder, LinuxNamespace, LinuxNamespaceBuilder,
    LinuxNamespaceType, LinuxPidsBuilder, LinuxResourcesBuilder, MountBuilder, ProcessBuilder, RootBuilder, Spec,
    UserBuilder,
};

use crate::{IdMapping, Network, RunRequest, RuntimeError};

/// docker's masked paths (moby `oci/defaults.go`): host information and
/// interfaces a container has no business reading, hidden under an empty
/// file or a read-only tmpfs.
pub const MASKED_PATHS: &[&str] = &[
    "/proc/asound",
    "/proc/acpi",
    "/proc/interrupts",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

/// docker's read-only paths, plus the cgroup filesystem (see [`cgroup_mounts`]).
pub const READONLY_PATHS: &[&str] =
    &["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger", "/sys/fs/cgroup"];

/// The device nodes a container may use, as runc allows them by default:
/// `(type, major, minor, access)`; `None` is any. Everything else is
/// denied; `m` (mknod) on any char or block device is allowed as in runc
/// and docker (opening such a node is what the rule denies; in a user
/// namespace mknod itself fails).
pub const ALLOWED_DEVICES: &[(char, Option<i64>, Option<i64>, &str)] = &[
    ('c', None, None, "m"),
    ('b', None, None, "m"),
    ('c', Some(1), Some(3), "rwm"), // null
    ('c', Some(1), Some(5), "rwm"), // zero
    ('c', Some(1), Some(7), "rwm"), // full
    ('c', Some(1), Some(8), "rwm"), // random
    ('c', Some(1), Some(9), "rwm"), // urandom
    ('c', Some(5), Some(0), "rwm"), // tty
    ('c', Some(5), Some(2), "rwm"), // ptmx
    ('c', Some(136), None, "rwm"),  // pts/*
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

/// Writes the container's `/etc/hosts`, `/etc/hostname` and
/// `/etc/resolv.conf` into `dir`, to be bind-mounted by [`build`] (as docker
/// does: the image's own files stay untouched).
pub fn write_etc_files(dir: &std::path::Path, req: &RunRequest<'_>) -> Result<(), RuntimeError> {
    let hostname = req.hostname.clone().unwrap_or_else(|| "vessel".into());
    let resolv = match &req.network {
        crate::Network::Host => std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default(),
        crate::Network::None => "# no network: vessel Network::None\n".into(),
        crate::Network::Join { nameserver, .. } => format!("nameserver {nameserver}\noptions ndots:0\n"),
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
        .map_err(RuntimeError::Spec)
}

/// The device cgroup rules: deny all, then [`ALLOWED_DEVICES`].
fn device_rules() -> Result<Vec<LinuxDeviceCgroup>, RuntimeError> {
    let mut rules = vec![
        LinuxDeviceCgroupBuilder::default()
            .allow(false)
            .typ(LinuxDeviceType::A)
            .access("rwm")
            .build()
            .map_err(RuntimeError::Spec)?,
    ];
    for &(typ, major, minor, access) in ALLOWED_DEVICES {
        let mut b = LinuxDeviceCgroupBuilder::default()
            .allow(true)
            .typ(if typ == 'b' { LinuxDeviceType::B } else { LinuxDeviceType::C })
            .access(access);
        if let Some(m) = major {
            b = b.major(m);
        }
        if let Some(m) = minor {
            b = b.minor(m);
        }
        rules.push(b.build().map_err(RuntimeError::Spec)?);
    }
    Ok(rules)
}

/// The container paths of the host's cgroup mounts under `/sys/fs/cgroup`
/// (v1 controllers such as `/sys/fs/cgroup/pids`, the hybrid `unified`
/// mount): each is its own mount inside the container, and a read-only
/// remount of `/sys/fs/cgroup` does not reach submounts. Read once per
/// process: the host's cgroup layout does not change while it runs.
pub fn cgroup_mounts() -> &'static [String] {
    static MOUNTS: std::sync::LazyLock<Vec<String>> = std::sync::LazyLock::new(read_cgroup_mounts);
    &MOUNTS
}

fn read_cgroup_mounts() -> Vec<String> {
    let info = procfs::process::Process::myself().and_then(|p| p.mountinfo()).map(|i| i.0).unwrap_or_default();
    let mut out: Vec<String> = info
        .into_iter()
        .filter(|m| (m.fs_type == "cgroup" || m.fs_type == "cgroup2") && m.mount_point.starts_with("/sys/fs/cgroup/"))
        .filter_map(|m| m.mount_point.to_str().map(str::to_owned))
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Adds a new network namespace to `spec` (the runtime then creates it,
/// owned by the container's user namespace when it has one).
pub fn add_network_namespace(spec: &mut Spec) -> Result<(), RuntimeError> {
    let mut linux = spec.linux().clone().unwrap_or_default();
    let mut ns = linux.namespaces().clone().unwrap_or_default();
    ns.push(LinuxNamespaceBuilder::default().typ(LinuxNamespaceType::Network).build().map_err(RuntimeError::Spec)?);
    linux.set_namespaces(Some(ns));
    spec.set_linux(Some(linux));
    Ok(())
}

/// The `linux.uidMappings`/`gidMappings` entry of `map`.
fn id_mappings(map: IdMapping) -> Result<Vec<oci_spec::runtime::LinuxIdMapping>, RuntimeError> {
    Ok(vec![
        LinuxIdMappingBuilder::default()
            .container_id(0u32)
            .host_id(map.host_id)
            .size(map.size)
            .build()
            .map_err(RuntimeError::Spec)?,
    ])
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
    // As docker: root gets the default set; another user only its bounding
    // set (setuid binaries and file capabilities can still raise it).
    let held = if req.uid == 0 { caps.clone() } else { HashSet::new() };
    let capabilities = LinuxCapabilitiesBuilder::default()
        .bounding(caps.clone())
        .effective(held.clone())
        .permitted(held)
        .inheritable(HashSet::new())
        .ambient(HashSet::new())
        .build()
        .map_err(RuntimeError::Spec)?;
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
                .map_err(RuntimeError::Spec)?,
        );
    }
    let process = process
        .terminal(req.tty.is_some())
        .args(req.args.clone())
        .env(env)
        .cwd(req.cwd.clone().unwrap_or_else(|| "/".into()))
        .user(
            UserBuilder::default()
                .uid(req.uid)
                .gid(req.gid)
                .additional_gids(req.additional_gids.clone())
                .build()
                .map_err(RuntimeError::Spec)?,
        )
        .capabilities(capabilities)
        .no_new_privileges(true)
        .build()
        .map_err(RuntimeError::Spec)?;

    let mut spec = Spec::default();
    spec.set_process(Some(process));
    spec.set_hostname(Some(req.hostname.clone().unwrap_or_else(|| "vessel".into())));
    spec.set_root(Some(
        RootBuilder::default().path(req.rootfs.clone()).readonly(false).build().map_err(RuntimeError::Spec)?,
    ));

    let mut mounts = spec.mounts().clone().unwrap_or_default();
    if req.user_namespace.is_some() && matches!(req.network, Network::Host | Network::Join { .. }) {
        // sysfs can only be mounted by the user namespace that owns the
        // network namespace: with the host's network (or a vessel network,
        // which host root owns), bind the host's /sys read-only instead
        // (as runc does for rootless containers).
        let source = match &req.network {
            Network::Join { sysfs: Some(s), .. } => s.clone(),
            _ => PathBuf::from("/sys"),
        };
        for m in mounts.iter_mut().filter(|m| m.destination() == std::path::Path::new("/sys")) {
            *m = MountBuilder::default()
                .destination("/sys")
                .typ("bind")
                .source(source.clone())
                .options(vec!["rbind".into(), "nosuid".into(), "noexec".into(), "nodev".into(), "ro".into()])
                .build()
                .map_err(RuntimeError::Spec)?;
        }
    }
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
    if let Network::Join { netns, .. } = &req.network {
        // Joined by path: the runtime enters it before the user namespace
        // is made, so the container holds no capability over it.
        namespaces.push(
            LinuxNamespaceBuilder::default()
                .typ(LinuxNamespaceType::Network)
                .path(netns.clone())
                .build()
                .map_err(RuntimeError::Spec)?,
        );
    }
    if !namespaces.iter().any(|n| n.typ() == LinuxNamespaceType::Cgroup) {
        namespaces.push(
            LinuxNamespaceBuilder::default().typ(LinuxNamespaceType::Cgroup).build().map_err(RuntimeError::Spec)?,
        );
    }
    if let Some(map) = req.user_namespace {
        namespaces
            .push(LinuxNamespaceBuilder::default().typ(LinuxNamespaceType::User).build().map_err(RuntimeError::Spec)?);
        linux.set_uid_mappings(Some(id_mappings(map)?));
        linux.set_gid_mappings(Some(id_mappings(map)?));
    }
    linux.set_namespaces(Some(namespaces));
    linux.set_cgroups_path(Some(PathBuf::from(cgroups_path)));
    linux.set_seccomp(Some(crate::seccomp::filter(&caps)?));
    linux.set_masked_paths(Some(MASKED_PATHS.iter().map(|p| p.to_string()).collect()));
    let mut readonly: Vec<String> = READONLY_PATHS.iter().map(|p| p.to_string()).collect();
    readonly.extend(cgroup_mounts().iter().cloned());
    linux.set_readonly_paths(Some(readonly));
    let mut resources = LinuxResourcesBuilder::default();
    if let Some(m) = req.limits.memory_bytes {
        // No swap on top: the limit is the limit.
        resources =
            resources.memory(LinuxMemoryBuilder::default().limit(m).swap(m).build().map_err(RuntimeError::Spec)?);
    }
    if let Some(q) = req.limits.cpu_quota_us {
        resources =
            resources.cpu(LinuxCpuBuilder::default().quota(q).period(100_000u64).build().map_err(RuntimeError::Spec)?);
    }
    if let Some(p) = req.limits.pids {
        resources = resources.pids(LinuxPidsBuilder::default().limit(p).build().map_err(RuntimeError::Spec)?);
    }
    let mut built = resources.build().map_err(RuntimeError::Spec)?;
    built.set_devices(Some(device_rules()?));
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
        let masked = linux.masked_paths().as_ref().unwrap();
        assert!(masked.iter().any(|p| p == "/proc/interrupts") && masked.iter().any(|p| p.ends_with("powercap")));
        assert!(linux.readonly_paths().as_ref().unwrap().iter().any(|p| p == "/sys/fs/cgroup"));
        let devices = r.devices().as_ref().unwrap();
        assert!(!devices[0].allow() && devices[0].typ() == Some(LinuxDeviceType::A), "deny all first");
        assert!(devices.iter().any(|d| d.allow() && d.major() == Some(1) && d.minor() == Some(3)));
        assert!(linux.uid_mappings().is_none(), "no user namespace unless asked");
    }

    #[test]
    fn user_namespace_and_unprivileged_users() {
        let map = IdMapping::new(1 << 20, 65536).unwrap();
        let req = RunRequest {
            rootfs: "/r".into(),
            args: vec!["id".into()],
            uid: 1000,
            gid: 1000,
            additional_gids: vec![27],
            user_namespace: Some(map),
            network: Network::Host,
            ..Default::default()
        };
        let spec = build(&req, "/vessel/x", None).unwrap();
        let linux = spec.linux().as_ref().unwrap();
        assert!(linux.namespaces().as_ref().unwrap().iter().any(|n| n.typ() == LinuxNamespaceType::User));
        let uid = &linux.uid_mappings().as_ref().unwrap()[0];
        assert_eq!((uid.container_id(), uid.host_id(), uid.size()), (0, 1 << 20, 65536));
        assert_eq!(linux.gid_mappings().as_ref().unwrap()[0].host_id(), 1 << 20);
        let p = spec.process().as_ref().unwrap();
        let caps = p.capabilities().as_ref().unwrap();
        assert!(caps.effective().as_ref().unwrap().is_empty(), "a non-root user holds no capability");
        assert!(caps.bounding().as_ref().unwrap().contains(&Capability::Chown));
        assert_eq!(p.user().additional_gids().as_ref().unwrap(), &vec![27]);
        let sys =
            spec.mounts().as_ref().unwrap().iter().find(|m| m.destination() == std::path::Path::new("/sys")).unwrap();
        assert_eq!(sys.typ().as_deref(), Some("bind"), "host network in a user namespace binds /sys");
    }
}
