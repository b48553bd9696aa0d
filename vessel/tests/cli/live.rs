//! Background processes through the CLI: `exec -d` starts the vessel's
//! keeper, which later commands (each its own process) go through.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use vessel_test_support as support;

use super::Session;

/// Keeper processes of vessel `id` on this machine.
fn keepers(id: &str) -> Vec<i32> {
    support::processes_with_arg(id)
        .into_iter()
        .filter(|&p| {
            procfs::process::Process::new(p).and_then(|p| p.cmdline()).is_ok_and(|c| c.iter().any(|a| a == "keep"))
        })
        .collect()
}

/// Retries `f` for up to 10 s until it returns `Ok`.
fn eventually<T>(what: &str, mut f: impl FnMut() -> Result<T>) -> Result<T> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() > deadline => return Err(e.context(format!("{what}: still failing after 10 s"))),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Stops the vessel's keeper when a test ends, passed or not, so a failed
/// check leaves no keeper (or its sandbox) behind.
struct StopOnDrop<'a>(&'a Session, String);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        let _ = self.0.run(&["stop", &self.1], None);
    }
}

/// Waits until no keeper of `id` and no process with argument `arg` runs
/// (a keeper frees the vessel, then exits).
fn all_gone(id: &str, arg: &str) -> Result<()> {
    eventually("the keeper and its processes end", || {
        ensure!(keepers(id).is_empty(), "the keeper still runs");
        ensure!(support::processes_with_arg(arg).is_empty(), "a process with {arg} still runs");
        Ok(())
    })
}

fn ps(s: &Session, id: &str) -> Result<Vec<Value>> {
    Ok(serde_json::from_str(&s.ok(&["ps", "--json", id], None)?)?)
}

/// A server started with `exec -d` serves later commands; `ps`, `logs`
/// (all, and `-f` until the end), `kill`, `wait`, `pause`/`resume`,
/// snapshot and restore go through the keeper; `stop` ends it, and the
/// vessel works directly again with nothing left (no keeper, socket or
/// process).
pub(crate) fn background_processes(s: &Session, image: &Path) -> Result<()> {
    let image = image.to_str().context("utf-8 path")?;
    s.ok(&["image", "import", image, "local/busybox:latest"], None)?;
    let id = s.ok(&["create", "local/busybox:latest"], None)?.trim().to_owned();
    let _stop = StopOnDrop(s, id.clone());
    ensure!(ps(s, &id)?.is_empty(), "a new vessel runs nothing");
    s.ok(&["exec", "--persist", &id, "--", "sh", "-c", "mkdir /www && echo hello > /www/index.html"], None)?;

    let server = s.ok(&["exec", "-d", &id, "--", "httpd", "-f", "-p", "127.0.0.1:8080", "-h", "/www"], None)?;
    ensure!(server.trim() == "1", "exec -d printed {server:?}");
    ensure!(keepers(&id).len() == 1, "one keeper holds the vessel");
    let fetch = ["exec", "--persist", id.as_str(), "--", "wget", "-q", "-O-", "http://127.0.0.1:8080/"];
    eventually("the server answers", || {
        let out = s.ok(&fetch, None)?;
        ensure!(out == "hello\n", "{out:?}");
        Ok(())
    })?;
    for _ in 0..3 {
        ensure!(s.ok(&fetch, None)? == "hello\n");
    }
    let listed = ps(s, &id)?;
    ensure!(listed.len() == 1 && listed[0]["process_id"] == 1 && listed[0]["status"] == "running", "{listed:?}");
    ensure!(s.ok(&["ps", &id], None)?.contains("httpd -f -p 127.0.0.1:8080"));

    // Output, by stream, after the end.
    let chatty =
        s.ok(&["exec", "-d", &id, "--", "sh", "-c", "for i in 1 2 3; do echo out$i; echo err$i >&2; done"], None)?;
    let chatty = chatty.trim();
    ensure!(s.ok(&["wait", &id, chatty], None)?.trim() == "0");
    let logs = s.run(&["logs", &id, chatty], None)?;
    ensure!(logs.status.success() && logs.stdout == b"out1\nout2\nout3\n", "{logs:?}");
    ensure!(logs.stderr == b"err1\nerr2\nerr3\n", "{logs:?}");
    // Followed until it ends.
    let slow = s.ok(&["exec", "-d", &id, "--", "sh", "-c", "echo a; sleep 0.5; echo b; exit 4"], None)?;
    ensure!(s.ok(&["logs", "-f", &id, slow.trim()], None)? == "a\nb\n");
    let waited: Value = serde_json::from_str(&s.ok(&["wait", "--json", &id, slow.trim()], None)?)?;
    ensure!(waited["status"] == "exited" && waited["exit_code"] == 4, "{waited}");

    // Signals.
    let sleeper = s.ok(&["exec", "-d", &id, "--", "sleep", "1001"], None)?;
    let sleeper = sleeper.trim();
    s.ok(&["kill", &id, sleeper], None)?;
    ensure!(s.ok(&["wait", &id, sleeper], None)?.trim() == "143", "SIGTERM ends it: 128 + 15");
    let bad = s.run(&["kill", &id, sleeper, "NOSUCH"], None)?;
    ensure!(bad.status.code() == Some(2) && super::stderr(&bad).contains("unknown signal"), "{bad:?}");
    let missing = s.run(&["logs", &id, "99"], None)?;
    ensure!(missing.status.code() == Some(125) && super::stderr(&missing).contains("99"), "{missing:?}");

    // Pause and resume: the server keeps its state.
    s.ok(&["pause", &id], None)?;
    s.ok(&["resume", &id], None)?;
    ensure!(s.ok(&fetch, None)? == "hello\n");
    // Through the keeper too: docker's exit codes, files, snapshots.
    let nosuch = s.run(&["exec", "--persist", &id, "--", "nosuchcommand"], None)?;
    ensure!(nosuch.status.code() == Some(127), "{nosuch:?}");
    s.ok(&["write", &id, "/www/new.txt"], Some(b"written\n"))?;
    ensure!(s.ok(&["read", &id, "/www/new.txt"], None)? == "written\n");
    let served = s.ok(&["snapshot", "-m", "served", &id], None)?.trim().to_owned();
    let tree: Vec<Value> = serde_json::from_str(&s.ok(&["snapshots", "--json", &id], None)?)?;
    ensure!(tree.iter().any(|t| t["snapshot_id"] == served.as_str() && t["current"] == true), "{tree:?}");
    let root = served;
    let restored: Value = serde_json::from_str(&s.ok(&["restore", "--json", &id, &root], None)?)?;
    ensure!(restored["stopped_processes"] == 1, "restore stops the server: {restored}");
    let after = ps(s, &id)?;
    ensure!(after.iter().any(|p| p["stopped_by"] == "restored"), "{after:?}");

    // Stop: the keeper goes and the vessel is free.
    s.ok(&["exec", "-d", &id, "--", "sleep", "1002"], None)?;
    s.ok(&["stop", &id], None)?;
    all_gone(&id, "1002")?;
    let sockets: Vec<_> = std::fs::read_dir(s.mounts.join("keepers"))?.collect();
    ensure!(sockets.is_empty(), "the keeper left {sockets:?}");
    ensure!(ps(s, &id)?.is_empty());
    ensure!(s.ok(&["exec", &id, "--", "cat", "/www/index.html"], None)? == "hello\n");
    ensure!(s.ok(&["stop", &id], None)?.is_empty(), "stopping a vessel without a keeper does nothing");

    // A keeper with nothing to do closes the vessel after its linger time.
    s.ok(&["exec", "-d", "--linger", "0.5", &id, "--", "true"], None)?;
    eventually("the idle keeper ends", || {
        ensure!(keepers(&id).is_empty(), "the keeper still runs");
        Ok(())
    })?;
    // And `rm -f` ends a keeper that holds a running process.
    s.ok(&["exec", "-d", &id, "--", "sleep", "1003"], None)?;
    s.ok(&["rm", "-f", &id], None)?;
    all_gone(&id, "1003")?;
    Ok(())
}

/// A keeper serves only its own user: with its socket's modes loosened
/// (by mistake), another user's call is refused by the peer-credential
/// check and changes nothing.
pub(crate) fn a_stranger_cannot_call_a_keeper(s: &Session, image: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let image = image.to_str().context("utf-8 path")?;
    s.ok(&["image", "import", image, "local/busybox:latest"], None)?;
    let id = s.ok(&["create", "local/busybox:latest"], None)?.trim().to_owned();
    let _stop = StopOnDrop(s, id.clone());
    s.ok(&["exec", "-d", &id, "--", "sleep", "1004"], None)?;
    let socket = s.mounts.join("keepers").join(format!("{id}.sock"));
    // Every dir on the way, and the socket, open to all.
    for dir in socket.ancestors().skip(1) {
        if dir == Path::new("/") {
            break;
        }
        let mode = std::fs::metadata(dir)?.permissions().mode();
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode | 0o711))?;
    }
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o777))?;
    // Calls `stop`, as user nobody.
    let script = "import socket, struct, sys\n\
        s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n\
        m = b'{\"frame\":\"call\",\"call\":\"stop\"}'\n\
        try: s.sendall(struct.pack('>I', len(m)) + m)\n\
        except BrokenPipeError: pass\n\
        n = struct.unpack('>I', s.recv(4))[0]\n\
        print(s.recv(n).decode())\n";
    let out = std::process::Command::new("/usr/bin/python3")
        .args(["-c", script])
        .arg(&socket)
        .env_clear()
        .uid(65534)
        .gid(65534)
        .output()?;
    let reply = String::from_utf8_lossy(&out.stdout);
    ensure!(out.status.success(), "the stranger's client failed: {}", super::stderr(&out));
    ensure!(reply.contains("failed") && reply.contains("refused"), "the stranger got {reply}");
    let listed = ps(s, &id)?;
    ensure!(listed.len() == 1 && listed[0]["status"] == "running", "nothing changed: {listed:?}");
    ensure!(keepers(&id).len() == 1);
    s.ok(&["stop", &id], None)?;
    all_gone(&id, "1004")?;
    Ok(())
}

/// `vessel fork` (a snapshot, and the present state through a keeper),
/// `vessel diff` in docker's letters and as JSON, `ls` naming the source,
/// and `gc`.
pub(crate) fn forks_and_diff(s: &Session, image: &Path) -> Result<()> {
    let image = image.to_str().context("utf-8 path")?;
    s.ok(&["image", "import", image, "local/busybox:latest"], None)?;
    let id = s.ok(&["create", "local/busybox:latest"], None)?.trim().to_owned();
    let _stop = StopOnDrop(s, id.clone());
    s.ok(&["exec", "--persist", &id, "--", "sh", "-c", "echo one > /work/a; echo gone > /work/b"], None)?;
    let at = s.ok(&["snapshot", "-m", "at", &id], None)?.trim().to_owned();
    s.ok(&["exec", "--persist", &id, "--", "sh", "-c", "echo two > /work/a; rm /work/b; echo c > /work/c"], None)?;
    let diff = s.ok(&["diff", &id, "--since", &at], None)?;
    for line in ["C /work/a", "D /work/b", "A /work/c"] {
        ensure!(diff.lines().any(|l| l == line), "diff lacks {line:?}:\n{diff}");
    }
    let json: Vec<Value> = serde_json::from_str(&s.ok(&["diff", "--json", &id, "--since", &at], None)?)?;
    ensure!(json.iter().any(|c| c["path"] == "/work/a" && c["kind"] == "modified" && c["what"][0] == "content"));
    ensure!(s.ok(&["diff", &id], None)?.is_empty(), "nothing changed since the current snapshot");

    // Three forks of the snapshot, each its own.
    let forks: Vec<String> =
        s.ok(&["fork", &id, "--snapshot", &at, "-n", "3"], None)?.lines().map(str::to_owned).collect();
    ensure!(forks.len() == 3, "{forks:?}");
    for f in &forks {
        ensure!(s.ok(&["read", f, "/work/a"], None)? == "one\n");
    }
    let ls = s.ok(&["ls"], None)?;
    ensure!(ls.lines().filter(|l| l.contains(&id)).count() == 4, "ls names the source of each fork:\n{ls}");
    // The present state of a vessel a keeper holds, its process running on.
    s.ok(&["exec", "-d", &id, "--", "sleep", "1005"], None)?;
    let live = s.ok(&["fork", &id], None)?.trim().to_owned();
    ensure!(s.ok(&["read", &live, "/work/c"], None)? == "c\n");
    ensure!(ps(s, &id)?.len() == 1 && ps(s, &live)?.is_empty());
    let wider = s.run(&["fork", &id, "--snapshot", &at, "--memory", "1t"], None)?;
    ensure!(wider.status.code() == Some(125) && super::stderr(&wider).contains("narrow"), "{wider:?}");
    s.ok(&["stop", &id], None)?;
    all_gone(&id, "1005")?;
    // The source goes; its forks stay whole; gc keeps what they use.
    s.ok(&["rm", &id], None)?;
    s.ok(&["gc"], None)?;
    for f in forks.iter().chain([&live]) {
        ensure!(s.ok(&["exec", f, "--", "cat", "/work/a"], None)?.trim() != "", "fork {f} reads its files");
        s.ok(&["rm", f], None)?;
    }
    let gc: Value = serde_json::from_str(&s.ok(&["gc", "--json"], None)?)?;
    ensure!(
        gc["blobs_deleted"].is_u64() && gc["uploads_aborted"].is_u64() && gc["heartbeats_removed"].is_u64(),
        "{gc}"
    );
    Ok(())
}
