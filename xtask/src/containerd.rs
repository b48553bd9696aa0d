//! A private containerd for the tests: its own root, state, socket and
//! config under a temp dir, so tests need no system daemon and never touch
//! one. Stopped (and its mounts and files removed) on drop, also when a test
//! step failed.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

#[derive(Debug)]
pub(crate) struct Containerd {
    child: Child,
    pub(crate) dir: PathBuf,
    pub(crate) address: PathBuf,
}

impl Containerd {
    pub(crate) fn start() -> Result<Self> {
        let dir = PathBuf::from(format!("/tmp/vessel-containerd-{}", std::process::id()));
        if dir.exists() {
            cleanup(&dir);
        }
        std::fs::create_dir_all(&dir)?;
        let address = dir.join("containerd.sock");
        let config = dir.join("config.toml");
        std::fs::write(
            &config,
            format!(
                "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\n[grpc]\n  address = \"{address}\"\n\n[ttrpc]\n  address = \"{address}.ttrpc\"\n",
                root = dir.join("root").display(),
                state = dir.join("state").display(),
                address = address.display(),
            ),
        )?;
        let log = std::fs::File::create(dir.join("containerd.log"))?;
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("could not start containerd (run `cargo xtask setup`)")?;
        let me = Self { child, dir, address };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ok = Command::new("ctr")
                .arg("--address")
                .arg(&me.address)
                .arg("version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                println!("containerd: private instance at {}", me.address.display());
                return Ok(me);
            }
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(me.dir.join("containerd.log")).unwrap_or_default();
                bail!("containerd did not answer within 30 s; its log:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        cleanup(&self.dir);
    }
}

/// Unmounts whatever is still mounted under `dir` (deepest first), then removes it.
fn cleanup(dir: &Path) {
    let prefix = dir.to_string_lossy().into_owned();
    let mut mounts: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4).map(str::to_owned))
        .filter(|m| m.starts_with(&prefix))
        .collect();
    mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for m in &mounts {
        let _ = Command::new("umount").arg("-l").arg(m).status();
    }
    if !mounts.is_empty() {
        eprintln!("containerd: cleaned up {} leftover mounts", mounts.len());
    }
    let _ = std::fs::remove_dir_all(dir);
}
