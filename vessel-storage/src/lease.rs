//! Leases: a vessel is open on at most one host at a time, for any storage
//! hosts share.
//!
//! Liveness costs per host, not per vessel. Each host (one running
//! manager) keeps one heartbeat record, `leases/hosts/<host>.json`, renewed
//! every third of its TTL with a conditional write. Opening a vessel takes
//! its claim, `leases/vessels/<id>.json`, once, with a conditional write
//! (create-if-absent, or update-if-version over a released claim or one
//! whose host is dead). The claim names its host and is live while that
//! host's heartbeat is: a host with 1,000 open vessels costs one PUT per
//! renewal period. Closing releases the claim (one conditional PUT).
//!
//! A host is dead when its heartbeat is gone or has expired by the reader's
//! clock, or, on the same machine (same boot id and host name), when its
//! process has exited: a crashed CLI need not wait out the TTL.
//!
//! Leases give exclusion; safety does not rest on clocks. Commits are
//! fenced: a host writes a vessel's manifest only over the version it read
//! (see [`crate::Storage::save_vessel_manifest_if`]), and a host that takes
//! a claim over rewrites the manifest before it starts. So a host that lost
//! its claim, say paused past its TTL, gets `Conflict` on its next commit
//! and its work never overwrites the new holder's.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, warn};
use vessel_core::VesselId;

use crate::{HostId, RecordKey, Storage, StorageError, StorageErrorKind, Version, WriteIf};
use vessel_core::sync::Locked;

/// How a host's lease behaves.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    /// How long a heartbeat stays fresh without renewal; renewed every third of it.
    pub ttl: Duration,
    /// The host's name, shown to whoever finds a vessel busy.
    pub host_name: String,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        Self { ttl: Duration::from_secs(30), host_name: host_name() }
    }
}

/// The machine's host name (`unknown` if it has none).
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

/// A host's heartbeat record.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Heartbeat {
    host: HostId,
    name: String,
    /// The machine's boot id and the process, for same-machine liveness.
    boot_id: Option<String>,
    pid: u32,
    start_time: Option<u64>,
    expires_at: DateTime<Utc>,
}

/// A vessel's claim record; `host: None` once released.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ClaimRecord {
    vessel: VesselId,
    host: Option<HostId>,
    name: Option<String>,
    at: DateTime<Utc>,
}

/// A claim this host holds on a vessel.
#[derive(Debug, Clone)]
pub struct Claim {
    vessel: VesselId,
    version: Version,
    took_over: bool,
}

impl Claim {
    /// Whether it was taken from a dead host (whose commits the new
    /// holder must fence off by rewriting the manifest).
    pub fn took_over(&self) -> bool {
        self.took_over
    }

    /// The vessel.
    pub fn vessel(&self) -> &VesselId {
        &self.vessel
    }
}

/// Who holds a vessel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// The holder's host id.
    pub host: HostId,
    /// Its host name.
    pub name: String,
    /// When its heartbeat expires unless renewed (`None`: it has none).
    pub expires_at: Option<DateTime<Utc>>,
    /// Whether the claim is live (its host's heartbeat is).
    pub live: bool,
}

struct Inner {
    storage: Arc<dyn Storage>,
    id: HostId,
    name: String,
    ttl: Duration,
    boot_id: Option<String>,
    start_time: Option<u64>,
    /// The heartbeat's version, `None` once ended; and until when (by
    /// this host's monotonic clock) the last renewal keeps it fresh.
    state: Mutex<(Option<Version>, Instant)>,
}

/// One host's lease: its heartbeat, renewed in the background until
/// [`HostLease::end`] or drop, and the claims it takes.
pub struct HostLease {
    inner: Arc<Inner>,
    /// The renewal task and what tells it to stop: it stops between
    /// renewals, never in the middle of one (a write cancelled half-way can
    /// still land, after `end` removed the heartbeat).
    heartbeat: Mutex<Option<(JoinHandle<()>, tokio::sync::watch::Sender<()>)>>,
}

impl std::fmt::Debug for HostLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostLease").field("id", &self.inner.id).field("name", &self.inner.name).finish_non_exhaustive()
    }
}

fn corrupt(what: impl std::fmt::Display, e: serde_json::Error) -> StorageError {
    StorageError::Corrupt { what: what.to_string(), reason: e.to_string() }
}

fn to_chrono(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}

impl Inner {
    fn heartbeat(&self) -> Heartbeat {
        Heartbeat {
            host: self.id.clone(),
            name: self.name.clone(),
            boot_id: self.boot_id.clone(),
            pid: std::process::id(),
            start_time: self.start_time,
            expires_at: Utc::now() + to_chrono(self.ttl),
        }
    }

    /// Writes the heartbeat under `cond`; on success it is fresh for a TTL from now.
    async fn write(&self, cond: &WriteIf) -> Result<(), StorageError> {
        let started = Instant::now();
        let data = serde_json::to_vec(&self.heartbeat()).map_err(|e| corrupt("heartbeat", e))?;
        let v = self.storage.save_record(&RecordKey::Host(self.id.clone()), data, cond).await?;
        *self.state.locked() = (Some(v), started + self.ttl);
        Ok(())
    }

    async fn renew(&self) {
        let Some(current) = self.state.locked().0.clone() else { return };
        match self.write(&WriteIf::Matches(current)).await {
            Ok(()) => debug!(host = %self.id, "heartbeat renewed"),
            Err(e) if e.kind() == StorageErrorKind::Conflict => {
                // Someone removed it: we were paused past the TTL. Claims
                // others took meanwhile are theirs; commits are fenced.
                warn!(host = %self.id, "heartbeat was lost; writing a new one");
                if let Err(e) = self.write(&WriteIf::Absent).await {
                    warn!(host = %self.id, error = %e, "could not write a new heartbeat");
                }
            }
            Err(e) => warn!(host = %self.id, error = %e, "could not renew the heartbeat; retrying"),
        }
    }

    /// The heartbeat of `host`, and whether it is alive.
    async fn liveness(&self, host: &HostId) -> Result<(Option<Heartbeat>, bool), StorageError> {
        let key = RecordKey::Host(host.clone());
        let Some(rec) = self.storage.load_record(&key).await? else { return Ok((None, false)) };
        let hb: Heartbeat = match serde_json::from_slice(&rec.data) {
            Ok(h) => h,
            Err(e) => {
                warn!(%host, error = %e, "an unreadable heartbeat counts as dead");
                return Ok((None, false));
            }
        };
        let now = Utc::now();
        let mut live = hb.expires_at > now;
        if live && self.same_machine(&hb) {
            // The same machine: its process tells.
            live = running(&hb);
        }
        if !live && hb.expires_at + to_chrono(self.ttl * 10) < now {
            // Long dead: nobody renews it again; tidy it away.
            let _ = self.storage.delete_record(&key).await;
        }
        Ok((Some(hb), live))
    }

    /// Whether `hb` was written on this machine by a process this one can
    /// see (same boot, same host name: not a container sharing the kernel).
    fn same_machine(&self, hb: &Heartbeat) -> bool {
        hb.boot_id.is_some() && hb.boot_id == self.boot_id && hb.name == self.name
    }

    /// Whether nobody will renew `hb` again: its process on this machine
    /// has exited, or it expired ten TTLs ago.
    fn abandoned(&self, hb: &Heartbeat) -> bool {
        hb.expires_at + to_chrono(self.ttl * 10) < Utc::now() || (self.same_machine(hb) && !running(hb))
    }
}

/// Whether the process that wrote `hb` still runs (on this machine).
fn running(hb: &Heartbeat) -> bool {
    start_time(hb.pid).is_some_and(|t| Some(t) == hb.start_time)
}

/// `pid`'s start time (clock ticks since boot), `None` if it has exited.
fn start_time(pid: u32) -> Option<u64> {
    let pid = i32::try_from(pid).ok()?;
    procfs::process::Process::new(pid).and_then(|p| p.stat()).ok().map(|s| s.starttime)
}

impl HostLease {
    /// Writes a new host heartbeat to `storage` and renews it in the
    /// background (needs a tokio runtime).
    pub async fn start(storage: Arc<dyn Storage>, config: LeaseConfig) -> Result<Self, StorageError> {
        let inner = Arc::new(Inner {
            storage,
            id: HostId::generate(),
            name: config.host_name,
            ttl: config.ttl.max(Duration::from_millis(300)),
            boot_id: std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok().map(|s| s.trim().to_owned()),
            start_time: start_time(std::process::id()),
            state: Mutex::new((None, Instant::now())),
        });
        inner.write(&WriteIf::Absent).await?;
        let lease = Self { inner, heartbeat: Mutex::new(None) };
        lease.spawn_heartbeat();
        Ok(lease)
    }

    fn spawn_heartbeat(&self) {
        let inner = Arc::downgrade(&self.inner);
        let period = self.inner.ttl / 3;
        let (stop, mut stopped) = tokio::sync::watch::channel(());
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(period) => {}
                    // Told to stop, or the lease is gone (the sender dropped).
                    _ = stopped.changed() => return,
                }
                let Some(inner) = inner.upgrade() else { return };
                inner.renew().await;
            }
        });
        // An older task (the lease was ended and used again) stops on its own.
        drop(self.heartbeat.locked().replace((task, stop)));
    }

    /// This host's id.
    pub fn id(&self) -> &HostId {
        &self.inner.id
    }

    /// This host's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The heartbeat's TTL.
    pub fn ttl(&self) -> Duration {
        self.inner.ttl
    }

    /// Whether the last renewal still keeps the heartbeat fresh (by this
    /// host's monotonic clock); `false` after a pause past the TTL.
    pub fn is_fresh(&self) -> bool {
        let s = self.inner.state.locked();
        s.0.is_some() && Instant::now() < s.1
    }

    /// Takes the claim on `vessel` for this host: `Busy` naming the holder
    /// when another live host has it. A claim whose host is dead is taken
    /// over ([`Claim::took_over`]).
    pub async fn claim(&self, vessel: &VesselId) -> Result<Claim, StorageError> {
        if self.inner.state.locked().0.is_none() {
            // Ended, and used again.
            self.inner.write(&WriteIf::Absent).await?;
            self.spawn_heartbeat();
        }
        let key = RecordKey::Claim(vessel.clone());
        let storage = &self.inner.storage;
        // A conflict means another host wrote the claim between our read
        // and write: look again (it is now live, or ours to take).
        for _ in 0..4 {
            let (cond, took_over) = match storage.load_record(&key).await? {
                None => (WriteIf::Absent, false),
                Some(rec) => match serde_json::from_slice::<ClaimRecord>(&rec.data) {
                    Ok(ClaimRecord { host: Some(h), name, .. }) if h != self.inner.id => {
                        match self.inner.liveness(&h).await? {
                            (Some(hb), true) => {
                                return Err(StorageError::Busy {
                                    vessel: vessel.clone(),
                                    holder: name.unwrap_or(hb.name),
                                    host: h,
                                    expires_at: hb.expires_at,
                                });
                            }
                            _ => (WriteIf::Matches(rec.version), true),
                        }
                    }
                    Ok(_) => (WriteIf::Matches(rec.version), false),
                    Err(e) => {
                        warn!(%vessel, error = %e, "overwriting an unreadable claim");
                        (WriteIf::Matches(rec.version), true)
                    }
                },
            };
            let record = ClaimRecord {
                vessel: vessel.clone(),
                host: Some(self.inner.id.clone()),
                name: Some(self.inner.name.clone()),
                at: Utc::now(),
            };
            let data = serde_json::to_vec(&record).map_err(|e| corrupt(&key, e))?;
            match storage.save_record(&key, data, &cond).await {
                Ok(version) => return Ok(Claim { vessel: vessel.clone(), version, took_over }),
                Err(e) if e.kind() == StorageErrorKind::Conflict => continue,
                Err(e) => return Err(e),
            }
        }
        Err(StorageError::Conflict { what: key.to_string() })
    }

    /// Checks that `claim` is still this host's: free while the heartbeat
    /// is fresh, else one read of the claim (`Conflict` if it was taken).
    pub async fn verify(&self, claim: &Claim) -> Result<(), StorageError> {
        if self.is_fresh() {
            return Ok(());
        }
        let key = RecordKey::Claim(claim.vessel.clone());
        match self.inner.storage.load_record(&key).await? {
            Some(r) if r.version == claim.version => Ok(()),
            _ => Err(StorageError::Conflict { what: key.to_string() }),
        }
    }

    /// Releases `claim` (one conditional write). A claim another host took
    /// meanwhile is left to it.
    pub async fn release(&self, claim: &Claim) -> Result<(), StorageError> {
        let key = RecordKey::Claim(claim.vessel.clone());
        let record = ClaimRecord { vessel: claim.vessel.clone(), host: None, name: None, at: Utc::now() };
        let data = serde_json::to_vec(&record).map_err(|e| corrupt(&key, e))?;
        match self.inner.storage.save_record(&key, data, &WriteIf::Matches(claim.version.clone())).await {
            Err(e) if e.kind() == StorageErrorKind::Conflict => {
                warn!(vessel = %claim.vessel, "the claim was taken over before release");
                Ok(())
            }
            r => r.map(drop),
        }
    }

    /// Who holds `vessel` (`None`: nobody).
    pub async fn holder(&self, vessel: &VesselId) -> Result<Option<Holder>, StorageError> {
        let key = RecordKey::Claim(vessel.clone());
        let Some(rec) = self.inner.storage.load_record(&key).await? else { return Ok(None) };
        let Ok(ClaimRecord { host: Some(host), name, .. }) = serde_json::from_slice::<ClaimRecord>(&rec.data) else {
            return Ok(None);
        };
        let (hb, live) = self.inner.liveness(&host).await?;
        Ok(Some(Holder {
            name: name.or_else(|| hb.as_ref().map(|h| h.name.clone())).unwrap_or_default(),
            expires_at: hb.map(|h| h.expires_at),
            host,
            live,
        }))
    }

    /// Removes the heartbeats nobody will renew again: those of exited
    /// processes of this machine under this host name (this host's earlier
    /// runs), and any expired ten TTLs ago. A host paused that long writes
    /// a new one when it wakes (its claims are fenced as ever). Returns how
    /// many it removed.
    pub async fn sweep(&self) -> Result<usize, StorageError> {
        let mut removed = 0;
        for host in self.inner.storage.list_hosts().await? {
            if host == self.inner.id {
                continue;
            }
            let key = RecordKey::Host(host);
            let Some(rec) = self.inner.storage.load_record(&key).await? else { continue };
            if serde_json::from_slice::<Heartbeat>(&rec.data).is_ok_and(|hb| self.inner.abandoned(&hb)) {
                self.inner.storage.delete_record(&key).await?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Stops renewing and removes the heartbeat: claims this host still
    /// holds are dead at once. A later [`HostLease::claim`] starts anew.
    pub async fn end(&self) -> Result<(), StorageError> {
        let running = self.heartbeat.locked().take();
        if let Some((task, stop)) = running {
            // Waits out a renewal in flight, which could otherwise write the
            // heartbeat again after it is removed below.
            let _ = stop.send(());
            let _ = task.await;
        }
        let had = self.inner.state.locked().0.take();
        if had.is_some() {
            self.inner.storage.delete_record(&RecordKey::Host(self.inner.id.clone())).await?;
        }
        Ok(())
    }
}

impl Drop for HostLease {
    fn drop(&mut self) {
        // The renewal task stops when its sender goes.
        drop(self.heartbeat.locked_mut().take());
        // Best effort: without `end`, the heartbeat expires after its TTL.
        let ended = self.inner.state.locked().0.is_none();
        if !ended && let Ok(rt) = tokio::runtime::Handle::try_current() {
            let (storage, key) = (self.inner.storage.clone(), RecordKey::Host(self.inner.id.clone()));
            rt.spawn(async move {
                let _ = storage.delete_record(&key).await;
            });
        }
    }
}
