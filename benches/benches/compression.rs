//! zstd (levels 1 and 3, on 1 and 2 threads) against gzip (flate2, the
//! Go original's format) on a deterministic ~250 MB mixed corpus, plus the
//! whole `CompressedStorage` save path into a `LocalStorage` (fsync
//! included). Throughput is in bytes of input per second; each
//! configuration's compression ratio is printed before it is measured.

use std::io::{self, Write};
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use vessel_benches::{Sink, mixed_corpus};
use vessel_storage::{CompressedStorage, LocalStorage, SnapshotId, Storage, VesselId};

const CORPUS_BYTES: usize = 250 << 20;

fn zstd_size(data: &[u8], level: i32, threads: u32) -> u64 {
    let mut enc = zstd::stream::write::Encoder::new(Sink::default(), level).unwrap();
    if threads > 1 {
        enc.multithread(threads).unwrap();
    }
    for chunk in data.chunks(256 << 10) {
        enc.write_all(chunk).unwrap();
    }
    enc.finish().unwrap().0
}

fn gzip_size(data: &[u8], level: u32) -> u64 {
    let mut enc = flate2::write::GzEncoder::new(Sink::default(), flate2::Compression::new(level));
    for chunk in data.chunks(256 << 10) {
        enc.write_all(chunk).unwrap();
    }
    enc.finish().unwrap().0
}

fn ratio(name: &str, input: usize, output: u64) {
    println!("ratio {name}: {:.3} ({input} -> {output} bytes)", input as f64 / output as f64);
}

fn compression(c: &mut Criterion) {
    let data = mixed_corpus(2026, CORPUS_BYTES);
    let mut g = c.benchmark_group("compression");
    g.sample_size(10).measurement_time(Duration::from_secs(15)).throughput(Throughput::Bytes(data.len() as u64));

    for (level, threads) in [(1, 1), (1, 2), (3, 1), (3, 2)] {
        let name = format!("zstd-{level}/{threads}t");
        ratio(&name, data.len(), zstd_size(&data, level, threads));
        g.bench_function(BenchmarkId::from_parameter(&name), |b| b.iter(|| zstd_size(&data, level, threads)));
    }
    for level in [6, 1] {
        let name = format!("gzip-{level}");
        ratio(&name, data.len(), gzip_size(&data, level));
        g.bench_function(BenchmarkId::from_parameter(&name), |b| b.iter(|| gzip_size(&data, level)));
    }

    // The real save path: async source -> pipe -> zstd workers -> pipe -> temp file -> fsync -> rename.
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let shared = bytes::Bytes::from(data.clone());
    let (v, s) = (VesselId::from_u64(1), SnapshotId::from_u64(1));
    for level in [1, 3] {
        let storage = CompressedStorage::new(LocalStorage::new(dir.path()).unwrap()).with_level(level).with_threads(2);
        g.bench_function(BenchmarkId::new("storage-save", format!("zstd-{level}/2t")), |b| {
            b.iter(|| {
                rt.block_on(storage.save_snapshot(&v, &s, Box::new(io::Cursor::new(shared.clone())))).unwrap();
            })
        });
    }
    g.finish();
}

criterion_group!(benches, compression);
criterion_main!(benches);
