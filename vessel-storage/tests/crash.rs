//! kill -9 in the middle of a save: the previous content survives, the temp
//! file stays locked (and unswept) while its writer lives, and the next
//! `LocalStorage::new` sweeps it once the writer is dead, however young.
//! Sweeps racing live writers never fail a write.
//!
//! The test binary re-executes itself as the writer that gets killed.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use vessel_storage::{LocalStorage, Storage};

const CHILD_ENV: &str = "VESSEL_STORAGE_CRASH_CHILD";

fn main() {
    if let Ok(dir) = std::env::var(CHILD_ENV) {
        child(Path::new(&dir));
        return;
    }
    match parent() {
        Ok(()) => println!("crash: 1 passed, 0 failed"),
        Err(e) => {
            println!("crash: 0 passed, 1 failed");
            eprintln!("kill -9 mid-write test failed: {e:?}");
            std::process::exit(1);
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// Saves a snapshot whose source hangs after 4 MiB, forever.
fn child(dir: &Path) {
    runtime().block_on(async {
        let s = LocalStorage::new(dir).unwrap();
        let _ = s.save_snapshot(&vid(1), &sid(1), StallingReader::boxed(pattern(2, 4 << 20))).await;
        unreachable!("the stalled save never returns");
    });
}

fn temp_files(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir.join(".tmp")).unwrap().flatten().map(|e| e.path()).collect()
}

async fn load(s: &LocalStorage) -> anyhow::Result<Vec<u8>> {
    Ok(read_all(s.load_snapshot(&vid(1), &sid(1)).await?).await?)
}

fn parent() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let rt = runtime();
    let old = pattern(1, 1 << 20);
    rt.block_on(LocalStorage::new(dir.path())?.save_snapshot(&vid(1), &sid(1), blob(old.clone())))?;

    let mut child = Command::new(std::env::current_exe()?).env(CHILD_ENV, dir.path()).stdin(Stdio::null()).spawn()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let temp = loop {
        let found = temp_files(dir.path())
            .into_iter()
            .find(|p| std::fs::metadata(p).map(|m| m.len() >= 4 << 20).unwrap_or(false));
        if let Some(t) = found {
            break t;
        }
        anyhow::ensure!(Instant::now() < deadline, "the child never wrote its temp file");
        std::thread::sleep(Duration::from_millis(10));
    };

    // While the writer lives its temp file is locked: a sweep leaves it alone.
    LocalStorage::new(dir.path())?;
    anyhow::ensure!(temp.exists(), "a live writer's temp file was swept");

    let s = LocalStorage::new(dir.path())?;
    child.kill()?; // SIGKILL
    child.wait()?;

    let got = rt.block_on(load(&s))?;
    anyhow::ensure!(got == old, "the previous snapshot did not survive the crash");
    anyhow::ensure!(temp.exists(), "the crash left its temp file (until the next sweep)");
    // Unlocked temp files are dead writers' and go at once, however young
    // (a writer locks its file before using it, and makes another if a
    // sweep took it first).
    let young = dir.path().join(".tmp").join("young.part");
    std::fs::write(&young, b"x")?;
    LocalStorage::new(dir.path())?;
    anyhow::ensure!(!temp.exists(), "the dead writer's temp file was not swept");
    anyhow::ensure!(!young.exists(), "an unlocked temp file was kept");
    let got = rt.block_on(load(&s))?;
    anyhow::ensure!(got == old, "sweeping touched committed data");
    sweeps_racing_writers(&rt, dir.path())
}

/// Writers saving while other handles open (and sweep) the same storage
/// all the time: every write succeeds and reads back, nothing is left in
/// `.tmp` once they are done.
fn sweeps_racing_writers(rt: &tokio::runtime::Runtime, dir: &Path) -> anyhow::Result<()> {
    let s = LocalStorage::new(dir)?;
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sweeper = {
        let (dir, done) = (dir.to_owned(), done.clone());
        std::thread::spawn(move || {
            let mut sweeps = 0u32;
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                LocalStorage::new(&dir).expect("open");
                sweeps += 1;
            }
            sweeps
        })
    };
    let writes = rt.block_on(async {
        for i in 0..400u32 {
            let data = pattern(u64::from(i), 512 + i as usize);
            s.save_snapshot(&vid(2), &sid(i as u64 + 1), blob(data.clone())).await?;
            anyhow::ensure!(read_all(s.load_snapshot(&vid(2), &sid(i as u64 + 1)).await?).await? == data);
        }
        anyhow::Ok(400)
    });
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let sweeps = sweeper.join().expect("sweeper");
    writes?;
    anyhow::ensure!(sweeps > 0, "no sweep ran");
    anyhow::ensure!(temp_files(dir).is_empty(), "temp files left: {:?}", temp_files(dir));
    Ok(())
}
