//! [`Vessel`]: one open workspace: its overlay mount, file API, execs and
//! snapshots.
//!
//! Locking: execs hold the state lock shared, snapshot and restore hold it
//! exclusively (so a snapshot waits for running execs, and execs wait for a
//! snapshot); file operations pass the [`Gate`], which a remount closes.

mod changes;
mod exec;
mod files;
mod live;
pub(crate) mod network;
pub(crate) mod process;
mod snapshot;

use std::fs;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use nix::fcntl::{Flock, OFlag};
use tokio::sync::RwLock;
use vessel_core::{VesselId, VesselManifest};
use vessel_runtime::UserNamespace;
use vessel_runtime::overlay::OverlayMount;
use vessel_snapshot::image::Image;

use crate::error::{Result, VesselError};
use crate::fs::{self as vfs, Gate};
use crate::manager::ManagerState;
use vessel_core::sync::Locked;

/// Files the runtimes bind-mount over; created once so that they never
/// appear in a diff as an exec's side effect.
const ETC_FILES: [&str; 3] = ["/etc/hosts", "/etc/hostname", "/etc/resolv.conf"];

#[derive(Debug)]
struct MountState {
    /// The mounted lower layers, bottom first (see `layers`).
    lowers: Vec<PathBuf>,
    mount: Option<OverlayMount>,
    closed: bool,
    /// Layers sealed from the current upper dir while the sandbox ran on
    /// it (snapshots that could not empty it): the next diff deletes what
    /// they hold and the upper dir no longer does (see `vessel_snapshot::vanished`).
    sealed: Vec<PathBuf>,
}

#[derive(Debug)]
pub(crate) struct OpenVessel {
    pub(crate) id: VesselId,
    manager: Arc<ManagerState>,
    dir: PathBuf,
    gate: Arc<Gate>,
    state: RwLock<MountState>,
    manifest: Mutex<VesselManifest>,
    image_layers: Vec<PathBuf>,
    /// The image's runtime defaults (`Env` is every command's base).
    image_config: vessel_snapshot::image::ImageConfig,
    user: crate::user::User,
    /// The vessel's ids on this host (`None`: host ids).
    ids: Option<vessel_runtime::IdMapping>,
    /// The namespace its layers are idmapped through (rootful with ids).
    userns: Option<UserNamespace>,
    /// Its commands' limits and its disk quota.
    bounds: crate::limits::Bounds,
    lock: Mutex<Option<Held>>,
    /// This host's claim on the vessel in storage.
    claim: vessel_storage::lease::Claim,
    /// The version of the manifest this host last read or wrote (`None`:
    /// not yet stored): every commit writes over it, or fails.
    version: Mutex<Option<vessel_storage::Version>>,
    /// The live sandbox, once a command needed it (see `live`).
    live: tokio::sync::Mutex<Option<vessel_runtime::sandbox::Sandbox>>,
    /// Its background processes.
    processes: Mutex<process::ProcessTable>,
    /// Whether [`Vessel::pause`] (or the idle pause) froze the sandbox.
    paused: std::sync::atomic::AtomicBool,
    /// When its sandbox was last used (see `live::Activity`).
    activity: Arc<live::Activity>,
    /// Its network policy and live network (see `network`).
    network: tokio::sync::Mutex<network::NetState>,
}

/// The vessel lock, then the lock on its host id range: held while open.
type Held = (Flock<fs::File>, Option<Flock<fs::File>>);

/// An open vessel. Methods take `&self`: share it (e.g. in an `Arc`) to run
/// execs concurrently.
#[derive(Debug)]
pub struct Vessel {
    inner: Arc<OpenVessel>,
}

fn fresh_dir(p: &Path) -> Result<()> {
    match fs::remove_dir_all(p) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(VesselError::io("remove", p)(e)),
        _ => {}
    }
    fs::create_dir_all(p).map_err(VesselError::io("create", p))
}

fn open_root(rootfs: &Path) -> Result<OwnedFd> {
    let fd =
        nix::fcntl::open(rootfs, OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, nix::sys::stat::Mode::empty())
            .map_err(|e| VesselError::io("open", rootfs)(e.into()))?;
    Ok(fd)
}

impl OpenVessel {
    /// Mounts a vessel at its current snapshot (fetching and flattening
    /// what this host needs) with a fresh upper and returns it.
    pub(crate) async fn start(
        manager: Arc<ManagerState>,
        manifest: VesselManifest,
        image: &Image,
        lock: Flock<fs::File>,
        claim: vessel_storage::lease::Claim,
        version: Option<vessel_storage::Version>,
    ) -> Result<Arc<Self>> {
        let id = manifest.id.clone();
        let mut manifest = manifest;
        let bounds = crate::limits::Bounds::resolve(
            &mut manifest.labels,
            manager.limits,
            manager.disk_quota,
            manager.disk_quota.is_some(),
        )?;
        let policy = crate::limits::network_policy(&manifest.labels)?;
        network::check_available(&policy)?;
        let (ids, userns, ids_lock) = match manager.take_ids(&id)? {
            Some(v) => (Some(v.mapping), v.userns, v.lock),
            None => (None, None, None),
        };
        let dir = manager.vessel_dir(&id);
        make_vessel_dir(&dir, ids)?;
        let image_layers: Vec<PathBuf> = image.layers.iter().map(|l| l.path.clone()).collect();
        let lowers =
            manager.layers.lowers(&id, &manifest, manifest.current_snapshot_id.as_ref(), &image_layers, &dir).await?;
        let mount = mount_at(&dir, &lowers, Upper::Fresh, ids, userns.as_ref(), bounds.disk)?;
        let root = open_root(&dir.join("rootfs"))?;
        let gate = Gate::new(id.clone(), root, ids);
        let user = {
            let pass = gate.enter(None)?;
            gate.as_vessel_root(|| -> Result<crate::user::User> {
                let work_dir = manifest.work_dir.clone();
                vfs::make_dir_all(&pass.root, &work_dir, 0o755)?;
                for f in ETC_FILES {
                    if vfs::stat(&pass.root, f).is_err() {
                        vfs::make_dir_all(&pass.root, "/etc", 0o755)?;
                        vfs::write_file(&pass.root, f, b"", 0o644)?;
                    }
                }
                match manifest.labels.get(crate::user::USER_LABEL).and_then(|l| crate::user::User::from_label(l)) {
                    Some(u) => Ok(u),
                    None => crate::user::resolve(&pass.root, image.config.user.as_deref()),
                }
            })?
        };
        manifest.labels.insert(crate::user::USER_LABEL.into(), user.label());
        if let Some(m) = ids
            && let Some(bad) =
                [user.uid, user.gid].into_iter().chain(user.additional_gids.iter().copied()).find(|i| *i >= m.size)
        {
            return Err(VesselError::UnknownUser {
                user: image.config.user.clone().unwrap_or_default(),
                reason: format!("id {bad} is outside the vessel's {} mapped ids", m.size),
            });
        }
        let inner = Self {
            id: id.clone(),
            gate: Arc::new(gate),
            manager,
            dir,
            state: RwLock::new(MountState { lowers, mount: Some(mount), closed: false, sealed: Vec::new() }),
            manifest: Mutex::new(manifest),
            image_config: image.config.clone(),
            user,
            ids,
            userns,
            image_layers,
            bounds,
            lock: Mutex::new(Some((lock, ids_lock))),
            claim,
            version: Mutex::new(version),
            live: tokio::sync::Mutex::new(None),
            processes: Mutex::new(Default::default()),
            paused: Default::default(),
            activity: Default::default(),
            network: tokio::sync::Mutex::new(network::NetState::new(policy)),
        };
        Ok(Arc::new(inner))
    }

    /// Mounts the rootfs on `lowers` with the vessel's ids and disk quota.
    fn mount(&self, lowers: &[PathBuf], upper: Upper) -> Result<OverlayMount> {
        mount_at(&self.dir, lowers, upper, self.ids, self.userns.as_ref(), self.bounds.disk)
    }

    pub(crate) fn manifest(&self) -> VesselManifest {
        self.manifest.locked().clone()
    }

    /// Writes `manifest` to storage over the version this host holds (the
    /// fence): [`VesselError::LeaseLost`] if another host has written
    /// since, and nothing changes.
    pub(crate) async fn commit_manifest(&self, manifest: &VesselManifest) -> Result<()> {
        use vessel_storage::{StorageErrorKind, WriteIf};
        let lost = |e: vessel_storage::StorageError| match e.kind() {
            StorageErrorKind::Conflict => VesselError::LeaseLost(self.id.clone()),
            _ => e.into(),
        };
        self.manager.lease.verify(&self.claim).await.map_err(lost)?;
        let held = self.version.locked().clone();
        let cond = held.map_or(WriteIf::Absent, WriteIf::Matches);
        let v = self.manager.storage.save_vessel_manifest_if(manifest, &cond).await.map_err(lost)?;
        *self.version.locked() = Some(v);
        Ok(())
    }

    async fn freeze(&self) {
        let gate = self.gate.clone();
        let _ = tokio::task::spawn_blocking(move || gate.freeze()).await;
    }

    /// Unmounts, releases the lock; later calls fail with `Closed`.
    pub(crate) async fn close(&self) -> Result<()> {
        let mut state = self.state.write().await;
        if state.closed {
            return Ok(());
        }
        // Its processes first: nothing runs on a vessel being unmounted.
        let stopped = self.stop_sandbox(process::StopReason::VesselClosed).await;
        if stopped > 0 {
            tracing::info!(vessel = %self.id, stopped, "closing the vessel stopped its background processes");
        }
        self.close_network().await;
        self.freeze().await;
        state.closed = true;
        let unmounted = state.mount.take().map(OverlayMount::unmount).transpose();
        self.gate.thaw_remounted(None);
        let scrubbed = crate::host::scrub(&self.dir);
        self.manager.release(&self.claim).await;
        self.lock.locked().take();
        unmounted?;
        scrubbed
    }
}

/// What becomes of the upper dir when the rootfs is (re)mounted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Upper {
    /// Emptied: a new session, or a new snapshot or restore on top.
    Fresh,
    /// Kept as it is: recovery after a failed snapshot or restore.
    Keep,
}

/// Creates a vessel's host directory: only its own container root (which
/// must traverse it to reach the rootfs) and host root may enter it, so no
/// setuid file or device node made in the vessel is usable from the host.
fn make_vessel_dir(dir: &Path, ids: Option<vessel_runtime::IdMapping>) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for d in [dir.to_path_buf(), dir.join("rootfs")] {
        fs::create_dir_all(&d).map_err(VesselError::io("create", &d))?;
    }
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(VesselError::io("chmod", dir))?;
    let owner = ids.map_or(0, |m| m.host_id);
    nix::unistd::chown(dir, Some(nix::unistd::Uid::from_raw(owner)), Some(nix::unistd::Gid::from_raw(owner)))
        .map_err(|e| VesselError::io("chown", dir)(e.into()))
}

/// The live upper dir; it and the work dir share `ovl/`, the one directory
/// idmapped for them (and, with a disk quota, the btrfs subvolume that
/// bounds them).
pub(crate) fn upper_dir(dir: &Path) -> PathBuf {
    dir.join("ovl/upper")
}

/// `parent/name` as a new directory: with a disk quota, a subvolume limited to it.
fn bounded_dir(parent: &Path, name: &str, disk: Option<u64>) -> Result<PathBuf> {
    let p = parent.join(name);
    match disk {
        Some(bytes) => vessel_runtime::quota::create_limited(parent, std::ffi::OsStr::new(name), bytes)
            .map_err(VesselError::io("create a quota subvolume at", &p))?,
        None => fs::create_dir(&p).map_err(VesselError::io("create", &p))?,
    }
    Ok(p)
}

/// Mounts the vessel's rootfs on `lowers` (bottom first), over idmapped
/// layers with a user namespace; rootless (ids without a namespace to map
/// layers through), made as container root, so the upper's root is its.
fn mount_at(
    dir: &Path,
    lowers: &[PathBuf],
    upper: Upper,
    ids: Option<vessel_runtime::IdMapping>,
    userns: Option<&UserNamespace>,
    disk: Option<u64>,
) -> Result<OverlayMount> {
    match (ids, userns) {
        (Some(m), None) => {
            vessel_runtime::idmap::as_host_ids(m.host_id, m.host_id, || mount_dirs(dir, lowers, upper, None, disk))
        }
        _ => mount_dirs(dir, lowers, upper, userns, disk),
    }
}

fn mount_dirs(
    dir: &Path,
    lowers: &[PathBuf],
    upper: Upper,
    userns: Option<&UserNamespace>,
    disk: Option<u64>,
) -> Result<OverlayMount> {
    let ovl = dir.join("ovl");
    if !ovl.exists() {
        // New, or moved into the layer cache by the last snapshot.
        bounded_dir(dir, "ovl", disk)?;
    }
    let (up, work) = (upper_dir(dir), ovl.join("work"));
    match upper {
        Upper::Fresh => fresh_dir(&up)?,
        Upper::Keep => fs::create_dir_all(&up).map_err(VesselError::io("create", &up))?,
    }
    fresh_dir(&work)?;
    let lowers: Vec<&Path> = lowers.iter().rev().map(PathBuf::as_path).collect();
    let target = dir.join("rootfs");
    Ok(match userns {
        Some(ns) => OverlayMount::mount_idmapped(&target, &lowers, &ovl, ns)?,
        None => OverlayMount::mount(&target, &lowers, Some((&up, &work)))?,
    })
}

impl Vessel {
    pub(crate) fn from_inner(inner: Arc<OpenVessel>) -> Self {
        Self { inner }
    }

    /// The state of the manager that opened it.
    pub(crate) fn inner_state(&self) -> &Arc<ManagerState> {
        &self.inner.manager
    }

    /// The vessel's id.
    pub fn id(&self) -> &VesselId {
        &self.inner.id
    }

    /// The vessel's manifest as of now.
    pub fn manifest(&self) -> VesselManifest {
        self.inner.manifest()
    }

    /// The vessel's name, if it was created with one.
    pub fn name(&self) -> Option<String> {
        crate::names::name_of(&self.inner.manifest().labels).map(str::to_owned)
    }

    /// How the vessel's container ids map to host ids on this host (`None`:
    /// no user namespace, container root is host root).
    pub fn id_mapping(&self) -> Option<vessel_runtime::IdMapping> {
        self.inner.gate.ids
    }

    /// The image's runtime defaults: `Env`, `WorkingDir`, `User`,
    /// `Entrypoint` and `Cmd` (a caller that runs "the image" runs
    /// `entrypoint` then `cmd`, as docker).
    pub fn image_config(&self) -> &vessel_snapshot::image::ImageConfig {
        &self.inner.image_config
    }

    /// Where the vessel's rootfs is mounted on this host (for inspection;
    /// use the file API to change it).
    pub fn rootfs(&self) -> PathBuf {
        self.inner.dir.join("rootfs")
    }

    fn path(&self, path: &str) -> Result<String> {
        let work_dir = self.inner.manifest.locked().work_dir.clone();
        vfs::normalize(&work_dir, path)
    }

    fn with_root<T>(&self, path: &str, f: impl FnOnce(&OwnedFd, &str) -> Result<T>) -> Result<T> {
        let path = self.path(path)?;
        let pass = self.inner.gate.enter(None)?;
        self.inner.gate.as_vessel_root(|| f(&pass.root, &path))
    }

    /// Unmounts the vessel and releases its lock. Uncommitted changes are
    /// not durable: the next open starts from the current snapshot.
    pub async fn close(&self) -> Result<()> {
        self.inner.close().await
    }
}
