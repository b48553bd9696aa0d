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

use crate::SnapshotError;

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

/// PAX records as (key, value), in archive order.
type PaxRecords = Vec<(Vec<u8>, Vec<u8>)>;

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

    /// Reads the PAX 1.0 sparse map at the start of the data: decimal
    /// numbers, one a line, the count first, padded to a block.
    fn sparse_map_1_0(&mut self, at: u64) -> Result<Vec<u64>, SnapshotError> {
        let mut text = Vec::new();
        let mut lines = 0u64;
        let mut want: Option<u64> = None;
        loop {
            if want.is_some_and(|w| lines >= w) {
                break;
            }
            if self.left < BLOCK as u64 || text.len() as u64 >= MAX_META {
                return Err(self.bad(at, "a bad sparse map"));
            }
            let mut blk = [0u8; BLOCK];
            if !self.fill(&mut blk)? {
                return Err(self.bad(self.offset, "the archive ends inside a sparse map"));
            }
            self.left -= BLOCK as u64;
            for &b in &blk {
                if want.is_some_and(|w| lines >= w) {
                    break;
                }
                text.push(b);
                if b == b'\n' {
                    lines += 1;
                    if want.is_none() {
                        let count = decimal(&text[..text.len() - 1]).ok_or_else(|| self.bad(at, "a bad sparse map"))?;
                        want = Some(
                            count
                                .checked_mul(2)
                                .and_then(|c| c.checked_add(1))
                                .ok_or_else(|| self.bad(at, "a bad sparse map"))?,
                        );
                    }
                }
            }
        }
        let mut numbers: Vec<u64> = Vec::new();
        for line in text.split(|b| *b == b'\n').skip(1).take(want.unwrap_or(1) as usize - 1) {
            numbers.push(decimal(line).ok_or_else(|| self.bad(at, "a bad sparse map"))?);
        }
        Ok(numbers)
    }
}

fn padding(size: u64) -> u64 {
    (BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64
}

fn cut_nul(v: &[u8]) -> &[u8] {
    v.iter().position(|b| *b == 0).map_or(v, |i| &v[..i])
}

/// Decimal digits only (Go also takes a sign; a negative value is refused by all).
fn decimal(v: &[u8]) -> Option<u64> {
    if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// `[-]secs[.frac]`, as Go parses PAX times; the fraction is cut to nanoseconds.
pub(crate) fn pax_time(v: &[u8]) -> Option<(i64, i64)> {
    let s = std::str::from_utf8(v).ok()?;
    let (secs, frac) = s.split_once('.').unwrap_or((s, ""));
    let digits = secs.strip_prefix('-').unwrap_or(secs);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let secs: i64 = secs.parse().ok()?;
    let mut nanos: i64 = 0;
    for (i, d) in frac.bytes().take(9).enumerate() {
        nanos += i64::from(d - b'0') * 10i64.pow(8 - i as u32);
    }
    if s.starts_with('-') && nanos > 0 {
        // -1.25 is 1.25 s before the epoch: -2 s + 0.75 s.
        return Some((secs.checked_sub(1)?, 1_000_000_000 - nanos));
    }
    Some((secs, nanos))
}

fn parse_list(s: &str, sep: u8) -> Option<Vec<u64>> {
    if s.is_empty() {
        return Some(Vec::new());
    }
    s.as_bytes().split(|b| *b == sep).map(decimal).collect()
}

/// Segments are sorted, disjoint, inside the file, and hold exactly the stored data.
fn validate_sparse(map: &[(u64, u64)], logical: u64, stored: u64) -> Result<(), &'static str> {
    let mut end = 0u64;
    let mut total = 0u64;
    for &(off, len) in map {
        let seg_end = off.checked_add(len).ok_or("a sparse segment past the end of the file")?;
        if off < end {
            return Err("sparse segments that overlap or are out of order");
        }
        if seg_end > logical {
            return Err("a sparse segment past the end of the file");
        }
        end = seg_end;
        total = total.checked_add(len).ok_or("a sparse map that does not match the data")?;
    }
    if total != stored {
        return Err("a sparse map that does not match the data");
    }
    if end != logical {
        // GNU tar sizes the file by its map's end, Go and Python by the
        // recorded size; GNU's writers end every map at the size.
        return Err("a sparse map that ends before the file does");
    }
    Ok(())
}

/// Old GNU sparse slots (12-byte offset, 12-byte length); stops at the
/// first empty slot, as Go does.
fn old_sparse_entries(area: &[u8], slots: usize, out: &mut Vec<(u64, u64)>) -> Result<(), &'static str> {
    for i in 0..slots {
        let slot = &area[i * 24..i * 24 + 24];
        if slot[0] == 0 {
            break;
        }
        let off = number(&slot[..12])?;
        let len = number(&slot[12..])?;
        out.push((off, len));
    }
    Ok(())
}

/// One header block, parsed.
#[derive(Debug, Clone)]
struct Header {
    name: Vec<u8>,
    link: Vec<u8>,
    typeflag: u8,
    mode: u64,
    uid: u64,
    gid: u64,
    size: u64,
    mtime: i64,
    devmajor: u32,
    devminor: u32,
    old_sparse: Vec<(u64, u64)>,
    old_extended: bool,
    old_realsize: u64,
}

impl Header {
    fn parse(b: &[u8; BLOCK]) -> Result<Self, &'static str> {
        let stored = number(&b[148..156]).map_err(|_| "a bad header checksum field")?;
        let (mut unsigned, mut signed) = (0u64, 0i64);
        for (i, byte) in b.iter().enumerate() {
            let byte = if (148..156).contains(&i) { b' ' } else { *byte };
            unsigned += u64::from(byte);
            signed += i64::from(byte as i8);
        }
        if stored != unsigned && i64::try_from(stored).ok() != Some(signed) {
            return Err("a bad header checksum");
        }
        let ustar = &b[257..263] == b"ustar\0" && &b[263..265] == b"00";
        let gnu = &b[257..263] == b"ustar " && &b[263..265] == b" \0";
        let typeflag = b[156];
        let mut name = cut_nul(&b[0..100]).to_vec();
        if ustar {
            let prefix = cut_nul(&b[345..500]);
            if &b[508..512] == b"tar\0" && cut_nul(&b[345..476]) != prefix {
                return Err("a star prefix that parsers read differently");
            }
            if !prefix.is_empty() {
                name = [prefix, b"/", &name].concat();
            }
        } else if typeflag != b'S' && b[345..500].iter().any(|x| *x != 0) {
            // Python joins this area as a ustar prefix whatever the magic; Go does not.
            return Err("a prefix area that parsers read differently");
        }
        let size = number(&b[124..136]).map_err(|_| "a bad size")?;
        let mut h = Self {
            name,
            link: cut_nul(&b[157..257]).to_vec(),
            typeflag,
            mode: number(&b[100..108]).map_err(|_| "a bad mode")?,
            uid: number(&b[108..116]).map_err(|_| "a bad uid")?,
            gid: number(&b[116..124]).map_err(|_| "a bad gid")?,
            size,
            mtime: signed_number(&b[136..148]).ok_or("a bad mtime")?,
            devmajor: 0,
            devminor: 0,
            old_sparse: Vec::new(),
            old_extended: false,
            old_realsize: 0,
        };
        if ustar || gnu {
            let dev = |f: &[u8]| number(f).ok().and_then(|n| u32::try_from(n).ok()).ok_or("a bad device number");
            h.devmajor = dev(&b[329..337])?;
            h.devminor = dev(&b[337..345])?;
        }
        if typeflag == b'S' {
            if !gnu {
                return Err("a GNU sparse entry without the GNU magic");
            }
            old_sparse_entries(&b[386..482], 4, &mut h.old_sparse)?;
            h.old_extended = b[482] != 0;
            h.old_realsize = number(&b[483..495]).map_err(|_| "a bad sparse size")?;
        }
        Ok(h)
    }
}

/// A non-negative numeric field: octal (spaces and NULs around it, as Go
/// trims them) or base-256.
fn number(f: &[u8]) -> Result<u64, &'static str> {
    match signed_number(f) {
        Some(n) if n >= 0 => Ok(n as u64),
        Some(_) => Err("a negative number"),
        None => Err("a bad number"),
    }
}

fn signed_number(f: &[u8]) -> Option<i64> {
    if f[0] & 0x80 != 0 {
        // Base-256, two's complement: 0x80 marks positive, 0xff negative.
        let neg = f[0] & 0x40 != 0;
        let inv = if neg { 0xff } else { 0 };
        let mut n: u64 = 0;
        for (i, byte) in f.iter().enumerate() {
            let mut byte = *byte ^ inv;
            if i == 0 {
                byte &= 0x7f;
            }
            if n >> 56 != 0 {
                return None;
            }
            n = n << 8 | u64::from(byte);
        }
        if n >> 63 != 0 {
            return None;
        }
        return Some(if neg { -(n as i64) - 1 } else { n as i64 });
    }
    let t = trim(f);
    if t.is_empty() {
        return Some(0);
    }
    if !t.iter().all(|b| (b'0'..=b'7').contains(b)) {
        return None;
    }
    i64::from_str_radix(std::str::from_utf8(t).ok()?, 8).ok()
}

fn trim(f: &[u8]) -> &[u8] {
    let pad = |b: &u8| *b == b' ' || *b == 0;
    let start = f.iter().position(|b| !pad(b)).unwrap_or(f.len());
    let end = f.iter().rposition(|b| !pad(b)).map_or(start, |i| i + 1);
    &f[start..end]
}

/// PAX records, `"<len> <key>=<value>\n"`, split by their declared length so
/// values may hold any byte.
fn parse_pax(mut data: &[u8]) -> Result<PaxRecords, &'static str> {
    let mut out = Vec::new();
    while !data.is_empty() {
        let sp = data.iter().position(|b| *b == b' ').ok_or("a malformed PAX record")?;
        let len = decimal(&data[..sp]).and_then(|l| usize::try_from(l).ok()).ok_or("a malformed PAX record")?;
        if len <= sp + 1 || len > data.len() || data[len - 1] != b'\n' {
            return Err("a malformed PAX record");
        }
        let record = &data[sp + 1..len - 1];
        let eq = record.iter().position(|b| *b == b'=').ok_or("a malformed PAX record")?;
        if eq == 0 || record[..eq].contains(&0) {
            return Err("a malformed PAX key");
        }
        out.push((record[..eq].to_vec(), record[eq + 1..].to_vec()));
        data = &data[len..];
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_records_are_split_by_length() {
        let mut data = Vec::new();
        for (k, v) in
            [(&b"path"[..], &b"a/b"[..]), (b"SCHILY.xattr.user.x", b"line1\nline2\0= \xff"), (b"mtime", b"1.5")]
        {
            let body = [k, b"=", v, b"\n"].concat();
            let mut len = body.len() + 2;
            while format!("{len} ").len() + body.len() != len {
                len += 1;
            }
            data.extend_from_slice(format!("{len} ").as_bytes());
            data.extend_from_slice(&body);
        }
        let recs = parse_pax(&data).unwrap();
        assert_eq!(recs[1], (b"SCHILY.xattr.user.x".to_vec(), b"line1\nline2\0= \xff".to_vec()));
        assert_eq!(recs.len(), 3);
        assert!(parse_pax(b"99 path=x\n").is_err(), "length past the end");
        assert!(parse_pax(b"10 pathx\n").is_err(), "no '='");
        assert!(parse_pax(b"x path=y\n").is_err(), "no length");
        assert!(parse_pax(b"7 =abc\n").is_err(), "empty key");
    }

    #[test]
    fn pax_times_parse_as_go_does() {
        assert_eq!(pax_time(b"1700000000.123456789"), Some((1_700_000_000, 123_456_789)));
        assert_eq!(pax_time(b"5.5"), Some((5, 500_000_000)));
        assert_eq!(pax_time(b"7"), Some((7, 0)));
        assert_eq!(pax_time(b"-1.25"), Some((-2, 750_000_000)));
        assert_eq!(pax_time(b"1.0000000019"), Some((1, 1)), "cut to nanoseconds");
        for bad in [&b"x"[..], b"1e9", b"", b"-", b"1.-5", b"+1", b"99999999999999999999", b"-9223372036854775808.1"] {
            assert_eq!(pax_time(bad), None, "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn numbers_are_octal_or_base_256() {
        assert_eq!(number(b"0000644\0"), Ok(0o644));
        assert_eq!(number(b"  644 \0"), Ok(0o644));
        assert_eq!(number(b"\0\0\0\0"), Ok(0));
        assert!(number(b"12\x0034 ").is_err(), "an embedded NUL");
        assert!(number(b"0000009\0").is_err(), "not octal");
        assert!(number(b"+000001\0").is_err(), "a sign");
        let mut f = [0u8; 12];
        f[0] = 0x80;
        f[11] = 5;
        assert_eq!(number(&f), Ok(5));
        assert_eq!(signed_number(&[0xff; 12]), Some(-1));
        assert!(number(&[0xff; 12]).is_err(), "negative");
        let mut huge = [0xffu8; 12];
        huge[0] = 0x80;
        assert_eq!(signed_number(&huge), None, "past i64");
    }

    #[test]
    fn sparse_maps_are_checked() {
        assert_eq!(validate_sparse(&[(0, 5), (10, 5), (20, 0)], 20, 10), Ok(()));
        assert!(validate_sparse(&[(0, 5), (3, 5)], 8, 10).is_err(), "overlap");
        assert!(validate_sparse(&[(10, 5), (0, 5)], 15, 10).is_err(), "order");
        assert!(validate_sparse(&[(0, 5)], 20, 5).is_err(), "ends early");
        assert!(validate_sparse(&[(0, 5)], 5, 6).is_err(), "data left over");
        assert!(validate_sparse(&[(u64::MAX, 5)], 5, 5).is_err(), "overflow");
    }
}
