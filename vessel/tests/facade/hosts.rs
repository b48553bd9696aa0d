//! Hosts and handles: reopening on a new host, locking and concurrency, names,
//! rootless mode, bad input, a hundred vessels at once.

use super::*;

pub(super) async fn reopen_on_a_new_host(w: Arc<World>) -> Result<()> {
    let host_a = w.manager("host-a").await?;
    let v = host_a.create_vessel(IMAGE, "/work").await?;
    let script = "mkdir -p d/e && echo data > d/e/f && ln d/e/f hard && ln -s d/e/f soft && chmod 4711 d/e/f \
                  && chown 123:456 hard && touch -d '2001-02-03 04:05:06' soft d/e/f && setfattr -n user.k -v v1 d 2>/dev/null; \
                  rm -f /bin/vi && mkfifo fifo && head -c 3000000 /dev/urandom > big && echo ok";
    let (code, out, err) = run(&v, script, true).await?;
    ensure!(code == 0 && out == "ok\n", "{err}");
    v.write_file("api.txt", b"written by the api", 0o600)?;
    // A sparse file stays sparse on host B.
    let script = "mkdir od && echo kept > od/a && dd if=/dev/zero of=sparse bs=1 count=0 seek=268435456 2>/dev/null \
                  && echo tail >> sparse && echo ok";
    let (code, out, err) = run(&v, script, true).await?;
    ensure!(code == 0 && out == "ok\n", "{err}");
    // As the host's root, with the vessel root's fs ids (the mount is
    // idmapped): `user.overlay.*` (which a command may set, see the escape
    // tests) and `trusted.*` (which only host root can) are data, not
    // overlay markers; a device node cannot be snapshotted: a typed
    // refusal, nothing committed.
    let host = v.id_mapping().map_or(0, |m| m.host_id);
    let null = v.rootfs().join("work/null");
    let rootless = vessel::runtime::rootless::mode().is_rootless();
    if rootless {
        // Rootless, `user.overlay.*` set through the mount is data too
        // (overlay stores it escaped), `trusted.*` needs host root, and no
        // device node can be made at all: refused at the source.
        vessel::runtime::idmap::as_host_ids(host, host, || -> Result<()> {
            xattr::set(v.rootfs().join("work/od"), "user.overlay.opaque", b"y")?;
            xattr::set(v.rootfs().join("work/od/a"), "user.overlay.redirect", b"/etc")?;
            ensure!(xattr::set(v.rootfs().join("work/od/a"), "trusted.vessel-test", b"t").is_err());
            use nix::sys::stat::{Mode, SFlag, makedev, mknod};
            let made = mknod(&null, SFlag::S_IFCHR, Mode::from_bits_truncate(0o666), makedev(1, 3));
            ensure!(made == Err(nix::errno::Errno::EPERM), "mknod rootless: {made:?}");
            xattr::set(v.rootfs().join("work/od/a"), "user.vessel-test", b"t")?;
            Ok(())
        })?;
    } else {
        vessel::runtime::idmap::as_host_ids(host, host, || -> Result<()> {
            xattr::set(v.rootfs().join("work/od"), "user.overlay.opaque", b"y")?;
            xattr::set(v.rootfs().join("work/od/a"), "user.overlay.redirect", b"/etc")?;
            xattr::set(v.rootfs().join("work/od/a"), "trusted.vessel-test", b"t")?;
            use nix::sys::stat::{Mode, SFlag, makedev, mknod};
            mknod(&null, SFlag::S_IFCHR, Mode::from_bits_truncate(0o666), makedev(1, 3))?;
            Ok(())
        })?;
        let before = v.manifest();
        match v.create_snapshot("with a device").await {
            Err(e) if e.kind() == VesselErrorKind::InvalidInput && e.to_string().contains("device node") => {}
            other => return Err(anyhow!("snapshot of a device node: {other:?}")),
        }
        ensure!(v.manifest().snapshots.len() == before.snapshots.len(), "a refused snapshot was committed");
        std::fs::remove_file(&null)?;
    }
    let snap = v.create_snapshot("state").await?;
    let want = scan(&v.rootfs())?;
    let marks = if rootless {
        ["user.overlay.redirect", "user.vessel-test"]
    } else {
        ["user.overlay.redirect", "trusted.vessel-test"]
    };
    ensure!(want.get("work/od/a").is_some_and(|a| marks.iter().all(|m| a.contains(m))), "{want:?}");
    v.write_file("uncommitted", b"x", 0o644)?;
    let id = v.id().to_string();
    // Host B: its own mount root and cache, the same storage.
    let host_b = w.manager("host-b").await?;
    match host_b.open_vessel(&id).await {
        Err(e) if e.kind() == VesselErrorKind::Conflict => {}
        other => return Err(anyhow!("opening a vessel another handle has open: {other:?}")),
    }
    v.close().await?;
    let vb = host_b.open_vessel(&id).await?;
    ensure!(vb.manifest().current_snapshot_id == Some(snap.id));
    let got = scan(&vb.rootfs())?;
    for (k, v) in &want {
        ensure!(got.get(k) == Some(v), "{k}: want {v:?}, got {:?}", got.get(k));
    }
    ensure!(got.len() == want.len(), "{} entries, want {}", got.len(), want.len());
    ensure!(vb.stat("uncommitted").is_err() && vb.stat("/bin/vi").is_err());
    let sparse = std::fs::metadata(vb.rootfs().join("work/sparse"))?;
    ensure!(sparse.len() == 268_435_461 && sparse.blocks() * 512 < 1 << 20, "the sparse file: {sparse:?}");
    let (code, out, _) = run(&vb, "cat d/e/f", false).await?;
    ensure!(code == 0 && out == "data\n");
    host_b.close().await?;
    host_a.close().await?;
    Ok(())
}

pub(super) async fn concurrency_and_locking(w: Arc<World>) -> Result<()> {
    let mgr = Arc::new(w.manager("conc").await?);
    // Several vessels at once, each with concurrent execs.
    let vessels = futures::future::try_join_all((0..3).map(|_| mgr.create_vessel(IMAGE, "/work"))).await?;
    let runs = vessels.iter().enumerate().flat_map(|(i, v)| {
        (0..3).map(move |j| async move {
            let (code, out, _) = run(v, &format!("echo {i}-{j} > f{j}; cat f{j}"), true).await?;
            ensure!(code == 0 && out == format!("{i}-{j}\n"), "{code} {out:?}");
            Ok::<_, anyhow::Error>(())
        })
    });
    futures::future::try_join_all(runs).await?;
    // A snapshot waits for a running persistent exec, and includes its result.
    let v = &vessels[0];
    let slow = run(v, "sleep 1; echo done > slow", true);
    let snap = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        v.create_snapshot("after slow").await
    };
    let (slow, snap) = tokio::join!(slow, snap);
    ensure!(slow?.0 == 0);
    let snap = snap?;
    v.write_file("slow", b"changed", 0o644)?;
    v.restore_snapshot(&snap.id).await?;
    ensure!(v.read_file("slow")? == b"done\n", "the snapshot did not wait for the exec");
    // Another manager on the same storage cannot open a vessel that is open.
    let other = w.manager("conc-other").await?;
    match other.open_vessel(v.id().as_str()).await {
        Err(e) if e.kind() == VesselErrorKind::Conflict => {}
        Ok(_) => {
            return Err(anyhow!("two managers opened one vessel"));
        }
        Err(e) => return Err(e.into()),
    }
    // Locks are per mount root (host); on one host, a second handle is refused.
    match mgr.open_vessel(v.id().as_str()).await {
        Err(e) if e.kind() == VesselErrorKind::Conflict => {}
        other => return Err(anyhow!("a second handle: {other:?}")),
    }
    other.close().await?;
    mgr.close().await?;
    ensure!(mgr.list_vessels().await?.len() >= 3);
    Ok(())
}

pub(super) async fn bad_input(w: Arc<World>) -> Result<()> {
    let mgr = w.manager("bad").await?;
    for (what, r) in [
        ("invalid id", mgr.open_vessel("../etc").await.err()),
        ("unknown id", mgr.open_vessel("00000000deadbeef").await.err()),
        ("missing image", mgr.create_vessel("local/nope:latest", "/work").await.err()),
        ("invalid image ref", mgr.create_vessel("local/busybox:bad tag", "/work").await.err()),
    ] {
        let e = r.ok_or_else(|| anyhow!("{what} was accepted"))?;
        let want = if what.starts_with("unknown") || what.starts_with("missing") {
            VesselErrorKind::NotFound
        } else {
            VesselErrorKind::InvalidInput
        };
        ensure!(e.kind() == want, "{what}: {e} ({:?})", e.kind());
    }
    // Importing an archive of several images as a reference none of them
    // has is a typed NotFound that stores nothing (not silently the first).
    let image_dir = PathBuf::from(std::env::var_os("VESSEL_TEST_IMAGE_DIR").context("image dir")?);
    let two = two_image_archive(&std::fs::read(image_dir.join("busybox-oci.tar"))?)?;
    match mgr.import_image("local/absent:latest", Box::new(std::io::Cursor::new(two.clone()))).await {
        Err(e) if e.kind() == VesselErrorKind::NotFound => {}
        other => return Err(anyhow!("importing an absent reference: {other:?}")),
    }
    ensure!(w.storage().load_image(&vessel::ImageRef::new("local/absent:latest")?).await.is_err(), "it was stored");
    mgr.import_image("local/other:v2", Box::new(std::io::Cursor::new(two))).await?;
    ensure!(mgr.create_vessel("local/other:v2", "/").await?.id_mapping().is_some());
    let spooled: Vec<_> = std::fs::read_dir(w.base.join("bad"))?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".import-"))
        .collect();
    ensure!(spooled.is_empty(), "import spool files left: {spooled:?}");
    // An empty or relative work dir is `/`, as in the Go original.
    for wd in ["", "work", "./x/.."] {
        let v = mgr.create_vessel(IMAGE, wd).await?;
        ensure!(v.manifest().work_dir == "/", "work dir {wd:?} became {:?}", v.manifest().work_dir);
        v.close().await?;
    }
    let v = mgr.create_vessel(IMAGE, "/work").await?;
    let s = v.create_snapshot("s").await?;
    let foreign = SnapshotId::new("00000000000000ff")?;
    match v.restore_snapshot(&foreign).await {
        Err(e) if e.kind() == VesselErrorKind::NotFound => {}
        other => return Err(anyhow!("restore of a foreign snapshot: {other:?}")),
    }
    ensure!(v.manifest().current_snapshot_id == Some(s.id));
    mgr.close().await?;
    Ok(())
}

/// The host's scheduling latency: how late a host thread's 10 ms sleeps end.
pub(super) struct LatencyProbe {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Duration>,
}

impl LatencyProbe {
    pub(super) fn start() -> Self {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut worst = Duration::ZERO;
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                let t = Instant::now();
                std::thread::sleep(Duration::from_millis(10));
                worst = worst.max(t.elapsed().saturating_sub(Duration::from_millis(10)));
            }
            worst
        });
        Self { stop, thread }
    }

    /// The worst overshoot seen.
    pub(super) fn stop(self) -> Duration {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

/// `ManagerConfig::rootless` follows the process's mode (chosen in
/// `vessel::init`): asking for the other mode is a typed refusal
/// that creates nothing. Rootless, the limits that cannot hold are
/// reported, and the containerd backend is a typed `Unavailable`.
pub(super) async fn rootless_mode_follows_the_process(w: Arc<World>) -> Result<()> {
    let rootless = vessel::runtime::rootless::mode().is_rootless();
    let root = w.base.join("mode-mismatch");
    match Manager::new(w.config("unused").mount_root(&root).rootless(!rootless)).await {
        Err(e @ vessel::VesselError::RootlessMismatch(_)) => ensure!(e.kind() == VesselErrorKind::Unavailable),
        other => return Err(anyhow!("rootless({}) in a {} process: {other:?}", !rootless, mode_name(rootless))),
    }
    ensure!(!root.exists(), "the refused manager created {}", root.display());
    let mgr = Manager::new(w.config("mode").rootless(rootless)).await?;
    ensure!(mgr.is_rootless() == rootless);
    let unavailable: Vec<vessel::Limit> = mgr.unavailable_limits().iter().map(|u| u.limit).collect();
    if rootless {
        use vessel::Limit::*;
        // With a cgroup subtree delegated to the user, the limits hold.
        let want: &[vessel::Limit] =
            if vessel::runtime::rootless::delegated_cgroups().is_ok() { &[Disk] } else { &[Disk, Memory, Cpu, Pids] };
        ensure!(unavailable == want, "rootless unavailable limits: {unavailable:?}");
        ensure!(mgr.unavailable_limits().iter().all(|u| u.reason.contains("rootless")));
        // Asked for explicitly, a disk quota is refused, not dropped.
        match mgr.create_vessel_with(IMAGE, "/work", &VesselOptions::new().disk_bytes(1 << 30)).await {
            Err(e) if e.kind() == VesselErrorKind::InvalidInput => {}
            other => return Err(anyhow!("a disk quota rootless: {other:?}")),
        }
        let containerd = Manager::new(w.config("mode-containerd").backend(Backend::Containerd)).await;
        match containerd {
            Err(e) if e.kind() == VesselErrorKind::Unavailable && e.to_string().contains("rootless") => {}
            other => return Err(anyhow!("containerd rootless: {other:?}")),
        }
    } else {
        ensure!(unavailable.is_empty(), "rootful unavailable limits: {unavailable:?}");
    }
    mgr.close().await?;
    Ok(())
}

pub(super) fn mode_name(rootless: bool) -> &'static str {
    if rootless { "rootless" } else { "rootful" }
}

/// Names: unique per storage, usable wherever an id is (open, delete),
/// freed by delete; a name shaped like an id, a bad name and a taken name
/// are typed refusals that create nothing; a name record left by a create
/// that died before its manifest is taken over.
pub(super) async fn vessels_have_unique_names(w: Arc<World>) -> Result<()> {
    let mgr = w.manager("names").await?;
    let name = format!("web-{}", std::process::id());
    let v = mgr.create_vessel_with(IMAGE, "/work", &VesselOptions::new().name(&name)).await?;
    ensure!(v.name().as_deref() == Some(name.as_str()));
    let id = v.id().to_string();
    v.close().await?;
    let before = mgr.list_vessels().await?.len();
    for (bad, kind) in [
        (name.as_str(), VesselErrorKind::Conflict),
        ("0123456789abcdef", VesselErrorKind::InvalidInput),
        ("../escape", VesselErrorKind::InvalidInput),
        ("", VesselErrorKind::InvalidInput),
    ] {
        match mgr.create_vessel_with(IMAGE, "/work", &VesselOptions::new().name(bad)).await {
            Err(e) if e.kind() == kind => {}
            other => return Err(anyhow!("name {bad:?}: {other:?}")),
        }
    }
    ensure!(mgr.list_vessels().await?.len() == before, "a refused name created a vessel");
    let v = mgr.open_vessel(&name).await?;
    ensure!(v.id().as_str() == id, "open by name");
    v.close().await?;
    match mgr.open_vessel("no-such-name").await {
        Err(e @ vessel::VesselError::NameNotFound(_)) => ensure!(e.kind() == VesselErrorKind::NotFound),
        other => return Err(anyhow!("an unknown name: {other:?}")),
    }
    mgr.delete_vessel(&name).await?;
    match mgr.open_vessel(&name).await {
        Err(e) if e.kind() == VesselErrorKind::NotFound => {}
        other => return Err(anyhow!("a deleted vessel's name: {other:?}")),
    }
    // Freed: a new vessel takes it.
    let v = mgr.create_vessel_with(IMAGE, "/work", &VesselOptions::new().name(&name)).await?;
    let second = v.id().to_string();
    v.close().await?;
    ensure!(second != id);
    // A record left by a create that died (no manifest, no live claim).
    let storage = w.storage();
    let stale = vessel::VesselName::new(&format!("stale-{}", std::process::id()))?;
    let dead = serde_json::to_vec(&serde_json::json!({ "id": "00000000deadbeef" }))?;
    storage.save_record(&vessel::RecordKey::Name(stale.clone()), dead, &vessel::WriteIf::Absent).await?;
    let v = mgr.create_vessel_with(IMAGE, "/work", &VesselOptions::new().name(stale.as_str())).await?;
    let taken = v.id().to_string();
    v.close().await?;
    ensure!(mgr.open_vessel(stale.as_str()).await?.id().as_str() == taken);
    for n in [name.as_str(), stale.as_str()] {
        mgr.delete_vessel(n).await?;
        ensure!(storage.load_record(&vessel::RecordKey::Name(vessel::VesselName::new(n)?)).await?.is_none());
    }
    mgr.close().await?;
    Ok(())
}

/// With the default limits, 100 open vessels, ten of them spinning (each on
/// as many threads as the host has cores), leave the host responsive: a
/// host thread's 10 ms sleeps overshoot by little.
pub(super) async fn a_hundred_vessels_keep_the_host_responsive(w: Arc<World>) -> Result<()> {
    let mgr = Arc::new(w.manager("hundred").await?);
    let mut vessels = Vec::new();
    for _ in 0..100 {
        vessels.push(mgr.create_vessel(IMAGE, "/work").await?);
    }
    let probe = LatencyProbe::start();
    let spin = "for i in 1 2 3 4; do (while :; do :; done) & done; wait";
    let runs = vessels.iter().take(10).map(|v| run_with(v, spin, 3, Limits::default()));
    let results = futures::future::join_all(runs).await;
    let worst = probe.stop();
    for r in results {
        ensure!(r?.0.timed_out, "a spinner ended by itself");
    }
    println!("{:?}: 100 vessels, 10 spinning: host sleep overshoot at worst {worst:?}", w.backend);
    ensure!(worst < Duration::from_millis(500), "the host stalled {worst:?}");
    for v in vessels {
        v.close().await?;
    }
    mgr.close().await?;
    Ok(())
}
