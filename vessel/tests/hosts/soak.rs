//! The fault campaign (`cargo xtask soak`; 12 cycles in `cargo xtask
//! test`): one vessel on S3 moving between agent processes while faults
//! are injected, the model checked after each.

use std::io::Write;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
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
}

/// Faults injected, by kind, and what was verified.
#[derive(Default, Debug)]
struct Figures {
    cycles: u64,
    snapshots: u64,
    restores: u64,
    kill_mid_snapshot: u64,
    kill_idle: u64,
    kill_tree: u64,
    kill_mid_open: u64,
    cut_mid_upload: u64,
    disk_full: u64,
    /// Of those, how many refused the write, the tree listing or the snapshot.
    disk_full_refusals: u64,
    paused_past_ttl: u64,
    in_flight_committed: u64,
    in_flight_lost: u64,
    verified: u64,
}

/// The fault campaign: one vessel on S3 (through a relay that can cut
/// connections), one host at a time; each cycle a random operation or
/// fault (kill -9 of the host mid-snapshot or idle, the relay cut
/// mid-upload, the host paused past its lease TTL while another takes
/// over). After every fault a new host takes the vessel over and checks
/// the model: every snapshot reported committed restores to exactly its
/// tree, a snapshot in flight at the kill either restores to its tree or
/// does not exist, storage holds no snapshot object beyond those once gc
/// ran, and the stale host cannot commit. `VESSEL_SOAK_CYCLES` (default
/// 12) and `VESSEL_SOAK_SEED` (default random, printed) drive it.
pub(super) fn soak(w: &World) -> Result<()> {
    let cycles: u64 = std::env::var("VESSEL_SOAK_CYCLES").ok().and_then(|c| c.parse().ok()).unwrap_or(12);
    let seed: u64 =
        std::env::var("VESSEL_SOAK_SEED").ok().and_then(|c| c.parse().ok()).unwrap_or_else(rand::random::<u64>);
    println!("soak: seed {seed}, {cycles} cycles (VESSEL_SOAK_SEED={seed} replays the choices)");
    let mut log: Vec<String> = Vec::new();
    let started = std::time::Instant::now();
    // The hosts' disk: a small filesystem of its own, so a fault can fill it.
    let disk_mb: u64 = std::env::var("VESSEL_SOAK_DISK_MB").ok().and_then(|c| c.parse().ok()).unwrap_or(768);
    use nix::mount::{MntFlags, MsFlags, mount, umount2};
    mount(Some("tmpfs"), &w.base, Some("tmpfs"), MsFlags::empty(), Some(format!("size={disk_mb}m").as_str()))?;
    let result = campaign(w, cycles, seed, &mut log);
    umount2(&w.base, MntFlags::MNT_DETACH)?;
    // What hosts killed mid-upload left in S3 (no process is left to abort
    // them): reported, see the note on pending uploads in the README.
    if let Ok(pending) = pending_uploads(&w.url) {
        println!("soak: {} multipart uploads left pending by killed hosts", pending.len());
    }
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
    let upstream = std::env::var("AWS_ENDPOINT_URL")?;
    let proxy = TOKIO.block_on(Proxy::start(upstream.trim_start_matches("http://")))?;
    let endpoint = format!("http://{}", proxy.addr);
    let mut rng = Rng(seed | 1);
    let (mut model, mut figures) = (Model::default(), Figures::default());
    let mut hosts = 0u32;
    let next_host = |hosts: &mut u32| -> Result<Host> {
        *hosts += 1;
        Host::start(w, &format!("soak-{hosts}"), Some(&endpoint))
    };
    // A dead host's manager, started again on its mount root, removes what
    // it left (mounts, containers); then nothing of it may remain.
    let restart = |n: u32, log: &mut Vec<String>| -> Result<()> {
        let name = format!("soak-{n}");
        Host::start(w, &name, Some(&endpoint))?.quit()?;
        let left = support::mounts_under(&w.base.join(&name));
        ensure!(left.is_empty(), "{name} restarted left {left:?}");
        log.push(format!("{name} restarted: nothing left"));
        // Its layer cache would only fill the small disk.
        std::fs::remove_dir_all(w.base.join(&name))?;
        Ok(())
    };
    let mut host = next_host(&mut hosts)?;
    let id = host.ok("create")?;
    for cycle in 0..cycles {
        figures.cycles += 1;
        let op = rng.below(100);
        match op {
            0..=29 => {
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
            30..=54 => {
                let tree = host.sh(TREE)?;
                let sid = host.ok("snapshot")?;
                log.push(format!("{cycle}: snapshot {sid}"));
                model.committed.insert(sid, tree);
                figures.snapshots += 1;
            }
            55..=69 if !model.committed.is_empty() => {
                let i = rng.below(model.committed.len() as u64) as usize;
                let (sid, tree) =
                    model.committed.iter().nth(i).map(|(s, t)| (s.clone(), t.clone())).context("a snapshot")?;
                log.push(format!("{cycle}: restore {sid}"));
                host.ok(&format!("restore {sid}"))?;
                ensure!(host.sh(TREE)? == tree, "restore {sid} gave another tree");
                figures.restores += 1;
            }
            70..=79 => {
                // kill -9 while a snapshot is under way (its upload, its
                // manifest commit, or already done: the model allows each).
                let tree = host.sh(TREE)?;
                let delay = rng.below(60);
                log.push(format!("{cycle}: kill -9 {delay} ms into a snapshot"));
                writeln!(host.stdin, "snapshot")?;
                host.stdin.flush()?;
                std::thread::sleep(Duration::from_millis(delay));
                host.kill()?;
                model.in_flight = Some(tree);
                figures.kill_mid_snapshot += 1;
                let dead = hosts;
                host = take_over(w, &id, &mut model, &mut figures, next_host(&mut hosts)?, log)?;
                restart(dead, log)?;
            }
            80..=84 => {
                let tree = rng.below(2) == 0;
                log.push(format!("{cycle}: kill -9 idle{}", if tree { ", the whole process tree" } else { "" }));
                if tree {
                    host.kill_tree()?;
                    figures.kill_tree += 1;
                } else {
                    host.kill()?;
                    figures.kill_idle += 1;
                }
                let dead = hosts;
                host = take_over(w, &id, &mut model, &mut figures, next_host(&mut hosts)?, log)?;
                restart(dead, log)?;
            }
            85..=88 => {
                // A host killed while it opens the vessel (fetching and
                // applying its layers into its cache, taking the lease).
                host.ok("close")?;
                host.quit()?;
                let mut opener = next_host(&mut hosts)?;
                let delay = rng.below(80);
                log.push(format!("{cycle}: kill -9 {delay} ms into an open"));
                writeln!(opener.stdin, "open {id}")?;
                opener.stdin.flush()?;
                std::thread::sleep(Duration::from_millis(delay));
                opener.kill()?;
                figures.kill_mid_open += 1;
                let dead = hosts;
                host = take_over(w, &id, &mut model, &mut figures, next_host(&mut hosts)?, log)?;
                restart(dead, log)?;
            }
            89..=93 => {
                // The relay drops every connection part way into the upload.
                host.sh(&format!(
                    "rm -f /work/cut; head -c {} /dev/urandom > /work/cut",
                    2_000_000 + rng.below(4_000_000)
                ))?;
                let tree = host.sh(TREE)?;
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
                ensure!(host.sh(TREE)? == tree, "the live tree changed under a failed snapshot");
            }
            94..=96 => {
                // The hosts' disk filled (from outside, to a few KiB or
                // nothing free) under a write and a snapshot: each works or
                // fails with a typed error, and the vessel works again once
                // space is freed.
                let spare = rng.below(64) << 10;
                log.push(format!("{cycle}: the disk filled to {} KiB free, then a write and a snapshot", spare >> 10));
                let filler = w.base.join("filler");
                let free = nix::sys::statvfs::statvfs(&w.base)?;
                let avail = free.blocks_available() as u64 * free.fragment_size() as u64;
                let f = std::fs::File::create(&filler)?;
                nix::fcntl::fallocate(&f, nix::fcntl::FallocateFlags::empty(), 0, avail.saturating_sub(spare) as i64)?;
                let left = nix::sys::statvfs::statvfs(&w.base)?;
                let left = left.blocks_available() as u64 * left.fragment_size() as u64;
                ensure!(left <= spare + (64 << 10), "the disk kept {left} bytes free");
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
                                ["err Io", "err QuotaExceeded"].iter().any(|k| e.starts_with(k)),
                                "a snapshot on a full disk fails with a typed error: {e}"
                            );
                            figures.disk_full_refusals += 1;
                        }
                    }
                }
                drop(f);
                std::fs::remove_file(&filler)?;
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
                restart(dead, log)?;
                figures.paused_past_ttl += 1;
            }
        }
    }
    // The end: one last takeover checks everything once more.
    host.ok("close")?;
    host.quit()?;
    let last = take_over(w, &id, &mut model, &mut figures, next_host(&mut hosts)?, log)?;
    last.quit()?;
    Ok(figures)
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
    // Crash leftovers (a blob stored before its manifest) go with gc.
    host.ok("gc")?;
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
        ensure!(host.sh(TREE)? == tree, "the in-flight snapshot {sid} holds another tree");
        log.push(format!("the in-flight snapshot committed as {sid}"));
        model.committed.insert(sid, tree);
        figures.in_flight_committed += 1;
    }
    let committed_now = stored.iter().any(|k| !before.iter().any(|b| b == k));
    if in_flight.is_some() && !committed_now {
        figures.in_flight_lost += 1;
    }
    for (sid, tree) in &model.committed {
        ensure!(stored.iter().any(|k| k.contains(sid.as_str())), "committed snapshot {sid} is gone from storage");
        host.ok(&format!("restore {sid}"))?;
        ensure!(host.sh(TREE)? == *tree, "committed snapshot {sid} restores to another tree");
        figures.verified += 1;
    }
    Ok(host)
}

/// The multipart uploads pending under the world's prefix, as S3 lists
/// them (boto3, beside moto in the tests' venv).
fn pending_uploads(url: &str) -> Result<Vec<String>> {
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
