//! The facade end to end on real mounts and containers, for every backend
//! compiled in: youki always (default feature), containerd when
//! `VESSEL_CONTAINERD_ADDRESS` names a daemon (`cargo xtask test` starts
//! one). The Go original's test semantics, ported, one module per topic:
//! files (and path security), exec, snapshots (chains, branches, refusals,
//! a crash in the middle of one), hosts (reopen elsewhere, locking, names,
//! modes, bad input), limits and quotas, images (archives, containerd's
//! store, registries), live vessels (background processes, snapshots
//! while they run). After all cases, nothing is left mounted, no
//! cgroup, no container.

#[path = "../common/mod.rs"]
mod common;
mod exec;
mod files;
mod forks;
mod hosts;
mod images;
mod limits;
mod live;
mod snapshots;

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, ensure};
use common::{IMAGE, World, run, run_with, sh};
use exec::*;
use files::*;
use forks::*;
use hosts::*;
use images::*;
use libtest_mimic::Arguments;
use limits::*;
use live::*;
use snapshots::*;
use tokio::io::AsyncReadExt;
use vessel::{Backend, ExecOptions, Limits, Manager, OpenFlags, SnapshotId, VesselErrorKind, VesselOptions};
use vessel_test_support as support;

static TOKIO: LazyLock<tokio::runtime::Runtime> =
    LazyLock::new(|| tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap());

const CRASH_CHILD: &str = "VESSEL_TEST_SNAPSHOT_CRASH";

fn main() {
    vessel::init();
    if std::env::var_os(CRASH_CHILD).is_some() {
        crash_child();
    }
    if std::env::var_os(LIVE_CHILD).is_some() {
        live_child();
    }
    let args = Arguments::from_args();
    let Some(image_dir) = support::root_with_test_image("facade") else { return };
    let tmp = tempfile::tempdir().unwrap();
    let worlds = common::worlds("facade", tmp.path(), true);
    common::seed_images(&TOKIO, &worlds, &image_dir, false);
    let cases = support::cases![
        caller_sketch,
        file_operations,
        directory_operations,
        open_file_handles,
        path_security,
        snapshot_operations,
        snapshot_chains_and_branches,
        exec_semantics,
        exec_cancellation,
        exec_timeout,
        reopen_on_a_new_host,
        concurrency_and_locking,
        bad_input,
        corrupt_snapshot_is_refused,
        crash_in_the_middle_of_a_snapshot,
        image_from_the_containerd_store,
        deep_chains_are_flattened,
        runaway_commands_are_contained,
        cpu_quota_is_enforced,
        exec_limits_narrow_the_vessels,
        bad_limits_are_refused,
        disk_quota_bounds_what_a_vessel_writes,
        quota_modes_on_a_filesystem_without_quotas,
        vessels_have_unique_names,
        rootless_mode_follows_the_process,
        a_hundred_vessels_keep_the_host_responsive,
        images_pull_from_a_registry,
        registry_failures_are_typed_and_store_nothing,
        create_from_a_cached_image_reads_no_archive,
        a_server_outlives_its_exec,
        background_output_by_offset,
        process_ends_say_why,
        snapshots_of_a_busy_vessel_are_consistent,
        code_inside_cannot_take_the_sandbox_down,
        pause_and_resume,
        idle_vessels_pause_themselves,
        a_killed_holder_leaves_nothing,
        forks_share_and_diverge,
        deleting_a_source_never_breaks_a_fork,
        a_deletion_racing_forks_loses_no_fork,
        live_forks_are_points_in_time,
        changes_match_a_walk,
        layer_bombs_are_refused,
    ];
    let rule = support::suite::Rootless {
        rootful_only: &[
            "image_from_the_containerd_store",
            "disk_quota_bounds_what_a_vessel_writes",
            "quota_modes_on_a_filesystem_without_quotas",
            "a_hundred_vessels_keep_the_host_responsive",
            "images_pull_from_a_registry",
            "registry_failures_are_typed_and_store_nothing",
        ],
        cgroup_limits: &["runaway_commands_are_contained", "cpu_quota_is_enforced", "exec_limits_narrow_the_vessels"],
    };
    let (rootless, delegated) = (common::rootless(), common::delegated());
    let trials =
        support::suite::trials(&TOKIO, &common::labelled(&worlds), &cases, |n| rule.runs(n, rootless, delegated));
    let conclusion = libtest_mimic::run(&args, trials);
    let leaks = common::leaks(tmp.path(), &worlds);
    support::finish(&tmp.keep(), &leaks, conclusion)
}

async fn caller_sketch(w: Arc<World>) -> Result<()> {
    let mgr = w.manager("sketch").await?;
    let v = mgr.create_vessel(IMAGE, "/work").await?;
    v.write_file("hello.txt", b"hi\n", 0o644)?;
    let mut out = Vec::new();
    let res = v
        .exec(ExecOptions {
            command: sh("cat hello.txt; echo x > y"),
            stdout: Some(Box::new(&mut out)),
            persist_result: true,
            ..Default::default()
        })
        .await?;
    ensure!(res.exit_code == 0 && out == b"hi\n", "exit {} out {:?}", res.exit_code, out);
    let snap = v.create_snapshot("after y").await?;
    ensure!(snap.checksum.starts_with("sha256:") && snap.size > 0 && snap.parent_id.is_none());
    v.delete_file("y")?;
    ensure!(v.stat("y").is_err());
    v.restore_snapshot(&snap.id).await?;
    ensure!(v.stat("y").is_ok());
    let id = v.id().to_string();
    v.close().await?;
    let v = mgr.open_vessel(&id).await?;
    ensure!(v.read_file("/work/y")? == b"x\n");
    let m = v.manifest();
    ensure!(m.current_snapshot_id == Some(snap.id.clone()) && m.work_dir == "/work");
    ensure!(m.base_image_ref.as_str() == IMAGE && m.labels.contains_key("vessel.image.config-digest"));
    mgr.delete_vessel(&id).await?;
    ensure!(v.read_file("/work/y").is_err(), "a deleted vessel's handle is closed");
    match mgr.open_vessel(&id).await {
        Err(e) if e.kind() == VesselErrorKind::NotFound => {}
        other => return Err(anyhow!("open after delete: {other:?}")),
    }
    mgr.close().await?;
    Ok(())
}
