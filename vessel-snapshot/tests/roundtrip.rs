//! Round trips through real overlay mounts: mutate through the merged view,
//! diff the upper, apply, and require the result to equal the merged view
//! exactly (content, type, mode, owner, mtime, xattrs, hardlink identity).

mod common;

use std::fs;
use std::path::Path;

use common::*;
use vessel_snapshot::{ApplyMode, ApplyOptions, DiffOptions, DiffStats, apply_layer, write_diff, write_diff_with};

/// The mutation scripts make device nodes too: archived here as flattening
/// does (a snapshot refuses them, see `device_nodes_are_refused_before_commit`).
fn diff(upper: &Path) -> (Vec<u8>, DiffStats) {
    write_diff_with(upper, Vec::new(), DiffOptions { allow_devices: true }).expect("diff")
}

fn opts(mode: ApplyMode, stats: &DiffStats) -> ApplyOptions {
    ApplyOptions::new(mode).expect_digest(stats.digest.clone()).allow_devices(true)
}

/// One generation: base tree, random mutations, both apply modes checked.
fn round_trip(seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng::new(seed);
    let lower = dir.path().join("lower");
    fs::create_dir(&lower).unwrap();
    populate(&lower, &mut rng, 80);
    let (layer, stats, expected) = {
        let ov = Overlay::new(&dir.path().join("ov"), &[&lower]);
        for _ in 0..25 {
            mutate(&ov.merged, &mut rng);
        }
        let (layer, stats) = diff(&ov.upper);
        (layer, stats, scan(&ov.merged))
    };
    assert_eq!(stats.size, layer.len() as u64);

    // Merged: onto a copy of the lower.
    let merged = dir.path().join("applied");
    copy_tree(&lower, &merged);
    let got = apply_layer(&layer[..], &merged, &opts(ApplyMode::Merged, &stats)).unwrap();
    assert_eq!(got.digest, stats.digest);
    assert_same(&expected, &scan(&merged), &format!("seed {seed}: merged apply"));

    // Overlay form, mounted as a lower over the original lower.
    let native = dir.path().join("layer");
    apply_layer(&layer[..], &native, &opts(ApplyMode::Overlay, &stats)).unwrap();
    let ro = Overlay::read_only(dir.path(), &[&native, &lower]);
    assert_same(&expected, &scan(&ro.merged), &format!("seed {seed}: overlay-form layer"));
    drop(ro);

    // Deterministic: a copy of the upper (new inodes, same content) diffs to the same bytes.
    let copy = dir.path().join("upper-copy");
    copy_tree(&dir.path().join("ov/upper"), &copy);
    assert!(diff(&copy).0 == layer, "seed {seed}: a copy of the upper diffs to different bytes");
    assert!(mounts_under(dir.path()).is_empty(), "leaked mounts");
}

#[test]
fn random_mutations_round_trip() {
    if !have_root("random_mutations_round_trip") {
        return;
    }
    for seed in 1..=24 {
        round_trip(seed);
    }
}

#[test]
fn chains_of_twenty_generations() {
    if !have_root("chains_of_twenty_generations") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng::new(4242);
    let base = dir.path().join("base");
    fs::create_dir(&base).unwrap();
    populate(&base, &mut rng, 60);
    // The same history applied merged, generation after generation.
    let flat = dir.path().join("flat");
    copy_tree(&base, &flat);
    let mut layers: Vec<std::path::PathBuf> = Vec::new();
    for generation in 0..20 {
        let mut lowers: Vec<&Path> = layers.iter().rev().map(|p| p.as_path()).collect();
        lowers.push(&base);
        let gen_dir = dir.path().join(format!("gen{generation}"));
        let (layer, stats, expected) = {
            let ov = Overlay::new(&gen_dir, &lowers);
            for _ in 0..10 {
                mutate(&ov.merged, &mut rng);
            }
            let (layer, stats) = diff(&ov.upper);
            (layer, stats, scan(&ov.merged))
        };
        let cached = dir.path().join(format!("layer{generation}"));
        apply_layer(&layer[..], &cached, &opts(ApplyMode::Overlay, &stats)).unwrap();
        apply_layer(&layer[..], &flat, &opts(ApplyMode::Merged, &stats)).unwrap();
        assert_same(&expected, &scan(&flat), &format!("generation {generation}: merged chain"));
        layers.push(cached);
        let mut lowers: Vec<&Path> = layers.iter().rev().map(|p| p.as_path()).collect();
        lowers.push(&base);
        let ro = Overlay::read_only(&gen_dir, &lowers);
        assert_same(&expected, &scan(&ro.merged), &format!("generation {generation}: stacked layers"));
    }
    assert!(mounts_under(dir.path()).is_empty(), "leaked mounts");
}

#[test]
fn whiteouts_and_opaque_dirs_are_oci_entries() {
    if !have_root("whiteouts_and_opaque_dirs_are_oci_entries") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let lower = dir.path().join("lower");
    fs::create_dir_all(lower.join("d/sub")).unwrap();
    fs::write(lower.join("gone"), b"x").unwrap();
    fs::write(lower.join("d/old"), b"x").unwrap();
    let ov = Overlay::new(&dir.path().join("ov"), &[&lower]);
    fs::remove_file(ov.merged.join("gone")).unwrap();
    fs::remove_dir_all(ov.merged.join("d")).unwrap();
    fs::create_dir(ov.merged.join("d")).unwrap();
    fs::write(ov.merged.join("d/new"), b"y").unwrap();
    let (layer, _) = diff(&ov.upper);
    drop(ov);
    let names: Vec<String> = tar::Archive::new(&layer[..])
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["d/", "d/.wh..wh..opq", "d/new", ".wh.gone"]);
}

#[test]
fn redirect_dir_and_metacopy_are_refused() {
    if !have_root("redirect_dir_and_metacopy_are_refused") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (xattr, feature) in [("trusted.overlay.redirect", "redirect_dir"), ("trusted.overlay.metacopy", "metacopy")] {
        let upper = dir.path().join(feature);
        fs::create_dir_all(upper.join("d")).unwrap();
        xattr::set(upper.join("d"), xattr, b"/x").unwrap();
        let e = write_diff(&upper, Vec::new()).unwrap_err();
        assert_eq!(e.kind(), vessel_snapshot::SnapshotErrorKind::Unsupported, "{e}");
        assert!(e.to_string().contains(feature), "{e}");
    }
}

#[test]
fn device_nodes_are_refused_before_commit() {
    if !have_root("device_nodes_are_refused_before_commit") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let upper = dir.path().join("upper");
    fs::create_dir_all(upper.join("work")).unwrap();
    fs::write(upper.join("work/a"), b"a").unwrap();
    let mode = nix::sys::stat::Mode::from_bits_truncate(0o600);
    nix::sys::stat::mknod(
        &upper.join("work/null"),
        nix::sys::stat::SFlag::S_IFCHR,
        mode,
        nix::sys::stat::makedev(1, 3),
    )
    .unwrap();
    match write_diff(&upper, Vec::new()) {
        Err(e @ vessel_snapshot::SnapshotError::DeviceNode { .. }) => {
            assert_eq!(e.kind(), vessel_snapshot::SnapshotErrorKind::Unsupported);
            assert!(e.to_string().contains("work/null"), "the error names the node: {e}");
        }
        other => panic!("a device node in a snapshot: {:?}", other.map(|(_, s)| s)),
    }
    // A whiteout (0/0) is no device node; a block device is one.
    fs::remove_file(upper.join("work/null")).unwrap();
    nix::sys::stat::mknod(&upper.join("work/gone"), nix::sys::stat::SFlag::S_IFCHR, mode, 0).unwrap();
    write_diff(&upper, Vec::new()).expect("a whiteout is fine");
    nix::sys::stat::mknod(&upper.join("blk"), nix::sys::stat::SFlag::S_IFBLK, mode, nix::sys::stat::makedev(7, 0))
        .unwrap();
    assert!(matches!(write_diff(&upper, Vec::new()), Err(vessel_snapshot::SnapshotError::DeviceNode { .. })));
}

#[test]
fn user_overlay_xattrs_are_data_not_markers() {
    if !have_root("user_overlay_xattrs_are_data_not_markers") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let upper = dir.path().join("upper");
    fs::create_dir_all(upper.join("d")).unwrap();
    fs::write(upper.join("d/f"), b"").unwrap();
    // What any process may set on its own files on a mount without userxattr.
    xattr::set(upper.join("d"), "user.overlay.opaque", b"y").unwrap();
    xattr::set(upper.join("d/f"), "user.overlay.whiteout", b"").unwrap();
    xattr::set(upper.join("d/f"), "user.overlay.redirect", b"/etc").unwrap();
    let (layer, stats) = write_diff(&upper, Vec::new()).expect("user.overlay.* never fails a snapshot");
    let names: Vec<String> = tar::Archive::new(&layer[..])
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["d/", "d/f"], "no forged opaque marker or whiteout");
    for mode in [ApplyMode::Overlay, ApplyMode::Merged] {
        let target = dir.path().join(format!("{mode:?}"));
        if mode == ApplyMode::Merged {
            fs::create_dir_all(target.join("d")).unwrap();
            fs::write(target.join("d/lower-file"), b"kept").unwrap();
        }
        apply_layer(&layer[..], &target, &ApplyOptions::new(mode).expect_digest(stats.digest.clone())).unwrap();
        assert_eq!(xattr::get(target.join("d"), "user.overlay.opaque").unwrap().as_deref(), Some(&b"y"[..]));
        assert_eq!(xattr::get(target.join("d/f"), "user.overlay.redirect").unwrap().as_deref(), Some(&b"/etc"[..]));
        assert!(target.join("d/f").is_file());
        if mode == ApplyMode::Merged {
            assert!(target.join("d/lower-file").is_file(), "a user.overlay.opaque dir hid its lower files");
        }
    }
}

/// A file of `size` bytes with `blocks` 4 KiB blocks written, spread out.
fn sparse_file(path: &Path, size: u64, blocks: u64) {
    use std::os::unix::fs::FileExt;
    let f = fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    for i in 0..blocks {
        let at = (size - 4096) / blocks.saturating_sub(1).max(1) * i;
        f.write_all_at(&[i as u8 + 1; 4096], at / 4096 * 4096).unwrap();
    }
}

fn disk_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(path).unwrap().blocks() * 512
}

#[test]
fn sparse_files_stay_sparse() {
    if !have_root("sparse_files_stay_sparse") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let lower = dir.path().join("lower");
    fs::create_dir(&lower).unwrap();
    let (layer, stats, expected) = {
        let ov = Overlay::new(&dir.path().join("ov"), &[&lower]);
        sparse_file(&ov.merged.join("spread"), 64 << 20, 4);
        sparse_file(&ov.merged.join("terabyte"), 1 << 40, 4);
        fs::File::create(ov.merged.join("all-hole")).unwrap().set_len(256 << 20).unwrap();
        // Data at the very end: the map's last segment reaches the size.
        let tail = fs::File::create(ov.merged.join("tail")).unwrap();
        tail.set_len(8 << 20).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&tail, b"end", (8 << 20) - 3).unwrap();
        drop(tail);
        let (layer, stats) = write_diff(&ov.upper, Vec::new()).unwrap();
        (layer, stats, scan(&ov.merged))
    };
    assert!(layer.len() < 256 << 10, "the layer holds holes: {} bytes", layer.len());

    for mode in [ApplyMode::Merged, ApplyMode::Overlay] {
        let target = dir.path().join(format!("{mode:?}"));
        if mode == ApplyMode::Merged {
            fs::create_dir(&target).unwrap();
        }
        apply_layer(&layer[..], &target, &ApplyOptions::new(mode).expect_digest(stats.digest.clone())).unwrap();
        for name in ["spread", "terabyte", "all-hole", "tail"] {
            let on_disk = disk_bytes(&target.join(name));
            assert!(on_disk <= 64 << 10, "{mode:?}: {name} takes {on_disk} bytes on disk");
        }
        assert_eq!(fs::metadata(target.join("terabyte")).unwrap().len(), 1 << 40);
        assert_same(&expected, &scan(&target), &format!("{mode:?}: sparse files"));
        use std::os::unix::fs::FileExt;
        let f = fs::File::open(target.join("terabyte")).unwrap();
        let mut buf = [0u8; 4096];
        for i in 0..4u64 {
            let at = ((1u64 << 40) - 4096) / 3 * i / 4096 * 4096;
            f.read_exact_at(&mut buf, at).unwrap();
            assert_eq!(buf, [i as u8 + 1; 4096], "{mode:?}: block {i} of the terabyte file");
        }
        f.read_exact_at(&mut buf, 1 << 39).unwrap();
        assert_eq!(buf, [0; 4096], "{mode:?}: a hole reads as zeros");
    }
    assert!(mounts_under(dir.path()).is_empty(), "leaked mounts");
}
