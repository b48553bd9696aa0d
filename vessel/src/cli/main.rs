//! `vessel`: the command-line tool over [`vessel::Manager`].
//!
//! Each invocation opens what it needs and closes it again. Only snapshots
//! are durable (see the crate docs), so the commands that change a vessel
//! (`write`, `exec --persist`) commit a snapshot of their change; `exec`
//! without `--persist` changes nothing.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
mod commands;
mod force;
mod keeper;
mod live;
mod mcp;
mod view;

use vessel::{Backend, CompressedStorage, LocalStorage, Manager, ManagerConfig, QuotaMode, VesselOptions};

#[derive(Debug, Parser)]
#[command(name = "vessel", version, about = "Containerized, snapshotting workspaces for AI agents")]
struct Cli {
    /// Storage directory (manifests, snapshots, images; default ~/.local/share/vessel/data).
    #[arg(long, global = true, env = "VESSEL_DATA", conflicts_with = "storage")]
    data: Option<PathBuf>,
    /// Storage URL: `s3://bucket/prefix` (AWS_* variables; AWS_ENDPOINT_URL
    /// for an S3-compatible server), `gs://…`, `az://…`, `file:///dir`.
    /// Hosts sharing it share vessels, one host at a time per vessel.
    #[arg(long, global = true, env = "VESSEL_STORAGE")]
    storage: Option<String>,
    /// The name other hosts see on the vessels this one holds (default: the host name).
    #[arg(long, global = true, env = "VESSEL_HOST_NAME")]
    host_name: Option<String>,
    /// Seconds this host's lease outlives its last renewal (default 30).
    #[arg(long, global = true, env = "VESSEL_LEASE_TTL", value_parser = parse_timeout)]
    lease_ttl: Option<Duration>,
    /// Pause a vessel's processes after this many seconds with no command
    /// and no output from them (resumed by the next call); off by default.
    #[arg(long, global = true, env = "VESSEL_IDLE_PAUSE", value_parser = parse_timeout)]
    idle_pause: Option<Duration>,
    /// This host's mount root (mounts, layer cache).
    #[arg(long, global = true, env = "VESSEL_MOUNT_ROOT")]
    mount_root: Option<PathBuf>,
    /// Container runtime.
    #[arg(long, global = true, value_enum, default_value_t = BackendArg::Youki, env = "VESSEL_BACKEND")]
    backend: BackendArg,
    /// containerd's socket (containerd backend).
    #[arg(long, global = true, env = "VESSEL_CONTAINERD_ADDRESS")]
    containerd_address: Option<PathBuf>,
    /// containerd namespace.
    #[arg(long, global = true, default_value = "vessel", env = "VESSEL_NAMESPACE")]
    namespace: String,
    /// Machine-readable output (JSON on stdout).
    #[arg(long, global = true)]
    json: bool,
    /// Disk quotas of vessels: `auto` enforces them where the mount root can
    /// (btrfs with quotas; see `vessel setup-quota`) and warns where it
    /// cannot, `require` refuses to run without, `off` never checks. As a
    /// boolean (1/0, yes/no, on/off, true/false): on is `require`.
    #[arg(long, global = true, env = "VESSEL_DISK_QUOTA", value_parser = parse_quota_mode, default_value = "auto")]
    disk_quota: QuotaMode,
    /// Same as `--disk-quota off`.
    #[arg(
        long,
        global = true,
        env = "VESSEL_NO_DISK_QUOTA",
        value_parser = clap::builder::BoolishValueParser::new(),
        action = clap::ArgAction::SetTrue
    )]
    no_disk_quota: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum BackendArg {
    Youki,
    Containerd,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Images in storage.
    #[command(subcommand)]
    Image(ImageCommand),
    /// Create a vessel from an image; prints its id.
    Create(CreateArgs),
    /// List vessels.
    Ls,
    /// Run a command in a vessel; exits with its exit code. With -d, in
    /// the background: prints its process id (see ps, logs, kill, wait).
    Exec(ExecArgs),
    /// A vessel's background processes (started with `exec -d`).
    Ps {
        /// Vessel id or name.
        id: String,
    },
    /// Print a background process's output (stdout and stderr; the last
    /// 1 MiB of each is kept).
    Logs {
        /// Follow the output until the process ends.
        #[arg(short, long)]
        follow: bool,
        /// Vessel id or name.
        id: String,
        /// Process id (from `exec -d` or `ps`).
        process: u64,
    },
    /// Send a signal to a background process and its process group.
    Kill {
        /// Vessel id or name.
        id: String,
        /// Process id.
        process: u64,
        /// Signal name or number.
        #[arg(default_value = "TERM", value_parser = live::parse_signal)]
        signal: i32,
    },
    /// Wait for a background process to end; prints its exit code.
    Wait {
        /// Vessel id or name.
        id: String,
        /// Process id.
        process: u64,
    },
    /// Freeze every process of a vessel (they keep their memory, use no CPU).
    Pause {
        /// Vessel id or name.
        id: String,
    },
    /// Let a paused vessel's processes run again.
    Resume {
        /// Vessel id or name.
        id: String,
    },
    /// Stop a vessel's background processes and close it.
    Stop {
        /// Vessel id or name.
        id: String,
    },
    /// Hold a vessel open for background processes (started by `exec -d`).
    #[command(hide = true)]
    Keep {
        /// Vessel id.
        id: String,
        /// Seconds without a running process or a call before it closes the vessel.
        #[arg(long, value_parser = parse_timeout)]
        linger: Duration,
    },
    /// Print a file of a vessel to stdout.
    Read {
        /// Vessel id or name.
        id: String,
        /// Path inside the vessel (relative to its work dir).
        path: String,
    },
    /// Write stdin to a file of a vessel (committed as a snapshot).
    Write {
        /// Vessel id or name.
        id: String,
        /// Path inside the vessel (relative to its work dir).
        path: String,
        /// Permission bits of a new file (octal).
        #[arg(long, default_value = "644")]
        mode: String,
    },
    /// Snapshot a vessel's current state.
    Snapshot {
        /// Vessel id or name.
        id: String,
        /// What the snapshot is.
        #[arg(short, long, default_value = "")]
        message: String,
    },
    /// A vessel's snapshots as a tree.
    Snapshots {
        /// Vessel id or name.
        id: String,
    },
    /// Make a snapshot the vessel's current state.
    Restore {
        /// Vessel id or name.
        id: String,
        /// Snapshot id.
        snapshot: String,
    },
    /// Serve vessel's tools to agents over the Model Context Protocol
    /// (stdio, or streamable HTTP with --http).
    Mcp(McpArgs),
    /// Delete a vessel, or one of its snapshots.
    Rm {
        /// Vessel id or name.
        id: String,
        /// Delete this snapshot instead of the vessel.
        #[arg(long)]
        snapshot: Option<String>,
        /// Stop what runs in the vessel first (a `vessel` command of this
        /// host that has it open is terminated).
        #[arg(short, long, conflicts_with = "snapshot")]
        force: bool,
    },
    /// Give the mount root disk quotas (root): a sparse, loop-mounted btrfs
    /// image with quotas on. Idempotent; prints the /etc/fstab line that
    /// keeps it across reboots.
    SetupQuota(SetupQuotaArgs),
    /// Print a shell completion script (e.g. `vessel completion bash >
    /// /etc/bash_completion.d/vessel`).
    Completion {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

/// `vessel setup-quota`'s options.
#[derive(Debug, clap::Args)]
pub(crate) struct SetupQuotaArgs {
    /// Size of the filesystem (sparse: it takes only what vessels write).
    #[arg(long, value_parser = parse_size, default_value = "64g")]
    pub(crate) size: u64,
    /// The image file (default: beside the mount root, `<mount root>.btrfs`).
    #[arg(long)]
    pub(crate) image: Option<PathBuf>,
    /// Unmount it instead (the image file stays unless --delete-image).
    #[arg(long)]
    pub(crate) remove: bool,
    /// With --remove: delete the image file too (every cached layer in it goes).
    #[arg(long, requires = "remove")]
    pub(crate) delete_image: bool,
}

#[derive(Debug, Subcommand)]
enum ImageCommand {
    /// Import an image archive (docker save or OCI layout; plain, gzip or zstd).
    Import {
        /// The archive file.
        archive: PathBuf,
        /// The reference to store it as.
        reference: String,
    },
    /// Pull an image from a registry into storage (loopback registries over
    /// plain HTTP; credentials from docker's config.json or the options).
    Pull {
        /// The reference, e.g. localhost:5000/team/app:v1.
        reference: String,
        /// User name for the registry (with --password-stdin).
        #[arg(long, requires = "password_stdin")]
        username: Option<String>,
        /// Read the password from stdin.
        #[arg(long)]
        password_stdin: bool,
        /// Reach this registry over plain HTTP.
        #[arg(long)]
        insecure: bool,
    },
    /// List the images in storage.
    Ls,
}

/// `vessel create`'s arguments.
#[derive(Debug, clap::Args)]
struct CreateArgs {
    /// Image reference, e.g. local/busybox:latest.
    pub(crate) image: String,
    /// A name for the vessel, usable wherever its id is (unique per storage).
    #[arg(long)]
    pub(crate) name: Option<String>,
    /// Default directory for relative paths and commands.
    #[arg(long, default_value = "/work")]
    pub(crate) work_dir: String,
    /// Memory of each command (bytes, or with k/m/g/t), e.g. 512m.
    #[arg(long, value_parser = parse_size)]
    pub(crate) memory: Option<u64>,
    /// CPUs of each command, e.g. 0.5.
    #[arg(long)]
    pub(crate) cpus: Option<f64>,
    /// Processes and threads of each command.
    #[arg(long)]
    pub(crate) pids: Option<i64>,
    /// What the vessel may write to disk (bytes, or with k/m/g/t), e.g. 2g.
    #[arg(long, value_parser = parse_size)]
    pub(crate) disk: Option<u64>,
}

/// `vessel exec`'s arguments.
#[derive(Debug, clap::Args)]
struct ExecArgs {
    /// Run in the background (its changes are the vessel's, as with
    /// --persist, and committed by the next snapshot); prints its process id.
    #[arg(short = 'd', long, conflicts_with_all = ["tty", "interactive", "persist"])]
    pub(crate) detach: bool,
    /// With -d: seconds the vessel stays open once no process runs and no
    /// command calls (ended processes' statuses are kept until then).
    #[arg(long, value_parser = parse_timeout, default_value = "300", env = "VESSEL_KEEPER_LINGER", requires = "detach")]
    pub(crate) linger: Duration,
    /// Run on a terminal (stdin attached).
    #[arg(short = 't', long)]
    pub(crate) tty: bool,
    /// Attach stdin.
    #[arg(short = 'i', long)]
    pub(crate) interactive: bool,
    /// Keep the command's changes (committed as a snapshot).
    #[arg(long)]
    pub(crate) persist: bool,
    /// Working directory inside the vessel.
    #[arg(short = 'w', long)]
    pub(crate) work_dir: Option<String>,
    /// `KEY=VALUE` environment (repeatable).
    #[arg(short = 'e', long = "env")]
    pub(crate) env: Vec<String>,
    /// Kill the command after this many seconds (exit 137, `timed_out` in --json).
    #[arg(long, value_parser = parse_timeout)]
    pub(crate) timeout: Option<Duration>,
    /// Vessel id or name.
    pub(crate) id: String,
    /// The command and its arguments (after `--`).
    #[arg(last = true, required = true)]
    pub(crate) command: Vec<String>,
}

/// `vessel mcp`'s options.
#[derive(Debug, clap::Args)]
struct McpArgs {
    /// Serve streamable HTTP on this loopback address (e.g. 127.0.0.1:8931)
    /// instead of stdio; clients send `Authorization: Bearer <token>`.
    #[arg(long)]
    http: Option<std::net::SocketAddr>,
    /// The bearer token's file (mode 600). Without it and VESSEL_MCP_TOKEN,
    /// a random token is made and printed to stderr.
    #[arg(long, requires = "http")]
    token_file: Option<PathBuf>,
    /// Bytes of stdout, and of stderr, an exec returns (its start and end).
    #[arg(long, value_parser = parse_size, default_value = "64k")]
    max_output: u64,
    /// Bytes a read_file returns at most.
    #[arg(long, value_parser = parse_size, default_value = "1m")]
    max_read: u64,
    /// Seconds an exec may run when the call names no timeout.
    #[arg(long, value_parser = parse_timeout, default_value = "300")]
    exec_timeout: Duration,
}

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
            | Command::Exec(_)
            | Command::Write { .. }
            | Command::Restore { .. }
            | Command::Mcp(_)
            | Command::Keep { .. }
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
        ("--containerd-address", cli.containerd_address.as_ref().map(|a| a.display().to_string())),
    ];
    for (flag, value) in pairs {
        if let Some(v) = value {
            g.extend([flag.to_owned(), v]);
        }
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
        Command::Ps { id } => live::ps(mgr, id, json).await?,
        Command::Logs { follow, id, process } => live::logs(mgr, id, *process, *follow).await?,
        Command::Kill { id, process, signal } => live::kill(mgr, id, *process, *signal).await?,
        Command::Wait { id, process } => return live::wait(mgr, id, *process, json).await,
        Command::Pause { id } => live::pause(mgr, id, true).await?,
        Command::Resume { id } => live::pause(mgr, id, false).await?,
        Command::Stop { id } => live::stop(mgr, id).await?,
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
