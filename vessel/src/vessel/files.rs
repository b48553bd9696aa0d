//! The file API of [`Vessel`]: every path resolved inside the vessel's
//! root (`openat2(RESOLVE_IN_ROOT)`, see [`crate::fs`]), through its gate.

use crate::error::Result;
use crate::fs::{self as vfs, File, FileInfo, OpenFlags};

use super::Vessel;

impl Vessel {
    /// Reads a whole file.
    pub fn read_file(&self, path: &str) -> Result<Vec<u8>> {
        self.with_root(path, vfs::read_file)
    }

    /// Creates or replaces a file with `data` (`perm` applies when it is created).
    pub fn write_file(&self, path: &str, data: &[u8], perm: u32) -> Result<()> {
        self.with_root(path, |r, p| vfs::write_file(r, p, data, perm))
    }

    /// Deletes a file, symlink or empty directory.
    pub fn delete_file(&self, path: &str) -> Result<()> {
        self.with_root(path, vfs::delete)
    }

    /// Renames (moves) within the vessel.
    pub fn rename_file(&self, from: &str, to: &str) -> Result<()> {
        let to = self.path(to)?;
        self.with_root(from, |r, p| vfs::rename(r, p, &to))
    }

    /// Metadata, following symlinks (inside the vessel).
    pub fn stat(&self, path: &str) -> Result<FileInfo> {
        Ok(self.with_root(path, vfs::stat)?.in_vessel(self.inner.gate.ids))
    }

    /// Creates a directory.
    pub fn make_dir(&self, path: &str, perm: u32) -> Result<()> {
        self.with_root(path, |r, p| vfs::make_dir(r, p, perm))
    }

    /// Creates a directory and its missing parents.
    pub fn make_dir_all(&self, path: &str, perm: u32) -> Result<()> {
        self.with_root(path, |r, p| vfs::make_dir_all(r, p, perm))
    }

    /// A directory's entries (not following symlinks), sorted by name.
    pub fn read_dir(&self, path: &str) -> Result<Vec<FileInfo>> {
        let ids = self.inner.gate.ids;
        Ok(self.with_root(path, vfs::read_dir)?.into_iter().map(|i| i.in_vessel(ids)).collect())
    }

    /// Opens a file with `open(2)` flags; `perm` applies when it is created.
    pub fn open_file(&self, path: &str, flags: OpenFlags, perm: u32) -> Result<File> {
        let path = self.path(path)?;
        File::open(self.inner.gate.clone(), &path, flags, perm)
    }
}
