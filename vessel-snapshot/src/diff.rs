//! Overlay upper dir -> OCI image layer tar (image-spec `layer.md`).
//!
//! Only the upper dir is read, so a snapshot costs what changed, not the size
//! of the workspace (containerd's walking differ compares the whole merged
//! tree with the lower). The walk is sorted and every header field is fixed,
//! so the same tree always yields the same bytes, hence the same digest.
//!
//! Overlay's on-disk vocabulary is translated to OCI's:
//! - a 0/0 character device, or a zero-size file carrying
//!   `trusted.overlay.whiteout`, is a deletion: `.wh.NAME`;
//! - a directory with `trusted.overlay.opaque` = `y` replaces the lower one:
//!   the directory, then `DIR/.wh..wh..opq`;
//! - `trusted.overlay.*` is overlay's bookkeeping (vessel mounts without
//!   `userxattr`) and is not archived; every other xattr is, as PAX
//!   `SCHILY.xattr.*`. `user.overlay.*` included: on such a mount it is a
//!   container's own data (anyone may set it), and reading it as a marker
//!   would let a command forge an opaque directory or a whiteout. Rootless
//!   (in a user namespace, mounts with `userxattr`) it is the other way
//!   round: `user.overlay.*` is the bookkeeping, and what a container sets
//!   as `user.overlay.X` overlay stores escaped, `user.overlay.overlay.X`
//!   (Linux 6.7), archived unescaped as the data it is; `trusted.*` is
//!   invisible there;
//! - another device node cannot be archived: [`write_diff`] refuses it
//!   ([`SnapshotError::DeviceNode`]) before the layer is complete, so no
//!   snapshot holds a host device (flattening, which copies image layers
//!   that may, uses [`write_diff_with`] and allows them);
//! - `redirect_dir` and `metacopy` make the upper dir mean something a layer
//!   cannot express (a renamed dir, a file whose data is in the lower), so
//!   they are refused; vessel mounts with both off.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::{self, File, Metadata};
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use tar::{EntryType, Header};

use crate::SnapshotError;

/// What a diff produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiffStats {
    /// `sha256:<hex>` of the uncompressed tar stream.
    pub digest: String,
    /// Byte length of the uncompressed tar stream.
    pub size: u64,
    /// Number of tar entries written (whiteouts and opaque markers included).
    pub entries: u64,
}

pub(crate) const WHITEOUT_PREFIX: &str = ".wh.";
pub(crate) const OPAQUE_MARKER: &str = ".wh..wh..opq";

/// How to diff: what [`write_diff`] assumes, unless told otherwise.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiffOptions {
    /// Archive character and block devices instead of refusing them (for
    /// trees made from trusted image layers only).
    pub allow_devices: bool,
}
const USTAR_NAME_LEN: usize = 100;

/// Hashes and counts what passes through to the inner writer.
#[derive(Debug)]
pub(crate) struct DigestWriter<W> {
    inner: W,
    hasher: Sha256,
    size: u64,
}

impl<W: Write> DigestWriter<W> {
    pub(crate) fn new(inner: W) -> Self {
        Self { inner, hasher: Sha256::new(), size: 0 }
    }

    pub(crate) fn finish(self) -> (W, String, u64) {
        (self.inner, format!("sha256:{:x}", self.hasher.finalize()), self.size)
    }
}

impl<W: Write> Write for DigestWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Writes the OCI layer diff of the overlay upper dir `upper` into `out`.
///
/// Memory stays bounded (files are streamed); `out` sees the uncompressed tar,
/// so wrap it in a compressor to store it compressed. The digest and size in
/// the result are those of the uncompressed stream, as OCI's `diff_id`.
pub fn write_diff<W: Write>(upper: &Path, out: W) -> Result<(W, DiffStats), SnapshotError> {
    write_diff_with(upper, out, DiffOptions::default())
}

/// [`write_diff`] with options.
pub fn write_diff_with<W: Write>(upper: &Path, out: W, opts: DiffOptions) -> Result<(W, DiffStats), SnapshotError> {
    write_diff_gone(upper, out, opts, &[])
}

/// [`write_diff_with`], then a whiteout for each path of `gone` (relative,
/// from [`vanished`]): the diff of an upper dir that earlier snapshots of
/// the same mount already sealed without emptying it (a live sandbox's),
/// which must also delete what those snapshots added and is gone since.
pub fn write_diff_gone<W: Write>(
    upper: &Path,
    out: W,
    opts: DiffOptions,
    gone: &[Vec<u8>],
) -> Result<(W, DiffStats), SnapshotError> {
    // Headers are 512-byte writes: batch them before they reach a compressor.
    let out = DigestWriter::new(BufWriter::with_capacity(1 << 20, out));
    let mut walker = Walker { out, links: HashMap::new(), entries: 0, buf: vec![0; 256 * 1024], opts };
    walker.walk_dir(upper, &[])?;
    // Each one's parent is in the upper dir (overlay copied it up when
    // the path was made), so it is in the archive already.
    for path in gone {
        let (parent, name) = match path.iter().rposition(|b| *b == b'/') {
            Some(i) => (&path[..i], &path[i + 1..]),
            None => (&path[..0], &path[..]),
        };
        walker.whiteout(parent, name)?;
    }
    // End of archive: two zero blocks.
    walker.out.write_all(&[0; 1024]).map_err(out_err)?;
    let Walker { out, entries, .. } = walker;
    let (out, digest, size) = out.finish();
    let out = out.into_inner().map_err(|e| out_err(e.into_error()))?;
    Ok((out, DiffStats { digest, size, entries }))
}

fn out_err(e: io::Error) -> SnapshotError {
    SnapshotError::Stream("diff output", e)
}

/// Encodes PAX records: `"<len> <key>=<value>\n"`, `len` counting itself.
fn pax_records(records: &[(String, &[u8])]) -> Vec<u8> {
    let mut data = Vec::new();
    for (key, value) in records {
        let rest = key.len() + value.len() + 3; // ' ', '=', '\n'
        let mut len = rest + 1;
        while len != rest + len.to_string().len() {
            len = rest + len.to_string().len();
        }
        data.extend_from_slice(len.to_string().as_bytes());
        data.push(b' ');
        data.extend_from_slice(key.as_bytes());
        data.push(b'=');
        data.extend_from_slice(value);
        data.push(b'\n');
    }
    data
}

struct Walker<W: Write> {
    out: DigestWriter<BufWriter<W>>,
    /// (dev, ino) of multiply-linked files already archived -> their tar path.
    links: HashMap<(u64, u64), Vec<u8>>,
    entries: u64,
    buf: Vec<u8>,
    opts: DiffOptions,
}

/// The topmost paths that `layers` (overlay-form layers sealed from
/// `upper` earlier in its life, each a snapshot of it then) hold and `upper`
/// no longer does: made since the mount's lowers and deleted since. Their
/// whiteouts make a diff of `upper` correct over the last of those layers.
/// When each layer was made with the whiteouts this gave for the ones
/// before it, the last alone is enough: it holds or whites out every path
/// an earlier one held.
pub fn vanished(upper: &Path, layers: &[PathBuf]) -> Result<Vec<Vec<u8>>, SnapshotError> {
    let mut gone = std::collections::BTreeSet::new();
    for layer in layers {
        vanished_in(layer, upper, &[], &mut gone)?;
    }
    Ok(gone.into_iter().collect())
}

fn vanished_in(
    layer: &Path,
    upper: &Path,
    rel: &[u8],
    gone: &mut std::collections::BTreeSet<Vec<u8>>,
) -> Result<(), SnapshotError> {
    for name in sorted_entries(layer)? {
        let (lpath, upath) = (layer.join(&name), upper.join(&name));
        let child = join(rel, name.as_bytes());
        let lmeta = fs::symlink_metadata(&lpath).map_err(SnapshotError::io("stat", &lpath))?;
        let umeta = match fs::symlink_metadata(&upath) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let (_, marks) = xattrs(&lpath)?;
                let whiteout = (lmeta.file_type().is_char_device() && lmeta.rdev() == 0)
                    || (marks.whiteout && lmeta.is_file() && lmeta.len() == 0);
                if !whiteout {
                    gone.insert(child);
                }
                continue;
            }
            Err(e) => return Err(SnapshotError::io("stat", &upath)(e)),
        };
        if lmeta.is_dir() && umeta.is_dir() && !xattrs(&upath)?.1.opaque {
            vanished_in(&lpath, &upath, &child, gone)?;
        }
    }
    Ok(())
}

pub(crate) fn sorted_entries(dir: &Path) -> Result<Vec<OsString>, SnapshotError> {
    let mut names = Vec::new();
    for e in fs::read_dir(dir).map_err(SnapshotError::io("read directory", dir))? {
        names.push(e.map_err(SnapshotError::io("read directory", dir))?.file_name());
    }
    names.sort_unstable_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    Ok(names)
}

/// xattrs as (name, value), sorted by name.
pub(crate) type Xattrs = Vec<(OsString, Vec<u8>)>;

/// The entry's xattrs, sorted by name, without overlay's own.
pub(crate) fn xattrs(path: &Path) -> Result<(Xattrs, OverlayMarks), SnapshotError> {
    let mut marks = OverlayMarks::default();
    let mut out = Vec::new();
    let names = match xattr::list(path) {
        Ok(n) => n,
        Err(e) if e.raw_os_error() == Some(nix::errno::Errno::EOPNOTSUPP as i32) => return Ok((out, marks)),
        Err(e) => return Err(SnapshotError::io("list xattrs of", path)(e)),
    };
    for name in names {
        let value = xattr::get(path, &name).map_err(SnapshotError::io("read xattr of", path))?;
        let value = value.unwrap_or_default();
        let raw = name.as_bytes();
        let prefix = crate::overlay_xattr_prefix().as_bytes();
        if let Some(own) = raw.strip_prefix(prefix) {
            if let Some(escaped) = own.strip_prefix(b"overlay.").filter(|_| prefix.starts_with(b"user.")) {
                // Rootless: what a container set as `user.overlay.X`,
                // which overlay stored escaped; data, archived as set.
                let mut name = prefix.to_vec();
                name.extend_from_slice(escaped);
                out.push((OsString::from_vec(name), value));
                continue;
            }
            match own {
                b"opaque" => marks.opaque = value == b"y",
                b"whiteout" => marks.whiteout = true,
                b"redirect" => marks.redirect = true,
                b"metacopy" => marks.metacopy = true,
                _ => {}
            }
            continue;
        }
        out.push((name, value));
    }
    out.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    Ok((out, marks))
}

#[derive(Debug, Default)]
pub(crate) struct OverlayMarks {
    pub(crate) opaque: bool,
    pub(crate) whiteout: bool,
    redirect: bool,
    metacopy: bool,
}

fn join(parent: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(parent.len() + name.len() + 1);
    if !parent.is_empty() {
        p.extend_from_slice(parent);
        p.push(b'/');
    }
    p.extend_from_slice(name);
    p
}

impl<W: Write> Walker<W> {
    fn walk_dir(&mut self, dir: &Path, rel: &[u8]) -> Result<(), SnapshotError> {
        for name in sorted_entries(dir)? {
            let path = dir.join(&name);
            let child = join(rel, name.as_bytes());
            let meta = fs::symlink_metadata(&path).map_err(SnapshotError::io("stat", &path))?;
            let ft = meta.file_type();
            if ft.is_socket() {
                continue;
            }
            if ft.is_char_device() && meta.rdev() == 0 {
                self.whiteout(rel, name.as_bytes())?;
                continue;
            }
            if (ft.is_char_device() || ft.is_block_device()) && !self.opts.allow_devices {
                return Err(SnapshotError::DeviceNode { path });
            }
            let (xattrs, marks) = xattrs(&path)?;
            if marks.redirect {
                return Err(SnapshotError::UnsupportedOverlayFeature { feature: "redirect_dir", path });
            }
            if marks.metacopy {
                return Err(SnapshotError::UnsupportedOverlayFeature { feature: "metacopy", path });
            }
            if marks.whiteout && ft.is_file() && meta.len() == 0 {
                self.whiteout(rel, name.as_bytes())?;
                continue;
            }
            self.entry(&path, &child, &meta, &xattrs)?;
            if ft.is_dir() {
                if marks.opaque {
                    self.marker(&join(&child, OPAQUE_MARKER.as_bytes()))?;
                }
                self.walk_dir(&path, &child)?;
            }
        }
        Ok(())
    }

    fn whiteout(&mut self, parent: &[u8], name: &[u8]) -> Result<(), SnapshotError> {
        let mut wh = WHITEOUT_PREFIX.as_bytes().to_vec();
        wh.extend_from_slice(name);
        self.marker(&join(parent, &wh))
    }

    /// A zero-size regular file with fixed metadata: whiteouts and opaque
    /// markers carry no information but their name, so their bytes never vary.
    fn marker(&mut self, path: &[u8]) -> Result<(), SnapshotError> {
        let mut h = Header::new_ustar();
        h.set_entry_type(EntryType::Regular);
        h.set_mode(0o644);
        h.set_size(0);
        h.set_mtime(0);
        self.append(h, path, None, &[], None, io::empty(), None)
    }

    fn entry(
        &mut self,
        path: &Path,
        rel: &[u8],
        meta: &Metadata,
        xattrs: &[(OsString, Vec<u8>)],
    ) -> Result<(), SnapshotError> {
        let mut h = Header::new_ustar();
        h.set_mode(meta.mode() & 0o7777);
        h.set_uid(u64::from(meta.uid()));
        h.set_gid(u64::from(meta.gid()));
        let (secs, nanos) = (meta.mtime(), meta.mtime_nsec());
        h.set_mtime(secs.max(0) as u64);
        let mtime = (nanos != 0 || secs < 0).then(|| pax_time(secs, nanos));
        h.set_size(0);
        let ft = meta.file_type();
        if ft.is_dir() {
            h.set_entry_type(EntryType::Directory);
            let mut p = rel.to_vec();
            p.push(b'/');
            return self.append(h, &p, None, xattrs, mtime, io::empty(), None);
        }
        if ft.is_symlink() {
            h.set_entry_type(EntryType::Symlink);
            let target = fs::read_link(path).map_err(SnapshotError::io("read link", path))?;
            return self.append(h, rel, Some(target.as_os_str().as_bytes()), xattrs, mtime, io::empty(), None);
        }
        if meta.nlink() > 1 && !ft.is_dir() {
            let key = (meta.dev(), meta.ino());
            if let Some(first) = self.links.get(&key).cloned() {
                h.set_entry_type(EntryType::Link);
                return self.append(h, rel, Some(&first), xattrs, mtime, io::empty(), None);
            }
            self.links.insert(key, rel.to_vec());
        }
        if ft.is_file() {
            h.set_entry_type(EntryType::Regular);
            h.set_size(meta.len());
            let file = File::open(path).map_err(SnapshotError::io("open", path))?;
            // Fewer blocks than bytes: there are holes worth keeping.
            if meta.blocks().saturating_mul(512) < meta.len() {
                let map = data_segments(&file, meta.len()).map_err(SnapshotError::io("map holes of", path))?;
                if map.iter().map(|s| s.1).sum::<u64>() < meta.len() {
                    return self.append_sparse(h, rel, xattrs, mtime, &file, &map, meta.len(), path);
                }
            }
            return self.append(h, rel, None, xattrs, mtime, file, Some(path));
        }
        if ft.is_fifo() {
            h.set_entry_type(EntryType::Fifo);
        } else if ft.is_char_device() || ft.is_block_device() {
            h.set_entry_type(if ft.is_char_device() { EntryType::Char } else { EntryType::Block });
            let rdev = meta.rdev();
            h.set_device_major(nix::sys::stat::major(rdev) as u32).map_err(out_err)?;
            h.set_device_minor(nix::sys::stat::minor(rdev) as u32).map_err(out_err)?;
        }
        self.append(h, rel, None, xattrs, mtime, io::empty(), None)
    }

    /// A sparse file in GNU's PAX 1.0 form (what `tar --sparse --format=pax`
    /// writes, and Go, Python and GNU tar read): the real name and size in
    /// PAX records, a stand-in name in the header, and as data the map
    /// (decimal, a number a line, padded to a block) then the data segments.
    #[allow(clippy::too_many_arguments)]
    fn append_sparse(
        &mut self,
        mut h: Header,
        rel: &[u8],
        xattrs: &[(OsString, Vec<u8>)],
        mtime: Option<String>,
        file: &File,
        map: &[(u64, u64)],
        size: u64,
        path: &Path,
    ) -> Result<(), SnapshotError> {
        let mut text = format!("{}\n", map.len() + 1);
        for (off, len) in map.iter().chain([&(size, 0)]) {
            text.push_str(&format!("{off}\n{len}\n"));
        }
        let mut text = text.into_bytes();
        text.resize(text.len().div_ceil(512) * 512, 0);
        let realsize = size.to_string();
        let mut pax: Vec<(String, &[u8])> = vec![
            ("GNU.sparse.major".into(), b"1"),
            ("GNU.sparse.minor".into(), b"0"),
            ("GNU.sparse.name".into(), rel),
            ("GNU.sparse.realsize".into(), realsize.as_bytes()),
        ];
        self.extend_pax(&mut pax, mtime.as_deref(), xattrs);
        self.write_pax(&pax)?;
        let (dir, base) = match rel.iter().rposition(|b| *b == b'/') {
            Some(i) => (&rel[..=i], &rel[i + 1..]),
            None => (&b""[..], rel),
        };
        set_raw(&mut h.as_old_mut().name, &[dir, b"GNUSparseFile.0/", base].concat());
        let stored: u64 = map.iter().map(|s| s.1).sum();
        h.set_size(text.len() as u64 + stored);
        h.set_cksum();
        self.out.write_all(h.as_bytes()).map_err(out_err)?;
        self.out.write_all(&text).map_err(out_err)?;
        for &(mut off, len) in map {
            let end = off + len;
            while off < end {
                let want = self.buf.len().min((end - off) as usize);
                let n = match file.read_at(&mut self.buf[..want], off) {
                    Ok(0) => return Err(SnapshotError::Changed { path: path.to_path_buf() }),
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(SnapshotError::io("read", path)(e)),
                };
                self.out.write_all(&self.buf[..n]).map_err(out_err)?;
                off += n as u64;
            }
        }
        self.pad(stored)?;
        self.entries += 1;
        Ok(())
    }

    fn extend_pax<'a>(
        &self,
        pax: &mut Vec<(String, &'a [u8])>,
        mtime: Option<&'a str>,
        xattrs: &'a [(OsString, Vec<u8>)],
    ) {
        if let Some(m) = mtime {
            pax.push(("mtime".into(), m.as_bytes()));
        }
        for (k, v) in xattrs {
            pax.push((format!("SCHILY.xattr.{}", String::from_utf8_lossy(k.as_bytes())), v));
        }
    }

    /// One PAX extended header holding `pax`, if there is anything to say.
    fn write_pax(&mut self, pax: &[(String, &[u8])]) -> Result<(), SnapshotError> {
        if pax.is_empty() {
            return Ok(());
        }
        let data = pax_records(pax);
        let mut x = Header::new_ustar();
        x.set_entry_type(EntryType::XHeader);
        x.set_size(data.len() as u64);
        x.set_mtime(0);
        x.set_mode(0o644);
        x.set_cksum();
        self.out.write_all(x.as_bytes()).map_err(out_err)?;
        self.out.write_all(&data).map_err(out_err)?;
        self.pad(data.len() as u64)?;
        self.entries += 1;
        Ok(())
    }

    /// Writes PAX records (when needed), the header and the data.
    #[allow(clippy::too_many_arguments)]
    fn append(
        &mut self,
        mut h: Header,
        path: &[u8],
        link: Option<&[u8]>,
        xattrs: &[(OsString, Vec<u8>)],
        mtime: Option<String>,
        data: impl Read,
        file: Option<&Path>,
    ) -> Result<(), SnapshotError> {
        let mut pax: Vec<(String, &[u8])> = Vec::new();
        if path.len() > USTAR_NAME_LEN || !path.is_ascii() {
            pax.push(("path".into(), path));
        }
        if let Some(l) = link
            && (l.len() > USTAR_NAME_LEN || !l.is_ascii())
        {
            pax.push(("linkpath".into(), l));
        }
        self.extend_pax(&mut pax, mtime.as_deref(), xattrs);
        self.write_pax(&pax)?;
        set_raw(&mut h.as_old_mut().name, path);
        if let Some(l) = link {
            set_raw(&mut h.as_old_mut().linkname, l);
        }
        h.set_cksum();
        let size = h.size().map_err(out_err)?;
        self.out.write_all(h.as_bytes()).map_err(out_err)?;
        let mut left = size;
        let mut data = data;
        while left > 0 {
            let want = self.buf.len().min(left as usize);
            let n = match data.read(&mut self.buf[..want]) {
                Ok(0) => return Err(SnapshotError::Changed { path: file.unwrap_or(Path::new("?")).to_path_buf() }),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(SnapshotError::io("read", file.unwrap_or(Path::new("?")))(e)),
            };
            self.out.write_all(&self.buf[..n]).map_err(out_err)?;
            left -= n as u64;
        }
        self.pad(size)?;
        self.entries += 1;
        Ok(())
    }

    /// Zero padding up to the next 512-byte block.
    fn pad(&mut self, size: u64) -> Result<(), SnapshotError> {
        let rem = (size % 512) as usize;
        if rem != 0 {
            self.out.write_all(&[0; 512][..512 - rem]).map_err(out_err)?;
        }
        Ok(())
    }
}

/// The data segments (offset, length) of a file, by `SEEK_DATA`/`SEEK_HOLE`.
fn data_segments(file: &File, size: u64) -> io::Result<Vec<(u64, u64)>> {
    use nix::unistd::{Whence, lseek};
    let mut map = Vec::new();
    let mut pos: i64 = 0;
    let size = i64::try_from(size).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
    while pos < size {
        let start = match lseek(file, pos, Whence::SeekData) {
            Ok(s) => s,
            Err(nix::errno::Errno::ENXIO) => break, // only a hole is left
            Err(e) => return Err(e.into()),
        };
        let end = lseek(file, start, Whence::SeekHole)?.min(size);
        if end > start {
            map.push((start as u64, (end - start) as u64));
        }
        pos = end;
    }
    Ok(map)
}

fn set_raw(field: &mut [u8], value: &[u8]) {
    let n = value.len().min(field.len());
    field.fill(0);
    field[..n].copy_from_slice(&value[..n]);
}

fn pax_time(secs: i64, nanos: i64) -> String {
    if secs < 0 && nanos > 0 {
        // PAX times are decimal: -1.25 is 1.25 s before the epoch.
        let (s, n) = (secs + 1, 1_000_000_000 - nanos);
        return format!("-{}.{n:09}", s.unsigned_abs());
    }
    format!("{secs}.{nanos:09}")
}
