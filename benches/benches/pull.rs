//! Pulling an image from a registry on loopback: `Manager::pull_image`
//! (manifest, blobs verified and spooled, the archive checked by unpacking
//! its layers into the cache, stored) against `skopeo copy` of the same
//! image to a local OCI layout (download and write only), in the same run.
//! The image: busybox and two 16 MiB layers of incompressible bytes. Needs
//! root, the test image and the registry `cargo xtask bench` starts.

use std::process::Command;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use vessel::{Backend, CompressedStorage, LocalStorage, Manager, ManagerConfig};
use vessel_benches::image_dir;

fn main() {
    vessel::init();
    let Some(registry) = std::env::var_os("VESSEL_REGISTRY").map(|r| r.to_string_lossy().into_owned()) else {
        eprintln!("SKIPPED pull bench: VESSEL_REGISTRY is unset (run `cargo xtask bench`)");
        return;
    };
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED pull bench: needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let archive = vessel_benches::multi_layer_image(&image_dir().join("busybox-oci.tar"), 2, 16 << 20).unwrap();
    let layout = dir.path().join("image.tar");
    std::fs::write(&layout, &archive).unwrap();
    let reference = format!("{registry}/bench/pull:latest");
    let pushed = Command::new("skopeo")
        .args(["copy", "--quiet", "--dest-tls-verify=false"])
        .arg(format!("oci-archive:{}", layout.display()))
        .arg(format!("docker://{reference}"))
        .status()
        .unwrap();
    assert!(pushed.success(), "skopeo push");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let mut c = Criterion::default().configure_from_args().sample_size(10).measurement_time(Duration::from_secs(10));
    let mut g = c.benchmark_group("pull-33MB");
    g.throughput(Throughput::Bytes(archive.len() as u64));
    let mut n = 0u64;
    g.bench_function("vessel pull_image", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    n += 1;
                    // A new host each time: empty storage and layer cache.
                    let host = dir.path().join(format!("host-{n}"));
                    let storage = CompressedStorage::new(LocalStorage::new(host.join("data")).unwrap());
                    let config = ManagerConfig::default()
                        .storage(storage)
                        .mount_root(host.join("mounts"))
                        .backend(Backend::Youki);
                    let mgr = Manager::new(config).await.unwrap();
                    let t = Instant::now();
                    mgr.pull_image(&reference).await.unwrap();
                    total += t.elapsed();
                    mgr.close().await.unwrap();
                    let _ = std::fs::remove_dir_all(&host);
                }
                total
            })
        });
    });
    g.bench_function("baseline/skopeo copy to an OCI layout", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let out = dir.path().join("skopeo-out");
                let _ = std::fs::remove_dir_all(&out);
                let t = Instant::now();
                let ok = Command::new("skopeo")
                    .args(["copy", "--quiet", "--src-tls-verify=false"])
                    .arg(format!("docker://{reference}"))
                    .arg(format!("oci:{}:latest", out.display()))
                    .status()
                    .unwrap();
                total += t.elapsed();
                assert!(ok.success());
            }
            total
        });
    });
    g.finish();
    c.final_summary();
}
