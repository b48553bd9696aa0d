//! The test image built by `cargo xtask image` loads through the storage
//! layer and is a well-formed OCI image layout and docker-save archive:
//! every digest it names matches the bytes it holds.

use std::collections::HashMap;
use std::io::Read;
use std::path::PathBuf;

use anyhow::{Context, Result, ensure};
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;
use vessel::{CompressedStorage, ImageRef, LocalStorage, Storage};

/// Where `cargo xtask image` put the image; `None` (with the reason printed)
/// when it was not built, which is an error under CI.
fn image_dir() -> Option<PathBuf> {
    match std::env::var_os("VESSEL_TEST_IMAGE_DIR") {
        Some(d) => Some(PathBuf::from(d)),
        None if std::env::var_os("CI").is_some() => {
            panic!("VESSEL_TEST_IMAGE_DIR is unset under CI: run `cargo xtask test`")
        }
        None => {
            eprintln!("SKIPPED: VESSEL_TEST_IMAGE_DIR is unset; run `cargo xtask test` (or `cargo xtask image`) first");
            None
        }
    }
}

fn entries(archive: &[u8]) -> Result<HashMap<String, Vec<u8>>> {
    let mut out = HashMap::new();
    for e in tar::Archive::new(archive).entries()? {
        let mut e = e?;
        let path = e.path()?.to_string_lossy().trim_end_matches('/').to_owned();
        let mut data = Vec::new();
        e.read_to_end(&mut data)?;
        out.insert(path, data);
    }
    Ok(out)
}

fn sha(data: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(data))
}

async fn load(reference: &str) -> Result<Vec<u8>> {
    let dir = image_dir().context("no image")?;
    // Through the zstd decorator: plain archives must come out unchanged.
    let storage = CompressedStorage::new(LocalStorage::new(dir.join("storage"))?);
    let mut r = storage.load_image(&ImageRef::new(reference)?).await?;
    let mut v = Vec::new();
    r.read_to_end(&mut v).await?;
    Ok(v)
}

fn check_layer(layer: &[u8]) -> Result<()> {
    let files = entries(layer)?;
    ensure!(files.get("bin/busybox").is_some_and(|b| b.len() > 100_000), "busybox binary present");
    ensure!(files.get("etc/passwd").is_some_and(|p| p.starts_with(b"root:x:0:0:")), "passwd present");
    ensure!(files.contains_key("tmp") && files.contains_key("bin/sh"), "tmp and sh present");
    Ok(())
}

#[tokio::test]
async fn oci_layout_is_consistent() -> Result<()> {
    if image_dir().is_none() {
        return Ok(());
    }
    let files = entries(&load("local/busybox:latest").await?)?;
    let blob = |digest: &str| -> Result<&Vec<u8>> {
        let b = files.get(&format!("blobs/sha256/{}", digest.trim_start_matches("sha256:"))).context("blob missing")?;
        ensure!(sha(b) == digest, "blob {digest} does not hash to its name");
        Ok(b)
    };
    let index: serde_json::Value = serde_json::from_slice(&files["index.json"])?;
    let desc = &index["manifests"][0];
    assert_eq!(desc["annotations"]["io.containerd.image.name"], "local/busybox:latest");
    let manifest: serde_json::Value = serde_json::from_slice(blob(desc["digest"].as_str().unwrap())?)?;
    let config: serde_json::Value = serde_json::from_slice(blob(manifest["config"]["digest"].as_str().unwrap())?)?;
    let gz = blob(manifest["layers"][0]["digest"].as_str().unwrap())?;
    let mut layer = Vec::new();
    flate2::read::GzDecoder::new(&gz[..]).read_to_end(&mut layer)?;
    assert_eq!(config["rootfs"]["diff_ids"][0], sha(&layer), "diff_id is the uncompressed layer's digest");
    assert_eq!(config["config"]["Cmd"][0], "sh");
    check_layer(&layer)
}

#[tokio::test]
async fn docker_save_archive_is_consistent() -> Result<()> {
    if image_dir().is_none() {
        return Ok(());
    }
    let files = entries(&load("local/busybox-docker:latest").await?)?;
    let manifest: serde_json::Value = serde_json::from_slice(&files["manifest.json"])?;
    assert_eq!(manifest[0]["RepoTags"][0], "local/busybox:latest");
    let config_name = manifest[0]["Config"].as_str().unwrap();
    let config: serde_json::Value = serde_json::from_slice(&files[config_name])?;
    assert_eq!(format!("{}.json", sha(&files[config_name]).trim_start_matches("sha256:")), config_name);
    let layer = &files[manifest[0]["Layers"][0].as_str().unwrap()];
    assert_eq!(config["rootfs"]["diff_ids"][0], sha(layer));
    check_layer(layer)
}
