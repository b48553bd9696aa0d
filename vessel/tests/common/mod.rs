//! The world the facade's suites run vessels in (the facade, escape and
//! CLI-level suites each include this file): one per backend compiled in,
//! each a data dir whose storage holds the test images and a base for mount
//! roots ("hosts"), plus the command helpers the cases share.
// Each suite uses part of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use tokio::io::AsyncReadExt;
use vessel::{Backend, CompressedStorage, ExecOptions, Limits, LocalStorage, Manager, ManagerConfig, Storage};
use vessel_test_support as support;

/// The test image every world's storage holds.
pub(crate) const IMAGE: &str = "local/busybox:latest";

/// One backend's test world.
pub(crate) struct World {
    pub(crate) backend: Backend,
    pub(crate) base: PathBuf,
    pub(crate) address: Option<PathBuf>,
    /// The containerd namespace (per suite and process).
    pub(crate) namespace: String,
    /// Whether storage compresses (as the default storage does).
    pub(crate) compressed: bool,
}

impl World {
    pub(crate) fn storage(&self) -> Arc<dyn Storage> {
        let local = LocalStorage::new(self.base.join("data")).unwrap();
        if self.compressed { Arc::new(CompressedStorage::new(local)) } else { Arc::new(local) }
    }

    pub(crate) fn config(&self, host: &str) -> ManagerConfig {
        let mut c = ManagerConfig::default()
            .shared_storage(self.storage())
            .mount_root(self.base.join(host))
            .backend(self.backend)
            .namespace(self.namespace.clone());
        if let Some(a) = &self.address {
            c = c.containerd_address(a);
        }
        c
    }

    pub(crate) async fn manager(&self, host: &str) -> Result<Manager> {
        Ok(Manager::new(self.config(host)).await?)
    }

    /// This test binary again, as a child that is this world's host for
    /// `vessel`: `marker` set, and what [`World::from_child_env`] reads; its
    /// stdout piped, killed if dropped.
    pub(crate) fn child_command(&self, marker: &str, vessel: &str) -> Result<tokio::process::Command> {
        let mut cmd = tokio::process::Command::new(std::env::current_exe()?);
        cmd.env(marker, "1")
            .env("VESSEL_TEST_BASE", &self.base)
            .env("VESSEL_TEST_BACKEND", format!("{:?}", self.backend).to_lowercase())
            .env("VESSEL_TEST_VESSEL", vessel)
            .env("VESSEL_TEST_NAMESPACE", &self.namespace)
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true);
        Ok(cmd)
    }

    /// In a child made by [`World::child_command`]: its parent's world and
    /// the vessel it is to work on.
    pub(crate) fn from_child_env() -> (Self, String) {
        let var = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("{k} unset in a test child"));
        let backend = if var("VESSEL_TEST_BACKEND") == "containerd" { Backend::Containerd } else { Backend::Youki };
        let w = World {
            backend,
            base: PathBuf::from(var("VESSEL_TEST_BASE")),
            address: std::env::var_os("VESSEL_CONTAINERD_ADDRESS").map(PathBuf::from),
            namespace: var("VESSEL_TEST_NAMESPACE"),
            compressed: true,
        };
        (w, var("VESSEL_TEST_VESSEL"))
    }

    /// `youki`, `containerd`; `rootless::` first in rootless mode.
    pub(crate) fn label(&self) -> String {
        let mode = if rootless() { "rootless::" } else { "" };
        format!("{mode}{:?}", self.backend).to_lowercase()
    }
}

/// Whether this process runs vessels rootless.
pub(crate) fn rootless() -> bool {
    vessel::runtime::rootless::mode().is_rootless()
}

/// The worlds of suite `suite` under `tmp`: youki (default feature), and
/// containerd where `VESSEL_CONTAINERD_ADDRESS` names a daemon (never
/// rootless: there it is a typed refusal, which a case checks).
pub(crate) fn worlds(suite: &str, tmp: &Path, compressed: bool) -> Vec<Arc<World>> {
    let namespace = format!("vessel-{suite}-{}", std::process::id());
    let world = |backend, dir: &str, address| World {
        backend,
        base: tmp.join(dir),
        address,
        namespace: namespace.clone(),
        compressed,
    };
    let mut out = Vec::new();
    if cfg!(feature = "youki") {
        out.push(world(Backend::Youki, "youki", None));
    }
    if cfg!(feature = "containerd")
        && !rootless()
        && let Some(a) = support::required_env(suite, "VESSEL_CONTAINERD_ADDRESS")
    {
        out.push(world(Backend::Containerd, "containerd", Some(PathBuf::from(a))));
    }
    out.into_iter().map(Arc::new).collect()
}

/// Copies the images of the test image dir's storage (`all`: every one;
/// else [`IMAGE`]) into each world's storage.
pub(crate) fn seed_images(rt: &tokio::runtime::Runtime, worlds: &[Arc<World>], image_dir: &Path, all: bool) {
    let src = LocalStorage::new(image_dir.join("storage")).unwrap();
    for w in worlds {
        rt.block_on(async {
            let images =
                if all { src.list_images().await.unwrap() } else { vec![vessel::ImageRef::new(IMAGE).unwrap()] };
            for r in images {
                let mut data = Vec::new();
                src.load_image(&r).await.unwrap().read_to_end(&mut data).await.unwrap();
                w.storage().save_image(&r, Box::new(std::io::Cursor::new(data))).await.unwrap();
            }
        });
    }
}

/// The worlds by label, for `support::suite::trials`.
pub(crate) fn labelled(worlds: &[Arc<World>]) -> Vec<(String, Arc<World>)> {
    worlds.iter().map(|w| (w.label(), w.clone())).collect()
}

/// The leak check of a suite's worlds under `tmp`.
pub(crate) fn leaks(tmp: &Path, worlds: &[Arc<World>]) -> Vec<(&'static str, Vec<String>)> {
    let containerd: Vec<(PathBuf, String)> =
        worlds.iter().filter_map(|w| w.address.clone().map(|a| (a, w.namespace.clone()))).collect();
    support::suite::leaks(tmp, &containerd)
}

/// Whether the user has a delegated cgroup subtree (rootless limits hold).
pub(crate) fn delegated() -> bool {
    vessel::runtime::rootless::delegated_cgroups().is_ok()
}

pub(crate) fn sh(script: &str) -> Vec<String> {
    vec!["sh".into(), "-c".into(), script.into()]
}

/// Runs `script` (persisting or not), returning exit code, stdout, stderr.
pub(crate) async fn run(v: &vessel::Vessel, script: &str, persist: bool) -> Result<(i32, String, String)> {
    let (res, out, err) = run_full(v, script, persist, None, Limits::default()).await?;
    Ok((res.exit_code, out, err))
}

/// Runs `script` with a timeout (in seconds) and limits, not persisting.
pub(crate) async fn run_with(
    v: &vessel::Vessel,
    script: &str,
    timeout: u64,
    limits: Limits,
) -> Result<(vessel::ExecResult, String, String)> {
    run_full(v, script, false, Some(Duration::from_secs(timeout)), limits).await
}

pub(crate) async fn run_full(
    v: &vessel::Vessel,
    script: &str,
    persist: bool,
    timeout: Option<Duration>,
    limits: Limits,
) -> Result<(vessel::ExecResult, String, String)> {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let res = v
        .exec(ExecOptions {
            command: sh(script),
            stdout: Some(Box::new(&mut out)),
            stderr: Some(Box::new(&mut err)),
            persist_result: persist,
            timeout,
            limits,
            ..Default::default()
        })
        .await?;
    Ok((res, String::from_utf8_lossy(&out).into_owned(), String::from_utf8_lossy(&err).into_owned()))
}
