//! Rootless against rootful, in the same run: exec `true`, a 1-file
//! snapshot and a restore. The mode is a process's (chosen in
//! `vessel::init`), so each side is an agent process, this bench
//! re-run: as root (rootful), and as the test user (rootless,
//! `VESSEL_ROOTLESS_USER`, which `cargo xtask bench` creates). Each agent
//! times the operations itself (no IPC in the timed region) and has the
//! same setup: a vessel from the test image, local storage and mount root
//! on `TMPDIR`, no limits and no disk quota (rootless has neither, so the
//! rootful side does the same work: no qgroup, no limit written). Then exec
//! `true` again with memory, CPU and pids limits on both sides: rootful in
//! vessel's cgroups, rootless in a cgroup subtree this bench delegates to
//! the user for that part (`vessel-<uid>`, as `cargo xtask test` does).
//! And 1 GiB downloaded into a vessel with `Open` networking on both sides
//! (rootless through pasta), against the host's own download.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use criterion::Criterion;
use vessel::{ExecOptions, LocalStorage, Manager, ManagerConfig, NetworkPolicy, VesselOptions};
use vessel_benches::{download, image_dir};

const AGENT: &str = "VESSEL_BENCH_ROOTLESS_AGENT";
/// Set for an agent whose vessel has memory, CPU and pids limits.
const LIMITS: &str = "VESSEL_BENCH_LIMITS";
const IMAGE: &str = "local/busybox:latest";

/// Replies to `exec N`, `snapshot N`, `restore N`, `download N` with the
/// nanoseconds N of them took.
fn agent() -> ! {
    let env = |k: &str| PathBuf::from(std::env::var_os(k).unwrap_or_else(|| panic!("{k} unset")));
    let (dir, archive) = (env("VESSEL_AGENT_DIR"), env("VESSEL_AGENT_IMAGE"));
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let config = ManagerConfig::default()
        .storage(LocalStorage::new(dir.join("data")).unwrap())
        .mount_root(dir.join("mounts"))
        .disk_quota(None)
        .default_limits(match std::env::var_os(LIMITS) {
            Some(_) => vessel::Limits { memory_bytes: Some(256 << 20), cpu_quota_us: Some(100_000), pids: Some(256) },
            None => vessel::Limits::default(),
        });
    let (mgr, v, snaps) = rt.block_on(async {
        let mgr = Manager::new(config).await.unwrap();
        let file = tokio::fs::File::open(&archive).await.unwrap();
        mgr.import_image(IMAGE, Box::new(file)).await.unwrap();
        let v = mgr.create_vessel(IMAGE, "/work").await.unwrap();
        v.write_file("/work/a", b"a", 0o644).unwrap();
        let a = v.create_snapshot("a").await.unwrap().id;
        v.write_file("/work/b", b"b", 0o644).unwrap();
        let b = v.create_snapshot("b").await.unwrap().id;
        (mgr, v, [a, b])
    });
    if std::env::var_os(LIMITS).is_some() {
        let unavailable = mgr.unavailable_limits();
        assert!(unavailable.iter().all(|u| u.limit == vessel::Limit::Disk), "limits do not hold: {unavailable:?}");
    }
    println!("{}", if mgr.is_rootless() { "rootless" } else { "rootful" });
    // The download's vessel, with `Open` networking (made at the first).
    let mut net: Option<vessel::Vessel> = None;
    let mut k = 0u64;
    for line in std::io::stdin().lock().lines() {
        let line = line.unwrap();
        let (op, n) = line.split_once(' ').unwrap_or((&line, "0"));
        if op == "quit" {
            rt.block_on(async {
                v.close().await.unwrap();
                if let Some(n) = net.take() {
                    n.close().await.unwrap();
                }
                mgr.close().await.unwrap();
            });
            std::process::exit(0)
        }
        let n: u64 = n.parse().unwrap();
        let mut total = Duration::ZERO;
        rt.block_on(async {
            for _ in 0..n {
                k += 1;
                match op {
                    "exec" => {
                        let t = Instant::now();
                        let opts =
                            ExecOptions { command: vec!["true".into()], persist_result: true, ..Default::default() };
                        let res = v.exec(opts).await.unwrap();
                        total += t.elapsed();
                        assert_eq!(res.exit_code, 0);
                    }
                    "snapshot" => {
                        v.write_file(&format!("/work/f{k}"), b"one file", 0o644).unwrap();
                        let t = Instant::now();
                        v.create_snapshot("step").await.unwrap();
                        total += t.elapsed();
                    }
                    "restore" => {
                        let t = Instant::now();
                        v.restore_snapshot(&snaps[(k % 2) as usize]).await.unwrap();
                        total += t.elapsed();
                    }
                    "download" => {
                        if net.is_none() {
                            let opts = VesselOptions::new().network(NetworkPolicy::Open(vec![]));
                            net = Some(mgr.create_vessel_with(IMAGE, "/work", &opts).await.unwrap());
                        }
                        let mut out = Vec::new();
                        let opts = ExecOptions {
                            command: vec!["sh".into(), "-c".into(), download::script("")],
                            stdout: Some(Box::new(&mut out)),
                            ..Default::default()
                        };
                        let t = Instant::now();
                        let res = net.as_ref().expect("made above").exec(opts).await.unwrap();
                        total += t.elapsed();
                        assert_eq!(res.exit_code, 0);
                        assert_eq!(String::from_utf8_lossy(&out).trim(), download::GIB.to_string());
                    }
                    other => panic!("unknown op {other}"),
                }
            }
        });
        println!("{}", total.as_nanos());
        std::io::stdout().flush().unwrap();
    }
    std::process::exit(0)
}

struct Agent {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Agent {
    /// Starts an agent as `user` (rootless) or as root (rootful) in `dir`.
    fn start(exe: &Path, dir: &Path, archive: &Path, user: Option<&str>, limits: bool) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let mut vars = vec![
            (AGENT.to_string(), "1".to_string()),
            ("VESSEL_AGENT_DIR".into(), dir.display().to_string()),
            ("VESSEL_AGENT_IMAGE".into(), archive.display().to_string()),
            ("HOME".into(), dir.display().to_string()),
            ("TMPDIR".into(), dir.display().to_string()),
        ];
        if limits {
            vars.push((LIMITS.into(), "1".into()));
        }
        let mut cmd = match user {
            Some(u) => {
                let status = Command::new("chown").arg(format!("{u}:")).arg(dir).status().unwrap();
                assert!(status.success());
                let mut c = Command::new("runuser");
                c.args(["-u", u, "--", "env"]).args(vars.iter().map(|(k, v)| format!("{k}={v}"))).arg(exe);
                c
            }
            None => {
                let mut c = Command::new(exe);
                c.envs(vars.iter().map(|(k, v)| (k, v))).env("VESSEL_ROOTLESS", "0");
                c
            }
        };
        let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut mode = String::new();
        stdout.read_line(&mut mode).unwrap();
        let want = if user.is_some() { "rootless" } else { "rootful" };
        assert_eq!(mode.trim(), want, "the agent runs in the wrong mode");
        Self { child, stdin, stdout }
    }

    fn time(&mut self, op: &str, n: u64) -> Duration {
        writeln!(self.stdin, "{op} {n}").unwrap();
        self.stdin.flush().unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        Duration::from_nanos(line.trim().parse().expect("the agent's timing"))
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "quit");
        let _ = self.stdin.flush();
        let _ = self.child.wait();
    }
}

fn main() {
    vessel::init();
    if std::env::var_os(AGENT).is_some() {
        agent();
    }
    if !nix::unistd::geteuid().is_root() || vessel::runtime::rootless::mode().is_rootless() {
        eprintln!("SKIPPED rootless bench: runs as root (it starts a rootful and a rootless agent)");
        return;
    }
    let Some(user) = std::env::var("VESSEL_ROOTLESS_USER").ok() else {
        eprintln!("SKIPPED rootless bench: VESSEL_ROOTLESS_USER is unset (run `cargo xtask bench`)");
        return;
    };
    let source = image_dir().join("busybox-oci.tar");
    assert!(source.is_file(), "no test image at {} (run `cargo xtask image`)", source.display());
    let dir = tempfile::tempdir().unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    // Copies both agents can reach (the build dir may be under /root).
    let (exe, archive) = (dir.path().join("agent"), dir.path().join("busybox-oci.tar"));
    std::fs::copy(std::env::current_exe().unwrap(), &exe).unwrap();
    std::fs::copy(&source, &archive).unwrap();
    let mut agents = [
        ("rootful", Agent::start(&exe, &dir.path().join("rootful"), &archive, None, false)),
        ("rootless", Agent::start(&exe, &dir.path().join("rootless"), &archive, Some(&user), false)),
    ];
    let mut c = Criterion::default().configure_from_args().sample_size(30).measurement_time(Duration::from_secs(8));
    let mut g = c.benchmark_group("rootless");
    for (op, what) in [("exec", "exec-true"), ("snapshot", "snapshot-1-file"), ("restore", "restore")] {
        for (mode, agent) in agents.iter_mut() {
            g.bench_function(format!("{mode}/{what}"), |b| b.iter_custom(|n| agent.time(op, n)));
        }
    }
    g.finish();
    // 1 GiB from a server behind the host, by busybox `wget` in a vessel with
    // `Open` networking (rootful: veth, filter, NAT; rootless: pasta)
    // against the same `wget` on the host. Neither vessel has a CPU limit.
    let server = download::Server::start();
    let mut g = c.benchmark_group("rootless-download");
    g.sample_size(10).measurement_time(Duration::from_secs(20)).throughput(criterion::Throughput::Bytes(download::GIB));
    for (mode, agent) in agents.iter_mut() {
        g.bench_function(format!("{mode}/1gib"), |b| b.iter_custom(|n| agent.time("download", n)));
    }
    let host_script = download::script("busybox ");
    g.bench_function("host/1gib", |b| {
        b.iter(|| {
            let out = Command::new("sh").args(["-c", &host_script]).output().unwrap();
            assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), download::GIB.to_string());
        })
    });
    g.finish();
    drop(agents);
    drop(server);
    {
        let uid = nix::unistd::User::from_name(&user).unwrap().expect("the rootless user").uid;
        let _delegation = Delegation::new(uid.as_raw());
        let mut agents = [
            ("rootful", Agent::start(&exe, &dir.path().join("rootful-limits"), &archive, None, true)),
            (
                "rootless-delegated",
                Agent::start(&exe, &dir.path().join("rootless-limits"), &archive, Some(&user), true),
            ),
        ];
        let mut g = c.benchmark_group("rootless-limits");
        for (mode, agent) in agents.iter_mut() {
            g.bench_function(format!("{mode}/exec-true"), |b| b.iter_custom(|n| agent.time("exec", n)));
        }
        g.finish();
    }
    c.final_summary();
}

/// A cgroup subtree delegated to a user while it lives: `vessel-<uid>` in
/// the memory, cpu and pids hierarchies, chowned to it (`cgcreate -a -t`).
struct Delegation(Vec<PathBuf>);

impl Delegation {
    fn new(uid: u32) -> Self {
        let dirs: Vec<PathBuf> = vessel::runtime::rootless::LIMIT_CONTROLLERS
            .iter()
            .map(|c| {
                vessel::runtime::rootless::v1_mount(c).expect("cgroup v1 controller").join(format!("vessel-{uid}"))
            })
            .collect();
        for d in &dirs {
            std::fs::create_dir_all(d).unwrap();
            let status = Command::new("chown").arg("-R").arg(format!("{uid}:{uid}")).arg(d).status().unwrap();
            assert!(status.success());
        }
        Self(dirs)
    }
}

impl Drop for Delegation {
    fn drop(&mut self) {
        for d in &self.0 {
            let _ = std::fs::remove_dir(d.join("runs"));
            let _ = std::fs::remove_dir(d);
        }
    }
}
