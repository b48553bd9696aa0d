//! Backend selection: one constructor from a [`Backend`] choice to an
//! `Arc<dyn Runtime>`, under every feature set (as libcgroups selects its
//! cgroup manager). A backend whose cargo feature is off is a stub whose
//! every call is a typed [`RuntimeError::Unavailable`] naming the feature,
//! so callers need no `cfg` of their own.

use std::path::PathBuf;
use std::sync::Arc;

use crate::{ContainerdRuntime, Runtime, RuntimeError, YoukiRuntime};

/// Which container runtime runs a vessel's commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Backend {
    /// youki's libcontainer in-process (feature `youki`); no daemon.
    Youki,
    /// A containerd daemon (feature `containerd`).
    Containerd,
}

impl Backend {
    /// The backend's name, as [`Runtime::name`] gives it.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Youki => "youki",
            Self::Containerd => "containerd",
        }
    }
}

impl Default for Backend {
    /// youki when compiled in, else containerd.
    fn default() -> Self {
        if cfg!(feature = "youki") || !cfg!(feature = "containerd") { Self::Youki } else { Self::Containerd }
    }
}

/// Where to find containerd and where to keep per-run files.
#[derive(Debug, Clone)]
pub struct ContainerdConfig {
    /// The daemon's gRPC socket.
    pub address: PathBuf,
    /// The containerd namespace vessel's containers and images live in.
    pub namespace: String,
    /// Per-run files (FIFOs, `/etc` files); containerd must reach it, so a local path.
    pub root: PathBuf,
}

impl ContainerdConfig {
    /// The default socket: containerd's system socket for root,
    /// `$XDG_RUNTIME_DIR/containerd/containerd.sock` for other users (rootless containerd).
    pub fn default_address() -> PathBuf {
        match std::env::var_os("XDG_RUNTIME_DIR") {
            Some(dir) if !nix::unistd::geteuid().is_root() => PathBuf::from(dir).join("containerd/containerd.sock"),
            _ => PathBuf::from("/run/containerd/containerd.sock"),
        }
    }
}

/// What [`connect`] needs besides the choice.
#[derive(Debug, Clone)]
pub struct BackendConfig {
    /// The backend's run files live under `root/<backend name>`.
    pub root: PathBuf,
    /// containerd's socket (containerd only).
    pub containerd_address: PathBuf,
    /// containerd's namespace (containerd only).
    pub containerd_namespace: String,
}

impl BackendConfig {
    /// Run files under `root`, containerd at its default socket and namespace `vessel`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            containerd_address: ContainerdConfig::default_address(),
            containerd_namespace: "vessel".into(),
        }
    }

    fn dir(&self, backend: Backend) -> PathBuf {
        self.root.join(backend.name())
    }
}

/// The runtime for `backend`, checked to be usable here (youki: root and
/// kernel support; containerd: a daemon answering at the socket).
pub async fn connect(backend: Backend, config: &BackendConfig) -> Result<Arc<dyn Runtime>, RuntimeError> {
    match backend {
        Backend::Youki => {
            let rt = YoukiRuntime::new(config.dir(backend));
            rt.is_available()?;
            Ok(Arc::new(rt))
        }
        Backend::Containerd if crate::rootless::mode().is_rootless() => Err(RuntimeError::Unavailable {
            backend: backend.name(),
            reason: "not in rootless mode: a rootless containerd (rootlesskit) runs in a user and mount namespace of \
                     its own, where the overlay this process mounts for a vessel does not exist and its ids mean \
                     other host ids; use the youki backend rootless"
                .into(),
        }),
        Backend::Containerd => {
            let rt = ContainerdRuntime::connect(ContainerdConfig {
                address: config.containerd_address.clone(),
                namespace: config.containerd_namespace.clone(),
                root: config.dir(backend),
            })
            .await?;
            Ok(Arc::new(rt))
        }
    }
}

/// The error of a backend compiled out: which feature turns it on.
#[cfg_attr(all(feature = "youki", feature = "containerd", not(test)), allow(dead_code))]
pub(crate) fn not_compiled(backend: Backend) -> RuntimeError {
    RuntimeError::Unavailable {
        backend: backend.name(),
        reason: format!("this build lacks it: enable the `{}` cargo feature", backend.name()),
    }
}

// Runs where a backend is compiled out (`cargo test -p vessel-runtime
// --no-default-features`); the stubs themselves are tested in every build
// (see `stub`).
#[cfg(all(test, not(all(feature = "youki", feature = "containerd"))))]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_backend_compiled_out_is_a_typed_unavailable_error() {
        let config = BackendConfig::new("/nonexistent/vessel-backend-test");
        let mut compiled_out = 0;
        for backend in [Backend::Youki, Backend::Containerd] {
            let enabled = match backend {
                Backend::Youki => cfg!(feature = "youki"),
                Backend::Containerd => cfg!(feature = "containerd"),
            };
            if enabled {
                continue;
            }
            compiled_out += 1;
            let err = connect(backend, &config).await.expect_err("a stub never connects");
            assert_eq!(err.kind(), crate::RuntimeErrorKind::Unavailable);
            assert!(err.to_string().contains(&format!("`{}` cargo feature", backend.name())), "{err}");
        }
        assert!(compiled_out > 0);
    }
}
