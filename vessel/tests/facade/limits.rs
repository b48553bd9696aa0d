//! Limits and quotas: runaway commands contained, CPU and disk bounds held, bad
//! limits refused, quota modes where the disk has none.

use super::*;

pub(super) fn kind_of(e: &anyhow::Error) -> Option<VesselErrorKind> {
    e.downcast_ref::<vessel::VesselError>().map(vessel::VesselError::kind)
}

/// The bomb's script: its processes carry it (forked shells) or `10.0123`
/// (its last `sleep`) as an argument, which no other test's do (rootless,
/// every vessel of the user runs as the same ids, so ids cannot tell).
/// The top shell forks once, for the bomb, then becomes `sleep` (ash
/// exits when a fork of its own is refused, which would end the run early).
const BOMB: &str = "(f() { f | f & }; f) & exec sleep 10.0123";

fn bomb_processes() -> usize {
    support::processes_with_arg(BOMB).len() + support::processes_with_arg("10.0123").len()
}

/// A fork bomb hits its pids limit while the host stays responsive; a
/// memory hog is OOM-killed (137, flagged) while another vessel runs on;
/// nothing of either is left.
pub(super) async fn runaway_commands_are_contained(w: Arc<World>) -> Result<()> {
    let mgr = w.manager("runaway").await?;
    let v = mgr.create_vessel_with(IMAGE, "/work", &VesselOptions::new().pids(64).memory_bytes(64 << 20)).await?;
    // The host's scheduling latency while the bomb runs: a 10 ms sleep's overshoot.
    let probe = LatencyProbe::start();
    let (res, _, err) = run_with(&v, BOMB, 3, Limits::default()).await?;
    let worst = probe.stop();
    println!("{:?}: fork bomb under pids=64: host sleep overshoot at worst {worst:?}", w.backend);
    ensure!(res.timed_out, "the bomb ended by itself: {res:?}");
    ensure!(err.contains("can't fork") || err.contains("Resource temporarily unavailable"), "no fork refused: {err}");
    ensure!(worst < Duration::from_millis(500), "the host stalled {worst:?} during the bomb");
    let deadline = Instant::now() + Duration::from_secs(5);
    while bomb_processes() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ensure!(bomb_processes() == 0, "{} processes of the bomb left", bomb_processes());

    // The memory hog; another vessel keeps running meanwhile.
    let other = mgr.create_vessel(IMAGE, "/work").await?;
    let (hog, alive) = tokio::join!(
        run_with(&v, "tail /dev/zero", 30, Limits::default()),
        run_with(&other, "sleep 1; echo alive", 30, Limits::default())
    );
    let (hog, _, _) = hog?;
    ensure!(hog.exit_code == 137 && hog.oom_killed && !hog.timed_out, "{hog:?}");
    ensure!(alive?.1 == "alive\n");
    // The vessel is still usable.
    ensure!(run(&v, "echo fine", false).await?.1 == "fine\n");
    mgr.close().await?;
    Ok(())
}

/// A busy loop under a fifth of a core gets about that: its CPU time over
/// about 3 s of wall time (read from /proc inside) stays under the quota.
pub(super) async fn cpu_quota_is_enforced(w: Arc<World>) -> Result<()> {
    let mgr = w.manager("cpu").await?;
    let v = mgr.create_vessel_with(IMAGE, "/work", &VesselOptions::new().cpu_quota_us(20_000)).await?;
    let script = "s=$(date +%s); while [ $(date +%s) -lt $((s + 3)) ]; do i=$((i + 1)); done; \
                  cut -d' ' -f14-17 /proc/$$/stat";
    let (res, out, err) = run_with(&v, script, 20, Limits::default()).await?;
    ensure!(res.exit_code == 0, "{res:?} {err}");
    let ticks: u64 = out.split_whitespace().map(|t| t.parse::<u64>().unwrap_or(0)).sum();
    // At most 3 s of wall time at 0.2 core: 0.6 s = 60 ticks (USER_HZ 100), with slack.
    println!("{:?}: a busy loop under 0.2 core used {ticks} ticks in 2-3 s", w.backend);
    ensure!(ticks <= 80, "{ticks} ticks of CPU under a 0.2-core quota");
    ensure!(ticks >= 5, "the loop got no CPU at all ({ticks} ticks)");
    if vessel::runtime::rootless::mode().is_rootless() {
        // Rootless the container's cgroupfs is an empty cgroup2 tree of its
        // own (the runner's cgroups are not its to show): enforced, not shown.
        mgr.close().await?;
        return Ok(());
    }
    // Visible inside: the cgroup's quota (v1 or v2 file).
    let (_, seen, _) = run_with(
        &v,
        "cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us /sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us /sys/fs/cgroup/cpu.max 2>/dev/null",
        20,
        Limits::default(),
    )
    .await?;
    ensure!(seen.contains("20000"), "the quota is not visible inside: {seen:?}");
    mgr.close().await?;
    Ok(())
}

/// An exec's own limits apply when narrower; wider ones are refused.
pub(super) async fn exec_limits_narrow_the_vessels(w: Arc<World>) -> Result<()> {
    let mgr = w.manager("exec-limits").await?;
    let v = mgr.create_vessel_with(IMAGE, "/work", &VesselOptions::new().pids(256)).await?;
    let narrow = Limits { memory_bytes: Some(32 << 20), ..Limits::default() };
    let (res, _, _) = run_with(&v, "tail /dev/zero", 30, narrow).await?;
    ensure!(res.exit_code == 137 && res.oom_killed, "a 32 MiB exec limit did not apply: {res:?}");
    let few = Limits { pids: Some(4), ..Limits::default() };
    let (res, _, err) = run_with(&v, "for i in 1 2 3 4 5 6; do sleep 5 & done; wait", 30, few).await?;
    ensure!(err.contains("can't fork") || res.exit_code != 0, "pids=4 allowed 7 processes: {res:?} {err}");
    let wide = Limits { pids: Some(100_000), ..Limits::default() };
    match run_with(&v, "touch /work/should-not-exist", 30, wide).await {
        Err(e)
            if kind_of(&e) == Some(VesselErrorKind::InvalidInput) && e.to_string().contains("above the vessel's") => {}
        other => return Err(anyhow!("an exec above the vessel's pids: {other:?}")),
    }
    ensure!(v.stat("/work/should-not-exist").is_err(), "the refused exec ran");
    mgr.close().await?;
    Ok(())
}

/// Zero, negative and absurd limits are refused before anything starts.
pub(super) async fn bad_limits_are_refused(w: Arc<World>) -> Result<()> {
    let mgr = w.manager("bad-limits").await?;
    let before = mgr.list_vessels().await?.len();
    for (what, opts) in [
        ("memory 0", VesselOptions::new().memory_bytes(0)),
        ("memory -1", VesselOptions::new().memory_bytes(-1)),
        ("memory 1 EiB", VesselOptions::new().memory_bytes(1 << 60)),
        ("cpu 0", VesselOptions::new().cpu_quota_us(0)),
        ("cpu -5", VesselOptions::new().cpu_quota_us(-5)),
        ("pids 0", VesselOptions::new().pids(0)),
        ("pids 2^40", VesselOptions::new().pids(1 << 40)),
        ("disk 10 bytes", VesselOptions::new().disk_bytes(10)),
        ("disk 2^62", VesselOptions::new().disk_bytes(1 << 62)),
    ] {
        match mgr.create_vessel_with(IMAGE, "/work", &opts).await {
            Err(e) if e.kind() == VesselErrorKind::InvalidInput => {}
            other => return Err(anyhow!("{what}: {other:?}")),
        }
    }
    ensure!(mgr.list_vessels().await?.len() == before, "a refused vessel was created");
    let v = mgr.create_vessel(IMAGE, "/work").await?;
    for bad in
        [Limits { memory_bytes: Some(0), ..Limits::default() }, Limits { cpu_quota_us: Some(-1), ..Limits::default() }]
    {
        match run_with(&v, "true", 10, bad).await {
            Err(e) if kind_of(&e) == Some(VesselErrorKind::InvalidInput) => {}
            other => return Err(anyhow!("exec limits {bad:?}: {other:?}")),
        }
    }
    // A manager whose defaults are bad does not start.
    let bad = w.config("bad-defaults").default_limits(Limits { pids: Some(-1), ..Limits::default() });
    ensure!(Manager::new(bad).await.is_err_and(|e| e.kind() == VesselErrorKind::InvalidInput));
    mgr.close().await?;
    Ok(())
}

pub(super) fn free_bytes(p: &Path) -> u64 {
    let dir = std::fs::File::open(p).unwrap();
    nix::unistd::syncfs(&dir).unwrap();
    let st = nix::sys::statvfs::statvfs(p).unwrap();
    st.blocks_available() * st.fragment_size()
}

/// A disk filler gets EDQUOT at the quota; the vessel then snapshots,
/// restores and reopens; the host's free space dropped by about the quota
/// at most; another vessel writes on.
pub(super) async fn disk_quota_bounds_what_a_vessel_writes(w: Arc<World>) -> Result<()> {
    let mgr = w.manager("disk").await?;
    let v = mgr.create_vessel_with(IMAGE, "/work", &VesselOptions::new().disk_bytes(64 << 20)).await?;
    let base = v.create_snapshot("before").await?;
    let root = w.base.join("disk");
    // The worlds share the filesystem: one filler at a time, and synced
    // counts, so the drop measured is this vessel's.
    static FILLER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let serial = FILLER.lock().await;
    let free = free_bytes(&root);
    let (code, _, err) = run(&v, "dd if=/dev/zero of=/work/big bs=1M count=200", true).await?;
    ensure!(code != 0 && err.contains("Disk quota exceeded"), "{code} {err}");
    let used = free.saturating_sub(free_bytes(&root));
    drop(serial);
    println!("{:?}: a 64 MiB quota, 200 MiB written: the host lost {} MiB", w.backend, used >> 20);
    ensure!(used < 80 << 20, "the host lost {used} bytes under a 64 MiB quota");
    // Throwaway execs and the file API are bounded too.
    let (code, _, err) = run(&v, "dd if=/dev/zero of=/work/tmp bs=1M count=200", false).await?;
    ensure!(code != 0 && err.contains("Disk quota exceeded"), "a throwaway exec: {code} {err}");
    match v.write_file("api-big", &vec![1u8; 100 << 20], 0o644) {
        Err(e) if e.kind() == VesselErrorKind::QuotaExceeded => {}
        other => return Err(anyhow!("a 100 MiB write through the file API: {other:?}")),
    }
    // Another vessel is unaffected.
    let other = mgr.create_vessel(IMAGE, "/work").await?;
    ensure!(run(&other, "dd if=/dev/zero of=/work/f bs=1M count=16 2>/dev/null && echo ok", true).await?.1 == "ok\n");
    // The vessel stays usable: snapshot what is there, restore, reopen.
    let full = v.create_snapshot("full").await?;
    ensure!(v.stat("/work/big")?.size > 32 << 20);
    v.restore_snapshot(&base.id).await?;
    ensure!(v.stat("/work/big").is_err());
    ensure!(run(&v, "dd if=/dev/zero of=/work/again bs=1M count=8 2>/dev/null && echo ok", true).await?.1 == "ok\n");
    v.restore_snapshot(&full.id).await?;
    let id = v.id().to_string();
    v.close().await?;
    let host_b = w.manager("disk-b").await?;
    let vb = host_b.open_vessel(&id).await?;
    ensure!(vb.stat("/work/big")?.size > 32 << 20);
    // Its quota holds on the new host: what it adds there is bounded.
    let (code, _, err) = run(&vb, "dd if=/dev/zero of=/work/more bs=1M count=200", true).await?;
    ensure!(code != 0 && err.contains("Disk quota exceeded"), "on host B: {code} {err}");
    host_b.close().await?;
    mgr.close().await?;
    Ok(())
}

/// The quota modes on a mount root that cannot enforce quotas (tmpfs):
/// `Require` is a typed refusal that names no Rust API; `Auto` (the
/// default) runs, lists the disk limit as unavailable with why, and refuses
/// a disk quota asked for explicitly; `Off` runs and checks nothing.
pub(super) async fn quota_modes_on_a_filesystem_without_quotas(w: Arc<World>) -> Result<()> {
    use vessel::QuotaMode;
    let shm = tempfile::tempdir_in("/dev/shm")?;
    let config = |mode: QuotaMode| w.config("unused").mount_root(shm.path().join("root")).quota_mode(mode);
    match Manager::new(config(QuotaMode::Require)).await {
        Err(e @ vessel::VesselError::QuotaUnsupported { .. }) => {
            ensure!(e.kind() == VesselErrorKind::Unavailable);
            ensure!(e.to_string().contains("not on btrfs") && !e.to_string().contains("ManagerConfig"), "{e}");
        }
        other => return Err(anyhow!("quotas required on tmpfs: {other:?}")),
    }
    // The default mode is Auto.
    let mgr = Manager::new(w.config("unused").mount_root(shm.path().join("root"))).await?;
    let disk: Vec<_> = mgr.unavailable_limits().iter().filter(|u| u.limit == vessel::Limit::Disk).collect();
    ensure!(disk.len() == 1 && disk[0].reason.contains("not on btrfs"), "{:?}", mgr.unavailable_limits());
    let v = mgr.create_vessel(IMAGE, "/work").await?;
    let (code, out, _) = run(&v, "echo works > f; cat f", true).await?;
    ensure!(code == 0 && out == "works\n", "{code} {out:?}");
    ensure!(!v.manifest().labels.contains_key("vessel.limits.disk"), "an unenforced quota was pinned");
    v.close().await?;
    match mgr.create_vessel_with(IMAGE, "/work", &VesselOptions::new().disk_bytes(1 << 30)).await {
        Err(e) if e.kind() == VesselErrorKind::InvalidInput => {}
        other => return Err(anyhow!("a disk quota without quotas: {other:?}")),
    }
    mgr.close().await?;
    let mgr = Manager::new(config(QuotaMode::Off)).await?;
    ensure!(mgr.unavailable_limits().iter().all(|u| u.limit != vessel::Limit::Disk), "off lists the disk limit");
    mgr.close().await?;
    ensure!(support::mounts_under(shm.path()).is_empty(), "mounts left under {}", shm.path().display());
    Ok(())
}
