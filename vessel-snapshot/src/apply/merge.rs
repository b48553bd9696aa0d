//! Merging an unpacked overlay-form layer into an existing tree, as
//! overlay would show the two stacked: whiteouts delete, opaque dirs
//! replace, everything else is renamed into place.

use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use nix::fcntl::{OFlag, openat2, renameat};
use nix::sys::stat::{Mode, SFlag, futimens, mkdirat};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid};
use xattr::FileExt;

use super::{Existing, beneath, existing_at, proc_path, remove_at};
use crate::SnapshotError;

pub(super) fn merge_dir(src: &OwnedFd, dst: &OwnedFd, shown: &Path) -> Result<(), SnapshotError> {
    let src_file = File::from(src.try_clone().map_err(|e| SnapshotError::io("dup", shown)(e))?);
    let mut names: Vec<OsString> = Vec::new();
    for e in fs::read_dir(proc_path(&src_file, OsStr::new(""))).map_err(SnapshotError::io("read directory", shown))? {
        names.push(e.map_err(SnapshotError::io("read directory", shown))?.file_name());
    }
    names.sort_unstable_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    for name in names {
        let here = shown.join(&name);
        let meta = fs::symlink_metadata(proc_path(src, &name)).map_err(SnapshotError::io("stat", &here))?;
        let ft = meta.file_type();
        if ft.is_char_device() && meta.rdev() == 0 {
            remove_at(dst, &name).map_err(SnapshotError::io("remove", &here))?;
            continue;
        }
        if !ft.is_dir() {
            remove_at(dst, &name).map_err(SnapshotError::io("replace", &here))?;
            renameat(src, &*name, dst, &*name).map_err(|e| SnapshotError::io("move into", &here)(e.into()))?;
            continue;
        }
        let src_child = openat2(src, &*name, beneath(OFlag::O_RDONLY | OFlag::O_DIRECTORY))
            .map_err(|e| SnapshotError::io("open", &here)(e.into()))?;
        let opaque = File::from(src_child.try_clone().map_err(SnapshotError::io("dup", &here))?)
            .get_xattr(crate::opaque_xattr())
            .map_err(SnapshotError::io("read xattr of", &here))?
            .is_some_and(|v| v == b"y");
        match existing_at(dst, &name).map_err(SnapshotError::io("stat", &here))? {
            Existing::Node(SFlag::S_IFDIR) if opaque => {
                let old = openat2(dst, &*name, beneath(OFlag::O_RDONLY | OFlag::O_DIRECTORY))
                    .map_err(|e| SnapshotError::io("open", &here)(e.into()))?;
                clear_dir(&old, &here)?;
            }
            Existing::Node(SFlag::S_IFDIR) => {}
            Existing::Nothing => mkdirat(dst, &*name, Mode::from_bits_truncate(0o700))
                .map_err(|e| SnapshotError::io("create directory", &here)(e.into()))?,
            Existing::Node(_) | Existing::Whiteout => {
                remove_at(dst, &name).map_err(SnapshotError::io("replace", &here))?;
                mkdirat(dst, &*name, Mode::from_bits_truncate(0o700))
                    .map_err(|e| SnapshotError::io("create directory", &here)(e.into()))?;
            }
        }
        let dst_child = openat2(dst, &*name, beneath(OFlag::O_RDONLY | OFlag::O_DIRECTORY))
            .map_err(|e| SnapshotError::io("open", &here)(e.into()))?;
        merge_dir(&src_child, &dst_child, &here)?;
        copy_dir_metadata(&meta, &File::from(src_child), &File::from(dst_child), &here)?;
    }
    Ok(())
}

fn clear_dir(dir: &OwnedFd, shown: &Path) -> Result<(), SnapshotError> {
    for e in fs::read_dir(proc_path(dir, OsStr::new(""))).map_err(SnapshotError::io("read directory", shown))? {
        let name = e.map_err(SnapshotError::io("read directory", shown))?.file_name();
        remove_at(dir, &name).map_err(SnapshotError::io("remove", shown.join(&name)))?;
    }
    Ok(())
}

/// The layer's directory entry replaces the tree's: owner, mode, xattrs, mtime.
fn copy_dir_metadata(meta: &fs::Metadata, src: &File, dst: &File, shown: &Path) -> Result<(), SnapshotError> {
    nix::unistd::fchown(dst, Some(Uid::from_raw(meta.uid())), Some(Gid::from_raw(meta.gid())))
        .map_err(|e| SnapshotError::io("chown", shown)(e.into()))?;
    nix::sys::stat::fchmod(dst, Mode::from_bits_truncate(meta.mode() & 0o7777))
        .map_err(|e| SnapshotError::io("chmod", shown)(e.into()))?;
    let wanted: Vec<OsString> = src
        .list_xattr()
        .map_err(SnapshotError::io("list xattrs of", shown))?
        .filter(|n| n != crate::opaque_xattr())
        .collect();
    for old in dst.list_xattr().map_err(SnapshotError::io("list xattrs of", shown))? {
        if !wanted.contains(&old) {
            dst.remove_xattr(&old).map_err(SnapshotError::io("remove xattr of", shown))?;
        }
    }
    for n in &wanted {
        if let Some(v) = src.get_xattr(n).map_err(SnapshotError::io("read xattr of", shown))? {
            dst.set_xattr(n, &v).map_err(SnapshotError::io("set xattr on", shown))?;
        }
    }
    let t = TimeSpec::new(meta.mtime(), meta.mtime_nsec());
    futimens(dst, &t, &t).map_err(|e| SnapshotError::io("set times of", shown)(e.into()))
}
