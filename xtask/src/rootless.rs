//! Rootless runs: an ordinary test user with subordinate ids (as
//! `useradd` gives every user on Debian), one without, and the suites that
//! run as that user (their binaries and the test image copied where it can
//! reach them: the checkout may be under root's home), first with no cgroup
//! of the user's, then with a cgroup v1 subtree delegated to it. After the
//! suites, a leak check as root: no process of the user or its subordinate
//! range is left, nothing is mounted under its dirs, no cgroup of a run.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::util::{output, run};

/// The test user, with subordinate ids.
pub(crate) const USER: &str = "vessel-rootless";
/// A user without subordinate ids (rootless is refused, typed).
pub(crate) const NOSUB_USER: &str = "vessel-nosub";

/// The suites (test targets of the `vessel` crate) that run as the user.
const SUITES: &[&str] = &["facade", "escape", "cli"];

pub(crate) struct TestUser {
    pub(crate) uid: u32,
    /// Its first subordinate uid and how many.
    sub: (u64, u64),
    /// Where its copies of the binaries and the image live (removed on drop).
    dir: PathBuf,
}

fn id_of(user: &str) -> Option<u32> {
    let out = Command::new("id").args(["-u", user]).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().parse().ok()).flatten()
}

/// `user`'s first range in `/etc/subuid`.
fn subordinate(user: &str) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/etc/subuid").ok()?;
    text.lines().find_map(|l| {
        let mut f = l.split(':');
        (f.next()? == user).then_some(())?;
        Some((f.next()?.parse().ok()?, f.next()?.parse().ok()?))
    })
}

/// A free range of 65536 ids above every range in `/etc/subuid`.
fn free_range() -> u64 {
    let text = std::fs::read_to_string("/etc/subuid").unwrap_or_default();
    let end = text
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            Some(f.get(1)?.parse::<u64>().ok()? + f.get(2)?.parse::<u64>().ok()?)
        })
        .max()
        .unwrap_or(100_000);
    end.max(100_000)
}

impl TestUser {
    /// Creates the users if missing (idempotent) and their runtime dir.
    pub(crate) fn ensure() -> Result<Self> {
        if id_of(USER).is_none() {
            run(Command::new("useradd").args(["-m", "-s", "/bin/sh", USER]))?;
        }
        if subordinate(USER).is_none_or(|(_, n)| n < 65536) {
            let start = free_range();
            let range = format!("{start}-{}", start + 65535);
            run(Command::new("usermod").args(["--add-subuids", &range, "--add-subgids", &range, USER]))?;
        }
        if id_of(NOSUB_USER).is_none() {
            run(Command::new("useradd").args(["-M", "-s", "/usr/sbin/nologin"]).args([
                "-K",
                "SUB_UID_COUNT=0",
                "-K",
                "SUB_GID_COUNT=0",
                NOSUB_USER,
            ]))?;
        }
        if subordinate(NOSUB_USER).is_some() {
            bail!("{NOSUB_USER} has subordinate ids; remove them from /etc/subuid and /etc/subgid");
        }
        let uid = id_of(USER).context("the test user")?;
        let sub = subordinate(USER).context("the test user's subordinate ids")?;
        // What a login session (systemd-logind) would make: $XDG_RUNTIME_DIR.
        let runtime = PathBuf::from(format!("/run/user/{uid}"));
        std::fs::create_dir_all(&runtime)?;
        chown(&runtime, uid)?;
        set_mode(&runtime, 0o700)?;
        let dir = PathBuf::from(format!("/tmp/vessel-rootless-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("bin"))?;
        set_mode(&dir, 0o755)?;
        println!("rootless: test user {USER} (uid {uid}, subordinate ids {}+{})", sub.0, sub.1);
        Ok(Self { uid, sub, dir })
    }

    /// Environment for the suites run as root that start rootless agents.
    pub(crate) fn env(&self) -> Vec<(&'static str, String)> {
        vec![("VESSEL_ROOTLESS_USER", USER.into()), ("VESSEL_NOSUB_USER", NOSUB_USER.into())]
    }

    /// Runs the rootless suites as the user: `executables` maps each test
    /// target (and `vessel`, the CLI) to its binary.
    pub(crate) fn run_suites(
        &self,
        executables: &[(String, PathBuf)],
        image_dir: &Path,
        extra_env: &[(&str, String)],
    ) -> Result<()> {
        let bin = self.dir.join("bin");
        let image = self.dir.join("image");
        let tmp = self.dir.join("tmp");
        run(Command::new("cp").arg("-a").arg(image_dir).arg(&image))?;
        std::fs::create_dir_all(&tmp)?;
        let mut copied = Vec::new();
        for name in SUITES.iter().chain(&["vessel", "network"]) {
            let (_, exe) = executables.iter().find(|(n, _)| n == name).with_context(|| format!("no binary {name}"))?;
            let to = bin.join(name);
            std::fs::copy(exe, &to)?;
            copied.push((name.to_string(), to));
        }
        run(Command::new("chown").arg("-R").arg(format!("{USER}:")).arg(&image).arg(&tmp))?;
        let home = PathBuf::from(
            output(Command::new("sh").args(["-c", &format!("getent passwd {USER} | cut -d: -f6")]))?.trim(),
        );
        let mut env: Vec<(String, String)> = vec![
            ("VESSEL_TEST_IMAGE_DIR".into(), image.display().to_string()),
            ("TMPDIR".into(), tmp.display().to_string()),
            ("HOME".into(), home.display().to_string()),
            ("XDG_RUNTIME_DIR".into(), format!("/run/user/{}", self.uid)),
            ("VESSEL_CLI_BIN".into(), bin.join("vessel").display().to_string()),
            ("PATH".into(), std::env::var("PATH").unwrap_or_default()),
            ("RUST_BACKTRACE".into(), "1".into()),
        ];
        if let Some(ci) = std::env::var_os("CI") {
            env.push(("CI".into(), ci.to_string_lossy().into_owned()));
        }
        env.extend(extra_env.iter().map(|(k, v)| (k.to_string(), v.clone())));
        let suite_in = |name: &str, how: &str, netns: Option<&str>| -> Result<()> {
            let (_, exe) = copied.iter().find(|(n, _)| n == name).context("suite")?;
            println!("rootless: the {name} suite as {USER} ({how})");
            // The network suite runs in the fake internet: entered here, as
            // root, since the user may not.
            let mut cmd = match netns {
                Some(ns) => {
                    let mut c = Command::new("nsenter");
                    c.arg(format!("--net=/run/netns/{ns}")).args(["--", "runuser"]);
                    c
                }
                None => Command::new("runuser"),
            };
            cmd.args(["-u", USER, "--", "env", "-i"]);
            cmd.args(env.iter().map(|(k, v)| format!("{k}={v}")));
            if netns.is_some() {
                cmd.arg("VESSEL_FAKENET_INSIDE=1");
            }
            cmd.arg(exe).args(["--test-threads", "2"]);
            run(&mut cmd)
        };
        let suite = |name: &str, how: &str| suite_in(name, how, None);
        let netns = extra_env.iter().find(|(k, _)| *k == "VESSEL_FAKENET").map(|(_, v)| v.clone());
        // First with no cgroup of the user's (limits reported unavailable),
        // then with a delegated subtree (limits enforced).
        suite("facade", "no cgroup delegated")?;
        let delegated = self.delegate()?;
        let ran = (|| {
            for name in SUITES {
                suite(name, "a cgroup subtree delegated")?;
            }
            if let Some(ns) = &netns {
                suite_in("network", "in the fake internet, through pasta", Some(ns))?;
            }
            self.leak_check()
        })();
        self.undelegate(&delegated);
        ran
    }

    /// The cgroup v1 memory, cpu and pids hierarchies' mount points.
    fn controller_mounts() -> Result<Vec<PathBuf>> {
        let info = std::fs::read_to_string("/proc/self/mountinfo")?;
        let mut out = Vec::new();
        for c in ["memory", "cpu", "pids"] {
            let m = info.lines().find_map(|l| {
                let (pre, post) = l.split_once(" - ")?;
                let mut post = post.split(' ');
                let (fs, _, opts) = (post.next()?, post.next()?, post.next()?);
                let point = pre.split(' ').nth(4)?;
                (fs == "cgroup" && opts.split(',').any(|o| o == c)).then(|| PathBuf::from(point))
            });
            out.push(m.with_context(|| format!("no cgroup v1 {c} controller to delegate"))?);
        }
        Ok(out)
    }

    /// Delegates `vessel-<uid>` in each to the user, as `cgcreate -a -t` does.
    fn delegate(&self) -> Result<Vec<PathBuf>> {
        let mut dirs = Vec::new();
        for m in Self::controller_mounts()? {
            let d = m.join(format!("vessel-{}", self.uid));
            std::fs::create_dir_all(&d)?;
            // The subtree and its control files, not the cgroups under it:
            // `runs` (left by an earlier run) stays its maker's, container
            // root, who must be able to remove the runs' cgroups in it.
            let own = format!("{}:{}", self.uid, self.uid);
            std::os::unix::fs::chown(&d, Some(self.uid), Some(self.uid))
                .with_context(|| format!("chown {own} {}", d.display()))?;
            for e in std::fs::read_dir(&d)?.flatten() {
                if e.file_type().is_ok_and(|t| t.is_file()) {
                    std::os::unix::fs::chown(e.path(), Some(self.uid), Some(self.uid))?;
                }
            }
            dirs.push(d);
        }
        Ok(dirs)
    }

    fn undelegate(&self, dirs: &[PathBuf]) {
        for d in dirs {
            let _ = std::fs::remove_dir(d.join("runs"));
            let _ = std::fs::remove_dir(d);
        }
    }

    /// As root: nothing of the user's is left running or mounted.
    fn leak_check(&self) -> Result<()> {
        std::thread::sleep(std::time::Duration::from_millis(500));
        let mut left = Vec::new();
        for e in std::fs::read_dir("/proc")?.flatten() {
            let Ok(status) = std::fs::read_to_string(e.path().join("status")) else { continue };
            let Some(uid) = status.lines().find(|l| l.starts_with("Uid:")).and_then(|l| l.split_whitespace().nth(1))
            else {
                continue;
            };
            let Ok(uid) = uid.parse::<u64>() else { continue };
            if uid == u64::from(self.uid) || (self.sub.0..self.sub.0 + self.sub.1).contains(&uid) {
                let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
                left.push(format!(
                    "{} uid {uid} {:?}",
                    e.file_name().to_string_lossy(),
                    String::from_utf8_lossy(&cmdline)
                ));
            }
        }
        let mounts = std::fs::read_to_string("/proc/self/mountinfo")?;
        let dir = self.dir.display().to_string();
        left.extend(mounts.lines().filter(|l| l.contains(&dir)).map(str::to_owned));
        // No run's cgroup left in the user's delegated subtree.
        for m in Self::controller_mounts()? {
            let d = m.join(format!("vessel-{}", self.uid)).join("runs");
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                if e.path().is_dir() {
                    left.push(format!("cgroup {}", e.path().display()));
                }
            }
        }
        if !left.is_empty() {
            bail!("rootless leak check: left behind:\n{}", left.join("\n"));
        }
        println!(
            "rootless leak check (as root): no process of {USER} or its subordinate ids, nothing mounted, no cgroup"
        );
        Ok(())
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn chown(p: &Path, uid: u32) -> Result<()> {
    run(Command::new("chown").arg(format!("{uid}:{uid}")).arg(p))
}

fn set_mode(p: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// The `vessel` crate's integration test binaries and its CLI binary that
/// `cargo test --no-run` builds, by target name.
pub(crate) fn test_executables(root: &Path, args: &[&str]) -> Result<Vec<(String, PathBuf)>> {
    let out = output(crate::util::cargo(root).args(["test", "--no-run", "--message-format=json"]).args(args))?;
    let mut found = Vec::new();
    for line in out.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        let manifest = v["manifest_path"].as_str().unwrap_or_default();
        if v["reason"] != "compiler-artifact" || !manifest.ends_with("/vessel/Cargo.toml") {
            continue;
        }
        let kind = &v["target"]["kind"][0];
        let test_build = v["profile"]["test"].as_bool().unwrap_or(false);
        let wanted = (kind == "test" && test_build) || (kind == "bin" && !test_build);
        if let (true, Some(name), Some(exe)) = (wanted, v["target"]["name"].as_str(), v["executable"].as_str()) {
            found.push((name.to_owned(), PathBuf::from(exe)));
        }
    }
    Ok(found)
}
