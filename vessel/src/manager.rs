//! [`Manager`]: creates, opens and deletes vessels on this host.
//!
//! Host layout under the mount root: `layers/` (the layer cache, shared by
//! all vessels), `vessels/<id>/` (an open vessel's rootfs mount, upper and
//! work dirs, throwaway exec mounts), `runtime/` (the backend's run files).
//! A vessel is open in one handle at a time: across hosts (and processes)
//! sharing a storage by its claim in storage (see `vessel_storage::lease`),
//! within a mount root by a flock on `locks/<id>.lock`. Only the current
//! snapshot's state is durable; a vessel dir whose lock nobody holds is a
//! crashed process's and is removed on startup.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};

use nix::fcntl::{Flock, FlockArg};
use vessel_core::{IdGenerator, ImageRef, SnapshotId, VesselId, VesselManifest, VesselName};
use vessel_runtime::{Runtime, UserNamespace};
use vessel_snapshot::image::{Image, unpack_image};
use vessel_snapshot::{LayerCache, LayerKey};
use vessel_storage::lease::{Claim, HostLease};
use vessel_storage::{BlobReader, CompressedStorage, LocalStorage, RecordKey, Storage, StorageErrorKind, Version};

use crate::config::{IdRanges, ManagerConfig};
use crate::error::{Result, VesselError};
use crate::vessel::{OpenVessel, Vessel};
use vessel_core::sync::Locked;

/// The host id of the vessel's holder when it last took the vessel over
/// (the rewrite that fences off the previous holder's commits).
pub(crate) const HOLDER_LABEL: &str = "vessel.lease.host";

/// Labels pinning a vessel's base image (a moved tag cannot change it).
pub(crate) const IMAGE_CONFIG_LABEL: &str = "vessel.image.config-digest";
pub(crate) const IMAGE_MANIFEST_LABEL: &str = "vessel.image.manifest-digest";

/// What every vessel of a manager shares.
pub(crate) struct ManagerState {
    pub(crate) storage: Arc<dyn Storage>,
    pub(crate) cache: LayerCache,
    pub(crate) runtime: Arc<dyn Runtime>,
    pub(crate) ids: Arc<dyn IdGenerator>,
    pub(crate) root: PathBuf,
    /// Machine-wide locks of host id ranges (ids are the machine's, whatever the mount root).
    pub(crate) locks: PathBuf,
    /// This mount root's vessel locks (other mount roots are other hosts,
    /// excluded by the vessel's claim in storage).
    pub(crate) vessel_locks: PathBuf,
    pub(crate) open: Mutex<HashMap<VesselId, Weak<OpenVessel>>>,
    /// Where vessels' container ids live on this host.
    pub(crate) id_source: Ids,
    /// Limits this host cannot apply, and why (reported, never silent).
    pub(crate) unavailable: Vec<crate::UnavailableLimit>,
    /// Limits of vessels created without their own.
    pub(crate) limits: vessel_core::Limits,
    /// Disk quota of vessels created without their own; `None`: quotas off.
    pub(crate) disk_quota: Option<u64>,
    /// How to reach registries.
    pub(crate) registries: crate::registry::Registries,
    /// This host's lease in storage: one heartbeat, a claim per open vessel.
    pub(crate) lease: HostLease,
}

impl std::fmt::Debug for ManagerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ManagerState").field("root", &self.root).field("runtime", &self.runtime).finish_non_exhaustive()
    }
}

/// Creates, opens and deletes vessels; one per host and storage is typical.
#[derive(Debug)]
pub struct Manager {
    state: Arc<ManagerState>,
}

/// Creates each dir with its mode: 0711 where containers must traverse
/// (to their rootfs and bind-mount sources), 0700 elsewhere; existing dirs
/// get the mode too, so an older, more open layout is closed.
fn mkdirs(dirs: &[(&Path, u32)]) -> Result<()> {
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

impl ManagerState {
    pub(crate) fn vessel_dir(&self, id: &VesselId) -> PathBuf {
        self.root.join("vessels").join(id.as_str())
    }

    /// A host id range for vessel `id` and its user namespace, held (a flock
    /// on `locks/ids-<first host id>.lock`, machine-wide) until the lock
    /// is dropped; `None` without user namespaces. The search starts at a
    /// slot derived from the id, so a vessel usually gets the same range.
    pub(crate) fn take_ids(&self, id: &VesselId) -> Result<Option<VesselIds>> {
        let ranges = match self.id_source {
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
            if let Some(lock) = try_lock(&self.locks.join(format!("ids-{}.lock", mapping.host_id)))? {
                let userns = Some(UserNamespace::new(mapping)?);
                return Ok(Some(VesselIds { mapping, userns, lock: Some(lock) }));
            }
        }
        Err(VesselError::IdRangesExhausted(ranges.count))
    }

    /// Takes the vessel's lock in this mount root, or says who has it.
    pub(crate) fn lock(&self, id: &VesselId) -> Result<Flock<fs::File>> {
        try_lock(&self.vessel_locks.join(format!("{id}.lock")))?.ok_or_else(|| VesselError::Locked(id.clone()))
    }

    /// Takes the vessel's claim in storage, or says which host has it.
    pub(crate) async fn claim(&self, id: &VesselId) -> Result<Claim> {
        self.lease.claim(id).await.map_err(VesselError::lease)
    }

    /// Gives a claim back (a failure only delays the next holder until
    /// this host's heartbeat ends).
    pub(crate) async fn release(&self, claim: &Claim) {
        if let Err(e) = self.lease.release(claim).await {
            tracing::warn!(vessel = %claim.vessel(), error = %e, "could not release the vessel's claim");
        }
    }

    /// Removes the claim record of a vessel that does not (or no longer) exist.
    async fn forget_claim(&self, id: &VesselId) {
        if let Err(e) = self.storage.delete_record(&RecordKey::Claim(id.clone())).await {
            tracing::warn!(vessel = %id, error = %e, "could not remove the vessel's claim");
        }
    }

    /// Imports `reference` into the layer cache for `holder`: from storage,
    /// or (containerd backend) from containerd's image store.
    pub(crate) async fn image_layers(&self, reference: &ImageRef, holder: &VesselId) -> Result<Image> {
        if let Some(image) = self.cached_image(reference, holder).await {
            return Ok(image);
        }
        let mut export = None;
        let reader: BlobReader = match self.storage.load_image(reference).await {
            Ok(r) => r,
            Err(e) if e.kind() == StorageErrorKind::NotFound => match self.containerd_export(reference).await? {
                Some((r, job)) => {
                    export = Some(job);
                    r
                }
                None if self.registries.pull_on_demand => {
                    self.pull(reference, std::sync::Arc::new(|_| {})).await?;
                    self.storage.load_image(reference).await?
                }
                None => return Err(VesselError::ImageNotFound(reference.to_string())),
            },
            Err(e) => return Err(e.into()),
        };
        let (cache, holder, name) = (self.cache.clone(), holder.to_string(), reference.as_str().to_owned());
        let imported = crate::task::blocking(move || {
            let reader = tokio_util::io::SyncIoBridge::new(reader);
            unpack_image(reader, &cache, &holder, Some(&name))
        })
        .await?;
        if let Some(export) = export {
            // The exporter's own error explains a truncated archive best.
            crate::task::joined(export).await??;
        }
        Ok(imported?)
    }

    /// `reference` streamed out of containerd's image store (containerd
    /// backend), with the job exporting it; `None` where it is not there.
    async fn containerd_export(&self, reference: &ImageRef) -> Result<Option<(BlobReader, ExportJob)>> {
        let Some(store) = self.runtime.image_store() else { return Ok(None) };
        if !store.has_image(reference.as_str()).await? {
            return Ok(None);
        }
        let (mut w, r) = tokio::io::duplex(1 << 20);
        let name = reference.as_str().to_owned();
        let job = tokio::spawn(async move { store.export_image(&name, &mut w).await });
        Ok(Some((Box::new(r), job)))
    }

    /// Pulls `reference` from its registry into storage (see [`crate::registry`]).
    pub(crate) async fn pull(
        &self,
        reference: &ImageRef,
        progress: std::sync::Arc<dyn Fn(crate::registry::PullProgress) + Send + Sync>,
    ) -> Result<crate::registry::PulledImage> {
        let spool = crate::registry::Spool(self.root.join(format!(".pull-{:016x}", rand::random::<u64>())));
        fs::create_dir(&spool.0).map_err(VesselError::io("create", &spool.0))?;
        let (archive, pulled) =
            crate::registry::pull_to_archive(&self.registries, reference.as_str(), &spool.0, progress).await?;
        self.store_image_file(reference, &archive).await?;
        Ok(pulled)
    }

    /// Checks the image archive at `path` (every digest verified, its layers
    /// unpacked into the cache) and stores it as `reference`.
    pub(crate) async fn store_image_file(&self, reference: &ImageRef, path: &Path) -> Result<()> {
        let (cache, name, p) = (self.cache.clone(), reference.as_str().to_owned(), path.to_path_buf());
        // The image holds its layers in this host's cache (as docker keeps
        // an image's layers until it is removed), so creating vessels from
        // it unpacks nothing even after its last vessel is gone. What an
        // earlier import of this reference held is let go first.
        let holder = image_holder(reference);
        let image = crate::task::blocking(move || {
            cache.release_all(&holder)?;
            let file = fs::File::open(&p).map_err(VesselError::io("open", &p))?;
            unpack_image(std::io::BufReader::new(file), &cache, &holder, Some(&name)).map_err(VesselError::from)
        })
        .await??;
        // The summary goes first and comes last: never one of another archive.
        self.storage.delete_image_index(reference).await?;
        let file = tokio::fs::File::open(path).await.map_err(VesselError::io("open", path))?;
        self.storage.save_image(reference, Box::new(tokio::io::BufReader::new(file))).await?;
        self.storage.save_image_index(reference, crate::layers::image_index(&image)).await?;
        Ok(())
    }

    /// `reference` from its stored summary when this host's cache holds
    /// every layer (retained for `holder`): no archive read.
    async fn cached_image(&self, reference: &ImageRef, holder: &VesselId) -> Option<Image> {
        let data = self.storage.load_image_index(reference).await.ok()?;
        let mut retained = Vec::new();
        let image = crate::layers::parse_image_index(&data, |diff_id| {
            let key = LayerKey::diff_id(diff_id).ok()?;
            let held = self.cache.retain(&key, holder.as_str()).ok()?;
            let path = self.cache.path(&key);
            retained.push(key);
            held.then_some(path)
        });
        if image.is_none() {
            // Some layer is missing here: what this attempt retained goes back.
            for key in retained {
                let _ = self.cache.release(&key, holder.as_str());
            }
        }
        image
    }

    /// The layer of snapshot `id`, fetched from storage and verified against
    /// `checksum` if this host's cache lacks it.
    pub(crate) async fn snapshot_layer(&self, vessel: &VesselId, id: &SnapshotId, checksum: &str) -> Result<PathBuf> {
        let key = LayerKey::snapshot(vessel.clone(), id.clone(), checksum)?;
        if self.cache.retain(&key, vessel.as_str())? {
            return Ok(self.cache.path(&key));
        }
        let blob = self.storage.load_snapshot(vessel, id).await?;
        let (cache, holder, checksum) = (self.cache.clone(), vessel.to_string(), checksum.to_owned());
        crate::task::blocking(move || {
            let reader = tokio_util::io::SyncIoBridge::new(blob);
            cache.get_or_unpack(&key, &holder, Some(&checksum), || Ok(reader))
        })
        .await?
        .map_err(VesselError::from)
    }
}

/// A temporary file removed when dropped.
struct SpoolFile(PathBuf);

impl Drop for SpoolFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// The lock file `p`, locked, or `None` when another holds it.
fn try_lock(p: &Path) -> Result<Option<Flock<fs::File>>> {
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
fn lock_dir(rootless: bool) -> Result<PathBuf> {
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
fn resolve_mode(config: &ManagerConfig) -> Result<bool> {
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

/// A containerd image export running beside its reader.
type ExportJob = tokio::task::JoinHandle<Result<u64, vessel_runtime::RuntimeError>>;

/// The layer-cache holder for what an imported image keeps cached:
/// `image-` and a hash of the reference (holders are plain names).
fn image_holder(reference: &ImageRef) -> String {
    use sha2::Digest;
    format!("image-{:x}", sha2::Sha256::digest(reference.as_str().as_bytes()))[..38].to_owned()
}

/// A vessel's work dir as the Go original takes it: an empty or relative
/// one is `/`.
fn work_dir_of(work_dir: &str) -> Result<String> {
    if !work_dir.starts_with('/') {
        return Ok("/".into());
    }
    crate::fs::normalize("/", work_dir)
}

impl Manager {
    /// A manager with `config`; removes what crashed processes left under
    /// the mount root (mounts and dirs of vessels nobody has open; with the
    /// containerd backend, containers of dead vessel processes).
    pub async fn new(config: ManagerConfig) -> Result<Self> {
        let rootless = resolve_mode(&config)?;
        if rootless && !config.user_namespaces {
            return Err(VesselError::InvalidInput(
                "rootless vessels always run in a user namespace (user_namespaces(false) is for root)".into(),
            ));
        }
        let root = config.mount_root.clone();
        let locks = lock_dir(rootless)?;
        mkdirs(&[
            (&root, 0o711),
            (&root.join("vessels"), 0o711),
            (&root.join("runtime"), 0o711),
            (&root.join("layers"), 0o700),
            (&root.join("locks"), 0o700),
            (&locks, 0o700),
        ])?;
        if config.id_ranges.count == 0 {
            return Err(VesselError::InvalidInput("the id range pool is empty".into()));
        }
        config.id_ranges.mapping(config.id_ranges.count - 1)?;
        if config.user_namespaces {
            // A real trial on this kernel and filesystem, never a silently
            // unisolated vessel.
            vessel_runtime::idmap::probe(&root.join("vessels")).map_err(VesselError::IsolationUnsupported)?;
        } else {
            tracing::warn!("user namespaces are off: container root is host root (unsafe for untrusted code)");
        }
        config.limits.validate()?;
        let mut unavailable = Vec::new();
        let disk_quota = match (config.quota_mode, config.disk_quota) {
            (crate::QuotaMode::Off, _) | (_, None) => None,
            (mode, Some(bytes)) => {
                crate::limits::check_disk(bytes)?;
                // A real trial: a write past a quota under the mount root is
                // refused (rootless: btrfs qgroups need host privilege).
                let vessels = root.join("vessels");
                let probed = if rootless {
                    Err("rootless: disk quotas are btrfs qgroups, which need host privilege".to_owned())
                } else {
                    vessel_runtime::quota::probe(&vessels)
                };
                match (probed, mode) {
                    (Ok(()), _) => Some(bytes),
                    (Err(reason), crate::QuotaMode::Require) => {
                        return Err(VesselError::QuotaUnsupported { path: vessels, reason });
                    }
                    (Err(reason), _) => {
                        unavailable.push(crate::UnavailableLimit { limit: crate::Limit::Disk, reason });
                        None
                    }
                }
            }
        };
        let storage: Arc<dyn Storage> = match &config.storage {
            Some(s) => s.clone(),
            None => Arc::new(CompressedStorage::new(LocalStorage::new(crate::config::data_home().join("data"))?)),
        };
        let cache = LayerCache::open(root.join("layers"))?;
        let backend = vessel_runtime::BackendConfig {
            root: root.join("runtime"),
            containerd_address: config.containerd_address.clone(),
            containerd_namespace: config.namespace.clone(),
        };
        let runtime = vessel_runtime::connect(config.backend, &backend).await?;
        if let Some(reason) = runtime.limits_unavailable() {
            for limit in [crate::Limit::Memory, crate::Limit::Cpu, crate::Limit::Pids] {
                unavailable.push(crate::UnavailableLimit { limit, reason: reason.clone() });
            }
        }
        for u in &unavailable {
            tracing::warn!(limit = ?u.limit, reason = %u.reason, "a vessel limit is not applied on this host");
        }
        if config.lease.ttl < std::time::Duration::from_secs(1) {
            return Err(VesselError::InvalidInput("the lease TTL must be at least 1 s".into()));
        }
        let lease = HostLease::start(storage.clone(), config.lease.clone()).await?;
        let state = ManagerState {
            storage,
            cache,
            runtime,
            ids: config.id_generator.clone(),
            vessel_locks: root.join("locks"),
            root,
            locks,
            open: Mutex::new(HashMap::new()),
            id_source: match (rootless, config.user_namespaces) {
                (true, _) => Ids::Rootless,
                (false, true) => Ids::Pool(config.id_ranges),
                (false, false) => Ids::Host,
            },
            unavailable,
            limits: config.limits,
            disk_quota,
            registries: config.registries.clone(),
            lease,
        };
        let mgr = Self { state: Arc::new(state) };
        let containers = mgr.state.runtime.remove_leftovers().await?;
        if containers > 0 {
            tracing::info!(containers, "removed containers left by dead vessel processes");
        }
        mgr.remove_stale()?;
        Ok(mgr)
    }

    /// Removes vessel dirs (and their mounts) whose lock nobody holds.
    fn remove_stale(&self) -> Result<usize> {
        let mut removed = 0;
        let dir = self.state.root.join("vessels");
        for e in fs::read_dir(&dir).map_err(VesselError::io("read", &dir))?.flatten() {
            let Ok(id) = VesselId::new(&e.file_name().to_string_lossy()) else { continue };
            if let Ok(_lock) = self.state.lock(&id) {
                tracing::info!(%id, "removing a vessel mount left by a dead process");
                scrub(&e.path())?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// This host's mount root.
    pub fn mount_root(&self) -> &Path {
        &self.state.root
    }

    /// The lock file that a process holding vessel `id` open on this mount
    /// root keeps locked (`flock`), so tools can tell who holds it.
    pub fn vessel_lock_file(&self, id: &VesselId) -> PathBuf {
        self.state.vessel_locks.join(format!("{id}.lock"))
    }

    /// The backend's name (`youki`, `containerd`).
    pub fn backend(&self) -> &'static str {
        self.state.runtime.name()
    }

    /// Whether this manager runs vessels rootless.
    pub fn is_rootless(&self) -> bool {
        matches!(self.state.id_source, Ids::Rootless)
    }

    /// The limits this host cannot apply, and why: vessels run without
    /// them (rootless without a usable cgroup, or without disk quotas).
    /// Empty when every limit holds.
    pub fn unavailable_limits(&self) -> &[crate::UnavailableLimit] {
        &self.state.unavailable
    }

    /// The storage this manager uses.
    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.state.storage
    }

    /// Creates a vessel from `image_ref` (from storage, or containerd's
    /// image store with that backend, or its registry with
    /// `ManagerConfig::pull_on_demand`), with `work_dir` as the default
    /// directory for relative paths and commands: an absolute `work_dir`
    /// as given; `""`, the image's `WorkingDir` (as docker), else `/`; a
    /// relative one, `/` (as the Go original). The image's `Env` is every
    /// command's base environment, its `User` the commands' user (resolved
    /// through the image's own `/etc/passwd` and `/etc/group`), and its
    /// `Entrypoint`/`Cmd` are offered by [`Vessel::image_config`]. The image
    /// is pinned by digest in the manifest's labels.
    pub async fn create_vessel(&self, image_ref: &str, work_dir: &str) -> Result<Vessel> {
        self.create_vessel_with(image_ref, work_dir, &crate::VesselOptions::default()).await
    }

    /// [`Manager::create_vessel`] with options: the vessel's own limits and
    /// disk quota (pinned in its manifest), checked before anything starts.
    pub async fn create_vessel_with(
        &self,
        image_ref: &str,
        work_dir: &str,
        opts: &crate::VesselOptions,
    ) -> Result<Vessel> {
        let mut option_labels = BTreeMap::new();
        crate::limits::label_options(opts, &mut option_labels)?;
        if opts.disk_bytes.is_some() && self.state.disk_quota.is_none() {
            return Err(VesselError::InvalidInput(
                "a disk quota was asked for, but this manager runs without disk quotas".into(),
            ));
        }
        let name = opts.name.as_deref().map(VesselName::new).transpose()?;
        let reference = ImageRef::new(image_ref)?;
        let given = work_dir.to_owned();
        let id = self.state.ids.vessel_id();
        let lock = self.state.lock(&id)?;
        let claim = self.state.claim(&id).await?;
        // Undoes what this create did in storage and the cache, on failure.
        let undo = async |state: &ManagerState| {
            if let Some(n) = &name {
                state.drop_name(n, &id).await;
            }
            self.release_layers(&id);
            state.forget_claim(&id).await;
        };
        if let Some(n) = &name
            && let Err(e) = self.state.take_name(n, &id).await
        {
            self.state.forget_claim(&id).await;
            return Err(e);
        }
        let image = match self.state.image_layers(&reference, &id).await {
            Ok(i) => i,
            Err(e) => {
                undo(&self.state).await;
                return Err(e);
            }
        };
        let work_dir = match (given.as_str(), image.config.working_dir.as_deref()) {
            ("", Some(w)) if w.starts_with('/') => work_dir_of(w)?,
            (w, _) => work_dir_of(w)?,
        };
        let now = chrono::Utc::now();
        let mut labels = BTreeMap::from([(IMAGE_CONFIG_LABEL.to_owned(), image.config_digest.clone())]);
        if let Some(m) = &image.manifest_digest {
            labels.insert(IMAGE_MANIFEST_LABEL.into(), m.clone());
        }
        labels.extend(option_labels);
        if let Some(n) = &name {
            labels.insert(crate::names::NAME_LABEL.into(), n.to_string());
        }
        labels.insert(HOLDER_LABEL.into(), self.state.lease.id().to_string());
        let manifest = VesselManifest {
            id: id.clone(),
            base_image_ref: reference,
            current_snapshot_id: None,
            work_dir,
            create_time: now,
            update_time: now,
            labels,
            snapshots: Vec::new(),
        };
        let vessel = OpenVessel::start(self.state.clone(), manifest, &image, lock, claim, None).await;
        let vessel = match vessel {
            Ok(v) => v,
            Err(e) => {
                // Nothing of a vessel that failed to start stays.
                let _ = scrub(&self.state.vessel_dir(&id));
                undo(&self.state).await;
                return Err(e);
            }
        };
        // With what starting it pinned (the resolved user); create-if-absent.
        if let Err(e) = vessel.commit_manifest(&vessel.manifest()).await {
            let _ = vessel.close().await;
            undo(&self.state).await;
            return Err(e);
        }
        Ok(self.register(vessel))
    }

    fn register(&self, inner: Arc<OpenVessel>) -> Vessel {
        let mut open = self.state.open.locked();
        open.retain(|_, w| w.strong_count() > 0);
        open.insert(inner.id.clone(), Arc::downgrade(&inner));
        Vessel::from_inner(inner)
    }

    /// Drops every reference `id` has in this host's layer cache (image and
    /// snapshot layers) and removes the layers nobody holds any more.
    fn release_layers(&self, id: &VesselId) {
        if let Err(e) = self.state.cache.release_all(id.as_str()).and_then(|_| self.state.cache.gc()) {
            tracing::warn!(%id, error = %e, "could not release cached layers");
        }
    }

    /// `id`'s manifest, or `VesselNotFound`.
    async fn load_manifest(&self, id: &VesselId) -> Result<VesselManifest> {
        match self.state.storage.load_vessel_manifest(id).await {
            Err(e) if e.kind() == StorageErrorKind::NotFound => Err(VesselError::VesselNotFound(id.clone())),
            r => Ok(r?),
        }
    }

    /// Opens a vessel at its current snapshot's state (uncommitted changes
    /// of an earlier session are not durable), fetching and verifying the
    /// layers this host lacks.
    ///
    /// A vessel is open on one host at a time: another host's live claim
    /// on it is [`VesselError::Busy`]; a dead host's is taken over, and the
    /// manifest rewritten so that host can commit nothing more.
    ///
    /// `id` may also be the vessel's name.
    pub async fn open_vessel(&self, id: &str) -> Result<Vessel> {
        let id = self.state.resolve(id).await?;
        let lock = self.state.lock(&id)?;
        let claim = self.state.claim(&id).await?;
        let loaded = match self.state.storage.load_vessel_manifest_versioned(&id).await {
            Err(e) if e.kind() == StorageErrorKind::NotFound => {
                self.state.forget_claim(&id).await;
                return Err(VesselError::VesselNotFound(id));
            }
            r => r,
        };
        let opened = match loaded {
            Ok((manifest, version)) => self.start_vessel(manifest, version, lock, claim.clone()).await,
            Err(e) => Err(e.into()),
        };
        if opened.is_err() {
            // What was fetched, retained or mounted for this open only.
            let _ = scrub(&self.state.vessel_dir(&id));
            self.release_layers(&id);
            self.state.release(&claim).await;
        }
        Ok(self.register(opened?))
    }

    async fn start_vessel(
        &self,
        mut manifest: VesselManifest,
        mut version: Version,
        lock: Flock<fs::File>,
        claim: Claim,
    ) -> Result<Arc<OpenVessel>> {
        if claim.took_over() {
            // Fencing: the dead holder wrote over the version it read; from
            // this write on, it cannot.
            manifest.labels.insert(HOLDER_LABEL.into(), self.state.lease.id().to_string());
            version = self
                .state
                .storage
                .save_vessel_manifest_if(&manifest, &vessel_storage::WriteIf::Matches(version))
                .await?;
        }
        let id = manifest.id.clone();
        // Remains of an earlier session of this vessel on this host.
        scrub(&self.state.vessel_dir(&id))?;
        let image = self.state.image_layers(&manifest.base_image_ref, &id).await?;
        if let Some(pinned) = manifest.labels.get(IMAGE_CONFIG_LABEL)
            && *pinned != image.config_digest
        {
            return Err(VesselError::ImageChanged {
                reference: manifest.base_image_ref.to_string(),
                pinned: pinned.clone(),
                found: image.config_digest,
            });
        }
        OpenVessel::start(self.state.clone(), manifest, &image, lock, claim, Some(version)).await
    }

    /// Deletes a vessel: its snapshots and manifest from storage, its layers
    /// from this host's cache. A handle to it in this manager is closed
    /// first; one in another process makes this fail ([`VesselError::Locked`]).
    /// `id` may also be the vessel's name, which is freed.
    pub async fn delete_vessel(&self, id: &str) -> Result<()> {
        let id = self.state.resolve(id).await?;
        let open = self.state.open.locked().remove(&id);
        if let Some(inner) = open.and_then(|w| w.upgrade()) {
            inner.close().await?;
        }
        let _lock = self.state.lock(&id)?;
        let claim = self.state.claim(&id).await?;
        let name = match self.load_manifest(&id).await {
            Ok(m) => crate::names::name_of(&m.labels).and_then(|n| VesselName::new(n).ok()),
            Err(e) => {
                match e.kind() {
                    crate::VesselErrorKind::NotFound => self.state.forget_claim(&id).await,
                    _ => self.state.release(&claim).await,
                }
                return Err(e);
            }
        };
        let deleted = async {
            scrub(&self.state.vessel_dir(&id))?;
            self.state.storage.delete_vessel(&id).await?;
            Ok::<_, VesselError>(())
        }
        .await;
        if let Err(e) = deleted {
            self.state.release(&claim).await;
            return Err(e);
        }
        if let Some(n) = &name {
            self.state.drop_name(n, &id).await;
        }
        self.state.forget_claim(&id).await;
        self.release_layers(&id);
        Ok(())
    }

    /// Which host holds vessel `id` open, if any (`live: false`: its host
    /// died and the next opener takes it over).
    pub async fn vessel_holder(&self, id: &VesselId) -> Result<Option<vessel_storage::lease::Holder>> {
        Ok(self.state.lease.holder(id).await?)
    }

    /// This manager's host id, as other hosts see it in a vessel's holder.
    pub fn host_id(&self) -> &vessel_storage::HostId {
        self.state.lease.id()
    }

    /// The vessels in storage.
    pub async fn list_vessels(&self) -> Result<Vec<VesselManifest>> {
        let mut out = Vec::new();
        for id in self.state.storage.list_vessels().await? {
            match self.state.storage.load_vessel_manifest(&id).await {
                Ok(m) => out.push(m),
                // Deleted meanwhile.
                Err(e) if e.kind() == StorageErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(out)
    }

    /// Imports an image archive (docker-save or OCI layout, optionally
    /// compressed) into storage as `image_ref`, after checking that it reads
    /// (every digest verified; in an archive of several images, one must be
    /// `image_ref`). Memory stays bounded: the archive is spooled to a file
    /// under the mount root, checked from there, and streamed into storage.
    pub async fn import_image(&self, image_ref: &str, mut archive: BlobReader) -> Result<()> {
        let reference = ImageRef::new(image_ref)?;
        let spool = SpoolFile(self.state.root.join(format!(".import-{:016x}.tmp", rand::random::<u64>())));
        {
            let mut f = tokio::fs::File::create(&spool.0).await.map_err(VesselError::io("create", &spool.0))?;
            tokio::io::copy(&mut archive, &mut f).await.map_err(VesselError::io("read image archive", image_ref))?;
            f.sync_all().await.map_err(VesselError::io("sync", &spool.0))?;
        }
        self.state.store_image_file(&reference, &spool.0).await
    }

    /// Pulls `reference` from its registry (e.g. `localhost:5000/team/app:v1`,
    /// or `busybox`, which is docker.io's) into storage: resolved to this
    /// host's platform, every blob verified, stored as an OCI archive so
    /// that every host opens vessels from it. Nothing is stored unless all
    /// of it verified. Errors: [`VesselError::Pull`] with its [`crate::PullFailure`].
    pub async fn pull_image(&self, reference: &str) -> Result<crate::PulledImage> {
        self.pull_image_with(reference, |_| {}).await
    }

    /// [`Manager::pull_image`], reporting bytes received as they arrive.
    pub async fn pull_image_with(
        &self,
        reference: &str,
        progress: impl Fn(crate::PullProgress) + Send + Sync + 'static,
    ) -> Result<crate::PulledImage> {
        let reference = ImageRef::new(reference)?;
        self.state.pull(&reference, std::sync::Arc::new(progress)).await
    }

    /// Closes every vessel this manager has open and ends its lease (a
    /// later open takes a new one).
    pub async fn close(&self) -> Result<()> {
        let open: Vec<_> = self.state.open.locked().drain().collect();
        for (_, w) in open {
            if let Some(inner) = w.upgrade() {
                inner.close().await?;
            }
        }
        self.state.lease.end().await?;
        Ok(())
    }
}
