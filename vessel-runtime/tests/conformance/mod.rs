//! The runtime conformance suite: the same cases for every backend
//! (instantiated by tests/youki.rs, and by the containerd backend's tests).
#![allow(dead_code, unreachable_pub)]

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::AsyncWrite;
use vessel_runtime::overlay::OverlayMount;
use vessel_runtime::{
    IdMapping, Limits, Network, RunRequest, Runtime, RuntimeError, RuntimeErrorKind, TtySize, UserNamespace,
};

pub type CaseResult = Result<(), String>;

/// Every conformance case of `$suite` (an `Arc<Suite<_>>`) as a trial, each
/// run to completion by `$block_on` (a backend's way of driving a future).
/// The one list of cases, so both backends always run all of them.
macro_rules! trials {
    ($suite:expr, $block_on:expr) => {{
        let suite = $suite;
        let prefix = if suite.userns.is_some() { "userns::" } else { "host_ids::" };
        macro_rules! case {
            ($case:ident) => {{
                let suite = suite.clone();
                libtest_mimic::Trial::test(format!("{prefix}{}", stringify!($case)), move || {
                    $block_on(async move { suite.$case().await })
                })
            }};
        }
        vec![
            case!(exit_codes),
            case!(signals_give_128_plus_n),
            case!(stdout_and_stderr_are_kept_apart),
            case!(stdin_is_piped),
            case!(discarded_streams_are_writable),
            case!(env_and_cwd),
            case!(tty_mode),
            case!(large_output_streams),
            case!(cancel_kills_everything),
            case!(network_none_has_only_loopback),
            case!(host_processes_are_invisible),
            case!(seccomp_and_capabilities_confine),
            case!(etc_files_and_hostname),
            case!(missing_binary_is_a_clear_error),
            case!(memory_limit_oom_kills),
            case!(pids_limit_stops_a_fork_bomb),
            case!(cpu_quota_is_applied),
            case!(read_only_binds),
            case!(concurrent_runs),
            case!(user_namespace_maps_ids),
            case!(before_start_gates_the_command),
        ]
    }};
}
pub(crate) use trials;

/// A backend under test and the rootfs it runs on (with a user namespace:
/// an overlay over the idmapped image layer).
pub struct Suite<R: Runtime> {
    pub runtime: R,
    pub rootfs: PathBuf,
    pub userns: Option<IdMapping>,
    pub _mount: Option<OverlayMount>,
}

/// The test image's layer unpacked under `dir`, and a rootfs on it: the
/// layer itself, or (with `userns`) an overlay over it idmapped to `userns`.
pub fn rootfs(dir: &Path, image_dir: &Path, userns: Option<&UserNamespace>) -> (PathBuf, Option<OverlayMount>) {
    let layer = dir.join("layer");
    std::fs::create_dir_all(&layer).unwrap();
    let st = std::process::Command::new("tar")
        .arg("-xpf")
        .arg(image_dir.join("layer.tar"))
        .arg("-C")
        .arg(&layer)
        .status()
        .unwrap();
    assert!(st.success());
    let Some(ns) = userns else { return (layer, None) };
    let (ovl, rootfs) = (dir.join("ovl"), dir.join("rootfs"));
    for d in [ovl.join("upper"), ovl.join("work"), rootfs.clone()] {
        std::fs::create_dir_all(d).unwrap();
    }
    let mount = OverlayMount::mount_idmapped(&rootfs, &[&layer], &ovl, ns).expect("idmapped overlay");
    (rootfs, Some(mount))
}

/// A test mapping: a host range no real user has.
pub fn test_mapping() -> IdMapping {
    IdMapping::new(0x4000_0000 + (std::process::id() % 1000) * 65536, 65536).unwrap()
}

/// Counts bytes, keeps none: for huge outputs.
#[derive(Default)]
pub struct Count(pub u64);

impl AsyncWrite for Count {
    fn poll_write(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.0 += buf.len() as u64;
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

fn sh(script: &str) -> Vec<String> {
    vec!["sh".into(), "-c".into(), script.into()]
}

macro_rules! check {
    ($cond:expr, $($msg:tt)*) => {
        if !$cond {
            return Err(format!($($msg)*));
        }
    };
}

impl<R: Runtime> Suite<R> {
    fn req(&self, args: Vec<String>) -> RunRequest<'static> {
        RunRequest { rootfs: self.rootfs.clone(), args, user_namespace: self.userns, ..Default::default() }
    }

    /// Runs `args`, returning (exit code, stdout, stderr).
    async fn output(&self, req: RunRequest<'_>) -> Result<(i32, String, String), String> {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let RunRequest {
            rootfs,
            args,
            env,
            cwd,
            uid,
            gid,
            additional_gids,
            user_namespace,
            hostname,
            limits,
            network,
            ro_binds,
            tty,
            stdin,
            before_start,
            ..
        } = req;
        let req = RunRequest {
            rootfs,
            args,
            env,
            cwd,
            uid,
            gid,
            additional_gids,
            user_namespace,
            hostname,
            limits,
            network,
            ro_binds,
            tty,
            stdin,
            stdout: Some(Box::new(&mut out)),
            stderr: Some(Box::new(&mut err)),
            on_start: None,
            before_start,
        };
        let code = self.runtime.run(req).await.map_err(|e| format!("run failed: {e}"))?;
        Ok((code, String::from_utf8_lossy(&out).into_owned(), String::from_utf8_lossy(&err).into_owned()))
    }

    /// `before_start` is awaited once the container is made and before its
    /// command starts (a vessel's network connects meanwhile): the command
    /// does not run while it waits, nor at all if it fails, whose error is
    /// then the run's.
    pub async fn before_start_gates_the_command(&self) -> CaseResult {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let marker = format!("gate-{}-{}", std::process::id(), now.as_nanos());
        let on_host = self.rootfs.join(&marker);
        let mut req = self.req(sh(&format!("touch /{marker}")));
        let watch = on_host.clone();
        req.before_start = Some(Box::pin(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            match watch.exists() {
                true => Err(RuntimeError::InvalidRequest("the command ran before its gate opened".into())),
                false => Ok(()),
            }
        }));
        let (code, _, err) = self.output(req).await?;
        check!(code == 0, "a gated run exited {code}: {err}");
        check!(on_host.exists(), "the command did not run once its gate opened");
        std::fs::remove_file(&on_host).map_err(|e| e.to_string())?;
        let mut req = self.req(sh(&format!("touch /{marker}")));
        req.before_start = Some(Box::pin(async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            Err(RuntimeError::InvalidRequest("the gate refused".into()))
        }));
        match self.output(req).await {
            Err(e) if e.contains("the gate refused") => {}
            other => return Err(format!("a refused gate's run gave {other:?}, not the gate's error")),
        }
        check!(!on_host.exists(), "the command ran although its gate refused");
        Ok(())
    }

    pub async fn exit_codes(&self) -> CaseResult {
        for (script, want) in [("true", 0), ("false", 1), ("exit 3", 3), ("exit 255", 255)] {
            let (code, ..) = self.output(self.req(sh(script))).await?;
            check!(code == want, "{script}: exit {code}, want {want}");
        }
        Ok(())
    }

    pub async fn signals_give_128_plus_n(&self) -> CaseResult {
        // The container's init killed from outside (PID 1 ignores signals it
        // has no handler for, except SIGKILL/SIGSTOP from an ancestor namespace).
        let run = self.output(self.req(vec!["sleep".into(), "1001".into()]));
        let killer = async {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if let Some(pid) = pids_of(b"sleep\x001001\x00").first() {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(*pid as i32),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                    return;
                }
                if Instant::now() > deadline {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        let ((code, ..), ()) = tokio::join!(async { run.await.unwrap_or((-1, String::new(), String::new())) }, killer);
        check!(code == 137, "init killed by SIGKILL: exit {code}, want 137");
        // A process the init waits for, killed by a signal, as a shell reports it.
        let (code, ..) = self.output(self.req(sh("sleep 5 & p=$!; kill -TERM $p; wait $p"))).await?;
        check!(code == 143, "child killed by SIGTERM: exit {code}, want 143");
        Ok(())
    }

    pub async fn stdout_and_stderr_are_kept_apart(&self) -> CaseResult {
        let (code, out, err) = self.output(self.req(sh("echo to-out; echo to-err >&2; echo more-out"))).await?;
        check!(code == 0 && out == "to-out\nmore-out\n" && err == "to-err\n", "{code} {out:?} {err:?}");
        Ok(())
    }

    pub async fn stdin_is_piped(&self) -> CaseResult {
        let input = "line one\n".repeat(100_000);
        let mut req = self.req(sh("wc -c; echo done"));
        req.stdin = Some(Box::new(io::Cursor::new(input.clone().into_bytes())));
        let (code, out, _) = self.output(req).await?;
        check!(code == 0 && out.trim_start() == format!("{}\ndone\n", input.len()), "{code} {out:?}");
        // No stdin: end of file at once, no hang.
        let (code, out, _) = self.output(self.req(vec!["cat".into()])).await?;
        check!(code == 0 && out.is_empty(), "cat without stdin: {code} {out:?}");
        Ok(())
    }

    pub async fn discarded_streams_are_writable(&self) -> CaseResult {
        let code = self
            .runtime
            .run(self.req(sh("echo out; echo err >&2; head -c 1000000 /dev/zero")))
            .await
            .map_err(|e| e.to_string())?;
        check!(code == 0, "writing to discarded stdout/stderr: exit {code}");
        Ok(())
    }

    pub async fn tty_mode(&self) -> CaseResult {
        let size = Some(TtySize { rows: 33, cols: 101 });
        let mut req = self.req(sh("test -t 0 && test -t 1 && echo is-a-tty; stty size"));
        req.tty = size;
        let (code, out, err) = self.output(req).await?;
        check!(
            code == 0 && out.contains("is-a-tty") && out.contains("33 101") && err.is_empty(),
            "{code} {out:?} {err:?}"
        );
        // Input reaches the process through the terminal; exit codes survive.
        let mut req = self.req(sh("read line; echo got:$line; exit 7"));
        req.tty = size;
        req.stdin = Some(Box::new(io::Cursor::new(b"hello\n".to_vec())));
        let (code, out, _) = self.output(req).await?;
        check!(code == 7 && out.contains("got:hello"), "{code} {out:?}");
        Ok(())
    }

    pub async fn env_and_cwd(&self) -> CaseResult {
        let mut req = self.req(sh("echo \"$FOO|$BAR\"; pwd"));
        req.env = vec!["FOO=bar baz".into(), "BAR=1".into()];
        req.cwd = Some("/tmp".into());
        let (code, out, _) = self.output(req).await?;
        check!(code == 0 && out == "bar baz|1\n/tmp\n", "{code} {out:?}");
        Ok(())
    }

    pub async fn large_output_streams(&self) -> CaseResult {
        let mut count = Count::default();
        let mut err = Vec::new();
        let mut req = self.req(sh("head -c 200000000 /dev/zero; echo x >&2"));
        req.stdout = Some(Box::new(&mut count));
        req.stderr = Some(Box::new(&mut err));
        let code = self.runtime.run(req).await.map_err(|e| e.to_string())?;
        let err = String::from_utf8_lossy(&err);
        check!(code == 0 && count.0 == 200_000_000 && err == "x\n", "exit {code}, {} bytes, stderr {err:?}", count.0);
        Ok(())
    }

    pub async fn cancel_kills_everything(&self) -> CaseResult {
        let started = Instant::now();
        let run = self.runtime.run(self.req(sh("sleep 1000 & sleep 1000")));
        check!(tokio::time::timeout(Duration::from_millis(500), run).await.is_err(), "sleep 1000 finished?");
        // The runner tears the container down as soon as its caller is gone.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !sleepers().is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        check!(sleepers().is_empty(), "processes left after cancel: {:?}", sleepers());
        check!(started.elapsed() < Duration::from_secs(5), "cancel took {:?}", started.elapsed());
        Ok(())
    }

    pub async fn network_none_has_only_loopback(&self) -> CaseResult {
        let (code, out, _) = self.output(self.req(sh("ls /sys/class/net"))).await?;
        check!(code == 0 && out.split_whitespace().collect::<Vec<_>>() == ["lo"], "{code} {out:?}");
        // Loopback is up: a server on 127.0.0.1 answers.
        let script = "echo hello | nc -l -p 8080 & sleep 0.3; nc 127.0.0.1 8080 </dev/null";
        let (code, out, err) = self.output(self.req(sh(script))).await?;
        check!(code == 0 && out.contains("hello"), "loopback: {code} {out:?} {err:?}");
        let mut req = self.req(sh("ls /sys/class/net"));
        req.network = Network::Host;
        let (_, out, _) = self.output(req).await?;
        let host: Vec<String> = std::fs::read_dir("/sys/class/net")
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        check!(out.split_whitespace().count() == host.len(), "host network shows {out:?}, host has {host:?}");
        Ok(())
    }

    pub async fn seccomp_and_capabilities_confine(&self) -> CaseResult {
        // unshare(2) is denied by the seccomp profile; mount(2) by it and the capabilities.
        let (code, _, err) = self.output(self.req(sh("unshare -U true"))).await?;
        check!(code != 0 && err.contains("not permitted"), "unshare: {code} {err:?}");
        let (code, _, err) = self.output(self.req(sh("mount -t tmpfs none /mnt"))).await?;
        check!(code != 0, "mount succeeded: {err:?}");
        let (code, out, _) =
            self.output(self.req(sh("grep -E '^(CapEff|NoNewPrivs|Seccomp):' /proc/self/status"))).await?;
        check!(code == 0 && out.contains("NoNewPrivs:\t1") && out.contains("Seccomp:\t2"), "{out:?}");
        check!(!out.contains("CapEff:\t000001ffffffffff"), "full capabilities: {out:?}");
        Ok(())
    }

    pub async fn etc_files_and_hostname(&self) -> CaseResult {
        let mut req = self.req(sh("hostname; cat /etc/hostname; grep -c localhost /etc/hosts; cat /etc/resolv.conf"));
        req.hostname = Some("agent-box".into());
        let (code, out, _) = self.output(req).await?;
        check!(code == 0 && out.starts_with("agent-box\nagent-box\n2\n# no network"), "{out:?}");
        Ok(())
    }

    pub async fn host_processes_are_invisible(&self) -> CaseResult {
        let (code, out, _) = self.output(self.req(sh("ls /proc | grep -c '^[0-9]'"))).await?;
        let n: u32 = out.trim().parse().unwrap_or(999);
        check!(code == 0 && n <= 3, "the container sees {n} processes");
        Ok(())
    }

    pub async fn missing_binary_is_a_clear_error(&self) -> CaseResult {
        let run = self.runtime.run(self.req(vec!["/no/such/binary".into()]));
        match tokio::time::timeout(Duration::from_secs(20), run).await {
            Err(_) => Err("hangs".into()),
            Ok(Ok(code)) => {
                check!(code == 127 || code == 126, "exit {code}");
                Ok(())
            }
            Ok(Err(e)) => {
                check!(e.kind() == RuntimeErrorKind::Start, "{e}");
                check!(e.to_string().contains("/no/such/binary"), "the error names the binary: {e}");
                Ok(())
            }
        }
    }

    pub async fn memory_limit_oom_kills(&self) -> CaseResult {
        let mut req = self.req(vec![
            "dd".into(),
            "if=/dev/zero".into(),
            "of=/dev/null".into(),
            "bs=256M".into(),
            "count=1".into(),
        ]);
        req.limits = Limits { memory_bytes: Some(32 << 20), ..Default::default() };
        let o = self.runtime.run_outcome(req).await.map_err(|e| e.to_string())?;
        check!(o.exit_code == 137 && o.oom_killed, "{o:?}, want exit 137 with the OOM flag");
        // A process killed otherwise is no OOM kill; neither is a clean exit.
        let mut req = self.req(sh("sleep 5 & kill -9 $!; wait $!"));
        req.limits = Limits { memory_bytes: Some(32 << 20), ..Default::default() };
        let o = self.runtime.run_outcome(req).await.map_err(|e| e.to_string())?;
        check!(o.exit_code == 137 && !o.oom_killed, "a SIGKILL: {o:?}");
        let o = self.runtime.run_outcome(self.req(sh("true"))).await.map_err(|e| e.to_string())?;
        check!(o.exit_code == 0 && !o.oom_killed, "{o:?}");
        Ok(())
    }

    pub async fn cpu_quota_is_applied(&self) -> CaseResult {
        let mut req = self.req(sh(
            "cat /sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us 2>/dev/null || cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us 2>/dev/null || cut -d' ' -f1 /sys/fs/cgroup/cpu.max",
        ));
        req.limits = Limits { cpu_quota_us: Some(50_000), ..Default::default() };
        let (code, out, err) = self.output(req).await?;
        check!(code == 0 && out.trim() == "50000", "cpu quota seen inside: {code} {out:?} {err:?}");
        Ok(())
    }

    pub async fn read_only_binds(&self) -> CaseResult {
        let host = tempfile::tempdir().map_err(|e| e.to_string())?;
        std::fs::write(host.path().join("data.txt"), "from the host\n").map_err(|e| e.to_string())?;
        let mut req = self.req(sh("cat /mnt/host/data.txt; echo x > /mnt/host/new 2>/dev/null && echo WROTE"));
        req.ro_binds = vec![(host.path().to_path_buf(), "/mnt/host".into())];
        let (code, out, _) = self.output(req).await?;
        check!(out == "from the host\n" && code != 0, "{code} {out:?}");
        check!(!host.path().join("new").exists(), "the container wrote through a read-only bind");
        Ok(())
    }

    pub async fn pids_limit_stops_a_fork_bomb(&self) -> CaseResult {
        let mut req = self.req(sh("i=0; while [ $i -lt 50 ]; do sleep 2 & i=$((i+1)); done; wait"));
        req.limits = Limits { pids: Some(10), ..Default::default() };
        let (code, _, err) = self.output(req).await?;
        check!(err.contains("fork") || code != 0, "50 processes under pids.max=10: exit {code}, {err:?}");
        Ok(())
    }

    /// Inside, ids are the image's (root is 0, files keep their owners); on
    /// the host, the container's processes run as the mapped, unprivileged
    /// uid (or as root without a user namespace).
    pub async fn user_namespace_maps_ids(&self) -> CaseResult {
        // A sleep of its own per suite (the suites run side by side).
        let secs = if self.userns.is_some() { "1003" } else { "1004" };
        let script = format!(
            "cat /proc/self/uid_map; id -u; stat -c %u:%g /bin/busybox /etc/passwd; \
             touch /tmp/made && chown 1000:1000 /tmp/made && stat -c %u:%g /tmp/made; \
             chown 70000 /tmp/made 2>/dev/null && echo chown-outside-ok; sleep {secs} & sleep 0.5; kill %1"
        );
        let run = self.output(self.req(sh(&script)));
        let cmdline = format!("sleep\0{secs}\0");
        let host_uid = async {
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Some(pid) = pids_of(cmdline.as_bytes()).first() {
                    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
                    return status.lines().find(|l| l.starts_with("Uid:")).map(str::to_owned);
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            None
        };
        let (out, host_uid) = tokio::join!(run, host_uid);
        let (code, out, err) = out?;
        let lines: Vec<&str> = out.lines().collect();
        check!(code == 0 || code == 143, "{code} {out:?} {err:?}");
        check!(lines.get(1) == Some(&"0") && lines.get(2) == Some(&"0:0") && lines.get(3) == Some(&"0:0"), "{out:?}");
        check!(lines.get(4) == Some(&"1000:1000"), "chown inside the range: {out:?} {err:?}");
        let map: Vec<&str> = lines[0].split_whitespace().collect();
        let host_uid = host_uid.ok_or("the container's process was not seen on the host")?;
        let uid: u32 = host_uid.split_whitespace().nth(1).and_then(|u| u.parse().ok()).unwrap_or(u32::MAX);
        match self.userns {
            Some(m) => {
                check!(map == ["0", &m.host_id.to_string(), &m.size.to_string()], "uid_map {map:?}");
                check!(uid == m.host_id, "on the host the container's root is uid {uid}, want {}", m.host_id);
                check!(!out.contains("chown-outside-ok"), "chown to an unmapped id succeeded");
            }
            None => {
                check!(map == ["0", "0", "4294967295"], "uid_map {map:?}");
                check!(uid == 0, "host uid {uid}");
            }
        }
        Ok(())
    }

    pub async fn concurrent_runs(&self) -> CaseResult {
        let runs = (0..20).map(|i| async move {
            let (code, out, _) = self.output(self.req(sh(&format!("echo run{i}")))).await?;
            check!(code == 0 && out == format!("run{i}\n"), "run {i}: {code} {out:?}");
            Ok(())
        });
        for r in futures::future::join_all(runs).await {
            r?;
        }
        Ok(())
    }
}

/// `sleep 1000` processes on the host (a cancelled container's leftovers).
pub fn sleepers() -> Vec<u32> {
    pids_of(b"sleep\x001000\x00")
}

/// Host pids whose command line is exactly `cmdline`.
pub fn pids_of(cmdline: &[u8]) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        if std::fs::read(e.path().join("cmdline")).unwrap_or_default() == cmdline {
            out.push(pid);
        }
    }
    out
}

/// What a backend may leave behind: cgroups named after vessel containers
/// (the one check every suite uses: root's and this user's delegated subtree).
pub use vessel_test_support::leftover_cgroups;
