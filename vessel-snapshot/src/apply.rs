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

use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt as _, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, OpenHow, ResolveFlag, openat, openat2, renameat};
use nix::sys::stat::{FchmodatFlags, Mode, SFlag, UtimensatFlags, fchmodat, futimens, mkdirat, mknodat, utimensat};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid, UnlinkatFlags, fchownat, linkat, symlinkat, unlinkat};
use sha2::{Digest, Sha256};
use xattr::FileExt;

use crate::SnapshotError;
use crate::codec::decompressed;
use crate::diff::{DiffStats, OPAQUE_MARKER, WHITEOUT_PREFIX};
use crate::tar_reader::{self, Entry, Kind};

const OPAQUE_XATTR: &str = "trusted.overlay.opaque";
/// Overlay's bookkeeping namespace on vessel's mounts; a layer may never
/// set it (`user.overlay.*` is ordinary data there, see `diff`).
const OVERLAY_XATTR_PREFIX: &str = "trusted.overlay.";

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

/// How to apply a layer.
#[derive(Debug, Clone)]
pub struct ApplyOptions {
    /// Overlay form or merged into the target.
    pub mode: ApplyMode,
    /// `sha256:<hex>` the uncompressed tar must hash to (its OCI diff id).
    pub expected_digest: Option<String>,
    /// Whether character and block device entries may be created.
    pub allow_devices: bool,
}

impl ApplyOptions {
    /// Options for `mode`, no digest check, no devices.
    pub fn new(mode: ApplyMode) -> Self {
        Self { mode, expected_digest: None, allow_devices: false }
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
}

/// Applies the layer read from `layer` (plain, gzip or zstd, told apart by
/// magic bytes) to `target`; returns the digest and size of the uncompressed
/// tar. On any error the target is left as it was.
pub fn apply_layer(layer: impl Read + Send, target: &Path, opts: &ApplyOptions) -> Result<DiffStats, SnapshotError> {
    let parent = target.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name =
        target.file_name().ok_or_else(|| SnapshotError::Malformed(format!("bad target {}", target.display())))?;
    match opts.mode {
        ApplyMode::Overlay if target.symlink_metadata().is_ok() => {
            return Err(SnapshotError::io("create", target)(io::Error::from(io::ErrorKind::AlreadyExists)));
        }
        ApplyMode::Merged if !target.is_dir() => {
            return Err(SnapshotError::io("open", target)(io::Error::from(io::ErrorKind::NotFound)));
        }
        _ => {}
    }
    let scratch = ScratchDir::new(parent, name)?;
    let stats = unpack(layer, &scratch.path, opts)?;
    match opts.mode {
        ApplyMode::Overlay => {
            // Durable before it is visible: the layer's data and metadata
            // reach the disk (one syncfs, not an fsync per file), then the
            // rename, then the directory that holds it. A crash can never
            // leave a complete-looking but half-written layer to be trusted.
            let dir = open_dir(&scratch.path)?;
            nix::unistd::syncfs(&dir).map_err(|e| SnapshotError::io("sync", &scratch.path)(e.into()))?;
            fs::rename(&scratch.path, target).map_err(SnapshotError::io("rename into", target))?;
            scratch.disarm();
            let parent_dir = open_dir(parent)?;
            nix::unistd::fsync(&parent_dir).map_err(|e| SnapshotError::io("sync", parent)(e.into()))?;
        }
        ApplyMode::Merged => {
            let src = open_dir(&scratch.path)?;
            let dst = open_dir(target)?;
            merge_dir(&src, &dst, target)?;
        }
    }
    Ok(stats)
}

/// A directory beside the target, removed on drop unless disarmed.
struct ScratchDir {
    path: PathBuf,
    armed: bool,
}

impl ScratchDir {
    fn new(parent: &Path, name: &OsStr) -> Result<Self, SnapshotError> {
        let mut n = OsString::from(".");
        n.push(name);
        n.push(format!(".apply-{:016x}", rand::random::<u64>()));
        let path = parent.join(n);
        fs::create_dir(&path).map_err(SnapshotError::io("create directory", &path))?;
        Ok(Self { path, armed: true })
    }

    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if self.armed
            && let Err(e) = fs::remove_dir_all(&self.path)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(path = %self.path.display(), error = %e, "could not remove scratch directory");
        }
    }
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

struct Unpacker<'a> {
    root: OwnedFd,
    root_path: &'a Path,
    opts: &'a ApplyOptions,
    /// Directories whose mtime is set once everything inside them is written.
    dir_times: Vec<(Vec<OsString>, TimeSpec)>,
    buf: Vec<u8>,
}

/// Chunks in flight between the decoding thread and the unpacker.
const PIPE_DEPTH: usize = 8;
const PIPE_CHUNK: usize = 256 * 1024;

/// Reads what the decoding thread sends; an error it sends is returned as is.
struct ChannelReader {
    rx: std::sync::mpsc::Receiver<io::Result<Vec<u8>>>,
    cur: Vec<u8>,
    pos: usize,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.cur.len() {
            match self.rx.recv() {
                Ok(chunk) => {
                    self.cur = chunk?;
                    self.pos = 0;
                }
                Err(_) => return Ok(0), // the producer finished
            }
        }
        let n = buf.len().min(self.cur.len() - self.pos);
        buf[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Decompresses and hashes `layer` on one thread while the calling thread
/// unpacks, as `zstd -d | tar -x` uses two cores.
fn unpack(layer: impl Read + Send, root_path: &Path, opts: &ApplyOptions) -> Result<DiffStats, SnapshotError> {
    std::thread::scope(|scope| {
        let (tx, rx) = std::sync::mpsc::sync_channel::<io::Result<Vec<u8>>>(PIPE_DEPTH);
        let producer = scope.spawn(move || -> Result<(String, u64), SnapshotError> {
            let mut input = DigestReader { inner: decompressed(layer)?, hasher: Sha256::new(), size: 0 };
            loop {
                let mut chunk = vec![0u8; PIPE_CHUNK];
                match input.read(&mut chunk) {
                    Ok(0) => break,
                    Ok(n) => {
                        chunk.truncate(n);
                        if tx.send(Ok(chunk)).is_err() {
                            break; // the unpacker gave up; its error is the one reported
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        let _ = tx.send(Err(io::Error::new(e.kind(), e.to_string())));
                        return Err(SnapshotError::Stream("layer", e));
                    }
                }
            }
            Ok((format!("sha256:{:x}", input.hasher.finalize()), input.size))
        });
        let reader = ChannelReader { rx, cur: Vec::new(), pos: 0 };
        let unpacked = unpack_stream(reader, root_path, opts);
        let produced = producer.join().map_err(|_| SnapshotError::Malformed("layer decoder panicked".into()))?;
        let entries = unpacked?;
        let (digest, size) = produced?;
        if let Some(expected) = &opts.expected_digest
            && *expected != digest
        {
            return Err(SnapshotError::DigestMismatch { expected: expected.clone(), actual: digest });
        }
        Ok(DiffStats { digest, size, entries })
    })
}

/// Unpacks the uncompressed tar read from `reader`; returns the entry count.
fn unpack_stream(reader: ChannelReader, root_path: &Path, opts: &ApplyOptions) -> Result<u64, SnapshotError> {
    let mut archive = tar_reader::Reader::new(reader);
    let mut u =
        Unpacker { root: open_dir(root_path)?, root_path, opts, dir_times: Vec::new(), buf: vec![0; 256 * 1024] };
    let mut entries = 0u64;
    while let Some(entry) = archive.next_entry()? {
        u.entry(&mut archive, entry)?;
        entries += 1;
    }
    // Read to the end so the digest covers the end-of-archive blocks and padding.
    let mut reader = archive.into_inner();
    io::copy(&mut reader, &mut io::sink()).map_err(|e| SnapshotError::Stream("layer", e))?;
    u.finish_dirs()?;
    Ok(entries)
}

/// Linux's `NAME_MAX` and `PATH_MAX`: longer names no tool can reach.
const NAME_MAX: usize = 255;
const PATH_MAX: usize = 4096;

/// What is at a name already (in this layer: the scratch dir starts empty).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Existing {
    Nothing,
    /// A whiteout of this layer: an entry of the same layer replaces it.
    Whiteout,
    Node(SFlag),
}

fn existing_at(dir: &OwnedFd, name: &OsStr) -> io::Result<Existing> {
    match nix::sys::stat::fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => {
            let fmt = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
            Ok(if fmt == SFlag::S_IFCHR && st.st_rdev == 0 { Existing::Whiteout } else { Existing::Node(fmt) })
        }
        Err(Errno::ENOENT) => Ok(Existing::Nothing),
        Err(e) => Err(e.into()),
    }
}

fn file_type(kind: Kind) -> SFlag {
    match kind {
        Kind::Regular | Kind::Link => SFlag::S_IFREG,
        Kind::Symlink => SFlag::S_IFLNK,
        Kind::Char => SFlag::S_IFCHR,
        Kind::Block => SFlag::S_IFBLK,
        Kind::Directory => SFlag::S_IFDIR,
        Kind::Fifo => SFlag::S_IFIFO,
    }
}

impl Unpacker<'_> {
    fn entry<R: Read>(&mut self, archive: &mut tar_reader::Reader<R>, e: Entry) -> Result<(), SnapshotError> {
        let raw = e.path.clone();
        if raw.len() >= PATH_MAX {
            return Err(unsafe_entry(&raw, "a path longer than 4095 bytes"));
        }
        let comps = components(&raw)?;
        if comps.iter().any(|c| c.len() > NAME_MAX) {
            return Err(unsafe_entry(&raw, "a path component longer than 255 bytes"));
        }
        let Some((&name, parents)) = comps.split_last() else {
            // "./": the root itself; its metadata stays the target's.
            if e.kind != Kind::Directory {
                return Err(unsafe_entry(&raw, "the root entry is not a directory"));
            }
            return Ok(());
        };
        for (x, _) in &e.xattrs {
            if x.starts_with(OVERLAY_XATTR_PREFIX) {
                return Err(unsafe_entry(&raw, "sets an overlay-internal xattr"));
            }
        }
        let mtime = TimeSpec::new(e.mtime.0, e.mtime.1);
        let name_bytes = name.as_bytes();

        if let Some(hidden) = name_bytes.strip_prefix(WHITEOUT_PREFIX.as_bytes()) {
            if e.kind != Kind::Regular || e.size != 0 {
                return Err(unsafe_entry(&raw, "a whiteout that is not an empty file"));
            }
            if name_bytes == OPAQUE_MARKER.as_bytes() {
                if parents.is_empty() {
                    // No differ marks the root opaque; it would hide the whole image.
                    return Err(unsafe_entry(&raw, "an opaque marker at the root"));
                }
                let dir = self.parent(&raw, parents)?;
                let fd = openat2(&dir, ".", beneath(OFlag::O_RDONLY | OFlag::O_DIRECTORY))
                    .map_err(|e| self.err("open", parents, e))?;
                File::from(fd).set_xattr(OPAQUE_XATTR, b"y").map_err(|e| self.io("set opaque xattr on", parents, e))?;
                return Ok(());
            }
            let hidden = OsStr::from_bytes(hidden);
            if hidden.is_empty() || hidden == "." || hidden == ".." {
                return Err(unsafe_entry(&raw, "bad whiteout name"));
            }
            if hidden.as_bytes().starts_with(WHITEOUT_PREFIX.as_bytes()) {
                // `.wh..wh.*` is reserved (aufs' hardlink and metadata dirs).
                return Err(unsafe_entry(&raw, "a reserved whiteout name"));
            }
            let dir = self.parent(&raw, parents)?;
            // A whiteout hides lower layers only: an entry of this same layer wins.
            if existing_at(&dir, hidden).map_err(|e| self.io("stat", parents, e))? == Existing::Nothing {
                mknodat(&dir, hidden, SFlag::S_IFCHR, Mode::empty(), 0)
                    .map_err(|e| self.err("create whiteout", &comps, e))?;
            }
            return Ok(());
        }

        let dir = self.parent(&raw, parents)?;
        let mode = Mode::from_bits_truncate(e.mode);
        let (uid, gid) = (e.uid, e.gid);
        let existing = existing_at(&dir, name).map_err(|e| self.io("stat", &comps, e))?;
        if e.kind != Kind::Link
            && let Existing::Node(fmt) = existing
            && fmt != file_type(e.kind)
        {
            // GNU tar, containerd and Python resolve this differently (keep,
            // replace, replace recursively); no differ writes it.
            return Err(unsafe_entry(&raw, "the path appears twice with different types"));
        }

        match e.kind {
            Kind::Directory => {
                if existing != Existing::Node(SFlag::S_IFDIR) {
                    remove_at(&dir, name).map_err(|e| self.io("replace", &comps, e))?;
                    mkdirat(&dir, name, Mode::from_bits_truncate(0o700))
                        .map_err(|e| self.err("create directory", &comps, e))?;
                }
                let fd = openat2(&dir, name, beneath(OFlag::O_RDONLY | OFlag::O_DIRECTORY))
                    .map_err(|e| self.err("open", &comps, e))?;
                let f = File::from(fd);
                self.own(&f, uid, gid, mode, &e.xattrs, &comps)?;
                self.dir_times.push((comps.iter().map(|c| c.to_os_string()).collect(), mtime));
            }
            Kind::Regular => {
                remove_at(&dir, name).map_err(|e| self.io("replace", &comps, e))?;
                let fd = openat(
                    &dir,
                    name,
                    OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_WRONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                    Mode::from_bits_truncate(0o600),
                )
                .map_err(|e| self.err("create", &comps, e))?;
                let mut f = File::from(fd);
                match &e.sparse {
                    None => loop {
                        let n = archive.read_data(&mut self.buf)?;
                        if n == 0 {
                            break;
                        }
                        f.write_all(&self.buf[..n]).map_err(|e| self.io("write", &comps, e))?;
                    },
                    Some(map) => {
                        // Holes stay holes: only the stored segments are written.
                        f.set_len(e.size).map_err(|e| self.io("size", &comps, e))?;
                        for &(mut off, len) in map {
                            let mut left = len;
                            while left > 0 {
                                let want = self.buf.len().min(left as usize);
                                let n = archive.read_data(&mut self.buf[..want])?;
                                f.write_all_at(&self.buf[..n], off).map_err(|e| self.io("write", &comps, e))?;
                                off += n as u64;
                                left -= n as u64;
                            }
                        }
                    }
                }
                self.own(&f, uid, gid, mode, &e.xattrs, &comps)?;
                futimens(&f, &mtime, &mtime).map_err(|e| self.err("set times of", &comps, e))?;
            }
            Kind::Symlink => {
                remove_at(&dir, name).map_err(|e| self.io("replace", &comps, e))?;
                symlinkat(OsStr::from_bytes(&e.link), &dir, name).map_err(|e| self.err("create symlink", &comps, e))?;
                self.own_at(&dir, name, uid, gid, None, &e.xattrs, &comps)?;
                utimensat(&dir, name, &mtime, &mtime, UtimensatFlags::NoFollowSymlink)
                    .map_err(|e| self.err("set times of", &comps, e))?;
            }
            Kind::Link => {
                let tcomps = components(&e.link).map_err(|_| unsafe_entry(&raw, "hardlink target leaves the layer"))?;
                let Some((tname, tparents)) = tcomps.split_last() else {
                    return Err(unsafe_entry(&raw, "hardlink to the root"));
                };
                let tdir = self.existing_parent(&raw, tparents)?;
                let target = match existing_at(&tdir, tname).map_err(|e| self.io("stat", &tcomps, e))? {
                    Existing::Node(SFlag::S_IFDIR) => return Err(unsafe_entry(&raw, "hardlink to a directory")),
                    // Python's tarfile links what the symlink points to; the others the symlink.
                    Existing::Node(SFlag::S_IFLNK) => return Err(unsafe_entry(&raw, "hardlink to a symlink")),
                    Existing::Node(fmt) => fmt,
                    Existing::Whiteout | Existing::Nothing => {
                        return Err(unsafe_entry(&raw, "hardlink target is not in this layer"));
                    }
                };
                if let Existing::Node(fmt) = existing
                    && fmt != target
                {
                    return Err(unsafe_entry(&raw, "the path appears twice with different types"));
                }
                if tparents == parents && *tname == name {
                    return Err(unsafe_entry(&raw, "hardlink to itself"));
                }
                remove_at(&dir, name).map_err(|e| self.io("replace", &comps, e))?;
                linkat(&tdir, *tname, &dir, name, AtFlags::empty()).map_err(|e| self.err("link", &comps, e))?;
            }
            Kind::Fifo | Kind::Char | Kind::Block => {
                let kind = file_type(e.kind);
                let mut dev = 0;
                if kind != SFlag::S_IFIFO {
                    if !self.opts.allow_devices {
                        return Err(unsafe_entry(&raw, "device nodes are not allowed"));
                    }
                    let (major, minor) = e.dev;
                    if major == 0 && minor == 0 {
                        return Err(unsafe_entry(&raw, "a 0/0 device is a whiteout; use .wh. names"));
                    }
                    dev = nix::sys::stat::makedev(u64::from(major), u64::from(minor));
                }
                remove_at(&dir, name).map_err(|e| self.io("replace", &comps, e))?;
                mknodat(&dir, name, kind, Mode::from_bits_truncate(0o600), dev)
                    .map_err(|e| self.err("create node", &comps, e))?;
                self.own_at(&dir, name, uid, gid, Some(mode), &e.xattrs, &comps)?;
                utimensat(&dir, name, &mtime, &mtime, UtimensatFlags::NoFollowSymlink)
                    .map_err(|e| self.err("set times of", &comps, e))?;
            }
        }
        Ok(())
    }

    fn shown(&self, comps: &[impl AsRef<OsStr>]) -> PathBuf {
        let mut p = self.root_path.to_path_buf();
        p.extend(comps.iter().map(|c| c.as_ref()));
        p
    }

    fn io(&self, op: &'static str, comps: &[impl AsRef<OsStr>], e: io::Error) -> SnapshotError {
        SnapshotError::io(op, self.shown(comps))(e)
    }

    fn err(&self, op: &'static str, comps: &[impl AsRef<OsStr>], e: Errno) -> SnapshotError {
        self.io(op, comps, e.into())
    }

    /// Opens (creating missing directories) the parent of an entry, beneath the root.
    fn parent(&self, raw: &[u8], parents: &[&OsStr]) -> Result<OwnedFd, SnapshotError> {
        let path: PathBuf = if parents.is_empty() { ".".into() } else { parents.iter().collect() };
        match openat2(&self.root, &path, beneath(OFlag::O_PATH | OFlag::O_DIRECTORY)) {
            Ok(fd) => return Ok(fd),
            Err(Errno::ENOENT) => {}
            Err(e) => return Err(self.path_error(raw, parents, e)),
        }
        let mut cur = openat2(&self.root, ".", beneath(OFlag::O_PATH | OFlag::O_DIRECTORY))
            .map_err(|e| self.err("open", parents, e))?;
        for (i, c) in parents.iter().enumerate() {
            match mkdirat(&cur, *c, Mode::from_bits_truncate(0o755)) {
                Ok(()) | Err(Errno::EEXIST) => {}
                Err(e) => return Err(self.err("create directory", &parents[..=i], e)),
            }
            cur = openat2(&cur, *c, beneath(OFlag::O_PATH | OFlag::O_DIRECTORY))
                .map_err(|e| self.path_error(raw, &parents[..=i], e))?;
        }
        Ok(cur)
    }

    /// Opens the parent of a hardlink target, which must already exist.
    fn existing_parent(&self, raw: &[u8], parents: &[&OsStr]) -> Result<OwnedFd, SnapshotError> {
        let path: PathBuf = if parents.is_empty() { ".".into() } else { parents.iter().collect() };
        openat2(&self.root, &path, beneath(OFlag::O_PATH | OFlag::O_DIRECTORY)).map_err(|e| match e {
            Errno::ENOENT => unsafe_entry(raw, "hardlink target is not in this layer"),
            e => self.path_error(raw, parents, e),
        })
    }

    fn path_error(&self, raw: &[u8], parents: &[&OsStr], e: Errno) -> SnapshotError {
        match e {
            Errno::ELOOP => unsafe_entry(raw, "path goes through a symlink"),
            Errno::EXDEV => unsafe_entry(raw, "path leaves the target"),
            Errno::ENOTDIR => unsafe_entry(raw, "a parent is not a directory"),
            e => self.err("open", parents, e),
        }
    }

    /// Owner, mode and xattrs through an open file or directory.
    fn own(
        &self,
        f: &File,
        uid: u32,
        gid: u32,
        mode: Mode,
        xattrs: &[(String, Vec<u8>)],
        comps: &[&OsStr],
    ) -> Result<(), SnapshotError> {
        nix::unistd::fchown(f, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)))
            .map_err(|e| self.err("chown", comps, e))?;
        // After chown, which clears set-id bits.
        nix::sys::stat::fchmod(f, mode).map_err(|e| self.err("chmod", comps, e))?;
        for (k, v) in xattrs {
            f.set_xattr(k, v).map_err(|e| self.io("set xattr on", comps, e))?;
        }
        Ok(())
    }

    /// Owner, mode and xattrs of a node that cannot be opened (symlink, device, fifo).
    #[allow(clippy::too_many_arguments)]
    fn own_at(
        &self,
        dir: &OwnedFd,
        name: &OsStr,
        uid: u32,
        gid: u32,
        mode: Option<Mode>,
        xattrs: &[(String, Vec<u8>)],
        comps: &[&OsStr],
    ) -> Result<(), SnapshotError> {
        fchownat(dir, name, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)), AtFlags::AT_SYMLINK_NOFOLLOW)
            .map_err(|e| self.err("chown", comps, e))?;
        if let Some(mode) = mode {
            fchmodat(dir, name, mode, FchmodatFlags::FollowSymlink).map_err(|e| self.err("chmod", comps, e))?;
        }
        for (k, v) in xattrs {
            // lsetxattr: never follows the final symlink.
            xattr::set(proc_path(dir, name), k, v).map_err(|e| self.io("set xattr on", comps, e))?;
        }
        Ok(())
    }

    /// Sets directory mtimes, deepest first, now that nothing more is written inside.
    fn finish_dirs(&mut self) -> Result<(), SnapshotError> {
        let mut dirs = std::mem::take(&mut self.dir_times);
        dirs.sort_by_key(|d| std::cmp::Reverse(d.0.len()));
        for (comps, t) in dirs {
            let path: PathBuf = comps.iter().collect();
            // Resolve again: a later entry may have replaced the directory.
            let Ok(fd) = openat2(&self.root, &path, beneath(OFlag::O_RDONLY | OFlag::O_DIRECTORY)) else { continue };
            futimens(&fd, &t, &t).map_err(|e| self.err("set times of", &comps, e))?;
        }
        Ok(())
    }
}

/// Moves an overlay-form layer `src` into the tree `dst`, as overlay would show it.
fn merge_dir(src: &OwnedFd, dst: &OwnedFd, shown: &Path) -> Result<(), SnapshotError> {
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
            .get_xattr(OPAQUE_XATTR)
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
    let wanted: Vec<OsString> =
        src.list_xattr().map_err(SnapshotError::io("list xattrs of", shown))?.filter(|n| n != OPAQUE_XATTR).collect();
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
