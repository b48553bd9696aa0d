//! `cargo xtask demo`: the main job, as far as the layers built so far go.
//!
//! A workspace on real overlay mounts, driven the way an agent session would:
//! import the image into the layer cache, mount the workspace, write a
//! script, run it in a container (the embedded youki backend, no daemon),
//! snapshot (the upper dir's OCI diff streams into zstd storage; the sealed
//! upper becomes a cached layer), break the workspace with `rm -rf`, restore
//! (a remount: nothing is copied), fork a second branch from the first
//! snapshot, print the snapshot tree, then reopen the current snapshot on a
//! "new host" (empty cache, same storage) and check it. The `Manager`/`Vessel`
//! facade will wrap these steps; today the demo drives the layers directly.
//! Needs root (mounts, containers).

use std::collections::BTreeMap;
use std::io::Cursor;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use tokio::io::AsyncReadExt;
use vessel::runtime::{RunRequest, Runtime, YoukiRuntime};
use vessel::snapshot::image::import_archive;
use vessel::snapshot::{LayerCache, LayerKey, write_diff};
use vessel::{
    CompressedStorage, IdGenerator, ImageRef, LocalStorage, SnapshotId, SnapshotManifest, Storage, UniqueIdGenerator,
    VesselManifest,
};

fn step(name: &str, started: Instant) {
    println!("  {:<58} {:>9.2} ms", name, started.elapsed().as_secs_f64() * 1e3);
}

/// One host's view: a layer cache and a mount root.
struct Host {
    cache: LayerCache,
    mounts: PathBuf,
}

/// A mounted workspace: image layers + snapshot chain as lowers, a live upper.
struct Workspace {
    dir: PathBuf,
    image_layers: Vec<PathBuf>,
    chain: Vec<PathBuf>,
}

impl Workspace {
    fn merged(&self) -> PathBuf {
        self.dir.join("merged")
    }
    fn upper(&self) -> PathBuf {
        self.dir.join("upper")
    }

    fn mount(&self) -> Result<()> {
        for d in ["merged", "upper", "work"] {
            std::fs::create_dir_all(self.dir.join(d))?;
        }
        let lowers: Vec<String> =
            self.chain.iter().rev().chain(self.image_layers.iter().rev()).map(|p| p.display().to_string()).collect();
        let opts = format!(
            "lowerdir={},upperdir={},workdir={},redirect_dir=off,metacopy=off,index=off",
            lowers.join(":"),
            self.upper().display(),
            self.dir.join("work").display()
        );
        mount(Some("overlay"), &self.merged(), Some("overlay"), MsFlags::empty(), Some(opts.as_str()))
            .context("mount the workspace overlay")
    }

    fn unmount(&self) -> Result<()> {
        umount2(&self.merged(), MntFlags::MNT_DETACH).context("unmount")?;
        std::fs::remove_dir_all(self.dir.join("work"))?;
        Ok(())
    }

    fn path(&self, p: &str) -> PathBuf {
        self.merged().join(p.trim_start_matches('/'))
    }
}

async fn read_all(mut r: vessel::BlobReader) -> Result<Vec<u8>> {
    let mut v = Vec::new();
    r.read_to_end(&mut v).await?;
    Ok(v)
}

fn main() -> Result<()> {
    // Containers run in re-executed copies of this program: before any thread.
    vessel::runtime::init();
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(demo())
}

/// Runs `script` with `sh -c` in the workspace; returns its exit code and output.
async fn exec(rt: &YoukiRuntime, ws: &Workspace, env: &[String], script: &str) -> Result<(i32, String)> {
    let t = Instant::now();
    let mut out = Vec::new();
    let code = rt
        .run(RunRequest {
            rootfs: ws.merged(),
            args: vec!["sh".into(), "-c".into(), script.into()],
            env: env.to_vec(),
            cwd: Some("/work".into()),
            stdout: Some(Box::new(&mut out)),
            stderr: Some(Box::new(tokio::io::sink())),
            ..Default::default()
        })
        .await?;
    step(&format!("exec {script:?} -> exit {code}"), t);
    Ok((code, String::from_utf8_lossy(&out).into_owned()))
}

async fn demo() -> Result<()> {
    ensure!(nix::unistd::geteuid().is_root(), "the demo mounts overlays: run it as root");
    let mut args = std::env::args().skip(1);
    let usage = "usage: demo <image-storage-dir> <image-ref>";
    let image_store = args.next().context(usage)?;
    let image = ImageRef::new(&args.next().context(usage)?)?;
    let base = tempfile::tempdir()?;
    println!("vessel demo (data in {})", base.path().display());
    let storage = CompressedStorage::new(LocalStorage::new(base.path().join("storage"))?);
    let host =
        Host { cache: LayerCache::open(base.path().join("host-a/cache"))?, mounts: base.path().join("host-a/mounts") };
    let ids = UniqueIdGenerator::new();
    let id = ids.vessel_id();

    let t = Instant::now();
    let archive = read_all(LocalStorage::new(&image_store)?.load_image(&image).await?).await?;
    storage.save_image(&image, Box::new(Cursor::new(archive.clone()))).await?;
    let img = import_archive(&archive[..], &host.cache, id.as_str(), Some(image.as_str()))?;
    step(&format!("import {image} into storage and the layer cache"), t);

    let t = Instant::now();
    let now = chrono::Utc::now();
    let mut manifest = VesselManifest {
        id: id.clone(),
        base_image_ref: image.clone(),
        current_snapshot_id: None,
        work_dir: "/work".into(),
        create_time: now,
        update_time: now,
        labels: BTreeMap::from([("vessel.image.config".into(), img.config_digest.clone())]),
        snapshots: Vec::new(),
    };
    storage.save_vessel_manifest(&manifest).await?;
    let ws = Workspace {
        dir: host.mounts.join(id.as_str()),
        image_layers: img.layers.iter().map(|l| l.path.clone()).collect(),
        chain: Vec::new(),
    };
    ws.mount()?;
    std::fs::create_dir_all(ws.path("/work"))?;
    step(&format!("create vessel {id} (overlay on the image)"), t);
    let mut ws = ws;

    let rt = YoukiRuntime::new(base.path().join("host-a/youki"));
    let env = img.config.env.clone();
    // Agent step 1: write a script (through the file API's path: the mount).
    std::fs::write(ws.path("/work/hello.sh"), "echo hello from $(uname -n) as $(id -un)\n")?;
    let s1 = snapshot(&storage, &host, &mut ws, &mut manifest, &ids, "write hello.sh").await?;
    // Agent step 2: run it in a container.
    let (code, _) = exec(&rt, &ws, &env, "sh hello.sh > out.txt").await?;
    ensure!(code == 0, "hello.sh failed");
    let _s2 = snapshot(&storage, &host, &mut ws, &mut manifest, &ids, "run hello.sh > out.txt").await?;

    let (code, _) = exec(&rt, &ws, &env, "rm -rf /work /usr; ls /work").await?;
    ensure!(code != 0 && !ws.path("/usr/bin").exists(), "the workspace should be broken");

    let t = Instant::now();
    restore(&host, &mut ws, &mut manifest, &s1)?;
    storage.save_vessel_manifest(&manifest).await?;
    step(&format!("restore {} (remount, nothing copied)", s1.id), t);
    let (code, out) = exec(&rt, &ws, &env, "ls /work; test -d /usr/bin && echo usr-is-back").await?;
    ensure!(code == 0 && out == "hello.sh\nusr-is-back\n", "restored state: {out:?}");
    println!("    /work after restore: hello.sh (out.txt came later, in the other branch)");

    let (code, _) = exec(&rt, &ws, &env, "echo bonjour de vessel > out.txt").await?;
    ensure!(code == 0);
    snapshot(&storage, &host, &mut ws, &mut manifest, &ids, "fork: a different output").await?;
    let expected = std::fs::read(ws.path("/work/out.txt"))?;
    ws.unmount()?;

    println!("\nsnapshot tree of {id}:");
    print_tree(&manifest, None, 0);

    // Another host: empty cache, same storage.
    let t = Instant::now();
    let other =
        Host { cache: LayerCache::open(base.path().join("host-b/cache"))?, mounts: base.path().join("host-b/mounts") };
    let reopened = storage.load_vessel_manifest(&id).await?;
    let archive = read_all(storage.load_image(&reopened.base_image_ref).await?).await?;
    let img = import_archive(&archive[..], &other.cache, id.as_str(), Some(reopened.base_image_ref.as_str()))?;
    let current = reopened.current_snapshot_id.clone().context("a current snapshot")?;
    let mut chain = Vec::new();
    for s in reopened.chain(&current).into_iter().rev() {
        let blob = read_all(storage.load_snapshot(&id, &s.id).await?).await?;
        let key = LayerKey::Snapshot(s.id.clone());
        chain.push(other.cache.get_or_unpack(&key, id.as_str(), Some(&s.checksum), || Ok(&blob[..]))?);
    }
    let ws_b = Workspace {
        dir: other.mounts.join(id.as_str()),
        image_layers: img.layers.iter().map(|l| l.path.clone()).collect(),
        chain,
    };
    ws_b.mount()?;
    let got = std::fs::read(ws_b.path("/work/out.txt"))?;
    ws_b.unmount()?;
    ensure!(got == expected, "the reopened workspace differs");
    step("open on a new host from storage (checksums verified)", t);
    println!("\n/work/out.txt on the new host: {}", String::from_utf8_lossy(&got).trim());
    Ok(())
}

/// Seals the upper: its diff goes to storage, the sealed dir into the cache.
async fn snapshot(
    storage: &dyn Storage,
    host: &Host,
    ws: &mut Workspace,
    manifest: &mut VesselManifest,
    ids: &UniqueIdGenerator,
    message: &str,
) -> Result<SnapshotManifest> {
    let t = Instant::now();
    ws.unmount()?;
    let (tar, stats) = write_diff(&ws.upper(), Vec::new())?;
    let sid = ids.snapshot_id();
    storage.save_snapshot(&manifest.id, &sid, Box::new(Cursor::new(tar))).await?;
    let layer = host.cache.adopt(&LayerKey::Snapshot(sid.clone()), manifest.id.as_str(), &ws.upper())?;
    ws.chain.push(layer);
    ws.mount()?;
    let snap = SnapshotManifest {
        id: sid.clone(),
        vessel_id: manifest.id.clone(),
        parent_id: manifest.current_snapshot_id.clone(),
        message: message.into(),
        checksum: stats.digest,
        size: stats.size as i64,
        create_time: chrono::Utc::now(),
        labels: Default::default(),
    };
    manifest.snapshots.push(snap.clone());
    manifest.current_snapshot_id = Some(sid);
    manifest.update_time = chrono::Utc::now();
    storage.save_vessel_manifest(manifest).await?;
    step(&format!("snapshot {:?} ({} B diff)", message, stats.size), t);
    Ok(snap)
}

/// Points the workspace at `snap`'s chain with a fresh upper.
fn restore(host: &Host, ws: &mut Workspace, manifest: &mut VesselManifest, snap: &SnapshotManifest) -> Result<()> {
    ws.unmount()?;
    std::fs::remove_dir_all(ws.upper())?;
    ws.chain =
        manifest.chain(&snap.id).iter().rev().map(|s| host.cache.path(&LayerKey::Snapshot(s.id.clone()))).collect();
    manifest.current_snapshot_id = Some(snap.id.clone());
    ws.mount()
}

fn print_tree(m: &VesselManifest, parent: Option<&SnapshotId>, depth: usize) {
    for s in m.snapshots.iter().filter(|s| s.parent_id.as_ref() == parent) {
        let current = if m.current_snapshot_id.as_ref() == Some(&s.id) { "  <- current" } else { "" };
        println!("  {}{} {} ({} B){current}", "  ".repeat(depth), s.id, s.message, s.size);
        print_tree(m, Some(&s.id), depth + 1);
    }
}
