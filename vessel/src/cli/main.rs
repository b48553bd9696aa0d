//! `vessel`: the command-line tool over [`vessel::Manager`].
//!
//! Each invocation opens what it needs and closes it again. Only snapshots
//! are durable (see the crate docs), so the commands that change a vessel
//! (`write`, `exec --persist`) commit a snapshot of their change; `exec`
//! without `--persist` changes nothing.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use args::{BackendArg, Cli, Command, ImageCommand, McpArgs};
use clap::{CommandFactory, Parser};
mod args;
mod commands;
mod force;
mod forks;
mod keeper;
mod live;
mod mcp;
mod network;
mod view;

use vessel::{Backend, CompressedStorage, LocalStorage, Manager, ManagerConfig, QuotaMode, VesselOptions};

fn main() -> ExitCode {
    // Containers run in re-executed copies of this program: before any thread.
    vessel::init();
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("vessel: cannot start the async runtime: {e}");
            return ExitCode::from(125);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vessel: {e:#}");
            if let Some(hint) = e.chain().find_map(|c| c.downcast_ref::<vessel::VesselError>()).and_then(hint) {
                eprintln!("{hint}");
            }
            // As docker: 127 when the command is not found, 126 when it
            // cannot be executed, 125 for an error of the tool itself.
            let start = e.chain().find_map(|c| match c.downcast_ref::<vessel::VesselError>() {
                Some(vessel::VesselError::Runtime(vessel::runtime::RuntimeError::Exec { failure, .. })) => {
                    Some(failure.exit_code())
                }
                _ => c.downcast_ref::<keeper::client::KeeperError>().and_then(|k| k.exit_code).map(i32::from),
            });
            ExitCode::from(start.and_then(|c| u8::try_from(c).ok()).unwrap_or(125))
        }
    }
}

/// What to do about an error, in the CLI's terms (the library's messages
/// name no API; its docs do).
fn hint(e: &vessel::VesselError) -> Option<String> {
    use vessel::VesselError as E;
    Some(match e {
        E::QuotaUnsupported { .. } => "hint: `vessel setup-quota` (as root) gives the mount root disk quotas; \
                                       `--disk-quota auto` runs without them"
            .into(),
        E::InvalidInput(m) if m.contains("without disk quotas") => {
            "hint: --disk needs a mount root with disk quotas (`vessel setup-quota`, as root)".into()
        }
        E::IsolationUnsupported(_) => {
            "hint: the kernel and filesystem must support user namespaces and idmapped mounts".into()
        }
        E::Locked(_) => "hint: `vessel rm -f` stops the command that has it open".into(),
        _ => return None,
    })
}

/// `--disk-quota`: a mode, or a boolean (on: require).
fn parse_quota_mode(s: &str) -> std::result::Result<QuotaMode, String> {
    if let Ok(mode) = s.parse::<QuotaMode>() {
        return Ok(mode);
    }
    use clap::builder::TypedValueParser;
    match clap::builder::BoolishValueParser::new().parse_ref(&Cli::command(), None, std::ffi::OsStr::new(s)) {
        Ok(true) => Ok(QuotaMode::Require),
        Ok(false) => Ok(QuotaMode::Off),
        Err(_) => Err(format!("{s:?}: expected auto, require or off (or a boolean: 1/0, yes/no, on/off, true/false)")),
    }
}

/// Bytes, with an optional binary suffix (k, m, g, t; a trailing `b` or
/// `ib` is fine), as docker's `--memory`.
fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim().to_ascii_lowercase();
    let t = t.strip_suffix("ib").or_else(|| t.strip_suffix('b')).unwrap_or(&t);
    let (digits, shift) = match t.chars().last() {
        Some('k') => (&t[..t.len() - 1], 10),
        Some('m') => (&t[..t.len() - 1], 20),
        Some('g') => (&t[..t.len() - 1], 30),
        Some('t') => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    let n: u64 = digits.parse().map_err(|_| format!("{s:?} is not a size (e.g. 512m, 2g)"))?;
    n.checked_mul(1 << shift).ok_or_else(|| format!("{s:?} is too large"))
}

/// A vessel's limits as `create` (and `vessel mcp`'s `create_vessel`) take
/// them: bytes, CPUs, processes, bytes. Bad values are refused by
/// `create_vessel_with` with the other limits (0 or NaN CPUs there too).
fn vessel_options(
    name: Option<&str>,
    memory: Option<u64>,
    cpus: Option<f64>,
    pids: Option<i64>,
    disk: Option<u64>,
) -> VesselOptions {
    let mut opts = VesselOptions::new();
    if let Some(n) = name {
        opts = opts.name(n);
    }
    if let Some(m) = memory {
        opts = opts.memory_bytes(i64::try_from(m).unwrap_or(i64::MAX));
    }
    if let Some(c) = cpus {
        let us = if c.is_finite() { (c * 100_000.0).round() as i64 } else { 0 };
        opts = opts.cpu_quota_us(us);
    }
    if let Some(p) = pids {
        opts = opts.pids(p);
    }
    if let Some(d) = disk {
        opts = opts.disk_bytes(d);
    }
    opts
}

/// Seconds (fractions allowed), more than zero.
fn parse_timeout(s: &str) -> std::result::Result<Duration, String> {
    let secs: f64 = s.parse().map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if !(secs > 0.0 && secs.is_finite()) {
        return Err(format!("the timeout must be more than 0 seconds, not {s}"));
    }
    Duration::try_from_secs_f64(secs).map_err(|e| e.to_string())
}

async fn manager(cli: &Cli) -> Result<Manager> {
    let mut config = ManagerConfig::default().namespace(cli.namespace.clone());
    if let Some(data) = &cli.data {
        let local = LocalStorage::new(data).with_context(|| format!("opening the storage at {}", data.display()))?;
        config = config.storage(CompressedStorage::new(local));
    }
    if let Some(url) = &cli.storage {
        config = config.shared_storage(vessel::open_url(url).await?);
    }
    if let Some(name) = &cli.host_name {
        config = config.host_name(name.clone());
    }
    if let Some(ttl) = cli.lease_ttl {
        config = config.lease_ttl(ttl);
    }
    if let Some(idle) = cli.idle_pause {
        config = config.idle_pause(idle);
    }
    let defaults = vessel::NetConfig::default();
    config = config.network(vessel::NetConfig {
        upstream_dns: cli.dns.clone(),
        publish_host: cli.publish_host.unwrap_or(defaults.publish_host),
        ipv6_pool: cli.ipv6.then_some(vessel::NetConfig::DEFAULT_IPV6_POOL),
        ..defaults
    });
    config = config.backend(match cli.backend {
        BackendArg::Youki => Backend::Youki,
        BackendArg::Containerd => Backend::Containerd,
    });
    if let Some(root) = &cli.mount_root {
        config = config.mount_root(root);
    }
    if let Some(a) = &cli.containerd_address {
        config = config.containerd_address(a);
    }
    config = config.quota_mode(quota_mode(cli));
    if let Command::Image(ImageCommand::Pull { reference, username, password_stdin, insecure }) = &cli.command {
        let registry = vessel::registry::registry_of(reference)?;
        if let (Some(user), true) = (username, password_stdin) {
            let mut password = String::new();
            std::io::stdin().read_line(&mut password).context("reading the password from stdin")?;
            let password = password.trim_end_matches(['\n', '\r']).to_owned();
            config = config.registry_auth(registry.clone(), vessel::RegistryAuth::Basic(user.clone(), password));
        }
        if *insecure {
            config = config.insecure_registry(registry);
        }
    }
    Ok(Manager::new(config).await?)
}

/// The quota mode a command runs with: the one asked for where it may
/// write to a vessel; `off` where it creates and changes none (image
/// import and listing check nothing they do not need).
fn quota_mode(cli: &Cli) -> QuotaMode {
    let writes = matches!(
        cli.command,
        Command::Create(_)
            | Command::Fork(_)
            | Command::Exec(_)
            | Command::Write { .. }
            | Command::Restore { .. }
            | Command::Mcp(_)
            | Command::Keep { .. }
            | Command::Network { .. }
            | Command::Port { .. }
    );
    if cli.no_disk_quota || !writes { QuotaMode::Off } else { cli.disk_quota }
}

async fn run(cli: Cli) -> Result<ExitCode> {
    // What needs no manager (and must not create the mount root).
    match &cli.command {
        Command::Completion { shell } => {
            clap_complete::generate(*shell, &mut Cli::command(), "vessel", &mut std::io::stdout());
            return Ok(ExitCode::SUCCESS);
        }
        Command::SetupQuota(a) => {
            let root = cli.mount_root.clone().unwrap_or_else(vessel::default_mount_root);
            commands::setup_quota(&root, a, cli.json)?;
            return Ok(ExitCode::SUCCESS);
        }
        _ => {}
    }
    let mgr = Arc::new(manager(&cli).await?);
    let result = if matches!(cli.command, Command::Mcp(_) | Command::Keep { .. }) {
        // The server shuts down on these signals by itself.
        command(&cli, &mgr).await
    } else {
        // A signal stops the command (dropping it kills its container) and
        // the manager closes, ending this host's lease: what it held is
        // free at once (`vessel rm -f` relies on it), as after `docker exec`.
        tokio::select! {
            r = command(&cli, &mgr) => r,
            signal = terminated(true) => Ok(ExitCode::from(128 + signal)),
        }
    };
    mgr.close().await?;
    result
}

/// The global options of this command, as a keeper it starts takes them
/// (it inherits the environment too): the same storage, mount root,
/// backend and host.
fn globals(cli: &Cli, mgr: &Manager) -> Vec<String> {
    let mut g = vec![
        "--mount-root".into(),
        mgr.mount_root().display().to_string(),
        "--backend".into(),
        mgr.backend().into(),
        "--namespace".into(),
        cli.namespace.clone(),
        "--disk-quota".into(),
        quota_mode(cli).as_str().into(),
    ];
    let pairs = [
        ("--data", cli.data.as_ref().map(|d| d.display().to_string())),
        ("--storage", cli.storage.clone()),
        ("--host-name", cli.host_name.clone()),
        ("--lease-ttl", cli.lease_ttl.map(|t| t.as_secs_f64().to_string())),
        ("--idle-pause", cli.idle_pause.map(|t| t.as_secs_f64().to_string())),
        ("--publish-host", cli.publish_host.map(|h| h.to_string())),
        (
            "--dns",
            Some(cli.dns.iter().map(ToString::to_string).collect::<Vec<_>>().join(",")).filter(|d| !d.is_empty()),
        ),
        ("--containerd-address", cli.containerd_address.as_ref().map(|a| a.display().to_string())),
    ];
    for (flag, value) in pairs {
        if let Some(v) = value {
            g.extend([flag.to_owned(), v]);
        }
    }
    if cli.ipv6 {
        g.push("--ipv6".into());
    }
    g
}

/// Waits for SIGTERM, SIGINT or (if `hangup`) SIGHUP; returns its number.
/// Without `hangup`, SIGHUP is ignored.
pub(crate) async fn terminated(hangup: bool) -> u8 {
    use tokio::signal::unix::{SignalKind, signal};
    let kinds = [(SignalKind::terminate(), 15), (SignalKind::interrupt(), 2), (SignalKind::hangup(), 1)];
    let mut streams = Vec::new();
    for (kind, n) in kinds {
        if n == 1 && !hangup {
            // Handled (so not fatal) and never acted on.
            let _ = signal(kind);
            continue;
        }
        match signal(kind) {
            Ok(s) => streams.push((s, n)),
            // Without a handler the default action still ends the process.
            Err(_) => continue,
        }
    }
    if streams.is_empty() {
        return std::future::pending().await;
    }
    let waits = streams.iter_mut().map(|(s, n)| {
        let n = *n;
        Box::pin(async move {
            s.recv().await;
            n
        })
    });
    futures::future::select_all(waits).await.0
}

async fn command(cli: &Cli, mgr: &Arc<Manager>) -> Result<ExitCode> {
    let json = cli.json;
    match &cli.command {
        Command::Mcp(a) => serve_mcp(mgr, a).await?,
        Command::Image(ImageCommand::Pull { reference, .. }) => commands::image_pull(mgr, reference, json).await?,
        Command::Image(ImageCommand::Import { archive, reference }) => {
            commands::image_import(mgr, archive, reference, json).await?
        }
        Command::Image(ImageCommand::Ls) => commands::image_ls(mgr, json).await?,
        Command::Create(a) => commands::create(mgr, a, json).await?,
        Command::Ls => commands::ls(mgr, json).await?,
        Command::Exec(a) if a.detach => live::exec_detached(mgr, a, &globals(cli, mgr), a.linger, json).await?,
        Command::Exec(a) => return commands::exec(mgr, a, json).await,
        Command::Fork(a) => forks::fork(mgr, a, json).await?,
        Command::Diff { id, since, to } => forks::diff(mgr, id, since.as_deref(), to.as_deref(), json).await?,
        Command::Gc => forks::gc(mgr, json).await?,
        Command::Ps { id } => live::ps(mgr, id, json).await?,
        Command::Logs { follow, id, process } => live::logs(mgr, id, *process, *follow).await?,
        Command::Kill { id, process, signal } => live::kill(mgr, id, *process, *signal).await?,
        Command::Wait { id, process } => return live::wait(mgr, id, *process, json).await,
        Command::Pause { id } => live::pause(mgr, id, true).await?,
        Command::Resume { id } => live::pause(mgr, id, false).await?,
        Command::Stop { id } => live::stop(mgr, id).await?,
        Command::Network { id, set } => network::network(mgr, id, set, json).await?,
        Command::Port { id, port, remove, linger } => {
            network::port(mgr, id, *port, *remove, &globals(cli, mgr), *linger, json).await?
        }
        Command::Keep { id, linger } => keeper::serve(mgr, id, *linger).await?,
        Command::Read { id, path } => commands::read(mgr, id, path).await?,
        Command::Write { id, path, mode } => commands::write(mgr, id, path, mode, json).await?,
        Command::Snapshot { id, message } => commands::snapshot(mgr, id, message, json).await?,
        Command::Snapshots { id } => commands::snapshots(mgr, id, json).await?,
        Command::Restore { id, snapshot } => commands::restore(mgr, id, snapshot, json).await?,
        Command::Rm { id, snapshot, force } => commands::rm(mgr, id, snapshot.as_deref(), *force).await?,
        Command::Completion { .. } | Command::SetupQuota(_) => unreachable!("handled before the manager starts"),
    }
    Ok(ExitCode::SUCCESS)
}

async fn serve_mcp(mgr: &Arc<Manager>, a: &McpArgs) -> Result<()> {
    let transport = match a.http {
        None => mcp::Transport::Stdio,
        Some(addr) => mcp::Transport::Http { addr, token: mcp::token(a.token_file.as_deref())? },
    };
    let options = mcp::Options {
        max_output: usize::try_from(a.max_output).unwrap_or(usize::MAX),
        max_read: a.max_read,
        exec_timeout: a.exec_timeout,
    };
    mcp::serve(mgr.clone(), options, transport).await
}
