//! Shared helpers for the snapshot engine's tests: root checks, real
//! overlay mounts, generated trees and mutation scripts, and an exact tree
//! comparison (content, type, mode, owner, mtime, xattrs, hardlink identity).
#![allow(dead_code, unreachable_pub)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::OsString;
use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};

pub mod parity;
use sha2::{Digest, Sha256};

/// Whether the test may run; without root it explains itself (and fails under CI).
pub fn have_root(test: &str) -> bool {
    vessel_test_support::have_root(test, "it needs overlay mounts, xattrs and chown")
}

/// A real overlay mount, unmounted on drop.
pub struct Overlay {
    pub merged: PathBuf,
    pub upper: PathBuf,
    pub work: PathBuf,
}

impl Overlay {
    /// Mounts `lowers` (topmost first) with a fresh upper dir under `dir`,
    /// with the options vessel uses: no redirect_dir, no metacopy, no index.
    pub fn new(dir: &Path, lowers: &[&Path]) -> Self {
        let (merged, upper, work) = (dir.join("merged"), dir.join("upper"), dir.join("work"));
        for d in [&merged, &upper, &work] {
            fs::create_dir_all(d).unwrap();
        }
        let lower: Vec<_> = lowers.iter().map(|l| l.to_str().unwrap()).collect();
        let opts = format!(
            "lowerdir={},upperdir={},workdir={},redirect_dir=off,metacopy=off,index=off",
            lower.join(":"),
            upper.display(),
            work.display()
        );
        mount(Some("overlay"), &merged, Some("overlay"), MsFlags::empty(), Some(opts.as_str())).expect("mount overlay");
        Self { merged, upper, work }
    }

    /// Mounts `lowers` read-only (no upper): how a stack of layers is viewed.
    pub fn read_only(dir: &Path, lowers: &[&Path]) -> ReadOnlyOverlay {
        let merged = dir.join("ro-merged");
        fs::create_dir_all(&merged).unwrap();
        let lower: Vec<_> = lowers.iter().map(|l| l.to_str().unwrap()).collect();
        let opts = format!("lowerdir={},redirect_dir=off,metacopy=off,index=off", lower.join(":"));
        mount(Some("overlay"), &merged, Some("overlay"), MsFlags::MS_RDONLY, Some(opts.as_str()))
            .expect("mount overlay");
        ReadOnlyOverlay { merged }
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        umount2(&self.merged, MntFlags::MNT_DETACH).expect("unmount overlay");
    }
}

pub struct ReadOnlyOverlay {
    pub merged: PathBuf,
}

impl Drop for ReadOnlyOverlay {
    fn drop(&mut self) {
        umount2(&self.merged, MntFlags::MNT_DETACH).expect("unmount overlay");
    }
}

/// Mount points under `dir` still mounted (the leak check).
pub fn mounts_under(dir: &Path) -> Vec<String> {
    vessel_test_support::shown(vessel_test_support::mounts_under(dir))
}

/// `cp -a`: a copy with owners, modes, times, xattrs and hardlinks.
pub fn copy_tree(from: &Path, to: &Path) {
    let st = std::process::Command::new("cp").arg("-a").arg(from).arg(to).status().unwrap();
    assert!(st.success(), "cp -a failed");
}

/// A seeded xorshift generator.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> Option<&'a T> {
        (!items.is_empty()).then(|| &items[self.below(items.len() as u64) as usize])
    }
}

/// Names that exercise the tar format: long (PAX), non-UTF-8, dotted.
pub fn name(rng: &mut Rng) -> OsString {
    let base = format!("n{}", rng.below(1_000_000));
    match rng.below(10) {
        0 => OsString::from(format!("{base}-{}", "x".repeat(120 + rng.below(100) as usize))),
        1 => {
            let mut v = base.into_bytes();
            v.extend_from_slice(b"-caf\xe9\xff");
            OsString::from_vec(v)
        }
        2 => OsString::from(format!(".{base}")),
        _ => OsString::from(base),
    }
}

fn set_time(path: &Path, secs: i64, nanos: i64) {
    let t = nix::sys::time::TimeSpec::new(secs, nanos);
    nix::sys::stat::utimensat(nix::fcntl::AT_FDCWD, path, &t, &t, nix::sys::stat::UtimensatFlags::NoFollowSymlink)
        .unwrap();
}

/// A generated tree of every kind of entry.
pub fn populate(root: &Path, rng: &mut Rng, entries: usize) {
    let mut dirs = vec![root.to_path_buf()];
    let mut files = Vec::new();
    for _ in 0..entries {
        let parent = rng.pick(&dirs).unwrap().clone();
        let p = parent.join(name(rng));
        if p.symlink_metadata().is_ok() {
            continue;
        }
        match rng.below(12) {
            0..=2 => {
                fs::create_dir(&p).unwrap();
                if parent.components().count() < root.components().count() + 4 {
                    dirs.push(p.clone());
                }
            }
            3..=6 => {
                let n = rng.below(3) as usize * rng.below(40_000) as usize;
                fs::write(&p, rng.bytes(n)).unwrap();
                files.push(p.clone());
            }
            7 => symlink(if rng.chance(50) { PathBuf::from("/bin/busybox") } else { PathBuf::from("../x/y") }, &p)
                .unwrap(),
            8 => {
                if let Some(f) = rng.pick(&files).cloned() {
                    fs::hard_link(&f, &p).unwrap();
                }
                continue;
            }
            9 => nix::unistd::mkfifo(&p, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap(),
            10 => {
                let mut f = fs::File::create(&p).unwrap();
                f.seek(SeekFrom::Start(4 << 20)).unwrap();
                f.write_all(b"sparse tail").unwrap();
                files.push(p.clone());
            }
            _ => {
                nix::sys::stat::mknod(
                    &p,
                    nix::sys::stat::SFlag::S_IFCHR,
                    nix::sys::stat::Mode::from_bits_truncate(0o666),
                    nix::sys::stat::makedev(1, 3),
                )
                .unwrap();
                continue;
            }
        }
        decorate(&p, rng);
    }
}

/// Random owner, mode, xattrs and a nanosecond mtime.
pub fn decorate(p: &Path, rng: &mut Rng) {
    let meta = p.symlink_metadata().unwrap();
    if rng.chance(30) {
        let id = |r: &mut Rng| nix::unistd::Uid::from_raw(1000 + r.below(5) as u32);
        nix::unistd::fchownat(
            nix::fcntl::AT_FDCWD,
            p,
            Some(id(rng)),
            Some(nix::unistd::Gid::from_raw(2000 + rng.below(5) as u32)),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .unwrap();
    }
    if !meta.file_type().is_symlink() {
        if rng.chance(40) && (meta.is_dir() || meta.is_file()) {
            let mode = if meta.is_dir() { 0o700 | rng.below(0o100) as u32 } else { rng.below(0o1000) as u32 | 0o600 };
            fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
        }
        // user.* xattrs exist only on files and directories.
        if rng.chance(30) && (meta.is_dir() || meta.is_file()) {
            let (key, len) = (rng.below(4), 1 + rng.below(40) as usize);
            xattr::set(p, format!("user.k{key}"), &rng.bytes(len)).unwrap();
        }
        if rng.chance(10) {
            xattr::set(p, "trusted.vessel-test", b"\x00binary\xff").unwrap();
        }
    }
    set_time(p, 1_600_000_000 + rng.below(100_000_000) as i64, rng.below(1_000_000_000) as i64);
}

/// Everything about one entry that a snapshot must preserve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub kind: &'static str,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: (i64, i64),
    pub content: String,
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    /// For multiply-linked files: every path of the link group.
    pub links: BTreeSet<PathBuf>,
}

/// A file's content hash, streamed; a file over 4 GiB (a sparse test file)
/// is hashed by its data segments and their offsets instead of its bytes.
pub fn content_hash(p: &Path, len: u64) -> String {
    let mut f = fs::File::open(p).unwrap();
    let mut h = Sha256::new();
    if len <= 4 << 30 {
        std::io::copy(&mut f, &mut h).unwrap();
        return format!("{:x}", h.finalize());
    }
    use nix::unistd::{Whence, lseek};
    use std::io::Read;
    let mut pos = 0i64;
    while let Ok(start) = lseek(&f, pos, Whence::SeekData) {
        let end = lseek(&f, start, Whence::SeekHole).unwrap();
        f.seek(SeekFrom::Start(start as u64)).unwrap();
        h.update(start.to_le_bytes());
        std::io::copy(&mut (&mut f).take((end - start) as u64), &mut h).unwrap();
        pos = end;
    }
    format!("sparse {len} {:x}", h.finalize())
}

/// The full state of a tree (its root excluded), keyed by relative path.
pub fn scan(root: &Path) -> BTreeMap<PathBuf, Node> {
    let mut out = BTreeMap::new();
    let mut groups: HashMap<(u64, u64), BTreeSet<PathBuf>> = HashMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().to_path_buf();
            let m = p.symlink_metadata().unwrap();
            let ft = m.file_type();
            let (kind, content) = if ft.is_dir() {
                stack.push(p.clone());
                ("dir", String::new())
            } else if ft.is_symlink() {
                ("symlink", fs::read_link(&p).unwrap().to_string_lossy().into_owned())
            } else if ft.is_file() {
                ("file", content_hash(&p, m.len()))
            } else if ft.is_fifo() {
                ("fifo", String::new())
            } else if ft.is_char_device() {
                ("char", m.rdev().to_string())
            } else {
                ("other", String::new())
            };
            if !ft.is_dir() && m.nlink() > 1 {
                groups.entry((m.dev(), m.ino())).or_default().insert(rel.clone());
            }
            let xattrs = xattr::list(&p)
                .unwrap()
                .filter(|n| !n.as_bytes().starts_with(b"trusted.overlay."))
                .map(|n| {
                    let v = xattr::get(&p, &n).unwrap().unwrap_or_default();
                    (n.as_bytes().to_vec(), v)
                })
                .collect();
            out.insert(
                rel,
                Node {
                    kind,
                    mode: m.mode() & 0o7777,
                    uid: m.uid(),
                    gid: m.gid(),
                    mtime: (m.mtime(), m.mtime_nsec()),
                    content,
                    xattrs,
                    links: BTreeSet::new(),
                },
            );
        }
    }
    for group in groups.into_values().filter(|g| g.len() > 1) {
        for p in &group {
            out.get_mut(p).unwrap().links = group.clone();
        }
    }
    out
}

/// Asserts two scans are identical, naming the first differences.
pub fn assert_same(expected: &BTreeMap<PathBuf, Node>, actual: &BTreeMap<PathBuf, Node>, what: &str) {
    let mut diffs = Vec::new();
    for (p, e) in expected {
        match actual.get(p) {
            None => diffs.push(format!("missing {}", p.display())),
            Some(a) if a != e => diffs.push(format!("{}:\n  expected {e:?}\n  actual   {a:?}", p.display())),
            _ => {}
        }
    }
    for p in actual.keys().filter(|p| !expected.contains_key(*p)) {
        diffs.push(format!("unexpected {}", p.display()));
    }
    assert!(
        diffs.is_empty(),
        "{what}: {} differences, first ones:\n{}",
        diffs.len(),
        diffs.iter().take(8).cloned().collect::<Vec<_>>().join("\n")
    );
}

/// Every path under `root` (root excluded), for picking mutation targets.
pub fn paths(root: &Path) -> Vec<PathBuf> {
    let mut out: Vec<_> = scan_paths(root);
    out.sort();
    out
}

fn scan_paths(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.symlink_metadata().unwrap().is_dir() {
                stack.push(p.clone());
            }
            out.push(p);
        }
    }
    out
}

/// How many kinds of change [`mutate_op`] makes.
pub const MUTATIONS: u64 = 14;

/// One random change through the merged mount, as an agent's command would make it.
pub fn mutate(m: &Path, rng: &mut Rng) {
    mutate_op(m, None, rng);
}

/// One change of kind `op` (`0..MUTATIONS`; `None`: a random kind), its
/// targets picked by `rng`.
pub fn mutate_op(m: &Path, op: Option<u64>, rng: &mut Rng) {
    let all = paths(m);
    let dirs: Vec<_> =
        std::iter::once(m.to_path_buf()).chain(all.iter().filter(|p| p.is_dir() && !p.is_symlink()).cloned()).collect();
    let files: Vec<_> = all.iter().filter(|p| p.symlink_metadata().unwrap().is_file()).cloned().collect();
    let dir = rng.pick(&dirs).unwrap().clone();
    match op.unwrap_or_else(|| rng.below(MUTATIONS)) {
        0 | 1 => {
            let p = dir.join(name(rng));
            if p.symlink_metadata().is_err() {
                let len = rng.below(20_000) as usize;
                fs::write(&p, rng.bytes(len)).unwrap();
                decorate(&p, rng);
            }
        }
        2 => {
            if let Some(f) = rng.pick(&files) {
                let mut h = fs::OpenOptions::new().append(true).open(f).unwrap();
                h.write_all(&rng.bytes(100)).unwrap();
            }
        }
        3 => {
            if let Some(p) = rng.pick(&all).filter(|p| !p.is_dir() || p.is_symlink()) {
                fs::remove_file(p).unwrap();
            }
        }
        4 => {
            // Deep delete.
            if let Some(d) = rng.pick(&dirs[1..]) {
                fs::remove_dir_all(d).unwrap();
            }
        }
        5 => {
            // Delete and recreate a directory: overlay makes it opaque.
            if let Some(d) = rng.pick(&dirs[1..]).cloned() {
                fs::remove_dir_all(&d).unwrap();
                fs::create_dir(&d).unwrap();
                fs::write(d.join("fresh"), b"new content").unwrap();
                decorate(&d, rng);
            }
        }
        6 => {
            // Rename a file over another.
            if let (Some(a), Some(b)) = (rng.pick(&files).cloned(), rng.pick(&files).cloned())
                && a != b
            {
                fs::rename(&a, &b).unwrap();
            }
        }
        7 => {
            // Metadata only: chmod/chown/xattr/mtime.
            if let Some(p) = rng.pick(&all) {
                decorate(p, rng);
            }
        }
        8 => {
            // A hardlink, often to a file that lives in the lower.
            if let Some(f) = rng.pick(&files) {
                let p = dir.join(name(rng));
                if p.symlink_metadata().is_err() {
                    fs::hard_link(f, &p).unwrap();
                }
            }
        }
        9 => {
            let p = dir.join(name(rng));
            if p.symlink_metadata().is_err() {
                symlink("target/of/a/link", &p).unwrap();
            }
        }
        10 => {
            let p = dir.join(name(rng));
            if p.symlink_metadata().is_err() {
                fs::create_dir(&p).unwrap();
                decorate(&p, rng);
            }
        }
        11 => {
            // Remove an xattr.
            if let Some(p) = rng.pick(&all).filter(|p| !p.is_symlink())
                && let Some(n) = xattr::list(p).unwrap().find(|n| n.as_bytes().starts_with(b"user."))
            {
                xattr::remove(p, n).unwrap();
            }
        }
        12 => {
            // A file replaced by a directory of the same name.
            if let Some(f) = rng.pick(&files) {
                fs::remove_file(f).unwrap();
                fs::create_dir(f).unwrap();
                fs::write(f.join("inner"), b"x").unwrap();
            }
        }
        _ => {
            let p = dir.join(name(rng));
            if p.symlink_metadata().is_err() {
                let mut f = fs::File::create(&p).unwrap();
                f.seek(SeekFrom::Start(2 << 20)).unwrap();
                f.write_all(b"sparse").unwrap();
            }
        }
    }
}

/// One hand-made tar header block, for archives no well-behaved writer makes.
#[derive(Clone)]
pub struct Block(pub [u8; 512]);

impl Block {
    /// A ustar header: `typeflag`, `name`, octal `size`, mode 0644, ids 0, mtime 1.7e9.
    pub fn ustar(typeflag: u8, name: &[u8], size: u64) -> Self {
        let mut b = Self([0; 512]);
        b.set(0, name);
        b.octal(100, 8, 0o644);
        b.octal(108, 8, 0);
        b.octal(116, 8, 0);
        b.octal(124, 12, size);
        b.octal(136, 12, 1_700_000_000);
        b.0[156] = typeflag;
        b.set(257, b"ustar\0");
        b.set(263, b"00");
        b
    }

    /// The same with the old GNU magic (no prefix field).
    pub fn gnu(typeflag: u8, name: &[u8], size: u64) -> Self {
        let mut b = Self::ustar(typeflag, name, size);
        b.set(257, b"ustar ");
        b.set(263, b" \0");
        b
    }

    pub fn set(&mut self, at: usize, bytes: &[u8]) -> &mut Self {
        self.0[at..at + bytes.len()].copy_from_slice(bytes);
        self
    }

    /// An octal field of `len` bytes, NUL-terminated.
    pub fn octal(&mut self, at: usize, len: usize, v: u64) -> &mut Self {
        let s = format!("{v:0w$o}\0", w = len - 1);
        self.0[at..at + len].copy_from_slice(s.as_bytes());
        self
    }

    /// A base-256 field (two's complement; negative values too).
    pub fn base256(&mut self, at: usize, len: usize, v: i64) -> &mut Self {
        let bytes = v.to_be_bytes();
        let fill = if v < 0 { 0xff } else { 0 };
        for i in 0..len {
            self.0[at + i] = if i + 8 >= len { bytes[i + 8 - len] } else { fill };
        }
        self.0[at] = if v < 0 { 0xff } else { 0x80 };
        self
    }

    /// Seals the header with its checksum (unsigned sum, as every writer).
    pub fn sealed(mut self) -> Vec<u8> {
        self.0[148..156].fill(b' ');
        let sum: u32 = self.0.iter().map(|b| u32::from(*b)).sum();
        self.octal(148, 7, u64::from(sum));
        self.0[155] = b' ';
        self.0.to_vec()
    }

    /// Seals with the signed sum, as some old writers did.
    pub fn sealed_signed(mut self) -> Vec<u8> {
        self.0[148..156].fill(b' ');
        let sum: i32 = self.0.iter().map(|b| i32::from(*b as i8)).sum();
        self.octal(148, 7, sum as u64);
        self.0[155] = b' ';
        self.0.to_vec()
    }
}

/// `data` padded with zeros to a whole number of blocks.
pub fn padded(data: &[u8]) -> Vec<u8> {
    let mut v = data.to_vec();
    v.resize(data.len().div_ceil(512) * 512, 0);
    v
}

/// PAX records, `"<len> <key>=<value>\n"` each.
pub fn pax_data(records: &[(&str, &[u8])]) -> Vec<u8> {
    let mut data = Vec::new();
    for (k, v) in records {
        let body = [k.as_bytes(), b"=", v, b"\n"].concat();
        let mut len = body.len() + 2;
        while format!("{len} ").len() + body.len() != len {
            len += 1;
        }
        data.extend_from_slice(format!("{len} ").as_bytes());
        data.extend_from_slice(&body);
    }
    data
}

/// A PAX extended header (typeflag `x` or `g`) with its records, as blocks.
pub fn pax_header(typeflag: u8, records: &[(&str, &[u8])]) -> Vec<u8> {
    let data = pax_data(records);
    [Block::ustar(typeflag, b"PaxHeaders/x", data.len() as u64).sealed(), padded(&data)].concat()
}

/// A regular file entry with `data`.
pub fn file_entry(name: &[u8], data: &[u8]) -> Vec<u8> {
    [Block::ustar(b'0', name, data.len() as u64).sealed(), padded(data)].concat()
}

/// The end-of-archive marker.
pub fn end_blocks() -> Vec<u8> {
    vec![0; 1024]
}
