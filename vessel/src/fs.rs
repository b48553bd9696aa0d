//! The confined file API. Every path is resolved by the kernel with
//! `openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV)`
//! from a directory fd of the vessel's root, so `..`, absolute symlinks and
//! symlinks planted by a container all resolve inside the vessel, as they
//! would in a chroot: nothing here can name a host file. Operations on a
//! final name (`mkdir`, `unlink`, `rename`) act on the confined parent's fd.
//!
//! A [`Gate`] orders file operations against remounts: a snapshot or restore
//! waits for operations in flight, holds new ones until the new mount is in
//! place, and makes `File`s opened on the old mount stale (their writes
//! would otherwise land in a sealed layer).

use std::fs;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, SystemTime};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, OpenHow, ResolveFlag, openat2};
use nix::sys::stat::{FileStat, Mode, SFlag, fstatat, mkdirat};
use nix::unistd::UnlinkatFlags;
use vessel_core::VesselId;
use vessel_runtime::IdMapping;
use vessel_runtime::idmap::as_host_ids;

use crate::error::{Result, VesselError};
use vessel_core::sync::Locked;

/// Flags for [`crate::Vessel::open_file`] (those of `open(2)`; only the
/// access mode, `O_CREAT`, `O_EXCL`, `O_TRUNC`, `O_APPEND`, `O_SYNC`,
/// `O_DSYNC` and `O_NOFOLLOW` are honoured).
pub use nix::fcntl::OFlag as OpenFlags;

const HONOURED: OFlag = OFlag::O_ACCMODE
    .union(OFlag::O_CREAT)
    .union(OFlag::O_EXCL)
    .union(OFlag::O_TRUNC)
    .union(OFlag::O_APPEND)
    .union(OFlag::O_SYNC)
    .union(OFlag::O_DSYNC)
    .union(OFlag::O_NOFOLLOW);

fn resolve() -> ResolveFlag {
    ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS | ResolveFlag::RESOLVE_NO_XDEV
}

/// What a file is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FileType {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link.
    Symlink,
    /// A device, FIFO or socket.
    Other,
}

/// A file's metadata, as seen inside the vessel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileInfo {
    /// The last path component (empty for `/`).
    pub name: String,
    /// What it is.
    pub file_type: FileType,
    /// Size in bytes.
    pub size: u64,
    /// Permission bits (and setuid/setgid/sticky).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Last modification.
    pub modified: SystemTime,
}

/// The owner a file has inside a vessel when its host id is outside the
/// vessel's range (the kernel's overflow id, as a container sees it).
pub const OVERFLOW_ID: u32 = 65534;

impl FileInfo {
    /// The owner as the vessel sees it: host ids of the vessel's range
    /// translated back (a file made by the container's root is uid 0).
    pub(crate) fn in_vessel(mut self, ids: Option<IdMapping>) -> Self {
        if let Some(m) = ids {
            self.uid = m.to_container(self.uid).unwrap_or(OVERFLOW_ID);
            self.gid = m.to_container(self.gid).unwrap_or(OVERFLOW_ID);
        }
        self
    }

    /// Whether it is a directory.
    pub fn is_dir(&self) -> bool {
        self.file_type == FileType::Dir
    }

    fn from_stat(name: String, st: &FileStat) -> Self {
        let fmt = SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits());
        let file_type = match fmt {
            SFlag::S_IFREG => FileType::File,
            SFlag::S_IFDIR => FileType::Dir,
            SFlag::S_IFLNK => FileType::Symlink,
            _ => FileType::Other,
        };
        let modified = SystemTime::UNIX_EPOCH
            + Duration::new(u64::try_from(st.st_mtime).unwrap_or(0), u32::try_from(st.st_mtime_nsec).unwrap_or(0));
        Self {
            name,
            file_type,
            size: u64::try_from(st.st_size).unwrap_or(0),
            mode: st.st_mode & 0o7777,
            uid: st.st_uid,
            gid: st.st_gid,
            modified,
        }
    }
}

#[derive(Debug)]
struct GateState {
    root: Option<Arc<OwnedFd>>,
    generation: u64,
    busy: bool,
    in_flight: usize,
}

/// Orders file operations against remounts (see the module docs).
#[derive(Debug)]
pub(crate) struct Gate {
    id: VesselId,
    /// The vessel's id mapping (`None`: host ids, no user namespace).
    pub(crate) ids: Option<IdMapping>,
    state: Mutex<GateState>,
    changed: Condvar,
}

/// One file operation in flight; holds the root fd it resolves from.
pub(crate) struct Pass<'a> {
    gate: &'a Gate,
    pub(crate) root: Arc<OwnedFd>,
    pub(crate) generation: u64,
}

impl Drop for Pass<'_> {
    fn drop(&mut self) {
        let mut s = self.gate.state.locked();
        s.in_flight -= 1;
        self.gate.changed.notify_all();
    }
}

impl Gate {
    pub(crate) fn new(id: VesselId, root: OwnedFd, ids: Option<IdMapping>) -> Self {
        let state = GateState { root: Some(Arc::new(root)), generation: 0, busy: false, in_flight: 0 };
        Self { id, ids, state: Mutex::new(state), changed: Condvar::new() }
    }

    /// Runs a file operation as the vessel's root would: with the fs ids of
    /// the container's root on the host (see [`vessel_runtime::idmap`]), so
    /// what it creates is owned by root inside the vessel.
    pub(crate) fn as_vessel_root<T>(&self, f: impl FnOnce() -> T) -> T {
        match self.ids {
            Some(m) => as_host_ids(m.host_id, m.host_id, f),
            None => f(),
        }
    }

    /// Waits out a remount, then admits one operation (`generation`: a
    /// `File`'s, which must still be current).
    pub(crate) fn enter(&self, generation: Option<u64>) -> Result<Pass<'_>> {
        let mut s = self.state.locked();
        while s.busy {
            s = vessel_core::sync::wait(&self.changed, s);
        }
        let Some(root) = s.root.clone() else { return Err(VesselError::Closed(self.id.clone())) };
        if generation.is_some_and(|g| g != s.generation) {
            return Err(VesselError::StaleFile(self.id.clone()));
        }
        s.in_flight += 1;
        Ok(Pass { gate: self, root, generation: s.generation })
    }

    /// Holds new operations and waits for those in flight (blocking: call
    /// it off the async reactor).
    pub(crate) fn freeze(&self) {
        let mut s = self.state.locked();
        while s.busy {
            s = vessel_core::sync::wait(&self.changed, s);
        }
        s.busy = true;
        while s.in_flight > 0 {
            s = vessel_core::sync::wait(&self.changed, s);
        }
    }

    /// Ends a freeze after a remount: `File`s opened before it go stale,
    /// and paths resolve in `root` from now on (`None`: the vessel is gone,
    /// every call fails).
    pub(crate) fn thaw_remounted(&self, root: Option<OwnedFd>) {
        let mut s = self.state.locked();
        s.generation += 1;
        s.root = root.map(Arc::new);
        s.busy = false;
        self.changed.notify_all();
    }
}

/// A path inside the vessel, made absolute and lexically normal, as the Go
/// original (and POSIX inside a chroot) resolves it: relative paths start
/// at `work_dir`, `""` is `work_dir` itself, and `..` at `/` stays at `/`
/// (the kernel then resolves symlinks the same way, `RESOLVE_IN_ROOT`).
/// Only a NUL byte, which no file name can hold, is refused.
pub(crate) fn normalize(work_dir: &str, path: &str) -> Result<String> {
    if path.contains('\0') {
        return Err(VesselError::InvalidPath { path: path.into(), reason: "NUL byte in path" });
    }
    let joined = if path.starts_with('/') { path.to_owned() } else { format!("{work_dir}/{path}") };
    let mut parts: Vec<&str> = Vec::new();
    for c in joined.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    Ok(format!("/{}", parts.join("/")))
}

/// Splits a normal path into its parent and final name (`None` for `/`).
fn split(path: &str) -> Option<(&str, &str)> {
    let i = path.rfind('/')?;
    let name = &path[i + 1..];
    if name.is_empty() {
        return None;
    }
    Some((if i == 0 { "/" } else { &path[..i] }, name))
}

pub(crate) fn file_err<'p>(op: &'static str, path: &'p str) -> impl FnOnce(Errno) -> VesselError + 'p {
    move |e| VesselError::File { op, path: path.into(), source: io::Error::from(e) }
}

/// Opens `path` inside the vessel. Anything but `O_PATH` opens only regular
/// files and directories: a container can `mknod` a host disk's device node
/// or leave a FIFO in its workspace, and opening those from the host would
/// read the host's disk or hang. So the open is non-blocking and without a
/// controlling terminal, the type is checked, then `O_NONBLOCK` is cleared.
fn open_in(root: &OwnedFd, path: &str, flags: OFlag, mode: u32) -> Result<OwnedFd> {
    let plain = !flags.contains(OFlag::O_PATH);
    let extra = if plain { OFlag::O_NONBLOCK | OFlag::O_NOCTTY } else { OFlag::empty() };
    let how =
        OpenHow::new().flags(flags | extra | OFlag::O_CLOEXEC).mode(Mode::from_bits_truncate(mode)).resolve(resolve());
    // `path` is absolute; IN_ROOT makes it relative to `root`. EAGAIN: a
    // rename or mount somewhere raced the resolution; it is safe to retry.
    let mut tries = 0;
    let fd = loop {
        match openat2(root, path, how) {
            Err(Errno::EAGAIN) if tries < 100 => tries += 1,
            r => break r.map_err(file_err("open", path))?,
        }
    };
    if plain {
        let st = nix::sys::stat::fstat(&fd).map_err(file_err("stat", path))?;
        let fmt = SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits());
        if fmt != SFlag::S_IFREG && fmt != SFlag::S_IFDIR {
            return Err(VesselError::File {
                op: "open",
                path: path.into(),
                source: io::Error::new(io::ErrorKind::InvalidInput, "not a regular file or directory"),
            });
        }
        nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_SETFL(flags & !OFlag::O_ACCMODE & !OFlag::O_NONBLOCK))
            .map_err(file_err("open", path))?;
    }
    Ok(fd)
}

fn parent_of<'p>(root: &OwnedFd, path: &'p str) -> Result<(OwnedFd, &'p str)> {
    let (parent, name) = split(path).ok_or(VesselError::InvalidPath { path: path.into(), reason: "it is the root" })?;
    let dir = open_in(root, parent, OFlag::O_PATH | OFlag::O_DIRECTORY, 0)?;
    Ok((dir, name))
}

pub(crate) fn read_file(root: &OwnedFd, path: &str) -> Result<Vec<u8>> {
    let fd = open_in(root, path, OFlag::O_RDONLY, 0)?;
    let mut buf = Vec::new();
    fs::File::from(fd).read_to_end(&mut buf).map_err(|source| VesselError::File {
        op: "read",
        path: path.into(),
        source,
    })?;
    Ok(buf)
}

pub(crate) fn write_file(root: &OwnedFd, path: &str, data: &[u8], perm: u32) -> Result<()> {
    let fd = open_in(root, path, OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_TRUNC, perm)?;
    fs::File::from(fd).write_all(data).map_err(|source| VesselError::File { op: "write", path: path.into(), source })
}

pub(crate) fn stat(root: &OwnedFd, path: &str) -> Result<FileInfo> {
    let fd = open_in(root, path, OFlag::O_PATH, 0)?;
    let st = nix::sys::stat::fstat(&fd).map_err(file_err("stat", path))?;
    let name = split(path).map(|(_, n)| n.to_owned()).unwrap_or_default();
    Ok(FileInfo::from_stat(name, &st))
}

pub(crate) fn make_dir(root: &OwnedFd, path: &str, perm: u32) -> Result<()> {
    let (dir, name) = parent_of(root, path)?;
    mkdirat(&dir, name, Mode::from_bits_truncate(perm)).map_err(file_err("mkdir", path))
}

pub(crate) fn make_dir_all(root: &OwnedFd, path: &str, perm: u32) -> Result<()> {
    let mut prefix = String::new();
    for c in path.split('/').filter(|c| !c.is_empty()) {
        prefix.push('/');
        prefix.push_str(c);
        match make_dir(root, &prefix, perm) {
            Ok(()) => {}
            Err(VesselError::File { source, .. }) if source.kind() == io::ErrorKind::AlreadyExists => {
                // Fine if it is a directory (or a symlink to one, in the vessel).
                if !stat(root, &prefix)?.is_dir() {
                    return Err(VesselError::File {
                        op: "mkdir",
                        path: prefix,
                        source: io::Error::from(Errno::ENOTDIR),
                    });
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

pub(crate) fn read_dir(root: &OwnedFd, path: &str) -> Result<Vec<FileInfo>> {
    let fd = open_in(root, path, OFlag::O_RDONLY | OFlag::O_DIRECTORY, 0)?;
    let names: Vec<String> = {
        let dup = fd.try_clone().map_err(|source| VesselError::File { op: "read dir", path: path.into(), source })?;
        let mut dir = nix::dir::Dir::from_fd(dup).map_err(file_err("read dir", path))?;
        dir.iter()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n != "." && n != "..")
            .collect()
    };
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        let st = match fstatat(&fd, name.as_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            // Removed meanwhile.
            Err(Errno::ENOENT) => continue,
            Err(e) => return Err(file_err("stat", path)(e)),
        };
        out.push(FileInfo::from_stat(name, &st));
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

pub(crate) fn delete(root: &OwnedFd, path: &str) -> Result<()> {
    let (dir, name) = parent_of(root, path)?;
    match nix::unistd::unlinkat(&dir, name, UnlinkatFlags::NoRemoveDir) {
        Err(Errno::EISDIR) => nix::unistd::unlinkat(&dir, name, UnlinkatFlags::RemoveDir),
        r => r,
    }
    .map_err(file_err("delete", path))
}

pub(crate) fn rename(root: &OwnedFd, from: &str, to: &str) -> Result<()> {
    let (from_dir, from_name) = parent_of(root, from)?;
    let (to_dir, to_name) = parent_of(root, to)?;
    nix::fcntl::renameat(&from_dir, from_name, &to_dir, to_name).map_err(file_err("rename", from))
}

/// A file opened in a vessel: `Read`, `Write`, `Seek` and positional I/O.
/// It goes stale ([`VesselError::StaleFile`], as an `io::Error` from the
/// std traits) once a snapshot or restore remounts the vessel.
#[derive(Debug)]
pub struct File {
    file: fs::File,
    gate: Arc<Gate>,
    generation: u64,
    path: String,
}

fn to_io(e: VesselError) -> io::Error {
    io::Error::other(e)
}

impl File {
    pub(crate) fn open(gate: Arc<Gate>, path: &str, flags: OpenFlags, perm: u32) -> Result<Self> {
        let (fd, generation) = {
            let pass = gate.enter(None)?;
            let flags = flags & HONOURED;
            (gate.as_vessel_root(|| open_in(&pass.root, path, flags, perm))?, pass.generation)
        };
        Ok(Self { file: fs::File::from(fd), gate, generation, path: path.into() })
    }

    fn guarded<T>(&self, op: &'static str, f: impl FnOnce(&fs::File) -> io::Result<T>) -> Result<T> {
        let _pass = self.gate.enter(Some(self.generation))?;
        f(&self.file).map_err(|source| VesselError::File { op, path: self.path.clone(), source })
    }

    /// Reads at `offset` without moving the cursor.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
        self.guarded("read", |f| f.read_at(buf, offset))
    }

    /// Writes at `offset` without moving the cursor.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<usize> {
        self.guarded("write", |f| f.write_at(buf, offset))
    }

    /// The file's metadata.
    pub fn stat(&self) -> Result<FileInfo> {
        let name = split(&self.path).map(|(_, n)| n.to_owned()).unwrap_or_default();
        let st = self.guarded("stat", |f| nix::sys::stat::fstat(f).map_err(io::Error::from))?;
        Ok(FileInfo::from_stat(name, &st).in_vessel(self.gate.ids))
    }

    /// Flushes data and metadata to the disk (`fsync`).
    pub fn sync(&self) -> Result<()> {
        self.guarded("sync", fs::File::sync_all)
    }

    /// Truncates or extends the file to `len` bytes.
    pub fn truncate(&self, len: u64) -> Result<()> {
        self.guarded("truncate", |f| f.set_len(len))
    }
}

impl Read for File {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let _pass = self.gate.enter(Some(self.generation)).map_err(to_io)?;
        self.file.read(buf)
    }
}

impl Write for File {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let _pass = self.gate.enter(Some(self.generation)).map_err(to_io)?;
        self.file.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Seek for File {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        let _pass = self.gate.enter(Some(self.generation)).map_err(to_io)?;
        self.file.seek(pos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_normalize_inside_the_root() {
        assert_eq!(normalize("/work", "a/b").unwrap(), "/work/a/b");
        assert_eq!(normalize("/work", "/etc/x").unwrap(), "/etc/x");
        assert_eq!(normalize("/work", "../etc/./x").unwrap(), "/etc/x");
        assert_eq!(normalize("/work", ".").unwrap(), "/work");
        assert_eq!(normalize("/work", "").unwrap(), "/work", "\"\" is the work dir");
        assert_eq!(normalize("/work", "../../x").unwrap(), "/x", "`..` at `/` stays at `/`");
        assert_eq!(normalize("/", "/..").unwrap(), "/");
        assert_eq!(normalize("/", "/../../etc//passwd/").unwrap(), "/etc/passwd");
        assert!(normalize("/work", "a\0b").is_err());
        assert_eq!(split("/a/b"), Some(("/a", "b")));
        assert_eq!(split("/a"), Some(("/", "a")));
        assert_eq!(split("/"), None);
    }
}
