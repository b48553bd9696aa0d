//! The fault campaign (`cargo xtask soak`; 12 cycles in `cargo xtask
//! test`): one vessel on S3 moving between agent processes that write,
//! run throwaway and background commands, snapshot, restore, delete
//! snapshots and fork, while faults are injected, the model checked after
//! each (see `soak`).

use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use vessel_test_support as support;

use super::{Host, Proxy, TOKIO, TREE, TTL_MS, World};

/// A seeded xorshift generator: a campaign's choices from its seed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// What the campaign knows: every snapshot reported committed and the tree
/// it was taken of; the snapshot in flight when its host died, which may
/// or may not have committed, and its tree.
#[derive(Default)]
struct Model {
    committed: std::collections::BTreeMap<String, String>,
    in_flight: Option<String>,
    /// The last takeover restores every committed snapshot.
    verify_all: bool,
}

/// How many committed snapshots a takeover restores (besides one in flight).
const VERIFY_EACH: usize = 16;

/// Faults injected, by kind, and what was verified.
#[derive(Default, Debug)]
struct Figures {
    cycles: u64,
    snapshots: u64,
    restores: u64,
    throwaway_execs: u64,
    snapshots_deleted: u64,
    /// Deletions refused (the snapshot is current or a parent).
    deletes_refused: u64,
    live_forks: u64,
    background_started: u64,
    kill_runner: u64,
    kill_mid_exec: u64,
    kill_mid_snapshot: u64,
    /// On local storage, in place of the relay's cut.
    kill_mid_large_snapshot: u64,
    kill_idle: u64,
    kill_tree: u64,
    kill_mid_open: u64,
    cut_mid_upload: u64,
    disk_full: u64,
    /// A vessel writing past its own disk quota (where hosts have one).
    quota_full: u64,
    /// Of those, how many refused the write, the tree listing or the snapshot.
    disk_full_refusals: u64,
    paused_past_ttl: u64,
    in_flight_committed: u64,
    in_flight_lost: u64,
    takeovers: u64,
    /// Restores of a committed snapshot checked against the model.
    verified: u64,
    /// Unfinished uploads and dead hosts' heartbeats the gc of a takeover
    /// or restart removed (each checked gone afterwards).
    uploads_aborted: u64,
    heartbeats_removed: u64,
}

/// The fault campaign: one vessel on S3 (through a relay that can cut
/// connections), one host at a time; each cycle a random operation
/// (write, throwaway exec, snapshot, restore, delete a snapshot, live
/// forks, a background process) or fault (kill -9 of the host
/// mid-snapshot, idle, mid-exec or mid-open, of its process tree, or of
/// the sandbox's runner alone; the relay cut mid-upload; the disk filled;
/// the host paused past its lease TTL while another takes over). After
/// every fault a new host takes the vessel over and checks the model:
/// every snapshot reported committed is stored and restores to exactly
/// its tree (a rotating share of them at each takeover, all at the end), a
/// snapshot in flight at the kill either restores to its tree or does not
/// exist, storage holds no snapshot object beyond those, no upload journal
/// and no pending upload once gc ran, and the stale host cannot commit;
/// the dead host, restarted, leaves nothing behind. `VESSEL_SOAK_CYCLES` (default
/// 12) and `VESSEL_SOAK_SEED` (default random, printed) drive it.
pub(super) fn soak(w: &World) -> Result<()> {
    // The hosts' disk: a small filesystem of its own, so a fault can fill it.
    let disk_mb: u64 = std::env::var("VESSEL_SOAK_DISK_MB").ok().and_then(|c| c.parse().ok()).unwrap_or(768);
    use nix::mount::{MntFlags, MsFlags, mount, umount2};
    mount(Some("tmpfs"), &w.base, Some("tmpfs"), MsFlags::empty(), Some(format!("size={disk_mb}m").as_str()))?;
    let result = run(w);
    umount2(&w.base, MntFlags::MNT_DETACH)?;
    result
}

/// Each host's disk quota in `soak_local_quota`.
const QUOTA: u64 = 16 << 20;

/// The same campaign with what `soak` does not cut: storage is a local
/// directory all hosts share (`LocalStorage`: its temp-file sequence and
/// flock-ed conditional writes), on a small btrfs filesystem with quotas
/// that also holds the hosts' mount roots, and every host enforces a disk
/// quota (each upper dir a subvolume with its qgroup limit, moved into the
/// layer cache at a snapshot). A kill mid-snapshot cuts the blob's temp
/// file, its rename, the manifest's, or the subvolume move; the disk
/// filled from outside fails storage writes too; a vessel filling its own
/// quota is refused by it. Instead of the S3 relay's cut, a large
/// snapshot is killed part way.
pub(super) fn soak_local_quota(w: &World) -> Result<()> {
    use std::process::Command;
    let run_cmd = |cmd: &mut Command| -> Result<()> {
        let out = cmd.output()?;
        ensure!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
        Ok(())
    };
    let disk_mb: u64 = std::env::var("VESSEL_SOAK_DISK_MB").ok().and_then(|c| c.parse().ok()).unwrap_or(1024);
    let image = std::path::PathBuf::from(format!("/var/tmp/vessel-soak-{:016x}.img", rand::random::<u64>()));
    std::fs::File::create(&image)?.set_len(disk_mb << 20)?;
    let made = run_cmd(Command::new("mkfs.btrfs").arg("-q").arg(&image))
        .and_then(|()| run_cmd(Command::new("mount").args(["-o", "loop,discard"]).arg(&image).arg(&w.base)));
    if let Err(e) = made {
        std::fs::remove_file(&image)?;
        return Err(e);
    }
    let result = run_cmd(Command::new("btrfs").args(["quota", "enable"]).arg(&w.base))
        .and_then(|()| World::new(&w.base.join("storage").to_string_lossy(), &w.base, &w.image_dir, "soak"))
        .and_then(|mut local| {
            local.quota = Some(QUOTA);
            run(&local)
        })
        .and_then(|()| {
            // Every removed vessel subvolume is gone with its qgroup
            // (deleted once the subvolume is dropped), none left stale.
            run_cmd(Command::new("btrfs").args(["subvolume", "sync"]).arg(&w.base))?;
            let out = Command::new("btrfs").args(["qgroup", "show"]).arg(&w.base).output()?;
            ensure!(out.status.success(), "btrfs qgroup show: {}", String::from_utf8_lossy(&out.stderr));
            let out = String::from_utf8(out.stdout)?;
            let stale: Vec<&str> = out.lines().filter(|l| l.contains("<stale>")).collect();
            ensure!(stale.is_empty(), "stale qgroups left: {stale:?}");
            Ok(())
        });
    let unmounted = run_cmd(Command::new("umount").arg(&w.base));
    if unmounted.is_err() {
        nix::mount::umount2(&w.base, nix::mount::MntFlags::MNT_DETACH)?;
    }
    std::fs::remove_file(&image)?;
    result.and(unmounted)
}

/// One campaign on `w`, its figures printed, or its seed and log on failure.
fn run(w: &World) -> Result<()> {
    let cycles: u64 = std::env::var("VESSEL_SOAK_CYCLES").ok().and_then(|c| c.parse().ok()).unwrap_or(12);
    let seed: u64 =
        std::env::var("VESSEL_SOAK_SEED").ok().and_then(|c| c.parse().ok()).unwrap_or_else(rand::random::<u64>);
    println!("soak: seed {seed}, {cycles} cycles (VESSEL_SOAK_SEED={seed} replays the choices)");
    let mut log: Vec<String> = Vec::new();
    let started = std::time::Instant::now();
    let result = campaign(w, cycles, seed, &mut log);
    match &result {
        Ok(f) => {
            let per_min = f.cycles as f64 / started.elapsed().as_secs_f64() * 60.0;
            println!("soak: {f:?} in {:.1?} ({per_min:.0} cycles/min)", started.elapsed());
        }
        Err(_) => eprintln!("soak: seed {seed} failed after:\n  {}", log.join("\n  ")),
    }
    result.map(|_| ())
}

fn campaign(w: &World, cycles: u64, seed: u64, log: &mut Vec<String>) -> Result<Figures> {
    // On S3, through a relay that can cut connections.
    let proxy = match &w.storage {
        Some(_) => {
            let upstream = std::env::var("AWS_ENDPOINT_URL")?;
            Some(TOKIO.block_on(Proxy::start(upstream.trim_start_matches("http://")))?)
        }
        None => None,
    };
    let endpoint = proxy.as_ref().map(|p| format!("http://{}", p.addr));
    let endpoint = endpoint.as_deref();
    let mut rng = Rng(seed | 1);
    let (mut model, mut figures) = (Model::default(), Figures::default());
    let mut hosts = 0u32;
    let next_host = |hosts: &mut u32| -> Result<Host> {
        *hosts += 1;
        Host::start(w, &format!("soak-{hosts}"), endpoint)
    };
    // A dead host's manager, started again on its mount root, removes what
    // it left (mounts, containers); then nothing of it may remain.
    let restart = |n: u32, figures: &mut Figures, log: &mut Vec<String>| -> Result<()> {
        let name = format!("soak-{n}");
        let mut again = Host::start(w, &name, endpoint)?;
        // Its gc removes the heartbeat its killed run left.
        gc(&mut again, figures)?;
        again.quit()?;
        retire(w, &name)?;
        log.push(format!("{name} restarted: nothing left"));
        Ok(())
    };
    let mut host = next_host(&mut hosts)?;
    let id = host.ok("create")?;
    for cycle in 0..cycles {
        figures.cycles += 1;
        let op = rng.below(100);
        match op {
            0..=24 => {
                let n = rng.below(8);
                let script = match rng.below(4) {
                    0 => format!("head -c {} /dev/urandom > /work/f{n}", rng.below(300_000)),
                    1 => format!("rm -rf /work/f{n} /work/d{n}"),
                    2 => format!(
                        "mkdir -p /work/d{n}/e && echo {cycle} > /work/d{n}/e/x && chmod 70{} /work/d{n}",
                        rng.below(8)
                    ),
                    _ => format!("ln -sfn f{n} /work/l{n}"),
                };
                log.push(format!("{cycle}: sh {script}"));
                host.sh(&script)?;
            }
            25..=29 => {
                // A throwaway command changes nothing the model sees.
                let tree = host.sh(TREE)?;
                log.push(format!("{cycle}: throwaway exec"));
                let code = host.ok("throwaway rm -rf /work/* && echo gone > /work/f0 && mkdir /work/new")?;
                ensure!(code == "0", "the throwaway command exited {code}");
                same_tree(&host.sh(TREE)?, &tree, "a throwaway command changed the tree")?;
                figures.throwaway_execs += 1;
            }
            30..=49 => {
                let tree = host.sh(TREE)?;
                let sid = host.ok("snapshot")?;
                log.push(format!("{cycle}: snapshot {sid}"));
                model.committed.insert(sid, tree);
                figures.snapshots += 1;
            }
            50..=61 if !model.committed.is_empty() => {
                let i = rng.below(model.committed.len() as u64) as usize;
                let (sid, tree) =
                    model.committed.iter().nth(i).map(|(s, t)| (s.clone(), t.clone())).context("a snapshot")?;
                log.push(format!("{cycle}: restore {sid}"));
                host.ok(&format!("restore {sid}"))?;
                same_tree(&host.sh(TREE)?, &tree, &format!("restore {sid} gave another tree"))?;
                figures.restores += 1;
            }
            62..=65 if !model.committed.is_empty() => {
                // A snapshot deleted: gone from storage (takeovers check
                // nothing unreported is stored), unless it is the current
                // one or a parent, which is refused with a typed error.
                let i = rng.below(model.committed.len() as u64) as usize;
                let sid = model.committed.keys().nth(i).cloned().context("a snapshot")?;
                log.push(format!("{cycle}: delete snapshot {sid}"));
                match host.call(&format!("delete-snapshot {sid}"))? {
                    Ok(_) => {
                        model.committed.remove(&sid);
                        figures.snapshots_deleted += 1;
                    }
                    Err(e) => {
                        ensure!(e.starts_with("err InvalidInput") || e.starts_with("err Conflict"), "{e}");
                        figures.deletes_refused += 1;
                    }
                }
            }
            66..=68 => {
                // Live forks: each a copy of the tree at the fork, which is a
                // committed snapshot of the source; deleted again at once.
                let tree = host.sh(TREE)?;
                let n = 1 + rng.below(3);
                log.push(format!("{cycle}: fork-live {n}"));
                let reply = host.ok(&format!("fork-live {n}"))?;
                let mut parts = reply.split(' ');
                let sid = parts.next().context("the fork's snapshot")?.to_owned();
                use base64::Engine;
                let mut forks = 0;
                for child in parts {
                    let child = String::from_utf8(base64::engine::general_purpose::STANDARD.decode(child)?)?;
                    same_tree(&child, &tree, "a live fork holds another tree than its source")?;
                    forks += 1;
                }
                ensure!(forks == n, "{forks} forks made of {n}");
                same_tree(&host.sh(TREE)?, &tree, "forking changed the source")?;
                model.committed.insert(sid, tree);
                figures.live_forks += 1;
            }
            69..=71 => {
                // A live process in the background (writing outside /work,
                // so the model's trees hold); when one runs, kill -9 of the
                // sandbox's runner alone: the process ends, the vessel
                // carries on with a new sandbox and the same tree.
                if host.ok("running")? == "0" {
                    log.push(format!("{cycle}: spawn a background process"));
                    host.ok("spawn while :; do date >> /tmp/tick; sleep 0.05; done")?;
                    figures.background_started += 1;
                }
                if rng.below(2) == 0 {
                    let tree = host.sh(TREE)?;
                    let runners = runners_of(host.child.id())?;
                    log.push(format!("{cycle}: kill -9 of the sandbox's runner {runners:?}"));
                    ensure!(runners.len() == 1, "one runner runs the sandbox: {runners:?}");
                    nix::sys::signal::kill(nix::unistd::Pid::from_raw(runners[0]), nix::sys::signal::Signal::SIGKILL)?;
                    let deadline = std::time::Instant::now() + Duration::from_secs(20);
                    while host.ok("running")? != "0" {
                        ensure!(std::time::Instant::now() < deadline, "the process outlived its sandbox");
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    same_tree(&host.sh(TREE)?, &tree, "the tree changed after the runner died")?;
                    figures.kill_runner += 1;
                }
            }
            72..=79 => {
                // kill -9 while a snapshot is under way (its upload, its
                // manifest commit, or already done: the model allows each).
                let tree = host.sh(TREE)?;
                let delay = rng.below(60);
                log.push(format!("{cycle}: kill -9 {delay} ms into a snapshot"));
                host.kill_into("snapshot", delay)?;
                model.in_flight = Some(tree);
                figures.kill_mid_snapshot += 1;
                let dead = hosts;
                host = take_over(w, &id, &mut model, &mut figures, next_host(&mut hosts)?, log)?;
                restart(dead, &mut figures, log)?;
            }
            80..=84 => {
                let tree = rng.below(2) == 0;
                let mid_exec = rng.below(2) == 0;
                log.push(format!(
                    "{cycle}: kill -9 {}{}",
                    if mid_exec { "mid-exec" } else { "idle" },
                    if tree { ", the whole process tree" } else { "" }
                ));
                if mid_exec {
                    // A command under way: a throwaway one (its own runner
                    // and overlay) or one in the live sandbox.
                    let cmd = if rng.below(2) == 0 { "throwaway" } else { "sh" };
                    host.send(&format!("{cmd} head -c 100000 /dev/zero > /tmp/x; sleep 5"))?;
                    std::thread::sleep(Duration::from_millis(50 + rng.below(200)));
                    figures.kill_mid_exec += 1;
                }
                if tree {
                    host.kill_tree()?;
                    figures.kill_tree += 1;
                } else {
                    host.kill()?;
                    figures.kill_idle += u64::from(!mid_exec);
                }
                let dead = hosts;
                host = take_over(w, &id, &mut model, &mut figures, next_host(&mut hosts)?, log)?;
                restart(dead, &mut figures, log)?;
            }
            85..=88 => {
                // A host killed while it opens the vessel (fetching and
                // applying its layers into its cache, taking the lease).
                host.ok("close")?;
                host.quit()?;
                retire(w, &format!("soak-{hosts}"))?;
                let opener = next_host(&mut hosts)?;
                let delay = rng.below(80);
                log.push(format!("{cycle}: kill -9 {delay} ms into an open"));
                opener.kill_into(&format!("open {id}"), delay)?;
                figures.kill_mid_open += 1;
                let dead = hosts;
                host = take_over(w, &id, &mut model, &mut figures, next_host(&mut hosts)?, log)?;
                restart(dead, &mut figures, log)?;
            }
            89..=92 => {
                host.sh(&format!(
                    "rm -f /work/cut; head -c {} /dev/urandom > /work/cut",
                    2_000_000 + rng.below(4_000_000)
                ))?;
                let tree = host.sh(TREE)?;
                if let Some(proxy) = &proxy {
                    // The relay drops every connection part way into the upload.
                    let after = 1 + rng.below(3 << 20);
                    log.push(format!("{cycle}: relay cut {after} bytes into a snapshot"));
                    proxy.cut_after(proxy.sent() + after);
                    let reply = host.call("snapshot")?;
                    proxy.restore();
                    figures.cut_mid_upload += 1;
                    match reply {
                        Ok(sid) => {
                            log.push(format!("{cycle}: committed anyway as {sid}"));
                            model.committed.insert(sid, tree.clone());
                            figures.snapshots += 1;
                        }
                        Err(e) => ensure!(e.starts_with("err Io"), "a cut upload fails as Io: {e}"),
                    }
                    same_tree(&host.sh(TREE)?, &tree, "the live tree changed under a failed snapshot")?;
                } else {
                    // Local storage: kill -9 part way into a large snapshot
                    // (its temp file being written, renamed, the manifest's).
                    let delay = rng.below(250);
                    log.push(format!("{cycle}: kill -9 {delay} ms into a large snapshot"));
                    host.kill_into("snapshot", delay)?;
                    model.in_flight = Some(tree);
                    figures.kill_mid_large_snapshot += 1;
                    let dead = hosts;
                    host = take_over(w, &id, &mut model, &mut figures, next_host(&mut hosts)?, log)?;
                    restart(dead, &mut figures, log)?;
                }
            }
            93..=95 if w.quota.is_some() && rng.below(2) == 0 => {
                // The vessel fills its own disk quota: the write is refused
                // part way (EDQUOT); the tree with what was written
                // snapshots, and the vessel works again once it is removed.
                log.push(format!("{cycle}: the vessel writes past its quota, then a snapshot"));
                let reply = host.ok(&format!("sh head -c {} /dev/urandom > /work/fill", QUOTA + (1 << 20)))?;
                ensure!(!reply.starts_with("0 "), "a write past the quota succeeded");
                let tree = host.sh(TREE)?;
                let size = host.sh("stat -c %s /work/fill")?;
                ensure!(size.trim().parse::<u64>()? < QUOTA, "{size} bytes written past a quota of {QUOTA}");
                let sid = host.ok("snapshot")?;
                log.push(format!("{cycle}: committed as {sid}"));
                model.committed.insert(sid, tree);
                figures.snapshots += 1;
                host.sh("rm /work/fill")?;
                figures.quota_full += 1;
            }
            93..=95 => {
                // The hosts' disk filled (from outside, to a few KiB or
                // nothing free) under a write and a snapshot: each works or
                // fails with a typed error, and the vessel works again once
                // space is freed.
                let spare = rng.below(64) << 10;
                log.push(format!("{cycle}: the disk filled to {} KiB free, then a write and a snapshot", spare >> 10));
                let f = fill(&w.base, spare)?;
                let wrote = host.sh(&format!("head -c 32768 /dev/urandom > /work/small{}", rng.below(4))).is_ok();
                let listed = host.sh(TREE);
                figures.disk_full_refusals += u64::from(!wrote || listed.is_err());
                if let Ok(tree) = listed {
                    match host.call("snapshot")? {
                        Ok(sid) => {
                            log.push(format!("{cycle}: committed as {sid}"));
                            model.committed.insert(sid, tree);
                            figures.snapshots += 1;
                        }
                        Err(e) => {
                            ensure!(
                                e.starts_with("err QuotaExceeded"),
                                "a snapshot on a full disk is refused as such: {e}"
                            );
                            figures.disk_full_refusals += 1;
                        }
                    }
                }
                drop(f);
                std::fs::remove_file(w.base.join("filler"))?;
                host.sh("true")?;
                figures.disk_full += 1;
            }
            _ => {
                // Paused past the TTL: another host takes over; the stale
                // one, resumed, cannot commit.
                log.push(format!("{cycle}: SIGSTOP past the lease TTL"));
                host.signal(nix::sys::signal::Signal::SIGSTOP)?;
                std::thread::sleep(Duration::from_millis(TTL_MS + 300));
                let (mut stale, dead) = (host, hosts);
                host = take_over(w, &id, &mut model, &mut figures, next_host(&mut hosts)?, log)?;
                stale.signal(nix::sys::signal::Signal::SIGCONT)?;
                let e = stale.call("snapshot")?.expect_err("a host that lost its lease must not commit");
                ensure!(e.starts_with("err Conflict"), "{e}");
                stale.kill()?;
                restart(dead, &mut figures, log)?;
                figures.paused_past_ttl += 1;
            }
        }
    }
    // The end: one last takeover checks everything once more.
    host.ok("close")?;
    host.quit()?;
    model.verify_all = true;
    let last = take_over(w, &id, &mut model, &mut figures, next_host(&mut hosts)?, log)?;
    last.quit()?;
    storage_left(w, &id)?;
    Ok(figures)
}

/// A host that quit (or was restarted and quit) left nothing mounted and
/// nothing but its layer cache, which goes so as not to fill the small disk.
fn retire(w: &World, name: &str) -> Result<()> {
    let left = support::mounts_under(&w.base.join(name));
    ensure!(left.is_empty(), "{name} left mounted {left:?}");
    let left = leftovers(&w.base.join(name))?;
    ensure!(left.is_empty(), "{name} left {left:?}");
    std::fs::remove_dir_all(w.base.join(name))?;
    Ok(())
}

/// Once every host quit or was restarted: no heartbeat, one released claim
/// (the vessel's), no object of another vessel (every fork was deleted), no
/// fork record, deletion marker, upload journal or pending upload.
fn storage_left(w: &World, id: &str) -> Result<()> {
    let hosts = w.keys("leases/hosts")?;
    ensure!(hosts.is_empty(), "heartbeats left: {hosts:?}");
    let claims = w.keys("leases/vessels")?;
    ensure!(claims.len() == 1 && claims[0].ends_with(&format!("{id}.json")), "claims left: {claims:?}");
    let claim: serde_json::Value = serde_json::from_slice(&w.read(&claims[0])?)?;
    ensure!(claim.get("host").is_none_or(serde_json::Value::is_null), "the claim is still held: {claim}");
    let others: Vec<String> = w.keys("vessels")?.into_iter().filter(|k| !k.contains(id)).collect();
    ensure!(others.is_empty(), "objects of other vessels left: {others:?}");
    for rel in ["forks", "condemned", "uploads"] {
        let left = w.keys(rel)?;
        ensure!(left.is_empty(), "{rel} left: {left:?}");
    }
    if w.storage.is_some() {
        let pending = pending_uploads(&w.url)?;
        ensure!(pending.is_empty(), "multipart uploads pending: {pending:?}");
    } else {
        // Local storage: no temp file of an interrupted write is left.
        let tmp = w.keys(".tmp")?;
        ensure!(tmp.is_empty(), "temp files left in local storage: {tmp:?}");
    }
    Ok(())
}

/// A new host takes the vessel over (retrying until the dead or paused
/// one's lease expired) and checks the model; returns it, vessel open.
fn take_over(
    w: &World,
    id: &str,
    model: &mut Model,
    figures: &mut Figures,
    mut host: Host,
    log: &mut Vec<String>,
) -> Result<Host> {
    let deadline = std::time::Instant::now() + Duration::from_millis(TTL_MS * 4);
    loop {
        match host.call(&format!("open {id}"))? {
            Ok(_) => break,
            Err(e) if std::time::Instant::now() < deadline => {
                log.push(format!("open: {e}"));
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => anyhow::bail!("open after a fault: {e}"),
        }
    }
    log.push("takeover".into());
    // Crash leftovers (a blob stored before its manifest, an unfinished
    // upload, dead hosts' heartbeats) go with gc; then none may be left.
    gc(&mut host, figures)?;
    if w.storage.is_some() {
        let pending = pending_uploads(&w.url)?;
        ensure!(pending.is_empty(), "multipart uploads left pending after gc: {pending:?}");
    }
    let journals = w.keys("uploads")?;
    ensure!(journals.is_empty(), "upload journals left after gc: {journals:?}");
    let stored = w.snapshot_keys(id)?;
    let in_flight = model.in_flight.take();
    let before: Vec<String> =
        stored.iter().filter(|k| model.committed.keys().any(|sid| k.contains(sid.as_str()))).cloned().collect();
    for key in &stored {
        if model.committed.keys().any(|sid| key.contains(sid.as_str())) {
            continue;
        }
        // Not reported: only the snapshot in flight at a kill may be here, committed.
        let tree = in_flight.clone().with_context(|| format!("an object nobody committed: {key}"))?;
        let sid = key.rsplit('/').next().and_then(|f| f.split('.').next()).context("a snapshot key")?.to_owned();
        host.ok(&format!("restore {sid}")).with_context(|| format!("{key} is stored but not restorable"))?;
        same_tree(&host.sh(TREE)?, &tree, &format!("the in-flight snapshot {sid} holds another tree"))?;
        log.push(format!("the in-flight snapshot committed as {sid}"));
        model.committed.insert(sid, tree);
        figures.in_flight_committed += 1;
    }
    let committed_now = stored.iter().any(|k| !before.iter().any(|b| b == k));
    if in_flight.is_some() && !committed_now {
        figures.in_flight_lost += 1;
    }
    // Every committed snapshot must be stored; at most `VERIFY_EACH` are
    // restored per takeover (a rotating share, so each one is every few
    // takeovers and a long campaign's cost per cycle stays bounded), all
    // of them at the end.
    figures.takeovers += 1;
    let stride = if model.verify_all { 1 } else { model.committed.len().div_ceil(VERIFY_EACH).max(1) };
    for (i, (sid, tree)) in model.committed.iter().enumerate() {
        ensure!(stored.iter().any(|k| k.contains(sid.as_str())), "committed snapshot {sid} is gone from storage");
        if !(i + figures.takeovers as usize).is_multiple_of(stride) {
            continue;
        }
        host.ok(&format!("restore {sid}"))?;
        same_tree(&host.sh(TREE)?, tree, &format!("committed snapshot {sid} restores to another tree"))?;
        figures.verified += 1;
    }
    Ok(host)
}

/// Fails with `what` unless `got` is the tree `want`, naming the lines
/// that differ.
fn same_tree(got: &str, want: &str, what: &str) -> Result<()> {
    if got == want {
        return Ok(());
    }
    let only = |a: &str, b: &str| {
        a.lines().filter(|l| !b.lines().any(|m| m == *l)).take(20).collect::<Vec<_>>().join("\n    ")
    };
    bail!("{what}\n  expected only:\n    {}\n  found only:\n    {}", only(want, got), only(got, want))
}

/// Fills the filesystem of `dir` from outside (`dir/filler`) until at most
/// about `spare` bytes are free; the file is removed by the caller.
fn fill(dir: &std::path::Path, spare: u64) -> Result<std::fs::File> {
    let avail = || -> Result<u64> {
        let s = nix::sys::statvfs::statvfs(dir)?;
        Ok(s.blocks_available() as u64 * s.fragment_size() as u64)
    };
    let f = std::fs::File::create(dir.join("filler"))?;
    let mut len = 0u64;
    // btrfs's free figure is an estimate (metadata chunks): grow the file
    // in steps until what is left is small, backing off where it refuses.
    for _ in 0..64 {
        let want = avail()?.saturating_sub(spare);
        if want < (64 << 10) {
            break;
        }
        let mut step = want;
        while step >= (64 << 10) {
            match nix::fcntl::fallocate(&f, nix::fcntl::FallocateFlags::empty(), len as i64, step as i64) {
                Ok(()) => break,
                Err(nix::errno::Errno::ENOSPC) => step /= 2,
                Err(e) => return Err(e.into()),
            }
        }
        if step < (64 << 10) {
            break;
        }
        len += step;
    }
    let left = avail()?;
    ensure!(left <= spare + (1 << 20), "the disk kept {left} bytes free");
    Ok(f)
}

/// A host's gc, its figures added.
fn gc(host: &mut Host, figures: &mut Figures) -> Result<()> {
    let reply = host.ok("gc")?;
    let n: Vec<u64> = reply.split(' ').map(str::parse).collect::<std::result::Result<_, _>>()?;
    ensure!(n.len() == 3, "gc said {reply:?}");
    figures.uploads_aborted += n[1];
    figures.heartbeats_removed += n[2];
    Ok(())
}

/// The youki runners among `pid`'s children (their environment names the run).
fn runners_of(pid: u32) -> Result<Vec<i32>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc")? {
        let Ok(child) = e?.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else { continue };
        // `pid (comm) state ppid ...`: comm may hold anything but the last ')'.
        let ppid = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok());
        if ppid != Some(pid) {
            continue;
        }
        let env = std::fs::read(format!("/proc/{child}/environ")).unwrap_or_default();
        if env.split(|b| *b == 0).any(|v| v.starts_with(b"VESSEL_YOUKI_RUNNER=")) {
            out.push(child);
        }
    }
    Ok(out)
}

/// What a host's manager, started again and quit, left in its mount root
/// beyond the layer cache's published layers and its empty working dirs:
/// a vessel dir, a runner's lock or bundle, a throwaway exec, a scratch or
/// temp (dot-named) entry anywhere outside a published layer.
fn leftovers(root: &std::path::Path) -> Result<Vec<String>> {
    ensure!(root.join("layers").is_dir() && root.join("runtime").is_dir(), "not a mount root: {root:?}");
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir)? {
            let e = e?;
            let rel = e.path().strip_prefix(root)?.to_string_lossy().into_owned();
            let name = e.file_name().to_string_lossy().into_owned();
            let stray = name.starts_with('.')
                || rel.starts_with("vessels/")
                || rel.contains("runners/")
                || rel.contains("bundles/");
            if stray {
                out.push(rel);
            } else if e.file_type()?.is_dir() && !rel.starts_with("layers/") {
                // A published layer's content is the image's, not ours.
                stack.push(e.path());
            }
        }
    }
    Ok(out)
}

/// The multipart uploads pending under the world's prefix, as S3 lists
/// them (boto3, beside moto in the tests' venv).
pub(super) fn pending_uploads(url: &str) -> Result<Vec<String>> {
    let python = std::env::var("VESSEL_MCP_PYTHON").context("VESSEL_MCP_PYTHON")?;
    let prefix = url.trim_start_matches("s3://vessel-test/");
    let script = format!(
        "import boto3,os\ns3=boto3.client('s3',endpoint_url=os.environ['AWS_ENDPOINT_URL'])\n\
         r=s3.list_multipart_uploads(Bucket='vessel-test',Prefix='{prefix}/')\n\
         [print(u['Key']) for u in r.get('Uploads',[])]"
    );
    let out = std::process::Command::new(python).args(["-c", &script]).output()?;
    ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8(out.stdout)?.lines().map(str::to_owned).collect())
}
