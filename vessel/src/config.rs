//! [`ManagerConfig`]: where vessels live and which backend runs them.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use vessel_core::{IdGenerator, UniqueIdGenerator};
use vessel_storage::Storage;

/// Which container runtime runs a vessel's commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Backend {
    /// youki's libcontainer in-process (feature `youki`); no daemon.
    Youki,
    /// A containerd daemon (feature `containerd`).
    Containerd,
}

impl Default for Backend {
    /// youki when compiled in, else containerd.
    fn default() -> Self {
        if cfg!(feature = "youki") { Self::Youki } else { Self::Containerd }
    }
}

/// Configuration of a [`crate::Manager`]; `Default` gives the design's defaults.
#[derive(Clone)]
pub struct ManagerConfig {
    pub(crate) storage: Option<Arc<dyn Storage>>,
    pub(crate) mount_root: PathBuf,
    pub(crate) containerd_address: PathBuf,
    pub(crate) namespace: String,
    pub(crate) rootless: bool,
    pub(crate) id_generator: Arc<dyn IdGenerator>,
    pub(crate) backend: Backend,
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

impl Default for ManagerConfig {
    fn default() -> Self {
        let rootless = !nix::unistd::geteuid().is_root();
        let containerd_address = match std::env::var_os("XDG_RUNTIME_DIR") {
            Some(dir) if rootless => PathBuf::from(dir).join("containerd/containerd.sock"),
            _ => PathBuf::from("/run/containerd/containerd.sock"),
        };
        Self {
            storage: None,
            mount_root: data_home().join("mounts"),
            containerd_address,
            namespace: "vessel".into(),
            rootless,
            id_generator: Arc::new(UniqueIdGenerator::new()),
            backend: Backend::default(),
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

    /// Rootless mode (default: when not running as root).
    pub fn rootless(mut self, rootless: bool) -> Self {
        self.rootless = rootless;
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
}
