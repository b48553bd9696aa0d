//! A ~250 MB workspace through the S3 server `cargo xtask bench` starts on
//! loopback (moto), against `LocalStorage`, with a plain baseline in the
//! same run:
//!
//! - `snapshot/<storage>`: snapshot of 250 MB of changes (diff, sha256,
//!   zstd level 1 on two threads, upload);
//! - `open-new-host/<storage>`: open on a host with an empty cache (claim,
//!   manifest, image and layer fetch, verify, unpack, mount);
//! - `baseline-get-zstd-tar-x`: the same snapshot object fetched with one
//!   plain GET (object_store, as vessel's) and unpacked by `zstd -d | tar -x`;
//! - `baseline-tar-c-zstd-put`: the tree packed by `tar -c | zstd -1 -T2`
//!   and uploaded with object_store's multipart `BufWriter` (the snapshot's
//!   work without vessel: the same level and threads).
//!
//! Needs root, the test image, a btrfs `TMPDIR` and `VESSEL_S3_URL` with
//! the `AWS_*` variables.

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::Criterion;
use futures::StreamExt;
use object_store::ObjectStoreExt;
use tokio::io::AsyncReadExt;
use vessel::{Backend, ImageRef, LocalStorage, Manager, ManagerConfig, Storage};
use vessel_benches::image_dir;

const IMAGE: &str = "local/busybox:latest";
const SIZE: usize = 250 << 20;
const FILES: usize = 2500;

/// Copies the generated tree into the vessel through the file API.
fn fill(rt: &tokio::runtime::Runtime, v: &vessel::Vessel, tree: &std::path::Path) {
    let _ = rt;
    let mut stack = vec![tree.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let rel = format!("/work/{}", e.path().strip_prefix(tree).unwrap().display());
            if e.file_type().unwrap().is_dir() {
                v.make_dir_all(&rel, 0o755).unwrap();
                stack.push(e.path());
            } else {
                v.write_file(&rel, &std::fs::read(e.path()).unwrap(), 0o644).unwrap();
            }
        }
    }
}

fn main() {
    vessel::init();
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED objects bench: needs root");
        return;
    }
    let Some(s3) = std::env::var_os("VESSEL_S3_URL") else {
        eprintln!("SKIPPED objects bench: VESSEL_S3_URL is unset (run `cargo xtask bench`)");
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    std::fs::create_dir(&tree).unwrap();
    let bytes = vessel_benches::generate_tree(&tree, 7, SIZE, FILES).unwrap();
    eprintln!("workspace: {} MB in {FILES} files", bytes >> 20);
    let s3_url = format!("{}/bench-{:016x}", s3.to_string_lossy(), std::process::id());
    let storages: Vec<(&str, Arc<dyn Storage>)> = rt.block_on(async {
        let local = vessel::CompressedStorage::new(LocalStorage::new(dir.path().join("data")).unwrap());
        vec![
            ("local", Arc::new(local.with_threads(2)) as Arc<dyn Storage>),
            (
                "s3",
                Arc::new(
                    vessel::CompressedStorage::new(vessel::storage::ObjectStorage::connect(&s3_url).await.unwrap())
                        .with_threads(2),
                ) as Arc<dyn Storage>,
            ),
        ]
    });
    let config = |storage: &Arc<dyn Storage>, host: &str| {
        ManagerConfig::default()
            .shared_storage(storage.clone())
            .mount_root(dir.path().join(host))
            .backend(Backend::Youki)
            .disk_quota(None)
    };
    let mut c = Criterion::default().configure_from_args().sample_size(10).measurement_time(Duration::from_secs(20));
    let mut g = c.benchmark_group("objects-250MB");
    let mut committed = Vec::new();
    for (name, storage) in &storages {
        let mgr = rt.block_on(async {
            let mut data = Vec::new();
            let r = ImageRef::new(IMAGE).unwrap();
            let src = LocalStorage::new(image_dir().join("storage")).unwrap();
            src.load_image(&r).await.unwrap().read_to_end(&mut data).await.unwrap();
            let mgr = Manager::new(config(storage, &format!("{name}-writer"))).await.unwrap();
            mgr.import_image(IMAGE, Box::new(std::io::Cursor::new(data))).await.unwrap();
            mgr
        });
        let v = rt.block_on(mgr.create_vessel(IMAGE, "/work")).unwrap();
        let empty = rt.block_on(v.create_snapshot("empty")).unwrap().id;
        g.bench_function(format!("snapshot/{name}"), |b| {
            b.iter_custom(|n| {
                let mut total = Duration::ZERO;
                for _ in 0..n {
                    // 250 MB of changes each time (untimed): the tree, on the empty state.
                    rt.block_on(v.restore_snapshot(&empty)).unwrap();
                    fill(&rt, &v, &tree);
                    let t = Instant::now();
                    let s = rt.block_on(v.create_snapshot("bench")).unwrap();
                    total += t.elapsed();
                    // Only one 250 MB snapshot kept (the server holds them in memory).
                    rt.block_on(v.restore_snapshot(&empty)).unwrap();
                    rt.block_on(v.delete_snapshot(&s.id)).unwrap();
                }
                total
            })
        });
        fill(&rt, &v, &tree);
        let snap = rt.block_on(v.create_snapshot("kept")).unwrap().id;
        let id = v.id().to_string();
        rt.block_on(v.close()).unwrap();
        rt.block_on(mgr.close()).unwrap();
        g.bench_function(format!("open-new-host/{name}"), |b| {
            b.iter_custom(|n| {
                let mut total = Duration::ZERO;
                for i in 0..n {
                    let host = format!("{name}-reader-{i}");
                    let mgr = rt.block_on(Manager::new(config(storage, &host))).unwrap();
                    let t = Instant::now();
                    let v = rt.block_on(mgr.open_vessel(&id)).unwrap();
                    total += t.elapsed();
                    rt.block_on(v.close()).unwrap();
                    rt.block_on(mgr.close()).unwrap();
                    drop(mgr);
                    std::fs::remove_dir_all(dir.path().join(&host)).unwrap();
                }
                total
            })
        });
        committed.push((id, snap));
    }
    // The baseline: the S3 snapshot object, one GET, `zstd -d | tar -x`.
    let (id, snap) = committed.pop().unwrap();
    let store = rt.block_on(vessel::storage::ObjectStorage::connect(&s3_url)).unwrap();
    let key = store.key(&format!("vessels/{id}/snapshots/{snap}.tar.zst"));
    g.bench_function("baseline-get-zstd-tar-x", |b| {
        b.iter_custom(|n| {
            let mut total = Duration::ZERO;
            for _ in 0..n {
                let out = dir.path().join("baseline");
                std::fs::create_dir_all(&out).unwrap();
                let t = Instant::now();
                let mut child = std::process::Command::new("sh")
                    .arg("-c")
                    .arg(format!("zstd -d -q -c | tar -x -C {}", out.display()))
                    .stdin(std::process::Stdio::piped())
                    .spawn()
                    .unwrap();
                let mut stdin = child.stdin.take().unwrap();
                rt.block_on(async {
                    let mut body = store.store().get(&key).await.unwrap().into_stream();
                    while let Some(chunk) = body.next().await {
                        stdin.write_all(&chunk.unwrap()).unwrap();
                    }
                });
                drop(stdin);
                assert!(child.wait().unwrap().success());
                total += t.elapsed();
                std::fs::remove_dir_all(&out).unwrap();
            }
            total
        })
    });
    let tar_tree = tree.clone();
    g.bench_function("baseline-tar-c-zstd-put", |b| {
        b.iter_custom(|n| {
            let mut total = Duration::ZERO;
            for i in 0..n {
                let key = store.key(&format!("baseline/{i}.tar.zst"));
                let t = Instant::now();
                let mut child = std::process::Command::new("sh")
                    .arg("-c")
                    .arg(format!("tar -C {} -c . | zstd -1 -T2 -q -c", tar_tree.display()))
                    .stdout(std::process::Stdio::piped())
                    .spawn()
                    .unwrap();
                let stdout = child.stdout.take().unwrap();
                rt.block_on(async {
                    use tokio::io::AsyncWriteExt;
                    let mut out = tokio::process::ChildStdout::from_std(stdout).unwrap();
                    let mut w = object_store::buffered::BufWriter::new(store.store().clone(), key.clone());
                    tokio::io::copy(&mut out, &mut w).await.unwrap();
                    w.shutdown().await.unwrap();
                });
                assert!(child.wait().unwrap().success());
                total += t.elapsed();
                rt.block_on(store.store().delete(&key)).unwrap();
            }
            total
        })
    });
    g.finish();
    c.final_summary();
}
