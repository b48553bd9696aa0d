//! Forks and changes, through `Vessel` (youki backend, user namespace over
//! idmapped layers): a fork of a snapshot this host has cached, open and
//! ready for exec; 100 forks of one snapshot (wall time and disk per fork,
//! printed); a live fork of a vessel with 4 running processes into 10 (the
//! source's freeze window and the time per child, printed); and `changes`
//! over 10,000 new files, against `git status` of the same tree in the same
//! run. Needs root and the test image (`cargo xtask bench`).

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::IMAGE;
use criterion::Criterion;
use vessel::{ExecOptions, VesselOptions};
use vessel_benches::image_dir;

fn sh(script: &str, persist: bool) -> ExecOptions<'static> {
    ExecOptions {
        command: vec!["sh".into(), "-c".into(), script.into()],
        persist_result: persist,
        ..Default::default()
    }
}

/// Bytes under `dir` (blocks actually used).
fn disk_use(dir: &Path) -> u64 {
    let out = Command::new("du").args(["-sxB1"]).arg(dir).output().unwrap();
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap_or("0").parse().unwrap_or(0)
}

fn main() {
    vessel::init();
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED forks bench: needs root");
        return;
    }
    let source = image_dir().join("storage");
    if !source.is_dir() {
        eprintln!("SKIPPED forks bench: no test image at {} (run `cargo xtask image`)", source.display());
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mgr = common::youki_manager(&rt, dir.path(), &source);
    let mut c = Criterion::default().configure_from_args().sample_size(30).measurement_time(Duration::from_secs(6));
    let mut g = c.benchmark_group("forks");

    let src = rt.block_on(mgr.create_vessel(IMAGE, "/work")).unwrap();
    rt.block_on(src.exec(sh("echo hello > /work/a; mkdir -p /work/src; seq 1 1000 > /work/src/n", true))).unwrap();
    let snap = rt.block_on(src.create_snapshot("fork point")).unwrap();
    let opts = VesselOptions::new();
    g.bench_function("fork-of-a-cached-snapshot", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let t = Instant::now();
                let f = rt.block_on(mgr.fork_vessel(src.id().as_str(), &snap.id, &opts)).unwrap();
                total += t.elapsed();
                let id = f.id().to_string();
                rt.block_on(f.close()).unwrap();
                rt.block_on(mgr.delete_vessel(&id)).unwrap();
            }
            total
        })
    });

    // 100 forks of one snapshot, all open at once.
    let host = dir.path().join("host");
    let before = disk_use(&host) + disk_use(&dir.path().join("data"));
    let t = Instant::now();
    let forks: Vec<_> =
        (0..100).map(|_| rt.block_on(mgr.fork_vessel(src.id().as_str(), &snap.id, &opts)).unwrap()).collect();
    let wall = t.elapsed();
    let after = disk_use(&host) + disk_use(&dir.path().join("data"));
    println!(
        "forks/100-forks: {:.0} ms in all, {:.1} ms each; disk {} KiB per fork (mount root and storage)",
        wall.as_secs_f64() * 1e3,
        wall.as_secs_f64() * 10.0,
        (after.saturating_sub(before)) / 100 / 1024
    );
    for f in forks {
        let id = f.id().to_string();
        rt.block_on(f.close()).unwrap();
        rt.block_on(mgr.delete_vessel(&id)).unwrap();
    }

    // A live fork into 10 with 4 processes running, a 1-file change.
    let live = rt.block_on(mgr.create_vessel(IMAGE, "/work")).unwrap();
    for _ in 0..4 {
        rt.block_on(live.spawn(sh("while true; do :; done", true))).unwrap();
    }
    rt.block_on(live.exec(sh("echo change > /work/one", true))).unwrap();
    let t = Instant::now();
    let children = rt.block_on(live.fork(10, &opts)).unwrap();
    let all = t.elapsed();
    let m = live.manifest();
    let freeze = m.snapshots.last().and_then(|s| s.labels.get("vessel.freeze-us")).cloned().unwrap_or_default();
    println!(
        "forks/live-into-10: source frozen {freeze} us; {:.1} ms in all, {:.1} ms per child",
        all.as_secs_f64() * 1e3,
        all.as_secs_f64() * 100.0
    );
    for f in children {
        let id = f.id().to_string();
        rt.block_on(f.close()).unwrap();
        rt.block_on(mgr.delete_vessel(&id)).unwrap();
    }
    rt.block_on(live.close()).unwrap();

    // changes over 10,000 new files, and git status of the same tree: a
    // copy of the vessel's tree on the host (root may not create files in
    // the vessel's idmapped rootfs), its image part committed.
    let v = rt.block_on(mgr.create_vessel(IMAGE, "/work")).unwrap();
    rt.block_on(v.create_snapshot("base")).unwrap();
    rt.block_on(
        v.exec(sh("mkdir -p /work/many; cd /work/many; for i in $(seq 1 10000); do echo $i > f$i; done", true)),
    )
    .unwrap();
    let n = rt.block_on(v.changes(None)).unwrap().len();
    assert!(n >= 10_000, "{n} changes");
    g.bench_function("changes-10000-files", |b| b.iter(|| rt.block_on(v.changes(None)).unwrap()));
    let copy = dir.path().join("git-copy");
    let copied = Command::new("cp").arg("-a").arg(v.rootfs()).arg(&copy).status().is_ok_and(|s| s.success());
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(&copy)
            .args(["-c", "safe.directory=*", "-c", "user.email=b@b", "-c", "user.name=b"])
            .args(args)
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let have_git = copied
        && git(&["init", "-q"])
        && git(&["add", "-A", "--", ".", ":!work/many"])
        && git(&["commit", "-qm", "image"]);
    if have_git {
        g.bench_function("git-status-same-tree", |b| {
            b.iter(|| assert!(git(&["status", "--porcelain", "--untracked-files=all"])))
        });
    } else {
        eprintln!("forks bench: git did not run here; its baseline is skipped");
    }
    g.finish();
    rt.block_on(v.close()).unwrap();
    rt.block_on(src.close()).unwrap();
    rt.block_on(mgr.close()).unwrap();
}
