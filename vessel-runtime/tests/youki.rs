//! The runtime conformance suite on the youki backend. Its own `main`, so
//! that `vessel_runtime::init()` runs first: this binary is also the runner
//! that the backend re-executes for every container.

mod conformance;

use std::path::PathBuf;
use std::sync::Arc;

use conformance::{CaseResult, Suite, leftover_cgroups};
use libtest_mimic::{Arguments, Failed};
use vessel_runtime::{Runtime, UserNamespace, YoukiRuntime};

/// Set in the child that plays a vessel process killed in various ways.
const CRASH_CHILD: &str = "VESSEL_TEST_CRASH_CHILD";
/// Set in the child that runs a container on a cgroup v2 host view.
const V2_CHILD: &str = "VESSEL_TEST_V2_CHILD";

fn main() {
    vessel_runtime::init();
    if std::env::var_os(CRASH_CHILD).is_some() {
        crash_child();
    }
    if std::env::var_os(V2_CHILD).is_some() {
        v2_child();
    }
    let args = Arguments::from_args();
    let Some((image, dir)) = setup() else {
        println!("youki conformance: 0 passed, 0 failed, 1 skipped");
        return;
    };
    // Every case twice: in a user namespace over idmapped layers (vessel's
    // default) and with host ids.
    let ns = UserNamespace::new(conformance::test_mapping()).expect("user namespace");
    let mut suites = Vec::new();
    for userns in [Some(&ns), None] {
        let sub = dir.path().join(if userns.is_some() { "userns" } else { "host" });
        let (rootfs, mount) = conformance::rootfs(&sub, &image, userns);
        let runtime = YoukiRuntime::new(sub.join("youki"));
        suites.push(Arc::new(Suite { runtime, rootfs, userns: userns.map(|n| n.mapping()), _mount: mount }));
    }
    let mut trials = Vec::new();
    for s in &suites {
        trials.extend(conformance::trials!(s.clone(), block_on));
    }
    {
        let (suite, root) = (suites[0].clone(), dir.path().join(format!("long-{}", "x".repeat(120))));
        trials.push(libtest_mimic::Trial::test("tty_with_a_long_state_path", move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let long = Suite {
                runtime: YoukiRuntime::new(&root),
                rootfs: suite.rootfs.clone(),
                userns: suite.userns,
                _mount: None,
            };
            let r = rt.block_on(long.tty_mode());
            let _ = std::fs::remove_dir_all(&root);
            r.map_err(Failed::from)
        }));
    }
    {
        let (suite, root) = (suites[1].clone(), dir.path().join("v2"));
        trials.push(libtest_mimic::Trial::test("device_rules_on_cgroup_v2", move || {
            device_rules_on_cgroup_v2(&suite, &root).map_err(Failed::from)
        }));
    }
    {
        let (suite, root) = (suites[0].clone(), dir.path().join("crash"));
        trials.push(libtest_mimic::Trial::test("no_container_outlives_its_runner_and_caller", move || {
            no_container_outlives_its_runner_and_caller(&suite, &root).map_err(Failed::from)
        }));
    }
    let conclusion = libtest_mimic::run(&args, trials);
    // Leak check once every case is done: no cgroups, no container state.
    let cgroups = leftover_cgroups();
    let mut left = Vec::new();
    for s in &suites {
        for sub in ["state", "bundles", "runners"] {
            left.extend(std::fs::read_dir(s.state_root().join(sub)).into_iter().flatten().flatten().map(|e| e.path()));
        }
    }
    drop(suites);
    if !cgroups.is_empty() || !left.is_empty() {
        eprintln!("leaks after the suite: cgroups {cgroups:?}, state {left:?}");
        std::process::exit(101);
    }
    conclusion.exit();
}

fn block_on(f: impl Future<Output = CaseResult>) -> Result<(), Failed> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(f).map_err(Failed::from)
}

trait StateRoot {
    fn state_root(&self) -> PathBuf;
}

impl StateRoot for Suite<YoukiRuntime> {
    fn state_root(&self) -> PathBuf {
        self.rootfs.parent().unwrap().join("youki")
    }
}

/// The test image dir and a scratch dir; `None` (with the reason printed)
/// when this machine cannot run the suite outside CI.
fn setup() -> Option<(PathBuf, tempfile::TempDir)> {
    let dir = tempfile::tempdir().unwrap();
    if let Err(e) = YoukiRuntime::new(dir.path()).is_available() {
        vessel_test_support::skip("youki conformance", &e.to_string());
        return None;
    }
    let image = vessel_test_support::env_path("youki conformance", "VESSEL_TEST_IMAGE_DIR")?;
    Some((image, dir))
}

/// The child side of the kill tests: runs `sleep 1002` in a container on
/// the given rootfs (user namespace from the environment), reports how the
/// run ended on stdout, and exits.
fn crash_child() -> ! {
    let root = PathBuf::from(std::env::var_os("VESSEL_TEST_ROOT").unwrap());
    let rootfs = PathBuf::from(std::env::var_os("VESSEL_TEST_ROOTFS").unwrap());
    let userns: Option<vessel_runtime::IdMapping> = std::env::var("VESSEL_TEST_USERNS")
        .ok()
        .map(|h| vessel_runtime::IdMapping::new(h.parse().unwrap(), 65536).unwrap());
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let result = rt.block_on(async {
        let req = vessel_runtime::RunRequest {
            rootfs,
            args: vec!["sleep".into(), "1002".into()],
            user_namespace: userns,
            ..Default::default()
        };
        YoukiRuntime::new(root).run(req).await
    });
    println!("{result:?}");
    std::process::exit(0)
}

/// Every way the caller's process tree can be stopped: the container dies
/// and its state, cgroups and locks go at once when a process survives to
/// clean up, or at the next `remove_leftovers` when none does.
fn no_container_outlives_its_runner_and_caller(
    suite: &Suite<YoukiRuntime>,
    root: &std::path::Path,
) -> Result<(), String> {
    use nix::sys::signal::{Signal, kill, killpg};
    use nix::unistd::Pid;
    use std::os::unix::process::CommandExt;
    let sleeper = b"sleep\x001002\x00";
    let start = || -> Result<(std::process::Child, u32), String> {
        let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
        cmd.env(CRASH_CHILD, "1")
            .env("VESSEL_TEST_ROOT", root)
            .env("VESSEL_TEST_ROOTFS", &suite.rootfs)
            .stdout(std::process::Stdio::piped())
            .process_group(0);
        if let Some(m) = suite.userns {
            cmd.env("VESSEL_TEST_USERNS", m.host_id.to_string());
        }
        let mut child = cmd.spawn().map_err(|e| e.to_string())?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            if let Some(pid) = conformance::pids_of(sleeper).first() {
                return Ok((child, *pid));
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                return Err("the child's container never started".into());
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    };
    let ppid = |pid: u32| -> Option<i32> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        stat[stat.rfind(')')? + 2..].split_whitespace().nth(1)?.parse().ok()
    };
    let gone = |what: &str| -> Result<(), String> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let procs = conformance::pids_of(sleeper);
            let cgroups = leftover_cgroups();
            let mut files = Vec::new();
            for sub in ["state", "bundles", "runners"] {
                files.extend(std::fs::read_dir(root.join(sub)).into_iter().flatten().flatten().map(|e| e.path()));
            }
            if procs.is_empty() && cgroups.is_empty() && files.is_empty() {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                return Err(format!("{what}: left processes {procs:?}, cgroups {cgroups:?}, files {files:?}"));
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    };
    // The service manager's stop signals to the whole group: the runner
    // kills and removes its container.
    for sig in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        let (mut child, _) = start()?;
        killpg(Pid::from_raw(child.id() as i32), sig).map_err(|e| e.to_string())?;
        child.wait().map_err(|e| e.to_string())?;
        gone(&format!("{sig} to the group"))?;
    }
    // SIGKILL of the caller alone: the runner's lifeline breaks.
    let (mut child, _) = start()?;
    kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL).map_err(|e| e.to_string())?;
    child.wait().map_err(|e| e.to_string())?;
    gone("SIGKILL of the caller")?;
    // SIGKILL of the runner alone (the container's init is its child): the
    // caller removes the container and reports the run as failed.
    let (child, sleep_pid) = start()?;
    let runner = ppid(sleep_pid).ok_or("no runner")?;
    kill(Pid::from_raw(runner), Signal::SIGKILL).map_err(|e| e.to_string())?;
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    let said = String::from_utf8_lossy(&out.stdout);
    if !said.contains("RunnerDied") {
        return Err(format!("the caller reported {said:?} after its runner was killed"));
    }
    gone("SIGKILL of the runner")?;
    // SIGKILL of the whole tree: nobody is left to clean up; the container
    // lives on until the next remove_leftovers, which removes it.
    let (mut child, _) = start()?;
    killpg(Pid::from_raw(child.id() as i32), Signal::SIGKILL).map_err(|e| e.to_string())?;
    child.wait().map_err(|e| e.to_string())?;
    std::thread::sleep(std::time::Duration::from_millis(300));
    if conformance::pids_of(sleeper).is_empty() {
        return Err("the container died with its tree: nothing was left to test".into());
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let removed = rt.block_on(YoukiRuntime::new(root).remove_leftovers()).map_err(|e| e.to_string())?;
    if removed != 1 {
        return Err(format!("remove_leftovers removed {removed}, want 1"));
    }
    gone("SIGKILL of the whole tree, then remove_leftovers")
}

/// The child side of the cgroup v2 test: in a mount namespace of its own
/// where `/sys/fs/cgroup` is the host's cgroup2 hierarchy (so libcgroups
/// takes its v2 path, device rules as an eBPF program), runs a script with
/// host ids (so mknod works) and prints its output.
fn v2_child() -> ! {
    use nix::mount::{MsFlags, mount};
    let unified = std::env::var("VESSEL_TEST_UNIFIED").unwrap();
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).unwrap();
    mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_SLAVE, None::<&str>).unwrap();
    if unified != "/sys/fs/cgroup" {
        mount(Some(unified.as_str()), "/sys/fs/cgroup", None::<&str>, MsFlags::MS_BIND, None::<&str>).unwrap();
    }
    let root = PathBuf::from(std::env::var_os("VESSEL_TEST_ROOT").unwrap());
    let rootfs = PathBuf::from(std::env::var_os("VESSEL_TEST_ROOTFS").unwrap());
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let mut out = Vec::new();
    let script = "grep -c cgroup2 /proc/self/mounts; mknod /tmp/lc c 10 237 && echo mknod-ok; \\
                  cat /tmp/lc; echo x > /dev/null && echo null-ok";
    let code = rt.block_on(async {
        let req = vessel_runtime::RunRequest {
            rootfs,
            args: vec!["sh".into(), "-c".into(), script.into()],
            stdout: Some(Box::new(&mut out)),
            stderr: None,
            ..Default::default()
        };
        YoukiRuntime::new(root).run(req).await
    });
    println!("{code:?}\n{}", String::from_utf8_lossy(&out));
    std::process::exit(0)
}

/// The host's cgroup2 mount: `/sys/fs/cgroup` itself (v2 host) or the
/// hybrid layout's `unified` one.
fn cgroup2_mount() -> Option<String> {
    let info = procfs::process::Process::myself().and_then(|p| p.mountinfo()).ok()?;
    info.into_iter().find(|m| m.fs_type == "cgroup2").map(|m| m.mount_point.display().to_string())
}

/// Device rules hold on cgroup v2 too (libcgroups' eBPF device program):
/// without a user namespace mknod works, and opening the node is refused.
fn device_rules_on_cgroup_v2(suite: &Suite<YoukiRuntime>, root: &std::path::Path) -> Result<(), String> {
    let Some(unified) = cgroup2_mount() else {
        return Err("this host has no cgroup2 hierarchy to test v2 device rules on".into());
    };
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .env(V2_CHILD, "1")
        .env("VESSEL_TEST_UNIFIED", &unified)
        .env("VESSEL_TEST_ROOT", root)
        .env("VESSEL_TEST_ROOTFS", &suite.rootfs)
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| e.to_string())?;
    let said = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = said.lines().collect();
    // libcgroups loads the eBPF program after setting RLIMIT_MEMLOCK to
    // 128 MiB, which needs CAP_SYS_RESOURCE or a hard limit that high. Where
    // neither holds (as on this project's CI machines), the container must
    // fail to start: never run without its device rules.
    let can_load = std::process::Command::new("prlimit")
        .args(["--memlock=134217728:134217728", "true"])
        .status()
        .is_ok_and(|s| s.success());
    if !can_load {
        if lines.first().is_some_and(|l| l.starts_with("Err(") && l.contains("bpf")) {
            println!("cgroup v2 device rules: the eBPF program cannot be loaded here, and the run was refused");
            return Ok(());
        }
        return Err(format!("without eBPF device rules the container ran: {said:?}"));
    }
    // Exit 0: `echo null-ok` last; the container saw a cgroup2 filesystem.
    let ok = lines.first() == Some(&"Ok(0)")
        && lines.get(1).is_some_and(|n| n.parse::<u32>().is_ok_and(|n| n >= 1))
        && said.contains("mknod-ok")
        && said.contains("null-ok");
    if !ok {
        return Err(format!("on cgroup v2: {said:?}"));
    }
    // `cat /tmp/lc` must have failed: nothing but the three lines above.
    if lines.len() != 4 {
        return Err(format!("the device opened on cgroup v2: {said:?}"));
    }
    Ok(())
}
