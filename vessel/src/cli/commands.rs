//! One function per subcommand. Each opens the vessel it needs through
//! [`with_vessel`], which closes it again whatever the command's outcome,
//! or, while a keeper holds the vessel (see `keeper`), calls the keeper.

use std::io::{IsTerminal, Read, Write};
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use tokio::io::AsyncRead;
use vessel::{ExecOptions, Manager, SnapshotId, SnapshotManifest, Vessel, VesselManifest};

use crate::args::{CreateArgs, ExecArgs};
use crate::keeper::client::{self, call, call_with_data, call_with_input};
use crate::keeper::wire::{self, Call, Conn, Reply};
use crate::view::{ExecView, SnapshotView, VesselView};
use vessel::NAME_LABEL;

/// The keeper holding vessel `id` (an id or name), if one does; a name
/// that does not resolve is left to the direct path to report.
pub(crate) async fn keeper(mgr: &Manager, id: &str) -> Result<Option<Conn>> {
    match mgr.resolve_vessel(id).await {
        Ok(vid) => client::connect(mgr, &vid).await,
        Err(_) => Ok(None),
    }
}

/// A reply the call does not have.
pub(crate) fn unexpected(r: Reply) -> anyhow::Error {
    anyhow::anyhow!("the keeper replied {r:?}, which this call does not expect")
}

/// A command as the keeper takes it.
pub(crate) fn wire_command(a: &ExecArgs) -> wire::Command {
    wire::Command {
        argv: a.command.clone(),
        work_dir: a.work_dir.clone(),
        env: a.env.clone(),
        timeout_ms: a.timeout.map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX)),
    }
}

/// Opens vessel `id`, runs `f` on it and closes it, however `f` ended (its
/// error wins over one of closing).
pub(crate) async fn with_vessel<T>(mgr: &Manager, id: &str, f: impl AsyncFnOnce(&Vessel) -> Result<T>) -> Result<T> {
    let pb = spinner(format!("opening vessel {id}"));
    let opened = mgr.open_vessel(id).await.with_context(|| format!("cannot open vessel {id}"));
    pb.finish_and_clear();
    let v = opened?;
    let result = f(&v).await;
    let closed = v.close().await;
    let value = result?;
    closed?;
    Ok(value)
}

fn spinner(msg: String) -> ProgressBar {
    let pb = ProgressBar::new_spinner().with_message(msg);
    pb.set_style(ProgressStyle::with_template("{spinner} {msg} ({elapsed})").expect("a valid template"));
    pb.enable_steady_tick(Duration::from_millis(100));
    pb
}

fn bytes_bar(len: u64, msg: String) -> ProgressBar {
    let bar = ProgressBar::new(len).with_message(msg);
    bar.set_style(
        ProgressStyle::with_template("{msg} {bar:30} {bytes}/{total_bytes} ({bytes_per_sec})")
            .expect("a valid template"),
    );
    bar
}

pub(crate) fn print_json(v: &impl serde::Serialize) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// Snapshots `v`; unless `quiet`, says so on stderr.
async fn commit(v: &Vessel, message: String, quiet: bool) -> Result<SnapshotManifest> {
    let pb = spinner(format!("snapshot {message:?}"));
    let snap = v.create_snapshot(&message).await;
    pb.finish_and_clear();
    let snap = snap?;
    if !quiet {
        eprintln!("snapshot {} ({} B)", snap.id, snap.size);
    }
    Ok(snap)
}

pub(crate) async fn image_pull(mgr: &Manager, reference: &str, json: bool) -> Result<()> {
    let bar = bytes_bar(0, format!("pulling {reference}"));
    let b = bar.clone();
    let pulled = mgr
        .pull_image_with(reference, move |p| {
            b.set_length(p.total);
            b.set_position(p.done);
        })
        .await;
    bar.finish_and_clear();
    let pulled = pulled?;
    if json {
        print_json(&serde_json::json!({
            "reference": pulled.reference, "manifest_digest": pulled.manifest_digest,
            "bytes": pulled.bytes, "layers": pulled.layers,
        }))
    } else {
        println!("{reference}");
        Ok(())
    }
}

pub(crate) async fn image_import(mgr: &Manager, archive: &Path, reference: &str, json: bool) -> Result<()> {
    let file = tokio::fs::File::open(archive).await.with_context(|| format!("opening {}", archive.display()))?;
    let size = file.metadata().await?.len();
    let bar = bytes_bar(size, format!("importing {reference}"));
    let imported = mgr.import_image(reference, Box::new(bar.wrap_async_read(file))).await;
    bar.finish_and_clear();
    imported?;
    if json {
        print_json(&serde_json::json!({ "reference": reference, "bytes": size }))
    } else {
        println!("{reference}");
        Ok(())
    }
}

pub(crate) async fn image_ls(mgr: &Manager, json: bool) -> Result<()> {
    let images: Vec<String> = mgr.storage().list_images().await?.iter().map(|i| i.to_string()).collect();
    if json {
        return print_json(&images);
    }
    images.iter().for_each(|i| println!("{i}"));
    Ok(())
}

pub(crate) async fn create(mgr: &Manager, a: &CreateArgs, json: bool) -> Result<()> {
    let mut opts =
        crate::vessel_options(a.name.as_deref(), a.limits.memory, a.limits.cpus, a.limits.pids, a.limits.disk);
    if let Some(p) = a.network.policy()? {
        opts = opts.network(p);
    }
    let pb = spinner(format!("creating a vessel from {}", a.image));
    let created = mgr.create_vessel_with(&a.image, &a.work_dir, &opts).await;
    let v = match created {
        Ok(v) => v,
        Err(e) => {
            pb.finish_and_clear();
            return Err(e.into());
        }
    };
    // The initial state (image + work dir) is the vessel's first snapshot.
    let first = v.create_snapshot("create").await;
    pb.finish_and_clear();
    // Never silent: what the vessel's limits will not do on this host.
    for u in mgr.unavailable_limits() {
        eprintln!("vessel: warning: the {:?} limit is not applied here: {}", u.limit, u.reason);
        if u.limit == vessel::Limit::Disk && !mgr.is_rootless() {
            eprintln!(
                "vessel: to enforce disk quotas, put the mount root on btrfs with quotas, or run \
                 `vessel setup-quota` (as root); `--disk-quota off` silences this"
            );
        }
    }
    let closed = v.close().await;
    first?;
    closed?;
    if json {
        print_json(&VesselView::of(&v.manifest()))
    } else {
        println!("{}", v.id());
        Ok(())
    }
}

pub(crate) async fn ls(mgr: &Manager, json: bool) -> Result<()> {
    let vessels = mgr.list_vessels().await?;
    let mut holders = Vec::with_capacity(vessels.len());
    for m in &vessels {
        holders.push(mgr.vessel_holder(&m.id).await?.filter(|h| h.live));
    }
    if json {
        // Each vessel, with its holder (null: nobody has it open).
        let rows: Vec<VesselView<'_>> =
            vessels.iter().zip(&holders).map(|(m, h)| VesselView::of(m).held_by(h.as_ref())).collect();
        return print_json(&rows);
    }
    println!(
        "{:<18} {:<16} {:<30} {:<18} {:>9}  {:<19}  {:<18}  HOLDER",
        "ID", "NAME", "IMAGE", "CURRENT", "SNAPSHOTS", "UPDATED", "FORKED FROM"
    );
    for (m, h) in vessels.iter().zip(&holders) {
        let from = vessel::ForkOrigin::of(m).map_or_else(|| "-".to_owned(), |o| o.vessel_id.to_string());
        println!(
            "{:<18} {:<16} {:<30} {:<18} {:>9}  {:<19}  {:<18}  {}",
            m.id.as_str(),
            m.labels.get(NAME_LABEL).map_or("-", String::as_str),
            m.base_image_ref.as_str(),
            m.current_snapshot_id.as_ref().map_or("-", |s| s.as_str()),
            m.snapshots.len(),
            m.update_time.format("%Y-%m-%d %H:%M:%S"),
            from,
            h.as_ref().map_or_else(|| "-".to_owned(), |h| format!("{} ({})", h.name, h.host)),
        );
    }
    Ok(())
}

pub(crate) async fn exec(mgr: &Manager, a: &ExecArgs, json: bool) -> Result<ExitCode> {
    let started = std::time::Instant::now();
    if let Some(conn) = keeper(mgr, &a.id).await? {
        let stdin = a.tty || a.interactive;
        let snapshot = a.persist.then(|| format!("exec {}", a.command.join(" ")));
        let c = Call::Exec { command: wire_command(a), tty: a.tty, stdin, persist: a.persist, snapshot };
        let Reply::Exec { result, snapshot } = call_with_input(conn, c, stdin).await? else {
            bail!("the keeper's reply to an exec was not an exec result");
        };
        if let Some(s) = snapshot.filter(|_| !json) {
            eprintln!("snapshot {} ({} B)", s.id, s.size);
        }
        if json {
            print_json(&result)?;
        }
        return Ok(ExitCode::from(u8::try_from(result.exit_code).unwrap_or(255)));
    }
    let res = with_vessel(mgr, &a.id, async |v| {
        let stdin: Option<Box<dyn AsyncRead + Send + Unpin>> =
            (a.tty || a.interactive).then(|| Box::new(tokio::io::stdin()) as _);
        let res = v
            .exec(ExecOptions {
                command: a.command.clone(),
                work_dir: a.work_dir.clone(),
                env: a.env.clone(),
                stdin,
                stdout: Some(Box::new(tokio::io::stdout())),
                stderr: Some(Box::new(tokio::io::stderr())),
                tty: a.tty,
                persist_result: a.persist,
                timeout: a.timeout,
                ..Default::default()
            })
            .await?;
        if a.persist {
            commit(v, format!("exec {}", a.command.join(" ")), json).await?;
        }
        Ok(res)
    })
    .await?;
    if json {
        print_json(&ExecView::of(&res, started.elapsed()))?;
    }
    Ok(ExitCode::from(u8::try_from(res.exit_code).unwrap_or(255)))
}

pub(crate) async fn read(mgr: &Manager, id: &str, path: &str) -> Result<()> {
    if let Some(conn) = keeper(mgr, id).await? {
        return match call(conn, Call::Read { path: path.to_owned() }).await? {
            Reply::Done => Ok(()),
            r => Err(unexpected(r)),
        };
    }
    let data = with_vessel(mgr, id, async |v| Ok(v.read_file(path)?)).await?;
    std::io::stdout().write_all(&data)?;
    Ok(())
}

pub(crate) async fn write(mgr: &Manager, id: &str, path: &str, mode: &str, json: bool) -> Result<()> {
    let mode = u32::from_str_radix(mode, 8).with_context(|| format!("--mode {mode:?} is not octal"))?;
    if std::io::stdin().is_terminal() {
        bail!("write reads the file's content from stdin: pipe or redirect it");
    }
    let mut data = Vec::new();
    std::io::stdin().read_to_end(&mut data)?;
    let snap = if let Some(conn) = keeper(mgr, id).await? {
        let c = Call::Write { path: path.to_owned(), mode, snapshot: format!("write {path}") };
        let Reply::Snapshot { snapshot } = call_with_data(conn, c, &data).await? else {
            bail!("the keeper's reply to a write was not a snapshot");
        };
        if !json {
            eprintln!("snapshot {} ({} B)", snapshot.id, snapshot.size);
        }
        *snapshot
    } else {
        with_vessel(mgr, id, async |v| {
            v.write_file(path, &data, mode)?;
            commit(v, format!("write {path}"), json).await
        })
        .await?
    };
    if json {
        print_json(&SnapshotView::of(&snap))?;
    }
    Ok(())
}

pub(crate) async fn snapshot(mgr: &Manager, id: &str, message: &str, json: bool) -> Result<()> {
    let snap = match keeper(mgr, id).await? {
        Some(conn) => match call(conn, Call::Snapshot { message: message.to_owned() }).await? {
            Reply::Snapshot { snapshot } => *snapshot,
            r => return Err(unexpected(r)),
        },
        None => with_vessel(mgr, id, async |v| commit(v, message.to_owned(), true).await).await?,
    };
    if json {
        return print_json(&SnapshotView::of(&snap));
    }
    println!("{}", snap.id);
    Ok(())
}

pub(crate) async fn snapshots(mgr: &Manager, id: &str, json: bool) -> Result<()> {
    let m = match keeper(mgr, id).await? {
        Some(conn) => match call(conn, Call::Manifest).await? {
            Reply::Manifest { manifest } => *manifest,
            r => return Err(unexpected(r)),
        },
        None => with_vessel(mgr, id, async |v| Ok(v.manifest())).await?,
    };
    if json {
        return print_json(&SnapshotView::tree(&m));
    }
    print_tree(&m);
    Ok(())
}

pub(crate) async fn restore(mgr: &Manager, id: &str, snapshot: &str, json: bool) -> Result<()> {
    let snapshot = SnapshotId::new(snapshot)?;
    let stopped = match keeper(mgr, id).await? {
        Some(conn) => match call(conn, Call::Restore { snapshot: snapshot.to_string() }).await? {
            Reply::Restored { stopped } => stopped,
            r => return Err(unexpected(r)),
        },
        None => {
            with_vessel(mgr, id, async |v| {
                let pb = spinner(format!("restoring {snapshot}"));
                let restored = v.restore_snapshot(&snapshot).await;
                pb.finish_and_clear();
                Ok(restored?)
            })
            .await?
        }
    };
    if stopped > 0 && !json {
        eprintln!("restore stopped {stopped} background process(es)");
    }
    if json {
        print_json(
            &serde_json::json!({ "vessel_id": id, "current_snapshot_id": snapshot, "stopped_processes": stopped }),
        )?;
    }
    Ok(())
}

pub(crate) async fn rm(mgr: &Manager, id: &str, snapshot: Option<&str>, force: bool) -> Result<()> {
    if let Some(snapshot) = snapshot {
        let snapshot = SnapshotId::new(snapshot)?;
        if let Some(conn) = keeper(mgr, id).await? {
            return match call(conn, Call::DeleteSnapshot { snapshot: snapshot.to_string() }).await? {
                Reply::Done => Ok(()),
                r => Err(unexpected(r)),
            };
        }
        return with_vessel(mgr, id, async |v| Ok(v.delete_snapshot(&snapshot).await?)).await;
    }
    match mgr.delete_vessel(id).await {
        Err(vessel::VesselError::Locked(vid)) if force => {
            crate::force::stop_holders(mgr, &vid).await?;
            Ok(mgr.delete_vessel(vid.as_str()).await?)
        }
        r => Ok(r?),
    }
}

pub(crate) fn setup_quota(root: &Path, a: &crate::args::SetupQuotaArgs, json: bool) -> Result<()> {
    if a.remove {
        vessel::remove_quota_setup(root, a.image.as_deref(), a.delete_image)?;
        if !json {
            println!("disk quotas at {} removed", root.display());
        }
        return Ok(());
    }
    let mut setup = vessel::QuotaSetup::new().size(a.size);
    if let Some(image) = &a.image {
        setup = setup.image(image);
    }
    let report = vessel::setup_quota(root, &setup)?;
    if json {
        return print_json(&serde_json::json!({
            "mount_root": report.mount_root, "image": report.image,
            "outcome": format!("{:?}", report.outcome).to_lowercase(), "fstab": report.fstab_line(),
        }));
    }
    let what = match report.outcome {
        vessel::QuotaSetupOutcome::AlreadyEnforced => "already enforces disk quotas: nothing changed",
        vessel::QuotaSetupOutcome::Remounted => "enforces disk quotas again (its image was mounted)",
        _ => "now enforces disk quotas (a sparse btrfs image is mounted on it)",
    };
    println!("{} {what}", report.mount_root.display());
    if let Some(line) = report.fstab_line() {
        println!("to keep it across reboots, add to /etc/fstab:\n  {line}");
    }
    Ok(())
}

fn print_tree(m: &VesselManifest) {
    for (depth, s) in m.tree() {
        let current = if m.current_snapshot_id.as_ref() == Some(&s.id) { "  <- current" } else { "" };
        println!(
            "{}{} {} {:?} ({} B){current}",
            "  ".repeat(depth),
            s.id,
            s.create_time.format("%Y-%m-%d %H:%M:%S"),
            s.message,
            s.size
        );
    }
}
