//! The host's side of the mount root: its directories and their modes,
//! the locks that say who holds what (flocks, released by the kernel when
//! their holder dies, so a crash never leaves one held), the host id ranges
//! of open vessels, and the scrub of what a dead process left mounted.

use std::fs;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use vessel_core::VesselId;
use vessel_runtime::UserNamespace;

use crate::config::{IdRanges, ManagerConfig};
use crate::error::{Result, VesselError};

/// Creates each dir with its mode: 0711 where containers must traverse
/// (to their rootfs and bind-mount sources), 0700 elsewhere; existing dirs
/// get the mode too, so an older, more open layout is closed.
pub(crate) fn mkdirs(dirs: &[(&Path, u32)]) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for (d, mode) in dirs {
        fs::create_dir_all(d).map_err(VesselError::io("create directory", *d))?;
        fs::set_permissions(d, fs::Permissions::from_mode(*mode)).map_err(VesselError::io("chmod", *d))?;
    }
    Ok(())
}

/// Mount points at or under `dir`, deepest first (procfs decodes every
/// octal escape of mountinfo, not only a space's).
pub(crate) fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let info = procfs::process::Process::myself().and_then(|p| p.mountinfo()).map(|i| i.0).unwrap_or_default();
    let mut out: Vec<PathBuf> = info.into_iter().map(|m| m.mount_point).filter(|m| m.starts_with(dir)).collect();
    out.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    out
}

/// Unmounts everything under `dir` and removes it.
pub(crate) fn scrub(dir: &Path) -> Result<()> {
    for m in mounts_under(dir) {
        nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH)
            .map_err(|e| VesselError::io("unmount", &m)(e.into()))?;
    }
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(VesselError::io("remove", dir)(e)),
        _ => Ok(()),
    }
}

/// Removes the probe dirs (`vessel_runtime::idmap::probe_name`) in `dirs`
/// whose process is gone: a prober killed mid-probe. A reused pid only
/// delays one; a live prober's is never taken.
pub(crate) fn scrub_dead_probes(dirs: &[&Path]) -> Result<()> {
    for dir in dirs {
        for e in fs::read_dir(dir).map_err(VesselError::io("read", dir))?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(pid) = vessel_runtime::idmap::probe_owner(&name)
                && !Path::new(&format!("/proc/{pid}")).exists()
            {
                tracing::info!(%name, "removing a probe left by a dead process");
                scrub(&e.path())?;
            }
        }
    }
    Ok(())
}

/// Where vessels' container ids live on this host.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Ids {
    /// Container ids are host ids (no user namespace; unsafe).
    Host,
    /// One slice of this pool per open vessel, over idmapped layers.
    Pool(IdRanges),
    /// Rootless: the process's namespace's container ids, shared by all
    /// of this user's vessels (see `vessel_runtime::rootless`).
    Rootless,
}

/// A vessel's ids while it is open.
pub(crate) struct VesselIds {
    pub(crate) mapping: vessel_runtime::IdMapping,
    /// The namespace its layers are idmapped through (rootful only).
    pub(crate) userns: Option<UserNamespace>,
    /// The lock on its slice of the pool (rootful only).
    pub(crate) lock: Option<Flock<fs::File>>,
}

/// The lock file `p`, locked, or `None` when another holds it.
pub(crate) fn try_lock(p: &Path) -> Result<Option<Flock<fs::File>>> {
    let f = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(p)
        .map_err(VesselError::io("open lock", p))?;
    Ok(Flock::lock(f, FlockArg::LockExclusiveNonblock).ok())
}

/// `/run/vessel/locks` for root, `$XDG_RUNTIME_DIR/vessel/locks` rootless:
/// a tmpfs, so a reboot (which ends every holder) clears it. Without
/// `XDG_RUNTIME_DIR` (no login session), `/tmp/vessel-<uid>`, as podman
/// falls back, checked to be this user's own.
pub(crate) fn lock_dir(rootless: bool) -> Result<PathBuf> {
    if !rootless {
        return Ok(PathBuf::from("/run/vessel/locks"));
    }
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| Path::new(d).is_absolute()) {
        return Ok(PathBuf::from(d).join("vessel/locks"));
    }
    let base = std::env::temp_dir().join(format!("vessel-{}", vessel_runtime::rootless::host_uid()));
    match fs::create_dir(&base) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(VesselError::io("create", &base)(e)),
        _ => {}
    }
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let meta = fs::symlink_metadata(&base).map_err(VesselError::io("stat", &base))?;
    if !meta.is_dir() || meta.uid() != nix::unistd::geteuid().as_raw() {
        return Err(VesselError::InvalidInput(format!(
            "{} is not this user's own directory: set XDG_RUNTIME_DIR",
            base.display()
        )));
    }
    fs::set_permissions(&base, fs::Permissions::from_mode(0o700)).map_err(VesselError::io("chmod", &base))?;
    Ok(base.join("locks"))
}

/// The mode `config` asks for, checked against the process's.
pub(crate) fn resolve_mode(config: &ManagerConfig) -> Result<bool> {
    use vessel_runtime::rootless::Mode;
    match (config.rootless, vessel_runtime::rootless::mode()) {
        (None | Some(false), Mode::Rootful) => Ok(false),
        (None | Some(true), Mode::Rootless) => Ok(true),
        (None | Some(true), Mode::Unavailable(why)) => Err(VesselError::RootlessUnavailable(why.clone())),
        (Some(true), Mode::Rootful) => Err(VesselError::RootlessMismatch(
            "rootless mode was asked for, but this process runs as root outside it: set VESSEL_ROOTLESS=1 before vessel::init()".into(),
        )),
        (Some(false), Mode::Rootless) => Err(VesselError::RootlessMismatch(
            "rootful mode was asked for, but this process is in rootless mode (it needs root, with VESSEL_ROOTLESS unset or 0)".into(),
        )),
        (Some(false), Mode::Unavailable(_)) => {
            Err(VesselError::RootlessMismatch("rootful mode was asked for, but it needs root".into()))
        }
    }
}

impl Ids {
    /// A host id range for vessel `id` and its user namespace, held (a flock
    /// on `locks/ids-<first host id>.lock`, machine-wide) until the lock
    /// is dropped; `None` without user namespaces. The search starts at a
    /// slot derived from the id, so a vessel usually gets the same range.
    pub(crate) fn take(&self, locks: &Path, id: &VesselId) -> Result<Option<VesselIds>> {
        let ranges = match *self {
            Ids::Host => return Ok(None),
            Ids::Rootless => {
                let mapping = vessel_runtime::rootless::container_mapping();
                return Ok(Some(VesselIds { mapping, userns: None, lock: None }));
            }
            Ids::Pool(r) => r,
        };
        let start = u64::from_str_radix(id.as_str(), 16).unwrap_or(0) % u64::from(ranges.count.max(1));
        for k in 0..u64::from(ranges.count) {
            let slot = ((start + k) % u64::from(ranges.count)) as u32;
            let mapping = ranges.mapping(slot)?;
            if let Some(lock) = try_lock(&locks.join(format!("ids-{}.lock", mapping.host_id)))? {
                let userns = Some(UserNamespace::new(mapping)?);
                return Ok(Some(VesselIds { mapping, userns, lock: Some(lock) }));
            }
        }
        Err(VesselError::IdRangesExhausted(ranges.count))
    }
}
