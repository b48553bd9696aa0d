//! [`ManagerConfig`]: where vessels live and which backend runs them.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use vessel_core::{IdGenerator, Limits, NetworkPolicy, UniqueIdGenerator};
use vessel_storage::Storage;

pub use vessel_runtime::Backend;

/// Configuration of a [`crate::Manager`]; `Default` gives the design's defaults.
#[derive(Clone)]
pub struct ManagerConfig {
    pub(crate) storage: Option<Arc<dyn Storage>>,
    pub(crate) mount_root: PathBuf,
    pub(crate) containerd_address: PathBuf,
    pub(crate) namespace: String,
    pub(crate) rootless: Option<bool>,
    pub(crate) id_generator: Arc<dyn IdGenerator>,
    pub(crate) backend: Backend,
    pub(crate) user_namespaces: bool,
    pub(crate) id_ranges: IdRanges,
    pub(crate) limits: Limits,
    pub(crate) disk_quota: Option<u64>,
    pub(crate) quota_mode: QuotaMode,
    pub(crate) registries: crate::layers::registry::Registries,
    pub(crate) lease: vessel_storage::lease::LeaseConfig,
    pub(crate) idle_pause: Option<std::time::Duration>,
    pub(crate) gc_grace: std::time::Duration,
    pub(crate) max_layer_bytes: Option<u64>,
    pub(crate) network: vessel_runtime::net::NetConfig,
}

/// What a vessel may write to the host's disk unless told otherwise: 10 GiB.
pub const DEFAULT_DISK_QUOTA: u64 = 10 << 30;

/// Whether vessels' disk quotas are enforced ([`ManagerConfig::quota_mode`]).
///
/// Quotas need a mount root that can enforce them (btrfs with quotas
/// enabled; [`crate::setup_quota`] makes one for root). Most machines'
/// disks are ext4 or XFS, so the default runs without them there and says
/// so, as rootless mode does for cgroup limits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum QuotaMode {
    /// Enforce where the mount root can; elsewhere run without, listing
    /// [`crate::Limit::Disk`] in `Manager::unavailable_limits` with why.
    #[default]
    Auto,
    /// Enforce, or refuse to start ([`crate::VesselError::QuotaUnsupported`]).
    Require,
    /// Never enforce (nothing is checked).
    Off,
}

impl QuotaMode {
    /// The mode's name as the CLI spells it (`auto`, `require`, `off`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Require => "require",
            Self::Off => "off",
        }
    }
}

impl std::str::FromStr for QuotaMode {
    type Err = crate::VesselError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "require" | "required" => Ok(Self::Require),
            "off" => Ok(Self::Off),
            _ => Err(crate::VesselError::InvalidInput(format!(
                "invalid disk quota mode {s:?}: expected auto, require or off"
            ))),
        }
    }
}

/// How a vessel is created ([`crate::Manager::create_vessel_with`]); unset
/// values are the manager's ([`ManagerConfig::default_limits`],
/// [`ManagerConfig::disk_quota`]). They are pinned in the vessel's manifest
/// and hold wherever it is reopened.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct VesselOptions {
    /// Limits of every command the vessel runs.
    pub limits: Limits,
    /// Bytes the vessel may write (what its commands and the file API add
    /// since the last snapshot, throwaway exec layers included).
    pub disk_bytes: Option<u64>,
    /// A name, unique in the storage, usable wherever its id is
    /// ([`crate::VesselName`]'s grammar).
    pub name: Option<String>,
    /// What its commands may reach ([`NetworkPolicy::None`], loopback
    /// only, unless set). Pinned in the manifest; a fork takes its source's
    /// unless set here.
    pub network: Option<NetworkPolicy>,
}

impl VesselOptions {
    /// The manager's defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// Memory of each command, in bytes.
    pub fn memory_bytes(mut self, bytes: i64) -> Self {
        self.limits.memory_bytes = Some(bytes);
        self
    }

    /// CPU of each command, in microseconds per 100 ms (100_000 = one core).
    pub fn cpu_quota_us(mut self, us: i64) -> Self {
        self.limits.cpu_quota_us = Some(us);
        self
    }

    /// Processes and threads of each command.
    pub fn pids(mut self, pids: i64) -> Self {
        self.limits.pids = Some(pids);
        self
    }

    /// Its network policy.
    pub fn network(mut self, policy: NetworkPolicy) -> Self {
        self.network = Some(policy);
        self
    }

    /// Bytes the vessel may write.
    pub fn disk_bytes(mut self, bytes: u64) -> Self {
        self.disk_bytes = Some(bytes);
        self
    }

    /// The vessel's name.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }
}

/// The pool of host ids that vessels' user namespaces map to: `count`
/// slices of [`IdRanges::SIZE`] ids from host id `first`, one slice per
/// open vessel on this host (as Kubernetes' user namespaces and podman's
/// `--userns=auto` allocate them). The pool must hold no real user's id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdRanges {
    /// The first host id of the pool.
    pub first: u32,
    /// How many slices.
    pub count: u32,
}

impl IdRanges {
    /// Ids per vessel: container ids `0..65536`.
    pub const SIZE: u32 = vessel_runtime::idmap::DEFAULT_RANGE_SIZE;

    /// The `slot`th slice.
    pub(crate) fn mapping(&self, slot: u32) -> Result<vessel_runtime::IdMapping, crate::VesselError> {
        let invalid = || crate::VesselError::InvalidInput(format!("id range pool {self:?} does not fit in 32 bits"));
        let host = slot.checked_mul(Self::SIZE).and_then(|o| o.checked_add(self.first)).ok_or_else(invalid)?;
        vessel_runtime::IdMapping::new(host, Self::SIZE).map_err(|_| invalid())
    }
}

impl Default for IdRanges {
    /// 8192 slices from host id 2^30: far above the ids distributions give
    /// users (and `/etc/subuid`'s usual 100000-based ranges), below 2^31.
    fn default() -> Self {
        Self { first: 1 << 30, count: 8192 }
    }
}

impl fmt::Debug for ManagerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ManagerConfig")
            .field("storage", &self.storage)
            .field("mount_root", &self.mount_root)
            .field("containerd_address", &self.containerd_address)
            .field("namespace", &self.namespace)
            .field("rootless", &self.rootless)
            .field("backend", &self.backend)
            .field("user_namespaces", &self.user_namespaces)
            .field("id_ranges", &self.id_ranges)
            .field("limits", &self.limits)
            .field("disk_quota", &self.disk_quota)
            .field("quota_mode", &self.quota_mode)
            .field("registries", &self.registries)
            .field("lease", &self.lease)
            .finish_non_exhaustive()
    }
}

/// `~/.local/share/vessel` (or `/var/lib/vessel` without a home).
pub(crate) fn data_home() -> PathBuf {
    match std::env::var_os("HOME") {
        Some(h) => PathBuf::from(h).join(".local/share/vessel"),
        None => PathBuf::from("/var/lib/vessel"),
    }
}

/// The mount root of a default [`ManagerConfig`]: `~/.local/share/vessel/mounts`
/// (`/var/lib/vessel/mounts` without a home).
pub fn default_mount_root() -> PathBuf {
    data_home().join("mounts")
}

impl Default for ManagerConfig {
    fn default() -> Self {
        Self {
            storage: None,
            mount_root: default_mount_root(),
            containerd_address: vessel_runtime::ContainerdConfig::default_address(),
            namespace: "vessel".into(),
            rootless: None,
            id_generator: Arc::new(UniqueIdGenerator::new()),
            backend: Backend::default(),
            user_namespaces: true,
            id_ranges: IdRanges::default(),
            limits: Limits::sandbox(),
            disk_quota: Some(DEFAULT_DISK_QUOTA),
            quota_mode: QuotaMode::Auto,
            registries: Default::default(),
            lease: Default::default(),
            idle_pause: None,
            gc_grace: std::time::Duration::from_secs(3600),
            max_layer_bytes: None,
            network: Default::default(),
        }
    }
}

impl ManagerConfig {
    /// The storage for manifests, snapshots and images (default:
    /// `CompressedStorage` over `LocalStorage` in `~/.local/share/vessel/data`).
    pub fn storage(mut self, storage: impl Storage + 'static) -> Self {
        self.storage = Some(Arc::new(storage));
        self
    }

    /// The same, already shared.
    pub fn shared_storage(mut self, storage: Arc<dyn Storage>) -> Self {
        self.storage = Some(storage);
        self
    }

    /// Pause an open vessel's live sandbox (as [`crate::Vessel::pause`])
    /// once no command has run in it and no background process has
    /// written output for `idle`; the next exec, spawn, signal or stdin
    /// write resumes it first, so a caller never sees the pause. Off by
    /// default (a process that only computes would be frozen too).
    pub fn idle_pause(mut self, idle: std::time::Duration) -> Self {
        self.idle_pause = Some(idle).filter(|d| !d.is_zero());
        self
    }

    /// How vessels with a network get it: the address pool (a /31 per
    /// vessel, default 10.213.0.0/16), the upstream resolvers their
    /// resolver asks (default the host's), and the host address published
    /// ports listen on (default 127.0.0.1; anything wider must be set here,
    /// explicitly).
    pub fn network(mut self, network: vessel_runtime::net::NetConfig) -> Self {
        self.network = network;
        self
    }

    /// The most bytes one layer may expand to when it is unpacked (an
    /// imported or pulled image's, or a snapshot's fetched from storage):
    /// past it the apply stops with a typed error and leaves nothing. By
    /// default the vessels' disk quota where quotas are on (a layer no
    /// vessel could write), else [`vessel_snapshot::LayerBounds::DEFAULT`]'s
    /// 64 GiB. Entries and depth are bounded as `LayerBounds::DEFAULT` says.
    pub fn max_layer_bytes(mut self, bytes: u64) -> Self {
        self.max_layer_bytes = Some(bytes);
        self
    }

    /// The bounds layers unpack under, given the disk quota in force.
    pub(crate) fn layer_bounds(&self, disk_quota: Option<u64>) -> vessel_snapshot::LayerBounds {
        let d = vessel_snapshot::LayerBounds::DEFAULT;
        vessel_snapshot::LayerBounds { max_bytes: self.max_layer_bytes.or(disk_quota).unwrap_or(d.max_bytes), ..d }
    }

    /// How old an unreferenced snapshot blob must be before
    /// [`crate::Manager::gc`] deletes it (default an hour): a snapshot
    /// stores its blob before the manifest that refers to it, so a blob
    /// younger than the slowest commit may still be about to be referred to.
    pub fn gc_grace(mut self, grace: std::time::Duration) -> Self {
        self.gc_grace = grace;
        self
    }

    /// How long this host's lease on the vessels it opens outlives its last
    /// renewal (default 30 s; renewed every third of it). A host that dies
    /// holds its vessels this long; another host then takes them over.
    pub fn lease_ttl(mut self, ttl: std::time::Duration) -> Self {
        self.lease.ttl = ttl;
        self
    }

    /// The name other hosts see on the vessels this one holds (default:
    /// the machine's host name).
    pub fn host_name(mut self, name: impl Into<String>) -> Self {
        self.lease.host_name = name.into();
        self
    }

    /// Where this host keeps mounts, the layer cache and run files.
    pub fn mount_root(mut self, dir: impl Into<PathBuf>) -> Self {
        self.mount_root = dir.into();
        self
    }

    /// containerd's socket (containerd backend).
    pub fn containerd_address(mut self, address: impl Into<PathBuf>) -> Self {
        self.containerd_address = address.into();
        self
    }

    /// The containerd namespace (default `vessel`).
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into();
        self
    }

    /// Rootless mode: vessels run with the user's subordinate ids, in the
    /// process's own user namespace (see `vessel_runtime::rootless`). The
    /// mode is the process's, chosen in `vessel::init()`: rootless
    /// for every user but root, and for root with `VESSEL_ROOTLESS=1` (for
    /// tests). The default is that mode; asking for the other is
    /// [`crate::VesselError::RootlessMismatch`], and rootless where it
    /// cannot be entered is [`crate::VesselError::RootlessUnavailable`].
    pub fn rootless(mut self, rootless: bool) -> Self {
        self.rootless = Some(rootless);
        self
    }

    /// The source of vessel and snapshot ids.
    pub fn id_generator(mut self, ids: impl IdGenerator + 'static) -> Self {
        self.id_generator = Arc::new(ids);
        self
    }

    /// The container runtime.
    pub fn backend(mut self, backend: Backend) -> Self {
        self.backend = backend;
        self
    }

    /// Whether vessels' containers run in user namespaces (default `true`):
    /// container root is then an unprivileged host id of the vessel's own
    /// range. **Turning this off makes container root host root: unsafe
    /// for untrusted code**; it is for hosts without idmapped mounts.
    pub fn user_namespaces(mut self, on: bool) -> Self {
        self.user_namespaces = on;
        self
    }

    /// The pool of host ids for vessels' user namespaces.
    pub fn id_ranges(mut self, ranges: IdRanges) -> Self {
        self.id_ranges = ranges;
        self
    }

    /// Limits of every command of a vessel created without its own
    /// (default [`Limits::sandbox`]: 1 GiB, one core, 1024 processes).
    pub fn default_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// What a vessel created without its own may write to the host's disk
    /// (default [`DEFAULT_DISK_QUOTA`]); `None` turns disk quotas off
    /// (as [`QuotaMode::Off`]).
    pub fn disk_quota(mut self, bytes: Option<u64>) -> Self {
        self.disk_quota = bytes;
        if bytes.is_none() {
            self.quota_mode = QuotaMode::Off;
        }
        self
    }

    /// Whether disk quotas are enforced (default [`QuotaMode::Auto`]):
    /// [`crate::Manager::new`] checks, by trying, that the mount root can
    /// enforce them; with `Auto` it runs without where it cannot, with
    /// `Require` it refuses to start.
    pub fn quota_mode(mut self, mode: QuotaMode) -> Self {
        self.quota_mode = mode;
        if mode != QuotaMode::Off && self.disk_quota.is_none() {
            self.disk_quota = Some(DEFAULT_DISK_QUOTA);
        }
        self
    }

    /// Credentials for `registry` (as references name it: `host[:port]`,
    /// `docker.io` for Docker Hub), over those in docker's `config.json`.
    pub fn registry_auth(mut self, registry: impl Into<String>, auth: crate::RegistryAuth) -> Self {
        self.registries.auths.insert(registry.into(), auth);
        self
    }

    /// Reaches `registry` over plain HTTP (loopback registries always are).
    pub fn insecure_registry(mut self, registry: impl Into<String>) -> Self {
        self.registries.insecure.push(registry.into());
        self
    }

    /// Where docker's `config.json` is (default `$DOCKER_CONFIG/config.json`
    /// or `~/.docker/config.json`).
    pub fn docker_config(mut self, path: impl Into<PathBuf>) -> Self {
        self.registries.docker_config = Some(path.into());
        self
    }

    /// Whether `create_vessel` pulls an image that storage lacks (default
    /// off: it is then `VesselError::ImageNotFound`).
    pub fn pull_on_demand(mut self, on: bool) -> Self {
        self.registries.pull_on_demand = on;
        self
    }
}
