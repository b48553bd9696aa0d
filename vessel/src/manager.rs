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

use nix::fcntl::Flock;
use vessel_core::{IdGenerator, ImageRef, VesselId, VesselManifest, VesselName};
use vessel_runtime::Runtime;
use vessel_snapshot::LayerCache;
use vessel_storage::lease::{Claim, HostLease};
use vessel_storage::{BlobReader, CompressedStorage, LocalStorage, RecordKey, Storage, StorageErrorKind, Version};

use crate::config::ManagerConfig;
use crate::error::{Result, VesselError};
use crate::host::{Ids, VesselIds, lock_dir, mkdirs, resolve_mode, scrub, try_lock};
use crate::layers::Layers;
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
    /// Manifests, records and (through `layers`) layers.
    pub(crate) storage: Arc<dyn Storage>,
    /// Where every layer comes from.
    pub(crate) layers: Layers,
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
    /// This host's lease in storage: one heartbeat, a claim per open vessel.
    pub(crate) lease: HostLease,
    /// The sandbox agent, installed under `runtime/` on first use.
    pub(crate) agent: std::sync::OnceLock<PathBuf>,
    /// Pause live sandboxes idle this long (`ManagerConfig::idle_pause`).
    pub(crate) idle_pause: Option<std::time::Duration>,
    /// How vessels' networks are made.
    pub(crate) network: vessel_runtime::net::NetConfig,
    /// Blobs younger than this are never collected (`ManagerConfig::gc_grace`).
    pub(crate) gc_grace: std::time::Duration,
}

impl std::fmt::Debug for ManagerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ManagerState").field("root", &self.root).field("runtime", &self.runtime).finish_non_exhaustive()
    }
}

/// Creates, opens and deletes vessels; one per host and storage is typical.
#[derive(Debug)]
pub struct Manager {
    pub(crate) state: Arc<ManagerState>,
}

impl ManagerState {
    /// The sandbox agent's path on this host (installed once).
    pub(crate) fn agent(&self) -> Result<PathBuf> {
        if let Some(p) = self.agent.get() {
            return Ok(p.clone());
        }
        let p = vessel_runtime::sandbox::install_agent(&self.root.join("runtime"))?;
        Ok(self.agent.get_or_init(|| p).clone())
    }

    pub(crate) fn vessel_dir(&self, id: &VesselId) -> PathBuf {
        self.root.join("vessels").join(id.as_str())
    }

    /// A host id range for vessel `id` and its user namespace (see [`Ids::take`]).
    pub(crate) fn take_ids(&self, id: &VesselId) -> Result<Option<VesselIds>> {
        self.id_source.take(&self.locks, id)
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
    pub(crate) async fn forget_claim(&self, id: &VesselId) {
        if let Err(e) = self.storage.delete_record(&RecordKey::Claim(id.clone())).await {
            tracing::warn!(vessel = %id, error = %e, "could not remove the vessel's claim");
        }
    }
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
        let cache = LayerCache::open(root.join("layers"))?.with_bounds(config.layer_bounds(disk_quota));
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
        let layers =
            Layers::new(storage.clone(), cache, runtime.image_store(), config.registries.clone(), root.clone());
        let state = ManagerState {
            storage,
            layers,
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
            lease,
            agent: std::sync::OnceLock::new(),
            idle_pause: config.idle_pause,
            network: config.network.clone(),
            gc_grace: config.gc_grace,
        };
        let mgr = Self { state: Arc::new(state) };
        let containers = mgr.state.runtime.remove_leftovers().await?;
        let networks = vessel_runtime::net::remove_leftovers().await;
        if containers + networks > 0 {
            tracing::info!(containers, networks, "removed containers and networks left by dead vessel processes");
        }
        mgr.remove_stale()?;
        Ok(mgr)
    }

    /// Removes vessel dirs (and mounts) nobody holds, and dead probers' probes.
    fn remove_stale(&self) -> Result<()> {
        let dir = self.state.root.join("vessels");
        crate::host::scrub_dead_probes(&[&self.state.root, &dir])?; // setup_quota's and ours
        for e in fs::read_dir(&dir).map_err(VesselError::io("read", &dir))?.flatten() {
            let Ok(id) = VesselId::new(&e.file_name().to_string_lossy()) else { continue };
            if let Ok(_lock) = self.state.lock(&id) {
                tracing::info!(%id, "removing a vessel mount left by a dead process");
                scrub(&e.path())?;
            }
        }
        Ok(())
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
        let image = match self.state.layers.image(&reference, &id).await {
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

    pub(crate) fn register(&self, inner: Arc<OpenVessel>) -> Vessel {
        let mut open = self.state.open.locked();
        open.retain(|_, w| w.strong_count() > 0);
        open.insert(inner.id.clone(), Arc::downgrade(&inner));
        Vessel::from_inner(inner)
    }

    /// Drops every reference `id` has in this host's layer cache.
    fn release_layers(&self, id: &VesselId) {
        self.state.layers.release(id);
    }

    /// `id`'s manifest, or `VesselNotFound`.
    pub(crate) async fn load_manifest(&self, id: &VesselId) -> Result<VesselManifest> {
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
        let image = self.state.layers.image(&manifest.base_image_ref, &id).await?;
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
        let manifest = match self.load_manifest(&id).await {
            Ok(m) => m,
            Err(e) => {
                match e.kind() {
                    crate::VesselErrorKind::NotFound => self.state.forget_claim(&id).await,
                    _ => self.state.release(&claim).await,
                }
                return Err(e);
            }
        };
        let name = crate::names::name_of(&manifest.labels).and_then(|n| VesselName::new(n).ok());
        let deleted = async {
            scrub(&self.state.vessel_dir(&id))?;
            self.state.storage.delete_vessel_manifest(&id).await?;
            Ok::<_, VesselError>(())
        }
        .await;
        if let Err(e) = deleted {
            self.state.release(&claim).await;
            return Err(e);
        }
        // The manifest is gone already: a failure here leaves blobs for
        // gc, never a vessel that half exists.
        if let Err(e) = self.state.free_vessel_blobs(&manifest).await {
            tracing::warn!(vessel = %id, error = %e, "deleted; some of its blobs are left for gc");
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
    pub async fn import_image(&self, image_ref: &str, archive: BlobReader) -> Result<()> {
        self.state.layers.import(&ImageRef::new(image_ref)?, archive).await
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
        self.state.layers.pull(&reference, Arc::new(progress)).await
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
