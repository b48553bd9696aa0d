//! `cargo xtask demo`: a short agent-like session through the `Manager` /
//! `Vessel` API with the embedded youki backend (no daemon): create a
//! workspace from the test image, write a script, run it, snapshot, break
//! the workspace, restore, fork a second branch from the first snapshot,
//! print the snapshot tree, then reopen the workspace on a "new host"
//! (another mount root and layer cache, the same storage) and check it.
//! Needs root (mounts, containers).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use tokio::io::AsyncReadExt;
use vessel::{
    Backend, CompressedStorage, ExecOptions, ImageRef, LocalStorage, Manager, ManagerConfig, QuotaMode, Storage,
    Vessel, VesselManifest,
};

fn step(name: &str, started: Instant) {
    println!("  {:<62} {:>9.2} ms", name, started.elapsed().as_secs_f64() * 1e3);
}

fn main() -> Result<()> {
    // Containers run in re-executed copies of this program: before any thread.
    vessel::init();
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(demo())
}

/// Runs `script` with `sh -c` (persisting its changes); returns exit code and stdout.
async fn exec(v: &Vessel, script: &str) -> Result<(i32, String)> {
    let t = Instant::now();
    let mut out = Vec::new();
    let res = v
        .exec(ExecOptions {
            command: vec!["sh".into(), "-c".into(), script.into()],
            stdout: Some(Box::new(&mut out)),
            persist_result: true,
            ..Default::default()
        })
        .await?;
    step(&format!("exec {script:?} -> exit {}", res.exit_code), t);
    Ok((res.exit_code, String::from_utf8_lossy(&out).into_owned()))
}

async fn demo() -> Result<()> {
    ensure!(nix::unistd::geteuid().is_root(), "the demo mounts overlays: run it as root");
    let mut args = std::env::args().skip(1);
    let usage = "usage: demo <image-storage-dir> <image-ref>";
    let image_store = PathBuf::from(args.next().context(usage)?);
    let image = args.next().context(usage)?;
    // /var/tmp: on the machine's own disk (often ext4), where a sparse image fits.
    let base = tempfile::tempdir_in("/var/tmp")?;
    println!("vessel demo, youki backend (data in {})", base.path().display());
    // Disk quotas on any disk: a sparse btrfs image with quotas on,
    // loop-mounted on the mount root (`vessel setup-quota` does the same).
    let t = Instant::now();
    let quota = QuotaRoot::setup(base.path().join("mounts"))?;
    step("give the mount root disk quotas (sparse btrfs image, loop-mounted)", t);
    let storage: std::sync::Arc<dyn Storage> =
        std::sync::Arc::new(CompressedStorage::new(LocalStorage::new(base.path().join("storage"))?));
    let mut archive = Vec::new();
    LocalStorage::new(&image_store)?.load_image(&ImageRef::new(&image)?).await?.read_to_end(&mut archive).await?;
    let config = |host: &str| {
        ManagerConfig::default()
            .shared_storage(storage.clone())
            .mount_root(quota.root.join(host))
            .quota_mode(QuotaMode::Require)
            .backend(Backend::Youki)
    };

    let t = Instant::now();
    let mgr = Manager::new(config("host-a")).await?;
    mgr.import_image(&image, Box::new(std::io::Cursor::new(archive))).await?;
    step(&format!("import {image} into storage"), t);
    let t = Instant::now();
    let v = mgr.create_vessel(&image, "/work").await?;
    step(&format!("create vessel {} (overlay on the image)", v.id()), t);
    if let Some(m) = v.id_mapping() {
        println!("    isolated: its root is host uid {} (user namespace over idmapped layers)", m.host_id);
    }
    let labels = v.manifest().labels;
    let label = |k: &str| labels.get(k).cloned().unwrap_or_default();
    println!(
        "    bounded: memory {} B, cpu {} us/100 ms, {} pids a command; disk {} B (btrfs quota)",
        label("vessel.limits.memory"),
        label("vessel.limits.cpu-quota-us"),
        label("vessel.limits.pids"),
        label("vessel.limits.disk")
    );

    let t = Instant::now();
    v.write_file("hello.sh", b"echo hello from $(hostname) as $(id -un) in $(pwd)\n", 0o755)?;
    step("write /work/hello.sh (confined file API)", t);
    let t = Instant::now();
    let s1 = v.create_snapshot("write hello.sh").await?;
    step(&format!("snapshot {} ({} B diff)", s1.id, s1.size), t);
    let (code, _) = exec(&v, "sh hello.sh > out.txt").await?;
    ensure!(code == 0, "hello.sh failed");
    println!("    out.txt: {}", String::from_utf8_lossy(&v.read_file("out.txt")?).trim());
    let t = Instant::now();
    let s2 = v.create_snapshot("run hello.sh > out.txt").await?;
    step(&format!("snapshot {} ({} B diff)", s2.id, s2.size), t);

    let (code, _) = exec(&v, "rm -rf /work /usr; ls /work").await?;
    ensure!(code != 0 && v.stat("/usr/bin").is_err(), "the workspace should be broken");
    let t = Instant::now();
    v.restore_snapshot(&s1.id).await?;
    step(&format!("restore {} (remount, nothing copied)", s1.id), t);
    let (code, out) = exec(&v, "ls; test -d /usr/bin && echo usr-is-back").await?;
    ensure!(code == 0 && out == "hello.sh\nusr-is-back\n", "restored state: {out:?}");
    println!("    /work after restore: hello.sh (out.txt came later, in the other branch)");

    let (code, _) = exec(&v, "echo bonjour de vessel > out.txt").await?;
    ensure!(code == 0);
    let t = Instant::now();
    let fork = v.create_snapshot("fork: a different output").await?;
    step(&format!("snapshot {} (a second branch from {})", fork.id, s1.id), t);
    let expected = v.read_file("out.txt")?;
    let id = v.id().to_string();
    println!("\nsnapshot tree of {id}:");
    print_tree(&v.manifest());
    v.close().await?;
    mgr.close().await?;

    // Another host: empty mount root and layer cache, the same storage.
    let t = Instant::now();
    let other = Manager::new(config("host-b")).await?;
    let vb = other.open_vessel(&id).await?;
    let got = vb.read_file("out.txt")?;
    ensure!(got == expected, "the reopened workspace differs");
    step("open on a new host from storage (checksums verified)", t);
    println!("\n/work/out.txt on the new host: {}", String::from_utf8_lossy(&got).trim());
    other.delete_vessel(&id).await?;
    other.close().await?;
    drop(quota);
    Ok(())
}

/// The demo's quota-capable mount root, unmounted and its image deleted
/// when the demo ends, however it ends.
struct QuotaRoot {
    root: PathBuf,
}

impl QuotaRoot {
    fn setup(root: PathBuf) -> Result<Self> {
        vessel::setup_quota(&root, &vessel::QuotaSetup::new().size(8 << 30))?;
        Ok(Self { root })
    }
}

impl Drop for QuotaRoot {
    fn drop(&mut self) {
        if vessel::remove_quota_setup(&self.root, None, true).is_err() {
            // The demo failed with vessels still mounted under it: detach
            // them all, then the image (its loop device goes with the last user).
            let _ = std::process::Command::new("umount").arg("-R").arg("-l").arg(&self.root).status();
            if let Err(e) = vessel::remove_quota_setup(&self.root, None, true) {
                eprintln!("demo: could not remove the quota filesystem at {}: {e}", self.root.display());
            }
        }
    }
}

fn print_tree(m: &VesselManifest) {
    for (depth, s) in m.tree() {
        let current = if m.current_snapshot_id.as_ref() == Some(&s.id) { "  <- current" } else { "" };
        println!("  {}{} {} ({} B){current}", "  ".repeat(depth), s.id, s.message, s.size);
    }
}
