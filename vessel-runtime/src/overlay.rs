//! Mounting a vessel's overlay rootfs.
//!
//! Options are fixed to what the snapshot engine can express: no
//! `redirect_dir`, no `metacopy` (an upper dir using them is not a plain
//! layer diff), no `index`. Lower dirs are passed as `/proc/self/fd/N` of
//! dirs held open for the mount call, so even 100+ deep lower lists fit the
//! kernel's 4 KiB limit on mount options, whatever the paths' lengths.
//!
//! [`OverlayMount::mount_idmapped`] mounts the same overlay over idmapped
//! layers for a user namespace (see [`crate::idmap`]), through the new mount
//! API (`fsopen`, one `lowerdir+` per layer, `fsmount`, `move_mount`).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};

use crate::RuntimeError;

/// The kernel's maximum overlay stack depth (`OVL_MAX_STACK`).
pub const MAX_LOWERS: usize = 500;

/// The options every vessel overlay has. In rootless mode overlay keeps its
/// bookkeeping in `user.overlay.*` (`userxattr`: `trusted.*` needs host
/// privilege), where `redirect_dir=off` is refused; `nofollow` neither
/// makes nor follows redirects either.
fn fixed_options() -> Vec<(&'static str, &'static str)> {
    let redirect = if crate::rootless::in_user_namespace() { "nofollow" } else { "off" };
    let mut v = vec![("redirect_dir", redirect), ("metacopy", "off"), ("index", "off")];
    if crate::rootless::in_user_namespace() {
        v.insert(0, ("userxattr", ""));
    }
    v
}

/// Refuses an empty lower list or one deeper than the kernel stacks.
fn check_lowers(lowers: &[&Path]) -> Result<(), RuntimeError> {
    if lowers.is_empty() || lowers.len() > MAX_LOWERS {
        return Err(RuntimeError::InvalidRequest(format!("{} lower dirs (1 to {MAX_LOWERS} allowed)", lowers.len())));
    }
    Ok(())
}

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
        check_lowers(lowers)?;
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
        for (k, v) in fixed_options() {
            opts.push_str(&format!(",{k}{}{v}", if v.is_empty() { "" } else { "=" }));
        }
        let flags = if upper.is_some() { MsFlags::empty() } else { MsFlags::MS_RDONLY };
        // overlayfs writes the upper with its mounter's credentials: without
        // CAP_SYS_RESOURCE, or writes through it would ignore disk quotas.
        crate::quota::without_quota_override(|| {
            mount(Some("overlay"), target, Some("overlay"), flags, Some(opts.as_str()))
        })
        .map_err(|e| RuntimeError::io("mount overlay at", target)(e.into()))?;
        Ok(Self { target: target.to_path_buf(), mounted: true })
    }

    /// Mounts `lowers` (topmost first) over `ovl/upper` with `ovl/work` at
    /// `target`, every layer and `ovl` idmapped through `userns`: files that
    /// are uid/gid N on disk are the mapping's host id N through the mount
    /// (the container's N). The mount is made with the mapped root's fs ids,
    /// as overlayfs needs for its own work files on an idmapped upper.
    pub fn mount_idmapped(
        target: &Path,
        lowers: &[&Path],
        ovl: &Path,
        userns: &crate::idmap::UserNamespace,
    ) -> Result<Self, RuntimeError> {
        use rustix::mount::{
            FsMountFlags, FsOpenFlags, MountAttrFlags, MoveMountFlags, fsconfig_create, fsconfig_set_flag,
            fsconfig_set_string, fsmount, fsopen, move_mount,
        };
        check_lowers(lowers)?;
        let held: Vec<_> = lowers.iter().map(|l| userns.idmapped_clone(l)).collect::<Result<_, _>>()?;
        let ovl_fd = userns.idmapped_clone(ovl)?;
        let root = userns.mapping().host_id;
        let fs = fsopen("overlay", FsOpenFlags::FSOPEN_CLOEXEC)
            .map_err(|e| RuntimeError::io("fsopen overlay for", target)(e.into()))?;
        // The kernel explains a failed fsconfig in messages read from the fs fd.
        let fail = |what: &'static str, e: rustix::io::Errno| {
            let mut log = String::new();
            let mut buf = [0u8; 512];
            while let Ok(n) = rustix::io::read(&fs, &mut buf) {
                if n == 0 {
                    break;
                }
                log.push_str(String::from_utf8_lossy(&buf[..n]).trim_end());
                log.push_str("; ");
            }
            let err = std::io::Error::from(e);
            let err = if log.is_empty() { err } else { std::io::Error::new(err.kind(), format!("{err} ({log})")) };
            RuntimeError::io(what, target)(err)
        };
        for l in &held {
            fsconfig_set_string(&fs, "lowerdir+", crate::idmap::fd_path(l))
                .map_err(|e| fail("add overlay lower at", e))?;
        }
        let base = crate::idmap::fd_path(&ovl_fd);
        fsconfig_set_string(&fs, "upperdir", format!("{base}/upper")).map_err(|e| fail("set overlay upper at", e))?;
        fsconfig_set_string(&fs, "workdir", format!("{base}/work")).map_err(|e| fail("set overlay work at", e))?;
        for (k, v) in fixed_options() {
            let set = if v.is_empty() { fsconfig_set_flag(&fs, k) } else { fsconfig_set_string(&fs, k, v) };
            set.map_err(|e| fail("set overlay option at", e))?;
        }
        // Creation is where overlayfs takes its mounter's credentials.
        // Without CAP_SYS_RESOURCE, as in `mount`: quotas hold.
        crate::quota::without_quota_override(|| crate::idmap::as_host_ids(root, root, || fsconfig_create(&fs)))
            .map_err(|e| fail("create overlay at", e))?;
        let mnt = fsmount(&fs, FsMountFlags::FSMOUNT_CLOEXEC, MountAttrFlags::empty())
            .map_err(|e| fail("fsmount overlay at", e))?;
        move_mount(&mnt, "", rustix::fs::CWD, target, MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH)
            .map_err(|e| RuntimeError::io("move overlay mount to", target)(e.into()))?;
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
