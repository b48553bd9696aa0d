//! Latency of running `true` on a prepared busybox rootfs: vessel's youki
//! backend (including the runner re-exec round trip) vs `runc run` of the
//! same bundle; and, when a containerd answers at `VESSEL_CONTAINERD_ADDRESS`
//! (`cargo xtask bench` starts a private one), vessel's containerd backend vs
//! `ctr run --rm` of the same image, measured in the same run. Each vessel
//! backend runs twice: with host ids, and isolated (`-userns`: a user
//! namespace on an overlay over the idmapped layer, vessel's default); the
//! host-ids variant runs on a plain overlay of the same layer. Needs root
//! and the test image (`cargo xtask image`; `VESSEL_TEST_IMAGE_DIR` or
//! target/vessel-test).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use criterion::Criterion;
use oci_spec::runtime::{LinuxNamespaceBuilder, LinuxNamespaceType};
use vessel_benches::image_dir;
use vessel_runtime::{ContainerdConfig, ContainerdRuntime, RunRequest, Runtime, YoukiRuntime, oci_spec};

fn main() {
    // This binary is also the youki runner: init() first.
    vessel_runtime::init();
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED exec bench: needs root");
        return;
    }
    let layer = image_dir().join("layer.tar");
    if !layer.is_file() {
        eprintln!("SKIPPED exec bench: no test image at {} (run `cargo xtask image`)", layer.display());
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let layer_dir = dir.path().join("layer");
    std::fs::create_dir(&layer_dir).unwrap();
    assert!(Command::new("tar").arg("-xpf").arg(&layer).arg("-C").arg(&layer_dir).status().unwrap().success());
    // Both variants run on an overlay over the layer, as vessels do: plain
    // (host ids) and idmapped (isolated).
    let plain = dir.path().join("plain");
    for d in ["upper", "work", "rootfs"] {
        std::fs::create_dir_all(plain.join(d)).unwrap();
    }
    let rootfs = plain.join("rootfs");
    let _plain_mount = vessel_runtime::overlay::OverlayMount::mount(
        &rootfs,
        &[&layer_dir],
        Some((&plain.join("upper"), &plain.join("work"))),
    )
    .unwrap();
    let mut c = Criterion::default().configure_from_args().sample_size(50).measurement_time(Duration::from_secs(10));
    let mut g = c.benchmark_group("exec");

    // The isolated rootfs: an overlay over the same layer, idmapped.
    let userns =
        vessel_runtime::UserNamespace::new(vessel_runtime::IdMapping::new(0x7000_0000, 65536).unwrap()).unwrap();
    let iso = dir.path().join("iso");
    for d in ["ovl/upper", "ovl/work", "rootfs"] {
        std::fs::create_dir_all(iso.join(d)).unwrap();
    }
    let _iso_mount = vessel_runtime::overlay::OverlayMount::mount_idmapped(
        &iso.join("rootfs"),
        &[&layer_dir],
        &iso.join("ovl"),
        &userns,
    )
    .unwrap();
    let runtime = YoukiRuntime::new(dir.path().join("youki"));
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let req = || RunRequest { rootfs: rootfs.clone(), args: vec!["true".into()], ..Default::default() };
    let iso_req = || RunRequest {
        rootfs: iso.join("rootfs"),
        args: vec!["true".into()],
        user_namespace: Some(userns.mapping()),
        ..Default::default()
    };
    g.bench_function("vessel-youki/true", |b| {
        b.iter(|| assert_eq!(rt.block_on(runtime.run(req())).unwrap(), 0));
    });
    g.bench_function("vessel-youki-userns/true", |b| {
        b.iter(|| assert_eq!(rt.block_on(runtime.run(iso_req())).unwrap(), 0));
    });

    // The same specs for runc, with the network namespace runc must create
    // itself (vessel's runner provides one; runc has no runner).
    let runc_root = dir.path().join("runc");
    let bundle = |name: &str, req: &RunRequest<'_>| {
        let bundle = dir.path().join(name);
        std::fs::create_dir_all(&bundle).unwrap();
        let mut spec = vessel_runtime::spec::build(req, &format!("/vessel/runc-{name}"), None).unwrap();
        let mut linux = spec.linux().clone().unwrap();
        let mut ns = linux.namespaces().clone().unwrap();
        ns.push(LinuxNamespaceBuilder::default().typ(LinuxNamespaceType::Network).build().unwrap());
        linux.set_namespaces(Some(ns));
        spec.set_linux(Some(linux));
        spec.save(bundle.join("config.json")).unwrap();
        bundle
    };
    let mut n = 0u64;
    for (name, b) in
        [("runc-run/true", bundle("bundle", &req())), ("runc-run-userns/true", bundle("iso-bundle", &iso_req()))]
    {
        g.bench_function(name, |bch| {
            bch.iter(|| {
                n += 1;
                let st = Command::new("runc")
                    .arg("--root")
                    .arg(&runc_root)
                    .args(["run", "--bundle"])
                    .arg(&b)
                    .arg(format!("bench-{n}"))
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .unwrap();
                assert!(st.success());
            });
        });
    }
    match std::env::var_os("VESSEL_CONTAINERD_ADDRESS") {
        Some(address) => bench_containerd(
            &mut g,
            &rt,
            PathBuf::from(address),
            &rootfs,
            (&iso.join("rootfs"), userns.mapping()),
            dir.path(),
        ),
        None => {
            eprintln!("SKIPPED exec bench for containerd: VESSEL_CONTAINERD_ADDRESS is unset (`cargo xtask bench`)")
        }
    }
    g.finish();
    c.final_summary();
}

fn bench_containerd(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    rt: &tokio::runtime::Runtime,
    address: PathBuf,
    rootfs: &Path,
    (iso, mapping): (&Path, vessel_runtime::IdMapping),
    dir: &Path,
) {
    let namespace = "vessel-bench";
    let config =
        ContainerdConfig { address: address.clone(), namespace: namespace.into(), root: dir.join("containerd") };
    let runtime = rt.block_on(ContainerdRuntime::connect(config)).unwrap();
    let req = || RunRequest { rootfs: rootfs.to_path_buf(), args: vec!["true".into()], ..Default::default() };
    g.bench_function("vessel-containerd/true", |b| {
        b.iter(|| assert_eq!(rt.block_on(runtime.run(req())).unwrap(), 0));
    });
    let iso_req = || RunRequest {
        rootfs: iso.to_path_buf(),
        args: vec!["true".into()],
        user_namespace: Some(mapping),
        ..Default::default()
    };
    g.bench_function("vessel-containerd-userns/true", |b| {
        b.iter(|| assert_eq!(rt.block_on(runtime.run(iso_req())).unwrap(), 0));
    });
    let ctr = |args: &[&str]| {
        let st = Command::new("ctr")
            .arg("--address")
            .arg(&address)
            .args(["--namespace", namespace])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(st.success(), "ctr {args:?}");
    };
    ctr(&["images", "import", image_dir().join("busybox-oci.tar").to_str().unwrap()]);
    let mut n = 0u64;
    g.bench_function("ctr-run-rm/true", |b| {
        b.iter(|| {
            n += 1;
            ctr(&["run", "--rm", "local/busybox:latest", &format!("bench-{n}"), "true"]);
        });
    });
    ctr(&["images", "rm", "--sync", "local/busybox:latest"]);
}
