//! The overlay mount helper on real mounts: deep stacks with long paths,
//! layer order, writes to the upper, read-only stacks, clean unmount.

use std::fs;
use std::path::{Path, PathBuf};

use vessel_runtime::overlay::OverlayMount;
use vessel_test_support::is_mount_point as mounted;

fn root_or_skip(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(std::env::var_os("CI").is_none(), "{test} needs root, and CI runs as root");
    eprintln!("SKIPPED {test}: needs root to mount");
    false
}

#[test]
fn a_hundred_lowers_with_long_paths() {
    if !root_or_skip("a_hundred_lowers_with_long_paths") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // 100 lowers whose paths alone (~200 bytes each) are 5x the 4 KiB option limit.
    let lowers: Vec<PathBuf> = (0..100)
        .map(|i| {
            let l = dir.path().join(format!("layer-{i:03}-{}", "x".repeat(180)));
            fs::create_dir(&l).unwrap();
            fs::write(l.join(format!("only-{i}")), format!("{i}")).unwrap();
            fs::write(l.join("shared"), format!("{i}")).unwrap();
            l
        })
        .collect();
    let (upper, work, target) = (dir.path().join("upper"), dir.path().join("work"), dir.path().join("merged"));
    for d in [&upper, &work, &target] {
        fs::create_dir(d).unwrap();
    }
    let refs: Vec<&Path> = lowers.iter().map(PathBuf::as_path).collect();
    let m = OverlayMount::mount(&target, &refs, Some((&upper, &work))).unwrap();
    assert!(mounted(&target));
    for i in 0..100 {
        assert_eq!(fs::read_to_string(target.join(format!("only-{i}"))).unwrap(), i.to_string());
    }
    assert_eq!(fs::read_to_string(target.join("shared")).unwrap(), "0", "the first lower is the topmost");
    fs::write(target.join("new"), b"x").unwrap();
    assert!(upper.join("new").is_file(), "writes land in the upper");
    m.unmount().unwrap();
    assert!(!mounted(&target));
    assert!(!target.join("only-0").exists());
}

#[test]
fn read_only_stack_and_drop_unmounts() {
    if !root_or_skip("read_only_stack_and_drop_unmounts") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (a, b, target) = (dir.path().join("a"), dir.path().join("b"), dir.path().join("m"));
    for d in [&a, &b, &target] {
        fs::create_dir(d).unwrap();
    }
    fs::write(b.join("f"), b"b").unwrap();
    {
        let _m = OverlayMount::mount(&target, &[&a, &b], None).unwrap();
        assert_eq!(fs::read(target.join("f")).unwrap(), b"b");
        let e = fs::write(target.join("g"), b"x").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(nix::libc::EROFS));
    }
    assert!(!mounted(&target), "dropping the mount unmounts it");
    let e = OverlayMount::mount(&target, &[], None).unwrap_err();
    assert_eq!(e.kind(), vessel_runtime::RuntimeErrorKind::InvalidRequest);
}
