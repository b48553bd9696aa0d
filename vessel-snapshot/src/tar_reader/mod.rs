//! A strict streaming reader for layer tars.
//!
//! Why not `tar::Archive`: in raw mode it frames data by the header's size
//! and ignores PAX `size` (so it reads another file than GNU tar, Go's
//! archive/tar and Python's tarfile do), its PAX parser splits records on
//! `'\n'` (breaking binary xattr values), it reads no sparse maps, and it
//! accepts numeric fields that Go refuses. Here a layer is read the way
//! those parsers agree on, and what they would read differently is refused
//! with [`SnapshotError::Tar`] naming the byte offset:
//! - framing: header checksums (unsigned or signed sum, as all three), PAX
//!   `size`, GNU long names and links, base-256 numbers, sparse entries in
//!   the old GNU and the PAX 0.0, 0.1 and 1.0 formats;
//! - refused: a bad checksum, a non-octal or negative number, data on an
//!   entry type that has none (a symlink or directory with a size), entries
//!   running past the end, a zero block followed by a header, two
//!   extension headers of one kind for one entry, a PAX path beside a GNU
//!   long name, a global PAX header that sets anything but a comment,
//!   malformed PAX records or values, a sparse map that overlaps, runs past
//!   the file or does not account for the data, ids that `chown` cannot set;
//! - kept as Go does: a name is cut at its first NUL; the ustar prefix is
//!   joined only under the ustar magic; `uname`/`gname` are ignored (layers
//!   carry numeric ids, as containerd applies them).

use std::io::{self, Read};

use header::{Header, cut_nul, old_sparse_entries};
use pax::{PaxRecords, decimal, parse_list, parse_pax, pax_time};
use sparse::validate_sparse;

use crate::SnapshotError;

mod header;
mod pax;
mod sparse;

const BLOCK: usize = 512;
/// Go's `maxSpecialFileSize`: extension headers and sparse maps are small.
const MAX_META: u64 = 1 << 20;

/// What an entry is, once extension headers are folded in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Regular,
    Link,
    Symlink,
    Char,
    Block,
    Directory,
    Fifo,
}

/// One archive member, with every extension header applied.
#[derive(Debug)]
pub(crate) struct Entry {
    pub(crate) path: Vec<u8>,
    /// Hardlink or symlink target (empty for other kinds).
    pub(crate) link: Vec<u8>,
    pub(crate) kind: Kind,
    /// Permission bits (`0o7777`).
    pub(crate) mode: u32,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    /// Seconds and nanoseconds since the epoch.
    pub(crate) mtime: (i64, i64),
    pub(crate) dev: (u32, u32),
    /// `SCHILY.xattr.*` records, in archive order.
    pub(crate) xattrs: Vec<(String, Vec<u8>)>,
    /// Logical size (a sparse file's real size).
    pub(crate) size: u64,
    /// Data segments (offset, length) of a sparse file, sorted and disjoint.
    pub(crate) sparse: Option<Vec<(u64, u64)>>,
}

/// Reads entries one at a time; the data of the current entry is read with
/// [`Reader::read_data`] (whatever is left is skipped by the next `next`).
pub(crate) struct Reader<R> {
    inner: R,
    /// Bytes consumed so far.
    offset: u64,
    /// Physical data bytes of the current entry not read yet.
    left: u64,
    /// Padding after the current entry's data.
    pad: u64,
    ended: bool,
}

impl<R: Read> Reader<R> {
    pub(crate) fn new(inner: R) -> Self {
        Self { inner, offset: 0, left: 0, pad: 0, ended: false }
    }

    pub(crate) fn into_inner(self) -> R {
        self.inner
    }

    fn bad(&self, at: u64, what: impl std::fmt::Display) -> SnapshotError {
        SnapshotError::Tar { at, reason: what.to_string() }
    }

    /// Fills `buf` completely; `Ok(false)` on a clean end of input before the first byte.
    fn fill(&mut self, buf: &mut [u8]) -> Result<bool, SnapshotError> {
        let mut got = 0;
        while got < buf.len() {
            match self.inner.read(&mut buf[got..]) {
                Ok(0) if got == 0 => return Ok(false),
                Ok(0) => return Err(self.bad(self.offset + got as u64, "the archive ends inside a block")),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(SnapshotError::Stream("layer", e)),
            }
        }
        self.offset += buf.len() as u64;
        Ok(true)
    }

    fn skip(&mut self, mut n: u64) -> Result<(), SnapshotError> {
        let mut buf = [0u8; 8192];
        while n > 0 {
            let want = buf.len().min(n as usize);
            if !self.fill(&mut buf[..want])? {
                return Err(self.bad(self.offset, "the archive ends inside an entry"));
            }
            n -= want as u64;
        }
        Ok(())
    }

    /// Reads the current entry's stored data (a sparse file's segments, back to back).
    pub(crate) fn read_data(&mut self, buf: &mut [u8]) -> Result<usize, SnapshotError> {
        if self.left == 0 {
            return Ok(0);
        }
        let want = buf.len().min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = loop {
            match self.inner.read(&mut buf[..want]) {
                Ok(0) => return Err(self.bad(self.offset, "the archive ends inside an entry")),
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(SnapshotError::Stream("layer", e)),
            }
        };
        self.offset += n as u64;
        self.left -= n as u64;
        Ok(n)
    }

    /// Reads a whole small data area (extension header, sparse map).
    fn read_meta(&mut self, size: u64, at: u64) -> Result<Vec<u8>, SnapshotError> {
        if size > MAX_META {
            return Err(self.bad(at, format_args!("an extension header of {size} bytes")));
        }
        let mut v = vec![0; size as usize];
        if size > 0 && !self.fill(&mut v)? {
            return Err(self.bad(self.offset, "the archive ends inside an entry"));
        }
        self.skip(padding(size))?;
        Ok(v)
    }

    /// The next entry, or `None` at the end of the archive.
    pub(crate) fn next_entry(&mut self) -> Result<Option<Entry>, SnapshotError> {
        let (left, pad) = (std::mem::take(&mut self.left), std::mem::take(&mut self.pad));
        self.skip(left + pad)?;
        if self.ended {
            return Ok(None);
        }
        let mut pax: Option<PaxRecords> = None;
        let mut long_name: Option<Vec<u8>> = None;
        let mut long_link: Option<Vec<u8>> = None;
        let mut blk = [0u8; BLOCK];
        loop {
            let at = self.offset;
            let pending = pax.is_some() || long_name.is_some() || long_link.is_some();
            if !self.fill(&mut blk)? {
                // No end-of-archive blocks: GNU tar, Go and Python all accept that.
                if pending {
                    return Err(self.bad(at, "the archive ends after an extension header"));
                }
                self.ended = true;
                return Ok(None);
            }
            if blk.iter().all(|b| *b == 0) {
                if pending {
                    return Err(self.bad(at, "the archive ends after an extension header"));
                }
                let mut second = [0u8; BLOCK];
                if self.fill(&mut second)? && second.iter().any(|b| *b != 0) {
                    // Go refuses this; GNU tar and Python stop at the first zero block.
                    return Err(self.bad(at, "a zero block followed by a header"));
                }
                self.ended = true;
                return Ok(None);
            }
            let h = Header::parse(&blk).map_err(|what| self.bad(at, what))?;
            match h.typeflag {
                b'x' | b'g' => {
                    let data = self.read_meta(h.size, at)?;
                    let records = parse_pax(&data).map_err(|what| self.bad(at, what))?;
                    if h.typeflag == b'g' {
                        // Go hands a global header to its caller; GNU tar and
                        // Python apply it to every later entry: only a comment
                        // (as `git archive` writes) means the same to all.
                        if pending || records.iter().any(|(k, _)| k != b"comment") {
                            return Err(self.bad(at, "a global PAX header that sets fields"));
                        }
                        continue;
                    }
                    if pax.replace(records).is_some() {
                        return Err(self.bad(at, "two PAX headers for one entry"));
                    }
                }
                b'L' | b'K' => {
                    let data = cut_nul(&self.read_meta(h.size, at)?).to_vec();
                    let slot = if h.typeflag == b'L' { &mut long_name } else { &mut long_link };
                    if slot.replace(data).is_some() {
                        return Err(self.bad(at, "two GNU long-name headers for one entry"));
                    }
                }
                _ => {
                    let entry = self.entry(h, at, pax.unwrap_or_default(), long_name, long_link)?;
                    return Ok(Some(entry));
                }
            }
        }
    }

    fn entry(
        &mut self,
        h: Header,
        at: u64,
        pax: PaxRecords,
        long_name: Option<Vec<u8>>,
        long_link: Option<Vec<u8>>,
    ) -> Result<Entry, SnapshotError> {
        let bad = |what: &str| SnapshotError::Tar { at, reason: what.to_owned() };
        let mut kind = match h.typeflag {
            b'0' | 0 | b'7' | b'S' => Kind::Regular,
            b'1' => Kind::Link,
            b'2' => Kind::Symlink,
            b'3' => Kind::Char,
            b'4' => Kind::Block,
            b'5' => Kind::Directory,
            b'6' => Kind::Fifo,
            t => return Err(bad(&format!("unsupported entry type {:?}", t as char))),
        };
        let mut path = h.name.clone();
        let mut link = h.link.clone();
        let mut size = h.size;
        let (mut uid, mut gid) = (h.uid, h.gid);
        let mut mtime = (h.mtime, 0i64);
        let mut xattrs = Vec::new();
        let mut sparse_name = None;
        let mut sparse_size = None;
        let (mut major, mut minor) = (None, None);
        let mut map01 = None;
        let mut map00: Vec<u64> = Vec::new();
        let mut pax_path = false;
        let mut pax_link = false;
        for (k, v) in &pax {
            let text = || std::str::from_utf8(v).map_err(|_| bad("a PAX value that is not text"));
            match k.as_slice() {
                b"path" | b"linkpath" => {
                    if v.is_empty() || v.contains(&0) {
                        return Err(bad("an empty PAX path or one with a NUL"));
                    }
                    if k == b"path" {
                        (path, pax_path) = (v.clone(), true);
                    } else {
                        (link, pax_link) = (v.clone(), true);
                    }
                }
                b"size" => size = decimal(v).ok_or_else(|| bad("a bad PAX size"))?,
                b"uid" => uid = decimal(v).ok_or_else(|| bad("a bad PAX uid"))?,
                b"gid" => gid = decimal(v).ok_or_else(|| bad("a bad PAX gid"))?,
                b"mtime" => mtime = pax_time(v).ok_or_else(|| bad("a bad PAX mtime"))?,
                b"atime" | b"ctime" => {
                    pax_time(v).ok_or_else(|| bad("a bad PAX time"))?;
                }
                b"uname" | b"gname" if v.contains(&0) => return Err(bad("a PAX user name with a NUL")),
                b"GNU.sparse.name" => sparse_name = Some(v.clone()),
                b"GNU.sparse.size" | b"GNU.sparse.realsize" => {
                    sparse_size = Some(decimal(v).ok_or_else(|| bad("a bad sparse size"))?)
                }
                b"GNU.sparse.major" => major = Some(text()?.to_owned()),
                b"GNU.sparse.minor" => minor = Some(text()?.to_owned()),
                b"GNU.sparse.map" => map01 = Some(text()?.to_owned()),
                b"GNU.sparse.offset" | b"GNU.sparse.numbytes" => {
                    map00.push(decimal(v).ok_or_else(|| bad("a bad sparse map"))?);
                }
                k if k.starts_with(b"SCHILY.xattr.") => {
                    let name = std::str::from_utf8(&k[13..]).map_err(|_| bad("a non-UTF-8 xattr name"))?;
                    if name.is_empty() {
                        return Err(bad("an empty xattr name"));
                    }
                    xattrs.push((name.to_owned(), v.clone()));
                }
                _ => {} // unknown keys mean nothing to any of the parsers
            }
        }
        if pax_path && long_name.is_some() {
            return Err(bad("both a PAX path and a GNU long name"));
        }
        if pax_link && long_link.is_some() {
            return Err(bad("both a PAX linkpath and a GNU long link"));
        }
        if let Some(n) = long_name {
            path = n;
        }
        if let Some(l) = long_link {
            link = l;
        }
        if let Some(n) = sparse_name {
            if pax_path && n != path {
                return Err(bad("a PAX path beside another sparse name"));
            }
            path = n;
        }
        let uid = u32::try_from(uid).ok().filter(|u| *u != u32::MAX).ok_or_else(|| bad("a uid out of range"))?;
        let gid = u32::try_from(gid).ok().filter(|g| *g != u32::MAX).ok_or_else(|| bad("a gid out of range"))?;
        if path.ends_with(b"/") && kind == Kind::Regular {
            // Legacy archives mark directories by the slash on an untyped entry.
            if h.typeflag == 0 && size == 0 {
                kind = Kind::Directory;
            } else {
                return Err(bad("a regular file named like a directory"));
            }
        }
        if kind != Kind::Regular && size != 0 {
            return Err(bad("data on an entry type that has none"));
        }

        // Sparse files: the map, the logical size, what is stored.
        let pax_sparse = major.is_some() || minor.is_some() || map01.is_some() || !map00.is_empty();
        let mut sparse = None;
        let mut logical = size;
        if h.typeflag == b'S' {
            if pax_sparse {
                return Err(bad("two sparse maps for one entry"));
            }
            // Extension blocks follow the header and are not part of its size.
            let mut map = h.old_sparse.clone();
            let mut more = h.old_extended;
            while more {
                let mut blk = [0u8; BLOCK];
                if !self.fill(&mut blk)? {
                    return Err(self.bad(self.offset, "the archive ends inside a sparse map"));
                }
                old_sparse_entries(&blk[..504], 21, &mut map).map_err(bad)?;
                more = blk[504] != 0;
                if map.len() as u64 > MAX_META / 24 {
                    return Err(bad("a sparse map too long"));
                }
            }
            logical = h.old_realsize;
            sparse = Some(map);
        }
        self.left = size;
        self.pad = padding(size);
        if pax_sparse {
            if kind != Kind::Regular {
                return Err(bad("a sparse map on an entry that is not a file"));
            }
            let map = match (major.as_deref(), minor.as_deref()) {
                (Some("1"), Some("0")) => self.sparse_map_1_0(at)?,
                (None, None) => match &map01 {
                    Some(m) => parse_list(m, b',').ok_or_else(|| bad("a bad sparse map"))?,
                    None => map00,
                },
                _ => return Err(bad("an unknown sparse format")),
            };
            if map.len() % 2 != 0 {
                return Err(bad("a sparse map with an odd count"));
            }
            logical = sparse_size.ok_or_else(|| bad("a sparse file without a size"))?;
            sparse = Some(map.chunks(2).map(|p| (p[0], p[1])).collect());
        }
        if let Some(map) = &sparse {
            validate_sparse(map, logical, self.left).map_err(bad)?;
        }
        Ok(Entry {
            path,
            link,
            kind,
            mode: (h.mode & 0o7777) as u32,
            uid,
            gid,
            mtime,
            dev: (h.devmajor, h.devminor),
            xattrs,
            size: logical,
            sparse,
        })
    }
}

fn padding(size: u64) -> u64 {
    (BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64
}
