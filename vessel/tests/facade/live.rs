//! Live vessels: processes that outlive an exec (a server reached by later
//! execs, across a snapshot), output kept by offset and followed, ends that
//! say why, timeouts and cancellation that kill only their own tree,
//! snapshots of a vessel whose processes keep writing, and what code in the
//! vessel can do to the sandbox's init.

use vessel::{OutputStream, ProcessStatus, StopReason};

use super::*;
use crate::common::run_full;

fn bg(script: &str) -> ExecOptions<'static> {
    ExecOptions { command: sh(script), persist_result: true, ..Default::default() }
}

/// Waits until `cond` holds (polling), or fails saying `what`.
async fn until<F: Future<Output = Result<bool>>>(what: &str, mut cond: impl FnMut() -> F) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond().await? {
        ensure!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// A busybox httpd started in the background serves ten later execs, a
/// snapshot (which freezes it a moment) and a second handle; closing the
/// vessel stops it and says so.
pub(super) async fn a_server_outlives_its_exec(w: Arc<World>) -> Result<()> {
    let mgr = w.manager("live-server").await?;
    let v = mgr.create_vessel(IMAGE, "/work").await?;
    ensure!(run(&v, "mkdir /www", true).await?.0 == 0);
    v.write_file("/www/index.html", b"hello from the server\n", 0o644)?;
    let server = v.spawn(bg("exec httpd -f -p 127.0.0.1:8080 -h /www")).await?;
    let fetch = "wget -q -O- http://127.0.0.1:8080/";
    until("the server answers", || async { Ok(run(&v, fetch, true).await?.0 == 0) }).await?;
    for i in 0..10 {
        let (code, out, err) = run(&v, fetch, true).await?;
        ensure!(code == 0 && out == "hello from the server\n", "fetch {i}: {code} {out:?} {err}");
    }
    let snap = v.create_snapshot("while serving").await?;
    let window: u64 = snap.labels.get("vessel.freeze-us").context("the freeze window label")?.parse()?;
    ensure!(window > 0, "a zero freeze window");
    ensure!(run(&v, fetch, true).await?.1 == "hello from the server\n", "the server runs on after a snapshot");
    ensure!(server.info().status == ProcessStatus::Running);
    let listed = v.processes();
    ensure!(listed.len() == 1 && listed[0].id == server.id() && listed[0].command[2].contains("httpd"), "{listed:?}");
    // Another handle finds it by id; an unknown id is a typed NotFound.
    let again = v.process(server.id())?;
    ensure!(again.info().pid == server.info().pid);
    match v.process(9999) {
        Err(e) if e.kind() == VesselErrorKind::NotFound => {}
        other => return Err(anyhow!("an unknown process: {other:?}")),
    }
    v.close().await?;
    let end = server.wait().await;
    ensure!(end == ProcessStatus::Stopped { reason: StopReason::VesselClosed }, "{end:?}");
    ensure!(end.exit_code() == Some(137));
    mgr.close().await?;
    Ok(())
}

/// Output is read by offset (stdout and stderr apart), followed while it
/// comes, re-read from a second handle, and bounded: a flood keeps the last
/// `OUTPUT_RING` bytes and counts what it dropped.
pub(super) async fn background_output_by_offset(w: Arc<World>) -> Result<()> {
    let mgr = w.manager("live-output").await?;
    let v = mgr.create_vessel(IMAGE, "/work").await?;
    let p = v
        .spawn(bg("i=0; while [ $i -lt 300 ]; do echo line $i; i=$((i+1)); done; echo oops >&2; \
                   read answer; echo got $answer"))
        .await?;
    // Follow stdout until all 300 lines are in.
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("line 299\n") {
        let got = p.follow(OutputStream::Stdout, seen.len() as u64, 1000).await;
        ensure!(got.offset == seen.len() as u64 && !got.data.is_empty(), "{got:?}");
        seen.extend(got.data);
    }
    let text = String::from_utf8(seen.clone())?;
    ensure!(text.starts_with("line 0\nline 1\n") && text.lines().count() == 300, "{text}");
    let again = v.process(p.id())?;
    let mid = again.read(OutputStream::Stdout, 7, 7);
    ensure!(mid.data == b"line 1\n" && mid.next == 14 && mid.dropped == 0, "{mid:?}");
    until("stderr has its line", || async { Ok(p.read(OutputStream::Stderr, 0, 100).data == b"oops\n") }).await?;
    // Its stdin is open: the answer reaches it.
    p.write_stdin(b"forty-two\n").await?;
    ensure!(p.wait().await == ProcessStatus::Exited { code: 0 });
    let tail = p.read(OutputStream::Stdout, seen.len() as u64, 100);
    ensure!(tail.data == b"got forty-two\n", "{tail:?}");
    ensure!(p.write_stdin(b"late").await.is_err(), "stdin of an ended process");

    // A process that writes as fast as it can: the host keeps the ring,
    // not the stream (this process's RSS grows by far less than it wrote).
    let rss = || procfs::process::Process::myself().and_then(|p| p.status()).ok().and_then(|s| s.vmrss).unwrap_or(0);
    let before = rss();
    let torrent = v.spawn(bg("head -c 300000000 /dev/zero")).await?;
    ensure!(torrent.wait().await == ProcessStatus::Exited { code: 0 });
    ensure!(torrent.info().output_bytes.0 == 300_000_000);
    let grown_kib = rss().saturating_sub(before);
    ensure!(grown_kib < 64 << 10, "300 MB of output grew the host's RSS by {grown_kib} KiB");
    let flood = v.spawn(bg("head -c 3000000 /dev/zero; echo end")).await?;
    ensure!(flood.wait().await == ProcessStatus::Exited { code: 0 });
    let (out, _) = flood.info().output_bytes;
    ensure!(out == 3_000_004, "{out} bytes of output");
    let got = flood.read(OutputStream::Stdout, 0, usize::MAX);
    ensure!(
        got.dropped == out - vessel::OUTPUT_RING as u64 && got.offset == got.dropped,
        "{:?}",
        (got.offset, got.dropped)
    );
    ensure!(got.data.len() == vessel::OUTPUT_RING && got.data.ends_with(b"\0end\n"));
    mgr.close().await?;
    Ok(())
}

/// Each end says why: exit code, signal, timeout, OOM, restore; a timeout
/// or a cancelled exec kills its own tree and never a background process.
pub(super) async fn process_ends_say_why(w: Arc<World>) -> Result<()> {
    let mgr = w.manager("live-ends").await?;
    let opts = VesselOptions::new().memory_bytes(64 << 20);
    let v = mgr.create_vessel_with(IMAGE, "/work", &opts).await?;
    let first = v.create_snapshot("start").await?;
    let server = v.spawn(bg("exec sleep 1001")).await?;

    let exited = v.spawn(bg("exit 3")).await?;
    ensure!(exited.wait().await == ProcessStatus::Exited { code: 3 });
    let signalled = v.spawn(bg("exec sleep 1002")).await?;
    signalled.signal(15).await?;
    ensure!(signalled.wait().await == ProcessStatus::Signalled { signal: 15 });
    ensure!(signalled.signal(0).await.is_err(), "signal 0 is refused");
    let timed = v.spawn(ExecOptions { timeout: Some(Duration::from_millis(300)), ..bg("exec sleep 1003") }).await?;
    ensure!(timed.wait().await == ProcessStatus::TimedOut);
    if !mgr.unavailable_limits().iter().any(|u| u.limit == vessel::Limit::Memory) {
        let hog = v.spawn(bg("tail /dev/zero")).await?;
        let end = hog.wait().await;
        ensure!(end == ProcessStatus::OomKilled, "a memory hog ended {end:?}");
    }

    // A foreground timeout kills its whole tree, not the server.
    let (res, ..) =
        run_full(&v, "sleep 1004 & exec sleep 1005", true, Some(Duration::from_millis(400)), Limits::default()).await?;
    ensure!(res.timed_out && res.exit_code == 137, "{res:?}");
    until("the timed-out tree is gone", || async {
        Ok(support::processes_with_arg("1004").is_empty() && support::processes_with_arg("1005").is_empty())
    })
    .await?;
    // So does a cancelled one.
    let cancelled =
        tokio::time::timeout(Duration::from_millis(400), run(&v, "sleep 1006 & exec sleep 1007", true)).await;
    ensure!(cancelled.is_err(), "the exec ended by itself");
    until("the cancelled tree is gone", || async {
        Ok(support::processes_with_arg("1006").is_empty() && support::processes_with_arg("1007").is_empty())
    })
    .await?;
    ensure!(server.info().status == ProcessStatus::Running, "the server was killed with a foreground command");
    ensure!(support::processes_with_arg("1001").len() == 1);

    // A daemon that double-forks away from its group is still stopped at restore.
    let launcher = v.spawn(bg("setsid sh -c 'sleep 1008 &'; exit 0")).await?;
    ensure!(launcher.wait().await == ProcessStatus::Exited { code: 0 });
    until("the daemon runs", || async { Ok(support::processes_with_arg("1008").len() == 1) }).await?;
    let stopped = v.restore_snapshot(&first.id).await?;
    ensure!(stopped == 1, "restore stopped {stopped} processes (the server)");
    ensure!(server.wait().await == ProcessStatus::Stopped { reason: StopReason::Restored });
    ensure!(support::processes_with_arg("1001").is_empty() && support::processes_with_arg("1008").is_empty());
    // And the vessel runs commands again.
    ensure!(run(&v, "echo again", true).await?.1 == "again\n");
    mgr.close().await?;
    Ok(())
}

/// Snapshots of a vessel whose process keeps appending to two files (a
/// then b, each step): every snapshot opens on a new host as a consistent
/// point (b never ahead of a, both whole lines), and what a live snapshot
/// held and was deleted since stays deleted.
pub(super) async fn snapshots_of_a_busy_vessel_are_consistent(w: Arc<World>) -> Result<()> {
    let mgr = w.manager("live-snap").await?;
    let v = mgr.create_vessel(IMAGE, "/work").await?;
    let writer = v.spawn(bg("i=0; while true; do echo $i >> a; echo $i >> b; i=$((i+1)); done")).await?;
    v.write_file("temp", b"made while live", 0o644)?;
    let mut snaps = Vec::new();
    for k in 0..4 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        if k == 2 {
            v.delete_file("temp")?;
        }
        snaps.push(v.create_snapshot(&format!("busy {k}")).await?);
    }
    ensure!(writer.info().status == ProcessStatus::Running, "the writer runs through the snapshots");
    let id = v.id().to_string();
    v.close().await?;
    let host_b = w.manager("live-snap-b").await?;
    let vb = host_b.open_vessel(&id).await?;
    for (k, s) in snaps.iter().enumerate() {
        vb.restore_snapshot(&s.id).await?;
        let (a, b) = (String::from_utf8(vb.read_file("a")?)?, String::from_utf8(vb.read_file("b")?)?);
        let lines = |t: &str| -> Result<Vec<u64>> { Ok(t.lines().map(str::parse).collect::<Result<_, _>>()?) };
        let (la, lb) = (lines(&a)?, lines(&b)?);
        ensure!(a.ends_with('\n') && (b.is_empty() || b.ends_with('\n')), "snapshot {k}: a torn line");
        ensure!(la.iter().copied().eq(0..la.len() as u64) && lb.iter().copied().eq(0..lb.len() as u64));
        ensure!(lb.len() <= la.len() && la.len() <= lb.len() + 1, "snapshot {k}: a {} lines, b {}", la.len(), lb.len());
        ensure!(vb.stat("temp").is_ok() == (k < 2), "snapshot {k}: temp present {}", vb.stat("temp").is_ok());
    }
    host_b.close().await?;
    mgr.close().await?;
    Ok(())
}

/// What code in a vessel can do to the sandbox: its init (the agent)
/// ignores signals from inside and cannot be traced; another command's
/// process may be killed (they share the vessel), and every end is still
/// reported; the host closes the vessel clean.
pub(super) async fn code_inside_cannot_take_the_sandbox_down(w: Arc<World>) -> Result<()> {
    let mgr = w.manager("live-attack").await?;
    let v = mgr.create_vessel(IMAGE, "/work").await?;
    let victim = v.spawn(bg("exec sleep 1009")).await?;
    // Signals to a namespace's init without a handler are dropped by the
    // kernel; the agent is not dumpable, so its fds (the control channel),
    // memory, root and environment are closed to code without
    // CAP_SYS_PTRACE (listing its fd numbers is all /proc allows).
    let script = "kill -9 1; kill -STOP 1; kill -TERM 1; \
                  for f in /proc/1/fd/0 /proc/1/fd/1 /proc/1/environ /proc/1/maps /proc/1/mem; do \
                  head -c 1 $f >/dev/null 2>&1 && echo read $f; done; \
                  echo frame > /proc/1/fd/0 2>/dev/null && echo wrote fd 0; \
                  readlink /proc/1/fd/0 >/dev/null 2>&1 && echo resolved fd 0; \
                  ls /proc/1/root/ >/dev/null 2>&1 && echo entered its root; echo done";
    let (code, out, err) = run(&v, script, true).await?;
    ensure!(code == 0 && out == "done\n", "{code} {out:?} {err}");
    ensure!(run(&v, "echo still here", true).await?.1 == "still here\n", "the sandbox went down");
    let (code, ..) = run(&v, &format!("kill -9 {}", victim.info().pid), true).await?;
    ensure!(code == 0);
    ensure!(victim.wait().await == ProcessStatus::Signalled { signal: 9 });
    v.close().await?;
    ensure!(support::processes_with_arg("1009").is_empty());
    mgr.close().await?;
    Ok(())
}

/// Pause freezes every process (a counter stops), resume lets them go on;
/// a snapshot keeps a paused vessel paused, and an exec into it resumes it.
pub(super) async fn pause_and_resume(w: Arc<World>) -> Result<()> {
    let mgr = w.manager("live-pause").await?;
    let v = mgr.create_vessel(IMAGE, "/work").await?;
    v.pause().await?;
    ensure!(!v.is_paused(), "a vessel with no sandbox has nothing to pause");
    let counter = v.spawn(bg("i=0; while true; do i=$((i+1)); echo $i > n.tmp; mv n.tmp n; done")).await?;
    let read = |v: &vessel::Vessel| -> Result<u64> { Ok(String::from_utf8(v.read_file("n")?)?.trim().parse()?) };
    until("the counter counts", || async { Ok(v.read_file("n").is_ok()) }).await?;
    v.pause().await?;
    ensure!(v.is_paused());
    let at = read(&v)?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    ensure!(read(&v)? == at, "the counter moved while paused");
    let snap = v.create_snapshot("paused").await?;
    ensure!(v.is_paused(), "a snapshot resumed the vessel");
    ensure!(snap.labels.contains_key("vessel.freeze-us"));
    tokio::time::sleep(Duration::from_millis(200)).await;
    ensure!(read(&v)? == at, "the counter moved after a snapshot of a paused vessel");
    v.resume().await?;
    until("the counter counts again", || async { Ok(read(&v)? > at) }).await?;
    v.pause().await?;
    let (code, out, _) = run(&v, "echo joined", true).await?;
    ensure!(code == 0 && out == "joined\n" && !v.is_paused(), "an exec resumes a paused vessel");
    let again = read(&v)?;
    until("the counter counts after the exec", || async { Ok(read(&v)? > again) }).await?;
    ensure!(counter.info().status == ProcessStatus::Running);
    mgr.close().await?;
    Ok(())
}

/// The state letter of host process `pid` (`T`: stopped, as a frozen one is).
fn state_of(pid: i32) -> Result<char> {
    Ok(procfs::process::Process::new(pid)?.stat()?.state)
}

/// With `ManagerConfig::idle_pause`, a vessel whose processes print
/// nothing and that runs no command pauses itself; the next exec, signal
/// or input resumes it first, and output keeps it awake.
pub(super) async fn idle_vessels_pause_themselves(w: Arc<World>) -> Result<()> {
    let mgr = Manager::new(w.config("idle").idle_pause(Duration::from_millis(300))).await?;
    let v = mgr.create_vessel(IMAGE, "/work").await?;
    let sleeper = v.spawn(bg("exec sleep 1011")).await?;
    until("the sleeper runs", || async { Ok(support::processes_with_arg("1011").len() == 1) }).await?;
    let pid = support::processes_with_arg("1011")[0];
    until("the idle vessel pauses", || async { Ok(v.is_paused()) }).await?;
    ensure!(state_of(pid)? == 'T', "its processes are frozen");
    // The next command runs at once, with the vessel resumed.
    ensure!(run(&v, "echo awake", true).await?.1 == "awake\n");
    ensure!(state_of(pid)? != 'T', "the vessel was resumed");
    // Output keeps it awake.
    let chatty = v.spawn(bg("while true; do echo tick; sleep 0.05; done")).await?;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    ensure!(!v.is_paused(), "a vessel whose process prints was paused");
    chatty.signal(9).await?;
    ensure!(chatty.wait().await == ProcessStatus::Signalled { signal: 9 });
    until("it pauses again", || async { Ok(v.is_paused()) }).await?;
    // A signal resumes it, so the process can act on it.
    sleeper.signal(15).await?;
    let end = tokio::time::timeout(Duration::from_secs(10), sleeper.wait()).await?;
    ensure!(end == ProcessStatus::Signalled { signal: 15 }, "{end:?}");
    mgr.close().await?;
    Ok(())
}

/// Marks the test binary's run as the child of `a_killed_holder_leaves_nothing`.
pub(super) const LIVE_CHILD: &str = "VESSEL_TEST_LIVE_CHILD";

/// The child: opens the vessel, starts a background process, says so, and
/// waits to be killed.
pub(super) fn live_child() -> ! {
    let (w, id) = World::from_child_env();
    TOKIO.block_on(async {
        let mgr = w.manager("live-crash").await.unwrap();
        let v = mgr.open_vessel(&id).await.unwrap();
        v.spawn(bg("exec sleep 1010")).await.unwrap();
        println!("spawned");
        std::future::pending::<()>().await;
    });
    std::process::exit(0)
}

/// `kill -9` of the process holding a live vessel: its sandbox and
/// background process go with it (the run's lifeline, or containerd's
/// watchdog), and the next manager opens the vessel with nothing left over.
pub(super) async fn a_killed_holder_leaves_nothing(w: Arc<World>) -> Result<()> {
    let mgr = w.manager("live-crash").await?;
    let v = mgr.create_vessel(IMAGE, "/work").await?;
    let id = v.id().to_string();
    v.close().await?;
    mgr.close().await?;
    drop(mgr);
    let mut child = w.child_command(LIVE_CHILD, &id)?.spawn()?;
    let mut stdout = child.stdout.take().context("child stdout")?;
    let mut seen = Vec::new();
    let mut buf = [0u8; 64];
    while !String::from_utf8_lossy(&seen).contains("spawned") {
        let n = tokio::time::timeout(Duration::from_secs(60), stdout.read(&mut buf)).await??;
        ensure!(n > 0, "the child ended early: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    // `spawn` returns once the shell is forked; `sleep` is exec'd a moment later.
    until("the background process runs", || async { Ok(support::processes_with_arg("1010").len() == 1) }).await?;
    child.start_kill()?;
    child.wait().await?;
    until("the killed holder's sandbox is gone", || async { Ok(support::processes_with_arg("1010").is_empty()) })
        .await?;
    let mgr = w.manager("live-crash").await?;
    let v = mgr.open_vessel(&id).await?;
    ensure!(run(&v, "echo reopened", true).await?.1 == "reopened\n");
    mgr.close().await?;
    Ok(())
}
