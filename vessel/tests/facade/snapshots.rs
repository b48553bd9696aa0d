//! Snapshots: operations, chains and branches, a corrupt layer refused, a crash
//! in the middle of one, deep chains flattened.

use super::*;

pub(super) async fn snapshot_operations(w: Arc<World>) -> Result<()> {
    let mgr = w.manager("snaps").await?;
    let v = mgr.create_vessel(IMAGE, "/work").await?;
    v.write_file("f", b"1", 0o644)?;
    let s1 = v.create_snapshot("one").await?;
    v.write_file("f", b"2", 0o644)?;
    let s2 = v.create_snapshot("two").await?;
    ensure!(s2.parent_id == Some(s1.id.clone()));
    let list: Vec<SnapshotId> = v.list_snapshots().into_iter().map(|s| s.id).collect();
    ensure!(list == [s1.id.clone(), s2.id.clone()]);
    v.write_file("f", b"uncommitted", 0o644)?;
    v.restore_snapshot(&s1.id).await?;
    ensure!(v.read_file("f")? == b"1");
    v.restore_snapshot(&s2.id).await?;
    ensure!(v.read_file("f")? == b"2");
    for (id, why) in [(&s2.id, "current"), (&s1.id, "parent")] {
        match v.delete_snapshot(id).await {
            Err(e) if e.kind() == VesselErrorKind::Conflict => {}
            other => return Err(anyhow!("deleting the {why} snapshot: {other:?}")),
        }
    }
    v.restore_snapshot(&s1.id).await?;
    v.delete_snapshot(&s2.id).await?;
    ensure!(v.list_snapshots().len() == 1);
    match v.restore_snapshot(&s2.id).await {
        Err(e) if e.kind() == VesselErrorKind::NotFound => {}
        other => return Err(anyhow!("restoring a deleted snapshot: {other:?}")),
    }
    ensure!(v.read_file("f")? == b"1", "a refused restore changed nothing");
    mgr.close().await?;
    Ok(())
}

pub(super) async fn snapshot_chains_and_branches(w: Arc<World>) -> Result<()> {
    let mgr = w.manager("chains").await?;
    let v = mgr.create_vessel(IMAGE, "/work").await?;
    let mut ids = Vec::new();
    for i in 0..12 {
        v.write_file(&format!("gen{i}"), format!("{i}").as_bytes(), 0o644)?;
        if i > 0 {
            v.delete_file(&format!("gen{}", i - 1))?;
        }
        ids.push(v.create_snapshot(&format!("gen {i}")).await?.id);
    }
    let names: Vec<String> = v.read_dir(".")?.into_iter().map(|e| e.name).collect();
    ensure!(names == ["gen11"], "{names:?}");
    // Branch from gen 3.
    v.restore_snapshot(&ids[3]).await?;
    let (code, ..) = run(&v, "rm -rf /usr; echo branch > b", true).await?;
    ensure!(code == 0);
    let b = v.create_snapshot("branch").await?;
    ensure!(b.parent_id == Some(ids[3].clone()));
    ensure!(v.stat("/usr").is_err() && v.read_file("b")? == b"branch\n" && v.read_file("gen3")? == b"3");
    v.restore_snapshot(&ids[11]).await?;
    ensure!(v.stat("/usr/bin").is_ok() && v.stat("b").is_err());
    let children = v.list_snapshots().iter().filter(|s| s.parent_id.as_ref() == Some(&ids[3])).count();
    ensure!(children == 2, "gen 3 has {children} children");
    mgr.close().await?;
    Ok(())
}

/// Everything about a tree that a snapshot must keep.
pub(super) fn scan(root: &Path) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    let mut inodes: BTreeMap<u64, String> = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir)? {
            let p = e?.path();
            let rel = p.strip_prefix(root)?.display().to_string();
            let m = std::fs::symlink_metadata(&p)?;
            let mut xattrs: Vec<String> = xattr::list(&p)
                .map(|l| {
                    l.map(|n| format!("{}={:?}", n.to_string_lossy(), xattr::get(&p, &n).ok().flatten())).collect()
                })
                .unwrap_or_default();
            xattrs.sort();
            let body = if m.file_type().is_symlink() {
                format!("-> {}", std::fs::read_link(&p)?.display())
            } else if m.is_file() {
                let data = std::fs::read(&p)?;
                format!("{} bytes, sum {}", data.len(), data.iter().map(|&b| b as u64).sum::<u64>())
            } else {
                String::new()
            };
            let link = if m.is_file() && m.nlink() > 1 {
                let first = inodes.entry(m.ino()).or_insert_with(|| rel.clone());
                format!(" link-group {first}")
            } else {
                String::new()
            };
            let mtime = if m.is_dir() { 0 } else { m.mtime() * 1_000_000_000 + m.mtime_nsec() };
            out.insert(rel, format!("{:o} {}:{} mtime {mtime} {body} {xattrs:?}{link}", m.mode(), m.uid(), m.gid()));
            if m.is_dir() {
                stack.push(p);
            }
        }
    }
    Ok(out)
}

pub(super) async fn corrupt_snapshot_is_refused(w: Arc<World>) -> Result<()> {
    let mgr = w.manager("corrupt").await?;
    let v = mgr.create_vessel(IMAGE, "/work").await?;
    v.write_file("f", b"payload", 0o644)?;
    let snap = v.create_snapshot("s").await?;
    let id = v.id().clone();
    v.close().await?;
    // Replace the stored blob with a well-formed layer of other content.
    let storage = w.storage();
    let mut tampered = Vec::new();
    {
        let mut t = tar::Builder::new(&mut tampered);
        let mut h = tar::Header::new_gnu();
        h.set_size(7);
        h.set_mode(0o644);
        h.set_cksum();
        t.append_data(&mut h, "work/f", &b"hacked!"[..])?;
        t.finish()?;
    }
    storage.save_snapshot(&id, &snap.id, Box::new(std::io::Cursor::new(tampered))).await?;
    let host = w.manager("corrupt-new-host").await?;
    match host.open_vessel(id.as_str()).await {
        Err(e) if e.kind() == VesselErrorKind::Corrupt => {}
        other => return Err(anyhow!("opening with a tampered snapshot: {other:?}")),
    }
    host.close().await?;
    mgr.close().await?;
    Ok(())
}

/// The child of the crash test: opens the vessel, changes a lot, snapshots; killed meanwhile.
pub(super) fn crash_child() -> ! {
    let (w, id) = World::from_child_env();
    TOKIO.block_on(async {
        let mgr = w.manager("crash").await.unwrap();
        let v = mgr.open_vessel(&id).await.unwrap();
        let (code, ..) = run(&v, "head -c 300000000 /dev/urandom > big; echo changed > f", true).await.unwrap();
        assert_eq!(code, 0);
        println!("snapshotting");
        let _ = v.create_snapshot("never committed").await;
        println!("committed");
    });
    std::process::exit(0)
}

pub(super) async fn crash_in_the_middle_of_a_snapshot(w: Arc<World>) -> Result<()> {
    let mgr = w.manager("crash").await?;
    let v = mgr.create_vessel(IMAGE, "/work").await?;
    v.write_file("f", b"committed\n", 0o644)?;
    let good = v.create_snapshot("good").await?;
    let id = v.id().to_string();
    v.close().await?;
    mgr.close().await?;
    drop(mgr);
    let mut child = w.child_command(CRASH_CHILD, &id)?.spawn()?;
    let mut stdout = child.stdout.take().context("child stdout")?;
    let mut seen = Vec::new();
    let mut buf = [0u8; 64];
    while !String::from_utf8_lossy(&seen).contains("snapshotting") {
        let n = tokio::time::timeout(Duration::from_secs(60), stdout.read(&mut buf)).await??;
        ensure!(n > 0, "the child ended early: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    // In the middle of streaming 300 MB into storage.
    tokio::time::sleep(Duration::from_millis(150)).await;
    child.start_kill()?;
    child.wait().await?;
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).await?;
    ensure!(!rest.contains("committed"), "the snapshot finished before the kill; the test proves nothing");
    // A new manager on the same host cleans up and opens the last committed state.
    let mgr = w.manager("crash").await?;
    let v = mgr.open_vessel(&id).await?;
    let m = v.manifest();
    ensure!(m.current_snapshot_id == Some(good.id.clone()) && m.snapshots.len() == 1, "{m:?}");
    ensure!(v.read_file("f")? == b"committed\n" && v.stat("big").is_err());
    // And keeps working.
    v.write_file("g", b"1", 0o644)?;
    v.create_snapshot("after the crash").await?;
    mgr.close().await?;
    Ok(())
}

/// An agent may snapshot after every step: a chain far deeper than an
/// overlay's lower limit still mounts, restores and reopens (flat layers are
/// made locally; storage keeps one diff per snapshot).
pub(super) async fn deep_chains_are_flattened(w: Arc<World>) -> Result<()> {
    let host = w.manager("deep").await?;
    let v = host.create_vessel(IMAGE, "/work").await?;
    let mut ids = Vec::new();
    for i in 0..300 {
        v.write_file(&format!("gen{i}"), format!("{i}\n").as_bytes(), 0o644)?;
        if i > 0 {
            v.delete_file(&format!("gen{}", i - 1))?;
        }
        ids.push(v.create_snapshot(&format!("gen {i}")).await?.id);
    }
    let names: Vec<String> = v.read_dir(".")?.into_iter().map(|e| e.name).collect();
    ensure!(names == ["gen299"], "{names:?}");
    let lowers = lower_count(&v.rootfs())?;
    ensure!(lowers < 2 * 32 + 1, "{lowers} lowers mounted for a 300-deep chain");
    let flats = std::fs::read_dir(w.base.join("deep/layers/layers"))?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("flat-"))
        .count();
    ensure!(flats == 9, "{flats} flat layers (one per 32 snapshots)");
    let (code, out, _) = run(&v, "cat gen299; ls /bin/sh", false).await?;
    ensure!(code == 0 && out == "299\n/bin/sh\n", "{code} {out:?}");
    // Restore deep inside, and branch there.
    v.restore_snapshot(&ids[100]).await?;
    ensure!(v.read_file("gen100")? == b"100\n" && v.stat("gen99").is_err() && v.stat("gen101").is_err());
    v.write_file("branch", b"b", 0o644)?;
    let b = v.create_snapshot("branch at 100").await?;
    let id = v.id().to_string();
    v.close().await?;
    // A new host rebuilds the flat layers from storage.
    let other = w.manager("deep-new-host").await?;
    let v = other.open_vessel(&id).await?;
    ensure!(v.manifest().current_snapshot_id == Some(b.id));
    let names: Vec<String> = v.read_dir(".")?.into_iter().map(|e| e.name).collect();
    ensure!(names == ["branch", "gen100"], "{names:?}");
    v.restore_snapshot(&ids[299]).await?;
    ensure!(v.read_file("gen299")? == b"299\n" && v.stat("branch").is_err());
    other.close().await?;
    host.close().await?;
    Ok(())
}

/// How many lower layers the overlay mounted at `rootfs` has.
pub(super) fn lower_count(rootfs: &Path) -> Result<usize> {
    support::overlay_lower_count(rootfs).context("the rootfs mount")
}
