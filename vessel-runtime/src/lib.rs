//! The runtime layer: run one process in a new container on a prepared
//! rootfs, and mount the overlay rootfs it runs on.
//!
//! - [`Runtime`]: the one trait every backend implements (async, object safe).
//! - [`overlay`]: mounting a vessel's overlay (ordered lowers, no
//!   `redirect_dir`/`metacopy`/`index`, lower lists beyond the 4 KiB option limit).
//! - [`spec`]: the OCI runtime spec every backend runs (namespaces, docker's
//!   default capabilities, masked paths, limits, device rules, docker's
//!   seccomp semantics), built with `oci-spec`.
//! - [`idmap`]: user namespaces and idmapped layers, how a container's ids
//!   live on an unprivileged host range while layers keep its view.
//! - [`connect`]: the runtime for a [`Backend`] choice, under every feature
//!   set; a backend compiled out is a stub whose calls fail with a typed
//!   `Unavailable` error naming its feature.
//! - [`YoukiRuntime`] (feature `youki`, default): youki's `libcontainer`, in-process.
//! - [`ContainerdRuntime`] (feature `containerd`): a containerd daemon over
//!   gRPC, with its image store as an [`ImageStore`].
//!
//! # The libcontainer / tokio boundary
//!
//! libcontainer creates containers with raw `clone3` (no glibc fork
//! handlers), `waitpid`s, and changes process-global state; in a
//! multi-threaded process the child can inherit a held malloc lock and hang
//! (reproduced on this kind of machine; youki#3011, boxlite-ai/boxlite#349).
//! So it never runs in the caller's process: each run re-executes the
//! current binary as a *runner*, a fresh single-threaded process that
//! creates, starts, waits for and deletes one container, and exits.
//! **An embedding program must call [`init`] first thing in `main`**, before
//! any thread starts; in a runner it never returns. The container's stdio
//! are the runner's own pipes, so output never passes through the runner.
//! A lifeline pipe ties the runner to its caller: when the caller's future is
//! dropped (cancelled) or the caller dies, the runner kills the container's
//! whole process tree and removes its state and cgroups.
//!
//! The containerd backend re-executes the program too, once per
//! connection: a watchdog that removes the caller's containers if the caller
//! dies (containerd keeps a task running whatever happens to its client).
#![warn(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

// fds placed for a re-executed child before exec: one justified block.
pub mod backend;
mod cgroups;
#[cfg(any(feature = "youki", feature = "containerd"))]
#[allow(unsafe_code)]
mod child;
#[cfg(feature = "containerd")]
mod containerd;
mod error;
// User namespaces and idmapped mounts: raw syscalls that no crate wraps
// (clone into a new user namespace, mount_setattr), each block justified.
#[allow(unsafe_code)]
pub mod idmap;
pub mod net;
pub mod overlay;
// Entering rootless mode: a fork while the process has one thread.
#[allow(unsafe_code)]
pub mod rootless;
pub mod sandbox;
// Project quotas: quotactl_fd and the fsxattr ioctls, which no crate wraps.
#[allow(unsafe_code)]
pub mod quota;
mod seccomp;
pub mod spec;
mod stub;
// libcontainer is driven through raw fds and a pre-exec hook: the one
// place with unsafe code, each block justified.
#[cfg(feature = "youki")]
#[allow(unsafe_code)]
mod youki;

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use tokio::io::{AsyncRead, AsyncWrite};

pub use backend::{Backend, BackendConfig, ContainerdConfig, connect};
#[cfg(feature = "containerd")]
pub use containerd::ContainerdRuntime;
pub use error::{ExecFailure, RuntimeError, RuntimeErrorKind};
pub use idmap::{IdMapping, UserNamespace};
pub use oci_spec;
#[cfg(not(feature = "containerd"))]
pub use stub::containerd::ContainerdRuntime;
#[cfg(not(feature = "youki"))]
pub use stub::youki::YoukiRuntime;
#[cfg(feature = "youki")]
pub use youki::YoukiRuntime;

/// Copies a container's output stream (if any) to the caller's writer: the
/// same for every backend.
#[cfg(any(feature = "youki", feature = "containerd"))]
async fn drain(
    src: Option<impl AsyncRead + Unpin>,
    mut dst: Box<dyn AsyncWrite + Send + Unpin + '_>,
) -> std::io::Result<()> {
    match src {
        Some(mut src) => tokio::io::copy(&mut src, &mut dst).await.map(drop),
        None => Ok(()),
    }
}

/// Must be the first call in `main` of any program that uses a backend (see
/// the crate docs): in rootless mode it moves the process into its user
/// namespace (see [`rootless`]); in a youki runner or a containerd watchdog (both
/// re-executions of the program) it does that job and exits; otherwise it
/// returns at once.
pub fn init() {
    // First: runners and watchdogs are children of a rootless process and
    // inherit its namespaces (this is then a no-op for them).
    rootless::maybe_enter();
    #[cfg(feature = "youki")]
    youki::runner::maybe_run();
    #[cfg(feature = "containerd")]
    containerd::watchdog::maybe_run();
}

/// Whether the container gets a network.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Network {
    /// A private network namespace with only loopback.
    #[default]
    None,
    /// The host's network namespace.
    Host,
    /// An existing namespace, made by host root ([`net::VesselNet`]): every
    /// container of a vessel joins its one network; `/etc/resolv.conf`
    /// names `nameserver`.
    Join {
        /// The pinned namespace.
        netns: PathBuf,
        /// The vessel's resolver.
        nameserver: std::net::IpAddr,
        /// The namespace's own sysfs, bound read-only at `/sys` (`None`:
        /// the host's, read-only).
        sysfs: Option<PathBuf>,
    },
}

/// A terminal's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TtySize {
    /// Rows.
    pub rows: u16,
    /// Columns.
    pub cols: u16,
}

pub use vessel_core::Limits;

/// One process to run in a new container.
#[derive(Default)]
pub struct RunRequest<'a> {
    /// The prepared root filesystem (absolute path).
    pub rootfs: PathBuf,
    /// argv; `args[0]` is looked up in `PATH` from `env`.
    pub args: Vec<String>,
    /// `KEY=VALUE` environment.
    pub env: Vec<String>,
    /// Working directory inside the container (default `/`).
    pub cwd: Option<String>,
    /// User and group ids (default root), as the container sees them.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
    /// Supplementary group ids.
    pub additional_gids: Vec<u32>,
    /// Run in a user namespace mapping container ids `0..size` to this host
    /// range (`None`: container root is host root; unsafe for untrusted code).
    /// The rootfs must present the container's ids through the mapping
    /// (an overlay over idmapped layers, see [`overlay::OverlayMount::mount_idmapped`]).
    pub user_namespace: Option<IdMapping>,
    /// Hostname (default `vessel`).
    pub hostname: Option<String>,
    /// Resource limits.
    pub limits: Limits,
    /// Network mode.
    pub network: Network,
    /// Host paths bind-mounted read-only: (host path, container path).
    pub ro_binds: Vec<(PathBuf, String)>,
    /// Run on a pseudo-terminal of this size: its output arrives on
    /// `stdout` (`stderr` stays empty), `stdin` feeds its input.
    pub tty: Option<TtySize>,
    /// Standard input; end-of-file when `None`.
    pub stdin: Option<Box<dyn AsyncRead + Send + Unpin + 'a>>,
    /// Standard output; discarded when `None`.
    pub stdout: Option<Box<dyn AsyncWrite + Send + Unpin + 'a>>,
    /// Standard error; discarded when `None`.
    pub stderr: Option<Box<dyn AsyncWrite + Send + Unpin + 'a>>,
    /// Told what the run is once its container exists (a live sandbox
    /// reads its OOM kills while it runs).
    pub on_start: Option<tokio::sync::oneshot::Sender<RunInfo>>,
    /// Awaited while the container is made, before its process starts: a
    /// vessel's network is connected meanwhile, so the two overlap and the
    /// command still never runs before its network is in place. An error
    /// ends the run before anything of the command ran, and is returned.
    pub before_start: Option<BeforeStart<'a>>,
}

/// What a run awaits before its process starts ([`RunRequest::before_start`]).
pub type BeforeStart<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), RuntimeError>> + Send + 'a>>;

/// What a run is, for who watches it while it runs.
#[derive(Debug, Clone)]
pub struct RunInfo {
    /// The backend's container id.
    pub id: String,
    oom: OomCounter,
}

/// Where a run's OOM kills are counted.
#[derive(Debug, Clone)]
#[cfg_attr(not(any(feature = "youki", feature = "containerd")), allow(dead_code))]
enum OomCounter {
    /// A cgroup path under each hierarchy (`/vessel/<id>`).
    Cgroup(String),
    /// The `memory.oom_control` file of a rootless run's delegated cgroup.
    File(PathBuf),
}

impl RunInfo {
    #[cfg_attr(not(any(feature = "youki", feature = "containerd")), allow(dead_code))]
    pub(crate) fn cgroup(id: &str, cgroups_path: String) -> Self {
        Self { id: id.to_owned(), oom: OomCounter::Cgroup(cgroups_path) }
    }

    #[cfg_attr(not(any(feature = "youki", feature = "containerd")), allow(dead_code))]
    pub(crate) fn oom_file(id: &str, file: PathBuf) -> Self {
        Self { id: id.to_owned(), oom: OomCounter::File(file) }
    }

    /// How many processes the OOM killer has killed in the run so far.
    pub fn oom_kills(&self) -> u64 {
        match &self.oom {
            #[cfg(any(feature = "youki", feature = "containerd"))]
            OomCounter::Cgroup(path) => cgroups::oom_kills(path),
            #[cfg(not(any(feature = "youki", feature = "containerd")))]
            OomCounter::Cgroup(_) => 0,
            OomCounter::File(f) => std::fs::read_to_string(f)
                .unwrap_or_default()
                .lines()
                .find_map(|l| l.strip_prefix("oom_kill ")?.trim().parse().ok())
                .unwrap_or(0),
        }
    }
}

impl fmt::Debug for RunRequest<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RunRequest")
            .field("rootfs", &self.rootfs)
            .field("args", &self.args)
            .field("env", &self.env)
            .field("cwd", &self.cwd)
            .field("uid", &self.uid)
            .field("gid", &self.gid)
            .field("additional_gids", &self.additional_gids)
            .field("user_namespace", &self.user_namespace)
            .field("limits", &self.limits)
            .field("network", &self.network)
            .field("tty", &self.tty)
            .finish_non_exhaustive()
    }
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct RunOutcome {
    /// The exit code (`128 + N` for signal `N`).
    pub exit_code: i32,
    /// Whether the OOM killer killed a process of the container.
    pub oom_killed: bool,
}

impl RunOutcome {
    /// An outcome.
    pub fn new(exit_code: i32, oom_killed: bool) -> Self {
        Self { exit_code, oom_killed }
    }
}

/// Runs processes in containers.
#[async_trait]
pub trait Runtime: Send + Sync + fmt::Debug {
    /// The backend's name (`youki`, `containerd`).
    fn name(&self) -> &'static str;

    /// Whether this backend can run here; the error says why not.
    fn is_available(&self) -> Result<(), RuntimeError>;

    /// Runs `req` to completion and returns its exit code (`128 + N` when
    /// killed by signal `N`). Dropping the future kills the container's
    /// whole process tree and cleans up.
    async fn run(&self, req: RunRequest<'_>) -> Result<i32, RuntimeError> {
        self.run_outcome(req).await.map(|o| o.exit_code)
    }

    /// [`Runtime::run`], also saying whether the OOM killer ended a process
    /// of the container (read from its memory cgroup before teardown).
    async fn run_outcome(&self, req: RunRequest<'_>) -> Result<RunOutcome, RuntimeError>;

    /// Removes the containers of runs whose every owner (caller and
    /// runner) died without cleaning up, returning how many; containers of
    /// live runs are never touched. A new vessel `Manager` calls it.
    async fn remove_leftovers(&self) -> Result<usize, RuntimeError> {
        Ok(0)
    }

    /// Why this backend cannot apply [`Limits`] (memory, CPU, processes)
    /// here, if it cannot: rootless without a usable cgroup. Callers report
    /// it; it is never silent.
    fn limits_unavailable(&self) -> Option<String> {
        None
    }

    /// The backend's own image store, where it has one (containerd's):
    /// images found there need no registry pull.
    fn image_store(&self) -> Option<Arc<dyn ImageStore>> {
        None
    }
}

/// A backend's image store, as vessel reads it: an image's target and its
/// blobs (the facade picks the platform and verifies every digest).
#[async_trait]
pub trait ImageStore: Send + Sync + fmt::Debug {
    /// The descriptor image `reference` points at (a manifest or an
    /// index); `None` where the store has no such image.
    async fn image_target(&self, reference: &str) -> Result<Option<oci_spec::image::Descriptor>, RuntimeError>;

    /// Streams blob `desc` to `out`: exactly its size in bytes, or an error.
    async fn read_blob(
        &self,
        desc: &oci_spec::image::Descriptor,
        out: &mut (dyn AsyncWrite + Send + Unpin),
    ) -> Result<(), RuntimeError>;
}
