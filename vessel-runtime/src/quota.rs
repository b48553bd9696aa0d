//! Disk quotas: the bound on what a vessel writes to the host's disk.
//!
//! The mechanism is btrfs quota groups. A vessel's overlay upper and work
//! dirs (and each throwaway upper of a non-persistent exec) live in a btrfs
//! subvolume of their own whose qgroup has a referenced-bytes limit; the
//! filesystem refuses a write past it with `EDQUOT`, whoever writes, without
//! any scanning or polling. A sealed upper moves into the layer cache with
//! its subvolume in one rename (a subvolume root may move anywhere on its
//! filesystem; other files may not cross subvolumes), so snapshots stay
//! O(change).
//!
//! Why not ext4/XFS project quotas (what docker's overlay2 `size=` uses):
//! they need `CONFIG_QFMT_V2`/`CONFIG_XFS_QUOTA`, which the kernels vessel
//! is built and tested on lack, and a loop-mounted filesystem per vessel
//! would make every snapshot copy its data out. [`probe`] says what a host
//! lacks.
//!
//! A process with `CAP_SYS_RESOURCE` may exceed some filesystems' quotas, and
//! overlayfs writes the upper with the credentials of whoever mounted it:
//! overlays are mounted with that capability dropped
//! ([`without_quota_override`]).
//!
//! No crate wraps the btrfs ioctls; they are the raw calls below.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// `struct btrfs_ioctl_vol_args`.
#[repr(C)]
struct VolArgs {
    fd: i64,
    name: [u8; 4088],
}

/// `struct btrfs_qgroup_limit`.
#[repr(C)]
#[derive(Default)]
struct QgroupLimit {
    flags: u64,
    max_rfer: u64,
    max_excl: u64,
    rsv_rfer: u64,
    rsv_excl: u64,
}

/// `struct btrfs_ioctl_qgroup_limit_args`.
#[repr(C)]
#[derive(Default)]
struct QgroupLimitArgs {
    qgroupid: u64,
    lim: QgroupLimit,
}

nix::ioctl_write_ptr!(
    /// `BTRFS_IOC_SUBVOL_CREATE`.
    btrfs_subvol_create,
    0x94,
    14,
    VolArgs
);
nix::ioctl_read!(
    /// `BTRFS_IOC_QGROUP_LIMIT`.
    btrfs_qgroup_limit,
    0x94,
    43,
    QgroupLimitArgs
);

const BTRFS_SUPER_MAGIC: i64 = 0x9123_683e;
const BTRFS_QGROUP_LIMIT_MAX_RFER: u64 = 1;

/// Whether `path` is on btrfs.
pub fn is_btrfs(path: &Path) -> io::Result<bool> {
    let st = nix::sys::statfs::statfs(path).map_err(io::Error::from)?;
    Ok(st.filesystem_type().0 as i64 == BTRFS_SUPER_MAGIC)
}

/// Creates `parent/name` as a btrfs subvolume (an empty directory, 0755,
/// owned by the caller's fs ids).
pub fn create_subvolume(parent: &Path, name: &OsStr) -> io::Result<()> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= 4088 || bytes.contains(&b'/') || bytes.contains(&0) {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    let dir = File::open(parent)?;
    let mut args = VolArgs { fd: 0, name: [0; 4088] };
    args.name[..bytes.len()].copy_from_slice(bytes);
    // SAFETY: the ioctl reads one `struct btrfs_ioctl_vol_args` from `args`.
    unsafe { btrfs_subvol_create(dir.as_raw_fd(), &args) }.map_err(io::Error::from)?;
    Ok(())
}

/// Sets the referenced-bytes limit of the subvolume `subvol` (0: none).
pub fn set_limit(subvol: &Path, bytes: u64) -> io::Result<()> {
    let f = File::open(subvol)?;
    let mut args = QgroupLimitArgs::default();
    args.lim.flags = BTRFS_QGROUP_LIMIT_MAX_RFER;
    args.lim.max_rfer = if bytes == 0 { u64::MAX } else { bytes };
    // SAFETY: the ioctl reads (and may write back) one
    // `struct btrfs_ioctl_qgroup_limit_args` at `args`.
    unsafe { btrfs_qgroup_limit(f.as_raw_fd(), &mut args) }.map_err(io::Error::from)?;
    Ok(())
}

/// Creates `parent/name` as a subvolume limited to `bytes`.
pub fn create_limited(parent: &Path, name: &OsStr, bytes: u64) -> io::Result<()> {
    create_subvolume(parent, name)?;
    let dir = parent.join(name);
    if let Err(e) = set_limit(&dir, bytes) {
        let _ = std::fs::remove_dir(&dir);
        return Err(e);
    }
    Ok(())
}

/// Runs `f` with `CAP_SYS_RESOURCE` out of this thread's effective set, so
/// what it mounts (overlayfs keeps its mounter's credentials) or writes
/// cannot exceed a quota.
pub fn without_quota_override<T>(f: impl FnOnce() -> T) -> T {
    use rustix::thread::{CapabilitySet, capabilities, set_capabilities};
    let saved = capabilities(None).ok();
    let dropped = match saved {
        Some(mut s) if s.effective.contains(CapabilitySet::SYS_RESOURCE) => {
            s.effective.remove(CapabilitySet::SYS_RESOURCE);
            set_capabilities(None, s).is_ok()
        }
        _ => false,
    };
    let out = f();
    if dropped && let Some(s) = saved {
        let _ = set_capabilities(None, s);
    }
    out
}

/// `Ok` when a write past a quota really is refused under `dir` (checked by
/// doing it, with `CAP_SYS_RESOURCE` dropped as for vessels' overlays), or
/// what the host lacks.
pub fn probe(dir: &Path) -> Result<(), String> {
    match is_btrfs(dir) {
        Ok(true) => {}
        Ok(false) => {
            return Err(format!(
                "{} is not on btrfs; disk quotas need btrfs with quotas enabled (`btrfs quota enable`)",
                dir.display()
            ));
        }
        Err(e) => return Err(format!("statfs {}: {e}", dir.display())),
    }
    let name = crate::idmap::probe_name();
    let probe = dir.join(&name);
    create_subvolume(dir, OsStr::new(&name))
        .map_err(|e| format!("create a btrfs subvolume in {}: {e}", dir.display()))?;
    let result = (|| {
        set_limit(&probe, 256 << 10).map_err(|e| {
            format!("btrfs quotas are off on {} ({e}); turn them on with `btrfs quota enable`", dir.display())
        })?;
        let wrote = without_quota_override(|| -> io::Result<()> {
            use std::io::Write;
            let mut f = File::create(probe.join("fill"))?;
            for _ in 0..32 {
                f.write_all(&[7u8; 64 << 10])?;
            }
            f.sync_all()
        });
        match wrote {
            Err(e) if e.raw_os_error() == Some(nix::libc::EDQUOT) => Ok(()),
            Err(e) => Err(format!("a write past the quota failed otherwise: {e}")),
            Ok(()) => Err("a write past the quota was not refused".into()),
        }
    })();
    let _ = std::fs::remove_dir_all(&probe);
    result
}

/// A quota filesystem in a file, for hosts whose disk cannot enforce
/// quotas (see `vessel::setup_quota`): a sparse image formatted btrfs and
/// loop-mounted with quotas on. Through the system's tools (`mkfs.btrfs`
/// and `btrfs` from btrfs-progs, `mount`/`umount` from util-linux):
/// formatting has no maintained crate, and `mount -o loop` allocates the
/// loop device and sets it to auto-clear, so unmounting frees it.
pub mod image {
    use std::io;
    use std::path::Path;
    use std::process::Command;

    /// Runs a system tool; its stderr becomes the error when it fails.
    fn tool(cmd: &mut Command) -> io::Result<()> {
        let name = cmd.get_program().to_string_lossy().into_owned();
        let out = cmd.output().map_err(|e| {
            let hint = if e.kind() == io::ErrorKind::NotFound { " (Debian: btrfs-progs, util-linux)" } else { "" };
            io::Error::new(e.kind(), format!("cannot run {name}{hint}: {e}"))
        })?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            return Err(io::Error::other(format!("{name} failed ({}): {}", out.status, err.trim())));
        }
        Ok(())
    }

    /// Makes `image`, `size` bytes, sparse and 0600, formatted btrfs; on
    /// failure nothing is left. An existing file is refused.
    pub fn create(image: &Path, size: u64) -> io::Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        let made = (|| {
            let f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(image)?;
            f.set_len(size)?;
            drop(f);
            tool(Command::new("mkfs.btrfs").arg("-q").arg(image))
        })();
        if made.is_err() && image.exists() {
            let _ = std::fs::remove_file(image);
        }
        made
    }

    /// Loop-mounts `image` on `dir` (with `discard`: what is deleted goes
    /// back to the host disk) and turns btrfs quotas on; unmounted again
    /// if that fails.
    pub fn mount(image: &Path, dir: &Path) -> io::Result<()> {
        tool(Command::new("mount").args(["-t", "btrfs", "-o", "loop,discard"]).arg(image).arg(dir))?;
        if let Err(e) = tool(Command::new("btrfs").args(["quota", "enable"]).arg(dir)) {
            let _ = unmount(dir);
            return Err(e);
        }
        Ok(())
    }

    /// Unmounts `dir` (its loop device is freed with it).
    pub fn unmount(dir: &Path) -> io::Result<()> {
        tool(Command::new("umount").arg(dir))
    }
}
