//! [`Vessel::exec`]: one command in a new container on the vessel's
//! rootfs, or on a throwaway overlay over it.

use std::fs;
use std::path::PathBuf;

use vessel_core::{ExecOptions, ExecResult};
use vessel_runtime::overlay::OverlayMount;
use vessel_runtime::{RunRequest, TtySize};

use super::{Vessel, bounded_dir};
use crate::error::{Result, VesselError};

/// Merges `KEY=VALUE` lists; later entries win.
pub(super) fn merge_env(base: &[String], over: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for kv in base.iter().chain(over) {
        let key = kv.split('=').next().unwrap_or_default();
        out.retain(|e| e.split('=').next() != Some(key));
        out.push(kv.clone());
    }
    out
}

/// A throwaway overlay over the live rootfs for a non-persistent exec.
struct Throwaway {
    dir: PathBuf,
    mount: Option<OverlayMount>,
}

impl Drop for Throwaway {
    fn drop(&mut self) {
        if let Some(m) = self.mount.take() {
            let _ = m.unmount();
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

impl Vessel {
    /// Runs a command in a new container on the vessel's filesystem: the
    /// image's environment plus `opts.env`, in `opts.work_dir` or the
    /// vessel's. With `persist_result` its changes stay; without, it runs on
    /// a throwaway overlay and they are discarded. Dropping the future kills
    /// the command.
    pub async fn exec(&self, opts: ExecOptions<'_>) -> Result<ExecResult> {
        if opts.command.is_empty() {
            return Err(VesselError::InvalidInput("empty command".into()));
        }
        let timeout = opts.timeout;
        if timeout.is_some_and(|t| t.is_zero()) {
            return Err(VesselError::InvalidInput("a zero exec timeout".into()));
        }
        let inner = &self.inner;
        let limits = inner.bounds.limits.narrowed_by(&opts.limits)?;
        let state = inner.state.read().await;
        if state.closed {
            return Err(VesselError::Closed(inner.id.clone()));
        }
        if opts.persist_result && opts.limits == vessel_core::Limits::default() {
            // The common case: the command joins the vessel's live sandbox.
            let result = self.exec_live(opts).await;
            drop(state);
            return result;
        }
        let cwd = match &opts.work_dir {
            Some(w) => self.path(w)?,
            None => self.path(".")?,
        };
        let live = inner.dir.join("rootfs");
        let mut throwaway = None;
        let rootfs = if opts.persist_result {
            live
        } else {
            let execs = inner.dir.join("exec");
            fs::create_dir_all(&execs).map_err(VesselError::io("create", &execs))?;
            let dir = bounded_dir(&execs, &format!("{:016x}", rand::random::<u64>()), inner.bounds.disk)?;
            let t = throwaway.insert(Throwaway { dir: dir.clone(), mount: None });
            for d in ["upper", "work", "rootfs"] {
                fs::create_dir_all(dir.join(d)).map_err(VesselError::io("create", &dir))?;
            }
            // The throwaway's root is its upper dir: give it the live
            // root's owner and mode (host view), or the container's root
            // would find `/` owned by an unmapped id.
            let live_root = fs::metadata(&live).map_err(VesselError::io("stat", &live))?;
            let up = dir.join("upper");
            {
                use std::os::unix::fs::{MetadataExt, PermissionsExt};
                nix::unistd::chown(
                    &up,
                    Some(nix::unistd::Uid::from_raw(live_root.uid())),
                    Some(nix::unistd::Gid::from_raw(live_root.gid())),
                )
                .map_err(|e| VesselError::io("chown", &up)(e.into()))?;
                fs::set_permissions(&up, fs::Permissions::from_mode(live_root.mode() & 0o7777))
                    .map_err(VesselError::io("chmod", &up))?;
            }
            t.mount = Some(OverlayMount::mount(
                &dir.join("rootfs"),
                &[live.as_path()],
                Some((&dir.join("upper"), &dir.join("work"))),
            )?);
            dir.join("rootfs")
        };
        let (network, before_start) = inner.run_network().await?;
        let req = RunRequest {
            rootfs,
            args: opts.command,
            env: merge_env(&inner.image_config.env, &opts.env),
            cwd: Some(cwd),
            uid: inner.user.uid,
            gid: inner.user.gid,
            additional_gids: inner.user.additional_gids.clone(),
            user_namespace: inner.ids,
            tty: opts.tty.then_some(TtySize { rows: 24, cols: 80 }),
            stdin: opts.stdin,
            stdout: opts.stdout,
            stderr: opts.stderr,
            limits,
            network,
            before_start,
            ..Default::default()
        };
        let run = inner.manager.runtime.run_outcome(req);
        let done = |o: vessel_runtime::RunOutcome| ExecResult::new(o.exit_code).with_oom_killed(o.oom_killed);
        let result = match timeout {
            // Dropping the run kills the whole process tree (see Runtime::run).
            Some(t) => match tokio::time::timeout(t, run).await {
                Ok(outcome) => done(outcome?),
                Err(_) => ExecResult::timed_out(),
            },
            None => done(run.await?),
        };
        drop(throwaway);
        drop(state);
        Ok(result)
    }
}
