//! Bounded expansion: a small compressed layer that would expand to far
//! more bytes, entries or directory levels than allowed is refused with
//! `TooLarge` as soon as the bound is passed, and leaves nothing behind.

mod common;

use std::fs;
use std::io::Read;
use std::path::Path;

use common::*;
use vessel_snapshot::{ApplyMode, ApplyOptions, LayerBounds, SnapshotError, SnapshotErrorKind, apply_layer};

fn bounds(max_bytes: u64, max_entries: u64, max_depth: usize) -> ApplyOptions {
    ApplyOptions::new(ApplyMode::Overlay).bounds(LayerBounds { max_bytes, max_entries, max_depth })
}

/// Applies `layer` (overlay and merged) and checks the refusal for `what`
/// and that the directory holding the target is as before.
fn refused(case: &str, layer: &[u8], opts: &ApplyOptions, what: &str) {
    let dir = tempfile::tempdir().unwrap();
    let parent = dir.path().join("work");
    fs::create_dir_all(parent.join("target")).unwrap();
    fs::write(parent.join("target/keep"), b"keep").unwrap();
    let before = scan(&parent);
    for mode in [ApplyMode::Overlay, ApplyMode::Merged] {
        let mut o = opts.clone();
        o.mode = mode;
        let dest = if mode == ApplyMode::Merged { parent.join("target") } else { parent.join("new") };
        let err = apply_layer(layer, &dest, &o).expect_err(&format!("{case} ({mode:?}) must be refused"));
        assert_eq!(err.kind(), SnapshotErrorKind::TooLarge, "{case} ({mode:?}): {err}");
        assert!(matches!(&err, SnapshotError::TooLarge { what: w, .. } if *w == what), "{case}: {err}");
        assert_eq!(scan(&parent), before, "{case} ({mode:?}) left something behind");
    }
}

#[test]
fn a_zstd_bomb_stops_at_the_byte_bound() {
    // 4 GiB of zeros in well under 200 KiB.
    let out = vessel_test_support::zstd_bomb("zeros", 4 << 30);
    assert!(out.len() < 200 << 10, "the bomb is {} bytes", out.len());
    refused("zstd bomb", &out, &bounds(64 << 20, 1 << 20, 256), "bytes");
}

#[test]
fn a_gzip_bomb_stops_at_the_byte_bound() {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    {
        let mut b = tar::Builder::new(&mut enc);
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_size(512 << 20);
        h.set_cksum();
        b.append_data(&mut h, "zeros", std::io::repeat(0).take(512 << 20)).unwrap();
        b.finish().unwrap();
    }
    let out = enc.finish().unwrap();
    assert!(out.len() < 1 << 20, "the bomb is {} bytes", out.len());
    refused("gzip bomb", &out, &bounds(64 << 20, 1 << 20, 256), "bytes");
}

#[test]
fn too_many_entries_stop_at_the_entry_bound() {
    let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
    {
        let mut b = tar::Builder::new(&mut enc);
        for i in 0..100_000u32 {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Regular);
            h.set_mode(0o644);
            h.set_size(0);
            h.set_cksum();
            b.append_data(&mut h, format!("f{i}"), &[][..]).unwrap();
        }
        b.finish().unwrap();
    }
    let out = enc.finish().unwrap();
    refused("100,000 empty files", &out, &bounds(64 << 30, 10_000, 256), "entries");
}

#[test]
fn deep_trees_stop_at_the_depth_bound() {
    let deep = |levels: usize| {
        let mut b = tar::Builder::new(Vec::new());
        let mut path = String::new();
        for _ in 0..levels {
            path.push_str("d/");
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Directory);
            h.set_mode(0o755);
            h.set_size(0);
            h.set_cksum();
            b.append_data(&mut h, &path, &[][..]).unwrap();
        }
        b.into_inner().unwrap()
    };
    // 300 levels: within PATH_MAX, past the default 256.
    refused("300 nested directories", &deep(300), &ApplyOptions::new(ApplyMode::Overlay), "directory levels");
    // 4,000 levels are refused too (by the bound, before any path limit).
    refused("4,000 nested directories", &deep(4000), &ApplyOptions::new(ApplyMode::Overlay), "directory levels");
    // And a tree within the bounds applies.
    let dir = tempfile::tempdir().unwrap();
    apply_layer(&deep(200)[..], &dir.path().join("ok"), &ApplyOptions::new(ApplyMode::Overlay)).unwrap();
    assert!(Path::new(&dir.path().join("ok").join("d/".repeat(200))).is_dir());
}
