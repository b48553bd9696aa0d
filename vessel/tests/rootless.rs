//! Rootless and rootful vessels are the same vessels. Three "hosts", each
//! a separate process (this binary re-run as an agent) on one S3 bucket:
//! root in rootful mode, an ordinary user with subordinate ids
//! (`VESSEL_ROOTLESS_USER`, which `cargo xtask test` creates) in rootless
//! mode, and root in rootless mode (`VESSEL_ROOTLESS=1`). Covered: the
//! same change is the same layer tar in every mode (owners, modes, links,
//! xattrs, whiteouts, opaque directories; everything but mtimes); a vessel
//! snapshotted in one mode reopens exact in the others, both ways round;
//! after all cases no agent is left and, for the user, nothing mounted.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Arc, LazyLock};

use anyhow::{Context, Result, anyhow, ensure};
use base64::Engine;
use libtest_mimic::{Arguments, Failed, Trial};
use tokio::io::AsyncReadExt;
use vessel::{ExecOptions, Manager, ManagerConfig, Storage};
use vessel_test_support as support;

static TOKIO: LazyLock<tokio::runtime::Runtime> =
    LazyLock::new(|| tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap());

const AGENT: &str = "VESSEL_ROOTLESS_AGENT";
const IMAGE: &str = "local/busybox:latest";

/// The tree under `/w` as `stat` and `md5sum` see it (container view).
const TREE: &str = "cd /w && find . | sort | while read f; do stat -c '%n %F %a %u:%g %s %N' \"$f\"; done; \
                    find . -type f | sort | xargs -r md5sum; ls /bin/vi 2>&1 || true";

/// A first step: files of several owners and modes, setuid, hard and
/// symbolic links, a FIFO, an empty dir, a whiteout of an image file.
const STEP_ONE: &str = "set -e; mkdir -p /w/d/e /w/od /w/x/y /w/empty; echo data > /w/d/e/f; ln /w/d/e/f /w/hard; \
                        ln -s d/e/f /w/soft; chmod 4755 /w/d/e/f; chown 123:456 /w/hard; mkfifo /w/fifo; \
                        echo kept > /w/od/a; echo 1 > /w/x/y/1; echo 2 > /w/x/2; chmod 700 /w/x; \
                        chown -R 1000:1000 /w/x; rm -f /bin/vi; echo ok";

/// A second step on top: an opaque directory (replaced whole), deletions
/// in the layer below, a changed owner.
const STEP_TWO: &str = "set -e; rm -rf /w/x; mkdir /w/x; echo new > /w/x/new; rm /w/soft; chown 7:8 /w/od/a; \
                        echo more >> /w/d/e/f; echo ok";

// ---------------------------------------------------------------- agent

/// One host in this process's mode. Commands, one per line; replies
/// `ok …` or `err <kind> <message>`.
fn agent() -> ! {
    let env = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("{k} unset"));
    let config = ManagerConfig::default()
        .shared_storage(TOKIO.block_on(vessel::open_url(&env("VESSEL_AGENT_STORAGE"))).expect("storage"))
        .mount_root(env("VESSEL_AGENT_ROOT"))
        .host_name(env("VESSEL_AGENT_NAME"))
        .disk_quota(None)
        .default_limits(vessel::Limits::default());
    let mgr = match TOKIO.block_on(Manager::new(config)) {
        Ok(m) => m,
        Err(e) => {
            // Every command gets the reason (what a probe of a user
            // without subordinate ids expects).
            println!("err {:?} {}", e.kind(), format!("{e:#}").replace('\n', " "));
            std::process::exit(0)
        }
    };
    let mut vessel: Option<vessel::Vessel> = None;
    let stdout = std::io::stdout();
    for line in std::io::stdin().lock().lines() {
        let line = line.expect("stdin");
        let (cmd, arg) = line.split_once(' ').unwrap_or((&line, ""));
        let reply: std::result::Result<String, vessel::VesselError> = TOKIO.block_on(async {
            let open = || vessel.as_ref().expect("no vessel open");
            match cmd {
                "mode" => Ok(if mgr.is_rootless() { "rootless" } else { "rootful" }.into()),
                "create" => {
                    let v = mgr.create_vessel(IMAGE, "/").await?;
                    // The first snapshot holds what opening made (as `vessel create`).
                    v.create_snapshot("create").await?;
                    let id = v.id().to_string();
                    vessel = Some(v);
                    Ok(id)
                }
                "open" => {
                    vessel = Some(mgr.open_vessel(arg).await?);
                    Ok(String::new())
                }
                "sh" => {
                    let (mut out, mut err) = (Vec::new(), Vec::new());
                    let res = open()
                        .exec(ExecOptions {
                            command: vec!["sh".into(), "-c".into(), arg.into()],
                            stdout: Some(Box::new(&mut out)),
                            stderr: Some(Box::new(&mut err)),
                            persist_result: true,
                            ..Default::default()
                        })
                        .await?;
                    let b64 = |d: &[u8]| base64::engine::general_purpose::STANDARD.encode(d);
                    Ok(format!("{} {} {}", res.exit_code, b64(&out), b64(&err)))
                }
                "xattr" => {
                    // `path name value`, set as the vessel's root would (a
                    // command with setfattr), through the mounted rootfs.
                    let mut f = arg.splitn(3, ' ');
                    let (p, n, val) = (f.next().unwrap(), f.next().unwrap(), f.next().unwrap());
                    let v = open();
                    let root = v.id_mapping().map_or(0, |m| m.host_id);
                    let target = v.rootfs().join(p.trim_start_matches('/'));
                    vessel::runtime::idmap::as_host_ids(root, root, || xattr::set(&target, n, val.as_bytes()))
                        .map_err(|e| vessel::VesselError::InvalidInput(format!("setxattr {p}: {e}")))?;
                    Ok(String::new())
                }
                "snapshot" => {
                    let s = open().create_snapshot("step").await?;
                    Ok(format!("{} {}", s.id, s.checksum))
                }
                "close" => {
                    if let Some(v) = vessel.take() {
                        v.close().await?;
                    }
                    Ok(String::new())
                }
                "quit" => {
                    if let Some(v) = vessel.take() {
                        v.close().await?;
                    }
                    mgr.close().await?;
                    std::process::exit(0)
                }
                other => panic!("unknown agent command {other}"),
            }
        });
        let mut out = stdout.lock();
        match reply {
            Ok(s) => writeln!(out, "ok {s}"),
            Err(e) => writeln!(out, "err {:?} {}", e.kind(), format!("{e:#}").replace('\n', " ")),
        }
        .and_then(|()| out.flush())
        .expect("stdout");
    }
    // The test went away: leave nothing mounted.
    drop(vessel);
    let _ = TOKIO.block_on(mgr.close());
    std::process::exit(0)
}

// ---------------------------------------------------------------- test side

/// How an agent runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Root, rootful.
    Rootful,
    /// The test user, rootless.
    User,
    /// Root, rootless (`VESSEL_ROOTLESS=1`).
    RootRootless,
}

struct World {
    storage_url: String,
    base: PathBuf,
    user: String,
    /// A copy of this binary the user can reach (the build dir may not be).
    agent_exe: PathBuf,
}

struct Agent {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl Agent {
    fn start(w: &World, mode: Mode, name: &str) -> Result<Self> {
        let mut a = Self::spawn(w, mode, &w.user, name)?;
        let want = if mode == Mode::Rootful { "rootful" } else { "rootless" };
        let got = a.ok("mode")?;
        ensure!(got == want, "{name}: a {mode:?} agent runs {got}");
        Ok(a)
    }

    fn spawn(w: &World, mode: Mode, user: &str, name: &str) -> Result<Self> {
        let exe = std::env::current_exe()?;
        let root = w.base.join(name);
        std::fs::create_dir_all(&root)?;
        let mut vars: Vec<(String, String)> = vec![
            (AGENT.into(), "1".into()),
            ("VESSEL_AGENT_STORAGE".into(), w.storage_url.clone()),
            ("VESSEL_AGENT_ROOT".into(), root.join("mounts").display().to_string()),
            ("VESSEL_AGENT_NAME".into(), name.into()),
        ];
        for k in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_ALLOW_HTTP"] {
            if let Ok(v) = std::env::var(k) {
                vars.push((k.into(), v));
            }
        }
        let mut cmd = match mode {
            Mode::User => {
                // The user's own dirs, as its login would have them.
                let home = root.join("home");
                std::fs::create_dir_all(&home)?;
                let uid = nix::unistd::User::from_name(user)?.context("no such user")?.uid;
                for d in [&root, &home] {
                    nix::unistd::chown(d, Some(uid), None)?;
                }
                vars.push(("HOME".into(), home.display().to_string()));
                vars.push(("TMPDIR".into(), home.display().to_string()));
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--", "env"]);
                c.args(vars.iter().map(|(k, v)| format!("{k}={v}")));
                c.arg(&w.agent_exe);
                c
            }
            Mode::Rootful | Mode::RootRootless => {
                let mut c = Command::new(&exe);
                c.envs(vars.iter().map(|(k, v)| (k, v)));
                c.env("VESSEL_ROOTLESS", if mode == Mode::Rootful { "0" } else { "1" });
                c
            }
        };
        let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).spawn()?;
        let stdin = child.stdin.take().context("stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("stdout")?);
        Ok(Self { child, stdin: Some(stdin), stdout })
    }

    fn ask(&mut self, line: &str) -> Result<std::result::Result<String, String>> {
        let stdin = self.stdin.as_mut().context("the agent's stdin is closed")?;
        writeln!(stdin, "{line}")?;
        stdin.flush()?;
        let mut reply = String::new();
        self.stdout.read_line(&mut reply)?;
        let reply = reply.trim_end_matches('\n');
        Ok(match reply.split_once(' ') {
            Some(("ok", rest)) => Ok(rest.to_owned()),
            _ if reply == "ok" => Ok(String::new()),
            _ if reply.is_empty() => return Err(anyhow!("the agent died on {line:?}")),
            _ => Err(reply.to_owned()),
        })
    }

    fn ok(&mut self, line: &str) -> Result<String> {
        self.ask(line)?.map_err(|e| anyhow!("{line:?}: {e}"))
    }

    /// Runs `script` (persisting); its stdout.
    fn sh(&mut self, script: &str) -> Result<String> {
        let r = self.ok(&format!("sh {script}"))?;
        let mut f = r.split(' ');
        let (code, out, err) =
            (f.next().unwrap_or_default(), f.next().unwrap_or_default(), f.next().unwrap_or_default());
        let text = |b: &str| -> Result<String> {
            Ok(String::from_utf8(base64::engine::general_purpose::STANDARD.decode(b)?)?)
        };
        let (out, err) = (text(out)?, text(err)?);
        ensure!(code == "0", "{script:?} exited {code}: {out}{err}");
        Ok(out)
    }

    /// Snapshots: (snapshot id, checksum).
    fn snapshot(&mut self) -> Result<(String, String)> {
        let r = self.ok("snapshot")?;
        let (id, sum) = r.split_once(' ').context("snapshot reply")?;
        Ok((id.to_owned(), sum.to_owned()))
    }

    fn quit(mut self) -> Result<()> {
        self.ok("quit").ok();
        let status = self.child.wait()?;
        ensure!(status.success(), "agent exited {status}");
        Ok(())
    }
}

impl Drop for Agent {
    /// A failed case's agent: end of input makes it close its manager
    /// (unmounting everything); killed only if it does not exit.
    fn drop(&mut self) {
        drop(self.stdin.take());
        for _ in 0..200 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A layer's entries, byte for byte but for mtimes: each entry's path,
/// its 512-byte header with the mtime and checksum fields blanked (owners,
/// modes, types, sizes, link names as written), its PAX records but
/// times (xattrs, long names), and the hash of its data.
async fn layer_entries(storage: &dyn Storage, vessel: &str, snapshot: &str) -> Result<Vec<String>> {
    use sha2::Digest;
    let (v, s) = (vessel::VesselId::new(vessel)?, vessel::SnapshotId::new(snapshot)?);
    let mut blob = Vec::new();
    storage.load_snapshot(&v, &s).await?.read_to_end(&mut blob).await?;
    let mut out = Vec::new();
    let mut archive = tar::Archive::new(std::io::Cursor::new(blob));
    for e in archive.entries()? {
        let mut e = e?;
        let path = e.path()?.display().to_string();
        let mut header = *e.header().as_bytes();
        header[136..156].fill(0);
        let mut pax = BTreeMap::new();
        if let Some(exts) = e.pax_extensions()? {
            for x in exts {
                let x = x?;
                let key = x.key()?.to_owned();
                if !matches!(key.as_str(), "mtime" | "atime" | "ctime") {
                    pax.insert(key, String::from_utf8_lossy(x.value_bytes()).into_owned());
                }
            }
        }
        let mut data = Vec::new();
        e.read_to_end(&mut data)?;
        let h = e.header();
        out.push(format!(
            "{path} {:?} mode {} owner {}:{} header {:x} pax {pax:?} data {:x}",
            h.entry_type(),
            String::from_utf8_lossy(&header[100..107]),
            String::from_utf8_lossy(&header[108..115]),
            String::from_utf8_lossy(&header[116..123]),
            sha2::Sha256::digest(header),
            sha2::Sha256::digest(&data)
        ));
    }
    Ok(out)
}

/// The same two steps in every mode: each step's layer has the same
/// entries (mtimes aside) in all three, whiteouts and the opaque marker
/// included, and each mode reads the same tree.
async fn the_same_change_is_the_same_layer_in_every_mode(w: Arc<World>) -> Result<()> {
    let storage = vessel::open_url(&w.storage_url).await?;
    let mut layers: Vec<(Mode, Vec<Vec<String>>, String)> = Vec::new();
    for (mode, name) in [(Mode::Rootful, "same-a"), (Mode::User, "same-b"), (Mode::RootRootless, "same-c")] {
        let mut a = Agent::start(&w, mode, name)?;
        let id = a.ok("create")?;
        ensure!(a.sh(STEP_ONE)? == "ok\n");
        a.ok("xattr /w/d user.k v1")?;
        // Data in every mode, never an overlay marker: /w/od keeps its file.
        a.ok("xattr /w/od user.overlay.opaque y")?;
        let (s1, _) = a.snapshot()?;
        ensure!(a.sh(STEP_TWO)? == "ok\n");
        let (s2, _) = a.snapshot()?;
        let tree = a.sh(TREE)?;
        a.quit()?;
        let entries = vec![layer_entries(&*storage, &id, &s1).await?, layer_entries(&*storage, &id, &s2).await?];
        layers.push((mode, entries, tree));
    }
    let (_, want, tree) = &layers[0];
    let two = want[1].join("\n");
    ensure!(two.contains("w/x/.wh..wh..opq") && two.contains("w/.wh.soft"), "step two's layer:\n{two}");
    ensure!(want[0].iter().any(|e| e.starts_with("bin/.wh.vi ")), "step one's layer: {want:?}");
    ensure!(
        want[0].iter().any(|e| e.starts_with("w/od/ ") && e.contains("SCHILY.xattr.user.overlay.opaque")),
        "{want:?}"
    );
    ensure!(want[0].iter().any(|e| e.starts_with("w/hard ") && e.contains("owner 0000173:0000710")), "{want:?}");
    ensure!(tree.contains("./od/a") && tree.contains("./x/new") && !tree.contains("./x/2"), "{tree}");
    for (mode, got, got_tree) in &layers[1..] {
        for (step, (g, w)) in got.iter().zip(want).enumerate() {
            ensure!(g == w, "{mode:?}, step {}: layer\n{}\nwant (rootful)\n{}", step + 1, g.join("\n"), w.join("\n"));
        }
        ensure!(got_tree == tree, "{mode:?} tree:\n{got_tree}\nwant (rootful):\n{tree}");
    }
    Ok(())
}

/// One vessel through every mode and back: rootful -> rootless user ->
/// rootless root -> rootful -> rootless user; each host opens the last
/// one's snapshot exact, changes it, and snapshots.
async fn a_vessel_moves_between_modes_exact(w: Arc<World>) -> Result<()> {
    let hops = [
        (Mode::Rootful, "hop-a"),
        (Mode::User, "hop-b"),
        (Mode::RootRootless, "hop-c"),
        (Mode::Rootful, "hop-a"),
        (Mode::User, "hop-b"),
    ];
    let mut id = String::new();
    let mut tree = String::new();
    for (i, (mode, name)) in hops.iter().enumerate() {
        let mut a = Agent::start(&w, *mode, name)?;
        if i == 0 {
            id = a.ok("create")?;
            ensure!(a.sh(STEP_ONE)? == "ok\n");
            a.ok("xattr /w/d user.k v1")?;
        } else {
            a.ok(&format!("open {id}"))?;
            let got = a.sh(TREE)?;
            ensure!(got == tree, "hop {i} ({mode:?}) opened:\n{got}\nwant:\n{tree}");
            let step = if i == 1 {
                STEP_TWO.to_owned()
            } else {
                format!("echo {i} > /w/hop-{i}; rm -f /w/hop-{}; echo ok", i - 1)
            };
            ensure!(a.sh(&step)? == "ok\n");
        }
        a.snapshot()?;
        tree = a.sh(TREE)?;
        a.ok("close")?;
        a.quit()?;
    }
    ensure!(tree.contains("./hop-4") && !tree.contains("./hop-3") && tree.contains("./x/new"), "{tree}");
    Ok(())
}

/// A user without subordinate ids (`VESSEL_NOSUB_USER`) cannot run
/// rootless: a typed `Unavailable` that says what to add, and nothing made.
async fn a_user_without_subordinate_ids_is_told_why(w: Arc<World>) -> Result<()> {
    let Some(user) = support::required_env("rootless", "VESSEL_NOSUB_USER") else { return Ok(()) };
    let mut a = Agent::spawn(&w, Mode::User, &user.to_string_lossy(), "nosub")?;
    let reply = a.ask("mode")?;
    let err = reply.err().context("a user without subordinate ids runs vessel")?;
    ensure!(
        err.starts_with("err Unavailable") && err.contains("/etc/subuid") && err.contains("--add-subuids"),
        "{err}"
    );
    ensure!(!w.base.join("nosub/mounts").exists(), "the refused manager made its mount root");
    Ok(())
}

fn main() {
    vessel::init();
    if std::env::var_os(AGENT).is_some() {
        agent();
    }
    let args = Arguments::from_args();
    let Some(image_dir) = support::root_with_test_image("rootless") else { return };
    if !nix::unistd::geteuid().is_root() || vessel::runtime::rootless::mode().is_rootless() {
        support::skip("rootless", "the cross-mode tests run as root (and start the rootless agents)");
        return;
    }
    let Some(user) = support::required_env("rootless", "VESSEL_ROOTLESS_USER") else { return };
    let Some(s3) = support::required_env("rootless", "VESSEL_S3_URL") else { return };
    let user = user.to_string_lossy().into_owned();
    let uid = nix::unistd::User::from_name(&user).ok().flatten().map(|u| u.uid.as_raw()).expect("the test user");
    let tmp = tempfile::tempdir().unwrap();
    // Every agent (the user's included) reaches it: 0711 down to the roots.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    }
    let storage_url = format!("{}/rootless-{}", s3.to_string_lossy().trim_end_matches('/'), std::process::id());
    let agent_exe = tmp.path().join("agent");
    std::fs::copy(std::env::current_exe().unwrap(), &agent_exe).unwrap();
    let w = Arc::new(World { storage_url, base: tmp.path().to_path_buf(), user, agent_exe });
    TOKIO.block_on(async {
        let src = vessel::LocalStorage::new(image_dir.join("storage")).unwrap();
        let r = vessel::ImageRef::new(IMAGE).unwrap();
        let mut data = Vec::new();
        src.load_image(&r).await.unwrap().read_to_end(&mut data).await.unwrap();
        let dst = vessel::open_url(&w.storage_url).await.unwrap();
        dst.save_image(&r, Box::new(std::io::Cursor::new(data))).await.unwrap();
    });
    type Case = fn(Arc<World>) -> std::pin::Pin<Box<dyn Future<Output = Result<()>> + Send>>;
    let cases: Vec<(&str, Case)> = vec![
        ("the_same_change_is_the_same_layer_in_every_mode", |w| {
            Box::pin(the_same_change_is_the_same_layer_in_every_mode(w))
        }),
        ("a_vessel_moves_between_modes_exact", |w| Box::pin(a_vessel_moves_between_modes_exact(w))),
        ("a_user_without_subordinate_ids_is_told_why", |w| Box::pin(a_user_without_subordinate_ids_is_told_why(w))),
    ];
    let trials = cases
        .into_iter()
        .map(|(name, case)| {
            let w = w.clone();
            Trial::test(name, move || TOKIO.block_on(case(w)).map_err(|e| Failed::from(format!("{e:#}"))))
        })
        .collect();
    let conclusion = libtest_mimic::run(&args, trials);
    let leaks = [
        ("mounts", support::shown(support::mounts_under(tmp.path()))),
        ("processes of the test user", user_processes(uid)),
    ];
    support::finish(tmp.path(), &leaks, conclusion)
}

/// Processes of host uid `uid` (the rootless agents' own id) still running.
fn user_processes(uid: u32) -> Vec<String> {
    let Ok(all) = procfs::process::all_processes() else { return vec!["<procfs unreadable>".into()] };
    all.flatten()
        .filter(|p| p.uid().is_ok_and(|u| u == uid))
        .map(|p| format!("{} {:?}", p.pid(), p.cmdline().unwrap_or_default()))
        .collect()
}
