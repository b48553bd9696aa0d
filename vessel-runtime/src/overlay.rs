//! Mounting a vessel's overlay rootfs.
//!
//! Options are fixed to what the snapshot engine can express: no
//! `redirect_dir`, no `metacopy` (an upper dir using them is not a plain
//! layer diff), no `index`. Lower dirs are passed as `/proc/self/fd/N` of
//! dirs held open for the mount call, so even 100+ deep lower lists fit the
//! kernel's 4 KiB limit on mount options, whatever the paths' lengths.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};

use crate::RuntimeError;

/// The kernel's maximum overlay stack depth (`OVL_MAX_STACK`).
pub const MAX_LOWERS: usize = 500;

/// An overlay mount, unmounted (lazily, `MNT_DETACH`) on drop.
#[derive(Debug)]
pub struct OverlayMount {
    target: PathBuf,
    mounted: bool,
}

impl OverlayMount {
    /// Mounts `lowers` (topmost first) with `upper`/`work` at `target`; with
    /// no upper the mount is read-only.
    pub fn mount(target: &Path, lowers: &[&Path], upper: Option<(&Path, &Path)>) -> Result<Self, RuntimeError> {
        if lowers.is_empty() || lowers.len() > MAX_LOWERS {
            return Err(RuntimeError::InvalidRequest(format!(
                "{} lower dirs (1 to {MAX_LOWERS} allowed)",
                lowers.len()
            )));
        }
        let held: Vec<File> = lowers
            .iter()
            .map(|l| File::open(l).map_err(RuntimeError::io("open lower dir", *l)))
            .collect::<Result<_, _>>()?;
        let lowerdir: Vec<String> = held.iter().map(|f| format!("/proc/self/fd/{}", f.as_raw_fd())).collect();
        let mut opts = format!("lowerdir={}", lowerdir.join(":"));
        let mut held_upper = Vec::new();
        if let Some((u, w)) = upper {
            for d in [u, w] {
                held_upper.push(File::open(d).map_err(RuntimeError::io("open", d))?);
            }
            opts.push_str(&format!(
                ",upperdir=/proc/self/fd/{},workdir=/proc/self/fd/{}",
                held_upper[0].as_raw_fd(),
                held_upper[1].as_raw_fd()
            ));
        }
        opts.push_str(",redirect_dir=off,metacopy=off,index=off");
        let flags = if upper.is_some() { MsFlags::empty() } else { MsFlags::MS_RDONLY };
        mount(Some("overlay"), target, Some("overlay"), flags, Some(opts.as_str()))
            .map_err(|e| RuntimeError::io("mount overlay at", target)(e.into()))?;
        Ok(Self { target: target.to_path_buf(), mounted: true })
    }

    /// Where it is mounted.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Unmounts now, reporting failure (drop only logs it).
    pub fn unmount(mut self) -> Result<(), RuntimeError> {
        self.mounted = false;
        umount2(&self.target, MntFlags::MNT_DETACH).map_err(|e| RuntimeError::io("unmount", &self.target)(e.into()))
    }
}

impl Drop for OverlayMount {
    fn drop(&mut self) {
        if self.mounted
            && let Err(e) = umount2(&self.target, MntFlags::MNT_DETACH)
        {
            tracing::warn!(target = %self.target.display(), error = %e, "could not unmount overlay");
        }
    }
}
