//! Forks and changes: vessels from one snapshot that diverge, reopen
//! elsewhere and survive the deletion of their source; the blobs they
//! share collected only when nothing refers to them; live forks of a
//! vessel whose process keeps writing; `changes` checked against a direct
//! comparison of the two trees.

use std::collections::BTreeMap;

use vessel::{ChangeKind, ForkOrigin, ProcessStatus};

use super::*;

/// The snapshot blobs storage holds for each of `ids`.
async fn blobs(mgr: &Manager, ids: &[&vessel::VesselId]) -> Result<usize> {
    let mut n = 0;
    for id in ids {
        n += mgr.storage().list_snapshots(id).await?.len();
    }
    Ok(n)
}

/// Three forks of one snapshot edit one file differently; each reopens on
/// another host with its own content, the source is unchanged, nothing was
/// copied (each fork stores only its own snapshot), limits may only narrow.
pub(super) async fn forks_share_and_diverge(w: Arc<World>) -> Result<()> {
    let mgr = w.manager("forks-a").await?;
    let src = mgr.create_vessel(IMAGE, "/work").await?;
    src.write_file("f", b"base", 0o644)?;
    let at = src.create_snapshot("base").await?;
    src.write_file("f", b"after the fork point", 0o644)?;
    src.create_snapshot("later").await?;
    let mut forks = Vec::new();
    for i in 0..3 {
        let f = mgr.fork_vessel(src.id().as_str(), &at.id, &VesselOptions::new()).await?;
        ensure!(f.read_file("f")? == b"base", "fork {i} starts at the snapshot");
        ensure!(
            ForkOrigin::of(&f.manifest())
                == Some(ForkOrigin { vessel_id: src.id().clone(), snapshot_id: at.id.clone() })
        );
        f.write_file("f", format!("fork {i}").as_bytes(), 0o644)?;
        ensure!(run(&f, "cat f", true).await?.1 == format!("fork {i}"));
        f.create_snapshot("mine").await?;
        forks.push(f);
    }
    let ids: Vec<_> = forks.iter().map(|f| f.id().clone()).collect();
    ensure!(blobs(&mgr, &ids.iter().collect::<Vec<_>>()).await? == 3, "each fork stored only its own snapshot");
    // Limits only narrow: a wider one is refused and nothing is made.
    let before = mgr.list_vessels().await?.len();
    let wider = VesselOptions::new().memory_bytes(i64::MAX / 2);
    let refused = mgr.fork_vessel(src.id().as_str(), &at.id, &wider).await;
    ensure!(refused.as_ref().err().map(|e| e.kind()) == Some(VesselErrorKind::InvalidInput), "{refused:?}");
    ensure!(mgr.list_vessels().await?.len() == before);
    let narrow = mgr.fork_vessel(src.id().as_str(), &at.id, &VesselOptions::new().pids(32)).await?;
    let narrow_id = narrow.id().clone();
    narrow.close().await?;
    for f in &forks {
        f.close().await?;
    }
    src.close().await?;
    mgr.close().await?;

    let other = w.manager("forks-b").await?;
    for (i, id) in ids.iter().enumerate() {
        let f = other.open_vessel(id.as_str()).await?;
        ensure!(f.read_file("f")? == format!("fork {i}").as_bytes(), "fork {i} reopens with its content");
        f.close().await?;
    }
    let s = other.open_vessel(src.id().as_str()).await?;
    ensure!(s.read_file("f")? == b"after the fork point", "the source is unchanged");
    s.close().await?;
    let listed = other.list_vessels().await?;
    // (Other cases fork in this storage too: only this source's count.)
    let of_src = listed.iter().filter(|m| ForkOrigin::of(m).is_some_and(|o| &o.vessel_id == src.id())).count();
    ensure!(of_src == 4, "list_vessels shows the 4 forks of the source, not {of_src}");
    for id in ids.iter().chain([&narrow_id]) {
        other.delete_vessel(id.as_str()).await?;
    }
    other.delete_vessel(src.id().as_str()).await?;
    other.close().await?;
    Ok(())
}

/// Deleting the source and the snapshot a fork came from breaks nothing:
/// the fork reopens elsewhere with exact content; gc keeps what it uses;
/// once the fork is deleted too, gc leaves nothing of either.
pub(super) async fn deleting_a_source_never_breaks_a_fork(w: Arc<World>) -> Result<()> {
    let config = |host| w.config(host).gc_grace(Duration::ZERO);
    let mgr = Manager::new(config("gc-a")).await?;
    let src = mgr.create_vessel(IMAGE, "/work").await?;
    run(&src, "head -c 100000 /dev/urandom > data; mkdir -p d; echo x > d/x", true).await?;
    let first = src.create_snapshot("one").await?;
    run(&src, "echo more >> data", true).await?;
    let second = src.create_snapshot("two").await?;
    let sum = run(&src, "md5sum data d/x", true).await?.1;
    let fork = mgr.fork_vessel(src.id().as_str(), &second.id, &VesselOptions::new()).await?;
    let (src_id, fork_id) = (src.id().clone(), fork.id().clone());
    fork.close().await?;
    // The source goes back to its first snapshot and deletes the second,
    // the one the fork stands on: its blob must stay.
    src.restore_snapshot(&first.id).await?;
    src.delete_snapshot(&second.id).await?;
    ensure!(mgr.storage().list_snapshots(&src_id).await?.iter().any(|s| s.id == second.id), "a fork still uses it");
    src.close().await?;
    mgr.delete_vessel(src_id.as_str()).await?;
    let report = mgr.gc().await?;
    ensure!(blobs(&mgr, &[&src_id]).await? >= 2, "gc kept the blobs the fork refers to ({report:?})");
    mgr.close().await?;

    let other = Manager::new(config("gc-b")).await?;
    let f = other.open_vessel(fork_id.as_str()).await?;
    ensure!(run(&f, "md5sum data d/x", true).await?.1 == sum, "the fork has exact content");
    f.close().await?;
    other.delete_vessel(fork_id.as_str()).await?;
    other.gc().await?;
    ensure!(blobs(&other, &[&src_id, &fork_id]).await? == 0, "nothing of either is left");
    let owners = other.storage().list_snapshot_owners().await?;
    ensure!(!owners.contains(&src_id) && !owners.contains(&fork_id), "{owners:?}");
    ensure!(other.storage().list_forks(&src_id).await?.is_empty(), "no fork record is left");
    other.close().await?;
    Ok(())
}

/// Two hosts on one storage: A deletes a source and collects while B
/// forks it again and again; every fork that reported success opens with
/// its content, and once all are deleted nothing unreferenced remains.
pub(super) async fn a_deletion_racing_forks_loses_no_fork(w: Arc<World>) -> Result<()> {
    let config = |host| w.config(host).gc_grace(Duration::ZERO);
    let (a, b) = (Arc::new(Manager::new(config("race-a")).await?), Arc::new(Manager::new(config("race-b")).await?));
    let src = a.create_vessel(IMAGE, "/work").await?;
    src.write_file("f", b"shared", 0o644)?;
    let at = src.create_snapshot("shared").await?;
    let src_id = src.id().clone();
    src.close().await?;
    // B forks again and again; A deletes once B has made five.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let forker = {
        let (b, src_id, at) = (b.clone(), src_id.clone(), at.id.clone());
        tokio::spawn(async move {
            let mut made = Vec::new();
            let mut raced = 0;
            for _ in 0..20 {
                match b.fork_vessel(src_id.as_str(), &at, &VesselOptions::new()).await {
                    Ok(v) => {
                        made.push(v.id().clone());
                        v.close().await?;
                        let _ = tx.send(());
                    }
                    Err(e) if e.kind() == VesselErrorKind::Conflict || e.kind() == VesselErrorKind::NotFound => {
                        raced += 1
                    }
                    Err(e) => return Err(anyhow!(e)),
                }
            }
            Ok::<_, anyhow::Error>((made, raced))
        })
    };
    for _ in 0..5 {
        rx.recv().await.context("the forker ended early")?;
    }
    a.delete_vessel(src_id.as_str()).await?;
    a.gc().await?;
    let (made, raced) = forker.await??;
    println!("{}: {} forks made, {raced} refused while the source was deleted", w.label(), made.len());
    for id in &made {
        let v = a.open_vessel(id.as_str()).await?;
        ensure!(v.read_file("f")? == b"shared", "fork {id} lost its content");
        v.close().await?;
        a.delete_vessel(id.as_str()).await?;
    }
    a.gc().await?;
    let mut left = blobs(&a, &[&src_id]).await?;
    for id in &made {
        left += blobs(&a, &[id]).await?;
    }
    ensure!(left == 0, "{left} blobs left after every vessel was deleted");
    a.close().await?;
    b.close().await?;
    Ok(())
}

/// A live fork of a vessel whose process appends numbered lines: each
/// child's file is a consistent prefix, children run no process, the
/// source's process runs on, and what a child writes stays its own.
pub(super) async fn live_forks_are_points_in_time(w: Arc<World>) -> Result<()> {
    let mgr = w.manager("live-fork").await?;
    let v = mgr.create_vessel(IMAGE, "/work").await?;
    let writer = v
        .spawn(ExecOptions {
            command: sh("i=0; while true; do i=$((i+1)); echo $i >> log; echo $i > last; sleep 0.01; done"),
            persist_result: true,
            ..Default::default()
        })
        .await?;
    // Fork once the writer has written a few lines (a loaded machine may
    // take a while to start it).
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while v.read_file("log").map(|l| l.iter().filter(|b| **b == b'\n').count()).unwrap_or(0) < 3 {
        ensure!(std::time::Instant::now() < deadline, "the writer never wrote");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let children = v.fork(3, &VesselOptions::new()).await?;
    ensure!(children.len() == 3);
    for c in &children {
        let log = String::from_utf8(c.read_file("log")?)?;
        let lines: Vec<u64> = log.lines().map(str::parse).collect::<std::result::Result<_, _>>()?;
        ensure!(lines.iter().enumerate().all(|(i, n)| *n == i as u64 + 1), "a torn log: {log:?}");
        // `last` is written after `log`, so it is never ahead of it; `>`
        // truncates before it writes, so the fork may catch it empty.
        let last = String::from_utf8(c.read_file("last")?)?;
        let newest = *lines.last().unwrap_or(&0);
        if !last.is_empty() {
            let last: u64 = last.trim().parse()?;
            ensure!(last <= newest && last + 1 >= newest, "last {last} against log's {newest}");
        }
        ensure!(c.processes().is_empty(), "processes are not copied");
        c.write_file("mine", c.id().as_str().as_bytes(), 0o644)?;
    }
    ensure!(writer.info().status == ProcessStatus::Running, "the source's process runs on");
    ensure!(v.stat("mine").is_err(), "a child's write is its own");
    let grown = String::from_utf8(v.read_file("log")?)?.lines().count();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while String::from_utf8(v.read_file("log")?)?.lines().count() <= grown {
        ensure!(std::time::Instant::now() < deadline, "the source stopped writing");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let refused = v.fork(0, &VesselOptions::new()).await;
    ensure!(refused.err().map(|e| e.kind()) == Some(VesselErrorKind::InvalidInput));
    for c in children {
        c.close().await?;
    }
    mgr.close().await?;
    Ok(())
}

/// A tree's entries for comparison: type, mode, owner (relative to the
/// vessel's id base), content (files, links), xattrs.
fn tree(root: &Path, base: u32) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for e in std::fs::read_dir(root.join(&rel))? {
            let e = e?;
            let path = rel.join(e.file_name());
            // The runtime's own (bind-mounted) files are not the vessel's.
            if ["dev", "proc", "sys", "etc/hosts", "etc/hostname", "etc/resolv.conf"]
                .iter()
                .any(|p| path == Path::new(p))
            {
                continue;
            }
            let full = root.join(&path);
            let m = std::fs::symlink_metadata(&full)?;
            let content = if m.is_file() {
                format!(
                    "{:x}",
                    sha2::Digest::finalize(<sha2::Sha256 as sha2::Digest>::new_with_prefix(std::fs::read(&full)?))
                )
            } else if m.is_symlink() {
                std::fs::read_link(&full)?.display().to_string()
            } else {
                String::new()
            };
            let mut x: Vec<String> = xattr::list(&full)?.map(|n| n.to_string_lossy().into_owned()).collect();
            x.sort();
            let t = format!("{:?}", m.file_type());
            let desc = format!(
                "{t} {:o} {}:{} {content} {x:?}",
                m.mode() & 0o7777,
                m.uid().wrapping_sub(base),
                m.gid().wrapping_sub(base)
            );
            if m.is_dir() {
                stack.push(path.clone());
            }
            out.insert(format!("/{}", path.display()), desc);
        }
    }
    Ok(out)
}

/// `changes` says exactly what a direct comparison of the two trees finds:
/// adds, content-, mode- and owner-only modifies, deletes, dir to file and
/// file to dir, an opaque dir, a hardlink and a symlink; between two
/// snapshots too.
pub(super) async fn changes_match_a_walk(w: Arc<World>) -> Result<()> {
    let mgr = w.manager("changes").await?;
    let v = mgr.create_vessel(IMAGE, "/").await?;
    let setup = "mkdir -p /t/dir/sub /t/opq/a /t/tofile; echo c > /t/content; echo m > /t/mode; echo o > /t/owner; \
                 echo x > /t/dir/sub/x; echo g > /t/gone; echo t > /t/todir; echo 1 > /t/tofile/in; \
                 echo 1 > /t/opq/a/old; echo l > /t/linked";
    run(&v, setup, true).await?;
    let before = v.create_snapshot("before").await?;
    let change = "echo C > /t/content; chmod 600 /t/mode; chown 1:1 /t/owner; rm -r /t/dir; rm /t/gone; \
                  rm -r /t/tofile; echo now-a-file > /t/tofile; rm /t/todir; mkdir /t/todir; echo in > /t/todir/new; rm -rf /t/opq; mkdir /t/opq; echo n > /t/opq/new; \
                  ln /t/linked /t/hard; ln -s /t/content /t/sym; mkdir -p /t/added/deep; echo a > /t/added/deep/a";
    run(&v, change, true).await?;
    let found = v.changes(None).await?;
    let base = |v: &vessel::Vessel| v.id_mapping().map_or(0, |m| m.host_id);
    let at_before = mgr.fork_vessel(v.id().as_str(), &before.id, &VesselOptions::new()).await?;
    let (old, new) = (tree(&at_before.rootfs(), base(&at_before))?, tree(&v.rootfs(), base(&v))?);
    let mut expected: BTreeMap<String, ChangeKind> = BTreeMap::new();
    for (p, d) in &new {
        match old.get(p) {
            None => expected.insert(p.clone(), ChangeKind::Added),
            Some(o) if o != d => expected.insert(p.clone(), ChangeKind::Modified),
            _ => None,
        };
    }
    for p in old.keys().filter(|p| !new.contains_key(*p)) {
        expected.insert(p.clone(), ChangeKind::Deleted);
    }
    // A directory's own change (its mtime) is not one: only those whose
    // listed attributes differ count, as in the walk above; a directory
    // made opaque is reported as such, which a walk cannot see.
    let only_opaque = |m: vessel::Modified| m == vessel::Modified { opaque: true, ..Default::default() };
    let got: BTreeMap<String, ChangeKind> = found
        .iter()
        .filter(|c| !only_opaque(c.modified))
        .map(|c| (c.path.display().to_string(), c.kind))
        .filter(|(p, _)| p.starts_with("/t/"))
        .collect();
    let expected: BTreeMap<String, ChangeKind> = expected.into_iter().filter(|(p, _)| p.starts_with("/t/")).collect();
    ensure!(got == expected, "changes {got:#?}\nthe walk {expected:#?}");
    ensure!(got.len() >= 15, "the case covers every kind of change: {got:#?}");
    let what = |p: &str| found.iter().find(|c| c.path == Path::new(p)).map(|c| c.modified);
    ensure!(what("/t/content").is_some_and(|m| m.content && !m.mode && !m.owner));
    ensure!(what("/t/mode").is_some_and(|m| m.mode && !m.content && !m.owner));
    ensure!(what("/t/owner").is_some_and(|m| m.owner && !m.content && !m.mode));
    ensure!(what("/t/tofile").is_some_and(|m| m.kind));
    ensure!(what("/t/opq").is_some_and(|m| m.opaque), "{:?}", what("/t/opq"));
    // Between two snapshots: the same.
    let after = v.create_snapshot("after").await?;
    let between = v.changes_between(&before.id, &after.id).await?;
    ensure!(between == found, "between snapshots differs from since");
    ensure!(v.changes(None).await?.is_empty(), "nothing changed since the last snapshot");
    let missing = v.changes(Some(&SnapshotId::from_u64(7))).await;
    ensure!(missing.err().map(|e| e.kind()) == Some(VesselErrorKind::NotFound));
    at_before.close().await?;
    mgr.close().await?;
    Ok(())
}
