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
        ("garbage", "malformed", b"this is not a tar archive at all, just words....".repeat(20), plain()),
    ];
    for (case, why, archive, opts) in &cases {
        refused(case, why, archive, opts);
    }
}

#[test]
fn a_later_entry_replaces_a_planted_symlink_instead_of_writing_through_it() {
    if !have_root("a_later_entry_replaces_a_planted_symlink_instead_of_writing_through_it") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let outside = dir.path().join("secret");
    fs::write(&outside, b"host data").unwrap();
    let target = dir.path().join("t");
    fs::create_dir(&target).unwrap();
    let archive = Evil::new().symlink("f", outside.to_str().unwrap()).file("f", b"layer data").bytes();
    apply_layer(&archive[..], &target, &plain()).unwrap();
    assert_eq!(fs::read(&outside).unwrap(), b"host data");
    assert!(fs::symlink_metadata(target.join("f")).unwrap().is_file());
    assert_eq!(fs::read(target.join("f")).unwrap(), b"layer data");
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
