//! Layer tar -> directory, safely.
//!
//! Every apply first unpacks the layer into a fresh directory next to the
//! target, in overlay form (whiteouts as 0/0 character devices, opaque
//! directories as `trusted.overlay.opaque=y`), checking the digest as it
//! reads. Only a layer that unpacked completely and hashed right goes further:
//! - [`ApplyMode::Overlay`]: the directory is renamed to the target, ready to
//!   be an overlay lower;
//! - [`ApplyMode::Merged`]: the directory is merged into the existing target
//!   (whiteouts delete, opaque dirs replace, everything else is renamed
//!   into place), then removed.
//!
//! So a corrupt, truncated or hostile layer changes nothing at the target.
//!
//! The tar is read by [`crate::tar_reader`], which frames it as GNU tar, Go
//! and Python do and refuses what they would read differently.
//!
//! Confinement: every path is resolved relative to a directory fd with
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)`,
//! and every final component is created or replaced with `*at` calls that do
//! not follow symlinks. Refused with [`SnapshotError::UnsafeEntry`]: an entry
//! with `..`, an absolute path, a path through a symlink (one planted earlier
//! in the archive included), a hardlink to outside the layer, to a symlink or
//! to a directory, an overlay-internal xattr, (unless allowed) a device node,
//! a 0/0 device, a path that appears twice with different types (GNU tar,
//! containerd and Python resolve that three ways), a root entry that is not a
//! directory, an opaque marker at the root, a reserved `.wh..wh.` name, a
//! whiteout with data, a name over 255 or a path over 4095 bytes.
//!
//! Sparse entries are written as sparse files: only their data segments.

mod merge;
mod unpack;

use std::ffi::{OsStr, OsString};
use std::fs;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{Mode, SFlag};
use nix::unistd::{UnlinkatFlags, unlinkat};
use sha2::{Digest, Sha256};

use crate::SnapshotError;
use crate::diff::DiffStats;

/// Whether a layer's xattr `name` is overlay bookkeeping, which a layer
/// may never set: `trusted.overlay.*` (on vessel's rootful mounts; host
/// root's alone). `user.overlay.*` is ordinary data (see `diff`).
pub(crate) fn is_overlay_xattr(name: &str) -> bool {
    name.starts_with("trusted.overlay.")
}

/// The name a layer's xattr `name` has on disk. Rootless, overlay keeps
/// its bookkeeping in `user.overlay.*`, so a layer's own `user.overlay.X`
/// is stored escaped, as overlay itself stores what is set through it
/// (`user.overlay.overlay.X`, Linux 6.7), and overlay shows it unescaped.
pub(crate) fn on_disk_xattr(name: &str) -> std::borrow::Cow<'_, str> {
    let prefix = crate::overlay_xattr_prefix();
    match name.strip_prefix(prefix) {
        Some(rest) if prefix.starts_with("user.") => format!("{prefix}overlay.{rest}").into(),
        _ => name.into(),
    }
}

/// What to make of a layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ApplyMode {
    /// Unpack into a new directory (the target must not exist) usable as an
    /// overlay lower: whiteouts stay as 0/0 character devices and opaque
    /// directories carry `trusted.overlay.opaque=y`.
    Overlay,
    /// Apply onto an existing tree, as if the layer were mounted over it:
    /// whited-out paths are removed and opaque directories replaced.
    Merged,
}

/// What one layer may expand to. A compressed layer is small and may
/// decompress to anything (zstd turns 100 KiB into 100 GiB of zeros), so
/// every apply counts as it reads and stops at the first bound passed,
/// with [`SnapshotError::TooLarge`], leaving nothing behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerBounds {
    /// Bytes of the uncompressed tar (headers, data and padding): what the
    /// layer may write, at most.
    pub max_bytes: u64,
    /// Entries (files, directories, links, whiteouts).
    pub max_entries: u64,
    /// Directory levels of a path.
    pub max_depth: usize,
}

impl LayerBounds {
    /// 64 GiB, 4 Mi entries, 256 levels: beyond any image or workspace
    /// layer seen in practice, far below what would take a host down.
    pub const DEFAULT: Self = Self { max_bytes: 64 << 30, max_entries: 4 << 20, max_depth: 256 };
}

impl Default for LayerBounds {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// How to apply a layer.
#[derive(Debug, Clone)]
pub struct ApplyOptions {
    /// Overlay form or merged into the target.
    pub mode: ApplyMode,
    /// `sha256:<hex>` the uncompressed tar must hash to (its OCI diff id).
    pub expected_digest: Option<String>,
    /// Whether character and block device entries may be created.
    pub allow_devices: bool,
    /// Overlay form: whether the layer is on the disk (one `syncfs`) before
    /// it appears at the target. A caller that can tell a torn layer after
    /// a crash (the layer cache, by boot id) turns this off.
    pub durable: bool,
    /// What the layer may expand to.
    pub bounds: LayerBounds,
}

impl ApplyOptions {
    /// Options for `mode`, no digest check, no devices.
    pub fn new(mode: ApplyMode) -> Self {
        Self { mode, expected_digest: None, allow_devices: false, durable: true, bounds: LayerBounds::DEFAULT }
    }

    /// Requires the uncompressed tar to hash to `digest`.
    pub fn expect_digest(mut self, digest: impl Into<String>) -> Self {
        self.expected_digest = Some(digest.into());
        self
    }

    /// Allows device nodes (image layers may carry `/dev` entries).
    pub fn allow_devices(mut self, allow: bool) -> Self {
        self.allow_devices = allow;
        self
    }

    /// Bounds what the layer may expand to (default [`LayerBounds::DEFAULT`]).
    pub fn bounds(mut self, bounds: LayerBounds) -> Self {
        self.bounds = bounds;
        self
    }

    /// Whether an overlay-form layer is synced to disk before it appears (default: yes).
    pub fn durable(mut self, durable: bool) -> Self {
        self.durable = durable;
        self
    }
}

/// Applies the layer read from `layer` (plain, gzip or zstd, told apart by
/// magic bytes) to `target`; returns the digest and size of the uncompressed
/// tar. On any error the target is left as it was.
pub fn apply_layer(layer: impl Read + Send, target: &Path, opts: &ApplyOptions) -> Result<DiffStats, SnapshotError> {
    let parent = target.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = target.file_name().ok_or_else(|| SnapshotError::BadTarget(target.to_path_buf()))?;
    match opts.mode {
        ApplyMode::Overlay if target.symlink_metadata().is_ok() => {
            return Err(SnapshotError::io("create", target)(io::Error::from(io::ErrorKind::AlreadyExists)));
        }
        ApplyMode::Merged if !target.is_dir() => {
            return Err(SnapshotError::io("open", target)(io::Error::from(io::ErrorKind::NotFound)));
        }
        _ => {}
    }
    let scratch = scratch_dir(parent, name)?;
    let stats = unpack::unpack(layer, scratch.path(), opts)?;
    match opts.mode {
        ApplyMode::Overlay => {
            // Durable before it is visible: the layer's data and metadata
            // reach the disk (one syncfs, not an fsync per file), then the
            // rename, then the directory that holds it. A crash can never
            // leave a complete-looking but half-written layer to be trusted.
            if opts.durable {
                let dir = open_dir(scratch.path())?;
                nix::unistd::syncfs(&dir).map_err(|e| SnapshotError::io("sync", scratch.path())(e.into()))?;
            }
            fs::rename(scratch.path(), target).map_err(SnapshotError::io("rename into", target))?;
            let _moved = scratch.keep();
            if opts.durable {
                let parent_dir = open_dir(parent)?;
                nix::unistd::fsync(&parent_dir).map_err(|e| SnapshotError::io("sync", parent)(e.into()))?;
            }
        }
        ApplyMode::Merged => {
            let src = open_dir(scratch.path())?;
            let dst = open_dir(target)?;
            merge::merge_dir(&src, &dst, target)?;
        }
    }
    Ok(stats)
}

/// A scratch directory beside the target (`.NAME.apply-*`, the name the
/// cache's startup sweep knows), removed on drop unless kept.
fn scratch_dir(parent: &Path, name: &OsStr) -> Result<tempfile::TempDir, SnapshotError> {
    let mut prefix = OsString::from(".");
    prefix.push(name);
    prefix.push(".apply-");
    let dir = tempfile::Builder::new()
        .prefix(&prefix)
        .tempdir_in(parent)
        .map_err(SnapshotError::io("create directory", parent))?;
    // tempfile makes it 0700; a layer without a root entry keeps the mode
    // `mkdir` would give it, so non-root users in a container can traverse `/`.
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755))
        .map_err(SnapshotError::io("chmod", dir.path()))?;
    Ok(dir)
}

fn open_dir(path: &Path) -> Result<OwnedFd, SnapshotError> {
    nix::fcntl::open(path, OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC, Mode::empty())
        .map_err(|e| SnapshotError::io("open directory", path)(e.into()))
}

/// Hashes and counts what is read through it.
struct DigestReader<R> {
    inner: R,
    hasher: Sha256,
    size: u64,
}

impl<R: Read> Read for DigestReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }
}

pub(crate) fn unsafe_entry(entry: &[u8], reason: &'static str) -> SnapshotError {
    SnapshotError::UnsafeEntry { entry: String::from_utf8_lossy(entry).into_owned(), reason }
}

/// Splits an archive path into its components, refusing what could leave the root.
pub(crate) fn components(raw: &[u8]) -> Result<Vec<&OsStr>, SnapshotError> {
    if raw.starts_with(b"/") {
        return Err(unsafe_entry(raw, "absolute path"));
    }
    let mut out = Vec::new();
    for c in raw.split(|b| *b == b'/') {
        match c {
            b"" | b"." => continue,
            b".." => return Err(unsafe_entry(raw, "path contains '..'")),
            c => out.push(OsStr::from_bytes(c)),
        }
    }
    Ok(out)
}

fn beneath(flags: OFlag) -> OpenHow {
    OpenHow::new().flags(flags | OFlag::O_CLOEXEC).resolve(
        ResolveFlag::RESOLVE_BENEATH
            | ResolveFlag::RESOLVE_NO_SYMLINKS
            | ResolveFlag::RESOLVE_NO_MAGICLINKS
            | ResolveFlag::RESOLVE_NO_XDEV,
    )
}

/// `/proc/self/fd/N/name`: for the few calls that have no `*at` form
/// (`lsetxattr`, recursive removal). The fd pins the directory; the final
/// component is never followed by those calls.
fn proc_path(dir: &impl AsRawFd, name: &OsStr) -> PathBuf {
    let mut p = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()));
    p.push(name);
    p
}

/// Removes `name` in `dir`, recursively if it is a directory; absent is fine.
fn remove_at(dir: &OwnedFd, name: &OsStr) -> io::Result<()> {
    match unlinkat(dir, name, UnlinkatFlags::NoRemoveDir) {
        Ok(()) | Err(Errno::ENOENT) => Ok(()),
        Err(Errno::EISDIR) => fs::remove_dir_all(proc_path(dir, name)),
        Err(e) => Err(e.into()),
    }
}

/// What is at a name already (in this layer: the scratch dir starts empty).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Existing {
    Nothing,
    /// A whiteout of this layer: an entry of the same layer replaces it.
    Whiteout,
    Node(SFlag),
}

pub(super) fn existing_at(dir: &OwnedFd, name: &OsStr) -> io::Result<Existing> {
    match nix::sys::stat::fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => {
            let fmt = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
            Ok(if fmt == SFlag::S_IFCHR && st.st_rdev == 0 { Existing::Whiteout } else { Existing::Node(fmt) })
        }
        Err(Errno::ENOENT) => Ok(Existing::Nothing),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn components_refuse_escapes() {
        assert!(components(b"/etc/passwd").is_err());
        assert!(components(b"a/../../x").is_err());
        assert!(components(b"..").is_err());
        let c = components(b"./a//b/./c/").unwrap();
        assert_eq!(c, [OsStr::new("a"), OsStr::new("b"), OsStr::new("c")]);
        assert!(components(b"./").unwrap().is_empty());
    }
}
