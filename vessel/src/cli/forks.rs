//! `vessel fork`, `vessel diff` and `vessel gc`.

use anyhow::Result;
use vessel::{Manager, SnapshotId};

use crate::args::ForkArgs;
use crate::commands::{keeper, print_json, unexpected, with_vessel};
use crate::keeper::client::call;
use crate::keeper::wire::{Call, Reply};
use crate::view::{ChangeView, VesselView};

pub(crate) async fn fork(mgr: &Manager, a: &ForkArgs, json: bool) -> Result<()> {
    // Refused before a snapshot of the present state is taken.
    if a.name.is_some() && a.count > 1 {
        anyhow::bail!("--name names one vessel: give it with -n 1 only");
    }
    let opts = crate::vessel_options(a.name.as_deref(), a.limits.memory, a.limits.cpus, a.limits.pids, a.limits.disk);
    let snapshot = match &a.snapshot {
        Some(s) => SnapshotId::new(s)?,
        // The present state: a snapshot of it first (its keeper's, if it has one).
        None => match keeper(mgr, &a.id).await? {
            Some(conn) => match call(conn, Call::Snapshot { message: "fork".into() }).await? {
                Reply::Snapshot { snapshot } => snapshot.id,
                r => return Err(unexpected(r)),
            },
            None => with_vessel(mgr, &a.id, async |v| Ok(v.create_snapshot("fork").await?.id)).await?,
        },
    };
    let mut made = Vec::with_capacity(usize::from(a.count));
    for v in mgr.fork_vessels(&a.id, &snapshot, usize::from(a.count), &opts).await? {
        made.push(v.manifest());
        v.close().await?;
    }
    if json {
        return print_json(&made.iter().map(VesselView::of).collect::<Vec<_>>());
    }
    made.iter().for_each(|m| println!("{}", m.id));
    Ok(())
}

pub(crate) async fn diff(mgr: &Manager, id: &str, since: Option<&str>, to: Option<&str>, json: bool) -> Result<()> {
    let changes = match keeper(mgr, id).await? {
        Some(conn) => {
            let c = Call::Changes { since: since.map(str::to_owned), to: to.map(str::to_owned) };
            match call(conn, c).await? {
                Reply::Changes { changes } => changes,
                r => return Err(unexpected(r)),
            }
        }
        None => {
            let since = since.map(SnapshotId::new).transpose()?;
            let to = to.map(SnapshotId::new).transpose()?;
            let changes = with_vessel(mgr, id, async |v| {
                Ok(match (&since, &to) {
                    (Some(a), Some(b)) => v.changes_between(a, b).await?,
                    (since, _) => v.changes(since.as_ref()).await?,
                })
            })
            .await?;
            changes.iter().map(ChangeView::of).collect()
        }
    };
    if json {
        return print_json(&changes);
    }
    for c in &changes {
        println!("{} {}", c.letter(), c.path);
    }
    Ok(())
}

pub(crate) async fn gc(mgr: &Manager, json: bool) -> Result<()> {
    let report = mgr.gc().await?;
    if json {
        return print_json(&serde_json::json!({
            "owners": report.owners,
            "blobs_deleted": report.blobs_deleted,
            "uploads_aborted": report.uploads_aborted,
            "heartbeats_removed": report.heartbeats_removed,
        }));
    }
    println!(
        "deleted {} snapshot blob(s) no vessel refers to; aborted {} unfinished upload(s); removed {} heartbeat(s) of gone hosts",
        report.blobs_deleted, report.uploads_aborted, report.heartbeats_removed
    );
    Ok(())
}
