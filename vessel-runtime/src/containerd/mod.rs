//! The containerd backend: one container and task per run over containerd's
//! gRPC API (`containerd-client`), on the rootfs vessel prepared (the spec's
//! absolute root path), with the same spec as every backend.
//!
//! stdio go through FIFOs in a per-run directory. Each output FIFO is opened
//! for reading before the task exists (the 1.6 shim blocks otherwise), and a
//! writer of our own is held until the process has exited, so a read can
//! never see end-of-file before the shim has connected. Every container
//! carries an owner label (see `owner`), so a later connection removes what a
//! crashed process left, and only that.

mod image;
mod owner;
// Re-executed like the youki runner: its signal dispositions and inherited
// lifeline fd, each unsafe block justified.
#[allow(unsafe_code)]
pub(crate) mod watchdog;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use containerd_client::services::v1::container::Runtime as ContainerRuntime;
use containerd_client::services::v1::containers_client::ContainersClient;
use containerd_client::services::v1::tasks_client::TasksClient;
use containerd_client::services::v1::version_client::VersionClient;
use containerd_client::services::v1::{
    CloseIoRequest, Container, CreateContainerRequest, CreateTaskRequest, DeleteContainerRequest, DeleteTaskRequest,
    KillRequest, ListContainersRequest, ListTasksRequest, ResizePtyRequest, StartRequest, WaitRequest,
};
use containerd_client::tonic::metadata::{Ascii, MetadataValue};
use containerd_client::tonic::transport::Channel;
use containerd_client::tonic::{Code, Request, Status};
use nix::sys::stat::Mode;
use tokio::net::unix::pipe;

use crate::{ContainerdConfig, Network, RunRequest, Runtime, RuntimeError, drain, spec};
use vessel_core::sync::Locked;

/// containerd's type URL for an OCI runtime spec in an `Any`.
const SPEC_TYPE_URL: &str = "types.containerd.io/opencontainers/runtime-spec/1/Spec";
/// The shim every container runs under.
const RUNC_SHIM: &str = "io.containerd.runc.v2";
const BACKEND: &str = crate::Backend::Containerd.name();

/// Containers through a containerd daemon.
#[derive(Debug, Clone)]
pub struct ContainerdRuntime {
    channel: Channel,
    namespace: MetadataValue<Ascii>,
    owner: String,
    /// What it connected with (the watchdog reconnects with it).
    config: ContainerdConfig,
    /// Started with the first run (see `watchdog`); shared by every clone.
    watchdog: Arc<Mutex<Option<watchdog::Watchdog>>>,
}

fn unavailable(reason: String) -> RuntimeError {
    RuntimeError::Unavailable { backend: BACKEND, reason }
}

/// A failed gRPC call, with what was being done.
fn grpc(op: &'static str) -> impl FnOnce(Status) -> RuntimeError {
    move |s| RuntimeError::Call { backend: BACKEND, op, source: Box::new(s) }
}

impl ContainerdRuntime {
    /// Connects to the daemon at `config.address`, checks that it is
    /// containerd, and removes the containers of vessel processes that died
    /// without cleaning up.
    pub async fn connect(config: ContainerdConfig) -> Result<Self, RuntimeError> {
        let (address, namespace) = (&config.address, &config.namespace);
        let valid = namespace.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
            && namespace.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
            && namespace.len() <= 76;
        if !valid {
            return Err(RuntimeError::InvalidRequest(format!("invalid containerd namespace {namespace:?}")));
        }
        let namespace = namespace.parse().map_err(|_| RuntimeError::InvalidRequest("namespace".into()))?;
        if !address.exists() {
            return Err(unavailable(format!("no containerd socket at {}", address.display())));
        }
        let channel = tokio::time::timeout(Duration::from_secs(10), containerd_client::connect(address))
            .await
            .map_err(|_| unavailable(format!("{} did not answer within 10 s", address.display())))?
            .map_err(|e| unavailable(format!("cannot connect to {}: {e}", address.display())))?;
        let version = tokio::time::timeout(Duration::from_secs(10), VersionClient::new(channel.clone()).version(()))
            .await
            .map_err(|_| unavailable(format!("{} did not answer within 10 s", address.display())))?
            .map_err(|s| {
                unavailable(format!("{} does not speak containerd's API: {}", address.display(), s.message()))
            })?
            .into_inner();
        tracing::debug!(version = %version.version, address = %address.display(), "connected to containerd");
        let rt = Self { channel, namespace, owner: owner::current(), config, watchdog: Arc::new(Mutex::new(None)) };
        let removed = rt.remove_leftovers().await?;
        if removed > 0 {
            tracing::info!(removed, "removed containers left by dead vessel processes");
        }
        Ok(rt)
    }

    fn request<T>(&self, msg: T) -> Request<T> {
        let mut r = Request::new(msg);
        r.metadata_mut().insert("containerd-namespace", self.namespace.clone());
        r
    }

    fn tasks(&self) -> TasksClient<Channel> {
        TasksClient::new(self.channel.clone())
    }

    fn containers_client(&self) -> ContainersClient<Channel> {
        ContainersClient::new(self.channel.clone())
    }

    /// vessel's containers in the namespace (any owner), with their owner label.
    pub async fn containers(&self) -> Result<Vec<(String, String)>, RuntimeError> {
        let filter = format!("labels.\"{}\"", owner::OWNER_LABEL);
        let list = self
            .containers_client()
            .list(self.request(ListContainersRequest { filters: vec![filter] }))
            .await
            .map_err(grpc("list containers"))?
            .into_inner();
        Ok(list
            .containers
            .into_iter()
            .map(|c| {
                let owner = c.labels.get(owner::OWNER_LABEL).cloned().unwrap_or_default();
                (c.id, owner)
            })
            .collect())
    }

    /// Ids of the tasks in the namespace (vessel's or not).
    pub async fn tasks_in_namespace(&self) -> Result<Vec<String>, RuntimeError> {
        let list = self
            .tasks()
            .list(self.request(ListTasksRequest { filter: String::new() }))
            .await
            .map_err(grpc("list tasks"))?
            .into_inner();
        Ok(list.tasks.into_iter().map(|t| t.id).collect())
    }

    /// Removes the containers (and tasks, and run files) whose owning vessel
    /// process is dead; returns how many. Containers of live processes and
    /// containers without vessel's label are never touched.
    pub async fn remove_leftovers(&self) -> Result<usize, RuntimeError> {
        let mut removed = 0;
        for (id, owner) in self.containers().await? {
            if owner::is_alive(&owner) {
                continue;
            }
            tracing::info!(%id, %owner, "removing a container left by a dead vessel process");
            self.teardown(&id, false).await;
            let _ = std::fs::remove_dir_all(self.run_dir(&id));
            removed += 1;
        }
        Ok(removed)
    }

    fn run_dir(&self, id: &str) -> PathBuf {
        self.config.root.join("runs").join(id)
    }

    /// Kills the task's processes (unless its init is known to have exited,
    /// when the shim has killed the rest: a kill then costs the shim ~14 ms),
    /// deletes the task and the container; what does not exist is skipped.
    async fn teardown(&self, id: &str, exited: bool) {
        let mut tasks = self.tasks();
        let kill = KillRequest { container_id: id.into(), exec_id: String::new(), signal: 9, all: true };
        if !exited && tasks.kill(self.request(kill)).await.is_ok() {
            let wait = tasks.wait(self.request(WaitRequest { container_id: id.into(), exec_id: String::new() }));
            let _ = tokio::time::timeout(Duration::from_secs(10), wait).await;
        }
        if let Err(s) = tasks.delete(self.request(DeleteTaskRequest { container_id: id.into() })).await
            && s.code() != Code::NotFound
        {
            tracing::warn!(%id, error = %s.message(), "could not delete task");
        }
        if let Err(s) = self.containers_client().delete(self.request(DeleteContainerRequest { id: id.into() })).await
            && s.code() != Code::NotFound
        {
            tracing::warn!(%id, error = %s.message(), "could not delete container");
        }
    }

    /// Everything after the run directory exists; the caller tears down.
    async fn run_in(&self, id: &str, dir: &Path, mut req: RunRequest<'_>) -> Result<crate::RunOutcome, RuntimeError> {
        spec::write_etc_files(dir, &req)?;
        // The spec's root is the prepared rootfs itself (an absolute path):
        // runc pivots into it in the container's own mount namespace, so the
        // shim mounts nothing on the host (a bind mount of it in the task's
        // rootfs cost ~20 ms a run to mount and unmount).
        let mut spec = spec::build(&req, &format!("/vessel/{id}"), Some(dir))?;
        if req.network == Network::None {
            // runc brings `lo` up in a network namespace it creates.
            spec::add_network_namespace(&mut spec)?;
        }
        let spec_json = serde_json::to_vec(&spec).map_err(RuntimeError::Json)?;

        let tty = req.tty;
        let fifo = |name: &str| -> Result<PathBuf, RuntimeError> {
            let p = dir.join(name);
            nix::unistd::mkfifo(&p, Mode::from_bits_truncate(0o600))
                .map_err(|e| RuntimeError::io("mkfifo", &p)(e.into()))?;
            Ok(p)
        };
        let stdout_path = fifo("stdout")?;
        // With a terminal, all output arrives on stdout; otherwise stderr
        // must be set too (an empty one makes the 1.6 shim crash).
        let stderr_path = if tty.is_none() { Some(fifo("stderr")?) } else { None };
        let stdin_path = if req.stdin.is_some() || tty.is_some() { Some(fifo("stdin")?) } else { None };
        let (out_rx, out_hold) = open_output(&stdout_path)?;
        let (err_rx, err_hold) = match &stderr_path {
            Some(p) => {
                let (rx, hold) = open_output(p)?;
                (Some(rx), Some(hold))
            }
            None => (None, None),
        };

        let container = Container {
            id: id.into(),
            labels: HashMap::from([(owner::OWNER_LABEL.to_owned(), self.owner.clone())]),
            runtime: Some(ContainerRuntime { name: RUNC_SHIM.into(), options: None }),
            spec: Some(prost_types::Any { type_url: SPEC_TYPE_URL.into(), value: spec_json }),
            ..Default::default()
        };
        self.containers_client()
            .create(self.request(CreateContainerRequest { container: Some(container) }))
            .await
            .map_err(grpc("create container"))?;

        let uri = |p: &Option<PathBuf>| p.as_ref().map(|p| p.to_string_lossy().into_owned()).unwrap_or_default();
        let create = CreateTaskRequest {
            container_id: id.into(),
            stdin: uri(&stdin_path),
            stdout: stdout_path.to_string_lossy().into_owned(),
            stderr: uri(&stderr_path),
            terminal: tty.is_some(),
            ..Default::default()
        };
        let mut tasks = self.tasks();
        if let Err(s) = tasks.create(self.request(create)).await {
            return Err(start_error(&req.args[0], s));
        }
        if let Some(size) = tty {
            let resize = ResizePtyRequest {
                container_id: id.into(),
                exec_id: String::new(),
                width: size.cols.into(),
                height: size.rows.into(),
            };
            tasks.resize_pty(self.request(resize)).await.map_err(grpc("resize pty"))?;
        }
        // Wait is registered before Start, so even an instant exit is seen.
        let wait = {
            let mut tasks = self.tasks();
            let wait = self.request(WaitRequest { container_id: id.into(), exec_id: String::new() });
            tokio::spawn(async move { tasks.wait(wait).await })
        };
        // Created, not started: what the run waits for first (its network).
        if let Some(gate) = req.before_start.take() {
            gate.await?;
        }
        tasks
            .start(self.request(StartRequest { container_id: id.into(), exec_id: String::new() }))
            .await
            .map_err(|s| start_error(&req.args[0], s))?;

        let RunRequest { stdin, stdout, stderr, on_start, .. } = req;
        if let Some(tell) = on_start {
            let _ = tell.send(crate::RunInfo::cgroup(id, format!("/vessel/{id}")));
        }
        let feed = async {
            let (Some(mut src), Some(path)) = (stdin, &stdin_path) else { return None };
            // The shim opened the read end when it created the task.
            let mut tx = pipe::OpenOptions::new().open_sender(path).ok()?;
            // The process may exit without reading it all: EPIPE is no error.
            let _ = tokio::io::copy(&mut src, &mut tx).await;
            if tty.is_some() {
                // End of input on a terminal makes the shim shut the console
                // down (output lost): keep it open until the process exits.
                return Some(tx);
            }
            drop(tx);
            let close = CloseIoRequest { container_id: id.into(), exec_id: String::new(), stdin: true };
            let _ = self.tasks().close_io(self.request(close)).await;
            None
        };
        let waited = async {
            let r = wait.await;
            // The process has exited: the shim's writers close once they
            // have copied the rest, and then the readers see end-of-file.
            drop((out_hold, err_hold));
            r
        };
        let stdout = stdout.unwrap_or_else(|| Box::new(tokio::io::sink()));
        let stderr = stderr.unwrap_or_else(|| Box::new(tokio::io::sink()));
        let (waited, held_stdin, out, err) =
            tokio::join!(waited, feed, drain(Some(out_rx), stdout), drain(err_rx, stderr));
        drop(held_stdin);
        let status = waited
            .map_err(|e| RuntimeError::Call { backend: "containerd", op: "wait task", source: Box::new(e) })?
            .map_err(grpc("wait task"))?
            .into_inner();
        out.map_err(RuntimeError::io("copy stdout", ""))?;
        err.map_err(RuntimeError::io("copy stderr", ""))?;
        let code = i32::try_from(status.exit_status).map_err(|_| RuntimeError::ExitStatus(status.exit_status))?;
        // runc removes the cgroup when the task is deleted: read it first.
        Ok(crate::RunOutcome::new(code, crate::cgroups::oom_kills(&format!("/vessel/{id}")) > 0))
    }
}

/// An output FIFO opened for reading, and a writer held until the process
/// has exited (see the module docs).
fn open_output(path: &Path) -> Result<(pipe::Receiver, pipe::Sender), RuntimeError> {
    let rx = pipe::OpenOptions::new().open_receiver(path).map_err(RuntimeError::io("open fifo", path))?;
    let hold = pipe::OpenOptions::new().open_sender(path).map_err(RuntimeError::io("open fifo", path))?;
    Ok((rx, hold))
}

/// A task that could not be created or started: a missing or unrunnable
/// binary is the caller's error, anything else the runtime's.
fn start_error(command: &str, s: Status) -> RuntimeError {
    let msg = s.message();
    match crate::error::start_failure(command, msg) {
        e @ RuntimeError::Exec { .. } if msg.contains("exec") => e,
        _ => grpc("create task")(s),
    }
}

/// Tears a run's container down when its future ends, however it ends: at
/// once when the run finished, in a spawned task when the future was dropped.
struct RunGuard {
    rt: Option<ContainerdRuntime>,
    id: String,
}

impl RunGuard {
    async fn finish(mut self, exited: bool) {
        if let Some(rt) = self.rt.take() {
            rt.teardown(&self.id, exited).await;
            let _ = tokio::fs::remove_dir_all(rt.run_dir(&self.id)).await;
        }
    }
}

impl Drop for RunGuard {
    fn drop(&mut self) {
        let Some(rt) = self.rt.take() else { return };
        let id = std::mem::take(&mut self.id);
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn(async move {
                    rt.teardown(&id, false).await;
                    let _ = tokio::fs::remove_dir_all(rt.run_dir(&id)).await;
                });
            }
            // No runtime to finish on: the next connection removes it (owner label).
            Err(_) => tracing::warn!(%id, "container left for the next connection to remove"),
        }
    }
}

#[async_trait]
impl Runtime for ContainerdRuntime {
    fn name(&self) -> &'static str {
        BACKEND
    }

    fn is_available(&self) -> Result<(), RuntimeError> {
        // Connecting checked the daemon; a daemon gone since then fails the run with its reason.
        Ok(())
    }

    async fn remove_leftovers(&self) -> Result<usize, RuntimeError> {
        ContainerdRuntime::remove_leftovers(self).await
    }

    fn image_store(&self) -> Option<Arc<dyn crate::ImageStore>> {
        Some(Arc::new(self.clone()))
    }

    async fn run_outcome(&self, req: RunRequest<'_>) -> Result<crate::RunOutcome, RuntimeError> {
        if req.args.is_empty() {
            return Err(RuntimeError::InvalidRequest("empty command".into()));
        }
        {
            let mut w = self.watchdog.locked();
            if w.is_none() {
                *w = Some(watchdog::spawn(&self.config, &self.owner)?);
            }
        }
        let id = format!("vessel-{:016x}", rand::random::<u64>());
        let dir = self.run_dir(&id);
        std::fs::create_dir_all(&dir).map_err(RuntimeError::io("create", &dir))?;
        let guard = RunGuard { rt: Some(self.clone()), id: id.clone() };
        let result = self.run_in(&id, &dir, req).await;
        guard.finish(result.is_ok()).await;
        result
    }
}
