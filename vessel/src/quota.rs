//! [`setup_quota`]: a quota-capable mount root for a root user on any disk.
//!
//! Vessels' disk quotas are btrfs qgroups (see `vessel_runtime::quota`).
//! Most machines' disks are ext4 or XFS, so a root user who wants quotas
//! gets a sparse file, formatted btrfs with quotas on and loop-mounted at
//! the mount root, as docker's devicemapper loop files and podman's
//! `overlay.size` test setups do. Sparse: it takes from the host disk only
//! what vessels write; mounted with `discard`, so what they delete is given
//! back.
//!
//! This module decides what is made and where; the mechanism (format,
//! loop-mount, unmount) is `vessel_runtime::quota::image`.

use std::path::{Path, PathBuf};

use vessel_runtime::quota::image;

use crate::{Result, VesselError};

/// The size of the filesystem [`setup_quota`] makes unless told (sparse:
/// an upper bound of what all vessels of the mount root may hold at once).
pub const DEFAULT_QUOTA_FS_SIZE: u64 = 64 << 30;

/// What the mount root held that may go when a filesystem is mounted over
/// it: the layer cache and run files, all of which storage gives again.
const DISPOSABLE: &[&str] = &["layers", "vessels", "runtime", "locks"];

/// Options of [`setup_quota`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct QuotaSetup {
    /// Bytes of the filesystem (default [`DEFAULT_QUOTA_FS_SIZE`]).
    pub size: u64,
    /// Its image file (default: `<mount root>.btrfs` beside the mount root).
    pub image: Option<PathBuf>,
}

impl Default for QuotaSetup {
    fn default() -> Self {
        Self { size: DEFAULT_QUOTA_FS_SIZE, image: None }
    }
}

impl QuotaSetup {
    /// The defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes of the filesystem.
    pub fn size(mut self, bytes: u64) -> Self {
        self.size = bytes;
        self
    }

    /// Where its image file is.
    pub fn image(mut self, path: impl Into<PathBuf>) -> Self {
        self.image = Some(path.into());
        self
    }
}

/// What [`setup_quota`] found or did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum QuotaSetupOutcome {
    /// The mount root could already enforce quotas: nothing was changed.
    AlreadyEnforced,
    /// An existing image file was mounted again (after a reboot, say).
    Remounted,
    /// A new image was made and mounted.
    Created,
}

/// The result of [`setup_quota`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaSetupReport {
    /// The mount root.
    pub mount_root: PathBuf,
    /// The image file (`None` when the mount root enforced quotas already
    /// and no image of vessel's is mounted there).
    pub image: Option<PathBuf>,
    /// What happened.
    pub outcome: QuotaSetupOutcome,
}

impl QuotaSetupReport {
    /// The `/etc/fstab` line that mounts it again at boot (quotas stay on:
    /// btrfs keeps that in the filesystem).
    pub fn fstab_line(&self) -> Option<String> {
        let image = self.image.as_ref()?;
        Some(format!("{} {} btrfs loop,discard 0 0", fstab_escape(image), fstab_escape(&self.mount_root)))
    }
}

/// fstab's octal escapes for the characters that would split a field.
fn fstab_escape(p: &Path) -> String {
    let s = p.to_string_lossy();
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            ' ' => out.push_str("\\040"),
            '\t' => out.push_str("\\011"),
            '\n' => out.push_str("\\012"),
            '\\' => out.push_str("\\134"),
            c => out.push(c),
        }
    }
    out
}

fn setup_error(root: &Path, reason: impl Into<String>) -> VesselError {
    VesselError::QuotaSetup { path: root.to_owned(), reason: reason.into(), source: None }
}

/// A failed mechanism step: what was done, and the tool's or OS's error.
fn step_error(root: &Path, what: &str) -> impl FnOnce(std::io::Error) -> VesselError {
    let (path, reason) = (root.to_owned(), what.to_owned());
    move |e| VesselError::QuotaSetup { path, reason, source: Some(e) }
}

/// The default image file of `mount_root`: `<mount root>.btrfs` beside it.
pub fn default_quota_image(mount_root: &Path) -> PathBuf {
    let mut name = mount_root.file_name().map(|n| n.to_os_string()).unwrap_or_else(|| "vessel-mounts".into());
    name.push(".btrfs");
    mount_root.with_file_name(name)
}

/// Whether `path` is itself a mount point, and of which filesystem type.
fn mount_at(path: &Path) -> Option<String> {
    let info = procfs::process::Process::myself().and_then(|p| p.mountinfo()).ok()?;
    info.0.into_iter().rev().find(|m| m.mount_point == path).map(|m| m.fs_type)
}

/// Gives `mount_root` disk quotas: unless it can enforce them already, a
/// sparse btrfs image with quotas on (made once, at `setup.image`) is
/// loop-mounted on it. Idempotent: run again, it changes nothing; after a
/// reboot it mounts the same image again. Needs root (rootful mode).
///
/// The mount root must not be in use (no open vessel mounts under it); what
/// it held is a cache (layers, run files) that is removed first, because
/// the mount would hide it. Anything else in it is refused. The mount does
/// not survive a reboot by itself: add [`QuotaSetupReport::fstab_line`] to
/// `/etc/fstab`, or run this again at boot.
pub fn setup_quota(mount_root: &Path, setup: &QuotaSetup) -> Result<QuotaSetupReport> {
    let root = std::path::absolute(mount_root).map_err(VesselError::io("resolve", mount_root))?;
    if !nix::unistd::geteuid().is_root() || vessel_runtime::rootless::mode().is_rootless() {
        return Err(setup_error(&root, "mounting a filesystem needs root (rootless vessels have no disk quotas)"));
    }
    if setup.size < 1 << 30 {
        return Err(VesselError::InvalidInput(format!(
            "a quota filesystem of {} bytes is too small: at least 1 GiB",
            setup.size
        )));
    }
    let image = match &setup.image {
        Some(i) => std::path::absolute(i).map_err(VesselError::io("resolve", i))?,
        None => default_quota_image(&root),
    };
    if image.starts_with(&root) {
        return Err(VesselError::InvalidInput(format!(
            "the quota image {} cannot be inside the mount root it is mounted on",
            image.display()
        )));
    }
    if root.exists() && vessel_runtime::quota::probe(&root).is_ok() {
        let ours = mount_at(&root).is_some_and(|t| t == "btrfs") && image.exists();
        return Ok(QuotaSetupReport {
            mount_root: root,
            image: ours.then_some(image),
            outcome: QuotaSetupOutcome::AlreadyEnforced,
        });
    }
    if let Some(fs) = mount_at(&root) {
        return Err(setup_error(&root, format!("a {fs} filesystem without btrfs quotas is mounted there already")));
    }
    clear_cache(&root)?;
    let outcome = if image.exists() {
        QuotaSetupOutcome::Remounted
    } else {
        if let Some(dir) = image.parent() {
            std::fs::create_dir_all(dir).map_err(VesselError::io("create directory", dir))?;
        }
        image::create(&image, setup.size).map_err(step_error(&root, "make the image"))?;
        QuotaSetupOutcome::Created
    };
    let mounted = std::fs::create_dir_all(&root)
        .map_err(VesselError::io("create directory", &root))
        .and_then(|()| image::mount(&image, &root).map_err(step_error(&root, "mount the image")));
    let enabled = mounted.and_then(|()| {
        let checked = (|| {
            use std::os::unix::fs::PermissionsExt;
            // As Manager::new makes it: containers traverse it to their rootfs.
            std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o711))
                .map_err(VesselError::io("chmod", &root))?;
            // A real trial, as Manager::new will make.
            vessel_runtime::quota::probe(&root).map_err(|reason| setup_error(&root, reason))
        })();
        if checked.is_err() {
            let _ = image::unmount(&root);
        }
        checked
    });
    if let Err(e) = enabled {
        if outcome == QuotaSetupOutcome::Created {
            let _ = std::fs::remove_file(&image);
        }
        return Err(e);
    }
    Ok(QuotaSetupReport { mount_root: root, image: Some(image), outcome })
}

/// Removes what the mount root holds before a filesystem is mounted over
/// it: only vessel's own, rebuildable dirs, and only when no vessel is open.
fn clear_cache(root: &Path) -> Result<()> {
    let entries = match std::fs::read_dir(root) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        r => r.map_err(VesselError::io("read directory", root))?,
    };
    if !crate::host::mounts_under(root).is_empty() {
        return Err(setup_error(root, "vessels are open under it (close them, or stop what holds them, first)"));
    }
    let mut found = Vec::new();
    for e in entries {
        let e = e.map_err(VesselError::io("read directory", root))?;
        let name = e.file_name();
        if !DISPOSABLE.iter().any(|d| name == *d) {
            return Err(setup_error(
                root,
                format!("it holds {:?}, which is not vessel's: choose an empty or new mount root", name),
            ));
        }
        found.push(e.path());
    }
    for p in found {
        std::fs::remove_dir_all(&p).map_err(VesselError::io("remove", &p))?;
    }
    Ok(())
}

/// Undoes [`setup_quota`]: unmounts the mount root (refused while vessels
/// are open under it) and, with `delete_image`, deletes its image file.
/// A mount root without vessel's quota filesystem is left as it is.
pub fn remove_quota_setup(mount_root: &Path, image: Option<&Path>, delete_image: bool) -> Result<()> {
    let root = std::path::absolute(mount_root).map_err(VesselError::io("resolve", mount_root))?;
    let image = match image {
        Some(i) => std::path::absolute(i).map_err(VesselError::io("resolve", i))?,
        None => default_quota_image(&root),
    };
    if mount_at(&root).is_some_and(|t| t == "btrfs") {
        if crate::host::mounts_under(&root).len() > 1 {
            return Err(setup_error(&root, "vessels are open under it"));
        }
        image::unmount(&root).map_err(step_error(&root, "unmount"))?;
    }
    if delete_image {
        match std::fs::remove_file(&image) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(VesselError::io("remove", &image)(e)),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_beside_the_mount_root_and_fstab_escaped() {
        assert_eq!(default_quota_image(Path::new("/var/lib/vessel/mounts")), Path::new("/var/lib/vessel/mounts.btrfs"));
        let r = QuotaSetupReport {
            mount_root: "/a b/m".into(),
            image: Some("/a b/m.btrfs".into()),
            outcome: QuotaSetupOutcome::Created,
        };
        assert_eq!(r.fstab_line().unwrap(), "/a\\040b/m.btrfs /a\\040b/m btrfs loop,discard 0 0");
    }
}
