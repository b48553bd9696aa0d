//! The youki backend: libcontainer in a re-executed runner process per run
//! (see the crate docs for why).
//!
//! No container outlives its runner and caller. The caller holds a flock on
//! `runners/<id>.lock` and shares it with the runner (the container's own
//! processes never hold it: libcontainer closes inherited fds at exec), so
//! the lock is free exactly when both are gone. The runner kills its
//! container when the caller goes away (lifeline) or when it is told to
//! stop (SIGTERM, SIGINT, SIGHUP); the caller cleans up when the runner
//! dies without reporting (SIGKILL); and [`YoukiRuntime::remove_leftovers`]
//! (run by each new vessel `Manager`) removes the containers whose lock is
//! free, when everything was killed at once.

pub(crate) mod protocol;
pub(crate) mod runner;

use std::fs;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Stdio;

use async_trait::async_trait;
use nix::fcntl::{Flock, FlockArg, OFlag};

use crate::{RunRequest, Runtime, RuntimeError, drain, spec};
use protocol::{
    DelegatedRun, GO_FD, JOIN_USERNS_FD, LIFELINE_FD, LOCK_FD, RUNNER_ENV, Report, Run, RunnerConfig, STATUS_FD, Task,
};

/// Containers through youki's libcontainer, no daemon.
#[derive(Debug, Clone)]
pub struct YoukiRuntime {
    root: PathBuf,
    runner: PathBuf,
}

impl YoukiRuntime {
    /// A runtime keeping bundles and container state under `root`.
    /// The runner is the current executable, which must call [`crate::init`] first in `main`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into(), runner: PathBuf::from("/proc/self/exe") }
    }

    /// Uses another executable as the runner (it must call [`crate::init`] first).
    pub fn with_runner(mut self, exe: impl Into<PathBuf>) -> Self {
        self.runner = exe.into();
        self
    }

    /// Creates the runtime's directories: bundles are reached by containers
    /// (bind-mount sources), so their path is traversable (0711) but not
    /// listable; state and locks are this host's root's alone (0700).
    fn prepare_dirs(&self) -> Result<(), RuntimeError> {
        for (dir, mode) in [
            (self.root.clone(), 0o711),
            (self.root.join("bundles"), 0o711),
            (self.root.join("state"), 0o700),
            (self.root.join("runners"), 0o700),
        ] {
            fs::create_dir_all(&dir).map_err(RuntimeError::io("create", &dir))?;
            fs::set_permissions(&dir, fs::Permissions::from_mode(mode)).map_err(RuntimeError::io("chmod", &dir))?;
            if crate::rootless::mode().is_rootless() {
                // The runner works in the container's namespace, where the
                // user's own id is not mapped: its dirs are container root's.
                nix::unistd::chown(&dir, Some(0.into()), Some(0.into()))
                    .map_err(|e| RuntimeError::io("chown", &dir)(e.into()))?;
            }
        }
        Ok(())
    }

    fn runner_command(&self, task: Task) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(&self.runner);
        if crate::rootless::mode().is_rootless() {
            // The rootless process keeps the user's own id (with every
            // capability of its namespace, which an exec would drop): the
            // runner is the namespace's root instead.
            cmd.uid(0).gid(0);
        }
        cmd.env(RUNNER_ENV, RunnerConfig { state: self.root.join("state"), task }.to_env());
        cmd
    }

    /// Removes a container whose runner died (kill, delete, cgroups) with
    /// a `cleanup` runner, then its bundle and lock.
    async fn cleanup(&self, id: &str) -> Result<(), RuntimeError> {
        let status = self
            .runner_command(Task::Cleanup { id: id.to_owned() })
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await
            .map_err(RuntimeError::io("start cleanup runner", &self.runner))?;
        let _ = fs::remove_dir_all(self.root.join("bundles").join(id));
        let _ = fs::remove_file(lock_file(&self.root, id));
        if let Some(parent) = delegated() {
            // The container's last processes may still be exiting (its
            // init was killed just now): give them a few seconds.
            for _ in 0..100 {
                if crate::cgroups::remove_delegated(&parent, id) {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
        if !status.success() {
            return Err(RuntimeError::Cleanup { id: id.to_owned(), status });
        }
        Ok(())
    }

    /// Removes the containers whose caller and runner are both gone (their
    /// liveness lock is free): what a process tree killed at once left.
    /// Returns how many; live runs are never touched.
    pub async fn remove_leftovers(&self) -> Result<usize, RuntimeError> {
        let dir = self.root.join("runners");
        // Rootless cgroups a killed process left: the user's subtree is
        // shared by its managers, so only empty ones older than any run's
        // setup (a runner moves its container in within milliseconds).
        if let Some(parent) = delegated() {
            for id in crate::cgroups::stale_delegated_runs(&parent, std::time::Duration::from_secs(60)) {
                let _ = crate::cgroups::remove_delegated(&parent, &id);
            }
        }
        let Ok(entries) = fs::read_dir(&dir) else { return Ok(0) };
        let mut removed = 0;
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(id) = name.strip_suffix(".lock") else { continue };
            let Ok(f) = fs::File::open(e.path()) else { continue };
            if Flock::lock(f, FlockArg::LockExclusiveNonblock).is_err() {
                continue;
            }
            tracing::info!(%id, "removing a container whose runner and caller died");
            self.cleanup(id).await?;
            removed += 1;
        }
        Ok(removed)
    }

    /// Takes the liveness lock of run `id`: made under a temporary name and
    /// renamed once locked, so a concurrent `remove_leftovers` never sees it free.
    fn take_lock(&self, id: &str) -> Result<Flock<fs::File>, RuntimeError> {
        let tmp = self.root.join("runners").join(format!("{id}.new"));
        let f =
            fs::OpenOptions::new().create_new(true).write(true).open(&tmp).map_err(RuntimeError::io("create", &tmp))?;
        let lock = Flock::lock(f, FlockArg::LockExclusiveNonblock)
            .map_err(|(_, e)| RuntimeError::io("lock", &tmp)(e.into()))?;
        fs::rename(&tmp, lock_file(&self.root, id)).map_err(RuntimeError::io("rename", &tmp))?;
        Ok(lock)
    }
}

/// The liveness lock of run `id` under the runtime's `root`.
pub(crate) fn lock_file(root: &std::path::Path, id: &str) -> PathBuf {
    root.join("runners").join(format!("{id}.lock"))
}

fn pipe() -> Result<(OwnedFd, OwnedFd), RuntimeError> {
    nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| RuntimeError::io("create pipe", "")(e.into()))
}

/// Removes a bundle directory and the liveness lock when the run ends,
/// however it ends.
struct BundleGuard {
    bundle: PathBuf,
    lock: PathBuf,
    /// Rootless with delegated cgroups: (subtree, run id), whose cgroups
    /// the runner makes and this side removes once it is gone.
    cgroup: Option<(String, String)>,
}

impl Drop for BundleGuard {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.bundle);
        let _ = fs::remove_file(&self.lock);
        if let Some((parent, id)) = self.cgroup.take()
            && !crate::cgroups::remove_delegated(&parent, &id)
        {
            // A cancelled run: the runner is still taking its container
            // down. Removed once the processes are gone (or by the next
            // `remove_leftovers`).
            std::thread::spawn(move || {
                for _ in 0..200 {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                    if crate::cgroups::remove_delegated(&parent, &id) {
                        return;
                    }
                }
            });
        }
    }
}

/// The delegated cgroup subtree rootless runs use, if there is one.
fn delegated() -> Option<String> {
    crate::rootless::mode().is_rootless().then(|| crate::rootless::delegated_cgroups().ok()).flatten()
}

/// libcontainer 0.7 reads a `SCMP_CMP_MASKED_EQ` argument as
/// `(arg & valueTwo) == value`, the reverse of runc and of docker's
/// profiles, `(arg & value) == valueTwo`: swap the two for it.
fn masked_eq_for_libcontainer(spec: &mut oci_spec::runtime::Spec) {
    use oci_spec::runtime::LinuxSeccompOperator;
    let Some(mut linux) = spec.linux().clone() else { return };
    let Some(mut seccomp) = linux.seccomp().clone() else { return };
    let mut syscalls = seccomp.syscalls().clone().unwrap_or_default();
    for sc in &mut syscalls {
        let Some(mut args) = sc.args().clone() else { continue };
        for a in args.iter_mut().filter(|a| a.op() == LinuxSeccompOperator::ScmpCmpMaskedEq) {
            let (mask, value) = (a.value(), a.value_two().unwrap_or(0));
            if let Ok(swapped) = oci_spec::runtime::LinuxSeccompArgBuilder::default()
                .index(a.index())
                .op(a.op())
                .value(value)
                .value_two(mask)
                .build()
            {
                *a = swapped;
            }
        }
        sc.set_args(Some(args));
    }
    seccomp.set_syscalls(Some(syscalls));
    linux.set_seccomp(Some(seccomp));
    spec.set_linux(Some(linux));
}

/// Drops the spec's network namespace: the container shares its runner's.
fn without_network_namespace(spec: &mut oci_spec::runtime::Spec) {
    use oci_spec::runtime::LinuxNamespaceType;
    let Some(mut linux) = spec.linux().clone() else { return };
    let mut ns = linux.namespaces().clone().unwrap_or_default();
    ns.retain(|n| n.typ() != LinuxNamespaceType::Network);
    linux.set_namespaces(Some(ns));
    spec.set_linux(Some(linux));
}

/// A rootless run's spec: no user namespace of its own (the runner joins
/// one, with the request's mapping) and no cgroup resources for
/// libcontainer (its cgroup v1 manager always writes device rules, which
/// need host root). With a delegated subtree the runner applies the limits
/// itself; without one there are none ([`Runtime::limits_unavailable`]).
fn rootless_spec(spec: &mut oci_spec::runtime::Spec) {
    use oci_spec::runtime::LinuxNamespaceType;
    let Some(mut linux) = spec.linux().clone() else { return };
    let mut ns = linux.namespaces().clone().unwrap_or_default();
    // The runner makes the network namespace itself, once in the user one.
    ns.retain(|n| n.typ() != LinuxNamespaceType::User && n.typ() != LinuxNamespaceType::Network);
    linux.set_namespaces(Some(ns));
    linux.set_uid_mappings(None);
    linux.set_gid_mappings(None);
    linux.set_resources(None);
    spec.set_linux(Some(linux));
}

#[async_trait]
impl Runtime for YoukiRuntime {
    fn name(&self) -> &'static str {
        crate::Backend::Youki.name()
    }

    fn is_available(&self) -> Result<(), RuntimeError> {
        let unavailable = |reason: &str| {
            Err(RuntimeError::Unavailable { backend: crate::Backend::Youki.name(), reason: reason.into() })
        };
        match crate::rootless::mode() {
            crate::rootless::Mode::Rootful | crate::rootless::Mode::Rootless => {}
            crate::rootless::Mode::Unavailable(why) => {
                return unavailable(&format!("it needs root or rootless mode, which is unavailable: {why}"));
            }
        }
        if !PathBuf::from("/sys/fs/cgroup").is_dir() {
            return unavailable("no cgroup filesystem at /sys/fs/cgroup");
        }
        if !PathBuf::from("/proc/self/ns/pid").exists() {
            return unavailable("the kernel has no pid namespaces");
        }
        Ok(())
    }

    async fn remove_leftovers(&self) -> Result<usize, RuntimeError> {
        YoukiRuntime::remove_leftovers(self).await
    }

    fn limits_unavailable(&self) -> Option<String> {
        if !crate::rootless::mode().is_rootless() {
            return None;
        }
        crate::rootless::delegated_cgroups().err().map(|why| format!("rootless: {why}"))
    }

    async fn run_outcome(&self, mut req: RunRequest<'_>) -> Result<crate::RunOutcome, RuntimeError> {
        self.is_available()?;
        self.prepare_dirs()?;
        let id = format!("vessel-{:016x}", rand::random::<u64>());
        let lock = self.take_lock(&id)?;
        let bundle = self.root.join("bundles").join(&id);
        let rootless = crate::rootless::mode().is_rootless();
        let parent = delegated();
        let _guard = BundleGuard {
            bundle: bundle.clone(),
            lock: lock_file(&self.root, &id),
            cgroup: parent.clone().map(|p| (p, id.clone())),
        };
        fs::create_dir(&bundle).map_err(RuntimeError::io("create", &bundle))?;
        // Only the container's root (and host root) may enter the bundle,
        // whose files are bind-mounted into the container.
        fs::set_permissions(&bundle, fs::Permissions::from_mode(0o700)).map_err(RuntimeError::io("chmod", &bundle))?;
        if let Some(map) = req.user_namespace {
            let ids = Some(nix::unistd::Uid::from_raw(map.host_id));
            nix::unistd::chown(&bundle, ids, Some(nix::unistd::Gid::from_raw(map.host_id)))
                .map_err(|e| RuntimeError::io("chown", &bundle)(e.into()))?;
        }
        spec::write_etc_files(&bundle, &req)?;
        let mut spec = spec::build(&req, &format!("/vessel/{id}"), Some(&bundle))?;
        let userns = req.user_namespace.is_some();
        if userns && req.network == crate::Network::None {
            // Created by libcontainer inside the container's user namespace
            // (so sysfs mounts); the runner brings its `lo` up.
            spec::add_network_namespace(&mut spec)?;
        }
        // A vessel network is joined by the runner (see `Run::join_network`).
        let join_network = match &req.network {
            crate::Network::Join { netns, .. } => {
                without_network_namespace(&mut spec);
                Some(netns.clone())
            }
            _ => None,
        };
        masked_eq_for_libcontainer(&mut spec);
        // Rootless: the runner joins a user namespace made here (the
        // runner may write no id map of its own for a range) and runs
        // without cgroups (see `rootless_spec`).
        let join = match req.user_namespace {
            Some(map) if rootless => {
                rootless_spec(&mut spec);
                Some(crate::UserNamespace::new(map)?)
            }
            _ => None,
        };
        spec.save(bundle.join("config.json")).map_err(RuntimeError::Spec)?;

        let (life_r, life_w) = pipe()?;
        let (status_r, status_w) = pipe()?;
        // Gated: the runner makes the container, then waits for a byte on
        // the go pipe before starting it (end of file: it never starts).
        let gate = req.before_start.take();
        let go = gate.as_ref().map(|_| pipe()).transpose()?;
        let task = Task::Run(Run {
            bundle: bundle.clone(),
            id: id.clone(),
            private_network: req.network == crate::Network::None,
            join_network: join_network.clone(),
            userns,
            gated: go.is_some(),
            tty: req.tty.map(|t| (t.rows, t.cols)),
            cgroups: parent.as_ref().map(|p| DelegatedRun {
                parent: p.clone(),
                memory: req.limits.memory_bytes,
                cpu_quota_us: req.limits.cpu_quota_us,
                pids: req.limits.pids,
            }),
        });
        let mut cmd = self.runner_command(task);
        // Always pipes: an inherited host /dev/null is not writable in
        // the container; unwanted output is drained into a sink here, and
        // an absent stdin is a pipe closed at once (end of file).
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut fds =
            vec![(life_r.as_raw_fd(), LIFELINE_FD), (status_w.as_raw_fd(), STATUS_FD), (lock.as_raw_fd(), LOCK_FD)];
        if let Some(ns) = &join {
            fds.push((std::os::fd::AsFd::as_fd(ns).as_raw_fd(), JOIN_USERNS_FD));
        }
        if let Some((go_r, _)) = &go {
            fds.push((go_r.as_raw_fd(), GO_FD));
        }
        crate::child::hand_over(&mut cmd, &fds);
        let mut child = cmd.spawn().map_err(RuntimeError::io("start runner", &self.runner))?;
        drop((life_r, status_w));
        let go_w = go.map(|(_, w)| w);
        // Awaited beside the runner: its go (or its end of file) once the
        // gate settles; the gate's error is the run's.
        let gated = async move {
            let (Some(gate), Some(go_w)) = (gate, go_w) else { return Ok(()) };
            let ready = gate.await;
            if ready.is_ok() {
                // A runner that died already just misses it.
                let _ = nix::unistd::write(&go_w, b"1");
            }
            drop(go_w);
            ready
        };

        let command = req.args[0].clone();
        let RunRequest { stdin, stdout, stderr, on_start, .. } = req;
        if let Some(tell) = on_start {
            let info = match (&parent, crate::rootless::v1_mount("memory")) {
                (Some(p), Some(m)) => crate::RunInfo::oom_file(
                    &id,
                    m.join(p).join(crate::cgroups::RUNS_CGROUP).join(&id).join("memory.oom_control"),
                ),
                _ => crate::RunInfo::cgroup(&id, format!("/vessel/{id}")),
            };
            let _ = tell.send(info);
        }
        let child_in = child.stdin.take();
        let child_out = child.stdout.take();
        let child_err = child.stderr.take();
        let feed = async move {
            if let (Some(mut src), Some(mut dst)) = (stdin, child_in) {
                // The process may exit without reading it all: EPIPE is no error.
                let _ = tokio::io::copy(&mut src, &mut dst).await;
            }
        };
        let stdout = stdout.unwrap_or_else(|| Box::new(tokio::io::sink()));
        let stderr = stderr.unwrap_or_else(|| Box::new(tokio::io::sink()));
        let finished = async {
            let waited = child.wait().await.map_err(RuntimeError::io("wait for runner", &self.runner))?;
            let mut report = String::new();
            fs::File::from(status_r).read_to_string(&mut report).map_err(RuntimeError::io("read runner status", ""))?;
            match Report::parse(&report) {
                Some(r) => Ok(r.into_result(&command)),
                None => {
                    // The runner was killed before it could clean up: do it
                    // now (which also ends the container's hold on the
                    // output pipes, so the drains below finish).
                    self.cleanup(&id).await?;
                    Err(RuntimeError::RunnerDied(waited))
                }
            }
        };
        let (finished, (), out, err, gated) =
            tokio::join!(finished, feed, drain(child_out, stdout), drain(child_err, stderr), gated);
        drop(life_w);
        // Refused at the gate: the command never ran; why is the gate's.
        gated?;
        let result = finished?;
        drop(lock);
        out.map_err(RuntimeError::io("copy stdout", ""))?;
        err.map_err(RuntimeError::io("copy stderr", ""))?;
        result
    }
}
