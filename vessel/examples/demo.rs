//! `cargo xtask demo`: the main job, as far as the layers built so far go.
//!
//! Today that is the storage layer: import the test image into a zstd
//! store, record a vessel with a branching snapshot history, stream the
//! snapshots back with their sha256 checksums verified, and reopen
//! everything through a fresh storage handle, as another host would.
//! Containers (exec) and overlay snapshots join as vessel-runtime and
//! vessel-snapshot land.

use std::time::Instant;

use anyhow::{Context, Result, ensure};
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;
use vessel::{
    BlobReader, CompressedStorage, IdGenerator, ImageRef, LocalStorage, SnapshotManifest, Storage, UniqueIdGenerator,
    VesselManifest,
};

/// A snapshot to take: message, index of its parent snapshot, files it adds.
type Step<'a> = (&'a str, Option<usize>, Vec<(&'a str, &'a str)>);

fn step(name: &str, started: Instant) {
    println!("  {:<48} {:>9.2} ms", name, started.elapsed().as_secs_f64() * 1e3);
}

async fn read_hashed(mut r: BlobReader) -> Result<(String, u64)> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = r.read(&mut buf).await?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    Ok((format!("sha256:{:x}", h.finalize()), n))
}

/// A small tar standing in for a layer diff, so the demo stores real tar bytes.
fn layer_tar(files: &[(&str, &str)]) -> Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, body) in files {
        let mut h = tar::Header::new_ustar();
        h.set_mode(0o644);
        h.set_size(body.len() as u64);
        b.append_data(&mut h, path, body.as_bytes())?;
    }
    Ok(b.into_inner()?)
}

#[tokio::main]
async fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let image_store = args.next().context("usage: demo <image-storage-dir> <image-ref>")?;
    let image = ImageRef::new(&args.next().context("usage: demo <image-storage-dir> <image-ref>")?)?;
    let data = tempfile::tempdir()?;
    println!("vessel demo: storage layer (data dir {})", data.path().display());

    let t = Instant::now();
    let source = LocalStorage::new(&image_store)?;
    let storage = CompressedStorage::new(LocalStorage::new(data.path())?).with_level(3);
    let archive = source.load_image(&image).await?;
    storage.save_image(&image, archive).await?;
    let stored = std::fs::metadata(data.path().join("images").join(format!("{image}.tar.zst")))?.len();
    let original =
        std::fs::metadata(std::path::Path::new(&image_store).join("images").join(format!("{image}.tar")))?.len();
    step(&format!("import {image} ({original} -> {stored} bytes zstd)"), t);

    let ids = UniqueIdGenerator::new();
    let id = ids.vessel_id();
    let now = chrono::Utc::now();
    let mut manifest = VesselManifest {
        id: id.clone(),
        base_image_ref: image.clone(),
        current_snapshot_id: None,
        work_dir: "/work".into(),
        create_time: now,
        update_time: now,
        labels: Default::default(),
        snapshots: Vec::new(),
    };
    let t = Instant::now();
    storage.save_vessel_manifest(&manifest).await?;
    step(&format!("create vessel {id}"), t);

    // main: write a script, run it; then a fork from the first snapshot.
    let plan: [Step<'_>; 3] = [
        ("write hello.sh", None, vec![("work/hello.sh", "echo hello\n")]),
        ("run hello.sh -> out.txt", Some(0), vec![("work/out.txt", "hello\n")]),
        ("fork: different output", Some(0), vec![("work/out.txt", "bonjour\n")]),
    ];
    for (message, parent, files) in plan {
        let t = Instant::now();
        let tar = layer_tar(&files)?;
        let sid = ids.snapshot_id();
        let checksum = format!("sha256:{:x}", Sha256::digest(&tar));
        let size = tar.len() as i64;
        storage.save_snapshot(&id, &sid, Box::new(std::io::Cursor::new(tar))).await?;
        let parent_id = parent.map(|i| manifest.snapshots[i].id.clone());
        manifest.snapshots.push(SnapshotManifest {
            id: sid.clone(),
            vessel_id: id.clone(),
            parent_id,
            message: message.into(),
            checksum,
            size,
            create_time: chrono::Utc::now(),
            labels: Default::default(),
        });
        manifest.current_snapshot_id = Some(sid);
        manifest.update_time = chrono::Utc::now();
        storage.save_vessel_manifest(&manifest).await?;
        step(&format!("snapshot {message:?}"), t);
    }

    // Another host: a fresh handle on the same data, every blob verified.
    let t = Instant::now();
    let other = CompressedStorage::new(LocalStorage::new(data.path())?);
    let reopened = other.load_vessel_manifest(&id).await?;
    ensure!(reopened == manifest, "the manifest did not survive reopening");
    for s in &reopened.snapshots {
        let (sum, n) = read_hashed(other.load_snapshot(&id, &s.id).await?).await?;
        ensure!(sum == s.checksum && n as i64 == s.size, "snapshot {} failed verification", s.id);
    }
    step("reopen on a fresh handle, verify all checksums", t);

    println!("\nsnapshot tree of {id}:");
    print_tree(&reopened, None, 0);
    println!("\nvessels in storage: {:?}", other.list_vessels().await?);
    println!("images in storage:  {:?}", other.list_images().await?);
    Ok(())
}

fn print_tree(m: &VesselManifest, parent: Option<&vessel::SnapshotId>, depth: usize) {
    for s in m.snapshots.iter().filter(|s| s.parent_id.as_ref() == parent) {
        let current = if m.current_snapshot_id.as_ref() == Some(&s.id) { "  <- current" } else { "" };
        println!("  {}{} {} ({} bytes){current}", "  ".repeat(depth), s.id, s.message, s.size);
        print_tree(m, Some(&s.id), depth + 1);
    }
}
