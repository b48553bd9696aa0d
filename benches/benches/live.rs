//! Live vessels, through `Vessel` (youki backend, user namespace over
//! idmapped layers, vessel's default isolation): `exec true` joining the
//! running sandbox, against `runc exec` and `crun exec` into a running
//! container of the same image, spec and isolation, in the same run; the
//! first exec after `create_vessel` (the sandbox's start included); a
//! 1-file snapshot while 4 processes spin (its freeze window printed from
//! the snapshot's label); pause + resume with 10 processes; and the host
//! memory of 100 live vessels with one idle process each (printed).
//!
//! crun refuses a hybrid cgroup layout (this machine's), so the whole bench
//! runs in a private mount namespace whose `/sys/fs/cgroup` is v1 only (the
//! unified mount detached): vessel, runc and crun see the same view. The
//! containerd backend is measured with `VESSEL_BENCH_HYBRID=1` (the host's
//! view, no crun), since containerd cannot see a private namespace's mounts. Needs
//! root and the test image (`cargo xtask bench`).

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::IMAGE;
use criterion::Criterion;
use vessel::{Backend, CompressedStorage, ExecOptions, LocalStorage, Manager, ManagerConfig, Storage};
use vessel_benches::image_dir;
use vessel_runtime::oci_spec::runtime::{LinuxNamespaceBuilder, LinuxNamespaceType};
use vessel_runtime::{RunRequest, oci_spec};

fn exec_true(rt: &tokio::runtime::Runtime, v: &vessel::Vessel) {
    let res = rt
        .block_on(v.exec(ExecOptions { command: vec!["true".into()], persist_result: true, ..Default::default() }))
        .unwrap();
    assert_eq!(res.exit_code, 0);
}

fn bg(script: &str) -> ExecOptions<'static> {
    ExecOptions { command: vec!["sh".into(), "-c".into(), script.into()], persist_result: true, ..Default::default() }
}

/// A private mount namespace with a v1-only cgroup view (see the module docs).
fn v1_only_view() -> bool {
    use nix::mount::{MntFlags, MsFlags, mount, umount2};
    if nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).is_err() {
        return false;
    }
    let private = mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None::<&str>);
    private.is_ok()
        && (!Path::new("/sys/fs/cgroup/unified").exists()
            || umount2("/sys/fs/cgroup/unified", MntFlags::MNT_DETACH).is_ok())
}

/// `tool run -d` of `bundle` as container `id` (its process sleeps).
fn start_container(tool: &str, root: &Path, bundle: &Path, id: &str) -> bool {
    Command::new(tool)
        .arg("--root")
        .arg(root)
        .args(["run", "-d", "--bundle"])
        .arg(bundle)
        .arg(id)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn exec_in(tool: &str, root: &Path, id: &str) {
    let st = Command::new(tool)
        .arg("--root")
        .arg(root)
        .args(["exec", id, "true"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success(), "{tool} exec");
}

fn delete(tool: &str, root: &Path, id: &str) {
    let _ = Command::new(tool).arg("--root").arg(root).args(["delete", "-f", id]).status();
}

/// Proportional set size of `pid` in KiB: its resident memory, pages it
/// shares (the runners are copies of this program) divided among sharers.
fn pss_kib(pid: i32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    text.lines().find_map(|l| l.strip_prefix("Pss:")?.trim().trim_end_matches("kB").trim().parse().ok()).unwrap_or(0)
}

fn main() {
    vessel::init();
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED live bench: needs root");
        return;
    }
    let source = image_dir().join("storage");
    if !source.is_dir() {
        eprintln!("SKIPPED live bench: no test image at {} (run `cargo xtask image`)", source.display());
        return;
    }
    // VESSEL_BENCH_HYBRID=1: stay in the host's view (no crun baseline),
    // which the containerd backend needs: containerd lives outside a
    // private mount namespace and would not see the vessels' mounts.
    let v1 = std::env::var_os("VESSEL_BENCH_HYBRID").is_none() && v1_only_view();
    if !v1 {
        eprintln!("live bench: could not make a v1-only cgroup view; crun exec is skipped");
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mgr = common::youki_manager(&rt, dir.path(), &source);
    let mut c = Criterion::default().configure_from_args().sample_size(50).measurement_time(Duration::from_secs(8));
    let mut g = c.benchmark_group("live");

    let v = rt.block_on(mgr.create_vessel(IMAGE, "/work")).unwrap();
    exec_true(&rt, &v);
    g.bench_function("vessel-youki-userns/exec-true", |b| b.iter(|| exec_true(&rt, &v)));

    // runc and crun: a running container of the same spec (user namespace
    // over the same idmapped rootfs, vessel's seccomp, capabilities, masks).
    let rootfs = v.rootfs();
    let mapping = v.id_mapping().expect("a user namespace");
    let bundle = dir.path().join("bundle");
    std::fs::create_dir_all(&bundle).unwrap();
    let req = RunRequest {
        rootfs: rootfs.clone(),
        args: vec!["sleep".into(), "1000000".into()],
        user_namespace: Some(mapping),
        ..Default::default()
    };
    let mut spec = vessel_runtime::spec::build(&req, "/vessel/bench-live-baseline", None).unwrap();
    let mut linux = spec.linux().clone().unwrap();
    let mut ns = linux.namespaces().clone().unwrap();
    ns.push(LinuxNamespaceBuilder::default().typ(LinuxNamespaceType::Network).build().unwrap());
    linux.set_namespaces(Some(ns));
    spec.set_linux(Some(linux));
    let mut process = spec.process().clone().unwrap();
    process.set_terminal(Some(false));
    spec.set_process(Some(process));
    let spec: oci_spec::runtime::Spec = spec;
    spec.save(bundle.join("config.json")).unwrap();
    for tool in ["runc", "crun"] {
        if tool == "crun" && !v1 {
            continue;
        }
        let root = dir.path().join(format!("{tool}-root"));
        let id = format!("bench-live-{tool}");
        if !start_container(tool, &root, &bundle, &id) {
            eprintln!("live bench: {tool} run -d failed; {tool} exec is skipped");
            continue;
        }
        exec_in(tool, &root, &id);
        g.bench_function(format!("{tool}-exec-userns/true"), |b| b.iter(|| exec_in(tool, &root, &id)));
        delete(tool, &root, &id);
    }

    // The same through the containerd backend: the sandbox is a task.
    if v1 {
        eprintln!("SKIPPED live bench for containerd: in the v1-only view (set VESSEL_BENCH_HYBRID=1)");
    } else if let Some(address) = std::env::var_os("VESSEL_CONTAINERD_ADDRESS") {
        let storage: Arc<dyn Storage> =
            Arc::new(CompressedStorage::new(LocalStorage::new(dir.path().join("data")).unwrap()));
        let config = ManagerConfig::default()
            .shared_storage(storage)
            .mount_root(dir.path().join("host-containerd"))
            .backend(Backend::Containerd)
            .containerd_address(address)
            .namespace(format!("vessel-bench-live-{}", std::process::id()));
        let config = if std::env::var_os("VESSEL_BENCH_NO_QUOTA").is_some() { config.disk_quota(None) } else { config };
        let cmgr = rt.block_on(Manager::new(config)).unwrap();
        let cv = rt.block_on(cmgr.create_vessel(IMAGE, "/work")).unwrap();
        exec_true(&rt, &cv);
        g.bench_function("vessel-containerd-userns/exec-true", |b| b.iter(|| exec_true(&rt, &cv)));
        rt.block_on(cv.close()).unwrap();
        rt.block_on(cmgr.close()).unwrap();
    } else {
        eprintln!("SKIPPED live bench for containerd: VESSEL_CONTAINERD_ADDRESS is unset (`cargo xtask bench`)");
    }

    // The first exec of a new vessel: the sandbox starts.
    let fresh = rt.block_on(mgr.create_vessel(IMAGE, "/work")).unwrap();
    rt.block_on(fresh.close()).unwrap();
    let id = fresh.id().to_string();
    g.bench_function("vessel-youki-userns/first-exec", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let v = rt.block_on(mgr.open_vessel(&id)).unwrap();
                let t = std::time::Instant::now();
                exec_true(&rt, &v);
                total += t.elapsed();
                rt.block_on(v.close()).unwrap();
            }
            total
        });
    });

    // A 1-file snapshot while 4 processes spin.
    let busy = rt.block_on(mgr.create_vessel(IMAGE, "/work")).unwrap();
    for _ in 0..4 {
        rt.block_on(busy.spawn(bg("while :; do :; done"))).unwrap();
    }
    let mut windows = Vec::new();
    let mut n = 0u64;
    g.bench_function("snapshot-1-file-4-busy", |b| {
        b.iter(|| {
            n += 1;
            busy.write_file("f", n.to_string().as_bytes(), 0o644).unwrap();
            let s = rt.block_on(busy.create_snapshot("busy")).unwrap();
            windows.push(s.labels["vessel.freeze-us"].parse::<u64>().unwrap());
        });
    });
    windows.sort_unstable();
    if !windows.is_empty() {
        let at = |q: usize| windows[(windows.len() - 1) * q / 100];
        println!("live/snapshot-1-file-4-busy: freeze window p50 {} us, p90 {} us", at(50), at(90));
    }
    rt.block_on(busy.close()).unwrap();

    // Pause and resume with 10 processes.
    let paused = rt.block_on(mgr.create_vessel(IMAGE, "/work")).unwrap();
    for _ in 0..10 {
        rt.block_on(paused.spawn(bg("exec sleep 1000000"))).unwrap();
    }
    g.bench_function("pause-10-processes", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let t = std::time::Instant::now();
                rt.block_on(paused.pause()).unwrap();
                total += t.elapsed();
                rt.block_on(paused.resume()).unwrap();
            }
            total
        });
    });
    g.bench_function("resume-10-processes", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                rt.block_on(paused.pause()).unwrap();
                let t = std::time::Instant::now();
                rt.block_on(paused.resume()).unwrap();
                total += t.elapsed();
            }
            total
        });
    });
    rt.block_on(paused.close()).unwrap();
    g.finish();

    // 100 live vessels, one idle process each: the host's memory for them.
    let me = std::process::id() as i32;
    // The sandboxes' memory: every descendant (runners, agents) but the
    // idle processes themselves (`sleep`, their own memory).
    let kids_rss = || -> u64 {
        let all: Vec<(i32, i32, String)> = procfs::process::all_processes()
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|p| p.stat().ok().map(|s| (s.pid, s.ppid, s.comm)))
            .collect();
        let mut tree = vec![me];
        let mut i = 0;
        while i < tree.len() {
            let parent = tree[i];
            tree.extend(all.iter().filter(|(_, pp, _)| *pp == parent).map(|(pid, _, _)| *pid));
            i += 1;
        }
        all.iter()
            .filter(|(pid, _, comm)| *pid != me && tree.contains(pid) && comm != "sleep")
            .map(|(pid, ..)| pss_kib(*pid))
            .sum()
    };
    let before = pss_kib(me) + kids_rss();
    let vessels: Vec<_> = (0..100)
        .map(|_| {
            let v = rt.block_on(mgr.create_vessel(IMAGE, "/work")).unwrap();
            rt.block_on(v.spawn(bg("exec sleep 1000000"))).unwrap();
            v
        })
        .collect();
    let after = pss_kib(me) + kids_rss();
    println!(
        "live/100-vessels: host memory (PSS of this process and its runners) {} KiB more, {} KiB per vessel",
        after.saturating_sub(before),
        after.saturating_sub(before) / 100
    );
    for v in vessels {
        rt.block_on(v.close()).unwrap();
    }
    rt.block_on(v.close()).unwrap();
    rt.block_on(mgr.close()).unwrap();
    c.final_summary();
}
