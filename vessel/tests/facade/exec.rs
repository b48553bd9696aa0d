//! Commands: exit codes, output, stdin, users, environment, and how
//! cancellation and timeouts end a whole process tree.

use super::*;

pub(super) async fn exec_semantics(w: Arc<World>) -> Result<()> {
    let mgr = w.manager("exec").await?;
    let v = mgr.create_vessel(IMAGE, "/work").await?;
    let (code, out, err) = run(&v, "echo out; echo err >&2; pwd; exit 3", false).await?;
    ensure!(code == 3 && out == "out\n/work\n" && err == "err\n", "{code} {out:?} {err:?}");
    let mut out = Vec::new();
    let res = v
        .exec(ExecOptions {
            command: sh("echo $FOO; echo $PATH; pwd"),
            env: vec!["FOO=bar".into()],
            work_dir: Some("/tmp".into()),
            stdout: Some(Box::new(&mut out)),
            ..Default::default()
        })
        .await?;
    let out = String::from_utf8(out)?;
    ensure!(
        res.exit_code == 0 && out.starts_with("bar\n") && out.contains("/bin") && out.ends_with("/tmp\n"),
        "{out:?}"
    );
    // A missing program is NotFound (a shell's 127), a file that is not
    // one InvalidInput (126).
    for (argv, kind) in [("no-such-program", VesselErrorKind::NotFound), ("/etc/passwd", VesselErrorKind::InvalidInput)]
    {
        match v.exec(ExecOptions { command: vec![argv.into()], ..Default::default() }).await {
            Err(e) if e.kind() == kind => {}
            other => return Err(anyhow!("exec {argv}: {other:?}")),
        }
    }
    // persist_result false (the default) discards, true keeps.
    let (code, ..) = run(&v, "echo gone > t; rm -rf /bin/ls", false).await?;
    ensure!(code == 0 && v.stat("t").is_err() && v.stat("/bin/ls").is_ok(), "a throwaway exec left changes");
    let (code, ..) = run(&v, "echo kept > t", true).await?;
    ensure!(code == 0 && v.read_file("t")? == b"kept\n");
    // A throwaway exec sees the current state.
    let (_, out, _) = run(&v, "cat t", false).await?;
    ensure!(out == "kept\n");
    // stdin and TTY.
    let mut out = Vec::new();
    let res = v
        .exec(ExecOptions {
            command: sh("read x; echo got $x; test -t 1 && echo tty"),
            stdin: Some(Box::new(std::io::Cursor::new(b"input\n".to_vec()))),
            stdout: Some(Box::new(&mut out)),
            tty: true,
            ..Default::default()
        })
        .await?;
    let out = String::from_utf8_lossy(&out);
    ensure!(res.exit_code == 0 && out.contains("got input") && out.contains("tty"), "{} {out:?}", res.exit_code);
    match v.exec(ExecOptions::default()).await {
        Err(e) if e.kind() == VesselErrorKind::InvalidInput => {}
        other => return Err(anyhow!("empty command: {other:?}")),
    }
    mgr.close().await?;
    Ok(())
}

pub(super) async fn exec_cancellation(w: Arc<World>) -> Result<()> {
    let mgr = w.manager("cancel").await?;
    let v = mgr.create_vessel(IMAGE, "/work").await?;
    for persist in [true, false] {
        let exec = run(&v, "sleep 1003", persist);
        ensure!(tokio::time::timeout(Duration::from_millis(1500), exec).await.is_err());
        let deadline = Instant::now() + Duration::from_secs(10);
        while sleepers() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        ensure!(sleepers() == 0, "the cancelled command still runs");
    }
    let (code, out, _) = run(&v, "echo still works", false).await?;
    ensure!(code == 0 && out == "still works\n");
    v.create_snapshot("after cancel").await?;
    mgr.close().await?;
    Ok(())
}

/// `ExecOptions::timeout`: the whole tree is killed, the result says so
/// (exit 137), nothing is left; a zero timeout is refused before anything runs.
pub(super) async fn exec_timeout(w: Arc<World>) -> Result<()> {
    let mgr = w.manager("timeout").await?;
    let v = mgr.create_vessel(IMAGE, "/work").await?;
    // A command line of its own per backend (the worlds run side by side).
    let secs = if w.backend == Backend::Youki { "1011" } else { "1012" };
    let cmdline = format!("sleep\0{secs}\0");
    let left = || {
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter(|e| std::fs::read(e.path().join("cmdline")).unwrap_or_default() == cmdline.as_bytes())
            .count()
    };
    for persist in [true, false] {
        let started = Instant::now();
        let res = v
            .exec(ExecOptions {
                command: sh(&format!("sleep {secs} & sleep {secs}")),
                persist_result: persist,
                timeout: Some(Duration::from_secs(1)),
                ..Default::default()
            })
            .await?;
        let took = started.elapsed();
        ensure!(res.timed_out && res.exit_code == 137, "{res:?}");
        ensure!(took < Duration::from_secs(2), "a 1 s timeout returned after {took:?}");
        let deadline = Instant::now() + Duration::from_secs(5);
        while left() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        ensure!(left() == 0, "processes left after the timeout");
    }
    let quick = v
        .exec(ExecOptions { command: sh("true"), timeout: Some(Duration::from_secs(30)), ..Default::default() })
        .await?;
    ensure!(!quick.timed_out && quick.exit_code == 0, "{quick:?}");
    match v.exec(ExecOptions { command: sh("true"), timeout: Some(Duration::ZERO), ..Default::default() }).await {
        Err(e) if e.kind() == VesselErrorKind::InvalidInput => {}
        other => return Err(anyhow!("a zero timeout: {other:?}")),
    }
    v.create_snapshot("after a timeout").await?;
    mgr.close().await?;
    Ok(())
}

pub(super) fn sleepers() -> usize {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| std::fs::read(e.path().join("cmdline")).unwrap_or_default() == b"sleep\x001003\x00")
        .count()
}
