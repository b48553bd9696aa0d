//! The escape suite: what hostile code tries from inside a vessel, on every
//! backend compiled in (containerd when `VESSEL_CONTAINERD_ADDRESS` names a
//! daemon). A static probe (`tests/escape/escape.c`, built by `cargo xtask
//! image`) attempts each escape and prints the errno it got; each must be
//! refused with the errno docker gives, and nothing may change. Also: the
//! container's processes are unprivileged on the host, a setuid file made
//! in a vessel is unusable by host users, host dirs are closed, an image's
//! `USER` resolves by name (and an unknown one is refused at create time).
#![allow(clippy::vec_init_then_push)]

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock, OnceLock};

use anyhow::{Context, Result, anyhow, ensure};
use common::{IMAGE, World, rootless};
use libtest_mimic::Arguments;
use vessel::{Backend, ExecOptions, Manager, VesselErrorKind, VesselOptions};
use vessel_test_support as support;

mod common;

static TOKIO: LazyLock<tokio::runtime::Runtime> =
    LazyLock::new(|| tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap());

/// The static probe (built by `cargo xtask image` into the test image dir).
static PROBE: OnceLock<PathBuf> = OnceLock::new();

fn probe_exe() -> &'static Path {
    PROBE.get().expect("the probe's path is set in main")
}

async fn run(v: &vessel::Vessel, command: Vec<String>, persist: bool) -> Result<(i32, String, String)> {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let res = v
        .exec(ExecOptions {
            command,
            stdout: Some(Box::new(&mut out)),
            stderr: Some(Box::new(&mut err)),
            persist_result: persist,
            ..Default::default()
        })
        .await?;
    Ok((res.exit_code, String::from_utf8_lossy(&out).into_owned(), String::from_utf8_lossy(&err).into_owned()))
}

fn sh(script: &str) -> Vec<String> {
    vec!["sh".into(), "-c".into(), script.into()]
}

/// Runs the probe in `v`: its `name -> result` lines.
async fn probe(v: &vessel::Vessel) -> Result<BTreeMap<String, String>> {
    v.write_file("/tmp/escape", &std::fs::read(probe_exe())?, 0o755)?;
    let (code, out, err) = run(v, vec!["/tmp/escape".into(), std::process::id().to_string()], false).await?;
    ensure!(code == 0, "the probe exited {code}: {out} {err}");
    let lines: BTreeMap<String, String> =
        out.lines().filter_map(|l| l.split_once(' ')).map(|(k, v)| (k.to_owned(), v.to_owned())).collect();
    ensure!(lines.get("done").map(String::as_str) == Some("ok"), "the probe did not finish: {out} {err}");
    Ok(lines)
}

/// docker's answers to every probe, with a user namespace: what is the same
/// with or without one.
const REFUSED: &[(&str, &str)] = &[
    ("open_null", "ok"),
    ("fork", "ok"),
    ("clone_newuser", "EPERM"),
    ("clone_newnet", "EPERM"),
    ("clone_newns", "EPERM"),
    ("clone_newuser_newnet", "EPERM"),
    ("clone3_newuser", "ENOSYS"),
    ("clone3_plain", "ENOSYS"),
    ("unshare_newuser", "EPERM"),
    ("unshare_newnet", "EPERM"),
    ("unshare_newns", "EPERM"),
    ("io_uring_setup", "EPERM"),
    ("bpf", "EPERM"),
    ("perf_event_open", "EPERM"),
    ("keyctl", "EPERM"),
    ("add_key", "EPERM"),
    ("userfaultfd", "EPERM"),
    ("personality_read_implies_exec", "EPERM"),
    ("personality_query", "ok"),
    ("mount_tmpfs", "EPERM"),
    ("umount_proc", "EPERM"),
    ("pivot_root", "EPERM"),
    ("swapon", "EPERM"),
    ("reboot", "EPERM"),
    ("init_module", "EPERM"),
    ("kexec_load", "EPERM"),
    ("open_by_handle_at", "EPERM"),
    ("setns", "EPERM"),
    // Read-only mounts; in a user namespace the files' owner (host root,
    // unmapped) already refuses the open with EACCES, as with docker's
    // userns-remap. Without one, EROFS shows the mounts are read-only.
    ("cgroup_write", "EROFS|EACCES"),
    ("cgroup_mkdir", "EROFS|EACCES"),
    ("sysrq_trigger", "EROFS|EACCES|absent"),
    ("core_pattern", "EROFS|EACCES"),
    ("ptrace_outside", "ESRCH"),
    ("kill_outside", "ESRCH"),
    // Masked (an empty file) or, where this kernel lacks them, absent.
    ("read_kcore", "empty|ENOENT"),
    ("read_interrupts", "empty"),
    ("read_keys", "empty|ENOENT"),
    ("read_timer_list", "empty|ENOENT"),
];

fn expect(got: &BTreeMap<String, String>, want: &[(&str, &str)]) -> Result<()> {
    let wrong: Vec<String> = want
        .iter()
        .filter(|(k, v)| !got.get(*k).is_some_and(|g| v.split('|').any(|alt| alt == g)))
        .map(|(k, v)| format!("{k}: got {:?}, want {v}", got.get(*k)))
        .collect();
    ensure!(wrong.is_empty(), "{}", wrong.join("; "));
    // powercap is masked (an empty read-only tmpfs) or absent on the host.
    let pc = got.get("list_powercap").map(String::as_str);
    ensure!(matches!(pc, Some("empty" | "ENOENT")), "list_powercap: {pc:?}");
    Ok(())
}

/// The probe in a default (user-namespaced) vessel: every attempt refused,
/// devices included (mknod is EPERM in a user namespace).
async fn probes_are_refused(w: Arc<World>) -> Result<()> {
    let mgr = Manager::new(w.config("probes")).await?;
    let v = mgr.create_vessel(IMAGE, "/work").await?;
    let before = v.list_snapshots().len();
    let got = probe(&v).await?;
    if rootless() {
        // Rootless there are no cgroup files to write at all: the
        // container's cgroup2 tree is its own namespace's, with no limits.
        let mut want: Vec<(&str, &str)> = REFUSED.iter().filter(|(k, _)| *k != "cgroup_write").copied().collect();
        want.push(("cgroup_write", "EROFS|EACCES|absent"));
        expect(&got, &want)?;
    } else {
        expect(&got, REFUSED)?;
    }
    expect(&got, &[("mknod_chr", "EPERM"), ("open_chr", "skipped"), ("mknod_blk", "EPERM"), ("open_blk", "skipped")])?;
    // Nothing changed: the probe ran on a throwaway layer.
    ensure!(v.stat("/tmp/dev-chr").is_err() && v.list_snapshots().len() == before);
    mgr.close().await?;
    Ok(())
}

/// Without a user namespace (the unsafe mode) mknod works, as in docker,
/// and the device cgroup refuses to open the node.
async fn device_cgroup_without_user_namespaces(w: Arc<World>) -> Result<()> {
    let mgr = Manager::new(w.config("devices").user_namespaces(false)).await?;
    let v = mgr.create_vessel(IMAGE, "/work").await?;
    ensure!(v.id_mapping().is_none());
    let got = probe(&v).await?;
    expect(&got, REFUSED)?;
    expect(&got, &[("mknod_chr", "ok"), ("open_chr", "EPERM"), ("mknod_blk", "ok"), ("open_blk", "EPERM")])?;
    // Without a user namespace nothing else refuses: the mounts are read-only.
    expect(&got, &[("cgroup_write", "EROFS"), ("cgroup_mkdir", "EROFS"), ("core_pattern", "EROFS")])?;
    mgr.close().await?;
    Ok(())
}

/// Host uid of a process whose command line is `cmdline`, once it appears.
async fn host_uid_of(cmdline: &[u8]) -> Option<u32> {
    for _ in 0..500 {
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            if std::fs::read(e.path().join("cmdline")).unwrap_or_default() == cmdline {
                let status = std::fs::read_to_string(e.path().join("status")).unwrap_or_default();
                return status.lines().find(|l| l.starts_with("Uid:"))?.split_whitespace().nth(1)?.parse().ok();
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    None
}

/// Two open vessels have disjoint, unprivileged host ranges; their
/// processes run under them; files made through the file API are the
/// vessel root's inside (and the mapped id on the host).
async fn vessels_run_under_their_own_host_ids(w: Arc<World>) -> Result<()> {
    let mgr = Manager::new(w.config("ids")).await?;
    let (a, b) = (mgr.create_vessel(IMAGE, "/").await?, mgr.create_vessel(IMAGE, "/").await?);
    let (ma, mb) = (a.id_mapping().context("a has no mapping")?, b.id_mapping().context("b has no mapping")?);
    if rootless() {
        // Rootless, a user's vessels share its one subordinate range (ids
        // of the process's namespace; see rootless_containers_never_hold_the_users_id).
        let shared = vessel::runtime::rootless::container_mapping();
        ensure!(ma == shared && mb == shared, "{ma:?} {mb:?}");
    } else {
        ensure!(ma.host_id >= 65536 && mb.host_id >= 65536, "{ma:?} {mb:?}");
        ensure!(ma.host_id + ma.size <= mb.host_id || mb.host_id + mb.size <= ma.host_id, "overlap: {ma:?} {mb:?}");
    }
    // A sleep of its own per backend (the worlds run side by side).
    let secs = if w.backend == Backend::Youki { "1.51" } else { "1.52" };
    let cmdline = format!("sleep\0{secs}\0");
    let (run_a, uid) = tokio::join!(run(&a, vec!["sleep".into(), secs.into()], false), host_uid_of(cmdline.as_bytes()));
    ensure!(run_a?.0 == 0);
    ensure!(uid == Some(ma.host_id), "a's process runs as host uid {uid:?}, want {}", ma.host_id);
    a.write_file("/made-by-api", b"x", 0o600)?;
    let info = a.stat("/made-by-api")?;
    ensure!(info.uid == 0 && info.gid == 0, "inside, the API's file is {}:{}", info.uid, info.gid);
    let (_, out, _) = run(&a, sh("stat -c %u:%g /made-by-api; cat /made-by-api"), false).await?;
    ensure!(out == "0:0\nx", "inside a container: {out:?}");
    let host = std::fs::metadata(a.rootfs().join("made-by-api"))?;
    ensure!(
        std::os::unix::fs::MetadataExt::uid(&host) == ma.host_id,
        "on the host: uid {}",
        std::os::unix::fs::MetadataExt::uid(&host)
    );
    // The container's own chown shows through the file API translated back.
    run(&a, sh("touch /mine && chown 1000:50 /mine"), true).await?;
    let info = a.stat("/mine")?;
    ensure!((info.uid, info.gid) == (1000, 50), "{info:?}");
    mgr.close().await?;
    Ok(())
}

/// `/proc/<pid>/uid_map` (or `self`) as (inside, outside, count) lines.
fn uid_map(pid: &str) -> Result<Vec<(u64, u64, u64)>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/uid_map"))?;
    text.lines()
        .map(|l| {
            let f: Vec<u64> = l.split_whitespace().map(str::parse).collect::<Result<_, _>>()?;
            ensure!(f.len() == 3, "uid_map line {l:?}");
            Ok((f[0], f[1], f[2]))
        })
        .collect()
}

/// Rootless, a container's ids are the user's subordinate ids only: its
/// root is not the user, the user's own id is not mapped in it (a command
/// cannot become the user, with setuid or by chown), and the user's own
/// namespace, where the user's id is, is out of its reach.
async fn rootless_containers_never_hold_the_users_id(w: Arc<World>) -> Result<()> {
    if !rootless() {
        // Rootful, vessels_run_under_their_own_host_ids covers the ids.
        return Ok(());
    }
    let mgr = Manager::new(w.config("rootless-ids")).await?;
    let v = mgr.create_vessel(IMAGE, "/").await?;
    // This process's namespace: container ids, then the user at 65536.
    let ours = uid_map("self")?;
    let own = vessel::runtime::rootless::OWN_ID as u64;
    let user = ours.iter().find(|l| l.0 == own).map(|l| l.1).context("the user is not mapped here")?;
    ensure!(user == u64::from(vessel::runtime::rootless::host_uid()));
    let sub = ours.iter().find(|l| l.0 == 0).context("no container ids here")?;
    // Inside: one line, container 0..65536 onto our 0..65536, never 65536.
    let (code, out, err) = run(&v, sh("cat /proc/self/uid_map /proc/self/gid_map"), false).await?;
    ensure!(code == 0, "{err}");
    let lines: Vec<Vec<&str>> = out.lines().map(|l| l.split_whitespace().collect()).collect();
    ensure!(lines == [["0", "0", "65536"], ["0", "0", "65536"]], "the container's maps: {out:?}");
    // So container root is the first subordinate id on the host, not the user.
    ensure!(sub.1 != user && !(sub.1..sub.1 + sub.2).contains(&user), "the subordinate range holds the user: {ours:?}");
    // A command tries to become the user's id, or give it a file.
    let attack = "touch /f; chown 65536 /f 2>&1; echo chown=$?; \
                  su -s /bin/sh 65536 -c id 2>/dev/null; echo su=$?; \
                  cat /proc/1/uid_map >/dev/null; stat -c %u /f";
    let (_, out, _) = run(&v, sh(attack), false).await?;
    ensure!(out.contains("chown=1") && out.contains("su=1") && out.trim_end().ends_with('0'), "{out:?}");
    ensure!(out.contains("Invalid argument"), "chown to the user's id: {out:?}");
    mgr.close().await?;
    Ok(())
}

/// A vessel's limits hold whoever its image runs as, and a command cannot
/// lift them. Rootless, the run's cgroups are v1 ones the container cannot
/// see or mount (its cgroupfs is an empty cgroup2 tree of its own), and an
/// image `USER`'s processes are in them from birth (a rootless runner could
/// not move them in); rootful, the cgroup files are host root's. As the
/// image's user and as container root: the attempts fail, then a memory hog
/// is OOM-killed at the limit and a fork loop meets the pids limit.
async fn limits_hold_whoever_runs(w: Arc<World>) -> Result<()> {
    let mgr = Manager::new(w.config("limits")).await?;
    let unavailable: Vec<_> = mgr.unavailable_limits().iter().map(|u| u.limit).collect();
    ensure!(
        unavailable.iter().all(|l| *l == vessel::Limit::Disk),
        "cgroup limits unavailable here: {:?}",
        mgr.unavailable_limits()
    );
    let opts = VesselOptions::new().memory_bytes(32 << 20).pids(24);
    let lift = "mkdir -p /tmp/m; mount -t cgroup -o memory cgroup /tmp/m 2>/dev/null; echo mount=$?; \
                mount -t cgroup2 none /tmp/m 2>/dev/null && for f in memory.max pids.max; do \
                  echo max > /tmp/m/$f 2>/dev/null; done; \
                for f in memory.max pids.max memory/memory.limit_in_bytes pids/pids.max; do \
                  echo max > /sys/fs/cgroup/$f 2>/dev/null; echo -1 > /sys/fs/cgroup/$f 2>/dev/null; done; \
                echo tried";
    // The subshell dies at its first refused fork; `read` and `echo` are
    // builtins, which need none.
    let forks = "(for i in $(seq 40); do sleep 5 & echo $i > /tmp/n; done) 2>/dev/null; \
                 read n < /tmp/n; echo started=$n";
    for image in ["local/busybox-user-app:latest", IMAGE] {
        let v = mgr.create_vessel_with(image, "/", &opts).await?;
        let (code, out, err) = run(&v, sh(lift), false).await?;
        ensure!(code == 0 && out.contains("mount=") && out.contains("tried"), "{image}: {code} {out} {err}");
        ensure!(!out.contains("mount=0"), "{image}: a cgroup v1 hierarchy was mounted inside: {out}");
        let (mut sink, mut errs) = (Vec::new(), Vec::new());
        let hog = v
            .exec(ExecOptions {
                command: vec!["tail".into(), "/dev/zero".into()],
                stdout: Some(Box::new(&mut sink)),
                stderr: Some(Box::new(&mut errs)),
                timeout: Some(std::time::Duration::from_secs(60)),
                ..Default::default()
            })
            .await?;
        ensure!(hog.exit_code == 137 && hog.oom_killed && !hog.timed_out, "{image}: the hog: {hog:?}");
        let (_, out, err) = run(&v, sh(forks), false).await?;
        let started: u32 = out
            .lines()
            .find_map(|l| l.strip_prefix("started="))
            .and_then(|n| n.trim().parse().ok())
            .with_context(|| format!("{image}: {out} {err}"))?;
        // 24 tasks at most: the shell, its subshells and some sleeps.
        println!("{:?} {image}: {started} of 40 sleeps started under pids=24", w.backend);
        ensure!((5..24).contains(&started), "{image}: {started} of 40 sleeps started under pids=24");
        v.close().await?;
    }
    mgr.close().await?;
    Ok(())
}

/// Rootless, the unsafe mode (container root = host ids) does not exist:
/// a typed refusal that creates nothing.
async fn rootless_refuses_host_ids(w: Arc<World>) -> Result<()> {
    if !rootless() {
        return Ok(());
    }
    let root = w.base.join("rootless-host-ids");
    match Manager::new(w.config("rootless-host-ids").user_namespaces(false)).await {
        Err(e) if e.kind() == vessel::VesselErrorKind::InvalidInput => {}
        other => return Err(anyhow::anyhow!("user_namespaces(false) rootless: {other:?}")),
    }
    ensure!(!root.exists(), "the refused manager created {}", root.display());
    Ok(())
}

/// Every file named `name` under `dir` (as root), not following symlinks.
fn find(dir: &Path, name: &str, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        let Ok(ft) = e.file_type() else { continue };
        if ft.is_dir() {
            find(&p, name, out);
        } else if e.file_name() == name {
            out.push(p);
        }
    }
}

/// A setuid-root binary made in a vessel, live in its upper dir and sealed
/// into the layer cache by a snapshot, cannot be run by a host user; the
/// host dirs holding container files are closed to other users.
async fn setuid_files_are_unusable_from_the_host(w: Arc<World>) -> Result<()> {
    let mgr = Manager::new(w.config("suid")).await?;
    let v = mgr.create_vessel(IMAGE, "/").await?;
    let (code, ..) = run(&v, sh("cp /bin/busybox /suid-sealed && chmod 4755 /suid-sealed"), true).await?;
    ensure!(code == 0);
    v.create_snapshot("sealed").await?;
    let (code, ..) = run(&v, sh("cp /bin/busybox /suid-live && chmod 4755 /suid-live"), true).await?;
    ensure!(code == 0);
    let root = w.base.join("suid");
    let mut found = Vec::new();
    find(&root, "suid-sealed", &mut found);
    find(&root, "suid-live", &mut found);
    ensure!(found.len() >= 3, "expected the files in the layer cache, the upper dir and the rootfs: {found:?}");
    for p in &found {
        let out = std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(p)
            .args(["id", "-u"])
            .output()?;
        let said = String::from_utf8_lossy(&out.stdout);
        ensure!(
            !out.status.success() && said.trim().is_empty(),
            "nobody ran {} ({}): {said:?}",
            p.display(),
            out.status
        );
    }
    let mode = |p: &Path| std::fs::metadata(p).map(|m| m.permissions().mode() & 0o777);
    for (p, want) in [
        (root.clone(), 0o711),
        (root.join("vessels"), 0o711),
        (root.join("layers"), 0o700),
        (root.join("vessels").join(v.id().as_str()), 0o700),
        (PathBuf::from("/run/vessel/locks"), 0o700),
        (w.base.join("data/vessels"), 0o700),
    ] {
        ensure!(mode(&p)? == want, "{} is {:o}, want {want:o}", p.display(), mode(&p)?);
    }
    mgr.close().await?;
    Ok(())
}

/// `USER` by name, as docker resolves it; an unknown name or group fails
/// at create time with a typed error and leaves nothing behind; the
/// resolved ids are pinned, so rewriting /etc/passwd later changes nothing.
async fn image_user_resolves_by_name(w: Arc<World>) -> Result<()> {
    let mgr = Manager::new(w.config("users")).await?;
    for (image, want) in [
        ("nobody", "uid=65534(nobody) gid=65534(nogroup)"),
        // (busybox's `id` lists the supplementary groups only.)
        ("app", "uid=1000(app) gid=1000(app) groups=10(wheel),50(staff)"),
        ("app-staff", "uid=1000(app) gid=50(staff) groups=10(wheel)"),
        ("numeric", "uid=1000(app) gid=50(staff) groups=10(wheel)"),
    ] {
        let v = mgr.create_vessel(&format!("local/busybox-user-{image}:latest"), "/").await?;
        let (code, out, err) = run(&v, vec!["id".into()], false).await?;
        ensure!(code == 0 && out.trim() == want, "{image}: {code} {out:?} {err:?}");
        if image == "app" {
            // Pinned: a command that empties /etc/passwd changes nothing on reopen.
            run(&v, sh("echo > /etc/passwd"), true).await.map(drop)?;
            v.create_snapshot("no users").await?;
            let id = v.id().to_string();
            v.close().await?;
            let v = mgr.open_vessel(&id).await?;
            let (_, out, _) = run(&v, sh("id -u; id -G"), false).await?;
            ensure!(out == "1000\n1000 10 50\n", "after reopening: {out:?}");
        }
    }
    let before = mgr.list_vessels().await?.len();
    let dirs_before = std::fs::read_dir(w.base.join("users/vessels"))?.count();
    for image in ["ghost", "badgroup"] {
        match mgr.create_vessel(&format!("local/busybox-user-{image}:latest"), "/").await {
            Err(e) if e.kind() == VesselErrorKind::InvalidInput && e.to_string().contains("image user") => {}
            other => return Err(anyhow!("{image}: {:?}", other.map(|v| v.id().to_string()))),
        }
    }
    ensure!(mgr.list_vessels().await?.len() == before, "a refused vessel was stored");
    let dirs = std::fs::read_dir(w.base.join("users/vessels"))?.count();
    ensure!(dirs == dirs_before, "{dirs} vessel dirs, {dirs_before} before");
    mgr.close().await?;
    Ok(())
}

/// A command cannot forge overlay's markers with `user.overlay.*` (the
/// mount's own namespace is `trusted.overlay.*`): the xattr is data, kept
/// across a reopen on a new host, and the directory's files stay.
async fn user_overlay_xattrs_forge_nothing(w: Arc<World>) -> Result<()> {
    let mgr = Manager::new(w.config("forge")).await?;
    let v = mgr.create_vessel(IMAGE, "/").await?;
    run(&v, sh("mkdir /d && echo kept > /d/keep"), true).await?;
    v.create_snapshot("d").await?;
    v.write_file("/tmp/escape", &std::fs::read(probe_exe())?, 0o755)?;
    for (name, value) in [("user.overlay.opaque", "y"), ("user.overlay.redirect", "/etc")] {
        let args = ["/tmp/escape", "setxattr", "/d", name, value].map(String::from).to_vec();
        let (code, _, err) = run(&v, args, true).await?;
        ensure!(code == 0, "setxattr {name}: {err}");
    }
    v.create_snapshot("forged?").await?;
    let id = v.id().to_string();
    v.close().await?;
    let other = Manager::new(w.config("forge-other-host")).await?;
    let v = other.open_vessel(&id).await?;
    ensure!(
        v.read_file("/d/keep")?
            == b"kept
",
        "a forged opaque marker hid /d's files on a new host"
    );
    let got = xattr::get(v.rootfs().join("d"), "user.overlay.opaque")?;
    ensure!(got.as_deref() == Some(&b"y"[..]), "the container's xattr was lost: {got:?}");
    other.close().await?;
    mgr.close().await?;
    Ok(())
}

/// A device node (possible only without user namespaces) is refused when
/// snapshotting, with a typed error naming it, before anything is
/// committed; the vessel stays usable and reopens elsewhere.
async fn device_nodes_are_refused_at_snapshot(w: Arc<World>) -> Result<()> {
    let mgr = Manager::new(w.config("devsnap").user_namespaces(false)).await?;
    let v = mgr.create_vessel(IMAGE, "/work").await?;
    v.write_file("kept", b"1", 0o644)?;
    let (code, _, err) = run(&v, sh("mknod /work/null c 1 3"), true).await?;
    ensure!(code == 0, "mknod without a user namespace: {err}");
    let before = v.list_snapshots().len();
    match v.create_snapshot("with a device").await {
        Err(e) if e.kind() == VesselErrorKind::InvalidInput && e.to_string().contains("work/null") => {}
        other => return Err(anyhow!("snapshot of a device node: {:?}", other.map(|s| s.id))),
    }
    ensure!(v.list_snapshots().len() == before, "a refused snapshot was recorded");
    ensure!(v.read_file("kept")? == b"1", "the uncommitted change was lost");
    v.delete_file("null")?;
    let snap = v.create_snapshot("without").await?;
    let id = v.id().to_string();
    v.close().await?;
    let other = Manager::new(w.config("devsnap-other-host").user_namespaces(false)).await?;
    let v = other.open_vessel(&id).await?;
    ensure!(v.manifest().current_snapshot_id == Some(snap.id) && v.read_file("kept")? == b"1");
    other.close().await?;
    mgr.close().await?;
    Ok(())
}

/// A manifest forged to name another vessel's snapshot (its id, with a
/// made-up or even the real checksum) cannot pull that vessel's cached
/// layer into this one on a host that has it: cache hits are bound to the
/// vessel and checksum, and the fetch from this vessel's own storage fails.
async fn forged_manifests_cannot_borrow_cached_layers(w: Arc<World>) -> Result<()> {
    let mgr = Manager::new(w.config("borrow")).await?;
    let victim = mgr.create_vessel(IMAGE, "/").await?;
    victim.write_file("/secret", b"victim's data", 0o600)?;
    let secret = victim.create_snapshot("secret").await?;
    let attacker = mgr.create_vessel(IMAGE, "/").await?;
    attacker.create_snapshot("mine").await?;
    let id = attacker.id().clone();
    attacker.close().await?;
    let storage = w.storage();
    for checksum in [format!("sha256:{}", "0".repeat(64)), secret.checksum.clone()] {
        let mut forged = storage.load_vessel_manifest(&id).await?;
        let mut snap = secret.clone();
        snap.vessel_id = id.clone();
        snap.checksum = checksum.clone();
        forged.snapshots = vec![snap];
        forged.current_snapshot_id = Some(secret.id.clone());
        storage.save_vessel_manifest(&forged).await?;
        match mgr.open_vessel(id.as_str()).await {
            Err(e) => ensure!(e.kind() == VesselErrorKind::NotFound, "forged ({checksum}): {e}"),
            Ok(v) => {
                let leaked = v.read_file("/secret").ok();
                return Err(anyhow!("a forged manifest opened; it reads {leaked:?}"));
            }
        }
    }
    ensure!(victim.read_file("/secret")? == b"victim's data");
    mgr.close().await?;
    Ok(())
}

/// A mount root where idmapped mounts cannot be made (overlayfs itself
/// cannot be idmapped): `Manager::new` refuses with a typed error instead
/// of running unisolated vessels.
async fn no_idmapped_mounts_is_a_typed_error(w: Arc<World>) -> Result<()> {
    let base = w.base.join("no-idmap");
    for d in ["lower", "upper", "work", "mnt"] {
        std::fs::create_dir_all(base.join(d))?;
    }
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        base.join("lower").display(),
        base.join("upper").display(),
        base.join("work").display()
    );
    nix::mount::mount(
        Some("overlay"),
        &base.join("mnt"),
        Some("overlay"),
        nix::mount::MsFlags::empty(),
        Some(opts.as_str()),
    )?;
    let result = Manager::new(w.config("no-idmap/mnt/root")).await;
    let left = std::fs::read_dir(base.join("mnt/root/vessels")).map(|d| d.count()).unwrap_or(0);
    nix::mount::umount2(&base.join("mnt"), nix::mount::MntFlags::MNT_DETACH)?;
    match result {
        Err(e @ vessel::VesselError::IsolationUnsupported(_)) => {
            ensure!(e.kind() == VesselErrorKind::Unavailable, "{e}");
            ensure!(e.to_string().contains("user_namespaces(false)"), "the error says how to opt out: {e}");
        }
        other => return Err(anyhow!("Manager::new on an overlay mount root: {:?}", other.map(|m| m.backend()))),
    }
    ensure!(left == 0, "the failed probe left {left} entries");
    Ok(())
}

fn main() {
    vessel::init();
    let args = Arguments::from_args();
    let Some(image_dir) = support::root_with_test_image("escape") else { return };
    PROBE.set(image_dir.join("escape")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let worlds = common::worlds("escape", tmp.path(), false);
    // Each world's storage holds the test images (the USER variants too).
    common::seed_images(&TOKIO, &worlds, &image_dir, true);
    let cases = support::cases![
        probes_are_refused,
        device_cgroup_without_user_namespaces,
        vessels_run_under_their_own_host_ids,
        setuid_files_are_unusable_from_the_host,
        image_user_resolves_by_name,
        no_idmapped_mounts_is_a_typed_error,
        user_overlay_xattrs_forge_nothing,
        device_nodes_are_refused_at_snapshot,
        forged_manifests_cannot_borrow_cached_layers,
        rootless_containers_never_hold_the_users_id,
        rootless_refuses_host_ids,
        limits_hold_whoever_runs,
    ];
    // The unsafe mode (no user namespace) exists as root only.
    let rule = support::suite::Rootless {
        rootful_only: &["device_cgroup_without_user_namespaces", "device_nodes_are_refused_at_snapshot"],
        cgroup_limits: &["limits_hold_whoever_runs"],
    };
    let (rootless, delegated) = (rootless(), common::delegated());
    let trials =
        support::suite::trials(&TOKIO, &common::labelled(&worlds), &cases, |n| rule.runs(n, rootless, delegated));
    let conclusion = libtest_mimic::run(&args, trials);
    let leaks = common::leaks(tmp.path(), &worlds);
    support::finish(&tmp.keep(), &leaks, conclusion)
}
