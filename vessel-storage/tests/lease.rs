//! Leases over every storage: one host holds a vessel at a time; others
//! get `Busy`; a dead host's claim is taken over; release and end free it.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{TestResult, vid};
use vessel_storage::lease::{HostLease, LeaseConfig};
use vessel_storage::{HostId, LocalStorage, RecordKey, Storage, StorageErrorKind, WriteIf};

fn config(name: &str, ttl_ms: u64) -> LeaseConfig {
    LeaseConfig { ttl: Duration::from_millis(ttl_ms), host_name: name.into() }
}

/// Writes, by hand, the heartbeat of a host that is not running here.
async fn fake_host(s: &Arc<dyn Storage>, id: &str, expires_in_secs: i64, pid: u32, same_machine: bool) -> HostId {
    let host = HostId::new(id).unwrap();
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    let hb = serde_json::json!({
        "host": id, "name": if same_machine { "here" } else { "elsewhere" },
        "boot_id": if same_machine { boot.trim().to_owned() } else { "another-boot".to_owned() },
        "pid": pid, "start_time": 1,
        "expires_at": chrono::Utc::now() + chrono::Duration::seconds(expires_in_secs),
    });
    s.save_record(&RecordKey::Host(host.clone()), serde_json::to_vec(&hb).unwrap(), &WriteIf::Absent).await.unwrap();
    host
}

async fn fake_claim(s: &Arc<dyn Storage>, vessel: u64, host: &HostId) {
    let c = serde_json::json!({"vessel": vid(vessel), "host": host, "name": "elsewhere", "at": chrono::Utc::now()});
    s.save_record(&RecordKey::Claim(vid(vessel)), serde_json::to_vec(&c).unwrap(), &WriteIf::Absent).await.unwrap();
}

async fn exclusive_and_released(s: Arc<dyn Storage>) -> TestResult {
    let a = HostLease::start(s.clone(), config("host-a", 3000)).await?;
    let b = HostLease::start(s.clone(), config("host-b", 3000)).await?;
    let v = vid(1);
    let claim = a.claim(&v).await?;
    assert!(!claim.took_over());
    let e = b.claim(&v).await.unwrap_err();
    assert_eq!(e.kind(), StorageErrorKind::Busy, "{e}");
    assert!(e.to_string().contains("host-a"), "{e}");
    let holder = b.holder(&v).await?.expect("held");
    assert_eq!((holder.name.as_str(), holder.live, &holder.host), ("host-a", true, a.id()));
    // Renewals keep it: past the TTL, it is still busy.
    tokio::time::sleep(Duration::from_millis(4000)).await;
    assert_eq!(b.claim(&v).await.unwrap_err().kind(), StorageErrorKind::Busy);
    a.release(&claim).await?;
    assert_eq!(b.holder(&v).await?, None);
    let cb = b.claim(&v).await?;
    assert!(!cb.took_over());
    // A host that ends frees its claims at once.
    b.end().await?;
    assert!(!a.holder(&v).await?.unwrap().live);
    let ca = a.claim(&v).await?;
    assert!(ca.took_over(), "a claim whose host ended is taken over");
    assert!(!s.list_hosts().await?.contains(b.id()), "an ended host's heartbeat is gone");
    a.end().await?;
    assert_eq!(s.list_hosts().await?, Vec::<HostId>::new());
    Ok(())
}

async fn dead_hosts_are_taken_over(s: Arc<dyn Storage>) -> TestResult {
    let me = HostLease::start(s.clone(), config("here", 3000)).await?;
    // Elsewhere, live: busy until its expiry.
    let live = fake_host(&s, "00000000000000a1", 60, 1, false).await;
    fake_claim(&s, 1, &live).await;
    let e = me.claim(&vid(1)).await.unwrap_err();
    assert_eq!(e.kind(), StorageErrorKind::Busy);
    // Elsewhere, expired: taken over.
    let expired = fake_host(&s, "00000000000000a2", -1, 1, false).await;
    fake_claim(&s, 2, &expired).await;
    assert!(me.claim(&vid(2)).await?.took_over());
    // Elsewhere, its heartbeat gone: taken over.
    fake_claim(&s, 3, &HostId::new("00000000000000a3")?).await;
    assert!(me.claim(&vid(3)).await?.took_over());
    // This machine, same host name, its process gone: taken over before the TTL.
    let mut child = std::process::Command::new("true").spawn()?;
    let pid = child.id();
    child.wait()?;
    let crashed = fake_host(&s, "00000000000000a4", 60, pid, true).await;
    fake_claim(&s, 4, &crashed).await;
    assert!(me.claim(&vid(4)).await?.took_over());
    // An unreadable claim does not lock a vessel forever.
    s.save_record(&RecordKey::Claim(vid(5)), b"{garbage".to_vec(), &WriteIf::Absent).await?;
    assert!(me.claim(&vid(5)).await?.took_over());
    me.end().await?;
    Ok(())
}

/// A host whose heartbeat stops (its process paused) loses its claims
/// after the TTL; one that never renews is taken over.
async fn expiry_after_ttl(s: Arc<dyn Storage>) -> TestResult {
    let b = HostLease::start(s.clone(), config("host-b", 1000)).await?;
    let silent = fake_host(&s, "00000000000000b1", 1, 1, false).await;
    fake_claim(&s, 7, &silent).await;
    assert_eq!(b.claim(&vid(7)).await.unwrap_err().kind(), StorageErrorKind::Busy);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(b.claim(&vid(7)).await?.took_over());
    b.end().await?;
    Ok(())
}

macro_rules! lease_suite {
    ($m:ident, $make:expr) => {
        mod $m {
            use super::*;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn exclusive_and_released() -> TestResult {
                let Some((s, _keep)) = ($make)().await? else { return Ok(()) };
                super::exclusive_and_released(s).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn dead_hosts_are_taken_over() -> TestResult {
                let Some((s, _keep)) = ($make)().await? else { return Ok(()) };
                super::dead_hosts_are_taken_over(s).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn expiry_after_ttl() -> TestResult {
                let Some((s, _keep)) = ($make)().await? else { return Ok(()) };
                super::expiry_after_ttl(s).await
            }
        }
    };
}

type Made = anyhow::Result<Option<(Arc<dyn Storage>, Option<tempfile::TempDir>)>>;

async fn local() -> Made {
    let dir = tempfile::tempdir()?;
    Ok(Some((Arc::new(LocalStorage::new(dir.path())?), Some(dir))))
}

#[cfg(feature = "s3")]
async fn s3() -> Made {
    let Some(base) = vessel_test_support::required_env("lease (s3)", "VESSEL_S3_URL") else { return Ok(None) };
    let url = format!("{}/lease-{:016x}", base.to_string_lossy(), rand::random::<u64>());
    Ok(Some((vessel_storage::open_url(&url).await?, None)))
}

lease_suite!(on_local, local);
#[cfg(feature = "s3")]
lease_suite!(on_s3, s3);
