//! The snapshot engine against the shell pipelines it replaces, on the same
//! deterministic ~250 MB / 15k-file tree, in the same run:
//!
//! - diff: ours (walk + sha256 + zstd on zstd's worker threads) at zstd 1
//!   and 3, and uncompressed, vs `tar -cf - . | zstd -1` and `tar -cf - . | cat`;
//! - apply: ours (zstd-compressed layer, digest verified, confined) vs
//!   `zstd -d | tar -x`, both unpacking onto tmpfs;
//! - a 1-file change inside a 1 GB workspace: diffing the overlay upper
//!   costs what changed, not what is there (needs root for the mount);
//! - a 1 TB sparse file with 4 written blocks: snapshot and restore cost
//!   what was written, against GNU tar's `--sparse` (PAX 1.0, as ours).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use vessel_benches::{Sink, generate_tree};
use vessel_snapshot::{ApplyMode, ApplyOptions, apply_layer, write_diff};

const TREE_BYTES: usize = 250 << 20;
const TREE_FILES: usize = 15_000;

fn ours(tree: &Path, level: Option<i32>) -> u64 {
    match level {
        None => write_diff(tree, Sink::default()).unwrap().1.size,
        Some(level) => {
            let mut enc = zstd::stream::write::Encoder::new(Sink::default(), level).unwrap();
            enc.multithread(2).unwrap();
            let (enc, _) = write_diff(tree, enc).unwrap();
            enc.finish().unwrap().0
        }
    }
}

fn shell(tree: &Path, pipeline: &str) {
    let st = Command::new("sh").arg("-c").arg(pipeline).current_dir(tree).stdout(Stdio::null()).status().unwrap();
    assert!(st.success(), "{pipeline} failed");
}

fn diff_benches(c: &mut Criterion) {
    let tmp = tempfile::tempdir().unwrap();
    let tree = tmp.path().join("tree");
    std::fs::create_dir(&tree).unwrap();
    let bytes = generate_tree(&tree, 7, TREE_BYTES, TREE_FILES).unwrap();
    let tar_size = ours(&tree, None);
    println!("tree: {bytes} bytes of file data in {TREE_FILES} files; layer tar {tar_size} bytes");

    let mut g = c.benchmark_group("diff");
    g.sample_size(10).measurement_time(Duration::from_secs(15)).throughput(Throughput::Bytes(tar_size));
    g.bench_function("ours/zstd-1", |b| b.iter(|| ours(&tree, Some(1))));
    g.bench_function("ours/zstd-3", |b| b.iter(|| ours(&tree, Some(3))));
    g.bench_function("ours/uncompressed", |b| b.iter(|| ours(&tree, None)));
    g.bench_function("baseline/tar|zstd-1", |b| b.iter(|| shell(&tree, "tar -cf - . | zstd -1 -q -c")));
    g.bench_function("baseline/tar|cat", |b| b.iter(|| shell(&tree, "tar -cf - . | cat")));
    g.finish();

    // Apply: the same layer, zstd-compressed, unpacked into a fresh directory.
    let layer = tmp.path().join("layer.tar.zst");
    let digest = {
        let mut enc = zstd::stream::write::Encoder::new(std::fs::File::create(&layer).unwrap(), 1).unwrap();
        enc.multithread(2).unwrap();
        let (enc, stats) = write_diff(&tree, enc).unwrap();
        enc.finish().unwrap();
        stats.digest
    };
    // Unpack onto tmpfs: on this kind of VM, a disk target measures the
    // disk's writeback throttling (both tools slow to ~16 MB/s alike), not
    // the unpacker.
    let out = tempfile::tempdir_in("/dev/shm").unwrap_or_else(|_| tempfile::tempdir().unwrap());
    let mut g = c.benchmark_group("apply");
    g.sample_size(10).measurement_time(Duration::from_secs(20)).throughput(Throughput::Bytes(tar_size));
    let fresh = |name: &str| {
        let d = out.path().join(name);
        if d.exists() {
            std::fs::remove_dir_all(&d).unwrap();
        }
        d
    };
    g.bench_function("ours/zstd", |b| {
        b.iter_batched(
            || fresh("out-ours"),
            |dest| {
                let f = std::fs::File::open(&layer).unwrap();
                let opts = ApplyOptions::new(ApplyMode::Overlay).expect_digest(digest.clone());
                apply_layer(f, &dest, &opts).unwrap();
            },
            BatchSize::PerIteration,
        )
    });
    g.bench_function("baseline/zstd -d|tar -x", |b| {
        b.iter_batched(
            || {
                let d = fresh("out-tar");
                std::fs::create_dir(&d).unwrap();
                d
            },
            |dest| shell(&dest, &format!("zstd -d -q -c {} | tar -xf -", layer.display())),
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

/// One changed file on top of a 1 GB lower: the diff reads the upper only.
fn small_change_in_big_workspace(c: &mut Criterion) {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED diff/1-file-change-in-1GB: needs root for the overlay mount");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let lower = tmp.path().join("lower");
    std::fs::create_dir(&lower).unwrap();
    let bytes = generate_tree(&lower, 11, 1 << 30, 20_000).unwrap();
    let (upper, work, merged) = (tmp.path().join("upper"), tmp.path().join("work"), tmp.path().join("merged"));
    for d in [&upper, &work, &merged] {
        std::fs::create_dir(d).unwrap();
    }
    let opts = format!(
        "lowerdir={},upperdir={},workdir={},redirect_dir=off,metacopy=off,index=off",
        lower.display(),
        upper.display(),
        work.display()
    );
    nix::mount::mount(Some("overlay"), &merged, Some("overlay"), nix::mount::MsFlags::empty(), Some(opts.as_str()))
        .unwrap();
    std::fs::write(merged.join("dir0/changed.txt"), b"one small change\n").unwrap();
    println!("workspace: {bytes} bytes in the lower, 1 file changed");
    let mut g = c.benchmark_group("diff");
    g.bench_with_input(BenchmarkId::new("1-file-change-in-1GB", "ours/zstd-1"), &upper, |b, upper| {
        b.iter(|| ours(upper, Some(1)))
    });
    g.finish();
    nix::mount::umount2(&merged, nix::mount::MntFlags::MNT_DETACH).unwrap();
}

/// A 1 TB sparse file with four 4 KiB blocks written.
fn sparse_terabyte(c: &mut Criterion) {
    use std::os::unix::fs::FileExt;
    let tmp = tempfile::tempdir().unwrap();
    let tree = tmp.path().join("tree");
    std::fs::create_dir(&tree).unwrap();
    let f = std::fs::File::create(tree.join("sparse")).unwrap();
    f.set_len(1 << 40).unwrap();
    for i in 0..4u64 {
        f.write_all_at(&[i as u8 + 1; 4096], (1u64 << 40) / 4 * i).unwrap();
    }
    drop(f);
    let mut layer = Vec::new();
    write_diff(&tree, &mut layer).unwrap();
    println!("sparse: a 1 TB file with 4 written blocks makes a {} byte layer", layer.len());
    let gnu = tmp.path().join("gnu.tar");
    shell(&tree, &format!("tar --sparse --format=pax -cf {} .", gnu.display()));
    let mut g = c.benchmark_group("sparse-1TB-4-blocks");
    g.bench_function("snapshot/ours", |b| b.iter(|| ours(&tree, None)));
    g.bench_function("snapshot/baseline/tar --sparse|cat", |b| {
        b.iter(|| shell(&tree, "tar --sparse --format=pax -cf - . | cat"))
    });
    let out = tmp.path().join("out");
    g.bench_function("restore/ours", |b| {
        b.iter_batched(
            || {
                let _ = std::fs::remove_dir_all(&out);
            },
            |()| apply_layer(&layer[..], &out, &ApplyOptions::new(ApplyMode::Overlay)).unwrap(),
            BatchSize::PerIteration,
        )
    });
    g.bench_function("restore/baseline/tar -x --sparse", |b| {
        b.iter_batched(
            || {
                let _ = std::fs::remove_dir_all(&out);
                std::fs::create_dir(&out).unwrap();
            },
            |()| shell(&out, &format!("tar -xf {}", gnu.display())),
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

criterion_group!(benches, diff_benches, small_change_in_big_workspace, sparse_terabyte);
criterion_main!(benches);
