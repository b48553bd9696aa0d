//! `vessel mcp` driven by independent clients, as an agent would: the
//! official MCP Python SDK over stdio (`mcp_session.py`), and rmcp's client
//! over streamable HTTP with a bearer token. Both run the built binary on
//! real containers (youki); afterwards nothing may be left mounted, no
//! cgroup, no process of a killed command.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use libtest_mimic::{Arguments, Failed, Trial};
use rmcp::ServiceExt;
use rmcp::model::{CallToolRequestParams, CallToolResult};
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use serde_json::{Value, json};
use vessel_test_support as support;

struct Env {
    data: PathBuf,
    mounts: PathBuf,
    namespace: String,
}

impl Env {
    /// The global options every `vessel` run here takes.
    fn args(&self) -> Vec<String> {
        vec![
            "--data".into(),
            self.data.display().to_string(),
            "--mount-root".into(),
            self.mounts.display().to_string(),
            "--backend".into(),
            "youki".into(),
            "--namespace".into(),
            self.namespace.clone(),
        ]
    }

    fn vessel(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_vessel"));
        c.args(self.args());
        c
    }

    fn import(&self, image: &Path) -> Result<()> {
        let out = self.vessel().arg("image").arg("import").arg(image).arg("local/busybox:latest").output()?;
        ensure!(out.status.success(), "import: {}", String::from_utf8_lossy(&out.stderr));
        Ok(())
    }
}

fn main() {
    let args = Arguments::from_args();
    let Some(image_dir) = support::root_with_test_image("mcp") else { return };
    let tmp = tempfile::tempdir().unwrap();
    let image = image_dir.join("busybox-oci.tar");
    let env = |name: &str| Env {
        data: tmp.path().join(name).join("data"),
        mounts: tmp.path().join(name).join("mounts"),
        namespace: format!("vessel-mcp-{}", std::process::id()),
    };
    let mut trials = Vec::new();
    if let Some(python) = support::required_env("mcp", "VESSEL_MCP_PYTHON") {
        let (e, image) = (env("stdio"), image.clone());
        trials.push(Trial::test("the_python_sdk_drives_a_session_over_stdio", move || {
            python_session(&e, &image, Path::new(&python)).map_err(|e| Failed::from(format!("{e:#}")))
        }));
    }
    let e = env("http");
    trials.push(Trial::test("the_rmcp_client_drives_a_session_over_http", move || {
        let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
        rt.block_on(http_session(&e, &image)).map_err(|e| Failed::from(format!("{e:#}")))
    }));
    let conclusion = libtest_mimic::run(&args, trials);
    let leaks = [
        ("mounts", support::shown(support::mounts_under(tmp.path()))),
        ("cgroups", support::shown(support::leftover_cgroups())),
        ("command processes", support::processes_with_arg(MARKER).iter().map(i32::to_string).collect()),
    ];
    support::finish(&tmp.keep(), &leaks, conclusion)
}

/// The argument of the command the HTTP session cancels: no process may
/// carry it afterwards.
const MARKER: &str = "4711.0815";

fn python_session(e: &Env, image: &Path, python: &Path) -> Result<()> {
    e.import(image)?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/mcp_session.py");
    let out = Command::new(python)
        .arg(&script)
        .arg(env!("CARGO_BIN_EXE_vessel"))
        .args(e.args())
        .stdin(Stdio::null())
        .output()
        .context("running the Python SDK session")?;
    let transcript = String::from_utf8_lossy(&out.stdout);
    print!("{transcript}");
    ensure!(
        out.status.success() && transcript.trim_end().ends_with("session ok"),
        "the Python session failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    // The server closed what it opened when the client hung up.
    ensure!(
        support::mounts_under(&e.mounts).is_empty(),
        "mounts after the stdio session: {:?}",
        support::mounts_under(&e.mounts)
    );
    Ok(())
}

/// `vessel mcp --http` on a free loopback port; returns it with its URL.
fn start_http(e: &Env, token: &str) -> Result<(std::process::Child, String)> {
    let mut child = e
        .vessel()
        .args(["mcp", "--http", "127.0.0.1:0", "--max-output", "64k"])
        .env("VESSEL_MCP_TOKEN", token)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut lines = BufReader::new(child.stderr.take().context("stderr")?).lines();
    let url = loop {
        let Some(line) = lines.next() else { bail!("vessel mcp --http exited before listening") };
        let line = line?;
        if let Some(url) = line.strip_prefix("vessel mcp: listening on ") {
            break url.to_owned();
        }
    };
    // Keep draining its stderr so it never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(|l| eprintln!("[vessel mcp] {}", l.unwrap_or_default())));
    Ok((child, url))
}

fn args(v: Value) -> serde_json::Map<String, Value> {
    v.as_object().cloned().unwrap_or_default()
}

fn text(r: &CallToolResult) -> String {
    r.content.first().and_then(|c| c.as_text()).map(|t| t.text.clone()).unwrap_or_default()
}

/// What `vessel mcp --http` refuses at start, before it listens: an address
/// beyond loopback, a token file others may read, a short token.
fn refused_at_start(e: &Env, token: &str) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let start = |args: &[&str], file: Option<&Path>| {
        let mut c = e.vessel();
        c.arg("mcp").args(args).env("VESSEL_MCP_TOKEN", token).stdin(Stdio::null());
        if let Some(f) = file {
            c.arg("--token-file").arg(f);
        }
        c.output()
    };
    let out = start(&["--http", "0.0.0.0:0"], None)?;
    let said = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.code() == Some(125) && said.contains("loopback addresses only"), "0.0.0.0: {out:?}");
    let file = e.data.with_file_name("token");
    for (content, mode, want) in [(token, 0o644, "chmod 600"), ("short", 0o600, "shorter than 16 characters")] {
        std::fs::write(&file, format!("{content}\n"))?;
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode))?;
        let out = start(&["--http", "127.0.0.1:0"], Some(&file))?;
        let said = String::from_utf8_lossy(&out.stderr);
        ensure!(out.status.code() == Some(125) && said.contains(want), "token file {mode:o}: {out:?}");
    }
    Ok(())
}

async fn http_session(e: &Env, image: &Path) -> Result<()> {
    e.import(image)?;
    let token = "test-token-0123456789abcdef";
    refused_at_start(e, token)?;
    let (mut server, url) = start_http(e, token)?;
    let result = http_calls(&url, token).await;
    // SIGTERM: the server closes its vessels and exits cleanly.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(server.id() as i32), nix::sys::signal::Signal::SIGTERM)?;
    let status = server.wait()?;
    result?;
    ensure!(status.success(), "vessel mcp after SIGTERM: {status}");
    ensure!(
        support::mounts_under(&e.mounts).is_empty(),
        "mounts after the HTTP server stopped: {:?}",
        support::mounts_under(&e.mounts)
    );
    Ok(())
}

async fn http_calls(url: &str, token: &str) -> Result<()> {
    // Without the token, or with a wrong one: 401 before any MCP.
    let http = reqwest::Client::new();
    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}}});
    for auth in [None, Some("Bearer wrong-token-0123456789ab"), Some(token)] {
        let mut req = http
            .post(url)
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream")
            .body(init.to_string());
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let status = req.send().await?.status();
        ensure!(status == reqwest::StatusCode::UNAUTHORIZED, "{auth:?} got {status}");
    }

    let transport = StreamableHttpClientTransport::from_config(
        StreamableHttpClientTransportConfig::with_uri(url.to_owned()).auth_header(token.to_owned()),
    );
    let client = ().serve(transport).await.context("MCP initialize over HTTP")?;
    let tools = client.list_all_tools().await?;
    ensure!(tools.len() >= 19, "{} tools", tools.len());
    let call = |name: &'static str, a: Value| {
        let client = &client;
        async move {
            let r = client.call_tool(CallToolRequestParams::new(name).with_arguments(args(a))).await?;
            anyhow::Ok(r)
        }
    };
    let good = |name: &'static str, a: Value| async move {
        let r = call(name, a).await?;
        ensure!(r.is_error != Some(true), "{name}: {}", text(&r));
        r.structured_content.context("structured content")
    };

    let v = good("create_vessel", json!({"image": "local/busybox:latest"})).await?["vessel_id"]
        .as_str()
        .context("vessel_id")?
        .to_owned();
    let w = good("create_vessel", json!({"image": "local/busybox:latest", "memory": "64m"})).await?["vessel_id"]
        .as_str()
        .context("vessel_id")?
        .to_owned();
    good("write_file", json!({"vessel_id": v, "path": "notes/a.txt", "content": "first\n"})).await?;
    let snap = good("create_snapshot", json!({"vessel_id": v, "message": "a"})).await?["snapshot_id"]
        .as_str()
        .context("snapshot_id")?
        .to_owned();
    good("exec", json!({"vessel_id": v, "shell": "echo broken > notes/a.txt"})).await?;
    // Concurrent calls on two vessels.
    let (a, b) = tokio::join!(
        good("exec", json!({"vessel_id": v, "shell": "sleep 0.3; cat notes/a.txt"})),
        good("exec", json!({"vessel_id": w, "shell": "sleep 0.3; echo other"})),
    );
    ensure!(a?["stdout"] == "broken\n" && b?["stdout"] == "other\n", "concurrent execs");
    good("restore_snapshot", json!({"vessel_id": v, "snapshot_id": snap})).await?;
    let r = good("read_file", json!({"vessel_id": v, "path": "notes/a.txt"})).await?;
    ensure!(r["content"] == "first\n", "restored: {r}");

    // 100 MB of output: capped, counted, and the server stays small.
    let r = good("exec", json!({"vessel_id": v, "shell": "head -c 100000000 /dev/zero | tr '\\0' x"})).await?;
    let stdout = r["stdout"].as_str().context("stdout")?;
    ensure!(r["stdout_bytes"] == 100_000_000 && r["truncated"] == true, "{}", r["stdout_bytes"]);
    ensure!(stdout.len() < 64 * 1024 + 200 && stdout.contains("[vessel: output truncated: 100000000 bytes"));
    // A timeout from the call.
    let r = good("exec", json!({"vessel_id": v, "command": ["sleep", "30"], "timeout_seconds": 0.5})).await?;
    ensure!(r["timed_out"] == true && r["exit_code"] == 137, "timeout: {r}");

    // Bad input: typed tool errors, never a dead server.
    for (name, a, want) in [
        ("exec", json!({"vessel_id": "../nope", "command": ["true"]}), "InvalidInput"),
        // A well-formed name that no vessel has.
        ("exec", json!({"vessel_id": "nope", "command": ["true"]}), "NotFound"),
        ("exec", json!({"vessel_id": "0123456789abcdef", "command": ["true"]}), "NotFound"),
        ("exec", json!({"vessel_id": v, "command": ["true"], "shell": "true"}), "InvalidInput"),
        ("exec", json!({"vessel_id": v, "command": ["true"], "timeout_seconds": -1}), "InvalidInput"),
        ("exec", json!({"vessel_id": v, "command": ["true"], "env": {"A=B": "c"}}), "InvalidInput"),
        ("read_file", json!({"vessel_id": v, "path": "missing.txt"}), "NotFound"),
        ("read_file", json!({"vessel_id": v, "path": "a\u{0}b"}), "InvalidInput"),
        ("write_file", json!({"vessel_id": v, "path": "x", "content": "!!", "encoding": "base64"}), "InvalidInput"),
        ("write_file", json!({"vessel_id": v, "path": "x", "content": "", "mode": "999"}), "InvalidInput"),
        ("delete_file", json!({"vessel_id": v, "path": "notes"}), "Io"),
        ("restore_snapshot", json!({"vessel_id": v, "snapshot_id": "ffffffffffffffff"}), "NotFound"),
        ("create_vessel", json!({"image": "local/none:latest"}), "NotFound"),
        ("create_vessel", json!({"image": "local/busybox:latest", "memory": "lots"}), "InvalidInput"),
    ] {
        let r = call(name, a.clone()).await?;
        ensure!(r.is_error == Some(true) && text(&r).starts_with(want), "{name} {a}: {}", text(&r));
    }
    // Wrong argument types: a JSON-RPC invalid-params error.
    let wrong = call("exec", json!({"vessel_id": v, "command": "not a list"})).await;
    ensure!(wrong.is_err() || wrong.as_ref().is_ok_and(|r| r.is_error == Some(true)), "{wrong:?}");
    // The escape through the file API lands inside the vessel.
    good("write_file", json!({"vessel_id": v, "path": "../../../../tmp/vessel-mcp-escape", "content": "x"})).await?;
    ensure!(!Path::new("/tmp/vessel-mcp-escape").exists(), "a write escaped to the host");

    // Cancelling a running exec kills its command: rmcp sends
    // notifications/cancelled when the call's future is dropped.
    let cancelled = tokio::time::timeout(
        Duration::from_millis(1500),
        call("exec", json!({"vessel_id": v, "command": ["sleep", MARKER]})),
    )
    .await;
    ensure!(cancelled.is_err(), "the exec ended by itself: {cancelled:?}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !support::processes_with_arg(MARKER).is_empty() {
        ensure!(
            Instant::now() < deadline,
            "the cancelled command still runs: {:?}",
            support::processes_with_arg(MARKER)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = good("exec", json!({"vessel_id": v, "shell": "echo alive"})).await?;
    ensure!(r["stdout"] == "alive\n", "after the cancel: {r}");

    // Background processes: started, read by offset (waiting for output),
    // fed, waited for, signalled; what a server-side process says of its end.
    let started =
        good("exec", json!({"vessel_id": w, "shell": "echo ready; read x; echo got $x; exit 4", "background": true}))
            .await?;
    let pid = started["process_id"].as_u64().context("process_id")?;
    ensure!(started["status"] == "running", "{started}");
    let out = good("read_process_output", json!({"vessel_id": w, "process_id": pid, "wait_seconds": 10})).await?;
    ensure!(out["data"] == "ready\n" && out["next_offset"] == 6 && out["dropped"] == 0, "{out}");
    good("write_process_stdin", json!({"vessel_id": w, "process_id": pid, "data": "hi\n", "close": true})).await?;
    let end = good("wait_process", json!({"vessel_id": w, "process_id": pid, "timeout_seconds": 10})).await?;
    ensure!(end["status"] == "exited" && end["exit_code"] == 4, "{end}");
    let out = good("read_process_output", json!({"vessel_id": w, "process_id": pid, "offset": 6})).await?;
    ensure!(out["data"] == "got hi\n", "{out}");
    let sleeper =
        good("exec", json!({"vessel_id": w, "command": ["sleep", "1000"], "background": true})).await?["process_id"]
            .as_u64()
            .context("process_id")?;
    let listed = good("list_processes", json!({"vessel_id": w})).await?;
    ensure!(listed["processes"].as_array().is_some_and(|a| a.len() == 2), "{listed}");
    good("kill_process", json!({"vessel_id": w, "process_id": sleeper})).await?;
    let end = good("wait_process", json!({"vessel_id": w, "process_id": sleeper, "timeout_seconds": 10})).await?;
    ensure!(end["status"] == "signalled" && end["signal"] == 15 && end["exit_code"] == 143, "{end}");
    for (name, a, want) in [
        ("read_process_output", json!({"vessel_id": w, "process_id": 999}), "NotFound"),
        ("read_process_output", json!({"vessel_id": w, "process_id": pid, "stream": "stdnothing"}), "InvalidInput"),
        ("kill_process", json!({"vessel_id": w, "process_id": pid, "signal": "NOPE"}), "InvalidInput"),
        ("kill_process", json!({"vessel_id": w, "process_id": sleeper, "signal": "0"}), "InvalidInput"),
        ("wait_process", json!({"vessel_id": w, "process_id": pid, "timeout_seconds": -1}), "InvalidInput"),
        ("exec", json!({"vessel_id": w, "command": ["true"], "background": true, "persist": false}), "InvalidInput"),
    ] {
        let r = call(name, a.clone()).await?;
        ensure!(r.is_error == Some(true) && text(&r).starts_with(want), "{name} {a}: {}", text(&r));
    }

    // Forks of a snapshot and of the present state, and what changed.
    let made = good("fork_vessel", json!({"vessel_id": v, "snapshot_id": snap, "count": 2})).await?;
    let forks: Vec<String> = made["vessels"]
        .as_array()
        .context("vessels")?
        .iter()
        .filter(|f| f["forked_from"]["vessel_id"] == v.as_str() && f["forked_from"]["snapshot_id"] == snap.as_str())
        .filter_map(|f| f["vessel_id"].as_str().map(str::to_owned))
        .collect();
    ensure!(forks.len() == 2, "{made}");
    let r = good("read_file", json!({"vessel_id": forks[0], "path": "notes/a.txt"})).await?;
    ensure!(r["content"] == "first\n", "the fork starts at the snapshot: {r}");
    good("exec", json!({"vessel_id": forks[0], "shell": "echo changed > notes/a.txt; echo new > notes/b.txt"})).await?;
    let changes = good("list_changes", json!({"vessel_id": forks[0]})).await?;
    let kind_of = |suffix: &str| {
        changes["changes"]
            .as_array()
            .and_then(|a| a.iter().find(|c| c["path"].as_str().is_some_and(|p| p.ends_with(suffix))))
            .map(|c| c["kind"].clone())
    };
    ensure!(
        kind_of("notes/a.txt") == Some(json!("modified")) && kind_of("notes/b.txt") == Some(json!("added")),
        "{changes}"
    );
    let r = good("read_file", json!({"vessel_id": forks[1], "path": "notes/a.txt"})).await?;
    ensure!(r["content"] == "first\n", "forks are separate: {r}");
    let live = good("fork_vessel", json!({"vessel_id": w})).await?;
    let live = live["vessels"][0]["vessel_id"].as_str().context("a live fork")?.to_owned();
    for (name, a, want) in [
        ("fork_vessel", json!({"vessel_id": v, "count": 0}), "InvalidInput"),
        ("fork_vessel", json!({"vessel_id": v, "snapshot_id": "0000000000000007"}), "NotFound"),
        ("list_changes", json!({"vessel_id": v, "to": snap}), "InvalidInput"),
    ] {
        let r = call(name, a.clone()).await?;
        ensure!(r.is_error == Some(true) && text(&r).starts_with(want), "{name} {a}: {}", text(&r));
    }
    for f in forks.iter().chain([&live]) {
        good("delete_vessel", json!({"vessel_id": f})).await?;
    }

    good("delete_vessel", json!({"vessel_id": w})).await?;
    let listed = good("list_vessels", json!({})).await?;
    ensure!(listed["vessels"].as_array().is_some_and(|a| a.len() == 1), "{listed}");
    // `v` stays open: the server's shutdown must close it.
    client.cancel().await?;
    Ok(())
}
