//! kill -9 in the middle of a save: the previous content survives, the temp
//! file stays locked (and unswept) while its writer lives, and the next
//! `LocalStorage::new` sweeps it once the writer is dead.
//!
//! The test binary re-executes itself as the writer that gets killed.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

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

fn age(path: &Path) {
    let f = std::fs::File::options().write(true).open(path).unwrap();
    f.set_modified(SystemTime::now() - Duration::from_secs(3600)).unwrap();
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

    // While the writer lives its temp file is locked: a sweep leaves it alone
    // however old it looks.
    age(&temp);
    LocalStorage::new(dir.path())?;
    anyhow::ensure!(temp.exists(), "a live writer's temp file was swept");

    let s = LocalStorage::new(dir.path())?;
    child.kill()?; // SIGKILL
    child.wait()?;

    let got = rt.block_on(load(&s))?;
    anyhow::ensure!(got == old, "the previous snapshot did not survive the crash");
    anyhow::ensure!(temp.exists(), "the crash left its temp file (until the next sweep)");
    // Young leftovers are kept (their writer may be between create and lock) ...
    let young = dir.path().join(".tmp").join("young.part");
    std::fs::write(&young, b"x")?;
    // ... old unlocked ones are the crashed writer's and go.
    LocalStorage::new(dir.path())?;
    anyhow::ensure!(!temp.exists(), "the dead writer's temp file was not swept");
    anyhow::ensure!(young.exists(), "a fresh temp file was swept");
    let got = rt.block_on(load(&s))?;
    anyhow::ensure!(got == old, "sweeping touched committed data");
    Ok(())
}
