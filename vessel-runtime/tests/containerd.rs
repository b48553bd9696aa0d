//! The runtime conformance suite on the containerd backend, against the
//! private containerd `cargo xtask test` starts (`VESSEL_CONTAINERD_ADDRESS`),
//! plus what only this backend has: removal of a crashed process's
//! containers, and images read from containerd's store.

mod conformance;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use conformance::{Suite, leftover_cgroups, pids_of};
use libtest_mimic::{Arguments, Failed, Trial};
use sha2::{Digest, Sha256};
use vessel_runtime::{ContainerdConfig, ContainerdRuntime, RunRequest, Runtime};

/// One runtime for the whole binary: the gRPC channel lives on it.
static TOKIO: LazyLock<tokio::runtime::Runtime> =
    LazyLock::new(|| tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap());

/// Set in the child that plays a crashed vessel process.
const CRASH_CHILD: &str = "VESSEL_TEST_CRASH_CHILD";

struct Env {
    address: PathBuf,
    namespace: String,
    image_dir: PathBuf,
    dir: tempfile::TempDir,
}

impl Env {
    fn config(&self) -> ContainerdConfig {
        ContainerdConfig {
            address: self.address.clone(),
            namespace: self.namespace.clone(),
            root: self.dir.path().join("runs"),
        }
    }

    fn ctr(&self, args: &[&str]) -> std::process::Output {
        let out = Command::new("ctr")
            .arg("--address")
            .arg(&self.address)
            .arg("--namespace")
            .arg(&self.namespace)
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "ctr {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        out
    }
}

fn env() -> Option<Env> {
    let address = vessel_test_support::env_path("containerd conformance", "VESSEL_CONTAINERD_ADDRESS")?;
    let image_dir = vessel_test_support::env_path("containerd conformance", "VESSEL_TEST_IMAGE_DIR")?;
    let namespace =
        std::env::var("VESSEL_TEST_NAMESPACE").unwrap_or_else(|_| format!("vessel-test-{}", std::process::id()));
    Some(Env { address, namespace, image_dir, dir: tempfile::tempdir().unwrap() })
}

fn main() {
    vessel_runtime::init();
    if std::env::var_os(CRASH_CHILD).is_some() {
        crash_child();
    }
    let args = Arguments::from_args();
    let Some(env) = env() else {
        println!("containerd conformance: 0 passed, 0 failed, 1 skipped");
        return;
    };
    let runtime = TOKIO.block_on(ContainerdRuntime::connect(env.config())).expect("connect to the test containerd");
    // Every case in a user namespace over idmapped layers (vessel's
    // default) and with host ids.
    let ns = vessel_runtime::UserNamespace::new(conformance::test_mapping()).expect("user namespace");
    let mut suites = Vec::new();
    for userns in [Some(&ns), None] {
        let sub = env.dir.path().join(if userns.is_some() { "userns" } else { "host" });
        let (rootfs, mount) = conformance::rootfs(&sub, &env.image_dir, userns);
        suites.push(Arc::new(Suite {
            runtime: runtime.clone(),
            rootfs,
            userns: userns.map(|n| n.mapping()),
            _mount: mount,
        }));
    }
    let suite = suites[1].clone();
    let env = Arc::new(env);
    let mut trials = Vec::new();
    for s in &suites {
        trials.extend(conformance::trials!(s.clone(), on_tokio));
    }
    {
        let (env, suite) = (env.clone(), suite.clone());
        trials.push(Trial::test("leftovers_of_a_dead_process_are_removed", move || {
            leftovers_of_a_dead_process_are_removed(&env, &suite.rootfs).map_err(Failed::from)
        }));
    }
    {
        let (env, rt) = (env.clone(), runtime.clone());
        trials.push(Trial::test("image_blobs_are_read_from_the_store", move || {
            image_blobs_are_read_from_the_store(&env, &rt).map_err(Failed::from)
        }));
    }
    {
        let env = env.clone();
        trials.push(Trial::test("connect_errors_are_clear", move || {
            connect_errors_are_clear(&env).map_err(Failed::from)
        }));
    }
    let conclusion = libtest_mimic::run(&args, trials);

    // Leak check once every case is done (cancelled runs finish tearing down
    // in the background: give them a moment).
    let deadline = Instant::now() + Duration::from_secs(15);
    let leaks = loop {
        let containers = TOKIO.block_on(runtime.containers()).unwrap();
        let tasks = TOKIO.block_on(runtime.tasks_in_namespace()).unwrap();
        let cgroups = leftover_cgroups();
        let runs: Vec<_> = std::fs::read_dir(env.dir.path().join("runs/runs"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .collect();
        let clean = containers.is_empty() && tasks.is_empty() && cgroups.is_empty() && runs.is_empty();
        if clean || Instant::now() > deadline {
            break (!clean).then(|| {
                format!("containers {containers:?}, tasks {tasks:?}, cgroups {cgroups:?}, run dirs {runs:?}")
            });
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    if let Some(leaks) = leaks {
        eprintln!("leaks after the suite: {leaks}");
        std::process::exit(101);
    }
    println!("leak check: no containerd container, task, cgroup or run directory left");
    // The namespace is empty now; removing it is tidiness, not a check.
    let _ = Command::new("ctr").arg("--address").arg(&env.address).args(["namespaces", "rm", &env.namespace]).output();
    // The idmapped rootfs mount goes with the suites (exit runs no destructor).
    drop((suite, suites));
    conclusion.exit();
}

/// Runs a conformance case on the binary's runtime (where the channel lives).
fn on_tokio(case: impl Future<Output = conformance::CaseResult>) -> Result<(), Failed> {
    TOKIO.block_on(case).map_err(Failed::from)
}

/// The child side of the crash test: starts a long run, says so, and waits
/// to be killed.
fn crash_child() -> ! {
    let env = env().expect("the parent checked the environment");
    let rootfs = PathBuf::from(std::env::var_os("VESSEL_TEST_ROOTFS").unwrap());
    TOKIO.block_on(async {
        let rt = ContainerdRuntime::connect(env.config()).await.unwrap();
        let req = RunRequest { rootfs, args: vec!["sleep".into(), "1002".into()], ..Default::default() };
        let _ = rt.run(req).await;
    });
    std::process::exit(0)
}

/// Starts the crash child (in its own process group, with its watchdog)
/// and waits for its container's `sleep 1002`.
fn start_crash_child(env: &Env, rootfs: &Path) -> Result<std::process::Child, String> {
    let sleeper = b"sleep\x001002\x00";
    let mut child = Command::new(std::env::current_exe().unwrap())
        .env(CRASH_CHILD, "1")
        .env("VESSEL_TEST_NAMESPACE", &env.namespace)
        .env("VESSEL_TEST_ROOTFS", rootfs)
        .process_group(0)
        .spawn()
        .map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while pids_of(sleeper).is_empty() {
        if Instant::now() > deadline {
            let _ = child.kill();
            return Err("the child's container never started".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(child)
}

fn leftovers_of_a_dead_process_are_removed(env: &Env, rootfs: &Path) -> Result<(), String> {
    let sleeper = b"sleep\x001002\x00";
    // Every way a service manager or an operator stops the caller alone:
    // its watchdog removes the container at once.
    for sig in [
        nix::sys::signal::Signal::SIGKILL,
        nix::sys::signal::Signal::SIGTERM,
        nix::sys::signal::Signal::SIGINT,
        nix::sys::signal::Signal::SIGHUP,
    ] {
        let mut child = start_crash_child(env, rootfs)?;
        let pgid = nix::unistd::Pid::from_raw(child.id() as i32);
        if sig == nix::sys::signal::Signal::SIGKILL {
            nix::sys::signal::kill(pgid, sig).map_err(|e| e.to_string())?;
        } else {
            // To the whole group, as a service manager stops it.
            nix::sys::signal::killpg(pgid, sig).map_err(|e| e.to_string())?;
        }
        child.wait().map_err(|e| e.to_string())?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !pids_of(sleeper).is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if !pids_of(sleeper).is_empty() {
            return Err(format!("{sig}: the container outlived its caller"));
        }
        // The child's containers only: this process runs others meanwhile.
        let child_pid = format!("/{}/", child.id());
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left: Vec<_> = TOKIO
                .block_on(async {
                    let rt = ContainerdRuntime::connect(env.config()).await.map_err(|e| e.to_string())?;
                    rt.containers().await.map_err(|e| e.to_string())
                })?
                .into_iter()
                .filter(|(_, owner)| owner.contains(&child_pid))
                .collect();
            if left.is_empty() {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!("{sig}: containers left after the watchdog: {left:?}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    // kill -9 of the whole group, watchdog included: the shim keeps the
    // container alive until the next connection removes it.
    let mut child = start_crash_child(env, rootfs)?;
    nix::sys::signal::killpg(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGKILL)
        .map_err(|e| e.to_string())?;
    child.wait().map_err(|e| e.to_string())?;
    std::thread::sleep(Duration::from_millis(300));
    if pids_of(sleeper).is_empty() {
        return Err("the container died with its creator; nothing to clean up was left".into());
    }
    // A container vessel did not make (no owner label) must survive.
    env.ctr(&["images", "import", env.image_dir.join("busybox-oci.tar").to_str().unwrap()]);
    let foreign = format!("foreign-{}", std::process::id());
    env.ctr(&["containers", "create", "local/busybox:latest", &foreign]);

    let result = TOKIO.block_on(async {
        // A live run of this process (its owner alive) must survive too.
        let mine = ContainerdRuntime::connect(env.config()).await.map_err(|e| e.to_string())?;
        let req = RunRequest { rootfs: rootfs.into(), args: vec!["sleep".into(), "2".into()], ..Default::default() };
        let live = mine.run(req);
        let reconnect = async {
            tokio::time::sleep(Duration::from_millis(800)).await;
            let fresh = ContainerdRuntime::connect(env.config()).await.map_err(|e| e.to_string())?;
            let left = fresh.containers().await.map_err(|e| e.to_string())?;
            Ok::<_, String>(left)
        };
        let (live, left) = tokio::join!(live, reconnect);
        let code = live.map_err(|e| format!("the live run was disturbed: {e}"))?;
        if code != 0 {
            return Err(format!("the live run exited {code}"));
        }
        let left = left?;
        if left.len() != 1 {
            return Err(format!("after reconnecting, vessel containers {left:?}; want only the live run's"));
        }
        Ok(())
    });
    let still = pids_of(sleeper);
    let containers = String::from_utf8_lossy(&env.ctr(&["containers", "ls", "-q"]).stdout).into_owned();
    env.ctr(&["containers", "rm", &foreign]);
    env.ctr(&["images", "rm", "--sync", "local/busybox:latest"]);
    result?;
    if !still.is_empty() {
        return Err(format!("the dead owner's process still runs: {still:?}"));
    }
    if !containers.lines().any(|l| l == foreign) {
        return Err(format!("the foreign container was removed: {containers:?}"));
    }
    Ok(())
}

fn image_blobs_are_read_from_the_store(env: &Env, rt: &ContainerdRuntime) -> Result<(), String> {
    let reference = "local/export-test:latest";
    env.ctr(&[
        "images",
        "import",
        "--index-name",
        reference,
        env.image_dir.join("busybox-docker.tar").to_str().unwrap(),
    ]);
    // Reached as the facade reaches it: the runtime's optional capability.
    let Some(store) = vessel_runtime::Runtime::image_store(rt) else {
        return Err("containerd offers no image store".into());
    };
    let result = TOKIO.block_on(async {
        if let Some(d) = store.image_target("local/absent:latest").await.map_err(|e| e.to_string())? {
            return Err(format!("an absent image has a target: {d:?}"));
        }
        let target =
            store.image_target(reference).await.map_err(|e| e.to_string())?.ok_or("the imported image is absent")?;
        let mut doc = Vec::new();
        store.read_blob(&target, &mut doc).await.map_err(|e| e.to_string())?;
        let mut blobs = vec![(target, doc.clone())];
        // An imported archive's target is an index: its first manifest.
        if let Ok(index) = serde_json::from_slice::<oci_spec::image::ImageIndex>(&doc) {
            let first = index.manifests().first().ok_or("an empty index")?.clone();
            doc.clear();
            store.read_blob(&first, &mut doc).await.map_err(|e| e.to_string())?;
            blobs.push((first, doc.clone()));
        }
        // The manifest, then the config and the one layer, each exactly
        // what its descriptor says.
        let manifest: oci_spec::image::ImageManifest =
            serde_json::from_slice(&doc).map_err(|e| format!("no manifest: {e}"))?;
        for d in std::iter::once(manifest.config()).chain(manifest.layers()) {
            let mut body = Vec::new();
            store.read_blob(d, &mut body).await.map_err(|e| e.to_string())?;
            blobs.push((d.clone(), body));
        }
        // A descriptor that lies about the size is refused.
        let (first, _) = &blobs[0];
        let mut lying = first.clone();
        lying.set_size(first.size() + 1);
        let mut sink = Vec::new();
        let refused = store.read_blob(&lying, &mut sink).await;
        if !matches!(refused, Err(vessel_runtime::RuntimeError::BlobSize { .. })) {
            return Err(format!("a wrong size was not refused: {refused:?}"));
        }
        Ok(blobs)
    });
    env.ctr(&["images", "rm", "--sync", reference]);
    for (d, body) in result? {
        let actual = format!("sha256:{:x}", Sha256::digest(&body));
        if actual != d.digest().to_string() || body.len() as u64 != d.size() {
            return Err(format!("blob {} read as {actual}, {} bytes", d.digest(), body.len()));
        }
    }
    Ok(())
}

fn connect_errors_are_clear(env: &Env) -> Result<(), String> {
    TOKIO.block_on(async {
        let mut missing = env.config();
        missing.address = env.dir.path().join("no.sock");
        match ContainerdRuntime::connect(missing).await {
            Err(e)
                if e.kind() == vessel_runtime::RuntimeErrorKind::Unavailable && e.to_string().contains("no.sock") => {}
            other => return Err(format!("missing socket: {other:?}")),
        }
        // A socket that is not containerd.
        let path = env.dir.path().join("not-containerd.sock");
        let listener = tokio::net::UnixListener::bind(&path).map_err(|e| e.to_string())?;
        let server = tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                use tokio::io::AsyncWriteExt;
                let _ = s.write_all(b"HTTP/1.0 400 nope\r\n\r\n").await;
            }
        });
        let mut other = env.config();
        other.address = path;
        let result = ContainerdRuntime::connect(other).await;
        server.abort();
        match result {
            Err(e) if e.kind() == vessel_runtime::RuntimeErrorKind::Unavailable => {}
            other => return Err(format!("a socket that is not containerd: {other:?}")),
        }
        let mut bad = env.config();
        bad.namespace = "../etc".into();
        match ContainerdRuntime::connect(bad).await {
            Err(e) if e.kind() == vessel_runtime::RuntimeErrorKind::InvalidRequest => Ok(()),
            other => Err(format!("invalid namespace: {other:?}")),
        }
    })
}
