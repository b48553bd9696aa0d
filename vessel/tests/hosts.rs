//! Many hosts, one store: each "host" is a separate process (this test
//! binary re-run as an agent that takes commands on stdin) with its own
//! mount root, all on one bucket of the real S3 server `cargo xtask test`
//! starts. Covered: a vessel moving between hosts with its tree exact;
//! `Busy` while another host holds it; takeover after `kill -9` once the
//! TTL passed; a paused host that lost its lease cannot commit; the server
//! going away in the middle of a snapshot upload; an upload a killed host
//! left, aborted by gc; truncated and tampered objects refused as corrupt;
//! the fault campaign (`soak`). After all cases nothing is left mounted.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use libtest_mimic::{Arguments, Failed, Trial};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vessel::{ExecOptions, Manager, ManagerConfig, Storage};
use vessel_test_support as support;

static TOKIO: LazyLock<tokio::runtime::Runtime> =
    LazyLock::new(|| tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap());

const AGENT: &str = "VESSEL_HOST_AGENT";
const IMAGE: &str = "local/busybox:latest";
/// Short, so takeovers happen within the test; renewals every third of it.
const TTL_MS: u64 = 2000;

/// The tree under /work as `stat` and `md5sum` see it: names, types,
/// modes, owners, sizes, link targets, contents. Not a directory's size:
/// it is the filesystem's bookkeeping (on btrfs the length of the names
/// in it, an overlay's whiteouts included), which no layer records.
const TREE: &str = "cd /work && find . | sort | while read f; do if [ -d \"$f\" ] && [ ! -L \"$f\" ]; \
                    then stat -c '%n %F %a %u:%g' \"$f\"; else stat -c '%n %F %a %u:%g %s %N' \"$f\"; fi; done; \
                    find . -type f | sort | xargs -r md5sum";

// ---------------------------------------------------------------- agent

/// The agent: one host. Commands, one per line; replies `ok …` or `err <kind> <message>`.
fn agent() -> ! {
    let env = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("{k} unset"));
    let config = ManagerConfig::default()
        .shared_storage(TOKIO.block_on(vessel::open_url(&env("VESSEL_AGENT_STORAGE"))).expect("storage"))
        .mount_root(env("VESSEL_AGENT_ROOT"))
        .host_name(env("VESSEL_AGENT_NAME"))
        .lease_ttl(Duration::from_millis(TTL_MS))
        .gc_grace(Duration::ZERO)
        .max_layer_bytes(64 << 20)
        .namespace("vessel-hosts");
    // A disk quota where the world gives one (its mount roots are on btrfs).
    let config = match std::env::var("VESSEL_AGENT_QUOTA") {
        Ok(q) => config.disk_quota(Some(q.parse().expect("quota bytes"))).quota_mode(vessel::QuotaMode::Require),
        Err(_) => config.disk_quota(None),
    };
    let mgr = TOKIO.block_on(Manager::new(config)).expect("manager");
    let mut vessel: Option<vessel::Vessel> = None;
    let mut many: Vec<vessel::Vessel> = Vec::new();
    let mut background: Vec<vessel::ProcessHandle> = Vec::new();
    let stdout = std::io::stdout();
    for line in std::io::stdin().lock().lines() {
        let line = line.expect("stdin");
        let (cmd, arg) = line.split_once(' ').unwrap_or((&line, ""));
        let reply: std::result::Result<String, vessel::VesselError> = TOKIO.block_on(async {
            match cmd {
                "create" => {
                    let v = mgr.create_vessel(IMAGE, "/work").await?;
                    let id = v.id().to_string();
                    vessel = Some(v);
                    Ok(id)
                }
                "open" => {
                    vessel = Some(mgr.open_vessel(arg).await?);
                    Ok(String::new())
                }
                "sh" => {
                    let v = vessel.as_ref().expect("no vessel open");
                    let mut out = Vec::new();
                    let res = v
                        .exec(ExecOptions {
                            command: vec!["sh".into(), "-c".into(), arg.into()],
                            stdout: Some(Box::new(&mut out)),
                            persist_result: true,
                            ..Default::default()
                        })
                        .await?;
                    use base64::Engine;
                    Ok(format!("{} {}", res.exit_code, base64::engine::general_purpose::STANDARD.encode(&out)))
                }
                "throwaway" => {
                    // A command whose changes are discarded: its exit code.
                    let v = vessel.as_ref().expect("no vessel open");
                    let command = vec!["sh".into(), "-c".into(), arg.into()];
                    Ok(v.exec(ExecOptions { command, ..Default::default() }).await?.exit_code.to_string())
                }
                "spawn" => {
                    let v = vessel.as_ref().expect("no vessel open");
                    let command = vec!["sh".into(), "-c".into(), arg.into()];
                    let p = v.spawn(ExecOptions { command, persist_result: true, ..Default::default() }).await?;
                    background.push(p);
                    Ok(String::new())
                }
                "running" => {
                    let v = vessel.as_ref().expect("no vessel open");
                    let n = v.processes().iter().filter(|p| p.status == vessel::ProcessStatus::Running).count();
                    Ok(n.to_string())
                }
                "snapshot" => {
                    Ok(vessel.as_ref().expect("no vessel open").create_snapshot("step").await?.id.to_string())
                }
                "delete-snapshot" => {
                    let sid = vessel::SnapshotId::new(arg)?;
                    vessel.as_ref().expect("no vessel open").delete_snapshot(&sid).await?;
                    Ok(String::new())
                }
                "fork-live" => {
                    // `fork-live N`: N live forks, each one's tree (base64),
                    // then deleted; the snapshot they were forked at first.
                    use base64::Engine;
                    let v = vessel.as_ref().expect("no vessel open");
                    let children = v.fork(arg.parse().expect("a count"), &vessel::VesselOptions::new()).await?;
                    let mut reply = Vec::new();
                    for c in &children {
                        let origin = vessel::ForkOrigin::of(&c.manifest()).expect("a fork names its origin");
                        if reply.is_empty() {
                            reply.push(origin.snapshot_id.to_string());
                        }
                        let mut out = Vec::new();
                        let command = vec!["sh".into(), "-c".into(), TREE.into()];
                        let stdout: Option<Box<dyn tokio::io::AsyncWrite + Send + Unpin>> = Some(Box::new(&mut out));
                        c.exec(ExecOptions { command, stdout, persist_result: true, ..Default::default() }).await?;
                        reply.push(base64::engine::general_purpose::STANDARD.encode(&out));
                    }
                    for c in children {
                        let id = c.id().to_string();
                        c.close().await?;
                        mgr.delete_vessel(&id).await?;
                    }
                    Ok(reply.join(" "))
                }
                "restore" => {
                    let sid = vessel::SnapshotId::new(arg)?;
                    vessel.as_ref().expect("no vessel open").restore_snapshot(&sid).await?;
                    Ok(String::new())
                }
                "create-many" => {
                    for _ in 0..arg.parse::<usize>().expect("a count") {
                        many.push(mgr.create_vessel(IMAGE, "/work").await?);
                    }
                    Ok(String::new())
                }
                "close" => {
                    if let Some(v) = vessel.take() {
                        v.close().await?;
                    }
                    Ok(String::new())
                }
                "fork" => {
                    // `fork SOURCE SNAPSHOT`: a fork, closed again; its id.
                    let (source, snap) = arg.split_once(' ').expect("fork SOURCE SNAPSHOT");
                    let f = mgr.fork_vessel(source, &vessel::SnapshotId::new(snap)?, &Default::default()).await?;
                    let id = f.id().to_string();
                    f.close().await?;
                    Ok(id)
                }
                "delete" => {
                    mgr.delete_vessel(arg).await?;
                    Ok(String::new())
                }
                "gc" => {
                    // `blobs uploads heartbeats` removed.
                    let r = mgr.gc().await?;
                    Ok(format!("{} {} {}", r.blobs_deleted, r.uploads_aborted, r.heartbeats_removed))
                }
                "holder" => {
                    let id = vessel::VesselId::new(arg)?;
                    Ok(mgr.vessel_holder(&id).await?.filter(|h| h.live).map_or("-".into(), |h| h.name))
                }
                "quit" => {
                    mgr.close().await?;
                    std::process::exit(0)
                }
                other => panic!("unknown agent command {other}"),
            }
        });
        let mut out = stdout.lock();
        match reply {
            Ok(s) => writeln!(out, "ok {s}"),
            // The kind, then the whole chain of causes.
            Err(e) => writeln!(out, "err {:?} {}", e.kind(), format!("{:#}", anyhow::Error::new(e)).replace('\n', " ")),
        }
        .and_then(|()| out.flush())
        .expect("stdout");
    }
    // The test dropped us (a failed case): leave nothing mounted.
    drop((background, vessel, many));
    let _ = TOKIO.block_on(mgr.close());
    std::process::exit(0)
}

/// A running agent process.
struct Host {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Host {
    fn start(world: &World, name: &str, endpoint: Option<&str>) -> Result<Self> {
        let mut cmd = Command::new(std::env::current_exe()?);
        // Its own process group: a fault can kill the agent with every
        // process it started (runners, containers' init) at once.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        cmd.env(AGENT, "1")
            .env("VESSEL_AGENT_STORAGE", &world.url)
            .env("VESSEL_AGENT_ROOT", world.base.join(name))
            .env("VESSEL_AGENT_NAME", name)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        if let Some(e) = endpoint {
            cmd.env("AWS_ENDPOINT_URL", e);
        }
        if let Some(q) = world.quota {
            cmd.env("VESSEL_AGENT_QUOTA", q.to_string());
        }
        let mut child = cmd.spawn()?;
        let stdin = child.stdin.take().context("stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("stdout")?);
        Ok(Self { child, stdin, stdout })
    }

    /// Sends one command without waiting for its reply (a fault comes next).
    fn send(&mut self, cmd: &str) -> Result<()> {
        writeln!(self.stdin, "{cmd}")?;
        Ok(self.stdin.flush()?)
    }

    /// Sends one command; `Ok(reply)` for `ok reply`, `Err` with the whole line otherwise.
    fn call(&mut self, cmd: &str) -> Result<std::result::Result<String, String>> {
        self.send(cmd)?;
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        ensure!(!line.is_empty(), "agent died on {cmd:?}");
        let line = line.trim_end().to_owned();
        Ok(match line.strip_prefix("ok") {
            Some(rest) => Ok(rest.trim_start().to_owned()),
            None => Err(line),
        })
    }

    fn ok(&mut self, cmd: &str) -> Result<String> {
        self.call(cmd)?.map_err(|e| anyhow::anyhow!("{cmd:?}: {e}"))
    }

    /// Runs a script, persisting; its stdout, after checking it exited 0.
    fn sh(&mut self, script: &str) -> Result<String> {
        use base64::Engine;
        let reply = self.ok(&format!("sh {script}"))?;
        let (code, out) = reply.split_once(' ').unwrap_or((&reply, ""));
        let out = String::from_utf8(base64::engine::general_purpose::STANDARD.decode(out)?)?;
        ensure!(code == "0", "{script:?} exited {code}: {out}");
        Ok(out)
    }

    fn signal(&self, sig: nix::sys::signal::Signal) -> Result<()> {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), sig)?;
        Ok(())
    }

    fn quit(mut self) -> Result<()> {
        self.ok("quit").ok();
        let status = self.child.wait()?;
        ensure!(status.success(), "agent exited {status}");
        Ok(())
    }

    /// kill -9 `ms` milliseconds into `cmd` (a fault at a random point of it).
    fn kill_into(mut self, cmd: &str, ms: u64) -> Result<()> {
        self.send(cmd)?;
        std::thread::sleep(Duration::from_millis(ms));
        self.kill()
    }

    fn kill(mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// kill -9 of the agent's whole process group.
    fn kill_tree(mut self) -> Result<()> {
        let group = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL)?;
        self.child.wait()?;
        Ok(())
    }
}

// ---------------------------------------------------------------- world

/// One case's storage (a bucket prefix, or a directory all hosts share)
/// holding the test image, and its mount roots' base.
struct World {
    url: String,
    base: PathBuf,
    /// The bucket, to look into; `None` for a world on local storage.
    storage: Option<vessel::storage::ObjectStorage>,
    /// Each host's disk quota (`None`: quotas off).
    quota: Option<u64>,
    /// The test image's storage, for a case that makes a world of its own.
    image_dir: PathBuf,
}

impl World {
    /// A world under `base_url` (an `s3://` URL or a local directory).
    fn new(base_url: &str, tmp: &Path, image_dir: &Path, case: &str) -> Result<Self> {
        let url = format!("{base_url}/hosts-{case}-{:016x}", rand::random::<u64>());
        let base = tmp.join(case);
        std::fs::create_dir_all(&base)?;
        let storage = TOKIO.block_on(async {
            // Imported as a user would, so its summary is stored beside it.
            let config = ManagerConfig::default()
                .shared_storage(vessel::open_url(&url).await?)
                .mount_root(base.join("importer"))
                .disk_quota(None);
            let mgr = Manager::new(config).await?;
            let src = vessel::LocalStorage::new(image_dir.join("storage"))?;
            let r = vessel::ImageRef::new(IMAGE)?;
            let mut data = Vec::new();
            src.load_image(&r).await?.read_to_end(&mut data).await?;
            mgr.import_image(IMAGE, Box::new(std::io::Cursor::new(data))).await?;
            mgr.close().await?;
            if url.starts_with('/') {
                return anyhow::Ok(None);
            }
            anyhow::Ok(Some(vessel::storage::ObjectStorage::connect(&url).await?))
        })?;
        Ok(Self { url, base, storage, quota: None, image_dir: image_dir.to_owned() })
    }

    /// The world's bucket (cases that look into S3 run on one).
    fn s3(&self) -> &vessel::storage::ObjectStorage {
        self.storage.as_ref().expect("a world on S3")
    }

    /// The stored object at `key`, as [`World::keys`] names it.
    fn read(&self, key: &str) -> Result<Vec<u8>> {
        let Some(s3) = &self.storage else { return Ok(std::fs::read(Path::new(&self.url).join(key))?) };
        use object_store::ObjectStoreExt;
        let key = object_store::path::Path::from(key);
        Ok(TOKIO.block_on(async { s3.store().get(&key).await?.bytes().await })?.to_vec())
    }

    /// The keys of the vessel's stored snapshots.
    fn snapshot_keys(&self, id: &str) -> Result<Vec<String>> {
        self.keys(&format!("vessels/{id}/snapshots"))
    }

    /// The keys under `rel` in the world's prefix (the files under it, on
    /// local storage), sorted.
    fn keys(&self, rel: &str) -> Result<Vec<String>> {
        use futures::TryStreamExt;
        let Some(s3) = &self.storage else {
            let root = Path::new(&self.url);
            let mut out = Vec::new();
            let mut stack = vec![root.join(rel)];
            while let Some(dir) = stack.pop() {
                let entries = match std::fs::read_dir(&dir) {
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    r => r?,
                };
                for e in entries {
                    let e = e?;
                    if e.file_type()?.is_dir() {
                        stack.push(e.path());
                    } else {
                        out.push(e.path().strip_prefix(root)?.to_string_lossy().into_owned());
                    }
                }
            }
            out.sort();
            return Ok(out);
        };
        let prefix = s3.key(rel);
        let keys: Vec<_> = TOKIO.block_on(s3.store().list(Some(&prefix)).try_collect::<Vec<_>>())?;
        let mut out: Vec<String> = keys.into_iter().map(|m| m.location.to_string()).collect();
        out.sort();
        Ok(out)
    }
}

// ---------------------------------------------------------------- cases

fn two_hosts_share_a_vessel(w: &World) -> Result<()> {
    let mut a = Host::start(w, "host-a", None)?;
    let id = a.ok("create")?;
    a.sh("mkdir -p /work/d && echo one > /work/d/f && chmod 640 /work/d/f && ln -s d/f /work/l && touch /work/gone")?;
    a.ok("snapshot")?;
    let tree_a = a.sh(TREE)?;
    a.ok("close")?;

    let mut b = Host::start(w, "host-b", None)?;
    b.ok(&format!("open {id}"))?;
    ensure!(b.sh(TREE)? == tree_a, "host B sees another tree than A committed");
    ensure!(a.ok(&format!("holder {id}"))? == "host-b", "A sees B as the holder");
    b.sh("rm /work/gone && echo two >> /work/d/f && mkdir /work/e && touch /work/e/x && chown 7:8 /work/e/x && chmod 4755 /work/e/x")?;
    b.ok("snapshot")?;
    let tree_b = b.sh(TREE)?;
    ensure!(tree_b != tree_a);
    b.ok("close")?;
    ensure!(a.ok(&format!("holder {id}"))? == "-", "nobody holds a closed vessel");

    a.ok(&format!("open {id}"))?;
    ensure!(a.sh(TREE)? == tree_b, "back on A, the tree is not what B committed");
    a.ok("close")?;
    a.quit()?;
    b.quit()
}

fn busy_until_a_killed_host_expires(w: &World) -> Result<()> {
    let mut a = Host::start(w, "host-a", None)?;
    let id = a.ok("create")?;
    a.sh("echo from-a > /work/a")?;
    a.ok("snapshot")?;
    let mut b = Host::start(w, "host-b", None)?;
    let e = b.call(&format!("open {id}"))?.expect_err("a second open must be refused");
    ensure!(e.starts_with("err Conflict") && e.contains("open on host host-a"), "{e}");
    a.kill()?;
    // Dead, but its heartbeat is fresh: still busy.
    let e = b.call(&format!("open {id}"))?.expect_err("busy until the TTL");
    ensure!(e.contains("host-a"), "{e}");
    std::thread::sleep(Duration::from_millis(TTL_MS + 500));
    b.ok(&format!("open {id}"))?;
    ensure!(b.sh("cat /work/a")? == "from-a\n");
    b.ok("close")?;
    b.quit()?;
    // What the killed host left mounted is removed when it starts again.
    Host::start(w, "host-a", None)?.quit()?;
    let left = support::mounts_under(&w.base);
    ensure!(left.is_empty(), "left mounted: {left:?}");
    Ok(())
}

fn a_paused_host_cannot_commit(w: &World) -> Result<()> {
    let mut a = Host::start(w, "host-a", None)?;
    let id = a.ok("create")?;
    a.sh("echo a > /work/a")?;
    let s1 = a.ok("snapshot")?;
    a.sh("echo stale > /work/stale")?;
    a.signal(nix::sys::signal::Signal::SIGSTOP)?;
    std::thread::sleep(Duration::from_millis(TTL_MS + 500));
    let mut b = Host::start(w, "host-b", None)?;
    b.ok(&format!("open {id}"))?;
    b.sh("echo b > /work/b")?;
    let s2 = b.ok("snapshot")?;
    a.signal(nix::sys::signal::Signal::SIGCONT)?;
    let e = a.call("snapshot")?.expect_err("a host that lost its lease must not commit");
    ensure!(e.starts_with("err Conflict") && e.contains("lease was taken over"), "{e}");
    a.ok("close")?;
    // Storage holds exactly B's history: A's failed snapshot left no blob.
    let keys = w.snapshot_keys(&id)?;
    ensure!(keys.len() == 2 && [&s1, &s2].iter().all(|s| keys.iter().any(|k| k.contains(s.as_str()))), "{keys:?}");
    ensure!(b.sh("cat /work/a /work/b; test ! -e /work/stale")? == "a\nb\n");
    b.ok("close")?;
    a.quit()?;
    b.quit()
}

/// A host killed in the middle of a multipart upload leaves its parts
/// pending in S3 (nothing can list them through `object_store`); its
/// journal lets another host's gc abort them, and the restarted host's gc
/// removes the heartbeat its dead run left.
fn a_killed_upload_is_aborted_by_gc(w: &World) -> Result<()> {
    let upstream = std::env::var("AWS_ENDPOINT_URL")?;
    let proxy = TOKIO.block_on(Proxy::start(upstream.trim_start_matches("http://")))?;
    let endpoint = format!("http://{}", proxy.addr);
    let mut a = Host::start(w, "host-a", Some(&endpoint))?;
    let id = a.ok("create")?;
    a.sh("head -c 40000000 /dev/urandom > /work/big")?;
    let before = proxy.sent();
    a.send("snapshot")?;
    // Past the first part (8 MiB): the upload is under way.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while proxy.sent() < before + (12 << 20) {
        ensure!(std::time::Instant::now() < deadline, "the upload never started");
        std::thread::sleep(Duration::from_millis(5));
    }
    a.kill()?;
    let pending = soak::pending_uploads(&w.url)?;
    ensure!(pending.len() == 1, "the killed host's upload is pending: {pending:?}");
    ensure!(w.keys("uploads")?.len() == 1, "and journaled");
    ensure!(w.keys("leases/hosts")?.len() == 1, "its heartbeat is left");
    let mut b = Host::start(w, "host-b", Some(&endpoint))?;
    let gc = b.ok("gc")?;
    ensure!(gc.split(' ').nth(1) == Some("1"), "gc aborted one upload: {gc}");
    ensure!(soak::pending_uploads(&w.url)?.is_empty(), "no upload is pending after gc");
    ensure!(w.keys("uploads")?.is_empty(), "no journal is left after gc");
    ensure!(w.snapshot_keys(&id)?.is_empty(), "nothing was committed");
    b.quit()?;
    // The killed host started again: its gc removes its old heartbeat.
    let mut again = Host::start(w, "host-a", Some(&endpoint))?;
    let gc = again.ok("gc")?;
    ensure!(gc.split(' ').nth(2) == Some("1"), "gc removed one heartbeat: {gc}");
    again.quit()?;
    ensure!(w.keys("leases/hosts")?.is_empty(), "no heartbeat is left");
    Ok(())
}

fn the_server_going_away_mid_upload(w: &World) -> Result<()> {
    let upstream = std::env::var("AWS_ENDPOINT_URL")?;
    let proxy = TOKIO.block_on(Proxy::start(upstream.trim_start_matches("http://")))?;
    let mut a = Host::start(w, "host-a", Some(&format!("http://{}", proxy.addr)))?;
    let id = a.ok("create")?;
    a.sh("head -c 40000000 /dev/urandom > /work/big && md5sum /work/big > /work/big.md5")?;
    // Cut every connection once 12 MB of the upload went through, and refuse new ones.
    proxy.cut_after(proxy.sent() + (12 << 20));
    let e = a.call("snapshot")?.expect_err("a snapshot to a server that went away must fail");
    ensure!(e.starts_with("err Io"), "{e}");
    proxy.restore();
    ensure!(w.snapshot_keys(&id)?.is_empty(), "nothing is committed");
    // The vessel still works and still has its changes; now the snapshot lands.
    a.sh("md5sum -c /work/big.md5")?;
    a.ok("snapshot")?;
    a.ok("close")?;
    a.quit()?;
    let mut b = Host::start(w, "host-b", None)?;
    b.ok(&format!("open {id}"))?;
    b.sh("md5sum -c /work/big.md5")?;
    b.ok("close")?;
    b.quit()
}

/// A snapshot object replaced in the bucket by a zstd bomb (a tar of
/// 1 GiB of zeros in a few KiB): a new host opening the vessel stops at its
/// layer bound (64 MiB for the agents), refuses with QuotaExceeded and
/// leaves nothing in its layer cache.
fn a_snapshot_replaced_by_a_bomb_is_refused(w: &World) -> Result<()> {
    use object_store::{ObjectStoreExt, PutPayload};
    let mut a = Host::start(w, "host-a", None)?;
    let id = a.ok("create")?;
    a.sh("echo x > /work/f")?;
    a.ok("snapshot")?;
    a.ok("close")?;
    a.quit()?;
    let key = w.snapshot_keys(&id)?.pop().context("no snapshot stored")?;
    ensure!(key.ends_with(".tar.zst"), "snapshots are stored zstd-compressed: {key}");
    let bomb = support::zstd_bomb("work/zeros", 1 << 30);
    ensure!(bomb.len() < 200 << 10, "the bomb is {} bytes", bomb.len());
    let store = w.s3().store().clone();
    TOKIO.block_on(store.put(&object_store::path::Path::from(key), PutPayload::from(bomb)))?;
    let mut b = Host::start(w, "host-b", None)?;
    let e = b.call(&format!("open {id}"))?.expect_err("a bomb must be refused");
    ensure!(e.starts_with("err QuotaExceeded") && e.contains("bound"), "{e}");
    let layers = w.base.join("host-b/layers/layers");
    let left: Vec<_> = std::fs::read_dir(&layers)?.flatten().map(|e| e.file_name()).collect();
    ensure!(left.iter().all(|n| !n.to_string_lossy().starts_with('.')), "scratch left in the cache: {left:?}");
    b.quit()
}

fn truncated_and_tampered_objects_are_corrupt(w: &World) -> Result<()> {
    use object_store::{ObjectStoreExt, PutPayload};
    let mut a = Host::start(w, "host-a", None)?;
    let id = a.ok("create")?;
    a.sh("seq 1 200000 > /work/n")?;
    a.ok("snapshot")?;
    a.ok("close")?;
    a.quit()?;
    let key = object_store::path::Path::from(w.snapshot_keys(&id)?.pop().context("no snapshot stored")?);
    let store = w.s3().store().clone();
    let original = TOKIO.block_on(async { store.get(&key).await?.bytes().await })?;
    let mut tampered = original.to_vec();
    let mid = tampered.len() / 2;
    tampered[mid] ^= 0x40;
    for (what, bytes) in [("truncated", original[..original.len() / 2].to_vec()), ("tampered", tampered)] {
        TOKIO.block_on(store.put(&key, PutPayload::from(bytes)))?;
        // A new host each time: nothing cached.
        let mut b = Host::start(w, &format!("host-{what}"), None)?;
        let e = b.call(&format!("open {id}"))?.expect_err("a damaged snapshot must be refused");
        ensure!(e.starts_with("err Corrupt"), "{what}: {e}");
        b.quit()?;
    }
    TOKIO.block_on(store.put(&key, PutPayload::from(original)))?;
    let mut b = Host::start(w, "host-c", None)?;
    b.ok(&format!("open {id}"))?;
    ensure!(b.sh("tail -n 1 /work/n")? == "200000\n");
    b.ok("close")?;
    b.quit()
}

/// What each operation costs in object-store requests, counted on the
/// wire between a host and the server; and that an idle host's cost does
/// not grow with the vessels it holds open.
fn request_costs(w: &World) -> Result<()> {
    let upstream = std::env::var("AWS_ENDPOINT_URL")?;
    let proxy = TOKIO.block_on(Proxy::start(upstream.trim_start_matches("http://")))?;
    let endpoint = format!("http://{}", proxy.addr);
    let mut table = Vec::new();
    let mut count = |what: &str, proxy: &Proxy| {
        let reqs = proxy.take_requests();
        let mut by_method = std::collections::BTreeMap::<String, usize>::new();
        for r in &reqs {
            *by_method.entry(r.split(' ').next().unwrap_or_default().to_owned()).or_default() += 1;
        }
        table.push(format!("{what:<34} {:>3}  {by_method:?}", reqs.len()));
        reqs
    };
    let mut a = Host::start(w, "host-a", Some(&endpoint))?;
    a.ok("holder 0000000000000000")?; // waits until the host is up
    count("host start (connect, heartbeat)", &proxy);
    let id = a.ok("create")?;
    count("create (new host: image fetched)", &proxy);
    a.sh("echo 1 > /work/f")?;
    count("exec", &proxy);
    let s1 = a.ok("snapshot")?;
    count("snapshot (small change)", &proxy);
    a.sh("echo 2 > /work/f")?;
    a.ok("snapshot")?;
    proxy.take_requests();
    a.ok(&format!("restore {s1}"))?;
    count("restore (cached)", &proxy);
    a.ok("close")?;
    let closed = count("close", &proxy);
    let fork = a.ok(&format!("fork {id} {s1}"))?;
    let forked = count("fork (snapshot cached; open, close)", &proxy);
    let blob_writes = forked.iter().filter(|r| r.starts_with("PUT") && r.contains("/snapshots/")).count();
    ensure!(blob_writes == 0, "a fork copies no blob: {forked:?}");
    a.ok(&format!("delete {fork}"))?;
    proxy.take_requests();
    ensure!(closed.len() == 1 && closed[0].starts_with("PUT"), "close is one conditional PUT: {closed:?}");
    a.ok(&format!("open {id}"))?;
    let open = count("open (same host, layers cached)", &proxy);
    ensure!(open.len() <= 4, "{open:?}");
    a.ok("close")?;
    proxy.take_requests();
    let mut b = Host::start(w, "host-b", Some(&endpoint))?;
    b.ok("holder 0000000000000000")?;
    proxy.take_requests();
    b.ok(&format!("open {id}"))?;
    count("open (new host: image + 1 layer)", &proxy);
    b.ok("close")?;
    b.quit()?;
    proxy.take_requests();
    // Idle for 3 TTLs with 1 vessel open, then with 20.
    let mut idle = Vec::new();
    for n in [1usize, 19] {
        a.ok(&format!("create-many {n}"))?;
        proxy.take_requests();
        std::thread::sleep(Duration::from_millis(3 * TTL_MS));
        let reqs = count(&format!("3 TTLs idle, {} open", if n == 1 { 1 } else { 20 }), &proxy);
        ensure!(reqs.iter().all(|r| r.starts_with("PUT") && r.contains("leases/hosts")), "{reqs:?}");
        idle.push(reqs.len());
    }
    ensure!(idle[1] <= idle[0] + 1 && idle[1] <= 10, "idle cost grew with open vessels: {idle:?}");
    a.quit()?;
    count("quit (20 closes, heartbeat removed)", &proxy);
    eprintln!("object-store requests per operation (TTL {TTL_MS} ms):\n  {}", table.join("\n  "));
    Ok(())
}

/// Two host processes on one bucket: A deletes a source and collects
/// while B forks it 20 times; every fork B reported opens on A with its
/// content, and once they are deleted and collected, no object of any of
/// them is left in the bucket.
fn a_deletion_racing_forks_on_s3(w: &World) -> Result<()> {
    let mut a = Host::start(w, "host-a", None)?;
    let id = a.ok("create")?;
    a.sh("echo shared > /work/f")?;
    let snap = a.ok("snapshot")?;
    a.ok("close")?;
    let mut b = Host::start(w, "host-b", None)?;
    let (tx, rx) = std::sync::mpsc::channel();
    let forker = {
        let (id, snap) = (id.clone(), snap.clone());
        std::thread::spawn(move || -> Result<(Vec<String>, usize, Host)> {
            let (mut made, mut refused) = (Vec::new(), 0);
            for _ in 0..20 {
                match b.call(&format!("fork {id} {snap}"))? {
                    Ok(f) => {
                        made.push(f);
                        let _ = tx.send(());
                    }
                    Err(e) if e.contains("Conflict") || e.contains("NotFound") => refused += 1,
                    Err(e) => anyhow::bail!("fork failed: {e}"),
                }
            }
            Ok((made, refused, b))
        })
    };
    for _ in 0..3 {
        rx.recv_timeout(Duration::from_secs(60)).context("the forker made no fork")?;
    }
    a.ok(&format!("delete {id}"))?;
    a.ok("gc")?;
    let (made, refused, b) = forker.join().map_err(|_| anyhow::anyhow!("the forker panicked"))??;
    eprintln!("{} forks made, {refused} refused while the source was deleted", made.len());
    ensure!(made.len() >= 3);
    for f in &made {
        a.ok(&format!("open {f}"))?;
        ensure!(a.sh("cat /work/f")? == "shared\n", "fork {f} lost its content");
        a.ok("close")?;
        a.ok(&format!("delete {f}"))?;
    }
    a.ok("gc")?;
    use futures::TryStreamExt;
    let mut left = Vec::new();
    for prefix in ["vessels", "forks", "condemned"] {
        let p = w.s3().key(prefix);
        let keys: Vec<_> = TOKIO.block_on(w.s3().store().list(Some(&p)).try_collect::<Vec<_>>())?;
        left.extend(
            keys.into_iter()
                .map(|m| m.location.to_string())
                .filter(|k| k.contains(&id) || made.iter().any(|f| k.contains(f.as_str()))),
        );
    }
    ensure!(left.is_empty(), "objects left: {left:?}");
    b.quit()?;
    a.quit()?;
    Ok(())
}

// ---------------------------------------------------------------- proxy

/// A TCP relay in front of the S3 server that can drop every connection
/// and refuse new ones, as a server that went away (the server keeps its data).
struct Proxy {
    addr: std::net::SocketAddr,
    sent: Arc<AtomicU64>,
    limit: Arc<AtomicU64>,
    cut: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    /// `METHOD path?query` of every request relayed, in order.
    requests: Arc<Mutex<Vec<String>>>,
}

/// Follows HTTP/1.1 requests in a client's byte stream (bodies sized by
/// `Content-Length`, as object_store sends them) and logs each request line.
#[derive(Default)]
struct RequestParser {
    head: Vec<u8>,
    body_left: usize,
}

impl RequestParser {
    fn feed(&mut self, mut data: &[u8], log: &Mutex<Vec<String>>) {
        while !data.is_empty() {
            if self.body_left > 0 {
                let n = self.body_left.min(data.len());
                self.body_left -= n;
                data = &data[n..];
                continue;
            }
            self.head.push(data[0]);
            data = &data[1..];
            if self.head.ends_with(b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.head).into_owned();
                self.head.clear();
                let line = head.lines().next().unwrap_or_default();
                let mut parts = line.split(' ');
                let (method, target) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
                log.lock().unwrap().push(format!("{method} {target}"));
                self.body_left = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length").then(|| v.trim().parse().ok())?
                    })
                    .unwrap_or(0);
            }
        }
    }
}

impl Proxy {
    async fn start(upstream: &str) -> Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let me = Self {
            addr: listener.local_addr()?,
            sent: Arc::default(),
            limit: Arc::new(AtomicU64::new(u64::MAX)),
            cut: Arc::default(),
            conns: Arc::default(),
            requests: Arc::default(),
        };
        let (sent, limit, cut, conns, upstream) =
            (me.sent.clone(), me.limit.clone(), me.cut.clone(), me.conns.clone(), upstream.to_owned());
        let requests = me.requests.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if cut.load(Ordering::SeqCst) {
                    continue;
                }
                let (sent, limit, cut, upstream) = (sent.clone(), limit.clone(), cut.clone(), upstream.clone());
                let requests = requests.clone();
                let all = conns.clone();
                let task = tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else { return };
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let up = async {
                        let mut buf = vec![0u8; 64 << 10];
                        let mut parser = RequestParser::default();
                        loop {
                            let n = cr.read(&mut buf).await.unwrap_or(0);
                            parser.feed(&buf[..n], &requests);
                            if n == 0 || sw.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                            if sent.fetch_add(n as u64, Ordering::SeqCst) + n as u64 >= limit.load(Ordering::SeqCst) {
                                cut.store(true, Ordering::SeqCst);
                                break;
                            }
                        }
                    };
                    let down = async {
                        let _ = tokio::io::copy(&mut sr, &mut cw).await;
                    };
                    tokio::select! { _ = up => {}, _ = down => {} }
                });
                let mut all = all.lock().unwrap();
                all.retain(|t| !t.is_finished());
                all.push(task);
            }
        });
        // A watcher that drops every connection the moment the cut is made.
        let (cut, conns) = (me.cut.clone(), me.conns.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(5)).await;
                if cut.load(Ordering::SeqCst) {
                    for t in conns.lock().unwrap().drain(..) {
                        t.abort();
                    }
                }
            }
        });
        Ok(me)
    }

    /// The requests relayed since the last call.
    fn take_requests(&self) -> Vec<String> {
        std::mem::take(&mut *self.requests.lock().unwrap())
    }

    fn sent(&self) -> u64 {
        self.sent.load(Ordering::SeqCst)
    }

    fn cut_after(&self, bytes: u64) {
        self.limit.store(bytes, Ordering::SeqCst);
    }

    fn restore(&self) {
        self.limit.store(u64::MAX, Ordering::SeqCst);
        self.cut.store(false, Ordering::SeqCst);
    }
}

// ---------------------------------------------------------------- soak

#[path = "hosts/soak.rs"]
mod soak;

// ---------------------------------------------------------------- main

/// Agents still running (none may outlive the suite).
fn agents() -> Vec<String> {
    let Ok(all) = procfs::process::all_processes() else { return Vec::new() };
    all.flatten()
        .filter(|p| p.environ().is_ok_and(|e| e.contains_key(std::ffi::OsStr::new(AGENT))))
        .map(|p| p.pid().to_string())
        .collect()
}

fn main() {
    vessel::init();
    if std::env::var_os(AGENT).is_some() {
        agent();
    }
    let args = Arguments::from_args();
    let Some(image_dir) = support::root_with_test_image("hosts") else { return };
    let Some(base_url) = support::env_path("hosts", "VESSEL_S3_URL") else { return };
    let base_url = base_url.to_string_lossy().into_owned();
    let tmp = Arc::new(tempfile::tempdir().unwrap());
    type Case = fn(&World) -> Result<()>;
    let cases: Vec<(&str, Case)> = vec![
        ("two_hosts_share_a_vessel", two_hosts_share_a_vessel),
        ("busy_until_a_killed_host_expires", busy_until_a_killed_host_expires),
        ("a_paused_host_cannot_commit", a_paused_host_cannot_commit),
        ("the_server_going_away_mid_upload", the_server_going_away_mid_upload),
        ("a_killed_upload_is_aborted_by_gc", a_killed_upload_is_aborted_by_gc),
        ("truncated_and_tampered_objects_are_corrupt", truncated_and_tampered_objects_are_corrupt),
        ("request_costs", request_costs),
        ("a_deletion_racing_forks_on_s3", a_deletion_racing_forks_on_s3),
        ("a_snapshot_replaced_by_a_bomb_is_refused", a_snapshot_replaced_by_a_bomb_is_refused),
        ("soak", soak::soak),
        ("soak_local_quota", soak::soak_local_quota),
    ];
    let trials = cases
        .into_iter()
        .map(|(name, case)| {
            let (tmp, image_dir, base_url) = (tmp.clone(), image_dir.clone(), base_url.clone());
            Trial::test(name, move || {
                let world =
                    World::new(&base_url, tmp.path(), &image_dir, name).map_err(|e| Failed::from(format!("{e:#}")))?;
                case(&world).map_err(|e| Failed::from(format!("{e:#}")))
            })
        })
        .collect();
    let conclusion = libtest_mimic::run(&args, trials);
    let leaks = [
        ("mounts", support::shown(support::mounts_under(tmp.path()))),
        ("cgroups", support::shown(support::leftover_cgroups())),
        ("agent processes", agents()),
    ];
    let tmp = Arc::try_unwrap(tmp).map(tempfile::TempDir::keep).unwrap_or_else(|t| t.path().to_owned());
    support::finish(&tmp, &leaks, conclusion)
}
