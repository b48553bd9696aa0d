//! Importing the test image (`cargo xtask image`) in both archive formats,
//! compressed or not, and refusing tampered archives.

mod common;

use std::io::{Read, Write};
use std::path::PathBuf;

use common::*;
use vessel_snapshot::image::unpack_image;
use vessel_snapshot::{LayerCache, SnapshotErrorKind};

fn image_dir(test: &str) -> Option<PathBuf> {
    if !have_root(test) {
        return None;
    }
    vessel_test_support::env_path(test, "VESSEL_TEST_IMAGE_DIR")
}

fn archive(dir: &std::path::Path, name: &str) -> Vec<u8> {
    std::fs::read(dir.join(name)).unwrap()
}

#[test]
fn imports_both_formats_to_the_same_layer() {
    let Some(dir) = image_dir("imports_both_formats_to_the_same_layer") else { return };
    let tmp = tempfile::tempdir().unwrap();
    let cache = LayerCache::open(tmp.path()).unwrap();
    let oci = unpack_image(&archive(&dir, "busybox-oci.tar")[..], &cache, "v1", Some("local/busybox:latest")).unwrap();
    let docker = unpack_image(&archive(&dir, "busybox-docker.tar")[..], &cache, "v2", None).unwrap();
    assert_eq!(oci.layers.len(), 1);
    assert_eq!(oci.layers, docker.layers, "same diff id, same cached layer");
    assert_eq!(oci.config_digest, docker.config_digest);
    assert!(oci.manifest_digest.is_some() && docker.manifest_digest.is_none());
    assert_eq!(oci.config.cmd, ["sh"]);
    assert!(oci.config.env.iter().any(|e| e.starts_with("PATH=")));
    let rootfs = &oci.layers[0].path;
    assert!(rootfs.join("bin/busybox").is_file());
    assert_eq!(std::fs::read_link(rootfs.join("bin/sh")).unwrap(), PathBuf::from("/bin/busybox"));
    // The unpacked layer is exactly the layer tar's tree.
    let expected = tempfile::tempdir().unwrap();
    std::process::Command::new("tar")
        .arg("-xpf")
        .arg(dir.join("layer.tar"))
        .arg("-C")
        .arg(expected.path())
        .status()
        .unwrap();
    assert_same(&scan(expected.path()), &scan(rootfs), "unpacked image layer");
    let mut holders = cache.holders(&vessel_snapshot::LayerKey::diff_id(&oci.layers[0].diff_id).unwrap()).unwrap();
    holders.sort();
    assert_eq!(holders, ["v1", "v2"]);
    assert!(
        std::fs::read_dir(tmp.path().join("layers")).unwrap().all(|e| !e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with('.')),
        "scratch removed"
    );
}

#[test]
fn imports_gzip_and_zstd_archives() {
    let Some(dir) = image_dir("imports_gzip_and_zstd_archives") else { return };
    let raw = archive(&dir, "busybox-oci.tar");
    let gz = {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(&raw).unwrap();
        e.finish().unwrap()
    };
    let zst = zstd::encode_all(&raw[..], 1).unwrap();
    for (what, bytes) in [("gzip", gz), ("zstd", zst)] {
        let tmp = tempfile::tempdir().unwrap();
        let cache = LayerCache::open(tmp.path()).unwrap();
        let img = unpack_image(&bytes[..], &cache, "v", None).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(img.layers[0].path.join("bin/busybox").is_file(), "{what}");
    }
}

/// Rewrites the archive with `f` applied to the member named by `pick`.
fn tamper(raw: &[u8], pick: impl Fn(&str) -> bool, f: impl Fn(&mut Vec<u8>)) -> Vec<u8> {
    let mut out = tar::Builder::new(Vec::new());
    let mut ar = tar::Archive::new(raw);
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let mut h = e.header().clone();
        let name = e.path().unwrap().to_string_lossy().into_owned();
        let mut data = Vec::new();
        e.read_to_end(&mut data).unwrap();
        if pick(&name) {
            f(&mut data);
            h.set_size(data.len() as u64);
            h.set_cksum();
        }
        out.append(&h, &data[..]).unwrap();
    }
    out.into_inner().unwrap()
}

#[test]
fn tampered_archives_are_refused() {
    let Some(dir) = image_dir("tampered_archives_are_refused") else { return };
    let oci = archive(&dir, "busybox-oci.tar");
    let docker = archive(&dir, "busybox-docker.tar");
    let index: serde_json::Value = {
        let mut ar = tar::Archive::new(&oci[..]);
        let mut e =
            ar.entries().unwrap().map(Result::unwrap).find(|e| e.path().unwrap().ends_with("index.json")).unwrap();
        serde_json::from_reader(&mut e).unwrap()
    };
    let manifest_hex = index["manifests"][0]["digest"].as_str().unwrap().trim_start_matches("sha256:").to_owned();
    let flip_last = |d: &mut Vec<u8>| {
        let n = d.len();
        d[n - 40] ^= 0x55;
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        // A layer blob whose bytes no longer match its descriptor.
        (
            "oci layer blob",
            tamper(
                &oci,
                |n| n.starts_with("blobs/") && !n.ends_with(&manifest_hex),
                |d| {
                    if d.len() > 1000 {
                        flip_last(d)
                    }
                },
            ),
        ),
        ("oci manifest", tamper(&oci, |n| n.ends_with(&manifest_hex), |d| d.push(b' '))),
        ("docker layer", tamper(&docker, |n| n.ends_with("layer.tar"), |d| d[600] ^= 1)),
        ("docker config", tamper(&docker, |n| n.ends_with(".json") && n != "manifest.json", |d| d.push(b' '))),
        ("not an image", tamper(&oci, |_| false, |_| ()).into_iter().take(1024).collect()),
    ];
    for (case, bytes) in cases {
        let tmp = tempfile::tempdir().unwrap();
        let cache = LayerCache::open(tmp.path()).unwrap();
        let e = unpack_image(&bytes[..], &cache, "v", None).expect_err(case);
        assert_eq!(e.kind(), SnapshotErrorKind::InvalidData, "{case}: {e}");
        let left: Vec<_> =
            std::fs::read_dir(tmp.path().join("layers")).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert!(left.is_empty(), "{case}: the cache kept {left:?}");
    }
}

/// In an archive of several images the reference must name one of them:
/// a missing one is a typed NotFound, never silently the first image. An
/// archive of one image is that image whatever it calls itself.
#[test]
fn a_missing_reference_is_not_found() {
    let Some(dir) = image_dir("a_missing_reference_is_not_found") else { return };
    let tmp = tempfile::tempdir().unwrap();
    let cache = LayerCache::open(tmp.path()).unwrap();
    // The one manifest twice in the index, under two names.
    let two = tamper(
        &archive(&dir, "busybox-oci.tar"),
        |n| n == "index.json",
        |data| {
            let mut index: serde_json::Value = serde_json::from_slice(data).unwrap();
            let mut other = index["manifests"][0].clone();
            other["annotations"]["io.containerd.image.name"] = "local/other:v2".into();
            other["annotations"]["org.opencontainers.image.ref.name"] = "v2".into();
            index["manifests"].as_array_mut().unwrap().push(other);
            *data = serde_json::to_vec(&index).unwrap();
        },
    );
    for wanted in ["local/busybox:latest", "local/other:v2"] {
        unpack_image(&two[..], &cache, "v", Some(wanted)).unwrap_or_else(|e| panic!("{wanted}: {e}"));
    }
    let e = unpack_image(&two[..], &cache, "v", Some("local/absent:latest")).unwrap_err();
    assert_eq!(e.kind(), SnapshotErrorKind::NotFound, "{e}");
    assert!(e.to_string().contains("local/absent:latest"), "{e}");
    // One image, whatever the reference.
    unpack_image(&archive(&dir, "busybox-oci.tar")[..], &cache, "v", Some("local/renamed:x")).unwrap();
    unpack_image(&archive(&dir, "busybox-docker.tar")[..], &cache, "v", Some("local/renamed:x")).unwrap();
}
