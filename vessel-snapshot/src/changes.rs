//! What changed between two states of a tree, read from their layers
//! alone (nothing is mounted), as `docker diff` reports a container's.
//!
//! A state is a stack of directories in overlay's on-disk format, bottom
//! first: image layers, snapshot layers and, for a live state, the upper
//! dir (whiteouts are 0/0 character devices or zero-size files marked
//! `<overlay prefix>whiteout`; an opaque dir is marked `<prefix>opaque`).
//! Two states of one vessel share their bottom layers, so only what is not
//! shared is walked: each name found in an unshared directory is resolved
//! in both stacks, top down as overlay resolves it, and compared. The cost
//! is that of the change, not of the tree.

use std::ffi::OsString;
use std::fs::{self, File, Metadata};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::SnapshotError;
use crate::diff::{sorted_entries, xattrs};

/// How a path changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ChangeKind {
    /// It was not there before.
    Added,
    /// It is there in both states, and differs (see [`Modified`]).
    Modified,
    /// It is gone.
    Deleted,
}

/// What differs about a modified path.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Modified {
    /// Its bytes (a file's content, a symlink's target, a device's number).
    pub content: bool,
    /// Its permission bits.
    pub mode: bool,
    /// Its owner or group.
    pub owner: bool,
    /// Its extended attributes.
    pub xattrs: bool,
    /// Its type (a file became a directory, ...).
    pub kind: bool,
    /// A directory that became opaque: it replaces what was there before.
    pub opaque: bool,
}

/// One changed path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The path, absolute in the tree (`/etc/hosts`).
    pub path: PathBuf,
    /// How it changed.
    pub kind: ChangeKind,
    /// For [`ChangeKind::Modified`], what differs.
    pub modified: Modified,
}

/// The directories that make up one directory of a merged tree, top
/// first, each with the index of its layer.
type Merged = Vec<(usize, PathBuf)>;

/// An entry of a merged tree: its topmost path, metadata and (a
/// directory) the directories below it that merge into it.
struct Resolved {
    path: PathBuf,
    meta: Metadata,
    dirs: Merged,
    /// The top directory is marked opaque.
    opaque: bool,
}

/// The changes from the tree of `from` to that of `to` (stacks bottom
/// first), sorted by path. A deleted or added directory is reported with
/// everything in it (as `docker diff` does for an added one; a deleted
/// one's contents are listed too, so the list says every path that went).
pub fn changes(from: &[PathBuf], to: &[PathBuf]) -> Result<Vec<Change>, SnapshotError> {
    let shared = from.iter().zip(to).take_while(|(a, b)| a == b).count();
    let top_first = |s: &[PathBuf]| -> Merged { s.iter().enumerate().rev().map(|(i, p)| (i, p.clone())).collect() };
    let mut out = Vec::new();
    walk(&mut out, Path::new("/"), &top_first(from), &top_first(to), shared)?;
    out.sort_by(|a, b| a.path.as_os_str().as_bytes().cmp(b.path.as_os_str().as_bytes()));
    Ok(out)
}

/// Compares one directory's entries; only names in a directory that is
/// not in both stacks (a layer above `shared`, or one an opaque dir cut
/// off on one side) can differ.
fn walk(out: &mut Vec<Change>, rel: &Path, from: &Merged, to: &Merged, shared: usize) -> Result<(), SnapshotError> {
    let in_both = |d: &(usize, PathBuf), other: &Merged| d.0 < shared && other.contains(d);
    let mut names: Vec<OsString> = Vec::new();
    for d in from.iter().filter(|d| !in_both(d, to)).chain(to.iter().filter(|d| !in_both(d, from))) {
        names.extend(sorted_entries(&d.1)?);
    }
    names.sort_unstable_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    names.dedup();
    for name in names {
        let path = rel.join(&name);
        let (a, b) = (resolve(from, &name)?, resolve(to, &name)?);
        match (a, b) {
            (None, None) => {}
            (Some(a), None) => subtree(out, &path, &a, ChangeKind::Deleted)?,
            (None, Some(b)) => subtree(out, &path, &b, ChangeKind::Added)?,
            (Some(a), Some(b)) => {
                if a.path == b.path {
                    // The same entry of a shared layer; a directory's
                    // contents may still differ below.
                    if a.meta.is_dir() && a.dirs != b.dirs {
                        walk(out, &path, &a.dirs, &b.dirs, shared)?;
                    }
                    continue;
                }
                let m = compare(&a, &b)?;
                let both_dirs = a.meta.is_dir() && b.meta.is_dir();
                if m != Modified::default() {
                    out.push(Change { path: path.clone(), kind: ChangeKind::Modified, modified: m });
                }
                if both_dirs {
                    walk(out, &path, &a.dirs, &b.dirs, shared)?;
                } else if m.kind {
                    // What the old directory held went; what a new one holds came.
                    if a.meta.is_dir() {
                        children(out, &path, &a, ChangeKind::Deleted)?;
                    }
                    if b.meta.is_dir() {
                        children(out, &path, &b, ChangeKind::Added)?;
                    }
                }
            }
        }
    }
    Ok(())
}

/// Reports `e` at `path`, and everything under it, as `kind`.
fn subtree(out: &mut Vec<Change>, path: &Path, e: &Resolved, kind: ChangeKind) -> Result<(), SnapshotError> {
    out.push(Change { path: path.to_owned(), kind, modified: Modified::default() });
    if e.meta.is_dir() {
        children(out, path, e, kind)?;
    }
    Ok(())
}

fn children(out: &mut Vec<Change>, path: &Path, e: &Resolved, kind: ChangeKind) -> Result<(), SnapshotError> {
    let mut names: Vec<OsString> = Vec::new();
    for d in &e.dirs {
        names.extend(sorted_entries(&d.1)?);
    }
    names.sort_unstable_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    names.dedup();
    for name in names {
        if let Some(c) = resolve(&e.dirs, &name)? {
            subtree(out, &path.join(&name), &c, kind)?;
        }
    }
    Ok(())
}

/// Whether `meta` (at `path`) is a whiteout: a 0/0 character device, or a
/// zero-size file marked as one.
fn is_whiteout(path: &Path, meta: &Metadata) -> Result<bool, SnapshotError> {
    if meta.file_type().is_char_device() && meta.rdev() == 0 {
        return Ok(true);
    }
    Ok(meta.is_file() && meta.len() == 0 && xattrs(path)?.1.whiteout)
}

/// `name` in the merged directory `dirs`, as overlay resolves it.
fn resolve(dirs: &Merged, name: &OsString) -> Result<Option<Resolved>, SnapshotError> {
    let mut found: Option<Resolved> = None;
    for (i, d) in dirs {
        let path = d.join(name);
        let meta = match fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(SnapshotError::io("stat", &path)(e)),
        };
        let whiteout = is_whiteout(&path, &meta)?;
        match &mut found {
            None if whiteout => return Ok(None),
            None => {
                let opaque = meta.is_dir() && xattrs(&path)?.1.opaque;
                let dirs = if meta.is_dir() { vec![(*i, path.clone())] } else { Vec::new() };
                let done = !meta.is_dir() || opaque;
                found = Some(Resolved { path, meta, dirs, opaque });
                if done {
                    break;
                }
            }
            // Below a directory: lower directories of the same name merge
            // into it, down to a whiteout, a non-directory or an opaque one.
            Some(top) => {
                if whiteout || !meta.is_dir() {
                    break;
                }
                top.dirs.push((*i, path.clone()));
                if xattrs(&path)?.1.opaque {
                    break;
                }
            }
        }
    }
    Ok(found)
}

/// What differs between two entries of one path.
fn compare(a: &Resolved, b: &Resolved) -> Result<Modified, SnapshotError> {
    let (am, bm) = (&a.meta, &b.meta);
    let kind = am.file_type() != bm.file_type();
    let mut m = Modified { kind, ..Default::default() };
    m.mode = am.mode() & 0o7777 != bm.mode() & 0o7777;
    m.owner = (am.uid(), am.gid()) != (bm.uid(), bm.gid());
    m.xattrs = xattrs(&a.path)?.0 != xattrs(&b.path)?.0;
    // A directory that is opaque now hides whatever was below it before.
    m.opaque = b.opaque && !kind && bm.is_dir() && a.dirs.iter().any(|d| !b.dirs.contains(d));
    if !kind {
        let ft = bm.file_type();
        m.content = if ft.is_file() {
            !same_content(&a.path, &b.path, am.len(), bm.len())?
        } else if ft.is_symlink() {
            fs::read_link(&a.path).map_err(SnapshotError::io("read link", &a.path))?
                != fs::read_link(&b.path).map_err(SnapshotError::io("read link", &b.path))?
        } else if ft.is_char_device() || ft.is_block_device() {
            am.rdev() != bm.rdev()
        } else {
            false
        };
    }
    Ok(m)
}

fn same_content(a: &Path, b: &Path, alen: u64, blen: u64) -> Result<bool, SnapshotError> {
    if alen != blen {
        return Ok(false);
    }
    let mut fa = File::open(a).map_err(SnapshotError::io("open", a))?;
    let mut fb = File::open(b).map_err(SnapshotError::io("open", b))?;
    let (mut ba, mut bb) = (vec![0u8; 64 << 10], vec![0u8; 64 << 10]);
    loop {
        let n = read_full(&mut fa, &mut ba).map_err(SnapshotError::io("read", a))?;
        let m = read_full(&mut fb, &mut bb).map_err(SnapshotError::io("read", b))?;
        if n != m || ba[..n] != bb[..m] {
            return Ok(false);
        }
        if n == 0 {
            return Ok(true);
        }
    }
}

fn read_full(f: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(c: &[Change]) -> Vec<(String, ChangeKind)> {
        c.iter().map(|c| (c.path.display().to_string(), c.kind)).collect()
    }

    #[test]
    fn adds_modifies_and_deletes_over_shared_layers() {
        let t = tempfile::tempdir().unwrap();
        let (base, upper) = (t.path().join("base"), t.path().join("upper"));
        fs::create_dir_all(base.join("d/sub")).unwrap();
        fs::write(base.join("d/sub/x"), "x").unwrap();
        fs::write(base.join("same"), "same").unwrap();
        fs::write(base.join("edit"), "old").unwrap();
        fs::write(base.join("gone"), "g").unwrap();
        fs::create_dir_all(upper.join("new/deep")).unwrap();
        fs::write(upper.join("new/deep/f"), "f").unwrap();
        fs::write(upper.join("edit"), "new").unwrap();
        // An unchanged copy-up is no change.
        fs::write(upper.join("same"), "same").unwrap();
        nix::sys::stat::mknod(&upper.join("gone"), nix::sys::stat::SFlag::S_IFCHR, nix::sys::stat::Mode::empty(), 0)
            .unwrap();
        let c = changes(std::slice::from_ref(&base), &[base.clone(), upper.clone()]).unwrap();
        assert_eq!(
            kinds(&c),
            [
                ("/edit".into(), ChangeKind::Modified),
                ("/gone".into(), ChangeKind::Deleted),
                ("/new".into(), ChangeKind::Added),
                ("/new/deep".into(), ChangeKind::Added),
                ("/new/deep/f".into(), ChangeKind::Added),
            ]
        );
        assert!(c[0].modified.content && !c[0].modified.mode);
        // And back: the inverse.
        let back = changes(&[base.clone(), upper], std::slice::from_ref(&base)).unwrap();
        assert_eq!(back.iter().filter(|c| c.kind == ChangeKind::Deleted).count(), 3);
        assert_eq!(back.iter().filter(|c| c.kind == ChangeKind::Added).count(), 1);
        // The same stack: nothing.
        assert!(changes(std::slice::from_ref(&base), std::slice::from_ref(&base)).unwrap().is_empty());
    }
}
