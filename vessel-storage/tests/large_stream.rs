//! A 2 GiB snapshot streams through each storage with bounded memory.
//!
//! Its own test binary with a single test, so the process's peak RSS is this
//! test's alone.

mod common;

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};
use vessel_storage::{BlobReader, CompressedStorage, LocalStorage, Storage};

use common::{TestResult, sid, vid};

const SIZE: u64 = 2 << 30;
/// Peak RSS allowed above the baseline: what the pipes, zstd's workers and
/// the write buffers may hold, far below the blob's size.
const RSS_BUDGET: u64 = 192 << 20;

/// 2 GiB of deterministic data, generated on the fly and hashed as it goes.
struct Generated {
    left: u64,
    block: Vec<u8>,
    counter: u64,
    hash: Sha256,
}

impl Generated {
    fn new(size: u64) -> Self {
        Self { left: size, block: common::pattern(42, 1 << 16), counter: 0, hash: Sha256::new() }
    }
}

impl AsyncRead for Generated {
    fn poll_read(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let n = (buf.remaining() as u64).min(self.left).min(self.block.len() as u64) as usize;
        if n == 0 {
            return Poll::Ready(Ok(()));
        }
        // Stamp a counter so every block differs and misordering is caught.
        self.counter += 1;
        let c = self.counter.to_le_bytes();
        self.block[..8].copy_from_slice(&c);
        let this = &mut *self;
        buf.put_slice(&this.block[..n]);
        this.hash.update(&this.block[..n]);
        this.left -= n as u64;
        Poll::Ready(Ok(()))
    }
}

fn vm_hwm() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

fn reset_hwm() {
    // Writing 5 to clear_refs resets the peak RSS (Linux >= 4.0).
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
}

async fn stream_through(s: &dyn Storage, name: &str) -> TestResult {
    reset_hwm();
    let base = vm_hwm();
    let gen_hash = Arc::new(Mutex::new(None));
    /// Publishes the generator's hash once it has been read to the end.
    struct Tee(Generated, Arc<Mutex<Option<Vec<u8>>>>);
    impl AsyncRead for Tee {
        fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            let before = buf.filled().len();
            let r = Pin::new(&mut self.0).poll_read(cx, buf);
            if buf.filled().len() == before {
                let h = std::mem::take(&mut self.0.hash).finalize().to_vec();
                *self.1.lock().unwrap() = Some(h);
            }
            r
        }
    }
    let source: BlobReader = Box::new(Tee(Generated::new(SIZE), gen_hash.clone()));
    s.save_snapshot(&vid(1), &sid(1), source).await?;
    let mut r = s.load_snapshot(&vid(1), &sid(1)).await?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        total += n as u64;
    }
    assert_eq!(total, SIZE, "{name}: length");
    let want = gen_hash.lock().unwrap().clone().expect("source was read to the end");
    assert_eq!(h.finalize().to_vec(), want, "{name}: content");
    let peak = vm_hwm().saturating_sub(base);
    eprintln!("{name}: 2 GiB round trip, peak RSS growth {} MiB", peak >> 20);
    assert!(peak < RSS_BUDGET, "{name}: peak RSS grew by {} MiB", peak >> 20);
    s.delete_vessel(&vid(1)).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gib_stream_with_bounded_memory() -> TestResult {
    let dir = tempfile::tempdir()?;
    stream_through(&LocalStorage::new(dir.path())?, "local").await?;
    let s = CompressedStorage::new(LocalStorage::new(dir.path())?).with_level(1);
    stream_through(&s, "compressed").await
}
