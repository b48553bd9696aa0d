//! The youki backend: libcontainer in a re-executed runner process per run
//! (see the crate docs for why).

pub(crate) mod runner;

use std::fs;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::Stdio;

use async_trait::async_trait;
use nix::fcntl::OFlag;

use crate::{RunRequest, Runtime, RuntimeError, drain, spec};

/// Marks a process as a runner; the other variables say what to run.
pub(crate) const RUNNER_ENV: &str = "VESSEL_YOUKI_RUNNER";
pub(crate) const BUNDLE_ENV: &str = "VESSEL_YOUKI_BUNDLE";
pub(crate) const STATE_ENV: &str = "VESSEL_YOUKI_STATE";
pub(crate) const ID_ENV: &str = "VESSEL_YOUKI_ID";
/// `none` or `host`.
pub(crate) const NETWORK_ENV: &str = "VESSEL_YOUKI_NETWORK";
/// Set (to `rows,cols`) when the process runs on a terminal.
pub(crate) const TTY_ENV: &str = "VESSEL_YOUKI_TTY";
/// In the runner: read end of the lifeline (EOF = caller gone).
pub(crate) const LIFELINE_FD: i32 = 3;
/// In the runner: where it writes its one-line JSON result.
pub(crate) const STATUS_FD: i32 = 4;

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
}

fn pipe() -> Result<(OwnedFd, OwnedFd), RuntimeError> {
    nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| RuntimeError::io("create pipe", "")(e.into()))
}

/// Removes a bundle directory when the run ends, however it ends.
struct BundleGuard(PathBuf);

impl Drop for BundleGuard {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[async_trait]
impl Runtime for YoukiRuntime {
    fn name(&self) -> &'static str {
        "youki"
    }

    fn is_available(&self) -> Result<(), RuntimeError> {
        let unavailable = |reason: &str| Err(RuntimeError::Unavailable { backend: "youki", reason: reason.into() });
        if !nix::unistd::geteuid().is_root() {
            return unavailable("it needs root (rootless mode is not built yet)");
        }
        if !PathBuf::from("/sys/fs/cgroup").is_dir() {
            return unavailable("no cgroup filesystem at /sys/fs/cgroup");
        }
        if !PathBuf::from("/proc/self/ns/pid").exists() {
            return unavailable("the kernel has no pid namespaces");
        }
        Ok(())
    }

    async fn run(&self, req: RunRequest<'_>) -> Result<i32, RuntimeError> {
        self.is_available()?;
        let id = format!("vessel-{:016x}", rand::random::<u64>());
        let bundle = self.root.join("bundles").join(&id);
        fs::create_dir_all(&bundle).map_err(RuntimeError::io("create", &bundle))?;
        let _guard = BundleGuard(bundle.clone());
        spec::write_etc_files(&bundle, &req)?;
        let spec = spec::build(&req, &format!("/vessel/{id}"), Some(&bundle))?;
        spec.save(bundle.join("config.json")).map_err(|e| RuntimeError::Container(e.to_string()))?;
        let state = self.root.join("state");
        fs::create_dir_all(&state).map_err(RuntimeError::io("create", &state))?;

        let (life_r, life_w) = pipe()?;
        let (status_r, status_w) = pipe()?;
        let mut cmd = tokio::process::Command::new(&self.runner);
        cmd.env(RUNNER_ENV, "1")
            .env(BUNDLE_ENV, &bundle)
            .env(STATE_ENV, &state)
            .env(ID_ENV, &id)
            .env(NETWORK_ENV, if req.network == crate::Network::Host { "host" } else { "none" })
            // Always pipes: an inherited host /dev/null is not writable in
            // the container; unwanted output is drained into a sink here, and
            // an absent stdin is a pipe closed at once (end of file).
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let (lr, sw) = (life_r.as_raw_fd(), status_w.as_raw_fd());
        // SAFETY: runs in the forked child before exec, where only
        // async-signal-safe calls are allowed: fcntl, dup2 and close are.
        // They place the lifeline and status pipes at fds 3 and 4 (without
        // FD_CLOEXEC) whatever numbers they had in this process.
        unsafe {
            cmd.pre_exec(move || {
                let a = nix::libc::fcntl(lr, nix::libc::F_DUPFD, 10);
                let b = nix::libc::fcntl(sw, nix::libc::F_DUPFD, 10);
                if a < 0 || b < 0 || nix::libc::dup2(a, LIFELINE_FD) < 0 || nix::libc::dup2(b, STATUS_FD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                nix::libc::close(a);
                nix::libc::close(b);
                Ok(())
            });
        }
        if let Some(size) = req.tty {
            cmd.env(TTY_ENV, format!("{},{}", size.rows, size.cols));
        }
        let mut child = cmd.spawn().map_err(RuntimeError::io("start runner", &self.runner))?;
        drop((life_r, status_w));

        let command = req.args[0].clone();
        let RunRequest { stdin, stdout, stderr, .. } = req;
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
        let (waited, (), out, err) =
            tokio::join!(child.wait(), feed, drain(child_out, stdout), drain(child_err, stderr));
        drop(life_w);
        let waited = waited.map_err(RuntimeError::io("wait for runner", &self.runner))?;
        out.map_err(RuntimeError::io("copy stdout", ""))?;
        err.map_err(RuntimeError::io("copy stderr", ""))?;

        let mut report = String::new();
        fs::File::from(status_r).read_to_string(&mut report).map_err(RuntimeError::io("read runner status", ""))?;
        runner::parse_report(&report, &command)
            .unwrap_or_else(|| Err(RuntimeError::Container(format!("the runner ended without a report ({waited})"))))
    }
}
