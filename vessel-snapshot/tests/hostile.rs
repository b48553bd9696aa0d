//! Hostile archives: each case is refused with a typed error, and neither
//! the target nor anything outside it changes (merged and overlay modes).

mod common;

use std::fs;
use std::path::Path;

use common::*;
use tar::{EntryType, Header};
use vessel_snapshot::{ApplyMode, ApplyOptions, SnapshotErrorKind, apply_layer};

/// A raw tar writer: names go in verbatim, bypassing the tar crate's own checks.
struct Evil(tar::Builder<Vec<u8>>);

impl Evil {
    fn new() -> Self {
        Self(tar::Builder::new(Vec::new()))
    }
    fn header(kind: EntryType, name: &[u8], link: &[u8], size: u64) -> Header {
        let mut h = Header::new_ustar();
        h.set_entry_type(kind);
        h.set_mode(0o755);
        h.set_size(size);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        let old = h.as_old_mut();
        old.name[..name.len()].copy_from_slice(name);
        old.linkname[..link.len()].copy_from_slice(link);
        h.set_cksum();
        h
    }
    fn file(mut self, name: &str, body: &[u8]) -> Self {
        self.0.append(&Self::header(EntryType::Regular, name.as_bytes(), b"", body.len() as u64), body).unwrap();
        self
    }
    fn dir(mut self, name: &str) -> Self {
        self.0.append(&Self::header(EntryType::Directory, name.as_bytes(), b"", 0), &[][..]).unwrap();
        self
    }
    fn symlink(mut self, name: &str, target: &str) -> Self {
        self.0.append(&Self::header(EntryType::Symlink, name.as_bytes(), target.as_bytes(), 0), &[][..]).unwrap();
        self
    }
    fn hardlink(mut self, name: &str, target: &str) -> Self {
        self.0.append(&Self::header(EntryType::Link, name.as_bytes(), target.as_bytes(), 0), &[][..]).unwrap();
        self
    }
    fn device(mut self, name: &str) -> Self {
        let mut h = Self::header(EntryType::Char, name.as_bytes(), b"", 0);
        h.set_device_major(1).unwrap();
        h.set_device_minor(3).unwrap();
        h.set_cksum();
        self.0.append(&h, &[][..]).unwrap();
        self
    }
    fn pax(mut self, records: &[(&str, &[u8])]) -> Self {
        self.0.append_pax_extensions(records.iter().map(|(k, v)| (*k, *v))).unwrap();
        self
    }
    fn gnu_long_name(mut self, name: &str) -> Self {
        let mut h = Self::header(EntryType::GNULongName, b"././@LongLink", b"", name.len() as u64 + 1);
        h.set_cksum();
        self.0.append(&h, [name.as_bytes(), b"\0"].concat().as_slice()).unwrap();
        self
    }
    fn char_device(mut self, name: &str, major: u32, minor: u32) -> Self {
        let mut h = Self::header(EntryType::Char, name.as_bytes(), b"", 0);
        h.set_device_major(major).unwrap();
        h.set_device_minor(minor).unwrap();
        h.set_cksum();
        self.0.append(&h, &[][..]).unwrap();
        self
    }
    fn bytes(self) -> Vec<u8> {
        self.0.into_inner().unwrap()
    }
}

/// Applies `archive` in both modes and checks the refusal and that nothing changed.
fn refused(case: &str, why: &str, archive: &[u8], opts: &ApplyOptions) {
    let dir = tempfile::tempdir().unwrap();
    let outside = dir.path().join("outside");
    fs::create_dir_all(outside.join("sub")).unwrap();
    fs::write(outside.join("secret"), b"host data").unwrap();
    let parent = dir.path().join("work");
    let target = parent.join("target");
    fs::create_dir_all(target.join("existing")).unwrap();
    fs::write(target.join("keep"), b"keep me").unwrap();
    // Relative escapes from the target reach `outside` through these.
    std::os::unix::fs::symlink(&outside, parent.join("outside-link")).unwrap();
    let before = (scan(&outside), scan(&parent));

    for mode in [ApplyMode::Merged, ApplyMode::Overlay] {
        let mut o = opts.clone();
        o.mode = mode;
        let dest = if mode == ApplyMode::Merged { target.clone() } else { parent.join("new-layer") };
        let err = apply_layer(archive, &dest, &o).expect_err(&format!("{case} ({mode:?}) must be refused"));
        assert_eq!(err.kind(), SnapshotErrorKind::InvalidData, "{case} ({mode:?}): {err}");
        assert!(err.to_string().contains(why), "{case} ({mode:?}) refused for another reason: {err}");
        assert_eq!(scan(&outside), before.0, "{case} ({mode:?}) changed something outside the target");
        assert_eq!(scan(&parent), before.1, "{case} ({mode:?}) changed the target or left scratch files");
    }
}

fn plain() -> ApplyOptions {
    ApplyOptions::new(ApplyMode::Merged)
}

#[test]
fn hostile_archives_are_refused_and_change_nothing() {
    if !have_root("hostile_archives_are_refused_and_change_nothing") {
        return;
    }
    let outside = "../../outside";
    let cases: Vec<(&str, &str, Vec<u8>, ApplyOptions)> = vec![
        ("dot-dot path", "'..'", Evil::new().file("../../outside/pwned", b"x").bytes(), plain()),
        ("dot-dot in the middle", "'..'", Evil::new().dir("a/").file("a/../../x", b"x").bytes(), plain()),
        ("absolute path", "absolute path", Evil::new().file("/tmp/vessel-pwned", b"x").bytes(), plain()),
        (
            "write through an absolute symlink planted earlier",
            "through a symlink",
            Evil::new().symlink("link", "/").file("link/tmp/vessel-pwned", b"x").bytes(),
            plain(),
        ),
        (
            "write through a relative symlink planted earlier",
            "through a symlink",
            Evil::new().symlink("link", outside).file("link/pwned", b"x").bytes(),
            plain(),
        ),
        (
            "directory through a symlink",
            "through a symlink",
            Evil::new().symlink("link", outside).dir("link/newdir/").bytes(),
            plain(),
        ),
        (
            "symlink even within the target",
            "through a symlink",
            Evil::new().dir("sub/").symlink("l", "sub").file("l/f", b"x").bytes(),
            plain(),
        ),
        ("hardlink to outside", "leaves the layer", Evil::new().hardlink("h", "../../outside/secret").bytes(), plain()),
        ("hardlink to an absolute path", "leaves the layer", Evil::new().hardlink("h", "/etc/passwd").bytes(), plain()),
        (
            "hardlink through a symlink",
            "through a symlink",
            Evil::new().symlink("s", outside).hardlink("h", "s/secret").bytes(),
            plain(),
        ),
        (
            "hardlink to a file outside this layer",
            "not in this layer",
            Evil::new().hardlink("h", "keep").bytes(),
            plain(),
        ),
        (
            "device node when not allowed",
            "device nodes are not allowed",
            Evil::new().device("dev/mem").bytes(),
            plain(),
        ),
        ("whiteout with dot-dot", "'..'", Evil::new().file("../.wh.outside", b"").bytes(), plain()),
        ("empty whiteout name", "bad whiteout name", Evil::new().file("a/.wh.", b"").bytes(), plain()),
        (
            "PAX path with dot-dot",
            "'..'",
            Evil::new().pax(&[("path", b"../../outside/pwned")]).file("innocent", b"x").bytes(),
            plain(),
        ),
        (
            "GNU long name with dot-dot",
            "'..'",
            Evil::new().gnu_long_name("../../outside/pwned").file("innocent", b"x").bytes(),
            plain(),
        ),
        (
            "overlay-internal xattr",
            "overlay-internal xattr",
            Evil::new().pax(&[("SCHILY.xattr.trusted.overlay.redirect", b"/etc")]).dir("d/").bytes(),
            plain(),
        ),
        (
            "wrong digest",
            "digest mismatch",
            Evil::new().file("fine", b"x").bytes(),
            plain().expect_digest("sha256:0000000000000000000000000000000000000000000000000000000000000000"),
        ),
        ("truncated archive", "malformed", Evil::new().file("big", &[7u8; 4096]).bytes()[..1024].to_vec(), plain()),
        (
            "symlink chain out of the target",
            "through a symlink",
            Evil::new().symlink("b", outside).symlink("a", "b").file("a/pwned", b"x").bytes(),
            plain(),
        ),
        (
            "a symlink, then a directory of the same name",
            "different types",
            Evil::new().dir("sub/").symlink("d", "sub").dir("d/").bytes(),
            plain(),
        ),
        (
            "a directory, then a symlink of the same name",
            "different types",
            Evil::new().dir("d/").file("d/x", b"x").symlink("d", outside).bytes(),
            plain(),
        ),
        (
            "a directory, then a file of the same name",
            "different types",
            Evil::new().dir("d/").file("d/x", b"x").file("d", b"y").bytes(),
            plain(),
        ),
        (
            "a file, then a directory of the same name",
            "different types",
            Evil::new().file("f", b"x").dir("f/").bytes(),
            plain(),
        ),
        (
            "a symlink, then a file of the same name",
            "different types",
            Evil::new().symlink("f", "/etc/passwd").file("f", b"layer data").bytes(),
            plain(),
        ),
        (
            "a hardlink to a symlink",
            "hardlink to a symlink",
            Evil::new().symlink("s", "keep").hardlink("h", "s").bytes(),
            plain(),
        ),
        (
            "a whiteout through a symlink",
            "through a symlink",
            Evil::new().symlink("l", outside).file("l/.wh.secret", b"").bytes(),
            plain(),
        ),
        ("a whiteout of the root", "bad whiteout name", Evil::new().file("./.wh..", b"").bytes(), plain()),
        ("a whiteout with data", "not an empty file", Evil::new().file("a/.wh.x", b"data").bytes(), plain()),
        ("a reserved whiteout name", "reserved whiteout", Evil::new().file("a/.wh..wh.plnk", b"").bytes(), plain()),
        ("an opaque marker with dot-dot", "'..'", Evil::new().file("../.wh..wh..opq", b"").bytes(), plain()),
        (
            "an opaque marker at the root",
            "opaque marker at the root",
            Evil::new().file(".wh..wh..opq", b"").bytes(),
            plain(),
        ),
        (
            "an opaque marker through a symlink",
            "through a symlink",
            Evil::new().symlink("l", outside).file("l/.wh..wh..opq", b"").bytes(),
            plain(),
        ),
        (
            "a 0/0 character device, devices allowed",
            "0/0 device is a whiteout",
            Evil::new().char_device("dev/wh", 0, 0).bytes(),
            plain().allow_devices(true),
        ),
        (
            "a 4 KiB path",
            "longer than 4095 bytes",
            Evil::new().pax(&[("path", format!("{}f", "a/".repeat(2048)).as_bytes())]).file("x", b"x").bytes(),
            plain(),
        ),
        (
            "an over-long component",
            "longer than 255 bytes",
            Evil::new().pax(&[("path", "n".repeat(256).as_bytes())]).file("x", b"x").bytes(),
            plain(),
        ),
        (
            "a root entry that is a symlink",
            "root entry is not a directory",
            Evil::new().symlink("./", "/etc").bytes(),
            plain(),
        ),
        ("a root entry that is a file", "root entry is not a directory", Evil::new().file(".", b"x").bytes(), plain()),
        (
            "data on a symlink entry (size smuggling)",
            "data on an entry type that has none",
            [Block::ustar(b'2', b"s", 512).sealed(), file_entry(b"../../outside/pwned", b"x"), end_blocks()].concat(),
            plain(),
        ),
        (
            "size lie: more data than the archive holds",
            "ends inside an entry",
            [Block::ustar(b'0', b"big", 1 << 20).sealed(), vec![7; 2048]].concat(),
            plain(),
        ),
        (
            "negative base-256 size",
            "bad size",
            {
                let mut b = Block::ustar(b'0', b"neg", 0);
                b.base256(124, 12, -512);
                [b.sealed(), end_blocks()].concat()
            },
            plain(),
        ),
        (
            "non-octal size",
            "bad size",
            {
                let mut b = Block::ustar(b'0', b"f", 0);
                b.set(124, b"0000000012\x0034");
                [b.sealed(), vec![0; 512], end_blocks()].concat()
            },
            plain(),
        ),
        (
            "bad checksum",
            "checksum",
            {
                let mut h = Block::ustar(b'0', b"f", 0).sealed();
                h[0] = b'g';
                [file_entry(b"first", b"1"), h, end_blocks()].concat()
            },
            plain(),
        ),
        (
            "a zero block, then a header",
            "zero block followed by a header",
            [file_entry(b"a", b"1"), vec![0; 512], file_entry(b"hidden", b"2"), end_blocks()].concat(),
            plain(),
        ),
        (
            "two PAX headers for one entry",
            "two PAX headers",
            [
                pax_header(b'x', &[("path", b"one")]),
                pax_header(b'x', &[("path", b"two")]),
                file_entry(b"f", b""),
                end_blocks(),
            ]
            .concat(),
            plain(),
        ),
        (
            "a PAX path and a GNU long name",
            "both a PAX path and a GNU long name",
            Evil::new().pax(&[("path", b"pax-name")]).gnu_long_name("gnu-name").file("short", b"x").bytes(),
            plain(),
        ),
        (
            "a global PAX header that sets a path",
            "global PAX header",
            [pax_header(b'g', &[("path", b"everything")]), file_entry(b"f", b""), end_blocks()].concat(),
            plain(),
        ),
        (
            "PAX mtime past i64",
            "bad PAX mtime",
            Evil::new().pax(&[("mtime", b"99999999999999999999")]).file("f", b"").bytes(),
            plain(),
        ),
        (
            "PAX mtime in exponent form",
            "bad PAX mtime",
            Evil::new().pax(&[("mtime", b"1e9")]).file("f", b"").bytes(),
            plain(),
        ),
        (
            "PAX mtime just below i64",
            "bad PAX mtime",
            Evil::new().pax(&[("mtime", b"-9223372036854775808.5")]).file("f", b"").bytes(),
            plain(),
        ),
        ("PAX size with a sign", "bad PAX size", Evil::new().pax(&[("size", b"+1")]).file("f", b"x").bytes(), plain()),
        ("PAX uid -1", "uid out of range", Evil::new().pax(&[("uid", b"4294967295")]).file("f", b"").bytes(), plain()),
        (
            "PAX gid past u32",
            "gid out of range",
            Evil::new().pax(&[("gid", b"4294967296")]).file("f", b"").bytes(),
            plain(),
        ),
        (
            "a regular file named like a directory",
            "named like a directory",
            [Block::ustar(b'0', b"d/", 0).sealed(), end_blocks()].concat(),
            plain(),
        ),
        (
            "overlapping sparse segments",
            "overlap",
            Evil::new()
                .pax(&[("GNU.sparse.size", b"15"), ("GNU.sparse.map", b"0,10,5,10"), ("GNU.sparse.name", b"sp")])
                .file("sp", &[1; 20])
                .bytes(),
            plain(),
        ),
        (
            "a sparse map that does not cover the data",
            "does not match the data",
            Evil::new()
                .pax(&[("GNU.sparse.size", b"10"), ("GNU.sparse.map", b"0,10"), ("GNU.sparse.name", b"sp")])
                .file("sp", &[1; 20])
                .bytes(),
            plain(),
        ),
        (
            "a sparse segment past the end",
            "past the end of the file",
            Evil::new()
                .pax(&[("GNU.sparse.size", b"10"), ("GNU.sparse.map", b"5,10"), ("GNU.sparse.name", b"sp")])
                .file("sp", &[1; 10])
                .bytes(),
            plain(),
        ),
        (
            "an unknown sparse format",
            "unknown sparse format",
            Evil::new().pax(&[("GNU.sparse.major", b"2"), ("GNU.sparse.minor", b"0")]).file("sp", b"").bytes(),
            plain(),
        ),
        (
            "an unsupported entry type",
            "unsupported entry type",
            [Block::ustar(b'M', b"volume", 0).sealed(), end_blocks()].concat(),
            plain(),
        ),
        (
            "a GNU header with a prefix area parsers read differently",
            "prefix area",
            {
                let mut b = Block::gnu(b'0', b"f", 0);
                b.set(345, b"evil");
                [b.sealed(), end_blocks()].concat()
            },
            plain(),
        ),
        (
            "a malformed PAX record",
            "malformed PAX record",
            [
                Block::ustar(b'x', b"PaxHeaders/x", 12).sealed(),
                padded(b"99 path=x\n\n\n"),
                file_entry(b"f", b""),
                end_blocks(),
            ]
            .concat(),
            plain(),
        ),
        ("garbage", "malformed", b"this is not a tar archive at all, just words....".repeat(20), plain()),
    ];
    for (case, why, archive, opts) in &cases {
        refused(case, why, archive, opts);
    }
}

#[test]
fn a_device_is_created_when_allowed() {
    if !have_root("a_device_is_created_when_allowed") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("t");
    let archive = Evil::new().dir("dev/").device("dev/null").bytes();
    apply_layer(&archive[..], &target, &ApplyOptions::new(ApplyMode::Overlay).allow_devices(true)).unwrap();
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let m = fs::symlink_metadata(target.join("dev/null")).unwrap();
    assert!(m.file_type().is_char_device());
    assert_eq!(m.rdev(), nix::sys::stat::makedev(1, 3));
    assert!(Path::new(&target).is_dir());
}

#[test]
fn extreme_but_valid_times_apply_without_panic() {
    if !have_root("extreme_but_valid_times_apply_without_panic") {
        return;
    }
    for t in [&b"9223372036854775807"[..], b"-9223372036854775808", b"-1.999999999999", b"0.000000001"] {
        let archive = Evil::new().pax(&[("mtime", t)]).file("f", b"x").bytes();
        for mode in [ApplyMode::Merged, ApplyMode::Overlay] {
            let dir = tempfile::tempdir().unwrap();
            let target = dir.path().join("t");
            if mode == ApplyMode::Merged {
                fs::create_dir(&target).unwrap();
            }
            apply_layer(&archive[..], &target, &ApplyOptions::new(mode))
                .unwrap_or_else(|e| panic!("mtime {}: {e}", String::from_utf8_lossy(t)));
            assert_eq!(fs::read(target.join("f")).unwrap(), b"x");
        }
    }
}

#[test]
fn a_whiteout_then_an_entry_of_the_same_layer_keeps_the_entry() {
    if !have_root("a_whiteout_then_an_entry_of_the_same_layer_keeps_the_entry") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("t");
    let archive = Evil::new().file(".wh.f", b"").file("f", b"new").dir("d/").file("d/.wh.g", b"").bytes();
    apply_layer(&archive[..], &target, &ApplyOptions::new(ApplyMode::Overlay)).unwrap();
    assert_eq!(fs::read(target.join("f")).unwrap(), b"new");
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let wh = fs::symlink_metadata(target.join("d/g")).unwrap();
    assert!(wh.file_type().is_char_device() && wh.rdev() == 0, "d/g is a whiteout");
}
