//! Unpacking one layer tar into an empty scratch directory, in overlay
//! form, on a thread beside the one that decompresses and hashes it; every
//! name created with `*at` calls beneath the scratch root.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, openat, openat2};
use nix::sys::stat::{FchmodatFlags, Mode, SFlag, UtimensatFlags, fchmodat, futimens, mkdirat, mknodat, utimensat};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid, fchownat, linkat, symlinkat};
use sha2::{Digest, Sha256};
use xattr::FileExt;

use super::{
    ApplyOptions, DigestReader, Existing, beneath, components, existing_at, is_overlay_xattr, on_disk_xattr, open_dir,
    proc_path, remove_at, unsafe_entry,
};
use crate::SnapshotError;
use crate::codec::decompressed;
use crate::diff::{DiffStats, OPAQUE_MARKER, WHITEOUT_PREFIX};
use crate::tar_reader::{self, Entry, Kind};

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
pub(super) fn unpack(
    layer: impl Read + Send,
    root_path: &Path,
    opts: &ApplyOptions,
) -> Result<DiffStats, SnapshotError> {
    std::thread::scope(|scope| {
        let (tx, rx) = std::sync::mpsc::sync_channel::<io::Result<Vec<u8>>>(PIPE_DEPTH);
        let producer = scope.spawn(move || -> Result<(String, u64), SnapshotError> {
            let mut input = DigestReader { inner: decompressed(layer)?, hasher: Sha256::new(), size: 0 };
            let max = opts.bounds.max_bytes;
            loop {
                let mut chunk = vec![0u8; PIPE_CHUNK];
                match input.read(&mut chunk) {
                    Ok(0) => break,
                    Ok(_) if input.size > max => {
                        let _ = tx.send(Err(io::Error::other("the layer expands past its bound")));
                        return Err(SnapshotError::TooLarge { what: "bytes", limit: max });
                    }
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
        let produced = producer.join().map_err(|_| SnapshotError::DecoderPanicked)?;
        // Past its byte bound, the unpacker saw only a cut stream: the bound is the reason.
        if let Err(e @ SnapshotError::TooLarge { .. }) = produced {
            return Err(e);
        }
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
        if entries >= opts.bounds.max_entries {
            return Err(SnapshotError::TooLarge { what: "entries", limit: opts.bounds.max_entries });
        }
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
        if comps.len() > self.opts.bounds.max_depth {
            return Err(SnapshotError::TooLarge { what: "directory levels", limit: self.opts.bounds.max_depth as u64 });
        }
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
        for (x, v) in &e.xattrs {
            if is_overlay_xattr(x) {
                return Err(unsafe_entry(&raw, "sets an overlay-internal xattr"));
            }
            if let Some(why) = xattr_refusal(x, v) {
                return Err(unsafe_entry(&raw, why));
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
                File::from(fd)
                    .set_xattr(crate::opaque_xattr(), b"y")
                    .map_err(|e| self.io("set opaque xattr on", parents, e))?;
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
                // What symlink(2) refuses (all three readers fail on it).
                if e.link.is_empty() || e.link.len() >= PATH_MAX {
                    return Err(unsafe_entry(&raw, "a symlink target that is empty or 4096 bytes or longer"));
                }
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
                // GNU tar keeps the file's owner, mode and time; containerd
                // and Python apply the link entry's to the shared inode. A
                // differ writes both from one stat, so they agree. Times
                // from 2^31 s on are compared only if stored as given (a
                // filesystem may clamp them).
                let st = nix::sys::stat::fstatat(&tdir, *tname, AtFlags::AT_SYMLINK_NOFOLLOW)
                    .map_err(|e| self.err("stat", &tcomps, e))?;
                let time_differs = (0..1 << 31).contains(&e.mtime.0) && (st.st_mtime, st.st_mtime_nsec) != e.mtime;
                if (st.st_uid, st.st_gid, st.st_mode & 0o7777) != (uid, gid, e.mode & 0o7777) || time_differs {
                    return Err(unsafe_entry(&raw, "a hardlink whose owner, mode or time differs from its file's"));
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
            f.set_xattr(&*on_disk_xattr(k), v).map_err(|e| self.io("set xattr on", comps, e))?;
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
        // user.* xattrs exist on files and directories only: GNU tar and
        // containerd skip them here (with a warning), Python never sets any.
        for (k, v) in xattrs.iter().filter(|(k, _)| !k.starts_with("user.")) {
            // lsetxattr: never follows the final symlink.
            xattr::set(proc_path(dir, name), &*on_disk_xattr(k), v).map_err(|e| self.io("set xattr on", comps, e))?;
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

/// Why the kernel would refuse xattr `name` = `value` on an entry of
/// `kind`, if it would: checked up front, so a layer carrying one gets a
/// typed refusal rather than an I/O error halfway through.
fn xattr_refusal(name: &str, value: &[u8]) -> Option<&'static str> {
    match name.split_once('.') {
        Some(("user" | "trusted" | "security" | "system", rest)) if !rest.is_empty() => {}
        _ => return Some("an xattr outside the user, trusted, security and system namespaces"),
    }
    if name.len() > 255 || name.contains('\0') {
        return Some("an xattr name longer than 255 bytes or holding a NUL");
    }
    if value.len() > 65_536 {
        return Some("an xattr value over 64 KiB");
    }
    None
}
