//! Cgroups, in one place: the OOM count of a run's cgroup (either
//! version, the hybrid layout's unified mount too); a user's delegated v1
//! subtree for rootless limits (found, its runs' cgroups made and limited
//! by the youki runner, removed, stale ones found); and what the runner
//! does about libcontainer's own cgroups (hidden rootless, leftovers
//! removed).

use std::fs;
#[cfg(feature = "youki")]
use std::fs::File;
#[cfg(feature = "youki")]
use std::io::Write;
use std::path::PathBuf;

/// How many processes the OOM killer killed in the cgroup at
/// `cgroups_path` (e.g. `/vessel/<id>`): v1's `memory.oom_control` and v2's
/// `memory.events` (the hybrid layout's `unified` mount included).
#[cfg(any(feature = "youki", feature = "containerd"))]
pub(crate) fn oom_kills(cgroups_path: &str) -> u64 {
    let rel = cgroups_path.trim_start_matches('/');
    let root = std::path::Path::new("/sys/fs/cgroup");
    let files = [
        root.join("memory").join(rel).join("memory.oom_control"),
        root.join(rel).join("memory.events"),
        root.join("unified").join(rel).join("memory.events"),
    ];
    files
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .filter_map(|text| {
            text.lines().find_map(|l| l.strip_prefix("oom_kill ").and_then(|n| n.trim().parse::<u64>().ok()))
        })
        .max()
        .unwrap_or(0)
}

/// The controllers rootless limits use, in cgroup v1: a user's delegated
/// subtree is `vessel-<uid>` in each (see [`delegated_cgroups`]).
pub const LIMIT_CONTROLLERS: [&str; 3] = ["memory", "cpu", "pids"];

/// The mount point of cgroup v1 controller `name`. The hierarchies are
/// read from mountinfo once per process (every rootless run asks, and the
/// table grows with the overlays mounted); a runner reads them before it
/// hides `/sys/fs/cgroup`.
pub fn v1_mount(name: &str) -> Option<PathBuf> {
    static MOUNTS: std::sync::OnceLock<Vec<procfs::process::MountInfo>> = std::sync::OnceLock::new();
    let mounts = MOUNTS.get_or_init(|| {
        let info = procfs::process::Process::myself().and_then(|p| p.mountinfo()).map(|i| i.0).unwrap_or_default();
        info.into_iter().filter(|m| m.fs_type == "cgroup").collect()
    });
    mounts.iter().find(|m| m.super_options.contains_key(name)).map(|m| m.mount_point.clone())
}

/// The name of the cgroup subtree delegated to this user on the memory,
/// cpu and pids controllers of cgroup v1 (`vessel-<uid>`, made and chowned
/// to the user by root, as `cgcreate -a user -t user` does), or why there
/// is none. Rootless containers then get memory, CPU and process limits in it.
pub fn delegated_cgroups() -> Result<String, String> {
    use std::os::unix::fs::MetadataExt;
    let name = format!("vessel-{}", crate::rootless::host_uid());
    let mut missing = Vec::new();
    for c in LIMIT_CONTROLLERS {
        let Some(m) = v1_mount(c) else {
            return Err(format!(
                "no cgroup v1 {c} controller (cgroup v2 delegation, a systemd user session's subtree, is not used yet)"
            ));
        };
        let d = m.join(&name);
        if !fs::metadata(&d).is_ok_and(|md| md.is_dir() && md.uid() == nix::unistd::geteuid().as_raw()) {
            missing.push(d.display().to_string());
        }
    }
    if missing.is_empty() {
        Ok(name)
    } else {
        Err(format!("no cgroup is delegated to this user (root can make {} and chown them to it)", missing.join(", ")))
    }
}

/// The cgroup in a delegated subtree that holds the runs' cgroups.
// The youki backend's (its runner makes and removes runs' cgroups).
#[cfg_attr(not(feature = "youki"), allow(dead_code))]
pub(crate) const RUNS_CGROUP: &str = "runs";

/// Removes run `id`'s cgroups under the delegated subtree `parent`; true
/// when none is left (a cgroup whose processes are still dying is busy).
// The youki backend's (its runner makes and removes runs' cgroups).
#[cfg_attr(not(feature = "youki"), allow(dead_code))]
pub(crate) fn remove_delegated(parent: &str, id: &str) -> bool {
    remove_cgroups(
        LIMIT_CONTROLLERS.iter().filter_map(|c| v1_mount(c)).map(|m| m.join(parent).join(RUNS_CGROUP).join(id)),
    )
}

/// Removes the cgroups `dirs`; true when none is left.
// The youki backend's (its runner makes and removes runs' cgroups).
#[cfg_attr(not(feature = "youki"), allow(dead_code))]
pub(crate) fn remove_cgroups(dirs: impl IntoIterator<Item = PathBuf>) -> bool {
    let mut gone = true;
    for d in dirs {
        if fs::remove_dir(&d).is_err() && d.exists() {
            gone = false;
        }
    }
    gone
}

/// The run ids whose memory cgroup under the delegated subtree `parent`
/// has no process and is older than `age`.
// The youki backend's (its runner makes and removes runs' cgroups).
#[cfg_attr(not(feature = "youki"), allow(dead_code))]
pub(crate) fn stale_delegated_runs(parent: &str, age: std::time::Duration) -> Vec<String> {
    let Some(m) = v1_mount("memory") else { return Vec::new() };
    let Ok(entries) = fs::read_dir(m.join(parent).join(RUNS_CGROUP)) else { return Vec::new() };
    entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("vessel-"))
        .filter(|e| e.metadata().ok().and_then(|md| md.modified().ok()).and_then(|t| t.elapsed().ok()) > Some(age))
        .filter(|e| fs::read_to_string(e.path().join("cgroup.procs")).is_ok_and(|p| p.trim().is_empty()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

#[cfg(feature = "youki")]
/// Rootless with a delegated subtree: run `id`'s memory, cpu and pids
/// cgroups (v1), made and limited by the runner itself, held by dir fds so
/// they stay reachable once `/sys/fs/cgroup` is hidden from libcontainer.
/// They live in the subtree's `runs` cgroup, made by a runner as container
/// root, so that the runner may still remove them once it is in the
/// container's user namespace (the subtree itself is the user's, whose id
/// is not mapped there); dropped, they are removed. The caller removes them
/// too if the runner dies (see `remove_delegated`).
pub(crate) struct RunCgroups {
    id: String,
    dirs: Vec<(&'static str, File)>,
    /// `runs` in each.
    runs: Vec<File>,
    /// The subtree's own `cgroup.procs` in each, opened for writing while
    /// the runner may (before it joins the container's user namespace).
    parents: Vec<File>,
}

#[cfg(feature = "youki")]
impl RunCgroups {
    /// Makes them under `d`'s subtree, limited as `d` says.
    pub(crate) fn make(d: &crate::youki::protocol::DelegatedRun, id: &str) -> std::io::Result<Self> {
        let (parent, memory, cpu, pids) = (d.parent.as_str(), d.memory, d.cpu_quota_us, d.pids);
        let mut this = Self { id: id.to_owned(), dirs: Vec::new(), runs: Vec::new(), parents: Vec::new() };
        for c in LIMIT_CONTROLLERS {
            let m = v1_mount(c).ok_or_else(|| std::io::Error::other(format!("no {c} cgroup")))?;
            this.parents.push(std::fs::OpenOptions::new().write(true).open(m.join(parent).join("cgroup.procs"))?);
            let runs = m.join(parent).join(RUNS_CGROUP);
            match std::fs::create_dir(&runs) {
                Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(e),
                _ => this.runs.push(File::open(&runs)?),
            }
            let dir = runs.join(id);
            std::fs::create_dir(&dir)?;
            let write = |f: &str, v: String| std::fs::write(dir.join(f), v);
            match c {
                "memory" => {
                    if let Some(b) = memory {
                        write("memory.limit_in_bytes", b.to_string())?;
                        // No swap on top, where swap is accounted.
                        let swap = dir.join("memory.memsw.limit_in_bytes");
                        if swap.exists() {
                            std::fs::write(swap, b.to_string())?;
                        }
                    }
                }
                "cpu" => {
                    if let Some(q) = cpu {
                        write("cpu.cfs_period_us", "100000".into())?;
                        write("cpu.cfs_quota_us", q.to_string())?;
                    }
                }
                _ => {
                    if let Some(p) = pids {
                        write("pids.max", p.to_string())?;
                    }
                }
            }
            this.dirs.push((c, File::open(&dir)?));
        }
        Ok(this)
    }

    fn file(dir: &File, name: &str) -> PathBuf {
        use std::os::fd::AsRawFd;
        PathBuf::from(format!("/proc/self/fd/{}/{name}", dir.as_raw_fd()))
    }

    /// Moves this process into every one of them.
    pub(crate) fn join(&self) -> std::io::Result<()> {
        for (_, d) in &self.dirs {
            std::fs::write(Self::file(d, "cgroup.procs"), std::process::id().to_string())?;
        }
        Ok(())
    }

    /// Moves this process back up into the delegated subtree.
    pub(crate) fn leave(&self) -> std::io::Result<()> {
        for mut f in &self.parents {
            f.write_all(std::process::id().to_string().as_bytes())?;
        }
        Ok(())
    }

    /// Removes the run's cgroups; false while one still has a task.
    fn remove(&self) -> bool {
        remove_cgroups(self.runs.iter().map(|r| Self::file(r, &self.id)))
    }

    /// How many processes the OOM killer killed in the memory cgroup.
    pub(crate) fn oom_kills(&self) -> u64 {
        let Some((_, d)) = self.dirs.iter().find(|(c, _)| *c == "memory") else { return 0 };
        let text = std::fs::read_to_string(Self::file(d, "memory.oom_control")).unwrap_or_default();
        text.lines().find_map(|l| l.strip_prefix("oom_kill ")?.trim().parse().ok()).unwrap_or(0)
    }
}

#[cfg(feature = "youki")]
impl Drop for RunCgroups {
    fn drop(&mut self) {
        // The container's last tasks may still be exiting after its init.
        for _ in 0..100 {
            if self.remove() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}

/// Rootless: shows libcontainer a cgroup2 tree of a cgroup namespace of
/// this runner's own (mounted in a mount namespace of its own), so it
/// takes the cgroup v2 path, where a cgroup this user may not create is
/// skipped, not fatal (on the host's v1 controllers it would fail
/// outright). The limits are then reported unavailable, not applied.
#[cfg(feature = "youki")]
pub(crate) fn without_cgroups() -> nix::Result<()> {
    if !crate::rootless::mode().is_rootless() {
        return Ok(());
    }
    use nix::mount::{MsFlags, mount};
    use nix::sched::CloneFlags;
    nix::sched::unshare(CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWCGROUP)?;
    mount(
        Some("cgroup2"),
        "/sys/fs/cgroup",
        Some("cgroup2"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
}

/// libcontainer leaves the per-container cgroup directories on some hosts
/// (cgroup v1 + unified hybrid): remove them, leaf first, if empty.
#[cfg(feature = "youki")]
pub(crate) fn cleanup_run(id: &str) {
    let Ok(roots) = std::fs::read_dir("/sys/fs/cgroup") else { return };
    let mut dirs: Vec<PathBuf> = roots.flatten().map(|e| e.path().join("vessel").join(id)).collect();
    dirs.push(PathBuf::from("/sys/fs/cgroup/vessel").join(id));
    for d in dirs {
        let _ = std::fs::remove_dir(&d);
    }
}
