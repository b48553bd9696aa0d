//! A directory in the Go original's layout:
//!
//! ```text
//! <root>/vessels/<vessel-id>/vessel.dat                      manifest (JSON)
//! <root>/vessels/<vessel-id>/snapshots/<snapshot-id>.tar[.gz|.zst]
//! <root>/images/<image-ref>.tar[.gz|.zst]                    `/` in refs nests
//! <root>/leases/hosts/<host-id>.json, leases/vessels/<id>.json  (see `lease`)
//! <root>/leases/.lock                                        conditional writes
//! <root>/.tmp/                                               in-flight writes
//! ```
//!
//! Every write goes to a temp file under `.tmp/` (same filesystem), is
//! fsynced, renamed over its final name, and the directory is fsynced: a
//! crash or error at any point leaves either the old or the new content under
//! the final name, never a mix. A writer holds an exclusive `flock` on its
//! temp file, so a new `LocalStorage` can tell leftovers of a crashed process
//! (unlocked) from another process's write in progress (locked) and remove
//! only the former. The lock is held until after the rename; a writer that
//! finds its new temp file unlinked once it locked it (a sweep took it in
//! between) makes another, so sweeps need no age grace.
//!
//! Conditional writes (manifests, lease records) read, compare and replace
//! under an exclusive `flock` on `leases/.lock`, so they are linearizable
//! among all processes sharing the directory; a version is the sha256 of
//! the stored bytes.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::{debug, warn};
use vessel_core::{ImageRef, SnapshotId, VesselId, VesselManifest};

use crate::durable::{
    blocking, create_temp, fsync_dir, open_first, read_if_present, remove_dir_all_if_present, remove_file_if_present,
};
use crate::record::{CLAIMS, FORKS, HOSTS, NAMES};
use crate::{
    BlobEncoding, BlobReader, HostId, Record, RecordKey, Storage, StorageError, StoredSnapshot, Version, WriteIf,
};

const MANIFEST: &str = "vessel.dat";
const TMP: &str = ".tmp";
const WRITE_BUF: usize = 1024 * 1024;

/// Storage in a local directory (see the module docs for the layout).
#[derive(Debug, Clone)]
pub struct LocalStorage {
    root: PathBuf,
    encoding: BlobEncoding,
}

const INDEX_SUFFIX: &str = ".vessel-index.json";

impl LocalStorage {
    /// Opens (creating if needed) a storage directory and removes what
    /// crashed writers left in it.
    ///
    /// Blocks briefly on the filesystem; call it before or outside hot async paths.
    pub fn new(root: impl Into<PathBuf>) -> Result<Self, StorageError> {
        use std::os::unix::fs::PermissionsExt;
        let root = root.into();
        // What it holds (workspaces' files, as layer tars) is its owner's
        // alone: the dirs it makes are 0700 (a root that exists is left as is).
        if !root.exists() {
            fs::create_dir_all(&root).map_err(StorageError::io("create directory", &root))?;
            fs::set_permissions(&root, fs::Permissions::from_mode(0o700)).map_err(StorageError::io("chmod", &root))?;
        }
        for dir in [
            root.join("vessels"),
            root.join("images"),
            root.join(TMP),
            root.join(HOSTS),
            root.join(CLAIMS),
            root.join(NAMES),
        ] {
            fs::create_dir_all(&dir).map_err(StorageError::io("create directory", &dir))?;
            fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).map_err(StorageError::io("chmod", &dir))?;
        }
        let storage = Self { root, encoding: BlobEncoding::Plain };
        storage.sweep_tmp();
        Ok(storage)
    }

    /// The storage's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn tmp_dir(&self) -> PathBuf {
        self.root.join(TMP)
    }

    fn vessel_dir(&self, id: &VesselId) -> PathBuf {
        self.root.join("vessels").join(id.as_str())
    }

    fn manifest_path(&self, id: &VesselId) -> PathBuf {
        self.vessel_dir(id).join(MANIFEST)
    }

    fn snapshot_path(&self, vessel: &VesselId, snapshot: &SnapshotId, enc: BlobEncoding) -> PathBuf {
        self.vessel_dir(vessel).join("snapshots").join(format!("{snapshot}{}", enc.extension()))
    }

    /// `images/<ref>.vessel-index.json`, beside the archive (the Go
    /// original looks only at `.tar*` files there).
    fn index_path(&self, image: &ImageRef) -> PathBuf {
        self.root.join("images").join(format!("{image}{INDEX_SUFFIX}"))
    }

    fn image_path(&self, image: &ImageRef, enc: BlobEncoding) -> PathBuf {
        // ImageRef's grammar admits no empty, `.` or `..` component, so the
        // joined path stays under images/.
        self.root.join("images").join(format!("{image}{}", enc.extension()))
    }

    fn record_path(&self, key: &RecordKey) -> PathBuf {
        self.root.join(key.path())
    }

    /// Reads, checks `cond` against and replaces `dest` under the storage's
    /// CAS lock; `what` names it in a `Conflict`.
    async fn write_if(
        &self,
        dest: PathBuf,
        data: Vec<u8>,
        cond: Option<WriteIf>,
        what: String,
    ) -> Result<Version, StorageError> {
        let lock = self.root.join("leases/.lock");
        let tmp_dir = self.tmp_dir();
        blocking(move || {
            let lock = fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&lock)
                .map_err(StorageError::io("open", &lock))?;
            lock.lock().map_err(StorageError::io("lock", "leases/.lock"))?;
            if let Some(cond) = cond {
                let current = read_if_present(&dest)?.map(|b| Version::of_bytes(&b));
                if !cond.holds(current.as_ref()) {
                    return Err(StorageError::Conflict { what });
                }
            }
            let (mut file, guard) = create_temp(&tmp_dir, dest)?;
            io::Write::write_all(&mut file, &data).map_err(StorageError::io("write", &guard.path))?;
            guard.commit(file, &[])?;
            Ok(Version::of_bytes(&data))
        })
        .await
    }

    /// The encodings to look for on load: ours first, so after a crash
    /// between a commit and the removal of an older sibling the new blob wins.
    fn load_order(&self) -> impl Iterator<Item = BlobEncoding> + use<> {
        let own = self.encoding;
        std::iter::once(own).chain(BlobEncoding::ALL.into_iter().filter(move |e| *e != own))
    }

    /// Removes temp files and half-deleted vessels left by crashed processes.
    fn sweep_tmp(&self) {
        let dir = self.tmp_dir();
        let Ok(entries) = fs::read_dir(&dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let res = match entry.file_type() {
                Ok(t) if t.is_dir() => remove_dir_all_if_present(&path),
                Ok(_) => sweep_tmp_file(&path),
                Err(e) => Err(e),
            };
            if let Err(e) = res {
                warn!(path = %path.display(), error = %e, "could not sweep leftover temp entry");
            }
        }
    }

    /// Streams `data` into `dest` atomically; removes `siblings` after the commit.
    async fn write_atomic(
        &self,
        dest: PathBuf,
        siblings: Vec<PathBuf>,
        mut data: BlobReader,
    ) -> Result<(), StorageError> {
        let tmp_dir = self.tmp_dir();
        let (std_file, guard) = blocking(move || create_temp(&tmp_dir, dest)).await?;
        let tmp_path = guard.path.clone();
        let mut file = tokio::fs::File::from_std(std_file);
        let mut buf = vec![0u8; WRITE_BUF];
        loop {
            let n = data.read(&mut buf).await.map_err(StorageError::Source)?;
            if n == 0 {
                break;
            }
            file.write_all(&buf[..n]).await.map_err(StorageError::io("write", &tmp_path))?;
        }
        file.flush().await.map_err(StorageError::io("write", &tmp_path))?;
        let std_file = file.into_std().await;
        blocking(move || guard.commit(std_file, &siblings)).await
    }
}

/// How errors name a vessel's manifest.
pub(crate) fn manifest_name(id: &VesselId) -> String {
    format!("manifest of vessel {id}")
}

/// A manifest as stored (JSON), for every backend.
pub(crate) fn manifest_json(manifest: &VesselManifest) -> Result<Vec<u8>, StorageError> {
    serde_json::to_vec(manifest)
        .map_err(|e| StorageError::Corrupt { what: manifest_name(&manifest.id), reason: e.to_string() })
}

/// Parses a stored manifest, which must name `id`.
pub(crate) fn parse_manifest(id: &VesselId, bytes: &[u8]) -> Result<VesselManifest, StorageError> {
    let corrupt = |reason: String| StorageError::Corrupt { what: manifest_name(id), reason };
    let manifest: VesselManifest = serde_json::from_slice(bytes).map_err(|e| corrupt(e.to_string()))?;
    if &manifest.id != id {
        return Err(corrupt(format!("it names vessel {}", manifest.id)));
    }
    Ok(manifest)
}

/// Removes a temp file unless its writer (alive, holding its flock) still
/// writes it; a writer that had not locked it yet sees it unlinked and
/// makes another (`create_temp`).
fn sweep_tmp_file(path: &Path) -> io::Result<()> {
    let file = match fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    match file.try_lock() {
        Ok(()) => {
            debug!(path = %path.display(), "removing temp file of a crashed writer");
            remove_file_if_present(path)
        }
        Err(fs::TryLockError::WouldBlock) => Ok(()),
        Err(fs::TryLockError::Error(e)) => Err(e),
    }
}

#[async_trait]
impl Storage for LocalStorage {
    async fn save_vessel_manifest(&self, manifest: &VesselManifest) -> Result<(), StorageError> {
        // Under the CAS lock too, so it is ordered with conditional writes.
        let what = manifest_name(&manifest.id);
        self.write_if(self.manifest_path(&manifest.id), manifest_json(manifest)?, None, what).await.map(drop)
    }

    async fn load_vessel_manifest_versioned(&self, id: &VesselId) -> Result<(VesselManifest, Version), StorageError> {
        let path = self.manifest_path(id);
        let bytes = match tokio::fs::read(&path).await {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StorageError::VesselNotFound(id.clone()));
            }
            Err(e) => return Err(StorageError::io("read", &path)(e)),
        };
        Ok((parse_manifest(id, &bytes)?, Version::of_bytes(&bytes)))
    }

    async fn save_vessel_manifest_if(
        &self,
        manifest: &VesselManifest,
        cond: &WriteIf,
    ) -> Result<Version, StorageError> {
        let what = manifest_name(&manifest.id);
        self.write_if(self.manifest_path(&manifest.id), manifest_json(manifest)?, Some(cond.clone()), what).await
    }

    async fn load_record(&self, key: &RecordKey) -> Result<Option<Record>, StorageError> {
        let path = self.record_path(key);
        Ok(blocking(move || read_if_present(&path))
            .await?
            .map(|data| Record { version: Version::of_bytes(&data), data }))
    }

    async fn save_record(&self, key: &RecordKey, data: Vec<u8>, cond: &WriteIf) -> Result<Version, StorageError> {
        self.write_if(self.record_path(key), data, Some(cond.clone()), key.to_string()).await
    }

    async fn delete_record(&self, key: &RecordKey) -> Result<(), StorageError> {
        let p = self.record_path(key);
        blocking(move || remove_file_if_present(&p).map_err(StorageError::io("remove", &p))).await
    }

    async fn list_hosts(&self) -> Result<Vec<HostId>, StorageError> {
        let dir = self.root.join(HOSTS);
        blocking(move || {
            let mut out = Vec::new();
            for entry in fs::read_dir(&dir).map_err(StorageError::io("read directory", &dir))? {
                let entry = entry.map_err(StorageError::io("read directory", &dir))?;
                let name = entry.file_name();
                if let Some(h) = name.to_str().and_then(|n| n.strip_suffix(".json")).and_then(|n| HostId::new(n).ok()) {
                    out.push(h);
                }
            }
            out.sort();
            Ok(out)
        })
        .await
    }

    async fn list_vessels(&self) -> Result<Vec<VesselId>, StorageError> {
        let dir = self.root.join("vessels");
        blocking(move || {
            let mut ids = Vec::new();
            for entry in fs::read_dir(&dir).map_err(StorageError::io("read directory", &dir))? {
                let entry = entry.map_err(StorageError::io("read directory", &dir))?;
                let name = entry.file_name();
                let Some(id) = name.to_str().and_then(|n| VesselId::new(n).ok()) else {
                    warn!(name = ?name, "ignoring a vessels/ entry that is not a vessel id");
                    continue;
                };
                if entry.path().join(MANIFEST).is_file() {
                    ids.push(id);
                }
            }
            ids.sort();
            Ok(ids)
        })
        .await
    }

    async fn delete_vessel(&self, id: &VesselId) -> Result<(), StorageError> {
        let dir = self.vessel_dir(id);
        let graveyard = self.tmp_dir().join(format!("{:016x}.deleted-{id}", rand::random::<u64>()));
        let parent = self.root.join("vessels");
        blocking(move || {
            // One rename makes the whole vessel disappear at once; the slow
            // recursive removal happens out of sight and is finished by the
            // next sweep if we crash during it.
            match fs::rename(&dir, &graveyard) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(StorageError::io("rename", &dir)(e)),
            }
            fsync_dir(&parent)?;
            remove_dir_all_if_present(&graveyard).map_err(StorageError::io("remove", &graveyard))
        })
        .await
    }

    async fn save_snapshot(
        &self,
        vessel: &VesselId,
        snapshot: &SnapshotId,
        data: BlobReader,
    ) -> Result<(), StorageError> {
        let dest = self.snapshot_path(vessel, snapshot, self.encoding);
        let siblings = self.load_order().skip(1).map(|e| self.snapshot_path(vessel, snapshot, e)).collect();
        self.write_atomic(dest, siblings, data).await
    }

    async fn load_snapshot(&self, vessel: &VesselId, snapshot: &SnapshotId) -> Result<BlobReader, StorageError> {
        let candidates = self.load_order().map(|e| self.snapshot_path(vessel, snapshot, e));
        match open_first(candidates).await? {
            Some(f) => Ok(Box::new(f)),
            None => Err(StorageError::SnapshotNotFound { vessel: vessel.clone(), snapshot: snapshot.clone() }),
        }
    }

    async fn delete_snapshot(&self, vessel: &VesselId, snapshot: &SnapshotId) -> Result<(), StorageError> {
        let paths: Vec<_> = BlobEncoding::ALL.into_iter().map(|e| self.snapshot_path(vessel, snapshot, e)).collect();
        let vessel_dir = self.vessel_dir(vessel);
        blocking(move || {
            for p in &paths {
                remove_file_if_present(p).map_err(StorageError::io("remove", p))?;
            }
            match paths[0].parent() {
                Some(dir) if dir.is_dir() => fsync_dir(dir)?,
                _ => {}
            }
            // The last blob of a deleted vessel takes its directory with it
            // (both removals fail harmlessly while anything is left).
            if !vessel_dir.join(MANIFEST).exists() {
                let _ = fs::remove_dir(vessel_dir.join("snapshots"));
                let _ = fs::remove_dir(&vessel_dir);
            }
            Ok(())
        })
        .await
    }

    async fn delete_vessel_manifest(&self, id: &VesselId) -> Result<(), StorageError> {
        let p = self.manifest_path(id);
        let dir = self.vessel_dir(id);
        blocking(move || {
            remove_file_if_present(&p).map_err(StorageError::io("remove", &p))?;
            if dir.is_dir() {
                fsync_dir(&dir)?;
            }
            let _ = fs::remove_dir(dir.join("snapshots"));
            let _ = fs::remove_dir(&dir);
            Ok(())
        })
        .await
    }

    async fn list_snapshots(&self, vessel: &VesselId) -> Result<Vec<StoredSnapshot>, StorageError> {
        let dir = self.vessel_dir(vessel).join("snapshots");
        blocking(move || {
            let mut out = Vec::new();
            let entries = match fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
                Err(e) => return Err(StorageError::io("read directory", &dir)(e)),
            };
            for entry in entries {
                let entry = entry.map_err(StorageError::io("read directory", &dir))?;
                let name = entry.file_name();
                let Some(id) = name.to_str().and_then(|n| n.split('.').next()).and_then(|n| SnapshotId::new(n).ok())
                else {
                    continue;
                };
                let modified =
                    entry.metadata().and_then(|m| m.modified()).map_err(StorageError::io("stat", entry.path()))?;
                out.push(StoredSnapshot { id, modified: modified.into() });
            }
            out.sort_by(|a, b| a.id.cmp(&b.id));
            out.dedup_by(|a, b| a.id == b.id);
            Ok(out)
        })
        .await
    }

    async fn list_snapshot_owners(&self) -> Result<Vec<VesselId>, StorageError> {
        let dir = self.root.join("vessels");
        blocking(move || {
            let mut ids: Vec<VesselId> = fs::read_dir(&dir)
                .map_err(StorageError::io("read directory", &dir))?
                .flatten()
                .filter_map(|e| e.file_name().to_str().and_then(|n| VesselId::new(n).ok()))
                .collect();
            ids.sort();
            Ok(ids)
        })
        .await
    }

    async fn list_forks(&self, owner: &VesselId) -> Result<Vec<VesselId>, StorageError> {
        let dir = self.root.join(FORKS).join(owner.as_str());
        blocking(move || {
            let entries = match fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
                Err(e) => return Err(StorageError::io("read directory", &dir)(e)),
            };
            let mut ids: Vec<VesselId> = entries
                .flatten()
                .filter_map(|e| {
                    e.file_name().to_str().and_then(|n| n.strip_suffix(".json")).and_then(|n| VesselId::new(n).ok())
                })
                .collect();
            ids.sort();
            Ok(ids)
        })
        .await
    }

    async fn save_image(&self, image: &ImageRef, data: BlobReader) -> Result<(), StorageError> {
        let dest = self.image_path(image, self.encoding);
        let siblings = self.load_order().skip(1).map(|e| self.image_path(image, e)).collect();
        self.write_atomic(dest, siblings, data).await
    }

    async fn load_image(&self, image: &ImageRef) -> Result<BlobReader, StorageError> {
        let candidates = self.load_order().map(|e| self.image_path(image, e));
        match open_first(candidates).await? {
            Some(f) => Ok(Box::new(f)),
            None => Err(StorageError::ImageNotFound(image.clone())),
        }
    }

    async fn save_image_index(&self, image: &ImageRef, data: Vec<u8>) -> Result<(), StorageError> {
        self.write_atomic(self.index_path(image), Vec::new(), Box::new(std::io::Cursor::new(data))).await
    }

    async fn load_image_index(&self, image: &ImageRef) -> Result<Vec<u8>, StorageError> {
        let p = self.index_path(image);
        match tokio::fs::read(&p).await {
            Ok(d) => Ok(d),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(StorageError::ImageNotFound(image.clone())),
            Err(e) => Err(StorageError::io("read", &p)(e)),
        }
    }

    async fn delete_image_index(&self, image: &ImageRef) -> Result<(), StorageError> {
        let p = self.index_path(image);
        match tokio::fs::remove_file(&p).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(StorageError::io("remove", &p)(e)),
            _ => Ok(()),
        }
    }

    async fn list_images(&self) -> Result<Vec<ImageRef>, StorageError> {
        let images = self.root.join("images");
        blocking(move || {
            let mut out = Vec::new();
            let mut stack = vec![images.clone()];
            while let Some(dir) = stack.pop() {
                for entry in fs::read_dir(&dir).map_err(StorageError::io("read directory", &dir))? {
                    let entry = entry.map_err(StorageError::io("read directory", &dir))?;
                    let path = entry.path();
                    if entry.file_type().map_err(StorageError::io("stat", &path))?.is_dir() {
                        stack.push(path);
                        continue;
                    }
                    let Ok(rel) = path.strip_prefix(&images) else { continue };
                    let Some(rel) = rel.to_str() else { continue };
                    if rel.ends_with(INDEX_SUFFIX) {
                        continue;
                    }
                    let stem = BlobEncoding::ALL.iter().find_map(|e| rel.strip_suffix(e.extension()));
                    match stem.map(ImageRef::new) {
                        Some(Ok(r)) => out.push(r),
                        _ => warn!(path = %path.display(), "ignoring an images/ entry that is not an image archive"),
                    }
                }
            }
            out.sort();
            out.dedup();
            Ok(out)
        })
        .await
    }

    fn set_blob_encoding(&mut self, encoding: BlobEncoding) {
        self.encoding = encoding;
    }
}
