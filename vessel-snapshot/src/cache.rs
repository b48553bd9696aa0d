//! The local layer cache: each layer unpacked once, in overlay form, and
//! shared read-only by every vessel on the host.
//!
//! ```text
//! <root>/layers/<key>/fs/       an unpacked layer (never modified once there)
//! <root>/layers/<key>/synced    present once the layer is known to be on disk
//! <root>/refs/<key>/<holder>    one empty file per holder (e.g. a vessel id)
//! <root>/locks/<key>            flock: population, references and GC of <key>
//! <root>/boot                   the boot id of the last `open`
//! ```
//!
//! Durability is deferred for what can be fetched again. A layer unpacked
//! from storage is published without waiting for the disk (a `syncfs` of
//! hundreds of MB would cost an open as much as the fetch): a process that
//! dies loses nothing the kernel holds, and only a crash of the machine
//! can tear it. So [`LayerCache::open`] compares the boot id with the one
//! it recorded last time: after a reboot, layers not marked `synced` are
//! removed (they are fetched again when needed); on the same boot, one
//! `syncfs` makes the unmarked ones durable and they are marked. A sealed
//! upper dir ([`LayerCache::adopt`]) is treated alike: it is adopted for a
//! snapshot whose blob is in storage, so it too can be fetched again.
//!
//! A layer appears at `layers/<key>` by a single rename of a complete,
//! verified directory, so readers never see a partial layer. The tree is
//! one level down (`fs/`) so that a sealed upper dir can move in with its
//! parent: when that parent is a btrfs subvolume (a vessel's disk quota),
//! only the subvolume itself can be renamed into another directory. Every change to
//! a key (populating it, adding or dropping a reference, collecting it) holds
//! that key's exclusive `flock`, which works across processes; a reference
//! taken under the lock is what keeps [`LayerCache::gc`] away from a layer.

use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use vessel_core::sync::still_linked;
use vessel_core::{SnapshotId, VesselId};

use crate::{ApplyMode, ApplyOptions, SnapshotError, apply_layer};

/// The marker of a layer known to be on disk.
const SYNCED: &str = "synced";

/// This boot's id (`unknown` where the kernel has none: every open is then a reboot).
fn boot_id() -> String {
    fs::read_to_string("/proc/sys/kernel/random/boot_id").map_or_else(|_| "unknown".into(), |s| s.trim().to_owned())
}

/// Marks `entries` durable (a lost marker only means a refetch after a reboot).
fn mark_synced(entries: &[PathBuf]) -> Result<(), SnapshotError> {
    for e in entries {
        let m = e.join(SYNCED);
        match File::create(&m) {
            // Collected meanwhile.
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            r => drop(r.map_err(SnapshotError::io("create", &m))?),
        }
    }
    Ok(())
}

/// What a cached layer is keyed by.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum LayerKey {
    /// An image layer, by its diff id (`sha256:<hex>` of the uncompressed tar).
    DiffId(String),
    /// A snapshot layer, by its vessel, the snapshot's id and its checksum
    /// (build it with [`LayerKey::snapshot`]): a manifest naming another
    /// vessel's snapshot, with whatever checksum, never finds that vessel's
    /// cached layer, and a cached layer is only ever the checksummed one.
    Snapshot(VesselId, SnapshotId, String),
    /// The whole tree (image and chain) as of a snapshot, in one layer: a
    /// local stand-in for a deep chain, made on this host, never stored.
    /// Bound to the digest of the chain's checksums ([`LayerKey::flat`]).
    Flat(SnapshotId, String),
}

/// Whether `digest` is `sha256:` and 64 lowercase hex digits.
fn valid_digest(digest: &str) -> bool {
    digest
        .strip_prefix("sha256:")
        .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
}

impl LayerKey {
    /// An image layer key; the digest must be `sha256:` and 64 lowercase hex digits.
    pub fn diff_id(digest: &str) -> Result<Self, SnapshotError> {
        if !valid_digest(digest) {
            return Err(SnapshotError::InvalidKey { what: "layer digest", value: digest.to_owned() });
        }
        Ok(Self::DiffId(digest.to_owned()))
    }

    /// A snapshot layer key; `checksum` is the snapshot's `sha256:<hex>`.
    pub fn snapshot(vessel: VesselId, id: SnapshotId, checksum: &str) -> Result<Self, SnapshotError> {
        if !valid_digest(checksum) {
            return Err(SnapshotError::InvalidKey { what: "snapshot checksum", value: checksum.to_owned() });
        }
        Ok(Self::Snapshot(vessel, id, checksum["sha256:".len()..].to_owned()))
    }

    /// The flat layer of a chain ending at `top`, given the checksums of
    /// the chain's snapshots, root first: the key changes with any of them.
    pub fn flat<'a>(top: SnapshotId, checksums: impl IntoIterator<Item = &'a str>) -> Self {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        for c in checksums {
            h.update(c.as_bytes());
            h.update(b"\n");
        }
        Self::Flat(top, format!("{:x}", h.finalize()))
    }

    /// The directory name: validated input only, so never a path hazard.
    fn dir_name(&self) -> String {
        match self {
            Self::DiffId(d) => format!("sha256-{}", &d["sha256:".len()..]),
            Self::Snapshot(vessel, id, hex) => format!("snapshot-{vessel}-{id}-{hex}"),
            Self::Flat(id, hex) => format!("flat-{id}-{hex}"),
        }
    }
}

/// A layer cache rooted at a directory (see the module docs).
#[derive(Debug, Clone)]
pub struct LayerCache {
    root: PathBuf,
    /// What each layer unpacked here may expand to.
    bounds: crate::LayerBounds,
}

/// The held exclusive lock of one key.
#[derive(Debug)]
struct KeyLock {
    _file: File,
}

/// See [`LayerCache::scratch`].
#[derive(Debug)]
pub(crate) struct Scratch {
    pub(crate) dir: PathBuf,
    lock_path: PathBuf,
    _lock: KeyLock,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.dir) {
            tracing::warn!(path = %self.dir.display(), error = %e, "could not remove scratch directory");
        }
        let _ = fs::remove_file(&self.lock_path);
    }
}

fn open_lock(path: &Path) -> Result<File, SnapshotError> {
    File::options().create(true).truncate(false).write(true).open(path).map_err(SnapshotError::io("open lock", path))
}

fn valid_holder(holder: &str) -> bool {
    !holder.is_empty()
        && holder.len() <= 128
        && holder.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && !holder.starts_with('.')
}

impl LayerCache {
    /// Opens (creating) a cache and removes scratch directories that crashed
    /// populations left behind.
    /// After a reboot, drops the layers that were never made durable; on
    /// the same boot, makes them durable (see the module docs).
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, SnapshotError> {
        let root = root.into();
        for d in ["layers", "refs", "locks"] {
            let p = root.join(d);
            fs::create_dir_all(&p).map_err(SnapshotError::io("create directory", &p))?;
        }
        let cache = Self { root, bounds: crate::LayerBounds::DEFAULT };
        cache.sweep()?;
        cache.settle()?;
        Ok(cache)
    }

    /// The cache, bounding what each layer it unpacks may expand to.
    pub fn with_bounds(mut self, bounds: crate::LayerBounds) -> Self {
        self.bounds = bounds;
        self
    }

    /// The published entries not marked `synced` (names under `layers/`).
    fn unsynced(&self) -> Result<Vec<PathBuf>, SnapshotError> {
        let layers = self.root.join("layers");
        let mut out = Vec::new();
        for e in fs::read_dir(&layers).map_err(SnapshotError::io("read directory", &layers))? {
            let e = e.map_err(SnapshotError::io("read directory", &layers))?;
            if e.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            let p = e.path();
            if p.join("fs").is_dir() && !p.join(SYNCED).exists() {
                out.push(p);
            }
        }
        Ok(out)
    }

    /// The reboot check and the deferred sync of [`LayerCache::open`].
    fn settle(&self) -> Result<(), SnapshotError> {
        let boot_file = self.root.join("boot");
        let now = boot_id();
        let recorded = fs::read_to_string(&boot_file).ok();
        let unsynced = self.unsynced()?;
        match recorded.as_deref() {
            // A cache from before deferred durability: its layers were all synced.
            None => mark_synced(&unsynced)?,
            Some(b) if b.trim() != now => {
                for p in unsynced {
                    let Some(key) = p.file_name().and_then(|n| n.to_str()) else { continue };
                    let _lock = self.lock_name(key)?;
                    tracing::info!(path = %p.display(), "dropping a cached layer a reboot may have torn");
                    // Renamed away first (as `gc` does): a crash while removing
                    // never leaves a part of it to be marked synced later.
                    let doomed = self.root.join("layers").join(format!(".{key}.gc-{:016x}", rand::random::<u64>()));
                    fs::rename(&p, &doomed).map_err(SnapshotError::io("rename", &p))?;
                    fs::remove_dir_all(&doomed).map_err(SnapshotError::io("remove", &doomed))?;
                }
            }
            Some(_) if !unsynced.is_empty() => {
                // Listed before the sync: everything listed was published before it.
                let d = File::open(&self.root).map_err(SnapshotError::io("open", &self.root))?;
                nix::unistd::syncfs(&d).map_err(|e| SnapshotError::io("sync", &self.root)(e.into()))?;
                mark_synced(&unsynced)?;
            }
            Some(_) => {}
        }
        // One writer at a time, so a leftover temp file (a writer killed
        // before its rename) is a dead one's, removed by the next opener.
        let _lock = self.lock_name(".boot")?;
        for e in fs::read_dir(&self.root).map_err(SnapshotError::io("read directory", &self.root))? {
            let e = e.map_err(SnapshotError::io("read directory", &self.root))?;
            if e.file_name().to_string_lossy().starts_with(".boot") {
                fs::remove_file(e.path()).map_err(SnapshotError::io("remove", &e.path()))?;
            }
        }
        if recorded.as_deref().map(str::trim) != Some(now.as_str()) {
            let tmp = self.root.join(".boot.new");
            let write = || -> io::Result<()> {
                let mut f = File::create(&tmp)?;
                io::Write::write_all(&mut f, now.as_bytes())?;
                f.sync_all()?;
                fs::rename(&tmp, &boot_file)?;
                File::open(&self.root)?.sync_all()
            };
            write().map_err(SnapshotError::io("write", &boot_file))?;
        }
        Ok(())
    }

    /// The cache's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where `key`'s layer lives (whether or not it is cached yet).
    pub fn path(&self, key: &LayerKey) -> PathBuf {
        self.entry(key).join("fs")
    }

    /// The unit of publication and collection: `layers/<key>`.
    fn entry(&self, key: &LayerKey) -> PathBuf {
        self.root.join("layers").join(key.dir_name())
    }

    /// Publishes `dir` (holding the layer as `fs/`) as `key`'s entry, by
    /// one rename (durable later: see the module docs).
    fn publish(&self, key: &LayerKey, dir: &Path) -> Result<(), SnapshotError> {
        let entry = self.entry(key);
        fs::rename(dir, &entry).map_err(SnapshotError::io("move into cache", &entry))
    }

    /// Whether `key` is cached.
    pub fn contains(&self, key: &LayerKey) -> bool {
        self.path(key).is_dir()
    }

    fn lock(&self, key: &LayerKey) -> Result<KeyLock, SnapshotError> {
        self.lock_name(&key.dir_name())
    }

    /// A scratch directory under `layers/`, locked so a concurrent
    /// [`LayerCache::open`] does not sweep it; removed (with its lock) on drop.
    pub(crate) fn scratch(&self, tag: &str) -> Result<Scratch, SnapshotError> {
        let name = format!("{tag}-{:016x}", rand::random::<u64>());
        let lock = self.lock_name(&name)?;
        let dir = self.root.join("layers").join(format!(".{name}.apply-0"));
        fs::create_dir(&dir).map_err(SnapshotError::io("create directory", &dir))?;
        Ok(Scratch { dir, lock_path: self.root.join("locks").join(name), _lock: lock })
    }

    fn lock_name(&self, name: &str) -> Result<KeyLock, SnapshotError> {
        let path = self.root.join("locks").join(name);
        loop {
            let file = open_lock(&path)?;
            file.lock().map_err(SnapshotError::io("lock", &path))?;
            if still_linked(&path, &file) {
                return Ok(KeyLock { _file: file });
            }
        }
    }

    fn try_lock(&self, key_dir: &str) -> Result<Option<KeyLock>, SnapshotError> {
        let path = self.root.join("locks").join(key_dir);
        let file = open_lock(&path)?;
        match file.try_lock() {
            Ok(()) => Ok(still_linked(&path, &file).then_some(KeyLock { _file: file })),
            Err(fs::TryLockError::WouldBlock) => Ok(None),
            Err(fs::TryLockError::Error(e)) => Err(SnapshotError::io("lock", &path)(e)),
        }
    }

    fn add_ref(&self, key: &LayerKey, holder: &str) -> Result<(), SnapshotError> {
        if !valid_holder(holder) {
            return Err(SnapshotError::InvalidKey { what: "layer holder", value: holder.to_owned() });
        }
        let dir = self.root.join("refs").join(key.dir_name());
        fs::create_dir_all(&dir).map_err(SnapshotError::io("create directory", &dir))?;
        let p = dir.join(holder);
        File::create(&p).map(drop).map_err(SnapshotError::io("create", &p))
    }

    /// Returns `key`'s layer, referenced by `holder`, unpacking it from the
    /// layer tar that `open` returns if it is not cached yet. `expected_digest`
    /// (the diff id) is verified while unpacking. Safe to call concurrently from
    /// many threads and processes: exactly one of them unpacks.
    pub fn get_or_unpack<R: Read + Send>(
        &self,
        key: &LayerKey,
        holder: &str,
        expected_digest: Option<&str>,
        open: impl FnOnce() -> Result<R, SnapshotError>,
    ) -> Result<PathBuf, SnapshotError> {
        let _lock = self.lock(key)?;
        let path = self.path(key);
        if !path.is_dir() {
            // Devices are trusted in image layers, and in flat layers (made
            // here from layers already on this host); never in snapshots
            // fetched from storage.
            let devices = matches!(key, LayerKey::DiffId(_) | LayerKey::Flat(..));
            // Not synced here: its source can be read again (see the module docs).
            let mut opts =
                ApplyOptions::new(ApplyMode::Overlay).allow_devices(devices).durable(false).bounds(self.bounds);
            if let Some(d) = expected_digest {
                opts = opts.expect_digest(d);
            }
            // A scratch entry the sweep removes if this process dies: the
            // layer unpacks (durably) into its `fs/`, then the entry is published.
            let scratch =
                self.root.join("layers").join(format!(".{}.apply-{:016x}", key.dir_name(), rand::random::<u64>()));
            let entry = self.entry(key);
            if entry.exists() {
                // An entry without its tree: not published by this code; replace it.
                fs::remove_dir_all(&entry).map_err(SnapshotError::io("remove", &entry))?;
            }
            fs::create_dir(&scratch).map_err(SnapshotError::io("create directory", &scratch))?;
            let unpacked = apply_layer(open()?, &scratch.join("fs"), &opts).and_then(|_| self.publish(key, &scratch));
            if let Err(e) = unpacked {
                let _ = fs::remove_dir_all(&scratch);
                return Err(e);
            }
        }
        self.add_ref(key, holder)?;
        Ok(path)
    }

    /// Moves a sealed upper dir into the cache as `key`, referenced by
    /// `holder`: `ovl` holds it as `upper/` (beside overlay's `work/`, which
    /// is dropped), and `ovl` itself moves in, so a btrfs subvolume (see
    /// the module docs) moves in one rename. `ovl` must be on the cache's
    /// filesystem. If `key` is already cached, `ovl` is removed and the
    /// cached copy kept. [`LayerCache::unadopt`] undoes it.
    pub fn adopt(&self, key: &LayerKey, holder: &str, ovl: &Path) -> Result<PathBuf, SnapshotError> {
        let _lock = self.lock(key)?;
        let path = self.path(key);
        if path.is_dir() {
            fs::remove_dir_all(ovl).map_err(SnapshotError::io("remove", ovl))?;
        } else {
            // Not synced (see the module docs): it is adopted only for a
            // snapshot whose blob storage holds; a reboot before the sync
            // drops it and it is fetched again.
            let work = ovl.join("work");
            match fs::remove_dir_all(&work) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(SnapshotError::io("remove", &work)(e)),
                _ => {}
            }
            let (upper, fs_dir) = (ovl.join("upper"), ovl.join("fs"));
            fs::rename(&upper, &fs_dir).map_err(SnapshotError::io("rename", &upper))?;
            self.publish(key, ovl)?;
        }
        self.add_ref(key, holder)?;
        Ok(path)
    }

    /// Moves an adopted layer that was never committed back to `ovl`
    /// (as `ovl/upper`) and drops `holder`'s reference.
    pub fn unadopt(&self, key: &LayerKey, holder: &str, ovl: &Path) -> Result<(), SnapshotError> {
        let _lock = self.lock(key)?;
        let entry = self.entry(key);
        fs::rename(&entry, ovl).map_err(SnapshotError::io("move out of cache", &entry))?;
        let (fs_dir, upper) = (ovl.join("fs"), ovl.join("upper"));
        fs::rename(&fs_dir, &upper).map_err(SnapshotError::io("rename", &fs_dir))?;
        let p = self.root.join("refs").join(key.dir_name()).join(holder);
        match fs::remove_file(&p) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(SnapshotError::io("remove", &p)(e)),
            _ => Ok(()),
        }
    }

    /// Adds `holder`'s reference to a cached layer; `false` if it is not cached.
    pub fn retain(&self, key: &LayerKey, holder: &str) -> Result<bool, SnapshotError> {
        let _lock = self.lock(key)?;
        if !self.path(key).is_dir() {
            return Ok(false);
        }
        self.add_ref(key, holder)?;
        Ok(true)
    }

    /// Drops `holder`'s reference (absent is fine).
    pub fn release(&self, key: &LayerKey, holder: &str) -> Result<(), SnapshotError> {
        let _lock = self.lock(key)?;
        let p = self.root.join("refs").join(key.dir_name()).join(holder);
        match fs::remove_file(&p) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(SnapshotError::io("remove", &p)(e)),
            _ => Ok(()),
        }
    }

    /// Drops every reference `holder` has, whatever the layers (e.g. when a
    /// vessel is deleted, or its creation failed half-way); returns how many.
    pub fn release_all(&self, holder: &str) -> Result<usize, SnapshotError> {
        if !valid_holder(holder) {
            return Err(SnapshotError::InvalidKey { what: "layer holder", value: holder.to_owned() });
        }
        let refs = self.root.join("refs");
        let mut released = 0;
        for e in fs::read_dir(&refs).map_err(SnapshotError::io("read directory", &refs))? {
            let name = e.map_err(SnapshotError::io("read directory", &refs))?.file_name();
            let Some(name) = name.to_str() else { continue };
            let _lock = self.lock_name(name)?;
            let p = refs.join(name).join(holder);
            match fs::remove_file(&p) {
                Ok(()) => released += 1,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(SnapshotError::io("remove", &p)(e)),
            }
        }
        Ok(released)
    }

    /// The holders of `key`'s layer.
    pub fn holders(&self, key: &LayerKey) -> Result<Vec<String>, SnapshotError> {
        let dir = self.root.join("refs").join(key.dir_name());
        let mut out = Vec::new();
        match fs::read_dir(&dir) {
            Ok(entries) => {
                for e in entries {
                    out.push(
                        e.map_err(SnapshotError::io("read directory", &dir))?
                            .file_name()
                            .to_string_lossy()
                            .into_owned(),
                    );
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(SnapshotError::io("read directory", &dir)(e)),
        }
        out.sort();
        Ok(out)
    }

    /// Removes every cached layer that no holder references; layers being
    /// populated or referenced right now are skipped. Returns how many went.
    pub fn gc(&self) -> Result<usize, SnapshotError> {
        let layers = self.root.join("layers");
        let mut removed = 0;
        for e in fs::read_dir(&layers).map_err(SnapshotError::io("read directory", &layers))? {
            let name = e.map_err(SnapshotError::io("read directory", &layers))?.file_name();
            let Some(name) = name.to_str().filter(|n| !n.starts_with('.')).map(str::to_owned) else { continue };
            let Some(_lock) = self.try_lock(&name)? else { continue };
            let refs = self.root.join("refs").join(&name);
            let referenced = fs::read_dir(&refs).map(|mut r| r.next().is_some()).unwrap_or(false);
            if referenced {
                continue;
            }
            // Rename first: the layer vanishes at once, then goes away for good.
            let doomed = layers.join(format!(".{name}.gc-{:016x}", rand::random::<u64>()));
            let live = layers.join(&name);
            fs::rename(&live, &doomed).map_err(SnapshotError::io("rename", &live))?;
            fs::remove_dir_all(&doomed).map_err(SnapshotError::io("remove", &doomed))?;
            let _ = fs::remove_dir(&refs);
            let lock_path = self.root.join("locks").join(&name);
            fs::remove_file(&lock_path).map_err(SnapshotError::io("remove", &lock_path))?;
            removed += 1;
        }
        Ok(removed)
    }

    /// Removes scratch directories (`.NAME.apply-*`, `.NAME.gc-*`) whose key is
    /// not locked, i.e. whose population or collection died with its process.
    fn sweep(&self) -> Result<(), SnapshotError> {
        let layers = self.root.join("layers");
        for e in fs::read_dir(&layers).map_err(SnapshotError::io("read directory", &layers))? {
            let name = e.map_err(SnapshotError::io("read directory", &layers))?.file_name();
            let Some(name) = name.to_str() else { continue };
            let Some(rest) = name.strip_prefix('.') else { continue };
            let Some((key, _)) = rest.rsplit_once(".apply-").or_else(|| rest.rsplit_once(".gc-")) else { continue };
            if let Some(_lock) = self.try_lock(key)? {
                let p = layers.join(name);
                tracing::debug!(path = %p.display(), "removing scratch directory of a dead process");
                fs::remove_dir_all(&p).map_err(SnapshotError::io("remove", &p))?;
            }
        }
        Ok(())
    }
}
