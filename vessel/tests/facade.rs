//! The facade end to end on real mounts and containers, for every backend
//! compiled in: youki always (default feature), containerd when
//! `VESSEL_CONTAINERD_ADDRESS` names a daemon (`cargo xtask test` starts
//! one). The Go original's test semantics, ported: files, directories,
//! path security, snapshots (chains, branches, refusals), exec, reopen on a
//! "new host", concurrency, bad input, a crash in the middle of a snapshot;
//! after all cases, nothing is left mounted, no cgroup, no container.
// The backends a build has depend on its features: pushed one by one.
#![allow(clippy::vec_init_then_push)]

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, ensure};
use libtest_mimic::{Arguments, Failed, Trial};
use tokio::io::AsyncReadExt;
use vessel::{
    Backend, CompressedStorage, ExecOptions, Limits, LocalStorage, Manager, ManagerConfig, OpenFlags, SnapshotId,
    Storage, VesselErrorKind, VesselOptions,
};
use vessel_test_support as support;

static TOKIO: LazyLock<tokio::runtime::Runtime> =
    LazyLock::new(|| tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap());

const IMAGE: &str = "local/busybox:latest";
const CRASH_CHILD: &str = "VESSEL_TEST_SNAPSHOT_CRASH";

/// One backend's test world: a data dir (storage with the image) and a base
/// for mount roots ("hosts").
struct World {
    backend: Backend,
    base: PathBuf,
    address: Option<PathBuf>,
}

impl World {
    fn storage(&self) -> Arc<dyn Storage> {
        Arc::new(CompressedStorage::new(LocalStorage::new(self.base.join("data")).unwrap()))
    }

    fn config(&self, host: &str) -> ManagerConfig {
        let mut c = ManagerConfig::default()
            .shared_storage(self.storage())
            .mount_root(self.base.join(host))
            .backend(self.backend)
            .namespace(format!("vessel-facade-{}", std::process::id()));
        if let Some(a) = &self.address {
            c = c.containerd_address(a);
        }
        c
    }

    async fn manager(&self, host: &str) -> Result<Manager> {
        Ok(Manager::new(self.config(host)).await?)
    }
}

fn sh(script: &str) -> Vec<String> {
    vec!["sh".into(), "-c".into(), script.into()]
}

/// Runs `script` (persisting), returning exit code, stdout, stderr.
async fn run(v: &vessel::Vessel, script: &str, persist: bool) -> Result<(i32, String, String)> {
    let (res, out, err) = run_full(v, script, persist, None, Limits::default()).await?;
    Ok((res.exit_code, out, err))
}

/// Runs `script` with a timeout (in seconds) and limits, not persisting.
async fn run_with(
    v: &vessel::Vessel,
    script: &str,
    timeout: u64,
    limits: Limits,
) -> Result<(vessel::ExecResult, String, String)> {
    run_full(v, script, false, Some(Duration::from_secs(timeout)), limits).await
}

async fn run_full(
    v: &vessel::Vessel,
    script: &str,
    persist: bool,
    timeout: Option<Duration>,
    limits: Limits,
) -> Result<(vessel::ExecResult, String, String)> {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let res = v
        .exec(ExecOptions {
            command: sh(script),
            stdout: Some(Box::new(&mut out)),
            stderr: Some(Box::new(&mut err)),
            persist_result: persist,
            timeout,
            limits,
            ..Default::default()
        })
        .await?;
    Ok((res, String::from_utf8_lossy(&out).into_owned(), String::from_utf8_lossy(&err).into_owned()))
}

fn main() {
    vessel::init();
    if std::env::var_os(CRASH_CHILD).is_some() {
        crash_child();
    }
    let args = Arguments::from_args();
    let Some(image_dir) = support::root_with_test_image("facade") else { return };
    let tmp = tempfile::tempdir().unwrap();
    // Which backends exist depends on the features: pushed one by one.
    #[allow(unused_mut)]
    let mut worlds: Vec<World> = Vec::new();
    #[cfg(feature = "youki")]
    worlds.push(World { backend: Backend::Youki, base: tmp.path().join("youki"), address: None });
    #[cfg(feature = "containerd")]
    if vessel::runtime::rootless::mode().is_rootless() {
        // containerd rootless is a typed refusal (rootless_mode_follows_the_process).
    } else if let Some(a) = support::required_env("facade", "VESSEL_CONTAINERD_ADDRESS") {
        worlds.push(World {
            backend: Backend::Containerd,
            base: tmp.path().join("containerd"),
            address: Some(PathBuf::from(a)),
        });
    }
    // Each world's storage holds the test image.
    for w in &worlds {
        TOKIO.block_on(async {
            let src = LocalStorage::new(image_dir.join("storage")).unwrap();
            let r = vessel::ImageRef::new(IMAGE).unwrap();
            let mut data = Vec::new();
            src.load_image(&r).await.unwrap().read_to_end(&mut data).await.unwrap();
            w.storage().save_image(&r, Box::new(std::io::Cursor::new(data))).await.unwrap();
        });
    }
    let worlds: Vec<Arc<World>> = worlds.into_iter().map(Arc::new).collect();
    type Case = fn(Arc<World>) -> std::pin::Pin<Box<dyn Future<Output = Result<()>> + Send>>;
    macro_rules! cases {
        ($($name:ident),* $(,)?) => { vec![$((stringify!($name), (|w| Box::pin($name(w))) as Case)),*] };
    }
    let cases: Vec<(&str, Case)> = cases![
        caller_sketch,
        file_operations,
        directory_operations,
        open_file_handles,
        path_security,
        snapshot_operations,
        snapshot_chains_and_branches,
        exec_semantics,
        exec_cancellation,
        exec_timeout,
        reopen_on_a_new_host,
        concurrency_and_locking,
        bad_input,
        corrupt_snapshot_is_refused,
        crash_in_the_middle_of_a_snapshot,
        image_from_the_containerd_store,
        deep_chains_are_flattened,
        runaway_commands_are_contained,
        cpu_quota_is_enforced,
        exec_limits_narrow_the_vessels,
        bad_limits_are_refused,
        disk_quota_bounds_what_a_vessel_writes,
        quota_modes_on_a_filesystem_without_quotas,
        vessels_have_unique_names,
        rootless_mode_follows_the_process,
        a_hundred_vessels_keep_the_host_responsive,
        images_pull_from_a_registry,
        registry_failures_are_typed_and_store_nothing,
        create_from_a_cached_image_reads_no_archive,
    ];
    // Rootless, the cases of what needs host privilege (disk quotas, cgroup
    // limits) or another process's help (containerd, registries) do not
    // apply: their mechanisms are reported unavailable instead.
    // Cgroup limits hold rootless only in a subtree delegated to the user.
    const CGROUP_LIMITS: &[&str] =
        &["runaway_commands_are_contained", "cpu_quota_is_enforced", "exec_limits_narrow_the_vessels"];
    const ROOTFUL_ONLY: &[&str] = &[
        "image_from_the_containerd_store",
        "disk_quota_bounds_what_a_vessel_writes",
        "quota_modes_on_a_filesystem_without_quotas",
        "a_hundred_vessels_keep_the_host_responsive",
        "images_pull_from_a_registry",
        "registry_failures_are_typed_and_store_nothing",
    ];
    let rootless = vessel::runtime::rootless::mode().is_rootless();
    let mut trials = Vec::new();
    for w in &worlds {
        let prefix = format!("{}{:?}", if rootless { "rootless::" } else { "" }, w.backend).to_lowercase();
        let delegated = vessel::runtime::rootless::delegated_cgroups().is_ok();
        let runs = |n: &str| !rootless || !(ROOTFUL_ONLY.contains(&n) || (!delegated && CGROUP_LIMITS.contains(&n)));
        for (name, case) in cases.iter().filter(|(n, _)| runs(n)) {
            let (w, case) = (w.clone(), *case);
            trials.push(Trial::test(format!("{prefix}::{name}"), move || {
                TOKIO.block_on(case(w)).map_err(|e| Failed::from(format!("{e:#}")))
            }));
        }
    }
    let conclusion = libtest_mimic::run(&args, trials);
    // Leak check: nothing mounted under the test dirs, no vessel cgroups, no containers.
    std::thread::sleep(Duration::from_millis(500));
    #[allow(unused_mut)]
    let mut containers: Vec<String> = Vec::new();
    #[cfg(feature = "containerd")]
    for w in &worlds {
        if w.backend == Backend::Containerd {
            let out = std::process::Command::new("ctr")
                .arg("--address")
                .arg(w.address.as_ref().unwrap())
                .args(["--namespace", &format!("vessel-facade-{}", std::process::id()), "containers", "ls", "-q"])
                .output()
                .unwrap();
            containers.extend(String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned));
        }
    }
    let leaks = [
        ("mounts", support::shown(support::mounts_under(tmp.path()))),
        ("cgroups", support::shown(support::leftover_cgroups())),
        ("containers", containers),
    ];
    support::finish(&tmp.keep(), &leaks, conclusion)
}

async fn caller_sketch(w: Arc<World>) -> Result<()> {
    let mgr = w.manager("sketch").await?;
    let v = mgr.create_vessel(IMAGE, "/work").await?;
    v.write_file("hello.txt", b"hi\n", 0o644)?;
    let mut out = Vec::new();
    let res = v
        .exec(ExecOptions {
            command: sh("cat hello.txt; echo x > y"),
            stdout: Some(Box::new(&mut out)),
            persist_result: true,
            ..Default::default()
        })
        .await?;
    ensure!(res.exit_code == 0 && out == b"hi\n", "exit {} out {:?}", res.exit_code, out);
    let snap = v.create_snapshot("after y").await?;
    ensure!(snap.checksum.starts_with("sha256:") && snap.size > 0 && snap.parent_id.is_none());
    v.delete_file("y")?;
    ensure!(v.stat("y").is_err());
    v.restore_snapshot(&snap.id).await?;
    ensure!(v.stat("y").is_ok());
    let id = v.id().to_string();
    v.close().await?;
    let v = mgr.open_vessel(&id).await?;
    ensure!(v.read_file("/work/y")? == b"x\n");
    let m = v.manifest();
    ensure!(m.current_snapshot_id == Some(snap.id.clone()) && m.work_dir == "/work");
    ensure!(m.base_image_ref.as_str() == IMAGE && m.labels.contains_key("vessel.image.config-digest"));
    mgr.delete_vessel(&id).await?;
    ensure!(v.read_file("/work/y").is_err(), "a deleted vessel's handle is closed");
    match mgr.open_vessel(&id).await {
        Err(e) if e.kind() == VesselErrorKind::NotFound => {}
        other => return Err(anyhow!("open after delete: {other:?}")),
    }
    mgr.close().await?;
    Ok(())
}

async fn file_operations(w: Arc<World>) -> Result<()> {
    let mgr = w.manager("files").await?;
    let v = mgr.create_vessel(IMAGE, "/work").await?;
    v.write_file("a.txt", b"one", 0o640)?;
    ensure!(v.read_file("a.txt")? == b"one");
    ensure!(v.read_file("/work/a.txt")? == b"one", "relative = work_dir-relative");
    let st = v.stat("a.txt")?;
    ensure!(st.size == 3 && st.mode == 0o640 && st.file_type == vessel::FileType::File && st.name == "a.txt");
    v.write_file("a.txt", b"two!", 0o600)?;
    ensure!(v.read_file("a.txt")? == b"two!");
    v.rename_file("a.txt", "/tmp/b.txt")?;
    ensure!(v.stat("a.txt").is_err() && v.read_file("/tmp/b.txt")? == b"two!");
    v.delete_file("/tmp/b.txt")?;
    match v.read_file("/tmp/b.txt") {
        Err(e) if e.kind() == VesselErrorKind::NotFound => {}
        other => return Err(anyhow!("read of a deleted file: {other:?}")),
    }
    // Files written through the API are seen by commands, and vice versa.
    v.write_file("in.txt", b"from the api\n", 0o644)?;
    let (code, out, _) = run(&v, "cat in.txt; echo from the container > out.txt", true).await?;
    ensure!(code == 0 && out == "from the api\n");
    ensure!(v.read_file("out.txt")? == b"from the container\n");
    // Image files are readable.
    ensure!(!v.read_file("/bin/busybox")?.is_empty());
    mgr.close().await?;
    Ok(())
}

async fn directory_operations(w: Arc<World>) -> Result<()> {
    let mgr = w.manager("dirs").await?;
    let v = mgr.create_vessel(IMAGE, "/work").await?;
    v.make_dir("d", 0o750)?;
    ensure!(v.stat("d")?.is_dir() && v.stat("d")?.mode == 0o750);
    ensure!(v.make_dir("d", 0o755).is_err(), "make_dir of an existing dir fails");
    ensure!(v.make_dir("x/y", 0o755).is_err(), "make_dir without parent fails");
    v.make_dir_all("x/y/z", 0o755)?;
    v.make_dir_all("x/y/z", 0o755)?;
    v.write_file("x/y/z/f", b"", 0o644)?;
    v.write_file("x/file", b"1", 0o644)?;
    ensure!(v.make_dir_all("x/file/sub", 0o755).is_err(), "a file in the way");
    let names: Vec<String> = v.read_dir("x")?.into_iter().map(|e| e.name).collect();
    ensure!(names == ["file", "y"], "{names:?}");
    let root: Vec<String> = v.read_dir("/")?.into_iter().map(|e| e.name).collect();
    ensure!(root.contains(&"bin".to_string()) && root.contains(&"work".to_string()), "{root:?}");
    ensure!(v.delete_file("x/y").is_err(), "a non-empty dir is not deleted");
    v.delete_file("x/y/z/f")?;
    v.delete_file("x/y/z")?;
    ensure!(v.stat("x/y/z").is_err());
    mgr.close().await?;
    Ok(())
}

async fn open_file_handles(w: Arc<World>) -> Result<()> {
    let mgr = w.manager("handles").await?;
    let v = mgr.create_vessel(IMAGE, "/work").await?;
    let mut f = v.open_file("log", OpenFlags::O_RDWR | OpenFlags::O_CREAT, 0o644)?;
    f.write_all(b"hello world")?;
    f.seek(SeekFrom::Start(6))?;
    let mut s = String::new();
    f.read_to_string(&mut s)?;
    ensure!(s == "world");
    ensure!(f.write_at(b"W", 6)? == 1);
    let mut buf = [0u8; 5];
    f.read_at(&mut buf, 6)?;
    ensure!(&buf == b"World");
    f.truncate(5)?;
    f.sync()?;
    ensure!(f.stat()?.size == 5);
    drop(f);
    let mut a = v.open_file("log", OpenFlags::O_WRONLY | OpenFlags::O_APPEND, 0)?;
    a.write_all(b"+more")?;
    ensure!(v.read_file("log")? == b"hello+more");
    ensure!(v.open_file("log", OpenFlags::O_CREAT | OpenFlags::O_EXCL | OpenFlags::O_WRONLY, 0o644).is_err());
    // A snapshot remounts: an old handle goes stale instead of writing into a sealed layer.
    v.create_snapshot("s").await?;
    match a.write_all(b"late") {
        Err(e) if e.to_string().contains("stale") => {}
        other => return Err(anyhow!("write through a stale handle: {other:?}")),
    }
    ensure!(v.read_file("log")? == b"hello+more");
    mgr.close().await?;
    Ok(())
}

async fn path_security(w: Arc<World>) -> Result<()> {
    let mgr = w.manager("paths").await?;
    let v = mgr.create_vessel(IMAGE, "/work").await?;
    let canary = w.base.join("host-canary");
    std::fs::write(&canary, "host secret\n")?;
    // `..` at the vessel's `/` stays there (as in the Go original, and in
    // a chroot): this is the vessel's passwd, never the host's.
    let passwd = v.read_file("../../../../etc/passwd")?;
    ensure!(passwd == v.read_file("/etc/passwd")?, "`..` above the root left the vessel");
    ensure!(String::from_utf8_lossy(&passwd).contains("app:x:1000"), "not the image's passwd");
    ensure!(v.stat("")?.is_dir() && v.stat("")? == v.stat("/work")?, "\"\" is the work dir");
    match v.read_file("a\0b") {
        Err(e) if e.kind() == VesselErrorKind::InvalidInput => {}
        other => return Err(anyhow!("a NUL byte in a path: {other:?}")),
    }
    // Absolute paths are the vessel's.
    v.write_file(canary.to_str().unwrap(), b"inside", 0o644).or_else(|_| {
        v.make_dir_all(canary.parent().unwrap().to_str().unwrap(), 0o755)?;
        v.write_file(canary.to_str().unwrap(), b"inside", 0o644)
    })?;
    ensure!(std::fs::read_to_string(&canary)? == "host secret\n", "an absolute path reached the host");
    // Symlinks planted by a command resolve inside the vessel.
    let script = format!(
        "ln -s /etc/shadow shadow; ln -s {c} canary; ln -s ../../../../../../../../ up; ln -s /proc/self/root pr",
        c = canary.display()
    );
    let (code, _, err) = run(&v, &script, true).await?;
    ensure!(code == 0, "{err}");
    let host_shadow = std::fs::read("/etc/shadow").unwrap_or_default();
    if let Ok(data) = v.read_file("shadow") {
        ensure!(data != host_shadow || host_shadow.is_empty(), "read the host's /etc/shadow");
    }
    ensure!(v.read_file("canary")? == b"inside", "the planted link resolves in the vessel");
    v.write_file("canary", b"overwritten", 0o644)?;
    ensure!(std::fs::read_to_string(&canary)? == "host secret\n", "a write through a planted link reached the host");
    let through_up = v.read_file(&format!("up{}", canary.display()))?;
    ensure!(through_up == b"overwritten", "`..` in a symlink stays inside");
    ensure!(v.read_file("pr/etc/hostname").is_err(), "magic links are refused");
    v.write_file("up/etc/evil", b"x", 0o644)?;
    ensure!(!Path::new("/etc/evil").exists(), "wrote to the host's /etc");
    // Device nodes and FIFOs a container leaves behind (CAP_MKNOD) are never
    // opened from the host: a block device would read the host's disk, a
    // FIFO would hang. Made here from the host side, as a container could.
    // (Through the idmapped mount, with the vessel root's host ids.)
    let work = v.rootfs().join("work");
    let root_id = v.id_mapping().map_or(0, |m| m.host_id);
    let dev = |name: &str, kind: nix::sys::stat::SFlag, major, minor| {
        vessel::runtime::idmap::as_host_ids(root_id, root_id, || {
            nix::sys::stat::mknod(
                &work.join(name),
                kind,
                nix::sys::stat::Mode::from_bits_truncate(0o666),
                nix::sys::stat::makedev(major, minor),
            )
        })
    };
    let rootless = vessel::runtime::rootless::mode().is_rootless();
    let nodes: &[&str] = if rootless {
        // Rootless, nobody can make a device node (nor could a container).
        ensure!(dev("blk", nix::sys::stat::SFlag::S_IFBLK, 7, 0) == Err(nix::errno::Errno::EPERM));
        ensure!(dev("chr", nix::sys::stat::SFlag::S_IFCHR, 1, 3) == Err(nix::errno::Errno::EPERM));
        &["fifo"]
    } else {
        dev("blk", nix::sys::stat::SFlag::S_IFBLK, 7, 0)?;
        dev("chr", nix::sys::stat::SFlag::S_IFCHR, 1, 3)?;
        &["blk", "chr", "fifo"]
    };
    vessel::runtime::idmap::as_host_ids(root_id, root_id, || {
        nix::unistd::mkfifo(&work.join("fifo"), nix::sys::stat::Mode::from_bits_truncate(0o666))
    })?;
    let v = Arc::new(v);
    for &name in nodes {
        let vc = v.clone();
        let tries = tokio::task::spawn_blocking(move || {
            [
                vc.read_file(name).is_err(),
                vc.write_file(name, b"x", 0o644).is_err(),
                vc.open_file(name, OpenFlags::O_RDONLY, 0).is_err(),
                vc.open_file(name, OpenFlags::O_WRONLY | OpenFlags::O_APPEND, 0).is_err(),
            ]
        });
        let refused = tokio::time::timeout(Duration::from_secs(10), tries).await.context("hangs")??;
        ensure!(refused == [true; 4], "{name}: opened from the host {refused:?}");
        ensure!(v.stat(name).is_ok(), "{name}: stat (no open) still works");
    }
    mgr.close().await?;
    Ok(())
}

async fn snapshot_operations(w: Arc<World>) -> Result<()> {
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

async fn snapshot_chains_and_branches(w: Arc<World>) -> Result<()> {
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

async fn exec_semantics(w: Arc<World>) -> Result<()> {
    let mgr = w.manager("exec").await?;
    let v = mgr.create_vessel(IMAGE, "/work").await?;
    let (code, out, err) = run(&v, "echo out; echo err >&2; pwd; exit 3", false).await?;
    ensure!(code == 3 && out == "out\n/work\n" && err == "err\n", "{code} {out:?} {err:?}");
    let mut out = Vec::new();
    let res = v
        .exec(ExecOptions {
            command: sh("echo $FOO; echo $PATH; pwd"),
            env: vec!["FOO=bar".into()],
            work_dir: Some("/tmp".into()),
            stdout: Some(Box::new(&mut out)),
            ..Default::default()
        })
        .await?;
    let out = String::from_utf8(out)?;
    ensure!(
        res.exit_code == 0 && out.starts_with("bar\n") && out.contains("/bin") && out.ends_with("/tmp\n"),
        "{out:?}"
    );
    // A missing program is NotFound (a shell's 127), a file that is not
    // one InvalidInput (126).
    for (argv, kind) in [("no-such-program", VesselErrorKind::NotFound), ("/etc/passwd", VesselErrorKind::InvalidInput)]
    {
        match v.exec(ExecOptions { command: vec![argv.into()], ..Default::default() }).await {
            Err(e) if e.kind() == kind => {}
            other => return Err(anyhow!("exec {argv}: {other:?}")),
        }
    }
    // persist_result false (the default) discards, true keeps.
    let (code, ..) = run(&v, "echo gone > t; rm -rf /bin/ls", false).await?;
    ensure!(code == 0 && v.stat("t").is_err() && v.stat("/bin/ls").is_ok(), "a throwaway exec left changes");
    let (code, ..) = run(&v, "echo kept > t", true).await?;
    ensure!(code == 0 && v.read_file("t")? == b"kept\n");
    // A throwaway exec sees the current state.
    let (_, out, _) = run(&v, "cat t", false).await?;
    ensure!(out == "kept\n");
    // stdin and TTY.
    let mut out = Vec::new();
    let res = v
        .exec(ExecOptions {
            command: sh("read x; echo got $x; test -t 1 && echo tty"),
            stdin: Some(Box::new(std::io::Cursor::new(b"input\n".to_vec()))),
            stdout: Some(Box::new(&mut out)),
            tty: true,
            ..Default::default()
        })
        .await?;
    let out = String::from_utf8_lossy(&out);
    ensure!(res.exit_code == 0 && out.contains("got input") && out.contains("tty"), "{} {out:?}", res.exit_code);
    match v.exec(ExecOptions::default()).await {
        Err(e) if e.kind() == VesselErrorKind::InvalidInput => {}
        other => return Err(anyhow!("empty command: {other:?}")),
    }
    mgr.close().await?;
    Ok(())
}

async fn exec_cancellation(w: Arc<World>) -> Result<()> {
    let mgr = w.manager("cancel").await?;
    let v = mgr.create_vessel(IMAGE, "/work").await?;
    for persist in [true, false] {
        let exec = run(&v, "sleep 1003", persist);
        ensure!(tokio::time::timeout(Duration::from_millis(1500), exec).await.is_err());
        let deadline = Instant::now() + Duration::from_secs(10);
        while sleepers() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        ensure!(sleepers() == 0, "the cancelled command still runs");
    }
    let (code, out, _) = run(&v, "echo still works", false).await?;
    ensure!(code == 0 && out == "still works\n");
    v.create_snapshot("after cancel").await?;
    mgr.close().await?;
    Ok(())
}

/// `ExecOptions::timeout`: the whole tree is killed, the result says so
/// (exit 137), nothing is left; a zero timeout is refused before anything runs.
async fn exec_timeout(w: Arc<World>) -> Result<()> {
    let mgr = w.manager("timeout").await?;
    let v = mgr.create_vessel(IMAGE, "/work").await?;
    // A command line of its own per backend (the worlds run side by side).
    let secs = if w.backend == Backend::Youki { "1011" } else { "1012" };
    let cmdline = format!("sleep\0{secs}\0");
    let left = || {
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter(|e| std::fs::read(e.path().join("cmdline")).unwrap_or_default() == cmdline.as_bytes())
            .count()
    };
    for persist in [true, false] {
        let started = Instant::now();
        let res = v
            .exec(ExecOptions {
                command: sh(&format!("sleep {secs} & sleep {secs}")),
                persist_result: persist,
                timeout: Some(Duration::from_secs(1)),
                ..Default::default()
            })
            .await?;
        let took = started.elapsed();
        ensure!(res.timed_out && res.exit_code == 137, "{res:?}");
        ensure!(took < Duration::from_secs(2), "a 1 s timeout returned after {took:?}");
        let deadline = Instant::now() + Duration::from_secs(5);
        while left() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        ensure!(left() == 0, "processes left after the timeout");
    }
    let quick = v
        .exec(ExecOptions { command: sh("true"), timeout: Some(Duration::from_secs(30)), ..Default::default() })
        .await?;
    ensure!(!quick.timed_out && quick.exit_code == 0, "{quick:?}");
    match v.exec(ExecOptions { command: sh("true"), timeout: Some(Duration::ZERO), ..Default::default() }).await {
        Err(e) if e.kind() == VesselErrorKind::InvalidInput => {}
        other => return Err(anyhow!("a zero timeout: {other:?}")),
    }
    v.create_snapshot("after a timeout").await?;
    mgr.close().await?;
    Ok(())
}

fn sleepers() -> usize {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| std::fs::read(e.path().join("cmdline")).unwrap_or_default() == b"sleep\x001003\x00")
        .count()
}

/// Everything about a tree that a snapshot must keep.
fn scan(root: &Path) -> Result<BTreeMap<String, String>> {
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

async fn reopen_on_a_new_host(w: Arc<World>) -> Result<()> {
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

async fn concurrency_and_locking(w: Arc<World>) -> Result<()> {
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

async fn bad_input(w: Arc<World>) -> Result<()> {
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

async fn corrupt_snapshot_is_refused(w: Arc<World>) -> Result<()> {
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
fn crash_child() -> ! {
    let base = PathBuf::from(std::env::var_os("VESSEL_TEST_BASE").unwrap());
    let backend = if std::env::var("VESSEL_TEST_BACKEND").unwrap() == "containerd" {
        Backend::Containerd
    } else {
        Backend::Youki
    };
    let address = std::env::var_os("VESSEL_CONTAINERD_ADDRESS").map(PathBuf::from);
    let w = World { backend, base, address };
    let id = std::env::var("VESSEL_TEST_VESSEL").unwrap();
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

async fn crash_in_the_middle_of_a_snapshot(w: Arc<World>) -> Result<()> {
    let mgr = w.manager("crash").await?;
    let v = mgr.create_vessel(IMAGE, "/work").await?;
    v.write_file("f", b"committed\n", 0o644)?;
    let good = v.create_snapshot("good").await?;
    let id = v.id().to_string();
    v.close().await?;
    mgr.close().await?;
    drop(mgr);
    let mut child = tokio::process::Command::new(std::env::current_exe()?)
        .env(CRASH_CHILD, "1")
        .env("VESSEL_TEST_BASE", &w.base)
        .env("VESSEL_TEST_BACKEND", format!("{:?}", w.backend).to_lowercase())
        .env("VESSEL_TEST_VESSEL", &id)
        .stdout(std::process::Stdio::piped())
        .spawn()?;
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

/// With the containerd backend, an image only in containerd's store (as
/// `ctr`/`nerdctl` pulled it) serves `create_vessel`; youki has no store.
async fn image_from_the_containerd_store(w: Arc<World>) -> Result<()> {
    let reference = "local/from-containerd:latest";
    let mgr = w.manager("ctd-image").await?;
    let Some(address) = &w.address else {
        match mgr.create_vessel(reference, "/work").await {
            Err(e) if e.kind() == VesselErrorKind::NotFound => return Ok(()),
            other => return Err(anyhow!("youki and an image in no storage: {other:?}")),
        }
    };
    let image_dir = PathBuf::from(std::env::var_os("VESSEL_TEST_IMAGE_DIR").context("image dir")?);
    let ctr = |args: &[&str]| {
        std::process::Command::new("ctr")
            .arg("--address")
            .arg(address)
            .args(["--namespace", &format!("vessel-facade-{}", std::process::id())])
            .args(args)
            .output()
    };
    let archive = image_dir.join("busybox-docker.tar");
    let out = ctr(&["images", "import", "--index-name", reference, archive.to_str().unwrap()])?;
    ensure!(out.status.success(), "ctr import: {}", String::from_utf8_lossy(&out.stderr));
    let result = async {
        ensure!(mgr.storage().list_images().await?.iter().all(|i| i.as_str() != reference));
        let v = mgr.create_vessel(reference, "/work").await?;
        let (code, out, _e) = run(&v, "echo from the containerd store", false).await?;
        ensure!(code == 0 && out == "from the containerd store\n", "{code} {out:?} {_e:?}");
        ensure!(v.manifest().labels.contains_key("vessel.image.config-digest"));
        Ok(())
    }
    .await;
    let _ = ctr(&["images", "rm", "--sync", reference]);
    mgr.close().await?;
    result
}

/// An agent may snapshot after every step: a chain far deeper than an
/// overlay's lower limit still mounts, restores and reopens (flat layers are
/// made locally; storage keeps one diff per snapshot).
async fn deep_chains_are_flattened(w: Arc<World>) -> Result<()> {
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

/// The test image's OCI archive with its manifest listed twice, the second
/// time as `local/other:v2`.
fn two_image_archive(oci: &[u8]) -> Result<Vec<u8>> {
    let mut out = tar::Builder::new(Vec::new());
    for e in tar::Archive::new(oci).entries()? {
        let mut e = e?;
        let mut h = e.header().clone();
        let mut data = Vec::new();
        e.read_to_end(&mut data)?;
        if e.path()?.to_string_lossy() == "index.json" {
            let mut index: serde_json::Value = serde_json::from_slice(&data)?;
            let mut other = index["manifests"][0].clone();
            other["annotations"]["io.containerd.image.name"] = "local/other:v2".into();
            index["manifests"].as_array_mut().context("manifests")?.push(other);
            data = serde_json::to_vec(&index)?;
            h.set_size(data.len() as u64);
            h.set_cksum();
        }
        out.append(&h, &data[..])?;
    }
    Ok(out.into_inner()?)
}

/// How many lower layers the overlay mounted at `rootfs` has.
fn lower_count(rootfs: &Path) -> Result<usize> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    let line = info
        .lines()
        .find(|l| l.split(' ').nth(4) == Some(rootfs.to_str().unwrap_or_default()))
        .context("the rootfs mount")?;
    let opts = line.rsplit(' ').next().unwrap_or_default();
    // `lowerdir=a:b:c` (mount(2)) or one `lowerdir+=` per layer (fsconfig).
    let appended = opts.split(',').filter(|o| o.starts_with("lowerdir+=")).count();
    if appended > 0 {
        return Ok(appended);
    }
    let lower = opts.split(',').find_map(|o| o.strip_prefix("lowerdir=")).context("lowerdir")?;
    Ok(lower.split(':').count())
}

fn kind_of(e: &anyhow::Error) -> Option<VesselErrorKind> {
    e.downcast_ref::<vessel::VesselError>().map(vessel::VesselError::kind)
}

/// The host's scheduling latency: how late a host thread's 10 ms sleeps end.
struct LatencyProbe {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Duration>,
}

impl LatencyProbe {
    fn start() -> Self {
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
    fn stop(self) -> Duration {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

/// Processes running as `uid` on the host (a vessel's container root).
fn processes_of(uid: u32) -> usize {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()))
        .filter(|e| {
            std::fs::read_to_string(e.path().join("status")).is_ok_and(|s| {
                s.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some(&uid.to_string()))
            })
        })
        .count()
}

/// A fork bomb hits its pids limit while the host stays responsive; a
/// memory hog is OOM-killed (137, flagged) while another vessel runs on;
/// nothing of either is left.
async fn runaway_commands_are_contained(w: Arc<World>) -> Result<()> {
    let mgr = w.manager("runaway").await?;
    let v = mgr.create_vessel_with(IMAGE, "/work", &VesselOptions::new().pids(64).memory_bytes(64 << 20)).await?;
    let uid = v.id_mapping().context("user namespaces are on")?.host_id;
    // The host's scheduling latency while the bomb runs: a 10 ms sleep's overshoot.
    let probe = LatencyProbe::start();
    // `exec sleep`: the top shell needs no fork of its own after the bomb
    // (ash exits when one is refused, which would end the bomb early).
    let (res, _, err) = run_with(&v, "f() { f | f & }; f; exec sleep 10", 3, Limits::default()).await?;
    let worst = probe.stop();
    println!("{:?}: fork bomb under pids=64: host sleep overshoot at worst {worst:?}", w.backend);
    ensure!(res.timed_out, "the bomb ended by itself: {res:?}");
    ensure!(err.contains("can't fork") || err.contains("Resource temporarily unavailable"), "no fork refused: {err}");
    ensure!(worst < Duration::from_millis(500), "the host stalled {worst:?} during the bomb");
    let deadline = Instant::now() + Duration::from_secs(5);
    while processes_of(uid) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ensure!(processes_of(uid) == 0, "{} processes of the bomb left", processes_of(uid));

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
async fn cpu_quota_is_enforced(w: Arc<World>) -> Result<()> {
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
async fn exec_limits_narrow_the_vessels(w: Arc<World>) -> Result<()> {
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
async fn bad_limits_are_refused(w: Arc<World>) -> Result<()> {
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

fn free_bytes(p: &Path) -> u64 {
    let dir = std::fs::File::open(p).unwrap();
    nix::unistd::syncfs(&dir).unwrap();
    let st = nix::sys::statvfs::statvfs(p).unwrap();
    st.blocks_available() * st.fragment_size()
}

/// A disk filler gets EDQUOT at the quota; the vessel then snapshots,
/// restores and reopens; the host's free space dropped by about the quota
/// at most; another vessel writes on.
async fn disk_quota_bounds_what_a_vessel_writes(w: Arc<World>) -> Result<()> {
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

/// `ManagerConfig::rootless` follows the process's mode (chosen in
/// `vessel::init`): asking for the other mode is a typed refusal
/// that creates nothing. Rootless, the limits that cannot hold are
/// reported, and the containerd backend is a typed `Unavailable`.
async fn rootless_mode_follows_the_process(w: Arc<World>) -> Result<()> {
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

fn mode_name(rootless: bool) -> &'static str {
    if rootless { "rootless" } else { "rootful" }
}

/// The quota modes on a mount root that cannot enforce quotas (tmpfs):
/// `Require` is a typed refusal that names no Rust API; `Auto` (the
/// default) runs, lists the disk limit as unavailable with why, and refuses
/// a disk quota asked for explicitly; `Off` runs and checks nothing.
async fn quota_modes_on_a_filesystem_without_quotas(w: Arc<World>) -> Result<()> {
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

/// Names: unique per storage, usable wherever an id is (open, delete),
/// freed by delete; a name shaped like an id, a bad name and a taken name
/// are typed refusals that create nothing; a name record left by a create
/// that died before its manifest is taken over.
async fn vessels_have_unique_names(w: Arc<World>) -> Result<()> {
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
async fn a_hundred_vessels_keep_the_host_responsive(w: Arc<World>) -> Result<()> {
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

/// The test registries `cargo xtask test` starts (`None` when run bare).
struct Registry {
    plain: String,
    data: PathBuf,
    auth: String,
    token: String,
    user: String,
    password: String,
}

/// The registry cases share the registry's blobs (one tampers with the
/// busybox layer): one at a time.
static REGISTRY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn registry() -> Result<Option<Registry>> {
    let var = |k: &str| std::env::var(k).ok();
    let Some(plain) = var("VESSEL_REGISTRY") else {
        ensure!(std::env::var_os("CI").is_none(), "VESSEL_REGISTRY is unset under CI");
        eprintln!("SKIPPED registry cases: VESSEL_REGISTRY is unset; run `cargo xtask test`");
        return Ok(None);
    };
    Ok(Some(Registry {
        plain,
        data: PathBuf::from(var("VESSEL_REGISTRY_DATA").context("VESSEL_REGISTRY_DATA")?),
        auth: var("VESSEL_REGISTRY_AUTH").context("VESSEL_REGISTRY_AUTH")?,
        token: var("VESSEL_REGISTRY_TOKEN").context("VESSEL_REGISTRY_TOKEN")?,
        user: var("VESSEL_REGISTRY_USER").context("VESSEL_REGISTRY_USER")?,
        password: var("VESSEL_REGISTRY_PASSWORD").context("VESSEL_REGISTRY_PASSWORD")?,
    }))
}

fn image_dir() -> PathBuf {
    PathBuf::from(std::env::var_os("VESSEL_TEST_IMAGE_DIR").unwrap())
}

/// `skopeo copy` of `src` to `docker://dest` (plain HTTP), with creds if given.
fn push(src: &str, dest: &str, creds: Option<&str>, all: bool) -> Result<()> {
    let mut cmd = std::process::Command::new("skopeo");
    cmd.args(["copy", "--quiet", "--dest-tls-verify=false"]);
    if all {
        cmd.arg("--all");
    }
    if let Some(c) = creds {
        cmd.args(["--dest-creds", c]);
    }
    let out = cmd.arg(src).arg(format!("docker://{dest}")).output()?;
    ensure!(out.status.success(), "skopeo copy to {dest}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

fn busybox_archive() -> String {
    format!("oci-archive:{}", image_dir().join("busybox-oci.tar").display())
}

/// The test image's blobs (by hex digest) and its manifest's digest.
fn busybox_blobs() -> Result<(BTreeMap<String, Vec<u8>>, String)> {
    let mut blobs: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut index = Vec::new();
    let mut ar = tar::Archive::new(std::fs::File::open(image_dir().join("busybox-oci.tar"))?);
    for e in ar.entries()? {
        let mut e = e?;
        let name = e.path()?.display().to_string();
        let mut data = Vec::new();
        e.read_to_end(&mut data)?;
        if name == "index.json" {
            index = data;
        } else if let Some(hex) = name.strip_prefix("blobs/sha256/").filter(|h| !h.is_empty()) {
            blobs.insert(hex.to_owned(), data);
        }
    }
    let index: serde_json::Value = serde_json::from_slice(&index)?;
    let manifest = index["manifests"][0]["digest"].as_str().context("a manifest")?.to_owned();
    Ok((blobs, manifest))
}

/// Stores `data` as a blob; its digest and size.
fn add_blob(blobs: &mut BTreeMap<String, Vec<u8>>, data: Vec<u8>) -> (String, usize) {
    use sha2::Digest;
    let hex = format!("{:x}", sha2::Sha256::digest(&data));
    let size = data.len();
    blobs.insert(hex.clone(), data);
    (format!("sha256:{hex}"), size)
}

fn blob<'a>(blobs: &'a BTreeMap<String, Vec<u8>>, digest: &str) -> &'a [u8] {
    &blobs[digest.trim_start_matches("sha256:")]
}

/// A manifest like `manifest` with its config changed by `edit`.
fn with_config(
    blobs: &mut BTreeMap<String, Vec<u8>>,
    manifest: &str,
    edit: impl FnOnce(&mut serde_json::Value),
) -> Result<(String, usize)> {
    let mut m: serde_json::Value = serde_json::from_slice(blob(blobs, manifest))?;
    let mut config: serde_json::Value =
        serde_json::from_slice(blob(blobs, m["config"]["digest"].as_str().context("a config")?))?;
    edit(&mut config);
    let (cd, cs) = add_blob(blobs, serde_json::to_vec(&config)?);
    m["config"]["digest"] = cd.into();
    m["config"]["size"] = cs.into();
    Ok(add_blob(blobs, serde_json::to_vec(&m)?))
}

/// Writes an OCI layout dir whose `latest` is `top` (a manifest or an index).
fn write_layout(dir: &Path, blobs: &BTreeMap<String, Vec<u8>>, media: &str, top: (String, usize)) -> Result<PathBuf> {
    std::fs::create_dir_all(dir.join("blobs/sha256"))?;
    for (hex, data) in blobs {
        std::fs::write(dir.join("blobs/sha256").join(hex), data)?;
    }
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [{"mediaType": media, "digest": top.0, "size": top.1,
        "annotations": {"org.opencontainers.image.ref.name": "latest"}}]});
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index)?)?;
    Ok(dir.to_path_buf())
}

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// An OCI layout dir whose `latest` is an index of two images: another
/// architecture's first (same layers, its own config), then this host's.
/// Returns the dir and the digest of this host's manifest.
fn two_platform_layout(dir: &Path) -> Result<(PathBuf, String)> {
    let (mut blobs, host_manifest) = busybox_blobs()?;
    let m: serde_json::Value = serde_json::from_slice(blob(&blobs, &host_manifest))?;
    let config: serde_json::Value =
        serde_json::from_slice(blob(&blobs, m["config"]["digest"].as_str().context("a config")?))?;
    let host_arch = config["architecture"].as_str().context("an architecture")?.to_owned();
    let other_arch = if host_arch == "arm64" { "amd64" } else { "arm64" };
    let (md, ms) = with_config(&mut blobs, &host_manifest, |c| c["architecture"] = other_arch.into())?;
    let host_size = blob(&blobs, &host_manifest).len();
    let nested = serde_json::json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [
        {"mediaType": OCI_MANIFEST, "digest": md, "size": ms, "platform": {"os": "linux", "architecture": other_arch}},
        {"mediaType": OCI_MANIFEST, "digest": host_manifest, "size": host_size, "platform": {"os": "linux", "architecture": host_arch}},
    ]});
    let top = add_blob(&mut blobs, serde_json::to_vec(&nested)?);
    Ok((write_layout(&dir.join("multi"), &blobs, "application/vnd.oci.image.index.v1+json", top)?, host_manifest))
}

/// Pull and create, reopen on a new host from storage, a two-platform
/// index resolved to this host, credentials (explicit and docker's
/// config.json), and pulling on demand.
async fn images_pull_from_a_registry(w: Arc<World>) -> Result<()> {
    let Some(reg) = registry()? else { return Ok(()) };
    let _one = REGISTRY.lock().await;
    let backend = format!("{:?}", w.backend).to_lowercase();
    let repo = format!("{}/{backend}/busybox:latest", reg.plain);
    push(&busybox_archive(), &repo, None, false)?;
    let mgr = w.manager("pull").await?;
    let pulled = mgr.pull_image(&repo).await.context("the first pull")?;
    ensure!(pulled.layers == 1 && pulled.bytes > 100_000, "{pulled:?}");
    let v = mgr.create_vessel(&repo, "/work").await?;
    ensure!(run(&v, "echo from the registry", true).await?.1 == "from the registry\n");
    v.create_snapshot("pulled").await?;
    let id = v.id().to_string();
    v.close().await?;
    let host_b = w.manager("pull-b").await?;
    let vb = host_b.open_vessel(&id).await?;
    ensure!(run(&vb, "cat /bin/busybox > /dev/null && echo ok", false).await?.1 == "ok\n");
    host_b.close().await?;

    // An index of two platforms: this host's image is the one pulled.
    let tmp = tempfile::tempdir()?;
    let (layout, host_manifest) = two_platform_layout(tmp.path()).context("the two-platform layout")?;
    let multi = format!("{}/{backend}/multi:latest", reg.plain);
    push(&format!("oci:{}:latest", layout.display()), &multi, None, true)?;
    let got = mgr.pull_image(&multi).await.context("the two-platform pull")?;
    ensure!(got.manifest_digest == host_manifest, "pulled {} for this host, want {host_manifest}", got.manifest_digest);

    // The image's config: WorkingDir (for an empty work dir), Env, and
    // Entrypoint/Cmd offered to the caller.
    let (mut blobs, manifest) = busybox_blobs()?;
    let top = with_config(&mut blobs, &manifest, |c| {
        c["config"]["WorkingDir"] = "/srv/app".into();
        c["config"]["Env"] = serde_json::json!(["PATH=/bin:/usr/bin", "GREETING=from the image"]);
        c["config"]["Entrypoint"] = serde_json::json!(["/bin/sh", "-c"]);
        c["config"]["Cmd"] = serde_json::json!(["echo $GREETING"]);
    })?;
    let configured = format!("{}/{backend}/configured:latest", reg.plain);
    let layout = write_layout(&tmp.path().join("configured"), &blobs, OCI_MANIFEST, top)?;
    push(&format!("oci:{}:latest", layout.display()), &configured, None, false)?;
    mgr.pull_image(&configured).await?;
    let v = mgr.create_vessel(&configured, "").await?;
    ensure!(v.manifest().work_dir == "/srv/app", "work dir {:?}", v.manifest().work_dir);
    let c = v.image_config().clone();
    ensure!(c.entrypoint == ["/bin/sh", "-c"] && c.cmd == ["echo $GREETING"], "{c:?}");
    let mut command = c.entrypoint.clone();
    command.extend(c.cmd.clone());
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let res = v
        .exec(ExecOptions {
            command,
            stdout: Some(Box::new(&mut out)),
            stderr: Some(Box::new(&mut err)),
            ..Default::default()
        })
        .await?;
    ensure!(res.exit_code == 0 && out == b"from the image\n", "{res:?} {}", String::from_utf8_lossy(&err));
    ensure!(run(&v, "pwd", false).await?.1 == "/srv/app\n");
    let explicit = mgr.create_vessel(&configured, "/elsewhere").await?;
    ensure!(explicit.manifest().work_dir == "/elsewhere", "an explicit work dir wins");

    // Basic auth: refused without or with wrong credentials, taken with
    // the right ones, given explicitly or through docker's config.json.
    let secret = format!("{}/{backend}/private:latest", reg.auth);
    push(&busybox_archive(), &secret, Some(&format!("{}:{}", reg.user, reg.password)), false)?;
    let nobody = tmp.path().join("no-docker-config.json");
    for (what, cfg) in [
        ("no credentials", w.config("auth-none").docker_config(&nobody)),
        (
            "wrong credentials",
            w.config("auth-wrong")
                .docker_config(&nobody)
                .registry_auth(reg.auth.clone(), vessel::RegistryAuth::Basic(reg.user.clone(), "wrong".into())),
        ),
    ] {
        let m = Manager::new(cfg).await?;
        match m.pull_image(&secret).await {
            Err(e) if e.kind() == VesselErrorKind::Unauthorized => {}
            other => return Err(anyhow!("{what}: {other:?}")),
        }
        m.close().await?;
    }
    let explicit = w
        .config("auth-explicit")
        .registry_auth(reg.auth.clone(), vessel::RegistryAuth::Basic(reg.user.clone(), reg.password.clone()));
    let m = Manager::new(explicit).await?;
    m.pull_image(&secret).await?;
    m.close().await?;
    // Bearer tokens: the registry sends the client to its token server,
    // which takes the basic credentials; without them, Unauthorized.
    let tokened = format!("{}/{backend}/tokened:latest", reg.token);
    push(&busybox_archive(), &tokened, Some(&format!("{}:{}", reg.user, reg.password)), false)?;
    let m = Manager::new(w.config("token-none").docker_config(&nobody)).await?;
    match m.pull_image(&tokened).await {
        Err(e) if e.kind() == VesselErrorKind::Unauthorized => {}
        other => return Err(anyhow!("a token registry without credentials: {other:?}")),
    }
    m.close().await?;
    let m = Manager::new(
        w.config("token-basic")
            .docker_config(&nobody)
            .registry_auth(reg.token.clone(), vessel::RegistryAuth::Basic(reg.user.clone(), reg.password.clone())),
    )
    .await?;
    let got = m.pull_image(&tokened).await.context("a pull with a bearer token")?;
    ensure!(got.layers == 1);
    m.close().await?;
    let docker_config = tmp.path().join("config.json");
    let token = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", reg.user, reg.password))
    };
    std::fs::write(
        &docker_config,
        serde_json::to_vec(&serde_json::json!({"auths": {reg.auth.clone(): {"auth": token}}}))?,
    )?;
    let m = Manager::new(w.config("auth-docker").docker_config(&docker_config).pull_on_demand(true)).await?;
    // Not in storage: pulled on demand, with docker's credentials.
    let on_demand = format!("{}/{backend}/private:latest", reg.auth);
    ensure!(m.storage().load_image(&vessel::ImageRef::new(&on_demand)?).await.is_ok(), "shared storage has it already");
    let fresh = format!("{}/{backend}/busybox:v2", reg.plain);
    push(&busybox_archive(), &fresh, None, false)?;
    let v = m.create_vessel(&fresh, "/work").await?;
    ensure!(run(&v, "echo on demand", false).await?.1 == "on demand\n");
    m.close().await?;
    match mgr.create_vessel(&format!("{}/{backend}/busybox:never-pulled", reg.plain), "/work").await {
        Err(e) if e.kind() == VesselErrorKind::NotFound => {}
        other => return Err(anyhow!("create from an image not pulled: {other:?}")),
    }
    mgr.close().await?;
    Ok(())
}

/// Unknown names, a registry that is down, a tampered layer and a
/// connection cut half way: typed errors, and nothing half-imported.
async fn registry_failures_are_typed_and_store_nothing(w: Arc<World>) -> Result<()> {
    let Some(reg) = registry()? else { return Ok(()) };
    let _one = REGISTRY.lock().await;
    let backend = format!("{:?}", w.backend).to_lowercase();
    let mgr = w.manager("pull-fail").await?;
    let root = w.base.join("pull-fail");
    let nothing_left = |what: &str| -> Result<()> {
        let spools: Vec<_> = std::fs::read_dir(&root)?
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(".pull-"))
            .collect();
        ensure!(spools.is_empty(), "{what}: a pull spool was left");
        Ok(())
    };
    let stored = |r: String| {
        let storage = mgr.storage().clone();
        async move { storage.load_image(&vessel::ImageRef::new(&r).unwrap()).await.is_ok() }
    };
    for (what, r) in [
        ("an unknown tag", format!("{}/{backend}/busybox:no-such-tag", reg.plain)),
        ("an unknown repository", format!("{}/{backend}/no-such-repo:latest", reg.plain)),
    ] {
        match mgr.pull_image(&r).await {
            Err(e) if e.kind() == VesselErrorKind::NotFound => {}
            other => return Err(anyhow!("{what}: {other:?}")),
        }
        ensure!(!stored(r).await, "{what} stored something");
    }
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    match mgr.pull_image(&format!("127.0.0.1:{closed}/x/busybox:latest")).await {
        Err(e) if e.kind() == VesselErrorKind::Unavailable => {}
        other => return Err(anyhow!("a registry that is down: {other:?}")),
    }

    // A layer tampered with in the registry's own storage.
    let tampered = format!("{}/{backend}/tampered:latest", reg.plain);
    push(&busybox_archive(), &tampered, None, false)?;
    let blobs = reg.data.join("docker/registry/v2/blobs/sha256");
    let layer = std::fs::read_dir(&blobs)?
        .flatten()
        .flat_map(|d| std::fs::read_dir(d.path()).into_iter().flatten().flatten())
        .map(|d| d.path().join("data"))
        .find(|p| std::fs::metadata(p).is_ok_and(|m| m.len() > 100_000))
        .context("the layer blob in the registry")?;
    let original = std::fs::read(&layer)?;
    let mut bad = original.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0xff;
    std::fs::write(&layer, &bad)?;
    let result = mgr.pull_image(&tampered).await;
    std::fs::write(&layer, &original)?;
    match result {
        Err(e) if e.kind() == VesselErrorKind::Corrupt => {}
        other => return Err(anyhow!("a tampered layer: {other:?}")),
    }
    ensure!(!stored(tampered.clone()).await, "a tampered image was stored");
    nothing_left("a tampered layer")?;

    // A connection cut after 64 KiB of the answer: through a proxy.
    let proxy = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let proxied = proxy.local_addr()?.to_string();
    let upstream = reg.plain.clone();
    let cutter = tokio::spawn(async move {
        loop {
            let Ok((mut client, _)) = proxy.accept().await else { return };
            let upstream = upstream.clone();
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let Ok(mut server) = tokio::net::TcpStream::connect(&upstream).await else { return };
                let (mut cr, mut cw) = client.split();
                let (mut sr, mut sw) = server.split();
                let up = tokio::io::copy(&mut cr, &mut sw);
                let down = async {
                    let mut left = 64usize << 10;
                    let mut buf = vec![0u8; 8192];
                    while left > 0 {
                        let n = match sr.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n.min(left),
                        };
                        if cw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                        left -= n;
                    }
                };
                tokio::select! { _ = up => {}, _ = down => {} }
            });
        }
    });
    let cut = format!("{proxied}/{backend}/tampered:latest");
    let result = mgr.pull_image(&cut).await;
    cutter.abort();
    ensure!(result.is_err(), "a pull through a cut connection succeeded");
    ensure!(!stored(cut).await, "a cut pull stored something");
    nothing_left("a cut connection")?;
    mgr.close().await?;
    Ok(())
}

/// An imported image's verified summary is kept in storage: a host whose
/// cache holds its layers creates vessels without reading the archive (shown
/// by spoiling the archive: this host still creates, a new host refuses).
async fn create_from_a_cached_image_reads_no_archive(w: Arc<World>) -> Result<()> {
    let mgr = w.manager("indexed").await?;
    let reference = "local/indexed:latest";
    let archive = std::fs::read(image_dir().join("busybox-oci.tar"))?;
    mgr.import_image(reference, Box::new(std::io::Cursor::new(archive))).await?;
    let first = mgr.create_vessel(reference, "/work").await?;
    let images = w.base.join("data/images/local");
    let stored: Vec<PathBuf> = std::fs::read_dir(&images)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("indexed:latest.tar")))
        .collect();
    ensure!(stored.len() == 1, "{stored:?}");
    let original = std::fs::read(&stored[0])?;
    std::fs::write(&stored[0], b"not an archive any more")?;
    let result = async {
        let second = mgr.create_vessel(reference, "/work").await.context("a create from the cache")?;
        ensure!(run(&second, "echo cached", false).await?.1 == "cached\n");
        let pin = |v: &vessel::Vessel| v.manifest().labels.get("vessel.image.config-digest").cloned();
        ensure!(pin(&second).is_some() && pin(&second) == pin(&first), "the same image is pinned");
        let other = w.manager("indexed-new-host").await?;
        let refused = other.create_vessel(reference, "/work").await;
        other.close().await?;
        ensure!(refused.is_err(), "a new host created from a spoiled archive");
        Ok(())
    }
    .await;
    std::fs::write(&stored[0], &original)?;
    result?;
    mgr.close().await?;
    Ok(())
}
