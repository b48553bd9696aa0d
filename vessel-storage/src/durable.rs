//! Durable file writes for [`crate::LocalStorage`]: temp files that are
//! removed unless committed, renames made durable with directory fsyncs,
//! and the small `*_if_present` helpers, all blocking (run through
//! [`blocking`]).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use tracing::warn;

use crate::StorageError;

/// Runs blocking filesystem work off the async workers; a panic in it is
/// re-raised in the caller, as if it had run inline.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StorageError> + Send + 'static,
) -> Result<T, StorageError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => Err(StorageError::io("run blocking task", PathBuf::new())(io::Error::other(e))),
    }
}

/// Removes its temp file on drop unless committed, so an error or a dropped
/// future never leaves a temp file behind.
#[derive(Debug)]
pub(crate) struct TempGuard {
    pub(crate) path: PathBuf,
    dest: PathBuf,
    committed: bool,
}

impl TempGuard {
    pub(crate) fn commit(mut self, file: fs::File, siblings: &[PathBuf]) -> Result<(), StorageError> {
        file.sync_all().map_err(StorageError::io("fsync", &self.path))?;
        // Renamed while still locked: unlocked, a sweep could take it first.
        fs::rename(&self.path, &self.dest).map_err(StorageError::io("rename into", &self.dest))?;
        self.committed = true;
        drop(file);
        for s in siblings {
            remove_file_if_present(s).map_err(StorageError::io("remove", s))?;
        }
        if let Some(parent) = self.dest.parent() {
            fsync_dir(parent)?;
        }
        Ok(())
    }
}

impl Drop for TempGuard {
    fn drop(&mut self) {
        if !self.committed
            && let Err(e) = remove_file_if_present(&self.path)
        {
            warn!(path = %self.path.display(), error = %e, "could not remove temp file");
        }
    }
}

/// Creates `dest`'s directory (durably) and a locked temp file for it.
pub(crate) fn create_temp(tmp_dir: &Path, dest: PathBuf) -> Result<(fs::File, TempGuard), StorageError> {
    if let Some(parent) = dest.parent() {
        create_dir_all_durable(parent)?;
    }
    let name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    loop {
        let path = tmp_dir.join(format!("{:016x}.{}.{name}", rand::random::<u64>(), std::process::id()));
        let file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(StorageError::io("create", &path))?;
        file.lock().map_err(StorageError::io("lock", &path))?;
        // A sweep may have taken it between create and lock (it was not
        // locked yet): then it is unlinked, and we start over. Once locked
        // and linked, no sweep removes it, so sweeps need no age grace.
        use std::os::unix::fs::MetadataExt;
        if file.metadata().map_err(StorageError::io("stat", &path))?.nlink() > 0 {
            return Ok((file, TempGuard { path, dest, committed: false }));
        }
    }
}

pub(crate) fn read_if_present(path: &Path) -> Result<Option<Vec<u8>>, StorageError> {
    match fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StorageError::io("read", path)(e)),
    }
}

pub(crate) fn remove_file_if_present(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

pub(crate) fn remove_dir_all_if_present(path: &Path) -> io::Result<()> {
    match fs::remove_dir_all(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

pub(crate) fn fsync_dir(dir: &Path) -> Result<(), StorageError> {
    fs::File::open(dir).and_then(|d| d.sync_all()).map_err(StorageError::io("fsync directory", dir))
}

/// `create_dir_all` that also fsyncs the parent of every directory it creates,
/// so a committed blob's directory entry chain survives a crash.
pub(crate) fn create_dir_all_durable(dir: &Path) -> Result<(), StorageError> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        create_dir_all_durable(parent)?;
    }
    match fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => return Ok(()),
        Err(e) => return Err(StorageError::io("create directory", dir)(e)),
    }
    match dir.parent() {
        Some(parent) => fsync_dir(parent),
        None => Ok(()),
    }
}

pub(crate) async fn open_first(
    paths: impl IntoIterator<Item = PathBuf>,
) -> Result<Option<tokio::fs::File>, StorageError> {
    for p in paths {
        match tokio::fs::File::open(&p).await {
            Ok(f) => return Ok(Some(f)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            // A path component that is a file (e.g. image `a` vs `a/b`) means "absent" too.
            Err(e) if e.kind() == io::ErrorKind::NotADirectory => continue,
            Err(e) => return Err(StorageError::io("open", &p)(e)),
        }
    }
    Ok(None)
}
