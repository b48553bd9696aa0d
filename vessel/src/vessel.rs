//! [`Vessel`]: one open workspace: its overlay mount, file API, execs and
//! snapshots.
//!
//! Locking: execs hold the state lock shared, snapshot and restore hold it
//! exclusively (so a snapshot waits for running execs, and execs wait for a
//! snapshot); file operations pass the [`Gate`], which a remount closes.

use std::fs;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use nix::fcntl::{Flock, OFlag};
use tokio::sync::RwLock;
use vessel_core::{ExecOptions, ExecResult, SnapshotId, SnapshotManifest, VesselId, VesselManifest};
use vessel_runtime::overlay::OverlayMount;
use vessel_runtime::{RunRequest, TtySize, UserNamespace};
use vessel_snapshot::image::Image;
use vessel_snapshot::{LayerKey, write_diff};

use crate::error::{Result, VesselError};
use crate::fs::{self as vfs, File, FileInfo, Gate, OpenFlags};
use crate::manager::Shared;

/// Files the runtimes bind-mount over; created once so that they never
/// appear in a diff as an exec's side effect.
const ETC_FILES: [&str; 3] = ["/etc/hosts", "/etc/hostname", "/etc/resolv.conf"];

#[derive(Debug)]
struct State {
    /// The mounted lower layers, bottom first (see `layers`).
    lowers: Vec<PathBuf>,
    mount: Option<OverlayMount>,
    closed: bool,
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) id: VesselId,
    shared: Arc<Shared>,
    dir: PathBuf,
    gate: Arc<Gate>,
    state: RwLock<State>,
    manifest: Mutex<VesselManifest>,
    image_layers: Vec<PathBuf>,
    /// The image's runtime defaults (`Env` is every command's base).
    image_config: vessel_snapshot::image::ImageConfig,
    user: crate::user::User,
    /// The vessel's user namespace (`None`: host ids), for its mounts.
    userns: Option<UserNamespace>,
    /// Its commands' limits and its disk quota.
    bounds: crate::limits::Bounds,
    lock: Mutex<Option<Held>>,
}

/// The vessel lock, then the lock on its host id range: held while open.
type Held = (Flock<fs::File>, Option<Flock<fs::File>>);

/// An open vessel. Methods take `&self`: share it (e.g. in an `Arc`) to run
/// execs concurrently.
#[derive(Debug)]
pub struct Vessel {
    inner: Arc<Inner>,
}

fn fresh_dir(p: &Path) -> Result<()> {
    match fs::remove_dir_all(p) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(VesselError::io("remove", p)(e)),
        _ => {}
    }
    fs::create_dir_all(p).map_err(VesselError::io("create", p))
}

fn open_root(rootfs: &Path) -> Result<OwnedFd> {
    let fd =
        nix::fcntl::open(rootfs, OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, nix::sys::stat::Mode::empty())
            .map_err(|e| VesselError::io("open", rootfs)(e.into()))?;
    Ok(fd)
}

/// Merges `KEY=VALUE` lists; later entries win.
fn merge_env(base: &[String], over: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for kv in base.iter().chain(over) {
        let key = kv.split('=').next().unwrap_or_default();
        out.retain(|e| e.split('=').next() != Some(key));
        out.push(kv.clone());
    }
    out
}

/// A throwaway overlay over the live rootfs for a non-persistent exec.
struct Throwaway {
    dir: PathBuf,
    mount: Option<OverlayMount>,
}

impl Drop for Throwaway {
    fn drop(&mut self) {
        if let Some(m) = self.mount.take() {
            let _ = m.unmount();
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

impl Inner {
    /// Mounts a vessel at its current snapshot (fetching and flattening
    /// what this host needs) with a fresh upper and returns it.
    pub(crate) async fn start(
        shared: Arc<Shared>,
        manifest: VesselManifest,
        image: &Image,
        lock: Flock<fs::File>,
    ) -> Result<Arc<Self>> {
        let id = manifest.id.clone();
        let mut manifest = manifest;
        let bounds = crate::limits::Bounds::resolve(
            &mut manifest.labels,
            shared.limits,
            shared.disk_quota,
            shared.disk_quota.is_some(),
        )?;
        let (userns, ids_lock) = match shared.take_ids(&id)? {
            Some((ns, l)) => (Some(ns), Some(l)),
            None => (None, None),
        };
        let ids = userns.as_ref().map(UserNamespace::mapping);
        let dir = shared.vessel_dir(&id);
        make_vessel_dir(&dir, ids)?;
        let image_layers: Vec<PathBuf> = image.layers.iter().map(|l| l.path.clone()).collect();
        let lowers = shared.lowers(&id, &manifest, manifest.current_snapshot_id.as_ref(), &image_layers, &dir).await?;
        let mount = mount_at(&dir, &lowers, Upper::Fresh, userns.as_ref(), bounds.disk)?;
        let root = open_root(&dir.join("rootfs"))?;
        let gate = Gate::new(id.clone(), root, ids);
        let user = {
            let pass = gate.enter(None)?;
            gate.as_vessel_root(|| -> Result<crate::user::User> {
                let work_dir = manifest.work_dir.clone();
                vfs::make_dir_all(&pass.root, &work_dir, 0o755)?;
                for f in ETC_FILES {
                    if vfs::stat(&pass.root, f).is_err() {
                        vfs::make_dir_all(&pass.root, "/etc", 0o755)?;
                        vfs::write_file(&pass.root, f, b"", 0o644)?;
                    }
                }
                match manifest.labels.get(crate::user::USER_LABEL).and_then(|l| crate::user::User::from_label(l)) {
                    Some(u) => Ok(u),
                    None => crate::user::resolve(&pass.root, image.config.user.as_deref()),
                }
            })?
        };
        manifest.labels.insert(crate::user::USER_LABEL.into(), user.label());
        if let Some(m) = ids
            && let Some(bad) =
                [user.uid, user.gid].into_iter().chain(user.additional_gids.iter().copied()).find(|i| *i >= m.size)
        {
            return Err(VesselError::UnknownUser {
                user: image.config.user.clone().unwrap_or_default(),
                reason: format!("id {bad} is outside the vessel's {} mapped ids", m.size),
            });
        }
        let inner = Self {
            id: id.clone(),
            gate: Arc::new(gate),
            shared,
            dir,
            state: RwLock::new(State { lowers, mount: Some(mount), closed: false }),
            manifest: Mutex::new(manifest),
            image_config: image.config.clone(),
            user,
            userns,
            image_layers,
            bounds,
            lock: Mutex::new(Some((lock, ids_lock))),
        };
        Ok(Arc::new(inner))
    }

    /// Mounts the rootfs on `lowers` with the vessel's ids and disk quota.
    fn mount(&self, lowers: &[PathBuf], upper: Upper) -> Result<OverlayMount> {
        mount_at(&self.dir, lowers, upper, self.userns.as_ref(), self.bounds.disk)
    }

    pub(crate) fn manifest(&self) -> VesselManifest {
        self.manifest.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    async fn freeze(&self) {
        let gate = self.gate.clone();
        let _ = tokio::task::spawn_blocking(move || gate.freeze()).await;
    }

    /// Unmounts, releases the lock; later calls fail with `Closed`.
    pub(crate) async fn close(&self) -> Result<()> {
        let mut state = self.state.write().await;
        if state.closed {
            return Ok(());
        }
        self.freeze().await;
        state.closed = true;
        let unmounted = state.mount.take().map(OverlayMount::unmount).transpose();
        self.gate.thaw(None, true);
        let scrubbed = crate::manager::scrub(&self.dir);
        self.lock.lock().unwrap_or_else(|e| e.into_inner()).take();
        unmounted?;
        scrubbed
    }
}

/// What becomes of the upper dir when the rootfs is (re)mounted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Upper {
    /// Emptied: a new session, or a new snapshot or restore on top.
    Fresh,
    /// Kept as it is: recovery after a failed snapshot or restore.
    Keep,
}

/// Creates a vessel's host directory: only its own container root (which
/// must traverse it to reach the rootfs) and host root may enter it, so no
/// setuid file or device node made in the vessel is usable from the host.
fn make_vessel_dir(dir: &Path, ids: Option<vessel_runtime::IdMapping>) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for d in [dir.to_path_buf(), dir.join("rootfs")] {
        fs::create_dir_all(&d).map_err(VesselError::io("create", &d))?;
    }
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(VesselError::io("chmod", dir))?;
    let owner = ids.map_or(0, |m| m.host_id);
    nix::unistd::chown(dir, Some(nix::unistd::Uid::from_raw(owner)), Some(nix::unistd::Gid::from_raw(owner)))
        .map_err(|e| VesselError::io("chown", dir)(e.into()))
}

/// The live upper dir; it and the work dir share `ovl/`, the one directory
/// idmapped for them (and, with a disk quota, the btrfs subvolume that
/// bounds them).
pub(crate) fn upper_dir(dir: &Path) -> PathBuf {
    dir.join("ovl/upper")
}

/// `parent/name` as a new directory: with a disk quota, a subvolume limited to it.
fn bounded_dir(parent: &Path, name: &str, disk: Option<u64>) -> Result<PathBuf> {
    let p = parent.join(name);
    match disk {
        Some(bytes) => vessel_runtime::quota::create_limited(parent, std::ffi::OsStr::new(name), bytes)
            .map_err(VesselError::io("create a quota subvolume at", &p))?,
        None => fs::create_dir(&p).map_err(VesselError::io("create", &p))?,
    }
    Ok(p)
}

/// Mounts the vessel's rootfs on `lowers` (bottom first), over idmapped
/// layers with a user namespace.
fn mount_at(
    dir: &Path,
    lowers: &[PathBuf],
    upper: Upper,
    userns: Option<&UserNamespace>,
    disk: Option<u64>,
) -> Result<OverlayMount> {
    let ovl = dir.join("ovl");
    if !ovl.exists() {
        // New, or moved into the layer cache by the last snapshot.
        bounded_dir(dir, "ovl", disk)?;
    }
    let (up, work) = (upper_dir(dir), ovl.join("work"));
    match upper {
        Upper::Fresh => fresh_dir(&up)?,
        Upper::Keep => fs::create_dir_all(&up).map_err(VesselError::io("create", &up))?,
    }
    fresh_dir(&work)?;
    let lowers: Vec<&Path> = lowers.iter().rev().map(PathBuf::as_path).collect();
    let target = dir.join("rootfs");
    Ok(match userns {
        Some(ns) => OverlayMount::mount_idmapped(&target, &lowers, &ovl, ns)?,
        None => OverlayMount::mount(&target, &lowers, Some((&up, &work)))?,
    })
}

impl Vessel {
    pub(crate) fn from_inner(inner: Arc<Inner>) -> Self {
        Self { inner }
    }

    /// The vessel's id.
    pub fn id(&self) -> &VesselId {
        &self.inner.id
    }

    /// The vessel's manifest as of now.
    pub fn manifest(&self) -> VesselManifest {
        self.inner.manifest()
    }

    /// How the vessel's container ids map to host ids on this host (`None`:
    /// no user namespace, container root is host root).
    pub fn id_mapping(&self) -> Option<vessel_runtime::IdMapping> {
        self.inner.gate.ids
    }

    /// The image's runtime defaults: `Env`, `WorkingDir`, `User`,
    /// `Entrypoint` and `Cmd` (a caller that runs "the image" runs
    /// `entrypoint` then `cmd`, as docker).
    pub fn image_config(&self) -> &vessel_snapshot::image::ImageConfig {
        &self.inner.image_config
    }

    /// Where the vessel's rootfs is mounted on this host (for inspection;
    /// use the file API to change it).
    pub fn rootfs(&self) -> PathBuf {
        self.inner.dir.join("rootfs")
    }

    fn path(&self, path: &str) -> Result<String> {
        let work_dir = self.inner.manifest.lock().unwrap_or_else(|e| e.into_inner()).work_dir.clone();
        vfs::normalize(&work_dir, path)
    }

    fn with_root<T>(&self, path: &str, f: impl FnOnce(&OwnedFd, &str) -> Result<T>) -> Result<T> {
        let path = self.path(path)?;
        let pass = self.inner.gate.enter(None)?;
        self.inner.gate.as_vessel_root(|| f(&pass.root, &path))
    }

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

    /// Runs a command in a new container on the vessel's filesystem: the
    /// image's environment plus `opts.env`, in `opts.work_dir` or the
    /// vessel's. With `persist_result` its changes stay; without, it runs on
    /// a throwaway overlay and they are discarded. Dropping the future kills
    /// the command.
    pub async fn exec(&self, opts: ExecOptions<'_>) -> Result<ExecResult> {
        if opts.command.is_empty() {
            return Err(VesselError::InvalidInput("empty command".into()));
        }
        let timeout = opts.timeout;
        if timeout.is_some_and(|t| t.is_zero()) {
            return Err(VesselError::InvalidInput("a zero exec timeout".into()));
        }
        let inner = &self.inner;
        let limits = inner.bounds.limits.narrowed_by(&opts.limits)?;
        let state = inner.state.read().await;
        if state.closed {
            return Err(VesselError::Closed(inner.id.clone()));
        }
        let cwd = match &opts.work_dir {
            Some(w) => self.path(w)?,
            None => self.path(".")?,
        };
        let live = inner.dir.join("rootfs");
        let mut throwaway = None;
        let rootfs = if opts.persist_result {
            live
        } else {
            let execs = inner.dir.join("exec");
            fs::create_dir_all(&execs).map_err(VesselError::io("create", &execs))?;
            let dir = bounded_dir(&execs, &format!("{:016x}", rand::random::<u64>()), inner.bounds.disk)?;
            let t = throwaway.insert(Throwaway { dir: dir.clone(), mount: None });
            for d in ["upper", "work", "rootfs"] {
                fs::create_dir_all(dir.join(d)).map_err(VesselError::io("create", &dir))?;
            }
            // The throwaway's root is its upper dir: give it the live
            // root's owner and mode (host view), or the container's root
            // would find `/` owned by an unmapped id.
            let live_root = fs::metadata(&live).map_err(VesselError::io("stat", &live))?;
            let up = dir.join("upper");
            {
                use std::os::unix::fs::{MetadataExt, PermissionsExt};
                nix::unistd::chown(
                    &up,
                    Some(nix::unistd::Uid::from_raw(live_root.uid())),
                    Some(nix::unistd::Gid::from_raw(live_root.gid())),
                )
                .map_err(|e| VesselError::io("chown", &up)(e.into()))?;
                fs::set_permissions(&up, fs::Permissions::from_mode(live_root.mode() & 0o7777))
                    .map_err(VesselError::io("chmod", &up))?;
            }
            t.mount = Some(OverlayMount::mount(
                &dir.join("rootfs"),
                &[live.as_path()],
                Some((&dir.join("upper"), &dir.join("work"))),
            )?);
            dir.join("rootfs")
        };
        let req = RunRequest {
            rootfs,
            args: opts.command,
            env: merge_env(&inner.image_config.env, &opts.env),
            cwd: Some(cwd),
            uid: inner.user.uid,
            gid: inner.user.gid,
            additional_gids: inner.user.additional_gids.clone(),
            user_namespace: inner.userns.as_ref().map(UserNamespace::mapping),
            tty: opts.tty.then_some(TtySize { rows: 24, cols: 80 }),
            stdin: opts.stdin,
            stdout: opts.stdout,
            stderr: opts.stderr,
            limits,
            ..Default::default()
        };
        let run = inner.shared.runtime.run_outcome(req);
        let done = |o: vessel_runtime::RunOutcome| ExecResult::new(o.exit_code).with_oom_killed(o.oom_killed);
        let result = match timeout {
            // Dropping the run kills the whole process tree (see Runtime::run).
            Some(t) => match tokio::time::timeout(t, run).await {
                Ok(outcome) => done(outcome?),
                Err(_) => ExecResult::timed_out(),
            },
            None => done(run.await?),
        };
        drop(throwaway);
        drop(state);
        Ok(result)
    }

    /// Seals the changes since the current snapshot as a new snapshot (its
    /// parent: the current one) and makes it current. Waits for running
    /// execs; costs what changed, not the workspace's size.
    pub async fn create_snapshot(&self, message: &str) -> Result<SnapshotManifest> {
        let inner = &self.inner;
        let mut state = inner.state.write().await;
        if state.closed {
            return Err(VesselError::Closed(inner.id.clone()));
        }
        inner.freeze().await;
        let result = self.snapshot_locked(&mut state, message).await;
        if state.mount.is_none() {
            // Failed before the new mount: back to the previous state.
            match inner.mount(&state.lowers, Upper::Keep) {
                Ok(m) => state.mount = Some(m),
                Err(e) => tracing::error!(id = %inner.id, error = %e, "could not remount after a failed snapshot"),
            }
        }
        let root = open_root(&inner.dir.join("rootfs")).ok();
        inner.gate.thaw(root, true);
        result
    }

    async fn snapshot_locked(&self, state: &mut State, message: &str) -> Result<SnapshotManifest> {
        let inner = &self.inner;
        let shared = &inner.shared;
        if let Some(m) = state.mount.take() {
            m.unmount()?;
        }
        let sid = shared.ids.snapshot_id();
        let upper = upper_dir(&inner.dir);
        // A diff that fails or panics drops the writer: storage then sees
        // an error, never the clean end of a truncated stream.
        let (writer, reader) = vessel_storage::pipe::pipe();
        let diff_upper = upper.clone();
        let diff = crate::task::blocking(move || {
            let (w, stats) =
                write_diff(&diff_upper, io::BufWriter::with_capacity(vessel_storage::pipe::CHUNK, writer))?;
            let w = w.into_inner().map_err(|e| vessel_snapshot::SnapshotError::Stream("snapshot", e.into_error()))?;
            w.finish_blocking().map_err(|e| vessel_snapshot::SnapshotError::Stream("snapshot", e))?;
            Ok::<_, vessel_snapshot::SnapshotError>(stats)
        });
        let (saved, stats) = tokio::join!(shared.storage.save_snapshot(&inner.id, &sid, Box::new(reader)), diff);
        let stats = match (saved, stats?) {
            (Ok(()), Ok(stats)) => stats,
            // The storage's error says more than the diff's broken pipe.
            (Err(e), Ok(_) | Err(vessel_snapshot::SnapshotError::Stream(..))) => return Err(e.into()),
            (_, Err(e)) => return Err(e.into()),
        };
        let key = LayerKey::snapshot(inner.id.clone(), sid.clone(), &stats.digest)?;
        let ovl = inner.dir.join("ovl");
        if inner.bounds.disk.is_some() {
            // Sealed, it becomes a shared read-only layer: no longer the
            // vessel's to be bounded (and a full quota would refuse even
            // the renames that move it into the cache).
            vessel_runtime::quota::set_limit(&ovl, 0).map_err(VesselError::io("lift the quota of", &ovl))?;
        }
        let layer = shared.cache.adopt(&key, inner.id.as_str(), &ovl)?;

        let mut manifest = inner.manifest();
        let snap = SnapshotManifest {
            id: sid.clone(),
            vessel_id: inner.id.clone(),
            parent_id: manifest.current_snapshot_id.clone(),
            message: message.into(),
            checksum: stats.digest,
            size: i64::try_from(stats.size).unwrap_or(i64::MAX),
            create_time: chrono::Utc::now(),
            labels: Default::default(),
        };
        manifest.snapshots.push(snap.clone());
        manifest.current_snapshot_id = Some(sid.clone());
        manifest.update_time = snap.create_time;
        if let Err(e) = shared.storage.save_vessel_manifest(&manifest).await {
            // Not committed: the sealed upper goes back to being the upper.
            let _ = shared.cache.unadopt(&key, inner.id.as_str(), &ovl);
            if let Some(bytes) = inner.bounds.disk {
                let _ = vessel_runtime::quota::set_limit(&ovl, bytes);
            }
            let _ = shared.storage.delete_snapshot(&inner.id, &sid).await;
            return Err(e.into());
        }
        let lowers = match shared.lowers(&inner.id, &manifest, Some(&sid), &inner.image_layers, &inner.dir).await {
            Ok(l) => l,
            Err(e) => {
                // The snapshot is committed; only a flattening failed.
                tracing::warn!(id = %inner.id, error = %e, "mounting the new snapshot on the unflattened chain");
                state.lowers.iter().cloned().chain([layer]).collect()
            }
        };
        *inner.manifest.lock().unwrap_or_else(|e| e.into_inner()) = manifest;
        state.mount = Some(inner.mount(&lowers, Upper::Fresh)?);
        state.lowers = lowers;
        Ok(snap)
    }

    /// Makes snapshot `id`'s state the vessel's, dropping uncommitted
    /// changes; later snapshots take it as parent (history is a tree). A
    /// cached chain is remounted, not copied.
    pub async fn restore_snapshot(&self, id: &SnapshotId) -> Result<()> {
        let inner = &self.inner;
        let mut state = inner.state.write().await;
        if state.closed {
            return Err(VesselError::Closed(inner.id.clone()));
        }
        // Read under the lock: a snapshot that just finished is in it.
        let manifest = inner.manifest();
        if manifest.snapshot(id).is_none() {
            return Err(VesselError::SnapshotNotFound { vessel: inner.id.clone(), snapshot: id.clone() });
        }
        // Fetch (and flatten) what this host lacks before touching the mount.
        let lowers = inner.shared.lowers(&inner.id, &manifest, Some(id), &inner.image_layers, &inner.dir).await?;
        let mut updated = manifest.clone();
        updated.current_snapshot_id = Some(id.clone());
        updated.update_time = chrono::Utc::now();
        inner.shared.storage.save_vessel_manifest(&updated).await?;
        inner.freeze().await;
        let remounted = (|| {
            if let Some(m) = state.mount.take() {
                m.unmount()?;
            }
            state.mount = Some(inner.mount(&lowers, Upper::Fresh)?);
            Ok::<_, VesselError>(())
        })();
        if remounted.is_ok() {
            state.lowers = lowers;
            *inner.manifest.lock().unwrap_or_else(|e| e.into_inner()) = updated;
        } else {
            // Back to the previous snapshot, in storage and on the mount.
            if let Err(e) = inner.shared.storage.save_vessel_manifest(&manifest).await {
                tracing::error!(id = %inner.id, error = %e, "could not put the manifest back after a failed restore");
            }
            if state.mount.is_none()
                && let Ok(m) = inner.mount(&state.lowers, Upper::Keep)
            {
                state.mount = Some(m);
            }
        }
        inner.gate.thaw(open_root(&inner.dir.join("rootfs")).ok(), true);
        remounted
    }

    /// Deletes a snapshot that is neither current nor a parent.
    pub async fn delete_snapshot(&self, id: &SnapshotId) -> Result<()> {
        let inner = &self.inner;
        let _state = inner.state.write().await;
        let mut manifest = inner.manifest();
        if manifest.snapshot(id).is_none() {
            return Err(VesselError::SnapshotNotFound { vessel: inner.id.clone(), snapshot: id.clone() });
        }
        if manifest.current_snapshot_id.as_ref() == Some(id) {
            return Err(VesselError::SnapshotInUse { snapshot: id.clone(), reason: "it is the current snapshot" });
        }
        if manifest.snapshots.iter().any(|s| s.parent_id.as_ref() == Some(id)) {
            return Err(VesselError::SnapshotInUse { snapshot: id.clone(), reason: "it is the parent of another" });
        }
        // Its cached layers: its own, and the flat layer its chain would have.
        let doomed = {
            let mut chain = manifest.chain(id);
            chain.reverse();
            let checksum = chain.last().map(|s| s.checksum.as_str()).unwrap_or_default();
            [crate::layers::flat_key(&chain), LayerKey::snapshot(inner.id.clone(), id.clone(), checksum)?]
        };
        manifest.snapshots.retain(|s| &s.id != id);
        manifest.update_time = chrono::Utc::now();
        inner.shared.storage.save_vessel_manifest(&manifest).await?;
        *inner.manifest.lock().unwrap_or_else(|e| e.into_inner()) = manifest;
        inner.shared.storage.delete_snapshot(&inner.id, id).await?;
        for key in doomed {
            inner.shared.cache.release(&key, inner.id.as_str())?;
        }
        inner.shared.cache.gc()?;
        Ok(())
    }

    /// The vessel's snapshots, oldest first.
    pub fn list_snapshots(&self) -> Vec<SnapshotManifest> {
        self.inner.manifest().snapshots
    }

    /// Unmounts the vessel and releases its lock. Uncommitted changes are
    /// not durable: the next open starts from the current snapshot.
    pub async fn close(&self) -> Result<()> {
        self.inner.close().await
    }
}
